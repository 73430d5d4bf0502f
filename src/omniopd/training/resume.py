"""A run's state on disk, at the level of the training loop: the checkpoint to resume from (refused when written
with another config), restoring exactly (weights, optimizer, scheduler, random streams, prompt position, logs
cut back to the checkpoint's step), writing a checkpoint (one process, or every process its shards under FSDP2),
and the final model (gathered whole from a sharded run; a LoRA run's merged weights beside its adapter).
The file formats are ``training.checkpoint``'s."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from omniopd.config import RunConfig
from omniopd.errors import OmniOPDError
from omniopd.methods import TrainState
from omniopd.training.checkpoint import config_differences, list_checkpoints, load_pipeline_state, load_trainer_state


def find_resume_checkpoint(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from: the newest one when ``resume`` is true or "auto" and one exists."""
    if not cfg.resume:
        return None
    ckpts = list_checkpoints(Path(cfg.output_dir))
    if not ckpts:
        if cfg.resume is True:
            raise OmniOPDError(f"nothing to resume: no checkpoint in {Path(cfg.output_dir) / 'checkpoints'}")
        return None
    saved = load_trainer_state(ckpts[-1])
    import yaml

    try:
        saved_cfg = yaml.safe_load((ckpts[-1] / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        raise OmniOPDError(f"checkpoint {ckpts[-1]} is corrupt (config.yaml unreadable)") from None
    from omniopd.config import normalized

    diffs = config_differences(normalized(saved_cfg), cfg.model_dump(mode="json"))
    if diffs:
        raise OmniOPDError(
            f"checkpoint {ckpts[-1]} was written with a different config ({', '.join(diffs[:5])}); resume with the same recipe"
        )
    if saved["step"] > cfg.max_steps:
        raise OmniOPDError(f"checkpoint is at step {saved['step']}, past max_steps={cfg.max_steps}")
    return ckpts[-1]


def restore(state: TrainState, ckpt: Path) -> None:
    """Continue exactly where ``ckpt`` left off: weights, optimizer, scheduler, RNG, data position, logs."""
    saved = load_trainer_state(ckpt)
    own_rng = state.strategy.load_checkpoint(state, ckpt, saved)  # whether every rank got its random streams back
    state.step = int(saved["step"])
    state.last_checkpoint = state.step
    state.stream.load_state_dict(saved["stream"])
    state.pipeline.load_state_dict(load_pipeline_state(ckpt), state)  # a pipelined run's batch sampled ahead
    state.totals = {k: float(v) for k, v in saved.get("totals", {}).items()}
    if not own_rng:
        # the checkpoint holds the main rank's RNG (DDP) or another world size's (FSDP2): new streams from the
        # seed and the step, so no resumed step replays the first step's draws
        from accelerate.utils import set_seed

        set_seed(state.cfg.seed + 1_000 * state.step, device_specific=True)
    if not state.accelerator.is_main_process:
        return
    # logs written after the checkpoint (by the killed process) are dropped: those steps run again
    for name in ("metrics.jsonl", "audits.jsonl"):
        path = state.out_dir / name
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= state.step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill ends the usable log
            path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
    tqdm.write(f"omniopd: resumed from {ckpt} (step {state.step})")


def checkpoint(state: TrainState) -> Path | None:
    """Written as the run's strategy writes it (the main process, or every process its shards under FSDP2); every
    rank waits until it is complete."""
    path = state.strategy.save_checkpoint(state)
    state.accelerator.wait_for_everyone()
    state.last_checkpoint = state.step
    return path


def save_model(state: TrainState, path: Path) -> Path:
    """``from_pretrained``-loadable copy of the current student, written aside and renamed into place.
    With LoRA: the merged model, and the adapter alone in ``adapter/``. A sharded student is gathered
    whole on the main process first (every process must call this then); it is kept for the evaluation
    after training. Only the main process writes."""

    from omniopd.training.lora import is_lora, merged_copy

    model = state.strategy.whole_model(state)  # every process calls it: a sharded student is gathered
    if model is None:  # not the main process
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_lora(model):
        merged_copy(model).save_pretrained(tmp, safe_serialization=True)
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    state.tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def save_final(state: TrainState) -> Path:
    return save_model(state, state.out_dir / "final")
