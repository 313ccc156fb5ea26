"""HTTP/1.1 app for the e2e tests: python3 http_app.py <host> <port>

GET /status/<code>  answers <code>;
GET <path>          answers "hello <path> client-id=<tern-client-id header>";
POST <path>         reads the body (Content-Length or chunked; Expect: 100-continue is answered by
                    http.server) and answers "<chunked|length> <len> <sha256>".
Every response echoes an X-Marker request header as X-Marker-Echo. Keep-alive throughout.
"""
import hashlib
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        marker = self.headers.get("X-Marker")
        if marker:
            self.send_header("X-Marker-Echo", marker)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/status/"):
            self.reply(int(self.path.split("/")[2]), b"status\n")
            return
        client = self.headers.get("tern-client-id", "")
        self.reply(200, f"hello {self.path} client-id={client}\n".encode())

    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            framing = "chunked"
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            framing = "length"
        digest = hashlib.sha256(body).hexdigest()
        self.reply(200, f"{framing} {len(body)} {digest}\n".encode())

    def log_message(self, *args):
        pass


ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
