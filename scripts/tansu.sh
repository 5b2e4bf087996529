#!/usr/bin/env bash
# tansu 0.6.0: a real Kafka-protocol broker that installs from the crate
# registry (Apache Kafka cannot be installed on these machines). Kassa's Kafka
# tests start their own brokers with it; this script installs it and runs one
# by hand.
#
# Usage:
#   scripts/tansu.sh install            build it once (about 10 min on 2 cores), print its path
#   scripts/tansu.sh start DIR [PORT]   a broker with its data in DIR on 127.0.0.1:PORT (default 9092)
#   scripts/tansu.sh stop DIR           stop the broker started on DIR
set -euo pipefail

say() { printf '==> %s\n' "$*" >&2; }

TANSU_VERSION=0.6.0
TANSU_ROOT="${KASSA_TOOLS_DIR:-${HOME}/.cache/kassa/tools}/tansu-${TANSU_VERSION}"
TANSU_BIN="${TANSU_ROOT}/bin/tansu"

install_tansu() {
  if [ -x "${TANSU_BIN}" ]; then
    say "tansu ${TANSU_VERSION} present: ${TANSU_BIN}"
  else
    say "installing tansu ${TANSU_VERSION} (a Kafka-protocol broker) from the crate registry; about 10 minutes the first time"
    # Its own target directory, kept, so a rebuild is incremental and never mixes with Kassa's.
    CARGO_TARGET_DIR="${HOME}/.cache/kassa/tansu-build" \
      cargo install tansu --version "${TANSU_VERSION}" --locked --features libsql --root "${TANSU_ROOT}"
  fi
  echo "${TANSU_BIN}"
}

case "${1:-}" in
  install)
    install_tansu
    ;;
  start)
    dir="${2:?usage: scripts/tansu.sh start DIR [PORT]}"
    port="${3:-9092}"
    bin="$(install_tansu)"
    mkdir -p "${dir}"
    cd "${dir}"
    # The sqlite path must be relative (to the broker's working directory).
    nohup "${bin}" broker \
      --listener-url "tcp://127.0.0.1:${port}" \
      --advertised-listener-url "tcp://127.0.0.1:${port}" \
      --storage-engine "sqlite://tansu.db" > tansu.log 2>&1 &
    echo $! > tansu.pid
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
        say "tansu listening on 127.0.0.1:${port} (pid $(cat tansu.pid), data and log in ${dir})"
        exit 0
      fi
      sleep 0.1
    done
    say "tansu did not start listening on ${port}; see ${dir}/tansu.log"
    exit 1
    ;;
  stop)
    dir="${2:?usage: scripts/tansu.sh stop DIR}"
    if [ -f "${dir}/tansu.pid" ]; then
      kill "$(cat "${dir}/tansu.pid")" 2>/dev/null || true
      rm -f "${dir}/tansu.pid"
      say "tansu stopped"
    fi
    ;;
  *)
    sed -n '2,11p' "$0" >&2
    exit 2
    ;;
esac
