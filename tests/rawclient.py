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

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def ping(self, payload: bytes = b"hi") -> bytes:
        """Send a masked WebSocket ping; return the pong's payload."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x89, 0x80 | len(payload)]) + mask + masked)
        head = _read_exact(self.sock, 2)
        length = head[1] & 0x7F
        body = _read_exact(self.sock, length)
        if head[0] & 0x0F != 0xA:
            raise AssertionError(f"expected a pong, got opcode {head[0] & 0x0F}")
        return body


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


def proxy_v1(source: str, source_port: int, destination: str = "192.0.2.1",
             destination_port: int = 443) -> bytes:
    return f"PROXY TCP4 {source} {destination} {source_port} {destination_port}\r\n".encode()


def proxy_v2(source: str, source_port: int, destination: str = "192.0.2.1",
             destination_port: int = 443) -> bytes:
    addresses = (socket.inet_aton(source) + socket.inet_aton(destination)
                 + struct.pack("!HH", source_port, destination_port))
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11])
            + struct.pack("!H", len(addresses)) + addresses)


def _handshake(port, path, subprotocol, headers, context, proxy, keep_open, server_hostname):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if proxy:
            sock.sendall(proxy)
        cipher = None
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=server_hostname)
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
):
    """
    Deferred firing with a L{Response} (or failing with the socket or TLS
    error) for one opening handshake, run in a thread.
    """
    return threads.deferToThread(
        _handshake, port, path, subprotocol, headers or {}, context, proxy, keep_open,
        server_hostname,
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
