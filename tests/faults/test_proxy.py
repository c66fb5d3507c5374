"""
The fault-injection proxy (L{tests.faults.proxy}) against the real broker,
with a real pika client through it.
"""

from __future__ import annotations

import random

import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.trial import unittest

from ocppgw.amqp import BackEndClient
from ocppgw.testing import amqp_url, unique_name
from tests.faults.amqpframes import BODY, DOWN, HEADER, METHOD, PROTOCOL_HEADER, UP
from tests.faults.proxy import FaultProxy, content, method
from tests.support import free_port


class _Connection(TwistedProtocolConnection):
    """
    pika's Twisted connection, keeping the bytes it got and telling how
    its TCP connection ended (after pika has dealt with it).
    """

    def __init__(self, port: int) -> None:
        parameters = pika.URLParameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F")
        # no heartbeat frames in the streams these tests count bytes of
        parameters.heartbeat = 0
        super().__init__(parameters, custom_reactor=reactor)
        self.port = port
        self.received = bytearray()
        self.lost: defer.Deferred = defer.Deferred()
        self.reason = None

    def dataReceived(self, data):
        self.received += data
        super().dataReceived(data)

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self.reason = reason
        self.lost.callback(None)


class Client:
    """
    An AMQP client through the proxy: a connection and a confirming
    channel, and what it saw.
    """

    def __init__(self, connection: _Connection, channel) -> None:
        self.connection = connection
        self.channel = channel

    @classmethod
    def connect(cls, port: int) -> defer.Deferred:
        return cls.open(_Connection(port))

    @classmethod
    @defer.inlineCallbacks
    def open(cls, connection: _Connection):
        """
        Connect C{connection}, open a channel and put it in confirm mode.
        """
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", connection.port, timeout=10), connection
        )
        connection.transport.setTcpNoDelay(True)
        yield connection.ready
        channel = yield connection.channel()
        yield channel.confirm_delivery()
        return cls(connection, channel)

    def publish(self, exchange: str, routing_key: str, body: bytes,
                message_id=None) -> defer.Deferred:
        """
        Publish; the Deferred fires when the broker confirms it.
        """
        return self.channel.basic_publish(
            exchange, routing_key, body,
            pika.BasicProperties(content_type="text/plain", message_id=message_id),
        )

    @defer.inlineCallbacks
    def close(self):
        if self.connection.is_open:
            self.connection.close()
            yield self.connection.lost


def outcome(d: defer.Deferred) -> list:
    """
    A list that gets C{("ok", result)} or C{("failed", failure)} when
    C{d} fires (so that a test can look at it without waiting).
    """
    seen: list = []
    d.addCallbacks(lambda result: seen.append(("ok", result)),
                   lambda failure: seen.append(("failed", failure)))
    return seen


class ProxyTestCase(unittest.TestCase):
    """
    A proxy to the shared broker, an exchange and a queue on the broker
    that gets C{self.key} and C{self.key + ".<anything>"}, and an admin
    connection straight to the broker to look at that queue.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.proxy = FaultProxy(reactor).start()
        self.addCleanup(self.proxy.stop)
        self.exchange = unique_name("proxy-test")
        self.key = unique_name("key")
        self.admin = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        self.addCleanup(self._cleanup)
        self.queue = yield self.admin.declare_queue(
            unique_name("proxy-test"), [self.key + ".#"], auto_delete=False
        )

    @defer.inlineCallbacks
    def _cleanup(self):
        yield self.admin.delete_queue(self.queue)
        yield self.admin.delete_exchange(self.exchange)
        yield self.admin.close()

    @defer.inlineCallbacks
    def client(self):
        client = yield Client.connect(self.proxy.port)
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def queued(self):
        """
        The messages in the queue, in order, as a DeferredQueue (consumed
        straight from the broker).
        """
        messages = yield self.admin.consume(self.queue)
        return messages

    @defer.inlineCallbacks
    def assert_queued_after_marker(self, *bodies):
        """
        Publish a marker straight to the queue, after everything else
        that got there; the queue then holds C{bodies} and the marker, in
        that order.

        @return: the DeferredQueue of the queue's further messages.
        """
        yield self.publish_directly(b"marker")
        messages = yield self.queued()
        for body in (*bodies, b"marker"):
            self.assertEqual((yield messages.get()).body, body)
        return messages

    def publish_directly(self, body: bytes) -> defer.Deferred:
        """
        Publish to the queue straight to the broker; fires once confirmed.
        """
        return self.admin.send_to_charger(None, body, routing_key=self.key)


class ForwardingTests(ProxyTestCase):
    @defer.inlineCallbacks
    def test_publish_with_confirm(self):
        """
        A publish with confirm goes through unchanged, also a body larger
        than a frame (so split over several frames and many TCP reads);
        the proxy saw the publish going up with its exchange and routing
        key, its content frames, and the confirm coming down.
        """
        client = yield self.client()
        body = random.Random(7).randbytes(300_000)
        yield client.publish(self.exchange, self.key, body, message_id="m1")
        messages = yield self.queued()
        message = yield messages.get()
        self.assertEqual(message.body, body)
        self.assertEqual(message.message_id, "m1")
        self.assertEqual(message.content_type, "text/plain")

        connection = self.proxy.connections[0]
        self.assertEqual(connection.number, 1)
        self.assertTrue(connection.established)
        self.assertEqual((self.proxy.accepted, self.proxy.refused), (1, 0))
        first = connection.frames[0]
        self.assertEqual((first.direction, first.type, first.offset), (UP, PROTOCOL_HEADER, 0))
        self.assertEqual(
            [f.name for f in self.proxy.seen(direction=DOWN)][:1], ["connection.start"]
        )
        [publish] = self.proxy.seen(method("basic.publish"), UP)
        self.assertEqual((publish.method.exchange, publish.method.routing_key),
                         (self.exchange, self.key))
        self.assertEqual((publish.type, publish.class_id, publish.method_id), (METHOD, 60, 40))
        [header] = self.proxy.seen(content("basic.publish", part="header"), UP)
        self.assertIs(header.content, publish)
        self.assertEqual((header.type, header.channel, header.body_size),
                         (HEADER, publish.channel, len(body)))
        self.assertEqual(header.properties.message_id, "m1")
        bodies = self.proxy.seen(content("basic.publish", part="body"), UP)
        self.assertGreater(len(bodies), 1)
        self.assertTrue(all(f.type == BODY and f.content is publish for f in bodies))
        self.assertEqual(b"".join(f.body for f in bodies), body)
        [confirm] = self.proxy.seen(method("basic.ack"), DOWN)
        self.assertEqual((confirm.channel, confirm.method.delivery_tag),
                         (publish.channel, 1))
        # every frame in each direction follows the one before it
        for direction in (UP, DOWN):
            frames = self.proxy.seen(direction=direction)
            self.assertEqual([f.offset for f in frames[1:]], [f.end for f in frames[:-1]])
            self.assertEqual(frames[-1].end, connection.forwarded(direction))

    @defer.inlineCallbacks
    def test_next_connection_and_when_frame(self):
        """
        L{FaultProxy.next_connection} fires when a client's broker
        connection is made; L{FaultProxy.when_frame} with the frame asked
        for, once passed on, counted from when it was called.
        """
        connected = self.proxy.next_connection()
        opened = self.proxy.when_frame(method("connection.open-ok"), DOWN)
        client = yield self.client()
        connection = yield connected
        self.assertIs(connection, self.proxy.connections[0])
        self.assertIs(self.proxy.current, connection)
        frame = yield opened
        self.assertEqual((frame.name, frame.connection), ("connection.open-ok", connection))
        second = self.proxy.when_frame(method("basic.publish"), UP, count=2)
        yield client.publish(self.exchange, self.key, b"one")
        self.assertFalse(second.called)
        yield client.publish(self.exchange, self.key, b"two")
        frame = yield second
        self.assertEqual(frame.name, "basic.publish")
        self.assertEqual(len(self.proxy.seen(method("basic.publish"))), 2)


class CutTests(ProxyTestCase):
    @defer.inlineCallbacks
    def test_cut(self):
        """
        L{FaultProxy.cut} resets the client's connection (not an orderly
        close) and the proxy's broker connection.
        """
        client = yield self.client()
        connection = self.proxy.connections[0]
        yield self.proxy.cut()
        yield client.connection.lost
        reason = client.connection.reason
        self.assertTrue(reason.check(ConnectionLost))
        self.assertFalse(reason.check(ConnectionDone))
        self.assertTrue(connection.closed)
        self.assertIsNone(self.proxy.current)


    @defer.inlineCallbacks
    def test_cut_before_publish(self):
        """
        Cut before a publish: the broker never gets it, and the client's
        publish is never confirmed; the publish before it reached the
        broker, as everything before the cut point does.
        """
        client = yield self.client()
        wanted = method("basic.publish", routing_key=lambda key: key.endswith(".conf"))
        cut = self.proxy.cut_when(wanted, UP, when="before")
        client.publish(self.exchange, self.key, b"earlier").addErrback(lambda _f: None)
        confirmed = outcome(client.publish(self.exchange, self.key + ".conf", b"cut"))
        frame = yield cut
        self.assertEqual(frame.method.routing_key, self.key + ".conf")
        self.assertTrue(frame.connection.closed)
        self.assertEqual(frame.connection.cut_at[UP], frame.offset)
        yield client.connection.lost
        self.assertEqual(confirmed[0][0], "failed")
        # had the cut publish gone through, it would be before the marker
        yield self.assert_queued_after_marker(b"earlier")

    @defer.inlineCallbacks
    def test_cut_after_publish(self):
        """
        Cut after a publish: the broker has it (it is in the queue, before
        anything published after the cut), the client never sees its
        confirm.
        """
        client = yield self.client()
        cut = self.proxy.cut_when(method("basic.publish", routing_key=self.key), UP,
                                  when="after")
        confirmed = outcome(client.publish(self.exchange, self.key, b"delivered"))
        frame = yield cut
        # the whole message: method, content header, body
        [body] = self.proxy.seen(content("basic.publish", part="body"))
        self.assertIs(body.content, frame)
        self.assertEqual(frame.connection.cut_at[UP], body.end)
        yield client.connection.lost
        self.assertEqual(confirmed[0][0], "failed")
        self.assertEqual(self.proxy.seen(method("basic.ack"), DOWN), [])
        yield self.assert_queued_after_marker(b"delivered")

    @defer.inlineCallbacks
    def consumed_through_proxy(self, body: bytes):
        """
        A client consuming the queue through the proxy (acking by hand),
        and the delivery of C{body} published straight to the broker.
        """
        client = yield self.client()
        deliveries, _tag = yield client.channel.basic_consume(self.queue)
        yield self.publish_directly(body)
        _channel, delivered, _properties, got = yield deliveries.get()
        self.assertEqual(got, body)
        return client, delivered.delivery_tag

    @defer.inlineCallbacks
    def test_cut_after_ack(self):
        """
        Cut after a consumer's ack goes up: the broker has taken it (the
        message is not delivered again).
        """
        client, tag = yield self.consumed_through_proxy(b"acked")
        cut = self.proxy.cut_when(method("basic.ack", delivery_tag=tag), UP, when="after")
        client.channel.basic_ack(tag)
        frame = yield cut
        self.assertEqual(frame.connection.cut_at[UP], frame.end)
        yield client.connection.lost
        yield self.assert_queued_after_marker()

    @defer.inlineCallbacks
    def test_cut_before_ack(self):
        """
        Cut before a consumer's ack goes up: the broker never gets it and
        delivers the message again.
        """
        client, tag = yield self.consumed_through_proxy(b"unacked")
        cut = self.proxy.cut_when(method("basic.ack"), UP, when="before")
        client.channel.basic_ack(tag)
        yield cut
        yield client.connection.lost
        yield self.publish_directly(b"marker")
        messages = yield self.queued()
        # the requeue and the marker may reach the queue in either order
        got = [(yield messages.get()), (yield messages.get())]
        self.assertEqual(sorted((m.body, m.redelivered) for m in got),
                         [(b"marker", False), (b"unacked", True)])

    @defer.inlineCallbacks
    def test_cut_before_confirm(self):
        """
        Cut before the confirm comes down: the broker has the message, the
        client never learns it; the client sees a close of its connection.
        """
        client = yield self.client()
        cut = self.proxy.cut_when(method("basic.ack"), DOWN, when="before")
        confirmed = outcome(client.publish(self.exchange, self.key, b"kept"))
        frame = yield cut
        self.assertEqual(frame.method.delivery_tag, 1)
        yield client.connection.lost
        reason = client.connection.reason
        self.assertEqual(confirmed[0][0], "failed")
        # everything before the confirm, and not the confirm
        self.assertEqual(len(client.connection.received), frame.offset)
        self.assertTrue(reason.check(ConnectionDone))
        message = yield (yield self.queued()).get()
        self.assertEqual(message.body, b"kept")

    @defer.inlineCallbacks
    def test_cut_after_second_confirm(self):
        """
        Cut after the second confirm comes down: the client has both
        confirms before its connection goes.
        """
        client = yield self.client()
        cut = self.proxy.cut_when(method("basic.ack"), DOWN, when="after", count=2)
        events: list = []
        client.connection.lost.addCallback(lambda _reason: events.append("lost"))
        yield client.publish(self.exchange, self.key, b"one")
        second = client.publish(self.exchange, self.key, b"two")
        second.addCallback(lambda _: events.append("confirmed"))
        frame = yield cut
        self.assertEqual(frame.method.delivery_tag, 2)
        yield client.connection.lost
        self.assertEqual(events, ["confirmed", "lost"])
        self.assertEqual(len(client.connection.received), frame.end)

    @defer.inlineCallbacks
    def test_predicate_that_raises(self):
        """
        A predicate that raises fails its own Deferred, and the traffic
        goes on.
        """
        client = yield self.client()
        watched = self.proxy.when_frame(lambda frame: frame.method.no_such_field, UP)
        yield client.publish(self.exchange, self.key, b"passes")
        yield self.assertFailure(watched, AttributeError)
        self.assertIs(self.proxy.current, self.proxy.connections[0])

    @defer.inlineCallbacks
    def test_cut_when_cancelled(self):
        """
        A cut whose Deferred is cancelled is disarmed.
        """
        client = yield self.client()
        cut = self.proxy.cut_when(method("basic.publish"), UP)
        cut.cancel()
        self.failureResultOf(cut, defer.CancelledError)
        yield client.publish(self.exchange, self.key, b"passes")
        self.assertIs(self.proxy.current, self.proxy.connections[0])

    @defer.inlineCallbacks
    def test_cut_after_bytes_splits_a_frame(self):
        """
        L{FaultProxy.cut_after_bytes} on the current connection passes
        exactly that many more bytes and cuts, here inside the frame of a
        delivery: the client got its first bytes and no message.
        """
        client = yield self.client()
        deliveries, _tag = yield client.channel.basic_consume(self.queue, auto_ack=True)
        connection = self.proxy.current
        before = connection.forwarded(DOWN)
        cut = self.proxy.cut_after_bytes(DOWN, 10)
        yield self.publish_directly(b"never seen")
        self.assertIs((yield cut), connection)
        yield client.connection.lost
        self.assertEqual(connection.cut_at[DOWN], before + 10)
        self.assertEqual(len(client.connection.received), before + 10)
        [deliver] = self.proxy.seen(method("basic.deliver"))
        self.assertEqual(deliver.offset, before)
        self.assertGreater(deliver.length, 10)
        self.assertEqual(deliveries.pending, [])

    @defer.inlineCallbacks
    def test_cut_after_no_bytes_of_the_next_connection(self):
        """
        A byte cut of 0 for the next connection cuts it as soon as its
        broker connection is made: nothing passes, the client cannot
        complete its handshake.
        """
        cut = self.proxy.cut_after_bytes(UP, 0)
        yield self.assertFailure(Client.connect(self.proxy.port), Exception)
        connection = yield cut
        self.assertIs(connection, self.proxy.connections[0])
        self.assertTrue(connection.established)
        self.assertEqual(connection.cut_at, {UP: 0, DOWN: 0})

    @defer.inlineCallbacks
    def test_cut_after_random_bytes(self):
        """
        Cuts at seeded random offsets of the next connection, up and down,
        anywhere before the publish of a fresh client is confirmed: exactly
        that many bytes pass, the client loses its connection and never
        gets the confirm.
        """
        # the length of each direction up to the confirm, on a clean run
        client = yield self.client()
        yield client.publish(self.exchange, self.key, b"measure")
        lengths = {d: self.proxy.current.forwarded(d) for d in (UP, DOWN)}
        yield client.close()
        yield self.proxy.connections[0].when_closed()
        seed = random.randrange(1 << 32)
        Logger().info("random byte cuts: seed {seed}", seed=seed)
        rng = random.Random(seed)
        for run in range(8):
            direction = (UP, DOWN)[run % 2]
            n = rng.randrange(lengths[direction])
            note = f"seed {seed}, run {run}: cut {direction} after {n} bytes"
            cut = self.proxy.cut_after_bytes(direction, n)
            connection = _Connection(self.proxy.port)
            try:
                client = yield Client.open(connection)
                yield client.publish(self.exchange, self.key, b"measure")
            except Exception:
                pass
            else:
                self.fail(f"{note}: the publish was confirmed")
            cut_connection = yield cut
            yield connection.lost
            self.assertEqual(cut_connection.cut_at[direction], n, note)
            if direction == DOWN:
                self.assertEqual(len(connection.received), n, note)


class DropTests(ProxyTestCase):
    @defer.inlineCallbacks
    def test_confirm_dropped_connection_goes_on(self):
        """
        The first publish's confirm is left out: the broker has the message,
        the client never hears of it, and the next publish is confirmed on
        the same connection.
        """
        client = yield self.client()
        dropped = self.proxy.drop_when(method("basic.ack"), DOWN)
        first = outcome(client.publish(self.exchange, self.key, b"first"))
        frame = yield dropped
        self.assertEqual(frame.method.delivery_tag, 1)
        yield client.publish(self.exchange, self.key, b"second")
        self.assertEqual(first, [])
        self.assertTrue(client.connection.is_open)
        yield self.assert_queued_after_marker(b"first", b"second")

    @defer.inlineCallbacks
    def test_drop_cancelled(self):
        client = yield self.client()
        dropped = self.proxy.drop_when(method("basic.ack"), DOWN)
        dropped.cancel()
        yield self.assertFailure(dropped, defer.CancelledError)
        yield client.publish(self.exchange, self.key, b"confirmed")


class StallTests(ProxyTestCase):
    @defer.inlineCallbacks
    def test_stall_holds_traffic(self):
        """
        While stalled, a publish does not get through (a message published
        straight to the broker meanwhile is queued first) and is not
        confirmed, and the connection stays open; after L{unstall} it is
        confirmed and queued.
        """
        client = yield self.client()
        yield client.publish(self.exchange, self.key, b"before")
        self.proxy.stall()
        publishing = client.publish(self.exchange, self.key, b"held")
        held = outcome(publishing)
        # a full round trip straight to the broker, then a message after it
        yield self.admin.declare_queue(self.queue, auto_delete=False)
        messages = yield self.assert_queued_after_marker(b"before")
        self.assertEqual(held, [])
        self.assertEqual(len(self.proxy.seen(method("basic.publish"))), 1)
        self.assertTrue(client.connection.is_open)
        confirm = self.proxy.when_frame(method("basic.ack"), DOWN)
        self.proxy.unstall()
        yield publishing
        self.assertEqual(held[0][0], "ok")
        self.assertEqual((yield confirm).method.delivery_tag, 2)
        self.assertEqual((yield messages.get()).body, b"held")
        yield client.publish(self.exchange, self.key, b"after")
        self.assertEqual((yield messages.get()).body, b"after")

    @defer.inlineCallbacks
    def test_slow_client_throttles_the_broker_side(self):
        """
        A client that does not read makes the proxy stop reading the
        broker (rather than buffer what the broker sends); once it reads
        again, every message arrives whole.
        """
        client = yield self.client()
        deliveries, _tag = yield client.channel.basic_consume(self.queue, auto_ack=True)
        connection = self.proxy.current
        throttled = connection.when_throttled(DOWN)
        client.connection.transport.pauseProducing()
        bodies = [bytes([i]) * 256 * 1024 for i in range(64)]
        for body in bodies:
            yield self.publish_directly(body)
        yield throttled
        self.assertGreater(connection.throttled[DOWN], 0)
        client.connection.transport.resumeProducing()
        for body in bodies:
            item = yield deliveries.get()
            self.assertEqual(item[3], body)


class RefuseTests(ProxyTestCase):
    @defer.inlineCallbacks
    def test_refuse_resets_new_connections(self):
        """
        While refusing, a new connection is reset before the AMQP
        handshake; afterwards connections go through again.
        """
        yield self.proxy.refuse(True)
        yield self.assertFailure(Client.connect(self.proxy.port), Exception)
        self.assertEqual((self.proxy.accepted, self.proxy.refused), (1, 1))
        self.assertEqual(self.proxy.connections, [])
        yield self.proxy.refuse(False)
        client = yield self.client()
        yield client.publish(self.exchange, self.key, b"back")
        self.assertEqual((self.proxy.accepted, self.proxy.refused), (2, 1))

    @defer.inlineCallbacks
    def test_refuse_with_port_closed(self):
        """
        With C{port_closed}, connecting is refused by the OS; listening
        resumes on the same port.
        """
        port = self.proxy.port
        yield self.proxy.refuse(True, port_closed=True)
        yield self.assertFailure(Client.connect(port), ConnectionRefusedError)
        self.assertEqual(self.proxy.accepted, 0)
        yield self.proxy.refuse(False)
        self.assertEqual(self.proxy.port, port)
        client = yield self.client()
        yield client.publish(self.exchange, self.key, b"back")

    @defer.inlineCallbacks
    def test_node_down_and_back(self):
        """
        Refusing and cutting is a node going down: the client loses its
        connection and cannot connect; once refusing ends it can, and
        L{FaultProxy.next_connection} sees it.
        """
        client = yield self.client()
        yield self.proxy.refuse(True)
        yield self.proxy.cut()
        yield client.connection.lost
        yield self.assertFailure(Client.connect(self.proxy.port), Exception)
        yield self.proxy.refuse(False)
        back = self.proxy.next_connection()
        client = yield self.client()
        self.assertIs((yield back), self.proxy.connections[1])
        yield client.publish(self.exchange, self.key, b"back")


class _Raw(Protocol):
    """
    A TCP client that sends bytes and keeps what comes back.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.received = b""
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self._data)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason=None):
        self.lost.callback(self.received)


class StreamTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_broker_unreachable(self):
        """
        When the broker cannot be reached, the client's connection is
        reset and the reason kept.
        """
        proxy = FaultProxy(reactor, target_port=free_port()).start()
        self.addCleanup(proxy.stop)
        yield self.assertFailure(Client.connect(proxy.port), Exception)
        connection = proxy.connections[0]
        yield connection.when_closed()
        self.assertFalse(connection.established)
        self.assertTrue(connection.failure.check(ConnectionRefusedError))

    @defer.inlineCallbacks
    def test_not_amqp_passes_unread(self):
        """
        A client that does not speak AMQP is passed on as it is: RabbitMQ
        answers with the protocol header it speaks and closes.
        """
        proxy = FaultProxy(reactor).start()
        self.addCleanup(proxy.stop)
        raw = _Raw(b"GET / HTTP/1.0\r\n\r\n")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), raw)
        answer = yield raw.lost
        self.assertEqual(answer, b"AMQP\x00\x00\x09\x01")
        [frame] = proxy.seen()
        self.assertEqual((frame.direction, frame.name), (DOWN, "protocol-header"))
        yield proxy.connections[0].when_closed()
        self.assertEqual(proxy.connections[0].forwarded(UP), 18)
