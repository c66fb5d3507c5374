"""
End to end with a real OCPP implementation: the mobilityhouse C{ocpp}
package (asyncio) over C{websockets}, as a charge point, against a running
gateway and a back end on the real broker.

What is checked is the AMQP side of the contract (docs/amqp-contract.md) as a back end
sees it when the charger is not ours: routing keys, the exact bytes the
client sent, every message property, and CSMS commands with direct
reply-to.

Quirks of the C{ocpp} package that shape these tests (docs/architecture.md,
"OCPP clients used in tests"): it validates every payload against the OCPP
JSON schemas, so the back end's answers must be complete; it sends CALLERRORs with 2.x codes even
in 1.6 and inverts NotImplemented/NotSupported, so error codes from it are
not asserted. C{websockets} clients ping every 20 s by default: switched off
so that only the gateway's behaviour is observed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time

import orjson
from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v16.enums import Action as Action16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from ocpp.v201.enums import Action as Action201
from twisted.internet import defer
from websockets.asyncio.client import connect as ws_connect

from tests.support import STEP_TIMEOUT, GatewayTestCase, as_deferred


NOW = "2026-01-01T00:00:00Z"


def record_sends(connection) -> list:
    """
    Wrap C{connection.send} so that every text the client sends is kept,
    in order: the exact frames the gateway must pass on.
    """
    sent: list = []
    send = connection.send

    async def recording_send(message, *args, **kwargs):
        sent.append(message)
        return await send(message, *args, **kwargs)

    connection.send = recording_send
    return sent


def frames_sent(sent: list, message_type: int, message_id: str = None) -> list:
    """The recorded frames of C{message_type} (and C{message_id})."""
    found = []
    for text in sent:
        frame = json.loads(text)
        if frame[0] == message_type and (message_id is None or frame[1] == message_id):
            found.append(text)
    return found


class Charger16(ChargePoint16):
    """An OCPP 1.6 charge point that accepts remote starts and resets."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.remote_starts: list = []
        self.resets: list = []

    @on(Action16.remote_start_transaction)
    def on_remote_start(self, id_tag, connector_id=None, **kwargs):
        self.remote_starts.append((id_tag, connector_id))
        return result16.RemoteStartTransaction(status="Accepted")

    @on(Action16.reset)
    def on_reset(self, type, **kwargs):
        self.resets.append(type)
        return result16.Reset(status="Accepted")


class Charger201(ChargePoint201):
    """An OCPP 2.0.1 charge point that accepts remote starts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.remote_starts: list = []

    @on(Action201.request_start_transaction)
    def on_request_start(self, id_token, remote_start_id, **kwargs):
        self.remote_starts.append((id_token, remote_start_id))
        return result201.RequestStartTransaction(status="Accepted")


class _OcppClientTests(GatewayTestCase):
    """
    Shared steps; subclasses name the version.
    """

    timeout = 30
    subprotocol: str
    routing_prefix: str
    charger_class: type

    def setUp(self):
        # A failure inside autobahn's handshake callbacks is logged when its
        # Deferred is garbage-collected; collect once the gateway is gone
        # (this cleanup runs after GatewayTestCase's) so that it is blamed
        # on the test that caused it.
        self.addCleanup(gc.collect)
        d = super().setUp()

        def handlers(_):
            answer_boot = {"status": "Accepted", "currentTime": NOW, "interval": 300}
            self.backend.handle("BootNotification", lambda message, payload: answer_boot)
            self.backend.handle("Heartbeat", lambda message, payload: {"currentTime": NOW})
            self.backend.handle("StatusNotification", lambda message, payload: {})

        return d.addCallback(handlers)

    @defer.inlineCallbacks
    def start_charger(self, identity: str):
        """
        Connect an C{ocpp} charge point as C{identity} and run its receive
        loop; stopped and closed in cleanup.

        @return: C{(charge point, list of texts it sent)}.
        """
        connection = yield as_deferred(
            ws_connect(
                self.url(identity),
                subprotocols=[self.subprotocol],
                ping_interval=None,
                # see test_default_websockets_client: offering
                # permessage-deflate (the default) hangs the handshake
                compression=None,
                open_timeout=STEP_TIMEOUT / 2,
            )
        )
        self.assertEqual(connection.subprotocol, self.subprotocol)
        # ChargePoint looks connection.send up at every send, so wrapping
        # it records exactly what goes on the wire
        sent = record_sends(connection)
        charge_point = self.charger_class(identity, connection)
        task = asyncio.ensure_future(charge_point.start())
        self.addCleanup(self._stop_charger, task, connection)
        return charge_point, sent

    @staticmethod
    def _stop_charger(task, connection) -> defer.Deferred:
        async def stop():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await connection.close()

        return as_deferred(stop())

    def assertPublishedAsDesigned(
        self, message, identity: str, routing_key: str, body: str, message_id: str,
        action=None,
    ) -> None:
        """
        C{message} is a charger frame published as docs/amqp-contract.md says.
        """
        self.assertEqual(message.exchange, self.exchange)
        self.assertEqual(message.routing_key, routing_key)
        self.assertEqual(message.body, body.encode("utf-8"))
        self.assertEqual(message.content_type, "application/json")
        self.assertEqual(message.delivery_mode, 2)
        self.assertEqual(message.correlation_id, message_id)
        if action is not None:
            self.assertEqual(message.type, action)
        self.assertEqual(message.reply_to, identity)
        self.assertEqual(message.app_id, "ocppgw")
        self.assertIsInstance(message.timestamp, int)
        self.assertLess(abs(message.timestamp - time.time()), 60)
        self.assertEqual(message.headers.get("x-ocpp-identity"), identity)
        self.assertEqual(message.headers.get("x-ocpp-version"), self.subprotocol)
        self.assertEqual(
            message.headers.get("x-ocppgw-node"), self.gateway_service.node
        )

    @defer.inlineCallbacks
    def check_call(self, charge_point, sent, identity, request, action):
        """
        Send C{request} from the charge point; check the answer reached it
        and the frame was published exactly as sent.

        @return: the typed answer.
        """
        result = yield as_deferred(charge_point.call(request, suppress=False))
        message = yield self.backend.next_message(f"{self.routing_prefix}.{action}.req")
        frame = json.loads(message.body)
        calls = frames_sent(sent, 2, frame[1])
        self.assertEqual(len(calls), 1, f"{action} sent as {sent}")
        self.assertEqual(frame[2], action)
        self.assertPublishedAsDesigned(
            message, identity, f"{self.routing_prefix}.{action}.req", calls[0],
            frame[1], action,
        )
        return result

    @defer.inlineCallbacks
    def check_command(self, charge_point, sent, identity, command, action, answer):
        """
        Send C{command} from the back end with direct reply-to; the
        charge point's answer comes back to the caller with the command's
        correlation id, and is published on C{<version>.<action>.conf}.
        """
        correlation_id = "corr-" + command[1]
        reply = yield self.backend.client.call(
            identity, orjson.dumps(command), timeout=STEP_TIMEOUT,
            correlation_id=correlation_id,
        )
        answers = frames_sent(sent, 3, command[1])
        self.assertEqual(len(answers), 1, f"answer to {command[1]} sent as {sent}")
        self.assertEqual(json.loads(answers[0]), [3, command[1], answer])
        self.assertEqual(reply.correlation_id, correlation_id)
        self.assertEqual(reply.body, answers[0].encode("utf-8"))
        self.assertEqual(reply.headers.get("x-ocpp-identity"), identity)
        published = yield self.backend.next_message(
            f"{self.routing_prefix}.{action}.conf"
        )
        self.assertPublishedAsDesigned(
            published, identity, f"{self.routing_prefix}.{action}.conf", answers[0],
            command[1],
        )


class Ocpp16ClientTests(_OcppClientTests):
    """
    An C{ocpp.v16} charge point through the gateway (subprotocol
    C{ocpp1.6}, routing keys C{ocpp16.*}).
    """

    subprotocol = "ocpp1.6"
    routing_prefix = "ocpp16"
    charger_class = Charger16

    @defer.inlineCallbacks
    def test_boot_notification(self):
        """
        BootNotification is published on C{ocpp16.BootNotification.req}
        with the client's exact bytes and every property of docs/amqp-contract.md, and
        the back end's answer reaches the client.
        """
        identity = self.identity()
        charge_point, sent = yield self.start_charger(identity)
        result = yield self.check_call(
            charge_point, sent, identity,
            call16.BootNotification(charge_point_model="M", charge_point_vendor="V"),
            "BootNotification",
        )
        self.assertEqual(result.status, "Accepted")
        self.assertEqual(result.interval, 300)
        self.assertEqual(result.current_time, NOW)

    @defer.inlineCallbacks
    def test_heartbeat_and_status_notification(self):
        """Heartbeat and StatusNotification go the same way."""
        identity = self.identity()
        charge_point, sent = yield self.start_charger(identity)
        result = yield self.check_call(
            charge_point, sent, identity, call16.Heartbeat(), "Heartbeat"
        )
        self.assertEqual(result.current_time, NOW)
        yield self.check_call(
            charge_point, sent, identity,
            call16.StatusNotification(connector_id=1, error_code="NoError", status="Available"),
            "StatusNotification",
        )

    @defer.inlineCallbacks
    def test_remote_start_transaction(self):
        """
        RemoteStartTransaction from the back end (direct reply-to) reaches
        the client's handler; the answer comes back with the correlation id
        and is published on C{ocpp16.RemoteStartTransaction.conf}.
        """
        identity = self.identity()
        charge_point, sent = yield self.start_charger(identity)
        yield self.check_call(
            charge_point, sent, identity,
            call16.BootNotification(charge_point_model="M", charge_point_vendor="V"),
            "BootNotification",
        )
        yield self.check_command(
            charge_point, sent, identity,
            [2, "rs-1", "RemoteStartTransaction", {"idTag": "TAG1", "connectorId": 1}],
            "RemoteStartTransaction", {"status": "Accepted"},
        )
        self.assertEqual(charge_point.remote_starts, [("TAG1", 1)])

    @defer.inlineCallbacks
    def test_commands_sent_together(self):
        """
        Two commands published at once are both delivered to the charge
        point and answered, each to its own caller with its own
        correlation id, in the order they were sent.
        """
        identity = self.identity()
        charge_point, sent = yield self.start_charger(identity)
        # one command first, so that the back end's reply consumer exists
        # (see test_concurrent_first_calls)
        yield self.check_command(
            charge_point, sent, identity,
            [2, "rs-1", "RemoteStartTransaction", {"idTag": "TAG1"}],
            "RemoteStartTransaction", {"status": "Accepted"},
        )
        first = self.backend.client.call(
            identity,
            orjson.dumps([2, "rs-2", "RemoteStartTransaction", {"idTag": "TAG2"}]),
            timeout=STEP_TIMEOUT, correlation_id="c-rs-2",
        )
        second = self.backend.client.call(
            identity, orjson.dumps([2, "reset-1", "Reset", {"type": "Soft"}]),
            timeout=STEP_TIMEOUT, correlation_id="c-reset-1",
        )
        first, second = yield defer.gatherResults([first, second])
        self.assertEqual(first.body, frames_sent(sent, 3, "rs-2")[0].encode("utf-8"))
        self.assertEqual(orjson.loads(first.body), [3, "rs-2", {"status": "Accepted"}])
        self.assertEqual(first.correlation_id, "c-rs-2")
        self.assertEqual(orjson.loads(second.body), [3, "reset-1", {"status": "Accepted"}])
        self.assertEqual(second.correlation_id, "c-reset-1")
        self.assertEqual(charge_point.remote_starts, [("TAG1", None), ("TAG2", None)])
        self.assertEqual(charge_point.resets, ["Soft"])
        answers = [json.loads(text)[1] for text in frames_sent(sent, 3)]
        self.assertEqual(answers, ["rs-1", "rs-2", "reset-1"])
        published = yield self.backend.next_message("ocpp16.Reset.conf")
        self.assertEqual(published.correlation_id, "reset-1")

    @defer.inlineCallbacks
    def test_concurrent_first_calls(self):
        """
        A back end may send its very first two commands at once with
        L{FakeBackEnd.call} (direct reply-to): both are answered.
        """
        identity = self.identity()
        charge_point, sent = yield self.start_charger(identity)
        calls = [
            self.backend.call(
                identity,
                [2, f"rs-{n}", "RemoteStartTransaction", {"idTag": f"TAG{n}"}],
                timeout=STEP_TIMEOUT / 2,
            )
            for n in (1, 2)
        ]
        results = yield defer.DeferredList(calls, consumeErrors=True)
        for n, (ok, result) in enumerate(results, 1):
            self.assertTrue(ok, f"call {n} failed: {result}")
            self.assertEqual(orjson.loads(result.body), [3, f"rs-{n}", {"status": "Accepted"}])
        self.assertEqual(charge_point.remote_starts, [("TAG1", None), ("TAG2", None)])

    @defer.inlineCallbacks
    def test_default_websockets_client(self):
        """
        A C{websockets} client with its default settings, which offer
        permessage-deflate as browsers and many charger stacks do, can
        connect and boot.
        """
        identity = self.identity()
        connection = yield as_deferred(
            ws_connect(
                self.url(identity),
                subprotocols=[self.subprotocol],
                ping_interval=None,
                open_timeout=STEP_TIMEOUT / 2,
            )
        )
        charge_point = self.charger_class(identity, connection)
        task = asyncio.ensure_future(charge_point.start())
        self.addCleanup(self._stop_charger, task, connection)
        self.assertEqual(connection.subprotocol, self.subprotocol)
        result = yield as_deferred(
            charge_point.call(
                call16.BootNotification(charge_point_model="M", charge_point_vendor="V"),
                suppress=False,
            )
        )
        self.assertEqual(result.status, "Accepted")


class Ocpp201ClientTests(_OcppClientTests):
    """
    An C{ocpp.v201} charge point through the gateway (subprotocol
    C{ocpp2.0.1}, routing keys C{ocpp201.*}).
    """

    subprotocol = "ocpp2.0.1"
    routing_prefix = "ocpp201"
    charger_class = Charger201

    def boot(self):
        return call201.BootNotification(
            charging_station={"model": "M", "vendor_name": "V"}, reason="PowerUp"
        )

    @defer.inlineCallbacks
    def test_boot_notification(self):
        """
        BootNotification is published on C{ocpp201.BootNotification.req}
        with the client's exact bytes and every property of docs/amqp-contract.md, and
        the back end's answer reaches the client.
        """
        identity = self.identity()
        charge_point, sent = yield self.start_charger(identity)
        result = yield self.check_call(
            charge_point, sent, identity, self.boot(), "BootNotification"
        )
        self.assertEqual(result.status, "Accepted")
        self.assertEqual(result.interval, 300)

    @defer.inlineCallbacks
    def test_heartbeat_and_status_notification(self):
        """Heartbeat and StatusNotification go the same way."""
        identity = self.identity()
        charge_point, sent = yield self.start_charger(identity)
        result = yield self.check_call(
            charge_point, sent, identity, call201.Heartbeat(), "Heartbeat"
        )
        self.assertEqual(result.current_time, NOW)
        yield self.check_call(
            charge_point, sent, identity,
            call201.StatusNotification(
                timestamp=NOW, connector_status="Available", evse_id=1, connector_id=1
            ),
            "StatusNotification",
        )

    @defer.inlineCallbacks
    def test_request_start_transaction(self):
        """
        RequestStartTransaction from the back end (direct reply-to) reaches
        the client's handler; the answer comes back with the correlation id
        and is published on C{ocpp201.RequestStartTransaction.conf}.
        """
        identity = self.identity()
        charge_point, sent = yield self.start_charger(identity)
        yield self.check_call(
            charge_point, sent, identity, self.boot(), "BootNotification"
        )
        yield self.check_command(
            charge_point, sent, identity,
            [2, "rq-1", "RequestStartTransaction",
             {"idToken": {"idToken": "TAG1", "type": "ISO14443"}, "remoteStartId": 7}],
            "RequestStartTransaction", {"status": "Accepted"},
        )
        self.assertEqual(
            charge_point.remote_starts, [({"id_token": "TAG1", "type": "ISO14443"}, 7)]
        )
