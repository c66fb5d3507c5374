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

import math
import random
import re
from collections import deque
from typing import Iterable, Optional, Protocol as TypingProtocol

from autobahn.twisted.websocket import (
    ConnectionDeny,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from OpenSSL import SSL
from autobahn.websocket.compress import (
    PerMessageDeflate,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol, parseHttpHeader
from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.logger import Logger
import txaio

from ocppgw import refusals
from ocppgw.framing import SOAP_ONLY_SUBPROTOCOLS, VERSIONS, OcppVersion, truncate_for_log
from ocppgw.identity import BadIdentity, identity_from_path
from ocppgw.refusals import Refusals, peer_string as _peer_string
from ocppgw.tls import failure_reason as _tls_failure_reason

_log = Logger()


class Refused(Exception):
    """
    The hub will not take this charger; answered before the upgrade.

    @ivar status: the HTTP status code.
    @ivar reason: a fixed reason phrase (never charger-supplied text).
    @ivar headers: extra response headers, as (name, value) pairs (the
        C{WWW-Authenticate} challenge of a 401).
    """

    def __init__(self, status: int, reason: str, headers=()) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)


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


#: permessage-deflate (RFC 7692) when a listener has C{compress} on. zlib's
#: defaults keep a 32 KiB window and up to ~256 KiB of compressor state per
#: connection for as long as it is open (~100 KiB more RSS per idle
#: charger, bench/compress.py); OCPP messages are a few hundred bytes, so
#: the gateway's compressor uses the smallest window RFC 7692 lets zlib use
#: (2^9 bytes) and memory level, and starts every message afresh (no
#: context takeover), so that it is freed between messages
#: (L{LeanDeflate}). The charger's window is bounded the same way when its
#: offer allows it (C{client_max_window_bits}); otherwise its own choice
#: stands, which costs up to 32 KiB for the decompressor's window. The
#: charger's context is never refused: it keeps its decompressor.
DEFLATE_WINDOW_BITS = 9
DEFLATE_MEM_LEVEL = 1


def accept_deflate(offers) -> Optional[PerMessageDeflateOfferAccept]:
    """
    autobahn's C{perMessageCompressionAccept} for a listener with
    compression: accept the first permessage-deflate offer, tuned as
    described at L{DEFLATE_WINDOW_BITS}.
    """
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(
                offer,
                request_max_window_bits=(
                    DEFLATE_WINDOW_BITS if offer.accept_max_window_bits else 0
                ),
                no_context_takeover=True,
                window_bits=DEFLATE_WINDOW_BITS,
                mem_level=DEFLATE_MEM_LEVEL,
            )
    return None


class LeanDeflate(PerMessageDeflate):
    """
    autobahn's permessage-deflate, minus the compressor it keeps between
    messages: without context takeover it makes a new one for every
    message anyway, and an idle charger would hold its zlib state
    (~9 KiB even with L{accept_deflate}'s small window) for nothing.
    """

    def end_compress_message(self):
        data = super().end_compress_message()
        if self.server_no_context_takeover:
            self._compressor = None
        return data


def refuse_compression(offers) -> None:
    """autobahn's C{perMessageCompressionAccept} for a listener without compression."""
    return None


#: What autobahn keeps per connection that an open connection does not need
#: as its own: leftovers of the opening handshake (never read once open) and
#: flags that keep one value until the connection closes. They are class
#: attributes with these values, and an open connection drops its copies
#: that equal them: ~25 of autobahn's ~70 attributes, so the connection's
#: instance dict can be rebuilt at half the size (bench/memprofile.py).
_HANDSHAKE_LEFTOVERS = (
    "http_headers", "http_request_data", "http_request_host", "http_request_params",
    "http_request_path", "http_request_uri", "http_response_data", "http_status_line",
    "websocket_extensions", "websocket_origin", "websocket_protocols", "_wskey",
    "_transport_details",
)
_UNTIL_CLOSE = {
    "websocket_version": 13,
    "wasServingFlashSocketPolicyFile": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasCloseHandshakeTimeout": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "wasOpenHandshakeTimeout": False,
    "wasServerConnectionDropTimeout": False,
    "closedByMe": False,
    "droppedByMe": False,
    "failedByMe": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "_isMessageCompressed": False,
    "_perMessageCompress": None,
    "trackedTimings": None,
}
#: One traffic counter for all connections: autobahn counts into it on
#: every frame, ocppgw never reads it, and it is ~0.6 KB per connection.
_TRAFFIC_SINK = TrafficStats()

#: Bytes asked of a charger's socket per read. Twisted reads 64 KiB at a
#: time: each read allocates 64 KiB and shrinks it to what came, and with
#: thousands of chargers those shrunken blocks scatter the long-lived
#: objects over the heap so that freed memory cannot be returned. OCPP
#: frames are mostly a few hundred bytes; a large one takes a few more
#: reads. With 10,000 idle chargers this saves about 1.2 KiB of RSS per
#: charger (measured with bench.idle).
READ_SIZE = 4096


def _socket_transport(transport):
    """
    The transport that reads the socket: C{transport} itself, or the one
    under a TLS or PROXY-protocol wrapper.
    """
    while transport is not None and not hasattr(transport, "socket"):
        transport = getattr(transport, "transport", None)
    return transport


class ChargerProtocol(WebSocketServerProtocol):
    """
    One charger's WebSocket. Thin: it forwards to the hub.

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
    #: flow control: not reading from the charger now
    _reading_paused = False
    #: a pong timeout fell while not reading; re-armed on resume
    _ping_timeout_deferred = False

    #: response headers for the refusal being sent (see failHandshake)
    _deny_headers = ()
    #: the request lacked "Connection: Upgrade" and was completed (logged
    #: with the charger's identity once it is known)
    _connection_added = False

    # autobahn's own logger lives at self.log; ours is _log.

    def connectionMade(self) -> None:
        reader = _socket_transport(self.transport)
        if reader is not None and getattr(reader, "bufferSize", 0) > READ_SIZE:
            reader.bufferSize = READ_SIZE
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        # autobahn's, minus a debug line whose arguments it formats for
        # every chunk read even with debug logging off
        self._dataReceived(data)

    def onMessageEnd(self) -> None:
        # autobahn's, minus firing its "message" event for observers
        # (none here), which built a Deferred and callbacks per frame
        if not self.failedByMe:
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None
        # the frame's unmasker, kept by autobahn until the next frame: about
        # 190 B per idle charger
        self.current_frame_masker = None

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
        peer = _peer_string(self.transport.getPeer(), self.peer)
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
        factory = self.factory
        # Behind a PROXY protocol header the real address is known only
        # now (autobahn read it at connectionMade, before the header).
        self.peer = _peer_string(self.transport.getPeer(), self.peer)
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
        admission = factory.admission
        if admission is not None:
            # Before any broker work: a storm must not queue up declares.
            wait = admission.admit()
            if wait is not None:
                self._retry_after = wait
                raise ConnectionDeny(503, "Service Unavailable")
        self.identity = identity
        self.version = version
        authenticator = factory.authenticator
        if authenticator is None:
            d = defer.maybeDeferred(
                factory.hub.charger_connecting, self, identity, self.version
            )
        else:
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
        if admission is not None:

            def finished(result):
                admission.done()
                return result

            d.addBoth(finished)

        def accepted(_):
            # The handshake request is not needed again: drop it, it is
            # ~1.5 KB per idle charger.
            self.http_headers = {}
            self.http_request_data = None
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

        def refused(failure):
            if failure.check(Refused):
                self._deny_headers = failure.value.headers
                raise ConnectionDeny(failure.value.status, failure.value.reason)
            _log.failure(
                "Preparing charger {identity} failed", failure, identity=identity
            )
            raise ConnectionDeny(500, "Internal Server Error")

        return d.addCallbacks(accepted, refused)

    # autobahn gives every connection a send queue (a deque, 0.7 KB) that
    # is only used for sync or chopped writes, which ocppgw makes only when
    # closing: it is created when first used.
    _send_queue = None

    def sendData(self, data: bytes, sync: bool = False, chopsize=None) -> None:
        if sync or chopsize or self._send_queue is not None:
            super().sendData(data, sync, chopsize)
        else:
            # autobahn's own path minus a debug line it formats every time
            self.transport.write(data)

    @property
    def send_queue(self) -> deque:
        queue = self._send_queue
        if queue is None:
            queue = self._send_queue = deque()
        return queue

    @send_queue.setter
    def send_queue(self, queue: deque) -> None:
        if queue:
            self._send_queue = queue
        else:
            self.__dict__.pop("_send_queue", None)

    @property
    def trafficStats(self) -> TrafficStats:
        return _TRAFFIC_SINK

    @trafficStats.setter
    def trafficStats(self, _stats) -> None:
        pass

    def onOpen(self):
        self._count_handshake(101)
        deflate = self._perMessageCompress
        if type(deflate) is PerMessageDeflate:
            # autobahn builds it from its own registry; the subclass only
            # changes what is kept between messages
            deflate.__class__ = LeanDeflate
        self._compact()
        self.factory.hub.charger_opened(self)

    def _compact(self) -> None:
        """
        Drop what the open connection does not need (see L{_UNTIL_CLOSE})
        and rebuild its instance dict at the size of what is left.
        """
        attributes = self.__dict__
        for name in _HANDSHAKE_LEFTOVERS:
            attributes.pop(name, None)
        for name, value in _UNTIL_CLOSE.items():
            current = attributes.get(name, attributes)
            if type(current) is type(value) and current == value:
                del attributes[name]
        if attributes.get("_listeners") is None:
            # autobahn's observer bookkeeping, read only by .on()/.fire()
            # with listeners; nobody subscribes to a charger's events
            attributes.pop("_valid_events", None)
            attributes.pop("_results", None)
        self.__dict__ = dict(attributes)
        # Twisted's transport grew its dict past its 15 attributes too
        transport = self.transport
        if transport is not None and hasattr(transport, "__dict__"):
            transport.__dict__ = dict(transport.__dict__)

    def onOpenHandshakeTimeout(self) -> None:
        if self.state in (
            WebSocketProtocol.STATE_CONNECTING,
            WebSocketProtocol.STATE_PROXY_CONNECTING,
        ):
            self._refuse(refusals.HANDSHAKE_TIMEOUT, f"{self.openHandshakeTimeout:g} s")
        super().onOpenHandshakeTimeout()

    #: the abort that follows a graceful close if the charger does not let go
    _abort_call = None

    def dropConnection(self, abort: bool = False) -> None:
        # autobahn's, with two changes.
        #
        # After a closing handshake the gateway started (1000 on takeover,
        # 1012 on drain, 1001 on shutdown) autobahn, as a server, aborts
        # the TCP connection (WebSocketProtocol.onCloseFrame calls
        # dropConnection(abort=True) when the charger's close frame answers
        # ours): the charger gets a RST, not a FIN, and a load
        # balancer in front logs each of these closes as a session the
        # server broke off (HAProxy: "SD"). RFC 6455 7.1.1 asks the server
        # to close TCP first, and cleanly. So a completed closing handshake
        # (wasClean) ends in a graceful close (FIN; with TLS a close_notify
        # first), and every graceful close is aborted only if the charger
        # has not let go of it within the close timeout (it does not read,
        # or never answers the close_notify).
        #
        # autobahn also warns about every connection dropped without a
        # clean close, with nothing but the peer: one line per client that
        # never finishes its opening handshake, so whoever opens
        # connections would decide how much of the log that fills. Those
        # are refusals (counted, logged rate-limited, see _refuse); a
        # charger's unclean end is in the gateway's disconnect line, with
        # its reason (ping timeout, ...).
        if self.state == WebSocketProtocol.STATE_CLOSED:
            return
        self.unregisterProducer()
        self.droppedByMe = True
        self.state = WebSocketProtocol.STATE_CLOSED
        txaio.resolve(self.is_closed, self)
        if abort and self.wasClean:
            abort = False
        if not abort and self.closeHandshakeTimeout:
            self._abort_call = self.factory._batched_timer.call_later(
                self.closeHandshakeTimeout, self._abort_close
            )
        self._closeConnection(abort)

    def _abort_close(self) -> None:
        self._abort_call = None
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # autobahn's minus its logging: it logs a failed TLS handshake at
        # error level ("SSL error: no shared cipher (in )") without the
        # peer, once per attempt, and everything else at debug. A failed
        # TLS handshake is a refusal: counted by OpenSSL's reason and
        # logged at info, rate-limited, with the peer and that reason.
        call, self._abort_call = self._abort_call, None
        if call is not None:
            call.cancel()
        if isinstance(reason.value, SSL.Error):
            self._tls_failed(reason.value)
        self._connectionLost(reason)

    def _tls_failed(self, error: SSL.Error) -> None:
        why = _tls_failure_reason(error)
        peer = _peer_string(self.transport.getPeer(), self.peer)
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
            self.close(1003, "OCPP-J uses text frames")
            return
        self.factory.hub.charger_frame(self, payload)

    def onClose(self, wasClean: bool, code, reason):
        # autobahn leaves its close-handshake timer running when the
        # charger drops TCP instead of answering our close frame.
        timer = getattr(self, "closeHandshakeTimeoutCall", None)
        if timer is not None:
            timer.cancel()
            self.closeHandshakeTimeoutCall = None
        if self.identity is not None:
            self.factory.hub.charger_closed(self, code, reason or "")

    # -- what the hub can do with a charger -------------------------------

    def pause_reading(self) -> None:
        """
        Stop reading from the charger (flow control): TCP backpressure
        then holds its frames in the network, not in our memory.
        """
        self._reading_paused = True
        transport = self.transport
        if transport is not None:
            transport.pauseProducing()

    def resume_reading(self) -> None:
        self._reading_paused = False
        transport = self.transport
        if transport is not None:
            transport.resumeProducing()
        if self._ping_timeout_deferred:
            self._ping_timeout_deferred = False
            # the pong may be among what we have not read yet: a new timeout
            if self.autoPingPending is not None and self.autoPingTimeout:
                self.autoPingTimeoutCall = self.factory._batched_timer.call_later(
                    self.autoPingTimeout, self.onAutoPingTimeout
                )

    def onAutoPingTimeout(self) -> None:
        # While we do not read, a charger's pong cannot reach us: a broker
        # alarm must not make us drop chargers that are answering.
        if self._reading_paused:
            self.autoPingTimeoutCall = None
            self._ping_timeout_deferred = True
            return
        super().onAutoPingTimeout()

    def send_frame(self, frame: bytes) -> None:
        """
        Send one OCPP-J frame as a text message.
        """
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendMessage(frame, False)

    def close(self, code: int, reason: str) -> None:
        """
        Close with any RFC 6455 code.

        autobahn's C{sendClose} accepts only 1000 and 3000-4999; OCPP needs
        1001, 1002, 1003, 1011 and 1012 too, so the close frame is sent
        directly.
        """
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:120])
        elif self.state in (
            WebSocketProtocol.STATE_CONNECTING,
            WebSocketProtocol.STATE_PROXY_CONNECTING,
        ):
            self.dropConnection(abort=True)



for _name in _HANDSHAKE_LEFTOVERS:
    setattr(ChargerProtocol, _name, None)
for _name, _value in _UNTIL_CLOSE.items():
    setattr(ChargerProtocol, _name, _value)


class _BucketCall:
    __slots__ = ("timer", "due", "func", "args", "kwargs")

    def __init__(self, timer, due, func, args, kwargs):
        self.timer = timer
        self.due = due
        self.func = func
        self.args = args
        self.kwargs = kwargs

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer._cancel(self)
            self.timer = None


class BucketTimer:
    """
    autobahn's per-connection timers (pings, pong and handshake timeouts),
    batched so that ten thousand chargers share a few reactor timers.

    Not txaio's batched timer, which truncates the due time to whole
    seconds (C{int(now + delay)}): a timeout could fire up to a second
    early, so a sub-second pong timeout would drop chargers that do answer.
    Here due times are rounded I{up} to the bucket: never early, at most one
    bucket late.
    """

    def __init__(self, reactor, bucket_seconds: float = 0.2) -> None:
        self._reactor = reactor
        self._bucket = bucket_seconds
        # due bucket number -> (IDelayedCall, set of _BucketCall)
        self._buckets: dict[int, tuple] = {}

    def call_later(self, delay: float, func, *args, **kwargs) -> _BucketCall:
        now = self._reactor.seconds()
        due = math.ceil((now + delay) / self._bucket)
        call = _BucketCall(self, due, func, args, kwargs)
        bucket = self._buckets.get(due)
        if bucket is None:
            delayed = self._reactor.callLater(
                max(0.0, due * self._bucket - now), self._fire, due
            )
            bucket = self._buckets[due] = (delayed, set())
        bucket[1].add(call)
        return call

    def _cancel(self, call: _BucketCall) -> None:
        bucket = self._buckets.get(call.due)
        if bucket is None:
            return
        bucket[1].discard(call)
        if not bucket[1]:
            del self._buckets[call.due]
            bucket[0].cancel()

    def _fire(self, due: int) -> None:
        _delayed, calls = self._buckets.pop(due)
        for call in calls:
            call.timer = None
            try:
                call.func(*call.args, **call.kwargs)
            except Exception:
                _log.failure("Error in a WebSocket timer")


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
        subprotocols: Iterable[str] = ("ocpp1.6", "ocpp2.0", "ocpp2.0.1", "ocpp2.1"),
        max_identity_length: int = 48,
        max_message_size: int = 1048576,
        ping_interval: float = 60.0,
        ping_timeout: float = 30.0,
        handshake_timeout: float = 30.0,
        close_timeout: float = 5.0,
        max_connections: int = 0,
        protocol_class: type = ChargerProtocol,
        admission=None,
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
        options = {}
        for name in protocol_class.CONFIG_ATTRS:
            value = getattr(self, name)
            # a function stored on a class would become a method
            options[name] = staticmethod(value) if callable(value) else value
        options["CONFIG_ATTRS"] = ()
        self.protocol = type(protocol_class.__name__, (protocol_class,), options)

    def retry_after(self) -> int:
        """
        A random C{Retry-After} for a 503, 1 to C{retry_after_max} seconds.
        """
        return random.randint(1, self._retry_after_max)
