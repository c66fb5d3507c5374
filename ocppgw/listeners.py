"""
What each listener puts between the socket and the WebSocket edge.

::

    socket -> [PROXY protocol header] -> [TLS] -> ChargerFactory
                                                  '- ChargerAuthenticator

The plain listener (C{tcp.*}) carries profile 0 or 1, the TLS listener
(C{ssl.*}) profile 0, 2 or 3. L{Security} builds, from the settings, the
TLS contexts, the credentials checker shared by both listeners (with its
cache and, for the password file, its thread pool) and one authenticator
per listener, and reloads the material they read from files.

The PROXY header is read I{before} TLS: a TCP load balancer in front
(HAProxy C{send-proxy}/C{send-proxy-v2}) prepends it to the TLS stream.
It is believed only from C{trusted_proxies} (L{ocppgw.proxyprotocol}),
and so is a client certificate passed on by a TLS-ending proxy
(L{ForwardedCertificate}).
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ocppgw import auth
from ocppgw.proxyprotocol import ProxyHeaderFactory, TrustedProxies
from ocppgw.resumption import ResumingTLSFactory
from ocppgw.tls import CertificateIdentity, ServerTLS, TLSFiles

_log = Logger()


class Security:
    """
    TLS material, credentials checker and authenticators of a gateway.

    @param threadpool: where password hashes are verified; by default a
        pool of C{[auth] hash_threads} threads started and stopped with
        the service.
    """

    def __init__(self, settings, reactor, *, threadpool: Optional[ThreadPool] = None) -> None:
        self._settings = settings
        self._reactor = reactor
        listener, options = settings.listener, settings.auth
        #: who may send PROXY headers and forwarded client certificates
        self.trusted_proxies = TrustedProxies(listener.trusted_proxies)
        self.tls: Optional[ServerTLS] = None
        self.certificate_identity: Optional[CertificateIdentity] = None
        if listener.ssl_enabled:
            self.tls = ServerTLS(TLSFiles.from_listener(listener), reactor)
        if 3 in [self.profile(kind) for kind in self.listener_kinds()]:
            self.certificate_identity = CertificateIdentity(
                listener.ssl_identity, listener.ssl_organization, listener.ssl_identity_map
            )
        self._own_pool = False
        self.threadpool = threadpool
        self.checker = None
        self._backend = None
        if self._uses_passwords():
            self._backend = self._make_checker(options, threadpool)
            self.checker = auth.CachingChecker(self._backend, reactor, options.cache_ttl)
        self._authenticators = {
            kind: auth.ChargerAuthenticator(
                reactor,
                self.profile(kind),
                self.checker,
                self.certificate_identity,
                failure_delay=options.failure_delay,
                timeout=options.timeout,
            )
            for kind in self.listener_kinds()
        }

    def listener_kinds(self) -> list[str]:
        listener = self._settings.listener
        return [kind for kind, on in (("tcp", listener.tcp_enabled),
                                      ("ssl", listener.ssl_enabled)) if on]

    def profile(self, kind: str) -> int:
        listener = self._settings.listener
        return listener.tcp_profile if kind == "tcp" else listener.ssl_profile

    def _uses_passwords(self) -> bool:
        return any(self.profile(kind) in (1, 2) for kind in self.listener_kinds())

    def _make_checker(self, options, threadpool):
        if options.checker == "file":
            if threadpool is None:
                threadpool = ThreadPool(minthreads=0, maxthreads=options.hash_threads,
                                        name="ocppgw-passwords")
                self._own_pool = True
                self.threadpool = threadpool
            return auth.PasswordFileChecker(self._reactor, threadpool, options.password_file)
        if options.checker == "http":
            return auth.HttpChecker(self._reactor, options.http_url)
        return auth.AmqpChecker(
            self._reactor,
            auth.amqp_login_url(self._settings.amqp.url, options.amqp_url),
            options.timeout,
        )

    def authenticator(self, kind: str) -> auth.ChargerAuthenticator:
        return self._authenticators[kind]

    def forwarded_certificates(self, kind: str):
        """
        For the plain listener with profile 3: a L{ForwardedCertificate}
        reading the certificate a trusted TLS-ending proxy passes on.
        """
        listener = self._settings.listener
        if kind != "tcp" or listener.tcp_profile != 3:
            return None
        return ForwardedCertificate(listener.client_cert_header, self.trusted_proxies)

    def wrap(self, kind: str, factory):
        """
        The protocol factory to listen with for the listener C{kind}:
        C{factory} (a L{ocppgw.edge.ChargerFactory}, whose C{refusals} and
        C{listener} name the PROXY layer reports to) under TLS and the
        PROXY header, as configured.
        """
        charger_factory = factory
        if kind == "ssl":
            factory = ResumingTLSFactory(self.tls, factory)
        if self._settings.listener.proxy_protocol:
            factory = ProxyHeaderFactory(
                factory, self.trusted_proxies, charger_factory.refusals,
                charger_factory.listener,
            )
        return factory

    def start(self) -> None:
        if self._own_pool and not self.threadpool.started:
            self.threadpool.start()

    def stop(self) -> defer.Deferred:
        stop = getattr(self._backend, "stop", None)
        d = defer.maybeDeferred(stop) if stop is not None else defer.succeed(None)
        if self._own_pool and self.threadpool.started:
            # Joins the workers: at most one hash (~50 ms) is in progress.
            self.threadpool.stop()
        return d

    def reload(self) -> None:
        """Re-read every file; keep what cannot be read (and log why)."""
        if self.tls is not None:
            self.tls.reload()
        if self.certificate_identity is not None:
            self.certificate_identity.reload()
        reload = getattr(self._backend, "reload", None)
        if reload is not None:
            reload()
        if self.checker is not None:
            # A changed password must not be accepted from the cache.
            self.checker.clear()


class ForwardedCertificate:
    """
    The client certificate a TLS-ending proxy (nginx, Envoy, a cloud load
    balancer) verified and passed on in a request header.

    Only requests whose TCP peer -- the proxy itself, not an address a
    PROXY header claims -- is in C{trusted} may use the header; from anyone
    else it is ignored, so a charger cannot forge one by connecting to the
    gateway directly. The proxy must verify the certificate (nginx:
    C{ssl_verify_client on}); ocppgw binds it to the identity.
    """

    def __init__(self, header: str, trusted: TrustedProxies) -> None:
        self.header = header.lower()
        self.trusted = trusted

    def certificate(self, headers: dict, socket_host: str):
        """
        The certificate from C{headers}, or C{None} (no header, untrusted
        sender, or not a PEM certificate).
        """
        from urllib.parse import unquote

        from cryptography import x509

        value = headers.get(self.header)
        if not value:
            return None
        if not self.trusted.trusts(socket_host):
            _log.warn("Ignored {header} from {host}, which is not a trusted proxy",
                      header=self.header, host=socket_host)
            return None
        try:
            return x509.load_pem_x509_certificate(unquote(value).encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return None
