"""Seconds per training step: OmniOPD at the default recipe's shapes against TRL's DistillationTrainer.

    python benchmarks/compare_trl.py --output compare_trl.json [--steps 5] [--warmup 1] [--max-new-tokens N]
                                     [--order interleaved|sequential] [--quick] [--recipe R]
                                     [--api-teacher-latency S] [key=value ...]

Needs TRL (``pip install 'omniopd[bench]'``); exits with one line saying so when it is missing.

Both trainers run in one process on the same machine. ``--steps`` steps of each are run; the first
``--warmup`` of them are reported but left out of the medians. ``key=value`` overrides go to the recipe
(as in step_breakdown.py), and the TRL side takes its shapes from the resolved config.

(a) OmniOPD: ``omniopd.training.trainer.setup``/``train_step`` on the recipe, timed by the trainer itself
    (``time/step_s`` and the phases step_breakdown.py reports: rollout, entropy, teacher, phi,
    loss_backward, optimizer). The teacher is the recipe's (privileged by default).
(b) TRL: ``trl.DistillationTrainer`` (TRL >= 1.16), TRL's white-box on-policy distillation trainer:
    the student samples its own completions and is trained to match the teacher's next-token
    distribution on every completion token with a generalized JSD; ``beta=1.0`` is the reverse KL
    (on-policy distillation as in Agarwal et al. 2024 and in omniopd's ``method=opd``). The teacher is
    a frozen copy of the student. Step time runs from ``on_step_begin`` to ``on_step_end`` (a
    TrainerCallback): generation, loss, backward, clipping, optimizer and scheduler; not the data
    loader's fetch of the prompt rows, nor logging. Phases come from timing wrappers in a subclass:
    generation (``_generate_and_score_completions``: chat template, ``generate``, padding),
    student_forward and teacher_forward (the backbones), divergence (the rest of ``compute_loss``:
    both lm_head projections and the chunked JSD, forward only), backward (the rest of
    ``training_step``), optimizer (clipping, ``optimizer.step``, scheduler, ``zero_grad``) and other.

Matched between the two: the student (the packaged smollm2-135m-instruct unless the recipe says
otherwise), float32, completions per step (TRL's batch is prompts_per_step x samples_per_prompt
rows: OmniOPD's prompts in OmniOPD's order, each repeated samples_per_prompt times, unshuffled, so step
k of both sides answers the same prompts), max completion length, sampling (temperature, top_p, no
top-k), one micro-batch, AdamW with the recipe's learning rate, betas and weight decay, constant
learning rate, gradient clipping at max_grad_norm, no dropout, no gradient checkpointing (TRL turns
it on by default; OmniOPD does not use it), no logging, reporting or checkpoints.

Not the same work: per step OmniOPD also has the teacher generate N continuations of C tokens at up
to M chunks of every trajectory, and scores them with phi (the entropy is recorded while sampling; only
where the student's checkpoint adds its own logits processors does a no-grad student forward compute it); its loss forward runs the student with grad and the frozen reference without (the KL
anchor, full vocabulary). TRL's loss forward runs the student with grad and the teacher without (the
full-vocabulary divergence). TRL reads the teacher's logits; OmniOPD reads only the teacher's text.
Sampled lengths differ between the sides and between steps, so every step's generated tokens are
recorded, and ``ratio_median_without_generation`` compares the steps less their generation phase.

Decoding: OmniOPD decodes as ``rollout.compile`` says (``auto``: compiled static-cache decoding on CUDA, plain
on the CPU; ``decoding`` in the output names the mode, the compile seconds and where the entropy came from;
the compilation falls in the warm-up step), TRL with its own plain ``generate``.

``--api-teacher-latency S`` gives OmniOPD an API teacher instead of the recipe's: ``openai-completions`` on the
local fake provider (``benchmarks/pipeline.py``'s server in a child process), answering every request after S
seconds with filler text, up to 32 requests in flight, no response cache. Its targets mean nothing; its time is
what a remote teacher costs the step. With ``pipeline.mode=one_step`` (an override) the audit runs beside the
next step's sampling; ``teacher_wait`` per step is what it still held the step up, ``staleness`` the samples' age.

``--quick`` runs 2 steps per side (1 warm-up) at tiny shapes: a check that the script runs, not a measurement.

``--order interleaved`` (default) alternates the two step by step (TRL's step k, then OmniOPD's step
k, run from the TrainerCallback outside TRL's timed span), so that load from elsewhere on the machine
falls on both alike; ``--order sequential`` runs all OmniOPD steps first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_breakdown import PHASES, QUICK_OVERRIDES, ROOT, decoding_info, machine  # noqa: E402

TARGET_RATIO = 1.3
TARGET = f"omniopd <= {TARGET_RATIO}x TRL's step while using no teacher logits"
TRL_PHASES = ("generation", "student_forward", "teacher_forward", "divergence", "backward", "optimizer", "other")


def require_trl():
    try:
        import trl
    except ImportError:
        sys.exit("compare_trl.py: TRL is not installed: pip install 'omniopd[bench]'")
    if not hasattr(trl, "DistillationTrainer"):
        sys.exit(f"compare_trl.py: trl {trl.__version__} has no DistillationTrainer (needs trl>=1.16): pip install 'omniopd[bench]'")
    return trl


def _sync() -> None:
    """Wait for queued CUDA work, so that a phase's seconds are its own."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Clock:
    """Seconds per named phase of the current TRL step; one row per finished step (CUDA synchronised at each mark)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.cur: dict | None = None
        self.t_begin = 0.0

    @contextlib.contextmanager
    def time(self, key: str):
        _sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            if self.cur is not None:
                self.cur[key] += time.perf_counter() - t0

    def begin(self) -> None:
        self.cur = defaultdict(float)
        self.cur["ids"] = []
        self.cur["lengths"] = []
        _sync()
        self.t_begin = time.perf_counter()

    def end(self) -> dict:
        _sync()
        step_s = time.perf_counter() - self.t_begin
        c = self.cur
        row = {
            "generation": c["generation"],
            "student_forward": c["student_forward"],
            "teacher_forward": c["teacher_forward"],
            "divergence": c["compute_loss"] - c["student_forward"] - c["teacher_forward"],
            "backward": c["training_step"] - c["prepare_inputs"] - c["compute_loss"],
            "optimizer": step_s - c["training_step_end"],
        }
        row["other"] = step_s - sum(row.values())
        lengths = c["lengths"]
        row |= {
            "step_s": step_s,
            "mean_length": sum(lengths) / max(len(lengths), 1),
            "generated_tokens": sum(lengths),
            "prompt_ids": c["ids"],
        }
        self.rows.append(row)
        self.cur = None
        return row


def timed_trainer(base, clock: Clock):
    """``base`` (TRL's DistillationTrainer) with timing wrappers; the computation is base's, unchanged."""

    class TimedDistillationTrainer(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            with clock.time("training_step"):
                out = super().training_step(model, inputs, num_items_in_batch)
            if clock.cur is not None:
                clock.cur["training_step_end"] = time.perf_counter() - clock.t_begin
            return out

        def _prepare_inputs(self, generation_batch):
            with clock.time("prepare_inputs"):
                return super()._prepare_inputs(generation_batch)

        def _generate_and_score_completions(self, inputs):
            if clock.cur is not None:
                clock.cur["ids"] += [x.get("id") for x in inputs]
            with clock.time("generation"):
                return super()._generate_and_score_completions(inputs)

        def _generate(self, prompts):
            out = super()._generate(prompts)
            if clock.cur is not None:
                clock.cur["lengths"] += [len(ids) for ids in out[1]]
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with clock.time("compute_loss"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _get_last_hidden_state(self, unwrapped_model, *args, **kwargs):
            student = unwrapped_model is self.accelerator.unwrap_model(self.model)
            with clock.time("student_forward" if student else "teacher_forward"):
                return super()._get_last_hidden_state(unwrapped_model, *args, **kwargs)

    return TimedDistillationTrainer


def prompt_order(cfg, examples, steps: int) -> list[list]:
    """The prompts of OmniOPD's first ``steps`` steps: the trainer's own seeded stream, replayed."""
    from omniopd.data import PromptStream

    stream = PromptStream.from_config(cfg, examples)
    return [stream.next_batch() for _ in range(steps)]


def build_trl(trl, cfg, batches, out_dir: str, clock: Clock, after_step):
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from omniopd.engine.models import load_model
    from omniopd.engine.prompts import student_messages

    r, o = cfg.rollout, cfg.optim
    rows = [
        {"prompt": student_messages(ex.question), "id": ex.id}
        for batch in batches for ex in batch for _ in range(r.samples_per_prompt)
    ]
    model, tokenizer = load_model(cfg.student.name, cfg.student.dtype)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    import dataclasses

    # recent transformers call it activation_checkpointing (gradient_checkpointing is a deprecated alias)
    names = {f.name for f in dataclasses.fields(trl.DistillationConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = trl.DistillationConfig(
        output_dir=out_dir,
        **{checkpointing: False},
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        seed=cfg.seed,
        max_steps=len(batches),
        per_device_train_batch_size=o.prompts_per_step * r.samples_per_prompt,
        gradient_accumulation_steps=1,
        learning_rate=o.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        optim="adamw_torch",
        max_grad_norm=o.max_grad_norm,
        disable_dropout=True,
        max_completion_length=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=0,
        beta=1.0,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
    )

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.end()
            after_step()

    trainer = timed_trainer(trl.DistillationTrainer, clock)(
        model=model, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[StepClock()],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def medians(rows: list[dict], keys) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description="Seconds per training step: OmniOPD vs TRL's DistillationTrainer.")
    ap.add_argument("--output", required=True)
    ap.add_argument("--steps", type=int, default=5, help="steps run on each side, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each side left out of the medians")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override rollout.max_new_tokens on both sides")
    ap.add_argument("--order", choices=["interleaved", "sequential"], default="interleaved")
    ap.add_argument("--quick", action="store_true", help="2 steps per side at tiny shapes: checks that the script runs")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"))
    ap.add_argument("--api-teacher-latency", type=float, default=None, metavar="S",
                    help="OmniOPD's teacher: openai-completions on the local fake provider answering after S seconds "
                         "(add pipeline.mode=one_step to overlap it with sampling)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1
        args.overrides = [*QUICK_OVERRIDES, *args.overrides]
    if not 0 <= args.warmup < args.steps:
        ap.error(f"--warmup must be at least 0 and less than --steps, got --warmup {args.warmup} --steps {args.steps}")
    trl = require_trl()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = list(args.overrides)
    if args.max_new_tokens is not None:
        overrides.append(f"rollout.max_new_tokens={args.max_new_tokens}")
    with contextlib.ExitStack() as stack:
        if args.api_teacher_latency is not None:
            from pipeline import NO_KEY_ENV
            from teacher_io import ServerProcess  # the fake provider in a child process

            server = stack.enter_context(ServerProcess(args.api_teacher_latency))
            overrides = [
                "teacher.type=openai-completions", "teacher.model=fake-teacher", f"teacher.base_url={server.url}/v1",
                f"teacher.api_key_env={NO_KEY_ENV}", "teacher.cache=false", "teacher.max_concurrency=32",
                "teacher.adaptive_concurrency=false", *overrides,
            ]
        run_both(args, trl, overrides)


def run_both(args, trl, overrides: list[str]) -> None:
    import torch
    import transformers

    from omniopd.config import load_config
    from omniopd.data import load_examples
    from omniopd.training.trainer import setup, train_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.recipe, [*overrides, f"output_dir={tmp}/run", "eval.before=false", "eval.after=false"])
        batches = prompt_order(cfg, load_examples(cfg.data.train), args.steps)
        t0 = time.perf_counter()
        state = setup(cfg, overwrite=True)
        omniopd_setup_s = time.perf_counter() - t0
        omni_rows: list[dict] = []

        def omniopd_step() -> None:
            omni_rows.append(train_step(state))

        clock = Clock()
        t0 = time.perf_counter()
        trainer = build_trl(
            trl, cfg, batches, f"{tmp}/trl", clock, omniopd_step if args.order == "interleaved" else lambda: None
        )
        trl_setup_s = time.perf_counter() - t0
        if args.order == "sequential":
            for _ in range(args.steps):
                omniopd_step()
        trainer.train()
        state.pipeline.close()
        state.teacher.close()
    if len(omni_rows) != args.steps or len(clock.rows) != args.steps:
        sys.exit(f"compare_trl.py: ran {len(omni_rows)} OmniOPD and {len(clock.rows)} TRL steps, expected {args.steps} each")

    B = cfg.optim.prompts_per_step * cfg.rollout.samples_per_prompt
    omni_per_step = [
        {name: r.get(key, 0.0) for name, key in PHASES.items()}
        | {"step_s": r["time/step_s"], "mean_length": r["rollout/mean_length"], "generated_tokens": r["rollout/mean_length"] * B,
           "chunks": r["audit/chunks"], "compile_s": r.get("time/compile_s", 0.0),
           # pipelined (pipeline.mode=one_step): the teacher runs beside the next sampling; this is what it still held
           # the step up, and how stale the step's samples were
           "teacher_wait": r.get("time/teacher_wait_s"), "staleness": r.get("pipeline/staleness")}
        for r in omni_rows
    ]
    expected_ids = [[ex.id for ex in batch for _ in range(cfg.rollout.samples_per_prompt)] for batch in batches]
    same_prompts = [row.pop("prompt_ids") for row in clock.rows] == expected_ids
    m_omni, m_trl = omni_per_step[args.warmup:], clock.rows[args.warmup:]
    omni_step = statistics.median(r["step_s"] for r in m_omni)
    trl_step = statistics.median(r["step_s"] for r in m_trl)
    omni_wo_gen = statistics.median(r["step_s"] - r["rollout"] for r in m_omni)
    trl_wo_gen = statistics.median(r["step_s"] - r["generation"] for r in m_trl)
    ratio = omni_step / trl_step
    result = {
        "target": TARGET,
        "target_met": ratio <= TARGET_RATIO,
        "ratio_median": ratio,
        "ratio_median_without_generation": omni_wo_gen / trl_wo_gen,
        "omniopd_step_s_median": omni_step,
        "trl_step_s_median": trl_step,
        "steps": args.steps,
        "warmup": args.warmup,
        "quick": args.quick,
        "order": args.order,
        "same_prompts_per_step": same_prompts,
        "shapes": {
            "student": cfg.student.name,
            "dtype": cfg.student.dtype,
            "completions_per_step": B,
            "prompts_per_step": cfg.optim.prompts_per_step,
            "samples_per_prompt": cfg.rollout.samples_per_prompt,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "temperature": cfg.rollout.temperature,
            "top_p": cfg.rollout.top_p,
            "top_k": 0,
            "chunk_tokens_C": cfg.audit.chunk_tokens,
            "num_chunks_M": cfg.audit.num_chunks,
            "teacher_samples_N": cfg.audit.teacher_samples,
            "micro_batch_size": cfg.optim.micro_batch_size,
            "lr": cfg.optim.lr,
            "max_grad_norm": cfg.optim.max_grad_norm,
        },
        "omniopd": {
            "recipe": args.recipe,
            "overrides": overrides,
            "teacher": cfg.teacher.type,
            "api_teacher_latency_s": args.api_teacher_latency,
            "pipeline": cfg.pipeline.mode,
            "teacher_logits_used": False,
            "step_s_median": omni_step,
            "step_s_median_without_rollout": omni_wo_gen,
            "phases_s": medians(m_omni, PHASES),
            "per_step_s": [r["step_s"] for r in omni_per_step],
            "per_step": omni_per_step,
            "setup_s": omniopd_setup_s,
            "decoding": decoding_info(cfg, omni_rows),
        },
        "trl": {
            "version": trl.__version__,
            "trainer_class": "trl.DistillationTrainer",
            "why": "TRL's white-box on-policy distillation trainer, present in the installed TRL",
            "loss": "generalized JSD with beta=1.0 (reverse KL) on every completion token, full vocabulary",
            "teacher": "frozen copy of the student",
            "teacher_logits_used": True,
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
            "step_s_median": trl_step,
            "step_s_median_without_generation": trl_wo_gen,
            "phases_s": medians(m_trl, TRL_PHASES),
            "per_step_s": [r["step_s"] for r in clock.rows],
            "per_step": clock.rows,
            "setup_s": trl_setup_s,
        },
        "differences": [
            "omniopd per step: generation (recording the entropy), teacher generation of N continuations x C tokens"
            " at up to M chunks per trajectory, phi, student forward+backward with a no-grad frozen-reference forward (KL anchor), optimizer",
            "TRL per step: generation, student forward+backward with a no-grad teacher forward and a full-vocabulary divergence on every"
            " completion token, optimizer",
            "omniopd reads only the teacher's text; TRL reads the teacher's logits (same tokenizer required)",
            f"omniopd's teacher is the recipe's ({cfg.teacher.type}); TRL's is a frozen copy of the student",
            "generation is sampled on both sides, so completion lengths (per_step mean_length) differ between sides and steps",
        ],
        "machine": machine() | {"transformers": transformers.__version__, "trl": trl.__version__,
                                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("ratio_median", "ratio_median_without_generation", "omniopd_step_s_median",
                                             "trl_step_s_median", "target", "target_met")}, indent=2))


if __name__ == "__main__":
    main()
