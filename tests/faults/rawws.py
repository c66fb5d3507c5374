"""
A minimal blocking WebSocket client on a plain socket, for fault tests
that need to see raw HTTP answers (status, Retry-After) or to write
frames as fast as a socket takes them, with no buffering of its own.
"""

from __future__ import annotations

import base64
import os
import socket
import struct


class Refused(Exception):
    def __init__(self, status: int, headers: dict) -> None:
        super().__init__(status, headers)
        self.status = status
        self.headers = headers


def handshake(host: str, port: int, path: str, subprotocol: str = "ocpp1.6",
              timeout: float = 30.0) -> socket.socket:
    """
    Open a WebSocket; returns the socket, or raises L{Refused} with the
    HTTP status and headers.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
        ).encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1]) if head and len(head[0].split()) > 1 else 0
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status != 101:
        sock.close()
        raise Refused(status, headers)
    return sock


def text_frame(payload: bytes) -> bytes:
    """
    A masked client text frame (a zero mask: valid, and no copying).
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    return header + b"\x00\x00\x00\x00" + payload
