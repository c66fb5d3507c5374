"""
Field compatibility on the TLS listener: old TLS stacks (TLS 1.0/1.1 with
the suites they have) when C{ssl.min_version} allows them, and the whole
certificate chain sent for chargers that trust only a root. Real TLS
sockets (Python's C{ssl}, pinned to a version) against a running gateway
with the real broker behind it.
"""

from __future__ import annotations

import os
import ssl
import warnings

from twisted.internet import defer, threads
from twisted.logger import LogLevel

from tests import rawclient
from tests.support import SERVER_NAME, LogCapture, SecurityTestCase, add_password


def pinned_context(cafile: str, version: ssl.TLSVersion) -> ssl.SSLContext:
    """
    A client that speaks only C{version}, with what an old TLS stack has
    (OpenSSL 3 needs security level 0 even to offer TLS 1.0 and 1.1).
    """
    with warnings.catch_warnings():
        # ssl.TLSVersion.TLSv1 and TLSv1_1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context = rawclient.client_context(cafile, maximum=version, ciphers="DEFAULT:@SECLEVEL=0")
        context.minimum_version = version
    return context


class LegacyTlsTests(SecurityTestCase):
    """
    C{ssl.min_version = TLSv1} with C{ssl.ciphers = DEFAULT} (EVBox EV7;
    lbbrhzn/ocpp#1432), security profile 2.
    """

    @defer.inlineCallbacks
    def setUp(self):
        # the warning is logged while the gateway starts
        self.logs = LogCapture(self)
        yield super().setUp()

    def security_settings(self):
        self.passwords = os.path.join(self.directory, "passwords")
        self.charger_id = self.identity("LT")
        add_password(self.passwords, self.charger_id, b"old-stack-password")
        server = self.pki.issue(SERVER_NAME, server=True, kind="rsa")
        return {
            "listener": {
                "tcp.enabled": "false", "ssl.enabled": "true", "ssl.port": "0",
                "ssl.profile": "2", "ssl.certfile": server.certfile,
                "ssl.keyfile": server.keyfile,
                "ssl.min_version": "TLSv1", "ssl.ciphers": "DEFAULT",
            },
            "auth": {"password_file": self.passwords, "failure_delay": "0"},
        }

    @defer.inlineCallbacks
    def connect(self, version, password=b"old-stack-password", identity=None):
        identity = identity or self.charger_id
        response = yield rawclient.handshake(
            self.port_of("ssl"), self.path(identity),
            headers=rawclient.basic(self.charger_id, password),
            context=pinned_context(self.pki.cafile, version), keep_open=True,
        )
        self.addCleanup(response.close)
        return response

    @defer.inlineCallbacks
    def test_tls10(self):
        response = yield self.connect(ssl.TLSVersion.TLSv1)
        self.assertEqual(response.sock.version(), "TLSv1")
        self.assertEqual(response.status, 101)
        self.assertIn(self.charger_id, self.gateway_service.gateway.chargers)
        pong = yield threads.deferToThread(response.ping, b"old")
        self.assertEqual(pong, b"old")

    @defer.inlineCallbacks
    def test_tls11(self):
        response = yield self.connect(ssl.TLSVersion.TLSv1_1)
        self.assertEqual(response.sock.version(), "TLSv1.1")
        self.assertEqual(response.status, 101)

    @defer.inlineCallbacks
    def test_modern_clients_unaffected(self):
        response = yield rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id),
            headers=rawclient.basic(self.charger_id, "old-stack-password"),
            context=rawclient.client_context(self.pki.cafile),
        )
        self.assertEqual(response.cipher[1], "TLSv1.3")
        self.assertEqual(response.status, 101)

    @defer.inlineCallbacks
    def test_still_authenticates(self):
        """Old TLS lets no charger in without its own password."""
        response = yield self.connect(ssl.TLSVersion.TLSv1, password=b"wrong")
        self.assertEqual(response.status, 401)
        other = self.identity("LTo")
        response = yield self.connect(ssl.TLSVersion.TLSv1, identity=other)
        self.assertEqual(response.status, 401)
        self.assertNotIn(other, self.gateway_service.gateway.chargers)

    def test_warning_at_start(self):
        [warning] = [e for e in self.logs.events
                     if e.get("log_level") == LogLevel.warn and "ciphers" in e
                     and e.get("version") == "TLSv1"]
        self.assertIn("broken", warning["log_format"])
        self.assertEqual(warning["ciphers"], "DEFAULT")


class ChainTests(SecurityTestCase):
    """
    A server certificate from an intermediate CA, with the charger trusting
    only the root: the gateway sends the chain from C{ssl.certfile}, and the
    default C{ssl.min_version} refuses TLS 1.0.
    """

    def security_settings(self):
        self.intermediate = self.pki.intermediate()
        self.server = self.intermediate.issue(SERVER_NAME, server=True, kind="ec")
        self.chain = os.path.join(self.directory, "fullchain.pem")
        self.write_certfile(with_intermediate=True)
        self.charger_id = self.identity("CH")
        return {
            "listener": {
                "tcp.enabled": "false", "ssl.enabled": "true", "ssl.port": "0",
                "ssl.profile": "0", "ssl.certfile": self.chain,
                "ssl.keyfile": self.server.keyfile,
            },
        }

    def write_certfile(self, with_intermediate: bool) -> None:
        """The server certificate, then (or not) the intermediate's."""
        with open(self.chain, "w") as out:
            out.write(open(self.server.certfile).read())
            if with_intermediate:
                out.write(open(self.intermediate.cafile).read())

    def handshake(self, context=None):
        return rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id),
            context=context or rawclient.client_context(self.pki.cafile),
        )

    @defer.inlineCallbacks
    def test_chain_sent(self):
        response = yield self.handshake()
        self.assertEqual(response.status, 101)

    @defer.inlineCallbacks
    def test_without_intermediate_the_charger_refuses(self):
        """
        The control: a certfile without the intermediate leaves a charger
        that trusts only the root unable to verify the gateway.
        """
        self.write_certfile(with_intermediate=False)
        self.assertTrue(self.gateway_service.security.tls.reload())
        failure = yield self.assertFailure(self.handshake(), ssl.SSLCertVerificationError)
        self.assertIn("unable to get local issuer certificate", str(failure))

    @defer.inlineCallbacks
    def test_tls10_refused_by_default(self):
        d = self.handshake(pinned_context(self.pki.cafile, ssl.TLSVersion.TLSv1))
        yield self.assertFailure(d, ssl.SSLError)
        self.assertNotIn(self.charger_id, self.gateway_service.gateway.chargers)
