#!/usr/bin/env bash
# Issue 16's GPU checks in one run (about 8 minutes on one H100/H200): ViT-B/16 at 224, batch 64, bf16.
#   1. every method eager, SA²VP at c = 1, 3, 7, the default kernel choice (the README's GPU table);
#   2. the local-attention kernels alone (benchmarks/local_attention.py) on the grids that occur;
#   3. SA²VP at c = 3 compiled with CUDA graphs (train.compile=reduce-overhead), beside the compiled pathway;
#   4. every kernel against the naive reference on the GPU, forward and gradients (tests/test_local_attention_gpu.py);
#   5. SA²VP at c = 3 eager with each kernel pinned (the kernels inside a whole training step).
# Each step has its own time limit, and a failed step does not stop the next. Each writes its JSON into the folder
# given (default: results/), and all of them their output into steps.log there; $PYTHON is the interpreter with
# this project importable (default: python).
#
#     bash benchmarks/gpu_check.sh "$OUT"
set -uo pipefail
out="${1:-results}"
mkdir -p "$out"
py="${PYTHON:-python}"
common=(--model vit_base_patch16_224 --image-size 224 --batch-size 64 --precision bf16 --device cuda --steps 20 --warmup 5)
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/steps.log, report the outcome
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    echo "== $name (limit ${limit}s)" | tee -a "$out/steps.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/steps.log" | tail -n 25
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc $rc after $((SECONDS - began))s" | tee -a "$out/steps.log"
}

step eager 150 "$py" benchmarks/train_step.py "${common[@]}" --json "$out/eager.json"
step attention 100 "$py" benchmarks/local_attention.py --device cuda --precision bf16 --batch-size 64 \
    --cases vit-b16-224,vit-b16-384,swin-b-stage3-224 --windows 3,7 --json "$out/attention.json"
step compiled 220 "$py" benchmarks/train_step.py "${common[@]}" --methods sa2vp --windows 3 \
    --compile reduce-overhead --json "$out/compiled.json"
step gpu-tests 90 "$py" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_local_attention_gpu.py
for kernel in dense flex; do
    step "kernel-$kernel" 90 "$py" benchmarks/train_step.py "${common[@]}" --methods sa2vp --windows 3 \
        --kernel "$kernel" --json "$out/kernel-$kernel.json"
done
