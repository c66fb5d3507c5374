"""
The AMQP bridge against the real broker: confirms, returns, nacks,
declares, and what it does while not connected.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from ocppgw.amqp import AmqpBridge, BackEndClient, BrokerUnavailable, DeclareFailed
from ocppgw.amqp import LinkState
from ocppgw.amqp.channels import NackWatch
from ocppgw.session import PublishOutcome
from ocppgw.testing import amqp_url, unique_name


class BridgeTestCase(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.exchange = unique_name("bridge-test")
        self.node = unique_name("node")
        self.bridge = AmqpBridge(
            reactor, amqp_url(), self.exchange, self.node,
            confirm_window=16, declare_channels=2, consumer_channels=2,
        )
        yield self.bridge.start()
        self.client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        self.addCleanup(self._cleanup)

    @defer.inlineCallbacks
    def _cleanup(self):
        yield self.bridge.stop()
        yield self.client.delete_exchange(self.exchange)
        yield self.client.close()

    def publish(self, routing_key, body=b"[]", mandatory=True):
        outcome: defer.Deferred = defer.Deferred()
        self.bridge.publish(
            None, routing_key, body, mandatory=mandatory, on_outcome=outcome.callback
        )
        return outcome


class ConfirmTests(BridgeTestCase):
    @defer.inlineCallbacks
    def test_returns_matched_to_their_publish(self):
        """
        With many publishes in flight (and a window smaller than their
        number), each routable one is confirmed and each unroutable one is
        reported unroutable -- never credited to a neighbour.
        """
        queue = unique_name("q")
        yield self.client.declare_queue(queue, ["routable"], exclusive=True)
        keys = ["routable" if i % 3 else "nowhere" for i in range(400)]
        outcomes = yield defer.gatherResults([self.publish(key) for key in keys])
        expected = [
            PublishOutcome.CONFIRMED if key == "routable" else PublishOutcome.UNROUTABLE
            for key in keys
        ]
        self.assertEqual(outcomes, expected)

    @defer.inlineCallbacks
    def test_nack_reported_failed(self):
        """
        A publish the broker refuses (queue full, reject-publish) fails.
        """
        queue = unique_name("full")
        yield self.client.declare_queue(
            queue, ["full"], exclusive=True,
            arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
        )
        first = yield self.publish("full")
        second = yield self.publish("full")
        self.assertEqual((first, second), (PublishOutcome.CONFIRMED, PublishOutcome.FAILED))

    @defer.inlineCallbacks
    def test_channel_refusing_a_route_is_replaced(self):
        """
        A publish channel the broker keeps refusing for one route (every
        publish nacked, none accepted, for NackWatch.SECONDS) is closed and
        replaced; what the new channel publishes is confirmed.
        """
        self.patch(NackWatch, "SECONDS", 0.3)
        queue = unique_name("full")
        yield self.client.declare_queue(
            queue, ["refused"], exclusive=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        yield self.client.declare_queue(unique_name("q"), ["fine"], exclusive=True)
        first = self.bridge._channels.publishers[0]
        outcomes = []
        started = reactor.seconds()
        while self.bridge._channels.publishers[0] is first:
            outcomes.append((yield self.publish("refused")))
            # an accepted publish to another route does not reset this one
            self.assertEqual((yield self.publish("fine")), PublishOutcome.CONFIRMED)
            if reactor.seconds() - started > 10:
                self.fail(f"not replaced after {len(outcomes)} refusals")
        self.assertEqual(set(outcomes), {PublishOutcome.FAILED})
        self.assertGreaterEqual(len(outcomes), NackWatch.AT_LEAST)
        self.assertFalse(first.open)
        self.assertEqual((yield self.publish("fine")), PublishOutcome.CONFIRMED)

    @defer.inlineCallbacks
    def test_properties_of_a_publish(self):
        queue = unique_name("q")
        yield self.client.declare_queue(queue, ["k"], exclusive=True)
        messages = yield self.client.consume(queue)
        self.bridge.publish(
            None, "k", b"[1]", correlation_id="c", type="T", reply_to="r",
            headers={"h": 1},
        )
        message = yield messages.get()
        self.assertEqual(
            (message.body, message.correlation_id, message.type, message.reply_to,
             message.headers, message.delivery_mode, message.content_type,
             message.app_id),
            (b"[1]", "c", "T", "r", {"h": 1}, 2, "application/json", "ocppgw"),
        )

    def test_publish_while_disconnected_fails_at_once(self):
        link = self.bridge.link
        link.state = LinkState.RECONNECTING
        try:
            outcomes = []
            self.bridge.publish(None, "k", b"[]", on_outcome=outcomes.append)
            self.assertEqual(outcomes, [PublishOutcome.FAILED])
        finally:
            link.state = LinkState.OPEN


class DeclareTests(BridgeTestCase):
    @defer.inlineCallbacks
    def test_conflicting_declare_fails_only_itself(self):
        bad = unique_name("ocpp.bad")
        yield self.client.declare_queue(bad, durable=False, auto_delete=True,
                                        arguments={"x-message-ttl": 1})
        self.addCleanup(self.client.delete_queue, bad)
        good = [unique_name("ocpp.good") for _ in range(12)]
        for name in good:
            self.addCleanup(self.client.delete_queue, name)
        attempts = [self.bridge.declare_queue(bad, "bad", {"x-message-ttl": 2})]
        attempts += [self.bridge.declare_queue(name, name, {}) for name in good]
        attempts += [self.bridge.declare_queue(bad, "bad", {"x-message-ttl": 2})]
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        self.assertFalse(results[0][0])
        results[0][1].trap(DeclareFailed)
        self.assertFalse(results[-1][0])
        results[-1][1].trap(DeclareFailed)
        self.assertEqual([ok for ok, _ in results[1:-1]], [True] * len(good))


class BrokerDownTests(unittest.TestCase):
    def test_declare_without_connection(self):
        bridge = AmqpBridge(reactor, amqp_url(), "ocpp", "n")
        self.failureResultOf(bridge.declare_queue("q", "q", {}), BrokerUnavailable)
