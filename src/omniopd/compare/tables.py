"""The comparison's tables (markdown, csv, json), plot and console summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omniopd.compare.arms import is_base
from omniopd.compare.judge import Judge, _benchmark_labels, is_code_benchmark
from omniopd.config import RunConfig
from omniopd.methods.opd import NOT_APPLICABLE as NOT_APPLICABLE_OPD  # noqa: F401 - the status of such a row

# ------------------------------------------------------------------------------------------ tables


def _fmt(m: dict | None, digits: int = 3, pct: bool = False) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    k = 100.0 if pct else 1.0
    unit = "%" if pct else ""
    d = 1 if pct else digits
    v = f"{k * m['value']:.{d}f}{unit}"
    if m.get("lo") is None:
        return v
    return f"{v} [{k * m['lo']:.{d}f}, {k * m['hi']:.{d}f}]"


def _bench_value(r: dict, bench: str, key: str) -> dict | None:
    """One measure of one arm: per benchmark, or the arm's reverse KL (one for all benchmarks)."""
    m = r.get("measures") or {}
    if key == "reverse_kl":
        return m.get("reverse_kl")
    return ((m.get("benchmarks") or {}).get(bench) or {}).get(key)


def _csv_rows(rows: list[dict], judge: Judge) -> tuple[list[str], list[list]]:
    """One row per arm. One benchmark: the columns as they always were; several: every per-benchmark
    column prefixed with the benchmark's name (``humaneval_accuracy``), the reverse KL once."""
    cols = ["variant", "method", "status", "departures", "changes", "teacher", "lr", "rollout_temperature", "steps"]
    for b in judge.benchmarks:
        p = f"{judge.labels[b]}_" if judge.multi else ""
        cols += [
            f"{p}accuracy",
            f"{p}accuracy_lo",
            f"{p}accuracy_hi",
            f"{p}n_problems",
            f"{p}diff_vs_base",
            f"{p}diff_lo",
            f"{p}diff_hi",
        ]
        for key, _, _ in judge.measures_for(b):
            cols += [f"{p}{key}", f"{p}{key}_lo", f"{p}{key}_hi"]
    if judge.multi:
        cols += ["reverse_kl", "reverse_kl_lo", "reverse_kl_hi"]
    cols += ["teacher_tokens", "teacher_requests", "train_wall_s", "eval_wall_s"]
    out = []
    for r in rows:
        m = r.get("measures") or {}
        line = [
            r["name"],
            r["method"],
            r["status"],
            "; ".join(r["departures"]),
            r["changes"],
            r["teacher"],
            r["lr"],
            r["rollout_temperature"],
            r["steps"],
        ]
        for b in judge.benchmarks:
            acc, diff = _bench_value(r, b, "accuracy") or {}, (r.get("diffs") or {}).get(b) or {}
            line += [
                acc.get("value"),
                acc.get("lo"),
                acc.get("hi"),
                acc.get("n"),
                diff.get("value"),
                diff.get("lo"),
                diff.get("hi"),
            ]
            for key, _, _ in judge.measures_for(b):
                x = _bench_value(r, b, key) or {}
                line += [x.get("value"), x.get("lo"), x.get("hi")]
        if judge.multi:
            x = m.get("reverse_kl") or {}
            line += [x.get("value"), x.get("lo"), x.get("hi")]
        line += [r.get("teacher_tokens"), r.get("teacher_requests"), r.get("train_wall_s"), m.get("eval_wall_s")]
        out.append(line)
    return cols, out


def _not_run(status: str) -> bool:
    return status.startswith(("not applicable", "not run"))


def write_tables(
    out: Path, cfg: RunConfig, rows: list[dict], signal: dict | None, signal_error: str | None, judge: Judge
) -> None:
    cols, data = _csv_rows(rows, judge)
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerows(data)
    (out / "comparison.json").write_text(
        json.dumps(
            {"benchmarks": judge.benchmarks, "rows": rows, "signal_check": signal, "signal_error": signal_error},
            indent=2,
            default=str,
        )
    )

    def num(x, fmt="{:,.0f}"):
        return "—" if x is None else fmt.format(x)

    def cell(text: str) -> str:  # an error message must not break the table
        return " ".join(str(text).split()).replace("|", "\\|")

    e = cfg.eval
    benches, multi = judge.benchmarks, judge.multi
    prefix = {b: f"{judge.labels[b]} " if multi else "" for b in benches}
    math = [b for b in benches if not is_code_benchmark(b)]
    code = [b for b in benches if is_code_benchmark(b)]
    if multi:
        where = (
            f"Evaluation, greedy, at most {e.max_new_tokens} new tokens, on "
            + "; ".join(f"the first {judge.eval_counts[b]} problems of `{b}`" for b in benches)
            + "."
        )
    else:
        where = f"Evaluation: first {judge.eval_counts[benches[0]]} problems of `{benches[0]}`, greedy, at most {e.max_new_tokens} new tokens."
    L = [f"# Comparison: {cfg.output_dir}", ""]
    L.append(
        f"Student `{cfg.student.name}`, teacher `{cfg.teacher.type}` ({cfg.teacher.model or 'the student model'}), "
        f"{cfg.max_steps} steps × {cfg.optim.prompts_per_step} prompts × {cfg.rollout.samples_per_prompt} samples, seed {cfg.seed}, "
        f"training data `{cfg.data.train}` in the same order for every arm. {where}"
    )
    acc_cols = " | ".join(f"{prefix[b]}accuracy [95% CI] | {prefix[b]}Δ vs base, points [95% CI]" for b in benches)
    L += [
        "",
        "## Accuracy and cost",
        "",
        f"| variant | method | status | departures / ablations | lr | rollout T | steps | {acc_cols} "
        "| teacher tokens | teacher requests | train wall | eval wall |",
        "|---" * (11 + 2 * len(benches)) + "|",
    ]
    for r in rows:
        m = r.get("measures") or {}
        accs = " | ".join(
            f"{_fmt(_bench_value(r, b, 'accuracy'), pct=True)} | "
            f"{_fmt((r.get('diffs') or {}).get(b), pct=True) if not is_base(r) else '—'}"
            for b in benches
        )
        L.append(
            f"| {r['name']} | {r['method']} | {cell(r['status'])} | {'; '.join(r['departures']) or '—'} | {num(r['lr'], '{:g}')} | "
            f"{num(r['rollout_temperature'], '{:g}')} | {num(r['steps'], '{:d}')} | {accs} | {num(r.get('teacher_tokens'))} | "
            f"{num(r.get('teacher_requests'))} | {num(r.get('train_wall_s'), '{:.0f} s')} | {num(m.get('eval_wall_s'), '{:.0f} s')} |"
        )
    control = cfg.compare.control
    if control is not None:
        L += [
            "",
            f"## Paired differences against `{control}`, points [95% CI]",
            "",
            "| variant | " + " | ".join(f"{prefix[b] or b + ' '}Δ vs {control}" for b in benches) + " |",
            "|---" * (len(benches) + 1) + "|",
        ]
        for r in rows:
            if r["name"] == control:
                continue
            cells = [_fmt((r.get("diffs_control") or {}).get(b), pct=True) for b in benches]
            L.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    for b in benches:
        ms = judge.measures_for(b)
        L += [
            "",
            f"## Continuous measures on `{b}` (95% intervals)" if multi else "## Continuous measures (95% intervals)",
            "",
            "| variant | " + " | ".join(title for _, title, _ in ms) + " |",
            "|---" * (len(ms) + 1) + "|",
        ]
        for r in rows:
            cells = [_fmt(_bench_value(r, b, key), pct=(kind == "share")) for key, _, kind in ms]
            L.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    if multi:
        L += [
            "",
            "## Reverse KL to the teacher (95% intervals)",
            "",
            "| variant | reverse KL to teacher/token |",
            "|---|---|",
        ]
        L += [f"| {r['name']} | {_fmt((r.get('measures') or {}).get('reverse_kl'))} |" for r in rows]
    from omniopd.evaluation import measures as M

    kl_notes = [((r.get("measures") or {}).get("reverse_kl") or {}).get("note") for r in rows]
    kl_note = next((n for n in kl_notes if n), None)
    L += [
        "",
        "## How to read this",
        "",
        "- **accuracy**: Wilson 95% interval. **Δ vs base**: paired per problem, d_i = correct_i(arm) − correct_i(base); "
        "mean ± 1.96·sd(d)/√n (normal approximation for paired differences of binary outcomes).",
    ]
    if math:
        L += [
            "- **ref log-lik/token**: mean log-probability per token of the reference solutions of the "
            + ", of the ".join(f"first {len(judge.loglik_examples[b])} `{b}` problems" for b in math)
            + " (calculator annotations `<<…>>` removed, EOS included) after the student's prompt; percentile bootstrap over problems.",
            "- **explicit final answer**: the answer states its final answer as `#### x` or `\\boxed{x}` (right or wrong); answers graded "
            "only through their last number do not count.",
            "- **#### then stop**: the answer ended with EOS before the length limit and its last non-empty line holds `####` and an answer.",
            f"- **loops**: `####` {M.LOOP_MARKER_COUNT}+ times, or the last {M.LOOP_WINDOW_CHARS} characters (whitespace collapsed, "
            f"digit runs → 0) are periodic with period ≤ {M.LOOP_MAX_PERIOD} (three or more copies of one string fill the tail).",
            f"- **hit length limit**: no EOS within {e.max_new_tokens} tokens. **≤ 10 tokens**: answers of at most {M.SHORT_TOKENS} tokens. "
            "Shares: Wilson intervals; mean length: bootstrap over problems.",
        ]
    if code:
        L += [
            "- **accuracy on "
            + ", ".join(f"`{b}`" for b in code)
            + "**: pass@1 of the greedy answer, its code graded in the isolated "
            "sandbox (HumanEval: the task's official `check`; MBPP+: the EvalPlus base and plus inputs)."
        ]
        if any(b.lower() == "mbppplus" for b in code):
            L.append(
                "- **MBPP base tests pass@1**: the same answers on MBPP+'s original MBPP inputs only (the MBPP base score); Wilson interval."
            )
        L += [
            "- **canonical log-lik/token**: mean log-probability per token of the canonical solutions of the "
            + ", of the ".join(f"first {len(judge.loglik_examples[b])} `{b}` problems" for b in code)
            + " (HumanEval: prompt + canonical solution; MBPP+: the canonical solution), written as one fenced python block and "
            "followed by EOS, after the student's evaluation prompt (the task and the code instruction); percentile bootstrap over problems.",
            "- **valid Python**: the code extracted from the answer is non-empty and parses on its own (`ast.parse`); an answer that only "
            "continues the HumanEval prompt's body, without its `def` line, does not. **defines entry point**: that code defines the "
            "task's function at top level (`def name(`; for code that does not parse, a `def name(` line).",
            f"- **hit length limit** (code): no EOS within {e.max_new_tokens} tokens. **mean length**: generated tokens, bootstrap over "
            "problems. Shares: Wilson intervals.",
        ]
    kl_rollouts = (
        f" The rollouts were sampled once from the base student (temperature {cfg.rollout.temperature:g}, seed "
        f"{cfg.seed}+4242) on the first {cfg.compare.kl_rollouts} `{e.data}` problems."
        if cfg.compare.kl_rollouts
        else ""
    )
    L += [
        f"- **reverse KL to teacher**: {kl_note or 'n/a'}; token-weighted mean, bootstrap over rollouts.{kl_rollouts}",
        "- **departures** (off by default in the paper's method, labelled wherever they are used): centred target "
        "(chunk weight π̂ − mean π̂ of the step, can push chunks down), embedding φ (all-MiniLM-L6-v2 cosine clipped to [0, 1]), "
        "adaptive N (teacher asked in rounds; a chunk stops before N once its 95% posterior interval is narrow enough), "
        "rollout temperature or top_p below 1. **ablations**: the paper's switches (no KL anchor, α = 0, other anchor selectors).",
        "- teacher tokens: OmniOPD prompt + continuation tokens of the audits; SFT the tokens of the teacher-written "
        "solutions used (counted even when read from the cache); OPD the tokens of the teacher's forward passes; GRPO none.",
    ]
    if any(_not_run(r["status"]) for r in rows):
        L.append(
            "- **not applicable**: an arm that cannot run by construction is neither trained nor measured. White-box OPD reads "
            "the teacher's log-probabilities over the student's own tokens, which a teacher with another tokenizer does not have; "
            "OmniOPD and SFT work with such a teacher."
        )
    failed = [r for r in rows if not r["status"].startswith("ok") and not _not_run(r["status"])]
    if failed:
        L += ["", "## Failed arms", ""] + [
            f"- **{r['name']}**: {cell(r['status'])} (log: `logs/{r['name']}.log`)" for r in failed
        ]
    L += ["", "## Signal check (does k_sem carry teacher information?)", ""]
    if signal:
        from omniopd.diagnostics.signal_check import format_signal

        L += ["```", format_signal(signal), "```"]
    else:
        L.append(signal_error or "not run (no omniopd arm, or compare.signal_steps=0)")
    if (out / "comparison.png").is_file():
        L += ["", "![training curves and final measures](comparison.png)"]
    (out / "comparison.md").write_text("\n".join(L) + "\n", encoding="utf-8")


def _final_panels(judge: Judge | None) -> list[tuple[str | None, str, str]]:
    """(benchmark, measure, title) of the final-measure panels: today's six for one math benchmark; the
    accuracy of every benchmark first when there are several."""
    if judge is None or (not judge.multi and not is_code_benchmark(judge.benchmarks[0])):
        b = judge.benchmarks[0] if judge else None
        return [
            (b, "accuracy", "accuracy"),
            (b, "ref_loglik", "ref log-lik/token"),
            (b, "answered_stopped", "#### then stop"),
            (b, "loops", "loops"),
            (b, "mean_length", "mean length (tokens)"),
            (b, "reverse_kl", "reverse KL to teacher/token"),
        ]
    if not judge.multi:
        b = judge.benchmarks[0]
        return [
            (b, "accuracy", "pass@1"),
            (b, "ref_loglik", "canonical log-lik/token"),
            (b, "valid_syntax", "valid Python"),
            (b, "defines_entry_point", "defines entry point"),
            (b, "mean_length", "mean length (tokens)"),
            (b, "reverse_kl", "reverse KL to teacher/token"),
        ]
    out: list[tuple[str | None, str, str]] = [(b, "accuracy", f"{judge.labels[b]} accuracy") for b in judge.benchmarks]
    out += [
        (b, "ref_loglik", f"{judge.labels[b]} {'canonical' if is_code_benchmark(b) else 'ref'} log-lik/token")
        for b in judge.benchmarks
    ]
    return [*out, (None, "reverse_kl", "reverse KL to teacher/token")]


def write_plot(out: Path, rows: list[dict], judge: Judge | None = None) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'omniopd[report]'): no comparison.png"
    curves = [
        ("rollout/mean_length", "rollout mean length (tokens)"),
        ("rollout/truncated_frac", "rollouts hitting the limit"),
        ("loss/total", "loss/total (each method's own loss)"),
        ("teacher/tokens_total", "teacher tokens (cumulative)"),
    ]
    finals = _final_panels(judge)
    color = {r["name"]: f"C{i % 10}" for i, r in enumerate(rows)}  # one colour per arm in every panel
    nrows = 1 + max(2, -(-len(finals) // 4))
    fig, axes = plt.subplots(nrows, 4, figsize=(17, 11 * nrows / 3))
    for ax, (key, title) in zip(axes[0], curves, strict=True):
        for r in rows:
            path = Path(r.get("run_dir") or "") / "metrics.jsonl"
            if not r.get("run_dir") or not path.is_file():
                continue
            pts = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if key in row:
                    pts.append((row["step"], row[key]))
            if pts:
                ax.plot(*zip(*pts), marker=".", color=color[r["name"]], label=r["name"])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
    names = [r["name"] for r in rows]
    panels = [ax for row_axes in axes[1:] for ax in row_axes]
    for ax, (bench, key, title) in zip(panels, finals, strict=False):
        for i, r in enumerate(rows):
            m = (_bench_value(r, bench, key) if bench is not None else (r.get("measures") or {}).get(key)) or {}
            if m.get("value") is None:
                continue
            lo = m["value"] if m.get("lo") is None else m["lo"]
            hi = m["value"] if m.get("hi") is None else m["hi"]
            ax.errorbar(
                [i],
                [m["value"]],
                yerr=[[m["value"] - lo], [hi - m["value"]]],
                fmt="o",
                capsize=3,
                color=color[r["name"]],
            )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{title} after {max((r.get('steps') or 0) for r in rows)} steps (95% CI)", fontsize=9)
    for ax in panels[len(finals) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=color[n], marker="o", label=n) for n in names]
    fig.legend(handles=handles, loc="lower right", fontsize=9, title="arm")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=90)
    plt.close(fig)
    return None


def format_compare(result: dict) -> str:
    lines = ["== omniopd compare =="]
    benches = result.get("benchmarks") or []
    for r in result["rows"]:
        m = r.get("measures") or {}
        if len(benches) > 1:
            labels = _benchmark_labels(benches)
            acc = ", ".join(f"{labels[b]} {_fmt(_bench_value(r, b, 'accuracy'), pct=True)}" for b in benches)
        else:
            acc = _fmt(m.get("accuracy"), pct=True)
        lines.append(f"{r['name']:<22} {r['status'][:60]:<60} accuracy {acc}")
    lines.append(
        f"tables: {result['comparison_md']}, {result['comparison_csv']}   ({result['wall_time_s'] / 60:.1f} min)"
    )
    if result.get("plot_note"):
        lines.append(result["plot_note"])
    return "\n".join(lines)
