"""
Tests for L{ocppgw.auth}: Basic parsing, password hashes, the cache, the
authenticator's delays and timeouts (on a fake clock), and each checker
against a real back end: a password file (thread pool), a local HTTP
server (twisted.web) and RabbitMQ (a user the test creates).
"""

from __future__ import annotations

import os
import shutil

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor, task, utils
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web import resource, server

from ocppgw import auth
from ocppgw.refusals import Refused
from ocppgw.testing import FakeCharger, amqp_url, basic_auth, unique_name
from ocppgw.tls import CertificateIdentity
from tests import rawclient
from tests.certs import ThrowAwayPKI
from tests.support import GatewayTestCase


def _credentials(username: str, password) -> UsernamePassword:
    if isinstance(password, str):
        password = password.encode("utf-8")
    return UsernamePassword(username.encode("utf-8"), password)


class BasicHeaderTests(unittest.SynchronousTestCase):
    def test_parses(self):
        header = rawclient.basic("RDAM 123", b"\xff\x00:x")["Authorization"]
        self.assertEqual(auth.parse_basic(header), (b"RDAM 123", b"\xff\x00:x"))

    def test_schemeCaseInsensitive(self):
        self.assertEqual(auth.parse_basic("basic Q1A6cHc="), (b"CP", b"pw"))

    def test_malformed(self):
        for header in (None, "", "Bearer abc", "Basic", "Basic !!!", "Basic Q1A="):
            self.assertIsNone(auth.parse_basic(header), header)


class HashTests(unittest.SynchronousTestCase):
    def test_roundTrip(self):
        encoded = auth.hash_password(b"\xff\x00secret", log_n=4)
        self.assertTrue(encoded.startswith("$scrypt$ln=4,r=8,p=1$"))
        self.assertTrue(auth.verify_password(b"\xff\x00secret", encoded))
        self.assertFalse(auth.verify_password(b"\xff\x00secreT", encoded))

    def test_saltedDifferently(self):
        self.assertNotEqual(auth.hash_password(b"a", log_n=4), auth.hash_password(b"a", log_n=4))

    def test_garbageHashNeverMatches(self):
        for encoded in ("", "$scrypt$", "$bcrypt$x$y$z", "$scrypt$ln=99,r=8,p=1$AA$AA",
                        "$scrypt$ln=4,r=8,p=1$!!$AA"):
            self.assertFalse(auth.verify_password(b"", encoded), encoded)

    def test_passwordFileFormat(self):
        entries = {"RDAM|1:x": "$scrypt$ln=4,r=8,p=1$AA$AA", "CP 2": "$scrypt$a$b$c"}
        text = "# comment\n\n" + auth.render_password_file(entries)
        self.assertEqual(auth.parse_password_file(text), entries)
        self.assertRaises(auth.PasswordFileError, auth.parse_password_file, "CP1 nohash\n")


class _CountingChecker:
    def __init__(self, accept: set):
        self.accept = accept
        self.calls = 0
        self.pending: list[defer.Deferred] = []
        self.hang = False

    def requestAvatarId(self, credentials):
        self.calls += 1
        if self.hang:
            d = defer.Deferred()
            self.pending.append(d)
            return d
        if (credentials.username, credentials.password) in self.accept:
            return defer.succeed(credentials.username)
        return defer.fail(UnauthorizedLogin())


class CacheTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.inner = _CountingChecker({(b"CP1", b"good")})
        self.cache = auth.CachingChecker(self.inner, self.clock, ttl=10)

    @defer.inlineCallbacks
    def test_acceptedRemembered(self):
        for _ in range(3):
            self.assertEqual((yield self.cache.requestAvatarId(_credentials("CP1", "good"))),
                             b"CP1")
        self.assertEqual(self.inner.calls, 1)
        self.clock.advance(10.5)
        yield self.cache.requestAvatarId(_credentials("CP1", "good"))
        self.assertEqual(self.inner.calls, 2)

    @defer.inlineCallbacks
    def test_refusedRememberedSeparately(self):
        for _ in range(2):
            yield self.assertFailure(
                self.cache.requestAvatarId(_credentials("CP1", "bad")), UnauthorizedLogin)
        self.assertEqual(self.inner.calls, 1)
        # another password is another entry
        yield self.cache.requestAvatarId(_credentials("CP1", "good"))
        self.assertEqual(self.inner.calls, 2)

    def test_noPasswordsKept(self):
        self.cache.requestAvatarId(_credentials("CP1", "good"))
        for key in self.cache._cache:
            self.assertNotIn(b"good", key)


class AuthenticatorTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.inner = _CountingChecker({(b"CP1", b"good"), (b"CP2", b"\xff" * 20)})
        self.authenticator = auth.ChargerAuthenticator(
            self.clock, 1, self.inner, failure_delay=2.0, timeout=5.0
        )

    def authenticate(self, identity, username, password, subprotocol="ocpp1.6"):
        header = rawclient.basic(username, password)["Authorization"]
        return self.authenticator.authenticate(identity, subprotocol, header)

    def test_failureDelayedWithoutBlockingOthers(self):
        refused = self.authenticate("CP1", "CP1", "bad")
        self.assertNoResult(refused)
        # meanwhile another charger gets in at once
        self.assertIsNone(self.successResultOf(self.authenticate("CP1", "CP1", "good")))
        self.clock.advance(1.9)
        self.assertNoResult(refused)
        self.clock.advance(0.2)
        error = self.failureResultOf(refused, Refused).value
        self.assertEqual((error.status, error.headers),
                         (401, (("WWW-Authenticate", 'Basic realm="OCPP"'),)))

    def test_usernameMustBeIdentity(self):
        d = self.authenticate("CP9", "CP1", "good")
        self.clock.advance(2)
        self.assertEqual(self.failureResultOf(d, Refused).value.status, 401)
        self.assertEqual(self.inner.calls, 0)

    def test_raw16Bytes(self):
        self.assertIsNone(self.successResultOf(self.authenticate("CP2", "CP2", b"\xff" * 20)))
        d = self.authenticate("CP2", "CP2", b"\xff" * 20, subprotocol="ocpp2.0.1")
        self.clock.advance(2)
        self.assertEqual(self.failureResultOf(d, Refused).value.status, 401)

    def test_hungCheckerTimesOut503(self):
        self.inner.hang = True
        d = self.authenticate("CP1", "CP1", "good")
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        error = self.failureResultOf(d, Refused).value
        self.assertEqual((error.status, error.headers), (503, ()))

    def test_profile0(self):
        authenticator = auth.ChargerAuthenticator(self.clock, 0)
        self.assertIsNone(self.successResultOf(
            authenticator.authenticate("CP1", "ocpp1.6", None)))

    def test_profile3(self):
        pki = ThrowAwayPKI(os.path.abspath(self.mktemp()))
        mine = pki.issue("CP1", o="Example CPO")
        authenticator = auth.ChargerAuthenticator(
            self.clock, 3, certificate_identity=CertificateIdentity("cn"), failure_delay=0
        )
        self.assertIsNone(self.successResultOf(
            authenticator.authenticate("CP1", "ocpp1.6", None, mine.certificate)))
        for identity, certificate in (("CP2", mine.certificate), ("CP1", None)):
            d = authenticator.authenticate(identity, "ocpp1.6", None, certificate)
            self.assertEqual(self.failureResultOf(d, Refused).value.status, 403)
        strict = CertificateIdentity("cn_and_o", organization="Other CPO")
        self.assertIsNone(strict.identity_of(mine.certificate))
        self.assertEqual(CertificateIdentity("cn_and_o", organization="Example CPO")
                         .identity_of(mine.certificate), "CP1")

    def test_identityMap(self):
        from ocppgw.tls import fingerprint

        pki = ThrowAwayPKI(os.path.abspath(self.mktemp()))
        one, two = pki.issue("serial-1"), pki.issue("serial-2")
        path = os.path.join(pki.directory, "map")
        digest = fingerprint(one.certificate).upper()
        with open(path, "w") as file:
            file.write(f"# map\n{':'.join(digest[i:i + 2] for i in range(0, 64, 2))} CP 1\n"
                       f"serial:{two.certificate.serial_number:X} CP|2\n")
        mapping = CertificateIdentity("map", map_file=path)
        self.assertEqual(mapping.identity_of(one.certificate), "CP 1")
        self.assertEqual(mapping.identity_of(two.certificate), "CP|2")
        self.assertIsNone(mapping.identity_of(pki.issue("serial-3").certificate))


class PasswordFileCheckerTests(unittest.TestCase):
    def setUp(self):
        self.pool = ThreadPool(0, 2, name="test-passwords")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.path = os.path.abspath(self.mktemp())
        self.write({"CP1": b"one", "CP 2": b"\xff\x01"})
        self.checker = auth.PasswordFileChecker(reactor, self.pool, self.path)

    def write(self, passwords):
        entries = {k: auth.hash_password(v, log_n=4) for k, v in passwords.items()}
        temporary = self.path + ".new"
        with open(temporary, "w") as file:
            file.write(auth.render_password_file(entries))
        os.replace(temporary, self.path)

    @defer.inlineCallbacks
    def test_acceptsAndRefuses(self):
        self.assertEqual((yield self.checker.requestAvatarId(_credentials("CP1", "one"))), b"CP1")
        self.assertEqual((yield self.checker.requestAvatarId(_credentials("CP 2", b"\xff\x01"))),
                         b"CP 2")
        yield self.assertFailure(self.checker.requestAvatarId(_credentials("CP1", "two")),
                                 UnauthorizedLogin)
        yield self.assertFailure(self.checker.requestAvatarId(_credentials("CP3", "one")),
                                 UnauthorizedLogin)

    @defer.inlineCallbacks
    def test_changePickedUp(self):
        cached = auth.CachingChecker(self.checker, reactor, ttl=60)
        yield cached.requestAvatarId(_credentials("CP1", "one"))
        self.write({"CP1": b"new"})
        yield self.assertFailure(cached.requestAvatarId(_credentials("CP1", "one")),
                                 UnauthorizedLogin)
        self.assertEqual((yield cached.requestAvatarId(_credentials("CP1", "new"))), b"CP1")

    @defer.inlineCallbacks
    def test_brokenFileKeepsOldEntries(self):
        with open(self.path, "w") as file:
            file.write("garbage line without a hash\n")
        self.assertEqual((yield self.checker.requestAvatarId(_credentials("CP1", "one"))), b"CP1")
        self.flushLoggedErrors()

    def test_verifiedOffTheReactorThread(self):
        """The hash is computed in the injected pool, not on this thread."""
        import threading

        seen = []
        original = auth.verify_password

        def spy(password, encoded):
            seen.append(threading.current_thread())
            return original(password, encoded)

        self.patch(auth, "verify_password", spy)
        d = self.checker.requestAvatarId(_credentials("CP1", "one"))
        # an unknown identity costs a (dummy) check as well: no
        # enumeration of identities by timing
        d.addCallback(lambda _: self.assertFailure(
            self.checker.requestAvatarId(_credentials("CP-unknown", "one")), UnauthorizedLogin))

        def check(_):
            self.assertEqual(len(seen), 2)
            for thread in seen:
                self.assertIsNot(thread, threading.current_thread())

        return d.addCallback(check)


class _AuthResource(resource.Resource):
    """A CSMS auth endpoint: allow/deny by table, 500 or hang on request."""

    isLeaf = True

    def __init__(self, passwords: dict):
        super().__init__()
        self.passwords = passwords
        self.requests = []
        self.hanging = []
        #: fires when the first request to hang arrives
        self.hung = defer.Deferred()

    def render_POST(self, request):
        username = request.args[b"username"][0]
        password = request.args[b"password"][0]
        self.requests.append((username, password))
        if username == b"HANG":
            self.hanging.append(request)
            if not self.hung.called:
                self.hung.callback(None)
            return server.NOT_DONE_YET
        if username == b"BROKEN":
            request.setResponseCode(500)
            return b"oops"
        return b"allow" if self.passwords.get(username) == password else b"deny"


class _HttpServerMixin:
    @defer.inlineCallbacks
    def start_http(self, passwords):
        self.auth_resource = _AuthResource(passwords)
        site = server.Site(self.auth_resource)
        self.http_port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(self.http_port.stopListening)
        self.addCleanup(self._finish_hanging)
        port = self.http_port.getHost().port
        return f"http://127.0.0.1:{port}/auth/user"

    def _finish_hanging(self):
        for request in self.auth_resource.hanging:
            if not request.finished and not request._disconnected:
                request.write(b"deny")
                request.finish()


class HttpCheckerTests(_HttpServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        url = yield self.start_http({b"CP1": b"one", b"CP2": b"\xff\x00"})
        self.checker = auth.HttpChecker(reactor, url)
        self.addCleanup(self.checker.stop)

    @defer.inlineCallbacks
    def test_allowAndDeny(self):
        self.assertEqual((yield self.checker.requestAvatarId(_credentials("CP1", "one"))), b"CP1")
        self.assertEqual((yield self.checker.requestAvatarId(_credentials("CP2", b"\xff\x00"))),
                         b"CP2")
        yield self.assertFailure(self.checker.requestAvatarId(_credentials("CP1", "two")),
                                 UnauthorizedLogin)
        self.assertEqual(self.auth_resource.requests[1], (b"CP2", b"\xff\x00"))

    @defer.inlineCallbacks
    def test_errorStatusIsUnavailable(self):
        yield self.assertFailure(self.checker.requestAvatarId(_credentials("BROKEN", "x")),
                                 auth.CheckerUnavailable)


class HungBackEndTests(_HttpServerMixin, GatewayTestCase):
    """End to end: a hung auth back end gives 503 and blocks no one else."""

    @defer.inlineCallbacks
    def setUp(self):
        self.good = unique_name("GOOD")
        url = yield self.start_http({self.good.encode(): b"pw"})
        self.settings = {
            "listener": {"tcp.profile": "1"},
            "auth": {"checker": "http", "http.url": url, "timeout": "1.5"},
        }
        yield super().setUp()

    @defer.inlineCallbacks
    def test_hungBackEnd503OthersServed(self):
        hung = rawclient.handshake(self.port, "/ocpp/HANG",
                                   headers=rawclient.basic("HANG", "x"))
        order = []
        hung.addCallback(lambda response: order.append(("hung", response.status)))
        # the back end now holds the hung request
        yield self.auth_resource.hung
        self._identities.append(self.good)
        charger = yield FakeCharger.connect(reactor, self.url(self.good), ["ocpp1.6"],
                                            headers=basic_auth(self.good, "pw"))
        self.addCleanup(self._close_charger, charger)
        order.append(("good", 101))
        yield hung
        self.assertEqual(order, [("good", 101), ("hung", 503)])


class AmqpCheckerTests(unittest.TestCase):
    """Log in to the real broker as a user the test creates."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        if shutil.which("rabbitmqctl") is None:
            raise unittest.SkipTest("rabbitmqctl is not available")
        self.user = unique_name("ocppgw-charger")
        self.password = "pw-" + unique_name("p")
        yield self.rabbitmqctl("add_user", self.user, self.password)
        self.addCleanup(self.rabbitmqctl, "delete_user", self.user)
        # No rights on anything, but allowed into the vhost.
        yield self.rabbitmqctl("set_permissions", "-p", "/", self.user, "", "", "")
        self.checker = auth.AmqpChecker(
            reactor, auth.amqp_login_url(amqp_url(), ""), timeout=5
        )

    @defer.inlineCallbacks
    def rabbitmqctl(self, *arguments):
        out, err, code = yield utils.getProcessOutputAndValue(
            shutil.which("rabbitmqctl"), arguments, env=os.environ
        )
        if code != 0:
            raise RuntimeError(f"rabbitmqctl {arguments[0]} failed: {err!r}")

    @defer.inlineCallbacks
    def test_acceptsAndRefuses(self):
        self.assertEqual(
            (yield self.checker.requestAvatarId(_credentials(self.user, self.password))),
            self.user.encode(),
        )
        yield self.assertFailure(
            self.checker.requestAvatarId(_credentials(self.user, "wrong")), UnauthorizedLogin
        )
        yield self.assertFailure(
            self.checker.requestAvatarId(_credentials(unique_name("nobody"), "x")),
            UnauthorizedLogin,
        )

    @defer.inlineCallbacks
    def test_unreachableBrokerIsUnavailable(self):
        checker = auth.AmqpChecker(reactor, "amqp://127.0.0.1:1/%2F", timeout=2)
        yield self.assertFailure(checker.requestAvatarId(_credentials(self.user, "x")),
                                 auth.CheckerUnavailable)

    def test_loginUrlDropsUser(self):
        self.assertEqual(auth.amqp_login_url("amqp://gw:secret@broker:5673/ocpp", ""),
                         "amqp://broker:5673/ocpp")
        self.assertEqual(auth.amqp_login_url("amqp://gw:s@a/%2F", "amqps://u:p@b/v"),
                         "amqps://b/v")
