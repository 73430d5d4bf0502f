"""The training loop. One step reads top to bottom, the same for every method:

    examples -> method.sample -> method.audit -> method.backward -> optimizer -> method.accumulate -> log -> eval/save

The first two are the step's pipeline (``omniopd.training.pipeline``, ``pipeline.mode``): by default the step samples
its prompts with the current weights and audits them, one after the other (the paper's on-policy setting);
with ``pipeline.mode: one_step`` (a departure) the audit runs in a worker thread while the next step's
prompts are sampled, so a step trains on rollouts sampled before the previous update (logged as
``pipeline/staleness``), and the batch sampled ahead is part of every checkpoint.

The method is ``METHODS[cfg.method]`` (``omniopd.methods``: the paper's OmniOPD and the baselines SFT,
OPD and GRPO, each a :class:`~omniopd.methods.Method` that fills every slot), and setup asks it which
teacher to build (``method.teacher_role``) and what to prepare; nothing here tests a method's name. The
reference model for the KL anchor is a frozen copy of the initial student, or with LoRA
(``lora.rank > 0``) the same network with its adapter disabled (``omniopd.training.lora``); a local teacher on
the same base model shares it.

Distribution: the loop runs on ``accelerate``. Under ``accelerate launch`` with several processes
(DDP; ``recipes/accelerate/ddp.yaml``) each rank samples, audits and back-propagates its equal share of
the step's prompts, the training forward goes through the DDP wrapper so gradients are averaged, the
per-rank metrics and audit records are combined on the main process (``omniopd.training.distributed``), and
evaluation, checkpoints and the final model are written once, by the main process. With
``distributed.strategy: fsdp2`` the student is sharded instead (``omniopd.training.sharding``: PyTorch FSDP2 per
decoder layer and at the root, under ``torchrun`` or ``accelerate launch``). What differs between the two is
the run's strategy object (``omniopd.training.strategy``: how the student, its reference and the optimizer are
prepared, how a checkpoint is written and read, how the whole model is had for ``final/`` and evaluation), so
the loop has no layout branches. accelerate's own FSDP plugin and DeepSpeed are refused with a clear message.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from omniopd.config import RunConfig, dump_config
from omniopd.core.losses import get_loss
from omniopd.data import Example, PromptStream, load_train_examples
from omniopd.engine.alignment import SequenceBatch
from omniopd.engine.models import load_model
from omniopd.errors import ConfigError, OmniOPDError, TeacherError
from omniopd.methods import METHODS, Method, NoTeacher, TrainState
from omniopd.methods.base import Signal, micro_batches
from omniopd.teachers import build_teacher
from omniopd.training.pipeline import check as check_pipeline
from omniopd.training.pipeline import make_pipeline
from omniopd.training.resume import checkpoint, find_resume_checkpoint, restore, save_final, save_model
from omniopd.training.strategy import strategy_for

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# setup


def setup(cfg: RunConfig, overwrite: bool = False) -> TrainState:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out_dir = Path(cfg.output_dir)
    resume_from = find_resume_checkpoint(cfg)
    if resume_from is None and (out_dir / "metrics.jsonl").exists() and not overwrite:
        raise OmniOPDError(
            f"{out_dir} already holds a run (metrics.jsonl); resume it with --resume {out_dir}, choose another output_dir, or pass --overwrite"
        )
    accelerator = Accelerator(
        cpu=not _has_accelerator_device()
    )  # without one, launched processes join as MULTI_CPU (gloo)
    check_distributed(cfg, accelerator)
    check_pipeline(cfg, METHODS[cfg.method], accelerator.num_processes)
    set_seed(cfg.seed, device_specific=True)  # rank r samples with seed + r (rank 0: the one-process stream)
    train_examples = load_train_examples(cfg.data.train, allow_eval_overlap=cfg.data.allow_eval_overlap)
    model, tokenizer = load_model(cfg.student.name, cfg.student.dtype)
    method = METHODS[cfg.method]
    teacher_role = method.teacher_role(cfg)  # "text", "solutions", "logits", or None: no teacher is built
    strategy = strategy_for(cfg, accelerator)

    def make_teacher(ref_model):  # offered the frozen initial student, which a same-model local teacher shares
        return build_teacher(cfg, student=ref_model, student_tokenizer=tokenizer) if teacher_role else NoTeacher()

    model, ref_model, teacher, optimizer, scheduler = strategy.prepare(
        model, make_teacher, lambda student: build_optimizer(cfg, student)
    )
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
    stream = PromptStream.from_config(cfg, train_examples)
    from omniopd.training.loggers import MetricLoggers

    loggers = MetricLoggers(out_dir, cfg.report_to, cfg.model_dump(mode="json"), out_dir.name) if main else None
    state = TrainState(
        cfg,
        accelerator,
        model,
        ref_model,
        tokenizer,
        teacher,
        optimizer,
        scheduler,
        stream,
        out_dir,
        strategy,
        loggers,
        pipeline=make_pipeline(cfg, tokenizer),
    )
    if resume_from is None:
        if main:
            for name in ("metrics.jsonl", "audits.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
            if teacher_role == "text":
                preflight(state, train_examples)
    else:
        restore(state, resume_from)
    accelerator.wait_for_everyone()
    method.prepare(state)
    return state


def build_optimizer(cfg: RunConfig, model) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters (no weight decay on vectors), with linear warm-up."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
    )
    warm = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return optimizer, scheduler


def _has_accelerator_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def check_distributed(cfg: RunConfig, accelerator) -> None:
    from accelerate.utils import DistributedType

    world = accelerator.num_processes
    if world == 1:
        return
    if accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ConfigError(
            f"accelerate {accelerator.distributed_type.value} is not supported: launch plain processes "
            "(torchrun, or recipes/accelerate/ddp.yaml) and shard the student with distributed.strategy=fsdp2 "
            "(PyTorch FSDP2); DeepSpeed ZeRO-3 and accelerate's FSDP plugin are not supported"
        )
    if cfg.distributed.strategy == "fsdp2" and cfg.eval.every_steps:
        raise ConfigError(
            "eval.every_steps: evaluation during training is not available with distributed.strategy=fsdp2 "
            "(the student is whole on no process); set eval.every_steps=0 and evaluate OUTPUT_DIR/final"
        )
    if cfg.optim.prompts_per_step % world:
        raise ConfigError(
            f"optim.prompts_per_step: {cfg.optim.prompts_per_step} prompts cannot be split evenly over {world} "
            f"processes; use a multiple of {world}"
        )


def preflight(state: TrainState, examples: list[Example]) -> None:
    """Two prefixes through the teacher before any training: warnings are printed and kept in the run dir."""
    from omniopd.diagnostics.preflight import check_teacher

    report = check_teacher(state.cfg, state.teacher, state.tokenizer, examples, num_prefixes=2)
    (state.out_dir / "preflight.json").write_text(json.dumps(report, indent=2))
    for w in report["warnings"]:
        tqdm.write(f"omniopd: teacher check: {w}")


# --------------------------------------------------------------------------------------------------
# phases of one step


def optimizer_phase(state: TrainState) -> dict[str, float]:
    grad_norm = state.accelerator.clip_grad_norm_(state.model.parameters(), state.cfg.optim.max_grad_norm)
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return {"optim/grad_norm": float(grad_norm), "optim/lr": float(lr)}


def log_phase(state: TrainState, metrics: dict[str, float], records: list[dict]) -> None:
    if not state.accelerator.is_main_process:
        return
    assert state.loggers is not None  # setup gives the main process its loggers
    state.loggers.log(state.step, metrics)
    if records:
        with (state.out_dir / "audits.jsonl").open("a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")


def gather_step(
    state: TrainState, metrics: dict[str, float], records: list[dict]
) -> tuple[dict[str, float], list[dict]]:
    """One process: as is. Several: every rank's metrics combined and every rank's audit records, in rank order."""
    acc = state.accelerator
    if acc.num_processes == 1:
        return metrics, records
    from accelerate.utils import gather_object

    from omniopd.training.distributed import combine_metrics

    per_rank = gather_object([{"metrics": metrics, "records": records, "rank": acc.process_index}])
    per_rank.sort(key=lambda r: r["rank"])
    for r in per_rank:
        for rec in r["records"]:
            rec.setdefault("rank", r["rank"])
    return combine_metrics([r["metrics"] for r in per_rank]), [rec for r in per_rank for rec in r["records"]]


def synchronize(device) -> None:
    """Wait for the device's queued work, so that a phase's seconds are its own (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backward_phase(state: TrainState, method: Method, batch: SequenceBatch, signal: Signal) -> dict[str, float]:
    """The one backward pass of every method: per micro-batch, the method's per-token signals, its registered
    loss over the step's number of sequences (a constant normaliser), and the backward; the losses' sums over
    micro-batches become the logged metrics, with the method's own (``LossInputs.extra``)."""
    skipped = method.skip_update(state, signal)
    if skipped is not None:
        return skipped
    name, options = method.loss(state.cfg)
    loss = get_loss(name)
    normalizer = float(batch.response_ids.shape[0])
    sums: dict[str, float] = {}
    extra: dict[str, float] = {}
    for idx, sub in micro_batches(state, batch):
        inputs = method.loss_inputs(state, idx, sub, signal)
        out = loss(inputs, normalizer, **options)
        state.accelerator.backward(out.loss)
        for totals, values in ((sums, out.sums), (extra, inputs.extra)):
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v
    return {**loss.finish(sums, normalizer, **options), **extra}


def train_step(state: TrainState) -> dict[str, float]:
    t_step = time.perf_counter()
    method = METHODS[state.cfg.method]
    acc = state.accelerator
    # this step's prompts (this rank's share) and the student's samples of them, then their audit; pipelined
    # (pipeline.mode: one_step), sampled during the previous step, and audited while the next batch is sampled
    sampled = state.pipeline.next_batch(state, method)
    rollouts = sampled.rollouts
    signal = state.pipeline.audit(state, method, sampled)
    t0 = time.perf_counter()
    loss_metrics = backward_phase(state, method, rollouts.batch, signal)
    synchronize(acc.device)
    t_loss = time.perf_counter() - t0
    t0 = time.perf_counter()
    optim_metrics = optimizer_phase(state)
    synchronize(acc.device)
    t_optim = time.perf_counter() - t0
    state.step += 1
    lengths = rollouts.lengths
    # cumulative backend counters (HTTP requests, retries, cache hits, cost) under teacher/total_*; the API
    # teacher's current limit on requests in flight as it is (teacher/concurrency)
    backend = {
        (k if k == "teacher/concurrency" else k.replace("teacher/", "teacher/total_", 1)): v
        for k, v in state.teacher.metrics().items()
    }
    metrics = {
        **loss_metrics,
        **signal.metrics,
        **rollouts.metrics,  # the sampling's own (time/compile_s; where the entropy came from), every method's
        **optim_metrics,
        **backend,
        **(
            {  # the student's own samples; an off-policy method (SFT) logs its own metrics about its targets instead
                "rollout/mean_length": sum(lengths) / len(lengths),
                "rollout/max_length": float(max(lengths)),
                "rollout/truncated_frac": rollouts.truncated_frac,
                "rollout/trajectories": float(len(lengths)),
            }
            if method.on_policy
            else {}
        ),
        **sampled.metrics,  # time/rollout_s; pipelined: pipeline/staleness and the teacher's overlap
        "time/loss_backward_s": t_loss,
        "time/optimizer_s": t_optim,
        "time/step_s": time.perf_counter() - t_step,
    }
    metrics, records = gather_step(state, metrics, signal.records)
    for key in ("teacher/tokens", "teacher/requests"):  # every method's teacher work
        state.totals[key] = state.totals.get(key, 0.0) + metrics.get(key, 0.0)
    method.accumulate(state.totals, metrics)  # and what this method adds (OmniOPD: its chunks and k_sem)
    metrics["teacher/tokens_total"] = state.totals.get("teacher/tokens", 0.0)
    for k, v in metrics.items():
        if isinstance(v, float) and not torch.isfinite(torch.tensor(v)):
            raise RuntimeError(f"step {state.step}: metric {k} is {v}; stopping before the model is damaged further")
    metrics.update(eval_phase(state))
    log_phase(state, metrics, records)
    return metrics


# --------------------------------------------------------------------------------------------------
# the run


def run_eval(state: TrainState, tag: str, benchmark: str | None = None, progress: bool = True) -> dict:
    from omniopd.evaluation.runner import evaluate_model

    e = state.cfg.eval
    benchmark = benchmark or e.data
    model = state.strategy.eval_model(state)
    summary = evaluate_model(
        model,
        state.tokenizer,
        benchmark,
        limit=e.limit,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        records_path=state.out_dir / f"eval_{tag}_predictions.jsonl",
        show_progress=progress,
        insecure_no_isolation=e.insecure_no_isolation,
        engine=e.engine,
        gguf_template=state.cfg.student.gguf_template,
        gguf_dtype=e.gguf_dtype,
    )
    summary["data"] = benchmark
    (state.out_dir / f"eval_{tag}.json").write_text(json.dumps(summary, indent=2))
    return summary


def eval_phase(state: TrainState) -> dict[str, float]:
    """Evaluation during training (``eval.every_steps``), and the best checkpoint by ``eval.best_metric``."""
    e = state.cfg.eval
    if not e.every_steps or state.step % e.every_steps:
        return {}
    if not state.accelerator.is_main_process:  # evaluated once, by the main process
        state.accelerator.wait_for_everyone()
        return {}
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    for bench in e.benchmarks or [e.data]:
        s = run_eval(state, f"step{state.step:06d}_{bench.replace('/', '_')}", bench, progress=False)
        metrics[f"eval/{bench}/accuracy"] = s["accuracy"]
        metrics[f"eval/{bench}/ci95_low"], metrics[f"eval/{bench}/ci95_high"] = s["ci95"]
        metrics[f"eval/{bench}/truncated_frac"] = s["truncated_frac"]
    if e.best_metric:
        if e.best_metric not in metrics:
            raise ConfigError(
                f"eval.best_metric: {e.best_metric!r} is not among the evaluation metrics {sorted(metrics)}"
            )
        value = metrics[e.best_metric]
        if value > state.totals.get("best_value", float("-inf")):
            state.totals["best_value"], state.totals["best_step"] = value, float(state.step)
            save_model(state, state.out_dir / "best")
    metrics["time/eval_s"] = time.perf_counter() - t0
    state.accelerator.wait_for_everyone()
    return metrics


def train(cfg: RunConfig, overwrite: bool = False, progress: bool = True) -> dict:
    t_run = time.perf_counter()
    state = setup(cfg, overwrite=overwrite)
    main = state.accelerator.is_main_process
    progress = progress and main
    before_path = state.out_dir / "eval_before.json"
    before = None
    if main and cfg.eval.before and not (state.step > 0 and before_path.exists()):
        before = run_eval(state, "before", progress=progress)
    elif main and before_path.exists():
        before = json.loads(before_path.read_text())
    state.accelerator.wait_for_everyone()
    keys = ("loss/total", "audit/k_sem_mean", "audit/target_mean", "loss/kl_anchor", "rollout/mean_length")
    last: dict[str, float] = {}
    every = cfg.checkpoint.every_steps
    try:  # the pipeline's audit thread ends however the loop does
        with tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step", disable=not progress) as bar:
            while state.step < cfg.max_steps:
                try:
                    last = train_step(state)
                except TeacherError as err:
                    # budget reached or too many failed chunks: keep what was learnt so far, then stop (a sharded
                    # student is gathered by every process together, which this one process cannot do alone)
                    state.pipeline.close()
                    if state.strategy.sharded:
                        state.teacher.close()
                        raise TeacherError(
                            f"{err} (stopped after {state.step} steps; a sharded model is kept only in its "
                            f"checkpoints, {state.out_dir / 'checkpoints'})"
                        ) from None
                    path = save_final(state) if main else state.out_dir / "final"
                    state.teacher.close()
                    raise TeacherError(
                        f"{err} (stopped after {state.step} steps; model so far saved to {path})"
                    ) from None
                if every and state.step % every == 0 and state.step < cfg.max_steps:
                    checkpoint(state)
                bar.set_postfix({k.split("/")[-1]: f"{last[k]:.3g}" for k in keys if k in last})
                bar.update(1)
    finally:
        state.pipeline.close()
    state.teacher.close()
    if state.loggers is not None:
        state.loggers.close()
    # decided from what every rank knows, not from the checkpoint folder, which the main process may be
    # writing while another rank looks (the ranks would then disagree about this collective call)
    if state.last_checkpoint != state.step:
        checkpoint(state)
    final = save_final(state)  # written by the main process (a sharded student is gathered by all of them)
    if not main:  # the final model, its evaluation and the summary are the main process's
        state.accelerator.wait_for_everyone()
        return {}
    after = run_eval(state, "after", progress=progress) if cfg.eval.after else None
    summary = {
        "output_dir": str(state.out_dir),
        "final_model": str(final),
        "steps": state.step,
        "processes": state.accelerator.num_processes,
        "teacher": state.teacher.name,
        "eval_data": cfg.eval.data,
        "accuracy_before": before and {"accuracy": before["accuracy"], "ci95": before["ci95"], "n": before["n"]},
        "accuracy_after": after and {"accuracy": after["accuracy"], "ci95": after["ci95"], "n": after["n"]},
        "k_sem_mean": state.totals["k_sem_sum"] / state.totals["chunks"] if state.totals.get("chunks") else None,
        "teacher_samples": cfg.audit.teacher_samples,
        "teacher_tokens": state.totals.get("teacher/tokens", 0.0),
        "teacher_requests": state.totals.get("teacher/requests", 0.0),
        "teacher_cost_usd": state.teacher.metrics().get("teacher/cost_usd", 0.0),
        "wall_time_s": time.perf_counter() - t_run,
    }
    (state.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    state.accelerator.wait_for_everyone()
    return summary


def format_summary(s: dict) -> str:
    def acc(a):
        if not a:
            return "not evaluated"
        return f"{100 * a['accuracy']:.1f}% (95% CI {100 * a['ci95'][0]:.1f}-{100 * a['ci95'][1]:.1f}, n={a['n']})"

    ksem = "n/a" if s["k_sem_mean"] is None else f"{s['k_sem_mean']:.3f} of N={s['teacher_samples']}"
    return "\n".join(
        [
            "== omniopd summary ==",
            f"run dir           {s['output_dir']}",
            f"steps             {s['steps']}   teacher {s['teacher']}",
            f"accuracy before   {acc(s['accuracy_before'])}   [{s['eval_data']}]",
            f"accuracy after    {acc(s['accuracy_after'])}",
            f"k_sem mean        {ksem}",
            f"teacher tokens    {int(s['teacher_tokens'])} in {int(s['teacher_requests'])} requests",
            f"wall time         {s['wall_time_s'] / 60:.1f} min",
            f"final model       {s['final_model']}",
        ]
    )
