#!/usr/bin/env bash
# The pipeline benchmark over Kafka: a fresh tansu broker (a real Kafka-protocol
# broker) on a loopback port, Kassa's topics, then `kassa bench --bus kafka`.
# Usage: scripts/bench-kafka.sh [PAYMENTS]   (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

payments="${1:-20000}"
say "building kassa (release)"
cargo build --release --locked -p kassa
kassa="${CARGO_TARGET_DIR}/release/kassa"
broker_dir="$(mktemp -d)"
port=19092
trap 'bash scripts/tansu.sh stop "${broker_dir}"; rm -rf "${broker_dir}"' EXIT
bash scripts/tansu.sh start "${broker_dir}" "${port}"
"${kassa}" kafka init-topics --brokers "127.0.0.1:${port}"
say "pipeline benchmark over Kafka (tansu): ${payments} payments"
KASSA_LOG="${KASSA_LOG:-warn}" "${kassa}" bench --bus kafka --brokers "127.0.0.1:${port}" --payments "${payments}"
