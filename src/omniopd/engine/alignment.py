"""Token/text alignment, in exactly one place.

Positions. A batch is ``[left-padded prompt (P) | right-padded response (T)]``. The hidden state at
absolute position p predicts the token at p + 1, so response token t (absolute P + t) was produced by
the hidden state at P + t - 1. :func:`response_hidden` returns hidden states already shifted, so
``hidden[:, t]`` belongs to response token t everywhere downstream (entropy H_t, log p(y_t), KL_t).
Position ids follow the attention mask (as ``generate`` does with left padding), so the training
forward sees the same positions the sampler did.

Text. The teacher sees the decoded prefix y_<t and the student's chunk is y_t..y_{t+C-1}. Chunk text is
taken as ``decode(y_<t+C)[len(decode(y_<t)):]`` so that a token whose decoded form depends on its left
neighbour (leading spaces in SentencePiece) is cut the same way the teacher's prefix was. Teacher text
is cut to at most C *student* tokens before scoring, so a teacher with another tokenizer is compared
like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class SequenceBatch:
    input_ids: Tensor  # (B, P + T) prompt left-padded, response right-padded
    attention_mask: Tensor  # (B, P + T)
    prompt_len: int  # P
    response_ids: Tensor  # (B, T)
    response_mask: Tensor  # (B, T) bool: real response tokens, EOS included

    def select(self, idx: list[int]) -> "SequenceBatch":
        """Rows ``idx``, trimmed of all-padding columns on either side."""
        ids, att = self.input_ids[idx], self.attention_mask[idx]
        resp_mask = self.response_mask[idx]
        T = int(resp_mask.sum(1).max().item()) if resp_mask.numel() else 0
        T = max(T, 1)
        prompt_att = att[:, : self.prompt_len]
        first = int((prompt_att.sum(0) > 0).nonzero()[0].item()) if prompt_att.any() else 0
        P = self.prompt_len - first
        return SequenceBatch(
            input_ids=ids[:, first : self.prompt_len + T],
            attention_mask=att[:, first : self.prompt_len + T],
            prompt_len=P,
            response_ids=self.response_ids[idx][:, :T],
            response_mask=resp_mask[:, :T],
        )

    def to(self, device) -> "SequenceBatch":
        """The same batch on ``device`` (rollouts are packed on the CPU; the forward runs where the model is)."""
        return SequenceBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            prompt_len=self.prompt_len,
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
        )


def position_ids(attention_mask: Tensor) -> Tensor:
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def decoder_and_head(model):
    """(decoder returning final normed hidden states, head mapping hidden -> logits)."""
    decoder = model.get_decoder()
    lm_head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logit_scale", None)

    def head(h: Tensor) -> Tensor:
        logits = lm_head(h)
        if scale is not None:
            logits = logits * scale
        if cap:  # e.g. Gemma 2: the model's own logits are soft-capped
            logits = torch.tanh(logits / cap) * cap
        return logits

    return decoder, head


def response_hidden(model, batch: SequenceBatch) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Hidden states (B, T, D) with ``[:, t]`` the state that produced response token t, and the head."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # data parallel: the forward goes through the wrapper so that its gradient all-reduce is armed;
        # logits only for the last position (the sliced head below computes the rest), the final
        # (normed) hidden state is the last entry of hidden_states
        _, head = decoder_and_head(model.module)
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids(batch.attention_mask),
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        h = out.hidden_states[-1]
    else:
        decoder, head = decoder_and_head(model)
        out = decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids(batch.attention_mask),
            use_cache=False,
        )
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    P, T = batch.prompt_len, batch.response_ids.shape[1]
    return h[:, P - 1 : P + T - 1], head


def prefix_and_chunk_text(tokenizer, response_ids: list[int], start: int, chunk_tokens: int) -> tuple[str, str]:
    """(decoded y_<start, decoded y_start..y_start+C-1), without special tokens."""
    prefix = tokenizer.decode(response_ids[:start], skip_special_tokens=True)
    through = tokenizer.decode(response_ids[: start + chunk_tokens], skip_special_tokens=True)
    if through.startswith(prefix):
        return prefix, through[len(prefix) :]
    return prefix, tokenizer.decode(response_ids[start : start + chunk_tokens], skip_special_tokens=True)


def cut_to_tokens(tokenizer, text: str, max_tokens: int) -> tuple[str, int]:
    """``text`` cut to at most ``max_tokens`` tokens of ``tokenizer``; returns (text, token count)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text, len(ids)
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True), max_tokens
