"""The forward pass every method and the audit share: the student's per-token statistics over the response tokens
(log-probabilities, optionally the entropy, and the exact KL from a reference model), from the hidden states in
position slices (``core.token_stats``: no (B, T, V) tensor), inside a forward of the sharded root when the model is
sharded (``training.sharding.in_forward``)."""

from __future__ import annotations

import torch

from omniopd.core.token_stats import TokenStats
from omniopd.engine.alignment import response_hidden
from omniopd.training.sharding import in_forward


def response_token_stats(model, batch, *, ref_model=None, want_entropy: bool = False, slice_size: int = 128):
    """``core.token_stats`` of ``model`` on ``batch``'s response tokens (log-probs, optionally the entropy,
    and the KL from ``ref_model`` when one is given), computed from the hidden states in position slices;
    inside a forward of the sharded root when ``model`` is sharded."""
    from omniopd.core import token_stats

    def compute():
        hidden, head = response_hidden(model, batch)
        ref_hidden = ref_head = None
        if ref_model is not None:
            with torch.no_grad():
                ref_hidden, ref_head = response_hidden(ref_model, batch)
        s = token_stats(
            hidden,
            head,
            batch.response_ids,
            ref_hidden=ref_hidden,
            ref_head=ref_head,
            want_entropy=want_entropy,
            slice_size=slice_size,
        )
        return s.logprobs, s.entropy, s.kl_ref_to_student

    return TokenStats(*in_forward(model, compute))
