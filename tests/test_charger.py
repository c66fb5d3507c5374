"""
A charger's lifecycle (ocppgw.charger) in memory: the transition table,
the link's moves on a Clock with a stand-in bridge, and the gateway's
claims of an identity by handshakes that overlap.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.amqp import BrokerUnavailable
from ocppgw.charger import (
    AWAITING_BROKER,
    CHARGER_TRANSITIONS,
    ENDED,
    HANDSHAKING,
    ChargerLink,
    ChargerSettings,
    ChargerState,
)
from ocppgw.refusals import Refused
from ocppgw.framing import OCPP16
from ocppgw.gateway import CLOSE_REPLACED, Gateway
from ocppgw.outcome import Delivery
from ocppgw.states import InvalidTransition

S = ChargerState

#: Every move the lifecycle allows, written out once more by hand: a
#: change of the table has to be made here too, on purpose.
ALLOWED = {
    (S.CLAIMED, S.DECLARING), (S.CLAIMED, S.REPLACED), (S.CLAIMED, S.CLOSED),
    (S.DECLARING, S.ATTACHED), (S.DECLARING, S.REPLACED), (S.DECLARING, S.CLOSED),
    (S.ATTACHED, S.CONSUMING), (S.ATTACHED, S.BROKER_LOST),
    (S.ATTACHED, S.REPLACED), (S.ATTACHED, S.CLOSED),
    (S.CONSUMING, S.BROKER_LOST), (S.CONSUMING, S.REPLACED), (S.CONSUMING, S.CLOSED),
    (S.BROKER_LOST, S.RESTORING), (S.BROKER_LOST, S.REPLACED), (S.BROKER_LOST, S.CLOSED),
    (S.RESTORING, S.CONSUMING), (S.RESTORING, S.BROKER_LOST),
    (S.RESTORING, S.REPLACED), (S.RESTORING, S.CLOSED),
}


class _Factory:
    listener = "ws"


class FakeEdge:
    """What a link and the gateway use of a charger's WebSocket."""

    factory = _Factory()
    link = None

    def __init__(self, identity: str = "CP1") -> None:
        self.identity = identity
        self.version = OCPP16
        self.peer = "tcp4:127.0.0.1:4000"
        self.sent: list[bytes] = []
        self.closed: list[tuple] = []
        self.paused = False

    def send_frame(self, frame: bytes) -> None:
        self.sent.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def pause_reading(self) -> None:
        self.paused = True


class FakeConsumer:
    def __init__(self) -> None:
        self.acked: list = []
        self.requeued: list = []
        self.cancelled = False

    def ack(self, delivery) -> None:
        self.acked.append(delivery)

    def requeue(self, delivery) -> None:
        self.requeued.append(delivery)

    def current(self, delivery) -> bool:
        return True

    def cancel(self) -> defer.Deferred:
        self.cancelled = True
        return defer.succeed(None)


class StandInBridge:
    """
    Only what a link and the gateway's handshake ask of the bridge; every
    declare and consume waits for the test to fire it.
    """

    connected = True

    def __init__(self) -> None:
        self.declares: list[defer.Deferred] = []
        self.consumes: list[defer.Deferred] = []
        self.published: list[tuple] = []

    def declare_queue(self, queue, binding_key, arguments) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.declares.append(d)
        return d

    def consume(self, queue, on_delivery, on_lost) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.consumes.append(d)
        return d

    def publish(self, exchange, routing_key, body, **properties) -> None:
        self.published.append((exchange, routing_key, body))

    def may_have_peers(self) -> bool:
        return False

    def add_observer(self, observer) -> None:
        pass

    add_flow_observer = add_control_handler = add_topology_observer = add_observer


class TransitionTableTests(SynchronousTestCase):
    def link_in(self, state: ChargerState) -> ChargerLink:
        link = ChargerLink(FakeEdge(), ChargerSettings(node="n", queue_arguments={}),
                           StandInBridge(), Clock())
        link.state = state
        return link

    def test_table_is_the_documented_one(self):
        table = {(old, new) for old, row in CHARGER_TRANSITIONS.items() for new in row}
        self.assertEqual(table, ALLOWED)

    def test_every_allowed_move(self):
        for old, new in sorted(ALLOWED, key=lambda move: (move[0].value, move[1].value)):
            link = self.link_in(old)
            link._goto(new)
            self.assertIs(link.state, new)

    def test_every_other_move_is_refused(self):
        for old in ChargerState:
            for new in ChargerState:
                if (old, new) in ALLOWED:
                    continue
                link = self.link_in(old)
                with self.assertRaises(InvalidTransition) as caught:
                    link._goto(new)
                self.assertIn(f"{old.value} -> {new.value}", str(caught.exception))
                self.assertIs(link.state, old)

    def test_the_ends_are_ends(self):
        for state in ENDED:
            self.assertEqual(CHARGER_TRANSITIONS[state], frozenset())
        self.assertTrue(HANDSHAKING.isdisjoint(AWAITING_BROKER))


class LinkLifecycleTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.bridge = StandInBridge()
        self.edge = FakeEdge()
        self.moves: list[ChargerState] = []
        self.link = ChargerLink(
            self.edge, ChargerSettings(node="n", queue_arguments={}), self.bridge,
            self.clock, on_state=lambda link: self.moves.append(link.state),
        )

    def open(self):
        self.link.declaring()
        self.clock.advance(5)
        self.link.attach(self.clock.seconds())
        self.link.start_consuming()

    def test_claim_to_consuming(self):
        self.assertIs(self.link.state, S.CLAIMED)
        self.open()
        self.assertEqual(self.link.connected_at, 5)
        consumer = FakeConsumer()
        self.bridge.consumes[0].callback(consumer)
        self.assertIs(self.link.consumer, consumer)
        self.assertEqual(self.moves, [S.DECLARING, S.ATTACHED, S.CONSUMING])

    def test_broker_lost_and_restored(self):
        self.open()
        self.bridge.consumes[0].callback(FakeConsumer())
        self.link.broker_lost()
        self.assertIsNone(self.link.consumer)
        self.link.broker_lost()  # told once per loss: the second is a no-op
        self.link.restore()
        self.assertIs(self.link.state, S.RESTORING)
        self.bridge.declares[0].callback(None)
        self.bridge.consumes[1].callback(FakeConsumer())
        self.assertEqual(self.moves[-4:], [S.CONSUMING, S.BROKER_LOST, S.RESTORING,
                                           S.CONSUMING])

    def test_restore_that_loses_the_broker_again(self):
        self.open()
        self.bridge.consumes[0].errback(BrokerUnavailable("gone"))
        self.assertIs(self.link.state, S.BROKER_LOST)
        self.link.restore()
        self.bridge.declares[0].errback(BrokerUnavailable("gone again"))
        self.assertIs(self.link.state, S.BROKER_LOST)
        self.assertEqual(self.edge.closed, [])

    def test_detach_cancels_and_requeues(self):
        self.open()
        consumer = FakeConsumer()
        self.bridge.consumes[0].callback(consumer)
        self.link.session.delivery(Delivery("t1", b'[2,"c1","Reset",{"type":"Soft"}]'))
        d = self.link.detach(replaced=True)
        self.successResultOf(d)
        self.assertIs(self.link.state, S.REPLACED)
        self.assertTrue(consumer.cancelled)
        self.assertEqual([delivery.tag for delivery in consumer.requeued], ["t1"])
        self.successResultOf(self.link.detach(replaced=False))  # once only
        self.assertIs(self.link.state, S.REPLACED)

    def test_detached_while_consume_on_its_way(self):
        self.open()
        d = self.link.detach(replaced=False)
        self.assertNoResult(d)
        consumer = FakeConsumer()
        self.bridge.consumes[0].callback(consumer)
        self.successResultOf(d)
        self.assertTrue(consumer.cancelled)
        self.assertIs(self.link.state, S.CLOSED)

    def test_superseded_or_refused_only_while_handshaking(self):
        self.link.superseded()
        self.assertIs(self.link.state, S.REPLACED)
        self.link.refused()
        self.assertIs(self.link.state, S.REPLACED)
        other = ChargerLink(FakeEdge(), ChargerSettings(node="n", queue_arguments={}),
                            self.bridge, self.clock)
        other.declaring()
        other.attach(0.0)
        other.superseded()
        other.refused()
        self.assertIs(other.state, S.ATTACHED)

    def test_replaced_claim_does_not_declare_on(self):
        self.link.superseded()
        self.link.declaring()
        self.assertIs(self.link.state, S.REPLACED)


class ClaimTests(SynchronousTestCase):
    """
    Handshakes for one identity that overlap: the newest claim wins.
    """

    def setUp(self):
        self.clock = Clock()
        self.bridge = StandInBridge()
        self.gateway = Gateway(self.clock, self.bridge, node="n", queue_arguments={})

    def test_newer_handshake_wins(self):
        first, second = FakeEdge(), FakeEdge()
        d1 = defer.ensureDeferred(self.gateway.charger_connecting(first, "CP1", OCPP16))
        d2 = defer.ensureDeferred(self.gateway.charger_connecting(second, "CP1", OCPP16))
        self.assertIs(first.link.state, S.REPLACED)
        self.assertIs(second.link.state, S.DECLARING)
        for declare in self.bridge.declares:
            declare.callback(None)
        self.assertEqual(self.failureResultOf(d1, Refused).value.status, 409)
        self.successResultOf(d2)
        self.gateway.charger_opened(second)
        self.assertIs(self.gateway.chargers["CP1"], second.link)
        self.assertIs(second.link.state, S.ATTACHED)
        self.assertEqual(self.gateway._claims, {})
        # the refused one closes: nothing of it is left
        self.gateway.charger_closed(first, 1006, "")
        self.assertIsNone(first.link)
        self.assertIs(self.gateway.chargers["CP1"], second.link)

    def test_replaced_between_declare_and_open(self):
        first, second = FakeEdge(), FakeEdge()
        d1 = defer.ensureDeferred(self.gateway.charger_connecting(first, "CP1", OCPP16))
        self.bridge.declares[0].callback(None)
        self.successResultOf(d1)
        link = first.link
        defer.ensureDeferred(self.gateway.charger_connecting(second, "CP1", OCPP16))
        self.gateway.charger_opened(first)
        self.assertEqual(first.closed, [CLOSE_REPLACED])
        self.assertIs(link.state, S.REPLACED)
        self.assertIsNone(first.link)
        self.assertNotIn("CP1", self.gateway.chargers)

    def test_charger_gone_during_the_declare(self):
        edge = FakeEdge()
        d = defer.ensureDeferred(self.gateway.charger_connecting(edge, "CP1", OCPP16))
        link = edge.link
        self.gateway.charger_closed(edge, 1006, "")
        self.assertIs(link.state, S.CLOSED)
        self.bridge.declares[0].callback(None)
        self.assertEqual(self.failureResultOf(d, Refused).value.status, 409)
        self.assertEqual(self.gateway._claims, {})

    def test_declare_fails_for_want_of_broker(self):
        edge = FakeEdge()
        d = defer.ensureDeferred(self.gateway.charger_connecting(edge, "CP1", OCPP16))
        self.bridge.declares[0].errback(BrokerUnavailable("gone"))
        self.assertEqual(self.failureResultOf(d, Refused).value.status, 503)
        self.assertIs(edge.link.state, S.CLOSED)
        self.assertEqual(self.gateway._claims, {})

    def test_readiness_waits_for_chargers_awaiting_the_broker(self):
        edge = FakeEdge()
        defer.ensureDeferred(self.gateway.charger_connecting(edge, "CP1", OCPP16))
        self.bridge.declares[0].callback(None)
        self.bridge.connected = False
        self.gateway.charger_opened(edge)
        self.assertIs(edge.link.state, S.BROKER_LOST)
        self.assertEqual(self.gateway.awaiting_broker, {edge.link})
        restored = self.gateway.consumers_restored()
        self.assertNoResult(restored)
        self.gateway.charger_closed(edge, 1000, "")
        self.successResultOf(restored)
        self.assertEqual(self.gateway.awaiting_broker, set())


class ChargerTransitionTableTests(SynchronousTestCase):
    """The charger lifecycle's table, as data."""

    def test_every_state_has_a_row(self):
        self.assertEqual(set(CHARGER_TRANSITIONS), set(ChargerState))

    def test_a_broker_loss_can_catch_a_charger_in_any_live_state(self):
        for state in (ChargerState.ATTACHED, ChargerState.CONSUMING, ChargerState.RESTORING):
            self.assertIn(ChargerState.BROKER_LOST, CHARGER_TRANSITIONS[state])
        for state in ChargerState:
            if state not in (ChargerState.REPLACED, ChargerState.CLOSED):
                self.assertIn(ChargerState.CLOSED, CHARGER_TRANSITIONS[state])
        self.assertEqual(CHARGER_TRANSITIONS[ChargerState.CLOSED], frozenset())
