"""
Security profiles 1-3 end to end: a real gateway, real TLS sockets,
certificates from a throw-away CA made by the tests.
"""

from __future__ import annotations

import os
import signal
import ssl
from urllib.parse import quote

from autobahn.twisted import websocket as autobahn_twisted
from twisted.internet import defer, reactor, threads

from ocppgw.testing import FakeCharger, basic_auth
from tests import rawclient
from tests.certs import ThrowAwayPKI
from tests.support import SERVER_NAME, SecurityTestCase, add_password


# -- profile 1 ---------------------------------------------------------------


class Profile1Tests(SecurityTestCase):
    """Basic auth over ws:// with a password file."""

    def security_settings(self):
        self.passwords = os.path.join(self.directory, "passwords")
        self.identity16 = self.identity("P1")
        self.identity201 = self.identity("P1x")
        # An OCPP 1.6 AuthorizationKey: 20 raw bytes, not valid UTF-8.
        self.key16 = bytes.fromhex("ff00" * 10)
        add_password(self.passwords, self.identity16, self.key16, hex_=True)
        add_password(self.passwords, self.identity201, "pässwörd-2.0.1".encode())
        return {
            "listener": {"tcp.profile": "1"},
            "auth": {"password_file": self.passwords, "failure_delay": "0.2"},
        }

    @defer.inlineCallbacks
    def test_accepted16RawBytes(self):
        """An OCPP 1.6 charger sends the raw AuthorizationKey bytes."""
        charger = yield FakeCharger.connect(
            reactor, self.url(self.identity16), ["ocpp1.6"],
            headers=basic_auth(self.identity16, self.key16),
        )
        self.addCleanup(self._close_charger, charger)
        self.assertEqual(charger.subprotocol, "ocpp1.6")
        self.assertIn(self.identity16, self.gateway_service.gateway.chargers)

    @defer.inlineCallbacks
    def test_accepted201Utf8(self):
        charger = yield FakeCharger.connect(
            reactor, self.url(self.identity201), ["ocpp2.0.1"],
            headers=basic_auth(self.identity201, "pässwörd-2.0.1"),
        )
        self.addCleanup(self._close_charger, charger)
        self.assertEqual(charger.subprotocol, "ocpp2.0.1")

    @defer.inlineCallbacks
    def test_wrongPassword401(self):
        response = yield rawclient.handshake(
            self.port, self.path(self.identity16),
            headers=rawclient.basic(self.identity16, b"wrong"),
        )
        self.assertEqual(response.status, 401)
        self.assertEqual(response.headers["www-authenticate"], 'Basic realm="OCPP"')
        self.assertNotIn(self.identity16, self.gateway_service.gateway.chargers)

    @defer.inlineCallbacks
    def test_usernameNotIdentity401(self):
        """Valid credentials of one charger do not open another's identity."""
        other = self.identity("P1o")
        response = yield rawclient.handshake(
            self.port, self.path(other),
            headers=rawclient.basic(self.identity16, self.key16),
        )
        self.assertEqual(response.status, 401)
        self.assertEqual(response.headers["www-authenticate"], 'Basic realm="OCPP"')

    @defer.inlineCallbacks
    def test_noCredentials401(self):
        response = yield rawclient.handshake(self.port, self.path(self.identity16))
        self.assertEqual(response.status, 401)
        self.assertEqual(response.headers["www-authenticate"], 'Basic realm="OCPP"')

    @defer.inlineCallbacks
    def test_failureDelayed(self):
        """A refused login is answered after failure_delay, not at once."""
        start = reactor.seconds()
        response = yield rawclient.handshake(
            self.port, self.path(self.identity16),
            headers=rawclient.basic(self.identity16, b"wrong"),
        )
        self.assertEqual(response.status, 401)
        self.assertGreaterEqual(reactor.seconds() - start, 0.2)

    @defer.inlineCallbacks
    def test_passwordFileChangePickedUp(self):
        """A charger added with `ocppgw passwd` connects without a restart."""
        newcomer = self.identity("P1n")
        refused = yield rawclient.handshake(
            self.port, self.path(newcomer), headers=rawclient.basic(newcomer, "s3cret-pw")
        )
        self.assertEqual(refused.status, 401)
        add_password(self.passwords, newcomer, b"s3cret-pw")
        charger = yield FakeCharger.connect(
            reactor, self.url(newcomer), ["ocpp1.6"], headers=basic_auth(newcomer, "s3cret-pw")
        )
        self.addCleanup(self._close_charger, charger)
        self.assertIn(newcomer, self.gateway_service.gateway.chargers)

    @defer.inlineCallbacks
    def test_2xNonUtf8Password401(self):
        """OCPP 2.x passwords are UTF-8 text; raw bytes are refused."""
        response = yield rawclient.handshake(
            self.port, self.path(self.identity16), subprotocol="ocpp2.0.1",
            headers=rawclient.basic(self.identity16, self.key16),
        )
        self.assertEqual(response.status, 401)


# -- profile 2 ---------------------------------------------------------------


class Profile2Tests(SecurityTestCase):
    """TLS (RSA and ECDSA certificates, encrypted key) + Basic auth."""

    def security_settings(self):
        self.passwords = os.path.join(self.directory, "passwords")
        self.charger_id = self.identity("P2")
        add_password(self.passwords, self.charger_id, b"profile-2-password")
        password_file = os.path.join(self.directory, "key-password")
        with open(password_file, "wb") as file:
            file.write(b"key password\n")
        rsa = self.pki.issue(SERVER_NAME, server=True, kind="rsa", password=b"key password")
        ecdsa = self.pki.issue(SERVER_NAME, server=True, kind="ec")
        return {
            "listener": {
                "tcp.enabled": "false",
                "ssl.enabled": "true",
                "ssl.port": "0",
                "ssl.profile": "2",
                "ssl.certfile": rsa.certfile,
                "ssl.keyfile": rsa.keyfile,
                "ssl.password_file": password_file,
                "ssl.alt_certfile": ecdsa.certfile,
                "ssl.alt_keyfile": ecdsa.keyfile,
            },
            "auth": {"password_file": self.passwords, "failure_delay": "0"},
        }

    @defer.inlineCallbacks
    def test_accepted(self):
        charger = yield self.connect_wss(
            self.charger_id, headers=basic_auth(self.charger_id, "profile-2-password")
        )
        self.assertIn(self.charger_id, self.gateway_service.gateway.chargers)
        self.assertEqual(charger.subprotocol, "ocpp1.6")

    @defer.inlineCallbacks
    def test_wrongPassword401(self):
        response = yield rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id),
            headers=rawclient.basic(self.charger_id, "nope"),
            context=rawclient.client_context(self.pki.cafile),
        )
        self.assertEqual(response.status, 401)
        self.assertEqual(response.headers["www-authenticate"], 'Basic realm="OCPP"')

    @defer.inlineCallbacks
    def test_profileMismatchPlainClient(self):
        """A profile 1 charger (no TLS) on the profile 2 listener gets nowhere."""
        d = rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id),
            headers=rawclient.basic(self.charger_id, "profile-2-password"),
        )
        yield self.assertFailure(d, ConnectionError, OSError)
        self.assertNotIn(self.charger_id, self.gateway_service.gateway.chargers)

    @defer.inlineCallbacks
    def test_tls11Refused(self):
        context = rawclient.client_context(
            self.pki.cafile, maximum=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0"
        )
        context.minimum_version = ssl.TLSVersion.TLSv1
        d = rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id),
            headers=rawclient.basic(self.charger_id, "profile-2-password"), context=context,
        )
        yield self.assertFailure(d, ssl.SSLError)

    @defer.inlineCallbacks
    def test_requiredCipherSuites(self):
        """Each suite OCPP 2.0.1 requires of a CSMS is negotiated over TLS 1.2."""
        for suite in (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "AES128-GCM-SHA256",
            "AES256-GCM-SHA384",
        ):
            context = rawclient.client_context(
                self.pki.cafile, maximum=ssl.TLSVersion.TLSv1_2, ciphers=suite
            )
            response = yield rawclient.handshake(
                self.port_of("ssl"), self.path(self.charger_id),
                headers=rawclient.basic(self.charger_id, "profile-2-password"),
                context=context,
            )
            self.assertEqual(response.cipher[0], suite)
            self.assertEqual(response.cipher[1], "TLSv1.2")
            self.assertEqual(response.status, 101, suite)

    @defer.inlineCallbacks
    def test_tls13(self):
        context = rawclient.client_context(self.pki.cafile)
        response = yield rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id),
            headers=rawclient.basic(self.charger_id, "profile-2-password"), context=context,
        )
        self.assertEqual(response.cipher[1], "TLSv1.3")
        self.assertEqual(response.status, 101)


# -- profile 3 ---------------------------------------------------------------


class Profile3Tests(SecurityTestCase):
    """Client certificates, verified and bound to the identity."""

    def security_settings(self):
        self.charger_id = self.identity("P3")
        self.other_id = self.identity("P3o")
        self.server = self.pki.issue(SERVER_NAME, server=True, kind="ec", name="server")
        self.mine = self.pki.issue(self.charger_id)
        self.others = self.pki.issue(self.other_id)
        self.expired = self.pki.issue(self.charger_id, expired=True)
        self.revoked = self.pki.issue(self.charger_id)
        self.pki.revoke(self.revoked)
        self.crlfile = self.pki.write_crl()
        self.stranger_pki = ThrowAwayPKI(os.path.join(self.directory, "other"), "Other CA")
        self.foreign = self.stranger_pki.issue(self.charger_id)
        # Basic credentials for the charger too, to show they do not help.
        self.passwords = os.path.join(self.directory, "passwords")
        add_password(self.passwords, self.other_id, b"other-password")
        return {
            "listener": {
                "tcp.enabled": "false",
                "ssl.enabled": "true",
                "ssl.port": "0",
                "ssl.profile": "3",
                "ssl.certfile": self.server.certfile,
                "ssl.keyfile": self.server.keyfile,
                "ssl.cacertfile": self.pki.cafile,
                "ssl.crlfile": self.crlfile,
            },
            "auth": {"password_file": self.passwords, "failure_delay": "0"},
        }

    def context(self, issued):
        return rawclient.client_context(
            self.pki.cafile, certfile=issued.certfile if issued else None,
            keyfile=issued.keyfile if issued else None,
        )

    @defer.inlineCallbacks
    def refused_in_tls(self, issued):
        # TLS 1.3 sends the server's verdict on the client certificate
        # after the client's handshake completes: it shows up on the
        # first read (as an alert or a closed connection).
        d = rawclient.handshake(self.port_of("ssl"), self.path(self.charger_id),
                                context=self.context(issued))
        failure = yield self.assertFailure(d, ssl.SSLError, ConnectionError, OSError)
        self.assertNotIn(self.charger_id, self.gateway_service.gateway.chargers)
        return failure

    @defer.inlineCallbacks
    def test_accepted(self):
        charger = yield self.connect_wss(self.charger_id, self.mine)
        self.assertEqual(charger.subprotocol, "ocpp1.6")
        self.assertIn(self.charger_id, self.gateway_service.gateway.chargers)

    @defer.inlineCallbacks
    def test_certificateReadOnceAtTheHandshake(self):
        """
        The charger's certificate is checked at the handshake; autobahn
        does not parse it (nor the TLS channel binding) again when the
        connection opens.
        """
        certificates_read, bindings_read = [], []
        self.patch(autobahn_twisted, "extract_peer_certificate", certificates_read.append)
        self.patch(autobahn_twisted, "transport_channel_id",
                   lambda transport, is_server, kind: bindings_read.append(is_server))
        charger = yield self.connect_wss(self.charger_id, self.mine)
        self.assertEqual(charger.subprotocol, "ocpp1.6")
        edge = self.gateway_service.gateway.chargers[self.charger_id].edge
        # the test's own (autobahn) client still reads them: the patches hold
        self.assertEqual(bindings_read, [False])
        self.assertEqual(len(certificates_read), 1)
        self.assertIsNot(certificates_read[0], edge.transport)

    @defer.inlineCallbacks
    def test_otherChargersCertificate403(self):
        """
        A valid certificate of another charger is refused, even with that
        other charger's valid Basic credentials.
        """
        response = yield rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id), context=self.context(self.others),
            headers=rawclient.basic(self.charger_id, "other-password"),
        )
        self.assertEqual(response.status, 403)
        self.assertNotIn("www-authenticate", response.headers)

    @defer.inlineCallbacks
    def test_unknownCARefused(self):
        error = yield self.refused_in_tls(self.foreign)
        self.assertIn("unknown ca", str(error).lower())

    @defer.inlineCallbacks
    def test_expiredRefused(self):
        error = yield self.refused_in_tls(self.expired)
        self.assertIn("certificate expired", str(error).lower())

    @defer.inlineCallbacks
    def test_revokedRefused(self):
        error = yield self.refused_in_tls(self.revoked)
        self.assertIn("revoked", str(error).lower())

    @defer.inlineCallbacks
    def test_noCertificateRefused(self):
        """A profile 2 charger (no client certificate) on the profile 3 listener."""
        error = yield self.refused_in_tls(None)
        self.assertIn("certificate required", str(error).lower())

    @defer.inlineCallbacks
    def test_sighupReload(self):
        """
        After a new server certificate is written and SIGHUP sent, a new
        client sees the new certificate while an old one stays connected.
        """
        self.gateway_service._install_sighup()
        self.addCleanup(self.gateway_service._remove_sighup)
        old = yield rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id), context=self.context(self.mine),
            keep_open=True,
        )
        self.addCleanup(old.close)
        self.assertEqual(old.status, 101)
        old_serial = self.server.certificate.serial_number
        seen = old.sock.getpeercert()
        self.assertEqual(int(seen["serialNumber"], 16), old_serial)

        replacement = self.pki.issue(SERVER_NAME, server=True, kind="rsa", name="server")
        reloaded = defer.Deferred()
        original = self.gateway_service.security.tls.reload

        def reload_and_tell():
            result = original()
            reloaded.callback(result)
            return result

        self.patch(self.gateway_service.security.tls, "reload", reload_and_tell)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertTrue((yield reloaded))

        other = self.identity("P3n")
        newcomer_cert = self.pki.issue(other)
        new = yield rawclient.handshake(
            self.port_of("ssl"), self.path(other), context=self.context(newcomer_cert),
            keep_open=True,
        )
        self.addCleanup(new.close)
        self.assertEqual(new.status, 101)
        seen = new.sock.getpeercert()
        self.assertEqual(int(seen["serialNumber"], 16), replacement.certificate.serial_number)
        # The old connection is still open and answers a ping.
        pong = yield threads.deferToThread(old.ping, b"still-here")
        self.assertEqual(pong, b"still-here")
        self.assertIn(self.charger_id, self.gateway_service.gateway.chargers)


# -- PROXY protocol ------------------------------------------------------------


class ProxyProtocolTests(SecurityTestCase):
    """The PROXY header gives the charger's real address."""

    def security_settings(self):
        return {"listener": {"proxy_protocol": "true"}}

    @defer.inlineCallbacks
    def check(self, header):
        identity = self.identity("PX")
        response = yield rawclient.handshake(
            self.port, self.path(identity), proxy=header, keep_open=True
        )
        self.addCleanup(response.close)
        self.assertEqual(response.status, 101)
        link = self.gateway_service.gateway.chargers[identity]
        self.assertEqual(link.edge.peer, "tcp4:203.0.113.7:40123")

    def test_v1(self):
        return self.check(rawclient.proxy_v1("203.0.113.7", 40123))

    def test_v2(self):
        return self.check(rawclient.proxy_v2("203.0.113.7", 40123))

    @defer.inlineCallbacks
    def test_withoutHeaderDropped(self):
        d = rawclient.handshake(self.port, self.path(self.identity("PX")))
        yield self.assertFailure(d, ConnectionError, OSError)


# -- TLS ended by a trusted proxy ------------------------------------------------


def _escaped(issued) -> str:
    """The certificate as nginx's $ssl_client_escaped_cert passes it."""
    return quote(open(issued.certfile).read(), safe="")


class ForwardedCertificateTests(SecurityTestCase):
    """Profile 3 behind a TLS-ending proxy that passes the certificate on."""

    trusted = "127.0.0.0/8"

    def security_settings(self):
        self.charger_id = self.identity("PF")
        self.mine = self.pki.issue(self.charger_id)
        self.others = self.pki.issue(self.identity("PFo"))
        return {
            "listener": {
                "tcp.profile": "3",
                "client_cert_header": "X-SSL-Client-Cert",
                "trusted_proxies": self.trusted,
            },
            "auth": {"failure_delay": "0"},
        }

    @defer.inlineCallbacks
    def handshake(self, issued):
        headers = {"X-SSL-Client-Cert": _escaped(issued)} if issued else {}
        response = yield rawclient.handshake(
            self.port, self.path(self.charger_id), headers=headers, keep_open=True
        )
        self.addCleanup(response.close)
        return response

    @defer.inlineCallbacks
    def test_accepted(self):
        response = yield self.handshake(self.mine)
        self.assertEqual(response.status, 101)
        self.assertIn(self.charger_id, self.gateway_service.gateway.chargers)

    @defer.inlineCallbacks
    def test_otherChargersCertificate403(self):
        self.assertEqual((yield self.handshake(self.others)).status, 403)

    @defer.inlineCallbacks
    def test_noCertificate403(self):
        self.assertEqual((yield self.handshake(None)).status, 403)


class UntrustedProxyTests(ForwardedCertificateTests):
    """The same header from an address that is not a trusted proxy is ignored."""

    trusted = "10.0.0.0/8"

    @defer.inlineCallbacks
    def test_accepted(self):
        response = yield self.handshake(self.mine)
        self.assertEqual(response.status, 403)
        self.assertNotIn(self.charger_id, self.gateway_service.gateway.chargers)


class ProxyProtocolTlsTests(SecurityTestCase):
    """The PROXY header comes before TLS, as a TCP load balancer sends it."""

    def security_settings(self):
        self.charger_id = self.identity("PXT")
        self.passwords = os.path.join(self.directory, "passwords")
        add_password(self.passwords, self.charger_id, b"pw-pw-pw")
        server = self.pki.issue(SERVER_NAME, server=True, kind="ec")
        return {
            "listener": {"proxy_protocol": "true", "tcp.enabled": "false",
                         "ssl.enabled": "true", "ssl.port": "0", "ssl.profile": "2",
                         "ssl.certfile": server.certfile, "ssl.keyfile": server.keyfile},
            "auth": {"password_file": self.passwords},
        }

    @defer.inlineCallbacks
    def test_v2BeforeTls(self):
        response = yield rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id),
            proxy=rawclient.proxy_v2("198.51.100.9", 50000),
            context=rawclient.client_context(self.pki.cafile),
            headers=rawclient.basic(self.charger_id, "pw-pw-pw"), keep_open=True,
        )
        self.addCleanup(response.close)
        self.assertEqual(response.status, 101)
        link = self.gateway_service.gateway.chargers[self.charger_id]
        self.assertEqual(link.edge.peer, "tcp4:198.51.100.9:50000")


class Profile3HttpAnswerTests(SecurityTestCase):
    """With fail_if_no_peer_cert = false a charger without certificate gets 403."""

    def security_settings(self):
        self.charger_id = self.identity("P3h")
        server = self.pki.issue(SERVER_NAME, server=True, kind="ec")
        return {
            "listener": {
                "tcp.enabled": "false", "ssl.enabled": "true", "ssl.port": "0",
                "ssl.profile": "3", "ssl.certfile": server.certfile,
                "ssl.keyfile": server.keyfile, "ssl.cacertfile": self.pki.cafile,
                "ssl.fail_if_no_peer_cert": "false",
            },
            "auth": {"failure_delay": "0"},
        }

    @defer.inlineCallbacks
    def test_noCertificate403(self):
        response = yield rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id),
            context=rawclient.client_context(self.pki.cafile),
        )
        self.assertEqual(response.status, 403)


class AmqpCheckerGatewayTests(SecurityTestCase):
    """checker = amqp end to end: RabbitMQ's own user database decides."""

    @defer.inlineCallbacks
    def setUp(self):
        import shutil

        from twisted.internet import utils
        from twisted.trial.unittest import SkipTest

        rabbitmqctl = shutil.which("rabbitmqctl")
        if rabbitmqctl is None:
            raise SkipTest("rabbitmqctl is not available")

        @defer.inlineCallbacks
        def ctl(*arguments):
            _out, err, code = yield utils.getProcessOutputAndValue(
                rabbitmqctl, arguments, env=os.environ)
            if code != 0:
                raise RuntimeError(f"rabbitmqctl {arguments[0]} failed: {err!r}")

        self.user = "CP-amqp-" + os.urandom(6).hex()
        yield ctl("add_user", self.user, "broker-password")
        self.addCleanup(ctl, "delete_user", self.user)
        yield ctl("set_permissions", "-p", "/", self.user, "", "", "")
        yield super().setUp()

    def security_settings(self):
        return {"listener": {"tcp.profile": "1"},
                "auth": {"checker": "amqp", "failure_delay": "0"}}

    @defer.inlineCallbacks
    def test_acceptsAndRefuses(self):
        self._identities.append(self.user)
        refused = yield rawclient.handshake(
            self.port, self.path(self.user), headers=rawclient.basic(self.user, "wrong"))
        self.assertEqual(refused.status, 401)
        charger = yield FakeCharger.connect(
            reactor, self.url(self.user), ["ocpp1.6"],
            headers=basic_auth(self.user, "broker-password"))
        self.addCleanup(self._close_charger, charger)
        self.assertIn(self.user, self.gateway_service.gateway.chargers)
