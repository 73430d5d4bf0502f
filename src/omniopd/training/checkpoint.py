"""Checkpoints that survive a kill, and exact resume.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/step-NNNNNN/`` holding the model (safetensors),
the optimizer and scheduler states, every RNG state (Python, NumPy, torch CPU and CUDA), the prompt
stream's position, the step, the running totals and the resolved config; a pipelined run's
(``pipeline.mode: one_step``) also holds the batch it sampled ahead for the next step (``pipeline.pt``,
``omniopd.training.pipeline``). It is written into a
``.tmp`` sibling and renamed into place only when complete (a rename within a directory is atomic on
POSIX), so a kill during the write leaves the previous checkpoint intact and the half-written one is
ignored and cleaned up next time. ``keep_last`` bounds how many are kept.

A sharded run (``distributed.strategy: fsdp2``, ``omniopd.training.sharding``) writes the weights and the AdamW
state with ``torch.distributed.checkpoint`` instead: ``sharded/`` holds one file per process and the
metadata that places each shard in the whole tensor, so every process writes only what it holds. Every
process also keeps its own RNG states (``rng-rankR.pt``). Resuming with the same number of processes is
exact; with another number, DCP re-shards the weights and optimizer state on load (each process reads
the slices it now holds), and the random streams start anew from the seed and the step, as after any
multi-process resume of a DDP run.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from omniopd.errors import OmniOPDError

_STEP_DIR = "step-{:06d}"
SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint directory of a sharded run's checkpoint
# config fields that may change between a run and its resumption (rollout.compile: how the same tokens are decoded)
RESUMABLE_CHANGES = {"max_steps", "eval", "checkpoint", "resume", "output_dir", "report_to", "rollout.compile"}
PIPELINE_FILE = "pipeline.pt"  # a pipelined run's pre-sampled next batch (tensors and plain lists)


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")]
    return sorted(done, key=lambda p: p.name)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer,
    scheduler,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int,
    pipeline_state: dict | None = None,
) -> Path:
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _STEP_DIR.format(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    if pipeline_state is not None:
        torch.save(pipeline_state, tmp / PIPELINE_FILE)
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the checkpoint exists only once it is complete
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_checkpoint(
    out_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer,
    scheduler,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int,
    rank: int,
    world: int,
    barrier,
    pipeline_state: dict | None = None,
) -> Path:
    """A sharded run's checkpoint, written by every process together (``barrier()`` waits for all of them);
    the main process (rank 0) writes what every rank holds alike and publishes the directory."""
    import torch.distributed.checkpoint as dcp

    from omniopd.training.sharding import train_state_dict

    root = checkpoint_root(out_dir)
    final = root / _STEP_DIR.format(step)
    tmp = root / (final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    dcp.save(train_state_dict(model, optimizer), checkpoint_id=tmp / SHARDED_DIR)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        tokenizer.save_pretrained(tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if pipeline_state is not None:
            torch.save(pipeline_state, tmp / PIPELINE_FILE)
        (tmp / "config.yaml").write_text(config_yaml)
        state = {"step": step, "world_size": world, **trainer_state}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    barrier()  # every shard and RNG file is on disk
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_sharded_into(ckpt: Path, *, model, optimizer, scheduler, rank: int, world: int) -> bool:
    """Restore a sharded checkpoint in place (re-sharded if it was written by another number of processes).
    Returns whether this rank's RNG states were restored too (only with the same number of processes)."""
    import torch.distributed.checkpoint as dcp

    from omniopd.training.sharding import set_train_state_dict, train_state_dict

    saved_world = int(load_trainer_state(ckpt).get("world_size", 0))
    try:
        if not (ckpt / SHARDED_DIR / ".metadata").is_file():
            raise FileNotFoundError(f"{SHARDED_DIR}/.metadata")
        state = train_state_dict(model, optimizer)
        dcp.load(state, checkpoint_id=ckpt / SHARDED_DIR)
        set_train_state_dict(model, optimizer, state)
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        if saved_world != world:
            return False
        set_rng_state(torch.load(ckpt / f"rng-rank{rank}.pt", weights_only=False))
        return True
    except Exception as err:  # noqa: BLE001 - any failure here means the checkpoint cannot be used
        raise OmniOPDError(f"checkpoint {ckpt} cannot be loaded ({type(err).__name__}: {str(err)[:200]})") from err


def load_trainer_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        int(state["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OmniOPDError(
            f"checkpoint {ckpt} is corrupt or incomplete (trainer_state.json: {type(err).__name__})"
        ) from None


def load_pipeline_state(ckpt: Path) -> dict | None:
    """The pre-sampled next batch a pipelined run saved with ``ckpt``, or None where there is none (an
    on-policy run, or a checkpoint of the last step)."""
    path = ckpt / PIPELINE_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the checkpoint cannot be used
        raise OmniOPDError(
            f"checkpoint {ckpt} cannot be loaded ({PIPELINE_FILE}: {type(err).__name__}: {str(err)[:200]})"
        ) from err


def load_into(ckpt: Path, *, model, optimizer, scheduler) -> None:
    """Restore model weights, optimizer, scheduler and RNG states from ``ckpt`` (in place)."""
    from safetensors.torch import load_file

    try:
        from omniopd.training.lora import is_lora, load_adapter_state

        if is_lora(model):  # a LoRA run's checkpoint holds the adapter (peft's save_pretrained)
            load_adapter_state(model, load_file(str(ckpt / "adapter_model.safetensors")))
        else:
            weights = load_file(str(ckpt / "model.safetensors"))
            missing, unexpected = model.load_state_dict(weights, strict=False)
            # tied weights (lm_head = embed_tokens) are saved once; anything else missing is corruption
            tied = {k for k in missing if k.endswith("lm_head.weight")}
            if set(missing) - tied or unexpected:
                raise ValueError(
                    f"weights do not match the model (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})"
                )
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
    except OmniOPDError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means the checkpoint cannot be used
        raise OmniOPDError(f"checkpoint {ckpt} cannot be loaded ({type(err).__name__}: {str(err)[:200]})") from err


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ, less :data:`RESUMABLE_CHANGES`."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        dotted = prefix + key
        if dotted in RESUMABLE_CHANGES:
            continue
        if saved.get(key) != current.get(key):
            if isinstance(saved.get(key), dict) and isinstance(current.get(key), dict):
                diffs += config_differences(saved[key], current[key], dotted + ".")
            else:
                diffs.append(dotted)
    return diffs
