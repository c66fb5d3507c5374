"""
The gateway's link to RabbitMQ, as an explicit state machine.

::

    IDLE --start--> CONNECTING --set up--> OPEN --loss--> LOST
                        |                   ^               |
                        | no URL answered   |               v
                        v                   +--set up-- RECONNECTING
                      CLOSED                                (back-off,
                                                             next URL)
    any state --stop--> CLOSING --> CLOSED

- I{connecting} is the start: every URL is tried once, in order; if none
  answers the start fails (a gateway pointed at a wrong broker stops with
  a clear message instead of retrying forever).
- I{open}: one L{BrokerConnection} is current and set up (exchange,
  control queue, channels); only then may anything be sent.
- I{lost}: the moment the loss is seen, whatever saw it first (TCP, the
  broker's close, the heartbeat watchdog). Observers learn of it once,
  here, whatever order pika later reports channels and connection in.
- I{reconnecting}: attempts on the next URL (the node we lost is the
  likeliest to be down), with exponential back-off and jitter, every time,
  however many times. An attempt that loses its connection half way
  through its set-up simply fails and the next one is scheduled.
- I{closing}: shutdown; an attempt in progress is abandoned, the current
  connection drained (bounded) and closed (aborted after a timeout).

The transitions allowed are in L{TRANSITIONS}; anything else is a bug and
raises L{InvalidTransition}.
"""

from __future__ import annotations

import enum
import random
from typing import Callable, Optional

import pika
from twisted.internet import defer
from twisted.logger import Logger

from ocppgw.amqp.connection import BrokerConnection, guarded
from ocppgw.amqp.errors import BrokerUnavailable
from ocppgw.logs import mask_url
from ocppgw.states import InvalidTransition, check_transition

__all__ = ["BrokerLink", "InvalidTransition", "LinkState", "TRANSITIONS"]

_log = Logger()


class LinkState(enum.Enum):
    """Where the link to the broker is."""

    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"
    LOST = "lost"
    RECONNECTING = "reconnecting"
    CLOSING = "closing"
    CLOSED = "closed"


_S = LinkState

#: Every transition the link may make; see the module docstring.
TRANSITIONS: dict[LinkState, frozenset] = {
    _S.IDLE: frozenset({_S.CONNECTING, _S.CLOSING}),
    _S.CONNECTING: frozenset({_S.OPEN, _S.CLOSED, _S.CLOSING}),
    _S.OPEN: frozenset({_S.LOST, _S.CLOSING}),
    _S.LOST: frozenset({_S.RECONNECTING, _S.CLOSING}),
    _S.RECONNECTING: frozenset({_S.OPEN, _S.CLOSING}),
    _S.CLOSING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset({_S.CONNECTING}),
}

#: First reconnect delay in seconds, doubled per failed attempt.
FIRST_RETRY_DELAY = 0.5


class BrokerLink:
    """
    Which broker connection is current, and what happens when it goes.

    @ivar state: the L{LinkState}.
    @ivar connection: the current L{BrokerConnection} while L{state} is
        OPEN (and during CLOSING, until it is closed), else C{None}.
    """

    def __init__(
        self,
        reactor,
        urls: list[str],
        *,
        parameters: Callable[[str], pika.ConnectionParameters],
        setup: Callable[[BrokerConnection], defer.Deferred],
        connect_timeout: float = 10.0,
        heartbeat: float = 60.0,
        reconnect_max_delay: float = 30.0,
        url_names: Optional[list[str]] = None,
    ) -> None:
        """
        @param parameters: pika's parameters for a URL.
        @param url_names: where each URL comes from (a setting's name), for
            the message when none can be reached.
        @param setup: prepares a freshly opened connection (exchange,
            channels); its Deferred must fail if the connection is lost
            meanwhile (see L{BrokerConnection.wait}).
        """
        self._reactor = reactor
        self.urls = list(urls)
        self._url_names = list(url_names) if url_names else [""] * len(self.urls)
        self._url_index = 0
        self._parameters = parameters
        self._setup = setup
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._max_delay = reconnect_max_delay
        self.state = LinkState.IDLE
        self.connection: Optional[BrokerConnection] = None
        # the connection being opened and set up, if any
        self._pending: Optional[BrokerConnection] = None
        self._retry_call = None
        self._failures = 0
        self._observers: list[Callable[[LinkState, LinkState, str], None]] = []
        #: losses seen since start (a counter for metrics)
        self.losses = 0

    @property
    def url(self) -> str:
        """The URL in use or last tried."""
        return self.urls[self._url_index]

    @property
    def is_open(self) -> bool:
        return self.state is LinkState.OPEN

    def add_observer(self, observer: Callable[[LinkState, LinkState, str], None]) -> None:
        """
        Call C{observer(old, new, why)} on every transition, in the order
        observers were added. An observer's exception is logged, never
        passed on.
        """
        self._observers.append(observer)

    def _goto(self, new: LinkState, why: str) -> None:
        old = self.state
        check_transition(TRANSITIONS, old, new, "broker link")
        self.state = new
        for observer in list(self._observers):
            guarded(observer, "a broker link observer")(old, new, why)

    # -- start ---------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        """
        Connect to the first URL that answers and set the connection up.

        @raise BrokerUnavailable: naming every URL and why it failed.
        """
        self._goto(LinkState.CONNECTING, "starting")
        errors = []
        for index in range(len(self.urls)):
            self._url_index = index
            try:
                yield self._attempt(self.urls[index])
            except Exception as error:
                if self.state is not LinkState.CONNECTING:
                    raise  # stopped meanwhile
                errors.append(error)
                continue
            self._goto(LinkState.OPEN, "connected")
            return
        self._goto(LinkState.CLOSED, "no broker could be reached")
        # each reason names the setting and the URL (password masked), so
        # that an operator knows which line of the file to look at
        reasons = []
        for name, url, error in zip(self._url_names, self.urls, errors):
            text = str(error) or error.__class__.__name__
            shown = mask_url(url)
            if shown in text:
                reasons.append(f"{name}: {text}" if name else text)
            else:
                reasons.append(f"{name} {shown}: {text}" if name else f"{shown}: {text}")
        if len(reasons) == 1:
            raise BrokerUnavailable(reasons[0]) from errors[0]
        raise BrokerUnavailable("no broker could be reached: " + "; ".join(reasons))

    @defer.inlineCallbacks
    def _attempt(self, url: str):
        """
        Open a connection to C{url} and set it up; it becomes current.
        """
        connection = BrokerConnection(self._reactor, url, self._parameters(url), self._lost)
        self._pending = connection
        try:
            yield connection.open(self._connect_timeout)
            # the whole set-up is bounded too: a broker that accepted us
            # and then went silent must not hold the attempt forever
            timer = self._reactor.callLater(
                self._connect_timeout, connection.lose,
                f"setting up the connection took over {self._connect_timeout:g} s",
            )
            try:
                yield self._setup(connection)
            finally:
                if timer.active():
                    timer.cancel()
            if not connection.alive:
                raise BrokerUnavailable(connection.lost_reason or "connection lost")
        except BaseException:
            connection.lose("set-up failed")
            raise
        finally:
            if self._pending is connection:
                self._pending = None
        self.connection = connection
        self._failures = 0
        connection.watch(self._heartbeat)
        _log.info("Connected to the broker {url}", url=connection.shown_url)

    # -- loss and reconnection ---------------------------------------------

    def _lost(self, connection: BrokerConnection, why: str) -> None:
        if connection is not self.connection:
            return  # an attempt in progress: its set-up fails by itself
        if self.state is not LinkState.OPEN:
            self.connection = None  # closing: stop() is waiting for it
            return
        self.connection = None
        self.losses += 1
        _log.error("Broker connection lost: {why}", why=why, event="amqp_lost")
        self._goto(LinkState.LOST, why)
        if self.state is not LinkState.LOST:
            return  # an observer stopped the link
        self._goto(LinkState.RECONNECTING, why)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._failures += 1
        delay = min(self._max_delay, FIRST_RETRY_DELAY * 2 ** min(self._failures, 10))
        delay *= random.uniform(0.5, 1.0)
        _log.info("Reconnecting to the broker in {delay:.1f} s", delay=delay)
        self._retry_call = self._reactor.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        if self.state is not LinkState.RECONNECTING:
            return
        # the node we lost (or could not reach) is the likeliest to be down
        self._url_index = (self._url_index + 1) % len(self.urls)

        def opened(_):
            if self.state is LinkState.RECONNECTING:
                self._goto(LinkState.OPEN, "reconnected")

        def failed(failure):
            if self.state is not LinkState.RECONNECTING:
                return
            _log.warn("Broker reconnect failed: {error}", error=failure.getErrorMessage())
            self._schedule_retry()

        self._attempt(self.url).addCallbacks(opened, failed).addErrback(
            lambda f: _log.failure("Broker reconnect", f)
        )

    # -- stop ----------------------------------------------------------------

    @defer.inlineCallbacks
    def stop(self, drain: Callable[[], defer.Deferred], timeout: float = 5.0):
        """
        Stop for good: abandon any attempt in progress, let C{drain()} wait
        (at most C{timeout} seconds) for what is in flight, close the
        connection (aborting it after C{timeout}).
        """
        if self.state in (LinkState.CLOSING, LinkState.CLOSED):
            return
        self._goto(LinkState.CLOSING, "stopping")
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.lose("the gateway is stopping")
        connection = self.connection
        if connection is not None and connection.alive:
            drained = drain()
            timer = self._reactor.callLater(timeout, drained.cancel)
            try:
                yield drained
            except defer.CancelledError:
                _log.warn("Stopping with publishes the broker has not confirmed")
            finally:
                if timer.active():
                    timer.cancel()
        if connection is not None:
            yield connection.close(timeout)
        self.connection = None
        self._goto(LinkState.CLOSED, "stopped")
