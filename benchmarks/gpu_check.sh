#!/usr/bin/env bash
# Issue 16's GPU targets in one run (about 7 minutes on one H100/H200): ViT-B/16 at 224, batch 64, bf16.
#   1. every method eager, SA²VP at c = 1, 3, 7, the default kernel choice;
#   2. SA²VP eager with the dense local-attention kernel pinned (to decide choose_kernel on GPUs);
#   3. SA²VP at c = 3 compiled with CUDA graphs (train.compile=reduce-overhead), beside the compiled pathway.
# Each writes its JSON (benchmarks/train_step.py --json) into the folder given (default: results/); $PYTHON is
# the interpreter with this project installed (default: python).
#
#     bash benchmarks/gpu_check.sh "$OUT"
set -euo pipefail
out="${1:-results}"
mkdir -p "$out"
common=(--model vit_base_patch16_224 --image-size 224 --batch-size 64 --precision bf16 --device cuda --steps 20 --warmup 5)
"${PYTHON:-python}" benchmarks/train_step.py "${common[@]}" --json "$out/eager.json"
"${PYTHON:-python}" benchmarks/train_step.py "${common[@]}" --methods sa2vp --kernel dense --json "$out/eager-dense.json"
"${PYTHON:-python}" benchmarks/train_step.py "${common[@]}" --methods sa2vp --windows 3 --compile reduce-overhead \
    --json "$out/compiled.json"
