#!/usr/bin/env bash
# Idle RSS of `tern proxy`, the issue 7 figure: N starts (default 3), each read 3 s after start,
# after one /metrics scrape. Prints VmRSS, RssFile, RssAnon and the Rss of the binary's
# executable (text) mapping, in MiB. Fixed loopback ports: run it in your own network namespace.
#
#   benches/harness/idle_rss.sh [plain|identity] [N]      (BIN=path/to/tern to pick a binary,
#                                                          COLD=1 to start from a cold page cache)
set -euo pipefail
mode=${1:-identity}; n=${2:-3}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin=$(realpath "${BIN:-$here/../../target/release/tern}")
w=$(mktemp -d /tmp/tern-idle.XXXXXX)
args=(proxy --log warn --admin-addr 127.0.0.1:19291 --outbound-addrs 127.0.0.1:19240
      --inbound-addr 127.0.0.1:19243 --outbound-target 127.0.0.1:19000)
if [[ $mode == identity ]]; then "$here/mkid.sh" "$w/ids" a; args+=(--identity-dir "$w/ids/a"); fi
for _ in $(seq 1 "$n"); do
  # COLD=1: drop the binary's pages from the page cache first, so they come back through mmap
  # read-around (small folios) as after a fresh image pull, not as large folios written by cp/ld.
  if [[ ${COLD:-} == 1 ]]; then
    python3 -c 'import os,sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$bin"
  fi
  "$bin" "${args[@]}" & p=$!
  sleep 2; curl -sf -o /dev/null 127.0.0.1:19291/metrics; sleep 1
  kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$p/status"; }
  text=$(awk -v b="$bin" '/^[0-9a-f]+-[0-9a-f]+ / {x = ($2 ~ /x/ && $6 == b)} x && $1 == "Rss:" {s += $2} END {print s}' "/proc/$p/smaps")
  printf '%s VmRSS %.1f RssFile %.1f RssAnon %.2f text %.1f MiB\n' "$mode" \
    "$(bc -l <<<"$(kb VmRSS)/1024")" "$(bc -l <<<"$(kb RssFile)/1024")" \
    "$(bc -l <<<"$(kb RssAnon)/1024")" "$(bc -l <<<"$text/1024")"
  kill "$p"; wait "$p" 2>/dev/null || true
done
rm -rf "$w"
