"""
An operator deletes the OCPP exchange under a running gateway (and maybe
declares it again at once): the gateway notices, declares it again and
binds every connected charger's queue again, so commands reach chargers
and their frames reach the back end.
"""

from __future__ import annotations

from twisted.internet import defer, reactor

from ocppgw.testing import FakeBackEnd, amqp_url
from tests.support import GatewayTestCase

_TIME = {"currentTime": "2026-01-01T00:00:00Z"}


class _TopologyTestCase(GatewayTestCase):
    timeout = 30

    def restored(self) -> defer.Deferred:
        """Fires once the gateway has bound its chargers' queues again."""
        d: defer.Deferred = defer.Deferred()
        gateway = self.gateway_service.gateway

        def observe():
            # called after the gateway's own observer started re-binding
            gateway.rebinding.chainDeferred(d)

        self.gateway_service.bridge.add_topology_observer(observe)
        return d

    @defer.inlineCallbacks
    def fresh_backend(self):
        """
        The old back end's queue lost its binding with the exchange: a
        back end binds again, as a real one reconnecting would.
        """
        yield self.backend.stop()
        self.backend = yield FakeBackEnd.start(reactor, amqp_url(), self.exchange)
        self.backend.handle("Heartbeat", lambda m, p: _TIME)

    @defer.inlineCallbacks
    def assert_charger_served(self, identity, charger):
        answer = yield charger.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)
        yield self.backend.send_to_charger(identity, [2, "cmd-1", "Reset", {"type": "Soft"}])
        command = yield charger.next_call()
        self.assertEqual(command[1], "cmd-1")
        charger.answer(command, {"status": "Accepted"})
        answer = yield self.backend.next_message("ocpp16.Reset.conf")
        self.assertEqual(answer.correlation_id, "cmd-1")


class SentinelTests(_TopologyTestCase):
    settings = {"amqp": {"topology_check_interval": "0.2"}}

    @defer.inlineCallbacks
    def test_exchange_deleted(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        restored = self.restored()
        yield self.backend.client.delete_exchange(self.exchange)
        yield restored
        self.assertEqual(self.gateway_service.bridge.topology_restores, 1)
        yield self.fresh_backend()
        yield self.assert_charger_served(identity, charger)
        self.assertFalse(charger.closed.called)

    @defer.inlineCallbacks
    def test_exchange_deleted_and_declared_again_at_once(self):
        """
        The exchange exists again by the next check, but every binding to
        it is gone: the sentinel bound into the old one is gone too.
        """
        identity = self.identity()
        charger = yield self.connect(identity)
        restored = self.restored()
        channel = self.backend.client._channel
        yield channel.exchange_delete(self.exchange)
        yield channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        yield restored
        yield self.fresh_backend()
        yield self.assert_charger_served(identity, charger)


class PublishNotFoundTests(_TopologyTestCase):
    """
    Without the periodic check, the first publish to the deleted exchange
    (its channel closed with 404) shows it.
    """

    settings = {"amqp": {"topology_check_interval": "0"}}

    @defer.inlineCallbacks
    def test_publish_to_deleted_exchange(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        restored = self.restored()
        yield self.backend.client.delete_exchange(self.exchange)
        answer = yield charger.call("Heartbeat", {})
        # nothing is lost silently: the charger is told to retry
        self.assertEqual((answer[0], answer[2]), (4, "InternalError"))
        yield restored
        yield self.fresh_backend()
        yield self.assert_charger_served(identity, charger)
        self.assertEqual(self.gateway_service.bridge.topology_restores, 1)
