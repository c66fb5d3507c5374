"""
A blocking HTTP/WebSocket opening-handshake client (Python's socket and ssl
modules), run in a thread by the tests. It shows exactly what a charger
sees -- status line, headers, TLS failures -- and lets tests pick TLS
versions and cipher suites that Twisted's client options would not offer.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import struct
from typing import Optional

from twisted.internet import threads


class Response:
    def __init__(self, status: int, reason: str, headers: dict, sock, cipher=None):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.sock = sock
        self.cipher = cipher
        #: over TLS: the session to resume next time (read after the
        #: answer, so that TLS 1.3 tickets have arrived), and whether this
        #: handshake resumed one (OpenSSL's SSL_session_reused)
        self.session = getattr(sock, "session", None)
        self.session_reused = getattr(sock, "session_reused", None)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def ping(self, payload: bytes = b"hi") -> bytes:
        """Send a masked WebSocket ping; return the pong's payload."""
        self.send_frame(0x9, payload)
        opcode, body = self.read_frame()
        if opcode != 0xA:
            raise AssertionError(f"expected a pong, got opcode {opcode}")
        return body

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """Send one masked, final frame (payload under 126 bytes)."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def read_frame(self) -> tuple[int, bytes]:
        """The next frame the server sends: (opcode, payload)."""
        head = _read_exact(self.sock, 2)
        length = head[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", _read_exact(self.sock, 2))
        elif length == 127:
            (length,) = struct.unpack("!Q", _read_exact(self.sock, 8))
        return head[0] & 0x0F, _read_exact(self.sock, length)

    def close_handshake(self) -> tuple[int, str]:
        """
        Wait for the server's close frame and answer it, as a charger
        does; return the server's close code and reason.
        """
        while True:
            opcode, body = self.read_frame()
            if opcode == 0x8:
                break
        code = struct.unpack("!H", body[:2])[0] if len(body) >= 2 else None
        self.send_frame(0x8, body[:2])
        return code, body[2:].decode("utf-8", "replace")

    def how_closed(self) -> str:
        """
        Read until the server closes TCP: C{"fin"} for a graceful close,
        C{"reset"} for a RST.
        """
        try:
            while self.sock.recv(4096):
                pass
        except ConnectionResetError:
            return "reset"
        return "fin"


    def close_without_code(self) -> bytes:
        """
        Send a close frame with no status code (an empty body, as some
        chargers do) and return the body of the server's close frame.
        """
        self.sock.sendall(bytes([0x88, 0x80]) + os.urandom(4))
        head = _read_exact(self.sock, 2)
        if head[0] & 0x0F != 0x8:
            raise AssertionError(f"expected a close frame, got opcode {head[0] & 0x0F}")
        return _read_exact(self.sock, head[1] & 0x7F)


def _read_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


#: how every PROXY protocol v2 header starts
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(source: str, source_port: int, destination: str = "192.0.2.1",
             destination_port: int = 443) -> bytes:
    return f"PROXY TCP4 {source} {destination} {source_port} {destination_port}\r\n".encode()


def proxy_v2(source: str, source_port: int, destination: str = "192.0.2.1",
             destination_port: int = 443) -> bytes:
    addresses = (socket.inet_aton(source) + socket.inet_aton(destination)
                 + struct.pack("!HH", source_port, destination_port))
    return (V2_SIGNATURE + bytes([0x21, 0x11])
            + struct.pack("!H", len(addresses)) + addresses)


def proxy_v2_local() -> bytes:
    """A version 2 LOCAL header (a balancer's own health check): no address."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def _handshake(port, path, subprotocol, headers, context, proxy, keep_open, server_hostname,
               source, session):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0) if source else None)
    try:
        if proxy:
            sock.sendall(proxy)
        cipher = None
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=server_hostname, session=session)
            cipher = sock.cipher()
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {subprotocol}",
        ] + [f"{name}: {value}" for name, value in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        if not head:
            raise ConnectionError("closed without an answer")
        status_line, *header_lines = head.split("\r\n")
        _version, status, reason = (status_line.split(" ", 2) + [""])[:3]
        response_headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            response_headers[name.strip().lower()] = value.strip()
        response = Response(int(status), reason, response_headers, sock, cipher)
        if not (keep_open and response.status == 101):
            response.close()
        return response
    except BaseException:
        sock.close()
        raise


def handshake(
    port: int,
    path: str,
    *,
    subprotocol: str = "ocpp1.6",
    headers: Optional[dict] = None,
    context: Optional[ssl.SSLContext] = None,
    proxy: bytes = b"",
    keep_open: bool = False,
    server_hostname: str = "localhost",
    source: Optional[str] = None,
    session: Optional[ssl.SSLSession] = None,
):
    """
    Deferred firing with a L{Response} (or failing with the socket or TLS
    error) for one opening handshake, run in a thread.

    @param source: the local address to connect from (Linux routes all of
        127.0.0.0/8 to the loopback interface, so C{127.0.0.2} is another
        host as far as the gateway can tell).
    @param session: a TLS session to offer for resumption (a
        L{Response.session} of the same C{context}).
    """
    return threads.deferToThread(
        _handshake, port, path, subprotocol, headers or {}, context, proxy, keep_open,
        server_hostname, source, session,
    )


def client_context(cafile: str, *, certfile=None, keyfile=None, maximum=None,
                   ciphers=None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile)
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def basic(identity: str, password) -> dict:
    if isinstance(password, str):
        password = password.encode("utf-8")
    token = base64.b64encode(identity.encode() + b":" + password).decode()
    return {"Authorization": f"Basic {token}"}
