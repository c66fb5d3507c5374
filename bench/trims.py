"""
trims: what each of ocppgw's autobahn trims (L{ocppgw.trims}) saves per
open, idle charger connection.

Opens N connections in memory (the edge's own protocol and factory, a hub
that accepts every charger, Twisted's StringTransport instead of a
socket), sends one OCPP frame on each, and reports the Python heap each
connection holds (tracemalloc), with every trim on and then with one trim
off at a time. The RSS of a real gateway per charger is bench.idle's.

    python -m bench.trims               # 2,000 connections
    python -m bench.trims -n 500
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import tracemalloc

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from ocppgw import trims
from ocppgw.edge import ChargerFactory, ChargerProtocol


class _Hub:
    """Accepts every charger and ignores what it sends."""

    def charger_connecting(self, edge, identity, version):
        return defer.succeed(None)

    def charger_opened(self, edge):
        pass

    def charger_frame(self, edge, data):
        pass

    def charger_closed(self, edge, code, reason):
        pass


def _request(identity: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    return (
        f"GET /ocpp/{identity} HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: ocpp1.6\r\n\r\n"
    ).encode("ascii")


def _frame(payload: bytes) -> bytes:
    """One masked, final text frame (payload under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def _open(n: int, protocol_class: type) -> float:
    """Bytes of Python heap per open connection of C{protocol_class}."""
    factory = ChargerFactory(_Hub(), MemoryReactorClock(), protocol_class=protocol_class)
    requests = [_request(f"CP{i}") for i in range(n)]
    frame = _frame(b'[2,"1","Heartbeat",{}]')
    gc.collect()
    before = tracemalloc.take_snapshot()
    kept = []
    for i, request in enumerate(requests):
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 10000 + i))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 10000 + i))
        protocol.makeConnection(transport)
        protocol.dataReceived(request)
        protocol.dataReceived(frame)
        transport.clear()
        kept.append(protocol)
    gc.collect()
    after = tracemalloc.take_snapshot()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    open_ = sum(1 for p in kept if p.state == p.STATE_OPEN)
    if open_ != n:
        raise RuntimeError(f"only {open_} of {n} connections opened")
    return grown / n


def _variants():
    """(name, protocol class with that trim undone)."""

    def without(name, **attributes):
        return name, type("Untrimmed", (ChargerProtocol,), attributes)

    yield "every trim on", ChargerProtocol
    yield without("compact() off (instance dicts as autobahn leaves them)",
                  compact=lambda self: None)
    yield without("drop_request() off (handshake request kept)",
                  drop_request=lambda self: None)
    # a plain class attribute hides the mixin's property: autobahn's own
    # per-connection objects are made again
    yield without("send queue made at connect (a deque)", send_queue=None)
    yield without("own traffic counter (TrafficStats)", trafficStats=None)

    def keep_masker(self):
        masker = self.current_frame_masker
        trims.TrimmedWebSocket.onMessageEnd(self)
        self.current_frame_masker = masker

    yield without("frame unmasker kept after a frame", onMessageEnd=keep_masker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=2000)
    args = parser.parse_args()
    tracemalloc.start()
    print(f"trims: Python heap per open idle connection, {args.connections} connections")
    base = None
    for name, protocol_class in _variants():
        per = _open(args.connections, protocol_class)
        if base is None:
            base = per
            print(f"  {name:58} {per:7.0f} B")
        else:
            print(f"  {name:58} {per:7.0f} B  (the trim saves {per - base:5.0f} B)")


if __name__ == "__main__":
    main()
