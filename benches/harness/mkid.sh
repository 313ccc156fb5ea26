#!/usr/bin/env bash
# Mints a throwaway SPIFFE CA and one identity directory per name (tls.crt, tls.key, ca.crt, the
# layout csi-driver-spiffe writes), for the benchmark harness's mTLS scenarios.
#   mkid.sh OUTDIR NAME...   → OUTDIR/NAME/{tls.crt,tls.key,ca.crt}, OUTDIR/ca.{crt,key}
# Identities are spiffe://bench.local/ns/bench/sa/NAME; ECDSA P-256, valid one day.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
cd "$out"
if [ ! -f ca.key ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -days 1 -subj "/O=bench/CN=bench root" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectAltName=URI:spiffe://bench.local" -out ca.crt 2>/dev/null
fi
for name in "$@"; do
  mkdir -p "$name"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$name/tls.key" 2>/dev/null
  openssl req -new -key "$name/tls.key" -subj "/O=bench" -out "$name/tls.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=critical,URI:spiffe://bench.local/ns/bench/sa/$name" > "$name/ext.cnf"
  openssl x509 -req -in "$name/tls.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
    -extfile "$name/ext.cnf" -out "$name/tls.crt" 2>/dev/null
  cp ca.crt "$name/ca.crt"
  rm -f "$name/tls.csr" "$name/ext.cnf"
done
