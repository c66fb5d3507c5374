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
  declare it again, which drops every charger queue's binding): see
  L{ocppgw.amqp.exchanges}.

The bridge is made of parts, each in its own module: the channel roles
(L{ocppgw.amqp.channels}), publishing and flow control
(L{ocppgw.amqp.publishing}), the charger queues' declares and consumers
(L{ocppgw.amqp.queues}), the exchanges and the sentinel
(L{ocppgw.amqp.exchanges}) and the control exchange between gateway
processes (L{ocppgw.amqp.control}). This module holds what each
connection is set up with, replaces channels that close under it, and is
the one surface the gateway uses.
"""

from __future__ import annotations

from typing import Callable, Optional

import pika
from twisted.internet import defer
from twisted.logger import Logger

from ocppgw.amqp.channels import ConfirmChannel, ConsumerChannel, DeclareChannel
from ocppgw.amqp.connection import BrokerConnection, guarded
from ocppgw.amqp.control import ControlPlane
from ocppgw.amqp.errors import BrokerUnavailable
from ocppgw.amqp.exchanges import DEFAULT_TOPOLOGY_CHECK_INTERVAL, Exchanges
from ocppgw.amqp.link import BrokerLink, LinkState
from ocppgw.amqp.publishing import Publishing
from ocppgw.amqp.queues import ChargerQueues
from ocppgw.outcome import PublishOutcome
from ocppgw import topology

_log = Logger()

_FAILED = PublishOutcome.FAILED


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
    @ivar publishing: publishing and flow control (L{Publishing}).
    @ivar exchanges: our exchanges and the sentinel (L{Exchanges}).
    @ivar control: the control exchange between gateway processes
        (L{ControlPlane}).
    @ivar queues: the charger queues' declares and consumers
        (L{ChargerQueues}).
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
        self._heartbeat = heartbeat
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
        self.exchanges = Exchanges(
            reactor, exchange, lambda: self._channels, lambda: self.connected,
            self._restore_topology, topology_check_interval,
        )
        self.publishing = Publishing(
            self.link, exchange, confirm_window, self._replace_channel,
            self.exchanges.lost, self.exchanges.names,
        )
        self.control = ControlPlane(
            reactor, exchange, node, self.publishing.publish, lambda: self.connected)
        self.queues = ChargerQueues(
            exchange, prefetch_count, lambda: self._channels, lambda: self.connected,
            self._replace_channel,
        )
        # the channels of a connection being set up
        self._next_channels: Optional[_Channels] = None
        self._observers: list[Callable[[bool, str], None]] = []

    @property
    def _channels(self) -> Optional[_Channels]:
        """The current connection's channels (while the link is open)."""
        return self.publishing.channels

    @_channels.setter
    def _channels(self, channels: Optional[_Channels]) -> None:
        self.publishing.channels = channels

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

    @property
    def blocked(self) -> bool:
        """Whether RabbitMQ blocks our publishes (connection.blocked)."""
        return self.publishing.blocked

    @property
    def paused(self) -> bool:
        """Whether publishers should stop feeding the bridge."""
        return self.publishing.paused

    @property
    def observe_confirm(self) -> Optional[Callable[[float], None]]:
        """Called with the seconds each publish took to be confirmed."""
        return self.publishing.observe_confirm

    @observe_confirm.setter
    def observe_confirm(self, observer: Optional[Callable[[float], None]]) -> None:
        self.publishing.observe_confirm = observer

    @property
    def topology_restores(self) -> int:
        """Times the OCPP exchange was found deleted and declared again."""
        return self.exchanges.restores

    @property
    def peers(self):
        """The other gateway processes on our exchange (see L{ocppgw.peers})."""
        return self.control.peers

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
        self.exchanges.add_observer(observer)

    def add_flow_observer(self, observer: Callable[[bool], None]) -> None:
        """
        Call C{observer(paused)} when publishing should stop (the broker
        blocked the connection, or a confirm window is full) and when it
        may go on.
        """
        self.publishing.add_flow_observer(observer)

    def add_control_handler(self, handler: Callable[[dict], None]) -> None:
        """
        Call C{handler(message)} for every control message from another
        gateway process (never for our own).
        """
        self.control.add_handler(handler)

    def _notify(self, connected: bool, why: str) -> None:
        for observer in list(self._observers):
            guarded(observer, "a broker observer")(connected, why)

    def _link_changed(self, old: LinkState, new: LinkState, why: str) -> None:
        if new is LinkState.OPEN:
            self._channels, self._next_channels = self._next_channels, None
            self.control.introduce()
            self.exchanges.start_check()
            self._notify(True, why)
        elif new is LinkState.LOST:
            channels, self._channels = self._channels, None
            self.exchanges.stop_check()
            self.publishing.connection_lost()
            # observers first: the gateway marks its chargers as without a
            # broker before their publishes in flight fail
            self._notify(False, why)
            if channels is not None:
                channels.retire(why)

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
        self.publishing.watch_blocking(conn)
        yield self.exchanges.declare_all(conn)
        control_queue = yield self.control.start(conn)
        sentinel = yield self.exchanges.declare_sentinel(conn)
        publishers = []
        for _ in range(self._n_publish):
            publishers.append((yield self.publishing.open_channel(conn)))
        declarers = []
        for _ in range(self._n_declare):
            declarers.append((yield self.queues.open_declarer(conn)))
        consumer_channels = []
        for _ in range(self._n_consume):
            consumer_channels.append((yield self.queues.open_consumer_channel(conn)))
        self._next_channels = _Channels(
            conn, publishers, declarers, consumer_channels, control_queue, sentinel
        )

    @defer.inlineCallbacks
    def _restore_topology(self, channels: _Channels):
        """
        Declare the exchanges again on C{channels}' connection, bind our
        control queue and a new sentinel (L{Exchanges.lost}).
        """
        conn = channels.conn
        yield self.exchanges.declare_all(conn)
        yield self.control.declare_exchange(conn)
        yield self.control.bind_again(conn, channels.control_queue)
        channels.sentinel = yield self.exchanges.declare_sentinel(conn)

    @defer.inlineCallbacks
    def stop(self, confirm_timeout: float = 5.0):
        """
        Wait (bounded) for outstanding confirms, then close the connection
        (aborting it after C{confirm_timeout}); give up a reconnect in
        progress.
        """
        self.control.stop_announcing()
        self.exchanges.stop_check()
        if self.connected:
            self.control.say_goodbye()
            yield self.exchanges.delete_sentinel(confirm_timeout)
        yield self.link.stop(self.publishing.drained, confirm_timeout)
        self._channels = None

    # -- what the gateway asks of the broker ------------------------------------

    def publish(self, exchange: Optional[str], routing_key: str, body: bytes,
                **options) -> None:
        """
        Publish with confirms; C{on_outcome(PublishOutcome)} is called once.
        See L{Publishing.publish} for the options.
        """
        self.publishing.publish(exchange, routing_key, body, **options)

    def declare_queue(self, queue: str, binding_key: str, arguments: dict,
                      retries: int = 5) -> defer.Deferred:
        """
        Declare a charger's durable queue and bind it to the exchange (see
        L{ChargerQueues.declare}).
        """
        return self.queues.declare(queue, binding_key, arguments, retries)

    def consume(self, queue: str, on_delivery, on_lost) -> defer.Deferred:
        """Start consuming C{queue} (see L{ChargerQueues.consume})."""
        return self.queues.consume(queue, on_delivery, on_lost)

    # -- exchanges and the control exchange ------------------------------------

    def declare_exchange(self, name: str) -> defer.Deferred:
        """
        Declare another durable topic exchange (the audit exchange) on a
        channel of its own, now and on every later connection; fails with
        L{DeclareFailed} when refused.
        """
        return self.exchanges.declare_extra(name)

    def exchange_exists(self, name: str) -> defer.Deferred:
        """
        Whether exchange C{name} exists (a passive declare on a channel of
        its own, which the broker closes when it does not).

        Publishing to a missing exchange closes the publishing channel, and
        with it every charger's unconfirmed publishes: check first.

        @return: a Deferred firing with C{True} or C{False}.
        """
        return self.exchanges.exists(name)

    def exchange_lost(self, why: str) -> None:
        """
        An exchange of ours is gone: declare the exchanges again, bind our
        control queue and a new sentinel, and tell the topology observers
        (which bind their queues again). One at a time.
        """
        self.exchanges.lost(why)

    def control_exchange(self) -> str:
        """
        The fanout exchange gateway processes tell each other things on.
        """
        return self.control.exchange

    def publish_control(self, message: dict, on_outcome=None) -> None:
        """
        Tell every other gateway process C{message} (a JSON object).
        """
        self.control.publish(message, on_outcome)

    def may_have_peers(self) -> bool:
        """
        Whether another gateway process may be listening on the control
        exchange (see L{ocppgw.peers}).
        """
        return self.control.peers.may_have_peers()

    # -- channels ------------------------------------------------------------

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
                    self.queues.declarer_opened(channels)

        def failed(failure):
            if not failure.check(BrokerUnavailable):
                _log.failure("Could not reopen an AMQP channel", failure)

        d = opener(channels.conn).addCallbacks(opened, failed)
        if kind == "publishers":
            channels.reopening_publishers += 1
            d.addBoth(lambda _: self.publishing.reopened(channels))
