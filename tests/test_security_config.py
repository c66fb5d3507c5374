"""
Safe defaults and the security keys of the configuration; the
C{ocppgw passwd} command; handshake hardening.
"""

from __future__ import annotations

import configparser
import io
import os
import sys
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from ocppgw import auth, cli, config
from ocppgw.config import ConfigError
from tests import rawclient
from tests.certs import ThrowAwayPKI
from tests.support import GatewayTestCase

ROOT = Path(__file__).resolve().parent.parent


class SafeDefaultsTests(SynchronousTestCase):
    def test_shippedFileIsLoopbackWithoutAuth(self):
        """`make run` keeps working: plain ws on loopback, no authentication."""
        settings = config.load(ROOT / "etc" / "ocppgw.ini")
        listener = settings.listener
        self.assertEqual((listener.tcp_enabled, listener.tcp_ip, listener.tcp_profile),
                         (True, "127.0.0.1", 0))
        self.assertFalse(listener.ssl_enabled)
        self.assertFalse(listener.allow_anonymous)

    def test_anonymousOnPublicAddressRefused(self):
        for host in ("0.0.0.0", "::", "10.0.0.7", "gw.example.com"):
            error = self.assertRaises(
                ConfigError, config.settings_from_dict, {"listener": {"tcp.ip": host}}
            )
            self.assertEqual(len(error.problems), 1)
            self.assertTrue(error.problems[0].startswith(
                f"listener.tcp.profile: 0 (no authentication) on {host}, which is not a "
                "loopback address"), error.problems[0])
            self.assertIn("allow_anonymous = true", error.problems[0])

    def test_anonymousOnLoopbackAllowed(self):
        for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
            config.settings_from_dict({"listener": {"tcp.ip": host}})

    def test_allowAnonymous(self):
        settings = config.settings_from_dict(
            {"listener": {"tcp.ip": "0.0.0.0", "allow_anonymous": "true"}}
        )
        self.assertTrue(settings.listener.allow_anonymous)

    def test_profile1NeedsPasswordFile(self):
        error = self.assertRaises(ConfigError, config.settings_from_dict,
                                  {"listener": {"tcp.profile": "1"}})
        self.assertEqual(error.problems, (
            "auth.password_file: profiles 1 and 2 with checker = file need a password file "
            "(see `ocppgw passwd`)",))

    def test_httpCheckerNeedsUrl(self):
        error = self.assertRaises(ConfigError, config.settings_from_dict,
                                  {"listener": {"tcp.profile": "1"}, "auth": {"checker": "http"}})
        self.assertEqual(error.problems,
                         ("auth.http.url: checker = http needs the URL to POST to",))

    def test_tlsListenerNeedsCertificate(self):
        error = self.assertRaises(ConfigError, config.settings_from_dict, {
            "listener": {"ssl.enabled": "true", "ssl.profile": "0"}})
        self.assertEqual(error.problems, (
            "listener.ssl.certfile: the TLS listener needs ssl.certfile and ssl.keyfile",))

    def test_profile3NeedsCaAndVerifyPeer(self):
        a_file = str(ROOT / "setup.cfg")
        base = {"ssl.enabled": "true", "ssl.profile": "3", "ssl.certfile": a_file,
                "ssl.keyfile": a_file}
        error = self.assertRaises(ConfigError, config.settings_from_dict, {"listener": base})
        self.assertEqual(error.problems, (
            "listener.ssl.cacertfile: verifying client certificates needs the CA bundle "
            "that issued them",))
        error = self.assertRaises(ConfigError, config.settings_from_dict, {"listener": {
            **base, "ssl.cacertfile": a_file, "ssl.verify": "verify_none"}})
        self.assertEqual(error.problems, (
            "listener.ssl.verify: profile 3 needs verify_peer (client certificates)",))

    def test_missingFile(self):
        error = self.assertRaises(ConfigError, config.settings_from_dict,
                                  {"auth": {"password_file": "/nonexistent/passwords"}})
        self.assertEqual(error.problems, (
            "auth.password_file: /nonexistent/passwords is not a readable file",))

    def test_noListener(self):
        error = self.assertRaises(ConfigError, config.settings_from_dict,
                                  {"listener": {"tcp.enabled": "false"}})
        self.assertIn("no listener is enabled", error.problems[0])

    def test_trustedProxiesDefaultLoopback(self):
        settings = config.settings_from_dict({"listener": {"proxy_protocol": "true"}})
        self.assertEqual(settings.listener.trusted_proxies, ("127.0.0.0/8", "::1"))

    def test_proxyProtocolNeedsTrustedProxies(self):
        error = self.assertRaises(ConfigError, config.settings_from_dict, {
            "listener": {"proxy_protocol": "true", "trusted_proxies": ""}})
        self.assertEqual(len(error.problems), 1)
        self.assertTrue(error.problems[0].startswith(
            "listener.trusted_proxies: empty, so with proxy_protocol = true every "
            "connection would be refused"), error.problems[0])

    def test_profiles(self):
        self.assertRaises(ConfigError, config.settings_from_dict,
                          {"listener": {"tcp.profile": "2"}})
        self.assertRaises(ConfigError, config.settings_from_dict,
                          {"listener": {"ssl.profile": "1"}})

    def test_authUrlPasswordNotInRepr(self):
        settings = config.settings_from_dict({"auth": {"amqp.url": "amqp://u:s3cret@h/"}})
        self.assertNotIn("s3cret", repr(settings))


class PasswdCommandTests(SynchronousTestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())

    def run_passwd(self, *arguments, stdin: bytes = b""):
        streams = sys.stdin, sys.stdout, sys.stderr
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        try:
            code = cli.main(["passwd", self.path, *arguments])
            return code, sys.stdout.getvalue(), sys.stderr.getvalue()
        finally:
            sys.stdin, sys.stdout, sys.stderr = streams

    def entries(self):
        with open(self.path) as file:
            return auth.parse_password_file(file.read())

    def test_addChangeRemove(self):
        self.assertEqual(self.run_passwd("RDAM|1", "--stdin", stdin=b"first\n")[:2],
                         (0, "RDAM|1 added\n"))
        first = self.entries()["RDAM|1"]
        self.assertTrue(auth.verify_password(b"first", first))
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(self.run_passwd("RDAM|1", "--stdin", stdin=b"second\n")[:2],
                         (0, "RDAM|1 changed\n"))
        self.assertTrue(auth.verify_password(b"second", self.entries()["RDAM|1"]))
        self.run_passwd("CP2", "--stdin", stdin=b"x\n")
        self.assertEqual(self.run_passwd("RDAM|1", "--delete")[:2], (0, "RDAM|1 removed\n"))
        self.assertEqual(list(self.entries()), ["CP2"])
        code, _, err = self.run_passwd("RDAM|1", "--delete")
        self.assertEqual(code, 1)
        self.assertIn("not in", err)

    def test_hexAuthorizationKey(self):
        key = "00ff" * 10
        self.run_passwd("CP16", "--stdin", "--hex", stdin=key.encode() + b"\n")
        self.assertTrue(auth.verify_password(bytes.fromhex(key), self.entries()["CP16"]))
        with self.assertRaises(SystemExit):
            self.run_passwd("CP16", "--stdin", "--hex", stdin=b"xyz\n")

    def test_badIdentity(self):
        code, _, err = self.run_passwd("A.B", "--stdin", stdin=b"x\n")
        self.assertEqual(code, 2)
        self.assertIn("'.'", err)
        self.assertFalse(os.path.exists(self.path))

    def test_consoleScript(self):
        """`ocppgw` is installed as a console script running the CLI."""
        setup = configparser.ConfigParser()
        setup.read(ROOT / "setup.cfg")
        scripts = setup["options.entry_points"]["console_scripts"]
        self.assertIn("ocppgw = ocppgw.cli:main", scripts)


def _stream_headers(port: int, limit: int) -> int:
    """Send header lines until the server cuts us off; bytes sent."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sent = 0
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    try:
        sock.sendall(b"GET /ocpp/CP1 HTTP/1.1\r\nHost: x\r\n")
        while sent < limit:
            sock.sendall(line)
            sent += len(line)
    except OSError:
        pass
    finally:
        sock.close()
    return sent


class _Silent(Protocol):
    def __init__(self):
        self.lost = defer.Deferred()
        self.received = b""

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(self.received)


class HardeningTests(GatewayTestCase):
    settings = {"websocket": {"handshake_timeout": "0.5"}}

    @defer.inlineCallbacks
    def test_endlessRequestCut(self):
        """
        A client streaming request headers without end is cut off instead
        of being buffered (autobahn alone has no limit).
        """
        sent = yield threads.deferToThread(_stream_headers, self.port, 8 * 1024 * 1024)
        self.assertLess(sent, 8 * 1024 * 1024)

    @defer.inlineCallbacks
    def test_tooManyHeadersRefused(self):
        identity = self.identity("H")
        response = yield rawclient.handshake(
            self.port, f"/ocpp/{identity}", headers={f"X-H{i}": "v" for i in range(120)}
        )
        self.assertEqual(response.status, 431)
        self.assertNotIn("server", response.headers)

    @defer.inlineCallbacks
    def test_silentClientDropped(self):
        """A client that never sends its request is dropped after handshake_timeout."""
        protocol = _Silent()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), protocol)
        start = reactor.seconds()
        received = yield protocol.lost
        self.assertEqual(received, b"")
        self.assertGreaterEqual(reactor.seconds() - start, 0.4)


class TlsHandshakeTimeoutTests(GatewayTestCase):
    """A client that opens TCP to the TLS port and never says hello is dropped."""

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        pki = ThrowAwayPKI(directory)
        server = pki.issue("localhost", server=True, kind="ec")
        self.settings = {
            "listener": {"tcp.enabled": "false", "ssl.enabled": "true", "ssl.port": "0",
                         "ssl.profile": "0", "ssl.certfile": server.certfile,
                         "ssl.keyfile": server.keyfile},
            "websocket": {"handshake_timeout": "0.5"},
        }
        return super().setUp()

    @defer.inlineCallbacks
    def test_silentTlsClientDropped(self):
        protocol = _Silent()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), protocol)
        timeout = reactor.callLater(10, protocol.transport.abortConnection)
        yield protocol.lost
        self.assertTrue(timeout.active(), "not dropped by the gateway")
        timeout.cancel()
