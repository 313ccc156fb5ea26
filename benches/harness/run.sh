#!/usr/bin/env bash
# One command for the side-by-side benchmark: builds tern (release), builds the pods, runs every
# scenario interleaved, writes benches/out/<date>/raw.csv and benches/RESULTS.md.
#
#   sudo benches/harness/run.sh              # full run: 5 repetitions, 10 s per measurement
#   sudo BENCH_QUICK=1 benches/harness/run.sh  # quick: 1 repetition, 3 s per measurement
#
# Knobs (env): BENCH_REPS, BENCH_DURATION, BENCH_SCENARIOS, BENCH_PROTOCOLS, BENCH_RATES,
# BENCH_BURST_WAIT, TERN_BIN (skip the build and use this binary). See benches/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

if [[ $EUID -ne 0 ]]; then
  echo "bench: needs root (network namespaces, iptables); run with sudo" >&2
  exit 1
fi
if [[ -z "${TERN_BIN:-}" ]]; then
  cargo build --release --locked --bin tern
fi
export PATH="$PATH:$HOME/.cargo/bin"
cmd="benches/harness/run.sh"
for v in BENCH_QUICK BENCH_NICE BENCH_REPS BENCH_DURATION BENCH_SCENARIOS BENCH_PROTOCOLS BENCH_RATES BENCH_BURST_WAIT; do
  if [[ -n "${!v:-}" ]]; then cmd="$v=${!v} $cmd"; fi
done
export BENCH_COMMAND="$cmd"
exec python3 "$here/bench.py"
