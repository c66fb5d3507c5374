"""
The WebSocket edge: one autobahn protocol per connected charger.

The wire, as a charger sees it (docs/connecting.md has it for users):

A charger opens C{ws://host:port/<ws_path>/<identity>} (or, with a vhost
configured, C{/<ws_path>/<vhost>/<identity>}) offering one or more OCPP
subprotocols. Before the upgrade ocppgw answers

- 400 when the identity is missing, too long, holds a character that is
  not allowed (a C{.}, C{#}, C{/}, a control character, bad percent
  escapes) or is just C{*}; when no offered subprotocol is enabled (or only
  the SOAP-era C{ocpp1.2}/C{ocpp1.5} are);
- 426 when a plain GET arrives without an upgrade;
- 503 when the broker is not reachable, the connection limit is reached,
  or more chargers arrive than the accept rate or the number of concurrent
  handshakes allows (a reconnection storm); every 503 carries a
  C{Retry-After} of a random 1 to C{retry_after_max} seconds, so that
  refused chargers come back spread out;

and otherwise 101 with the first subprotocol I{in the charger's order of
preference} that is enabled. No C{Server} banner is sent.

What real chargers send is accepted where it is harmless
(docs/field-compatibility.md lists each quirk and who sends it):
subprotocol names in another case (C{OCPP1.6}; matched case-insensitively, and the 101 echoes
the charger's own spelling, as RFC 6455 §4.2.2 asks), empty entries in the
offer (C{,ocpp2.0.1}), no C{Sec-WebSocket-Protocol} at all when the
listener has a C{default_subprotocol} (the 101 then names none: RFC 6455
forbids echoing what was not offered), a missing C{Connection: Upgrade}
in an otherwise complete upgrade request, and one trailing C{/} after the
identity. None of them changes who the charger is or how it
authenticates.

After the upgrade every text message is one OCPP-J frame, handed to the
charger's session. A binary message is closed with 1003, a message over
the size limit with 1009 (autobahn's default would drop TCP instead: its
C{failByDrop} is switched off; with compression the limit applies to the
inflated message). The server pings every C{idle_timeout} seconds and
drops a charger from which nothing -- no pong, no frame -- comes in
C{ping_timeout}: chargers that never answer pings but talk stay.
permessage-deflate is off unless the listener's C{compress} is set (see
L{accept_deflate}).

This module only translates between autobahn and the L{ChargerHub} (the
gateway); it holds no OCPP or AMQP logic. autobahn turns exceptions raised
in C{onConnect} into a 500 with nothing but a warning, so every refusal
here is an explicit L{ConnectionDeny} with a fixed, safe reason: the
decoded identity is never echoed into the HTTP status line.
"""

from __future__ import annotations

import random
import re
from typing import Iterable, Optional, Protocol as TypingProtocol

from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from OpenSSL import SSL
from autobahn.websocket.protocol import WebSocketProtocol, parseHttpHeader
from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger

from ocppgw import refusals
from ocppgw.closecodes import CloseCode
from ocppgw.connection_control import ConnectionControl
from ocppgw.framing import SOAP_ONLY_SUBPROTOCOLS, VERSIONS, OcppVersion, truncate_for_log
from ocppgw.identity import BadIdentity, identity_from_path
from ocppgw.refusals import Refused, Refusals, peer_string
from ocppgw.tls import failure_reason as tls_failure_reason
from ocppgw.trims import (  # noqa: F401 (LeanDeflate, READ_SIZE: public here too)
    READ_SIZE, BucketTimer, LeanDeflate, TrimmedWebSocket, accept_deflate, refuse_compression,
)

_log = Logger()


def _finally(call):
    """A Deferred callback that calls C{call()} and passes the result on."""

    def passing(result):
        call()
        return result

    return passing


class ChargerHub(TypingProtocol):
    """
    What the edge needs from the gateway.
    """

    def charger_connecting(
        self, edge: "ChargerProtocol", identity: str, version: OcppVersion
    ) -> defer.Deferred:
        """Prepare for a charger; fail with L{Refused} to turn it away."""

    def charger_opened(self, edge: "ChargerProtocol") -> None:
        """The WebSocket is open: start the charger's session."""

    def charger_frame(self, edge: "ChargerProtocol", data: bytes) -> None:
        """A text frame arrived."""

    def charger_closed(self, edge: "ChargerProtocol", code: Optional[int], reason: str) -> None:
        """The connection is gone, however it ended."""


def choose_subprotocol(offered: Iterable[str], enabled: Iterable[str]) -> Optional[str]:
    """
    The first subprotocol the charger offers that is enabled here, spelled
    as the charger spelled it; C{VERSIONS[chosen.lower()]} is its version.

    The charger's order wins, as RFC 6455 leaves the choice to the server
    and a charger lists what it prefers first. Names are compared without
    regard to case (chargers in the field send C{OCPP1.6}), but the 101
    must echo a value the charger offered (RFC 6455 §4.2.2), hence its own
    spelling. SOAP-only OCPP versions can never be chosen, even if
    misconfigured.
    """
    enabled = {name.lower() for name in enabled} - SOAP_ONLY_SUBPROTOCOLS
    for candidate in offered:
        candidate = candidate.strip()
        if candidate.lower() in enabled:
            return candidate
    return None


# A Connection header that names the "upgrade" token (RFC 7230 §6.1: a
# comma-separated list, case-insensitive), as a request line starts it.
_CONNECTION_UPGRADE = re.compile(
    rb"\r\nconnection:[ \t]*(?:[^\r]*,[ \t]*)?upgrade[ \t]*[,\r]", re.IGNORECASE
)
_CONNECTION_LINE = b"Connection: Upgrade\r\n"


def add_connection_upgrade(data: bytes) -> Optional[bytes]:
    """
    The buffered request C{data} with a C{Connection: Upgrade} line added,
    or C{None} to leave it alone.

    RFC 6455 §4.1 makes C{Connection: Upgrade} part of a WebSocket
    upgrade and autobahn refuses a request without it, but chargers in the
    field omit it (Autel MaxiCharger firmware 1.38). A request that has
    C{Upgrade: websocket}, a C{Sec-WebSocket-Key} and
    C{Sec-WebSocket-Version: 13} can only be a WebSocket upgrade, so the
    missing token is added; anything else (a plain GET, another upgrade,
    an older WebSocket draft, a malformed header block) is left for
    autobahn to answer as it always does.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = data[: end + 4]
    if _CONNECTION_UPGRADE.search(head):
        return None
    try:
        _status, headers, _counts = parseHttpHeader(head)
    except ValueError:
        return None
    upgrade = headers.get("upgrade", "")
    if not any(token.strip().lower() == "websocket" for token in upgrade.split(",")):
        return None
    if "sec-websocket-key" not in headers:
        return None
    if headers.get("sec-websocket-version", "").strip() != "13":
        return None
    # A second Connection line, if there was one without the token, is
    # joined to the first by autobahn's parser ("keep-alive, Upgrade").
    return data[: end + 2] + _CONNECTION_LINE + data[end + 2 :]


class ChargerProtocol(TrimmedWebSocket, ConnectionControl, WebSocketServerProtocol):
    """
    One charger's WebSocket. Thin: it forwards to the hub.

    The handshake is three steps (L{_check_request}, L{_admit},
    L{_authenticate}); after it, frames go to the hub and the hub's
    frames and closes come back. What it changes of autobahn itself is in
    its two mixins: L{TrimmedWebSocket} (memory per connection) and
    L{ConnectionControl} (closing, pausing reads).

    @ivar identity: the charger identity, once the handshake is accepted.
    @ivar version: the negotiated L{OcppVersion}.
    """

    identity: Optional[str] = None
    version: Optional[OcppVersion] = None
    #: the hub's object for this charger, set by the hub when the
    #: handshake claims the identity and cleared when it is done with it
    link = None
    #: seconds for the Retry-After of a 503 answer
    _retry_after = None

    #: response headers for the refusal being sent (see failHandshake)
    _deny_headers = ()
    #: counted by the factory's L{ocppgw.acceptgate.AcceptGate} until it
    #: opens or goes
    _in_gate = False
    #: the request lacked "Connection: Upgrade" and was completed (logged
    #: with the charger's identity once it is known)
    _connection_added = False

    # autobahn's own logger lives at self.log; ours is _log.

    def _dataReceived(self, data: bytes) -> None:
        # autobahn buffers the opening handshake without a bound; a client
        # that streams headers forever would grow it until the handshake
        # timeout. Refuse oversized requests outright.
        if (
            self.state == WebSocketProtocol.STATE_CONNECTING
            and len(self.data) + len(data) > self.factory.max_request_size
        ):
            self._refuse(refusals.REQUEST_TOO_LARGE, status=431)
            self._count_handshake(431, "Request Header Fields Too Large")
            self.sendHttpErrorResponse(431, "Request Header Fields Too Large")
            self.dropConnection(abort=True)
            return
        super()._dataReceived(data)

    def _refuse(self, reason: str, detail: Optional[str] = None, **fields) -> None:
        """Count and log (rate-limited) a refusal before the upgrade."""
        factory = self.factory
        peer = peer_string(self.transport.getPeer(), self.peer)
        factory.refusals.refused(factory.listener, reason, peer, detail, **fields)

    def processHandshake(self) -> None:
        # autobahn checks for "Connection: Upgrade" while it parses the
        # request, with no hook in between; a charger that omits it (see
        # add_connection_upgrade) gets the missing line added to the
        # buffered request before autobahn parses it, so that the rest of
        # autobahn's handshake and every other check run unchanged.
        if self.http_headers is None:
            completed = add_connection_upgrade(self.data)
            if completed is not None:
                self.data = completed
                self._connection_added = True
        super().processHandshake()

    def _count_handshake(self, status: int, reason: str = "") -> None:
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.handshake(
                self.factory.listener, status, peer=self.peer, identity=self.identity,
                reason=reason,
            )

    def failHandshake(self, reason: str, code: int = 400, responseHeaders=None):
        # Every refusal before the upgrade ends here (ours, a
        # ConnectionDeny from onConnect, and autobahn's own: 426, malformed
        # requests) except the oversized request above.
        self._count_handshake(code, reason)
        # autobahn passes only the status and reason of a ConnectionDeny
        # on; a 401 must also carry the Basic challenge.
        headers = list(responseHeaders or ()) + list(self._deny_headers)
        # Every 503 (storm, broker down, shutting down, connection limit)
        # says when to come back, at a random moment so that the refused
        # chargers do not return together.
        if code == 503:
            wait = self._retry_after or self.factory.retry_after()
            headers.append(("Retry-After", str(wait)))
        if code == 431:
            # autobahn's, without its info line for every refusal: a
            # header limit is logged, rate-limited, where it is found.
            self.wasNotCleanReason = reason
            self.sendHttpErrorResponse(code, reason, headers or None)
            self.dropConnection(abort=False)
            return None
        return super().failHandshake(reason, code, headers or None)

    def _peer_certificate(self, request):
        """
        The verified client certificate (cryptography), or None: from our
        own TLS, or passed on by a trusted TLS-ending proxy.
        """
        get = getattr(self.transport, "getPeerCertificate", None)
        if get is not None:
            certificate = get()
            return certificate.to_cryptography() if certificate is not None else None
        forwarded = self.factory.forwarded_certificates
        if forwarded is None:
            return None
        # The TCP peer itself (under a PROXY header wrapper: its transport).
        socket_transport = getattr(self.transport, "transport", None) or self.transport
        return forwarded.certificate(request.headers, socket_transport.getPeer().host)

    def _negotiate(self, identity: str, protocols, quirks: list):
        """
        The subprotocol to echo in the 101 (C{None} for none) and the
        version to serve, for the charger's offer C{protocols}; what it
        needed beyond the rules is added to C{quirks}.

        @raise ConnectionDeny: 400, nothing to serve it as.
        """
        factory = self.factory
        # autobahn reads an empty header, or an empty entry (",ocpp2.0.1"),
        # as an offer of ""
        offered = [p for p in protocols if p]
        if offered:
            subprotocol = choose_subprotocol(offered, factory.subprotocols)
            if subprotocol is None:
                _log.info(
                    "Refused {identity} from {peer}: no supported subprotocol in {offered}",
                    identity=identity,
                    peer=self.peer,
                    offered=[truncate_for_log(p, 40) for p in offered[:8]],
                    event="refused",
                    status=400,
                )
                raise ConnectionDeny(400, "No supported OCPP subprotocol")
            version = VERSIONS[subprotocol.lower()]
            if subprotocol != version.subprotocol:
                quirks.append(f"subprotocol spelled {truncate_for_log(subprotocol, 40)}")
            return subprotocol, version
        if factory.default_subprotocol is not None:
            # The 101 names no subprotocol: RFC 6455 §4.2.2 forbids
            # echoing one the charger did not offer.
            version = VERSIONS[factory.default_subprotocol]
            quirks.append(f"no subprotocol offered, served as {version.subprotocol}")
            return None, version
        _log.info(
            "Refused {identity} from {peer}: it offers no subprotocol (set "
            "{key} to serve such chargers as one OCPP version)",
            identity=identity,
            peer=self.peer,
            key=factory.default_subprotocol_key,
            event="refused",
            status=400,
        )
        raise ConnectionDeny(400, "No OCPP subprotocol offered")

    def onConnect(self, request):
        # Three steps: refusals that need nothing but the request, then
        # admission (storm limits), then authentication and the hub.
        # Behind a PROXY protocol header the real address is known only
        # now (autobahn read it at connectionMade, before the header).
        self.peer = peer_string(self.transport.getPeer(), self.peer)
        identity, subprotocol, version, quirks = self._check_request(request)
        admission = self._admit()
        self.identity = identity
        self.version = version
        d = self._authenticate(request, identity, version)
        if admission is not None:
            d.addBoth(_finally(admission.done))
        return d.addCallbacks(
            self._accepted, self._refused,
            callbackArgs=(identity, subprotocol, quirks), errbackArgs=(identity,),
        )

    def _check_request(self, request):
        """
        The refusal step: what the request alone decides.

        @return: the charger's identity, the subprotocol to echo, the
            version to serve and the field-compatibility quirks it needed.
        @raise ConnectionDeny: 431 or 400.
        """
        factory = self.factory
        if self.http_request_data.count(b"\n") > factory.max_request_headers:
            self._refuse(refusals.TOO_MANY_HEADERS, status=431)
            raise ConnectionDeny(431, "Request Header Fields Too Large")
        try:
            identity = identity_from_path(
                self.http_request_uri,
                factory.ws_path,
                factory.vhost,
                factory.max_identity_length,
            )
        except BadIdentity as error:
            _log.info(
                "Refused {peer}: bad identity ({why})", peer=self.peer, why=str(error),
                event="refused", status=400,
            )
            raise ConnectionDeny(400, "Bad charger identity")
        quirks = []
        if self._connection_added:
            quirks.append("no 'Connection: Upgrade'")
        if self.http_request_uri.partition("?")[0].endswith("/"):
            quirks.append("'/' after the identity")
        subprotocol, version = self._negotiate(identity, request.protocols, quirks)
        return identity, subprotocol, version, quirks

    def _admit(self):
        """
        The admission step, before any broker work: a storm must not
        queue up declares.

        @return: the L{ocppgw.limits.Admission} to tell when this
            handshake is done, or C{None} without accept limits.
        @raise ConnectionDeny: 503, with a C{Retry-After} it chose.
        """
        admission = self.factory.admission
        if admission is not None:
            wait = admission.admit()
            if wait is not None:
                self._retry_after = wait
                raise ConnectionDeny(503, "Service Unavailable")
        return admission

    def _authenticate(self, request, identity: str, version: OcppVersion) -> defer.Deferred:
        """
        The authentication step: check the charger's credentials (when the
        listener has an authenticator), then let the hub prepare for it.
        """
        factory = self.factory
        authenticator = factory.authenticator
        if authenticator is None:
            return defer.maybeDeferred(
                factory.hub.charger_connecting, self, identity, self.version
            )
        d = authenticator.authenticate(
            identity,
            # the version's own name: how a password is compared
            # depends on it, never on the charger's spelling
            version.subprotocol,
            request.headers.get("authorization"),
            self._peer_certificate(request),
            self.peer,
        )
        d.addCallback(
            lambda _: factory.hub.charger_connecting(self, identity, self.version)
        )
        return d

    def _accepted(self, _, identity: str, subprotocol: Optional[str], quirks: list):
        self.drop_request()
        self.__dict__.pop("_connection_added", None)
        if quirks:
            _log.info(
                "Charger {identity} from {peer} needed field compatibility: {quirks}",
                identity=identity,
                peer=self.peer,
                quirks="; ".join(quirks),
                event="quirks",
            )
        return subprotocol

    def _refused(self, failure, identity: str):
        if failure.check(Refused):
            self._deny_headers = failure.value.headers
            raise ConnectionDeny(failure.value.status, failure.value.reason)
        _log.failure(
            "Preparing charger {identity} failed", failure, identity=identity
        )
        raise ConnectionDeny(500, "Internal Server Error")

    def connectionMade(self) -> None:
        super().connectionMade()
        gate = self.factory.gate
        if gate is not None:
            self._in_gate = True
            gate.connection_made()

    def _leave_gate(self) -> None:
        if self._in_gate:
            del self._in_gate
            self.factory.gate.handshake_over()

    def connectionLost(self, reason=connectionDone) -> None:
        self._leave_gate()
        super().connectionLost(reason)

    def onOpen(self):
        self._leave_gate()
        self._count_handshake(101)
        self.trim_open()
        self.factory.hub.charger_opened(self)

    def onOpenHandshakeTimeout(self) -> None:
        if self.state in (
            WebSocketProtocol.STATE_CONNECTING,
            WebSocketProtocol.STATE_PROXY_CONNECTING,
        ):
            self._refuse(refusals.HANDSHAKE_TIMEOUT, f"{self.openHandshakeTimeout:g} s")
        super().onOpenHandshakeTimeout()

    def _tls_failed(self, error: SSL.Error) -> None:
        why = tls_failure_reason(error)
        peer = peer_string(self.transport.getPeer(), self.peer)
        if self.state in (
            WebSocketProtocol.STATE_CONNECTING,
            WebSocketProtocol.STATE_PROXY_CONNECTING,
        ):
            self.factory.refusals.tls_failed(self.factory.listener, peer, why)
        else:
            _log.info(
                "TLS error on the connection of {identity} from {peer}: {why}",
                identity=self.identity, peer=peer, why=why, listener=self.factory.listener,
            )

    def onMessage(self, payload: bytes, isBinary: bool):
        if isBinary:
            self.close(CloseCode.UNSUPPORTED_DATA, "OCPP-J uses text frames")
            return
        self.factory.hub.charger_frame(self, payload)

    def onClose(self, wasClean: bool, code, reason):
        self.cancel_close_timer()
        if self.identity is not None:
            self.factory.hub.charger_closed(self, code, reason or "")

    # -- what the hub can do with a charger (and close, pause_reading,
    # resume_reading of ConnectionControl) ---------------------------------

    def send_frame(self, frame: bytes) -> None:
        """
        Send one OCPP-J frame as a text message.
        """
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendMessage(frame, False)

class ChargerFactory(WebSocketServerFactory):
    """
    Builds L{ChargerProtocol}s for one listener.

    The listener's options are set once on a protocol class made for this
    factory: autobahn otherwise copies ~40 option attributes into every
    connection's instance dict and formats them for a debug line on each
    connect, which costs memory per idle charger and CPU per connect.
    """

    def __init__(
        self,
        hub: ChargerHub,
        reactor,
        *,
        ws_path: str = "/ocpp",
        vhost: Optional[str] = None,
        subprotocols: Iterable[str] = tuple(VERSIONS),
        max_identity_length: int = 48,
        max_message_size: int = 1048576,
        ping_interval: float = 60.0,
        ping_timeout: float = 30.0,
        handshake_timeout: float = 30.0,
        close_timeout: float = 5.0,
        max_connections: int = 0,
        protocol_class: type = ChargerProtocol,
        admission=None,
        gate=None,
        retry_after_max: int = 10,
        authenticator=None,
        forwarded_certificates=None,
        max_request_size: int = 16384,
        max_request_headers: int = 100,
        listener: str = "ws",
        metrics=None,
        refusals: Optional[Refusals] = None,
        default_subprotocol: Optional[str] = None,
        default_subprotocol_key: str = "listener.default_subprotocol",
        compress: bool = False,
    ) -> None:
        """
        @param listener: this listener's name in metrics and C{/chargers}.
        @param metrics: an L{ocppgw.metrics.Metrics} told of every
            handshake answered, or C{None}.
        @param refusals: where refusals before the upgrade are counted and
            logged (shared by a gateway's listeners); by default one of
            this listener's own.
        @param default_subprotocol: the version a charger that offers no
            subprotocol at all is served as (one of C{subprotocols}), or
            C{None} to refuse it with 400.
        @param default_subprotocol_key: the configuration key that sets
            C{default_subprotocol}, named when such a charger is refused.
        @param compress: negotiate permessage-deflate (see
            L{accept_deflate}) when a charger offers it.
        @param gate: the process's L{ocppgw.acceptgate.AcceptGate}, told of
            every connection until it opens or goes, or C{None}.
        """
        super().__init__(reactor=reactor)
        self.hub = hub
        #: an L{ocppgw.auth.ChargerAuthenticator}, or None (no authentication)
        self.authenticator = authenticator
        #: an L{ocppgw.listeners.ForwardedCertificate}, or None
        self.forwarded_certificates = forwarded_certificates
        #: bytes and lines an opening handshake request may have
        self.max_request_size = max_request_size
        self.max_request_headers = max_request_headers
        self.listener = listener
        self.metrics = metrics
        self.refusals = refusals if refusals is not None else Refusals(reactor, metrics)
        self.ws_path = ws_path
        self.vhost = vhost or None
        self.subprotocols = tuple(subprotocols)
        if default_subprotocol is not None and default_subprotocol not in self.subprotocols:
            raise ValueError(
                f"default_subprotocol {default_subprotocol} is not one of {self.subprotocols}"
            )
        self.default_subprotocol = default_subprotocol
        self.default_subprotocol_key = default_subprotocol_key
        self.max_identity_length = max_identity_length
        #: an L{ocppgw.limits.Admission}, or None for no accept limits
        self.admission = admission
        self.gate = gate
        self._retry_after_max = max(1, retry_after_max)
        # no version banner anywhere
        self.server = None
        self.setProtocolOptions(
            webStatus=False,
            failByDrop=False,
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout if ping_interval else 0,
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=close_timeout,
            maxConnections=max_connections,
            perMessageCompressionAccept=accept_deflate if compress else refuse_compression,
            # Any frame from the charger proves it is alive, as a pong
            # would: some chargers never answer pings but talk often
            # enough (autobahn's default; the gateway relies on it).
            autoPingRestartOnAnyTraffic=True,
        )
        self._batched_timer = BucketTimer(reactor)
        self.protocol = self._configured(protocol_class)

    def _configured(self, protocol_class: type) -> type:
        """
        A subclass of C{protocol_class} with this factory's options as
        class attributes, so that no connection copies them.
        """
        options = {}
        for name in protocol_class.CONFIG_ATTRS:
            value = getattr(self, name)
            # a function stored on a class would become a method
            options[name] = staticmethod(value) if callable(value) else value
        options["CONFIG_ATTRS"] = ()
        return type(protocol_class.__name__, (protocol_class,), options)

    def retry_after(self) -> int:
        """
        A random C{Retry-After} for a 503, 1 to C{retry_after_max} seconds.
        """
        return random.randint(1, self._retry_after_max)
