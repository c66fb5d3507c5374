"""
One AMQP connection to one broker node, and the guard around it.

A broker connection can die at any moment: a node killed hard, a network
partition, the broker closing it. pika's Twisted adapter reacts to a lost
connection by tearing it down channel by channel, calling every channel's
close callbacks in turn, then the connection's. Anything one of those
callbacks sends (a requeue, a cancel, a publish) raises
C{ConnectionWrongStateError}; the exception escapes into pika, its
teardown stops half way, and the connection's close callback never runs.
Channels pika still reports open may belong to a connection that is gone,
and a delivery tag is only meaningful on the connection it came on.

So a L{BrokerConnection} decides for itself whether it is alive:

- it learns of the loss I{first}, before pika starts its teardown: the
  Twisted protocol's C{connectionLost}, a C{connection.close} from the
  broker (seen by the frame reader before pika handles it), a silent link
  (L{Watchdog}), or an error while handling the broker's frames;
- from that moment L{BrokerConnection.alive} is false, L{write} and
  L{call} do nothing, every L{wait} fails with L{BrokerUnavailable}, and
  the owner is told once (C{on_lost});
- every callback ocppgw gives pika runs through L{guarded}: it logs and
  never lets an exception escape into pika;
- pika's own teardown still runs, guarded too, for its bookkeeping; what
  it calls back finds ocppgw's channel roles already retired.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional
from urllib.parse import urlsplit

import pika
import pika.exceptions
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.logger import Logger

from ocppgw.amqp.errors import BrokerUnavailable
from ocppgw.amqp.reader import FrameReader
from ocppgw.logs import mask_url

_log = Logger()

#: pika's exceptions for a method sent on a channel or connection that is
#: closing or closed: after a loss they mean "too late", not a bug.
_TOO_LATE = (
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.ChannelWrongStateError,
    pika.exceptions.ChannelClosed,
    pika.exceptions.ConnectionClosed,
)


def guarded(callback: Callable, what: str) -> Callable:
    """
    C{callback}, wrapped so that an exception it raises is logged and
    never reaches pika (which would abort whatever loop called it).
    """

    @functools.wraps(callback)
    def guard(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except Exception:
            _log.failure("Error in {what} (called by the AMQP client)", what=what)
            return None

    return guard


def endpoint_for(reactor, url: str, timeout: float):
    """
    The client endpoint for an AMQP URL.

    pika's Twisted connection ignores host and port in its parameters
    (Twisted makes the connection), so they are read from the URL here.
    """
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    if parts.scheme == "amqps":
        endpoint = HostnameEndpoint(reactor, host, parts.port or 5671, timeout=timeout)
        return wrapClientTLS(optionsForClientTLS(host), endpoint)
    return HostnameEndpoint(reactor, host, parts.port or 5672, timeout=timeout)


class _GuardedProtocol(TwistedProtocolConnection):
    """
    pika's Twisted protocol, telling its L{BrokerConnection} of a loss
    before pika reacts to it, and keeping pika's exceptions in.
    """

    owner: Optional["BrokerConnection"] = None

    def dataReceived(self, data: bytes) -> None:
        try:
            self._impl.data_received(data)
        except Exception:
            # pika's state after a half-handled frame is unknown: start afresh
            _log.failure("Error handling the broker's frames: dropping the connection")
            if self.owner is not None:
                self.owner.lose("error handling the broker's frames")

    def connectionLost(self, reason=None) -> None:
        owner = self.owner
        if owner is not None:
            owner._transport_lost(reason)
        try:
            super().connectionLost(reason)
        except Exception:
            # our state is already right; pika's teardown is bookkeeping
            _log.failure("The AMQP client failed tearing down a lost connection")
        if owner is not None and not owner.gone.called:
            owner.gone.callback(None)


class BrokerConnection:
    """
    One AMQP connection, from TCP connect until it is lost or closed.

    @ivar url: the broker URL (with its password; use L{shown_url}).
    @ivar alive: whether frames may be sent: true once the AMQP handshake
        is done, false from the moment the loss is seen.
    @ivar lost_reason: why it was lost, once it is.
    @ivar gone: fires once the TCP connection is closed (and pika has
        torn its side down).
    """

    def __init__(self, reactor, url: str, parameters: pika.ConnectionParameters,
                 on_lost: Callable[["BrokerConnection", str], None]) -> None:
        self._reactor = reactor
        self.url = url
        self.alive = False
        self.lost_reason: Optional[str] = None
        self.protocol = _GuardedProtocol(parameters, custom_reactor=reactor)
        self.protocol.owner = self
        self.impl = self.protocol._impl
        self.reader = None
        self._on_lost = on_lost
        self._waits: set[defer.Deferred] = set()
        self.gone: defer.Deferred = defer.Deferred()
        self._watchdog: Optional[Watchdog] = None

    @property
    def shown_url(self) -> str:
        return mask_url(self.url)

    # -- opening ---------------------------------------------------------------

    @defer.inlineCallbacks
    def open(self, timeout: float):
        """
        Connect and do the AMQP handshake, within C{timeout} seconds.

        @raise BrokerUnavailable: with the broker's reason where there is one.
        """
        # pika's Twisted connection reports a failed open as a bare
        # AMQPConnectionError; keep the broker's reason for the message.
        open_errors: list = []
        self.impl.add_on_open_error_callback(
            guarded(lambda _c, error: open_errors.append(error), "the open error callback"),
            remove_default=False,
        )
        try:
            yield connectProtocol(endpoint_for(self._reactor, self.url, timeout), self.protocol)
        except Exception as error:
            # the link names the URL (and the setting it comes from)
            self.lost_reason = str(error)
            raise BrokerUnavailable(str(error)) from error
        _no_delay(self.protocol.transport)
        timer = self._reactor.callLater(timeout, self._abort_transport)
        try:
            yield self.protocol.ready
        except Exception as error:
            # pika calls our error callback right after the one that
            # failed `ready`: give it that turn.
            yield task.deferLater(self._reactor, 0, lambda: None)
            reason = open_errors[0] if open_errors else error
            if isinstance(reason, (ConnectionDone, ConnectionLost)):
                # The adapter overwrites the broker's close reason with the
                # TCP close that follows it; a close during the AMQP
                # handshake is the broker refusing the login or vhost.
                why = "the broker closed the connection during login " \
                    "(check user, password and access to the vhost)"
            else:
                why = repr(reason)
            self._abort_transport()
            raise BrokerUnavailable(f"AMQP connection to {self.shown_url} failed: {why}") from error
        finally:
            if timer.active():
                timer.cancel()
        if self.lost_reason is not None:
            raise BrokerUnavailable(self.lost_reason)
        self.alive = True
        self.reader = FrameReader.install(self.impl)
        self.reader.on_connection_close = self._broker_closes

    def watch(self, heartbeat: float) -> None:
        """
        Treat the connection as lost when the broker is silent for longer
        than its heartbeat allows (see L{Watchdog}); 0 turns it off.
        """
        if heartbeat > 0 and self.alive:
            self._watchdog = Watchdog(self._reactor, self, heartbeat)
            self._watchdog.start()

    # -- sending, guarded ------------------------------------------------------

    def write(self, frames) -> bool:
        """
        Send frames encoded by L{ocppgw.amqp.wire}, if the connection is alive.

        @return: whether they were written.
        """
        if not self.alive:
            return False
        impl = self.impl
        if impl._transport is None:
            self.lose("the connection's transport is gone")
            return False
        impl._output_marshaled_frames(frames)
        return True

    def call(self, method: Callable, *args, **kwargs) -> bool:
        """
        Call a pika method that sends a frame (C{basic_nack},
        C{basic_cancel}, C{channel.close}, ...), if the connection is alive.

        @return: whether it was sent.
        """
        if not self.alive:
            return False
        try:
            method(*args, **kwargs)
        except _TOO_LATE as error:
            _log.debug("AMQP method not sent: {error!r}", error=error)
            return False
        return True

    def wait(self, d: defer.Deferred) -> defer.Deferred:
        """
        C{d}'s result, or L{BrokerUnavailable} if the connection is lost
        first (pika never fires the callbacks of a lost channel's methods).
        """
        if self.lost_reason is not None:
            d.addErrback(lambda _f: None)
            return defer.fail(BrokerUnavailable(self.lost_reason))
        waiter: defer.Deferred = defer.Deferred()
        self._waits.add(waiter)

        def done(result):
            # once the loss has failed the waiter, the late result is dropped
            if waiter in self._waits:
                self._waits.discard(waiter)
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        d.addBoth(done)
        return waiter

    def channel(self) -> defer.Deferred:
        """
        Open a plain pika channel (not the Twisted wrapper: see
        L{ocppgw.amqp.channels}).
        """
        d: defer.Deferred = defer.Deferred()
        if not self.call(self.impl.channel,
                         on_open_callback=guarded(d.callback, "a channel's open callback")):
            return defer.fail(BrokerUnavailable(self.lost_reason or "not connected"))
        return self.wait(d)

    # -- the end ---------------------------------------------------------------

    def lose(self, why: str) -> None:
        """
        Give up on this connection: it is lost from now on, and its TCP
        connection is aborted (not closed: a stalled peer would never let
        a graceful close finish).
        """
        self._mark_lost(why)
        self._abort_transport()

    def close(self, timeout: float) -> defer.Deferred:
        """
        Close gracefully (connection.close, then TCP), aborting after
        C{timeout} seconds.

        @return: a Deferred firing once the TCP connection is gone, or
            aborted.
        """
        if self.gone.called or self.protocol.transport is None:
            self._mark_lost("closed by ocppgw")
            return defer.succeed(None)
        self._mark_lost("closed by ocppgw")
        try:
            if not self.impl.is_closed and not self.impl.is_closing:
                self.impl.close()
        except Exception:
            # pika refuses to close what it considers closed already
            self._abort_transport()
        done: defer.Deferred = defer.Deferred()

        def give_up():
            self._abort_transport()
            if not done.called:
                done.callback(None)

        timer = self._reactor.callLater(timeout, give_up)

        def finished(_):
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        self.gone.addBoth(finished)
        return done

    def _abort_transport(self) -> None:
        transport = self.protocol.transport
        if transport is None or self.gone.called:
            return
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    def _broker_closes(self, reply_code: int, reply_text: str) -> None:
        self._mark_lost(f"the broker closed the connection: {reply_code} {reply_text}")

    def _transport_lost(self, reason) -> None:
        why = reason.getErrorMessage() if reason is not None else "connection lost"
        self._mark_lost(f"connection to {self.shown_url} lost: {why}")

    def _mark_lost(self, why: str) -> None:
        if self.lost_reason is not None:
            return
        self.lost_reason = why
        self.alive = False
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        waits, self._waits = self._waits, set()
        for waiter in waits:
            waiter.errback(BrokerUnavailable(why))
        guarded(self._on_lost, "the broker connection's loss handler")(self, why)


def _no_delay(transport) -> None:
    """
    Nagle off: small AMQP writes otherwise wait for the broker's delayed
    ACK (~40 ms a round trip).
    """
    no_delay = getattr(transport, "setTcpNoDelay", None)
    if no_delay is None and hasattr(transport, "getHandle"):
        no_delay = getattr(transport.getHandle(), "setTcpNoDelay", None)
    if no_delay is not None:
        no_delay(True)


class Watchdog:
    """
    Declares a connection lost when nothing came from the broker for
    longer than the AMQP heartbeat allows.

    RabbitMQ sends a heartbeat frame every half heartbeat interval on an
    otherwise idle connection, so a whole interval of silence is two
    missed heartbeats. pika has a heartbeat checker of its own, but it
    closes the connection gracefully, which never completes on a stalled
    link; this one aborts it. A tick that comes late (the reactor was busy,
    so the socket may hold unread bytes) does not judge: the next one,
    after the reactor has read again, does.
    """

    def __init__(self, clock, connection: BrokerConnection, heartbeat: float) -> None:
        self._clock = clock
        self._connection = connection
        self._limit = float(heartbeat)
        self._interval = max(0.25, heartbeat / 4.0)
        self._loop: Optional[task.LoopingCall] = None
        self._seen = -1
        self._last_activity = 0.0
        self._last_tick = 0.0

    def start(self) -> None:
        now = self._clock.seconds()
        self._seen = self._connection.impl.bytes_received
        self._last_activity = self._last_tick = now
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(
            lambda f: _log.failure("AMQP watchdog failed", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> None:
        now = self._clock.seconds()
        late = now - self._last_tick > self._interval * 1.5
        self._last_tick = now
        received = self._connection.impl.bytes_received
        if received != self._seen:
            self._seen = received
            self._last_activity = now
            return
        if late:
            return
        silent = now - self._last_activity
        if silent > self._limit:
            _log.warn(
                "Nothing from the broker for {silent:.1f} s (heartbeat {heartbeat:g} s): "
                "treating the connection as lost",
                silent=silent, heartbeat=self._limit,
            )
            self.stop()
            self._connection.lose(
                f"no frame from the broker for {silent:.1f} s (heartbeat {self._limit:g} s)"
            )
