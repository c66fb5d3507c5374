"""
The gateway's rules for chargers coming, going and outliving the broker
link.

Most run in memory: a real WebSocket edge and real autobahn clients over
in-memory transports, a L{FakeBridge} for the broker, time on a clock.
What is checked is what a charger sees (frames, close codes, HTTP
answers) and what the broker sees (declares, consumers, publishes, acks
and requeues), never the gateway's own bookkeeping, so that these tests
hold however that is arranged. The last ones run against the real
broker, as do the contract, close and fault tests, which prove the same
rules end to end.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.amqp import AmqpBridge, BrokerUnavailable, DeclareFailed
from ocppgw.brokerside import LATE_TAKEOVER_WINDOW
from ocppgw.testing import amqp_url, unique_name
from tests.support import GatewayTestCase, InMemoryGateway, close_broker_connections

_RESET = [2, "c1", "Reset", {"type": "Soft"}]
_ACCEPTED = {"status": "Accepted"}


class _GatewayTestCase(SynchronousTestCase):
    #: keyword arguments of the Gateway for a test class
    gateway_options: dict = {}

    def setUp(self):
        self.memory = InMemoryGateway(dict(self.gateway_options))
        self.bridge = self.memory.bridge
        self.gateway = self.memory.gateway

    def connect(self, identity="CP1", **kwargs):
        charger = self.memory.connect(identity, **kwargs)
        self.assertTrue(charger.opened, f"{identity} was refused: {charger.reason}")
        return charger

    def routing_keys(self):
        return [p.routing_key for p in self.bridge.published]

    def assertNoOfflineAnnounced(self):
        self.assertNotIn("ocpp16.StatusNotification.req", self.routing_keys())
        self.assertNotIn("ocppgw.disconnected", self.routing_keys())

    def assertOfflineAnnounced(self, identity="CP1"):
        [status] = self.bridge.published_to("ocpp16.StatusNotification.req")
        self.assertEqual(status.properties["reply_to"], identity)
        self.assertEqual(status.frame[3]["errorCode"], "NoError")
        self.assertEqual(status.frame[3]["status"], "Unavailable")
        [event] = self.bridge.published_to("ocppgw.disconnected")
        self.assertEqual(event.frame["identity"], identity)


class AttachTests(_GatewayTestCase):
    def test_queue_declared_before_the_upgrade_then_consumed(self):
        self.bridge.hold("declare")
        charger = self.memory.connect("CP1")
        self.assertEqual(self.bridge.declared,
                         [("ocpp.CP1", "CP1", {"x-queue-type": "classic"})])
        self.assertFalse(charger.opened)
        self.assertIsNone(self.bridge.consumer_of("CP1"))
        self.bridge.pending_of("declare")[0].succeed()
        self.memory.flush()
        self.assertTrue(charger.opened)
        self.assertIsNotNone(self.bridge.consumer_of("CP1"))
        [event] = self.bridge.published_to("ocppgw.connected")
        self.assertEqual(event.frame["identity"], "CP1")

    def test_command_round_trip_acked_after_the_answer_is_confirmed(self):
        charger = self.connect()
        self.bridge.send_to_charger("CP1", _RESET)
        self.memory.flush()
        self.assertEqual(charger.received, [_RESET])
        charger.send([3, "c1", _ACCEPTED])
        self.memory.flush()
        [answer] = self.bridge.published_to("ocpp16.Reset.conf")
        self.assertEqual(self.bridge.acked, [])
        answer.confirm()
        self.assertEqual(len(self.bridge.acked), 1)

    def test_charger_call_unconfirmed_answered_internal_error(self):
        charger = self.connect()
        charger.send([2, "m1", "Heartbeat", {}])
        self.memory.flush()
        [call] = self.bridge.published_to("ocpp16.Heartbeat.req")
        self.assertTrue(call.properties["mandatory"])
        call.fail()
        self.memory.flush()
        self.assertEqual(charger.received[0][:3], [4, "m1", "InternalError"])

    def test_charger_gone_announced_offline(self):
        charger = self.connect()
        charger.sendClose(1000)
        self.memory.flush()
        self.assertEqual(charger.code, 1000)
        self.assertOfflineAnnounced()
        self.assertIsNone(self.bridge.consumer_of("CP1"))


class TakeoverTests(_GatewayTestCase):
    """Last connection wins: the older one is closed 1000 and announces nothing."""

    def test_newer_connection_replaces_the_older(self):
        old = self.connect()
        new = self.connect()
        self.assertEqual((old.code, old.reason), (1000, "Replaced by a new connection"))
        self.assertFalse(new.closed)
        self.assertNoOfflineAnnounced()
        self.bridge.send_to_charger("CP1", _RESET)
        self.memory.flush()
        self.assertEqual((old.received, new.received), ([], [_RESET]))

    def test_unanswered_command_requeued_after_cancel_ok_then_sent_to_the_new(self):
        """
        The old consumer is cancelled before the new connection declares
        and consumes, and its unanswered command goes back only after the
        cancel is confirmed (else it could come back to the old consumer).
        """
        old = self.connect()
        self.bridge.send_to_charger("CP1", _RESET)
        self.memory.flush()
        self.assertEqual(old.received, [_RESET])
        self.bridge.hold("cancel")
        new = self.memory.connect("CP1")
        [cancel] = self.bridge.pending_of("cancel")
        self.assertEqual((self.bridge.requeued, len(self.bridge.declared)), ([], 1))
        self.assertFalse(old.closed)
        cancel.succeed()
        self.memory.flush()
        self.assertEqual(len(self.bridge.requeued), 1)
        self.assertEqual(old.code, 1000)
        self.assertEqual(len(self.bridge.declared), 2)
        self.assertTrue(new.opened)
        self.assertEqual(new.received, [_RESET])

    def test_answer_to_a_call_of_the_old_connection_reaches_the_new(self):
        old = self.connect()
        old.send([2, "m1", "Heartbeat", {}])
        self.memory.flush()
        self.bridge.published_to("ocpp16.Heartbeat.req")[0].confirm()
        new = self.connect()
        self.bridge.send_to_charger("CP1", [3, "m1", {"currentTime": "2026-01-01T00:00:00Z"}])
        self.memory.flush()
        self.assertEqual(new.received, [[3, "m1", {"currentTime": "2026-01-01T00:00:00Z"}]])
        self.assertEqual(old.code, 1000)

    def test_older_handshake_finishing_later_refused_409(self):
        self.bridge.hold("declare")
        first = self.memory.connect("CP1")
        second = self.memory.connect("CP1")
        first_declare, second_declare = self.bridge.pending_of("declare")
        first_declare.succeed()
        self.memory.flush()
        self.assertFalse(first.opened)
        self.assertEqual(first.status, 409)
        second_declare.succeed()
        self.memory.flush()
        self.assertTrue(second.opened)

    def test_takeover_by_another_gateway_process(self):
        charger = self.connect()
        self.bridge.control_message({"type": "takeover", "identity": "CP1", "node": "node-2"})
        self.memory.flush()
        self.assertEqual(charger.code, 1000)
        self.assertNoOfflineAnnounced()
        self.assertIsNone(self.bridge.consumer_of("CP1"))

    def takeover(self, claimed, node="node-2", identity="CP1"):
        self.bridge.control_message({"type": "takeover", "identity": identity,
                                     "node": node, "claimed": claimed})
        self.memory.flush()

    def test_takeover_claimed_after_the_connection_here_closes_it(self):
        self.memory.clock.advance(100)
        charger = self.connect()
        self.takeover(claimed=100.5)
        self.assertEqual(charger.code, 1000)
        self.assertIsNone(self.bridge.consumer_of("CP1"))

    def test_takeover_claimed_before_the_connection_here_leaves_it(self):
        """
        The charger came back here after connecting to another process and
        that process's takeover arrived late: the newest connection stays.
        """
        self.memory.clock.advance(100)
        charger = self.connect()
        self.takeover(claimed=99.5)
        self.assertFalse(charger.closed)
        self.bridge.send_to_charger("CP1", [2, "c1", "Reset", {"type": "Soft"}])
        self.memory.flush()
        self.assertEqual(charger.received, [[2, "c1", "Reset", {"type": "Soft"}]])

    def test_claims_made_at_the_same_time_ordered_by_node_name(self):
        """
        Each of two processes hears of the other's claim: exactly one of
        them gives its connection up.
        """
        self.memory.clock.advance(100)
        charger = self.connect()  # by node-1, at 100
        self.takeover(claimed=100.0, node="node-0")
        self.assertFalse(charger.closed)
        self.takeover(claimed=100.0, node="node-2")
        self.assertEqual(charger.code, 1000)

    def test_takeover_claimed_long_before_the_connection_here_closes_it(self):
        """
        Claimed more than LATE_TAKEOVER_WINDOW before: clocks that
        disagree, not a late message; the connection here goes, as it did
        before takeovers carried their claim time.
        """
        self.memory.clock.advance(100)
        charger = self.connect()
        self.takeover(claimed=100 - LATE_TAKEOVER_WINDOW + 0.5)
        self.assertFalse(charger.closed)
        self.takeover(claimed=100 - LATE_TAKEOVER_WINDOW - 0.5)
        self.assertEqual(charger.code, 1000)

    def test_takeover_without_a_usable_claim_time_closes(self):
        """An older gateway's takeover (no claim time) wins, as it did."""
        for claimed in (None, "soon", True, float("nan"), float("inf")):
            memory = self.memory = InMemoryGateway()
            self.bridge, self.gateway = memory.bridge, memory.gateway
            memory.clock.advance(100)
            charger = self.connect()
            self.takeover(claimed=claimed)
            self.assertEqual(charger.code, 1000, claimed)

    def takeover_while_preparing(self, claimed):
        """A takeover arrives while the queue of CP1's handshake (at 100) is declared."""
        self.bridge.hold("declare")
        self.memory.clock.advance(100)
        charger = self.memory.connect("CP1")
        self.takeover(claimed=claimed)
        self.bridge.pending_of("declare")[0].succeed()
        self.memory.flush()
        return charger

    def test_handshake_prepared_here_refused_by_a_newer_takeover(self):
        charger = self.takeover_while_preparing(claimed=100.5)
        self.assertFalse(charger.opened)
        self.assertEqual(charger.status, 409)

    def test_handshake_prepared_here_kept_against_an_older_takeover(self):
        self.assertTrue(self.takeover_while_preparing(claimed=99.5).opened)

    def test_takeover_of_another_charger_or_other_message_ignored(self):
        charger = self.connect()
        for message in ({"type": "takeover", "identity": "CP2", "node": "node-2"},
                        {"type": "takeover", "identity": 7},
                        {"type": "something else", "identity": "CP1"}):
            self.bridge.control_message(message)
        self.memory.flush()
        self.assertFalse(charger.closed)

    def test_other_processes_told_only_when_there_may_be_any(self):
        self.connect("CP1")
        self.assertEqual(self.bridge.controls, [])
        self.bridge.peers = True
        self.connect("CP2")
        self.memory.clock.advance(42)
        self.connect("CP2")
        self.assertEqual(self.bridge.controls,
                         [{"type": "takeover", "identity": "CP2", "node": "node-1",
                           "claimed": 0.0},
                          {"type": "takeover", "identity": "CP2", "node": "node-1",
                           "claimed": 42.0}])


class ClosedConnectionTests(_GatewayTestCase):
    def test_link_keeps_only_the_names_of_a_closed_connection(self):
        """
        Once a charger's connection is closed its link keeps a stand-in
        for it: the broker's late requests (an answer to send, a close,
        flow control) do nothing, and the log still has the peer.
        """
        charger = self.connect()
        link = self.gateway.chargers["CP1"]
        edge = link.edge
        peer, listener = link.peer, link.listener
        charger.sendClose(1000)
        self.memory.flush()
        self.assertNotIn("CP1", self.gateway.chargers)
        self.assertIsNot(link.edge, edge)
        self.assertIsNone(edge.link)
        self.assertEqual((link.peer, link.listener), (peer, listener))
        link.send_to_charger(b'[3,"x",{}]')
        link.close(1000, "late")
        link.edge.pause_reading()
        link.edge.resume_reading()
        self.assertEqual(charger.received, [])

    def test_replaced_connection_closing_later_keeps_the_stand_in_too(self):
        old = self.connect()
        old_link = self.gateway.chargers["CP1"]
        self.connect()
        self.memory.flush()
        self.assertEqual(old.code, 1000)
        self.assertEqual(old_link.peer, old_link.edge.peer)
        self.assertFalse(hasattr(old_link.edge, "transport"))


class OutageTests(_GatewayTestCase):
    gateway_options = {"outage_grace": 30.0}

    def test_chargers_kept_during_the_grace_calls_answered_internal_error(self):
        charger = self.connect()
        self.bridge.lose()
        self.memory.advance(29)
        self.assertFalse(charger.closed)
        charger.send([2, "m1", "Heartbeat", {}])
        self.memory.flush()
        self.assertEqual(charger.received[-1][:3], [4, "m1", "InternalError"])

    def test_new_chargers_refused_503_with_retry_after(self):
        self.bridge.lose()
        refused = self.memory.connect("CP2")
        self.assertFalse(refused.opened)
        self.assertEqual(refused.status, 503)
        self.assertTrue(1 <= int(refused.response_headers["retry-after"]) <= 10)

    def test_closed_1012_after_the_grace_offline_published_when_back(self):
        charger = self.connect()
        self.bridge.settle_all()
        self.bridge.lose()
        self.memory.advance(30)
        self.assertEqual(charger.code, 1012)
        self.assertEqual(self.bridge.published_to("ocppgw.disconnected"), [])
        self.bridge.come_back()
        self.assertOfflineAnnounced()

    def test_restored_when_the_broker_returns(self):
        charger = self.connect()
        self.bridge.lose()
        self.bridge.come_back()
        self.assertEqual(len(self.bridge.declared), 2)
        self.assertIsNotNone(self.bridge.consumer_of("CP1"))
        self.memory.advance(60)
        self.assertFalse(charger.closed)
        self.bridge.send_to_charger("CP1", _RESET)
        self.memory.flush()
        self.assertEqual(charger.received, [_RESET])

    def test_readiness_waits_for_every_consumer(self):
        self.connect("CP1")
        self.connect("CP2")
        self.assertIsNone(self.successResultOf(self.gateway.consumers_restored()))
        self.bridge.lose()
        self.bridge.hold("consume")
        self.bridge.come_back()
        restored = self.gateway.consumers_restored()
        first, second = self.bridge.pending_of("consume")
        first.succeed()
        self.assertNoResult(restored)
        second.succeed()
        self.assertIsNone(self.successResultOf(restored))

    def test_command_the_charger_has_not_sent_again_after_a_reconnect(self):
        """
        The broker redelivers what was unacknowledged: the charger, still
        connected, does not get the command it is answering a second time.
        """
        charger = self.connect()
        self.bridge.send_to_charger("CP1", _RESET)
        self.memory.flush()
        self.bridge.lose()
        self.bridge.come_back()
        self.memory.flush()
        self.assertEqual(charger.received, [_RESET])
        charger.send([3, "c1", _ACCEPTED])
        self.memory.flush()
        self.bridge.published_to("ocpp16.Reset.conf")[0].confirm()
        self.assertEqual(len(self.bridge.acked), 1)
        self.assertEqual(self.bridge.queue_of("CP1").ready_bodies, [])

    def test_lost_again_while_restoring(self):
        charger = self.connect()
        self.bridge.lose()
        self.bridge.hold("declare")
        self.bridge.come_back()
        self.bridge.lose()          # the restoring declare fails with the link
        self.bridge.release("declare")
        self.bridge.come_back()
        self.assertIsNotNone(self.bridge.consumer_of("CP1"))
        self.memory.advance(60)
        self.assertFalse(charger.closed)

    def test_restore_refused_by_the_broker_closes_1011(self):
        charger = self.connect()
        other = self.connect("CP2")
        self.bridge.lose()
        self.bridge.hold("declare")
        self.bridge.come_back()
        mine, others = self.bridge.pending_of("declare")
        mine.fail(DeclareFailed("PRECONDITION_FAILED"))
        others.succeed()
        self.memory.flush()
        self.assertEqual(charger.code, 1011)
        self.assertFalse(other.closed)

    def test_charger_leaving_during_the_outage_announced_once_back(self):
        charger = self.connect()
        self.bridge.settle_all()
        self.bridge.lose()
        charger.sendClose(1000)
        self.memory.flush()
        self.assertEqual(self.bridge.published_to("ocppgw.disconnected"), [])
        self.bridge.come_back()
        self.assertOfflineAnnounced()
        self.assertEqual(len(self.bridge.declared), 1)  # nothing restored for it


class OutageKeepTests(_GatewayTestCase):
    gateway_options = {"outage_grace": 5.0, "outage_keep_chargers": True}

    def test_kept_however_long(self):
        charger = self.connect()
        self.bridge.lose()
        self.memory.advance(3600)
        self.assertFalse(charger.closed)


class NoOutageGraceTests(_GatewayTestCase):
    gateway_options = {"outage_grace": 0.0}

    def test_closed_at_once(self):
        charger = self.connect()
        self.bridge.lose()
        self.memory.flush()
        self.assertEqual(charger.code, 1012)


class DrainTests(_GatewayTestCase):
    """What the service does on SIGTERM: stop accepting, then drain."""

    def test_chargers_closed_1012_spread_over_the_window(self):
        chargers = [self.connect(f"CP{n}") for n in range(4)]
        self.gateway.stop_accepting()
        drained = self.gateway.drain(2.0)
        self.memory.flush()
        self.assertEqual([c.code for c in chargers], [1012, None, None, None])
        self.memory.advance(0.5)
        self.assertEqual([c.code for c in chargers], [1012, 1012, None, None])
        self.assertNoResult(drained)
        self.memory.advance(1.0)
        self.assertEqual([c.code for c in chargers], [1012] * 4)
        self.successResultOf(drained)
        self.assertEqual(len(self.bridge.published_to("ocppgw.disconnected")), 4)

    def test_held_commands_requeued_before_the_drain_ends(self):
        charger = self.connect()
        self.bridge.send_to_charger("CP1", _RESET)
        self.bridge.send_to_charger("CP1", [2, "c2", "Reset", {"type": "Hard"}])
        self.memory.flush()
        self.bridge.hold("cancel")
        self.gateway.stop_accepting()
        drained = self.gateway.drain(0)
        self.memory.flush()
        self.assertEqual(charger.code, 1012)
        self.assertNoResult(drained)
        self.bridge.pending_of("cancel")[0].succeed()
        self.successResultOf(drained)
        self.assertEqual(self.bridge.acked, [])
        self.assertEqual(len(self.bridge.queue_of("CP1").ready), 2)

    def test_new_chargers_refused_503_while_draining(self):
        self.gateway.stop_accepting()
        refused = self.memory.connect("CP1")
        self.assertEqual(refused.status, 503)
        self.assertIn("retry-after", refused.response_headers)

    def test_handshake_finishing_during_the_drain_closed_1012(self):
        self.bridge.hold("declare")
        charger = self.memory.connect("CP1")
        self.gateway.stop_accepting()
        self.bridge.pending_of("declare")[0].succeed()
        self.memory.flush()
        self.assertTrue(charger.opened)
        self.assertEqual(charger.code, 1012)

    def test_no_outage_closes_while_draining(self):
        """
        Shutting down, the drain closes the chargers, at its own pace: an
        outage that began before does not close them too.
        """
        chargers = [self.connect(f"CP{n}") for n in range(2)]
        self.bridge.lose()
        self.gateway.stop_accepting()
        self.gateway.drain(100.0)
        self.memory.advance(40)
        self.assertEqual([c.code for c in chargers], [1012, None])
        self.memory.advance(10)
        self.assertEqual([(c.code, c.reason) for c in chargers],
                         [(1012, "Gateway restarting")] * 2)

    def test_shutdown_closes_1001(self):
        chargers = [self.connect(f"CP{n}") for n in range(2)]
        self.successResultOf(self.gateway.close_all())
        self.memory.flush()
        self.assertEqual([c.code for c in chargers], [1001, 1001])


class LifecycleTests(_GatewayTestCase):
    """
    A charger's link to its queue through the states of its lifecycle,
    seen from outside.
    """

    def test_consume_refused_closes_1011(self):
        self.bridge.hold("consume")
        charger = self.connect()
        self.bridge.pending_of("consume")[0].fail(DeclareFailed("ACCESS_REFUSED"))
        self.memory.flush()
        self.assertEqual(charger.code, 1011)

    def test_queue_deleted_closes_that_charger_only(self):
        charger = self.connect("CP1")
        other = self.connect("CP2")
        self.bridge.delete_queue("CP1")
        self.memory.flush()
        self.assertEqual((charger.code, charger.reason), (1011, "Command queue lost"))
        self.assertFalse(other.closed)

    def test_closed_while_consume_on_its_way(self):
        """
        A charger gone before its consume-ok: the consumer is cancelled
        as soon as it exists, and a command waiting in the queue is never
        delivered to it.
        """
        self.bridge.hold("consume")
        charger = self.connect()
        self.bridge.send_to_charger("CP1", _RESET)
        charger.sendClose(1000)
        self.memory.flush()
        self.bridge.pending_of("consume")[0].succeed()
        self.assertEqual(charger.received, [])
        self.assertIsNone(self.bridge.consumer_of("CP1"))
        self.assertEqual(len(self.bridge.queue_of("CP1").ready), 1)

    def test_replaced_while_consume_on_its_way(self):
        """The newer connection consumes only after the older consumer is gone."""
        self.bridge.hold("consume")
        old = self.connect()
        new = self.memory.connect("CP1")
        self.assertEqual(len(self.bridge.declared), 1)
        self.bridge.pending_of("consume")[0].succeed()
        self.memory.flush()
        self.assertEqual(old.code, 1000)
        self.assertEqual(len(self.bridge.declared), 2)
        self.bridge.pending_of("consume")[0].succeed()
        self.assertTrue(new.opened)
        self.assertIsNotNone(self.bridge.consumer_of("CP1"))
        self.assertEqual(len(self.bridge.queue_of("CP1").consumers), 1)

    def test_broker_lost_while_consume_on_its_way_restored_later(self):
        self.bridge.hold("consume")
        charger = self.connect()
        self.bridge.lose()
        self.bridge.release("consume")
        self.bridge.come_back()
        self.assertIsNotNone(self.bridge.consumer_of("CP1"))
        self.assertFalse(charger.closed)

    def test_exchange_declared_again_binds_every_consuming_queue(self):
        self.connect("CP1")
        self.connect("CP2")
        self.bridge.exchange_declared_again()
        self.assertEqual([queue for queue, _key, _args in self.bridge.declared[2:]],
                         ["ocpp.CP1", "ocpp.CP2"])
        self.assertIsNotNone(self.gateway.rebinding)
        self.successResultOf(self.gateway.rebinding)

    def test_broker_unavailable_during_declare_refused_503(self):
        self.bridge.hold("declare")
        charger = self.memory.connect("CP1")
        self.bridge.pending_of("declare")[0].fail(BrokerUnavailable("gone"))
        self.memory.flush()
        self.assertEqual(charger.status, 503)


class RateLimitTests(_GatewayTestCase):
    gateway_options = {"max_message_rate": 1.0, "message_burst": 2, "max_rate_violations": 3}

    def test_over_the_rate_refused_then_closed_1008_neighbour_served(self):
        flooder = self.connect("CP1")
        neighbour = self.connect("CP2")
        for n in range(4):
            flooder.send([2, f"m{n}", "Heartbeat", {}])
        self.memory.flush()
        self.assertEqual(len(self.bridge.published_to("ocpp16.Heartbeat.req")), 2)
        self.assertEqual([frame[:3] for frame in flooder.received],
                         [[4, "m2", "GenericError"], [4, "m3", "GenericError"]])
        self.assertFalse(flooder.closed)
        flooder.send([2, "m4", "Heartbeat", {}])
        self.memory.flush()
        self.assertEqual((flooder.code, flooder.reason), (1008, "Message rate limit exceeded"))
        neighbour.send([2, "n1", "Heartbeat", {}])
        self.memory.flush()
        self.assertEqual(len(self.bridge.published_to("ocpp16.Heartbeat.req")), 3)
        self.assertFalse(neighbour.closed)

    def test_a_quiet_second_ends_the_streak(self):
        charger = self.connect()
        for n in range(4):
            charger.send([2, f"m{n}", "Heartbeat", {}])
        self.memory.flush()
        self.memory.advance(2.5)
        for n in range(4, 7):
            charger.send([2, f"m{n}", "Heartbeat", {}])
        self.memory.flush()
        self.assertFalse(charger.closed)


class OperatorTests(_GatewayTestCase):
    def test_disconnect_closes_the_charger_announced_offline(self):
        charger = self.connect()
        self.assertTrue(self.gateway.disconnect("CP1"))
        self.memory.flush()
        self.assertEqual((charger.code, charger.reason), (1000, "Disconnected by the operator"))
        self.assertOfflineAnnounced()

    def test_disconnect_unknown_charger(self):
        self.assertFalse(self.gateway.disconnect("CP9"))


# -- against the real broker ----------------------------------------------------


class BrokerClosesConnectionTests(GatewayTestCase):
    timeout = 40

    def reconnected(self) -> defer.Deferred:
        """
        Fires once the gateway's bridge is connected again.
        """
        bridge = self.gateway_service.bridge
        d: defer.Deferred = defer.Deferred()

        def observe(connected, why):
            if connected and not d.called:
                d.callback(None)

        bridge.add_observer(observe)
        return d

    @defer.inlineCallbacks
    def test_connection_closed_by_broker(self):
        """
        When the broker closes the gateway's connection, connected chargers
        stay (within the outage grace period), their consumers are restored
        after the reconnect, and a command that was in flight reaches the
        charger once: its redelivery is matched to the outstanding CALL.
        A held command that was never sent is delivered after the answer.
        """
        identity = self.identity()
        charger = yield self.connect(identity)
        yield self.backend.send_to_charger(identity, [2, "c1", "Reset", {"type": "Soft"}])
        yield self.backend.send_to_charger(identity, [2, "c2", "Reset", {"type": "Hard"}])
        first = yield charger.next_call()
        self.assertEqual(first[1], "c1")
        reconnected = self.reconnected()
        closed = yield close_broker_connections(f"ocppgw {self.gateway_service.node}")
        self.assertEqual(closed, 1)
        yield reconnected
        self.assertFalse(charger.closed.called)
        # the broker requeued c1 and c2; c1 comes back and is not re-sent
        charger.answer(first, {"status": "Accepted"})
        answer = yield self.backend.next_message("ocpp16.Reset.conf")
        self.assertEqual(answer.correlation_id, "c1")
        second = yield charger.next_call()
        self.assertEqual(second[1], "c2")
        charger.answer(second, {"status": "Accepted"})
        answer = yield self.backend.next_message("ocpp16.Reset.conf")
        self.assertEqual(answer.correlation_id, "c2")
        # and the charger's own CALLs reach the back end again
        self.backend.handle(
            "Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"}
        )
        reply = yield charger.call("Heartbeat", {})
        self.assertEqual(reply[0], 3)
        # nothing was sent to the charger twice
        self.assertEqual(charger.received_call_ids, ["c1", "c2"])

    @defer.inlineCallbacks
    def test_chargers_closed_1012_after_grace(self):
        """
        With no grace period, chargers are closed with 1012 as soon as the
        broker connection is lost, and are served again after reconnecting.
        """
        self.gateway_service.gateway.outage_grace = 0
        identity = self.identity()
        charger = yield self.connect(identity)
        reconnected = self.reconnected()
        yield close_broker_connections(f"ocppgw {self.gateway_service.node}")
        code, _ = yield charger.closed
        self.assertEqual(code, 1012)
        yield reconnected
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
        from ocppgw.refusals import Refused
        from ocppgw.framing import OCPP16
        from ocppgw.gateway import Gateway

        bridge = AmqpBridge(reactor, amqp_url(), "ocpp", "n")
        gateway = Gateway(reactor, bridge, node="n", queue_arguments={})
        d = defer.ensureDeferred(gateway.charger_connecting(None, "CP", OCPP16))
        failure = self.failureResultOf(d, Refused)
        self.assertEqual(failure.value.status, 503)
