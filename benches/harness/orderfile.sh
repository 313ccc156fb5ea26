#!/usr/bin/env bash
# Regenerates benches/harness/tern.order, the link-time function order that build.rs hands to lld
# (`--symbol-ordering-file`): every function a real run executes, startup ones first, then the
# request path, so the code an idle or busy sidecar touches sits in few, contiguous pages of
# .text instead of being spread over the whole 25 MB binary (idle RSS is file-backed text pages,
# benches/README.md "Idle memory").
#
#   cargo build --release && benches/harness/orderfile.sh      (needs root for its network namespace,
#                                                               valgrind, nginx, curl, openssl, python3)
#
# It runs six terns under callgrind in a private network namespace (tern-orderfile-$$): a plain
# pair, an mTLS mesh pair over HTTP/1 and a mesh pair over h2, each with an nginx origin. Each tern
# starts, gets one /metrics scrape and then dumps its counters ("startup"); then HTTP/1, h2, a
# non-HTTP (TCP) payload and another scrape go through the pair ("request"). The output lists the
# mangled names of the functions in the tern binary that ran: startup first, then the rest, each
# group in the order of its callgrind file (not significant). Stale names after a code change only
# lose their effect: lld ignores unknown symbols (build.rs passes --no-warn-symbol-ordering).
#
#   benches/harness/orderfile.sh --check   prints how many of the file's names the release binary
#                                          has (needs nm); regenerate when it falls (a few hundred
#                                          missing names cost megabytes: benches/README.md,
#                                          "Keeping the order file fresh"); exit 1 below 95%.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tern=$(realpath "${TERN_BIN:-$here/../../target/release/tern}")
if [[ ${1:-} == --check ]]; then
  total=$(sort -u "$here/tern.order" | grep -c . || true)
  found=$(nm "$tern" | awk '{print $NF}' | sort -u | comm -12 <(sort -u "$here/tern.order") - | grep -c . || true)
  echo "$found of $total names of tern.order are in $tern ($((100 * found / (total > 0 ? total : 1)))%)"
  (( total > 0 && found * 20 >= total * 19 ))
  exit
fi
out=${1:-$here/tern.order}
if [[ ${ORDERFILE_IN_NETNS:-} != 1 ]]; then
  ns=tern-orderfile-$$
  ip netns add "$ns"
  trap 'ip netns del "$ns"' EXIT
  ip netns exec "$ns" ip link set lo up
  ORDERFILE_IN_NETNS=1 TERN_BIN="$tern" ip netns exec "$ns" "$0" "$out"
  exit
fi
w=$(mktemp -d /tmp/tern-orderfile.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
mkdir -p "$w/ng"
cat > "$w/ng/nginx.conf" <<NG
daemon off; master_process off; worker_processes 1; pid $w/ng/nginx.pid; error_log stderr error;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $w/ng; proxy_temp_path $w/ng; fastcgi_temp_path $w/ng;
  uwsgi_temp_path $w/ng; scgi_temp_path $w/ng;
  server { listen 127.0.0.1:18080; location / { return 200 "hello from the origin\n"; } }
  server { listen 127.0.0.1:18082 http2; location / { return 200 "hello over h2\n"; } } }
NG
nginx -c "$w/ng/nginx.conf" 2>"$w/nginx.log" & pids+=($!)
"$here/mkid.sh" "$w/ids" a b
cg=(valgrind --tool=callgrind --demangle=no)
# start NAME ARGS...: a tern under callgrind, waits until its admin port answers /metrics, dumps.
declare -A admin
start() {
  local name=$1; shift
  local a; a=$(sed -n 's/.*--admin-addr \([^ ]*\).*/\1/p' <<<"$*")
  TERN_LOG=warn "${cg[@]}" --callgrind-out-file="$w/$name.out" "$tern" proxy --workers 1 "$@" \
    2>"$w/$name.log" & pids+=($!); admin[$name]=$a; eval "pid_$name=$!"
}
ready_and_dump() {
  local name=$1 p; p=$(eval "echo \$pid_$name")
  for _ in $(seq 1 120); do curl -s -m 2 -o /dev/null "${admin[$name]}/metrics" && break; sleep 0.5; done
  curl -sf -o /dev/null "${admin[$name]}/metrics"
  callgrind_control -d "$p" >/dev/null
}
# plain pair: c1 → s1 → nginx (HTTP/1 port)
start s1 --admin-addr 127.0.0.1:14191 --outbound-addrs 127.0.0.1:14140 --inbound-addr 127.0.0.1:14143 --inbound-target 127.0.0.1:18080
start c1 --admin-addr 127.0.0.1:15191 --outbound-addrs 127.0.0.1:15001 --inbound-addr 127.0.0.1:15143 --outbound-target 127.0.0.1:14143
# mesh pairs: c2 → (mTLS) s2 → nginx HTTP/1; c3 → (mTLS) s3 → nginx h2
disc() {
  printf 'services:\n  - name: origin\n    endpoints:\n      - address: "127.0.0.1:%s"\n        identity: spiffe://bench.local/ns/bench/sa/b\n        mesh_port: %s\n' "$1" "$2" > "$w/disc$2.yaml"
}
disc 18080 16143; disc 18082 17143
start s2 --admin-addr 127.0.0.1:16191 --outbound-addrs 127.0.0.1:16140 --inbound-addr 127.0.0.1:16143 --inbound-target 127.0.0.1:18080 --identity-dir "$w/ids/b"
start c2 --admin-addr 127.0.0.1:16291 --outbound-addrs 127.0.0.1:16001 --inbound-addr 127.0.0.1:16243 --outbound-target 127.0.0.1:18080 --identity-dir "$w/ids/a" --discovery-file "$w/disc16143.yaml"
start s3 --admin-addr 127.0.0.1:17191 --outbound-addrs 127.0.0.1:17140 --inbound-addr 127.0.0.1:17143 --inbound-target 127.0.0.1:18082 --identity-dir "$w/ids/b"
start c3 --admin-addr 127.0.0.1:17291 --outbound-addrs 127.0.0.1:17001 --inbound-addr 127.0.0.1:17243 --outbound-target 127.0.0.1:18082 --identity-dir "$w/ids/a" --discovery-file "$w/disc17143.yaml"
for n in s1 c1 s2 c2 s3 c3; do ready_and_dump $n; done
traffic() { # PORT: HTTP/1 (keep-alive and not), h2 prior knowledge, a POST body, a non-HTTP payload
  local u=http://127.0.0.1:$1/
  for _ in 1 2 3; do curl -s -o /dev/null -o /dev/null "$u" "$u" || true; done
  curl -s -o /dev/null -X POST --data-binary @"$w/ng/nginx.conf" "$u" || true
  curl -s -o /dev/null -o /dev/null --http2-prior-knowledge "$u" "$u" || true
  python3 - "$1" <<'PY' || true
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
s.sendall(b"\x16\x00 not http at all\r\n\r\n"); s.settimeout(3)
try: s.recv(4096)
except OSError: pass
s.close()
PY
}
traffic 15001; traffic 16001; traffic 17001
for n in s1 c1 s2 c2 s3 c3; do curl -s -o /dev/null "${admin[$n]}/metrics"; done
sleep 2
for n in s1 c1 s2 c2 s3 c3; do p=$(eval "echo \$pid_$n"); kill "$p"; wait "$p" 2>/dev/null || true; done
# Names of the tern binary's functions that ran in the given callgrind files (compressed names:
# "fn=(id) name" defines an id, "fn=(id)" refers to it; ob= says which object the costs belong to).
names() {
  awk -v bin="$tern" '
    FNR == 1 { delete name; delete obn; cur = "" }   # ids are per file
    function key(s,   id) { id = s; sub(/\).*/, "", id); sub(/^\(/, "", id); return id }
    function def(s, arr,   id, nm) { id = key(s); nm = s; if (sub(/^\([0-9]+\) /, "", nm)) arr[id] = nm; return id }
    /^ob=/ { cur = obn[def(substr($0, 4), obn)]; next }
    /^cob=/ { def(substr($0, 5), obn); next }
    /^cfn=/ { def(substr($0, 5), name); next }
    /^fn=/ { id = def(substr($0, 4), name); if (cur == bin && !(name[id] in seen)) { seen[name[id]] = 1; print name[id] } }
  ' "$@"
}
names "$w"/*.out.1 | awk '!s[$0]++' > "$w/startup"
names "$w"/*.out | awk '!s[$0]++' > "$w/request"
{ echo "# generated by benches/harness/orderfile.sh from $(rustc -V) (names carry its hashes); see benches/README.md \"Idle memory\""
  cat "$w/startup"; grep -vxFf "$w/startup" "$w/request" || true
} | grep -v '^$' > "$out"
echo "$(wc -l < "$w/startup") startup + $(( $(wc -l < "$out") - 1 - $(wc -l < "$w/startup") )) request functions → $out (work dir $w)"
