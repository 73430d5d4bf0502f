"""Pre-flight check of a teacher: is it really sampling, does it write enough, does it echo?

``omniopd check-teacher RECIPE.yaml`` (and, with fewer prefixes, the start of every training run)
sends a few real prefixes -- the first third of the dataset's reference solutions, or an empty
answer where a dataset has none -- and asks for N continuations each, exactly as an audit would. It
reports, per prefix, the continuations' lengths in *student* tokens, how many are distinct, the mean
phi between pairs of them, and warns when the teacher looks greedy (all N identical), truncates (most
continuations far shorter than C student tokens), echoes the prefix back, or fails. A teacher that answered
none of them, every request failing as every request to it would (nothing listening at its URL, a wrong key
or model, a request it rejects as malformed), raises :class:`~omniopd.errors.TeacherError` with one line
naming the URL or model and the cause: the run stops in seconds instead of training without a teacher.
"""

from __future__ import annotations

import itertools
from statistics import mean
from typing import Any

from omniopd.config import RunConfig
from omniopd.data import Example
from omniopd.engine.alignment import cut_to_tokens
from omniopd.errors import TeacherError
from omniopd.teachers.base import ContinuationRequest, SamplingSpec, Teacher


def _prefix(ex: Example) -> str:
    if not ex.reference:
        return ""
    text = ex.reference
    cut = len(text) // 3
    space = text.rfind(" ", 0, cut)
    return text[: space + 1 if space > 0 else cut]


def _echoes(prefix: str, continuation: str) -> bool:
    tail = prefix.strip()[-40:]
    return len(tail) >= 20 and tail in continuation


def check_teacher(
    cfg: RunConfig, teacher: Teacher, student_tokenizer, examples: list[Example], num_prefixes: int = 3
) -> dict:
    C, N = cfg.audit.chunk_tokens, cfg.audit.teacher_samples
    from omniopd.methods.omniopd.phi import phi_by_name

    phi = phi_by_name(cfg.audit.phi)[0]
    chosen = examples[:num_prefixes]
    requests = [
        ContinuationRequest(
            question=ex.question, prefix=_prefix(ex), reference=ex.reference, trajectory=i, instruction=ex.instruction
        )
        for i, ex in enumerate(chosen)
    ]
    spec = SamplingSpec(
        n=N,
        max_new_tokens=cfg.teacher.max_new_tokens or C,
        temperature=cfg.teacher.temperature,
        top_p=cfg.teacher.top_p,
        seed=cfg.seed + 777,
    )
    results = teacher.continue_prefixes(requests, spec)  # a wrong key or model raises TeacherError here
    if results and not any(res.ok for res in results):
        reason = getattr(teacher, "unusable_reason", lambda: None)()  # API teachers: unreachable, rejected
        if reason:
            raise TeacherError(reason)
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for ex, req, res in zip(chosen, requests, results, strict=True):
        if not res.ok or len(res.texts) != N:
            rows.append({"example_id": ex.id, "error": res.error or f"{len(res.texts)} of {N} continuations"})
            continue
        lengths = [len(student_tokenizer.encode(t, add_special_tokens=False)) for t in res.texts]
        cut = [cut_to_tokens(student_tokenizer, t, C)[0] for t in res.texts]
        pairs = list(itertools.combinations(cut, 2))
        rows.append(
            {
                "example_id": ex.id,
                "prefix_tail": req.prefix[-80:],
                "student_tokens": lengths,
                "distinct": len(set(res.texts)),
                "mean_pairwise_phi": mean(phi(a, b) for a, b in pairs) if pairs else 1.0,
                "echoes_prefix": sum(_echoes(req.prefix, t) for t in res.texts),
                "first_continuation": res.texts[0][:200],
            }
        )
    ok_rows = [r for r in rows if "error" not in r]
    failed = len(rows) - len(ok_rows)
    if failed:
        warnings.append(
            f"{failed} of {len(rows)} prefixes got no complete set of {N} continuations: "
            + "; ".join(r["error"] for r in rows if "error" in r)
        )
    if ok_rows and N > 1 and all(r["distinct"] == 1 for r in ok_rows):
        warnings.append(
            f"the teacher looks greedy: all {N} continuations of every prefix are identical, so k_sem collapses to 0 or N (check temperature and that the server really samples)"
        )
    lens = [n for r in ok_rows for n in r["student_tokens"]]
    if lens and sorted(lens)[len(lens) // 2] < C // 2:
        warnings.append(
            f"the teacher truncates: median continuation is {sorted(lens)[len(lens) // 2]} student tokens, under half of C={C} (raise teacher.max_new_tokens?)"
        )
    echoes = sum(r["echoes_prefix"] for r in ok_rows)
    if echoes:
        warnings.append(
            f"{echoes} continuations repeat the end of the prefix (the teacher echoes the partial answer instead of continuing it)"
        )
    return {
        "teacher": teacher.name,
        "phi": cfg.audit.phi,
        "chunk_tokens": C,
        "teacher_samples": N,
        "prefixes": rows,
        "mean_student_tokens": mean(lens) if lens else 0.0,
        "mean_distinct": mean(r["distinct"] for r in ok_rows) if ok_rows else 0.0,
        "mean_pairwise_phi": mean(r["mean_pairwise_phi"] for r in ok_rows) if ok_rows else 0.0,
        "warnings": warnings,
    }


def format_check(report: dict) -> str:
    lines = [
        f"teacher {report['teacher']}  (C={report['chunk_tokens']} student tokens, N={report['teacher_samples']}, phi={report['phi']})"
    ]
    for r in report["prefixes"]:
        if "error" in r:
            lines.append(f"  {r['example_id']}: FAILED {r['error']}")
        else:
            lines.append(
                f"  {r['example_id']}: lengths {r['student_tokens']}  distinct {r['distinct']}  mean pairwise phi {r['mean_pairwise_phi']:.3f}"
            )
            lines.append(f"      ...{r['prefix_tail'][-50:]!r} -> {r['first_continuation'][:80]!r}")
    lines.append(
        f"mean length {report['mean_student_tokens']:.1f} student tokens, mean distinct {report['mean_distinct']:.1f}, mean pairwise phi {report['mean_pairwise_phi']:.3f}"
    )
    lines += [f"WARNING: {w}" for w in report["warnings"]] or ["no warnings"]
    return "\n".join(lines)
