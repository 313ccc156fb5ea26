"""HTTP/1.1 app whose behaviour a test switches at run time: python3 fault_app.py <host> <port> <mode-file>

Every request reads <mode-file> (a missing or empty file means "ok"):
  ok          answer 200 "<host>\n"
  slow <ms>   sleep <ms> milliseconds, then answer 200
  fail <code> answer <code> at once
Keep-alive throughout; no request log.
"""
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT, MODE_FILE = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def mode():
    try:
        with open(MODE_FILE) as f:
            parts = f.read().split()
    except OSError:
        parts = []
    return parts or ["ok"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are separate writes: without TCP_NODELAY, Nagle's algorithm and the peer's
    # delayed ACK add 40 ms to every response.
    disable_nagle_algorithm = True

    def do_GET(self):
        m = mode()
        code = 200
        if m[0] == "slow":
            time.sleep(int(m[1]) / 1000.0)
        elif m[0] == "fail":
            code = int(m[1])
        body = f"{HOST}\n".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


Server((HOST, PORT), Handler).serve_forever()
