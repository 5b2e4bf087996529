#!/usr/bin/env bash
# Run Kassa on its embedded default: all services in one process, serving its API.
# Usage: scripts/run.sh [kassa up flags, e.g. --data-dir DIR --listen ADDR]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

say "building kassa (release); the first build compiles RocksDB, 10-15 min"
cargo build --release --locked -p kassa
say "starting: kassa up $*"
exec "${CARGO_TARGET_DIR}/release/kassa" up "$@"
