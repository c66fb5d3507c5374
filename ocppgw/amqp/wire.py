"""
AMQP 0-9-1 frames for the gateway's hottest methods, encoded directly.

pika builds a method object, a C{BasicProperties} (fourteen attributes,
each tested on encode) and three frame objects for every publish, and a
method and frame object for every ack: a seventh of the gateway's CPU per
charger round trip (py-spy, bench/roundtrip.py). Here a publish is one
C{struct.pack} per frame and the charger's header table is encoded once
and cached. The bytes are the ones pika would send (tests/test_amqpwire.py
compares them); they are handed to pika's connection as already-marshaled
frames, so its byte counters and heartbeats stay right.

Wire layout (AMQP 0-9-1 §4.2.3, §4.2.6): a frame is type (octet), channel
(short), payload size (long), payload, 0xCE. A publish is a method frame
(Basic.Publish: class 60, method 40, ticket, exchange, routing key, flags),
a content header frame (class 60, weight 0, body size, property flags,
the properties present in flag order) and body frames of at most
C{frame_max - 8} bytes.

Declaring a charger's queue (C{queue.declare} with no-wait, then
C{queue.bind}) and consuming it (C{basic.consume}) are encoded here too,
so that a channel can have many in flight: pika sends one synchronous
method per channel at a time and queues the rest, which serialised
arriving chargers on the broker's round trips (the bind-ok and
consume-ok are read by L{ocppgw.amqp.reader}).
"""

from __future__ import annotations

import struct

from pika.data import encode_table

# AMQP 0-9-1 §4.2.3: every frame is a type octet, a channel number and a
# payload size, the payload, then the frame-end octet (shared with the reader)
FRAME_END = b"\xce"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY = 1, 2, 3
FRAME_PREFIX = struct.Struct(">BHI")
_ACK = struct.Struct(">BHIHHQBB")
# Basic.Publish: class 60, method 40, ticket 0
_PUBLISH_PREFIX = b"\x00\x3c\x00\x28\x00\x00"

# property flag bits of the Basic class, in encoding order (the reader
# skips the ones before reply_to that ocppgw does not publish)
FLAG_CONTENT_TYPE = 1 << 15
FLAG_CONTENT_ENCODING = 1 << 14
FLAG_HEADERS = 1 << 13
FLAG_DELIVERY_MODE = 1 << 12
FLAG_PRIORITY = 1 << 11
FLAG_CORRELATION_ID = 1 << 10
FLAG_REPLY_TO = 1 << 9
FLAG_MESSAGE_ID = 1 << 7
FLAG_TIMESTAMP = 1 << 6
FLAG_TYPE = 1 << 5
FLAG_APP_ID = 1 << 3

class FixedHeaders(dict):
    """
    A headers table that is published unchanged many times (a charger's
    identity, version and node): it keeps its own encoding.

    Do not change it after its first publish.
    """

    __slots__ = ("encoded",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.encoded: bytes | None = None


def _shortstr(value: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > 255:
        raise ValueError("AMQP short string longer than 255 bytes")
    return bytes((len(data),)) + data


def _table(headers: dict) -> bytes:
    if type(headers) is FixedHeaders:
        encoded = headers.encoded
        if encoded is None:
            encoded = headers.encoded = _encode_table(headers)
        return encoded
    return _encode_table(headers)


def _encode_table(headers: dict) -> bytes:
    parts: list = []
    encode_table(parts, headers)
    return b"".join(parts)


def encode_publish(
    channel: int,
    frame_max: int,
    exchange: str,
    routing_key: str,
    mandatory: bool,
    body: bytes,
    *,
    content_type: str | None = None,
    headers: dict | None = None,
    persistent: bool = False,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    message_id: str | None = None,
    timestamp: int | None = None,
    type: str | None = None,
    app_id: str | None = None,
) -> bytes:
    """
    The frames of one C{basic.publish} with its content, as one byte string.

    @param frame_max: the connection's negotiated maximum frame size.
    """
    payload = (
        _PUBLISH_PREFIX
        + _shortstr(exchange)
        + _shortstr(routing_key)
        + (b"\x01" if mandatory else b"\x00")
    )
    out = [FRAME_PREFIX.pack(FRAME_METHOD, channel, len(payload)), payload, FRAME_END]

    flags = 0
    props = []
    if content_type is not None:
        flags |= FLAG_CONTENT_TYPE
        props.append(_shortstr(content_type))
    if headers is not None:
        flags |= FLAG_HEADERS
        props.append(_table(headers))
    if persistent:
        flags |= FLAG_DELIVERY_MODE
        props.append(b"\x02")
    if correlation_id is not None:
        flags |= FLAG_CORRELATION_ID
        props.append(_shortstr(correlation_id))
    if reply_to is not None:
        flags |= FLAG_REPLY_TO
        props.append(_shortstr(reply_to))
    if message_id is not None:
        flags |= FLAG_MESSAGE_ID
        props.append(_shortstr(message_id))
    if timestamp is not None:
        flags |= FLAG_TIMESTAMP
        props.append(struct.pack(">Q", timestamp))
    if type is not None:
        flags |= FLAG_TYPE
        props.append(_shortstr(type))
    if app_id is not None:
        flags |= FLAG_APP_ID
        props.append(_shortstr(app_id))
    header = struct.pack(">HHQH", 60, 0, len(body), flags) + b"".join(props)
    out += (FRAME_PREFIX.pack(FRAME_HEADER, channel, len(header)), header, FRAME_END)

    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        part = body[start:start + chunk]
        out += (FRAME_PREFIX.pack(FRAME_BODY, channel, len(part)), part, FRAME_END)
    return b"".join(out)


def encode_ack(channel: int, delivery_tag: int, multiple: bool = False) -> bytes:
    """
    One C{basic.ack} method frame (class 60, method 80).
    """
    return _ACK.pack(FRAME_METHOD, channel, 13, 60, 80, delivery_tag, 1 if multiple else 0, 0xCE)


def _method(channel: int, payload: bytes) -> bytes:
    return FRAME_PREFIX.pack(FRAME_METHOD, channel, len(payload)) + payload + FRAME_END


def encode_queue_declare(channel: int, queue: str, *, durable: bool, nowait: bool,
                         arguments: dict | None = None) -> bytes:
    """
    One C{queue.declare} method frame (class 50, method 10), not passive,
    exclusive or auto-delete.
    """
    bits = (2 if durable else 0) | (16 if nowait else 0)
    return _method(channel, b"\x00\x32\x00\x0a\x00\x00" + _shortstr(queue)
                   + bytes((bits,)) + _encode_table(arguments or {}))


def encode_queue_bind(channel: int, queue: str, exchange: str, routing_key: str) -> bytes:
    """
    One C{queue.bind} method frame (class 50, method 20), answered with
    C{queue.bind-ok}.
    """
    return _method(channel, b"\x00\x32\x00\x14\x00\x00" + _shortstr(queue)
                   + _shortstr(exchange) + _shortstr(routing_key) + b"\x00"
                   + _encode_table({}))


def encode_basic_consume(channel: int, queue: str, consumer_tag: str) -> bytes:
    """
    One C{basic.consume} method frame (class 60, method 20) with
    acknowledgements, answered with C{basic.consume-ok}.
    """
    return _method(channel, b"\x00\x3c\x00\x14\x00\x00" + _shortstr(queue)
                   + _shortstr(consumer_tag) + b"\x00" + _encode_table({}))
