#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with the Rust toolchain.
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

say "checking formatting (cargo fmt)"
cargo fmt --all -- --check

say "linting (cargo clippy -D warnings); the first build compiles RocksDB, 10-15 min"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The Kafka tests run against a real Kafka-protocol broker, tansu, which they
# start themselves (one per test) from this binary.
KASSA_TANSU="$(bash scripts/tansu.sh install)"
export KASSA_TANSU

say "running every test (cargo test)"
cargo test --workspace --locked --no-fail-fast
