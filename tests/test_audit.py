"""
The frame audit trail, read back from a real RabbitMQ stream queue bound
to the audit exchange, as the operations docs tell operators to do it.
"""

from __future__ import annotations

import datetime

import orjson
from twisted.internet import defer, reactor

from ocppgw import audit
from ocppgw.amqp import BackEndClient
from ocppgw.testing import amqp_url, unique_name
from tests.support import GatewayTestCase

AUDIT_EXCHANGE = unique_name("ocpp-audit")


class AuditTrailTests(GatewayTestCase):
    settings = {"audit": {"enabled": "true", "exchange": AUDIT_EXCHANGE}}
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.stream = unique_name("audit-stream")
        self.audit_client = yield BackEndClient.connect(reactor, amqp_url(), AUDIT_EXCHANGE)
        self.addCleanup(self._drop_stream)
        # What docs/operations.md tells operators to declare.
        yield self.audit_client.declare_queue(
            self.stream, ["#"], durable=True, auto_delete=False,
            arguments={"x-queue-type": "stream"},
        )

    @defer.inlineCallbacks
    def _drop_stream(self):
        yield self.audit_client.delete_queue(self.stream)
        yield self.audit_client.delete_exchange(AUDIT_EXCHANGE)
        yield self.audit_client.close()

    @defer.inlineCallbacks
    def read_stream(self, count: int = 0, offset="first", until=None):
        """
        The messages of the stream from C{offset}: the first C{count}, or
        up to the first for which C{until(message)} is true.
        """
        reader = yield BackEndClient.connect(reactor, amqp_url(), AUDIT_EXCHANGE)
        try:
            messages = yield reader.consume(
                self.stream, auto_ack=False, prefetch=50,
                arguments={"x-stream-offset": offset},
            )
            found = []
            while not count or len(found) < count:
                message = yield messages.get()
                reader.ack(message)
                found.append(message)
                if until is not None and until(message):
                    break
            return found
        finally:
            yield reader.close()

    @defer.inlineCallbacks
    def test_both_directions_in_order(self):
        """
        A real exchange of frames (a charger CALL and its answer, a CSMS
        CALL and the charger's answer, a malformed frame and the error it
        got) and the connect and disconnect events are in the stream in the
        order they happened, each with direction, identity, version, node
        and time headers; another charger's traffic is told apart by the
        identity header.
        """
        self.backend.handle(
            "BootNotification",
            lambda m, p: {"status": "Accepted", "currentTime": "2026-01-01T00:00:00Z",
                          "interval": 60},
        )
        identity = self.identity("RDAM 1")
        other = self.identity("CP")
        charger = yield self.connect(identity)
        bystander = yield self.connect(other, ("ocpp2.0.1",))
        boot = yield charger.call("BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"})
        reply = self.backend.call(identity, [2, "r1", "Reset", {"type": "Soft"}])
        command = yield charger.next_call()
        charger.answer(command, {"status": "Accepted"})
        yield reply
        charger.send(b"[2, broken")
        error = yield charger.other.get()
        yield charger.close()
        yield bystander.close()

        # 2 connects, 2 disconnects, 6 frames of the first charger
        messages = yield self.read_stream(10)
        mine = [m for m in messages if m.headers[audit.topology.HEADER_IDENTITY] == identity]
        theirs = [m for m in messages if m.headers[audit.topology.HEADER_IDENTITY] == other]
        self.assertEqual(
            [(m.routing_key, m.headers[audit.HEADER_DIRECTION]) for m in theirs],
            [(f"{other}.event", "event")] * 2,
        )
        self.assertEqual(theirs[0].headers["x-ocpp-version"], "ocpp2.0.1")
        self.assertEqual(
            [(m.routing_key, m.headers[audit.HEADER_DIRECTION]) for m in mine],
            [
                (f"{identity}.event", "event"),
                (f"{identity}.in", "in"),
                (f"{identity}.out", "out"),
                (f"{identity}.out", "out"),
                (f"{identity}.in", "in"),
                (f"{identity}.in", "in"),
                (f"{identity}.out", "out"),
                (f"{identity}.event", "event"),
            ][: len(mine)],
        )
        self.assertEqual(len(mine), 8)
        bodies = [m.body for m in mine]
        self.assertEqual(orjson.loads(bodies[0])["event"], "connected")
        self.assertEqual(orjson.loads(bodies[1])[2], "BootNotification")
        self.assertEqual(orjson.loads(bodies[2]), boot)
        self.assertEqual(bodies[3], b'[2,"r1","Reset",{"type":"Soft"}]')
        self.assertEqual(orjson.loads(bodies[4]), [3, "r1", {"status": "Accepted"}])
        self.assertEqual(bodies[5], b"[2, broken")
        self.assertEqual(orjson.loads(bodies[6]), error)
        last = orjson.loads(bodies[7])
        self.assertEqual((last["event"], last["code"], last["replaced"]), ("disconnected", 1000, False))
        times = [m.headers[audit.HEADER_TIME] for m in mine]
        self.assertEqual(times, sorted(times))
        for message in mine:
            self.assertEqual(message.headers["x-ocpp-version"], "ocpp1.6")
            self.assertEqual(message.headers["x-ocppgw-node"], self.gateway_service.node)
            self.assertEqual(message.exchange, AUDIT_EXCHANGE)

        # replaying again from the start gives the same history
        again = yield self.read_stream(10)
        self.assertEqual([m.body for m in again], [m.body for m in messages])


    @defer.inlineCallbacks
    def test_replay_one_charger_from_a_point_in_time(self):
        """
        The documented replay: consume the stream from a time (an AMQP
        timestamp), keep one charger by C{x-ocpp-identity} and start exactly
        at C{x-ocppgw-time}; the result is that charger's history from that
        point on, and nothing of another charger.
        """
        identity = self.identity("CP")
        other = self.identity("CP")
        charger = yield self.connect(identity)
        bystander = yield self.connect(other)
        charger.send([2, "early", "Heartbeat", {}])
        bystander.send([2, "theirs", "Heartbeat", {}])
        charger.send([2, "late", "Heartbeat", {}])
        yield charger.close()
        yield bystander.close()
        # 2 connects, 3 frames, 2 disconnects
        history = yield self.read_stream(7)
        mine = [m for m in history if m.headers["x-ocpp-identity"] == identity]
        start = next(m for m in mine if b'"late"' in m.body)
        since_ms = start.headers[audit.HEADER_TIME]
        # the stream offset is a timestamp in whole seconds, at or before
        # the point; the chunk holding it comes whole, hence the filter
        point = datetime.datetime.fromtimestamp(since_ms // 1000, datetime.timezone.utc)
        # how many messages a replay from a time gives depends on where the
        # stream's chunks begin: read up to the charger's last one
        last = mine[-1]
        replayed = yield self.read_stream(
            offset=point,
            until=lambda m: (m.headers["x-ocpp-identity"] == identity
                             and m.body == last.body),
        )
        window = [
            m for m in replayed
            if m.headers["x-ocpp-identity"] == identity
            and m.headers[audit.HEADER_TIME] >= since_ms
        ]
        expected = [m for m in mine if m.headers[audit.HEADER_TIME] >= since_ms]
        self.assertEqual([m.body for m in window], [m.body for m in expected])
        self.assertIn(start.body, [m.body for m in window])
        self.assertEqual(orjson.loads(window[-1].body)["event"], "disconnected")
        # what came before the point (in an earlier millisecond) is left out
        self.assertTrue(all(m.headers[audit.HEADER_TIME] >= since_ms for m in window))
        self.assertLess(len(window), len(mine))


class AuditOffTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_off_by_default(self):
        self.assertIsNone(self.gateway_service.audit)
        self.assertIsNone(self.gateway_service.gateway.audit)
        client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        try:
            exists = yield client.queue_exists("no-such-queue-" + unique_name())
            self.assertFalse(exists)
        finally:
            yield client.close()
