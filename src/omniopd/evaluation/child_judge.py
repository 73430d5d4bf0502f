"""The judge side of a graded run: holds the tests and decides the verdict.

Runs inside the sandbox (started as ``__main__`` by :mod:`omniopd.evaluation.sandbox_boot`) in a
process of its own that never runs model-written code: the candidate runs in another sandboxed
process, and each call to it goes through the parent (:mod:`omniopd.evaluation.verdict`), which
enforces the time limits and hands back only plain data (``omniopd_wire``). A candidate can therefore
neither see the expected outputs nor reach the code that compares them.

Two kinds of payload:

* ``asserts`` (HumanEval, MBPP): the trusted ``setup`` code (HumanEval's prompt, for its helper
  functions, and its ``test``) runs first; then the entry point's name is bound to a proxy of the
  candidate and each ``tests`` statement runs (``check(entry_point)``, or MBPP's ``assert`` lines).
  The first exception fails the run, as in the official harness; with ``count`` every statement runs
  and the verdict also says how many passed (a reward's partial credit).
* ``differential`` (MBPP+, as EvalPlus): the reference solution runs on every base and plus input
  (timed: each input's limit is ``max(min_time_limit, time_factor * reference time)``; the whole
  candidate budget ``min(60, sum of limits) + 1`` seconds, plus the allowances below, is sent to the
  parent); then the candidate is
  called on each input and its output compared with EvalPlus's rules (``==``, the special oracles of
  eight set-equality tasks, three "not None" tasks, Mbpp/558 and Mbpp/581, and ``allclose`` with the
  task's ``atol`` for floats; for the "not None" tasks the candidate sends only its value's bool or
  whether it is not None, which is all that oracle compares). Grading stops at the first failing input; ``base_passed`` says whether
  every original MBPP input passed. An expected output whose ``repr`` is over 4 MB and that holds only
  lists, tuples, strings, integers, booleans and None is compared by the SHA-256 of its ``repr``
  (exact equality of such values; the candidate computes the digest of its own output). The expected
  outputs, their forms and the time limits are sent back to the parent once (when they are under 16 MB
  as JSON), which passes them in later runs of the same task instead of running the reference again,
  as EvalPlus caches its ground truth.

Each call's time limit includes an allowance for moving the value across the process boundary:
twice the time the judge took to serialise the expected output, plus 50 ms.

The verdict goes to the parent as one message ``{"op": "verdict", "passed": ..., ...}``.
"""

import copy
import hashlib
import math
import reprlib
import sys
import time

_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}
_SET_EQ = {
    "similar_elements",
    "find_char_long",
    "common_in_nested_lists",
    "extract_singly",
    "larg_nnum",
    "intersection_array",
    "find_dissimilar",
    "Diff",
}
_DIGEST_MIN_CHARS = 4 << 20
_EXACT_TYPES = (list, tuple, str, int, bool, type(None))
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 8


def short(value):
    try:
        return _REPR.repr(value)
    except BaseException as exc:
        return "<unprintable %s: %s>" % (type(value).__name__, type(exc).__name__)


class CandidateRaised(Exception):
    """The candidate raised (or returned something that is not plain data) during a call."""


class Candidate:
    """A proxy of the candidate's entry point: each call is a message round trip via the parent."""

    def __init__(self, channel, wire, name):
        self.channel, self.wire, self.__name__ = channel, wire, name
        self.calls = 0

    def call(self, args, kwargs=None, limit=None, digest=False, label=None, project=None):
        self.calls += 1
        message = {
            "op": "call",
            "args": self.wire.encode(list(args)),
            "limit": limit,
            "digest": digest,
            "label": label or "call #%d" % self.calls,
            "project": project,
        }
        if kwargs:
            message["kwargs"] = self.wire.encode(dict(kwargs))
        self.channel.send(message)
        reply = self.channel.recv()
        if reply is None:
            raise SystemExit(0)  # the parent ended the run (a limit, or the candidate died)
        if reply.get("op") == "raised":
            raise CandidateRaised(str(reply.get("error", "")))
        if reply.get("op") != "returned":
            raise CandidateRaised("malformed reply from the candidate")
        if digest:
            return ("digest", str(reply.get("digest")))
        try:
            return self.wire.decode(reply.get("value"))
        except self.wire.ProtocolError as exc:
            raise CandidateRaised("the candidate's value is malformed: %s" % exc) from None

    def __call__(self, *args, **kwargs):
        return self.call(args, kwargs)


# ---------------------------------------------------------------------------------------------------
# asserts


def run_asserts(payload, candidate):
    import builtins
    import linecache
    import traceback

    def compiled(code, filename):
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        return compile(code, filename, "exec")

    namespace = {"__name__": "__judge__", "__builtins__": builtins}
    for index, code in enumerate(payload["setup"]):
        try:
            exec(compiled(code, "<setup-%d>" % index), namespace)
        except BaseException as exc:
            return {
                "passed": False,
                "status": "error",
                "detail": "the test setup failed: %s: %s" % (type(exc).__name__, short(exc)),
            }
    namespace[payload["entry_point"]] = candidate
    tests, first_failure, passed = payload["tests"], None, 0
    for index, code in enumerate(tests):
        failure: dict[str, object] | None = None
        try:
            exec(compiled(code, "<test-%d>" % index), namespace)
        except CandidateRaised as exc:
            failure = {"detail": "the program raised %s" % exc}
        except AssertionError as exc:
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<")]
            where = frames[-1] if frames else None
            line = (where.line or "") if where else ""
            failure = {"detail": "AssertionError: %s%s" % (line.strip()[:300], (" (%s)" % exc) if str(exc) else "")}
        except BaseException as exc:
            failure = {"detail": "the test raised %s: %s" % (type(exc).__name__, short(exc))}
        if failure is None:
            passed += 1
            continue
        failure.update({"passed": False, "status": "failed", "test": index})
        first_failure = first_failure or failure
        if not payload.get("count"):  # the official harness stops at the first failure
            break
    counts = {"tests_passed": passed, "tests_total": len(tests), "calls": candidate.calls}
    if first_failure is not None:
        first_failure.update(counts)
        return first_failure
    return dict({"passed": True, "status": "passed", "detail": ""}, **counts)


# ---------------------------------------------------------------------------------------------------
# differential (EvalPlus's MBPP+ comparison)


def _deep_tuple(x):
    return tuple(_deep_tuple(i) for i in x) if isinstance(x, list) else x


def deserialize(kind, inputs):
    """MBPP+ inputs as EvalPlus passes them: JSON lists turned back into tuples, sets, complex."""
    if kind == "tuple_args":
        return [[tuple(a) for a in inp] for inp in inputs]
    if kind == "tuple_items":
        return [[[tuple(x) for x in a] for a in inp] for inp in inputs]
    if kind == "first_arg_tuple_items":
        return [[[tuple(x) for x in inp[0]]] + inp[1:] for inp in inputs]
    if kind == "second_arg_tuple":
        return [[inp[0], tuple(inp[1])] + inp[2:] for inp in inputs]
    if kind == "first_arg_sets":
        return [[[set(i) if isinstance(i, list) and i else {} for i in inp[0]]] for inp in inputs]
    if kind == "float_complex":
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if kind == "first_arg_tuple":
        return [[tuple(inp[0])] + inp[1:] for inp in inputs]
    if kind == "tuple_of_tuples":
        return [[tuple(tuple(x) for x in a) for a in inp] for inp in inputs]
    if kind == "first_arg_nested_tuple":
        return [[tuple(tuple(i) if isinstance(i, list) else i for i in inp[0])] for inp in inputs]
    if kind == "dict_tuple_values":
        return [[{k: tuple(v) for k, v in inp[0].items()}] + inp[1:] for inp in inputs]
    if kind == "complex":
        return [[complex(inp[0])] for inp in inputs]
    if kind == "deep_tuple":
        return [_deep_tuple(inp) for inp in inputs]
    return inputs


def _surface_area(base_edge, height):  # EvalPlus oracle for Mbpp/581
    slant = math.sqrt((base_edge / 2) ** 2 + height**2)
    return round(base_edge**2 + 4 * (base_edge * slant) / 2)


def _digit_distance(num1, num2):  # EvalPlus oracle for Mbpp/558
    a, b = str(num1), str(num2)
    width = max(len(a), len(b))
    return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(width), b.zfill(width)))


def _is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _close(a, b, rtol, atol):  # numpy.allclose on nested sequences of numbers
    seq = (list, tuple)
    if isinstance(a, seq) or isinstance(b, seq):
        if isinstance(a, seq) and isinstance(b, seq):
            return len(a) == len(b) and all(_close(x, y, rtol, atol) for x, y in zip(a, b))
        if isinstance(a, seq):
            return all(_close(x, b, rtol, atol) for x in a)
        return all(_close(a, y, rtol, atol) for y in b)
    number = (int, float, complex)
    if not isinstance(a, number) or not isinstance(b, number):
        return False
    if a == b:
        return True
    try:
        return abs(a - b) <= atol + rtol * abs(b)
    except (OverflowError, TypeError):
        return False


def check_output(entry, inp, out, exp, atol):
    """EvalPlus's comparison of one output (``out``, plain data) with the expected one."""
    exact = out == exp
    if entry == "are_equivalent":
        exact = True
    elif entry == "sum_div":
        exact = exact or out == 0
    elif entry == "surface_Area":
        exact = exact or abs(out - _surface_area(*inp)) <= atol
    elif entry == "digit_distance_nums":
        exact = exact or out == _digit_distance(*inp)
    elif entry in _SET_EQ:
        exact = set(out) == set(exp)
    elif entry in _NOT_NONE:
        exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if atol == 0 and _is_floats(exp):
        atol = 1e-6
    if not exact and atol != 0:
        if type(out) is not type(exp):
            return False
        if isinstance(exp, (list, tuple)) and len(out) != len(exp):
            return False
        return _close(out, exp, 1e-07, atol)
    return bool(exact)


def _exact_only(value):
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind not in _EXACT_TYPES:
            return False
        if kind is list or kind is tuple:
            stack.extend(item)
    return True


def _expected_form(entry, value, wire):
    """(form, value or digest, its wire form, seconds to serialise): large exact values become a digest.
    The wire form is what the parent caches; making it is the serialising that is timed."""
    import json

    start = time.perf_counter()
    if entry not in _SET_EQ and entry not in _NOT_NONE and isinstance(value, (list, tuple, str)):
        text = repr(value)
        if len(text) >= _DIGEST_MIN_CHARS and _exact_only(value):
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            return "digest", digest, digest, time.perf_counter() - start
        del text
    encoded = wire.encode(value)
    json.dumps(encoded)
    return "value", value, encoded, time.perf_counter() - start


_CACHE_MAX_CHARS = 16 << 20  # expected outputs larger than this (as JSON) are not sent back for caching


def _reference_rows(payload, splits, wire, channel):
    """The expected outputs: from the payload when the parent cached them from an earlier run of the
    same task, else computed (and offered to the parent for the next runs when they are small)."""
    entry = payload["entry_point"]
    if payload.get("expected") is not None:
        return {
            split: [
                (form, wire.decode(v) if form == "value" else v, limit, call_limit)
                for form, v, limit, call_limit in payload["expected"][split]
            ]
            for split, _ in splits
        }
    namespace: dict = {"__name__": "__reference__"}  # the reference's globals, whatever it defines
    exec(compile(payload["reference"], "<reference>", "exec"), namespace)
    reference = namespace[entry]
    expected, cacheable = {}, {}
    for split, inputs in splits:
        rows, cached = [], []
        for inp in inputs:
            start = time.perf_counter()
            out = reference(*copy.deepcopy(inp))
            seconds = time.perf_counter() - start
            if entry in _NOT_NONE:
                out = out is not None
            form, value, encoded, serialise = _expected_form(entry, out, wire)
            del out
            limit = max(payload["min_time_limit"], payload["time_factor"] * seconds)
            rows.append((form, value, limit, limit + 2 * serialise + 0.05))
            cached.append([form, encoded, limit, limit + 2 * serialise + 0.05])
        expected[split], cacheable[split] = rows, cached
    import json

    if len(json.dumps(cacheable)) <= _CACHE_MAX_CHARS:
        channel.send({"op": "reference", "rows": cacheable})
    return expected


def run_differential(payload, candidate, channel, wire):
    entry, atol = payload["entry_point"], payload["atol"]
    kind = payload["deserialize"]
    splits = [("base", deserialize(kind, payload["base_input"])), ("plus", deserialize(kind, payload["plus_input"]))]
    try:
        expected = _reference_rows(payload, splits, wire, channel)
    except BaseException as exc:
        return {
            "passed": False,
            "base_passed": False,
            "status": "error",
            "detail": "the reference solution failed: %s: %s" % (type(exc).__name__, short(exc)),
        }
    total = sum(row[2] for rows in expected.values() for row in rows)
    moving = sum(row[3] - row[2] for rows in expected.values() for row in rows)
    channel.send({"op": "budget", "seconds": min(60.0, total) + 1.0 + moving})

    def fail(split, index, message, inp=None, **extra):
        out = {"passed": False, "base_passed": split == "plus", "status": "failed", "split": split, "index": index}
        if inp is not None:
            out["input"] = short(inp)
        out.update(extra)
        lines = ["%s input #%d: %s" % (split, index, message)]
        lines += ["%s: %s" % (key, out[key]) for key in ("input", "expected", "got") if key in out]
        out["detail"] = "\n".join(lines)
        return out

    for split, inputs in splits:
        for index, inp in enumerate(inputs):
            form, exp, _, call_limit = expected[split][index]
            try:
                out = candidate.call(
                    copy.deepcopy(inp),
                    limit=call_limit,
                    digest=form == "digest",
                    label="%s input #%d" % (split, index),
                    project="not_none" if entry in _NOT_NONE else None,
                )
            except CandidateRaised as exc:
                return fail(split, index, "the program raised %s" % exc, inp)
            if form == "digest":
                ok = out == ("digest", exp)
                if not ok:
                    return fail(split, index, "wrong output (compared by digest: the expected output is large)", inp)
                continue
            try:
                ok = check_output(entry, inp, out, exp, atol)
            except BaseException as exc:  # e.g. set() of unhashable items, as EvalPlus would fail
                return fail(
                    split,
                    index,
                    "the comparison raised %s: %s" % (type(exc).__name__, short(exc)),
                    inp,
                    expected=short(exp),
                    got=short(out),
                )
            if not ok:
                return fail(split, index, "wrong output", inp, expected=short(exp), got=short(out))
    return {
        "passed": True,
        "base_passed": True,
        "status": "passed",
        "detail": "",
        "tests": sum(len(inputs) for _, inputs in splits),
    }


def main():
    import omniopd_sandbox  # installed by the bootstrap
    import omniopd_wire as wire

    sys.set_int_max_str_digits(0)
    payload = omniopd_sandbox.payload
    channel = wire.Channel(*omniopd_sandbox.channel)
    candidate = Candidate(channel, wire, payload["entry_point"])
    try:
        if payload["kind"] == "asserts":
            verdict = run_asserts(payload, candidate)
        elif payload["kind"] == "differential":
            verdict = run_differential(payload, candidate, channel, wire)
        else:
            verdict = {"passed": False, "status": "error", "detail": "unknown payload kind %r" % payload["kind"]}
    except wire.Unsupported as exc:
        verdict = {"passed": False, "status": "error", "detail": "a test input cannot be sent: %s" % exc}
    verdict["op"] = "verdict"
    channel.send(verdict)


if __name__ == "__main__":
    main()
