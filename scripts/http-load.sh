#!/usr/bin/env bash
# HTTP load figure: POST /v1/payments from a separate process (wrk) against a
# release `kassa up` on a fresh data directory. Loopback only; bounded in time.
# Usage: scripts/http-load.sh [seconds] [connections]
# The simulated acquirers run in process by default, so the figure is Kassa's
# own; SIMULATOR_TRANSPORT=http puts them behind HTTP on loopback (kassa up's
# default), which spends this machine's CPU on both ends of every provider call.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
seconds="${1:-10}"
connections="${2:-256}"
if ! command -v wrk >/dev/null 2>&1; then
  say "installing wrk (Debian package) for the load"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y -qq wrk
fi
say "building kassa (release)"
cargo build --release --locked -p kassa
data="$(mktemp -d)"
port=18$((RANDOM % 900 + 100))
transport="${SIMULATOR_TRANSPORT:-in_process}"
printf 'simulator_transport = "%s"\n' "$transport" > "$data/kassa.toml"
say "simulated acquirers: ${transport}"
"${CARGO_TARGET_DIR}/release/kassa" up --data-dir "$data" --config "$data/kassa.toml" --listen "127.0.0.1:${port}" >/dev/null 2>"$data/kassa.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:${port}/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
export KASSA_KEY="$(cat "$data/demo-merchant.key")"
say "wrk: ${seconds}s, ${connections} connections, 2 threads, POST /v1/payments (approve card, auto-capture)"
wrk -t2 -c"${connections}" -d"${seconds}s" --latency -s scripts/http-load.lua "http://127.0.0.1:${port}/v1/payments"
