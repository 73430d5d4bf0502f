"""Per-process memory of the student's training state under DDP and FSDP2 (``distributed.strategy``).

    python benchmarks/fsdp_memory.py --output fsdp_memory.json [--processes 2] [--recipe R] [key=value ...]

Each strategy runs in its own ``torchrun`` launch of ``--processes`` CPU processes (gloo), so that peaks do
not mix: the trainer's own setup and one real training step of the recipe's student (default recipe:
SmolLM2-135M in fp32), as SFT on the reference solutions (no teacher, no sampling: the memory is the
student's). Recorded on every rank:

- the bytes of the student's parameters, gradients and AdamW state *held by that process*: a sharded
  tensor (a DTensor) counts its local shard (``to_local()``), any other tensor whole. Gradients are
  counted after the backward pass, before the optimizer step (which frees them), the optimizer state
  after it; all three exist together just before ``zero_grad``, so their sum is the rank's peak of them;
- the bytes of the frozen KL reference copy on the rank (whole under DDP, sharded under FSDP2);
- resident memory, Linux ``VmRSS`` after setup and ``VmHWM`` during the step (the peak is reset after setup
  through ``/proc/self/clear_refs``): what the process really used, with the Python/torch runtime, the
  activations, DDP's gradient buckets and the layer weights FSDP2 gathers while a layer runs.

The counted state follows a formula: fp32 weights (4 bytes), gradients (4) and AdamW's two moments (8) are
16 bytes per parameter, N of them on every rank under DDP and about N/P under FSDP2 (each tensor cut into P
pieces along its first dimension), so the FSDP2/DDP ratio approaches 1/P, 0.5 on 2 processes. Resident
memory falls by less (the runtime and activations are not sharded). Step times are context only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_breakdown import ROOT, machine  # noqa: E402


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _proc_status(key: str) -> float:
    """A ``/proc/self/status`` memory field in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def worker(recipe: str, strategy: str, out_dir: str, result_path: str, overrides: list[str]) -> None:
    import torch

    from omniopd.config import load_config
    from omniopd.methods import METHODS
    from omniopd.training.distributed import rank_slice
    from omniopd.training.trainer import backward_phase, optimizer_phase, setup

    cfg = load_config(recipe, [f"output_dir={out_dir}", "max_steps=1", "method=sft", "sft.source=reference",
                               "eval.before=false", "eval.after=false", f"distributed.strategy={strategy}", *overrides])
    state = setup(cfg, overwrite=True)
    acc = state.accelerator
    rss_setup = _proc_status("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    method = METHODS[cfg.method]
    examples = rank_slice(state.stream.next_batch(), acc.process_index, acc.num_processes)
    rollouts = method.sample(state, examples)
    backward_phase(state, method, rollouts.batch, method.audit(state, rollouts, examples))
    model = acc.unwrap_model(state.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = _local_bytes(p.grad for p in trainable if p.grad is not None)
    optimizer_phase(state)
    step_s = time.perf_counter() - t0
    params = _local_bytes(model.parameters())
    opt_state = _local_bytes(v for s in state.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    mib = 2**20
    row = {
        "rank": acc.process_index,
        "params_mib": params / mib,
        "grads_mib": grads / mib,
        "optimizer_state_mib": opt_state / mib,
        "state_mib": (params + grads + opt_state) / mib,
        "reference_copy_mib": _local_bytes(state.ref_model.parameters()) / mib,
        "rss_after_setup_mib": rss_setup,
        "peak_rss_step_mib": _proc_status("VmHWM"),
        "model_params": sum(p.numel() for p in model.parameters()),
        "target_tokens": int(rollouts.batch.response_mask.sum()),
        "step_s": step_s,
    }
    from accelerate.utils import gather_object

    rows = gather_object([row])
    if acc.is_main_process:
        Path(result_path).write_text(json.dumps(sorted(rows, key=lambda r: r["rank"])))
    acc.wait_for_everyone()
    acc.end_training()  # closes the process group before exit


def launch(args, strategy: str, tmp: Path) -> list[dict]:
    result = tmp / f"{strategy}.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
           __file__, "--output", "-", "--recipe", args.recipe, "--worker", strategy, "--run-dir", str(tmp / strategy),
           "--result", str(result), *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"fsdp_memory.py: the {strategy} launch failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", required=True)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "gsm8k-smollm2-cpu.yaml"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one strategy, under torchrun
    ap.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:
        worker(args.recipe, args.worker, args.run_dir, args.result, args.overrides)
        return
    P = args.processes
    with tempfile.TemporaryDirectory() as tmp:
        ranks = {s: launch(args, s, Path(tmp)) for s in ("ddp", "fsdp2")}
    for s, rows in ranks.items():
        print(s, json.dumps([{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for r in rows]), flush=True)

    def worst(strategy: str, key: str) -> float:
        return max(r[key] for r in ranks[strategy])

    n = ranks["ddp"][0]["model_params"]
    out = {
        "benchmark": "fsdp_memory",
        "recipe": args.recipe,
        "overrides": args.overrides,
        "processes": P,
        "model_params": n,
        "counted": "parameters + gradients + AdamW state held by each process (DTensor local shards, to_local()); "
                   "resident memory from /proc/self/status (VmRSS after setup, VmHWM during one step)",
        "per_rank": ranks,
        "state_mib_per_rank": {s: worst(s, "state_mib") for s in ranks},
        "state_ratio_fsdp2_over_ddp": worst("fsdp2", "state_mib") / worst("ddp", "state_mib"),
        "formula": f"16 bytes/param (fp32 weights 4 + gradients 4 + AdamW moments 8): DDP 16 N per rank, "
                   f"FSDP2 about 16 N / P; ratio -> 1/P = {1 / P:.3g}",
        "formula_state_mib": {"ddp": 16 * n / 2**20, "fsdp2": 16 * n / P / 2**20},
        "expected_ratio": 1 / P,
        "reference_copy_mib_per_rank": {s: worst(s, "reference_copy_mib") for s in ranks},
        "peak_rss_step_mib_per_rank": {s: worst(s, "peak_rss_step_mib") for s in ranks},
        "peak_rss_ratio_fsdp2_over_ddp": worst("fsdp2", "peak_rss_step_mib") / worst("ddp", "peak_rss_step_mib"),
        "machine": machine(),
    }
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("state_mib_per_rank", "state_ratio_fsdp2_over_ddp", "expected_ratio",
                                          "peak_rss_step_mib_per_rank", "peak_rss_ratio_fsdp2_over_ddp")}))


if __name__ == "__main__":
    main()
