#!/usr/bin/env bash
# Fitted adapters (issue 14, item 3) on fixed plans: what each kind does to
# held-out quality. Two plans share the same 8 whole layers: `greedy`, the greedy
# whole-layer map with 8 shared layers (taken from a frontier.sh run's
# FRONTIER_DIR/map-8.json, or searched here), whose sources are what the search
# chose (on the default model: layer 0 for all 8); and `nearest`, the same layers
# each reading the nearest earlier layer that owns its cache. Each is stored with
# each kind of adapter:
#   none                 sharing alone
#   values-rows          a per-KV-head map fitted to the cached value rows
#   values-attention     a per-query-head map fitted to the attention output
#   keys                 RoPE-commuting complex scales folded into attn_q
#   both                 keys + values (values fitted to the attention output)
# Each row is `kvsharer perplexity -c 512 --chunks $CHUNKS --kv-share --json`
# against the unshared f16 model, on data/heldout.txt (prose) and
# data/heldout-dialogue.txt (dialogue); the adapters are fitted on
# data/calibration.txt, which neither overlaps.
#
# Usage: bash scripts/adapters.sh [OUT_DIR] [FRONTIER_DIR]   (default: adapters/, frontier/)
#   CHUNKS (default 6), THREADS (default 2), KVSHARER_BIN (a binary to use instead of
#   building one). About 25 minutes on a 2-core machine with the map at hand.
# Results: OUT_DIR/<text>-<plan>-<kind>.json and OUT_DIR/adapters.md (the table
# README shows).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-adapters}"
FRONTIER="${2:-frontier}"
mkdir -p "$OUT"
source scripts/measure-env.sh

MAP="$FRONTIER/map-8.json"
if [ ! -f "$MAP" ]; then
    MAP="$OUT/greedy-8/report.json"
    if [ ! -f "$MAP" ]; then
        echo "greedy whole-layer search to N = 8 (no $FRONTIER/map-8.json)" >&2
        "$K" calibrate -m "$MODEL" -t "$T" --layers 8 --report "$OUT/greedy-8" > /dev/null 2> "$OUT/greedy-8.log"
    fi
fi
echo "map: $MAP" >&2
python3 - "$MAP" "$OUT/map-nearest.json" <<'PY'
import json, sys
src = json.load(open(sys.argv[1]))["map"]["source"]
owners = [i for i, s in enumerate(src) if s == i]
near = [i if s == i else max(o for o in owners if o < i) for i, s in enumerate(src)]
json.dump({"map": {"source": near}}, open(sys.argv[2], "w"))
print("nearest:", near, file=sys.stderr)
PY

KINDS="none values-rows values-attention keys both"
PLANS="greedy nearest"
for plan in $PLANS; do
    if [ "$plan" = greedy ]; then map="$MAP"; else map="$OUT/map-nearest.json"; fi
    for kind in $KINDS; do
        model="$OUT/model-$plan-$kind.gguf"
        [ -f "$model" ] && continue
        case "$kind" in
            none) args=(--adapters none) ;;
            values-rows) args=(--adapters values --adapter-fit rows) ;;
            values-attention) args=(--adapters values --adapter-fit attention) ;;
            keys) args=(--adapters keys) ;;
            both) args=(--adapters both --adapter-fit attention) ;;
        esac
        echo "  share: $plan, $kind" >&2
        "$K" share -m "$MODEL" -t "$T" --map "$map" "${args[@]}" -o "$model" 2> "$OUT/share-$plan-$kind.log"
    done
done

for entry in prose:data/heldout.txt dialogue:data/heldout-dialogue.txt; do
    tname="${entry%%:*}"; text="${entry#*:}"
    for plan in $PLANS; do
        for kind in $KINDS; do
            name="$tname-$plan-$kind"
            [ -s "$OUT/$name.json" ] && continue
            echo "  $tname: $plan, $kind" >&2
            "$K" perplexity -m "$OUT/model-$plan-$kind.gguf" -f "$text" -c 512 -t "$T" --chunks "$CHUNKS" \
                --kv-share --json > "$OUT/$name.json" 2> "$OUT/$name.log"
        done
    done
done

python3 - "$OUT" "$PLANS" "$KINDS" > "$OUT/adapters.md" <<'PY'
import json, os, re, sys
out, plans, kinds = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
plan_names = {
    "greedy": "greedy map, 8 layers",
    "nearest": "same layers, nearest owner",
}
names = {
    "none": "none",
    "values-rows": "values, fitted to the cached rows",
    "values-attention": "values, fitted to the attention output",
    "keys": "keys (RoPE-commuting scales)",
    "both": "keys + values (attention output)",
}
def fit_time(plan, kind):
    try:
        log = open(os.path.join(out, f"share-{plan}-{kind}.log")).read()
    except OSError:
        return "-"
    m = re.search(r"fitted on (\d+) tokens in ([\d.]+) s", log)
    return f"{m.group(2)} s" if m else "-"
for text in ("prose", "dialogue"):
    print(f"### {text}\n")
    print("| plan | adapters | KV bytes vs f16 | PPL ratio | mean KLD | same top-1 | fit time |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for plan in plans:
        for kind in kinds:
            try:
                c = json.load(open(os.path.join(out, f"{text}-{plan}-{kind}.json")))["comparison"]
            except (OSError, ValueError, KeyError):
                continue
            print(f"| {plan_names[plan]} | {names[kind]} | {100*c['test_kv_bytes']/c['base_kv_bytes']:.1f}% | "
                  f"{c['ppl_ratio']['value']:.3f} | {c['kld']['value']:.4f} | {100*c['same_top']['value']:.1f}% | "
                  f"{fit_time(plan, kind)} |")
    print()
PY
cat "$OUT/adapters.md"
