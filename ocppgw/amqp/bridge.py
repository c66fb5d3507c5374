"""
The AMQP bridge: how the gateway uses the broker for its chargers.

pika's Twisted adapter is deprecated upstream, so everything pika-specific
lives behind the small surface of L{AmqpBridge}: C{publish}, C{declare}
helpers, C{consume} and the connection lifecycle. The rest of ocppgw knows
publishes, outcomes and deliveries, not frames and channels.

How the broker is used, and why:

- One AMQP connection carries every charger (a charger is not an AMQP
  connection). Which connection is current, and what happens when it is
  lost, is L{ocppgw.amqp.link.BrokerLink}'s job: a state machine that
  reconnects with back-off to the next URL, every time. Nothing is sent
  unless the link is open and the channel belongs to the current
  connection (L{ocppgw.amqp.connection}).
- Charger frames go out on a few I{publish channels} in confirm mode.
  pika's Twisted channel keeps only the last C{basic.return} and credits it
  to the lowest tag of a multiple ack, so we use the plain pika channel and
  track delivery tags ourselves: every publish carries a C{message_id} made
  of a per-channel prefix and its sequence number, a return marks that
  sequence number, and the ack that follows settles it. Pending publishes
  sit in an insertion-ordered map so a multiple ack pops from the front
  instead of scanning them all, and the number in flight is bounded.
- Charger queues are declared on separate I{declare channels}: a failing
  declare (a queue that exists with other arguments) closes its channel,
  and that must not take consumers or publishes with it. The declare is
  sent C{nowait} and followed by a confirmed bind: bind-ok proves both.
  Many are in flight per channel.
- Consumers are spread over a few I{consumer channels} with a per-consumer
  prefetch, started without waiting on each other (pika would send one
  basic.consume per channel at a time). A command is requeued only after
  its consumer's cancel-ok: a nack goes out at once but a cancel waits its
  turn, so an earlier requeue could come straight back to the consumer
  being cancelled.
- Deliveries, confirms, bind-oks and consume-oks, most of what the broker
  sends, are read by L{ocppgw.amqp.reader.FrameReader} without pika's
  frame objects; pika still handles every other frame.
- An operator may delete the OCPP exchange under a running gateway (and
  declare it again, which drops every charger queue's binding). A publish
  channel closed with 404 for it, or a periodic passive check of a
  I{sentinel} exchange bound into it (see L{topology.sentinel_exchange}),
  shows it; the bridge declares the exchanges again and tells its
  topology observers (the gateway re-binds its chargers' queues).

The channel roles live in L{ocppgw.amqp.channels}; this module holds what
each connection is set up with and what the gateway asks of it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import Callable, Optional

import orjson
import pika
import pika.exceptions
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from ocppgw import peers, topology
from ocppgw.amqp.channels import (
    Consumer, ConfirmChannel, ConsumerChannel, DeclareChannel,
)
from ocppgw.amqp.connection import BrokerConnection, guarded
from ocppgw.amqp.errors import BrokerUnavailable, ChannelGone, DeclareFailed
from ocppgw.amqp.link import BrokerLink, LinkState
from ocppgw.peers import PeerDirectory
from ocppgw.outcome import PublishOutcome

_log = Logger()

_FAILED = PublishOutcome.FAILED

#: Seconds between two passive checks that the exchanges still exist.
DEFAULT_TOPOLOGY_CHECK_INTERVAL = 15.0


class _Channels:
    """
    What one connection was set up with: its channel roles, and the
    declares waiting for a declare channel to reopen.
    """

    def __init__(self, conn: BrokerConnection, publishers, declarers, consumer_channels,
                 control_queue: str, sentinel: str) -> None:
        self.conn = conn
        self.publishers: list[ConfirmChannel] = publishers
        self.declarers: list[DeclareChannel] = declarers
        self.consumer_channels: list[ConsumerChannel] = consumer_channels
        self.control_queue = control_queue
        self.sentinel = sentinel
        self.waiting_declares: list[tuple] = []
        #: publish channels being reopened, and what waits for them
        self.reopening_publishers = 0
        self.waiting_publishes: list[tuple] = []

    def fail_waiting_publishes(self) -> None:
        waiting, self.waiting_publishes = self.waiting_publishes, []
        for args in waiting:
            on_outcome = args[-1]
            if on_outcome is not None:
                on_outcome(_FAILED)

    def retire(self, why: str) -> None:
        """
        The connection is lost: settle everything in flight, once.
        """
        waiting, self.waiting_declares = self.waiting_declares, []
        for *_args, d in waiting:
            d.errback(BrokerUnavailable(why))
        self.fail_waiting_publishes()
        for role in (*self.publishers, *self.declarers, *self.consumer_channels):
            role.retire(why)


class AmqpBridge:
    """
    The broker link, its channels, and what ocppgw does over them.

    @ivar link: the L{BrokerLink} (its C{state} says where the broker
        connection is).
    """

    def __init__(
        self,
        reactor,
        url: str,
        exchange: str,
        node: str,
        *,
        prefetch_count: int = 10,
        heartbeat: int = 60,
        connect_timeout: float = 10.0,
        confirm_window: int = 10000,
        publish_channels: int = 1,
        consumer_channels: int = 4,
        declare_channels: int = 32,
        reconnect_max_delay: float = 30.0,
        failover_urls: tuple = (),
        topology_check_interval: float = DEFAULT_TOPOLOGY_CHECK_INTERVAL,
    ) -> None:
        self._reactor = reactor
        self.exchange = exchange
        self.node = node
        self._prefetch = prefetch_count
        self._heartbeat = heartbeat
        self._window = confirm_window
        self._n_publish = publish_channels
        self._n_consume = consumer_channels
        self._n_declare = declare_channels
        self.link = BrokerLink(
            reactor,
            [url, *failover_urls],
            parameters=self._parameters,
            setup=self._setup,
            connect_timeout=connect_timeout,
            heartbeat=heartbeat,
            reconnect_max_delay=reconnect_max_delay,
            url_names=["[amqp] url"] + ["[amqp] failover_urls"] * len(failover_urls),
        )
        self.link.add_observer(self._link_changed)
        # the current connection's channels (while the link is open), and
        # those of a connection being set up
        self._channels: Optional[_Channels] = None
        self._next_channels: Optional[_Channels] = None
        # more exchanges to declare on every connection (the audit trail's)
        self._extra_exchanges: list[str] = []
        self._round_robin = itertools.count()
        self._observers: list[Callable[[bool, str], None]] = []
        self._flow_observers: list[Callable[[bool], None]] = []
        self._topology_observers: list[Callable[[], None]] = []
        # why publishing should pause: "blocked" (connection.blocked) and
        # the publish channels whose confirm window is full
        self._pause_reasons: set = set()
        self._control_handlers: list[Callable[[dict], None]] = []
        #: the other gateway processes on our exchange (see ocppgw.peers)
        self.peers = PeerDirectory(reactor)
        self._announcer: Optional[task.LoopingCall] = None
        self._check_interval = topology_check_interval
        self._checker: Optional[task.LoopingCall] = None
        self._restoring_topology = False
        # names this process's sentinel exchange: the same on every
        # connection, so that reconnecting leaves no sentinel behind
        self._sentinel_token = os.urandom(4).hex()
        #: whether RabbitMQ blocks our publishes (connection.blocked)
        self.blocked = False
        #: called with the seconds each publish took to be confirmed
        self.observe_confirm: Optional[Callable[[float], None]] = None
        #: times the OCPP exchange was found deleted and declared again
        self.topology_restores = 0

    # -- state -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the link is open: its connection and channels are up."""
        return self.link.state is LinkState.OPEN and self._channels is not None

    @property
    def state(self) -> LinkState:
        return self.link.state

    @property
    def url(self) -> str:
        """The broker URL in use or last tried (with its password)."""
        return self.link.url

    def add_observer(self, observer: Callable[[bool, str], None]) -> None:
        """
        Call C{observer(connected, why)} when the link opens (C{True}) and
        when it is lost (C{False}, once per loss, before anything in flight
        on the lost connection is settled).
        """
        self._observers.append(observer)

    def add_topology_observer(self, observer: Callable[[], None]) -> None:
        """
        Call C{observer()} once the exchanges were declared again after
        being deleted under us: bindings to them must be made again.
        """
        self._topology_observers.append(observer)

    def _notify(self, connected: bool, why: str) -> None:
        for observer in list(self._observers):
            guarded(observer, "a broker observer")(connected, why)

    def _link_changed(self, old: LinkState, new: LinkState, why: str) -> None:
        if new is LinkState.OPEN:
            self._channels, self._next_channels = self._next_channels, None
            self._introduce()
            self._start_topology_check()
            self._notify(True, why)
        elif new is LinkState.LOST:
            channels, self._channels = self._channels, None
            self._stop_topology_check()
            self.blocked = False
            # a new connection starts unblocked
            self._set_pause("blocked", False)
            # observers first: the gateway marks its chargers as without a
            # broker before their publishes in flight fail
            self._notify(False, why)
            if channels is not None:
                channels.retire(why)

    # -- flow control ----------------------------------------------------------

    def add_flow_observer(self, observer: Callable[[bool], None]) -> None:
        """
        Call C{observer(paused)} when publishing should stop (the broker
        blocked the connection, or a confirm window is full) and when it
        may go on.
        """
        self._flow_observers.append(observer)

    @property
    def paused(self) -> bool:
        """Whether publishers should stop feeding the bridge."""
        return bool(self._pause_reasons)

    def _set_pause(self, reason, on: bool) -> None:
        was = self.paused
        if on:
            self._pause_reasons.add(reason)
        else:
            self._pause_reasons.discard(reason)
        if self.paused != was:
            _log.info(
                "Publishing {state} ({reason})",
                state="paused" if self.paused else "resumed",
                reason=reason if isinstance(reason, str) else "confirm window",
            )
            for observer in list(self._flow_observers):
                guarded(observer, "a flow observer")(self.paused)

    def _blocked(self, _connection, frame) -> None:
        self.blocked = True
        _log.warn(
            "The broker blocks publishing: {reason}",
            reason=getattr(frame.method, "reason", ""),
            event="amqp_blocked",
        )
        self._set_pause("blocked", True)

    def _unblocked(self, _connection, _frame) -> None:
        self.blocked = False
        _log.info("The broker unblocked publishing", event="amqp_unblocked")
        self._set_pause("blocked", False)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> defer.Deferred:
        """
        Connect, open the channels and declare the exchange.

        Fails (rather than retrying) so that a gateway pointed at a wrong
        broker, or refused by it, stops at start with a clear message.
        """
        return self.link.start()

    def _parameters(self, url: str) -> pika.URLParameters:
        parameters = pika.URLParameters(url)
        parameters.heartbeat = self._heartbeat
        parameters.client_properties = topology.client_properties(
            topology.gateway_connection_name(self.node))
        return parameters

    @defer.inlineCallbacks
    def _setup(self, conn: BrokerConnection):
        """
        Set a fresh connection up: exchanges, control queue, sentinel and
        channels. Every step fails if the connection is lost meanwhile.
        """
        impl = conn.impl
        impl.add_on_connection_blocked_callback(guarded(self._blocked, "connection.blocked"))
        impl.add_on_connection_unblocked_callback(
            guarded(self._unblocked, "connection.unblocked"))
        for name in (self.exchange, *self._extra_exchanges):
            yield self._declare_exchange(conn, name)
        control_queue = yield self._start_control(conn)
        sentinel = yield self._declare_sentinel(conn)
        publishers = []
        for _ in range(self._n_publish):
            publishers.append((yield self._open_publisher(conn)))
        declarers = []
        for _ in range(self._n_declare):
            declarers.append((yield self._open_declarer(conn)))
        consumer_channels = []
        for _ in range(self._n_consume):
            consumer_channels.append((yield self._open_consumer_channel(conn)))
        self._next_channels = _Channels(
            conn, publishers, declarers, consumer_channels, control_queue, sentinel
        )

    @defer.inlineCallbacks
    def stop(self, confirm_timeout: float = 5.0):
        """
        Wait (bounded) for outstanding confirms, then close the connection
        (aborting it after C{confirm_timeout}); give up a reconnect in
        progress.
        """
        if self._announcer is not None and self._announcer.running:
            self._announcer.stop()
        self._announcer = None
        self._stop_topology_check()
        if self.connected:
            self.publish_control({"type": peers.BYE, "node": self.node})
            yield self._delete_sentinel(confirm_timeout)
        yield self.link.stop(self._drained, confirm_timeout)
        self._channels = None

    def _drained(self) -> defer.Deferred:
        channels = self._channels
        if channels is None:
            return defer.succeed(None)
        return defer.DeferredList([p.drained() for p in channels.publishers])

    # -- exchanges -------------------------------------------------------------

    @defer.inlineCallbacks
    def declare_exchange(self, name: str):
        """
        Declare another durable topic exchange (the audit exchange) on a
        channel of its own, now and on every later connection; fails with
        L{DeclareFailed} when refused.
        """
        if name not in self._extra_exchanges:
            self._extra_exchanges.append(name)
        channels = self._channels
        if channels is None or not self.connected:
            raise BrokerUnavailable("not connected to the broker")
        yield self._declare_exchange(channels.conn, name)

    @defer.inlineCallbacks
    def _declare_exchange(self, conn: BrokerConnection, name: str):
        yield self._on_own_channel(
            conn,
            lambda channel, callback: channel.exchange_declare(
                name, exchange_type="topic", durable=True, callback=callback
            ),
            lambda reason: DeclareFailed(
                f"the broker refused to declare exchange {name!r}: {reason}"
            ),
        )

    @defer.inlineCallbacks
    def _on_own_channel(self, conn: BrokerConnection, method, refused):
        """
        Run one synchronous AMQP method on a channel of its own, which the
        broker may close to refuse it; the channel is closed afterwards.

        @param method: called with the channel and the callback for its
            answer.
        @param refused: makes the exception for the broker's close reason.
        """
        channel = yield conn.channel()
        closed: defer.Deferred = defer.Deferred()
        answered: defer.Deferred = defer.Deferred()
        channel.add_on_close_callback(guarded(
            lambda _ch, reason: closed.called or closed.callback(reason), "a channel's close"))
        if not conn.call(method, channel, answered.callback):
            raise BrokerUnavailable(conn.lost_reason or "not connected")
        result, index = yield conn.wait(defer.DeferredList(
            [answered, closed], fireOnOneCallback=True, consumeErrors=True
        ))
        if index == 1:
            raise refused(result)
        conn.call(channel.close)
        return result

    @defer.inlineCallbacks
    def exchange_exists(self, name: str):
        """
        Whether exchange C{name} exists (a passive declare on a channel of
        its own, which the broker closes when it does not).

        Publishing to a missing exchange closes the publishing channel, and
        with it every charger's unconfirmed publishes: check first.

        @return: a Deferred firing with C{True} or C{False}.
        """
        channels = self._channels
        if channels is None or not self.connected:
            raise BrokerUnavailable("not connected to the broker")
        try:
            yield self._on_own_channel(
                channels.conn,
                lambda channel, callback: channel.exchange_declare(
                    name, passive=True, callback=callback),
                lambda reason: DeclareFailed(str(reason)),
            )
        except DeclareFailed:
            return False
        return True

    @defer.inlineCallbacks
    def _declare_sentinel(self, conn: BrokerConnection):
        """
        Declare this connection's sentinel exchange and bind it into the
        OCPP exchange (see L{topology.sentinel_exchange}).
        """
        name = topology.sentinel_exchange(self.exchange, self._sentinel_token)
        yield self._on_own_channel(
            conn,
            lambda channel, callback: channel.exchange_declare(
                name, exchange_type="fanout", auto_delete=True, callback=callback),
            lambda reason: DeclareFailed(f"the broker refused exchange {name!r}: {reason}"),
        )
        yield self._on_own_channel(
            conn,
            lambda channel, callback: channel.exchange_bind(
                destination=self.exchange, source=name, routing_key=topology.SENTINEL_ROUTING_KEY,
                callback=callback),
            lambda reason: DeclareFailed(f"the broker refused to bind {name!r}: {reason}"),
        )
        return name

    def _delete_sentinel(self, timeout: float) -> defer.Deferred:
        """
        Delete our sentinel when stopping (it would outlive us otherwise);
        bounded, and a failure only logged.
        """
        channels = self._channels
        if channels is None:
            return defer.succeed(None)
        d = self._on_own_channel(
            channels.conn,
            lambda channel, callback: channel.exchange_delete(channels.sentinel, callback=callback),
            lambda reason: DeclareFailed(f"sentinel not deleted: {reason}"),
        )
        timer = self._reactor.callLater(timeout, d.cancel)

        def done(result):
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                _log.warn("Could not delete the sentinel exchange {name}: {error}",
                          name=channels.sentinel, error=result.getErrorMessage())
            return None

        return d.addBoth(done)

    # -- the exchange deleted under us -------------------------------------------

    def _start_topology_check(self) -> None:
        if self._check_interval <= 0 or self._checker is not None:
            return
        self._checker = task.LoopingCall(self._check_topology)
        self._checker.clock = self._reactor
        self._checker.start(self._check_interval, now=False).addErrback(
            lambda f: _log.failure("Topology check failed", f)
        )

    def _stop_topology_check(self) -> None:
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        self._checker = None

    @defer.inlineCallbacks
    def _check_topology(self):
        """
        A passive declare of our sentinel and of the control exchange: if
        either is gone, an exchange of ours was deleted.
        """
        channels = self._channels
        if channels is None or self._restoring_topology:
            return
        for name, what in (
            (channels.sentinel, f"the exchange {self.exchange!r} was deleted"),
            (self.control_exchange(), f"the exchange {self.control_exchange()!r} was deleted"),
        ):
            try:
                exists = yield self.exchange_exists(name)
            except BrokerUnavailable:
                return  # the link handles that
            if not exists:
                self.exchange_lost(what)
                return

    def exchange_lost(self, why: str) -> None:
        """
        An exchange of ours is gone: declare the exchanges again, bind our
        control queue and a new sentinel, and tell the topology observers
        (which bind their queues again). One at a time.
        """
        channels = self._channels
        if channels is None or self._restoring_topology:
            return
        self._restoring_topology = True
        self.topology_restores += 1
        _log.error(
            "{why}: declaring the exchanges again and restoring the bindings "
            "(queues bound to the exchange lost their bindings with it)",
            why=why, event="amqp_topology_lost",
        )

        @defer.inlineCallbacks
        def restore():
            conn = channels.conn
            for name in (self.exchange, *self._extra_exchanges):
                yield self._declare_exchange(conn, name)
            yield self._declare_control_exchange(conn)
            yield self._on_own_channel(
                conn,
                lambda channel, callback: channel.queue_bind(
                    channels.control_queue, self.control_exchange(), callback=callback),
                lambda reason: DeclareFailed(f"control queue not bound again: {reason}"),
            )
            channels.sentinel = yield self._declare_sentinel(conn)

        def restored(_):
            self._restoring_topology = False
            if self._channels is not channels:
                return
            _log.info("Exchanges declared again; restoring bindings", event="amqp_topology_restored")
            for observer in list(self._topology_observers):
                guarded(observer, "a topology observer")()

        def failed(failure):
            self._restoring_topology = False
            if failure.check(BrokerUnavailable):
                return  # lost meanwhile: the reconnect declares everything
            _log.failure("Could not declare the exchanges again", failure)

        restore().addCallbacks(restored, failed)

    # -- control messages between gateway processes ---------------------------

    def control_exchange(self) -> str:
        """
        The fanout exchange gateway processes tell each other things on.
        """
        return topology.control_exchange(self.exchange)

    def add_control_handler(self, handler: Callable[[dict], None]) -> None:
        """
        Call C{handler(message)} for every control message from another
        gateway process (never for our own).
        """
        self._control_handlers.append(handler)

    def _declare_control_exchange(self, conn: BrokerConnection) -> defer.Deferred:
        # auto-delete: it goes away with the last gateway's queue
        return self._on_own_channel(
            conn,
            lambda channel, callback: channel.exchange_declare(
                self.control_exchange(), exchange_type="fanout", auto_delete=True,
                callback=callback),
            lambda reason: DeclareFailed(f"control exchange refused: {reason}"),
        )

    @defer.inlineCallbacks
    def _start_control(self, conn: BrokerConnection):
        """
        Declare the control exchange and this process's exclusive queue on
        it, and consume it (no-ack: a control message lost with a dying
        connection concerns chargers that connection no longer serves).

        @return: the queue's name.
        """
        yield self._declare_control_exchange(conn)
        channel = yield conn.channel()
        done: defer.Deferred = defer.Deferred()
        conn.call(channel.queue_declare, "", exclusive=True, auto_delete=True,
                  callback=done.callback)
        frame = yield conn.wait(done)
        queue = frame.method.queue
        done = defer.Deferred()
        conn.call(channel.queue_bind, queue, self.control_exchange(), callback=done.callback)
        yield conn.wait(done)
        done = defer.Deferred()
        conn.call(channel.basic_consume, queue,
                  guarded(self._control_message, "a control message"),
                  auto_ack=True, callback=done.callback)
        yield conn.wait(done)
        return queue

    def _control_message(self, _channel, _method, properties, body) -> None:
        headers = properties.headers or {}
        node = headers.get(topology.HEADER_NODE)
        if node == self.node:
            return
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            _log.warn("Unreadable control message ({size} bytes)", size=len(body))
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if isinstance(node, str) and node:
            if kind == peers.BYE:
                self.peers.gone(node)
            else:
                self.peers.heard(node)
        if kind in peers.TYPES:
            if kind == peers.HELLO:
                self.publish_control({"type": peers.HERE, "node": self.node})
            return
        for handler in list(self._control_handlers):
            guarded(handler, "a control message handler")(message)

    def may_have_peers(self) -> bool:
        """
        Whether another gateway process may be listening on the control
        exchange (see L{ocppgw.peers}).
        """
        return self.peers.may_have_peers()

    def _introduce(self) -> None:
        """
        Our control queue is up: say hello, and keep saying we are here.
        """
        self.peers.listening()
        self.publish_control({"type": peers.HELLO, "node": self.node})
        if self._announcer is None:
            self._announcer = task.LoopingCall(self._announce)
            self._announcer.clock = self._reactor
            self._announcer.start(peers.ANNOUNCE_INTERVAL, now=False)

    def _announce(self) -> None:
        if self.connected:
            self.publish_control({"type": peers.HERE, "node": self.node})

    def publish_control(self, message: dict, on_outcome=None) -> None:
        """
        Tell every other gateway process C{message} (a JSON object).
        """
        self.publish(
            self.control_exchange(),
            "",
            orjson.dumps(message),
            headers={topology.HEADER_NODE: self.node},
            persistent=False,
            on_outcome=on_outcome,
        )

    # -- channels ------------------------------------------------------------

    @defer.inlineCallbacks
    def _open_publisher(self, conn: BrokerConnection):
        channel = yield conn.channel()
        key = object()
        publisher = ConfirmChannel(
            conn, channel, self._window, self._publisher_closed,
            on_full=lambda full: self._set_pause(key, full),
            on_refusing=self._publisher_refusing,
        )
        publisher.observe_latency = self.observe_confirm
        yield publisher.start()
        conn.reader.confirm_channel(publisher)
        return publisher

    @defer.inlineCallbacks
    def _open_declarer(self, conn: BrokerConnection):
        channel = yield conn.channel()
        declarer = DeclareChannel(conn, channel, self._declarer_closed)
        conn.reader.declare_channel(declarer)
        return declarer

    @defer.inlineCallbacks
    def _open_consumer_channel(self, conn: BrokerConnection):
        channel = yield conn.channel()
        ready: defer.Deferred = defer.Deferred()
        # global_qos=False: RabbitMQ applies the limit to each consumer
        # that starts on the channel afterwards, i.e. per charger.
        conn.call(channel.basic_qos, prefetch_count=self._prefetch, callback=ready.callback)
        yield conn.wait(ready)
        cc = ConsumerChannel(conn, channel, self._consumer_channel_closed)
        conn.reader.consumer_channel(cc)
        return cc

    def _replace_channel(self, kind: str, old, opener) -> None:
        """
        Reopen a channel that closed under us, while its connection is the
        current one.
        """
        channels = self._channels
        if channels is None or old.conn is not channels.conn or not channels.conn.alive:
            return

        def opened(new):
            roles = getattr(channels, kind)
            if self._channels is channels and old in roles:
                roles[roles.index(old)] = new
                if kind == "declarers":
                    self._declarer_opened(channels)

        def failed(failure):
            if not failure.check(BrokerUnavailable):
                _log.failure("Could not reopen an AMQP channel", failure)

        d = opener(channels.conn).addCallbacks(opened, failed)
        if kind == "publishers":
            channels.reopening_publishers += 1
            d.addBoth(lambda _: self._publisher_reopened(channels))

    def _publisher_reopened(self, channels: _Channels) -> None:
        """
        A publish channel's replacement is open (or could not be opened):
        send what waited for it.
        """
        channels.reopening_publishers -= 1
        if channels.reopening_publishers:
            return
        waiting, channels.waiting_publishes = channels.waiting_publishes, []
        for args in waiting:
            self._publish_now(channels, *args)

    def _publisher_closed(self, publisher: ConfirmChannel, reason) -> None:
        _log.warn("Publish channel closed: {reason}", reason=reason)
        self._replace_channel("publishers", publisher, self._open_publisher)
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and \
                reason.reply_code == 404 and "exchange" in reason.reply_text:
            names = (self.exchange, self.control_exchange(), *self._extra_exchanges)
            if any(f"'{name}'" in reason.reply_text for name in names):
                self.exchange_lost(f"publishing failed: {reason.reply_text}")

    def _publisher_refusing(self, publisher: ConfirmChannel, route: str) -> None:
        """
        The broker keeps refusing every publish to C{route} on this channel
        (see L{NackWatch}): give it up (what it has in flight fails) and
        close it, and open its replacement at once; publishes meanwhile
        wait for the replacement.
        """
        _log.warn(
            "The broker refuses every publish to {route} on publish channel {number}: "
            "opening a new channel", route=route, number=publisher.channel.channel_number,
            event="amqp_channel_refusing",
        )
        publisher.retire(f"the broker refuses every publish to {route}")
        publisher.conn.call(publisher.channel.close)
        self._replace_channel("publishers", publisher, self._open_publisher)

    def _declarer_closed(self, declarer: DeclareChannel, reason) -> None:
        """
        A declare failed (or the channel died): fail the culprit, retry the
        others on a fresh channel.

        The broker handles a channel's methods in order and has answered
        every operation before the oldest one still waiting (their bind-ok
        took them off the list), so the oldest is the culprit. The others
        merely shared its channel and are retried.
        """
        text = str(reason)
        in_flight, declarer.in_flight = declarer.in_flight, deque()
        for position, (_queue, d) in enumerate(in_flight):
            if position == 0:
                d.errback(DeclareFailed(text))
            else:
                d.errback(ChannelGone(text))
        self._replace_channel("declarers", declarer, self._open_declarer)

    def _consumer_channel_closed(self, cc: ConsumerChannel, reason) -> None:
        _log.warn("Consumer channel closed: {reason}", reason=reason)
        self._replace_channel("consumer_channels", cc, self._open_consumer_channel)

    # -- publishing ----------------------------------------------------------

    def publish(
        self,
        exchange: Optional[str],
        routing_key: str,
        body: bytes,
        *,
        correlation_id: Optional[str] = None,
        type: Optional[str] = None,
        reply_to: Optional[str] = None,
        headers: Optional[dict] = None,
        mandatory: bool = False,
        persistent: bool = True,
        on_outcome=None,
        ordered: bool = False,
    ) -> None:
        """
        Publish with confirms; C{on_outcome(PublishOutcome)} is called once
        (at once with C{FAILED} when the link is not open).

        @param exchange: the exchange, C{None} for the OCPP exchange and
            C{""} for the default exchange (replies to C{reply_to}).
        @param ordered: always use the first publish channel, so that
            such publishes reach the broker in the order they were made
            (the audit trail, presence); others are spread over the
            channels.
        """
        channels = self._channels
        if channels is None or self.link.state is not LinkState.OPEN:
            if on_outcome is not None:
                on_outcome(_FAILED)
            return
        properties = {
            "content_type": "application/json",
            "persistent": persistent,
            "correlation_id": correlation_id,
            "type": type,
            "reply_to": reply_to,
            "timestamp": int(time.time()),
            "app_id": topology.APP_ID,
            "headers": headers,
        }
        self._publish_now(channels, self.exchange if exchange is None else exchange,
                          routing_key, body, properties, mandatory, ordered, on_outcome)

    def _publish_now(self, channels: _Channels, exchange, routing_key, body, properties,
                     mandatory, ordered, on_outcome) -> None:
        publishers = channels.publishers
        if len(publishers) == 1 or ordered:
            publisher = publishers[0]
        else:
            publisher = publishers[next(self._round_robin) % len(publishers)]
        if not publisher.open:
            if (channels.reopening_publishers and channels.conn.alive
                    and len(channels.waiting_publishes) < self._window):
                # its replacement is on its way: wait for it, in order
                channels.waiting_publishes.append(
                    (exchange, routing_key, body, properties, mandatory, ordered, on_outcome))
            elif on_outcome is not None:
                on_outcome(_FAILED)
            return
        publisher.publish(exchange, routing_key, body, properties, mandatory, on_outcome)

    # -- charger queues ------------------------------------------------------

    def declare_queue(
        self, queue: str, binding_key: str, arguments: dict, retries: int = 5
    ) -> defer.Deferred:
        """
        Declare a charger's durable queue and bind it to the exchange.

        Fails with L{DeclareFailed} when the broker refuses this queue (for
        example it exists with other arguments), or L{BrokerUnavailable}.
        An operation that only shared its channel with a failing one is
        retried on another channel.
        """
        d: defer.Deferred = defer.Deferred()
        self._declare(queue, binding_key, arguments, d)

        def retry(failure):
            failure.trap(ChannelGone)
            if retries <= 0:
                raise BrokerUnavailable(str(failure.value))
            return self.declare_queue(queue, binding_key, arguments, retries - 1)

        d.addErrback(retry)
        return d

    def _declare(self, queue, binding_key, arguments, d) -> None:
        channels = self._channels
        if channels is None or not self.connected:
            d.errback(BrokerUnavailable("not connected to the broker"))
            return
        declarers = [c for c in channels.declarers if c.open]
        if not declarers:
            # every declare channel is being reopened; wait for one
            channels.waiting_declares.append((queue, binding_key, arguments, d))
            return
        declarer = min(declarers, key=lambda c: len(c.in_flight))
        declarer.declare_and_bind(queue, arguments, self.exchange, binding_key, d)

    def _declarer_opened(self, channels: _Channels) -> None:
        waiting, channels.waiting_declares = channels.waiting_declares, []
        for queue, binding_key, arguments, d in waiting:
            self._declare(queue, binding_key, arguments, d)

    def consume(self, queue: str, on_delivery, on_lost) -> defer.Deferred:
        """
        Start consuming C{queue}.

        @param on_delivery: called with a L{Delivery} for every message.
        @param on_lost: called with a reason if the consumer ends without
            being cancelled by us while the connection lives (queue
            deleted, channel closed). A lost connection is reported once,
            to the bridge's observers, not to each consumer.
        @return: a Deferred firing with the L{Consumer} once consume-ok;
            failing with L{BrokerUnavailable} when the connection is lost
            first.
        """
        channels = self._channels
        if channels is None or not self.connected:
            return defer.fail(BrokerUnavailable("not connected to the broker"))
        open_channels = [c for c in channels.consumer_channels if c.open]
        if not open_channels:
            return defer.fail(BrokerUnavailable("no consumer channel is open"))
        cc = min(open_channels, key=lambda c: len(c.consumers))
        consumer = Consumer(cc, on_delivery, on_lost)
        cc.start(consumer, queue)
        return consumer._ready
