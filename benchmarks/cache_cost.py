"""What prompt caching saves an API teacher, on the fake providers and in ``omniopd estimate``.

    python benchmarks/cache_cost.py --output cache_cost.json [--steps 8] [--max-new-tokens T] [--min-tokens 64]
        [--train-steps 2] [--rollouts FILE] [--recipe R] [key=value ...]

1. Samples ``--steps`` batches of real rollouts of the recipe's student once (the default recipe: SmolLM2-135M
   on GSM8K, 2 prompts x 2 samples per step, C=24, M=3), then audits every batch with an API teacher against
   the local fake providers (``omniopd.testing.fake_providers``, which follow each provider's documented cache
   rules), one fresh teacher and server per setting, all settings on the same rollouts: Anthropic
   (``claude-haiku-4-5`` list prices) with caching off and on, for N=4 and N=10, with and without adaptive N
   (rounds of 2, the recipe's width), plus N=10 with ``dispatch=sequential``, and OpenAI chat (``gpt-5-mini``)
   and Gemini (``gemini-2.5-flash``), which cache on their own (N=10, with and without adaptive N). Billed tokens (prompt in total, read from the
   cache, written to it, generated), teacher samples and dollars per setting.
   The minimum cached prefix is scaled down to ``--min-tokens`` on both sides (client and fake): GSM8K prompts
   are a few hundred tokens, under every provider's real minimum (1,024-4,096), where nothing would be cached;
   the scaled run shows the mechanism on this request pattern, ``omniopd estimate`` (4.) the real minimums.
   The fake answers with filler words, so phi and adaptive N's stopping see a teacher that always disagrees.
2. The per-request cache pattern of one trajectory (N=4, Anthropic), with ``warm_first`` and ``sequential``.
3. The estimate against the measured ledger: ``omniopd estimate``'s replay (``omniopd.diagnostics.estimate.replay``) of the
   same recorded batches against every Anthropic setting without adaptive N; and, with ``--train-steps``,
   ``omniopd estimate`` on its own rollouts against a short real training run on the fake provider.
4. ``omniopd estimate`` for the recipe with an Anthropic teacher (Claude Haiku 4.5, real minimum) and for the
   paper's setting (``--paper``) with Haiku 4.5 and with Sonnet 4.5 (a 1,024-token minimum), each with and
   without caching.

Not a speed measurement: token counts and dollars do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_breakdown import ROOT  # noqa: E402
from step_breakdown import machine as _machine  # noqa: E402

HAIKU = "claude-haiku-4-5"
KEYS = ("requests", "tokens_in", "cached_tokens", "cache_write_tokens", "tokens_out", "cost_usd")


def sample_batches(cfg, steps: int, saved: str | None = None):
    """``steps`` batches of the recipe's prompt stream and the student's rollouts of them (read from ``saved``
    when that file holds them, else sampled and written there)."""
    import torch

    from omniopd.data import PromptStream
    from omniopd.engine.models import load_model
    from omniopd.engine.prompts import student_messages
    from omniopd.engine.rollout import chat_prompts, sample_rollouts

    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.student.name, cfg.student.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    key = {"recipe": cfg.model_dump(mode="json"), "steps": steps}
    if saved and Path(saved).is_file():
        stored = torch.load(saved, weights_only=False)
        if stored["key"] == key:
            return model, tok, stored["batches"]
    stream, r, batches = PromptStream.from_config(cfg), cfg.rollout, []
    for _ in range(steps):
        examples = stream.next_batch()
        prompts = chat_prompts(tok, [student_messages(e.question, e.instruction) for e in examples])
        ro = sample_rollouts(model, tok, prompts, samples_per_prompt=r.samples_per_prompt,
                             max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                             batch_size=r.batch_size)
        batches.append((examples, ro))
    if saved:
        torch.save({"key": key, "batches": batches}, saved)
    return model, tok, batches


def audit_all(cfg, model, tok, batches, teacher, audit_cfg) -> dict:
    """Every batch audited with ``teacher``; the ledger's bill and the samples the audit asked for."""
    from omniopd.methods.omniopd.audit import run_audit

    samples, chunks = 0, 0
    for step, (examples, ro) in enumerate(batches):
        res = run_audit(step=step + 1, model=model, tokenizer=tok, batch=ro.batch, lengths=ro.lengths,
                        examples=[examples[i] for i in ro.example_index], teacher=teacher, audit_cfg=audit_cfg,
                        teacher_cfg=cfg.teacher, seed=cfg.seed, micro_batch_size=cfg.optim.micro_batch_size,
                        slice_size=cfg.loss.slice_size, record_trajectories=0, token_stats=(ro.entropy, ro.logprobs))
        n = res.samples_B or [[audit_cfg.teacher_samples] * len(s) for s in res.starts_B]
        samples += sum(sum(x) for x in n)
        chunks += int(res.metrics["audit/chunks"])
    m = teacher.metrics()
    return {**{k: m[f"teacher/{k}"] for k in KEYS}, "samples": samples, "chunks": chunks,
            "uncached_cost_usd": teacher.ledger.prices.cost_usd(m["teacher/tokens_in"], m["teacher/tokens_out"])}


def make_teacher(kind: str, fake, min_tokens: int, **options):
    from omniopd.teachers.anthropic_backend import AnthropicTeacher
    from omniopd.teachers.gemini_backend import GeminiTeacher
    from omniopd.teachers.openai_backend import OpenAIChatTeacher

    common = {"cache_path": None, "prompt_cache_min_tokens": min_tokens, "timeout_s": 60.0, **options}
    if kind == "anthropic":
        return AnthropicTeacher(HAIKU, base_url=fake.url, **common)
    if kind == "openai-chat":
        return OpenAIChatTeacher("gpt-5-mini", base_url=fake.url + "/v1", **common)
    return GeminiTeacher("gemini-2.5-flash", base_url=fake.url, **common)


def settings() -> list[dict]:
    out = [{"provider": "anthropic", "N": n, "adaptive": ad, "prompt_cache": pc, "dispatch": "warm_first"}
           for n in (4, 10) for ad in (False, True) for pc in (False, True)]
    out.append({"provider": "anthropic", "N": 10, "adaptive": False, "prompt_cache": True, "dispatch": "sequential"})
    out += [{"provider": p, "N": 10, "adaptive": ad, "prompt_cache": True, "dispatch": "warm_first"}
            for p in ("openai-chat", "gemini") for ad in (False, True)]
    return out


def trajectory_pattern(cfg, model, tok, batches, min_tokens: int, latency_s: float) -> dict:
    """Each request of trajectory 0 of the first batch, in arrival order: its chunk, prompt, read, written."""
    from omniopd.diagnostics.estimate import RecordingTeacher
    from omniopd.methods.omniopd.audit import run_audit
    from omniopd.testing.fake_providers import FakeProviderServer

    examples, ro = batches[0]
    recorder = RecordingTeacher()
    audit_cfg = cfg.audit.model_copy(update={"teacher_samples": 4, "adaptive_n": False})
    run_audit(step=1, model=model, tokenizer=tok, batch=ro.batch, lengths=ro.lengths,
              examples=[examples[i] for i in ro.example_index], teacher=recorder, audit_cfg=audit_cfg,
              teacher_cfg=cfg.teacher, seed=cfg.seed, micro_batch_size=cfg.optim.micro_batch_size,
              slice_size=cfg.loss.slice_size, record_trajectories=0, token_stats=(ro.entropy, ro.logprobs))
    requests, spec = recorder.calls[0]
    mine = sorted((r for r in requests if r.trajectory == 0), key=lambda r: len(r.prefix))
    out = {}
    for dispatch in ("warm_first", "sequential"):
        with FakeProviderServer(latency_s=latency_s) as fake:
            fake.cache_min_tokens = min_tokens
            with make_teacher("anthropic", fake, min_tokens, dispatch=dispatch) as teacher:
                teacher.continue_prefixes(mine, spec)
            rows = []
            for rec in fake.requests:
                last = rec.body["messages"][-1]  # the prefill, or the task when the prefix is empty
                content = last["content"] if last["role"] == "assistant" else ""
                text = content if isinstance(content, str) else "".join(b["text"] for b in content)
                chunk = next((j for j, r in enumerate(mine) if r.prefix.rstrip() == text), None)
                u = rec.usage
                rows.append({"chunk": chunk, "prompt": u.prompt_tokens, "read": u.cached_tokens,
                             "written": u.cache_write_tokens, "uncached": u.uncached_tokens})
        out[dispatch] = rows
    return {"chunks": len(mine), "N": spec.n, "prefix_chars": [len(r.prefix) for r in mine], "requests": out}


def replay_check(cfg, model, tok, batches, measured: dict, min_tokens: int) -> list[dict]:
    """The estimate's replay of the same recorded batches against the measured ledger, per Anthropic setting."""
    from omniopd.diagnostics.estimate import RecordingTeacher, replay
    from omniopd.methods.omniopd.audit import run_audit
    from omniopd.teachers.anthropic_backend import AnthropicTeacher

    rows = []
    for key, meas in measured.items():
        s = meas["setting"]
        if s["provider"] != "anthropic" or s["adaptive"]:
            continue
        recorder = RecordingTeacher()
        audit_cfg = cfg.audit.model_copy(update={"teacher_samples": s["N"], "adaptive_n": False})
        for step, (examples, ro) in enumerate(batches):
            run_audit(step=step + 1, model=model, tokenizer=tok, batch=ro.batch, lengths=ro.lengths,
                      examples=[examples[i] for i in ro.example_index], teacher=recorder, audit_cfg=audit_cfg,
                      teacher_cfg=cfg.teacher, seed=cfg.seed, micro_batch_size=cfg.optim.micro_batch_size,
                      slice_size=cfg.loss.slice_size, record_trajectories=0, token_stats=(ro.entropy, ro.logprobs))
        with AnthropicTeacher(HAIKU, base_url="http://127.0.0.1:9", cache_path=None, prompt_cache_min_tokens=min_tokens,
                              prompt_cache=s["prompt_cache"], dispatch=s["dispatch"]) as t:
            bill = replay(t, recorder.calls, cached=s["prompt_cache"])
            est = {"requests": bill.requests, "tokens_in": bill.prompt_tokens, "cached_tokens": bill.cached_tokens,
                   "cache_write_tokens": bill.cache_write_tokens, "tokens_out": bill.completion_tokens,
                   "cost_usd": t.ledger.prices.cost_usd(bill.prompt_tokens, bill.completion_tokens, bill.cached_tokens,
                                                        bill.cache_write_tokens)}
        rows.append({"setting": key, "estimated": est, "measured": {k: meas[k] for k in KEYS},
                     "ratio_measured_over_estimated": {k: (meas[k] / est[k] if est[k] else None) for k in KEYS}})
    return rows


def train_check(cfg, steps: int, min_tokens: int, latency_s: float) -> dict:
    """``omniopd estimate`` on the recipe against the per-step ledger of a short training run on the fake."""
    from omniopd.config import build_config
    from omniopd.diagnostics.estimate import estimate
    from omniopd.testing.fake_providers import FakeProviderServer
    from omniopd.training.trainer import train

    with FakeProviderServer(latency_s=latency_s) as fake, tempfile.TemporaryDirectory() as tmp:
        fake.cache_min_tokens = min_tokens
        data = cfg.model_dump(mode="json")
        data.update(output_dir=str(Path(tmp) / "run"), max_steps=steps)
        data["teacher"] = {"type": "anthropic", "model": HAIKU, "base_url": fake.url, "cache": False,
                           "prompt_cache_min_tokens": min_tokens}
        data["eval"].update(before=False, after=False)
        run_cfg = build_config(data)
        report = estimate(run_cfg, prompts=steps * run_cfg.optim.prompts_per_step)
        t0 = time.perf_counter()
        train(run_cfg, progress=False)
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    per_step = report["rows"]["prompt_cache"]["per_step"]
    measured = {"requests": sum(r["teacher/requests"] for r in rows) / len(rows) * run_cfg.audit.teacher_samples,
                "prompt_tokens": sum(r["teacher/tokens_in"] for r in rows) / len(rows),
                "cached_tokens": sum(r["teacher/cached_tokens"] for r in rows) / len(rows),
                "cache_write_tokens": sum(r["teacher/cache_write_tokens"] for r in rows) / len(rows),
                "completion_tokens": sum(r["teacher/tokens_out"] for r in rows) / len(rows),
                "cost_usd": sum(r["teacher/cost_usd"] for r in rows) / len(rows)}
    return {"steps": len(rows), "train_seconds": time.perf_counter() - t0, "estimated_per_step": per_step,
            "measured_per_step": measured,
            "ratio_measured_over_estimated": {k: (v / per_step[k] if per_step[k] else None)
                                              for k, v in measured.items()}}


def table(measured: dict) -> str:
    head = ("| provider | N | adaptive N | caching | dispatch | samples | requests | prompt tok | read | written "
            "| generated | USD | USD uncached |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in measured.values():
        s = m["setting"]
        lines.append(f"| {s['provider']} | {s['N']} | {'yes' if s['adaptive'] else 'no'} | "
                     f"{'on' if s['prompt_cache'] else 'off'} | {s['dispatch']} | {m['samples']} | "
                     f"{m['requests']:.0f} | "
                     f"{m['tokens_in']:.0f} | {m['cached_tokens']:.0f} | {m['cache_write_tokens']:.0f} | "
                     f"{m['tokens_out']:.0f} | {m['cost_usd']:.5f} | {m['uncached_cost_usd']:.5f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="JSON file to write")
    ap.add_argument("--steps", type=int, default=8, help="batches of rollouts audited in every setting [8]")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="student response length (default: the recipe's)")
    ap.add_argument("--min-tokens", type=int, default=64, help="the scaled-down minimum cached prefix [64]")
    ap.add_argument("--latency", type=float, default=0.05, help="the fake's seconds per answer [0.05]")
    ap.add_argument("--train-steps", type=int, default=2, help="steps of the real-run check (0: skip) [2]")
    ap.add_argument("--rollouts", default=None, help="a file to keep the sampled rollouts in (reused by a rerun)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"))
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY"):
        os.environ.setdefault(name, "sk-fake")  # the fake takes any key
    from omniopd.config import load_config
    from omniopd.diagnostics.estimate import estimate
    from omniopd.testing.fake_providers import FakeProviderServer

    overrides = list(args.overrides)
    if args.max_new_tokens:
        overrides.append(f"rollout.max_new_tokens={args.max_new_tokens}")
    cfg = load_config(args.recipe, overrides)
    t0 = time.perf_counter()
    model, tok, batches = sample_batches(cfg, args.steps, args.rollouts)
    rollout_s = time.perf_counter() - t0

    measured = {}
    for s in settings():
        audit_cfg = cfg.audit.model_copy(update={"teacher_samples": s["N"], "adaptive_n": s["adaptive"]})
        with FakeProviderServer(latency_s=args.latency) as fake:
            fake.cache_min_tokens = args.min_tokens
            with make_teacher(s["provider"], fake, args.min_tokens, prompt_cache=s["prompt_cache"],
                              dispatch=s["dispatch"]) as teacher:
                bill = audit_all(cfg, model, tok, batches, teacher, audit_cfg)
        key = f"{s['provider']} N={s['N']} adaptive={s['adaptive']} cache={s['prompt_cache']} {s['dispatch']}"
        measured[key] = {"setting": s, **bill}
        print(key, {k: round(v, 6) if isinstance(v, float) else v for k, v in bill.items()}, flush=True)

    def saving(n: int, adaptive: bool) -> dict:
        off = measured[f"anthropic N={n} adaptive={adaptive} cache=False warm_first"]
        on = measured[f"anthropic N={n} adaptive={adaptive} cache=True warm_first"]
        return {"N": n, "adaptive": adaptive, "dollars_saved_frac": 1 - on["cost_usd"] / off["cost_usd"],
                "prompt_dollars_saved_frac": 1 - (on["cost_usd"] - on["tokens_out"] * 5e-6)
                / (off["cost_usd"] - off["tokens_out"] * 5e-6)}

    def adaptive_saving(n: int, cache: bool) -> dict:
        full = measured[f"anthropic N={n} adaptive=False cache={cache} warm_first"]
        ad = measured[f"anthropic N={n} adaptive=True cache={cache} warm_first"]
        return {"N": n, "prompt_cache": cache, "samples_saved_frac": 1 - ad["samples"] / full["samples"],
                "billed_tokens_saved_frac": 1 - (ad["tokens_in"] + ad["tokens_out"])
                / (full["tokens_in"] + full["tokens_out"]),
                "dollars_saved_frac": 1 - ad["cost_usd"] / full["cost_usd"]}

    report = {
        "machine": _machine(), "recipe": args.recipe, "overrides": overrides, "steps": args.steps,
        "rollout_seconds": rollout_s, "min_cache_tokens_scaled": args.min_tokens, "fake_latency_s": args.latency,
        "prices_usd_per_mtok": {"anthropic": "claude-haiku-4-5: 1 / 0.10 read / 1.25 write / 5 out",
                                "openai-chat": "gpt-5-mini: 0.25 / 0.025 / - / 2",
                                "gemini": "gemini-2.5-flash: 0.30 / 0.03 / - / 2.50"},
        "settings": measured,
        "caching_saves": [saving(n, ad) for n in (4, 10) for ad in (False, True)],
        "adaptive_n_saves": [adaptive_saving(n, c) for n in (4, 10) for c in (False, True)],
        "table_markdown": table(measured),
    }
    Path(args.output).write_text(json.dumps(report, indent=2, default=str))
    out = Path(args.output)

    def phase(name: str, run) -> None:
        """One more part of the report, written as soon as it is measured; a part that fails is recorded."""
        try:
            report[name] = run()
        except Exception as err:  # noqa: BLE001 - the other parts stand on their own
            report[name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"{name}: {report[name]['error']}", flush=True)
        out.write_text(json.dumps(report, indent=2, default=str))

    phase("trajectory_pattern", lambda: trajectory_pattern(cfg, model, tok, batches, args.min_tokens, args.latency))
    phase("estimate_replay_vs_measured", lambda: replay_check(cfg, model, tok, batches, measured, args.min_tokens))
    from omniopd.config import load_config as _load

    anthropic = ["teacher.type=anthropic", f"teacher.model={HAIKU}"]
    sonnet = ["teacher.type=anthropic", "teacher.model=claude-sonnet-4-5"]
    phase("estimates", lambda: {
        "paper_haiku": estimate(_load(args.recipe, overrides + anthropic), paper=True),
        "paper_sonnet": estimate(_load(args.recipe, overrides + sonnet), paper=True),
        "recipe_haiku": estimate(_load(args.recipe, overrides + anthropic)),
    })
    if args.train_steps:
        phase("estimate_vs_training_run", lambda: train_check(cfg, args.train_steps, args.min_tokens, args.latency))
    print(report["table_markdown"])
    print(json.dumps({k: report[k] for k in ("caching_saves", "adaptive_n_saves")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
