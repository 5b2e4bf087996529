#!/usr/bin/env bash
# Benchmarks: event log throughput (durable) and codec/domain micro-benchmarks.
# Figures are recorded in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
say "event log benchmark (release build)"
cargo bench --locked -p kassa-benches --bench eventlog
say "codec and domain micro-benchmarks (criterion)"
cargo bench --locked -p kassa-benches --bench codec -- --noplot
