"""
A raw HTTP/1.1 client for opening handshakes: a hand-written upgrade
request sent byte for byte, and the response head exactly as it came
over the wire (a WebSocket client library hides it or answers for itself).
"""

from __future__ import annotations

import base64
import os
from typing import Optional

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol


#: RFC 6455 §1.3: the GUID the server appends to the key for the accept hash.
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


#: How long a single raw HTTP exchange may take; far below the test timeout.
_RAW_TIMEOUT = 5.0


class HttpResponse:
    """
    The head of an HTTP response as it came over the wire.

    @ivar status: the status code.
    @ivar reason: the reason phrase, exactly as sent.
    @ivar headers: C{(lower-cased name, value)} pairs in wire order.
    @ivar raw: every byte received.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head = raw.split(b"\r\n\r\n", 1)[0].decode("iso-8859-1")
        status_line, *header_lines = head.split("\r\n")
        version, status, *reason = status_line.split(" ", 2)
        if not version.startswith("HTTP/"):
            raise ValueError(f"not an HTTP response: {raw[:80]!r}")
        self.status = int(status)
        self.reason = reason[0] if reason else ""
        self.headers: list[tuple[str, str]] = []
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers.append((name.strip().lower(), value.strip()))

    def header(self, name: str) -> Optional[str]:
        """The value of the first header called C{name}, or C{None}."""
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        return {name for name, _ in self.headers}

    def __repr__(self) -> str:
        return f"<HttpResponse {self.status} {self.reason!r} {self.headers!r}>"


class _RawHttpClient(protocol.Protocol):
    """
    Sends one request and collects the response head.

    Once the header block is complete the connection is ended: after a 101
    with a masked WebSocket close frame (so the gateway finishes a clean
    close handshake and drops TCP), otherwise by closing TCP. C{done} fires
    with the L{HttpResponse} when the connection is gone, so nothing is
    left half-open when the test ends.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.response: Optional[HttpResponse] = None
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.response is not None:
            return  # the close frame and whatever follows the head
        self.received += data
        if b"\r\n\r\n" not in self.received:
            return
        try:
            self.response = HttpResponse(self.received)
        except Exception:
            self.done.errback()
            self.transport.abortConnection()
            return
        if self.response.status == 101:
            self.transport.write(_masked_close_frame(1000))
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if self.done.called:
            return
        if self.response is not None:
            self.done.callback(self.response)
        elif self.received:
            self.done.errback(ValueError(f"incomplete answer: {self.received[:200]!r}"))
        else:
            self.done.errback(ValueError("the server closed without an answer"))


def _masked_close_frame(code: int) -> bytes:
    """A client-to-server close frame (RFC 6455 §5.5.1), masked as §5.3 asks."""
    payload = code.to_bytes(2, "big")
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x88, 0x80 | len(payload)]) + mask + masked


def websocket_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


def upgrade_request(
    port: int,
    path: str,
    protocols: Optional[str] = "ocpp1.6",
    key: Optional[str] = None,
    upgrade: bool = True,
    extensions: Optional[str] = None,
) -> bytes:
    """
    A hand-written HTTP/1.1 request for C{path}, sent byte for byte.

    @param protocols: the raw C{Sec-WebSocket-Protocol} value; C{None}
        leaves the header out, C{""} sends it empty.
    @param upgrade: C{False} makes it a plain GET with no upgrade headers.
    @param extensions: a C{Sec-WebSocket-Extensions} value to offer.
    """
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if upgrade:
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key or websocket_key()}",
            "Sec-WebSocket-Version: 13",
        ]
        if protocols is not None:
            lines.append(f"Sec-WebSocket-Protocol: {protocols}")
        if extensions is not None:
            lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("iso-8859-1")


def raw_request(port: int, request: bytes) -> defer.Deferred:
    """
    Send C{request} over a new TCP connection; fires with an L{HttpResponse}
    once the connection is closed, or fails after L{_RAW_TIMEOUT} seconds
    (and the connection is aborted, so the gateway sees it go).
    """
    client = _RawHttpClient(request)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    connected = connectProtocol(endpoint, client)

    def not_connected(failure):
        if not client.done.called:
            client.done.errback(failure)

    connected.addErrback(not_connected)

    def give_up():
        if not client.done.called:
            client.done.errback(
                defer.TimeoutError(
                    f"no complete answer in {_RAW_TIMEOUT} s; got {client.received[:200]!r}"
                )
            )
        if client.transport is not None:
            client.transport.abortConnection()

    timer = reactor.callLater(_RAW_TIMEOUT, give_up)

    def stop_timer(result):
        if timer.active():
            timer.cancel()
        return result

    return client.done.addBoth(stop_timer)
