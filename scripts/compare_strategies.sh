#!/usr/bin/env bash
# Compares sharing-map searches on held-out text and prints a Markdown table.
#
# For every strategy, one search runs to the largest N; the searches are nested (the
# map for a smaller target is the prefix of accepted pairs, exactly what a separate
# run with that target finds), so the maps for the other N and their search times are
# read off the same run (`trials[].seconds`). Each map is stored into a copy of the
# model (`kvsharer share --map`) and measured with
# `kvsharer perplexity -f HELDOUT -c 512 --kv-share --json`, which runs the unshared
# model on the same chunks and reports perplexity, KL divergence and top-1 agreement.
#
# Usage: scripts/compare_strategies.sh [OUT_DIR]   (needs jq; README's table: NS="3 6 8 9 12" CHUNKS=4)
# Environment:
#   KVSHARER  binary            [target/release/kvsharer]
#   MODEL     GGUF model        [the default model]
#   HELDOUT   held-out text     [data/heldout.txt]
#   NS        targets           ["3 6 9 12"]
#   CHUNKS    perplexity chunks [all]
#   THREADS   threads           [2]
#   STRATEGIES  subset of the names below, space separated [all]
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-compare-out}
KVSHARER=${KVSHARER:-target/release/kvsharer}
HELDOUT=${HELDOUT:-data/heldout.txt}
NS=${NS:-"3 6 9 12"}
THREADS=${THREADS:-2}
MODEL_ARGS=()
[[ -n "${MODEL:-}" ]] && MODEL_ARGS=(-m "$MODEL")
CHUNK_ARGS=()
[[ -n "${CHUNKS:-}" ]] && CHUNK_ARGS=(--chunks "$CHUNKS")
mkdir -p "$OUT"

declare -A FLAGS=(
  [paper]="--strategy paper"
  [paper-similar]="--strategy paper --order similar"
  [paper-T0.9]="--strategy paper --threshold 0.9"
  [greedy-kld]="--strategy greedy --objective kld"
  [greedy-cosine]="--strategy greedy --objective cosine"
)
ORDER=(paper paper-similar paper-T0.9 greedy-kld greedy-cosine)
[[ -n "${STRATEGIES:-}" ]] && read -r -a ORDER <<<"$STRATEGIES"
MAX_N=$(tr ' ' '\n' <<<"$NS" | sort -n | tail -1)

for name in "${ORDER[@]}"; do
  dir="$OUT/$name"
  if [[ ! -f "$dir/report.json" ]]; then
    echo "== search: $name (${FLAGS[$name]}) to N=$MAX_N" >&2
    # shellcheck disable=SC2086
    "$KVSHARER" calibrate "${MODEL_ARGS[@]}" -t "$THREADS" --layers "$MAX_N" \
      ${FLAGS[$name]} --report "$dir" >/dev/null
  fi
  for n in $NS; do
    # The map after the first n accepted pairs (chains resolved as ShareMap does),
    # and the time the search took to get there.
    jq --argjson n "$n" '
      . as $r
      | ([.trials[] | select(.kept)] | .[:$n]) as $kept
      | (reduce $kept[] as $t ([range(0; $r.map.source | length)];
          .[$t.source] as $root | map(if . == $t.layer then $root else . end)))
        as $src
      | {map: {source: $src},
         shared: ($kept | length),
         seconds: ($r.capture_seconds + (if ($kept | length) > 0 then $kept[-1].seconds else 0 end)),
         cosine: (if ($kept | length) > 0 then $kept[-1].cosine else 1 end),
         kld: (if ($kept | length) > 0 then $kept[-1].kld else 0 end)}
    ' "$dir/report.json" >"$dir/map-$n.json"
    if [[ ! -f "$dir/ppl-$n.json" ]]; then
      echo "== perplexity: $name N=$n $(jq -c .map.source "$dir/map-$n.json")" >&2
      "$KVSHARER" share "${MODEL_ARGS[@]}" --map "$dir/map-$n.json" -o "$OUT/model.gguf" 2>/dev/null
      "$KVSHARER" perplexity -m "$OUT/model.gguf" -t "$THREADS" -f "$HELDOUT" -c 512 \
        "${CHUNK_ARGS[@]}" --kv-share --json >"$dir/ppl-$n.json"
      rm -f "$OUT/model.gguf"
    fi
  done
done

# Markdown table.
first="$OUT/${ORDER[0]}/ppl-$(cut -d' ' -f1 <<<"$NS").json"
base_ppl=$(jq '.comparison.ppl_base.value' "$first")
base_kv=$(jq '.comparison.base_kv_bytes' "$first")
chunks=$(jq '.comparison.n_chunks' "$first")
printf 'Held-out text %s, %s chunks of 512 tokens; unshared perplexity %.3f, KV %s bytes.\n\n' \
  "$HELDOUT" "$chunks" "$base_ppl" "$base_kv"
echo "| N | strategy | PPL | PPL / unshared | mean KLD | top-1 agree | KV bytes | search s | calib. KLD | calib. cosine | map |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for n in $NS; do
  for name in "${ORDER[@]}"; do
    dir="$OUT/$name"
    m="$dir/map-$n.json"
    p="$dir/ppl-$n.json"
    jq -r --arg name "$name" --slurpfile m "$m" '
      .comparison as $c | $m[0] as $m
      | ($m.map.source | to_entries | map(select(.key != .value) | "\(.key)<-\(.value)") | join(" ")) as $pairs
      | "| \($m.shared) | \($name) | \($c.ppl_test.value * 1000 | round / 1000) | \($c.ppl_ratio.value * 100 | round / 100) | \($c.kld.value * 10000 | round / 10000) | \($c.same_top.value * 1000 | round / 10)% | \($c.test_kv_bytes) | \($m.seconds | round) | \(if $m.kld == null then "-" else ($m.kld * 10000 | round / 10000) end) | \($m.cosine * 10000 | round / 10000) | \($pairs) |"
    ' "$p"
  done
done
