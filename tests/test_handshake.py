"""
The charger side of the contract (docs/connecting.md), over real TCP against a
running gateway.

Exact HTTP statuses and headers are checked with a hand-written HTTP/1.1
upgrade request (L{raw_request}), since a WebSocket client library hides
them or answers for itself; what happens after the upgrade is checked with
real WebSocket clients (L{FakeCharger} and small autobahn protocols).
"""

from __future__ import annotations

import os

import autobahn
import orjson
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from ocppgw.testing import FakeCharger
from tests.rawhttp import HttpResponse, raw_request, upgrade_request
from tests.support import GatewayTestCase, RawHandshakeMixin, SilentClient


def _heartbeat_answer(message, payload):
    return {"currentTime": "2026-01-01T00:00:00Z"}


# -- identities --------------------------------------------------------------


class IdentityTests(RawHandshakeMixin, GatewayTestCase):
    """
    The identity is the last path segment, percent-decoded, and is refused
    with 400 before the upgrade when it could break routing
    (docs/connecting.md).
    """

    timeout = 20

    def test_encoded_hash_refused(self):
        """A C{#} (sent as C{%23}) is a topic wildcard: 400."""
        return self.assertRefused("/ocpp/CP%23")

    def test_hash_alone_refused(self):
        """An identity that is just C{#} (sent as C{%23}): 400."""
        return self.assertRefused("/ocpp/%23")

    def test_star_alone_refused(self):
        """An identity that is exactly C{*} is a topic wildcard: 400."""
        return self.assertRefused("/ocpp/*")

    def test_encoded_star_alone_refused(self):
        """C{%2A} decodes to the wildcard C{*}: 400 too."""
        return self.assertRefused("/ocpp/%2A")

    def test_dot_refused(self):
        """A C{.} would split the binding key into several words: 400."""
        return self.assertRefused("/ocpp/CP.1")

    def test_encoded_dot_refused(self):
        """A C{.} hidden as C{%2E} is refused as well."""
        return self.assertRefused("/ocpp/CP%2E1")

    def test_49_characters_refused(self):
        """More than 48 characters: 400."""
        return self.assertRefused("/ocpp/" + "A" * 49)

    @defer.inlineCallbacks
    def test_48_characters_accepted(self):
        """Exactly 48 characters is the longest identity accepted."""
        identity = self.identity("L")
        identity = self.own(identity + "x" * (48 - len(identity)))
        self.assertEqual(len(identity), 48)
        response = yield self.assertUpgraded("/ocpp/" + identity)
        self.assertEqual(response.header("sec-websocket-protocol"), "ocpp1.6")

    def test_empty_refused(self):
        """No identity after the path: 400."""
        return self.assertRefused("/ocpp/")

    def test_path_without_identity_refused(self):
        """The bare path, without even a C{/}: 400."""
        return self.assertRefused("/ocpp")

    def test_crlf_refused(self):
        """Control characters (C{%0D%0A}) are refused: 400."""
        return self.assertRefused("/ocpp/CP%0D%0AX-Injected:%20yes")

    def test_bad_percent_escape_refused(self):
        """A C{%} not followed by two hex digits: 400."""
        return self.assertRefused("/ocpp/CP%zz1")

    def test_truncated_percent_escape_refused(self):
        """A C{%} at the end of the identity: 400."""
        return self.assertRefused("/ocpp/CP%2")

    def test_invalid_utf8_refused(self):
        """Escapes that do not decode as UTF-8 (C{%C3%28}): 400."""
        return self.assertRefused("/ocpp/CP%C3%28")

    def test_encoded_slash_refused(self):
        """A C{/} smuggled in as C{%2F}: 400."""
        return self.assertRefused("/ocpp/CP%2F1")

    @defer.inlineCallbacks
    def test_two_trailing_slashes_refused(self):
        """
        C{/ocpp/<identity>//} names no identity: 400 (one trailing C{/} is
        a firmware quirk that is accepted: see tests.test_field).
        """
        yield self.assertRefused(f"/ocpp/{self.identity()}//")

    @defer.inlineCallbacks
    def test_other_path_refused(self):
        """An identity under another path than C{ws_path}: 400."""
        yield self.assertRefused(f"/other/{self.identity()}")

    @defer.inlineCallbacks
    def test_vhost_form_refused_without_vhost(self):
        """C{/ocpp/<vhost>/<identity>} is refused when no vhost is configured."""
        yield self.assertRefused(f"/ocpp/site1/{self.identity()}")

    @defer.inlineCallbacks
    def _frames_carry_identity(self, identity: str, encoded: str):
        """
        A charger connecting as C{/ocpp/<encoded>} is the charger
        C{identity}: its frames are published with the decoded identity, and
        the back end's answer, routed by that identity, reaches it.
        """
        self.own(identity)
        self.backend.handle("Heartbeat", _heartbeat_answer)
        charger = yield FakeCharger.connect(
            reactor, f"ws://127.0.0.1:{self.port}/ocpp/{encoded}"
        )
        self.addCleanup(self._close_charger, charger)
        answer = yield charger.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)
        self.assertEqual(answer[2], {"currentTime": "2026-01-01T00:00:00Z"})
        message = yield self.backend.next_message("ocpp16.Heartbeat.req")
        self.assertEqual(message.headers["x-ocpp-identity"], identity)
        self.assertEqual(message.reply_to, identity)

    def test_percent_encoded_space(self):
        """C{RDAM%20123} is the charger C{RDAM 123} (the 1.6J spec's example)."""
        identity = "RDAM 123-" + os.urandom(6).hex()
        return self._frames_carry_identity(identity, identity.replace(" ", "%20"))

    def test_percent_encoded_pipe(self):
        """C{RDAM%7C123} is the charger C{RDAM|123}."""
        identity = "RDAM|123-" + os.urandom(6).hex()
        return self._frames_carry_identity(identity, identity.replace("|", "%7C"))

    def test_evse_style_identity(self):
        """C{DE*ABC*E123}: a C{*} inside a longer identity is an ordinary character."""
        identity = "DE*ABC*E123-" + os.urandom(6).hex()
        return self._frames_carry_identity(identity, identity)

    @defer.inlineCallbacks
    def test_reason_never_echoes_identity(self):
        """
        A refused identity is never echoed: a decoded C{%0D%0A} in the
        status line would inject headers (docs/architecture.md, "autobahn
        and Twisted").
        """
        response = yield self.assertRefused("/ocpp/EVIL%0D%0AX-Injected:%20yes")
        self.assertNotIn(b"X-Injected", response.raw)
        self.assertNotIn(b"EVIL", response.raw)
        self.assertNotIn("x-injected", response.header_names())
        # a refusal for another reason does not name the charger either
        identity = self.identity("Secret")
        response = yield self.assertRefused(f"/ocpp/{identity}", protocols="ocpp9")
        self.assertNotIn(identity.encode("ascii"), response.raw)


# -- subprotocols ------------------------------------------------------------


class SubprotocolTests(RawHandshakeMixin, GatewayTestCase):
    """
    The subprotocol is the first the charger offers that is enabled; no
    acceptable one is a 400 before the upgrade (docs/connecting.md).
    """

    timeout = 20

    @defer.inlineCallbacks
    def test_no_subprotocol_refused(self):
        """No C{Sec-WebSocket-Protocol} header at all: 400."""
        yield self.assertRefused(f"/ocpp/{self.identity()}", protocols=None)

    @defer.inlineCallbacks
    def test_empty_subprotocol_header_refused(self):
        """An empty C{Sec-WebSocket-Protocol} header offers nothing: 400."""
        yield self.assertRefused(f"/ocpp/{self.identity()}", protocols="")

    @defer.inlineCallbacks
    def test_unsupported_subprotocol_refused(self):
        """Only unknown subprotocols offered: 400."""
        yield self.assertRefused(f"/ocpp/{self.identity()}", protocols="ocpp3.0, wamp.2.json")

    @defer.inlineCallbacks
    def test_soap_only_versions_refused(self):
        """C{ocpp1.5} and C{ocpp1.2} are SOAP-only, not OCPP-J: 400."""
        for offered in ("ocpp1.5", "ocpp1.2", "ocpp1.5, ocpp1.2"):
            yield self.assertRefused(f"/ocpp/{self.identity()}", protocols=offered)

    @defer.inlineCallbacks
    def test_soap_only_version_skipped(self):
        """A SOAP-only version offered first is skipped for the next one."""
        response = yield self.assertUpgraded(
            f"/ocpp/{self.identity()}", protocols="ocpp1.5, ocpp1.6"
        )
        self.assertEqual(response.header("sec-websocket-protocol"), "ocpp1.6")

    @defer.inlineCallbacks
    def test_client_preference_201_first(self):
        """Offered C{ocpp2.0.1, ocpp1.6}: the charger's first choice, 2.0.1."""
        response = yield self.assertUpgraded(
            f"/ocpp/{self.identity()}", protocols="ocpp2.0.1, ocpp1.6"
        )
        self.assertEqual(response.header("sec-websocket-protocol"), "ocpp2.0.1")

    @defer.inlineCallbacks
    def test_client_preference_16_first(self):
        """Offered C{ocpp1.6, ocpp2.0.1}: the charger's first choice, 1.6."""
        response = yield self.assertUpgraded(
            f"/ocpp/{self.identity()}", protocols="ocpp1.6, ocpp2.0.1"
        )
        self.assertEqual(response.header("sec-websocket-protocol"), "ocpp1.6")

    @defer.inlineCallbacks
    def test_every_ocpp_j_version_accepted(self):
        """Each OCPP-J version enabled by default can be negotiated alone."""
        for offered in ("ocpp1.6", "ocpp2.0", "ocpp2.0.1", "ocpp2.1"):
            response = yield self.assertUpgraded(
                f"/ocpp/{self.identity()}", protocols=offered
            )
            self.assertEqual(response.header("sec-websocket-protocol"), offered)

    @defer.inlineCallbacks
    def test_unknown_subprotocol_skipped(self):
        """Unknown offers before a supported one are skipped."""
        response = yield self.assertUpgraded(
            f"/ocpp/{self.identity()}", protocols="wamp.2.json, ocpp2.1, ocpp2.0"
        )
        self.assertEqual(response.header("sec-websocket-protocol"), "ocpp2.1")


class DisabledSubprotocolTests(RawHandshakeMixin, GatewayTestCase):
    """
    A subprotocol left out of C{[listener] subprotocols} is never chosen,
    even when the charger prefers it.
    """

    settings = {"listener": {"subprotocols": "ocpp1.6"}}
    timeout = 20

    @defer.inlineCallbacks
    def test_disabled_preference_skipped(self):
        """Offered C{ocpp2.0.1, ocpp1.6} with only 1.6 enabled: 1.6."""
        response = yield self.assertUpgraded(
            f"/ocpp/{self.identity()}", protocols="ocpp2.0.1, ocpp1.6"
        )
        self.assertEqual(response.header("sec-websocket-protocol"), "ocpp1.6")

    @defer.inlineCallbacks
    def test_only_disabled_offered_refused(self):
        """Only disabled subprotocols offered: 400."""
        yield self.assertRefused(
            f"/ocpp/{self.identity()}", protocols="ocpp2.0.1, ocpp2.1"
        )


# -- plain HTTP and banners --------------------------------------------------


class HttpTests(RawHandshakeMixin, GatewayTestCase):
    """
    Plain HTTP gets 426, and no response names the server software
    (docs/connecting.md; docs/architecture.md, "autobahn and Twisted").
    """

    timeout = 20

    def assertNoBanner(self, response: HttpResponse) -> None:
        self.assertNotIn("server", response.header_names(), response)
        self.assertNotIn(b"autobahn", response.raw.lower())
        self.assertNotIn(autobahn.__version__.encode("ascii"), response.raw)

    @defer.inlineCallbacks
    def test_plain_get_426(self):
        """A GET without C{Upgrade} is answered 426 Upgrade Required."""
        response = yield raw_request(
            self.port, upgrade_request(self.port, f"/ocpp/{self.identity()}", upgrade=False)
        )
        self.assertEqual(response.status, 426, response)
        self.assertNoBanner(response)

    @defer.inlineCallbacks
    def test_plain_get_root_426(self):
        """A GET of C{/} without C{Upgrade} gets 426, not a status page."""
        response = yield raw_request(self.port, upgrade_request(self.port, "/", upgrade=False))
        self.assertEqual(response.status, 426, response)
        self.assertNoBanner(response)
        self.assertNotIn(b"<html", response.raw.lower())

    @defer.inlineCallbacks
    def test_permessage_deflate_offer(self):
        """
        A charger offering permessage-deflate (as C{websockets}, browsers
        and many charger stacks do by default) still gets its 101, with the
        subprotocol it asked for.
        """
        request = upgrade_request(
            self.port,
            f"/ocpp/{self.identity()}",
            extensions="permessage-deflate; client_max_window_bits",
        )
        response = yield raw_request(self.port, request)
        self.assertEqual(response.status, 101, response)
        self.assertEqual(response.header("sec-websocket-protocol"), "ocpp1.6")

    @defer.inlineCallbacks
    def test_no_banner_on_101(self):
        """The 101 carries no C{Server} header nor autobahn's version."""
        response = yield self.assertUpgraded(f"/ocpp/{self.identity()}")
        self.assertNoBanner(response)

    @defer.inlineCallbacks
    def test_no_banner_on_errors(self):
        """Refusals (bad identity, bad subprotocol) carry no banner either."""
        response = yield self.assertRefused("/ocpp/*")
        self.assertNoBanner(response)
        response = yield self.assertRefused(f"/ocpp/{self.identity()}", protocols="ocpp1.5")
        self.assertNoBanner(response)


# -- frames after the upgrade ------------------------------------------------


class _FrameTestsBase(GatewayTestCase):
    timeout = 20

    @defer.inlineCallbacks
    def next_own_frame(self, identity: str):
        """
        The next message the back end gets from C{identity} that is one of
        its frames (presence events left aside).
        """
        while True:
            message = yield self.backend.next_message()
            if message.routing_key.startswith("ocppgw."):
                continue
            if message.headers.get("x-ocpp-identity") == identity:
                return message


class MessageSizeTests(_FrameTestsBase):
    """
    A message over C{ws_opts.max_frame_size} closes the connection with
    1009, not a TCP drop (docs/connecting.md; docs/architecture.md on
    C{failByDrop}).
    """

    settings = {"websocket": {"ws_opts.max_frame_size": "2048"}}

    @staticmethod
    def data_transfer(size: int, message_id: str = "big") -> list:
        """A DataTransfer CALL whose JSON encoding is C{size} bytes long."""
        empty = [2, message_id, "DataTransfer", {"vendorId": "V", "data": ""}]
        padding = size - len(orjson.dumps(empty))
        return [2, message_id, "DataTransfer", {"vendorId": "V", "data": "x" * padding}]

    @defer.inlineCallbacks
    def test_oversized_message_closes_1009(self):
        """A 4096-byte message with a 2048-byte limit: close code 1009."""
        charger = yield self.connect(self.identity())
        frame = orjson.dumps(self.data_transfer(4096))
        self.assertEqual(len(frame), 4096)
        charger.send(frame)
        code, _reason = yield charger.closed
        self.assertEqual(code, 1009)

    @defer.inlineCallbacks
    def test_message_within_limit_passes(self):
        """A message just under the limit is carried as usual."""
        self.backend.handle("DataTransfer", lambda message, payload: {"status": "Accepted"})
        charger = yield self.connect(self.identity())
        _, message_id, action, payload = self.data_transfer(2040)
        self.assertEqual(len(orjson.dumps([2, message_id, action, payload])), 2040)
        answer = yield charger.call(action, payload, message_id=message_id)
        self.assertEqual(answer, [3, "big", {"status": "Accepted"}])
        self.assertFalse(charger.closed.called)


class BinaryFrameTests(_FrameTestsBase):
    """OCPP-J is text only: a binary message closes with 1003 (docs/connecting.md)."""

    @defer.inlineCallbacks
    def test_binary_frame_closes_1003(self):
        charger = yield self.connect(self.identity())
        charger.send_binary(b'[2,"1","Heartbeat",{}]')
        code, _reason = yield charger.closed
        self.assertEqual(code, 1003)


class BadFrameTests(_FrameTestsBase):
    """
    A malformed frame is answered with a CALLERROR spelled for the version,
    never published; C{max_bad_frames} of them close with 1002
    (docs/connecting.md).
    """

    settings = {"websocket": {"max_bad_frames": "3"}}

    @defer.inlineCallbacks
    def test_bad_frame_answered_not_published_16(self):
        """1.6: a frame that is not JSON gets C{[4,"-1","GenericError",...]}."""
        identity = self.identity()
        self.backend.handle("Heartbeat", _heartbeat_answer)
        charger = yield self.connect(identity)
        charger.send(b"this is not json")
        error = yield charger.other.get()
        self.assertEqual(error[:3], [4, "-1", "GenericError"])
        self.assertIsInstance(error[3], str)
        self.assertEqual(error[4], {})
        # the broken frame never reached the back end: the charger's next
        # frame is the first one it sees
        answer = yield charger.call("Heartbeat", {}, message_id="after-bad")
        self.assertEqual(answer[0], 3)
        message = yield self.next_own_frame(identity)
        self.assertEqual(message.routing_key, "ocpp16.Heartbeat.req")
        self.assertEqual(message.correlation_id, "after-bad")
        self.assertFalse(charger.closed.called)

    @defer.inlineCallbacks
    def test_bad_frame_answered_201(self):
        """2.0.1: a broken envelope gets C{RpcFrameworkError}, a bad payload C{FormatViolation}."""
        charger = yield self.connect(self.identity(), subprotocols=("ocpp2.0.1",))
        self.assertEqual(charger.subprotocol, "ocpp2.0.1")
        charger.send(b"{}")
        error = yield charger.other.get()
        self.assertEqual(error[:3], [4, "-1", "RpcFrameworkError"])
        charger.send([2, "bad-payload", "Heartbeat", []])
        error = yield charger.other.get()
        self.assertEqual(error[:3], [4, "bad-payload", "FormatViolation"])

    @defer.inlineCallbacks
    def test_too_many_bad_frames_close_1002(self):
        """The third bad frame (max_bad_frames = 3) closes with 1002."""
        charger = yield self.connect(self.identity())
        for _ in range(2):
            charger.send(b"[")
            error = yield charger.other.get()
            self.assertEqual(error[0], 4)
        self.assertFalse(charger.closed.called)
        charger.send(b"[")
        code, _reason = yield charger.closed
        self.assertEqual(code, 1002)


# -- the vhost form ----------------------------------------------------------


class VhostTests(RawHandshakeMixin, _FrameTestsBase):
    """
    With C{[listener] vhost} set, C{/ocpp/<vhost>/<identity>} is accepted
    (compatibility with C{rabbitmq_web_ocpp}); another vhost is a 400.
    """

    settings = {"listener": {"vhost": "site1"}}

    @defer.inlineCallbacks
    def test_vhost_form_accepted(self):
        """C{/ocpp/site1/<identity>} is the charger C{<identity>}."""
        identity = self.identity()
        self.backend.handle("Heartbeat", _heartbeat_answer)
        charger = yield FakeCharger.connect(
            reactor, f"ws://127.0.0.1:{self.port}/ocpp/site1/{identity}"
        )
        self.addCleanup(self._close_charger, charger)
        answer = yield charger.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)
        message = yield self.backend.next_message("ocpp16.Heartbeat.req")
        self.assertEqual(message.headers["x-ocpp-identity"], identity)

    @defer.inlineCallbacks
    def test_other_vhost_refused(self):
        """C{/ocpp/site2/<identity>} names another vhost: 400."""
        yield self.assertRefused(f"/ocpp/site2/{self.identity()}")

    @defer.inlineCallbacks
    def test_plain_form_still_accepted(self):
        """The usual C{/ocpp/<identity>} keeps working with a vhost set."""
        yield self.assertUpgraded(f"/ocpp/{self.identity()}")


# -- pings -------------------------------------------------------------------


class _PingClient(WebSocketClientProtocol):
    """
    A client that counts the server's pings and answers them or not.

    @ivar ping_times: when each ping arrived (reactor seconds).
    """

    answer_pings = True

    def __init__(self) -> None:
        super().__init__()
        self.ping_times: list[float] = []
        self._ping_waiters: list[tuple[int, defer.Deferred]] = []
        self.opened: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()

    def onOpen(self):
        self.opened.callback(self)

    def _onPing(self, payload) -> None:
        self.ping_times.append(reactor.seconds())
        for waiter in list(self._ping_waiters):
            count, d = waiter
            if len(self.ping_times) >= count:
                self._ping_waiters.remove(waiter)
                d.callback(len(self.ping_times))
        if self.answer_pings:
            self.onPing(payload)  # autobahn's onPing answers with a pong

    def wait_for_pings(self, count: int) -> defer.Deferred:
        """
        Fires once C{count} pings have arrived; fails if the connection
        ends first.
        """
        d: defer.Deferred = defer.Deferred()
        if len(self.ping_times) >= count:
            d.callback(len(self.ping_times))
        else:
            self._ping_waiters.append((count, d))
        return d

    def onClose(self, wasClean, code, reason):
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"refused: {code} {reason}"))
        for count, d in self._ping_waiters:
            d.errback(
                ConnectionError(
                    f"closed ({code}, {reason!r}) after {len(self.ping_times)}"
                    f" of {count} pings"
                )
            )
        self._ping_waiters.clear()
        if not self.closed.called:
            self.closed.callback((wasClean, code, reason))


class _DeafClient(_PingClient):
    """
    A client whose pongs never go out: the ping is seen, nothing answers.
    """

    answer_pings = False

    def onPing(self, payload) -> None:
        pass

    def sendPong(self, payload=None) -> None:
        pass


class PingTestsMixin:
    """
    The server pings every C{idle_timeout}; a charger that answers stays
    connected however silent it is, one that does not is dropped after
    C{ping_timeout} (docs/connecting.md).
    """

    #: ws_opts.idle_timeout and ping_timeout of the class, in seconds
    interval: float
    ping_timeout: float
    #: pings to wait for; together they span more than ping_timeout
    pings: int

    @defer.inlineCallbacks
    def connect_client(self, identity: str, protocol_class):
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{self.port}/ocpp/{identity}",
            protocols=["ocpp1.6"],
            reactor=reactor,
        )
        # the client itself never pings nor times out
        factory.setProtocolOptions(autoPingInterval=0, autoPingTimeout=0, failByDrop=False)
        client = protocol_class()
        client.factory = factory
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5)
        yield connectProtocol(endpoint, client)
        self.addCleanup(self._drop_client, client)
        yield client.opened
        return client

    @staticmethod
    def _drop_client(client):
        if not client.closed.called:
            client.transport.abortConnection()
            return client.closed
        return None

    @defer.inlineCallbacks
    def test_answering_client_stays(self):
        """
        A charger that sends nothing but pongs keeps receiving pings, at
        the configured interval, for longer than C{ping_timeout}, and its
        connection still carries frames afterwards.
        """
        identity = self.identity()
        client = yield self.connect_client(identity, _PingClient)
        try:
            yield client.wait_for_pings(self.pings)
        except ConnectionError as error:
            self.fail(f"a charger that answers every ping was dropped: {error}")
        times = client.ping_times
        span = times[-1] - times[0]
        # a ping is sent only once the previous pong is in, so pings that
        # keep coming over more than ping_timeout prove pongs are accepted
        self.assertGreater(span, self.ping_timeout, f"pings at {times}")
        # and pings are not sent much faster than the configured interval
        self.assertGreaterEqual(
            span, (len(times) - 1) * self.interval / 2, f"ping storm: pings at {times}"
        )
        self.assertFalse(client.closed.called)
        self.assertEqual(client.state, WebSocketProtocol.STATE_OPEN)
        self.backend.handle("Heartbeat", _heartbeat_answer)
        answered: defer.Deferred = defer.Deferred()
        client.onMessage = lambda payload, is_binary: answered.callback(payload)
        client.sendMessage(b'[2,"hb","Heartbeat",{}]', False)
        payload = yield answered
        self.assertEqual(
            orjson.loads(payload), [3, "hb", {"currentTime": "2026-01-01T00:00:00Z"}]
        )

    @defer.inlineCallbacks
    def test_deaf_client_dropped(self):
        """
        A charger that gets a ping and never answers is dropped by the
        gateway (TCP closed, no close handshake) and announced as gone.
        """
        identity = self.identity()
        client = yield self.connect_client(identity, _DeafClient)
        yield client.wait_for_pings(1)
        was_clean, code, _reason = yield client.closed
        self.assertFalse(was_clean)
        self.assertEqual(code, 1006)
        self.assertEqual(len(client.ping_times), 1, "no new ping without a pong")
        while True:
            event = yield self.backend.next_message("ocppgw.disconnected")
            if orjson.loads(event.body)["identity"] == identity:
                break
        self.assertNotIn(identity, self.gateway_service.gateway.chargers)


class SubSecondPingTests(PingTestsMixin, _FrameTestsBase):
    """
    Pings with sub-second settings (idle_timeout 0.2 s, ping_timeout 0.5 s),
    which the configuration accepts.
    """

    interval = 0.2
    ping_timeout = 0.5
    pings = 6
    settings = {"websocket": {"ws_opts.idle_timeout": "0.2", "ping_timeout": "0.5"}}
    timeout = 10


class WholeSecondPingTests(PingTestsMixin, _FrameTestsBase):
    """
    Pings with whole-second settings (idle_timeout 1 s, ping_timeout 1.5 s).
    """

    interval = 1.0
    ping_timeout = 1.5
    pings = 3
    settings = {"websocket": {"ws_opts.idle_timeout": "1", "ping_timeout": "1.5"}}
    timeout = 15


class HandshakeTimeoutTests(GatewayTestCase):
    settings = {"websocket": {"handshake_timeout": "0.5"}}

    @defer.inlineCallbacks
    def test_unfinished_handshake_dropped(self):
        """
        A client that never finishes its opening handshake is dropped after
        C{handshake_timeout}, without an upgrade.
        """
        silent = SilentClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5)
        yield connectProtocol(endpoint, silent)
        started = reactor.seconds()
        yield silent.lost
        elapsed = reactor.seconds() - started
        self.assertGreaterEqual(elapsed, 0.4)
        self.assertLess(elapsed, 5)
        self.assertNotIn(b"101", silent.received)
