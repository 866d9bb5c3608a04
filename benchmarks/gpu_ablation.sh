#!/usr/bin/env bash
# The ablation of papers 1-2 (benchmarks/ablation.py) at the size a lent GPU allows: 256 px
# phantoms and inputs, 8,000 of them, the same variants, grid and seeds as the CPU table.
# Written to $OUT (the device tool's output folder), or ./gpu-ablation.
#
#   bash benchmarks/gpu_ablation.sh            # on the device machine, from the repository root
#
# Under 10 minutes is the budget: a stop (timeout) keeps every finished run in
# $OUT/ablation-work, and running the script again resumes from them, so a second call
# finishes what the first could not. Not yet run: no task has been lent a GPU.
set -euo pipefail
out="${OUT:-gpu-ablation}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 CXRTOOL_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
timeout "${BUDGET_S:-560}" python benchmarks/ablation.py --data phantoms --device cuda --seeds 3 \
    --phantom-size 256 --input-size 256 --train-images 8000 --test-images 1000 --epochs 8 --batch-size 64 \
    --workers 12 --work "$out/ablation-work" --json "$out/ablation.json" | tee "$out/ablation.txt"
