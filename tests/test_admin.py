"""
The admin listener against a real gateway, real chargers and the real
broker: Prometheus metrics as they change, readiness as the broker
connection comes and goes, the charger list and disconnecting a charger.
"""

from __future__ import annotations

import base64
from urllib.parse import quote

import orjson
from twisted.internet import defer, reactor, threads

from ocppgw.testing import FakeCharger, ChargerClosed
from tests.support import GatewayTestCase, close_broker_connections, http, samples, value

BOOT_16 = {"chargePointVendor": "Example", "chargePointModel": "Wallbox"}


def link_down_and_up(bridge) -> tuple[defer.Deferred, defer.Deferred]:
    """
    Two Deferreds: the first fires when the bridge's broker link goes
    down, the second when it is up again after that.
    """
    down: defer.Deferred = defer.Deferred()
    up: defer.Deferred = defer.Deferred()

    def observe(connected, why):
        if not connected and not down.called:
            down.callback(None)
        elif connected and down.called and not up.called:
            up.callback(None)

    bridge.add_observer(observe)
    return down, up


class AdminTestCase(GatewayTestCase):
    timeout = 30

    @property
    def admin_port(self) -> int:
        return self.gateway_service.admin_port.getHost().port

    def get(self, path: str, **kwargs):
        return http(self.admin_port, path, **kwargs)

    @defer.inlineCallbacks
    def scrape(self) -> dict:
        status, headers, body = yield self.get("/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(
            headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"),
        )
        return samples(body)


class MetricsTests(AdminTestCase):
    @defer.inlineCallbacks
    def test_metrics_change_with_traffic(self):
        """
        Scraping the real endpoint: connected chargers, accepted and
        refused handshakes, frames in and out by action and kind, bad
        frames by code, CSMS call round trips, publish confirm latency and
        the process's RSS and open files.
        """
        before = yield self.scrape()
        self.assertEqual(value(before, "ocppgw_chargers_connected", version="ocpp16", listener="ws"), 0)
        self.assertEqual(value(before, "ocppgw_amqp_connected"), 1)
        self.assertEqual(value(before, "ocppgw_amqp_blocked"), 0)
        self.assertGreater(value(before, "process_resident_memory_bytes"), 1e6)
        self.assertGreater(value(before, "process_open_fds"), 3)

        # refused before the upgrade: no supported subprotocol (400)
        refused = FakeCharger.connect(reactor, self.url(self.identity()), ["ocpp1.5"])
        yield self.assertFailure(refused, ChargerClosed, Exception)

        self.backend.handle(
            "BootNotification",
            lambda m, p: {"status": "Accepted", "currentTime": "2026-01-01T00:00:00Z",
                          "interval": 300},
        )
        identity = self.identity()
        charger = yield self.connect(identity)
        answer = yield charger.call("BootNotification", BOOT_16)
        self.assertEqual(answer[0], 3)
        charger.send(b"this is not json")
        error = yield charger.other.get()
        self.assertEqual(error[0], 4)

        reply = self.backend.call(identity, [2, "r1", "Reset", {"type": "Soft"}])
        command = yield charger.next_call()
        charger.answer(command, {"status": "Accepted"})
        yield reply

        after = yield self.scrape()
        self.assertEqual(value(after, "ocppgw_chargers_connected", version="ocpp16", listener="ws"), 1)
        self.assertEqual(
            value(after, "ocppgw_handshakes_total", listener="ws", result="accepted", status="101"), 1
        )
        self.assertEqual(
            value(after, "ocppgw_handshakes_total", listener="ws", result="refused", status="400"), 1
        )
        frames = dict(direction="in", version="ocpp16")
        self.assertEqual(
            value(after, "ocppgw_frames_total", **frames, action="BootNotification", kind="call"), 1
        )
        self.assertEqual(
            value(after, "ocppgw_frames_total", **frames, action="Reset", kind="callresult"), 1
        )
        frames["direction"] = "out"
        self.assertEqual(
            value(after, "ocppgw_frames_total", **frames, action="BootNotification", kind="callresult"),
            1,
        )
        self.assertEqual(value(after, "ocppgw_frames_total", **frames, action="Reset", kind="call"), 1)
        self.assertEqual(value(after, "ocppgw_frames_total", **frames, action="-", kind="callerror"), 1)
        self.assertEqual(
            value(after, "ocppgw_bad_frames_total", version="ocpp16", code="GenericError"), 1
        )
        self.assertEqual(value(after, "ocppgw_csms_call_seconds_count", version="ocpp16"), 1)
        # BootNotification, Reset's answer, the connected event: confirmed
        self.assertGreaterEqual(value(after, "ocppgw_publish_confirm_seconds_count"), 3)
        self.assertEqual(value(after, "ocppgw_csms_calls_outstanding"), 0)

        # the charger's side may end before the gateway's: wait for the
        # gateway's disconnected event
        event = self.backend.next_message("ocppgw.disconnected")
        yield charger.close()
        self.assertEqual(orjson.loads((yield event).body)["code"], 1000)
        gone = yield self.scrape()
        self.assertEqual(value(gone, "ocppgw_chargers_connected", version="ocpp16", listener="ws"), 0)
        self.assertEqual(value(gone, "ocppgw_disconnects_total", version="ocpp16", code="1000"), 1)

    @defer.inlineCallbacks
    def test_disconnect_codes(self):
        """
        A charger whose close frame carries no status code (real chargers
        do this on every reset) is counted as code "none" and announced
        with code null; one that drops TCP without a close frame as 1006.
        """
        from tests import rawclient

        quiet = self.identity()
        events = self.backend.next_message("ocppgw.disconnected")
        response = yield rawclient.handshake(self.port, "/ocpp/" + quiet, keep_open=True)
        self.addCleanup(response.close)
        self.assertEqual(response.status, 101)
        answer = yield threads.deferToThread(response.close_without_code)
        # the gateway completes the close handshake (with 1000)
        self.assertEqual(answer, (1000).to_bytes(2, "big"))
        event = yield events
        self.assertEqual(orjson.loads(event.body)["identity"], quiet)
        self.assertIsNone(orjson.loads(event.body)["code"])

        dropped = self.identity()
        charger = yield self.connect(dropped)
        events = self.backend.next_message("ocppgw.disconnected")
        yield charger.drop()
        event = yield events
        self.assertEqual(orjson.loads(event.body)["code"], 1006)

        scraped = yield self.scrape()
        self.assertEqual(value(scraped, "ocppgw_disconnects_total", version="ocpp16", code="none"), 1)
        self.assertEqual(value(scraped, "ocppgw_disconnects_total", version="ocpp16", code="1006"), 1)

    @defer.inlineCallbacks
    def test_invalid_payloads(self):
        """Payloads breaking their schema ([validation] warn) are counted."""
        self.backend.handle(
            "Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"}
        )
        charger = yield self.connect(self.identity())
        answer = yield charger.call("Heartbeat", {"unexpected": 1})
        self.assertEqual(answer[0], 3)
        scraped = yield self.scrape()
        self.assertEqual(
            value(scraped, "ocppgw_invalid_payloads_total", version="ocpp1.6",
                  direction="charger", action="Heartbeat"),
            1,
        )
        self.assertEqual(
            value(scraped, "ocppgw_refused_payloads_total", version="ocpp1.6",
                  direction="charger", action="Heartbeat"),
            0,
        )

    @defer.inlineCallbacks
    def test_held_and_outstanding_calls(self):
        """A CSMS CALL sent and one held behind it show as gauges."""
        identity = self.identity()
        charger = yield self.connect(identity)
        yield self.backend.send_to_charger(identity, [2, "c1", "Reset", {"type": "Soft"}])
        yield self.backend.send_to_charger(identity, [2, "c2", "Reset", {"type": "Hard"}])
        first = yield charger.next_call()
        # the second is held once the gateway has it: wait on the session
        session = self.gateway_service.gateway.chargers[identity].session
        while session.held_calls == 0:
            yield self.backend.client._channel.queue_declare(
                "ocpp." + identity, passive=True
            )  # one broker round trip, so the delivery can arrive
        scraped = yield self.scrape()
        self.assertEqual(value(scraped, "ocppgw_csms_calls_outstanding"), 1)
        self.assertEqual(value(scraped, "ocppgw_csms_calls_held"), 1)
        charger.answer(first, {"status": "Accepted"})
        second = yield charger.next_call()
        charger.answer(second, {"status": "Accepted"})


    @defer.inlineCallbacks
    def test_blocked_state(self):
        """
        RabbitMQ's connection.blocked / unblocked (memory or disk alarm)
        show in ocppgw_amqp_blocked. Raising a real alarm would block every
        other user of the shared broker, so the broker's frames are handed
        to pika's frame processing as if they came off the socket.
        """
        import pika.spec
        from pika.frame import Method

        impl = self.gateway_service.bridge.link.connection.impl
        impl._process_frame(Method(0, pika.spec.Connection.Blocked("low on memory")))
        scraped = yield self.scrape()
        self.assertEqual(value(scraped, "ocppgw_amqp_blocked"), 1)
        impl._process_frame(Method(0, pika.spec.Connection.Unblocked()))
        scraped = yield self.scrape()
        self.assertEqual(value(scraped, "ocppgw_amqp_blocked"), 0)


class HealthTests(AdminTestCase):
    timeout = 40

    @defer.inlineCallbacks
    def test_healthz(self):
        status, _, body = yield self.get("/healthz")
        self.assertEqual((status, orjson.loads(body)), (200, {"status": "ok"}))

    @defer.inlineCallbacks
    def test_readyz_follows_the_broker(self):
        """
        /readyz is 200 while connected, 503 (naming the broker) once the
        broker closes the gateway's connection, and 200 again after the
        gateway has reconnected.
        """
        status, _, body = yield self.get("/readyz")
        self.assertEqual(status, 200)
        self.assertEqual(
            orjson.loads(body),
            {"ready": True, "checks": {"broker": True, "consumers": True, "listening": True,
                                       "accepting": True}},
        )
        bridge = self.gateway_service.bridge
        down, up = link_down_and_up(bridge)
        closed = yield close_broker_connections(f"ocppgw {self.gateway_service.node}")
        self.assertEqual(closed, 1)
        yield down
        status, _, body = yield self.get("/readyz")
        self.assertEqual(status, 503)
        self.assertEqual(orjson.loads(body)["checks"]["broker"], False)
        scraped = yield self.scrape()
        self.assertEqual(value(scraped, "ocppgw_amqp_connected"), 0)
        self.assertEqual(value(scraped, "ocppgw_ready", check="broker"), 0)
        yield up
        status, _, body = yield self.get("/readyz")
        self.assertEqual(status, 200)
        self.assertTrue(orjson.loads(body)["ready"])

    @defer.inlineCallbacks
    def test_readyz_unready_while_draining(self):
        self.gateway_service.gateway.stop_accepting()
        status, _, body = yield self.get("/readyz")
        self.assertEqual(status, 503)
        self.assertEqual(orjson.loads(body)["checks"]["accepting"], False)


class ChargersTests(AdminTestCase):
    @defer.inlineCallbacks
    def test_list_one_and_delete(self):
        """
        /chargers lists real connected chargers; /chargers/<id> (percent-
        encoded) shows one; DELETE closes it with 1000, after which it is
        gone from the list.
        """
        first = self.identity("RDAM 1")
        second = self.identity("CP")
        charger1 = yield self.connect(first)
        charger2 = yield self.connect(second, ("ocpp2.0.1",))
        self.backend.handle("Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"})
        answer = yield charger1.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)
        status, headers, body = yield self.get("/chargers")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        listed = {entry["identity"]: entry for entry in orjson.loads(body)}
        self.assertEqual(set(listed), {first, second})
        entry = listed[first]
        self.assertEqual(entry["version"], "ocpp1.6")
        self.assertEqual(entry["listener"], "ws")
        self.assertTrue(entry["remote"].startswith("tcp4:127.0.0.1:"), entry["remote"])
        self.assertTrue(entry["connected_since"].endswith("Z"))
        self.assertEqual(entry["frames_in"], 1)
        self.assertEqual(entry["frames_out"], 1)
        self.assertIsNone(entry["outstanding_call"])
        self.assertEqual(listed[second]["version"], "ocpp2.0.1")

        yield self.backend.send_to_charger(second, [2, "g1", "GetVariables", {"getVariableData": []}])
        yield charger2.next_call()
        status, _, body = yield self.get("/chargers/" + quote(second, safe=""))
        self.assertEqual(status, 200)
        self.assertEqual(
            orjson.loads(body)["outstanding_call"], {"message_id": "g1", "action": "GetVariables"}
        )

        status, _, body = yield self.get("/chargers/" + quote(first, safe=""), method=b"DELETE")
        self.assertEqual(status, 202)
        self.assertEqual(orjson.loads(body), {"identity": first, "closing": True, "code": 1000})
        code, _ = yield charger1.closed
        self.assertEqual(code, 1000)
        status, _, _ = yield self.get("/chargers/" + quote(first, safe=""))
        self.assertEqual(status, 404)
        status, _, _ = yield self.get("/chargers/" + quote(first, safe=""), method=b"DELETE")
        self.assertEqual(status, 404)
        status, _, body = yield self.get("/chargers")
        self.assertEqual([entry["identity"] for entry in orjson.loads(body)], [second])

    @defer.inlineCallbacks
    def test_bad_paths(self):
        status, _, _ = yield self.get("/chargers/a/b")
        self.assertEqual(status, 404)
        status, _, _ = yield self.get("/chargers/%ZZ")
        self.assertEqual(status, 404)
        status, _, _ = yield self.get("/chargers", method=b"DELETE")
        self.assertEqual(status, 405)
        status, _, _ = yield self.get("/nothing")
        self.assertEqual(status, 404)


class StatusTests(AdminTestCase):
    @defer.inlineCallbacks
    def test_status(self):
        """
        /status: the broker link's state, readiness, chargers by version
        and listener, and the last refusals and disconnects, newest first,
        with their reasons.
        """
        refused = FakeCharger.connect(reactor, self.url(self.identity()), ["ocpp1.5"])
        yield self.assertFailure(refused, ChargerClosed, Exception)
        gone = self.identity("RDAM 9")
        charger = yield self.connect(gone)
        disconnected = self.backend.next_message("ocppgw.disconnected")
        yield charger.close(4001)
        yield disconnected
        yield self.connect(self.identity(), ("ocpp2.0.1",))
        yield self.connect(self.identity(), ("ocpp2.0.1",))

        status, headers, body = yield self.get("/status")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        found = orjson.loads(body)
        self.assertEqual(found["node"], self.gateway_service.node)
        self.assertEqual(found["broker"], "open")
        self.assertEqual((found["ready"], found["checks"]["broker"]), (True, True))
        self.assertEqual(
            found["chargers"],
            {"total": 2, "by_version": {"ocpp2.0.1": 2}, "by_listener": {"ws": 2}},
        )
        [refusal] = found["refusals"]
        self.assertEqual(
            (refusal["status"], refusal["reason"], refusal["listener"]),
            (400, "No supported OCPP subprotocol", "ws"),
        )
        self.assertTrue(refusal["peer"].startswith("tcp4:127.0.0.1:"), refusal)
        self.assertTrue(refusal["time"].endswith("Z"))
        [disconnect] = found["disconnects"]
        self.assertEqual(
            {key: disconnect[key] for key in ("identity", "version", "listener", "code")},
            {"identity": gone, "version": "ocpp1.6", "listener": "ws", "code": 4001},
        )
        self.assertGreaterEqual(disconnect["duration"], 0)

    @defer.inlineCallbacks
    def test_broker_state_follows_the_link(self):
        """The state the page shows is the service's broker_state()."""
        self.assertEqual(self.gateway_service.broker_state(), "open")
        bridge = self.gateway_service.bridge
        down, up = link_down_and_up(bridge)
        yield close_broker_connections(f"ocppgw {self.gateway_service.node}")
        yield down
        status, _, body = yield self.get("/status")
        # lost, and at once trying the next URL
        self.assertEqual(orjson.loads(body)["broker"], "reconnecting")
        self.assertEqual(orjson.loads(body)["checks"]["broker"], False)
        yield up
        status, _, body = yield self.get("/status")
        self.assertEqual(orjson.loads(body)["broker"], "open")

    @defer.inlineCallbacks
    def test_page(self):
        """/ is the status page: HTML whose CSP lets only its own script run."""
        status, headers, body = yield self.get("/")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertIn(b"<title>ocppgw status</title>", body)
        [policy] = headers.getRawHeaders(b"content-security-policy")
        self.assertIn(b"default-src 'none'", policy)
        self.assertIn(b"script-src 'sha256-", policy)
        self.assertNotIn(b"unsafe-inline", policy)


class BasicAuthTests(AdminTestCase):
    settings = {"admin": {"username": "ops", "password": "s3cret"}}

    @defer.inlineCallbacks
    def test_basic_auth(self):
        """
        With credentials configured, /metrics, /chargers, the status page
        and /status need them; the probes do not.
        """
        for path in ("/metrics", "/chargers", "/", "/status"):
            status, headers, _ = yield self.get(path)
            self.assertEqual(status, 401, path)
            self.assertEqual(
                headers.getRawHeaders(b"www-authenticate"), [b'Basic realm="ocppgw admin"']
            )
            wrong = base64.b64encode(b"ops:wrong").decode()
            status, _, _ = yield self.get(path, headers={"Authorization": f"Basic {wrong}"})
            self.assertEqual(status, 401, path)
            right = base64.b64encode(b"ops:s3cret").decode()
            status, _, _ = yield self.get(path, headers={"Authorization": f"Basic {right}"})
            self.assertEqual(status, 200, path)
        for path in ("/healthz", "/readyz"):
            status, _, _ = yield self.get(path)
            self.assertEqual(status, 200, path)
