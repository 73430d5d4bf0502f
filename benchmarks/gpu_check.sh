#!/usr/bin/env bash
# The GPU measurements of the default recipe's shapes, in one run (about 7 minutes on one H100; each
# stage has a time limit, 11 minutes in all). docs/SPEED.md has the figures it produced.
#
#   benchmarks/gpu_check.sh OUTDIR [key=value ...]
#
# Writes into OUTDIR (each stage under its own time limit; a failed stage is logged and the next one runs):
#   gpu.txt            nvidia-smi's name, memory and driver for the card
#   step_fp32.json     step_breakdown.py, the default recipe (float32), 6 steps: seconds per phase, tokens/s
#   compare_trl.json   compare_trl.py (TRL's DistillationTrainer beside OmniOPD), 5 steps each, 1 warm-up
#   teacher_cost.json  teacher_cost.py at the default shapes, 2 batches of 2 prompts, no reseeded setting
#   step_paper.json    step_breakdown.py at the paper's audit shapes (M=10, N=10, C=50), 512-token
#                      responses, 16 trajectories per step, 2 steps
#   step_bf16.json     step_breakdown.py, the default recipe in bfloat16, 4 steps
#   log.txt            every stage's output
# Extra key=value arguments go to every stage's recipe (e.g. student.name=/path/to/model.gguf).
# Needs TRL for compare_trl (pip install 'omniopd[bench]'); without it that stage is logged as failed.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [key=value ...]}
shift
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log="$out/log.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || echo "no nvidia-smi" >"$out/gpu.txt"
cat "$out/gpu.txt" | tee -a "$log"

stage() {  # stage NAME SECONDS args...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$py" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc after $((SECONDS - t0))s" | tee -a "$log"
}

stage step_fp32 120 "$here/step_breakdown.py" --output "$out/step_fp32.json" --steps 6 "$@"
stage compare_trl 120 "$here/compare_trl.py" --output "$out/compare_trl.json" --steps 5 --warmup 1 "$@"
stage teacher_cost 180 "$here/teacher_cost.py" --output "$out/teacher_cost.json" --steps 2 --prompts 2 --no-noise-floor "$@"
stage step_paper 150 "$here/step_breakdown.py" --output "$out/step_paper.json" --steps 2 \
  audit.chunk_tokens=50 audit.num_chunks=10 audit.teacher_samples=10 rollout.max_new_tokens=512 \
  optim.prompts_per_step=4 rollout.samples_per_prompt=4 optim.micro_batch_size=8 teacher.batch_size=400 rollout.batch_size=16 "$@"
stage step_bf16 90 "$here/step_breakdown.py" --output "$out/step_bf16.json" --steps 4 student.dtype=bfloat16 "$@"

"$py" - "$out" <<'EOF' | tee -a "$log"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("step_fp32", "step_bf16", "step_paper"):
    p = out / f"{name}.json"
    if p.is_file():
        r = json.loads(p.read_text())
        print(f"{name:12s} step {r['step_s']:.2f}s  phases {', '.join(f'{k} {v:.2f}' for k, v in r['phases_s'].items())}  "
              f"tokens/s rollout {r['tokens_per_s']['rollout']:.0f} step {r['tokens_per_s']['step']:.0f} "
              f"teacher {r['tokens_per_s']['teacher_generated']:.0f}  [{r['machine']['cuda']}]")
p = out / "compare_trl.json"
if p.is_file():
    r = json.loads(p.read_text())
    print(f"compare_trl  ratio_median {r.get('ratio_median')}  without generation {r.get('ratio_median_without_generation')}")
EOF
