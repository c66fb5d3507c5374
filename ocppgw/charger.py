"""
One charger's life in the gateway: from the handshake that claims its
identity to the close, as a state machine over a small table
(docs/architecture.md, "A charger's lifecycle").

::

    CLAIMED --> DECLARING --> ATTACHED --> CONSUMING <---------+
       |            |            |             |               |
       |            |            +-------> BROKER_LOST --> RESTORING
       |            |                          ^               |
       |            |                          +---------------+
       +------------+-- every state above --> REPLACED | CLOSED

- C{CLAIMED}: its handshake claimed the identity; an older connection with
  that identity (here, or in another gateway process) is being let go.
- C{DECLARING}: its queue is being declared and bound, then the 101 sent.
- C{ATTACHED}: the WebSocket is open; its consumer is being started.
- C{CONSUMING}: the consumer is up: commands flow.
- C{BROKER_LOST}: the broker connection broke; the charger stays (the
  outage grace) and waits for it.
- C{RESTORING}: the broker is back; its queue is declared again and its
  consumer started again.
- C{REPLACED}: a newer connection took the identity over (a newer
  handshake here, or a takeover message from another process).
- C{CLOSED}: gone: refused, closed by either side, or by the shutdown.

The allowed moves are L{CHARGER_TRANSITIONS}, checked by
L{ocppgw.states.check_transition}: a move not in the table is a bug and
raises. Why a table of an enum and not C{automat} (which Twisted depends
on): the broker link (L{ocppgw.amqp.link}) already is such a table, so a
reader learns one form; the states are data that other code reads
(readiness counts the chargers in C{BROKER_LOST} and C{RESTORING}, the
admin API and the tests look at them), which automat keeps private; and
the moves are few and low-frequency -- a handshake, an open, a broker
loss, a close -- so the check costs nothing that matters. A frame never
moves the machine: the per-frame path reads no state here.

L{ChargerEffects} (which L{ChargerLink} extends) implements the
session's L{SessionEffects} on top of the AMQP bridge; L{ChargerSettings}
is what every charger of one gateway is configured with.
"""

from __future__ import annotations

import enum
from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from ocppgw import framing, limits, topology
from ocppgw.amqp import BrokerUnavailable, FixedHeaders
from ocppgw.audit import OUT as AUDIT_OUT
from ocppgw.closecodes import CloseCode
from ocppgw.framing import MAX_MESSAGE_ID_LENGTH, OcppVersion
from ocppgw.metrics import ChargerStats
from ocppgw.outcome import Delivery
from ocppgw.session import ChargerSession
from ocppgw.states import check_transition

# The gateway's namespace: operators filter the charger lines on it.
_log = Logger(namespace="ocppgw.gateway")

#: Close code for chargers whose broker side broke.
CLOSE_INTERNAL = CloseCode.INTERNAL_ERROR
#: Close code for a charger that keeps sending over its rate limit.
CLOSE_POLICY = CloseCode.POLICY_VIOLATION
#: Close code and reason for a connection replaced by a newer one.
CLOSE_REPLACED = (CloseCode.NORMAL, "Replaced by a new connection")
#: Close code for a drain or a broker outage: come back (elsewhere) later.
CLOSE_SERVICE_RESTART = CloseCode.SERVICE_RESTART


class ChargerState(enum.Enum):
    """Where a charger is in its life (see the module docstring)."""

    CLAIMED = "claimed"
    DECLARING = "declaring"
    ATTACHED = "attached"
    CONSUMING = "consuming"
    BROKER_LOST = "broker lost"
    RESTORING = "restoring"
    REPLACED = "replaced"
    CLOSED = "closed"


_C = ChargerState

#: Every move a charger may make. A newer connection or a close can end
#: any live state; a broker loss can catch an open charger in any state.
CHARGER_TRANSITIONS: dict[ChargerState, frozenset] = {
    _C.CLAIMED: frozenset({_C.DECLARING, _C.REPLACED, _C.CLOSED}),
    _C.DECLARING: frozenset({_C.ATTACHED, _C.REPLACED, _C.CLOSED}),
    _C.ATTACHED: frozenset({_C.CONSUMING, _C.BROKER_LOST, _C.REPLACED, _C.CLOSED}),
    _C.CONSUMING: frozenset({_C.BROKER_LOST, _C.REPLACED, _C.CLOSED}),
    _C.BROKER_LOST: frozenset({_C.RESTORING, _C.REPLACED, _C.CLOSED}),
    _C.RESTORING: frozenset({_C.CONSUMING, _C.BROKER_LOST, _C.REPLACED, _C.CLOSED}),
    _C.REPLACED: frozenset(),
    _C.CLOSED: frozenset(),
}

#: Before the WebSocket is open: the handshake is still being prepared.
HANDSHAKING = frozenset({_C.CLAIMED, _C.DECLARING})
#: Waiting for the consumer to come back after a broker loss.
AWAITING_BROKER = frozenset({_C.BROKER_LOST, _C.RESTORING})
#: The end: the session is over.
ENDED = frozenset({_C.REPLACED, _C.CLOSED})


class ChargerSettings:
    """
    What every charger of one gateway is configured with.

    @ivar dead_letter_exchange: where refused commands are copied with the
        reason in headers: the charger queues' dead-letter exchange once it
        is known to exist (the service checks at start), else C{None}.
    """

    __slots__ = ("node", "queue_arguments", "call_timeout", "max_bad_frames",
                 "max_message_id_length", "max_message_rate", "message_burst",
                 "max_rate_violations", "validation", "dead_letter_exchange")

    def __init__(
        self,
        *,
        node: str,
        queue_arguments: dict,
        call_timeout: float = 30.0,
        max_bad_frames: int = 10,
        max_message_id_length: int = MAX_MESSAGE_ID_LENGTH,
        max_message_rate: float = 0.0,
        message_burst: int = 50,
        max_rate_violations: int = 200,
        validation=None,
    ) -> None:
        """
        @param validation: an L{ocppgw.validation.Validation} that gives
            each charger's session its payload checker, or C{None}.
        """
        self.node = node
        self.queue_arguments = dict(queue_arguments)
        self.call_timeout = call_timeout
        self.max_bad_frames = max_bad_frames
        self.max_message_id_length = max_message_id_length
        self.max_message_rate = max_message_rate
        self.message_burst = message_burst
        self.max_rate_violations = max_rate_violations
        self.validation = validation
        self.dead_letter_exchange: Optional[str] = None

    def rate_limit(self, clock) -> Optional[limits.MessageRateLimit]:
        """A new charger's message rate limit, or C{None} when unlimited."""
        if not self.max_message_rate:
            return None
        return limits.MessageRateLimit(
            clock, self.max_message_rate, self.message_burst, self.max_rate_violations
        )

    def checker(self, identity: str, version: OcppVersion):
        """A new charger's payload checker, or C{None}."""
        if self.validation is None:
            return None
        return self.validation.checker_for(identity, version)


class GoneEdge:
    """
    What a link keeps of its charger's connection once that is closed: the
    names it logs by, and nothing to do for what the broker may still ask
    of it (a frame to send, a close, flow control), as a closed
    connection would do nothing.

    A closed link can live on for a while (its consumer's cancel, the
    confirms of what its session published), and it is freed with its
    session, which refers back to it, by the garbage collector's full
    pass only. Kept, the connection (autobahn's protocol, the transport,
    their buffers) would wait for that pass with it; replaced by this, it
    is freed as soon as it closes.
    """

    __slots__ = ("peer", "factory")

    def __init__(self, edge) -> None:
        self.peer = edge.peer
        self.factory = edge.factory

    def send_frame(self, frame: bytes) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class ChargerEffects:
    """
    The session's L{SessionEffects} over the AMQP bridge and the charger's
    edge: what L{ChargerLink} does when its session asks. Kept apart from
    the lifecycle so that each reads on its own; the attributes are the
    link's.
    """

    __slots__ = ()

    settings: ChargerSettings
    bridge: object
    audit: object
    edge: object
    identity: str
    version: OcppVersion
    headers: FixedHeaders
    consumer: object

    def send_to_charger(self, frame: bytes) -> None:
        audit = self.audit
        if audit is not None:
            audit.frame(self.identity, self.version.subprotocol, AUDIT_OUT, frame)
        self.edge.send_frame(frame)

    def publish(self, routing_key, body, correlation_id, action, mandatory, on_outcome,
                extra_headers=None) -> None:
        headers = self.headers
        if extra_headers:
            headers = {**headers, **extra_headers}
        self.bridge.publish(
            None,
            routing_key,
            body,
            correlation_id=correlation_id,
            type=action,
            reply_to=self.identity,
            headers=headers,
            mandatory=mandatory,
            on_outcome=on_outcome,
        )

    def publish_reply(self, reply_to, correlation_id, body, on_outcome,
                      extra_headers=None) -> None:
        headers = self.headers
        if extra_headers:
            headers = {**headers, **extra_headers}
        # The default exchange routes by queue name, which is also how
        # RabbitMQ's direct reply-to pseudo-queue is addressed.
        self.bridge.publish(
            topology.DEFAULT_EXCHANGE,
            reply_to,
            body,
            correlation_id=correlation_id,
            headers=headers,
            on_outcome=on_outcome,
        )

    # A delivery's tag belongs to the connection it came on: the consumer
    # drops acks and requeues for a lost connection (its broker requeued
    # them already), so a session may call these at any time.

    def ack(self, delivery: Delivery) -> None:
        if self.consumer is not None:
            self.consumer.ack(delivery)

    def reject(self, delivery: Delivery, reason: str) -> None:
        _log.warn(
            "Command for {identity} rejected: {reason}",
            identity=self.identity,
            reason=reason,
        )
        if self.consumer is not None:
            self.consumer.reject(delivery)

    def dead_letter(self, delivery: Delivery, headers: dict, on_outcome) -> bool:
        exchange = self.settings.dead_letter_exchange
        if not exchange:
            return False
        _log.warn(
            "Command for {identity} not sent, dead-lettered to {exchange}: {code}: {reason}",
            identity=self.identity,
            exchange=exchange,
            code=headers.get(topology.HEADER_VALIDATION_CODE),
            reason=framing.truncate_for_log(
                headers.get(topology.HEADER_VALIDATION_ERROR, "")
            ),
        )
        # As RabbitMQ would dead-letter it: to the dead-letter exchange with
        # the routing key it was published with (the identity).
        self.bridge.publish(
            exchange,
            topology.charger_binding_key(self.identity),
            delivery.body,
            correlation_id=delivery.correlation_id,
            reply_to=delivery.reply_to,
            headers={**self.headers, **headers},
            on_outcome=on_outcome,
        )
        return True

    def requeue(self, delivery: Delivery) -> None:
        if self.consumer is not None:
            self.consumer.requeue(delivery)

    def current(self, delivery: Delivery) -> bool:
        return self.consumer is not None and self.consumer.current(delivery)

    def close(self, code: int, reason: str) -> None:
        self.edge.close(code, reason)


class ChargerLink(ChargerEffects):
    """
    One charger from its handshake on: its edge protocol, session and
    consumer, and where it is in its life (L{ChargerState}).

    @ivar consumer: its consumer while it has one (acks and requeues go
        through it).
    @ivar starting: the consumer being started, until it is up or given up.
    """

    __slots__ = (
        "settings", "bridge", "audit", "on_state", "edge", "identity", "version",
        "session", "consumer", "starting", "headers", "connected_at", "state",
        "rate_limit", "stats", "claimed_at",
    )

    def __init__(self, edge, settings: ChargerSettings, bridge, clock, *, audit=None,
                 metrics=None, on_state: Optional[Callable[["ChargerLink"], None]] = None,
                 ) -> None:
        """
        A handshake claims an identity: the link starts L{CLAIMED}.

        @param edge: the charger's L{ocppgw.edge.ChargerProtocol}; its
            C{identity} and C{version} are those of the handshake.
        @param bridge: what the gateway needs of the broker (L{ocppgw.broker.Bridge}:
            the L{ocppgw.amqp.AmqpBridge}, or a fake in tests).
        @param audit: an L{ocppgw.audit.AuditTrail}, or C{None}.
        @param metrics: an L{ocppgw.metrics.Metrics}, or C{None}.
        @param on_state: called with the link after each of its moves.
        """
        self.settings = settings
        self.bridge = bridge
        self.audit = audit
        self.on_state = on_state
        self.edge = edge
        self.identity: str = edge.identity
        self.version: OcppVersion = edge.version
        # The same table for every publish of this charger, encoded once.
        self.headers = FixedHeaders({
            topology.HEADER_IDENTITY: self.identity,
            topology.HEADER_VERSION: self.version.subprotocol,
            topology.HEADER_NODE: settings.node,
        })
        self.stats = ChargerStats(metrics, self.version.routing_prefix)
        self.session = ChargerSession(
            self.identity,
            self.version,
            self,
            clock,
            call_timeout=settings.call_timeout,
            max_bad_frames=settings.max_bad_frames,
            max_message_id_length=settings.max_message_id_length,
            stats=self.stats,
            checker=settings.checker(self.identity, self.version),
        )
        self.consumer = None
        self.starting: Optional[defer.Deferred] = None
        self.connected_at = 0.0
        #: when the handshake claimed the identity (the clock's time): what
        #: orders this claim against another gateway process's takeover
        self.claimed_at: float = clock.seconds()
        self.state = ChargerState.CLAIMED
        self.rate_limit = settings.rate_limit(clock)

    @property
    def listener(self) -> str:
        """The name of the listener the charger came in on."""
        return getattr(self.edge.factory, "listener", "ws")

    @property
    def peer(self) -> str:
        """The charger's address, as the edge tells it."""
        return self.edge.peer

    @property
    def detached(self) -> bool:
        """Whether the charger is replaced or closed (its session ended)."""
        return self.state is ChargerState.REPLACED or self.state is ChargerState.CLOSED

    def _goto(self, new: ChargerState) -> None:
        check_transition(CHARGER_TRANSITIONS, self.state, new, f"charger {self.identity!r}")
        self.state = new
        if self.on_state is not None:
            self.on_state(self)

    # -- the handshake -----------------------------------------------------------

    def declaring(self) -> None:
        """
        Its queue is being declared. (A claim a newer handshake took over
        meanwhile stays L{REPLACED}; its handshake is refused once the
        declare is done.)
        """
        if self.state is ChargerState.CLAIMED:
            self._goto(ChargerState.DECLARING)

    def connection_gone(self) -> None:
        """
        The charger's connection is closed (the link is detached or about
        to be): keep only a L{GoneEdge} of it. Called once, by the gateway
        when the edge tells it the connection closed.
        """
        self.edge = GoneEdge(self.edge)

    def superseded(self) -> None:
        """A newer handshake claimed the identity before this one opened."""
        if self.state in HANDSHAKING:
            self._goto(ChargerState.REPLACED)

    def refused(self) -> None:
        """Its handshake failed, or the connection went before it opened."""
        if self.state in HANDSHAKING:
            self._goto(ChargerState.CLOSED)

    def attach(self, now: float) -> None:
        """The WebSocket is open (the 101 was sent at C{now})."""
        self.connected_at = now
        self._goto(ChargerState.ATTACHED)

    # -- over the rate -----------------------------------------------------------

    def over_rate(self, verdict: int, data: bytes) -> None:
        """
        A frame came over the charger's message rate (C{verdict} of its
        L{limits.MessageRateLimit}): the session answers it as a frame
        over the rate, or, at the end of a long streak, the charger is
        closed (1008).
        """
        violations = self.rate_limit.violations
        if violations == 1:
            _log.warn("{identity} is over its message rate limit", identity=self.identity)
        if verdict == limits.TOO_MANY:
            _log.warn(
                "Closing {identity}: {count} messages over its rate limit",
                identity=self.identity,
                count=violations,
            )
            self.session.stop_reading()
            self.close(CLOSE_POLICY, "Message rate limit exceeded")
            return
        self.session.rate_limited(data)

    # -- the consumer ------------------------------------------------------------

    def start_consuming(self) -> None:
        """
        Start the consumer (ATTACHED or RESTORING); CONSUMING once the
        broker says consume-ok, BROKER_LOST if the connection goes first.
        """
        try:
            d = self.bridge.consume(
                topology.charger_queue(self.identity),
                self.session.delivery,
                self._consumer_lost,
            )
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._consumer_started, self._consumer_failed).addErrback(
            lambda f: _log.failure("Starting the consumer of {identity}", f,
                                   identity=self.identity))
        self.starting = d
        d.addBoth(self._consumer_settled, d)

    def _consumer_settled(self, _result, d: defer.Deferred) -> None:
        # forget the start once it is over: kept, the fired Deferred would
        # hold the consumer (and, through it, this link) for the charger's
        # whole life
        if self.starting is d:
            self.starting = None

    def _consumer_started(self, consumer):
        if self.detached:
            # ended while consume was on its way: nothing delivered can
            # have been sent to the charger
            self.consumer = consumer
            return self._cancel_and_requeue([])
        if self.state is ChargerState.BROKER_LOST:
            return None  # lost meanwhile (its connection is gone too)
        self.consumer = consumer
        self._goto(ChargerState.CONSUMING)
        return consumer

    def _consumer_failed(self, failure) -> None:
        if not self.detached:
            self._queue_failed(failure, "Could not consume commands for {identity}: {error}")

    def _queue_failed(self, failure, message: str) -> None:
        """
        A consume or a declare failed: without a broker the charger waits
        for the next reconnect; otherwise it cannot get commands and is
        closed.
        """
        if failure.check(BrokerUnavailable):
            self.broker_lost()
            return
        _log.warn(message, identity=self.identity, error=failure.getErrorMessage())
        self.close(CLOSE_INTERNAL, "Command queue unavailable")

    def _consumer_lost(self, why: str) -> None:
        """
        The consumer ended while its connection lives (the queue was
        deleted, or its channel closed): the charger cannot get commands.
        """
        self.consumer = None
        if self.detached:
            return
        _log.warn(
            "Consumer of {identity} lost: {why}", identity=self.identity, why=why
        )
        self.close(CLOSE_INTERNAL, "Command queue lost")

    # -- the broker's outages ----------------------------------------------------

    def declare_queue(self) -> defer.Deferred:
        """Declare and bind the charger's queue (idempotent)."""
        return self.bridge.declare_queue(
            topology.charger_queue(self.identity),
            topology.charger_binding_key(self.identity),
            self.settings.queue_arguments,
        )

    def broker_lost(self) -> None:
        """
        The broker connection is lost. The broker requeues every
        unacknowledged command by itself; the charger stays until the link
        is back (L{restore}) or the outage grace ends.
        """
        if self.detached or self.state is ChargerState.BROKER_LOST:
            return
        self.consumer = None
        self.session.broker_lost()
        self._goto(ChargerState.BROKER_LOST)

    def restore(self) -> None:
        """
        The link is open again: declare the queue again (the node we are
        on now may not have it, a classic queue may be gone with its
        node) and consume it again.
        """
        if self.state is not ChargerState.BROKER_LOST:
            return
        self._goto(ChargerState.RESTORING)

        def declared(_):
            if self.state is ChargerState.RESTORING:
                self.start_consuming()

        def failed(failure):
            if self.state is ChargerState.RESTORING:
                self._queue_failed(failure, "Could not restore the queue of {identity}: {error}")

        self.declare_queue().addCallbacks(declared, failed).addErrback(
            lambda f: _log.failure("Restoring {identity}", f, identity=self.identity))

    def rebind(self) -> defer.Deferred:
        """
        The exchange was deleted and declared again: bind the queue again
        (declaring it too; both are idempotent).
        """
        if self.state is not ChargerState.CONSUMING:
            return defer.succeed(None)

        def failed(failure):
            if not failure.check(BrokerUnavailable):
                _log.warn("Could not bind the queue of {identity} again: {error}",
                          identity=self.identity, error=failure.getErrorMessage())

        return self.declare_queue().addErrback(failed)

    # -- the end -----------------------------------------------------------------

    def detach(self, replaced: bool) -> defer.Deferred:
        """
        End the session, hand unanswered commands back to the queue.

        @return: a Deferred that fires once the consumer is cancelled and
            the requeues have been sent, so that a connection replacing
            this one starts consuming only afterwards.
        """
        if self.detached:
            return defer.succeed(None)
        self._goto(ChargerState.REPLACED if replaced else ChargerState.CLOSED)
        unanswered = self.session.end()
        if self.consumer is not None:
            return self._cancel_and_requeue(unanswered)
        starting = self.starting
        if starting is not None and not starting.called:
            # consume is on its way: `started` cancels it once it is ok,
            # so that a connection replacing this one consumes after it
            done: defer.Deferred = defer.Deferred()
            starting.addBoth(lambda _: done.callback(None))
            return done
        # no consumer: the broker was lost (and requeued everything)
        return defer.succeed(None)

    def _cancel_and_requeue(self, unanswered: list) -> defer.Deferred:
        consumer = self.consumer
        d = consumer.cancel()
        for delivery in unanswered:
            consumer.requeue(delivery)
        return d
