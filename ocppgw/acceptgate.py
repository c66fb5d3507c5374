"""
How many connections a gateway process works on at once before their
opening handshake is done; the others wait, accepted but untouched.

Accepting a connection is cheap and handshaking it is not: in a
reconnection storm a process accepts every connection the kernel hands it
within seconds, then works through their handshakes for a minute. Each
connection in its handshake holds autobahn's untrimmed connection, the
request, the TLS session and the broker work in flight; all of them at
once make a peak of short-lived objects that the process keeps afterwards,
because the allocator cannot give back memory that the long-lived
chargers are scattered over. Measured with 50,000 chargers on three
processes, that left about half of the RSS per idle charger.

With the L{AcceptGate}, a listener still accepts every connection at once
(so the kernel's listen backlog never overflows and no SYN is dropped), but
beyond C{limit} connections in their opening handshake a new one gets only
a small L{_Waiting} stand-in that does not read its socket. Each
connection that opens, or goes before it does, lets the longest-waiting
one in: its real protocol (TLS, PROXY header, WebSocket) is built then and
its request read. A charger that gave up meanwhile is found gone at that
point, like any dropped connection.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

_log = Logger()

#: Seconds between two log lines saying that connections wait.
LOG_INTERVAL = 60.0


class AcceptGate:
    """
    The connections of one process (all its listeners) in their opening
    handshake, and those waiting to begin it.

    @ivar opening: connections whose handshake is under way (told by
        L{connection_made} and L{handshake_over}).
    @ivar waited: connections that had to wait, since the start.
    """

    def __init__(self, limit: int, clock) -> None:
        """
        @param limit: connections in their opening handshake at once (>= 1).
        @param clock: what times the log line (an C{IReactorTime}).
        """
        self.limit = limit
        self.opening = 0
        self.waited = 0
        self._waiting: deque["_Waiting"] = deque()
        self._clock = clock
        self._logged_at: Optional[float] = None

    @property
    def waiting(self) -> int:
        """Connections accepted and waiting for their turn."""
        return len(self._waiting)

    def wrap(self, factory) -> "GatedFactory":
        """The factory to listen with instead of C{factory}."""
        return GatedFactory(self, factory)

    def has_room(self) -> bool:
        return self.opening < self.limit and not self._waiting

    def connection_made(self) -> None:
        """A charger connection began its opening handshake."""
        self.opening += 1

    def handshake_over(self) -> None:
        """
        A connection opened, or went before it did: the longest-waiting
        connection (if any) is let in.
        """
        self.opening -= 1
        if self._waiting and self.opening < self.limit:
            waiting = self._waiting.popleft()
            try:
                waiting.let_in()
            except Exception:
                # not left unread for ever: its charger reconnects
                _log.failure("Letting a waiting connection in")
                waiting.transport.abortConnection()

    def wait(self, waiting: "_Waiting") -> None:
        now = self._clock.seconds()
        if not self._waiting and (self._logged_at is None
                                  or now - self._logged_at >= LOG_INTERVAL):
            self._logged_at = now
            _log.info(
                "{opening} connections in their opening handshake: new ones wait their turn "
                "({waited} waited so far)",
                opening=self.opening, waited=self.waited, event="accept_waiting",
            )
        self.waited += 1
        self._waiting.append(waiting)

    def gone(self, waiting: "_Waiting") -> None:
        """A waiting connection was closed before its turn (see L{close_waiting})."""
        try:
            self._waiting.remove(waiting)
        except ValueError:
            pass

    def close_waiting(self) -> None:
        """
        Close every waiting connection (the process is stopping): its
        charger reconnects, to another process.
        """
        waiting, self._waiting = self._waiting, deque()
        for connection in waiting:
            connection.transport.loseConnection()


class GatedFactory(Factory):
    """
    Builds the wrapped factory's protocol while the gate has room, and a
    L{_Waiting} stand-in otherwise.
    """

    def __init__(self, gate: AcceptGate, factory) -> None:
        self.gate = gate
        self.wrapped = factory

    def logPrefix(self) -> str:
        prefix = getattr(self.wrapped, "logPrefix", None)
        return prefix() if prefix is not None else self.wrapped.__class__.__name__

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr):
        if self.gate.has_room():
            return self.wrapped.buildProtocol(addr)
        return _Waiting(self, addr)


class _Waiting(Protocol):
    """
    An accepted connection waiting for its turn: its socket is not read,
    and no protocol of the listener is built for it yet.
    """

    def __init__(self, factory: GatedFactory, addr) -> None:
        self._factory = factory
        self._addr = addr
        self._let_in = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self._factory.gate.wait(self)

    def let_in(self) -> None:
        """Its turn: the listener's own protocol takes the connection over."""
        self._let_in = True
        transport = self.transport
        protocol = self._factory.wrapped.buildProtocol(self._addr)
        if protocol is None:
            transport.loseConnection()
            return
        transport.protocol = protocol
        protocol.makeConnection(transport)
        transport.resumeProducing()

    def connectionLost(self, reason=None) -> None:
        # closed while waiting (by close_waiting, or a write error)
        if not self._let_in:
            self._factory.gate.gone(self)


__all__ = ["AcceptGate", "GatedFactory"]
