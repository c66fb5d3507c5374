"""
The AMQP 0-9-1 frame reader and predicates of the fault tests
(L{tests.faults.amqpframes}), on byte streams that pika marshals.
"""

from __future__ import annotations

import random

import pika.frame
import pika.spec
from twisted.trial import unittest

from tests.faults.amqpframes import (
    DOWN, METHOD_NAMES, UP, FrameStream, NotAmqp, content, heartbeat, method,
)


_PUBLISH = pika.frame.Method(1, pika.spec.Basic.Publish(exchange="x", routing_key="k.conf"))


def _stream() -> bytes:
    """
    A client's stream as pika marshals it: the protocol header, a publish
    with its header and two bodies on channel 1, a heartbeat.
    """
    properties = pika.spec.BasicProperties(message_id="m7")
    return b"".join([
        pika.frame.ProtocolHeader().marshal(),
        _PUBLISH.marshal(),
        pika.frame.Header(1, 7, properties).marshal(),
        pika.frame.Body(1, b"abc").marshal(),
        pika.frame.Body(1, b"defg").marshal(),
        pika.frame.Heartbeat().marshal(),
    ])


class FrameStreamTests(unittest.TestCase):
    def read_in_pieces(self, data: bytes, cuts) -> list:
        """
        Feed C{data} to a L{FrameStream} split at C{cuts}, keeping the
        incomplete rest as the proxy does.
        """
        stream = FrameStream(None, UP)
        frames, pending, base = [], b"", 0
        edges = [0, *cuts, len(data)]
        for start, end in zip(edges, edges[1:]):
            buf = pending + data[start:end]
            upto = 0
            for frame in stream.read(buf, base):
                frames.append(frame)
                upto = frame.end - base
            pending, base = buf[upto:], base + upto
        self.assertEqual(pending, b"")
        return frames

    def describe(self, frames) -> list:
        return [(f.offset, f.length, f.type, f.channel, f.name,
                 f.content.name if f.content else None) for f in frames]

    def test_frames(self):
        """
        Every frame is described: names, channels, decoded fields, the
        publish the content belongs to.
        """
        frames = self.read_in_pieces(_stream(), [])
        self.assertEqual(
            [f.name for f in frames],
            ["protocol-header", "basic.publish", "content-header", "content-body",
             "content-body", "heartbeat"],
        )
        publish, header, body = frames[1:4]
        self.assertEqual(publish.method.routing_key, "k.conf")
        self.assertTrue(publish.is_method("basic.publish", exchange="x"))
        self.assertFalse(publish.is_method("basic.publish", exchange="y"))
        self.assertEqual((header.body_size, header.properties.message_id), (7, "m7"))
        self.assertIs(body.content, publish)
        self.assertEqual(body.body, b"abc")
        self.assertTrue(heartbeat()(frames[-1]))
        self.assertTrue(content("basic.publish", part="body", routing_key="k.conf")(body))
        self.assertFalse(content("basic.publish", part="header")(body))
        self.assertEqual(frames[-1].end, len(_stream()))

    def test_any_split(self):
        """
        However the bytes are split, the same frames come out.
        """
        data = _stream()
        whole = self.describe(self.read_in_pieces(data, []))
        for cut in range(1, len(data)):
            self.assertEqual(self.describe(self.read_in_pieces(data, [cut])), whole, cut)
        rng = random.Random(11)
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(data)), 5))
            self.assertEqual(self.describe(self.read_in_pieces(data, cuts)), whole, cuts)

    def test_not_amqp(self):
        """
        A stream that breaks the format raises L{NotAmqp}: a wrong
        protocol header, a missing frame-end octet, an unknown frame type.
        """
        data = _stream()
        method_end = 8 + len(_PUBLISH.marshal())
        broken = [
            b"HTTP/1.1" + data[8:],
            data[:method_end - 1] + b"\x00" + data[method_end:],
            data[:8] + b"\x07" + data[9:],
        ]
        for stream_bytes in broken:
            with self.assertRaises(NotAmqp):
                list(FrameStream(None, UP).read(stream_bytes, 0))

    def test_predicates_refuse_unknown_names(self):
        with self.assertRaises(ValueError):
            method("basic.publsh")
        with self.assertRaises(ValueError):
            content("queue.declare")

    def test_names(self):
        """
        Methods are named as AMQP spells them, whatever pika calls them.
        """
        for name in ("queue.bind-ok", "basic.recover-async", "confirm.select-ok",
                     "connection.update-secret-ok", "basic.get-empty", "basic.nack"):
            self.assertIn(name, METHOD_NAMES)
        self.assertNotIn("queue.bindok", METHOD_NAMES)

    def test_broker_side(self):
        """
        The broker's side has no protocol header, except when it refuses
        the client's version by answering its own.
        """
        start = pika.frame.Method(0, pika.spec.Connection.Start()).marshal()
        [frame] = FrameStream(None, DOWN).read(start, 0)
        self.assertEqual((frame.name, frame.channel, frame.length), ("connection.start", 0,
                                                                     len(start)))
        [frame] = FrameStream(None, DOWN).read(b"AMQP\x00\x00\x09\x01", 0)
        self.assertEqual(frame.name, "protocol-header")
