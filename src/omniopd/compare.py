"""``omniopd compare RECIPE.yaml [key=value ...]``: the methods side by side on the same budget.

The recipe's ``compare.variants`` lists named arms, each a method (``base`` = the untrained student,
``omniopd``, ``sft``, ``opd``, ``grpo``) plus dotted-key overrides. Every arm trains with the recipe's
student, teacher, prompts in the same order, steps, batch size and seed (overriding those per arm is
refused) in its own process (``python -m omniopd train``), one after another, so a crash is reported
in the table's status column and the other arms still run. Then every model that exists is measured
the same way, in this process:

- accuracy on the first ``eval.limit`` problems of ``eval.data``, greedy, ``eval.max_new_tokens``
  (Wilson 95% interval), and the paired per-problem difference to ``base`` (normal approximation for
  paired binary outcomes, see ``omniopd.measures``);
- continuous measures with 95% intervals: mean per-token log-likelihood of the dev reference solutions
  (calculator annotations removed, EOS included) under the student; the shares that answer with
  ``####`` and stop, that loop, that hit the length limit, that are very short; mean length; and the
  reverse KL(student || teacher) per token on ``compare.kl_rollouts`` held-out rollouts sampled once
  from the base student with a fixed seed (the configured local/privileged teacher scores them with its
  own prompt; an API teacher or another tokenizer makes this column n/a, with the reason);
- teacher tokens and requests, training and evaluation wall time, learning rate and rollout
  temperature; departures (centred target, embedding phi, rollout temperature or top_p below 1) and
  ablations are named in every table;
- ``omniopd check-signal`` for every phi the omniopd arms use (with the recipe's teacher).

Writes ``comparison.md``, ``comparison.csv``, ``comparison.json`` and ``comparison.png`` (training
curves from each arm's ``metrics.jsonl`` and the final measures) into ``output_dir``; each arm's run is
in ``output_dir/runs/NAME`` (its ``checkpoints/`` removed once it finished, unless
``compare.keep_checkpoints``) and its log in ``output_dir/logs/NAME.log``. A finished arm whose
``config.yaml`` matches is reused (``--rerun`` trains it again); measurements are cached the same way.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omniopd.config import RunConfig, apply_overrides, build_config, dump_config, read_recipe, set_dotted
from omniopd.errors import ConfigError

# settings every arm shares: an arm that changed them would not be compared on the same budget
SHARED_KEYS = ("student", "seed", "max_steps", "optim.prompts_per_step", "rollout.samples_per_prompt", "data", "eval",
               "output_dir", "method", "compare", "resume")

MEASURES = [  # (key, column title, kind)
    ("ref_loglik", "ref log-lik/token", "mean"),
    ("final_answer", "explicit final answer", "share"),
    ("answered_stopped", "#### then stop", "share"),
    ("loops", "loops", "share"),
    ("mean_length", "mean length (tokens)", "mean"),
    ("length_limit", "hit length limit", "share"),
    ("very_short", "≤ 10 tokens", "share"),
    ("reverse_kl", "reverse KL to teacher/token", "mean"),
]


# ------------------------------------------------------------------------------------------ configs


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}, so every override is checked and applied by its full key."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _touches(key: str, shared: str) -> bool:
    return key == shared or key.startswith(shared + ".") or shared.startswith(key + ".")


def variant_configs(recipe: str | Path, overrides: list[str]) -> tuple[RunConfig, dict[str, RunConfig | None]]:
    """The recipe's config and one validated config per arm (None for ``base``); raises on any bad arm."""
    data = apply_overrides(read_recipe(recipe), overrides)
    cfg = build_config(data)
    if not cfg.compare.variants:
        raise ConfigError("compare.variants: empty; list the arms to compare, e.g. [{name: base, method: base}, {name: sft, method: sft}]")
    out = Path(cfg.output_dir)
    arm_data = {k: v for k, v in data.items() if k != "compare"}
    configs: dict[str, RunConfig | None] = {}
    for v in cfg.compare.variants:
        flat = _flatten(v.overrides)
        bad = [k for k in flat for s in SHARED_KEYS if _touches(k, s)]
        if bad:
            raise ConfigError(f"compare variant {v.name}: '{bad[0]}' must be the same for every arm (set it in the recipe, not in a variant)")
        if v.method == "base":
            if v.overrides:
                raise ConfigError(f"compare variant {v.name}: method base (no training) takes no overrides")
            configs[v.name] = None
            continue
        fixed = {"method": v.method, "output_dir": str(out / "runs" / v.name), "eval.before": False, "eval.after": False, "resume": False}
        try:
            configs[v.name] = build_config(set_dotted(set_dotted(arm_data, flat), fixed))
        except ConfigError as err:
            raise ConfigError(f"compare variant {v.name}: {err}") from None
    return cfg, configs


def departures(cfg: RunConfig | None) -> list[str]:
    """What makes this arm differ from the paper's method or the baselines' usual form (labelled)."""
    if cfg is None:
        return []
    out = []
    if cfg.method == "omniopd":
        if cfg.audit.target == "centered":
            out.append("centred target (departure)")
        if cfg.audit.phi == "embedding":
            out.append("embedding φ (departure)")
        if cfg.audit.adaptive_n:
            out.append(f"adaptive N, rounds of {cfg.audit.adaptive_round}, width {cfg.audit.adaptive_width:g} (departure)")
        if cfg.loss.kl_anchor_coef == 0:
            out.append("no KL anchor (ablation)")
        if cfg.audit.prior_strength == 0:
            out.append("no prior α=0 (ablation)")
        if cfg.audit.anchors != "peak_entropy":
            out.append(f"anchors={cfg.audit.anchors} (ablation)")
    if cfg.method != "sft":
        if cfg.rollout.temperature < 1:
            out.append(f"rollout temperature {cfg.rollout.temperature:g} < 1 (departure)")
        if cfg.rollout.top_p < 1:
            out.append(f"rollout top_p {cfg.rollout.top_p:g} < 1 (departure)")
    if cfg.method == "sft":
        out.append(f"sft on {cfg.sft.source} solutions")
    if cfg.method == "opd":
        out.append(f"opd estimator {cfg.opd.estimator}")
    return out


# ------------------------------------------------------------------------------------------ training


def _last_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("omniopd: error:")]
    if errs:
        return errs[-1].removeprefix("omniopd: error:").strip()
    tb = [ln for ln in lines if not ln.startswith(("File ", "^", "~"))]
    return tb[-1][:300] if tb else "no output"


def _final_answer_share(records: list[dict]) -> dict:
    """Share of answers that state a final answer explicitly (``#### x`` or ``\\boxed{x}``), whether or
    not it is right; an answer graded only through its last number does not count."""
    from omniopd.evaluation.mathgrade import extract_answer
    from omniopd.measures import share

    return share([extract_answer(r["output"]).rule in ("hash", "boxed") for r in records])


def _same_config(path: Path, cfg: RunConfig) -> bool:
    """The finished arm's config equals ``cfg`` (read through the current schema: a field added to omniopd
    since that run was trained counts at its default, so upgrading does not retrain every arm)."""
    import yaml

    from omniopd.config import normalized

    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return normalized(saved) == cfg.model_dump(mode="json")


def train_arm(name: str, cfg: RunConfig, out: Path, *, rerun: bool, keep_checkpoints: bool = False) -> dict:
    run_dir = Path(cfg.output_dir)
    text = dump_config(cfg)
    summary_path = run_dir / "summary.json"
    if (not rerun and summary_path.is_file() and (run_dir / "final").is_dir() and (run_dir / "config.yaml").is_file()
            and _same_config(run_dir / "config.yaml", cfg)):
        s = json.loads(summary_path.read_text())
        return {"status": "ok (reused)", "train_wall_s": s.get("wall_time_s"), "teacher_tokens": s.get("teacher_tokens"),
                "teacher_requests": s.get("teacher_requests"), "steps": s.get("steps"), "model": str(run_dir / "final")}
    cfg_path = out / "configs" / f"{name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(text)
    log_path = out / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    src = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    summary_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-m", "omniopd", "train", str(cfg_path), "--overwrite", "--no-progress"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not summary_path.is_file():
        return {"status": f"failed (exit {proc.returncode}): {_last_error(log_path.read_text(encoding='utf-8', errors='replace'))}",
                "train_wall_s": wall, "model": None}
    s = json.loads(summary_path.read_text())
    if not keep_checkpoints:  # the arm is finished: final/ is what gets measured, the resume state is dead weight
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"status": "ok", "train_wall_s": wall, "teacher_tokens": s.get("teacher_tokens"),
            "teacher_requests": s.get("teacher_requests"), "steps": s.get("steps"), "model": str(run_dir / "final")}


# ------------------------------------------------------------------------------------------ measuring


class Judge:
    """Everything held fixed across arms: the dev slice, the reference solutions, the KL rollouts, the teacher."""

    def __init__(self, cfg: RunConfig, out: Path, progress: bool):
        from omniopd.data import load_examples

        self.cfg, self.out, self.progress = cfg, out, progress
        self.eval_examples = load_examples(cfg.eval.data, limit=cfg.eval.limit)
        self.loglik_examples = [ex for ex in load_examples(cfg.eval.data, limit=cfg.compare.loglik_limit or cfg.eval.limit) if ex.reference]
        self.kl_rollouts: list[dict] = []
        self.kl_note: str | None = None
        self.spec_key = hashlib.sha256(json.dumps({
            "eval": cfg.eval.model_dump(mode="json"), "compare": cfg.compare.model_dump(mode="json", exclude={"variants", "signal_steps"}),
            # share_prefixes changes where the teacher's cache numbers come from, not its outputs
            "teacher": cfg.teacher.model_dump(mode="json", exclude={"share_prefixes"}), "student": cfg.student.model_dump(mode="json"),
            "rollout": cfg.rollout.model_dump(mode="json"), "seed": cfg.seed,
        }, sort_keys=True).encode()).hexdigest()[:16]

    # -- the teacher for the reverse KL, and the held-out rollouts (sampled once from the base student)
    def _teacher(self, base_model, tok):
        from omniopd.methods import check_white_box_teacher
        from omniopd.teachers import build_teacher

        if self.cfg.teacher.type not in ("local", "privileged"):
            self.kl_note = f"n/a: teacher.type={self.cfg.teacher.type} gives no log-probabilities"
            return None
        teacher = build_teacher(self.cfg, student=base_model, student_tokenizer=tok)
        try:
            check_white_box_teacher(teacher, tok, base_model)
        except ConfigError:
            self.kl_note = "n/a: the teacher's tokenizer differs from the student's"
            return None
        return teacher

    def prepare_kl_rollouts(self) -> None:
        import torch

        from omniopd.models import load_model
        from omniopd.prompts import student_messages
        from omniopd.rollout import chat_prompts, generate_texts

        n = self.cfg.compare.kl_rollouts
        if n == 0:
            self.kl_note = "n/a: compare.kl_rollouts=0"
            return
        if self.cfg.teacher.type not in ("local", "privileged"):
            self.kl_note = f"n/a: teacher.type={self.cfg.teacher.type} gives no log-probabilities"
            return
        path = self.out / "kl_rollouts.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            if rows and rows[0].get("spec") == self.spec_key:
                self.kl_rollouts = rows
                return
        from omniopd.data import load_examples

        examples = load_examples(self.cfg.eval.data, limit=n)
        model, tok = load_model(self.cfg.student.name, self.cfg.student.dtype)
        r = self.cfg.rollout
        prompts = chat_prompts(tok, [student_messages(ex.question) for ex in examples])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 4242)  # fixed: every arm is scored on the same rollouts
            responses, _ = generate_texts(model, tok, prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                          top_p=r.top_p, batch_size=r.batch_size)
        self.kl_rollouts = [{"spec": self.spec_key, "id": ex.id, "response_ids": resp} for ex, resp in zip(examples, responses, strict=True)]
        path.write_text("".join(json.dumps(row) + "\n" for row in self.kl_rollouts))
        del model

    # -- one model
    def measure(self, name: str, model_path: str) -> dict:
        cache = self.out / "measures" / f"{name}.json"
        key = hashlib.sha256(f"{self.spec_key}:{model_path}:{_mtime(model_path)}".encode()).hexdigest()[:16]
        records_path = self.out / "eval" / f"{name}_predictions.jsonl"
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                m = saved["measures"]
                if "final_answer" not in m and records_path.is_file():  # measured before this column existed
                    m["final_answer"] = _final_answer_share([json.loads(x) for x in records_path.read_text().splitlines()])
                    cache.write_text(json.dumps({"key": key, "measures": m}))
                return m
        import torch

        from omniopd.evaluation.runner import evaluate_model
        from omniopd.measures import answered_and_stopped, is_short, loops, ratio_bootstrap, share
        from omniopd.models import load_model

        t0 = time.perf_counter()
        model, tok = load_model(model_path, self.cfg.student.dtype)
        for p in model.parameters():
            p.requires_grad_(False)
        e = self.cfg.eval
        summary = evaluate_model(model, tok, e.data, limit=e.limit, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                 temperature=0.0, records_path=records_path, show_progress=self.progress,
                                 insecure_no_isolation=e.insecure_no_isolation)
        records = [json.loads(line) for line in records_path.read_text().splitlines()]
        B = self.cfg.compare.bootstrap_samples
        m: dict[str, Any] = {
            "accuracy": {"value": summary["accuracy"], "lo": summary["ci95"][0], "hi": summary["ci95"][1], "n": summary["n"]},
            "correct": [bool(r["correct"]) for r in records],
            "final_answer": _final_answer_share(records),
            "answered_stopped": share([answered_and_stopped(r["output"], r["finished"]) for r in records]),
            "loops": share([loops(r["output"]) for r in records]),
            "length_limit": share([not r["finished"] for r in records]),
            "very_short": share([is_short(r["tokens"]) for r in records]),
            "mean_length": ratio_bootstrap([r["tokens"] for r in records], [1.0] * len(records), samples=B),
        }
        with torch.no_grad():
            m["ref_loglik"] = self._ref_loglik(model, tok)
            m["reverse_kl"] = self._reverse_kl(model, tok)
        m["eval_wall_s"] = time.perf_counter() - t0
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "measures": m}))
        del model
        return m

    def _ref_loglik(self, model, tok) -> dict:
        from omniopd.alignment import response_hidden
        from omniopd.core import token_stats
        from omniopd.measures import clean_reference, ratio_bootstrap
        from omniopd.prompts import student_messages
        from omniopd.rollout import chat_prompts, pack

        sums, counts = [], []
        exs = self.loglik_examples
        mb = max(1, min(8, self.cfg.eval.batch_size))
        for i in range(0, len(exs), mb):
            part = exs[i : i + mb]
            prompts = chat_prompts(tok, [student_messages(ex.question) for ex in part])
            responses = [tok.encode(clean_reference(ex.reference), add_special_tokens=False) + [tok.eos_token_id] for ex in part]
            batch = pack(tok, prompts, responses, tok.pad_token_id)
            hidden, head = response_hidden(model, batch)
            logp = token_stats(hidden, head, batch.response_ids, slice_size=self.cfg.loss.slice_size).logprobs
            mask = batch.response_mask
            sums += logp.masked_fill(~mask, 0.0).sum(1).tolist()
            counts += mask.sum(1).float().tolist()
        return ratio_bootstrap(sums, counts, samples=self.cfg.compare.bootstrap_samples)

    def _reverse_kl(self, model, tok) -> dict:
        from omniopd.alignment import response_hidden
        from omniopd.core.baselines import reverse_kl_sliced
        from omniopd.data import load_examples
        from omniopd.measures import ratio_bootstrap
        from omniopd.methods import teacher_scoring_batch
        from omniopd.models import load_model
        from omniopd.prompts import student_messages
        from omniopd.rollout import chat_prompts, pack

        if not self.kl_rollouts:
            return {"value": None, "lo": None, "hi": None, "n": 0, "note": self.kl_note or "n/a"}
        base_model, base_tok = load_model(self.cfg.student.name, self.cfg.student.dtype)
        teacher = self._teacher(base_model, base_tok)
        if teacher is None:
            return {"value": None, "lo": None, "hi": None, "n": 0, "note": self.kl_note}
        by_id = {ex.id: ex for ex in load_examples(self.cfg.eval.data, limit=len(self.kl_rollouts))}
        sums, counts = [], []
        mb = max(1, min(8, self.cfg.eval.batch_size))
        for i in range(0, len(self.kl_rollouts), mb):
            part = self.kl_rollouts[i : i + mb]
            exs = [by_id[r["id"]] for r in part]
            responses = [r["response_ids"] or [tok.eos_token_id] for r in part]
            sbatch = pack(tok, chat_prompts(tok, [student_messages(ex.question) for ex in exs]), responses, tok.pad_token_id)
            tbatch = teacher_scoring_batch(teacher, exs, responses)
            h, head = response_hidden(model, sbatch)
            th, thead = response_hidden(teacher.model, tbatch)
            kl = reverse_kl_sliced(h, head, th, thead, slice_size=self.cfg.loss.slice_size)
            mask = sbatch.response_mask
            sums += kl.masked_fill(~mask, 0.0).sum(1).tolist()
            counts += mask.sum(1).float().tolist()
        teacher.close()
        out = ratio_bootstrap(sums, counts, samples=self.cfg.compare.bootstrap_samples)
        out["note"] = f"KL(student ‖ {teacher.name}) per token on {len(self.kl_rollouts)} base-student rollouts"
        return out


def _mtime(path: str) -> float:
    p = Path(path)
    files = list(p.glob("*.safetensors")) if p.is_dir() else []
    return max((f.stat().st_mtime for f in files), default=0.0)


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


def _csv_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    cols = ["variant", "method", "status", "departures", "changes", "teacher", "lr", "rollout_temperature", "steps",
            "accuracy", "accuracy_lo", "accuracy_hi", "n_problems", "diff_vs_base", "diff_lo", "diff_hi"]
    for key, _, _ in MEASURES:
        cols += [key, f"{key}_lo", f"{key}_hi"]
    cols += ["teacher_tokens", "teacher_requests", "train_wall_s", "eval_wall_s"]
    out = []
    for r in rows:
        m = r.get("measures") or {}
        acc, diff = m.get("accuracy") or {}, r.get("diff") or {}
        line = [r["name"], r["method"], r["status"], "; ".join(r["departures"]), r["changes"], r["teacher"], r["lr"],
                r["rollout_temperature"], r["steps"], acc.get("value"), acc.get("lo"), acc.get("hi"), acc.get("n"),
                diff.get("value"), diff.get("lo"), diff.get("hi")]
        for key, _, _ in MEASURES:
            x = m.get(key) or {}
            line += [x.get("value"), x.get("lo"), x.get("hi")]
        line += [r.get("teacher_tokens"), r.get("teacher_requests"), r.get("train_wall_s"), m.get("eval_wall_s")]
        out.append(line)
    return cols, out


def write_tables(out: Path, cfg: RunConfig, rows: list[dict], signal: dict | None, signal_error: str | None, judge: Judge) -> None:
    cols, data = _csv_rows(rows)
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerows(data)
    (out / "comparison.json").write_text(json.dumps({"rows": rows, "signal_check": signal, "signal_error": signal_error}, indent=2, default=str))

    def num(x, fmt="{:,.0f}"):
        return "—" if x is None else fmt.format(x)

    def cell(text: str) -> str:  # an error message must not break the table
        return " ".join(str(text).split()).replace("|", "\\|")

    e = cfg.eval
    L = [f"# Comparison: {cfg.output_dir}", ""]
    L.append(f"Student `{cfg.student.name}`, teacher `{cfg.teacher.type}` ({cfg.teacher.model or 'the student model'}), "
             f"{cfg.max_steps} steps × {cfg.optim.prompts_per_step} prompts × {cfg.rollout.samples_per_prompt} samples, seed {cfg.seed}, "
             f"training data `{cfg.data.train}` in the same order for every arm. Evaluation: first {len(judge.eval_examples)} problems of "
             f"`{e.data}`, greedy, at most {e.max_new_tokens} new tokens.")
    L += ["", "## Accuracy and cost", "",
          "| variant | method | status | departures / ablations | lr | rollout T | steps | accuracy [95% CI] "
          "| Δ vs base, points [95% CI] | teacher tokens | teacher requests | train wall | eval wall |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("measures") or {}
        L.append(f"| {r['name']} | {r['method']} | {cell(r['status'])} | {'; '.join(r['departures']) or '—'} | {num(r['lr'], '{:g}')} | "
                 f"{num(r['rollout_temperature'], '{:g}')} | {num(r['steps'], '{:d}')} | {_fmt(m.get('accuracy'), pct=True)} | "
                 f"{_fmt(r.get('diff'), pct=True) if r['method'] != 'base' else '—'} | {num(r.get('teacher_tokens'))} | "
                 f"{num(r.get('teacher_requests'))} | {num(r.get('train_wall_s'), '{:.0f} s')} | {num(m.get('eval_wall_s'), '{:.0f} s')} |")
    L += ["", "## Continuous measures (95% intervals)", "",
          "| variant | " + " | ".join(title for _, title, _ in MEASURES) + " |",
          "|---" * (len(MEASURES) + 1) + "|"]
    for r in rows:
        m = r.get("measures") or {}
        cells = [_fmt(m.get(key), pct=(kind == "share")) for key, _, kind in MEASURES]
        L.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    from omniopd import measures as M

    kl_notes = [((r.get("measures") or {}).get("reverse_kl") or {}).get("note") for r in rows]
    kl_note = next((n for n in kl_notes if n), None)
    L += ["", "## How to read this", "",
          "- **accuracy**: Wilson 95% interval. **Δ vs base**: paired per problem, d_i = correct_i(arm) − correct_i(base); "
          "mean ± 1.96·sd(d)/√n (normal approximation for paired differences of binary outcomes).",
          f"- **ref log-lik/token**: mean log-probability per token of the reference solutions of the first {len(judge.loglik_examples)} "
          f"`{e.data}` problems (calculator annotations `<<…>>` removed, EOS included) after the student's prompt; "
          "percentile bootstrap over problems.",
          "- **explicit final answer**: the answer states its final answer as `#### x` or `\\boxed{x}` (right or wrong); answers graded "
          "only through their last number do not count.",
          "- **#### then stop**: the answer ended with EOS before the length limit and its last non-empty line holds `####` and an answer.",
          f"- **loops**: `####` {M.LOOP_MARKER_COUNT}+ times, or the last {M.LOOP_WINDOW_CHARS} characters (whitespace collapsed, "
          f"digit runs → 0) are periodic with period ≤ {M.LOOP_MAX_PERIOD} (three or more copies of one string fill the tail).",
          f"- **hit length limit**: no EOS within {e.max_new_tokens} tokens. **≤ 10 tokens**: answers of at most {M.SHORT_TOKENS} tokens. "
          "Shares: Wilson intervals; mean length: bootstrap over problems.",
          f"- **reverse KL to teacher**: {kl_note or 'n/a'}; token-weighted mean, bootstrap over rollouts. "
          f"The rollouts were sampled once from the base student (temperature {cfg.rollout.temperature:g}, seed {cfg.seed}+4242) on the first "
          f"{cfg.compare.kl_rollouts} `{e.data}` problems.",
          "- **departures** (off by default in the paper's method, labelled wherever they are used): centred target "
          "(chunk weight π̂ − mean π̂ of the step, can push chunks down), embedding φ (all-MiniLM-L6-v2 cosine clipped to [0, 1]), "
          "adaptive N (teacher asked in rounds; a chunk stops before N once its 95% posterior interval is narrow enough), "
          "rollout temperature or top_p below 1. **ablations**: the paper's switches (no KL anchor, α = 0, other anchor selectors).",
          "- teacher tokens: OmniOPD prompt + continuation tokens of the audits; SFT the tokens of the teacher-written "
          "solutions used (counted even when read from the cache); OPD the tokens of the teacher's forward passes; GRPO none."]
    failed = [r for r in rows if not r["status"].startswith("ok")]
    if failed:
        L += ["", "## Failed arms", ""] + [f"- **{r['name']}**: {cell(r['status'])} (log: `logs/{r['name']}.log`)" for r in failed]
    L += ["", "## Signal check (does k_sem carry teacher information?)", ""]
    if signal:
        from omniopd.signal_check import format_signal

        L += ["```", format_signal(signal), "```"]
    else:
        L.append(signal_error or "not run (no omniopd arm, or compare.signal_steps=0)")
    if (out / "comparison.png").is_file():
        L += ["", "![training curves and final measures](comparison.png)"]
    (out / "comparison.md").write_text("\n".join(L) + "\n", encoding="utf-8")


def write_plot(out: Path, rows: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'omniopd[report]'): no comparison.png"
    curves = [("rollout/mean_length", "rollout mean length (tokens)"), ("rollout/truncated_frac", "rollouts hitting the limit"),
              ("loss/total", "loss/total (each method's own loss)"), ("teacher/tokens_total", "teacher tokens (cumulative)")]
    finals = [("accuracy", "accuracy"), ("ref_loglik", "ref log-lik/token"), ("answered_stopped", "#### then stop"),
              ("loops", "loops"), ("mean_length", "mean length (tokens)"), ("reverse_kl", "reverse KL to teacher/token")]
    color = {r["name"]: f"C{i % 10}" for i, r in enumerate(rows)}  # one colour per arm in every panel
    fig, axes = plt.subplots(3, 4, figsize=(17, 11))
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
    for ax, (key, title) in zip([*axes[1], *axes[2]], finals, strict=False):
        for i, r in enumerate(rows):
            m = (r.get("measures") or {}).get(key) or {}
            if m.get("value") is None:
                continue
            lo = m["value"] if m.get("lo") is None else m["lo"]
            hi = m["value"] if m.get("hi") is None else m["hi"]
            ax.errorbar([i], [m["value"]], yerr=[[m["value"] - lo], [hi - m["value"]]], fmt="o", capsize=3, color=color[r["name"]])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{title} after {max((r.get('steps') or 0) for r in rows)} steps (95% CI)", fontsize=9)
    for ax in [*axes[1], *axes[2]][len(finals):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=color[n], marker="o", label=n) for n in names]
    fig.legend(handles=handles, loc="lower right", fontsize=9, title="arm")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=90)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------ the run


def run_compare(recipe: str | Path, overrides: list[str] | None = None, *, rerun: bool = False, progress: bool = True) -> dict:
    cfg, configs = variant_configs(recipe, list(overrides or []))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_config.yaml").write_text(dump_config(cfg))
    t_all = time.perf_counter()

    def say(msg: str) -> None:
        if progress:
            print(f"omniopd compare: {msg}", flush=True)

    judge = Judge(cfg, out, progress)
    judge.prepare_kl_rollouts()

    phis = list(dict.fromkeys(c.audit.phi for c in configs.values() if c is not None and c.method == "omniopd"))
    signal, signal_error = None, None
    if phis and cfg.compare.signal_steps > 0:
        say(f"signal check for phi {', '.join(phis)} ({cfg.compare.signal_steps} batches)")
        sig_path = out / "signal_check.json"
        # the signal check always asks for exactly N continuations: the adaptive-N settings do not enter it
        audit_key = cfg.audit.model_dump(mode="json", exclude={"adaptive_n", "adaptive_round", "adaptive_width"})
        sig_spec = [judge.spec_key, cfg.compare.signal_steps, phis, audit_key,
                    cfg.data.model_dump(mode="json"), cfg.optim.prompts_per_step]
        sig_key = hashlib.sha256(json.dumps(sig_spec, sort_keys=True).encode()).hexdigest()[:16]
        try:
            from omniopd.signal_check import check_signal

            saved = json.loads(sig_path.read_text()) if sig_path.is_file() else {}
            if saved.get("key") == sig_key:
                signal = saved["report"]
            else:
                signal = check_signal(cfg, steps=cfg.compare.signal_steps, phis=phis)
                sig_path.write_text(json.dumps({"key": sig_key, "report": signal}, indent=2))
        except Exception as err:  # noqa: BLE001 - a failed check is reported in the table, the arms still run
            signal_error = f"signal check failed: {type(err).__name__}: {str(err)[:300]}"

    rows: list[dict] = []
    base_correct: list[bool] | None = None
    for i, v in enumerate(cfg.compare.variants, 1):
        vcfg = configs[v.name]
        row: dict[str, Any] = {
            "name": v.name, "method": v.method, "departures": departures(vcfg),
            "changes": ", ".join(f"{k}={val}" for k, val in v.overrides.items()),
            "teacher": (f"{vcfg.teacher.type}:{vcfg.teacher.model or 'student'}" if vcfg and vcfg.method in ("omniopd", "opd")
                        or (vcfg and vcfg.method == "sft" and vcfg.sft.source == "teacher") else "—"),
            "lr": vcfg.optim.lr if vcfg else None,
            "rollout_temperature": vcfg.rollout.temperature if vcfg and vcfg.method != "sft" else None,
            "steps": 0 if vcfg is None else None, "teacher_tokens": 0 if vcfg is None else None,
            "teacher_requests": 0 if vcfg is None else None, "train_wall_s": 0.0 if vcfg is None else None,
            "run_dir": vcfg.output_dir if vcfg else None, "measures": None, "diff": None,
        }
        if vcfg is None:
            row["status"], model_path = "ok (no training)", cfg.student.name
        else:
            say(f"[{i}/{len(cfg.compare.variants)}] {v.name}: training ({v.method}, {cfg.max_steps} steps)")
            res = train_arm(v.name, vcfg, out, rerun=rerun, keep_checkpoints=cfg.compare.keep_checkpoints)
            model_path = res.pop("model")
            row.update(res)
            say(f"[{i}/{len(cfg.compare.variants)}] {v.name}: {row['status']}")
        if model_path is not None:
            say(f"[{i}/{len(cfg.compare.variants)}] {v.name}: measuring")
            try:
                row["measures"] = judge.measure(v.name, model_path)
            except Exception as err:  # noqa: BLE001 - reported in the status column; the other arms still run
                row["status"] += f"; measuring failed: {type(err).__name__}: {str(err)[:300]}"
        rows.append(row)
        if v.method == "base" and row["measures"]:
            base_correct = row["measures"]["correct"]
        _diffs(rows, base_correct)
        write_tables(out, cfg, rows, signal, signal_error, judge)  # after every arm: a killed run keeps what it had
    plot_note = write_plot(out, rows)
    write_tables(out, cfg, rows, signal, signal_error, judge)
    result = {"output_dir": str(out), "rows": rows, "signal_check": signal, "wall_time_s": time.perf_counter() - t_all,
              "comparison_md": str(out / "comparison.md"), "comparison_csv": str(out / "comparison.csv"), "plot_note": plot_note}
    return result


def _diffs(rows: list[dict], base_correct: list[bool] | None) -> None:
    from omniopd.measures import paired_difference

    for r in rows:
        m = r.get("measures")
        if base_correct is not None and m and r["method"] != "base":
            r["diff"] = paired_difference(m["correct"], base_correct)


def format_compare(result: dict) -> str:
    lines = ["== omniopd compare =="]
    for r in result["rows"]:
        m = r.get("measures") or {}
        lines.append(f"{r['name']:<22} {r['status'][:60]:<60} accuracy {_fmt(m.get('accuracy'), pct=True)}")
    lines.append(f"tables: {result['comparison_md']}, {result['comparison_csv']}   ({result['wall_time_s'] / 60:.1f} min)")
    if result.get("plot_note"):
        lines.append(result["plot_note"])
    return "\n".join(lines)
