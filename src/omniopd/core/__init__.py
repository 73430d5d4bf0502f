"""The method's math: pure tensor/text functions with no engine, no I/O and no logging.

Imported by the trainer, the benchmarks and the tests alike, so there is exactly one copy of each
formula. See ``docs/ALGORITHM.md`` for the specification each function implements.
"""

from omniopd.core.advantages import group_advantages
from omniopd.core.losses import LOSSES, LossInputs, LossOutput, get_loss, register_loss, token_weights_from_chunks
from omniopd.core.scheduler import ANCHOR_SELECTORS, select_peak_entropy
from omniopd.core.similarity import PHI_FUNCTIONS, k_sem, ned, rouge1
from omniopd.core.target import centered_targets, chunk_prior_mean, dm_target, posterior_settled, posterior_width
from omniopd.core.token_stats import TokenStats, reverse_kl_sliced, token_stats

__all__ = [
    "ANCHOR_SELECTORS",
    "LOSSES",
    "LossInputs",
    "LossOutput",
    "PHI_FUNCTIONS",
    "TokenStats",
    "centered_targets",
    "chunk_prior_mean",
    "dm_target",
    "get_loss",
    "group_advantages",
    "k_sem",
    "ned",
    "posterior_settled",
    "posterior_width",
    "register_loss",
    "reverse_kl_sliced",
    "rouge1",
    "select_peak_entropy",
    "token_stats",
    "token_weights_from_chunks",
]
