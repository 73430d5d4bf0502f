"""Teacher cost of the audit, setting by setting, on the same student rollouts.

    python benchmarks/teacher_cost.py --output teacher_cost.json [--steps 2] [--prompts 2] [--max-new-tokens T]
        [--widths 0.5[,0.6...]] [--adaptive-round R] [--sweep W,...] [--no-noise-floor] [--recipe R] [key=value ...]

Samples ``--steps`` batches of real rollouts from the recipe's student (``--prompts`` prompts each,
``rollout.samples_per_prompt`` samples per prompt), then audits every batch with the recipe's in-process
teacher (the default recipe: SmolLM2-135M-Instruct shown the reference solution, sharing the student's
weights) and its C, M and N, in each setting:

- ``plain``: N continuations per chunk, ``teacher.reuse_prefix=false`` (``num_return_sequences=N``, the
  prompt prefilled N times);
- ``reuse_prefix``: N continuations from one shared prefill (the default local teacher);
- ``adaptive``: adaptive N (a departure, ``audit.adaptive_n``), rounds of ``--adaptive-round``, without
  prefix reuse; ``adaptive_reuse``: the same with prefix reuse; once per width in ``--widths``;
- ``reuse_shared_prefixes`` (unless ``--no-shared-prefixes``): full N with prefix reuse and the prefill also
  shared across the nested prompts of a generate call (``LocalTeacher(share_prefixes=True)``); its
  targets should equal ``reuse_prefix``'s;
- ``reuse_prefix_reseeded`` (unless ``--no-noise-floor``): full N with prefix reuse and another seed, so
  the difference of two independent full-N targets (the sampling noise floor) sits beside the adaptive one.

Beside the measured settings, ``width_sweep_replayed`` replays the stopping rule on ``plain``'s full-N phi
scores for each width of ``--sweep`` (no teacher calls), to show which widths save anything at these shapes.

Per setting it reports teacher tokens per trajectory as the audit counts them (prompt tokens once per
request plus generated tokens), the prompt positions the model actually computed (N x P per request
without reuse, P - 1 + n with it; left padding not counted), requests (one per chunk and round), teacher
calls, audit / teacher / phi seconds, k_sem mean, k_sem per continuation (k / n) mean and pi_hat mean;
for every setting but ``plain`` the mean absolute difference of pi_hat from ``plain``'s full-N pi_hat on
the same chunks, and for adaptive N the mean n per chunk and the saved fraction 1 - sum n / (chunks N).

Every setting audits the same rollouts with the same seeds, and the settings run interleaved batch by
batch so a change in machine load hits all of them alike. The entropy forward pass is part of the audit
seconds of every setting (it is the same work in each). The model runs on the GPU when there is one
(``device`` in the JSON). Sizes default small enough for 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_breakdown import ROOT  # noqa: E402
from step_breakdown import machine as _machine  # noqa: E402


def machine() -> dict:
    """step_breakdown's machine description plus the load average (the settings run on a shared CPU)."""
    return {**_machine(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def counting_teacher(inner):
    """The teacher with every ``continue_prefixes`` call logged: requests, n, prompt and generated tokens, seconds."""
    from omniopd.teachers.base import Teacher

    class Counting(Teacher):
        def __init__(self) -> None:
            self.inner, self.name, self.tokenizer, self.calls = inner, inner.name, inner.tokenizer, []

        def continue_prefixes(self, requests, spec):
            t0 = time.perf_counter()
            results = inner.continue_prefixes(requests, spec)
            self.calls.append({
                "requests": len(requests), "n": spec.n, "seconds": time.perf_counter() - t0,
                "prompt_tokens": [r.prompt_tokens for r in results], "completion_tokens": sum(r.completion_tokens for r in results),
            })
            return results

    return Counting()


def prompt_positions(calls: list[dict], teacher, prefilled: int) -> int:
    """Prompt token positions the local model computed: N x P per request without reuse; with reuse the
    positions its prefill computed (``prefilled``: P - 1 per request, fewer when prefixes are shared across
    requests) plus the last prompt token once per sample."""
    if teacher.reuse_prefix:
        return prefilled + sum(c["n"] * c["requests"] for c in calls)
    return sum(p * c["n"] for c in calls for p in c["prompt_tokens"])


def replay_width(chunks: list[tuple[list[float], float, float]], width: float, R: int, N: int, alpha: float) -> dict:
    """The adaptive stopping rule replayed on full-N phi scores: where each chunk would have stopped."""
    from omniopd.core.target import posterior_settled

    ns, diffs = [], []
    for scores, p_bar, full_target in chunks:
        n = min(R, N)
        while not posterior_settled(sum(scores[:n]), n, p_bar, alpha, max_samples=N, width=width):
            n = min(n + R, N)
        ns.append(n)
        diffs.append(abs((sum(scores[:n]) + alpha * p_bar) / (n + alpha) - full_target))
    return {"width": width, "chunks": len(ns), "teacher_samples_mean": _mean([float(n) for n in ns]),
            "saved_frac": 1.0 - sum(ns) / (len(ns) * N) if ns else None, "target_abs_diff_vs_full": _mean(diffs),
            "closed_early_frac": _mean([float(n < N) for n in ns])}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="JSON file to write")
    ap.add_argument("--steps", type=int, default=2, help="batches of rollouts [2]")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per batch [2]")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="student response length (default: the recipe's)")
    ap.add_argument("--widths", default=None, help="comma-separated adaptive_width values (default: the config's)")
    ap.add_argument("--adaptive-round", type=int, default=None, help="continuations per round (default: the config's)")
    ap.add_argument("--no-noise-floor", action="store_true", help="skip the reseeded full-N setting")
    ap.add_argument("--no-shared-prefixes", action="store_true", help="skip the cross-request prefill sharing setting")
    ap.add_argument("--sweep", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                    help="widths replayed on plain's full-N phi scores (no teacher calls; empty: skip) [0.3,...,0.9]")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"))
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.prompts < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        ap.error("need --steps >= 1, --prompts >= 1 and --max-new-tokens >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from omniopd.config import load_config
    from omniopd.data import PromptStream, load_examples
    from omniopd.engine.models import load_model
    from omniopd.engine.prompts import student_messages
    from omniopd.engine.rollout import chat_prompts, sample_rollouts
    from omniopd.errors import ConfigError
    from omniopd.methods.omniopd.audit import run_audit
    from omniopd.teachers import ContinuationRequest, SamplingSpec, build_teacher

    extra = [f"optim.prompts_per_step={args.prompts}"]
    if args.max_new_tokens is not None:
        extra.append(f"rollout.max_new_tokens={args.max_new_tokens}")
    cfg = load_config(args.recipe, [*args.overrides, *extra])
    if cfg.teacher.type not in ("local", "privileged"):
        ap.error(f"this benchmark measures the in-process teacher (local or privileged), got teacher.type={cfg.teacher.type}")
    a = cfg.audit
    R = args.adaptive_round or a.adaptive_round
    try:
        widths = [float(w) for w in args.widths.split(",")] if args.widths else [a.adaptive_width]
        sweep = [float(w) for w in args.sweep.split(",") if w.strip()]
    except ValueError as err:
        ap.error(f"--widths and --sweep take comma-separated numbers ({err})")
    for w in widths:  # validated exactly as a run would be
        try:
            load_config(args.recipe, [*args.overrides, *extra, "audit.adaptive_n=true", f"audit.adaptive_round={R}", f"audit.adaptive_width={w}"])
        except ConfigError as err:
            ap.error(str(err))

    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.student.name, cfg.student.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where a training run would put it
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    teachers = {key: build_teacher(cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"reuse_prefix": key != "plain"})}),
                                   student=model, student_tokenizer=tok) for key in ("plain", "reuse", "shared")}
    teachers["shared"].share_prefixes = True  # prefill shared across the nested prompts of a generate call
    # settings: name -> (teacher, audit config, seed)
    settings: dict[str, tuple[str, object, int]] = {
        "plain": ("plain", a, cfg.seed),
        "reuse_prefix": ("reuse", a, cfg.seed),
    }
    for w in widths:
        acfg = a.model_copy(update={"adaptive_n": True, "adaptive_round": R, "adaptive_width": w})
        suffix = "" if len(widths) == 1 else f"@{w:g}"
        settings["adaptive" + suffix] = ("plain", acfg, cfg.seed)
        settings["adaptive_reuse" + suffix] = ("reuse", acfg, cfg.seed)
    if not args.no_shared_prefixes:
        settings["reuse_shared_prefixes"] = ("shared", a, cfg.seed)
    if not args.no_noise_floor:
        settings["reuse_prefix_reseeded"] = ("reuse", a, cfg.seed + 1)

    # warm-up: the first generate call pays one-off costs that no setting should carry
    warm = ContinuationRequest(question="1 + 1?", prefix="The answer", reference="#### 2")
    for t in teachers.values():
        t.continue_prefixes([warm], SamplingSpec(n=2, max_new_tokens=2, seed=0))
        t.prefill_stats.update(computed=0, reused=0)

    stream = PromptStream.from_config(cfg, load_examples(cfg.data.train))
    ro_cfg = cfg.rollout
    acc = {name: {"trajectories": 0, "chunks": 0, "tokens_in": 0, "tokens_out": 0, "prompt_positions": 0,
                  "requests": 0, "calls": 0, "audit_s": 0.0, "teacher_s": 0.0, "phi_s": 0.0,
                  "k": [], "k_rate": [], "pi": [], "n": [], "diff": []} for name in settings}
    rollout_s, lengths_all = 0.0, []
    replay: list[tuple[list[float], float, float]] = []  # plain's chunks: phi scores, p_bar, full-N target
    for step in range(1, args.steps + 1):
        examples = stream.next_batch()
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 7919 + step)
        ro = sample_rollouts(model, tok, chat_prompts(tok, [student_messages(e.question) for e in examples]),
                             samples_per_prompt=ro_cfg.samples_per_prompt, max_new_tokens=ro_cfg.max_new_tokens,
                             temperature=ro_cfg.temperature, top_p=ro_cfg.top_p, batch_size=ro_cfg.batch_size)
        rollout_s += time.perf_counter() - t0
        lengths_all += ro.lengths
        traj_examples = [examples[i] for i in ro.example_index]
        full: dict[tuple[int, int], float] = {}
        for name, (tkey, acfg, seed) in settings.items():
            teacher = counting_teacher(teachers[tkey])
            prefilled0 = teachers[tkey].prefill_stats["computed"]
            t0 = time.perf_counter()
            res = run_audit(step=step, model=model, tokenizer=tok, batch=ro.batch, lengths=ro.lengths, examples=traj_examples,
                            teacher=teacher, audit_cfg=acfg, teacher_cfg=cfg.teacher, seed=seed,
                            micro_batch_size=cfg.optim.micro_batch_size, slice_size=cfg.loss.slice_size,
                            record_trajectories=len(ro.lengths))
            s = acc[name]
            s["audit_s"] += time.perf_counter() - t0
            s["teacher_s"] += res.metrics["time/teacher_s"]
            s["phi_s"] += res.metrics["time/phi_s"]
            s["trajectories"] += len(ro.lengths)
            s["chunks"] += int(res.metrics["audit/chunks"])
            s["tokens_in"] += int(res.metrics["teacher/tokens_in"])
            s["tokens_out"] += int(res.metrics["teacher/tokens_out"])
            s["requests"] += int(res.metrics["teacher/requests"])
            s["calls"] += len(teacher.calls)
            s["prompt_positions"] += prompt_positions(teacher.calls, teachers[tkey], teachers[tkey].prefill_stats["computed"] - prefilled0)
            for rec in res.records:  # every trajectory is recorded: its chunks carry start, k_sem, target (and n)
                for ch in rec["chunks"]:
                    n = ch.get("teacher_samples", a.teacher_samples)
                    s["k"].append(ch["k_sem"])
                    s["k_rate"].append(ch["k_sem"] / n)
                    s["pi"].append(ch["target"])
                    s["n"].append(n)
                    key = (rec["trajectory"], ch["start"])
                    if name == "plain":
                        full[key] = ch["target"]
                        replay.append((ch["phi_scores"], ch["prior_mean"], ch["target"]))
                    elif key in full:
                        s["diff"].append(abs(ch["target"] - full[key]))
            print(f"step {step} {name:>22}: {res.metrics['audit/chunks']:.0f} chunks, {res.metrics['teacher/tokens']:.0f} teacher tokens, "
                  f"{res.metrics['time/teacher_s']:.1f} s teacher", file=sys.stderr)

    N = a.teacher_samples
    rows = {}
    for name, s in acc.items():
        tkey, acfg, seed = settings[name]
        T = max(s["trajectories"], 1)
        rows[name] = {
            "reuse_prefix": tkey != "plain",
            "share_prefixes": tkey == "shared",
            "adaptive_n": acfg.adaptive_n,
            **({"adaptive_round": acfg.adaptive_round, "adaptive_width": acfg.adaptive_width} if acfg.adaptive_n else {}),
            "seed": seed,
            "trajectories": s["trajectories"],
            "chunks": s["chunks"],
            "teacher_tokens_per_traj": (s["tokens_in"] + s["tokens_out"]) / T,
            "teacher_tokens_in_per_traj": s["tokens_in"] / T,
            "teacher_tokens_out_per_traj": s["tokens_out"] / T,
            "prompt_positions_computed_per_traj": s["prompt_positions"] / T,
            "teacher_requests": s["requests"],
            "teacher_requests_per_traj": s["requests"] / T,
            "teacher_calls": s["calls"],
            "audit_s": s["audit_s"],
            "audit_s_per_traj": s["audit_s"] / T,
            "teacher_s": s["teacher_s"],
            "phi_s": s["phi_s"],
            "k_sem_mean": _mean(s["k"]),
            "k_sem_per_sample_mean": _mean(s["k_rate"]),
            "target_mean": _mean(s["pi"]),
            "teacher_samples_mean": _mean(s["n"]),
            "saved_frac": 1.0 - sum(s["n"]) / (len(s["n"]) * N) if s["n"] else None,
            "target_abs_diff_vs_plain": _mean(s["diff"]) if name != "plain" else None,
            "matched_chunks_vs_plain": len(s["diff"]) if name != "plain" else None,
        }
    base = rows["plain"]
    for row in rows.values():
        row["audit_s_vs_plain"] = row["audit_s"] / base["audit_s"] if base["audit_s"] else None
        row["teacher_s_vs_plain"] = row["teacher_s"] / base["teacher_s"] if base["teacher_s"] else None
        row["teacher_tokens_vs_plain"] = (row["teacher_tokens_per_traj"] / base["teacher_tokens_per_traj"]
                                          if base["teacher_tokens_per_traj"] else None)
    result = {
        "benchmark": "teacher_cost",
        "recipe": args.recipe,
        "overrides": args.overrides,
        "steps": args.steps,
        "prompts_per_step": args.prompts,
        "shapes": {
            "student": cfg.student.name,
            "teacher": f"{cfg.teacher.type}:{cfg.teacher.model or cfg.student.name}",
            "trajectories_per_step": args.prompts * ro_cfg.samples_per_prompt,
            "max_new_tokens": ro_cfg.max_new_tokens,
            "chunk_tokens": a.chunk_tokens,
            "num_chunks": a.num_chunks,
            "teacher_samples": N,
            "teacher_max_new_tokens": cfg.teacher.max_new_tokens or a.chunk_tokens,
            "teacher_batch_size": cfg.teacher.batch_size,
            "prior_strength": a.prior_strength,
            "phi": a.phi,
        },
        "rollouts": {"seconds": rollout_s, "mean_length": _mean([float(x) for x in lengths_all]),
                     "audited_trajectories_possible": sum(1 for x in lengths_all if x >= a.chunk_tokens)},
        "settings": rows,
        "width_sweep_replayed": [replay_width(replay, w, R, N, a.prior_strength) for w in sweep],
        "notes": [
            "teacher_tokens_*: what the audit counts and an API would bill (prompt once per request, plus generated tokens).",
            "prompt_positions_computed_per_traj: prompt positions the local model actually ran (N x P without prefix reuse, "
            "P - 1 + n with it, fewer with shared prefixes), left padding not counted.",
            "target_abs_diff_vs_plain: mean |pi_hat - pi_hat(plain, full N)| on the chunks both audited; "
            "reuse_prefix_reseeded gives the noise floor of two independent full-N draws.",
            "adaptive N is a labelled departure from the paper (audit.adaptive_n).",
            "width_sweep_replayed: the stopping rule replayed on plain's N continuations in sample order (a request's "
            "continuations are independent draws, so its first n are a fair draw of n): mean n, saved fraction and "
            "mean |pi_hat(n) - pi_hat(N)| per width, with no further teacher calls.",
        ],
        "device": device,
        "machine": machine(),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    summary = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                      if k in ("teacher_tokens_per_traj", "prompt_positions_computed_per_traj", "teacher_requests", "audit_s",
                               "teacher_s", "k_sem_per_sample_mean", "target_mean", "teacher_samples_mean",
                               "target_abs_diff_vs_plain")}
               for name, row in rows.items()}
    print(json.dumps(summary, indent=2))
    for row in result["width_sweep_replayed"]:
        print(f"replayed width {row['width']:g}: mean n {row['teacher_samples_mean']}, saved {row['saved_frac']}, "
              f"|pi_hat(n) - pi_hat(N)| {row['target_abs_diff_vs_full']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
