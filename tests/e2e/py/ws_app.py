"""WebSocket echo server and client for the e2e tests (the `websockets` package).

python3 ws_app.py server <host> <port>
python3 ws_app.py client <host> <port>   prints "ok <n> messages" when every echo came back
"""
import asyncio
import sys

import websockets


async def serve(host, port):
    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    async with websockets.serve(echo, host, port, max_size=None):
        await asyncio.Future()


async def client(host, port):
    msgs = ["hello", "x" * 100_000, bytes(range(256)) * 1024] + [f"m{i}" for i in range(20)]
    async with websockets.connect(f"ws://{host}:{port}/echo", max_size=None, open_timeout=10, compression=None) as ws:
        for m in msgs:
            await ws.send(m)
            got = await asyncio.wait_for(ws.recv(), 10)
            if got != m:
                print("mismatch", flush=True)
                return
    print(f"ok {len(msgs)} messages", flush=True)


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(serve(host, port) if mode == "server" else client(host, port))
