"""
Payload validation end to end: a real gateway, real WebSocket chargers and
the real broker.
"""

from __future__ import annotations

import orjson
from twisted.internet import defer, reactor

from ocppgw.amqp import BackEndClient
from ocppgw.testing import amqp_url, unique_name
from tests import test_ocpp_clients as clients
from tests.support import GatewayTestCase

METER_16_INVALID = {
    "connectorId": "1",
    "meterValue": [{"timestamp": "2026-01-01T12:00:00Z", "sampledValue": [{"value": "1"}]}],
}
METER_16_VALID = {**METER_16_INVALID, "connectorId": 1}


class WarnModeTests(GatewayTestCase):
    """
    The default mode: invalid frames pass, marked with headers.
    """

    @defer.inlineCallbacks
    def test_invalid_frame_published_with_reason(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        charger.send([2, "m1", "MeterValues", METER_16_INVALID])
        message = yield self.backend.next_message("ocpp16.MeterValues.req")
        self.assertEqual(orjson.loads(message.body)[3], METER_16_INVALID)
        self.assertEqual(
            message.headers["x-ocppgw-validation-code"], "TypeConstraintViolation"
        )
        self.assertIn("payload.connectorId", message.headers["x-ocppgw-validation-error"])
        stats = self.gateway_service.validation.stats
        self.assertEqual(stats.invalid[("ocpp1.6", "charger", "MeterValues")], 1)


class EnforceModeTests(GatewayTestCase):
    settings = {"validation": {"mode": "enforce"}}

    @defer.inlineCallbacks
    def test_invalid_call_answered_and_not_published(self):
        identity = self.identity()
        charger = yield self.connect(identity, ("ocpp2.0.1",))
        answer = yield charger.call(
            "BootNotification", {"reason": "PowerUp"}, message_id="bad"
        )
        self.assertEqual(answer[:3], [4, "bad", "OccurrenceConstraintViolation"])
        self.assertIn("chargingStation", answer[3])
        self.backend.handle(
            "BootNotification",
            lambda message, payload: {
                "currentTime": "2026-01-01T12:00:00Z", "interval": 300, "status": "Accepted",
            },
        )
        answer = yield charger.call(
            "BootNotification",
            {"reason": "PowerUp", "chargingStation": {"model": "M", "vendorName": "V"}},
            message_id="good",
        )
        self.assertEqual(answer[:2], [3, "good"])
        # the first (and only) BootNotification the back end saw is the valid one
        message = yield self.backend.next_message("ocpp201.BootNotification.req")
        self.assertEqual(message.correlation_id, "good")

    @defer.inlineCallbacks
    def test_invalid_command_never_reaches_charger_sender_told(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        reply = yield self.backend.call(
            identity, [2, "c1", "RemoteStartTransaction", {"idTag": "X" * 21}], timeout=10
        )
        error = orjson.loads(reply.body)
        self.assertEqual(error[:3], [4, "c1", "PropertyConstraintViolation"])
        self.assertEqual(error[4], {"reason": "validation"})
        self.assertEqual(
            reply.headers["x-ocppgw-validation-code"], "PropertyConstraintViolation"
        )
        self.assertIn("payload.idTag", reply.headers["x-ocppgw-validation-error"])
        # the next, valid command is the first CALL the charger receives
        answered = self.backend.call(
            identity, [2, "c2", "RemoteStartTransaction", {"idTag": "04A2B3C4"}], timeout=10
        )
        command = yield charger.next_call()
        self.assertEqual(command[1], "c2")
        charger.answer(command, {"status": "Accepted"})
        reply = yield answered
        self.assertEqual(orjson.loads(reply.body), [3, "c2", {"status": "Accepted"}])
        self.assertEqual(charger.calls.pending, [])


class DeadLetterTests(GatewayTestCase):
    """
    A refused command without reply_to is copied to the queue's
    dead-letter exchange with the reason in headers.
    """

    dead_letter_exchange = unique_name("ocpp-dlx")
    settings = {
        "validation": {"mode": "enforce"},
        "queue": {"x-dead-letter-exchange": dead_letter_exchange},
    }

    @defer.inlineCallbacks
    def setUp(self):
        # The exchange must exist before the gateway starts: it checks.
        self.dlx = yield BackEndClient.connect(reactor, amqp_url(), self.dead_letter_exchange)
        self.addCleanup(self._drop_dlx)
        self.dead_queue = unique_name("dead")
        yield self.dlx.declare_queue(self.dead_queue, ["#"], exclusive=True)
        self.dead = yield self.dlx.consume(self.dead_queue)
        yield super().setUp()

    @defer.inlineCallbacks
    def _drop_dlx(self):
        yield self.dlx.delete_exchange(self.dead_letter_exchange)
        yield self.dlx.close()

    @defer.inlineCallbacks
    def test_refused_command_dead_lettered_with_reason(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        body = orjson.dumps([2, "c1", "Reset", {"type": "Sideways"}])
        yield self.backend.send_to_charger(identity, body, correlation_id="corr-1")
        yield self.backend.send_to_charger(identity, [2, "c2", "Reset", {"type": "Soft"}])
        message = yield self.dead.get()
        self.assertEqual(message.body, body)
        self.assertEqual(message.routing_key, identity)
        self.assertEqual(message.correlation_id, "corr-1")
        self.assertEqual(
            message.headers["x-ocppgw-validation-code"], "PropertyConstraintViolation"
        )
        self.assertIn("payload.type", message.headers["x-ocppgw-validation-error"])
        self.assertEqual(message.headers["x-ocpp-identity"], identity)
        command = yield charger.next_call()
        self.assertEqual(command[1], "c2")


class MissingDeadLetterExchangeTests(GatewayTestCase):
    """
    A dead-letter exchange that does not exist is never published to (it
    would close the channel all chargers publish on): the refused command
    is rejected, and other chargers' frames still flow.
    """

    settings = {
        "validation": {"mode": "enforce"},
        "queue": {"x-dead-letter-exchange": unique_name("ocpp-no-such-dlx")},
    }

    @defer.inlineCallbacks
    def test_refused_command_rejected(self):
        self.assertIsNone(self.gateway_service.gateway.dead_letter_exchange)
        identity = self.identity()
        charger = yield self.connect(identity)
        yield self.backend.send_to_charger(identity, [2, "c1", "Reset", {"type": "Sideways"}])
        yield self.backend.send_to_charger(identity, [2, "c2", "Reset", {"type": "Soft"}])
        command = yield charger.next_call()
        self.assertEqual(command[1], "c2")
        charger.send([2, "m1", "MeterValues", METER_16_VALID])
        message = yield self.backend.next_message("ocpp16.MeterValues.req")
        self.assertEqual(message.correlation_id, "m1")


class _EnforcedRealClients:
    """
    The real OCPP client tests (tests.test_ocpp_clients) again with
    validation enforced: what the C{ocpp} package's charge points send, and
    what the back end answers them, is valid, and nothing is refused.
    """

    settings = {"validation": {"mode": "enforce"}}

    def setUp(self):
        d = super().setUp()

        def check_nothing_invalid(_):
            stats = self.gateway_service.validation.stats
            self.addCleanup(lambda: self.assertEqual(dict(stats.invalid), {}))

        return d.addCallback(check_nothing_invalid)


class EnforcedOcpp16ClientTests(_EnforcedRealClients, clients.Ocpp16ClientTests):
    pass


class EnforcedOcpp201ClientTests(_EnforcedRealClients, clients.Ocpp201ClientTests):
    pass
