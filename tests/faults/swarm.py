"""
Many chargers in one process, for storm and drain tests.

    python -m tests.faults.swarm HOST PORT PREFIX FIRST COUNT

opens COUNT WebSockets to ws://HOST:PORT/ocpp/<PREFIX>-<n> (n from
FIRST), all at once, with plain asyncio sockets (a WebSocket library per
charger would make the client, not the gateway, the bottleneck). A 503 is
retried after its Retry-After, as a charger would. It prints JSON lines:

- C{{"event": "connected", "elapsed": s, "refused": n, "retry_after_max": s}}
  once every charger is connected (elapsed from the start);
- C{{"event": "closed", "codes": {code: n}, "first": t, "last": t}} once the
  gateway has closed every connection (t: time.time() of the first and
  last close frame).

It reads nothing else from the chargers (CALLs from the CSMS are left
unanswered) and ends when every connection is closed or stdin closes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import sys
import time


async def charger(host, port, identity, stats, connected_all, closes):
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats["errors"] += 1
            await asyncio.sleep(1)
            continue
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ocpp/{identity} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: ocpp1.6\r\n\r\n"
            ).encode()
        )
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            stats["errors"] += 1
            await asyncio.sleep(1)
            continue
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status == 101:
            break
        writer.close()
        retry_after = 1
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "retry-after":
                retry_after = int(value.strip())
        stats["refused"] += 1
        stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
        stats["retry_after_max"] = max(stats["retry_after_max"], retry_after)
        await asyncio.sleep(retry_after)
    stats["connected"] += 1
    if stats["connected"] == stats["total"]:
        connected_all.set()
    # read frames until the close frame (server frames are not masked)
    code = None
    try:
        while True:
            b0, b1 = await reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await reader.readexactly(8))
            payload = await reader.readexactly(length)
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping: answer, or the gateway drops us
                writer.write(struct.pack("!BB", 0x8A, 0x80 | length) + b"\0\0\0\0" + payload)
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if length >= 2 else 1005
                writer.write(struct.pack("!BB", 0x88, 0x82) + b"\0\0\0\0" + payload[:2])
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        code = 1006
    closes.append((code, time.time()))
    writer.close()


async def main(host, port, prefix, first, count):
    stats = {"total": count, "connected": 0, "refused": 0, "errors": 0,
             "retry_after_max": 0, "statuses": {}}
    connected_all = asyncio.Event()
    closes: list = []
    started = time.monotonic()
    tasks = [
        asyncio.ensure_future(
            charger(host, port, f"{prefix}-{n}", stats, connected_all, closes)
        )
        for n in range(first, first + count)
    ]
    await connected_all.wait()
    print(json.dumps({
        "event": "connected", "elapsed": time.monotonic() - started,
        "refused": stats["refused"], "statuses": stats["statuses"],
        "retry_after_max": stats["retry_after_max"], "errors": stats["errors"],
    }), flush=True)
    stdin_closed = asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    done = asyncio.gather(*tasks)
    await asyncio.wait([done, stdin_closed], return_when=asyncio.FIRST_COMPLETED)
    if done.done():
        codes: dict = {}
        for code, _ in closes:
            codes[code] = codes.get(code, 0) + 1
        times = [t for _, t in closes]
        print(json.dumps({
            "event": "closed", "codes": codes, "first": min(times), "last": max(times),
        }), flush=True)
    os._exit(0)


if __name__ == "__main__":
    host, port, prefix, first, count = sys.argv[1:6]
    asyncio.run(main(host, int(port), prefix, int(first), int(count)))
