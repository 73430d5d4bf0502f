"""LoRA through peft: the adapter is trained, the base network doubles as the KL reference.

``apply_lora`` wraps the student in a peft model. :class:`AdapterDisabled` is the reference: every call
into it (forward, ``generate``, the decoder and head handed out by ``get_decoder`` /
``get_output_embeddings``) runs inside ``disable_adapter()``, so it computes exactly the base model
with the same weights, without a second copy in memory. ``merged_copy`` gives a plain
``from_pretrained``-loadable model with the adapter folded in (for ``final/`` and ``best/``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

from omniopd.errors import ConfigError


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("lora.rank > 0 needs peft: pip install 'omniopd[lora]'") from None
    return peft


def apply_lora(model, rank: int, alpha: float, target_modules):
    """The student wrapped in a peft LoRA model; only the adapter's parameters require grad."""
    peft = _peft()
    cfg = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, cfg)
    except ValueError as err:  # e.g. a target module name the model does not have
        raise ConfigError(f"lora.target_modules: {err}") from None


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class _Disabled:
    """A callable part of the network (decoder, head) that runs with the adapter off."""

    def __init__(self, owner: "AdapterDisabled", fn):
        self._owner, self._fn = owner, fn

    def __call__(self, *args, **kwargs):
        with self._owner.context():
            return self._fn(*args, **kwargs)

    def __getattr__(self, name):  # e.g. the head's weight
        return getattr(self._fn, name)


class AdapterDisabled:
    """The base model behind a peft model: the KL reference and a same-model local teacher.

    Attribute reads (``config``, ``generation_config``, ``device``) go to the underlying transformers
    model; ``parameters()`` yields only the base weights (all frozen), never the adapter's.
    """

    def __init__(self, peft_model):
        self._peft_model = peft_model

    @contextmanager
    def context(self):
        with self._peft_model.disable_adapter():
            yield

    @property
    def base(self):
        return self._peft_model.get_base_model()

    def __call__(self, *args, **kwargs):
        with self.context():
            return self._peft_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.context():
            return self._peft_model.generate(*args, **kwargs)

    def get_decoder(self):
        return _Disabled(self, self.base.get_decoder())

    def get_output_embeddings(self):
        return _Disabled(self, self.base.get_output_embeddings())

    def parameters(self):
        return (p for n, p in self._peft_model.named_parameters() if "lora_" not in n)

    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        return getattr(self.base, name)


def merged_copy(peft_model):
    """A plain transformers model with the adapter merged in (the training model is left untouched)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def adapter_state(peft_model) -> dict:
    return _peft().get_peft_model_state_dict(peft_model)


def load_adapter_state(peft_model, state: dict) -> None:
    result = _peft().set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter weights do not match the model (unexpected {unexpected[:3]})")
