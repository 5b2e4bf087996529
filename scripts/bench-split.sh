#!/usr/bin/env bash
# End-to-end payments/s with the services as separate processes over Kafka:
# a fresh tansu broker, three `kassa provider-sim` processes, `kassa ingest`,
# `authorize`, `settle` and `reconcile` (release builds), and wrk sending
# POST /v1/payments to ingest (each answer waits for the payment's outcome).
# Each service's consumer lag is sampled every second (`kassa kafka lag`).
# Usage: scripts/bench-split.sh [SECONDS] [CONNECTIONS]   (default 20 s, 256)
# KAFKA_PROPERTIES="key=value …" passes librdkafka properties to every service.
# BROKERS=HOST:PORT[,…] runs against that cluster instead of a local tansu (a fresh
# one: services on new data directories read payments.events from its start).
# INSTANCES=N starts N each of authorize, settle and reconcile (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

seconds="${1:-20}"
connections="${2:-256}"
if ! command -v wrk >/dev/null 2>&1; then
  say "installing wrk (Debian package) for the load"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y -qq wrk
fi
say "building kassa (release)"
cargo build --release --locked -p kassa
kassa="${CARGO_TARGET_DIR}/release/kassa"
work="$(mktemp -d)"
external="${BROKERS:-}"
instances="${INSTANCES:-1}"
broker_port=19093
ingest_port=18090
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -z "${external}" ]; then bash scripts/tansu.sh stop "${work}/broker"; fi
  rm -rf "${work}"
}
trap cleanup EXIT
if [ -z "${external}" ]; then
  bash scripts/tansu.sh start "${work}/broker" "${broker_port}"
  brokers="127.0.0.1:${broker_port}"
else
  say "using the brokers at ${external}"
  brokers="${external}"
fi
"${kassa}" kafka init-topics --brokers "${brokers}"

echo "at_bench_operator" > "${work}/admin.token"
config="${work}/kassa.toml"
: > "${config}"
i=0
for name in acq-alpha acq-beta acq-gamma; do
  port=$((17111 + i)); control=$((17211 + i)); i=$((i + 1))
  "${kassa}" provider-sim --name "${name}" --listen "127.0.0.1:${port}" --control-listen "127.0.0.1:${control}" \
    --admin-token-file "${work}/admin.token" > /dev/null 2> "${work}/${name}.log" &
  pids+=($!)
  printf '[[providers]]\nname = "%s"\nurl = "http://127.0.0.1:%s"\n' "${name}" "${port}" >> "${config}"
done

common=(--bus kafka --brokers "${brokers}" --config "${config}" --admin-token-file "${work}/admin.token")
for property in ${KAFKA_PROPERTIES:-}; do common+=(--kafka-property "${property}"); done
export KASSA_LOG="${KASSA_LOG:-warn}"
names=(acq-alpha acq-beta acq-gamma)
start() { # SERVICE DATA [ARGS…]
  local service="$1" data="$2"; shift 2
  mkdir -p "${work}/${data}"
  "${kassa}" "${service}" "${common[@]}" --data-dir "${work}/${data}" "$@" > /dev/null 2> "${work}/${data}.log" &
  pids+=($!)
  names+=("${service}")
}
# CPU seconds each process has used so far, one per line (a local broker last).
cpu_seconds() {
  local broker=()
  if [ -z "${external}" ]; then broker=("$(cat "${work}/broker/tansu.pid")"); fi
  for pid in "${pids[@]}" "${broker[@]}"; do
    awk '{print ($14 + $15) / 100}' "/proc/${pid}/stat" 2>/dev/null || echo 0
  done
}
start ingest ingest --listen "127.0.0.1:${ingest_port}"
for _ in $(seq 1 200); do
  curl -fs "http://127.0.0.1:${ingest_port}/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
for k in $(seq 1 "${instances}"); do
  suffix=""; [ "${k}" -eq 1 ] || suffix="-${k}"
  start authorize "authorize${suffix}" --card-key "${work}/ingest/card.key"
  start settle "settle${suffix}" --cutoff-interval-s 5
  start reconcile "reconcile${suffix}"
done
sleep 2
export KASSA_KEY="$(cat "${work}/ingest/demo-merchant.key")"

# One payment through the idle pipeline: its latency and when each service recorded its events.
one_payment() {
  local started answer id
  started="$(date +%s%3N)"
  answer="$(curl -fs -X POST "http://127.0.0.1:${ingest_port}/v1/payments" -H "Authorization: Bearer ${KASSA_KEY}" \
    -H 'Content-Type: application/json' -H "Idempotency-Key: idle-$(date +%s%N)" \
    -d '{"amount": 1999, "currency": "EUR", "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}')"
  echo "  answered in $(( $(date +%s%3N) - started )) ms: $(echo "${answer}" | grep -o '"status":"[a-z_]*"')"
  id="$(echo "${answer}" | grep -o '"id":"pay_[^"]*"' | cut -d'"' -f4)"
  sleep 1
  curl -fs "http://127.0.0.1:${ingest_port}/v1/payments/${id}/events" -H "Authorization: Bearer ${KASSA_KEY}" \
    | grep -o '"at":"[^"]*"\|"type":"[a-z._]*"' | paste -d' ' - - | sed 's/^/    /' || true
}
say "one payment through the idle pipeline, three times:"
for _ in 1 2 3; do one_payment; done

# What every process spends with nothing to do (polling the broker), before the load.
mapfile -t idle_before < <(cpu_seconds)
sleep 5
mapfile -t idle_after < <(cpu_seconds)
say "CPU seconds over 5 s idle, before the load:"
idle_names=("${names[@]}")
if [ -z "${external}" ]; then idle_names+=(tansu); fi
for i in "${!idle_names[@]}"; do
  awk -v n="${idle_names[$i]}" -v a="${idle_after[$i]}" -v b="${idle_before[$i]}" 'BEGIN {printf "  %-10s %6.2f\n", n, a - b}'
done

"${kassa}" kafka lag --brokers "${brokers}" --every-s 1 > "${work}/lag.txt" 2>/dev/null &
lag_pid=$!
say "wrk: ${seconds}s, ${connections} connections, POST /v1/payments to kassa ingest (separate processes over Kafka)"
mapfile -t cpu_before < <(cpu_seconds)
wrk -t2 -c"${connections}" -d"${seconds}s" --latency -s scripts/http-load.lua "http://127.0.0.1:${ingest_port}/v1/payments"
mapfile -t cpu_after < <(cpu_seconds)
say "where the CPU went during the load (CPU seconds over ${seconds}s of wall time; $(nproc) cores = $(($(nproc) * seconds))):"
if [ -z "${external}" ]; then names+=(tansu); fi
for i in "${!names[@]}"; do
  awk -v n="${names[$i]}" -v a="${cpu_after[$i]}" -v b="${cpu_before[$i]}" 'BEGIN {printf "  %-10s %6.1f\n", n, a - b}'
done
say "draining: waiting for every service to catch up"
for _ in $(seq 1 60); do
  line="$("${kassa}" kafka lag --brokers "${brokers}" 2>/dev/null || true)"
  [ "$(echo "${line}" | grep -o ' lag 0 of ' | wc -l)" -eq 5 ] && break
  sleep 1
done
kill "${lag_pid}" 2>/dev/null || true
say "after the run: ${line}"
say "largest lag seen while loaded (sampled each second), per service:"
for group in kassa-ingest kassa-authorization kassa-settlement kassa-settlement-batches kassa-reconciliation; do
  max="$(grep -o "${group} [a-z.]* lag [0-9]*" "${work}/lag.txt" | awk '{print $4}' | sort -n | tail -1)"
  echo "  ${group}: ${max:-?}"
done
