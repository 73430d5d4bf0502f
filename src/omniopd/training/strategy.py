"""How the student is laid out over a run's processes (``distributed.strategy``), one object per layout.

Every place where the layout matters asks the run's strategy, so the trainer has no layout branches:

- :meth:`Replicated.prepare`: the student, its KL reference and the teacher, placed for the layout;
- :meth:`Replicated.save_checkpoint` / :meth:`Replicated.load_checkpoint`: a resumable checkpoint written and read back;
- :meth:`Replicated.whole_model`: the student whole on the main process (``final/``, ``best/``), and
  :meth:`Replicated.eval_model`: the model the evaluation runs.

:class:`Replicated` (``ddp``, and every one-process run): each process holds a whole copy; accelerate's DDP wrapper
averages the gradients; the main process writes checkpoints. :class:`FSDP2` (``fsdp2``): with several processes the
student is sharded (``training.sharding``); its checkpoints are ``torch.distributed.checkpoint`` shards written by
every process, also with one process, so a run can be resumed by another number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from tqdm.auto import tqdm

from omniopd.config import RunConfig, dump_config
from omniopd.training.checkpoint import load_into, load_sharded_into, save_checkpoint, save_sharded_checkpoint
from omniopd.training.sharding import frozen_copy


class RunState(Protocol):
    """What a strategy reads of the run (``methods.TrainState``; not imported, as the methods import this)."""

    cfg: RunConfig
    out_dir: Path
    step: int
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    stream: Any
    totals: dict[str, float]
    pipeline: Any


class Replicated:
    """One process, or data parallel (DDP): a whole student on every process."""

    sharded = False  # whether the student is whole on no process

    def __init__(self, cfg: RunConfig, accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator

    def prepare(self, model, make_teacher: Callable[[Any], Any], optimizer_for: Callable[[Any], tuple]):
        """(student, KL reference, teacher, optimizer, scheduler). ``make_teacher(ref)`` builds the teacher, offered
        the frozen reference to share; ``optimizer_for(student)`` builds the optimizer and its scheduler."""
        lora = self.cfg.lora
        if lora.rank:
            from omniopd.training.lora import AdapterDisabled, apply_lora

            model = apply_lora(model, lora.rank, lora.alpha, lora.target_modules)
            ref_model = AdapterDisabled(model)  # the base network, no second copy
        else:
            ref_model = frozen_copy(model)
        teacher = make_teacher(ref_model)
        optimizer, scheduler = optimizer_for(model)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        ref_model.to(self.accelerator.device)
        return model, ref_model, teacher, optimizer, scheduler

    def save_checkpoint(self, state: RunState) -> Path | None:
        """Written once, by the main process (the others return None)."""
        if not self.accelerator.is_main_process:
            return None
        return save_checkpoint(state.out_dir, state.step, **self._checkpoint_contents(state))

    def _checkpoint_contents(self, state: RunState) -> dict[str, Any]:
        """What every checkpoint format holds: the student, its tokenizer, the optimizer and scheduler, the config,
        the prompt stream and run totals, and a pipelined run's batch sampled ahead."""
        return {
            "model": self.accelerator.unwrap_model(state.model),
            "tokenizer": state.tokenizer,
            "optimizer": state.optimizer,
            "scheduler": state.scheduler,
            "config_yaml": dump_config(state.cfg),
            "trainer_state": {"stream": state.stream.state_dict(), "totals": state.totals},
            "keep_last": state.cfg.checkpoint.keep_last,
            "pipeline_state": state.pipeline.state_dict(),
        }

    def load_checkpoint(self, state: RunState, ckpt: Path, saved: dict) -> bool:
        """Weights, optimizer and scheduler back in place; whether this process's random streams came back too
        (one process: yes; DDP: the checkpoint holds the main process's alone)."""
        acc = self.accelerator
        load_into(ckpt, model=acc.unwrap_model(state.model), optimizer=state.optimizer, scheduler=state.scheduler)
        return acc.num_processes == 1

    def whole_model(self, state: RunState):
        """The student whole, on the main process (None on the others). Every process must call it."""
        return self.accelerator.unwrap_model(state.model) if self.accelerator.is_main_process else None

    def eval_model(self, state: RunState):
        return self.accelerator.unwrap_model(state.model)


class FSDP2(Replicated):
    """PyTorch FSDP2 over every process (``training.sharding``); one process runs as :class:`Replicated` but keeps
    the sharded checkpoint format."""

    def __init__(self, cfg: RunConfig, accelerator) -> None:
        super().__init__(cfg, accelerator)
        self.sharded = accelerator.num_processes > 1
        self._whole = None  # the student gathered whole by whole_model(), on the main process

    def prepare(self, model, make_teacher: Callable[[Any], Any], optimizer_for: Callable[[Any], tuple]):
        if not self.sharded:
            return super().prepare(model, make_teacher, optimizer_for)
        from omniopd.training.sharding import prepare_sharded

        model, ref_model, teacher = prepare_sharded(self.cfg, model, self.accelerator.device, make_teacher)
        optimizer, scheduler = optimizer_for(model)  # placed and wrapped by FSDP2: no accelerate wrapper
        return model, ref_model, teacher, optimizer, scheduler

    def save_checkpoint(self, state: RunState) -> Path | None:
        """Written by every process together, each its own shards."""
        acc = self.accelerator
        return save_sharded_checkpoint(
            state.out_dir,
            state.step,
            **self._checkpoint_contents(state),
            rank=acc.process_index,
            world=acc.num_processes,
            barrier=acc.wait_for_everyone,
        )

    def load_checkpoint(self, state: RunState, ckpt: Path, saved: dict) -> bool:
        """Re-sharded when written by another number of processes (the random streams then start anew)."""
        acc = self.accelerator
        own_rng = load_sharded_into(
            ckpt,
            model=acc.unwrap_model(state.model),
            optimizer=state.optimizer,
            scheduler=state.scheduler,
            rank=acc.process_index,
            world=acc.num_processes,
        )
        if not own_rng and acc.is_main_process:
            tqdm.write(
                f"omniopd: {ckpt} was written by {saved.get('world_size')} processes, resumed by "
                f"{acc.num_processes}: weights and optimizer state re-sharded, random streams new"
            )
        return own_rng

    def whole_model(self, state: RunState):
        """Gathered from the shards by every process; kept for the evaluation after training."""
        if not self.sharded:
            return super().whole_model(state)
        from omniopd.training.sharding import gathered_state_dict, whole_model

        weights = gathered_state_dict(self.accelerator.unwrap_model(state.model))
        if not self.accelerator.is_main_process:
            return None
        self._whole = whole_model(self.cfg, weights)
        return self._whole

    def eval_model(self, state: RunState):
        """Whole on no process: the student as loaded (before training), or as last gathered (after)."""
        if not self.sharded:
            return super().eval_model(state)
        if self._whole is None:
            from omniopd.engine.models import load_model

            return load_model(self.cfg.student.name, self.cfg.student.dtype)[0].to(self.accelerator.device)
        return self._whole.to(self.accelerator.device)


STRATEGIES: dict[str, type[Replicated]] = {"ddp": Replicated, "fsdp2": FSDP2}


def strategy_for(cfg: RunConfig, accelerator) -> Replicated:
    return STRATEGIES[cfg.distributed.strategy](cfg, accelerator)
