"""Measuring every arm alike: the benchmarks, the continuous measures, the reverse KL, and their cache."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from omniopd.compare.arms import _final_answer_share, method_of
from omniopd.config import WHITE_BOX_TEACHER_TYPES, RunConfig
from omniopd.errors import ConfigError
from omniopd.methods import check_white_box_teacher, teacher_scoring_batch, teacher_tokenizer_differs
from omniopd.methods.opd import NOT_APPLICABLE as NOT_APPLICABLE_OPD  # noqa: F401 - the status of such a row

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
CODE_MEASURES = [  # the same for the code benchmarks (base_accuracy: MBPP+ only)
    ("ref_loglik", "canonical log-lik/token", "mean"),
    ("base_accuracy", "MBPP base tests pass@1", "share"),
    ("valid_syntax", "valid Python", "share"),
    ("defines_entry_point", "defines entry point", "share"),
    ("loops", "loops", "share"),
    ("length_limit", "hit length limit", "share"),
    ("mean_length", "mean length (tokens)", "mean"),
]


# ------------------------------------------------------------------------------------------ benchmarks


def is_code_benchmark(bench: str) -> bool:
    from omniopd.evaluation.runner import CODE_BENCHMARKS

    return bench.lower() in CODE_BENCHMARKS


def _benchmark_labels(benchmarks: list[str]) -> dict[str, str]:
    """A short name per benchmark for column titles and file names: the name itself, or a jsonl path's
    file name without its suffixes (made unique)."""
    import re

    out: dict[str, str] = {}
    for b in benchmarks:
        label = b
        if "/" in b or b.endswith((".jsonl", ".json", ".gz")):
            label = Path(b).name.split(".")[0] or "data"
        label = re.sub(r"[^\w.+-]", "_", label)
        base, k = label, 2
        while label in out.values():
            label, k = f"{base}-{k}", k + 1
        out[b] = label
    return out


def _code_program(task) -> str:
    """The canonical program of a code task: HumanEval's prompt + canonical_solution, MBPP+'s canonical_solution."""
    program = task.prompt + task.canonical_solution if task.benchmark == "humaneval" else task.canonical_solution
    return program.strip("\n").rstrip()


def _examples(spec: str, limit: int | None):
    """``load_examples``, and for the code benchmarks their tasks as examples asked exactly as evaluation
    asks them (``runner.load_problems``), with the canonical program as the reference."""
    from omniopd.data import Example, load_examples

    if is_code_benchmark(spec):
        from omniopd.engine.prompts import CODE_INSTRUCTION
        from omniopd.evaluation.code import load_code_tasks

        return [
            Example(t.task_id, t.prompt.strip(), "", reference=_code_program(t), instruction=CODE_INSTRUCTION)
            for t in load_code_tasks(spec.lower(), limit=limit)
        ]
    return load_examples(spec, limit=limit)


def _reference_response(ex) -> str:
    """What the reference log-likelihood scores as the answer: a math solution without its calculator
    annotations, or code in a ```python block (the form the code instruction asks for)."""
    from omniopd.engine.prompts import CODE_INSTRUCTION
    from omniopd.evaluation.measures import clean_reference

    if ex.instruction == CODE_INSTRUCTION or getattr(ex, "tests", None) is not None:
        return f"```python\n{ex.reference.strip(chr(10)).rstrip()}\n```"
    return clean_reference(ex.reference)


def not_applicable(cfg: RunConfig | None) -> str | None:
    """Why an arm cannot run by construction (its row's status), or None; the method decides (white-box OPD:
    a teacher with another tokenizer, ``methods.opd.not_applicable``)."""
    return None if cfg is None else method_of(cfg).not_applicable(cfg)


# ------------------------------------------------------------------------------------------ measuring


# what a measurement depends on: the evaluation settings (not when training evaluates), the measures' own
# settings, the teacher of the reverse KL (less share_prefixes: where its cache numbers come from, not its outputs),
# the base student and its rollouts (less rollout.compile: how the same tokens are decoded), the seed. Any other
# field (compare.control, the variants, checkpointing) does not enter it, so adding one leaves the cache valid.
_EVAL_NOT_MEASURED = {"before", "after", "every_steps", "benchmarks", "best_metric"}
_COMPARE_MEASURED = {"kl_rollouts", "loglik_limit", "bootstrap_samples"}


def measures_spec_key(cfg: RunConfig) -> str:
    """The key of everything a cached measurement depends on besides the model (see above)."""
    spec = {
        "eval": cfg.eval.model_dump(mode="json", exclude=_EVAL_NOT_MEASURED),
        "compare": cfg.compare.model_dump(mode="json", include=_COMPARE_MEASURED),
        "teacher": cfg.teacher.model_dump(mode="json", exclude={"share_prefixes"}),
        "student": cfg.student.model_dump(mode="json"),
        "rollout": cfg.rollout.model_dump(mode="json", exclude={"compile"}),
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class Judge:
    """Everything held fixed across arms: the benchmarks and their slices, the reference solutions, the
    KL rollouts, the teacher."""

    def __init__(self, cfg: RunConfig, out: Path, progress: bool):
        from omniopd.evaluation.runner import load_problems

        self.cfg, self.out, self.progress = cfg, out, progress
        self.benchmarks: list[str] = list(cfg.compare.benchmarks) or [cfg.eval.data]
        self.multi = len(self.benchmarks) > 1
        self.labels = _benchmark_labels(self.benchmarks)
        # loaded now: a missing benchmark or an unusable sandbox stops the run before any arm trains
        self.eval_counts = {b: len(load_problems(b, cfg.eval.limit)) for b in self.benchmarks}
        if any(is_code_benchmark(b) for b in self.benchmarks):
            from omniopd.evaluation.code import check_isolation

            check_isolation(cfg.eval.insecure_no_isolation)
        L = cfg.compare.loglik_limit or cfg.eval.limit
        self.loglik_examples = {b: [ex for ex in _examples(b, L) if ex.reference] for b in self.benchmarks}
        self.kl_rollouts: list[dict] = []
        self.kl_note: str | None = None
        self.spec_key = measures_spec_key(cfg)

    def measures_for(self, bench: str) -> list[tuple[str, str, str]]:
        """The continuous-measure columns of ``bench`` (the reverse KL among them when there is one benchmark)."""
        if is_code_benchmark(bench):
            cols = [c for c in CODE_MEASURES if c[0] != "base_accuracy" or bench.lower() == "mbppplus"]
            return cols if self.multi else [*cols, MEASURES[-1]]
        return [c for c in MEASURES if c[0] != "reverse_kl"] if self.multi else MEASURES

    def records_path(self, name: str, bench: str) -> Path:
        if bench == self.cfg.eval.data:  # the path of the single-benchmark comparison
            return self.out / "eval" / f"{name}_predictions.jsonl"
        return self.out / "eval" / f"{name}_{self.labels[bench]}_predictions.jsonl"

    # -- the teacher for the reverse KL, and the held-out rollouts (sampled once from the base student)
    def _kl_unavailable(self) -> str | None:
        """Why there is no reverse KL (the teacher's tokenizer first: it rules the column out whatever the settings)."""
        try:
            differs = teacher_tokenizer_differs(self.cfg)
        except Exception:  # noqa: BLE001 - build_teacher reports it when the KL is measured
            differs = False
        if differs:
            return "n/a: the teacher's tokenizer differs from the student's"
        if self.cfg.compare.kl_rollouts == 0:
            return "n/a: compare.kl_rollouts=0"
        if self.cfg.teacher.type not in WHITE_BOX_TEACHER_TYPES:
            return f"n/a: teacher.type={self.cfg.teacher.type} gives no log-probabilities"
        return None

    def _teacher(self, base_model, tok):
        from omniopd.teachers import build_teacher

        note = self._kl_unavailable()
        if note:
            self.kl_note = note
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

        from omniopd.engine.models import load_model
        from omniopd.engine.prompts import student_messages
        from omniopd.engine.rollout import chat_prompts, generate_texts

        n = self.cfg.compare.kl_rollouts
        note = self._kl_unavailable()
        if note:
            self.kl_note = note
            return
        path = self.out / "kl_rollouts.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            if rows and rows[0].get("spec") == self.spec_key:
                self.kl_rollouts = rows
                return
        examples = _examples(self.cfg.eval.data, limit=n)
        model, tok = load_model(self.cfg.student.name, self.cfg.student.dtype)
        r = self.cfg.rollout
        prompts = chat_prompts(tok, [student_messages(ex.question, ex.instruction) for ex in examples])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 4242)  # fixed: every arm is scored on the same rollouts
            responses, _ = generate_texts(
                model,
                tok,
                prompts,
                max_new_tokens=r.max_new_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                batch_size=r.batch_size,
            )
        self.kl_rollouts = [
            {"spec": self.spec_key, "id": ex.id, "response_ids": resp}
            for ex, resp in zip(examples, responses, strict=True)
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in self.kl_rollouts))
        del model

    # -- one model
    def cache_key(self, model_path: str) -> str:
        """A trained arm's measures are keyed by its run's summary.json (written once, at the end of its
        training), so they stay valid where final/ is not kept; any other model (the base) by its name and, for
        a directory, its weight files' modification time."""
        summary = Path(model_path).parent / "summary.json"
        if Path(model_path).name == "final" and summary.is_file():
            run = hashlib.sha256(summary.read_bytes()).hexdigest()
            return hashlib.sha256(f"{self.spec_key}:run:{run}".encode()).hexdigest()[:16]
        return hashlib.sha256(f"{self.spec_key}:{model_path}:{_mtime(model_path)}".encode()).hexdigest()[:16]

    def measure(self, name: str, model_path: str) -> dict:
        """The arm's measures: ``benchmarks`` (one dict per benchmark), the first benchmark's also at the
        top level, ``reverse_kl``, ``eval_wall_s`` (all of it), and ``errors`` for a benchmark that could not
        be measured (not cached: the next run tries it again)."""
        cache = self.out / "measures" / f"{name}.json"
        key = self.cache_key(model_path)
        m: dict[str, Any] = {"benchmarks": {}}
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                m = saved["measures"]
        todo = [b for b in self.benchmarks if b not in m["benchmarks"]]
        errors: dict[str, str] = {}
        if todo or "reverse_kl" not in m:
            import torch

            from omniopd.engine.models import load_model

            if Path(model_path).name == "final" and not Path(model_path).exists():
                missing = ", ".join(todo) or "the reverse KL"
                raise ConfigError(
                    f"{name}: its final/ was not kept and {missing} is not measured yet: "
                    "train the arm again (omniopd compare --rerun)"
                )

            model, tok = load_model(model_path, self.cfg.student.dtype)
            for p in model.parameters():
                p.requires_grad_(False)
            for b in todo:
                try:
                    m["benchmarks"][b] = self._measure_benchmark(name, b, model, tok)
                except Exception as err:  # noqa: BLE001 - reported in the status column; the other benchmarks still run
                    errors[b] = f"{type(err).__name__}: {str(err)[:300]}"
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "measures": m}))
            if "reverse_kl" not in m:
                t0 = time.perf_counter()
                with torch.no_grad():
                    m["reverse_kl"] = self._reverse_kl(model, tok)
                m["kl_wall_s"] = time.perf_counter() - t0
                cache.write_text(json.dumps({"key": key, "measures": m}))
            del model
        return self._view(m, errors)

    def _view(self, m: dict, errors: dict[str, str]) -> dict:
        benches = {b: m["benchmarks"][b] for b in self.benchmarks if b in m["benchmarks"]}
        out: dict[str, Any] = dict(benches.get(self.benchmarks[0]) or {})
        out["reverse_kl"] = m.get("reverse_kl")
        out["eval_wall_s"] = sum(x.get("eval_wall_s") or 0.0 for x in benches.values()) + (m.get("kl_wall_s") or 0.0)
        out["benchmarks"] = benches
        if errors:
            out["errors"] = errors
        return out

    def _measure_benchmark(self, name: str, bench: str, model, tok) -> dict:
        import torch

        from omniopd.evaluation.measures import ratio_bootstrap, share
        from omniopd.evaluation.runner import evaluate_model

        t0 = time.perf_counter()
        e = self.cfg.eval
        records_path = self.records_path(name, bench)
        summary = evaluate_model(
            model,
            tok,
            bench,
            limit=e.limit,
            max_new_tokens=e.max_new_tokens,
            batch_size=e.batch_size,
            temperature=0.0,
            records_path=records_path,
            show_progress=self.progress,
            insecure_no_isolation=e.insecure_no_isolation,
            engine=e.engine,
            gguf_template=self.cfg.student.gguf_template,
            gguf_dtype=e.gguf_dtype,
        )
        records = [json.loads(line) for line in records_path.read_text().splitlines()]
        B = self.cfg.compare.bootstrap_samples
        m: dict[str, Any] = {
            "accuracy": {
                "value": summary["accuracy"],
                "lo": summary["ci95"][0],
                "hi": summary["ci95"][1],
                "n": summary["n"],
            },
            "correct": [bool(r["correct"]) for r in records],
        }
        if is_code_benchmark(bench):
            from omniopd.evaluation.code import load_code_tasks
            from omniopd.evaluation.measures import defines_entry_point, valid_python

            entry = {t.task_id: t.entry_point for t in load_code_tasks(bench.lower(), limit=e.limit)}
            if bench.lower() == "mbppplus":
                m["base_accuracy"] = share([bool(r.get("base_passed")) for r in records])
            m["valid_syntax"] = share([valid_python(r.get("code") or "") for r in records])
            m["defines_entry_point"] = share(
                [defines_entry_point(r.get("code") or "", entry[r["id"]]) for r in records]
            )
        else:
            from omniopd.evaluation.measures import answered_and_stopped, is_short

            m["final_answer"] = _final_answer_share(records)
            m["answered_stopped"] = share([answered_and_stopped(r["output"], r["finished"]) for r in records])
            m["very_short"] = share([is_short(r["tokens"]) for r in records])
        from omniopd.evaluation.measures import loops

        m["loops"] = share([loops(r["output"]) for r in records])
        m["length_limit"] = share([not r["finished"] for r in records])
        m["mean_length"] = ratio_bootstrap([r["tokens"] for r in records], [1.0] * len(records), samples=B)
        with torch.no_grad():
            m["ref_loglik"] = self._ref_loglik(model, tok, self.loglik_examples[bench])
        m["eval_wall_s"] = time.perf_counter() - t0
        return m

    def _ref_loglik(self, model, tok, exs) -> dict:
        """Mean log-probability per token of each example's reference answer (EOS included) after the
        student's prompt (the one evaluation sends); bootstrap over examples."""
        from omniopd.core import token_stats
        from omniopd.engine.alignment import response_hidden
        from omniopd.engine.prompts import student_messages
        from omniopd.engine.rollout import chat_prompts, pack
        from omniopd.evaluation.measures import ratio_bootstrap

        sums, counts = [], []
        mb = max(1, min(8, self.cfg.eval.batch_size))
        for i in range(0, len(exs), mb):
            part = exs[i : i + mb]
            prompts = chat_prompts(tok, [student_messages(ex.question, ex.instruction) for ex in part])
            responses = [
                tok.encode(_reference_response(ex), add_special_tokens=False) + [tok.eos_token_id] for ex in part
            ]
            batch = pack(tok, prompts, responses, tok.pad_token_id)
            hidden, head = response_hidden(model, batch)
            logp = token_stats(hidden, head, batch.response_ids, slice_size=self.cfg.loss.slice_size).logprobs
            mask = batch.response_mask
            sums += logp.masked_fill(~mask, 0.0).sum(1).tolist()
            counts += mask.sum(1).float().tolist()
        return ratio_bootstrap(sums, counts, samples=self.cfg.compare.bootstrap_samples)

    def _reverse_kl(self, model, tok) -> dict:
        from omniopd.core.token_stats import reverse_kl_sliced
        from omniopd.engine.alignment import response_hidden
        from omniopd.engine.models import load_model
        from omniopd.engine.prompts import student_messages
        from omniopd.engine.rollout import chat_prompts, pack
        from omniopd.evaluation.measures import ratio_bootstrap

        if not self.kl_rollouts:
            return {"value": None, "lo": None, "hi": None, "n": 0, "note": self.kl_note or "n/a"}
        base_model, base_tok = load_model(self.cfg.student.name, self.cfg.student.dtype)
        teacher = self._teacher(base_model, base_tok)
        if teacher is None:
            return {"value": None, "lo": None, "hi": None, "n": 0, "note": self.kl_note}
        by_id = {ex.id: ex for ex in _examples(self.cfg.eval.data, limit=len(self.kl_rollouts))}
        sums, counts = [], []
        mb = max(1, min(8, self.cfg.eval.batch_size))
        for i in range(0, len(self.kl_rollouts), mb):
            part = self.kl_rollouts[i : i + mb]
            exs = [by_id[r["id"]] for r in part]
            responses = [r["response_ids"] or [tok.eos_token_id] for r in part]
            sbatch = pack(
                tok,
                chat_prompts(tok, [student_messages(ex.question, ex.instruction) for ex in exs]),
                responses,
                tok.pad_token_id,
            )
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
