#!/usr/bin/env bash
# Load against `kvsharer serve` and llama.cpp's llama-server, side by side in one
# run: the same model, slots, per-slot context, threads and requests (K concurrent
# streaming clients for T seconds, loopback only; scripts/load.py). Prints, per
# server and client count: requests, failures, p50/p99 time to first token, total
# generated tokens/s; then the issue's goals, and how many slots one --kv-memory
# holds with a smaller cache per slot. Run it on an otherwise idle machine.
#
#   bash scripts/load.sh [SECONDS=60] [CLIENTS=4] [MAX_TOKENS=128]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
clients=${2:-4}
max_tokens=${3:-128}
ctx=1024
threads=${THREADS:-2}
out=${OUT:-/tmp/kvsharer-load}
mkdir -p "$out"

cargo build --release -q
kvsharer=target/release/kvsharer
"$kvsharer" info >/dev/null # fetches the default model on first use
model=${MODEL:-$HOME/.cache/kvsharer/SmolLM2-135M-Instruct.Q4_1.gguf}
llama_server=$(bash scripts/build_llama_server.sh)

wait_port() {
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$1/health" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on port $1 did not come up" >&2
  return 1
}

run_one() { # name port clients -- server command...
  local name=$1 port=$2 k=$3
  shift 4
  "$@" >"$out/$name-$k.log" 2>&1 &
  local pid=$!
  wait_port "$port"
  # One short warm-up request, not counted.
  python3 scripts/load.py "http://127.0.0.1:$port/v1" 1 0.1 8 --label warmup >/dev/null
  python3 scripts/load.py "http://127.0.0.1:$port/v1" "$k" "$secs" "$max_tokens" \
    --label "$name" --json "$out/$name-$k.json"
  kill -INT "$pid"
  wait "$pid" || true
}

echo "== load: $secs s, max_tokens $max_tokens, -c $ctx per slot, $threads threads, model $(basename "$model")"
for k in 1 "$clients"; do
  run_one kvsharer 18181 "$k" -- "$kvsharer" serve -m "$model" --port 18181 -P "$k" -c "$ctx" -t "$threads" -b 512
  # llama-server's -c is the whole cache: -np slots of -c/np tokens each.
  run_one llama-server 18182 "$k" -- "$llama_server" -m "$model" --port 18182 -np "$k" -c $((ctx * k)) \
    -t "$threads" -tb "$threads" -b 512 --no-webui
done

python3 - "$out" "$clients" <<'EOF'
import json, sys
out, k = sys.argv[1], int(sys.argv[2])
r = {(n, c): json.load(open(f"{out}/{n}-{c}.json")) for n in ("kvsharer", "llama-server") for c in (1, k)}
print()
print("| server | clients | requests | failed | TTFT p50 ms | TTFT p99 ms | tokens/s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for (n, c), v in r.items():
    print(f"| {n} | {c} | {v['requests']} | {v['failures']} | {v['ttft_p50_ms']} | {v['ttft_p99_ms']} | {v['tokens_per_s']} |")
scale = r[("kvsharer", k)]["tokens_per_s"] / r[("kvsharer", 1)]["tokens_per_s"]
vs = r[("kvsharer", k)]["tokens_per_s"] / r[("llama-server", k)]["tokens_per_s"]
fails = sum(v["failures"] for (n, _), v in r.items() if n == "kvsharer")
print()
print(f"goal: {k} streams >= 2x one stream: {scale:.2f}x -> {'met' if scale >= 2 else 'MISSED'}")
print(f"goal: {k} slots >= 1.0x llama-server: {vs:.2f}x -> {'met' if vs >= 1 else 'MISSED'}")
print(f"goal: 0 failed requests: {fails} -> {'met' if fails == 0 else 'MISSED'}")
EOF

echo
echo "== slots in one --kv-memory (512MiB, -c 4096): unshared f16 vs a 25%-smaller cache"
for flags in "" "--cache-type-k q8_0 --cache-type-v f16" "--kv-budget 75%"; do
  # shellcheck disable=SC2086
  line=$("$kvsharer" serve -m "$model" -c 4096 --kv-memory 512MiB $flags --dry-run 2>&1 | grep -- '--kv-memory')
  echo "${flags:-(unshared f16)}: $line"
done
