"""The candidate side of a graded run: loads model-written code and answers calls to it.

Runs inside the sandbox (:mod:`omniopd.evaluation.sandbox_boot` starts it as ``__main__``), in its
own process, apart from the judge that holds the tests and decides the verdict
(:mod:`omniopd.evaluation.verdict`). Everything here is within the candidate's reach and nothing here
is trusted: the parent only ever reads plain data from this process.

Messages sent (``omniopd_wire`` framing): ``loading``, then ``ready`` or ``load_failed`` (the code
raised, exited, or does not define the entry point), then for each ``call`` received either
``returned`` (the value, encoded) or ``raised`` (the exception's type and message). A call may ask for
``digest`` instead of the value: the SHA-256 of ``repr(value)`` (used for very large outputs), or the
``not_none`` projection (the value if it is a bool, else whether it is not None: what EvalPlus's
"not None" oracle compares, for tasks that return ``re.Match`` objects).
"""

import builtins
import hashlib
import os
import sys


def _describe(exc):
    try:
        text = str(exc)
    except BaseException:
        text = "<unprintable>"
    return "%s: %s" % (type(exc).__name__, text[:500])


def main():
    import omniopd_sandbox  # installed by the bootstrap
    import omniopd_wire as wire

    payload = omniopd_sandbox.payload
    channel = wire.Channel(*omniopd_sandbox.channel)
    send = channel.send
    code, entry = payload["code"], payload["entry_point"]
    try:
        sink = open(os.devnull, "w")
        sys.stdout = sys.stderr = sink  # the program's prints go nowhere
    except OSError:
        pass
    send({"op": "loading"})
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(code, "<completion>", "exec"), namespace)
    except BaseException as exc:  # SystemExit included: exiting while loading is a failure
        send({"op": "load_failed", "error": _describe(exc)})
        return
    fn = namespace.get(entry)
    if not callable(fn):
        send({"op": "load_failed", "error": "the code does not define a function %s()" % entry})
        return
    send({"op": "ready"})
    while True:
        message = channel.recv()
        if message is None or message.get("op") != "call":
            return
        try:
            args = wire.decode(message["args"])
            kwargs = wire.decode(message.get("kwargs") or {"dict": []})
            out = fn(*args, **kwargs)
            if message.get("project") == "not_none":  # EvalPlus's "not None" oracle needs only this
                out = out if isinstance(out, bool) else out is not None
            if message.get("digest"):
                reply = {
                    "op": "returned",
                    "digest": hashlib.sha256(repr(out).encode("utf-8", "surrogatepass")).hexdigest(),
                }
            else:
                reply = {"op": "returned", "value": wire.encode(out)}
        except BaseException as exc:
            reply = {"op": "raised", "error": _describe(exc)}
        send(reply)


if __name__ == "__main__":
    main()
