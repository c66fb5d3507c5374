"""
AMQP 0-9-1 frames as a fault test sees them: a reader that cuts a byte
stream into frames and describes each one, and predicates over those
descriptions.

L{tests.faults.proxy.FaultProxy} runs one L{FrameStream} per direction of
every connection it carries, so that a test can cut the connection at a
named frame ("the basic.ack the gateway sends up", "the confirm coming
down"). Speed matters only as far as the proxy must keep up with a few
hundred frames a second; the methods are decoded with pika's own spec
classes, which is fine for test code and keeps this reader honest.

Wire layout (AMQP 0-9-1 section 4.2.3): the client opens with the
protocol header C{AMQP\\x00\\x00\\x09\\x01}; after that, both directions
are frames: type (octet: 1 method, 2 content header, 3 content body,
8 heartbeat), channel (short), payload size (long), payload, frame-end
octet 0xCE. A method payload starts with class id and method id (shorts);
a content header payload with class id, weight (shorts) and body size
(long long), then the properties.
"""

from __future__ import annotations

import re
import struct
from typing import Callable, Optional

import pika.spec

UP = "up"
DOWN = "down"
DIRECTIONS = (UP, DOWN)

#: L{Frame.type} values: the AMQP frame types, and 0 for the protocol header
PROTOCOL_HEADER, METHOD, HEADER, BODY, HEARTBEAT = 0, 1, 2, 3, 8

PROTOCOL_HEADER_BYTES = b"AMQP\x00\x00\x09\x01"
_FRAME_HEADER = struct.Struct(">BHI")
_CLASS_METHOD = struct.Struct(">HH")
_CONTENT_HEADER = struct.Struct(">HHQ")
_FRAME_END = 0xCE
# type, channel, size before the payload; frame-end after it
_OVERHEAD = _FRAME_HEADER.size + 1
# RabbitMQ's frame_max is 128 KiB by default and at most 4 GiB; a size
# beyond this in a test is a stream that is not AMQP (or a bug), and
# waiting for it to complete would hold back everything behind it
_LARGEST_FRAME = 16 * 1024 * 1024

#: the methods that a content header and bodies follow on their channel
CARRY_CONTENT = frozenset(
    {"basic.publish", "basic.deliver", "basic.return", "basic.get-ok"}
)
_KIND_NAMES = {
    PROTOCOL_HEADER: "protocol-header",
    HEADER: "content-header",
    BODY: "content-body",
    HEARTBEAT: "heartbeat",
}


def _spec_name(method_class) -> str:
    """
    The AMQP spelling of a pika method class: C{Queue.BindOk} is
    C{queue.bind-ok}, C{Basic.RecoverAsync} is C{basic.recover-async}.
    """
    klass, method = method_class.NAME.split(".")
    return klass.lower() + "." + re.sub(r"(?<!^)(?=[A-Z])", "-", method).lower()


#: (class id << 16 | method id) -> (AMQP name, pika method class)
_METHODS = {index: (_spec_name(cls), cls) for index, cls in pika.spec.methods.items()}
METHOD_NAMES = frozenset(name for name, _cls in _METHODS.values())


class NotAmqp(Exception):
    """
    The bytes do not follow the AMQP 0-9-1 frame format.
    """


class Frame:
    """
    One frame seen by the proxy.

    @ivar connection: the L{tests.faults.proxy.ProxiedConnection} it passed on.
    @ivar direction: C{"up"} (client to broker) or C{"down"}.
    @ivar offset: where it starts in its direction's byte stream (the
        protocol header is at 0 going up).
    @ivar length: its length on the wire, framing included.
    @ivar type: L{METHOD}, L{HEADER}, L{BODY}, L{HEARTBEAT}, or
        L{PROTOCOL_HEADER}.
    @ivar channel: its channel number (0 for the protocol header).
    @ivar name: the method's AMQP name (C{"basic.publish"},
        C{"queue.bind-ok"}), or C{"content-header"}, C{"content-body"},
        C{"heartbeat"}, C{"protocol-header"}.
    @ivar class_id: with C{method_id}, the method's ids (C{None} for other
        frames).
    @ivar method: the decoded pika method (C{frame.method.routing_key},
        C{frame.method.delivery_tag}), or C{None}.
    @ivar content: for a content header or body, the method frame it
        belongs to (the C{basic.publish} or C{basic.deliver} before it on
        its channel), else C{None}.
    @ivar properties: for a content header, its C{pika.BasicProperties}.
    @ivar body_size: for a content header, the size of the body announced.
    @ivar body: for a content body frame, its bytes.
    """

    __slots__ = (
        "connection", "direction", "offset", "length", "type", "channel", "name",
        "class_id", "method_id", "method", "content", "properties", "body_size", "body",
    )

    def __init__(self, connection, direction: str, offset: int, length: int,
                 type_: int, channel: int, name: str) -> None:
        self.connection = connection
        self.direction = direction
        self.offset = offset
        self.length = length
        self.type = type_
        self.channel = channel
        self.name = name
        self.class_id = self.method_id = None
        self.method = self.content = self.properties = None
        self.body_size = None
        self.body = None

    @property
    def end(self) -> int:
        """
        The offset just after it in its direction's byte stream.
        """
        return self.offset + self.length

    def is_method(self, name: str, **fields) -> bool:
        """
        Whether it is the method C{name} with these field values (see
        L{method}).
        """
        return self.name == name and _fields_match(self.method, fields)

    def __repr__(self) -> str:
        number = getattr(self.connection, "number", "?")
        where = f"#{number} {self.direction} @{self.offset} ch{self.channel}"
        if self.content is not None:
            return f"<Frame {where} {self.name} of {self.content.name}>"
        return f"<Frame {where} {self.name}>"


class FrameStream:
    """
    One direction of one connection: where the bytes seen so far end, and
    what a frame needs from the frames before it (the protocol header
    going up; the method a channel's content belongs to).

    L{read} describes every complete frame in a buffer and says where the
    last one ends; the caller keeps the rest until more bytes come.
    """

    def __init__(self, connection, direction: str) -> None:
        self.connection = connection
        self.direction = direction
        # the client speaks first, with the protocol header; a broker
        # answers one only to refuse the client's version
        self._header_expected = direction == UP
        self._content: dict = {}

    def read(self, buf: bytes, base: int):
        """
        Describe the complete frames in C{buf}, which starts at offset
        C{base} of this direction's stream; yields each L{Frame} as it is
        read (its C{end} minus C{base} is where it ends in C{buf}).

        @raise NotAmqp: when the bytes break the frame format; what was
            yielded before stands.
        """
        size = len(buf)
        pos = 0
        if self._header_expected or (pos < size and buf[0] == 0x41 and base == 0):
            if size < len(PROTOCOL_HEADER_BYTES):
                return
            if buf[:4] != b"AMQP":
                raise NotAmqp(f"the stream starts with {bytes(buf[:8])!r}")
            self._header_expected = False
            yield Frame(self.connection, self.direction, base, len(PROTOCOL_HEADER_BYTES),
                        PROTOCOL_HEADER, 0, _KIND_NAMES[PROTOCOL_HEADER])
            pos = len(PROTOCOL_HEADER_BYTES)
        while size - pos >= _OVERHEAD:
            type_, channel, payload_size = _FRAME_HEADER.unpack_from(buf, pos)
            if payload_size > _LARGEST_FRAME:
                raise NotAmqp(f"a frame of {payload_size} bytes at offset {base + pos}")
            end = pos + payload_size + _OVERHEAD
            if end > size:
                return
            if buf[end - 1] != _FRAME_END:
                raise NotAmqp(f"no frame-end octet at offset {base + end - 1}")
            yield self._describe(buf, pos, type_, channel, payload_size, base)
            pos = end

    def _describe(self, buf: bytes, pos: int, type_: int, channel: int,
                  payload_size: int, base: int) -> Frame:
        start = pos + _FRAME_HEADER.size
        payload = buf[start:start + payload_size]
        length = payload_size + _OVERHEAD
        if type_ == METHOD:
            if payload_size < _CLASS_METHOD.size:
                raise NotAmqp(f"a method frame of {payload_size} bytes at offset {base + pos}")
            class_id, method_id = _CLASS_METHOD.unpack_from(payload)
            known = _METHODS.get((class_id << 16) | method_id)
            if known is None:
                raise NotAmqp(f"unknown method {class_id}/{method_id} at offset {base + pos}")
            name, method_class = known
            frame = Frame(self.connection, self.direction, base + pos, length, type_,
                          channel, name)
            frame.class_id, frame.method_id = class_id, method_id
            frame.method = method_class().decode(payload, _CLASS_METHOD.size)
            if name in CARRY_CONTENT:
                self._content[channel] = frame
            return frame
        name = _KIND_NAMES.get(type_)
        if name is None or type_ == PROTOCOL_HEADER:
            raise NotAmqp(f"frame type {type_} at offset {base + pos}")
        frame = Frame(self.connection, self.direction, base + pos, length, type_, channel, name)
        if type_ == HEADER:
            frame.content = self._content.get(channel)
            frame.class_id, _weight, frame.body_size = _CONTENT_HEADER.unpack_from(payload)
            frame.properties = pika.spec.BasicProperties()
            frame.properties.decode(payload, _CONTENT_HEADER.size)
        elif type_ == BODY:
            frame.content = self._content.get(channel)
            frame.body = payload
        return frame


# -- predicates ---------------------------------------------------------------


def _fields_match(decoded, fields: dict) -> bool:
    for field, wanted in fields.items():
        value = getattr(decoded, field, None)
        if callable(wanted):
            if not wanted(value):
                return False
        elif value != wanted:
            return False
    return True


def method(name: str, **fields) -> Callable[[Frame], bool]:
    """
    A predicate for method frames named C{name} (AMQP spelling:
    C{"basic.publish"}, C{"queue.bind-ok"}) whose decoded fields match:
    each keyword is a field of the pika method, and its value either the
    value wanted or a one-argument test of it::

        method("basic.publish", routing_key=lambda key: key.endswith(".conf"))
        method("basic.ack", multiple=False)
    """
    if name not in METHOD_NAMES:
        raise ValueError(f"no AMQP 0-9-1 method is called {name!r}")

    def matches(frame: Frame) -> bool:
        return frame.name == name and _fields_match(frame.method, fields)

    return matches


def content(of: Optional[str] = None, part: Optional[str] = None,
            **fields) -> Callable[[Frame], bool]:
    """
    A predicate for the content frames (header and bodies) of a message:
    C{of} names the method they follow (C{"basic.publish"},
    C{"basic.deliver"}; any by default), C{part} is C{"header"} or
    C{"body"} (both by default), and the keywords test that method's
    fields as in L{method}::

        content("basic.publish", part="body", routing_key="CP1")
    """
    if of is not None and of not in CARRY_CONTENT:
        raise ValueError(f"{of!r} carries no content; one of {sorted(CARRY_CONTENT)}")
    types = {None: (HEADER, BODY), "header": (HEADER,), "body": (BODY,)}.get(part)
    if types is None:
        raise ValueError(f"part must be 'header' or 'body', not {part!r}")

    def matches(frame: Frame) -> bool:
        if frame.type not in types:
            return False
        owner = frame.content
        if owner is None:
            return of is None and not fields
        return (of is None or owner.name == of) and _fields_match(owner.method, fields)

    return matches


def heartbeat() -> Callable[[Frame], bool]:
    """
    A predicate for heartbeat frames.
    """
    return lambda frame: frame.type == HEARTBEAT
