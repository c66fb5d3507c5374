"""
How the gateway ends and throttles a charger's autobahn connection.

A mixin for an autobahn C{WebSocketServerProtocol} (before it among the
bases) that changes three things autobahn does its own way:

- closing: any RFC 6455 close code can be sent (autobahn's C{sendClose}
  takes only 1000 and 3000-4999), and a completed closing handshake ends
  in a graceful TCP close, not a reset (see L{ConnectionControl.dropConnection});
- flow control: reading from a charger can be paused (while the broker
  blocks publishing) without the pong timeout dropping chargers whose
  pong is among the bytes not read yet;
- logging: connections that end without a clean close are not each
  warned about; the protocol counts and logs them where it knows why
  (it provides C{_tls_failed(error)} for a failed TLS handshake).
"""

from __future__ import annotations

from OpenSSL import SSL
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
import txaio


class ConnectionControl:
    """
    Closing with any code, gracefully, and pausing reads; see the module
    docstring.
    """

    #: flow control: not reading from the charger now
    _reading_paused = False
    #: a pong timeout fell while not reading; re-armed on resume
    _ping_timeout_deferred = False

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

    def cancel_close_timer(self) -> None:
        """
        Stop autobahn's close-handshake timer, which it leaves running when
        the charger drops TCP instead of answering our close frame.
        """
        timer = getattr(self, "closeHandshakeTimeoutCall", None)
        if timer is not None:
            timer.cancel()
            self.closeHandshakeTimeoutCall = None

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


__all__ = ["ConnectionControl"]
