"""
A charger that speaks WebSocket byte by byte, over Twisted.

The opening handshake is whatever bytes the test writes, so a test can
send exactly what a quirky charger sends (headers missing, in another
order, in another case) where a WebSocket library would refuse to; after
a 101 it reads and writes frames itself: masked text frames out, the
gateway's text, ping and close frames in, permessage-deflate both ways
when the 101 agreed to it, and pings left unanswered unless told
otherwise (a charger that never answers pings).
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Optional

import orjson
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.rawhttp import HttpResponse

_TEXT, _CLOSE, _PING, _PONG = 0x1, 0x8, 0x9, 0xA
#: the empty block every permessage-deflate message ends with (RFC 7692 §7.2.1)
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


def request(path: str, headers, method: str = "GET") -> bytes:
    """
    An HTTP/1.1 request head with C{headers} -- (name, value) pairs -- in
    exactly the order and spelling given.
    """
    lines = [f"{method} {path} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1")


def client_frame(payload: bytes, opcode: int = _TEXT, compressed: bool = False) -> bytes:
    """One masked, final client frame (RFC 6455 §5.2), RSV1 set if C{compressed}."""
    first = 0x80 | opcode | (0x40 if compressed else 0)
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawCharger(protocol.Protocol):
    """
    Writes the request given, then collects the answer and the frames.

    @ivar answered: fires with the L{HttpResponse} head.
    @ivar messages: a DeferredQueue of the text messages received (bytes).
    @ivar pings: how many pings arrived.
    @ivar closed: fires with the close code the gateway sent (C{None} if it
        sent none) once TCP is gone.
    """

    #: answer the gateway's pings (a charger that does not: False)
    answer_pings = False

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.buffer = b""
        self.response: Optional[HttpResponse] = None
        self.answered: defer.Deferred = defer.Deferred()
        self.messages: defer.DeferredQueue = defer.DeferredQueue()
        self.pings = 0
        self.close_code: Optional[int] = None
        self.closed: defer.Deferred = defer.Deferred()
        self._inflate = None
        self._deflate = None

    # -- what a test does ---------------------------------------------------

    def send_text(self, payload, compressed: Optional[bool] = None) -> None:
        """
        Send one text message (a list is sent as JSON); compressed when the
        101 agreed to permessage-deflate, unless C{compressed} says.
        """
        if isinstance(payload, (list, tuple)):
            payload = orjson.dumps(list(payload))
        if compressed is None:
            compressed = self._deflate is not None
        if compressed:
            data = self._deflate.compress(payload) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
            payload = data[: -len(_DEFLATE_TAIL)]
        self.transport.write(client_frame(payload, compressed=compressed))

    @defer.inlineCallbacks
    def next_message(self):
        """The next text message, decoded from JSON."""
        data = yield self.messages.get()
        return orjson.loads(data)

    def drop(self) -> defer.Deferred:
        if self.transport is not None and not self.closed.called:
            self.transport.abortConnection()
        return self.closed

    # -- the protocol ---------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.write(self.head)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.response is None:
            if b"\r\n\r\n" not in self.buffer:
                return
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.response = HttpResponse(head + b"\r\n\r\n")
            self._agree_compression(self.response.header("sec-websocket-extensions"))
            self.answered.callback(self.response)
        while self._frame():
            pass

    def _agree_compression(self, extensions: Optional[str]) -> None:
        if not extensions or not extensions.startswith("permessage-deflate"):
            return
        window = 15
        for parameter in extensions.split(";")[1:]:
            name, _, value = parameter.strip().partition("=")
            if name == "client_max_window_bits" and value:
                window = int(value)
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window)
        self._inflate = zlib.decompressobj(-15)

    def _frame(self) -> bool:
        buffer = self.buffer
        if len(buffer) < 2:
            return False
        first, second = buffer[0], buffer[1]
        length, offset = second & 0x7F, 2
        if length == 126:
            if len(buffer) < 4:
                return False
            (length,), offset = struct.unpack("!H", buffer[2:4]), 4
        elif length == 127:
            if len(buffer) < 10:
                return False
            (length,), offset = struct.unpack("!Q", buffer[2:10]), 10
        if len(buffer) < offset + length:
            return False
        payload = buffer[offset : offset + length]
        self.buffer = buffer[offset + length :]
        opcode = first & 0x0F
        if opcode == _TEXT:
            if first & 0x40:
                payload = self._inflate.decompress(payload + _DEFLATE_TAIL)
            self.messages.put(payload)
        elif opcode == _PING:
            self.pings += 1
            if self.answer_pings:
                self.transport.write(client_frame(payload, _PONG))
        elif opcode == _CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            self.transport.write(client_frame(payload[:2], _CLOSE))
            self.transport.loseConnection()
        return True

    def connectionLost(self, reason) -> None:
        if not self.answered.called:
            self.answered.errback(ConnectionError(f"closed without an answer: {self.buffer[:200]!r}"))
        self.closed.callback(self.close_code)


@defer.inlineCallbacks
def open_raw(reactor, port: int, head: bytes, charger_class=RawCharger):
    """
    Connect to 127.0.0.1:C{port} and write C{head}; fires with the
    L{RawCharger} once the answer's head has arrived.
    """
    charger = charger_class(head)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    yield connectProtocol(endpoint, charger)
    yield charger.answered
    return charger
