"""Opens one mTLS connection to a tern mesh port and prints the server's leaf certificate as
base64 DER (the body of its PEM). Run as the proxy's UID so iptables leaves it alone.

python3 tls_peer.py <host> <port> <identity dir>
"""
import base64
import socket
import ssl
import sys

host, port, d = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False  # SPIFFE leaves name no host; the chain is still verified
ctx.load_verify_locations(d + "/ca.crt")
ctx.load_cert_chain(d + "/tls.crt", d + "/tls.key")
ctx.set_alpn_protocols(["tern/1"])
with socket.create_connection((host, port), timeout=10) as s:
    with ctx.wrap_socket(s) as t:
        print(base64.b64encode(t.getpeercert(binary_form=True)).decode())
