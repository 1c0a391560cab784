#!/usr/bin/env bash
# The KV memory frontier (issue 14) on the default model: KV bytes against quality on
# held-out text, for every uniform configuration a llama.cpp user has (f16, q8_0,
# q4_0, K q8_0 + V q4_0, iq4_nl: each unshared and with the greedy whole-layer maps
# N = 4, 8, 12; q5_1, q5_0, q4_1 unshared) and for the planner (`--kv-budget`) at 60%, 50%, 37.5%, 28.125% (q4_0's
# bytes), 20%, 15% and 10% of the unshared f16 cache; the planner again with fitted
# value adapters (`--adapters values`, stored by `share`) at 75% sharing only and
# at 37.5% down to 10%.
#
# Each point is `kvsharer perplexity -c 512 --chunks $CHUNKS --json` against the
# unshared f16 model on the same chunks, on two held-out texts of different kinds
# (data/heldout.txt: prose; data/heldout-dialogue.txt: dialogue), neither of which
# overlaps the calibration corpus (data/calibration.txt) the maps and plans are
# found on.
#
# Usage: bash scripts/frontier.sh [OUT_DIR]   (default: frontier/)
#   CHUNKS (default 6) chunks of 512 tokens per text; THREADS (default 2);
#   KVSHARER_BIN, a binary to use instead of building one (scripts/measure-env.sh);
#   ADAPTED_BUDGETS (default "37.5 28.125 20 15 10"; "" skips them), the budgets
#   planned again with value adapters (each fits the adapters anew: minutes).
# Takes ~75 min on a 2-core machine (the greedy N = 12 search is ~15 of them; it,
# the shared models and the planner's move costs are reused when present).
# Results: OUT_DIR/<text>-<config>.json, OUT_DIR/frontier.md (the table README
# shows) and OUT_DIR/frontier-<text>.svg (bytes vs KLD, log scale, every point
# labelled).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-frontier}"
mkdir -p "$OUT"
source scripts/measure-env.sh
TEXTS="prose:data/heldout.txt dialogue:data/heldout-dialogue.txt"

# Greedy whole-layer maps: one search to 12 shared layers; greedy accepts one pair
# per step, so its first 4 and 8 acceptances are the N = 4 and 8 maps.
if [ ! -f "$OUT/greedy-12/report.json" ]; then
    echo "greedy whole-layer search to N = 12 (the slow part)" >&2
    "$K" calibrate -m "$MODEL" -t "$T" --layers 12 --report "$OUT/greedy-12" > /dev/null 2> "$OUT/greedy-12.log"
fi
python3 scripts/frontier.py maps "$OUT"
for N in 4 8 12; do
    [ -f "$OUT/model-greedy-$N.gguf" ] || \
        "$K" share -m "$MODEL" -t "$T" --map "$OUT/map-$N.json" -o "$OUT/model-greedy-$N.gguf" 2> /dev/null
done

ppl() { # out name, text file, model, extra args...
    local name="$1" text="$2" model="$3"; shift 3
    [ -s "$OUT/$name.json" ] && return 0
    echo "  $name" >&2
    # A budget no plan reaches fails with a clear error: the log says so, and the
    # table leaves the point out.
    "$K" perplexity -m "$model" -f "$text" -c 512 -t "$T" --chunks "$CHUNKS" --json "$@" \
        > "$OUT/$name.json" 2> "$OUT/$name.log" || { echo "    failed: $(tail -n 2 "$OUT/$name.log" | head -n 1)" >&2; rm -f "$OUT/$name.json"; }
}

# Sharing only (every slot f16) at 75% of the f16 bytes, stored in a model copy;
# without and with fitted value adapters.
[ -f "$OUT/model-plan-75-f16.gguf" ] || \
    "$K" share -m "$MODEL" -t "$T" --kv-budget 75% --plan-types f16 -o "$OUT/model-plan-75-f16.gguf" 2> "$OUT/share-plan-75-f16.log"
[ -f "$OUT/model-plan-75-f16-adapted.gguf" ] || \
    "$K" share -m "$MODEL" -t "$T" --kv-budget 75% --plan-types f16 --adapters values -o "$OUT/model-plan-75-f16-adapted.gguf" 2> "$OUT/share-plan-75-f16-adapted.log"
# The planner with value adapters: they live in the model file, so each budget's
# plan is stored in a copy.
ADAPTED_BUDGETS="${ADAPTED_BUDGETS-37.5 28.125 20 15 10}"
for B in $ADAPTED_BUDGETS; do
    [ -f "$OUT/model-plan-$B-adapted.gguf" ] || \
        "$K" share -m "$MODEL" -t "$T" --kv-budget "$B%" --adapters values -o "$OUT/model-plan-$B-adapted.gguf" 2> "$OUT/share-plan-$B-adapted.log" || \
        echo "    plan $B% with adapters failed: $(tail -n 1 "$OUT/share-plan-$B-adapted.log")" >&2
done

for entry in $TEXTS; do
    tname="${entry%%:*}"; text="${entry#*:}"
    echo "$tname ($text)" >&2
    for N in 0 4 8 12; do
        if [ "$N" = 0 ]; then model="$MODEL"; share=(); else model="$OUT/model-greedy-$N.gguf"; share=(--kv-share); fi
        more=""; [ "$N" = 0 ] && more="q5_1:q5_1 q5_0:q5_0 q4_1:q4_1"
        for types in q8_0:q8_0 q4_0:q4_0 q8_0:q4_0 iq4_nl:iq4_nl f16:f16 $more; do
            k="${types%%:*}"; v="${types#*:}"
            [ "$N" = 0 ] && [ "$k" = f16 ] && continue  # the reference itself
            ppl "$tname-n$N-$k-$v" "$text" "$model" "${share[@]}" --cache-type-k "$k" --cache-type-v "$v"
        done
    done
    for B in 60 50 37.5 28.125 20 15 10; do
        ppl "$tname-plan-$B" "$text" "$MODEL" --kv-budget "$B%"
    done
    ppl "$tname-share-75" "$text" "$OUT/model-plan-75-f16.gguf" --kv-share
    ppl "$tname-share-75-adapted" "$text" "$OUT/model-plan-75-f16-adapted.gguf" --kv-share
    for B in $ADAPTED_BUDGETS; do
        [ -f "$OUT/model-plan-$B-adapted.gguf" ] && ppl "$tname-plan-adapted-$B" "$text" "$OUT/model-plan-$B-adapted.gguf" --kv-share
    done
done

# Additivity: each budget's plan, its predicted calibration KLD (sum of single
# moves) and the KLD measured on the calibration set.
for B in 60 50 37.5 28.125 20 15 10; do
    [ -s "$OUT/calib-plan-$B.json" ] || "$K" plan -m "$MODEL" -t "$T" --kv-budget "$B%" --json \
        > "$OUT/calib-plan-$B.json" 2> "$OUT/calib-plan-$B.log" || rm -f "$OUT/calib-plan-$B.json"
done
for B in $ADAPTED_BUDGETS; do
    [ -s "$OUT/calib-plan-adapted-$B.json" ] || "$K" plan -m "$MODEL" -t "$T" --kv-budget "$B%" --adapters values --json \
        > "$OUT/calib-plan-adapted-$B.json" 2> "$OUT/calib-plan-adapted-$B.log" || rm -f "$OUT/calib-plan-adapted-$B.json"
done

python3 scripts/frontier.py table "$OUT" > "$OUT/frontier.md"
cat "$OUT/frontier.md"
