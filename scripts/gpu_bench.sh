#!/usr/bin/env bash
# Speed on a real GPU, kvsharer beside llama.cpp on the same GPU in one process:
# the wgpu backend (our WGSL shaders) and, where the CUDA toolkit is present, ggml's
# CUDA backend, each against llama.cpp with every layer offloaded (--llama-ngl 99).
#
#   bash scripts/gpu_bench.sh [OUT_DIR]      # default OUT_DIR: figures/gpu
#
# Environment: P, N, R (prompt tokens, generated tokens, repetitions; 512, 128, 3),
# D (depth; 0), MODEL (a GGUF; default model otherwise). Without nvcc it builds the
# default features only, and llama.cpp's side stays on the CPU (bench says so).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-figures/gpu}"
mkdir -p "$OUT"
P="${P:-512}" N="${N:-128}" R="${R:-3}" D="${D:-0}"
model=()
[ -n "${MODEL:-}" ] && model=(-m "$MODEL")

features=()
backends=(wgpu)
if command -v nvcc >/dev/null 2>&1; then
    features=(--features cuda)
    backends+=(cuda)
    # Only this machine's GPU architecture: a build for every one takes far longer.
    export CMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-native}"
fi
# What the GPU is, for the record; a failing nvidia-smi must not stop the benchmark.
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
fi

cargo build --release --quiet "${features[@]}"
K=target/release/kvsharer
for b in "${backends[@]}"; do
    echo "== --backend $b, llama.cpp with --llama-ngl 99" >&2
    "$K" bench "${model[@]}" --backend "$b" --llama-ngl 99 -p "$P" -n "$N" -r "$R" -d "$D" \
        | tee "$OUT/bench-$b.txt"
done
