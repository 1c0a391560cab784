#!/usr/bin/env bash
# Reproduces the KVSharer figures in README (issues 3 and 6) on the default model:
#   - calibration time and map for --layers 8;
#   - held-out perplexity / KL divergence / top-1 agreement for N = 0, 4, 8, 12 with
#     the paper's search (dissimilar-first), similar-first, and a random map;
#   - sharing combined with quantized caches and a window: perplexity/KLD, and
#     decode speed and KV bytes at depth 4096 beside llama.cpp in the same run.
# Usage: bash scripts/figures.sh [OUT_DIR]   (default: figures/) -- takes ~30-40 min
# on a 2-core machine. Results: OUT_DIR/*.json and OUT_DIR/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-figures}"
mkdir -p "$OUT"
cargo build --release --quiet
K=target/release/kvsharer
TEXT=data/heldout.txt
T="${THREADS:-2}"
CHUNKS="${CHUNKS:-8}"
MODEL="$($K info 2>/dev/null | sed -n 's/^file: *\(.*\) (.*/\1/p')"
echo "model: $MODEL" >&2

ppl() { # name, extra args...
    local name="$1"; shift
    "$K" perplexity -m "$1" -f "$TEXT" -c 512 -t "$T" --chunks "$CHUNKS" --json "${@:2}" > "$OUT/ppl-$name.json"
}

decode_benches() {
    S8="$OUT/model-dissimilar-8.gguf"
    [ -f "$S8" ] || "$K" share -m "$MODEL" -t "$T" --strategy paper --layers 8 -o "$S8" 2> "$OUT/share-dissimilar-8.log"
    for combo in "base:$MODEL:" "s8:$S8:--kv-share" "q8:$MODEL:--cache-type-k q8_0 --cache-type-v q8_0" \
                 "s8-q8:$S8:--kv-share --cache-type-k q8_0 --cache-type-v q8_0" "s8-q4:$S8:--kv-share --cache-type-k q4_0 --cache-type-v q4_0"; do
        IFS=: read -r name model extra <<< "$combo"
        # Decode at depth 4096 beside llama.cpp with the same cache types...
        # shellcheck disable=SC2086
        "$K" bench -m "$model" -t "$T" -p 0 -n 64 -d 4096 -r 2 $extra --json > "$OUT/bench-d4096-$name.json"
    done
    # ...and beside llama.cpp with its default f16 cache (the issue's goal).
    "$K" bench -m "$S8" -t "$T" -p 0 -n 64 -d 4096 -r 2 --kv-share --cache-type-k q8_0 --cache-type-v q8_0 \
        --llama-cache-type-k f16 --llama-cache-type-v f16 --json > "$OUT/bench-d4096-s8-q8-vs-f16.json"
}

# ONLY=decode re-runs just the depth-4096 decode table (~25 min on 2 cores), keeping the other
# results already in OUT_DIR.
if [ "${ONLY:-}" = decode ]; then
    decode_benches
    python3 scripts/summarize_figures.py "$OUT" > "$OUT/summary.md"
    cat "$OUT/summary.md"
    exit 0
fi

# Unshared baseline.
ppl base "$MODEL"

# Calibration time and map for --layers 8 (the paper's search).
/usr/bin/time -f "%e" -o "$OUT/calibrate-8.seconds" \
    "$K" calibrate -m "$MODEL" -t "$T" --strategy paper --layers 8 --report "$OUT/calibrate-8" > "$OUT/calibrate-8.map" 2> "$OUT/calibrate-8.log"

for N in 4 8 12; do
    for variant in dissimilar similar random; do
        g="$OUT/model-$variant-$N.gguf"
        case $variant in
            dissimilar) "$K" share -m "$MODEL" -t "$T" --strategy paper --layers "$N" -o "$g" --report "$OUT/report-$variant-$N" 2> "$OUT/share-$variant-$N.log" ;;
            similar) "$K" share -m "$MODEL" -t "$T" --strategy paper --layers "$N" --order similar -o "$g" --report "$OUT/report-$variant-$N" 2> "$OUT/share-$variant-$N.log" ;;
            random) "$K" share -m "$MODEL" --layers "$N" --random-map --seed 1 -o "$g" 2> "$OUT/share-$variant-$N.log" ;;
        esac
        ppl "$variant-$N" "$g" --kv-share
    done
done

# Sharing with quantized caches and a window (issue 6): 25% shared = 8 of 30 layers,
# by the default search (greedy, KLD) for quality; the paper's map for the speed runs
# (decode speed and KV bytes depend on how many layers are shared, not which).
G8="$OUT/model-greedy-8.gguf"
"$K" share -m "$MODEL" -t "$T" --strategy greedy --objective kld --layers 8 -o "$G8" 2> "$OUT/share-greedy-8.log"
ppl q8 "$MODEL" --cache-type-k q8_0 --cache-type-v q8_0
ppl g8 "$G8" --kv-share
ppl g8-q8 "$G8" --kv-share --cache-type-k q8_0 --cache-type-v q8_0
ppl g8-q4 "$G8" --kv-share --cache-type-k q4_0 --cache-type-v q4_0
for combo in "base:$MODEL:" "g8:$G8:--kv-share" "q8:$MODEL:--cache-type-k q8_0 --cache-type-v q8_0" \
             "g8-q8:$G8:--kv-share --cache-type-k q8_0 --cache-type-v q8_0" "g8-q4:$G8:--kv-share --cache-type-k q4_0 --cache-type-v q4_0"; do
    IFS=: read -r name model extra <<< "$combo"
    # shellcheck disable=SC2086
    ppl "$name-w256" "$model" $extra --kv-window 252 --kv-sink 4
done
decode_benches

python3 scripts/summarize_figures.py "$OUT" > "$OUT/summary.md"
cat "$OUT/summary.md"
