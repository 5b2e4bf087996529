#!/usr/bin/env bash
# Compare two builds of kassa on the pipeline benchmark, in alternating pairs.
#
# This machine's speed drifts by 15-35% within minutes, so two builds are
# compared run against run, back to back (A, B, A, B, ...), never against a
# figure measured earlier. Prints each run's figures and the averages.
#
# Usage: scripts/bench-pairs.sh KASSA_A KASSA_B [PAIRS] [kassa bench flags]
#   KASSA_A, KASSA_B: two kassa binaries (copy each build aside first, e.g.
#   cp "$CARGO_TARGET_DIR/release/kassa" /tmp/kassa-before).
#   PAIRS: how many pairs (default 5). Flags default to --payments 20000.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
a=$1 b=$2 pairs=${3:-5}
shift $(($# < 3 ? $# : 3))
flags=("$@")
[[ ${#flags[@]} -gt 0 ]] || flags=(--payments 20000)
for bin in "$a" "$b"; do
  [[ -x $bin ]] || { echo "not an executable: $bin" >&2; exit 2; }
done
[[ $pairs =~ ^[1-9][0-9]*$ ]] || { echo "PAIRS must be a positive whole number, not '$pairs'" >&2; exit 2; }

declare -A sum_rate=() sum_cpu=()
run() { # label binary
  local out rate cpu tail
  out=$("$2" bench "${flags[@]}" 2>&1) || { echo "$1: kassa bench failed:" >&2; echo "$out" | tail -5 >&2; exit 1; }
  rate=$(sed -nE 's/^through all four stages: ([0-9]+) payments.*/\1/p' <<<"$out")
  cpu=$(sed -nE 's/^CPU used: .* ([0-9]+) µs a payment.*/\1/p' <<<"$out")
  tail=$(sed -nE 's/.* ([0-9]+) ms after the last outcome.*/\1/p' <<<"$out")
  [[ -n $rate && -n $cpu ]] || { echo "$1: no figures in kassa bench's output:" >&2; echo "$out" | tail -5 >&2; exit 1; }
  printf '%s: %6s payments/s through all four stages, %4s µs a payment, tail %4s ms\n' "$1" "$rate" "$cpu" "$tail"
  sum_rate[$1]=$(( ${sum_rate[$1]:-0} + rate ))
  sum_cpu[$1]=$(( ${sum_cpu[$1]:-0} + cpu ))
}
for _ in $(seq "$pairs"); do
  run A "$a"
  run B "$b"
done
for label in A B; do
  printf 'average %s: %d payments/s, %d µs a payment (%d runs)\n' \
    "$label" $(( sum_rate[$label] / pairs )) $(( sum_cpu[$label] / pairs )) "$pairs"
done
