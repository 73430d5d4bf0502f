"""Does k_sem carry teacher information? ``omniopd check-signal RECIPE.yaml`` (ALGORITHM.md "Signal check").

On real rollouts of the (untrained) student -- ``steps`` batches of the recipe's prompt stream, audited
exactly as training would (same anchors, C, N, teacher sampling) -- it compares, chunk by chunk:

- **teacher**: k_sem of the configured teacher's N continuations against the student's chunk;
- **shuffled** control: the *same* continuations scored against a chunk from another trajectory
  (the next chunk in step order that belongs to a different trajectory). What the teacher wrote for
  this prefix should match this chunk better than an unrelated one; if it does not, k_sem measures how
  formulaic chunks are, not what the teacher knows;
- **no privilege** control (privileged teachers only): the same model without the reference solution
  (``teacher.type: local`` on the same model; for an API teacher ``teacher.privileged: false``), with the
  same anchors and the same random seeds (common random numbers: a model whose next-token distribution
  hardly depends on the prompt, like a tiny random one, then writes the very same continuations); plus
  the Pearson correlation of the two k_sem per chunk;
- **student self** control (a teacher that is another model than the student): N continuations of the
  same prefixes written by the student itself (its own prompt, the same sampling and seeds). Where the
  teacher's k_sem tracks the student's own k_sem chunk by chunk (a high correlation), k_sem mostly says
  how typical a chunk is for any model, not what the stronger teacher knows. Reported: the student's
  k_sem, teacher minus self, their correlation, and the *relative* score k_teacher - k_self against the
  same difference scored on the shuffled partner chunk (does "the teacher agrees more than the student
  agrees with itself" point at this chunk rather than any chunk?).

Each mean comes with its standard error (sd / sqrt(#chunks)); the comparisons use paired per-chunk
differences. Verdict: when teacher minus shuffled is within 2 standard errors (or below), the report says
in plain words that this teacher/phi pair carries no teacher information. The teacher's continuations
are drawn once and scored with every phi asked for.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from omniopd.config import RunConfig, build_config
from omniopd.config.teachers import APITeacherConfig, LlamaCppTeacherConfig, LocalTeacherConfig, PrivilegedTeacherConfig
from omniopd.engine.models import load_model
from omniopd.engine.prompts import student_messages
from omniopd.engine.rollout import chat_prompts, sample_rollouts_as
from omniopd.errors import ConfigError
from omniopd.evaluation.stats import mean_se, pearson
from omniopd.methods.omniopd.audit import run_audit
from omniopd.methods.omniopd.phi import phi_by_name
from omniopd.teachers import build_teacher


def _control_teacher(cfg: RunConfig, teacher):
    """The same teacher without its privileged context, or None when the teacher has none."""
    if cfg.teacher.type == "privileged":
        from omniopd.teachers.local import LocalTeacher

        t = cfg.teacher
        return LocalTeacher(
            teacher.model,
            teacher.tokenizer,
            t.model or cfg.student.name,
            privileged=False,
            batch_size=t.batch_size,
            reuse_prefix=t.reuse_prefix,
        )
    if (
        isinstance(cfg.teacher, (APITeacherConfig, LlamaCppTeacherConfig)) and cfg.teacher.privileged
    ):  # an API or llama.cpp teacher shown the reference: ask it again without
        data = cfg.model_dump(mode="json")
        data["teacher"]["privileged"] = False
        return build_teacher(build_config(data))
    return None


def _chunks(audit, step: int) -> list[dict]:
    out = []
    for rec in audit.records:
        for ch in rec["chunks"]:
            out.append(
                {
                    "key": (step, rec["trajectory"], ch["start"]),
                    "student": ch["student_text"],
                    "continuations": ch["continuations"],
                }
            )
    return out


def _shuffled_partner(keys: list[tuple[int, int, int]]) -> list[int | None]:
    """For chunk j, the next chunk (cyclically) from another trajectory; None if there is none."""
    n = len(keys)
    out: list[int | None] = []
    for j in range(n):
        partner = next((k % n for k in range(j + 1, j + n) if keys[k % n][:2] != keys[j][:2]), None)
        out.append(partner)
    return out


def _verdict(phi: str, N: int, r: dict, privileged: bool) -> list[str]:
    lines = []
    d, se = r["teacher_minus_shuffled"], r["teacher_minus_shuffled_se"]
    if d is None or se is None:
        lines.append(
            f"phi={phi}: too few audited chunks ({r['chunks']}) from more than one trajectory to judge; run more steps"
        )
    elif d <= 2 * se:
        lines.append(
            f"phi={phi}: this teacher/phi pair carries no teacher information: k_sem with the teacher's continuations "
            f"({r['teacher_k_sem']:.3f} of N={N}) does not beat the same continuations scored against another trajectory's "
            f"chunk ({r['shuffled_k_sem']:.3f}); the difference {d:+.3f} is not larger than 2 standard errors ({2 * se:.3f}). "
            "Here k_sem measures how formulaic a chunk is, not what the teacher knows."
        )
    else:
        lines.append(
            f"phi={phi}: the teacher's k_sem ({r['teacher_k_sem']:.3f} of N={N}) beats the shuffled control "
            f"({r['shuffled_k_sem']:.3f}) by {d:+.3f} (more than 2 standard errors, {2 * se:.3f}): the continuations "
            "carry information about the chunk they were written for."
        )
    if privileged:
        d2, se2 = r["teacher_minus_no_privilege"], r["teacher_minus_no_privilege_se"]
        corr = "n/a" if r["pearson_teacher_no_privilege"] is None else f"{r['pearson_teacher_no_privilege']:.2f}"
        if d2 is None or se2 is None:
            lines.append(f"phi={phi}: too few chunks to compare with the teacher without its privileged context")
        elif abs(d2) <= 2 * se2:
            lines.append(
                f"phi={phi}: the privileged context adds nothing measurable: without the reference solution the same model "
                f"scores {r['no_privilege_k_sem']:.3f} (difference {d2:+.3f}, 2 standard errors {2 * se2:.3f}; per-chunk "
                f"correlation {corr})."
            )
        else:
            lines.append(
                f"phi={phi}: the privileged context changes k_sem by {d2:+.3f} (2 standard errors {2 * se2:.3f}; without it "
                f"{r['no_privilege_k_sem']:.3f}; per-chunk correlation {corr})."
            )
    return lines


def _self_teacher(cfg: RunConfig, model, tok):
    """The student writing continuations of its own prefixes, or None when the teacher is the student."""
    t = cfg.teacher
    if t.type in ("local", "privileged") and t.model in (None, cfg.student.name):
        return None
    from omniopd.teachers.local import LocalTeacher

    # an in-process teacher's own settings (the WHITE_BOX_TEACHER_TYPES); an API teacher: the in-process defaults
    local = t if isinstance(t, (LocalTeacherConfig, PrivilegedTeacherConfig)) else LocalTeacherConfig()
    return LocalTeacher(
        model, tok, cfg.student.name, privileged=False, batch_size=local.batch_size, reuse_prefix=local.reuse_prefix
    )


def _self_verdict(phi: str, N: int, r: dict, have_self: bool) -> list[str]:
    if not have_self:
        return []
    d, se, corr = r["relative_minus_shuffled"], r["relative_minus_shuffled_se"], r["pearson_teacher_self"]
    corr_text = "n/a" if corr is None else f"{corr:.2f}"
    head = (
        f"phi={phi}: the student's own continuations score {r['self_k_sem']:.3f} of N={N} against the teacher's "
        f"{r['teacher_k_sem']:.3f} (teacher minus self {r['teacher_minus_self']:+.3f}; per-chunk correlation {corr_text})"
        if r["self_k_sem"] is not None
        else f"phi={phi}: no chunk with the student's own continuations"
    )
    if d is None or se is None:
        return [head + "; too few chunks to judge the relative score"]
    if d <= 2 * se:
        return [
            head + f"; the relative score (teacher minus self) does not point at its own chunk more than at another "
            f"trajectory's ({d:+.3f}, 2 standard errors {2 * se:.3f})."
        ]
    return [
        head + f"; the relative score (teacher minus self) points at its own chunk more than at another trajectory's "
        f"by {d:+.3f} (2 standard errors {2 * se:.3f}): where the teacher agrees more than the student agrees "
        "with itself is specific to the chunk."
    ]


def check_signal(cfg: RunConfig, *, steps: int = 2, phis: Sequence[str] | None = None) -> dict:
    """k_sem of the teacher vs the shuffled and no-privilege controls, for every phi in ``phis``."""
    if steps < 1:
        raise ConfigError(f"check-signal: steps must be >= 1 (got {steps})")
    phis = list(dict.fromkeys(phis or [cfg.audit.phi]))
    resolved = {name: phi_by_name(name) for name in phis}  # fail early (e.g. a missing embedding model)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.student.name, cfg.student.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    teacher = build_teacher(cfg, student=model, student_tokenizer=tok)
    control = _control_teacher(cfg, teacher)
    self_teacher = _self_teacher(cfg, model, tok)
    from omniopd.data import PromptStream

    stream = PromptStream.from_config(cfg)
    # scoring is redone below for each phi; the controls are scored on the same N continuations, so always N
    audit_cfg = cfg.audit.model_copy(update={"phi": "ned", "adaptive_n": False})
    chunks: list[dict] = []
    ctrl_by_key: dict[tuple, list[str]] = {}
    self_by_key: dict[tuple, list[str]] = {}
    r = cfg.rollout
    try:
        for step in range(steps):
            examples = stream.next_batch()
            prompts = chat_prompts(tok, [student_messages(ex.question, ex.instruction) for ex in examples])
            ro = sample_rollouts_as(model, tok, prompts, r)
            traj_examples = [examples[i] for i in ro.example_index]
            common = dict(
                step=step,
                model=model,
                tokenizer=tok,
                batch=ro.batch,
                lengths=ro.lengths,
                examples=traj_examples,
                audit_cfg=audit_cfg,
                teacher_cfg=cfg.teacher,
                seed=cfg.seed,
                micro_batch_size=cfg.optim.micro_batch_size,
                slice_size=cfg.loss.slice_size,
                record_trajectories=len(ro.lengths),
            )
            chunks += _chunks(run_audit(teacher=teacher, **common), step)
            if control is not None:
                for ch in _chunks(run_audit(teacher=control, **common), step):
                    ctrl_by_key[ch["key"]] = ch["continuations"]
            if self_teacher is not None:
                for ch in _chunks(run_audit(teacher=self_teacher, **common), step):
                    self_by_key[ch["key"]] = ch["continuations"]
    finally:
        teacher.close()
        for extra in (control, self_teacher):
            if extra is not None:
                extra.close()

    N = cfg.audit.teacher_samples
    keys = [c["key"] for c in chunks]
    partners = _shuffled_partner(keys)
    results = {}
    for name, (phi, prime) in resolved.items():
        prime(
            [t for c in chunks for t in (c["student"], *c["continuations"])]
            + [t for d in (ctrl_by_key, self_by_key) for v in d.values() for t in v]
        )
        k_t = [sum(phi(c["student"], x) for x in c["continuations"]) for c in chunks]
        pairs = [(j, p) for j, p in enumerate(partners) if p is not None]
        k_s = [sum(phi(chunks[p]["student"], x) for x in chunks[j]["continuations"]) for j, p in pairs]
        d_s = [k_t[j] - ks for (j, _), ks in zip(pairs, k_s, strict=True)]
        both = [j for j, c in enumerate(chunks) if c["key"] in ctrl_by_key]
        k_np = [sum(phi(chunks[j]["student"], x) for x in ctrl_by_key[chunks[j]["key"]]) for j in both]
        d_np = [k_t[j] - kn for j, kn in zip(both, k_np, strict=True)]
        res: dict[str, Any] = {"chunks": len(chunks)}
        for label, xs in (
            ("teacher_k_sem", k_t),
            ("shuffled_k_sem", k_s),
            ("no_privilege_k_sem", k_np),
            ("teacher_minus_shuffled", d_s),
            ("teacher_minus_no_privilege", d_np),
        ):
            res[label], res[label + "_se"] = mean_se(xs)
        res["pearson_teacher_no_privilege"] = pearson([k_t[j] for j in both], k_np)
        # the student's own continuations: the same chunk, and the shuffled partner chunk
        own = [(j, p) for j, p in enumerate(partners) if chunks[j]["key"] in self_by_key]
        k_self = [sum(phi(chunks[j]["student"], x) for x in self_by_key[chunks[j]["key"]]) for j, _ in own]
        rel = [k_t[j] - ks for (j, _), ks in zip(own, k_self, strict=True)]
        rel_shuffled = [
            sum(phi(chunks[p]["student"], x) for x in chunks[j]["continuations"])
            - sum(phi(chunks[p]["student"], x) for x in self_by_key[chunks[j]["key"]])
            for j, p in own
            if p is not None
        ]
        rel_paired = [
            rel[i] - rs
            for i, rs in zip([i for i, (_, p) in enumerate(own) if p is not None], rel_shuffled, strict=True)
        ]
        for label, xs in (
            ("self_k_sem", k_self),
            ("teacher_minus_self", rel),
            ("relative_shuffled", rel_shuffled),
            ("relative_minus_shuffled", rel_paired),
        ):
            res[label], res[label + "_se"] = mean_se(xs)
        res["pearson_teacher_self"] = pearson([k_t[j] for j, _ in own], k_self)
        res["no_teacher_information"] = (
            None
            if res["teacher_minus_shuffled"] is None or res["teacher_minus_shuffled_se"] is None
            else res["teacher_minus_shuffled"] <= 2 * res["teacher_minus_shuffled_se"]
        )
        res["verdict"] = _verdict(name, N, res, control is not None) + _self_verdict(name, N, res, bool(self_by_key))
        results[name] = res
    return {
        "teacher": teacher.name,
        "control_teacher": control.name if control is not None else None,
        "self_teacher": self_teacher.name if self_teacher is not None else None,
        "steps": steps,
        "trajectories": steps * cfg.optim.prompts_per_step * cfg.rollout.samples_per_prompt,
        "chunk_tokens": cfg.audit.chunk_tokens,
        "teacher_samples": N,
        "phis": results,
    }


def format_signal(report: dict) -> str:
    def f(x, se=None):
        if x is None:
            return "n/a"
        return f"{x:.3f}" + (f" ± {se:.3f}" if se is not None else "")

    lines = [
        f"signal check: teacher {report['teacher']}, control {report['control_teacher'] or 'none (not a privileged teacher)'}, "
        f"student self {report.get('self_teacher') or 'none (the teacher is the student)'}, "
        f"{report['trajectories']} trajectories, C={report['chunk_tokens']}, N={report['teacher_samples']} (k_sem mean ± standard error)"
    ]
    for name, r in report["phis"].items():
        lines.append(
            f"  phi={name}: chunks {r['chunks']}  teacher {f(r['teacher_k_sem'], r['teacher_k_sem_se'])}  "
            f"shuffled {f(r['shuffled_k_sem'], r['shuffled_k_sem_se'])}  no-privilege {f(r['no_privilege_k_sem'], r['no_privilege_k_sem_se'])}  "
            f"r(teacher, no-privilege) {f(r['pearson_teacher_no_privilege'])}"
        )
        if r.get("self_k_sem") is not None:
            lines.append(
                f"  phi={name}: student self {f(r['self_k_sem'], r['self_k_sem_se'])}  teacher - self "
                f"{f(r['teacher_minus_self'], r['teacher_minus_self_se'])}  r(teacher, self) {f(r['pearson_teacher_self'])}  "
                f"relative - shuffled {f(r['relative_minus_shuffled'], r['relative_minus_shuffled_se'])}"
            )
        lines += [f"  {v}" for v in r["verdict"]]
    return "\n".join(lines)
