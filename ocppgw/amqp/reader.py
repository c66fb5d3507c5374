"""
The receiving half of the broker connection, for the frames that matter.

Two kinds of incoming AMQP frames make up almost all of a busy gateway's
traffic: commands for chargers (C{basic.deliver} with its content header
and body) and publisher confirms (C{basic.ack}/C{basic.nack}); a third,
C{queue.bind-ok} and C{basic.consume-ok}, answer every arriving
charger's queue declaration and consumer. pika turns
each of those into several objects (a Method with a decoded spec class, a
Header with a full C{BasicProperties}, callback lookups keyed by prefixed
strings) and re-slices its whole receive buffer after every frame, which
came to about a fifth of the gateway's CPU per round trip (bench.roundtrip
profile). L{FrameReader} takes pika's place as the connection's receiver:
it walks the buffer by offset, reads only the fields ocppgw uses, and
hands those frames straight to our consumer and confirm channels. Every
other frame (channel and queue methods, returns, heartbeats, closes)
goes to pika unchanged and in order, so pika's state machine still sees
what it needs.

A frame is only taken past pika when pika would do exactly what we do
with it: a delivery for a consumer that pika knows and is not cancelling,
a confirm on an open channel of ours. Channel numbers are reused after a
channel closes, so a role is trusted only while pika's channel object for
that number is the one the role was made for.
"""

from __future__ import annotations

import struct

from pika import frame as pika_frame

# the frame layout and property flags are the ones ocppgw.amqp.wire writes
from ocppgw.amqp.wire import (
    FLAG_CONTENT_ENCODING, FLAG_CONTENT_TYPE, FLAG_CORRELATION_ID, FLAG_DELIVERY_MODE,
    FLAG_HEADERS, FLAG_PRIORITY, FLAG_REPLY_TO, FRAME_BODY, FRAME_END, FRAME_HEADER,
    FRAME_METHOD, FRAME_PREFIX,
)

_CLASS_METHOD = struct.Struct(">HH")
_LONGLONG = struct.Struct(">Q")
_ACK = struct.Struct(">QB")
_CONTENT_HEADER = struct.Struct(">HHQH")
_LONG = struct.Struct(">I")

_FRAME_END_OCTET = FRAME_END[0]

_CONNECTION = 10
_CONNECTION_CLOSE = 50
_QUEUE = 50
_BIND_OK = 21
_BASIC = 60
_CONSUME_OK = 21
_DELIVER = 60
_ACK_METHOD = 80
_NACK = 120


def _shortstr(buf, offset: int):
    """
    A short string and the offset after it, decoded the way pika does
    (UTF-8, or the raw bytes when they are not UTF-8).
    """
    length = buf[offset]
    offset += 1
    raw = buf[offset:offset + length]
    try:
        return raw.decode("utf-8"), offset + length
    except UnicodeDecodeError:
        return raw, offset + length


def read_reply_fields(buf, offset: int):
    """
    The C{correlation_id} and C{reply_to} of a C{basic} content header
    whose property flags start at C{offset}; the rest is not read.
    """
    flags = (buf[offset] << 8) | buf[offset + 1]
    offset += 2
    more = flags
    while more & 1:  # further flag words: no property we read is in them
        more = (buf[offset] << 8) | buf[offset + 1]
        offset += 2
    if not flags & (FLAG_CORRELATION_ID | FLAG_REPLY_TO):
        return None, None
    if flags & FLAG_CONTENT_TYPE:
        offset += 1 + buf[offset]
    if flags & FLAG_CONTENT_ENCODING:
        offset += 1 + buf[offset]
    if flags & FLAG_HEADERS:
        offset += 4 + _LONG.unpack_from(buf, offset)[0]
    if flags & FLAG_DELIVERY_MODE:
        offset += 1
    if flags & FLAG_PRIORITY:
        offset += 1
    correlation_id = reply_to = None
    if flags & FLAG_CORRELATION_ID:
        correlation_id, offset = _shortstr(buf, offset)
    if flags & FLAG_REPLY_TO:
        reply_to, offset = _shortstr(buf, offset)
    return correlation_id, reply_to


class _Content:
    """
    A delivery whose content header and body are still arriving.
    """

    __slots__ = ("consumer", "delivery_tag", "redelivered", "size", "reply_to",
                 "correlation_id", "chunks", "received")

    def __init__(self, consumer, delivery_tag: int, redelivered: bool) -> None:
        self.consumer = consumer
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.size = -1  # not known before the content header
        self.reply_to = None
        self.correlation_id = None
        self.chunks: list = []
        self.received = 0


class FrameReader:
    """
    Reads the connection's incoming bytes in place of pika's
    C{_on_data_available}; see the module docstring.

    Channels are registered by role: a I{consumer channel} has a
    C{channel} (pika's), C{deliver_to(consumer_tag)}, returning the
    consumer (with C{_deliver}) or C{None} to leave the delivery to pika,
    and C{consume_ok(consumer_tag)};
    a I{confirm channel} has a C{channel} and C{confirmed(tag, multiple,
    nacked)}; a I{declare channel} has a C{channel} and C{bound()},
    called for each C{queue.bind-ok} in order.
    """

    def __init__(self, impl) -> None:
        self._impl = impl
        # pika's own reader, for a stream that breaks the frame format
        self._by_pika = impl._on_data_available
        self._buffer = b""
        self._consumers: dict = {}
        self._confirms: dict = {}
        self._declares: dict = {}
        self._roles = (self._consumers, self._confirms, self._declares)
        # channel number -> _Content being assembled
        self._content: dict = {}
        #: called with (reply code, reply text) when the broker closes the
        #: connection, before pika handles it: from that frame on the
        #: broker ignores anything but close-ok, so nothing else is sent
        self.on_connection_close = None

    @classmethod
    def install(cls, impl) -> "FrameReader":
        """
        Take over reading for an open pika connection C{impl}.
        """
        reader = cls(impl)
        impl._on_data_available = reader.data_received
        return reader

    def consumer_channel(self, role) -> None:
        """
        Hand the deliveries on C{role.channel} to C{role}.
        """
        self._register(self._consumers, role)

    def confirm_channel(self, role) -> None:
        """
        Hand the confirms on C{role.channel} to C{role}.
        """
        self._register(self._confirms, role)

    def declare_channel(self, role) -> None:
        """
        Hand the C{queue.bind-ok}s on C{role.channel} to C{role}.
        """
        self._register(self._declares, role)

    def _register(self, roles: dict, role) -> None:
        number = role.channel.channel_number
        for other in self._roles:
            other.pop(number, None)
        roles[number] = role
        self._content.pop(number, None)

    def _live(self, roles: dict, number: int):
        role = roles.get(number)
        if role is None:
            return None
        channel = role.channel
        # the number may since belong to a new channel, or this one closes
        if self._impl._channels.get(number) is not channel or not channel.is_open:
            return None
        return role

    def data_received(self, data: bytes) -> None:
        impl = self._impl
        impl.bytes_received += len(data)
        if impl._frame_buffer:
            # bytes pika had read before we took over
            data = impl._frame_buffer + data
            impl._frame_buffer = b""
        buf = self._buffer + data if self._buffer else data
        end = len(buf)
        pos = 0
        unpack_header = FRAME_PREFIX.unpack_from
        while end - pos >= 8:
            frame_type, number, size = unpack_header(buf, pos)
            frame_end = pos + 7 + size  # the index of the frame-end octet
            if frame_end >= end:
                break
            if buf[frame_end] != _FRAME_END_OCTET:
                # let pika report the broken stream as it always has
                self._buffer = b""
                impl._frame_buffer = b""
                impl.bytes_received -= end - pos
                self._by_pika(buf[pos:])
                return
            start = pos + 7
            pos = frame_end + 1
            impl.frames_received += 1
            if frame_type == FRAME_METHOD:
                class_id, method_id = _CLASS_METHOD.unpack_from(buf, start)
                if class_id == _CONNECTION:
                    if method_id == _CONNECTION_CLOSE and number == 0:
                        self._connection_closing(buf, start + 4)
                elif class_id == _QUEUE:
                    if method_id == _BIND_OK and self._bound(number):
                        continue
                elif class_id == _BASIC:
                    if method_id == _DELIVER and self._deliver(number, buf, start + 4):
                        continue
                    if method_id == _CONSUME_OK and self._consume_ok(number, buf, start + 4):
                        continue
                    if (method_id == _ACK_METHOD or method_id == _NACK) and \
                            self._confirm(number, buf, start + 4, method_id == _NACK):
                        continue
            elif frame_type == FRAME_HEADER:
                content = self._content.get(number)
                if content is not None:
                    self._header(number, content, buf, start)
                    continue
            elif frame_type == FRAME_BODY:
                content = self._content.get(number)
                if content is not None:
                    self._body(number, content, buf[start:frame_end])
                    continue
            self._to_pika(buf[start - 7:pos])
        self._buffer = buf[pos:] if pos < end else b""

    def _connection_closing(self, buf, offset: int) -> None:
        hook = self.on_connection_close
        if hook is None:
            return
        reply_code = (buf[offset] << 8) | buf[offset + 1]
        reply_text = _shortstr(buf, offset + 2)[0]
        hook(reply_code, reply_text if isinstance(reply_text, str) else repr(reply_text))

    def _to_pika(self, raw: bytes) -> None:
        impl = self._impl
        impl.frames_received -= 1  # pika counts the frames it processes
        _consumed, frame = pika_frame.decode_frame(raw)
        impl._process_frame(frame)

    def _deliver(self, number: int, buf, offset: int) -> bool:
        role = self._live(self._consumers, number)
        if role is None:
            return False
        tag_length = buf[offset]
        consumer_tag = buf[offset + 1:offset + 1 + tag_length].decode("utf-8")
        consumer = role.deliver_to(consumer_tag)
        if consumer is None:
            return False  # pika rejects it, or logs it, as before
        offset += 1 + tag_length
        delivery_tag = _LONGLONG.unpack_from(buf, offset)[0]
        redelivered = bool(buf[offset + 8] & 1)
        self._content[number] = _Content(consumer, delivery_tag, redelivered)
        return True

    def _header(self, number: int, content: _Content, buf, offset: int) -> None:
        _class_id, _weight, size, _flags = _CONTENT_HEADER.unpack_from(buf, offset)
        content.size = size
        content.correlation_id, content.reply_to = read_reply_fields(buf, offset + 12)
        if size == 0:
            self._finish(number, content, b"")

    def _body(self, number: int, content: _Content, chunk: bytes) -> None:
        content.received += len(chunk)
        if content.received >= content.size and not content.chunks:
            self._finish(number, content, chunk)
            return
        content.chunks.append(chunk)
        if content.received >= content.size:
            self._finish(number, content, b"".join(content.chunks))

    def _finish(self, number: int, content: _Content, body: bytes) -> None:
        del self._content[number]
        content.consumer._deliver(
            content.delivery_tag, body, content.reply_to,
            content.correlation_id, content.redelivered,
        )

    def _consume_ok(self, number: int, buf, offset: int) -> bool:
        role = self._live(self._consumers, number)
        if role is None:
            return False
        role.consume_ok(_shortstr(buf, offset)[0])
        return True

    def _bound(self, number: int) -> bool:
        role = self._live(self._declares, number)
        if role is None:
            return False
        role.bound()
        return True

    def _confirm(self, number: int, buf, offset: int, nacked: bool) -> bool:
        role = self._live(self._confirms, number)
        if role is None:
            return False
        tag, bits = _ACK.unpack_from(buf, offset)
        role.confirmed(tag, bool(bits & 1), nacked)
        return True


def install_reader(connection) -> FrameReader:
    """
    Put a L{FrameReader} in front of pika for C{connection} (a
    C{TwistedProtocolConnection} that is open), keeping pika's own reader
    for the frames it still handles.
    """
    return FrameReader.install(connection._impl)


__all__ = ["FrameReader", "install_reader", "read_reply_fields"]
