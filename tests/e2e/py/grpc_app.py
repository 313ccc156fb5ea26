"""gRPC server and client for the e2e tests, with generic handlers on raw bytes (no codegen).

python3 grpc_app.py server <host> <port>
python3 grpc_app.py client <host> <port>   prints one "ok <call>" line per call that behaved
python3 grpc_app.py load <host> <port> <n> <in-flight>
    <n> Unary calls over ONE channel (one HTTP/2 connection), <in-flight> at a time; prints
    "ok <succeeded> failed <failed> p50_ms <p50> p99_ms <p99>"

Service tern.e2e.Test: Unary (echo), ClientStream (count and join), ServerStream (n items),
Bidi (echo each), NotFound (fails with NOT_FOUND), Big (echoes a 3 MiB message back).
"""
import hashlib
import sys
from concurrent import futures

import grpc

MIB = 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", 16 * MIB),
    ("grpc.max_receive_message_length", 16 * MIB),
    # No proxy from the environment: the connection must go through tern's iptables redirect.
    ("grpc.enable_http_proxy", 0),
]
TIMEOUT = 20


def same(b):
    return b


def serve(host, port):
    def unary(req, ctx):
        return b"unary:" + req

    def client_stream(it, ctx):
        parts = list(it)
        return b"client_stream:%d:%s" % (len(parts), b"".join(parts))

    def server_stream(req, ctx):
        for i in range(int(req)):
            yield b"item %d" % i

    def bidi(it, ctx):
        for m in it:
            yield b"echo:" + m

    def not_found(req, ctx):
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def big(req, ctx):
        return req[::-1]

    kw = dict(request_deserializer=same, response_serializer=same)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **kw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **kw),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **kw),
        "NotFound": grpc.unary_unary_rpc_method_handler(not_found, **kw),
        "Big": grpc.unary_unary_rpc_method_handler(big, **kw),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tern.e2e.Test", handlers),)
    )
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    server.wait_for_termination()


def client(host, port):
    ch = grpc.insecure_channel(f"ipv4:{host}:{port}", options=OPTIONS)
    kw = dict(request_serializer=same, response_deserializer=same)
    m = lambda kind, name: getattr(ch, kind)(f"/tern.e2e.Test/{name}", **kw)

    if m("unary_unary", "Unary")(b"hi", timeout=TIMEOUT) == b"unary:hi":
        print("ok unary", flush=True)
    msgs = iter([b"a", b"b", b"c", b"d", b"e"])
    if m("stream_unary", "ClientStream")(msgs, timeout=TIMEOUT) == b"client_stream:5:abcde":
        print("ok client_stream", flush=True)
    items = list(m("unary_stream", "ServerStream")(b"7", timeout=TIMEOUT))
    if items == [b"item %d" % i for i in range(7)]:
        print("ok server_stream", flush=True)
    sent = [b"m%d" % i for i in range(6)]
    got = list(m("stream_stream", "Bidi")(iter(sent), timeout=TIMEOUT))
    if got == [b"echo:" + s for s in sent]:
        print("ok bidi", flush=True)
    try:
        m("unary_unary", "NotFound")(b"x", timeout=TIMEOUT)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND and e.details() == "no such thing":
            print("ok not_found", flush=True)
    data = bytes(range(256)) * (3 * MIB // 256)
    back = m("unary_unary", "Big")(data, timeout=TIMEOUT)
    if len(back) == 3 * MIB and hashlib.sha256(back).digest() == hashlib.sha256(data[::-1]).digest():
        print("ok big", flush=True)
    ch.close()


def load(host, port, n, in_flight):
    import threading
    import time

    ch = grpc.insecure_channel(f"ipv4:{host}:{port}", options=OPTIONS)
    unary = ch.unary_unary("/tern.e2e.Test/Unary", request_serializer=same, response_deserializer=same)
    lock = threading.Lock()
    latencies, failed = [], [0]
    slots = threading.Semaphore(in_flight)
    done = threading.Event()
    pending = [n]

    def finished(started, fut):
        ok = fut.exception() is None and fut.result() == b"unary:x"
        with lock:
            if ok:
                latencies.append(time.monotonic() - started)
            else:
                failed[0] += 1
            pending[0] -= 1
            if pending[0] == 0:
                done.set()
        slots.release()

    for _ in range(n):
        slots.acquire()
        started = time.monotonic()
        fut = unary.future(b"x", timeout=TIMEOUT)
        fut.add_done_callback(lambda f, s=started: finished(s, f))
    done.wait(TIMEOUT * 4)
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1000 if latencies else float("nan")
    print("ok %d failed %d p50_ms %.3f p99_ms %.3f" % (len(latencies), failed[0], pct(0.5), pct(0.99)), flush=True)
    ch.close()


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        serve(host, port)
    elif mode == "load":
        load(host, port, int(sys.argv[4]), int(sys.argv[5]))
    else:
        client(host, port)
