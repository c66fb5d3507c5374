"""
Charger authentication: OCPP security profiles 1, 2 and 3.

One L{ChargerAuthenticator} per listener decides, before the WebSocket
upgrade, whether a charger may connect under the identity in its URL:

- profile 0: anyone (development; only on loopback unless allowed);
- profile 1 (ws) and 2 (wss): HTTP Basic. The username must be the
  identity -- otherwise any valid station could speak for any other --
  and the password is checked by an C{ICredentialsChecker} (twisted.cred)
  chosen in the configuration: L{PasswordFileChecker}, L{HttpChecker} or
  L{AmqpChecker}, behind a L{CachingChecker}. Failures get 401 with
  C{WWW-Authenticate: Basic realm="OCPP"};
- profile 3 (wss + client certificate): the verified certificate must
  name the identity (L{ocppgw.tls.CertificateIdentity}), else 403. Basic
  credentials do not rescue a certificate that names another charger.

Refusals (401/403) are answered after C{failure_delay} seconds on the
reactor's clock (a timer, so other chargers are not held up) to slow down
guessing. A checker that does not answer within C{timeout} gives 503, so a
hung back end costs a charger a retry, not a stuck handshake.

Passwords: OCPP 1.6 (security whitepaper) sends the 20 raw bytes of the
AuthorizationKey as the Basic password, which need not be UTF-8, so 1.6
passwords are handled as bytes end to end; OCPP 2.x passwords are UTF-8
text (passwordString), and one that is not valid UTF-8 is refused. All
comparisons of secrets are constant time (C{hmac.compare_digest}).

Password hashes are scrypt (C{hashlib.scrypt}): memory-hard like bcrypt and
argon2, in the standard library (no new C dependency), and without bcrypt's
72-byte input limit. A check takes ~50 ms and 16 MiB, so it runs on a small
dedicated thread pool, never on the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections import OrderedDict
from typing import Optional
from urllib.parse import urlencode

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from ocppgw.framing import OCPP16
from ocppgw.refusals import Refused

_log = Logger()

#: What a 401 carries (OCPP 1.6 security whitepaper / 2.0.1 A00.FR.204).
WWW_AUTHENTICATE = ("WWW-Authenticate", 'Basic realm="OCPP"')

# scrypt parameters: N=2^14, r=8 (16 MiB, ~50 ms), the values RFC 7914 and
# hashlib's documentation use for interactive logins.
_SCRYPT_LOG_N = 14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024


class CheckerUnavailable(Exception):
    """
    The credentials could not be checked (back end down or failing).
    """


# -- password hashes ---------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: bytes, *, log_n: int = _SCRYPT_LOG_N) -> str:
    """
    A salted scrypt hash of C{password}:
    C{$scrypt$ln=14,r=8,p=1$<salt>$<hash>} (base64 without padding).
    """
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password, salt=salt, n=2**log_n, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=_SCRYPT_MAXMEM,
        dklen=32,
    )
    return f"$scrypt$ln={log_n},r={_SCRYPT_R},p={_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: bytes, encoded: str) -> bool:
    """
    Whether C{password} matches the hash C{encoded}. Blocking (~50 ms):
    call it off the reactor thread.
    """
    try:
        _, scheme, params, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        values = dict(item.split("=", 1) for item in params.split(","))
        log_n, r, p = int(values["ln"]), int(values["r"]), int(values["p"])
        salt_bytes, expected = _unb64(salt), _unb64(digest)
    except (ValueError, KeyError, binascii.Error):
        return False
    if not (1 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    actual = hashlib.scrypt(
        password, salt=salt_bytes, n=2**log_n, r=r, p=p, maxmem=_SCRYPT_MAXMEM,
        dklen=len(expected),
    )
    return hmac.compare_digest(actual, expected)


# -- the password file ---------------------------------------------------------


class PasswordFileError(Exception):
    """A line of the password file cannot be read."""


def parse_password_file(text: str, name: str = "<password file>") -> dict[str, str]:
    """
    C{identity:hash} lines; C{#} comments and blank lines are skipped. An
    identity may itself hold C{:}, so the hash is what follows the I{last}
    C{:} (a hash never holds one).
    """
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        identity, colon, encoded = line.rpartition(":")
        if not colon or not identity or not encoded.startswith("$scrypt$"):
            raise PasswordFileError(f"{name}:{number}: expected 'identity:$scrypt$...'")
        entries[identity] = encoded
    return entries


def render_password_file(entries: dict[str, str]) -> str:
    return "".join(f"{identity}:{encoded}\n" for identity, encoded in sorted(entries.items()))


# A hash of a random password, verified for unknown identities so that
# they take as long as known ones (no identity enumeration by timing).
_DUMMY_HASH = None


def _verify_unknown(password: bytes) -> bool:
    """
    Spend the time of a real check, then refuse. Runs in the pool, where
    making the dummy hash the first time costs no one else anything.
    """
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_bytes(16))
    verify_password(password, _DUMMY_HASH)
    return False


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """
    Checks Basic credentials against a password file written by
    C{ocppgw passwd}.

    The file is re-read when its size, modification time or inode changes
    (checked with one C{stat} per login, and by L{reload} on SIGHUP), so
    adding a charger needs no restart. A file that becomes unreadable or
    malformed keeps the entries read last, and says so.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, reactor, threadpool, path: str) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self.path = path
        self._entries: dict[str, str] = {}
        self._stamp = None
        self._load(initial=True)

    def refresh(self) -> bool:
        """
        Re-read the file if it changed; whether it did (the cache in front
        forgets its answers then, so a change counts at once).
        """
        before = self._stamp
        self._load()
        return self._stamp != before

    def _load(self, initial: bool = False) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as file:
                entries = parse_password_file(file.read(), self.path)
        except (OSError, UnicodeDecodeError, PasswordFileError) as error:
            if initial:
                raise
            if self._stamp is not None:
                _log.error("Password file not reloaded, keeping the old entries: {error}",
                           error=str(error))
                self._stamp = None
            return
        if not initial:
            _log.info("Password file {path} reloaded: {count} chargers",
                      path=self.path, count=len(entries))
        self._entries, self._stamp = entries, stamp

    def reload(self) -> None:
        self._stamp = None
        self._load()

    def requestAvatarId(self, credentials) -> defer.Deferred:
        self._load()
        username = credentials.username.decode("utf-8", "replace")
        encoded = self._entries.get(username)
        known = encoded is not None
        if known:
            d = deferToThreadPool(self._reactor, self._threadpool, verify_password,
                                  credentials.password, encoded)
        else:
            d = deferToThreadPool(self._reactor, self._threadpool, _verify_unknown,
                                  credentials.password)

        def checked(ok):
            if ok and known:
                return credentials.username
            raise UnauthorizedLogin()

        return d.addCallback(checked)


# -- HTTP back end -----------------------------------------------------------


@implementer(ICredentialsChecker)
class HttpChecker:
    """
    POSTs C{username} and C{password} (form-encoded, like RabbitMQ's HTTP
    auth back end) to the CSMS. A 200 answer whose body starts with
    C{allow} lets the charger in; any other 2xx refuses it; anything else
    (an error status, no answer) means the back end is unavailable (503 to
    the charger, and not cached).

    Raw 1.6 password bytes are percent-encoded as they are.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, reactor, url: str) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool

        self.url = url
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._agent = Agent(reactor, pool=self._pool)

    def requestAvatarId(self, credentials) -> defer.Deferred:
        from twisted.web.client import FileBodyProducer, readBody
        from twisted.web.http_headers import Headers
        import io

        body = urlencode({"username": credentials.username, "password": credentials.password})
        d = self._agent.request(
            b"POST",
            self.url.encode("ascii"),
            Headers({b"Content-Type": [b"application/x-www-form-urlencoded"]}),
            FileBodyProducer(io.BytesIO(body.encode("ascii"))),
        )

        def answered(response):
            return readBody(response).addCallback(lambda data: (response.code, data))

        def decide(result):
            code, data = result
            if code == 200 and data.strip().lower().startswith(b"allow"):
                return credentials.username
            if 200 <= code < 300:
                raise UnauthorizedLogin()
            raise CheckerUnavailable(f"HTTP {code} from the auth back end")

        def failed(failure):
            failure.trap(Exception)
            if failure.check(UnauthorizedLogin, CheckerUnavailable, defer.CancelledError):
                return failure
            raise CheckerUnavailable(failure.getErrorMessage())

        return d.addCallback(answered).addCallback(decide).addErrback(failed)

    def stop(self) -> defer.Deferred:
        return self._pool.closeCachedConnections()


# -- AMQP back end -------------------------------------------------------------


@implementer(ICredentialsChecker)
class AmqpChecker:
    """
    Logs in to RabbitMQ as the charger (open, check, close: no connection
    is kept per charger), so RabbitMQ's own users, LDAP or any other auth
    back end it is configured with decide. The charger's user needs access
    to the vhost of the URL (permissions may be empty: C{"" "" ""}).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, reactor, url: str, timeout: float = 5.0) -> None:
        self._reactor = reactor
        self.url = url
        self._timeout = timeout

    def requestAvatarId(self, credentials) -> defer.Deferred:
        from ocppgw.amqp import BrokerUnavailable, check_login

        d = check_login(
            self._reactor, self.url, credentials.username, credentials.password, self._timeout
        )

        def decided(ok):
            if ok:
                return credentials.username
            raise UnauthorizedLogin()

        def failed(failure):
            failure.trap(BrokerUnavailable)
            raise CheckerUnavailable(failure.getErrorMessage())

        return d.addCallbacks(decided, failed)


# -- cache -------------------------------------------------------------------


@implementer(ICredentialsChecker)
class CachingChecker:
    """
    Remembers the outcome (accepted or refused) of each checked login for
    C{ttl} seconds, so a reconnect storm costs the back end one check per
    charger. Back end failures are not remembered. A checker with a
    C{refresh()} method (the password file) is asked before each lookup
    whether its data changed; if so, everything remembered is forgotten.

    Entries are keyed by an HMAC of the credentials under a key made at
    start: the passwords themselves are never kept.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, checker, clock, ttl: float, max_entries: int = 100_000) -> None:
        self.checker = checker
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[float, bool]] = OrderedDict()

    def _digest(self, credentials) -> bytes:
        username = credentials.username
        return hmac.new(
            self._key,
            len(username).to_bytes(4, "big") + username + credentials.password,
            hashlib.sha256,
        ).digest()

    def clear(self) -> None:
        self._cache.clear()

    def requestAvatarId(self, credentials) -> defer.Deferred:
        refresh = getattr(self.checker, "refresh", None)
        if refresh is not None and refresh():
            self._cache.clear()
        if self._ttl <= 0:
            return defer.maybeDeferred(self.checker.requestAvatarId, credentials)
        key = self._digest(credentials)
        now = self._clock.seconds()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            if hit[1]:
                return defer.succeed(credentials.username)
            return defer.fail(UnauthorizedLogin())
        d = defer.maybeDeferred(self.checker.requestAvatarId, credentials)

        def remember(result, ok):
            self._cache[key] = (self._clock.seconds() + self._ttl, ok)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
            return result

        def refused(failure):
            failure.trap(UnauthorizedLogin)
            return remember(failure, False)

        return d.addCallbacks(remember, refused, callbackArgs=(True,))


# -- the per-listener decision -----------------------------------------------


def parse_basic(header: Optional[str]) -> Optional[tuple[bytes, bytes]]:
    """
    The (username, password) bytes of an C{Authorization: Basic} header, or
    C{None} when there is none or it is malformed.

    autobahn hands headers over as text decoded as UTF-8; the base64 part
    is ASCII, so nothing is lost.
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return username, password


class ChargerAuthenticator:
    """
    Decides whether a charger may connect to one listener.

    @param clock: for the failure delay and the checker timeout.
    @param profile: the listener's security profile (0-3).
    @param checker: an C{ICredentialsChecker} for profiles 1 and 2.
    @param certificate_identity: a L{ocppgw.tls.CertificateIdentity} for
        profile 3.
    """

    def __init__(
        self,
        clock,
        profile: int,
        checker=None,
        certificate_identity=None,
        *,
        failure_delay: float = 1.0,
        timeout: float = 5.0,
    ) -> None:
        self._clock = clock
        self.profile = profile
        self.checker = checker
        self.certificate_identity = certificate_identity
        self.failure_delay = failure_delay
        self.timeout = timeout

    def authenticate(
        self,
        identity: str,
        subprotocol: str,
        authorization: Optional[str],
        certificate=None,
        peer: str = "",
    ) -> defer.Deferred:
        """
        Fires with C{None} when the charger may connect, or fails with
        L{Refused} (401 with the Basic challenge, 403, or 503).

        @param certificate: the verified client certificate
            (C{cryptography.x509.Certificate}) or C{None}.
        """
        if self.profile == 0:
            return defer.succeed(None)
        if self.profile == 3:
            return self._by_certificate(identity, certificate, peer)
        return self._by_password(identity, subprotocol, authorization, peer)

    def _refuse(self, status: int, reason: str, why: str, identity: str, peer: str):
        _log.info("Refused {identity} from {peer}: {why}", identity=identity, peer=peer,
                  why=why)
        headers = (WWW_AUTHENTICATE,) if status == 401 else ()
        error = Refused(status, reason, headers=headers)
        if self.failure_delay <= 0:
            return defer.fail(error)
        d: defer.Deferred = defer.Deferred()
        self._clock.callLater(self.failure_delay, d.errback, error)
        return d

    def _by_certificate(self, identity, certificate, peer) -> defer.Deferred:
        if certificate is None:
            return self._refuse(403, "Forbidden", "no client certificate", identity, peer)
        named = self.certificate_identity.identity_of(certificate)
        if named != identity:
            return self._refuse(403, "Forbidden", "client certificate names another charger",
                                identity, peer)
        return defer.succeed(None)

    def _by_password(self, identity, subprotocol, authorization, peer) -> defer.Deferred:
        basic = parse_basic(authorization)
        if basic is None:
            return self._refuse(401, "Unauthorized", "no Basic credentials", identity, peer)
        username, password = basic
        if not hmac.compare_digest(username, identity.encode("utf-8")):
            return self._refuse(401, "Unauthorized", "username is not the identity",
                                identity, peer)
        if subprotocol != OCPP16.subprotocol:
            # 2.x: passwordString, UTF-8 text.
            try:
                password.decode("utf-8")
            except UnicodeDecodeError:
                return self._refuse(401, "Unauthorized", "password is not UTF-8",
                                    identity, peer)
        d = defer.maybeDeferred(
            self.checker.requestAvatarId, UsernamePassword(username, password)
        )
        d.addTimeout(self.timeout, self._clock)

        def accepted(_avatar):
            return None

        def failed(failure):
            if failure.check(UnauthorizedLogin):
                return self._refuse(401, "Unauthorized", "wrong password", identity, peer)
            if failure.check(defer.TimeoutError):
                why = f"no answer from the credentials checker within {self.timeout:g} s"
            else:
                why = f"credentials checker failed: {failure.getErrorMessage()}"
            _log.warn("Refused {identity} from {peer}: {why}", identity=identity, peer=peer,
                      why=why)
            raise Refused(503, "Service Unavailable")

        return d.addCallbacks(accepted, failed)


def amqp_login_url(broker_url: str, auth_url: str) -> str:
    """
    The URL the AMQP checker logs in to: C{[auth] amqp.url}, or the
    gateway's own broker URL; its user part is dropped either way, the
    charger's credentials replace it.
    """
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(auth_url or broker_url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
