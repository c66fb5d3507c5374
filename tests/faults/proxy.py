"""
A TCP proxy between an AMQP client (the gateway, pika) and RabbitMQ that
cuts or stalls the connection at exactly the moment a test names.

The gateway must recover from the AMQP connection dying at any point: a
publish awaiting its confirm, a declare, a consume, an ack or nack, a
cancel, a reconnect itself. A broker closing the connection politely
(C{rabbitmqctl close_connection}) takes a gentler path through pika than
a link that just dies, so the fault tests put a L{FaultProxy} between the
gateway and the broker and kill the TCP connections themselves, at a
frame the test chooses, after a number of bytes, or at once; or keep them
open and silent (a network partition), or make the "broker" unreachable.

How it works: for every client connection it accepts, it connects to the
broker (reading nothing from the client until then) and passes bytes both
ways; each direction is read as AMQP 0-9-1 frames
(L{tests.faults.amqpframes}) and every frame is described (L{Frame}:
direction, channel, method name and decoded fields) and logged on its
L{ProxiedConnection}. Frames are passed on whole: the start of a frame
whose end has not arrived yet is held back until it has, so that a cut
I{before} a frame never lets any of it through. Backpressure is the
usual producer/consumer pairing of the two transports, so a slow side
makes the proxy stop reading the other instead of buffering. Nagle is
off on both sides, as on the gateway's own AMQP socket.

Directions: C{"up"} is client to broker, C{"down"} broker to client.

Faults:

- L{FaultProxy.cut}: every current connection is aborted on both sides at
  once (TCP RST), like a node killed hard.
- L{FaultProxy.cut_when}: cut at the first (or C{count}-th) frame a
  predicate accepts. C{when="before"}: that frame is not passed on;
  C{"after"}: it is, and for a method that carries a message
  (C{basic.publish}, C{basic.deliver}, C{basic.return}, C{basic.get-ok})
  so is the whole message, its content header and bodies (to cut
  between a method and its content, cut before the content header:
  C{content("basic.publish", part="header")}). Either way everything
  before the cut point is delivered for certain: the side the frame was
  going to gets those bytes and an orderly close (EOF), and the proxy
  waits until that side has closed its end (so it has read them: a
  broker that got a publish or an ack has acted on it); then it resets
  (RST) the side the frame came from and every other connection.
  Nothing passes after the cut point. So in a cut going down the client
  sees its connection closed by the peer, not reset (pika treats both
  as the connection lost); L{FaultProxy.cut} resets both sides.
- L{FaultProxy.cut_after_bytes}: the same, once a number of bytes has
  passed in one direction; the cut may split a frame, which is the point.
- L{FaultProxy.stall} / L{FaultProxy.unstall}: stop reading both sides
  while keeping the TCP connections open (heartbeats stop too, as in a
  silent partition); what was sent meanwhile waits in the sockets and
  passes on unstall. As across a real partition, a side that closes
  meanwhile is not noticed until then either, and a side that writes
  more than the socket buffers hold blocks (a client that then closes
  its connection in order waits for that write; only an abort is sure
  to end it).
- L{FaultProxy.drop_when}: a frame (a method without content) is left
  out and the connection goes on, e.g. a publisher confirm, so that the
  publish stays pending while the broker closes the connection itself.
- L{FaultProxy.refuse}: new client connections are reset at once (or,
  with C{port_closed=True}, refused by the OS: the proxy stops
  listening). With L{FaultProxy.cut} that is "the node is down".

Predicates are callables taking a L{Frame}. L{method} and L{content} build
the usual ones::

    method("basic.publish", routing_key=lambda key: key.endswith(".conf"))
    method("basic.ack")              # with "up": a consumer's ack;
                                     # with "down": a publisher confirm
    method("basic.nack"), method("basic.cancel"), method("queue.declare"),
    method("basic.consume"), method("queue.bind-ok"), method("basic.deliver"),
    method("connection.open")        # "up": a (re)connect in progress
    content("basic.publish", part="body", routing_key="CP1")

Observing without cutting: L{FaultProxy.when_frame}, L{FaultProxy.seen},
L{FaultProxy.next_connection}, L{FaultProxy.connections} (each with its
bounded log of frames, byte counts and where it was cut).

Example, in a trial test (real reactor, real broker)::

    proxy = FaultProxy(reactor).start()       # listening when it returns
    self.addCleanup(proxy.stop)
    gateway = yield start_gateway(self, {"amqp": {"url": proxy.url(), ...}})
    charger = ...   # a command is waiting for the charger's answer
    cut = proxy.cut_when(
        method("basic.publish", routing_key=lambda key: key.endswith(".conf")),
        "up", when="after")
    back = proxy.next_connection()
    charger.send([3, call_id, {"status": "Accepted"}])
    frame = yield cut                 # the broker has the answer, the
                                      # gateway never sees its confirm
    connection = yield back           # the gateway has reconnected

Every Deferred here fires with a result, never with an error (except a
predicate that raises: its Deferred fails with that exception); a cut
that never happens leaves its Deferred waiting (cancel it to disarm it).
"""

from __future__ import annotations

import collections
from typing import Callable, Optional
from urllib.parse import quote

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.faults.amqpframes import (
    BODY, CARRY_CONTENT, DIRECTIONS, DOWN, HEADER, UP, Frame, FrameStream, NotAmqp, content,
    heartbeat, method,
)

__all__ = [
    "DOWN", "UP", "FaultProxy", "Frame", "ProxiedConnection", "content", "heartbeat",
    "method",
]

_log = Logger()

#: How long a cut waits for the side it closes in order to close its end
#: (RabbitMQ and pika both take a few milliseconds); past it, that side is
#: aborted too, so that a peer that never closes cannot hang a test.
ORDERLY_CLOSE_TIMEOUT = 10.0

# the states of a ProxiedConnection
_CONNECTING = "connecting"  # client accepted, broker connection being made
_OPEN = "open"              # passing bytes
_CLOSING = "closing"        # one side went away on its own; closing the other
_CUT = "cut"                # a fault stopped it; its sides are being closed
_CLOSED = "closed"

_WHEN = ("before", "after")


def _check_direction(direction, either: bool = True) -> None:
    if direction in DIRECTIONS or (either and direction is None):
        return
    raise ValueError(f"direction must be 'up' or 'down'{' or None' if either else ''}, "
                     f"not {direction!r}")


def _waiter(waiters: list) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    waiters.append(d)
    return d


def _fire(waiters: list, result) -> None:
    pending = list(waiters)
    waiters.clear()
    for d in pending:
        d.callback(result)


class _End(Protocol):
    """
    One of the two TCP connections of a L{ProxiedConnection}; C{receives}
    is the direction of the bytes it reads.
    """

    def __init__(self, connection: "ProxiedConnection", receives: str) -> None:
        self._connection = connection
        self.receives = receives
        self.open = False
        self._lost_waiters: list = []

    def when_lost(self) -> defer.Deferred:
        if not self.open:
            return defer.succeed(None)
        return _waiter(self._lost_waiters)

    def connectionMade(self) -> None:
        self.open = True
        self.transport.setTcpNoDelay(True)
        self._connection._end_made(self)

    def dataReceived(self, data: bytes) -> None:
        self._connection._received(self.receives, data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.open = False
        self._connection._end_lost(self, reason)
        _fire(self._lost_waiters, None)


@implementer(IPushProducer)
class _Flow:
    """
    The source of one direction as the producer of its destination's
    transport: when the destination cannot keep up, the source is not read.
    """

    def __init__(self, connection: "ProxiedConnection", direction: str) -> None:
        self._connection = connection
        self._direction = direction

    def pauseProducing(self) -> None:
        self._connection._throttle(self._direction)

    def resumeProducing(self) -> None:
        # a stall outlasts a drained buffer
        if not self._connection._proxy._stalled:
            self._connection._source(self._direction).transport.resumeProducing()

    def stopProducing(self) -> None:
        # the destination is gone: ProxiedConnection._end_lost deals with it
        pass


@implementer(IPullProducer)
class _ResetWhenFlushed:
    """
    Resets a transport once it has handed everything written to it to the
    kernel (a transport asks its pull producer for more when its buffer is
    empty); an abort at once would throw that away.
    """

    def __init__(self, transport) -> None:
        self._transport = transport
        self._armed = False

    @classmethod
    def install(cls, transport) -> None:
        producer = cls(transport)
        # registering asks for data once at once: not yet flushed
        transport.registerProducer(producer, False)
        producer._armed = True
        # a write pass even with nothing buffered, so that we are asked
        transport.startWriting()

    def resumeProducing(self) -> None:
        if self._armed:
            self._transport.abortConnection()

    def stopProducing(self) -> None:
        pass


class _WholeMessage:
    """
    A cut due after the last content frame of the message a method
    (C{basic.publish}, C{basic.deliver}, ...) carries.
    """

    __slots__ = ("deferred", "frame", "size", "received")

    def __init__(self, deferred: defer.Deferred, frame: Frame) -> None:
        self.deferred = deferred
        self.frame = frame
        self.size = None
        self.received = 0

    def completed_by(self, frame: Frame) -> bool:
        if frame.channel != self.frame.channel:
            return False
        if frame.type == HEADER:
            self.size = frame.body_size
        elif frame.type == BODY:
            self.received += len(frame.body)
        else:
            return False
        return self.received >= self.size


class ProxiedConnection:
    """
    One client connection through the proxy and its broker connection.

    @ivar number: 1 for the first connection the proxy accepted, and so on.
    @ivar frames: the frames seen, both directions in the order read (a
        bounded log: the oldest go first).
    @ivar established: whether the broker connection was made (bytes
        could pass).
    @ivar closed: whether both sides are closed.
    @ivar cut_at: after a cut, by direction, how many bytes had been
        passed on in that direction when it stopped.
    @ivar failure: why the broker could not be reached, if it could not.
    @ivar throttled: by direction, how many times the proxy stopped
        reading the source because the destination did not keep up.
    """

    def __init__(self, proxy: "FaultProxy", number: int) -> None:
        self.number = number
        self.frames: collections.deque = collections.deque(maxlen=proxy.frame_log)
        self.established = False
        self.closed = False
        self.cut_at: dict = {}
        self.failure: Optional[Failure] = None
        self.throttled = {UP: 0, DOWN: 0}
        self._throttled_waiters: dict = {UP: [], DOWN: []}
        self._proxy = proxy
        self._client = _End(self, UP)
        self._broker = _End(self, DOWN)
        self._state = _CONNECTING
        self._connecting: Optional[defer.Deferred] = None
        self._streams = {UP: FrameStream(self, UP), DOWN: FrameStream(self, DOWN)}
        # received and not passed on yet: the start of a frame whose end has
        # not come, or what arrived while stalled
        self._pending = {UP: b"", DOWN: b""}
        self._forwarded = {UP: 0, DOWN: 0}
        self._raw = {UP: False, DOWN: False}
        # by direction: (absolute offset to cut at, Deferred)
        self._byte_cuts: dict = {UP: None, DOWN: None}
        # by direction: a cut "after" a method, waiting for its content
        self._whole: dict = {UP: None, DOWN: None}
        self._closed_waiters: list = []

    def __repr__(self) -> str:
        return f"<ProxiedConnection #{self.number} {self._state}>"

    def forwarded(self, direction: str) -> int:
        """
        How many bytes have been passed on in C{direction}.
        """
        _check_direction(direction, either=False)
        return self._forwarded[direction]

    def when_throttled(self, direction: str) -> defer.Deferred:
        """
        A Deferred firing with this connection the next time the proxy
        stops reading the source of C{direction} because its destination
        does not keep up.
        """
        _check_direction(direction, either=False)
        return _waiter(self._throttled_waiters[direction])

    def _throttle(self, direction: str) -> None:
        self._source(direction).transport.pauseProducing()
        self.throttled[direction] += 1
        _fire(self._throttled_waiters[direction], self)

    def when_closed(self) -> defer.Deferred:
        """
        A Deferred firing with this connection once both sides are closed.
        """
        if self.closed:
            return defer.succeed(self)
        return _waiter(self._closed_waiters)

    # -- the two sides --------------------------------------------------------

    def _source(self, direction: str) -> _End:
        return self._client if direction == UP else self._broker

    def _destination(self, direction: str) -> _End:
        return self._broker if direction == UP else self._client

    def _end_made(self, end: _End) -> None:
        proxy = self._proxy
        if end is self._client:
            # read nothing from the client until the broker connection is up
            end.transport.pauseProducing()
            endpoint = HostnameEndpoint(proxy._reactor, proxy.target_host, proxy.target_port,
                                        timeout=proxy.connect_timeout)
            self._connecting = connectProtocol(endpoint, self._broker)
            self._connecting.addErrback(self._broker_failed)
            return
        # made: nothing left to cancel (what runs below may cut at once, and
        # the endpoint's Deferred fires only after this returns)
        self._connecting = None
        if self._state != _CONNECTING:
            # cut or left while the broker connection was being made
            end.transport.abortConnection()
            return
        self._state = _OPEN
        self.established = True
        client, broker = self._client.transport, self._broker.transport
        # a full write buffer on one side stops reading the other
        client.registerProducer(_Flow(self, DOWN), True)
        broker.registerProducer(_Flow(self, UP), True)
        for direction, n, d in proxy._take_byte_cuts():
            self._arm_bytes(direction, n, d)
        if proxy._stalled:
            broker.pauseProducing()
        else:
            client.resumeProducing()
        _fire(proxy._next_waiters, self)

    def _broker_failed(self, failure: Failure) -> None:
        self._connecting = None
        if not failure.check(defer.CancelledError):
            self.failure = failure
        if self._client.open:
            self._client.transport.abortConnection()
        self._maybe_closed()

    def _end_lost(self, end: _End, reason: Failure) -> None:
        if self._state == _CONNECTING and self._connecting is not None:
            self._connecting.cancel()
        elif self._state == _OPEN:
            # one side went away on its own: pass that on, as a proxy does
            self._state = _CLOSING
            other = self._destination(end.receives)
            if other.open:
                other.transport.unregisterProducer()
                if self._pending[end.receives]:
                    other.transport.write(self._pending[end.receives])
                if reason is None or reason.check(ConnectionDone):
                    other.transport.loseConnection()
                else:
                    # what was read before the reset still goes through
                    _ResetWhenFlushed.install(other.transport)
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if self.closed or self._client.open or self._broker.open or self._connecting:
            return
        self.closed = True
        self._state = _CLOSED
        _fire(self._closed_waiters, self)

    # -- passing bytes on -----------------------------------------------------

    def _received(self, direction: str, data: bytes) -> None:
        if self._state != _OPEN:
            return  # a cut or a close is under way: nothing passes any more
        if self._proxy._stalled:
            self._pending[direction] += data
            self._source(direction).transport.pauseProducing()
            return
        self._pass(direction, data)

    def _pass(self, direction: str, data: bytes) -> None:
        """
        Read C{data} (after what is pending) as frames and pass on every
        complete one, unless a cut comes first.
        """
        pending = self._pending[direction]
        buf = pending + data if pending else data
        base = self._forwarded[direction]
        byte_cut = self._byte_cuts[direction]
        limit = None if byte_cut is None else byte_cut[0] - base
        upto = 0
        observed: list = []
        cut = None
        # what is passed on: ranges of buf, around frames that are dropped
        kept: list = []
        kept_from = 0
        if self._raw[direction]:
            upto = len(buf)
        else:
            try:
                whole = self._whole[direction]
                for frame in self._streams[direction].read(buf, base):
                    start = frame.offset - base
                    if limit is not None and start >= limit:
                        break
                    self.frames.append(frame)
                    if self._proxy._dropping(frame, observed):
                        kept.append(buf[kept_from:start])
                        kept_from = upto = start + frame.length
                        continue
                    position = d = None
                    watch = self._proxy._match(frame, observed, cuts=whole is None)
                    if watch is None:
                        if whole is not None and whole.completed_by(frame):
                            position, d, frame = start + frame.length, whole.deferred, whole.frame
                    elif watch.when == "before":
                        position, d = start, watch.deferred
                    elif frame.name in CARRY_CONTENT:
                        whole = self._whole[direction] = _WholeMessage(watch.deferred, frame)
                    else:
                        position, d = start + frame.length, watch.deferred
                    if position is not None:
                        if limit is None or position <= limit:
                            cut = (position, d, frame)
                        break
                    upto = start + frame.length
            except NotAmqp as error:
                _log.warn("fault proxy: connection {number} {direction} is not AMQP "
                          "({error}); passing it on unread",
                          number=self.number, direction=direction, error=str(error))
                self._raw[direction] = True
                upto = len(buf)
        if cut is None and limit is not None and limit <= len(buf):
            cut = (limit, byte_cut[1], self)
        if cut is not None:
            position, d, result = cut
            delivered = b"".join(kept) + buf[kept_from:position] if kept else buf[:position]
            self._proxy._cut_delivering(self, direction, delivered, d, result)
        else:
            if upto:
                if kept:
                    out = b"".join(kept) + buf[kept_from:upto]
                else:
                    out = buf if upto == len(buf) else buf[:upto]
                if out:
                    self._destination(direction).transport.write(out)
                # counted as read from the source, dropped frames too, so
                # that frame offsets stay those of the source's stream
                self._forwarded[direction] += upto
            self._pending[direction] = buf[upto:] if upto < len(buf) else b""
        for d, outcome in observed:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def _disarm_bytes(self, direction: str, d: defer.Deferred) -> None:
        armed = self._byte_cuts[direction]
        if armed is not None and armed[1] is d:
            self._byte_cuts[direction] = None

    def _arm_bytes(self, direction: str, n: int, d: defer.Deferred) -> None:
        if self._byte_cuts[direction] is not None:
            raise ValueError(f"connection {self.number} already has a byte cut {direction}")
        self._byte_cuts[direction] = (self._forwarded[direction] + n, d)
        if self._state == _OPEN and not self._proxy._stalled:
            # what is pending may already reach the limit
            self._pass(direction, b"")

    # -- stalls ---------------------------------------------------------------

    def _stall(self) -> None:
        if self._state == _OPEN:
            self._client.transport.pauseProducing()
            self._broker.transport.pauseProducing()

    def _unstall(self) -> None:
        if self._state != _OPEN:
            return
        self._client.transport.resumeProducing()
        self._broker.transport.resumeProducing()
        for direction in DIRECTIONS:
            if self._state == _OPEN and self._pending[direction]:
                self._pass(direction, b"")

    # -- cuts -----------------------------------------------------------------

    def _freeze(self) -> None:
        """
        Stop passing anything on, for good.
        """
        if self._state in (_CUT, _CLOSED):
            return
        self._state = _CUT
        for direction in DIRECTIONS:
            self.cut_at.setdefault(direction, self._forwarded[direction])
        self._pending = {UP: b"", DOWN: b""}
        for end in (self._client, self._broker):
            if end.open:
                end.transport.unregisterProducer()
        if self._connecting is not None:
            self._connecting.cancel()

    def _abort(self) -> defer.Deferred:
        """
        Reset both sides; fires once they are closed.
        """
        self._freeze()
        for end in (self._client, self._broker):
            if end.open:
                end.transport.abortConnection()
        return self.when_closed()

    def _deliver_and_cut(self, direction: str, data: bytes) -> defer.Deferred:
        """
        Pass C{data} on in C{direction} and close that way in order; once
        the destination has closed its end, reset the source. Fires when
        both are closed.
        """
        self._freeze()
        self._forwarded[direction] += len(data)
        self.cut_at[direction] = self._forwarded[direction]
        source, destination = self._source(direction), self._destination(direction)
        if source.open:
            source.transport.pauseProducing()
        if not destination.open:
            return self._abort()
        transport = destination.transport
        # keep reading (and dropping) what it sends until it closes: a
        # socket closed with unread data sends a reset, which may throw
        # away what was just written
        transport.resumeProducing()
        if data:
            transport.write(data)
        transport.loseWriteConnection()
        timer = self._proxy._reactor.callLater(ORDERLY_CLOSE_TIMEOUT, self._abort)
        closed = destination.when_lost()
        closed.addCallback(lambda _: timer.active() and timer.cancel())
        closed.addCallback(lambda _: self._abort())
        return closed


class _Watch:
    """
    A predicate waiting for its C{remaining}-th match; C{when} is
    C{"before"}/C{"after"} for a cut, C{None} to only observe.
    """

    __slots__ = ("predicate", "direction", "remaining", "when", "deferred")

    def __init__(self, predicate, direction, count: int, when) -> None:
        self.predicate = predicate
        self.direction = direction
        self.remaining = count
        self.when = when
        self.deferred: Optional[defer.Deferred] = None


def _counts(watches: list, watch: _Watch, frame: Frame, observed: list) -> bool:
    """
    Whether C{frame} is the one C{watch} waits for: it goes the watch's
    way, its predicate accepts it, and it is the C{count}-th to. A watch
    that is done, or whose predicate raised (its Deferred then fails, via
    C{observed}), leaves C{watches}.
    """
    if watch.direction is not None and watch.direction != frame.direction:
        return False
    try:
        matched = watch.predicate(frame)
    except Exception:
        watches.remove(watch)
        observed.append((watch.deferred, Failure()))
        return False
    if not matched:
        return False
    watch.remaining -= 1
    if watch.remaining:
        return False
    watches.remove(watch)
    return True


class _Refused(Protocol):
    def connectionMade(self) -> None:
        self.transport.abortConnection()


class _Listener(Factory):
    noisy = False

    def __init__(self, proxy: "FaultProxy") -> None:
        self._proxy = proxy

    def buildProtocol(self, addr):
        return self._proxy._accept()


class FaultProxy:
    """
    A fault-injecting AMQP proxy on 127.0.0.1 (see the module docstring).

    @ivar port: the port it listens on, once started.
    @ivar connections: every L{ProxiedConnection}, in the order accepted
        (refused connections are not in it).
    @ivar accepted: how many TCP connections it accepted, refused ones too.
    @ivar refused: how many of those it reset because it was refusing.
    """

    def __init__(self, reactor, target_host: str = "127.0.0.1", target_port: int = 5672,
                 *, frame_log: int = 10_000, connect_timeout: float = 10.0) -> None:
        """
        @param frame_log: how many frames each connection's log keeps.
        @param connect_timeout: how long to try to reach the broker for a
            client connection.
        """
        self._reactor = reactor
        self.target_host = target_host
        self.target_port = target_port
        self.frame_log = frame_log
        self.connect_timeout = connect_timeout
        self.port: Optional[int] = None
        self.connections: list = []
        self.accepted = 0
        self.refused = 0
        self._listening = None
        self._stopped = False
        self._stalled = False
        self._refusing = False
        self._watches: list = []
        # frames to drop (see drop_when)
        self._drops: list = []
        self._next_waiters: list = []
        self._byte_cuts: list = []

    # -- life -----------------------------------------------------------------

    def start(self) -> "FaultProxy":
        """
        Listen on a free port of 127.0.0.1; synchronous (the port is
        listening when it returns). Returns the proxy itself.
        """
        self._listen(0)
        return self

    def _listen(self, port: int) -> None:
        self._listening = self._reactor.listenTCP(port, _Listener(self), interface="127.0.0.1")
        self.port = self._listening.getHost().port

    def stop(self) -> defer.Deferred:
        """
        Stop listening and reset every connection; fires when all are
        closed. Armed cuts and observers are dropped without firing.
        """
        self._stopped = True
        self._watches.clear()
        self._byte_cuts.clear()
        waits = [c._abort() for c in self._live()]
        if self._listening is not None:
            listening, self._listening = self._listening, None
            waits.append(listening.stopListening())
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "%2F") -> str:
        """
        The AMQP URL of the broker through the proxy (C{vhost} as it goes
        in a URL: C{%2F} for C{/}).
        """
        return (f"amqp://{quote(user, safe='')}:{quote(password, safe='')}"
                f"@127.0.0.1:{self.port}/{vhost}")

    def _accept(self):
        self.accepted += 1
        if self._refusing or self._stopped:
            self.refused += 1
            return _Refused()
        connection = ProxiedConnection(self, len(self.connections) + 1)
        self.connections.append(connection)
        return connection._client

    def _live(self) -> list:
        return [c for c in self.connections if not c.closed]

    @property
    def current(self) -> Optional[ProxiedConnection]:
        """
        The most recently accepted connection that is passing bytes, if any.
        """
        for connection in reversed(self.connections):
            if connection._state == _OPEN:
                return connection
        return None

    # -- faults ---------------------------------------------------------------

    def cut(self) -> defer.Deferred:
        """
        Reset (TCP RST) both sides of every current connection at once;
        fires when they are all closed.
        """
        live = self._live()
        _log.info("fault proxy :{port}: cutting {count} connection(s)",
                  port=self.port, count=len(live))
        return defer.gatherResults([c._abort() for c in live]).addCallback(lambda _: None)

    def cut_when(self, predicate: Callable[[Frame], bool], direction: Optional[str],
                 when: str = "before", count: int = 1) -> defer.Deferred:
        """
        Cut every connection at the C{count}-th frame going C{direction}
        (C{"up"}, C{"down"}, or C{None} for either) that C{predicate}
        accepts, counted over all connections from now on. With
        C{when="before"} that frame is not passed on; with C{"after"} it
        is, and if it is a method that carries a message, the message's
        content frames too. Everything before the cut point reaches its destination,
        which gets an orderly close; the other side, and every other
        connection, a reset.

        @return: a Deferred firing with the matching L{Frame} once every
            connection is closed; cancel it to disarm the cut.
        """
        if when not in _WHEN:
            raise ValueError(f"when must be 'before' or 'after', not {when!r}")
        return self._watch(predicate, direction, count, when)

    def cut_after_bytes(self, direction: str, n: int) -> defer.Deferred:
        """
        Cut once C{n} more bytes have passed in C{direction} on the current
        connection (L{current}), or, if none is passing bytes, once the
        next connection has passed its first C{n} bytes in C{direction}.
        Exactly C{n} bytes reach the destination, which gets an orderly
        close; the cut may fall inside a frame.

        @return: a Deferred firing with the L{ProxiedConnection} once every
            connection is closed (never, if that connection ends first);
            cancel it to disarm the cut.
        """
        _check_direction(direction, either=False)
        if n < 0:
            raise ValueError(f"n must be 0 or more, not {n}")
        current = self.current

        def disarm(d):
            self._byte_cuts = [armed for armed in self._byte_cuts if armed[2] is not d]
            for connection in self.connections:
                connection._disarm_bytes(direction, d)

        d: defer.Deferred = defer.Deferred(canceller=disarm)
        if current is None:
            if any(armed[0] == direction for armed in self._byte_cuts):
                raise ValueError(f"the next connection already has a byte cut {direction}")
            self._byte_cuts.append((direction, n, d))
        else:
            current._arm_bytes(direction, n, d)
        return d

    def _take_byte_cuts(self) -> list:
        taken, self._byte_cuts = self._byte_cuts, []
        return taken

    def _cut_delivering(self, connection: ProxiedConnection, direction: str, data: bytes,
                        d: defer.Deferred, result) -> None:
        """
        Deliver C{data} on C{connection} and cut it (see
        L{ProxiedConnection._deliver_and_cut}), then reset every other
        connection; C{d} fires with C{result} when all are closed.
        """
        others = [c for c in self._live() if c is not connection]
        for other in others:
            other._freeze()
        _log.info("fault proxy :{port}: cutting connection {number} {direction} "
                  "at byte {offset}", port=self.port, number=connection.number,
                  direction=direction, offset=connection.forwarded(direction) + len(data))
        done = connection._deliver_and_cut(direction, data)
        done.addCallback(lambda _: defer.gatherResults([c._abort() for c in others]))
        # the cut may have been cancelled (the round it was armed for ended)
        # while the bytes were on their way: it took place all the same
        done.addCallback(lambda _: d.called or d.callback(result))

    def stall(self) -> None:
        """
        Stop passing bytes both ways on every connection, new ones too,
        while keeping them open; what is sent meanwhile is held (the proxy
        stops reading) until L{unstall}.
        """
        self._stalled = True
        for connection in self._live():
            connection._stall()

    def unstall(self) -> None:
        """
        Pass on what was held, and carry on.
        """
        self._stalled = False
        for connection in self._live():
            connection._unstall()

    def refuse(self, refusing: bool = True, *, port_closed: bool = False) -> defer.Deferred:
        """
        While refusing, new client connections are accepted and reset at
        once (counted in L{refused}); current ones are left alone (L{cut}
        them for "the node is down").

        @param port_closed: stop listening instead, so that connecting
            fails with "connection refused" as on a host where no broker
            runs; listening resumes on the same port when refusing ends
            (which raises C{CannotListenError} if something took the port
            meanwhile).
        @return: a Deferred firing once new connections are treated so.
        """
        self._refusing = refusing
        if refusing and port_closed and self._listening is not None:
            listening, self._listening = self._listening, None
            return listening.stopListening()
        if not refusing and self._listening is None and self.port is not None \
                and not self._stopped:
            self._listen(self.port)
        return defer.succeed(None)

    # -- observing ------------------------------------------------------------

    def when_frame(self, predicate: Callable[[Frame], bool], direction: Optional[str] = None,
                   count: int = 1) -> defer.Deferred:
        """
        A Deferred firing with the C{count}-th frame going C{direction}
        (either by default) that C{predicate} accepts, counted from now,
        once it has been read and passed on (or held back by a cut
        before it); cancel it to stop watching.
        """
        return self._watch(predicate, direction, count, None)

    def _watch(self, predicate, direction, count: int, when) -> defer.Deferred:
        _check_direction(direction)
        if count < 1:
            raise ValueError(f"count must be 1 or more, not {count}")
        watch = _Watch(predicate, direction, count, when)

        def disarm(_d):
            if watch in self._watches:
                self._watches.remove(watch)

        watch.deferred = defer.Deferred(canceller=disarm)
        self._watches.append(watch)
        return watch.deferred

    def _match(self, frame: Frame, observed: list, cuts: bool = True) -> Optional[_Watch]:
        """
        Count C{frame} for every watch it matches (cuts only if C{cuts});
        observers that are done go to C{observed} as C{(Deferred, frame)};
        returns the first cut that is due, if any (later cuts do not count
        this frame).
        """
        if not self._watches:
            return None
        due = None
        for watch in list(self._watches):
            if watch.when is not None and (due is not None or not cuts):
                continue
            if not _counts(self._watches, watch, frame, observed):
                continue
            if watch.when is None:
                observed.append((watch.deferred, frame))
            else:
                due = watch
        return due

    def drop_when(self, predicate: Callable[[Frame], bool], direction: Optional[str],
                  count: int = 1) -> defer.Deferred:
        """
        Drop (do not pass on) the C{count}-th frame C{predicate} accepts,
        and nothing else: the connection goes on without it. For a method
        with no content, such as a publisher confirm (C{basic.ack} down) or
        a C{basic.cancel-ok}, to make the moment it was pending last as
        long as a test needs (then, say, have the broker close the
        connection).

        @return: a Deferred firing with the dropped L{Frame}; cancel it to
            disarm.
        """
        _check_direction(direction, either=True)
        watch = _Watch(predicate, direction, count, None)

        def disarm(_d):
            if watch in self._drops:
                self._drops.remove(watch)

        watch.deferred = defer.Deferred(canceller=disarm)
        self._drops.append(watch)
        return watch.deferred

    def _dropping(self, frame: Frame, observed: list) -> bool:
        """Whether C{frame} is to be dropped (see L{drop_when})."""
        if not self._drops or frame.name in CARRY_CONTENT or frame.type in (HEADER, BODY):
            return False
        for watch in list(self._drops):
            if _counts(self._drops, watch, frame, observed):
                observed.append((watch.deferred, frame))
                return True
        return False

    def next_connection(self) -> defer.Deferred:
        """
        A Deferred firing with the next L{ProxiedConnection} whose broker
        connection is made (bytes can pass), e.g. a client reconnecting.
        """
        return _waiter(self._next_waiters)

    def seen(self, predicate: Optional[Callable[[Frame], bool]] = None,
             direction: Optional[str] = None) -> list:
        """
        The logged frames of every connection, in order, that go
        C{direction} (either by default) and that C{predicate} accepts
        (all by default).
        """
        _check_direction(direction)
        return [
            frame
            for connection in self.connections
            for frame in connection.frames
            if (direction is None or frame.direction == direction)
            and (predicate is None or predicate(frame))
        ]
