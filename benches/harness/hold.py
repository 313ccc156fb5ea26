#!/usr/bin/env python3
"""Holds many concurrent TCP connections open, for the RSS-under-1,000-connections figure.

  hold.py server HOST PORT   echo server (asyncio): answers each byte it receives
  hold.py client HOST PORT N opens N connections, round-trips one (non-HTTP) byte on each (so every
                             connection is established end to end through the proxies),
                             prints `ready <opened>`, holds them until a line arrives on stdin,
                             then closes them all and exits
"""

import asyncio
import socket
import sys


async def serve(host, port):
    async def handle(r, w):
        try:
            while data := await r.read(4096):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(handle, host, port, backlog=4096)
    async with srv:
        await srv.serve_forever()


def client(host, port, n):
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        # A byte no HTTP request starts with: tern's protocol detection calls the connection
        # opaque at once (a letter could begin a method, and detection would wait for more).
        s.sendall(b"\x00")
        if s.recv(1) != b"\x00":
            raise SystemExit("hold client: bad echo")
        socks.append(s)
    print(f"ready {len(socks)}", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        asyncio.run(serve(host, port))
    else:
        client(host, port, int(sys.argv[4]))
