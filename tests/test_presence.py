"""
Presence messages are owed until the broker confirms them: kept while it
cannot take them, published in order when it can, bounded.
"""

from __future__ import annotations

import orjson
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.amqp import FixedHeaders
from ocppgw.framing import OCPP16, OCPP201
from ocppgw.outcome import PublishOutcome
from ocppgw.presence import Presence


class _Bridge:
    """Records publishes; fails them at once while not connected."""

    def __init__(self):
        self.connected = True
        self.published = []

    def publish(self, exchange, routing_key, body, *, on_outcome, ordered, **properties):
        if not self.connected:
            on_outcome(PublishOutcome.FAILED)
            return
        self.published.append((routing_key, body, properties, on_outcome, ordered))

    def settle(self, outcome=PublishOutcome.CONFIRMED):
        published, self.published = self.published, []
        for *_, on_outcome, _ordered in published:
            on_outcome(outcome)
        return published


class _Link:
    def __init__(self, identity, version=OCPP16):
        self.identity = identity
        self.version = version
        self.peer = "tcp4:127.0.0.1:4000"
        self.headers = FixedHeaders({"x-ocpp-identity": identity})


class PresenceTests(SynchronousTestCase):
    def setUp(self):
        self.bridge = _Bridge()
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.presence = Presence(self.bridge, self.clock, "node-1", max_owed=5)

    def test_confirmed_messages_are_forgotten(self):
        self.presence.connected(_Link("A"))
        self.presence.disconnected(_Link("A"), 1000)
        self.assertEqual(self.presence.owed, 3)
        published = self.bridge.settle()
        self.assertEqual(
            [key for key, *_ in published],
            ["ocppgw.connected", "ocpp16.StatusNotification.req", "ocppgw.disconnected"],
        )
        self.assertTrue(all(ordered for *_, ordered in published))
        self.assertEqual(self.presence.owed, 0)

    def test_owed_while_down_then_published_in_order(self):
        """
        Chargers that leave while the broker is unreachable are reported
        once it is back, in the order they left, with the time they left.
        """
        self.bridge.connected = False
        self.presence.disconnected(_Link("A"), 1006)
        self.clock.advance(5)
        self.presence.disconnected(_Link("B", OCPP201), None)
        self.assertEqual(self.presence.owed, 4)
        self.clock.advance(60)
        self.bridge.connected = True
        self.presence.flush()
        published = self.bridge.settle()
        self.assertEqual(
            [key for key, *_ in published],
            ["ocpp16.StatusNotification.req", "ocppgw.disconnected",
             "ocpp201.StatusNotification.req", "ocppgw.disconnected"],
        )
        event = orjson.loads(published[1][1])
        self.assertEqual((event["identity"], event["code"]), ("A", 1006))
        self.assertEqual(event["time"], "2027-01-15T08:00:00.000Z")
        status = orjson.loads(published[0][1])
        self.assertEqual(
            (status[3]["vendorErrorCode"], status[3]["timestamp"]),
            ("Offline", "2027-01-15T08:00:00.000Z"),
        )
        later = orjson.loads(published[3][1])
        self.assertEqual((later["identity"], later["time"]), ("B", "2027-01-15T08:00:05.000Z"))
        self.assertEqual(published[0][2]["reply_to"], "A")
        self.assertEqual(self.presence.owed, 0)

    def test_lost_in_flight_published_again(self):
        """
        A message whose confirm was lost with the connection is published
        again after the reconnect (at least once), before later ones.
        """
        self.presence.disconnected(_Link("A"), 1000)
        in_flight = self.bridge.published[:]
        self.bridge.published = []
        self.bridge.connected = False
        for *_, on_outcome, _ordered in in_flight:
            on_outcome(PublishOutcome.FAILED)
        self.presence.connected(_Link("B"))
        self.bridge.connected = True
        self.presence.flush()
        published = self.bridge.settle()
        self.assertEqual(
            [key for key, *_ in published],
            ["ocpp16.StatusNotification.req", "ocppgw.disconnected", "ocppgw.connected"],
        )
        self.assertEqual(published[0][2]["correlation_id"], in_flight[0][2]["correlation_id"])
        self.assertEqual(self.presence.owed, 0)

    def test_flush_skips_what_is_in_flight(self):
        self.presence.connected(_Link("A"))
        self.presence.flush()
        self.assertEqual(len(self.bridge.published), 1)

    def test_bounded_oldest_dropped_and_counted(self):
        self.bridge.connected = False
        for n in range(4):
            self.presence.disconnected(_Link(f"C{n}"), 1006)  # two messages each
        self.assertEqual(self.presence.owed, 5)
        self.assertEqual(self.presence.dropped, 3)
        self.bridge.connected = True
        self.presence.flush()
        published = self.bridge.settle()
        self.assertEqual(
            [(key, orjson.loads(body).get("identity")) for key, body, *_ in published
             if key.startswith("ocppgw")],
            [("ocppgw.disconnected", "C1"), ("ocppgw.disconnected", "C2"),
             ("ocppgw.disconnected", "C3")],
        )

    def test_switches(self):
        presence = Presence(self.bridge, self.clock, "n", offline_status=False, events=False)
        presence.connected(_Link("A"))
        presence.disconnected(_Link("A"), 1000)
        self.assertEqual(self.bridge.published, [])
