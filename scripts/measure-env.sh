# Sourced by the quality measurement scripts (frontier.sh, adapters.sh) from the
# repository root. Sets K (the binary: $KVSHARER_BIN, so a long run does not pick
# up a rebuild half way, or a fresh release build), T (THREADS, default 2), CHUNKS
# (default 6) and MODEL (the default model's path, fetched if need be).
if [ -n "${KVSHARER_BIN:-}" ]; then K="$KVSHARER_BIN"; else cargo build --release --quiet; K=target/release/kvsharer; fi
T="${THREADS:-2}"
CHUNKS="${CHUNKS:-6}"
MODEL="$($K info 2>/dev/null | sed -n 's/^file: *\(.*\) (.*/\1/p')"
echo "model: $MODEL" >&2
