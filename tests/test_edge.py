"""
The WebSocket edge in memory: its pure helpers (subprotocol choice, the
completion of upgrade requests without C{Connection: Upgrade}, the
permessage-deflate terms), the answers a charger's opening handshake
gets from a real L{ChargerFactory} over in-memory transports, and its
timers on a clock (a pong timeout while reading is paused, the abort
after a graceful close the charger does not let go of).
"""

from __future__ import annotations

from autobahn.websocket.compress import PerMessageDeflate, PerMessageDeflateOffer
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.amqp import DeclareFailed
from ocppgw.auth import ChargerAuthenticator
from ocppgw.edge import ChargerFactory, accept_deflate, add_connection_upgrade, choose_subprotocol
from ocppgw.limits import Admission
from ocppgw.testing import basic_auth
from tests.support import InMemoryGateway

ENABLED = ("ocpp1.6", "ocpp2.0", "ocpp2.0.1", "ocpp2.1")


class ChooseSubprotocolTests(SynchronousTestCase):
    def test_charger_order(self):
        self.assertEqual(choose_subprotocol(["ocpp2.0.1", "ocpp1.6"], ENABLED), "ocpp2.0.1")

    def test_case_insensitive_own_spelling(self):
        """The charger's spelling comes back, for the 101 to echo."""
        self.assertEqual(choose_subprotocol(["OCPP1.6"], ENABLED), "OCPP1.6")
        self.assertEqual(choose_subprotocol([" Ocpp2.0.1 "], ENABLED), "Ocpp2.0.1")
        self.assertEqual(choose_subprotocol(["ocpp1.6"], ["OCPP1.6"]), "ocpp1.6")

    def test_soap_never(self):
        self.assertIsNone(choose_subprotocol(["OCPP1.5", "ocpp1.2"], ENABLED + ("ocpp1.5",)))

    def test_disabled_never(self):
        self.assertIsNone(choose_subprotocol(["OCPP2.1"], ["ocpp1.6"]))


def head(*lines: str) -> bytes:
    return ("\r\n".join(("GET /ocpp/CP1 HTTP/1.1",) + lines) + "\r\n\r\n").encode()


UPGRADE = ("Host: gw", "Upgrade: websocket", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
           "Sec-WebSocket-Version: 13")


class AddConnectionUpgradeTests(SynchronousTestCase):
    def test_missing_header_added(self):
        data = head(*UPGRADE) + b"\x81\x80rest"
        completed = add_connection_upgrade(data)
        self.assertEqual(completed, head(*UPGRADE, "Connection: Upgrade") + b"\x81\x80rest")

    def test_header_without_token_completed(self):
        completed = add_connection_upgrade(head(*UPGRADE, "Connection: keep-alive"))
        self.assertEqual(completed,
                         head(*UPGRADE, "Connection: keep-alive", "Connection: Upgrade"))

    def test_good_requests_untouched(self):
        for connection in ("Connection: Upgrade", "connection: keep-alive, upgrade",
                           "CONNECTION:UPGRADE", "Connection: upgrade , close"):
            self.assertIsNone(add_connection_upgrade(head(*UPGRADE, connection)), connection)

    def test_incomplete_request_waits(self):
        self.assertIsNone(add_connection_upgrade(b"GET /ocpp/CP1 HTTP/1.1\r\nHost: gw\r\n"))

    def test_not_a_websocket_upgrade_untouched(self):
        """Only a complete RFC 6455 upgrade is completed; autobahn answers the rest."""
        without = [line for line in UPGRADE]
        cases = {
            "plain GET": head("Host: gw"),
            "other upgrade": head(*[line.replace("websocket", "h2c") for line in without]),
            "no key": head(*[line for line in without if "Key" not in line]),
            "draft version": head(*[line.replace(": 13", ": 8") for line in without]),
            "no version": head(*[line for line in without if "Version" not in line]),
            "broken header block": head(*without, "bad header line"),
        }
        for why, data in cases.items():
            self.assertIsNone(add_connection_upgrade(data), why)


class AcceptDeflateTests(SynchronousTestCase):
    def test_small_windows_no_context(self):
        offer = PerMessageDeflateOffer.parse({"client_max_window_bits": [True]})
        accept = accept_deflate([offer])
        self.assertEqual(accept.get_extension_string(),
                         "permessage-deflate; client_max_window_bits=9")
        deflate = PerMessageDeflate.create_from_offer_accept(True, accept)
        self.assertEqual(
            (deflate.server_max_window_bits, deflate.client_max_window_bits,
             deflate.mem_level, deflate.server_no_context_takeover),
            (9, 9, 1, True),
        )

    def test_client_window_left_when_not_offered(self):
        accept = accept_deflate([PerMessageDeflateOffer.parse({})])
        self.assertEqual(accept.get_extension_string(), "permessage-deflate")
        deflate = PerMessageDeflate.create_from_offer_accept(True, accept)
        self.assertEqual((deflate.server_max_window_bits, deflate.client_max_window_bits),
                         (9, 15))

    def test_client_limits_respected(self):
        """A charger asking for a small server window or no context gets them."""
        offer = PerMessageDeflateOffer.parse(
            {"server_max_window_bits": ["10"], "server_no_context_takeover": [True]})
        accept = accept_deflate([offer])
        self.assertEqual(accept.get_extension_string(),
                         "permessage-deflate; server_no_context_takeover; "
                         "server_max_window_bits=10")

    def test_nothing_offered(self):
        self.assertIsNone(accept_deflate([]))


class _HandshakeTestCase(SynchronousTestCase):
    """
    A charger's opening handshake against a real L{ChargerFactory} and
    gateway, in memory (see L{InMemoryGateway}): the HTTP answer it gets.
    """

    factory_options: dict = {}

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.memory = InMemoryGateway(factory_options=self.make_factory_options(),
                                      clock=self.clock)
        self.bridge = self.memory.bridge

    def make_factory_options(self) -> dict:
        return dict(self.factory_options)

    def assertRefused(self, charger, status: int, reason: str):
        self.assertFalse(charger.opened)
        self.assertEqual(charger.http_status_line, f"HTTP/1.1 {status} {reason}")
        self.assertEqual(charger.code, 1006)

    def assertRetryAfter(self, charger, low: int = 1, high: int = 10):
        self.assertTrue(low <= int(charger.response_headers["retry-after"]) <= high,
                        charger.response_headers)


class RefusedBeforeTheUpgradeTests(_HandshakeTestCase):
    def test_bad_identity_400_never_reaches_the_broker(self):
        for identity in ("CP.1", "%23", "*", "a" * 49, "CP%0D%0A1"):
            charger = self.memory.connect(identity)
            self.assertRefused(charger, 400, "Bad charger identity")
        self.assertEqual(self.bridge.declared, [])

    def test_other_path_400(self):
        charger = self.memory.connect("CP1", path="/other/")
        self.assertRefused(charger, 400, "Bad charger identity")

    def test_unknown_subprotocol_400(self):
        for offer in (["ocpp9.9"], ["ocpp1.5", "ocpp1.2"]):
            charger = self.memory.connect("CP1", subprotocols=offer)
            self.assertRefused(charger, 400, "No supported OCPP subprotocol")

    def test_no_subprotocol_400(self):
        charger = self.memory.connect("CP1", subprotocols=[])
        self.assertRefused(charger, 400, "No OCPP subprotocol offered")

    def test_chargers_preference_and_spelling_win(self):
        charger = self.memory.connect("CP1", subprotocols=["OCPP2.0.1", "ocpp1.6"])
        self.assertTrue(charger.opened)
        self.assertEqual(charger.websocket_protocol_in_use, "OCPP2.0.1")
        self.assertEqual(self.bridge.published_to("ocppgw.connected")[0].frame["version"],
                         "ocpp2.0.1")

    def test_broker_down_503_with_retry_after(self):
        self.bridge.lose()
        charger = self.memory.connect("CP1")
        self.assertRefused(charger, 503, "Service Unavailable")
        self.assertRetryAfter(charger)

    def test_queue_refused_by_the_broker_500(self):
        self.bridge.hold("declare")
        charger = self.memory.connect("CP1")
        self.bridge.pending_of("declare")[0].fail(DeclareFailed("PRECONDITION_FAILED"))
        self.memory.flush()
        self.assertRefused(charger, 500, "Internal Server Error")
        self.assertNotIn("retry-after", charger.response_headers)

    def test_too_many_header_lines_431(self):
        headers = {f"X-Filler-{n}": "x" for n in range(100)}
        charger = self.memory.connect("CP1", headers=headers)
        self.assertRefused(charger, 431, "Request Header Fields Too Large")


class DefaultSubprotocolTests(_HandshakeTestCase):
    factory_options = {"default_subprotocol": "ocpp1.6"}

    def test_served_as_the_default_naming_none(self):
        charger = self.memory.connect("CP1", subprotocols=[])
        self.assertTrue(charger.opened)
        self.assertIsNone(charger.websocket_protocol_in_use)


class MaxConnectionsTests(_HandshakeTestCase):
    factory_options = {"max_connections": 1}

    def test_over_the_limit_503_with_retry_after(self):
        self.assertTrue(self.memory.connect("CP1").opened)
        charger = self.memory.connect("CP2")
        # autobahn's own refusal, with our Retry-After
        self.assertRefused(charger, 503, "maximum number of connections reached")
        self.assertRetryAfter(charger)


class AcceptRateTests(_HandshakeTestCase):
    def make_factory_options(self):
        admission = Admission(self.clock, rate=1, burst=1, random_int=lambda low, high: 7)
        return {"admission": admission}

    def test_storm_refused_503_with_the_admissions_retry_after(self):
        self.assertTrue(self.memory.connect("CP1").opened)
        charger = self.memory.connect("CP2")
        self.assertRefused(charger, 503, "Service Unavailable")
        self.assertEqual(charger.response_headers["retry-after"], "7")
        self.assertEqual(len(self.bridge.declared), 1)
        self.memory.advance(1)
        self.assertTrue(self.memory.connect("CP2").opened)


class _Checker:
    """Credentials for security profiles 1 and 2: CP1's password, or no answer."""

    hang = False

    def requestAvatarId(self, credentials):
        if self.hang:
            return defer.Deferred()
        if (credentials.username, credentials.password) == (b"CP1", b"secret"):
            return defer.succeed(credentials.username)
        return defer.fail(UnauthorizedLogin())


class BasicAuthTests(_HandshakeTestCase):
    def make_factory_options(self):
        self.checker = _Checker()
        authenticator = ChargerAuthenticator(self.clock, 1, self.checker,
                                             failure_delay=2.0, timeout=5.0)
        return {"authenticator": authenticator}

    def connect_as(self, identity, username, password):
        return self.memory.connect(identity, headers=basic_auth(username, password))

    def assertUnauthorizedAfterTheDelay(self, charger):
        self.assertFalse(charger.closed)
        self.memory.advance(1.9)
        self.assertFalse(charger.closed)
        self.memory.advance(0.2)
        self.assertRefused(charger, 401, "Unauthorized")
        self.assertEqual(charger.response_headers["www-authenticate"], 'Basic realm="OCPP"')
        self.assertEqual(self.bridge.declared, [])

    def test_right_password_accepted(self):
        self.assertTrue(self.connect_as("CP1", "CP1", "secret").opened)

    def test_wrong_password_401(self):
        self.assertUnauthorizedAfterTheDelay(self.connect_as("CP1", "CP1", "guess"))

    def test_username_not_the_identity_401(self):
        self.assertUnauthorizedAfterTheDelay(self.connect_as("CP2", "CP1", "secret"))

    def test_no_credentials_401(self):
        self.assertUnauthorizedAfterTheDelay(self.memory.connect("CP1"))

    def test_checker_without_answer_503(self):
        self.checker.hang = True
        charger = self.connect_as("CP1", "CP1", "secret")
        self.memory.advance(5.1)
        self.assertRefused(charger, 503, "Service Unavailable")
        self.assertRetryAfter(charger)


class AfterTheUpgradeTests(_HandshakeTestCase):
    factory_options = {"max_message_size": 1024}

    def test_binary_frame_closed_1003(self):
        charger = self.memory.connect("CP1")
        charger.sendMessage(b"\x00\x01", isBinary=True)
        self.memory.flush()
        self.assertEqual(charger.code, 1003)
        self.assertEqual(self.bridge.published_to("ocpp16.Heartbeat.req"), [])

    def test_oversized_message_closed_1009(self):
        charger = self.memory.connect("CP1")
        charger.send([2, "m1", "DataTransfer", {"vendorId": "v", "data": "x" * 2000}])
        self.memory.flush()
        self.assertEqual(charger.code, 1009)
        self.assertEqual(self.bridge.published_to("ocpp16.DataTransfer.req"), [])


class PausedPingTimeoutTests(SynchronousTestCase):
    """
    While reading is paused (flow control) a pong timeout does not drop
    the charger; it is re-armed when reading resumes.
    """

    def test_timeout_deferred_until_resume(self):
        clock = Clock()
        factory = ChargerFactory(hub=None, reactor=clock, ping_interval=10, ping_timeout=2)
        edge = factory.protocol()
        edge.factory = factory
        edge.transport = None
        dropped = []
        edge.dropConnection = lambda abort=False: dropped.append(abort)
        edge.autoPingPending = b"ping"
        edge.pause_reading()
        edge.onAutoPingTimeout()
        self.assertEqual(dropped, [])
        edge.resume_reading()
        clock.advance(1.9)
        self.assertEqual(dropped, [])
        clock.advance(0.5)
        self.assertEqual(dropped, [True])


class _Hub:
    def __init__(self):
        self.closed = []

    def charger_closed(self, edge, code, reason):
        self.closed.append(code)


class _StuckTransport(StringTransport):
    """A transport whose graceful close never completes (nothing is read)."""

    def __init__(self):
        super().__init__()
        self.aborted = False

    def abortConnection(self):
        self.aborted = True

    def unregisterProducer(self):
        self.producer = None


class CloseFallbackTests(unittest.SynchronousTestCase):
    """
    In memory: a graceful close the charger does not let go of is aborted
    after the close timeout, and not before.
    """

    def setUp(self):
        self.clock = Clock()
        self.factory = ChargerFactory(_Hub(), self.clock, close_timeout=5.0)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = _StuckTransport()
        self.protocol.makeConnection(self.transport)

    def test_abortAfterCloseTimeout(self):
        self.protocol.wasClean = True
        self.protocol.dropConnection(abort=True)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(4.9)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.4)
        self.assertTrue(self.transport.aborted)

    def test_noAbortOnceClosed(self):
        self.protocol.wasClean = True
        self.protocol.dropConnection(abort=True)
        self.protocol.connectionLost()
        self.clock.advance(10)
        self.assertFalse(self.transport.aborted)

    def test_uncleanDropAbortsAtOnce(self):
        """Anything else that aborts (a ping timeout) still does."""
        self.protocol.dropConnection(abort=True)
        self.assertTrue(self.transport.aborted)
