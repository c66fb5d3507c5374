"""
The AMQP bridge against the real broker: confirms, returns, nacks,
declares, and a connection the broker closes.
"""

from __future__ import annotations

import subprocess

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from ocppgw.amqp import AmqpBridge, BackEndClient, BrokerUnavailable, DeclareFailed
from ocppgw.session import PublishOutcome
from ocppgw.testing import FakeCharger, amqp_url, unique_name
from tests.support import GatewayTestCase


def close_broker_connections(connection_name: str) -> defer.Deferred:
    """
    Close, from the broker's side, every connection named C{connection_name}.
    """

    def close():
        # The plain listing (not JSON) prints pids the way
        # close_connection accepts them.
        listing = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
            check=True, capture_output=True, text=True,
        ).stdout
        closed = 0
        for line in listing.splitlines():
            pid, _, properties = line.partition("\t")
            if pid.startswith("<") and connection_name in properties:
                subprocess.run(
                    ["rabbitmqctl", "-q", "close_connection", pid, "closed by test"],
                    check=True, capture_output=True,
                )
                closed += 1
        return closed

    return threads.deferToThread(close)


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
        self.bridge.connected = False
        try:
            outcomes = []
            self.bridge.publish(None, "k", b"[]", on_outcome=outcomes.append)
            self.assertEqual(outcomes, [PublishOutcome.FAILED])
        finally:
            self.bridge.connected = True


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


class BrokerClosesConnectionTests(GatewayTestCase):
    timeout = 40

    @defer.inlineCallbacks
    def test_connection_closed_by_broker(self):
        """
        When the broker closes the gateway's connection, connected chargers
        are closed with 1011 (not left talking to nobody), and once the
        bridge has reconnected chargers are served again.
        """
        up = []
        self.gateway_service.bridge.add_observer(lambda connected, why: up.append(connected))
        identity = self.identity()
        charger = yield self.connect(identity)
        closed = yield close_broker_connections(f"ocppgw {self.gateway_service.node}")
        self.assertEqual(closed, 1)
        code, _ = yield charger.closed
        self.assertEqual(code, 1011)
        # wait for the reconnect, observed through the bridge
        reconnected: defer.Deferred = defer.Deferred()
        self.gateway_service.bridge.add_observer(
            lambda connected, why: connected and not reconnected.called
            and reconnected.callback(None)
        )
        if not self.gateway_service.bridge.connected:
            yield reconnected
        self.assertEqual(up[0], False)
        self.backend.handle(
            "Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"}
        )
        again = yield self.connect(identity)
        answer = yield again.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)


class UnconfirmedCallTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_nacked_call_answered_internal_error(self):
        """
        A charger CALL the broker refuses to take is answered with
        CALLERROR InternalError, so the charger retries.
        """
        queue = unique_name("full")
        yield self.backend.client.declare_queue(
            queue, ["ocpp16.MeterValues.req"], exclusive=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        charger = yield self.connect(self.identity())
        answer = yield charger.call("MeterValues", {"connectorId": 1, "meterValue": []})
        self.assertEqual(answer[2], "InternalError")


class BrokerDownTests(unittest.TestCase):
    def test_refused_when_not_connected(self):
        """
        While the bridge is not connected, a charger is refused with 503
        before the upgrade.
        """
        from ocppgw.edge import Refused
        from ocppgw.framing import OCPP16
        from ocppgw.gateway import Gateway

        bridge = AmqpBridge(reactor, amqp_url(), "ocpp", "n")
        gateway = Gateway(reactor, bridge, node="n", queue_arguments={})
        d = defer.ensureDeferred(gateway.charger_connecting(None, "CP", OCPP16))
        failure = self.failureResultOf(d, Refused)
        self.assertEqual(failure.value.status, 503)

    def test_declare_without_connection(self):
        bridge = AmqpBridge(reactor, amqp_url(), "ocpp", "n")
        self.failureResultOf(bridge.declare_queue("q", "q", {}), BrokerUnavailable)
