"""
The protocols of what the gateway needs of the broker side, and the two
things that implement them: the AMQP bridge, and the in-memory
L{FakeBridge} of L{ocppgw.testing} -- checked to take the same calls, and
the fake to behave as a broker does where the gateway relies on it.
"""

from __future__ import annotations

import inspect

from twisted.trial.unittest import SynchronousTestCase

from ocppgw.amqp import AmqpBridge, BrokerUnavailable, Consumer
from ocppgw.broker import Bridge, CommandConsumer
from ocppgw.outcome import PublishOutcome
from ocppgw.testing import FakeBridge, FakeConsumer


def _members(protocol: type) -> list[str]:
    return sorted(name for name in vars(protocol) if not name.startswith("_"))


class ConformanceTests(SynchronousTestCase):
    """Every member of a protocol, with its parameters, in each implementation."""

    def assertImplements(self, implementation: type, protocol: type):
        for name in _members(protocol):
            declared = inspect.getattr_static(protocol, name)
            actual = inspect.getattr_static(implementation, name, None)
            self.assertIsNotNone(actual, f"{implementation.__name__} lacks {name}")
            if isinstance(declared, property):
                self.assertIsInstance(actual, property, name)
                continue
            wanted = inspect.signature(declared).parameters
            offered = inspect.signature(getattr(implementation, name)).parameters
            takes_any_keyword = any(p.kind is p.VAR_KEYWORD for p in offered.values())
            for parameter in wanted.values():
                if parameter.name == "self":
                    continue
                if parameter.kind is parameter.KEYWORD_ONLY and takes_any_keyword:
                    continue
                self.assertIn(parameter.name, offered,
                              f"{implementation.__name__}.{name} lacks {parameter.name}")

    def test_amqp_bridge(self):
        self.assertImplements(AmqpBridge, Bridge)

    def test_amqp_consumer(self):
        self.assertImplements(Consumer, CommandConsumer)

    def test_fake_bridge(self):
        self.assertImplements(FakeBridge, Bridge)
        self.assertIsInstance(FakeBridge(), Bridge)

    def test_fake_consumer(self):
        self.assertImplements(FakeConsumer, CommandConsumer)


class FakeBridgeTests(SynchronousTestCase):
    """The fake keeps the broker's rules the gateway depends on."""

    def setUp(self):
        self.bridge = FakeBridge()
        self.deliveries = []
        self.lost = []
        self.bridge.declare_queue("ocpp.CP1", "CP1", {})
        self.consumer = self.successResultOf(
            self.bridge.consume("ocpp.CP1", self.deliveries.append, self.lost.append))

    def test_publish_settled_once_by_the_test(self):
        outcomes = []
        self.bridge.publish(None, "ocpp16.Heartbeat.req", b"[]", on_outcome=outcomes.append,
                            mandatory=True)
        [published] = self.bridge.unsettled()
        self.assertEqual(published.properties, {"mandatory": True})
        published.unroutable()
        self.assertEqual(outcomes, [PublishOutcome.UNROUTABLE])
        self.assertRaises(RuntimeError, published.confirm)

    def test_publish_without_link_fails_at_once(self):
        self.bridge.lose()
        outcomes = []
        self.bridge.publish(None, "k", b"{}", on_outcome=outcomes.append)
        self.assertEqual((outcomes, self.bridge.published), ([PublishOutcome.FAILED], []))
        self.failureResultOf(self.bridge.declare_queue("q", "k", {}), BrokerUnavailable)
        self.failureResultOf(self.bridge.consume("ocpp.CP1", None, None), BrokerUnavailable)

    def test_loss_tells_observers_before_failing_what_is_in_flight(self):
        seen = []
        self.bridge.add_observer(lambda connected, why: seen.append(("observer", connected)))
        self.bridge.publish(None, "k", b"{}", on_outcome=lambda o: seen.append(("publish", o)))
        self.bridge.lose()
        self.assertEqual(seen, [("observer", False), ("publish", PublishOutcome.FAILED)])

    def test_unacked_redelivered_on_the_next_connection_old_tags_moot(self):
        self.bridge.send_to_charger("CP1", [2, "c1", "Reset", {}])
        [first] = self.deliveries
        self.assertFalse(first.redelivered)
        self.bridge.lose()
        self.assertFalse(self.consumer.current(first))
        self.consumer.ack(first)  # dropped: its connection is gone
        self.assertEqual(self.bridge.acked, [])
        self.bridge.come_back()
        consumer = self.successResultOf(
            self.bridge.consume("ocpp.CP1", self.deliveries.append, self.lost.append))
        second = self.deliveries[-1]
        self.assertTrue(second.redelivered)
        consumer.ack(second)
        self.assertEqual(len(self.bridge.acked), 1)
        self.assertEqual(self.lost, [])

    def test_requeue_while_cancelling_waits_for_the_cancel_ok(self):
        self.bridge.send_to_charger("CP1", [2, "c1", "Reset", {}])
        [delivery] = self.deliveries
        self.bridge.hold("cancel")
        cancelled = self.consumer.cancel()
        self.consumer.requeue(delivery)
        self.assertEqual((self.bridge.requeued, len(self.deliveries)), ([], 1))
        self.bridge.pending_of("cancel")[0].succeed()
        self.successResultOf(cancelled)
        self.assertEqual(len(self.bridge.requeued), 1)
        # nobody consumes now: it waits in the queue
        self.assertEqual(len(self.bridge.queue_of("CP1").ready), 1)

    def test_loss_during_a_cancel_ends_it_and_returns_the_command(self):
        self.bridge.send_to_charger("CP1", [2, "c1", "Reset", {}])
        [delivery] = self.deliveries
        self.bridge.hold("cancel")
        cancelled = self.consumer.cancel()
        self.consumer.requeue(delivery)
        self.bridge.lose()
        self.successResultOf(cancelled)
        self.assertEqual(self.bridge.pending, [])
        [message] = self.bridge.queue_of("CP1").ready
        self.assertTrue(message.redelivered)
        self.assertEqual(self.bridge.requeued, [])  # the broker did it, not a nack

    def test_prefetch_bounds_what_is_unacked(self):
        bridge = FakeBridge(prefetch=2)
        bridge.declare_queue("ocpp.CP1", "CP1", {})
        deliveries = []
        consumer = self.successResultOf(bridge.consume("ocpp.CP1", deliveries.append, None))
        for n in range(3):
            bridge.send_to_charger("CP1", [2, f"c{n}", "Reset", {}])
        self.assertEqual(len(deliveries), 2)
        consumer.ack(deliveries[0])
        self.assertEqual(len(deliveries), 3)

    def test_deleted_queue_loses_its_consumer(self):
        self.bridge.delete_queue("CP1")
        self.assertEqual(self.lost, ["queue deleted"])
        self.assertRaises(LookupError, self.bridge.send_to_charger, "CP1", [2, "c", "Reset", {}])
