#!/usr/bin/env bash
# Issue 16's GPU checks in one run: ViT-B/16 at 224, batch 64, bf16. The steps, in the order they run (limits in
# seconds; the first four fit one 10-minute device call):
#   attention    (150) the local-attention kernels alone (benchmarks/local_attention.py) on the grids that occur;
#   gpu-tests    (150) every kernel against the naive reference on the GPU, forward and gradients
#                      (tests/test_local_attention_gpu.py; the Triton kernels compile once per window and border);
#   kernel-triton (90) SA²VP at c = 3 eager with the fused Triton kernel pinned (the kernel inside a whole step);
#   compiled     (220) SA²VP at c = 3 compiled with CUDA graphs (train.compile=reduce-overhead), default kernel;
#   kernel-flex   (90) the same as kernel-triton with FlexAttention;
#   eager        (150) every method eager, SA²VP at c = 1, 3, 7, the default kernel choice (the README's table).
# A failed step does not stop the next. Each writes its JSON into the folder given (default: results/), and all of
# them their output into steps.log there; $PYTHON is the interpreter with this project importable (default:
# python); on a copy of the tree without git, BENCHMARK_COMMIT=<sha> puts the commit into the JSON. Name steps after
# the folder to run only those:
#
#     bash benchmarks/gpu_check.sh "$OUT"
#     bash benchmarks/gpu_check.sh "$OUT" attention gpu-tests kernel-triton compiled
set -uo pipefail
out="${1:-results}"
shift || true
selected=("$@")
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

wanted() {  # wanted NAME: no steps named, or NAME among them
    [[ ${#selected[@]} -eq 0 ]] && return 0
    local name
    for name in "${selected[@]}"; do [[ $name == "$1" ]] && return 0; done
    return 1
}

pinned_kernel() {  # pinned_kernel KERNEL: SA²VP at c = 3, eager, that local-attention kernel in every cross block
    step "kernel-$1" 90 "$py" benchmarks/train_step.py "${common[@]}" --methods sa2vp --windows 3 \
        --kernel "$1" --json "$out/kernel-$1.json"
}

if wanted attention; then
    step attention 150 "$py" benchmarks/local_attention.py --device cuda --precision bf16 --batch-size 64 \
        --cases vit-b16-224,vit-b16-384,swin-b-stage3-224 --windows 3,7 --json "$out/attention.json"
fi
if wanted gpu-tests; then
    step gpu-tests 150 "$py" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_local_attention_gpu.py
fi
wanted kernel-triton && pinned_kernel triton
if wanted compiled; then
    step compiled 220 "$py" benchmarks/train_step.py "${common[@]}" --methods sa2vp --windows 3 \
        --compile reduce-overhead --json "$out/compiled.json"
fi
wanted kernel-flex && pinned_kernel flex
if wanted eager; then
    step eager 150 "$py" benchmarks/train_step.py "${common[@]}" --json "$out/eager.json"
fi
