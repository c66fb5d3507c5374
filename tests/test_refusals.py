"""
Connections refused before the WebSocket handshake, over real sockets:
who may send a PROXY header, and that every refusal is counted by reason
and logged (rate-limited) with the peer -- nothing fails silently, and
nothing lets a client fill the log.
"""

from __future__ import annotations

import os
import ssl

from prometheus_client import generate_latest
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet import reactor
from twisted.logger import LogLevel, formatEvent

from tests import rawclient
from tests.certs import ThrowAwayPKI
from tests.support import GatewayTestCase, LogEvents, SilentClient, samples, value


class RefusalTestCase(GatewayTestCase):
    def setUp(self):
        self.log = LogEvents(self)
        return super().setUp()

    def refused(self, listener: str, reason: str) -> float:
        scraped = samples(generate_latest(self.gateway_service.metrics.registry))
        return value(scraped, "ocppgw_connections_refused_total", listener=listener,
                     reason=reason)

    def handshakes(self) -> float:
        scraped = samples(generate_latest(self.gateway_service.metrics.registry))
        return sum(v for (name, _labels), v in scraped.items()
                   if name == "ocppgw_handshakes_total")

    def assertLoggedOnceAtInfo(self, reason: str) -> dict:
        [event] = self.log.matching(event="refused", reason=reason)
        self.assertEqual(event["log_level"], LogLevel.info)
        return event

    @defer.inlineCallbacks
    def peer_through_proxy(self, source: str, header: bytes):
        """Connect from C{source} sending C{header}: the charger's peer."""
        identity = self.identity("PX")
        response = yield rawclient.handshake(
            self.port, f"/ocpp/{identity}", source=source, keep_open=True, proxy=header
        )
        self.addCleanup(response.close)
        self.assertEqual(response.status, 101)
        return self.gateway_service.gateway.chargers[identity].edge.peer

    def assertNoErrorsOrWarnings(self):
        loud = [formatEvent(e) for e in self.log.events
                if e.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)]
        self.assertEqual(loud, [])


class ProxyTrustTests(RefusalTestCase):
    """C{trusted_proxies} decides who may send a PROXY header."""

    settings = {"listener": {"proxy_protocol": "true", "trusted_proxies": "127.0.0.1"}}

    @defer.inlineCallbacks
    def test_untrustedSourceRefused(self):
        """
        A PROXY v2 header from 127.0.0.2 (not a trusted proxy) claiming
        203.0.113.7 is refused before it is read: no charger, no forged
        address anywhere, one refusal counted and logged with the real peer.
        """
        identity = self.identity("PXU")
        d = rawclient.handshake(self.port, f"/ocpp/{identity}", source="127.0.0.2",
                                proxy=rawclient.proxy_v2("203.0.113.7", 40123))
        yield self.assertFailure(d, ConnectionError, OSError)
        event = yield self.log.wait_for(event="refused", reason="proxy_untrusted")
        self.assertTrue(event["peer"].startswith("tcp4:127.0.0.2:"), event["peer"])
        self.assertEqual(event["listener"], "ws")
        self.assertLoggedOnceAtInfo("proxy_untrusted")
        self.assertEqual(self.refused("ws", "proxy_untrusted"), 1)
        self.assertNotIn(identity, self.gateway_service.gateway.chargers)
        self.assertFalse([e for e in self.log.events if "203.0.113.7" in formatEvent(e)])

    @defer.inlineCallbacks
    def test_trustedSourceBelieved(self):
        peer = yield self.peer_through_proxy("127.0.0.1", rawclient.proxy_v2("203.0.113.7", 40123))
        self.assertEqual(peer, "tcp4:203.0.113.7:40123")
        self.assertEqual(self.refused("ws", "proxy_untrusted"), 0)

    @defer.inlineCallbacks
    def test_bareConnectionCountedAndLogged(self):
        """
        A balancer without send-proxy: the request arrives without a
        header. Refused, counted and logged, with a hint at the cause.
        """
        before = self.handshakes()
        d = rawclient.handshake(self.port, f"/ocpp/{self.identity('PXB')}")
        yield self.assertFailure(d, ConnectionError, OSError)
        event = yield self.log.wait_for(event="refused", reason="proxy_header_missing")
        self.assertTrue(event["peer"].startswith("tcp4:127.0.0.1:"), event["peer"])
        self.assertIn("no PROXY protocol header", formatEvent(event))
        self.assertLoggedOnceAtInfo("proxy_header_missing")
        self.assertEqual(self.refused("ws", "proxy_header_missing"), 1)
        self.assertEqual(self.handshakes(), before)
        self.assertNoErrorsOrWarnings()

    @defer.inlineCallbacks
    def test_invalidHeader(self):
        bad = rawclient.V2_SIGNATURE + bytes([0x2F, 0x11, 0, 12]) + bytes(12)
        d = rawclient.handshake(self.port, f"/ocpp/{self.identity('PXI')}", proxy=bad)
        yield self.assertFailure(d, ConnectionError, OSError)
        event = yield self.log.wait_for(event="refused", reason="proxy_header_invalid")
        self.assertIn("unknown version or command", formatEvent(event))
        self.assertEqual(self.refused("ws", "proxy_header_invalid"), 1)

    @defer.inlineCallbacks
    def test_localHeaderKeepsConnectionAddress(self):
        """A v2 LOCAL header (no client address) leaves the TCP peer."""
        identity = self.identity("PXL")
        response = yield rawclient.handshake(
            self.port, f"/ocpp/{identity}", proxy=rawclient.proxy_v2_local(), keep_open=True
        )
        self.addCleanup(response.close)
        self.assertEqual(response.status, 101)
        host, port = response.sock.getsockname()
        self.assertEqual(self.gateway_service.gateway.chargers[identity].edge.peer,
                         f"tcp4:{host}:{port}")


class DefaultTrustTests(RefusalTestCase):
    """With proxy_protocol on and trusted_proxies left alone: loopback only."""

    settings = {"listener": {"proxy_protocol": "true"}}

    @defer.inlineCallbacks
    def test_anyLoopbackAddressTrusted(self):
        peer = yield self.peer_through_proxy("127.0.0.2", rawclient.proxy_v1("198.51.100.4", 50001))
        self.assertEqual(peer, "tcp4:198.51.100.4:50001")


class RateLimitedLogTests(RefusalTestCase):
    """A stream of refusals is counted in full and logged in part."""

    settings = {"listener": {"proxy_protocol": "true"}}

    @defer.inlineCallbacks
    def test_burstThenSummary(self):
        for _ in range(15):
            d = rawclient.handshake(self.port, "/ocpp/CP1")
            yield self.assertFailure(d, ConnectionError, OSError)
        # each was refused (counted, logged) before its socket was closed
        self.assertEqual(self.refused("ws", "proxy_header_missing"), 15)
        lines = self.log.matching(event="refused", reason="proxy_header_missing")
        self.assertEqual(len(lines), 10)
        yield self.gateway_service.stopService()
        [summary] = [e for e in self.log.matching(event="refused") if "suppressed" in e]
        self.assertEqual(summary["suppressed"], 5)
        self.assertEqual(summary["reason"], "proxy_header_missing")
        self.assertIn("5 more like this", formatEvent(summary))


class TlsRefusalTests(RefusalTestCase):
    """A refused TLS handshake: one info line with peer and OpenSSL's reason."""

    def setUp(self):
        pki = ThrowAwayPKI(os.path.abspath(self.mktemp()))
        self.cafile = pki.cafile
        server = pki.issue("localhost", server=True, kind="ec")
        self.settings = {
            "listener": {"tcp.enabled": "false", "ssl.enabled": "true", "ssl.port": "0",
                         "ssl.profile": "0", "ssl.certfile": server.certfile,
                         "ssl.keyfile": server.keyfile},
        }
        return super().setUp()

    @defer.inlineCallbacks
    def test_noSharedCipher(self):
        context = rawclient.client_context(
            self.cafile, maximum=ssl.TLSVersion.TLSv1_2,
            ciphers="ECDHE-ECDSA-CHACHA20-POLY1305",
        )
        d = rawclient.handshake(self.port, "/ocpp/CP1", context=context)
        yield self.assertFailure(d, ssl.SSLError, ConnectionError, OSError)
        event = yield self.log.wait_for(event="refused", reason="tls_handshake")
        self.assertLoggedOnceAtInfo("tls_handshake")
        self.assertTrue(event["peer"].startswith("tcp4:127.0.0.1:"), event["peer"])
        self.assertEqual(event["tls_reason"], "no shared cipher")
        self.assertEqual(event["listener"], "wss")
        self.assertIn("no shared cipher", formatEvent(event))
        # autobahn's own "SSL error: no shared cipher (in )" at error level
        # is gone; nothing else is louder than info
        self.assertFalse([e for e in self.log.events if "SSL error" in formatEvent(e)])
        self.assertNoErrorsOrWarnings()
        self.assertEqual(self.refused("wss", "tls_handshake"), 1)
        scraped = samples(generate_latest(self.gateway_service.metrics.registry))
        self.assertEqual(
            value(scraped, "ocppgw_tls_handshake_failures_total", listener="wss",
                  reason="no shared cipher"),
            1,
        )


class HandshakeTimeoutRefusalTests(RefusalTestCase):
    settings = {"websocket": {"handshake_timeout": "0.5"}}

    @defer.inlineCallbacks
    def test_silentClient(self):
        protocol = SilentClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), protocol)
        yield protocol.lost
        event = yield self.log.wait_for(event="refused", reason="handshake_timeout")
        self.assertIn("0.5 s", formatEvent(event))
        self.assertLoggedOnceAtInfo("handshake_timeout")
        self.assertEqual(self.refused("ws", "handshake_timeout"), 1)
        # autobahn's "dropping connection to peer ..." warning is gone
        self.assertNoErrorsOrWarnings()


class HeaderLimitRefusalTests(RefusalTestCase):
    @defer.inlineCallbacks
    def test_tooManyHeaders(self):
        response = yield rawclient.handshake(
            self.port, f"/ocpp/{self.identity('H')}",
            headers={f"X-H{i}": "v" for i in range(120)},
        )
        self.assertEqual(response.status, 431)
        event = yield self.log.wait_for(event="refused", reason="too_many_headers")
        self.assertEqual(event["status"], 431)
        self.assertLoggedOnceAtInfo("too_many_headers")
        self.assertEqual(self.refused("ws", "too_many_headers"), 1)
        # the refusal is one line: autobahn's own info line is not added
        self.assertFalse([e for e in self.log.events
                          if "failing WebSocket opening handshake" in formatEvent(e)])
