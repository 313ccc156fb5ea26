#!/bin/bash
# Usage: cargo build --release && benches/harness/rss_burst.sh   (N=1000 AFTER=15 by default 10)
# Runs on loopback, explicit mode, no root needed. Prints VmRSS idle, holding N, and AFTER s later.
# RSS of one tern proxy: idle, holding N connections, and after they close.
BIN=${BIN:-$(dirname "$0")/../../target/release/tern}; N=${N:-1000}
ulimit -n 65536 2>/dev/null || true
python3 $(dirname "$0")/hold.py server 127.0.0.1 19000 & SRV=$!
sleep 0.5
$BIN proxy --outbound-addrs 127.0.0.1:19140 --inbound-addr 127.0.0.1:19143 --admin-addr 127.0.0.1:19191 --outbound-target 127.0.0.1:19000 --log warn & P=$!
sleep 0.5
rss() { awk '/^(VmRSS|RssAnon|RssFile):/ {printf "%s %.1f  ", $1, $2/1024} END {print "MiB"}' /proc/$P/status; }
echo "idle: $(rss)"
coproc HOLD { python3 $(dirname "$0")/hold.py client 127.0.0.1 19140 $N; }
read -r line <&"${HOLD[0]}"; echo "$line"
echo "holding $N: $(rss)"
echo >&"${HOLD[1]}"; wait $HOLD_PID 2>/dev/null
sleep ${AFTER:-10}
echo "${AFTER:-10}s after close: $(rss)"
kill $P $SRV; wait 2>/dev/null
