"""Peak memory of full fine-tuning (with its frozen reference copy) against LoRA (adapter-disabled reference).

    python benchmarks/lora_memory.py --output lora_memory.json [--steps 2] [--rank 16] [--recipe R] [key=value ...]

Each setting runs in its own process (so peaks do not mix): the default recipe's student, teacher and
shapes, ``--steps`` real training steps, no evaluation. Recorded per setting: the process's peak
resident memory (``ru_maxrss``; on a GPU also ``torch.cuda.max_memory_allocated``), the bytes of the
trainable parameters, of the optimizer state and of a separate reference copy (0 with LoRA), and the
seconds per step. Memory is the measurement here; the step times are only for context.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_breakdown import ROOT, machine  # noqa: E402


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_one(recipe: str, steps: int, rank: int, overrides: list[str]) -> dict:
    import torch

    from omniopd.config import load_config
    from omniopd.training.trainer import setup, train_step

    with tempfile.TemporaryDirectory() as tmp:
        over = [f"output_dir={tmp}/run", f"max_steps={steps}", "eval.before=false", "eval.after=false",
                f"lora.rank={rank}", *overrides]
        cfg = load_config(recipe, over)
        state = setup(cfg, overwrite=True)
        seconds = []
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(state)
            seconds.append(time.perf_counter() - t0)
        model = state.accelerator.unwrap_model(state.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt_state = [v for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        ref_copy = 0 if rank else _tensor_bytes(state.ref_model.parameters())
        return {
            "lora_rank": rank,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "model_params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in trainable),
            "trainable_mib": _tensor_bytes(trainable) / 2**20,
            "optimizer_state_mib": _tensor_bytes(opt_state) / 2**20,
            "reference_copy_mib": ref_copy / 2**20,
            "step_s": seconds,
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the LoRA setting")
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"))
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one setting
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one is not None:
        print(json.dumps(run_one(args.recipe, args.steps, args.one, args.overrides)))
        return
    results = {}
    for name, rank in (("full_finetune_with_reference_copy", 0), (f"lora_r{args.rank}_adapter_disabled_reference", args.rank)):
        cmd = [sys.executable, __file__, "--output", "-", "--steps", str(args.steps), "--recipe", args.recipe,
               "--one", str(rank), *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"lora_memory.py: the {name} run failed:\n{proc.stderr[-2000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "step_s"}), flush=True)
    full, lora = results.values()
    out = {
        "benchmark": "lora_memory",
        "recipe": args.recipe,
        "overrides": args.overrides,
        "steps": args.steps,
        "settings": results,
        "peak_rss_ratio_lora_over_full": lora["peak_rss_mib"] / full["peak_rss_mib"],
        "machine": machine(),
    }
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("peak_rss_ratio_lora_over_full",)}))


if __name__ == "__main__":
    main()
