"""
The FrameReader against frames encoded by pika itself: it must read what
pika would, and hand pika everything it does not take.

End to end (a real broker's deliveries and confirms) it is exercised by
every test that runs a gateway; these pin the parsing edge cases.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from pika import frame, spec
from twisted.trial import unittest

from ocppgw.amqp.reader import FrameReader, read_reply_fields


class FakeChannel:
    def __init__(self, number, is_open=True):
        self.channel_number = number
        self.is_open = is_open


class FakeImpl:
    """
    The parts of pika's connection the reader touches.
    """

    def __init__(self):
        self._channels = {}
        self._frame_buffer = b""
        self.bytes_received = 0
        self.frames_received = 0
        self.processed = []
        self.by_pika = []

    def _process_frame(self, value):
        self.frames_received += 1
        self.processed.append(value)

    def _on_data_available(self, data):
        # pika's own reader, until the FrameReader takes over
        self.by_pika.append(data)


class Consumer:
    def __init__(self, log):
        self.log = log

    def _deliver(self, *fields):
        self.log.append(("deliver",) + fields)


class ConsumerRole:
    def __init__(self, channel, log):
        self.channel = channel
        self.log = log
        self.consumers = {"ctag": Consumer(log)}

    def deliver_to(self, tag):
        return self.consumers.get(tag)

    def consume_ok(self, tag):
        self.log.append(("consume_ok", tag))


class ConfirmRole:
    def __init__(self, channel, log):
        self.channel = channel
        self.log = log

    def confirmed(self, tag, multiple, nacked):
        self.log.append(("confirmed", tag, multiple, nacked))


def deliver(number, body, properties, tag=7, redelivered=False, frame_max=None):
    raw = frame.Method(number, spec.Basic.Deliver(
        "ctag", tag, redelivered, "ocpp", "CP1")).marshal()
    raw += frame.Header(number, len(body), properties).marshal()
    step = frame_max or max(len(body), 1)
    for start in range(0, len(body), step):
        raw += frame.Body(number, body[start:start + step]).marshal()
    return raw


class DeclareRole:
    def __init__(self, channel, log):
        self.channel = channel
        self.log = log

    def bound(self):
        self.log.append(("bound", self.channel.channel_number))


class FrameReaderTests(unittest.TestCase):
    def setUp(self):
        self.impl = FakeImpl()
        self.log = []
        self.reader = FrameReader.install(self.impl)
        for number in (1, 2, 3):
            self.impl._channels[number] = FakeChannel(number)
        self.reader.consumer_channel(ConsumerRole(self.impl._channels[1], self.log))
        self.reader.confirm_channel(ConfirmRole(self.impl._channels[2], self.log))
        self.reader.declare_channel(DeclareRole(self.impl._channels[3], self.log))

    def test_installs_itself(self):
        self.assertEqual(self.impl._on_data_available, self.reader.data_received)

    def test_delivery_with_every_property(self):
        properties = spec.BasicProperties(
            content_type="application/json", content_encoding="utf-8",
            headers={"x-a": 1, "x-b": "two", "x-c": {"d": [1, 2]}},
            delivery_mode=2, priority=3, correlation_id="corr-1",
            reply_to="amq.rabbitmq.reply-to.g1", expiration="1000",
            message_id="m1", timestamp=1700000000, type="Reset", user_id="guest",
            app_id="csms",
        )
        raw = deliver(1, b'[2,"1","Reset",{}]', properties, tag=42, redelivered=True)
        self.reader.data_received(raw)
        self.assertEqual(self.log, [("deliver", 42, b'[2,"1","Reset",{}]',
                                     "amq.rabbitmq.reply-to.g1", "corr-1", True)])
        self.assertEqual(self.impl.processed, [])
        self.assertEqual(self.impl.bytes_received, len(raw))
        self.assertEqual(self.impl.frames_received, 3)

    def test_one_byte_at_a_time(self):
        raw = deliver(1, b"x" * 300, spec.BasicProperties(reply_to="r"), frame_max=100)
        raw += frame.Method(2, spec.Basic.Ack(5, True)).marshal()
        for i in range(len(raw)):
            self.reader.data_received(raw[i:i + 1])
        self.assertEqual(self.log, [("deliver", 7, b"x" * 300, "r", None, False),
                                    ("confirmed", 5, True, False)])

    def test_body_over_several_frames(self):
        body = bytes(range(256)) * 10
        self.reader.data_received(deliver(1, body, spec.BasicProperties(), frame_max=1000))
        self.assertEqual(self.log, [("deliver", 7, body, None, None, False)])

    def test_empty_body(self):
        self.reader.data_received(deliver(1, b"", spec.BasicProperties(correlation_id="c")))
        self.assertEqual(self.log, [("deliver", 7, b"", None, "c", False)])

    def test_confirms(self):
        self.reader.data_received(
            frame.Method(2, spec.Basic.Ack(3, False)).marshal()
            + frame.Method(2, spec.Basic.Nack(9, True, False)).marshal()
        )
        self.assertEqual(self.log, [("confirmed", 3, False, False),
                                    ("confirmed", 9, True, True)])

    def test_consume_ok(self):
        self.reader.data_received(
            frame.Method(1, spec.Basic.ConsumeOk("ocppgw.1.ab.7")).marshal()
            + frame.Method(1, spec.Basic.ConsumeOk("ocppgw.1.ab.8")).marshal())
        self.assertEqual(self.log, [("consume_ok", "ocppgw.1.ab.7"),
                                    ("consume_ok", "ocppgw.1.ab.8")])
        self.assertEqual(self.impl.processed, [])

    def test_bind_ok(self):
        bind_ok = frame.Method(3, spec.Queue.BindOk()).marshal()
        self.reader.data_received(bind_ok + bind_ok)
        self.assertEqual(self.log, [("bound", 3), ("bound", 3)])
        # a bind-ok on a channel that is not a declare channel is pika's
        self.reader.data_received(frame.Method(1, spec.Queue.BindOk()).marshal())
        self.assertEqual(len(self.impl.processed), 1)

    def test_channel_number_changes_role(self):
        # channel 3 closed, and pika reopened its number as a consumer channel
        self.impl._channels[3] = FakeChannel(3)
        self.reader.consumer_channel(ConsumerRole(self.impl._channels[3], self.log))
        self.reader.data_received(frame.Method(3, spec.Queue.BindOk()).marshal()
                                  + deliver(3, b"a", spec.BasicProperties()))
        self.assertEqual(self.log, [("deliver", 7, b"a", None, None, False)])
        self.assertEqual(len(self.impl.processed), 1)

    def test_other_frames_go_to_pika_in_order(self):
        returned = frame.Method(2, spec.Basic.Return(312, "NO_ROUTE", "ocpp", "x")).marshal()
        returned += frame.Header(2, 2, spec.BasicProperties(message_id="p.1")).marshal()
        returned += frame.Body(2, b"{}").marshal()
        raw = (frame.Method(1, spec.Queue.DeclareOk("q", 0, 0)).marshal()
               + deliver(1, b"a", spec.BasicProperties())
               + returned
               + frame.Heartbeat().marshal())
        self.reader.data_received(raw)
        kinds = [type(getattr(f, "method", None) or getattr(f, "properties", None) or f)
                 for f in self.impl.processed]
        self.assertEqual(kinds, [spec.Queue.DeclareOk, spec.Basic.Return,
                                 spec.BasicProperties, frame.Body, frame.Heartbeat])
        self.assertEqual(self.impl.processed[2].properties.message_id, "p.1")
        self.assertEqual(self.log, [("deliver", 7, b"a", None, None, False)])
        self.assertEqual(self.impl.frames_received, 8)

    def test_unknown_consumer_goes_to_pika(self):
        raw = frame.Method(1, spec.Basic.Deliver("other", 1, False, "e", "k")).marshal()
        raw += frame.Header(1, 1, spec.BasicProperties()).marshal()
        raw += frame.Body(1, b"z").marshal()
        self.reader.data_received(raw)
        self.assertEqual(self.log, [])
        self.assertEqual(len(self.impl.processed), 3)

    def test_reused_channel_number_goes_to_pika(self):
        # channel 1 closed and pika opened a new channel with its number
        self.impl._channels[1] = FakeChannel(1)
        self.reader.data_received(deliver(1, b"a", spec.BasicProperties()))
        self.assertEqual(self.log, [])
        self.assertEqual(len(self.impl.processed), 3)

    def test_closing_channel_goes_to_pika(self):
        self.impl._channels[2].is_open = False
        self.reader.data_received(frame.Method(2, spec.Basic.Ack(1, False)).marshal())
        self.assertEqual(self.log, [])
        self.assertEqual(self.impl.processed[0].method.delivery_tag, 1)

    def test_takes_over_pika_buffer(self):
        raw = frame.Method(2, spec.Basic.Ack(4, False)).marshal()
        self.impl._frame_buffer = raw[:5]
        self.reader.data_received(raw[5:])
        self.assertEqual(self.log, [("confirmed", 4, False, False)])
        self.assertEqual(self.impl._frame_buffer, b"")

    def test_broken_frame_end_goes_to_pika(self):
        raw = bytearray(frame.Method(2, spec.Basic.Ack(4, False)).marshal())
        raw[-1] = 0
        good = frame.Method(2, spec.Basic.Ack(3, False)).marshal()
        self.reader.data_received(good + bytes(raw))
        self.assertEqual(self.log, [("confirmed", 3, False, False)])
        self.assertEqual(self.impl.by_pika, [bytes(raw)])


_shortstrs = st.one_of(st.none(), st.text(max_size=40))


class ReplyFieldsTests(unittest.TestCase):
    @settings(max_examples=200, deadline=None)
    @given(content_type=_shortstrs, content_encoding=_shortstrs,
           headers=st.one_of(st.none(), st.dictionaries(
               st.text(min_size=1, max_size=10), st.one_of(st.integers(-2**31, 2**31 - 1),
                                                           st.text(max_size=20)),
               max_size=5)),
           delivery_mode=st.one_of(st.none(), st.sampled_from([1, 2])),
           priority=st.one_of(st.none(), st.integers(0, 9)),
           correlation_id=_shortstrs, reply_to=_shortstrs, message_id=_shortstrs,
           timestamp=st.one_of(st.none(), st.integers(0, 2**40)))
    def test_same_as_pika(self, **fields):
        properties = spec.BasicProperties(**fields)
        raw = frame.Header(1, 0, properties).marshal()
        # frame header (7) + class, weight, body size (12)
        self.assertEqual(read_reply_fields(raw, 19),
                         (properties.correlation_id, properties.reply_to))
        decoded = spec.BasicProperties()
        decoded.decode(raw[7:-1], 12)
        self.assertEqual((decoded.correlation_id, decoded.reply_to),
                         (fields["correlation_id"], fields["reply_to"]))

    def test_not_utf8_is_kept_as_bytes_like_pika(self):
        raw = bytearray(frame.Header(1, 0, spec.BasicProperties(correlation_id="ab")).marshal())
        at = raw.index(b"ab")
        raw[at:at + 2] = b"\xff\xfe"
        decoded = spec.BasicProperties()
        decoded.decode(bytes(raw[7:-1]), 12)
        self.assertEqual(read_reply_fields(bytes(raw), 19), (decoded.correlation_id, None))
        self.assertEqual(decoded.correlation_id, b"\xff\xfe")
