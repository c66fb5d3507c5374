"""
The gateway: where the WebSocket edge, the sessions and the AMQP bridge meet.

The edge and the bridge do not know each other (docs/architecture.md,
"Shape"). This module
implements the edge's L{ChargerHub} and, per charger, the session's
L{SessionEffects} on top of the bridge. It also owns the registry of
connected chargers, which is what makes "last connection wins" work:

1. a charger's handshake claims its identity (a later handshake for the
   same identity takes the claim over);
2. an existing connection with that identity is detached -- its session
   ended, its consumer cancelled, its unanswered commands requeued after the
   cancel-ok -- and closed, and announces no offline status;
3. the charger's queue is declared and bound I{before} the 101, so that a
   CSMS answer to the very first frame has a queue to land in;
4. after the upgrade the consumer starts and the charger is announced.

Across several gateway processes (sharing one broker) the same rule holds
through a I{takeover} message: before declaring a charger's queue, the
process that takes a charger tells every other process (a fanout control
exchange, see L{AmqpBridge.publish_control}); a process that holds that
charger detaches and closes it as replaced, requeueing its unanswered
commands after its consumer is cancelled. With
C{[queue] x-single-active-consumer} the new consumer gets nothing before
the old one is cancelled, so no command reaches both connections. A
process that knows of no other (L{ocppgw.peers}) skips the broadcast.

When the broker connection breaks, chargers are kept for a grace period
(their CALLs get CALLERROR InternalError meanwhile); once the bridge is
back every kept charger's queue is declared again and its consumer
restored. Chargers still there when the grace period ends are closed with
1012 (or kept, if configured), so none is left talking to nobody.

Flow control: while the bridge says publishing should pause (the broker
blocked the connection, or a confirm window is full) no charger is read
from; they are resumed together.

Shutdown drains: chargers are closed with 1012 spread over a window, so
that the fleet reconnects to other processes gradually.
"""

from __future__ import annotations

import enum
from typing import Optional

from twisted.internet import defer, task
from twisted.logger import Logger

from ocppgw import framing, limits, topology
from ocppgw.amqp import AmqpBridge, BrokerUnavailable, ChannelGone, DeclareFailed, FixedHeaders
from ocppgw.edge import ChargerProtocol, Refused
from ocppgw.audit import IN as AUDIT_IN, OUT as AUDIT_OUT
from ocppgw.framing import MAX_MESSAGE_ID_LENGTH, OcppVersion
from ocppgw.metrics import ChargerStats
from ocppgw.presence import Presence
from ocppgw.session import ChargerSession, Delivery
from ocppgw.states import check_transition

_log = Logger()

#: Close code and reason for a connection replaced by a newer one.
CLOSE_REPLACED = (1000, "Replaced by a new connection")
#: Close code for chargers whose broker side broke (RFC 6455: 1011).
CLOSE_INTERNAL = 1011
#: Close code when the gateway shuts down (RFC 6455 "going away").
CLOSE_GOING_AWAY = 1001
#: Close code for a drain or a broker outage: come back (elsewhere) later
#: (IANA WebSocket registry: 1012 "Service Restart").
CLOSE_SERVICE_RESTART = 1012
#: Close code for a charger that keeps sending over its rate limit
#: (RFC 6455: 1008 "Policy Violation").
CLOSE_POLICY = 1008
#: Control message type announcing that a process took a charger over.
CONTROL_TAKEOVER = "takeover"


class ChargerState(enum.Enum):
    """Where an attached charger's link to its command queue is."""

    #: open; its consumer is being started
    ATTACHED = "attached"
    #: its consumer is up: commands flow
    CONSUMING = "consuming"
    #: the broker connection is lost; the charger stays (outage grace)
    BROKER_LOST = "broker lost"
    #: the broker is back: queue declared again, consumer being started
    RESTORING = "restoring"
    #: a newer connection took the identity over (here or elsewhere)
    REPLACED = "replaced"
    #: gone: closed by either side, or by the gateway's shutdown
    CLOSED = "closed"


_C = ChargerState

#: Every transition a charger link may make. A broker loss can catch a
#: charger in any live state, and each live state can end.
CHARGER_TRANSITIONS: dict[ChargerState, frozenset] = {
    _C.ATTACHED: frozenset({_C.CONSUMING, _C.BROKER_LOST, _C.REPLACED, _C.CLOSED}),
    _C.CONSUMING: frozenset({_C.BROKER_LOST, _C.REPLACED, _C.CLOSED}),
    _C.BROKER_LOST: frozenset({_C.RESTORING, _C.REPLACED, _C.CLOSED}),
    _C.RESTORING: frozenset({_C.CONSUMING, _C.BROKER_LOST, _C.REPLACED, _C.CLOSED}),
    _C.REPLACED: frozenset(),
    _C.CLOSED: frozenset(),
}

#: States in which a charger waits for its consumer to come back.
_AWAITING_BROKER = frozenset({_C.BROKER_LOST, _C.RESTORING})


class ChargerLink:
    """
    One attached charger: its edge protocol, session and consumer, and
    where its link to the broker is (L{ChargerState}).

    Implements L{SessionEffects} for the session.
    """

    __slots__ = (
        "gateway",
        "edge",
        "identity",
        "version",
        "session",
        "consumer",
        "starting",
        "headers",
        "connected_at",
        "state",
        "bucket",
        "violations",
        "last_violation",
        "listener",
        "peer",
        "stats",
    )

    def __init__(self, gateway: "Gateway", edge: ChargerProtocol, clock) -> None:
        self.gateway = gateway
        self.edge = edge
        self.identity: str = edge.identity
        self.version: OcppVersion = edge.version
        # The same table for every publish of this charger, encoded once.
        self.headers = FixedHeaders({
            topology.HEADER_IDENTITY: self.identity,
            topology.HEADER_VERSION: self.version.subprotocol,
            topology.HEADER_NODE: gateway.node,
        })
        self.listener: str = getattr(edge.factory, "listener", "ws")
        self.peer: str = edge.peer
        self.stats = ChargerStats(gateway.metrics, self.version.routing_prefix)
        self.session = ChargerSession(
            self.identity,
            self.version,
            self,
            clock,
            call_timeout=gateway.call_timeout,
            max_bad_frames=gateway.max_bad_frames,
            max_message_id_length=gateway.max_message_id_length,
            stats=self.stats,
            checker=(
                gateway.validation.checker_for(self.identity, self.version)
                if gateway.validation is not None
                else None
            ),
        )
        self.consumer = None
        # the consumer being started, until it is up (or given up)
        self.starting: Optional[defer.Deferred] = None
        self.connected_at = clock.seconds()
        self.state = ChargerState.ATTACHED
        self.bucket = (
            limits.TokenBucket(clock, gateway.max_message_rate, gateway.message_burst)
            if gateway.max_message_rate
            else None
        )
        self.violations = 0
        self.last_violation = 0.0

    @property
    def detached(self) -> bool:
        """Whether the charger is replaced or closed (its session ended)."""
        return self.state is ChargerState.REPLACED or self.state is ChargerState.CLOSED

    def _goto(self, new: ChargerState) -> None:
        check_transition(CHARGER_TRANSITIONS, self.state, new, f"charger {self.identity!r}")
        self.state = new
        if new in _AWAITING_BROKER:
            self.gateway.awaiting_broker.add(self)
        else:
            self.gateway._no_longer_awaiting(self)

    # -- SessionEffects ------------------------------------------------------

    def send_to_charger(self, frame: bytes) -> None:
        audit = self.gateway.audit
        if audit is not None:
            audit.frame(self.identity, self.version.subprotocol, AUDIT_OUT, frame)
        self.edge.send_frame(frame)

    def publish(self, routing_key, body, correlation_id, action, mandatory, on_outcome,
                extra_headers=None) -> None:
        headers = self.headers
        if extra_headers:
            headers = {**headers, **extra_headers}
        self.gateway.bridge.publish(
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
        self.gateway.bridge.publish(
            "",
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
        exchange = self.gateway.dead_letter_exchange
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
        self.gateway.bridge.publish(
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

    # -- lifecycle -------------------------------------------------------------

    def start_consuming(self) -> None:
        """
        Start the consumer (ATTACHED or RESTORING); CONSUMING once the
        broker says consume-ok, BROKER_LOST if the connection goes first.
        """
        try:
            d = self.gateway.bridge.consume(
                topology.charger_queue(self.identity),
                self.session.delivery,
                self._consumer_lost,
            )
        except Exception:
            d = defer.fail()

        def started(consumer):
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

        def failed(failure):
            if self.detached:
                return None
            if failure.check(BrokerUnavailable):
                self.broker_lost()
                return None
            _log.warn(
                "Could not consume commands for {identity}: {error}",
                identity=self.identity,
                error=failure.getErrorMessage(),
            )
            self.close(CLOSE_INTERNAL, "Command queue unavailable")
            return None

        d.addCallbacks(started, failed).addErrback(
            lambda f: _log.failure("Starting the consumer of {identity}", f,
                                   identity=self.identity))
        self.starting = d

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
        gateway = self.gateway
        d = gateway.bridge.declare_queue(
            topology.charger_queue(self.identity),
            topology.charger_binding_key(self.identity),
            gateway.queue_arguments,
        )

        def declared(_):
            if self.state is ChargerState.RESTORING:
                self.start_consuming()

        def failed(failure):
            if self.state is not ChargerState.RESTORING:
                return
            if failure.check(BrokerUnavailable):
                self.broker_lost()  # the next reconnect tries again
                return
            _log.warn(
                "Could not restore the queue of {identity}: {error}",
                identity=self.identity,
                error=failure.getErrorMessage(),
            )
            self.close(CLOSE_INTERNAL, "Command queue unavailable")

        d.addCallbacks(declared, failed).addErrback(
            lambda f: _log.failure("Restoring {identity}", f, identity=self.identity))

    def rebind(self) -> defer.Deferred:
        """
        The exchange was deleted and declared again: bind the queue again
        (declaring it too; both are idempotent).
        """
        if self.state is not ChargerState.CONSUMING:
            return defer.succeed(None)
        gateway = self.gateway

        def failed(failure):
            if not failure.check(BrokerUnavailable):
                _log.warn("Could not bind the queue of {identity} again: {error}",
                          identity=self.identity, error=failure.getErrorMessage())

        return gateway.bridge.declare_queue(
            topology.charger_queue(self.identity),
            topology.charger_binding_key(self.identity),
            gateway.queue_arguments,
        ).addErrback(failed)

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


class Gateway:
    """
    The registry of chargers and the glue between edge, sessions and broker.
    """

    def __init__(
        self,
        reactor,
        bridge: AmqpBridge,
        *,
        node: str,
        queue_arguments: dict,
        call_timeout: float = 30.0,
        max_bad_frames: int = 10,
        offline_status: bool = True,
        presence_events: bool = True,
        outage_grace: float = 30.0,
        outage_keep_chargers: bool = False,
        max_message_rate: float = 0.0,
        message_burst: int = 50,
        max_rate_violations: int = 200,
        max_owed_presence: int = 100000,
        validation=None,
        metrics=None,
        audit=None,
        max_message_id_length: int = MAX_MESSAGE_ID_LENGTH,
    ) -> None:
        """
        @param max_owed_presence: presence messages kept while the broker
            cannot take them (see L{ocppgw.presence}).
        @param max_message_id_length: the longest OCPP message id accepted
            from chargers and back end (C{[ocpp] max_message_id_length}).
        @param validation: an L{ocppgw.validation.Validation} that gives
            each charger's session its payload checker, or C{None}.
        @param metrics: an L{ocppgw.metrics.Metrics}, or C{None}.
        @param audit: an L{ocppgw.audit.AuditTrail} that mirrors every
            frame and connection event, or C{None} (the default: off).
        """
        self._reactor = reactor
        self.metrics = metrics
        self.audit = audit
        self.bridge = bridge
        self.node = node
        self.queue_arguments = dict(queue_arguments)
        self.call_timeout = call_timeout
        self.max_bad_frames = max_bad_frames
        self.max_message_id_length = max_message_id_length
        self.presence = Presence(
            bridge, reactor, node, offline_status=offline_status, events=presence_events,
            max_owed=max_owed_presence,
        )
        self.validation = validation
        #: Where refused commands are copied with the reason in headers: the
        #: charger queues' dead-letter exchange once it is known to exist
        #: (the service checks at start), else None.
        self.dead_letter_exchange: Optional[str] = None
        #: identity -> ChargerLink of attached chargers
        self.chargers: dict[str, ChargerLink] = {}
        #: the chargers waiting for their consumer to come back after a
        #: broker loss (BROKER_LOST or RESTORING): readiness waits for them
        self.awaiting_broker: set[ChargerLink] = set()
        #: fires once the last re-binding after the exchange was declared
        #: again (see _topology_restored) is done; None before any
        self.rebinding: Optional[defer.Deferred] = None
        self._restored_waiters: list[defer.Deferred] = []
        # identity -> the edge whose handshake most recently claimed it
        self._claims: dict[str, ChargerProtocol] = {}
        self._accepting = True
        self._closing: set[defer.Deferred] = set()
        self.outage_grace = outage_grace
        self.outage_keep_chargers = outage_keep_chargers
        self.max_message_rate = max_message_rate
        self.message_burst = message_burst
        self.max_rate_violations = max_rate_violations
        self._outage_timer = None
        self.reading_paused = False
        bridge.add_observer(self._broker_state)
        bridge.add_flow_observer(self._flow)
        bridge.add_control_handler(self._control)
        bridge.add_topology_observer(self._topology_restored)

    def consumers_restored(self) -> defer.Deferred:
        """
        Fires once no connected charger waits for its consumer to come
        back after a broker loss (at once if none does): what /readyz's
        C{consumers} check waits for.
        """
        if not self.awaiting_broker:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._restored_waiters.append(d)
        return d

    def _no_longer_awaiting(self, link: "ChargerLink") -> None:
        awaiting = self.awaiting_broker
        if link not in awaiting:
            return
        awaiting.discard(link)
        if not awaiting and self._restored_waiters:
            waiters, self._restored_waiters = self._restored_waiters, []
            for d in waiters:
                d.callback(None)

    # -- ChargerHub --------------------------------------------------------------

    @defer.inlineCallbacks
    def charger_connecting(self, edge: ChargerProtocol, identity: str, version: OcppVersion):
        if not self._accepting:
            raise Refused(503, "Service Unavailable")
        if not self.bridge.connected:
            raise Refused(503, "Service Unavailable")
        self._claims[identity] = edge
        # Other gateway processes that hold this charger let it go while
        # we declare its queue (when there are any: see ocppgw.peers).
        if self.bridge.may_have_peers():
            self.bridge.publish_control(
                {"type": CONTROL_TAKEOVER, "identity": identity, "node": self.node}
            )
        try:
            previous = self.chargers.get(identity)
            if previous is not None:
                _log.info(
                    "{identity} reconnected from {peer}: replacing the old connection",
                    identity=identity,
                    peer=edge.peer,
                    version=version.subprotocol,
                    event="replacing",
                )
                yield self._detach(previous, replaced=True, code=CLOSE_REPLACED[0],
                                   reason=CLOSE_REPLACED[1])
                previous.close(*CLOSE_REPLACED)
                # answers to CALLs sent on the old connection still come
                edge.inherited_calls = previous.session.handover()
            try:
                yield self.bridge.declare_queue(
                    topology.charger_queue(identity),
                    topology.charger_binding_key(identity),
                    self.queue_arguments,
                )
            except DeclareFailed as error:
                _log.error(
                    "Queue of {identity} cannot be declared: {error}",
                    identity=identity,
                    error=str(error),
                )
                raise Refused(500, "Internal Server Error")
            except (BrokerUnavailable, ChannelGone):
                raise Refused(503, "Service Unavailable")
            if self._claims.get(identity) is not edge:
                # A newer connection for this identity came in meanwhile.
                raise Refused(409, "Conflict")
        except BaseException:
            if self._claims.get(identity) is edge:
                del self._claims[identity]
            raise

    def charger_opened(self, edge: ChargerProtocol) -> None:
        identity = edge.identity
        if not self._accepting:
            # the handshake finished while the gateway began to drain
            edge.close(CLOSE_SERVICE_RESTART, "Gateway restarting")
            return
        if self._claims.get(identity) is not edge:
            edge.close(*CLOSE_REPLACED)
            return
        link = ChargerLink(self, edge, self._reactor)
        if edge.inherited_calls:
            link.session.adopt_open_calls(edge.inherited_calls)
            edge.inherited_calls = None
        edge.link = link
        self.chargers[identity] = link
        if self.reading_paused:
            edge.pause_reading()
        if self.bridge.connected:
            link.start_consuming()
        else:
            # the link was lost between the queue's declare and the 101:
            # the charger waits for it like the others
            link.broker_lost()
        _log.info(
            "{identity} connected from {peer} speaking {version}",
            identity=identity,
            peer=edge.peer,
            version=edge.version.subprotocol,
            listener=link.listener,
            event="connected",
        )
        if self.audit is not None:
            self.audit.event(
                identity, link.version.subprotocol, "connected",
                peer=link.peer, listener=link.listener, node=self.node,
            )
        self.presence.connected(link)

    def charger_frame(self, edge: ChargerProtocol, data: bytes) -> None:
        link = edge.link
        if link is None:
            return
        if self.audit is not None:
            self.audit.frame(link.identity, link.version.subprotocol, AUDIT_IN, data)
        bucket = link.bucket
        if bucket is None:
            link.session.charger_frame(data)
            return
        now = self._reactor.seconds()
        if bucket.take():
            # a second without excess ends a violation streak
            if link.violations and now - link.last_violation > 1.0:
                link.violations = 0
            link.session.charger_frame(data)
            return
        link.violations += 1
        link.last_violation = now
        if link.violations == 1:
            _log.warn(
                "{identity} is over its message rate limit", identity=link.identity
            )
        if link.violations >= self.max_rate_violations:
            _log.warn(
                "Closing {identity}: {count} messages over its rate limit",
                identity=link.identity,
                count=link.violations,
            )
            link.session.stop_reading()
            link.close(CLOSE_POLICY, "Message rate limit exceeded")
            return
        link.session.rate_limited(data)

    def charger_closed(self, edge: ChargerProtocol, code, reason: str) -> None:
        identity = edge.identity
        if self._claims.get(identity) is edge:
            del self._claims[identity]
        link = edge.link
        if link is None:
            return
        edge.link = None
        if self.chargers.get(identity) is link:
            del self.chargers[identity]
        if link.detached:
            return  # replaced, or detached by shutdown: already announced
        self._detach(link, replaced=False, code=code, reason=reason)

    # -- helpers --------------------------------------------------------------

    def _detach(self, link: ChargerLink, replaced: bool, code=None, reason: str = "") -> defer.Deferred:
        if link.detached:
            return defer.succeed(None)
        if self.chargers.get(link.identity) is link:
            del self.chargers[link.identity]
        d = link.detach(replaced)
        duration = self._reactor.seconds() - link.connected_at
        _log.info(
            "{identity} disconnected ({why}, code {code}) after {duration:.1f} s",
            identity=link.identity,
            why="replaced" if replaced else "gone",
            code=code,
            reason=framing.truncate_for_log(reason) if reason else reason,
            duration=round(duration, 3),
            peer=link.peer,
            version=link.version.subprotocol,
            listener=link.listener,
            frames_in=link.stats.frames_in,
            frames_out=link.stats.frames_out,
            event="disconnected",
        )
        if self.metrics is not None:
            self.metrics.disconnect(
                link.version.routing_prefix, "replaced" if replaced else code,
                link, reason, duration,
            )
        if self.audit is not None:
            self.audit.event(
                link.identity, link.version.subprotocol, "disconnected",
                code=code, replaced=replaced, duration=round(duration, 3), node=self.node,
            )
        if not replaced:
            self.presence.disconnected(link, code)
        return d

    def _broker_state(self, connected: bool, why: str) -> None:
        """
        The broker link opened, or was lost (told once per loss, before
        anything in flight on the lost connection is settled).

        Lost: every charger is told (its consumer is gone, the broker
        requeues its unacknowledged commands) but stays for
        C{outage_grace} seconds -- new ones get 503 meanwhile -- and is
        then closed with 1012 rather than left talking to nobody.
        Open: presence messages owed since the loss are published, and
        every kept charger's queue and consumer is restored.
        """
        if connected:
            if self._outage_timer is not None and self._outage_timer.active():
                self._outage_timer.cancel()
            self._outage_timer = None
            self.presence.flush()
            links = [link for link in self.chargers.values()
                     if link.state is ChargerState.BROKER_LOST]
            if links:
                _log.info("Restoring {count} chargers' consumers", count=len(links))
            for link in links:
                link.restore()
            return
        for link in list(self.chargers.values()):
            link.broker_lost()
        if self.outage_keep_chargers or self._outage_timer is not None or not self._accepting:
            return  # (shutting down: the drain closes the chargers)
        if self.outage_grace <= 0:
            self._outage_over()
        else:
            self._outage_timer = self._reactor.callLater(self.outage_grace, self._outage_over)

    def _outage_over(self) -> None:
        self._outage_timer = None
        if self.bridge.connected:
            return
        links = list(self.chargers.values())
        if links:
            _log.warn(
                "Broker still unreachable: closing {count} chargers (1012)", count=len(links)
            )
        for link in links:
            self._detach(link, replaced=False, code=CLOSE_SERVICE_RESTART)
            link.close(CLOSE_SERVICE_RESTART, "Broker unavailable")

    def _topology_restored(self) -> None:
        """
        The exchange was deleted under us and declared again: bind every
        charger's queue again, and publish what is owed.
        """
        links = list(self.chargers.values())
        _log.info("Binding {count} chargers' queues again", count=len(links))
        self.presence.flush()
        done = defer.DeferredList([link.rebind() for link in links], consumeErrors=True)
        done.addCallback(lambda _: _log.info(
            "Bindings of {count} chargers' queues restored", count=len(links),
            event="amqp_bindings_restored"))
        self.rebinding = done

    def _flow(self, paused: bool) -> None:
        """
        Stop reading from every charger while publishing is paused.
        """
        self.reading_paused = paused
        for link in list(self.chargers.values()):
            if paused:
                link.edge.pause_reading()
            else:
                link.edge.resume_reading()

    def _control(self, message: dict) -> None:
        """
        A message from another gateway process.
        """
        if message.get("type") != CONTROL_TAKEOVER:
            return
        identity = message.get("identity")
        if not isinstance(identity, str):
            return
        link = self.chargers.get(identity)
        if link is None:
            return
        _log.info(
            "{identity} reconnected to gateway {node}: replacing the connection here",
            identity=identity,
            node=str(message.get("node"))[:255],
            peer=link.peer,
            version=link.version.subprotocol,
            listener=link.listener,
            event="replacing",
        )
        self._detach(link, replaced=True, code=CLOSE_REPLACED[0], reason=CLOSE_REPLACED[1])
        link.close(*CLOSE_REPLACED)

    # -- shutdown ---------------------------------------------------------------

    def stop_accepting(self) -> None:
        """
        The gateway is shutting down: refuse new chargers; the drain
        closes the others, so no outage timer is left to do it.
        """
        self._accepting = False
        if self._outage_timer is not None and self._outage_timer.active():
            self._outage_timer.cancel()
        self._outage_timer = None

    @property
    def accepting(self) -> bool:
        """False once the gateway is shutting down (draining)."""
        return self._accepting

    def disconnect(self, identity: str, code: int = 1000,
                   reason: str = "Disconnected by the operator") -> bool:
        """
        Close one charger's connection (the admin API's DELETE).

        @return: whether a charger with that identity was connected.
        """
        link = self.chargers.get(identity)
        if link is None:
            return False
        _log.info(
            "{identity} disconnected by the operator",
            identity=identity, peer=link.peer, version=link.version.subprotocol,
            event="operator_disconnect",
        )
        link.close(code, reason)
        return True

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "Gateway shutting down") -> defer.Deferred:
        """
        Close every charger and requeue what they held.

        @return: a Deferred firing when every consumer is cancelled and
            every held command requeued.
        """
        waits = []
        for link in list(self.chargers.values()):
            waits.append(self._detach(link, replaced=False, code=code))
            link.close(code, reason)
        return defer.DeferredList(waits, consumeErrors=True)

    def drain(self, window: float, code: int = CLOSE_SERVICE_RESTART,
              reason: str = "Gateway restarting") -> defer.Deferred:
        """
        Close every charger, spread evenly over C{window} seconds, and
        requeue what each held.

        @return: a Deferred firing once the last charger is detached and
            its commands requeued.
        """
        links = list(self.chargers.values())
        if not links or window <= 0:
            return self.close_all(code, reason)
        step = window / len(links)
        waits = []

        def close_one(link):
            if link.detached:
                return None
            d = self._detach(link, replaced=False, code=code)
            link.close(code, reason)
            return d

        for index, link in enumerate(links):
            waits.append(
                task.deferLater(self._reactor, index * step, close_one, link)
            )
        _log.info(
            "Draining {count} chargers over {window:g} s", count=len(links), window=window
        )
        return defer.DeferredList(waits, consumeErrors=True)
