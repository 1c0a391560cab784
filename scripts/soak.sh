#!/usr/bin/env bash
# Soak of `kvsharer serve` (issue: 30 minutes of mixed requests, disconnects and
# bad requests included; no failed good request; RSS flat after warm-up).
#   bash scripts/soak.sh [MINUTES=30] [extra serve flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
shift || true
cargo build --release -q
port=18183
target/release/kvsharer serve --port "$port" -P 4 -c 1024 "$@" >/tmp/kvsharer-soak-server.log 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
status=0
python3 scripts/soak.py "http://127.0.0.1:$port/v1" "$pid" "$minutes" || status=$?
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^kvsharer_(requests|generated)' || true
kill -INT "$pid"
wait "$pid" && echo "serve exited 0 on SIGINT" || { echo "serve exited $?"; status=1; }
trap - EXIT
exit $status
