#!/usr/bin/env bash
# Benchmarks: event log throughput (durable), codec/domain micro-benchmarks,
# and the in-process pipeline. Figures are recorded in BENCHMARKS.md.
# Usage: scripts/bench.sh [kassa bench flags, e.g. --payments 100000 --concurrency 2048]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
say "event log benchmark (release build)"
cargo bench --locked -p kassa-benches --bench eventlog
say "codec and domain micro-benchmarks (criterion)"
cargo bench --locked -p kassa-benches --bench codec -- --noplot --warm-up-time 1 --measurement-time 3
say "routing + risk decision time (criterion, then p50/p99 of single decisions)"
cargo bench --locked -p kassa-benches --bench routing -- --noplot --warm-up-time 1 --measurement-time 3
say "pipeline benchmark: kassa bench $*"
cargo build --release --locked -p kassa
"${CARGO_TARGET_DIR}/release/kassa" bench "$@"
