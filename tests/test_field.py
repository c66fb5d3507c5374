"""
Field compatibility: what real chargers send, over real sockets, against a
running gateway with the real broker behind it.

Each quirk is sent as the bytes such a charger sends (a hand-written
opening handshake where a WebSocket library would refuse to produce it,
see L{tests.rawcharger}); the source that shows a charger doing it is
named in the table of docs/field-compatibility.md. Each class also shows
that the quirk changes nothing about who a charger is: no identity
taken over, no authentication skipped, no wildcard reached.
"""

from __future__ import annotations

import base64
import os
import zlib

import orjson
from twisted.internet import defer, reactor, task

from ocppgw import topology
from ocppgw.testing import FakeCharger
from tests.rawcharger import RawCharger, open_raw, request
from tests.rawhttp import raw_request, websocket_key
from tests.support import GatewayTestCase, LogCapture, SecurityTestCase, add_password, as_deferred

BOOT_16 = {"chargePointVendor": "V", "chargePointModel": "M"}
BOOT_ANSWER = {"currentTime": "2026-01-01T00:00:00Z", "interval": 300, "status": "Accepted"}


def boot_answer(message, payload):
    return BOOT_ANSWER


def upgrade_headers(port: int, *, protocol="ocpp1.6", connection="Upgrade", extra=()):
    """
    The usual upgrade headers, in the usual order; C{None} leaves a header
    out.
    """
    headers = [
        ("Host", f"127.0.0.1:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", connection),
        ("Sec-WebSocket-Key", websocket_key()),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", protocol),
    ]
    return [(name, value) for name, value in headers if value is not None] + list(extra)


class FieldTestCase(GatewayTestCase):
    """A gateway and back end, and a raw charger that boots through them."""

    timeout = 20

    @defer.inlineCallbacks
    def open(self, path: str, headers, charger_class=RawCharger):
        """A raw charger that sent C{headers} for C{path}; dropped at cleanup."""
        charger = yield open_raw(reactor, self.port, request(path, headers), charger_class)
        self.addCleanup(charger.drop)
        return charger

    @defer.inlineCallbacks
    def boots(self, charger, identity: str, version: str = "ocpp1.6",
              message_id: str = "boot-1", payload=None):
        """
        The charger's BootNotification reaches the back end as
        C{identity}'s, speaking C{version}, and the answer reaches it.
        """
        self.backend.handle("BootNotification", boot_answer)
        charger.send_text([2, message_id, "BootNotification", payload or BOOT_16])
        answer = yield charger.next_message()
        self.assertEqual(answer, [3, message_id, BOOT_ANSWER])
        prefix = version.replace(".", "")
        while True:
            message = yield self.backend.next_message(f"{prefix}.BootNotification.req")
            if message.correlation_id == message_id and message.reply_to == identity:
                break
        self.assertEqual(message.headers["x-ocpp-identity"], identity)
        self.assertEqual(message.headers["x-ocpp-version"], version)
        return message


# -- 1. no Sec-WebSocket-Protocol -------------------------------------------------


class NoSubprotocolRefusedTests(FieldTestCase):
    """Shipped default: a charger that offers no subprotocol gets 400."""

    @defer.inlineCallbacks
    def test_refused_naming_the_key(self):
        """
        The refusal's log line names the key that would let it in.
        """
        logs = LogCapture(self)
        identity = self.identity()
        response = yield raw_request(self.port, request(
            f"/ocpp/{identity}", upgrade_headers(self.port, protocol=None)))
        self.assertEqual(response.status, 400)
        [refused] = [e for e in logs.with_event("refused") if e.get("identity") == identity]
        self.assertEqual(refused["key"], "listener.default_subprotocol")
        self.assertNotIn(identity, self.gateway_service.gateway.chargers)


class NoSubprotocolTests(FieldTestCase):
    """
    With C{default_subprotocol}, a charger that offers nothing (Grizzl-E,
    TinyWebsockets) is served as that version, and the 101 names none.
    """

    settings = {"listener": {"default_subprotocol": "ocpp1.6"}}

    def grizzl_e(self, identity: str, protocol=None):
        # lbbrhzn/ocpp#442: a Grizzl-E's request, header for header.
        headers = [
            ("Host", f"127.0.0.1:{self.port}"),
            ("Sec-WebSocket-Key", websocket_key()),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("User-Agent", "TinyWebsockets Client"),
            ("Origin", "https://github.com/gilmaimon/TinyWebsockets"),
        ]
        if protocol is not None:
            headers.append(("Sec-WebSocket-Protocol", protocol))
        return self.open(f"/ocpp/{identity}", headers)

    @defer.inlineCallbacks
    def test_served_as_default(self):
        """
        No header, or an empty one (which offers nothing either): 1.6, and
        a 101 without C{Sec-WebSocket-Protocol}.
        """
        for protocol in (None, ""):
            identity = self.identity()
            charger = yield self.grizzl_e(identity, protocol)
            self.assertEqual(charger.response.status, 101, repr(protocol))
            self.assertNotIn("sec-websocket-protocol", charger.response.header_names())
            yield self.boots(charger, identity, "ocpp1.6")

    @defer.inlineCallbacks
    def test_offer_still_decides(self):
        """A charger that offers a version gets it, not the default."""
        identity = self.identity()
        charger = yield self.grizzl_e(identity, protocol="ocpp2.0.1")
        self.assertEqual(charger.response.header("sec-websocket-protocol"), "ocpp2.0.1")
        yield self.boots(charger, identity, "ocpp2.0.1", payload={
            "chargingStation": {"model": "M", "vendorName": "V"}, "reason": "PowerUp"})

    @defer.inlineCallbacks
    def test_unsupported_offer_still_refused(self):
        """The default is for chargers that offer nothing, not for unknown offers."""
        response = yield raw_request(self.port, request(
            f"/ocpp/{self.identity()}", upgrade_headers(self.port, protocol="ocpp3.0")))
        self.assertEqual(response.status, 400)

    @defer.inlineCallbacks
    def test_identity_rules_unchanged(self):
        """No subprotocol is no way around the identity rules."""
        for path in ("/ocpp/*", "/ocpp/%23", "/ocpp/CP.1", "/ocpp/"):
            response = yield raw_request(self.port, request(
                path, upgrade_headers(self.port, protocol=None)))
            self.assertEqual(response.status, 400, path)


# -- 2. odd offer lists, 3. another case ------------------------------------------


class OfferSpellingTests(FieldTestCase):
    """
    Offer lists with empty or SOAP-only entries, and names in another case,
    with the shipped defaults.
    """

    @defer.inlineCallbacks
    def test_leading_comma(self):
        """Keba x30 (firmware 1.9) offers C{,ocpp2.0.1}."""
        identity = self.identity()
        charger = yield self.open(
            f"/ocpp/{identity}", upgrade_headers(self.port, protocol=",ocpp2.0.1"))
        self.assertEqual(charger.response.status, 101)
        self.assertEqual(charger.response.header("sec-websocket-protocol"), "ocpp2.0.1")
        yield self.boots(charger, identity, "ocpp2.0.1", payload={
            "chargingStation": {"model": "M", "vendorName": "V"}, "reason": "PowerUp"})

    @defer.inlineCallbacks
    def test_soap_version_after(self):
        """C{ocpp1.6, ocpp1.5}: 1.6."""
        identity = self.identity()
        charger = yield self.open(
            f"/ocpp/{identity}", upgrade_headers(self.port, protocol="ocpp1.6, ocpp1.5"))
        self.assertEqual(charger.response.header("sec-websocket-protocol"), "ocpp1.6")
        yield self.boots(charger, identity, "ocpp1.6")

    @defer.inlineCallbacks
    def test_upper_case_echoed(self):
        """
        C{OCPP1.6} is 1.6, and the 101 echoes C{OCPP1.6}: the value a
        client offered, as RFC 6455 asks.
        """
        identity = self.identity()
        charger = yield self.open(
            f"/ocpp/{identity}", upgrade_headers(self.port, protocol="OCPP1.6"))
        self.assertEqual(charger.response.status, 101)
        self.assertEqual(charger.response.header("sec-websocket-protocol"), "OCPP1.6")
        yield self.boots(charger, identity, "ocpp1.6")
        # 1.6 spellings for 1.6 chargers
        charger.send_text(b"not json")
        error = yield charger.next_message()
        self.assertEqual(error[:3], [4, "-1", "GenericError"])

    @defer.inlineCallbacks
    def test_mixed_case_201(self):
        identity = self.identity()
        charger = yield self.open(
            f"/ocpp/{identity}", upgrade_headers(self.port, protocol="Ocpp2.0.1"))
        self.assertEqual(charger.response.header("sec-websocket-protocol"), "Ocpp2.0.1")
        yield self.boots(charger, identity, "ocpp2.0.1", payload={
            "chargingStation": {"model": "M", "vendorName": "V"}, "reason": "PowerUp"})
        charger.send_text(b"not json")
        error = yield charger.next_message()
        self.assertEqual(error[:3], [4, "-1", "RpcFrameworkError"])

    @defer.inlineCallbacks
    def test_soap_versions_refused_in_any_case(self):
        for offered in ("OCPP1.5", "Ocpp1.2"):
            response = yield raw_request(self.port, request(
                f"/ocpp/{self.identity()}", upgrade_headers(self.port, protocol=offered)))
            self.assertEqual(response.status, 400, offered)


# -- 4. no Connection: Upgrade -----------------------------------------------------


class NoConnectionHeaderTests(FieldTestCase):
    """
    An upgrade request without C{Connection: Upgrade} (Autel MaxiCharger
    firmware 1.38) is accepted when it is a WebSocket upgrade in every
    other respect.
    """

    @defer.inlineCallbacks
    def test_autel_request(self):
        identity = self.identity()
        logs = LogCapture(self)
        charger = yield self.open(
            f"/ocpp/{identity}", upgrade_headers(self.port, connection=None))
        self.assertEqual(charger.response.status, 101)
        self.assertEqual(charger.response.header("sec-websocket-protocol"), "ocpp1.6")
        yield self.boots(charger, identity)
        [quirk] = [e for e in logs.with_event("quirks") if e["identity"] == identity]
        self.assertIn("Connection: Upgrade", quirk["quirks"])

    @defer.inlineCallbacks
    def test_connection_without_upgrade_token(self):
        """C{Connection: keep-alive} alone is completed the same way."""
        identity = self.identity()
        charger = yield self.open(
            f"/ocpp/{identity}", upgrade_headers(self.port, connection="keep-alive"))
        self.assertEqual(charger.response.status, 101)
        yield self.boots(charger, identity)

    @defer.inlineCallbacks
    def test_not_a_websocket_upgrade_refused(self):
        """
        Without C{Connection}, anything short of a complete RFC 6455
        upgrade is refused as before.
        """
        port = self.port
        cases = {
            "old protocol version": upgrade_headers(port, connection=None, extra=()),
            "no key": [h for h in upgrade_headers(port, connection=None)
                       if h[0] != "Sec-WebSocket-Key"],
            "other upgrade": [("Upgrade", "h2c") if h[0] == "Upgrade" else h
                              for h in upgrade_headers(port, connection=None)],
        }
        cases["old protocol version"] = [
            ("Sec-WebSocket-Version", "8") if h[0] == "Sec-WebSocket-Version" else h
            for h in cases["old protocol version"]
        ]
        for why, headers in cases.items():
            response = yield raw_request(port, request(f"/ocpp/{self.identity()}", headers))
            self.assertEqual(response.status, 400, why)
            self.assertIsNone(response.header("sec-websocket-accept"), why)
        plain = [h for h in upgrade_headers(port, connection=None) if h[0] == "Host"]
        response = yield raw_request(port, request(f"/ocpp/{self.identity()}", plain))
        self.assertEqual(response.status, 426)


# -- 5. trailing slash -------------------------------------------------------------


class TrailingSlashTests(FieldTestCase):
    """C{/ocpp/CP1/} is the charger C{CP1}; C{/ocpp/CP1?x=y} too."""

    @defer.inlineCallbacks
    def test_trailing_slash(self):
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}/", upgrade_headers(self.port))
        self.assertEqual(charger.response.status, 101)
        yield self.boots(charger, identity)
        self.assertIn(identity, self.gateway_service.gateway.chargers)

    @defer.inlineCallbacks
    def test_query(self):
        identity = self.identity()
        for path in (f"/ocpp/{identity}?x=y", f"/ocpp/{identity}/?x=y"):
            charger = yield self.open(path, upgrade_headers(self.port))
            self.assertEqual(charger.response.status, 101, path)
            yield self.boots(charger, identity, message_id=f"boot-{len(path)}")
            yield charger.drop()

    @defer.inlineCallbacks
    def test_no_wildcard_behind_a_slash(self):
        for path in ("/ocpp/*/", "/ocpp/%23/", "/ocpp/%2A/", "/ocpp/a.b/", "/ocpp//",
                     f"/ocpp/{self.identity()}//"):
            response = yield raw_request(self.port, request(path, upgrade_headers(self.port)))
            self.assertEqual(response.status, 400, path)


# -- 6. long message ids -------------------------------------------------------------


class DefaultMessageIdTests(FieldTestCase):
    """Shipped default: 36 characters, the specs' limit."""

    @defer.inlineCallbacks
    def test_37_characters_refused(self):
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(self.port))
        charger.send_text([2, "x" * 37, "Heartbeat", {}])
        error = yield charger.next_message()
        self.assertEqual(error[:3], [4, "-1", "GenericError"])
        self.assertIn("1 to 36 characters", error[3])


class LongMessageIdTests(FieldTestCase):
    """
    With C{max_message_id_length = 255}, longer ids are published,
    answered and correlated like any other, in both directions.
    """

    settings = {"ocpp": {"max_message_id_length": "255"}}

    @defer.inlineCallbacks
    def test_charger_call(self):
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(self.port))
        message_id = "urn:uuid:" + "0123456789abcdef" * 15 + "-long"
        self.assertGreater(len(message_id), 36)
        message = yield self.boots(charger, identity, message_id=message_id)
        self.assertEqual(message.correlation_id, message_id)
        self.assertEqual(message.routing_key, "ocpp16.BootNotification.req")
        longest = "L" * 255
        yield self.boots(charger, identity, message_id=longest)

    @defer.inlineCallbacks
    def test_csms_call(self):
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(self.port))
        yield self.boots(charger, identity)
        message_id = "c" * 200
        called = self.backend.call(identity, [2, message_id, "Reset", {"type": "Soft"}])
        command = yield charger.next_message()
        self.assertEqual(command[:3], [2, message_id, "Reset"])
        charger.send_text([3, message_id, {"status": "Accepted"}])
        reply = yield called
        self.assertEqual(orjson.loads(reply.body), [3, message_id, {"status": "Accepted"}])
        conf = yield self.backend.next_message("ocpp16.Reset.conf")
        self.assertEqual(conf.correlation_id, message_id)

    @defer.inlineCallbacks
    def test_over_the_limit_refused(self):
        """
        256 characters, or fewer whose UTF-8 is over the 255 bytes of an
        AMQP correlation_id: refused with id C{"-1"}, nothing published,
        the charger keeps its connection.
        """
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(self.port))
        for message_id in ("x" * 256, "\u00e9" * 128):
            charger.send_text([2, message_id, "Heartbeat", {}])
            error = yield charger.next_message()
            self.assertEqual(error[:3], [4, "-1", "GenericError"])
        self.backend.handle("Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"})
        charger.send_text([2, "after", "Heartbeat", {}])
        answer = yield charger.next_message()
        self.assertEqual(answer[:2], [3, "after"])
        while True:
            message = yield self.backend.next_message()
            if message.headers.get("x-ocpp-identity") == identity and not \
                    message.routing_key.startswith("ocppgw."):
                break
        self.assertEqual(message.correlation_id, "after")


# -- 7. malformed answers ------------------------------------------------------------


class MalformedAnswerTests(FieldTestCase):
    """
    A malformed answer to the outstanding CSMS CALL is that CALL's answer:
    published at once, as sent, marked C{x-ocppgw-malformed}, the command
    acked and the next one sent, and no bad frame counted. The call
    timeout (30 s) is longer than the test's, so no answer here can be a
    timeout's.
    """

    settings = {"websocket": {"max_bad_frames": "1"}}

    @defer.inlineCallbacks
    def connected(self):
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(self.port))
        yield self.boots(charger, identity)
        return identity, charger

    @defer.inlineCallbacks
    def test_details_as_string(self):
        """
        The SAP e-mobility charging stations simulator refuses a command it
        does not implement with the action name as error details.
        """
        identity, charger = yield self.connected()
        called = self.backend.call(
            identity, [2, "gcs-1", "GetCompositeSchedule", {"connectorId": 1, "duration": 60}])
        command = yield charger.next_message()
        self.assertEqual(command[1], "gcs-1")
        yield self.backend.send_to_charger(identity, [2, "next", "Reset", {"type": "Soft"}])
        sent = (b'[4,"gcs-1","NotImplemented","GetCompositeSchedule is not implemented to '
                b'handle payload {\\n  \\"connectorId\\": 1,\\n  \\"duration\\": 60\\n}",'
                b'"GetCompositeSchedule"]')
        charger.send_text(sent)
        reply = yield called
        self.assertEqual(reply.body, sent)
        self.assertIn("details", reply.headers[topology.HEADER_MALFORMED])
        error = yield self.backend.next_message("ocpp16.GetCompositeSchedule.error")
        self.assertEqual(error.body, sent)
        self.assertEqual(error.correlation_id, "gcs-1")
        self.assertEqual(error.headers[topology.HEADER_MALFORMED],
                         reply.headers[topology.HEADER_MALFORMED])
        # the command was acked and the held one follows at once
        following = yield charger.next_message()
        self.assertEqual(following[:2], [2, "next"])
        # not a bad frame: max_bad_frames = 1 would have closed the charger
        self.assertFalse(charger.closed.called)
        self.assertIn(identity, self.gateway_service.gateway.chargers)

    @defer.inlineCallbacks
    def test_extra_elements(self):
        """A CALLRESULT and a CALLERROR with an element too many."""
        identity, charger = yield self.connected()
        for message_id, sent, key in (
            ("r1", b'[3,"r1",{"status":"Accepted"},{}]', "ocpp16.Reset.conf"),
            ("r2", b'[4,"r2","GenericError","busy",{},"extra"]', "ocpp16.Reset.error"),
        ):
            called = self.backend.call(identity, [2, message_id, "Reset", {"type": "Soft"}])
            command = yield charger.next_message()
            self.assertEqual(command[1], message_id)
            charger.send_text(sent)
            reply = yield called
            self.assertEqual(reply.body, sent)
            self.assertIn("elements", reply.headers[topology.HEADER_MALFORMED])
            published = yield self.backend.next_message(key)
            self.assertEqual(published.body, sent)
        self.assertFalse(charger.closed.called)

    @defer.inlineCallbacks
    def test_unknown_error_code(self):
        """An error code 1.6 does not define is passed on, marked."""
        identity, charger = yield self.connected()
        called = self.backend.call(identity, [2, "u1", "UnlockConnector", {"connectorId": 1}])
        yield charger.next_message()
        sent = b'[4,"u1","Rejected","connector busy",{}]'
        charger.send_text(sent)
        reply = yield called
        self.assertEqual(reply.body, sent)
        self.assertIn("ocpp1.6", reply.headers[topology.HEADER_MALFORMED])
        error = yield self.backend.next_message("ocpp16.UnlockConnector.error")
        self.assertEqual(error.body, sent)

    @defer.inlineCallbacks
    def test_well_formed_error_not_marked(self):
        identity, charger = yield self.connected()
        called = self.backend.call(identity, [2, "w1", "Reset", {"type": "Soft"}])
        yield charger.next_message()
        charger.send_text([4, "w1", "NotSupported", "", {}])
        reply = yield called
        self.assertNotIn(topology.HEADER_MALFORMED, reply.headers)

    @defer.inlineCallbacks
    def test_malformed_frame_answering_nothing_is_a_bad_frame(self):
        """
        The same malformed answer with another id answers nothing: it is not
        published and counts as a bad frame (here the one that closes).
        """
        identity, charger = yield self.connected()
        yield self.backend.send_to_charger(identity, [2, "o1", "Reset", {"type": "Soft"}])
        yield charger.next_message()
        charger.send_text(b'[4,"other-id","NotImplemented","no","Reset"]')
        code = yield charger.closed
        self.assertEqual(code, 1002)
        for message in self.backend.received:
            self.assertNotEqual(message.correlation_id, "other-id")


# -- 8. chargers that never answer pings ---------------------------------------------


class DeafChargerTests(FieldTestCase):
    """
    Pings every 0.2 s with a 0.5 s pong timeout: a charger that never
    answers a ping but sends frames stays (EN+; lbbrhzn/ocpp#211).
    """

    settings = {"websocket": {"ws_opts.idle_timeout": "0.2", "ping_timeout": "0.5"}}

    @defer.inlineCallbacks
    def test_frames_count_as_liveness(self):
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(self.port))
        self.backend.handle("Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"})
        started = reactor.seconds()
        beats = 0
        # a Heartbeat every 0.25 s, and six pong timeouts' worth of pings,
        # none of them answered
        while reactor.seconds() - started < 3.0 or charger.pings < 6:
            beats += 1
            charger.send_text([2, f"hb{beats}", "Heartbeat", {}])
            answer = yield charger.next_message()
            self.assertEqual(answer[:2], [3, f"hb{beats}"])
            yield task.deferLater(reactor, 0.25, lambda: None)
        self.assertGreaterEqual(charger.pings, 6)
        self.assertFalse(charger.closed.called)
        self.assertIn(identity, self.gateway_service.gateway.chargers)

    @defer.inlineCallbacks
    def test_silent_deaf_charger_dropped(self):
        """The control: silent and deaf, it is dropped after the pong timeout."""
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(self.port))
        code = yield charger.closed
        self.assertIsNone(code)  # TCP dropped, no close frame
        self.assertGreaterEqual(charger.pings, 1)


class NoPingTests(FieldTestCase):
    """C{ws_opts.idle_timeout = 0}: no server pings at all."""

    settings = {"websocket": {"ws_opts.idle_timeout": "0"}}

    @defer.inlineCallbacks
    def test_no_pings(self):
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(self.port))
        yield self.boots(charger, identity)
        edge = self.gateway_service.gateway.chargers[identity].edge
        self.assertEqual(edge.autoPingInterval, 0)
        self.assertIsNone(edge.autoPingPendingCall)
        self.assertIsNone(edge.autoPingTimeoutCall)
        self.assertEqual(charger.pings, 0)


# -- 11. compression -----------------------------------------------------------------

#: what a client offers for permessage-deflate with a bounded window
OFFER = "permessage-deflate; client_max_window_bits"


class NoCompressionTests(FieldTestCase):
    """Shipped default: an offer is answered without the extension."""

    @defer.inlineCallbacks
    def test_offer_declined(self):
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(
            self.port, extra=[("Sec-WebSocket-Extensions", OFFER)]))
        self.assertEqual(charger.response.status, 101)
        self.assertIsNone(charger.response.header("sec-websocket-extensions"))
        yield self.boots(charger, identity)


class CompressionTests(FieldTestCase):
    """
    C{ws_opts.compress = true}: permessage-deflate with a 2^9-byte window
    both ways when the charger allows it, no context kept by the gateway.
    """

    settings = {"websocket": {"ws_opts.compress": "true", "ws_opts.max_frame_size": "4096"}}

    @defer.inlineCallbacks
    def test_negotiated_bounded(self):
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(
            self.port, extra=[("Sec-WebSocket-Extensions", OFFER)]))
        self.assertEqual(charger.response.status, 101)
        self.assertEqual(charger.response.header("sec-websocket-extensions"),
                         "permessage-deflate; client_max_window_bits=9")
        # compressed both ways (the raw charger inflates and deflates)
        yield self.boots(charger, identity)
        edge = self.gateway_service.gateway.chargers[identity].edge
        deflate = edge._perMessageCompress
        self.assertEqual((deflate.server_max_window_bits, deflate.client_max_window_bits,
                          deflate.mem_level, deflate.server_no_context_takeover), (9, 9, 1, True))

    @defer.inlineCallbacks
    def test_offer_without_window_parameter(self):
        """A plain offer: the charger's own window stands, ours is small."""
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(
            self.port, extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]))
        self.assertEqual(charger.response.header("sec-websocket-extensions"),
                         "permessage-deflate")
        yield self.boots(charger, identity)
        edge = self.gateway_service.gateway.chargers[identity].edge
        self.assertEqual(edge._perMessageCompress.server_max_window_bits, 9)
        self.assertEqual(edge._perMessageCompress.client_max_window_bits, 15)

    @defer.inlineCallbacks
    def test_limit_applies_to_inflated_size(self):
        """
        A message of ~100 KB that deflates to a few hundred bytes is over
        the 4096-byte limit: 1009, not a blown-up buffer.
        """
        identity = self.identity()
        charger = yield self.open(f"/ocpp/{identity}", upgrade_headers(
            self.port, extra=[("Sec-WebSocket-Extensions", OFFER)]))
        bomb = orjson.dumps([2, "b1", "DataTransfer", {"vendorId": "V", "data": " " * 100000}])
        self.assertLess(len(zlib.compress(bomb)), 4096)
        charger.send_text(bomb)
        code = yield charger.closed
        self.assertEqual(code, 1009)

    @defer.inlineCallbacks
    def test_websockets_client(self):
        """
        The C{websockets} library, whose client offers permessage-deflate by
        default, connects compressed and boots.
        """
        from websockets.asyncio.client import connect as ws_connect

        identity = self.identity()
        connection = yield as_deferred(ws_connect(
            self.url(identity), subprotocols=["ocpp1.6"], ping_interval=None))
        self.addCleanup(lambda: as_deferred(connection.close()))
        [extension] = connection.protocol.extensions
        self.assertEqual(extension.name, "permessage-deflate")
        self.assertEqual(extension.local_max_window_bits, 9)
        self.backend.handle("BootNotification", boot_answer)
        yield as_deferred(connection.send(orjson.dumps([2, "w1", "BootNotification", BOOT_16])
                                          .decode()))
        answer = yield as_deferred(connection.recv())
        self.assertEqual(orjson.loads(answer), [3, "w1", BOOT_ANSWER])


# -- 12 and every switch on: authentication and identity hold --------------------------


def basic(identity: str, password: bytes) -> str:
    return "Basic " + base64.b64encode(identity.encode() + b":" + password).decode()


class AuthTests(SecurityTestCase):
    """
    Security profile 1 with every switch of this page on: Basic passwords
    with C{:}, raw 1.6 AuthorizationKeys, and the quirks, none of which
    lets a charger in without its own credentials.
    """

    timeout = 30

    def security_settings(self):
        self.passwords = os.path.join(self.directory, "passwords")
        self.colon_id = self.identity("PC")
        self.colon_password = b"pa:ss:w0rd"
        add_password(self.passwords, self.colon_id, self.colon_password)
        # a 1.6 AuthorizationKey: 20 raw bytes, a ':' (0x3a) among them,
        # not valid UTF-8
        self.key_id = self.identity("PK")
        self.key16 = bytes.fromhex("3aff00") + bytes.fromhex("3a") * 2 + bytes(range(200, 215))
        self.assertEqual(len(self.key16), 20)
        add_password(self.passwords, self.key_id, self.key16, hex_=True)
        return {
            "listener": {"tcp.profile": "1", "default_subprotocol": "ocpp1.6"},
            "websocket": {"ws_opts.compress": "true"},
            "ocpp": {"max_message_id_length": "255"},
            "auth": {"password_file": self.passwords, "failure_delay": "0"},
        }

    def handshake(self, path, headers):
        return raw_request(self.port, request(path, headers))

    @defer.inlineCallbacks
    def test_password_with_colons(self):
        """citrineos-core PR#95: the password is what follows the first ':'."""
        response = yield self.handshake(f"/ocpp/{self.colon_id}", upgrade_headers(
            self.port, extra=[("Authorization", basic(self.colon_id, self.colon_password))]))
        self.assertEqual(response.status, 101)
        response = yield self.handshake(f"/ocpp/{self.colon_id}", upgrade_headers(
            self.port, extra=[("Authorization", basic(self.colon_id, b"pa"))]))
        self.assertEqual(response.status, 401)

    @defer.inlineCallbacks
    def test_raw_authorization_key(self):
        """1.6 compares the 20 raw bytes, colons and all; 2.x wants UTF-8."""
        auth = [("Authorization", basic(self.key_id, self.key16))]
        response = yield self.handshake(
            f"/ocpp/{self.key_id}", upgrade_headers(self.port, extra=auth))
        self.assertEqual(response.status, 101)
        response = yield self.handshake(f"/ocpp/{self.key_id}", upgrade_headers(
            self.port, protocol="ocpp2.0.1", extra=auth))
        self.assertEqual(response.status, 401)

    @defer.inlineCallbacks
    def test_spelling_does_not_change_password_rules(self):
        """
        C{OCPP1.6} is authenticated as 1.6 (raw bytes accepted),
        C{OCPP2.0.1} as 2.0.1 (not UTF-8: refused).
        """
        auth = [("Authorization", basic(self.key_id, self.key16))]
        response = yield self.handshake(
            f"/ocpp/{self.key_id}", upgrade_headers(self.port, protocol="OCPP1.6", extra=auth))
        self.assertEqual(response.status, 101)
        response = yield self.handshake(
            f"/ocpp/{self.key_id}", upgrade_headers(self.port, protocol="OCPP2.0.1", extra=auth))
        self.assertEqual(response.status, 401)

    @defer.inlineCallbacks
    def test_every_quirk_at_once_still_authenticates(self):
        """
        No subprotocol, no C{Connection}, a trailing C{/}: the charger's own
        credentials open the door, none or another charger's do not, and
        a wildcard identity is refused before anything else.
        """
        def quirky(path, authorization=None):
            extra = [("Authorization", authorization)] if authorization else []
            return self.handshake(path, upgrade_headers(
                self.port, protocol=None, connection=None, extra=extra))

        response = yield quirky(f"/ocpp/{self.colon_id}/")
        self.assertEqual(response.status, 401)
        response = yield quirky(f"/ocpp/{self.colon_id}/", basic(self.key_id, self.key16))
        self.assertEqual(response.status, 401)
        for path in ("/ocpp/*/", "/ocpp/%23/"):
            response = yield quirky(path, basic(self.colon_id, self.colon_password))
            self.assertEqual(response.status, 400, path)
        self.assertNotIn(self.key_id, self.gateway_service.gateway.chargers)
        response = yield quirky(f"/ocpp/{self.colon_id}/",
                                basic(self.colon_id, self.colon_password))
        self.assertEqual(response.status, 101)
        self.assertIsNone(response.header("sec-websocket-protocol"))

    @defer.inlineCallbacks
    def test_charger_client_with_every_switch(self):
        """A charger library's ordinary connection is unaffected by the switches."""
        from ocppgw.testing import basic_auth

        charger = yield FakeCharger.connect(
            reactor, self.url(self.colon_id), ["ocpp1.6"],
            headers=basic_auth(self.colon_id, self.colon_password))
        self.addCleanup(self._close_charger, charger)
        self.assertEqual(charger.subprotocol, "ocpp1.6")
        self.backend.handle("BootNotification", boot_answer)
        answer = yield charger.call("BootNotification", BOOT_16, message_id="id-" + "9" * 100)
        self.assertEqual(answer, [3, "id-" + "9" * 100, BOOT_ANSWER])
