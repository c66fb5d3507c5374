"""
The AMQP contract (docs/amqp-contract.md), end to end: real gateway, real broker,
real WebSocket chargers (L{FakeCharger}), a back end on a real queue.
"""

from __future__ import annotations

import orjson
from twisted.internet import defer, reactor

from ocppgw.amqp import BackEndClient
from ocppgw.testing import FakeCharger, amqp_url
from tests.support import GatewayTestCase

BOOT_16 = {"chargePointVendor": "Vendor", "chargePointModel": "Model"}


def boot_answer(_message, _payload):
    return {
        "status": "Accepted",
        "currentTime": "2026-01-01T00:00:00Z",
        "interval": 300,
    }


class ChargerFramesTests(GatewayTestCase):
    """
    What a charger sends arrives in RabbitMQ as the contract says.
    """

    @defer.inlineCallbacks
    def test_call_routing_body_and_properties(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        raw = b'[2, "boot-1", "BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"}]'
        charger.send(raw)
        message = yield self.backend.next_message("ocpp16.BootNotification.req")
        self.assertEqual(message.body, raw)
        self.assertEqual(message.content_type, "application/json")
        self.assertEqual(message.delivery_mode, 2)
        self.assertEqual(message.correlation_id, "boot-1")
        self.assertEqual(message.type, "BootNotification")
        self.assertEqual(message.reply_to, identity)
        self.assertEqual(message.app_id, "ocppgw")
        self.assertIsInstance(message.timestamp, int)
        self.assertEqual(message.headers["x-ocpp-identity"], identity)
        self.assertEqual(message.headers["x-ocpp-version"], "ocpp1.6")
        self.assertEqual(message.headers["x-ocppgw-node"], self.gateway_service.node)

    @defer.inlineCallbacks
    def test_answer_round_trip(self):
        self.backend.handle("BootNotification", boot_answer)
        charger = yield self.connect(self.identity(), ("ocpp2.0.1",))
        answer = yield charger.call(
            "BootNotification",
            {"reason": "PowerUp", "chargingStation": {"model": "M", "vendorName": "V"}},
        )
        self.assertEqual(answer[0], 3)
        message = yield self.backend.next_message("ocpp201.BootNotification.req")
        self.assertEqual(message.headers["x-ocpp-version"], "ocpp2.0.1")

    @defer.inlineCallbacks
    def test_unroutable_call_not_implemented(self):
        """
        A CALL no queue is bound for gets CALLERROR NotImplemented.
        """
        # this back end listens only for BootNotification
        yield self.backend.stop()
        self.backend = yield self.start_backend(("ocpp16.BootNotification.req",))
        charger = yield self.connect(self.identity())
        answer = yield charger.call("DataTransfer", {"vendorId": "x"})
        self.assertEqual(answer[:3], [4, answer[1], "NotImplemented"])

    def start_backend(self, bindings):
        from ocppgw.testing import FakeBackEnd

        return FakeBackEnd.start(reactor, amqp_url(), self.exchange, bindings)

    @defer.inlineCallbacks
    def test_own_frames_never_loop_back(self):
        """
        The charger's frames reach the back end but never its own queue.
        """
        identity = self.identity()
        charger = yield self.connect(identity)
        charger.send([2, "x1", "Heartbeat", {}])
        charger.send([3, "x2", {}])
        yield self.backend.next_message("ocpp16.response.conf")
        client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        self.addCleanup(client.close)
        # passive check of the queue: nothing queued for the charger
        frame = yield client._channel.queue_declare("ocpp." + identity, passive=True)
        self.assertEqual(frame.method.message_count, 0)
        self.assertEqual(charger.calls.pending, [])
        self.assertEqual(charger.other.pending, [])

    @defer.inlineCallbacks
    def test_queue_declared_with_arguments(self):
        identity = self.identity()
        yield self.connect(identity)
        client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        self.addCleanup(client.close)
        # redeclaring with the same arguments succeeds; other arguments fail
        yield client._channel.queue_declare(
            "ocpp." + identity,
            durable=True,
            arguments={
                "x-queue-type": "classic",
                "x-message-ttl": 300000,
                "x-expires": 600000,
            },
        )
        failed = client._channel.queue_declare(
            "ocpp." + identity,
            durable=True,
            arguments={
                "x-queue-type": "classic",
                "x-message-ttl": 1,
                "x-expires": 600000,
            },
        )
        yield self.assertFailure(failed, Exception)


class CommandTests(GatewayTestCase):
    """
    Commands from the back end reach the charger as the contract says.
    """

    @defer.inlineCallbacks
    def test_one_outstanding_call(self):
        """
        A second CSMS CALL is delivered only after the first is answered.
        """
        self.backend.handle(
            "Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"}
        )
        identity = self.identity()
        charger = yield self.connect(identity)
        yield self.backend.send_to_charger(
            identity, [2, "c1", "Reset", {"type": "Soft"}]
        )
        yield self.backend.send_to_charger(
            identity, [2, "c2", "Reset", {"type": "Hard"}]
        )
        first = yield charger.next_call()
        self.assertEqual(first[1], "c1")
        # The second is held while the first is open: prove it with a
        # round trip through the broker and the same queue, which the
        # held CALL must not overtake.
        answer = yield charger.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)
        self.assertEqual(charger.calls.pending, [])
        charger.answer(first, {"status": "Accepted"})
        second = yield charger.next_call()
        self.assertEqual(second[1], "c2")
        conf = yield self.backend.next_message("ocpp16.Reset.conf")
        self.assertEqual(orjson.loads(conf.body), [3, "c1", {"status": "Accepted"}])
        self.assertEqual(conf.correlation_id, "c1")

    @defer.inlineCallbacks
    def test_answers_overtake_held_calls(self):
        """
        A CSMS answer to the charger's CALL is sent at once, even while a
        CSMS CALL is outstanding and another is held.
        """
        self.backend.handle("BootNotification", boot_answer)
        identity = self.identity()
        charger = yield self.connect(identity)
        yield self.backend.send_to_charger(
            identity, [2, "c1", "Reset", {"type": "Soft"}]
        )
        yield self.backend.send_to_charger(
            identity, [2, "c2", "Reset", {"type": "Soft"}]
        )
        yield charger.next_call()
        answer = yield charger.call("BootNotification", BOOT_16)
        self.assertEqual(answer[2]["status"], "Accepted")

    @defer.inlineCallbacks
    def test_direct_reply_to(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        called = self.backend.call(identity, [2, "rc1", "GetConfiguration", {}])
        command = yield charger.next_call()
        charger.answer(command, {"configurationKey": []})
        reply = yield called
        self.assertEqual(orjson.loads(reply.body), [3, "rc1", {"configurationKey": []}])
        conf = yield self.backend.next_message("ocpp16.GetConfiguration.conf")
        self.assertEqual(conf.body, reply.body)

    @defer.inlineCallbacks
    def test_unanswered_call_redelivered_after_reconnect(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        yield self.backend.send_to_charger(
            identity, [2, "c1", "Reset", {"type": "Soft"}]
        )
        yield self.backend.send_to_charger(
            identity, [2, "c2", "Reset", {"type": "Hard"}]
        )
        yield charger.next_call()
        yield charger.drop()
        yield self.backend.next_message("ocppgw.disconnected")
        again = yield self.connect(identity)
        first = yield again.next_call()
        self.assertEqual(first[1], "c1")
        again.answer(first, {"status": "Accepted"})
        second = yield again.next_call()
        self.assertEqual(second[1], "c2")

    @defer.inlineCallbacks
    def test_commands_wait_while_offline(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        yield charger.close()
        yield self.backend.send_to_charger(
            identity, [2, "w1", "Reset", {"type": "Soft"}]
        )
        again = yield self.connect(identity)
        command = yield again.next_call()
        self.assertEqual(command[1], "w1")

    @defer.inlineCallbacks
    def test_malformed_command_never_reaches_charger(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        yield self.backend.send_to_charger(identity, b"this is not json")
        yield self.backend.send_to_charger(identity, [3, "nobody", {}])
        yield self.backend.send_to_charger(
            identity, [2, "ok", "Reset", {"type": "Soft"}]
        )
        command = yield charger.next_call()
        self.assertEqual(command[1], "ok")
        self.assertEqual(charger.other.pending, [])


class TimeoutTests(GatewayTestCase):
    settings = {"ocpp": {"call_timeout": "0.3"}}

    @defer.inlineCallbacks
    def test_call_timeout_published(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        called = self.backend.call(identity, [2, "t1", "Reset", {"type": "Soft"}])
        yield charger.next_call()
        error = yield self.backend.next_message("ocpp16.Reset.error")
        frame = orjson.loads(error.body)
        self.assertEqual(frame[:3], [4, "t1", "GenericError"])
        self.assertIs(error.headers["x-ocppgw-timeout"], True)
        reply = yield called
        self.assertEqual(reply.body, error.body)


class PresenceTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_offline_status_notification_16(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        connected = yield self.backend.next_message("ocppgw.connected")
        self.assertEqual(orjson.loads(connected.body)["identity"], identity)
        yield charger.drop()
        status = yield self.backend.next_message("ocpp16.StatusNotification.req")
        frame = orjson.loads(status.body)
        self.assertEqual(frame[0], 2)
        self.assertEqual(frame[2], "StatusNotification")
        payload = frame[3]
        self.assertEqual(payload["connectorId"], 0)
        self.assertEqual(payload["status"], "Unavailable")
        self.assertEqual(payload["vendorErrorCode"], "Offline")
        self.assertEqual(status.headers["x-ocpp-identity"], identity)
        self.assertIs(status.headers["x-ocppgw-synthetic"], True)
        gone = yield self.backend.next_message("ocppgw.disconnected")
        self.assertEqual(orjson.loads(gone.body)["identity"], identity)

    @defer.inlineCallbacks
    def test_offline_status_notification_201(self):
        identity = self.identity()
        charger = yield self.connect(identity, ("ocpp2.0.1",))
        yield charger.close()
        status = yield self.backend.next_message("ocpp201.StatusNotification.req")
        payload = orjson.loads(status.body)[3]
        self.assertEqual(payload["connectorStatus"], "Unavailable")
        self.assertEqual(payload["evseId"], 0)
        self.assertEqual(payload["connectorId"], 0)

    @defer.inlineCallbacks
    def test_duplicate_identity_replaces_without_offline(self):
        """
        A second connection with the same identity closes the first, which
        announces no offline status; commands go to the new one.
        """
        identity = self.identity()
        old = yield self.connect(identity)
        yield self.backend.next_message("ocppgw.connected")
        yield self.backend.send_to_charger(
            identity, [2, "d1", "Reset", {"type": "Soft"}]
        )
        yield old.next_call()
        new = yield self.connect(identity)
        code, _reason = yield old.closed
        self.assertEqual(code, 1000)
        # the unanswered command moved to the new connection
        command = yield new.next_call()
        self.assertEqual(command[1], "d1")
        new.answer(command, {"status": "Accepted"})
        yield self.backend.next_message("ocpp16.Reset.conf")
        # A marker from the new connection: the gateway publishes in
        # order, so an offline status or disconnected event of the old
        # connection would have arrived before it.
        new.send([2, "mark", "Heartbeat", {}])
        yield self.backend.next_message("ocpp16.Heartbeat.req")
        seen = [m.routing_key for m in self.backend.received]
        self.assertEqual(seen.count("ocppgw.connected"), 2)
        self.assertNotIn("ocpp16.StatusNotification.req", seen)
        self.assertNotIn("ocppgw.disconnected", seen)


class QueueDeletedTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_deleted_queue_closes_that_charger_only(self):
        victim_id, neighbour_id = self.identity(), self.identity()
        self.backend.handle("BootNotification", boot_answer)
        victim = yield self.connect(victim_id)
        neighbour = yield self.connect(neighbour_id)
        yield self.backend.client.delete_queue("ocpp." + victim_id)
        code, _ = yield victim.closed
        self.assertEqual(code, 1011)
        answer = yield neighbour.call("BootNotification", BOOT_16)
        self.assertEqual(answer[0], 3)
        yield self.backend.send_to_charger(
            neighbour_id, [2, "n1", "Reset", {"type": "Soft"}]
        )
        command = yield neighbour.next_call()
        self.assertEqual(command[1], "n1")


class ConflictingQueueTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_failing_declare_hurts_no_one_else(self):
        """
        A charger whose queue exists with other arguments is refused
        before the upgrade; chargers connected meanwhile are unaffected.
        """
        self.backend.handle("BootNotification", boot_answer)
        neighbour_id, bad_id = self.identity(), self.identity()
        neighbour = yield self.connect(neighbour_id)
        yield self.backend.client.declare_queue(
            "ocpp." + bad_id,
            durable=True,
            auto_delete=False,
            arguments={"x-message-ttl": 5},
        )
        refused = FakeCharger.connect(reactor, self.url(bad_id))
        yield self.assertFailure(refused, Exception)
        # many chargers connect at once while the bad one retries
        others = [self.identity() for _ in range(10)]
        attempts = [FakeCharger.connect(reactor, self.url(bad_id)) for _ in range(3)]
        connected = yield defer.gatherResults(
            [self.connect(identity) for identity in others]
        )
        for attempt in attempts:
            yield self.assertFailure(attempt, Exception)
        answers = yield defer.gatherResults(
            [
                charger.call("BootNotification", BOOT_16)
                for charger in connected + [neighbour]
            ]
        )
        self.assertEqual({answer[0] for answer in answers}, {3})
        yield self.backend.send_to_charger(
            neighbour_id, [2, "n1", "Reset", {"type": "Soft"}]
        )
        command = yield neighbour.next_call()
        self.assertEqual(command[1], "n1")


class ClassicQueueStorageTests(GatewayTestCase):
    """
    C{[queue] x-queue-version} and C{x-queue-mode} reach the broker: the
    charger's queue holds them (RabbitMQ refuses a redeclare that differs
    in either), and commands flow through such a queue.
    """

    settings = {"queue": {"x-queue-version": "2", "x-queue-mode": "lazy"}}
    declared = {"x-queue-type": "classic", "x-queue-version": 2, "x-queue-mode": "lazy",
                "x-message-ttl": 300000, "x-expires": 600000}

    @defer.inlineCallbacks
    def test_queue_declared_with_version_and_mode(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        self.addCleanup(client.close)
        queue = "ocpp." + identity
        yield client._channel.queue_declare(queue, durable=True, arguments=self.declared)
        for key, other in (("x-queue-version", 1), ("x-queue-mode", "default")):
            channel = yield client._connection.channel()
            refused = channel.queue_declare(
                queue, durable=True, arguments={**self.declared, key: other})
            failure = yield self.assertFailure(refused, Exception)
            self.assertIn(f"inequivalent arg '{key}'", str(failure))
        yield self.backend.send_to_charger(identity, [2, "c1", "Reset", {"type": "Soft"}])
        command = yield charger.next_call()
        self.assertEqual(command[1], "c1")


class ReplacementTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_answer_reaches_replacing_connection(self):
        """
        The CSMS's answer to a CALL sent on a connection that has since
        been replaced reaches the new connection (it is not rejected).
        """
        identity = self.identity()
        old = yield self.connect(identity)
        old.send([2, "before", "Heartbeat", {}])
        request = yield self.backend.next_message("ocpp16.Heartbeat.req")
        new = yield self.connect(identity)
        yield old.closed
        yield self.backend.send_to_charger(
            identity, [3, request.correlation_id, {"currentTime": "2026-01-01T00:00:00Z"}]
        )
        answer = yield new.other.get()
        self.assertEqual(answer[:2], [3, "before"])
