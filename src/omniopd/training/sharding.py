"""Sharded training with PyTorch FSDP2 (``distributed.strategy: fsdp2``).

With P processes (``torchrun --nproc_per_node P`` or ``accelerate launch``), :func:`shard` applies
``torch.distributed.fsdp.fully_shard`` to every decoder layer and then to the whole causal LM (the
root, which holds the embeddings, the final norm and the output head) over a one-dimensional mesh of all
processes: gloo on CPU, nccl on CUDA. Each process keeps 1/P of every parameter, of its gradient and
of the AdamW moments; a layer's full weights exist only while it runs (gathered before, freed after),
and gradients are reduce-scattered, averaged over the ranks, as the backward pass leaves each layer.
The data split is the one DDP uses (``omniopd.training.distributed``): rank r trains on its 1/P of the step's
prompts, so the step's gradient is the one-process gradient of the whole batch.

Everything that reads the student's weights runs inside a forward of the sharded root, where FSDP's
hooks have gathered them:

- the token statistics of training and audit (``engine.forward.response_token_stats``, :func:`in_forward`): the
  decoder, then the output head ``slice_size`` positions at a time (``core.token_stats``: no (B, T, V)
  tensor), run as a registered forward method of the root (``register_fsdp_forward_method``), so the
  root's gathered embedding/head and its gradient reduction are FSDP's own;
- sampling: ``generate`` calls the root's forward at each decoding step, and ``synced_gpus`` (switched
  on by ``_is_fsdp_managed_module``) keeps every rank stepping until all ranks' sequences are done.

The KL reference is the LoRA student with its adapter disabled (inside the same forward), or a frozen
copy sharded the same way (:class:`ShardedReference`: its decoder and head run inside forwards of its
own root; the gathered root is freed when the student's statistics are done). A local teacher on the
student's own base model cannot be sharded: each rank asks it for its own chunks, a different number of
``generate`` calls per rank, while a sharded model must be called by all ranks together. It therefore
keeps a whole frozen copy on every rank, and the KL reference shares that copy, as under DDP.

The checkpoints of a sharded run (``omniopd.training.checkpoint``) are written with ``torch.distributed.checkpoint``
from :func:`train_state_dict`; ``final/`` is the whole model gathered on the main process
(:func:`gathered_state_dict`, :func:`whole_model`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from omniopd.errors import ConfigError

_IN_FORWARD = "omniopd_in_forward"  # the registered forward method of a sharded root


def causal_lm(model):
    """The transformers model inside ``model`` (a peft LoRA model's base model), where the root is sharded."""
    from omniopd.training.lora import is_lora

    return model.get_base_model() if is_lora(model) else model


def decoder_layers(model) -> list[torch.nn.Module]:
    layers = getattr(causal_lm(model).get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"distributed.strategy=fsdp2: {type(causal_lm(model)).__name__} has no list of decoder layers "
            "(model.layers) to shard; use distributed.strategy=ddp"
        )
    return list(layers)


def _run(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def shard(model, mesh):
    """``model`` sharded in place: each decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    root = causal_lm(model)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    root._is_fsdp_managed_module = True  # transformers' generate keeps the ranks in step (synced_gpus)
    setattr(root, _IN_FORWARD, _run)
    register_fsdp_forward_method(root, _IN_FORWARD)
    return model


def sharded_root(model):
    """The FSDP root of ``model``, or None when it is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, ShardedReference):
        return model.root
    root = causal_lm(model)
    return root if isinstance(root, FSDPModule) else None


def is_sharded(model) -> bool:
    return sharded_root(model) is not None


def in_forward(model, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` inside a forward of ``model``'s sharded root (plainly when it is not sharded).

    ``fn`` should return tensors, or tuples/lists/dicts of them, so that FSDP sees the outputs it hooks
    for the backward pass. Frozen sharded references attached to the root are freed afterwards."""
    root = sharded_root(model)
    if root is None:
        return fn(*args, **kwargs)
    try:
        return getattr(root, _IN_FORWARD)(fn, *args, **kwargs)
    finally:
        for ref in getattr(root, "_omniopd_references", ()):
            ref.release()


class _InForward:
    """A part of a sharded reference (its decoder, its head) called inside a forward of its root."""

    def __init__(self, root, fn):
        self._root, self._fn = root, fn

    def __call__(self, *args, **kwargs):
        return getattr(self._root, _IN_FORWARD)(self._fn, *args, **kwargs)

    def __getattr__(self, name):  # e.g. the head's weight (a DTensor of the full shape)
        return getattr(self._fn, name)


class ShardedReference:
    """A frozen copy of the student sharded like it: the KL reference when it is not the LoRA base network.

    ``get_decoder()`` / ``get_output_embeddings()`` hand out callables that run inside forwards of the
    copy's own root; the root stays gathered between them (the head is applied slice after slice) until
    :meth:`release`, which :func:`in_forward` calls when the student's statistics are done. Attribute
    reads (``config``) go to the model."""

    def __init__(self, root):
        self.root = root

    def get_decoder(self):
        return _InForward(self.root, self.root.get_decoder())

    def get_output_embeddings(self):
        return _InForward(self.root, self.root.get_output_embeddings())

    def __call__(self, *args, **kwargs):
        return self.root(*args, **kwargs)

    def parameters(self):
        return self.root.parameters()

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    def release(self) -> None:
        self.root.reshard()

    def __getattr__(self, name):
        return getattr(self.root, name)


def frozen_copy(model):
    """A frozen (eval, no gradients) deep copy of ``model``."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def prepare_sharded(cfg, model, device, build_teacher: Callable[[Any], Any]):
    """(sharded student, KL reference, teacher) for ``cfg`` on all processes of the run.

    ``build_teacher(whole)`` builds the run's teacher, offered ``whole``, a frozen copy of the initial
    student, to share; a local teacher on the student's own base model takes it (see the module docstring)
    and the KL reference then shares it too. Otherwise the reference is the LoRA base network or a frozen
    sharded copy."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from omniopd.training.lora import AdapterDisabled, apply_lora

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model.to(device)
    whole = frozen_copy(model)
    teacher = build_teacher(whole)
    teacher_shares = getattr(teacher, "model", None) is whole
    if cfg.lora.rank:
        model = shard(apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules), mesh)
        return model, AdapterDisabled(model), teacher
    if teacher_shares:
        return shard(model, mesh), whole, teacher
    ref = ShardedReference(shard(whole, mesh))
    model = shard(model, mesh)
    causal_lm(model)._omniopd_references = [ref]
    return model, ref, teacher


# ----------------------------------------------------------------------------------------- state dicts


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def train_state_dict(model, optimizer) -> dict:
    """{"model": trainable weights, "optimizer": AdamW state}, keyed by parameter names, each tensor this
    rank's shard (a DTensor): what ``torch.distributed.checkpoint`` saves and loads in place, re-sharding
    when the number of processes changed. Frozen weights (LoRA's base network) are left out."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    return {"model": model_sd, "optimizer": optim_sd}


def set_train_state_dict(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=_options()
    )


def gathered_state_dict(model) -> dict:
    """The whole state dict (every weight, full size, on the CPU) on the main process, {} on the others.
    Every process must call it (it gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_model(cfg, state_dict: dict):
    """A plain (unsharded) copy of the student holding ``state_dict``: the model loaded afresh (with LoRA,
    wrapped the same way) and the gathered weights copied in, every key accounted for."""
    from omniopd.engine.models import load_model

    model, _ = load_model(cfg.student.name, cfg.student.dtype)
    if cfg.lora.rank:
        from omniopd.training.lora import apply_lora

        model = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"gathered weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()
