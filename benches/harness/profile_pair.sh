#!/usr/bin/env bash
# Instructions per request through a tern pair on loopback, under callgrind: the repeatable CPU
# figure on a noisy machine (issue 7). No root, no namespaces.
#
#   benches/harness/profile_pair.sh plain|mesh|h2c|mesh-h2c [N]   (N requests measured, default 5000)
#
# client tern (explicit outbound → 127.0.0.1:14143 plain, or → the origin over the mTLS mesh with
# a discovery file) → server tern (inbound → origin) → nginx origin.
# plain, mesh: HTTP/1.1 keep-alive (oha -c 16) to nginx on 127.0.0.1:18080.
# h2c, mesh-h2c: HTTP/2 with prior knowledge end to end (h2load -c 4 -m 10: 4 connections, 10
# streams each) to nginx `listen … http2` on 127.0.0.1:18081.
# Instrumentation is switched on after 500 warm-up requests; the callgrind files stay in the
# work directory it prints (open them with callgrind_annotate). Needs valgrind, nginx, oha,
# h2load (nghttp2-client), openssl.
set -euo pipefail
mode=${1:?plain, mesh, h2c or mesh-h2c}; n=${2:-5000}
case $mode in
  plain|mesh) origin=18080 ;;
  h2c|mesh-h2c) origin=18081 ;;
  *) echo "profile_pair: unknown mode $mode (plain, mesh, h2c, mesh-h2c)" >&2; exit 2 ;;
esac
# load N: N requests to the client tern (HTTP/1.1 with oha, or h2c with h2load)
load() {
  if [[ $origin == 18081 ]]; then
    h2load -n "$1" -c 4 -m 10 http://127.0.0.1:15001/
  else
    oha --no-tui -n "$1" -c 16 http://127.0.0.1:15001/
  fi
}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tern=${TERN_BIN:-$here/../../target/release/tern}
export PATH="$PATH:$HOME/.cargo/bin"
w=$(mktemp -d /tmp/tern-profile.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
mkdir -p "$w/ng"
cat > "$w/ng/nginx.conf" <<NG
daemon off; master_process off; worker_processes 1; pid $w/ng/nginx.pid; error_log stderr error;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $w/ng; proxy_temp_path $w/ng; fastcgi_temp_path $w/ng;
  uwsgi_temp_path $w/ng; scgi_temp_path $w/ng; keepalive_requests 100000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:18080; location / { return 200 "hello from the origin\n"; } }
  server { listen 127.0.0.1:18081 http2; location / { return 200 "hello from the origin\n"; } } }
NG
nginx -c "$w/ng/nginx.conf" 2>"$w/nginx.log" & pids+=($!)
cg=(valgrind --tool=callgrind --instr-atstart=no)
srv=(proxy --workers 1 --admin-addr 127.0.0.1:14191 --outbound-addrs 127.0.0.1:14140
     --inbound-addr 127.0.0.1:14143 --inbound-target 127.0.0.1:$origin)
cli=(proxy --workers 1 --admin-addr 127.0.0.1:15191 --outbound-addrs 127.0.0.1:15001
     --inbound-addr 127.0.0.1:15143)
if [[ $mode == mesh* ]]; then
  "$here/mkid.sh" "$w/ids" a b
  printf 'services:\n  - name: origin\n    endpoints:\n      - address: "127.0.0.1:%s"\n        identity: spiffe://bench.local/ns/bench/sa/b\n        mesh_port: 14143\n' "$origin" > "$w/disc.yaml"
  srv+=(--identity-dir "$w/ids/b")
  cli+=(--identity-dir "$w/ids/a" --discovery-file "$w/disc.yaml" --outbound-target 127.0.0.1:$origin)
else
  cli+=(--outbound-target 127.0.0.1:14143)
fi
TERN_LOG=warn "${cg[@]}" --callgrind-out-file="$w/server.out" "$tern" "${srv[@]}" 2>"$w/server.log" & spid=$!; pids+=($spid)
TERN_LOG=warn "${cg[@]}" --callgrind-out-file="$w/client.out" "$tern" "${cli[@]}" 2>"$w/client.log" & cpid=$!; pids+=($cpid)
for _ in $(seq 1 30); do curl -s -m 2 -o /dev/null 127.0.0.1:15001/ && break; sleep 1; done
load 500 >/dev/null
callgrind_control -i on >/dev/null
load "$n" | grep -E 'Success rate|Requests/sec|^requests:'
callgrind_control -i off >/dev/null
kill "$cpid" "$spid"; wait "$cpid" "$spid" 2>/dev/null || true
for r in client server; do
  ir=$(awk '/^totals:/{print $2}' "$w/$r.out")
  echo "$mode $r: $ir instructions, $((ir / n)) per request"
done
echo "callgrind files: $w/client.out $w/server.out"
