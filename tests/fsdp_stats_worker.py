"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``: the token statistics of a sharded
student (FSDP2 over gloo) against the same computation on the whole model in one process.

A tiny Llama with tied embeddings (as SmolLM2) is set up by ``sharding.prepare_sharded`` twice: full
fine-tuning (the KL reference is a frozen sharded copy) and LoRA (the reference is the adapter-disabled
network; the adapter is moved off zero first so that the KL is not trivially 0). Each rank computes the
statistics of its half of a batch inside the root's forward and back-propagates its share of the loss;
rank 0 writes, as JSON, the largest differences from the whole-model values and gradients, and how many
parameter elements each rank holds.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from conftest import tiny_llama
from omniopd.config import build_config
from omniopd.engine.alignment import SequenceBatch
from omniopd.engine.forward import response_token_stats
from omniopd.training.sharding import gathered_state_dict, is_sharded, prepare_sharded


def tied_tiny_llama():
    model = tiny_llama(vocab_size=96, hidden=32, layers=2, seed=0)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def make_batch() -> SequenceBatch:
    B, P, T = 4, 5, 9
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (B, P + T), generator=g)
    att = torch.ones(B, P + T, dtype=torch.long)
    att[0, :2] = 0  # a left-padded prompt
    rmask = torch.ones(B, T, dtype=torch.bool)
    rmask[1, 6:] = False
    return SequenceBatch(ids, att, P, ids[:, P:], rmask)


def loss_of(stats, normalizer: float) -> torch.Tensor:
    return (stats.logprobs.sum() + 0.5 * stats.kl_ref_to_student.sum()) / normalizer


def case(lora_rank: int, rank: int, world: int) -> dict:
    from omniopd.training.lora import AdapterDisabled, apply_lora

    cfg = build_config({"lora": {"rank": lora_rank, "alpha": 8.0}} if lora_rank else {})
    model, ref, _ = prepare_sharded(cfg, tied_tiny_llama(), torch.device("cpu"), lambda whole: None)
    # move the trained weights (all of them, or LoRA's B, which starts at 0) away from the reference, each
    # rank its own shard, so that the KL is not 0; the whole model below is built from the gathered weights
    with torch.no_grad():
        torch.manual_seed(10 + rank)
        for n, p in model.named_parameters():
            if p.requires_grad and (not lora_rank or "lora_B" in n):
                p.to_local().add_(0.05 * torch.randn_like(p.to_local()))
    assert is_sharded(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    weights = gathered_state_dict(model)
    batch = make_batch()
    B = batch.response_ids.shape[0]
    per = B // world
    sub = batch.select(list(range(rank * per, (rank + 1) * per)))
    stats = response_token_stats(model, sub, ref_model=ref, want_entropy=True, slice_size=4)
    # each rank's loss is its sum over its own B / world sequences; FSDP averages the gradients over ranks
    loss_of(stats, B / world).backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        no_grad_stats = response_token_stats(model, sub, want_entropy=True, slice_size=2)
    # the whole model, in one process
    whole = tied_tiny_llama()
    if lora_rank:
        whole = apply_lora(whole, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
        whole_ref = AdapterDisabled(whole)
    else:
        whole_ref = tied_tiny_llama().eval()  # the initial student
        for p in whole_ref.parameters():
            p.requires_grad_(False)
    gathered = [None] * world
    dist.all_gather_object(gathered, weights)  # rank 0 holds them; the others gathered an empty dict
    whole.load_state_dict(gathered[0])
    expect = response_token_stats(whole, batch, ref_model=whole_ref, want_entropy=True, slice_size=5)
    loss_of(expect, B).backward()
    rows = slice(rank * per, (rank + 1) * per)
    T = sub.response_ids.shape[1]

    def diff(a, b):
        return float((a.detach() - b.detach()).abs().max())

    return {
        "logprobs": diff(stats.logprobs, expect.logprobs[rows, :T]),
        "entropy": diff(stats.entropy, expect.entropy[rows, :T]),
        "kl": diff(stats.kl_ref_to_student, expect.kl_ref_to_student[rows, :T]),
        "kl_max": float(expect.kl_ref_to_student.detach().abs().max()),
        "no_grad_entropy": diff(no_grad_stats.entropy, expect.entropy[rows, :T]),
        "grad": max(diff(g, dict(whole.named_parameters())[n].grad) for n, g in grads.items()),
        "grad_max": max(float(g.abs().max()) for g in grads.values()),
        "grads": len(grads),
        "local_elements": local,
        "total_elements": total,
    }


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"full": case(0, rank, world), "lora": case(4, rank, world)}
    every = [None] * world
    dist.all_gather_object(every, result)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(every, fh)
    dist.barrier()  # neither process closes the group while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
