#!/usr/bin/env bash
# Speed on a real GPU, kvsharer beside llama.cpp on the same GPU in one process:
# the wgpu backend (our WGSL shaders) and, where the CUDA toolkit is present, ggml's
# CUDA backend, each against llama.cpp with every layer offloaded (--llama-ngl 99).
#
#   bash scripts/gpu_bench.sh [OUT_DIR]      # default OUT_DIR: figures/gpu
#
# Configurations (each at depth 0 and at depth $DEEP, llama.cpp beside it in the
# same process on the same GPU):
#   f16        both sides an f16 cache            (goal: wgpu tg >= 0.8x llama.cpp)
#   q8_0       both sides a q8_0 cache
#   q4_0       both sides a q4_0 cache
#   iq4_nl     both sides an iq4_nl cache (q4_0's bytes, two thirds of its KLD)
#   share-q8_0 wgpu: --kv-share 25% + q8_0 cache; llama.cpp: f16
#                                                 (goal at $DEEP: faster than llama.cpp f16)
#   budget-30  wgpu: --kv-budget 30% (the memory plan); llama.cpp: f16
#
# Environment: P, N, R (prompt tokens, generated tokens, repetitions; 512, 128, 3),
# DEEP (the second depth; 4096), CONFIGS (a subset of the names above), MODEL (a
# GGUF; default model otherwise). Without nvcc it builds the default features only,
# and llama.cpp's side stays on the CPU (bench says so). Sharing and the plan are
# calibrated on first use and cached, so the first such run takes longer.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-figures/gpu}"
mkdir -p "$OUT"
P="${P:-512}" N="${N:-128}" R="${R:-3}" DEEP="${DEEP:-4096}"
CONFIGS="${CONFIGS:-f16 q8_0 q4_0 iq4_nl share-q8_0 budget-30}"
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

# kvsharer's flags, then llama.cpp's cache flags, of one configuration.
config_flags() {
    case "$1" in
        f16) echo "--cache-type-k f16 --cache-type-v f16|" ;;
        q8_0) echo "--cache-type-k q8_0 --cache-type-v q8_0|" ;;
        q4_0) echo "--cache-type-k q4_0 --cache-type-v q4_0|" ;;
        iq4_nl) echo "--cache-type-k iq4_nl --cache-type-v iq4_nl|" ;;
        share-q8_0) echo "--kv-share 25% --cache-type-k q8_0 --cache-type-v q8_0|--llama-cache-type-k f16 --llama-cache-type-v f16" ;;
        budget-30) echo "--kv-budget 30%|--llama-cache-type-k f16 --llama-cache-type-v f16" ;;
        *) echo "gpu_bench.sh: unknown configuration $1" >&2; exit 2 ;;
    esac
}

for b in "${backends[@]}"; do
    for c in $CONFIGS; do
        flags="$(config_flags "$c")"
        ours="${flags%%|*}" theirs="${flags#*|}"
        for d in 0 "$DEEP"; do
            echo "== --backend $b, $c, depth $d, llama.cpp with --llama-ngl 99 $theirs" >&2
            # shellcheck disable=SC2086 # the flags are words on purpose
            "$K" bench "${model[@]}" --backend "$b" --llama-ngl 99 -p "$P" -n "$N" -r "$R" \
                -d "$d" $ours $theirs | tee "$OUT/bench-$b-$c-d$d.txt"
        done
    done
done
