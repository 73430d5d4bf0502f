"""The method's math: pure tensor/text functions with no engine, no I/O and no logging.

Imported by the trainer, the benchmarks and the tests alike, so there is exactly one copy of each
formula. See ``ALGORITHM.md`` for the specification each function implements.
"""

from omniopd.core.losses import LossOutput, OmniOPDLossInputs, omniopd_loss, token_weights_from_chunks
from omniopd.core.scheduler import ANCHOR_SELECTORS, select_peak_entropy
from omniopd.core.similarity import PHI_FUNCTIONS, k_sem, ned, rouge1
from omniopd.core.target import chunk_prior_mean, dm_target, posterior_settled, posterior_width
from omniopd.core.token_stats import TokenStats, token_stats

__all__ = [
    "ANCHOR_SELECTORS",
    "LossOutput",
    "OmniOPDLossInputs",
    "PHI_FUNCTIONS",
    "TokenStats",
    "chunk_prior_mean",
    "dm_target",
    "k_sem",
    "ned",
    "omniopd_loss",
    "posterior_settled",
    "posterior_width",
    "rouge1",
    "select_peak_entropy",
    "token_stats",
    "token_weights_from_chunks",
]
