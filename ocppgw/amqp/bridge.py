"""
The AMQP bridge: how the gateway uses the broker for its chargers.

pika's Twisted adapter is deprecated upstream, so everything pika-specific
lives behind the small surface of L{AmqpBridge}: C{publish}, C{declare}
helpers, C{consume} and the connection lifecycle. The rest of ocppgw knows
publishes, outcomes and deliveries, not frames and channels.

How the broker is used, and why:

- One AMQP connection carries every charger (a charger is not an AMQP
  connection). Its socket has Nagle off: small AMQP writes otherwise wait
  for the broker's delayed ACK (~40 ms a round trip).
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
- Consumers are spread over a few I{consumer channels} with a per-consumer
  prefetch, using pika's callback consumer (the Twisted wrapper's
  per-consumer DeferredQueue costs more for thousands of chargers).
  A command is requeued only after its consumer's cancel-ok: a nack goes
  out at once but a cancel waits its turn, so an earlier requeue could come
  straight back to the consumer being cancelled.
- Deliveries and confirms, most of what the broker sends, are read by
  L{ocppgw.amqp.reader.FrameReader} without pika's frame objects; pika
  still handles every other frame.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections import OrderedDict, deque
from typing import Callable, Optional
from urllib.parse import urlsplit

import orjson
import pika
import pika.exceptions
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.logger import Logger

from ocppgw import peers
from ocppgw.amqp.reader import install_reader
from ocppgw.amqp.wire import (
    encode_ack, encode_basic_consume, encode_publish, encode_queue_bind, encode_queue_declare,
)
from ocppgw.config import mask_url
from ocppgw.peers import PeerDirectory
from ocppgw.session import Delivery, PublishOutcome

_log = Logger()

_CONFIRMED = PublishOutcome.CONFIRMED
_UNROUTABLE = PublishOutcome.UNROUTABLE
_FAILED = PublishOutcome.FAILED

#: Persistent delivery mode: charger frames survive a broker restart.
_PERSISTENT = 2


class BrokerUnavailable(Exception):
    """
    The broker connection is not up, so the request cannot be served.
    """


class DeclareFailed(Exception):
    """
    The broker refused to declare or bind a charger queue.
    """


class ChannelGone(Exception):
    """
    The channel carrying an operation closed before it completed.
    """


def _endpoint(reactor, url: str, timeout: float):
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


def _channel(connection: TwistedProtocolConnection) -> defer.Deferred:
    """
    Open a plain pika channel (not the Twisted wrapper, see module doc).
    """
    d: defer.Deferred = defer.Deferred()
    connection._impl.channel(on_open_callback=d.callback)
    return d


class _Channel:
    """
    Base of our channel roles: a pika channel and whether it is usable.
    """

    channel = None

    @property
    def open(self) -> bool:
        # pika refuses methods on a closing channel, not only a closed one
        return self.channel.is_open


class _ConfirmChannel(_Channel):
    """
    A publish channel in confirm mode that tracks its own delivery tags.
    """

    def __init__(self, channel, window: int, on_closed: Callable[["_ConfirmChannel"], None],
                 on_full: Optional[Callable[[bool], None]] = None):
        self.channel = channel
        self._window = window
        # Called with True when publishes start waiting for room in the
        # window, and with False once the window is half empty again.
        self._on_full = on_full
        self.full = False
        self._seq = 0
        # seq -> [on_outcome, returned]
        self._pending: OrderedDict[int, list] = OrderedDict()
        self._backlog: deque = deque()
        self._prefix = f"{channel.channel_number}.{os.urandom(4).hex()}."
        self._prefix_len = len(self._prefix)
        # pika's body chunk size is frame_max minus the frame's 8 bytes
        self._frame_max = channel.connection._body_max_length + 8
        self._on_closed = on_closed
        self._drained: list[defer.Deferred] = []
        #: called with the seconds from publish to confirm, or None
        self.observe_latency: Optional[Callable[[float], None]] = None
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(self._closed)

    def start(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.channel.confirm_delivery(
            ack_nack_callback=self._on_confirm, callback=lambda _frame: d.callback(self)
        )
        return d

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._backlog)

    def publish(self, exchange, routing_key, body, properties, mandatory, on_outcome):
        if len(self._pending) >= self._window:
            self._backlog.append(
                (exchange, routing_key, body, properties, mandatory, on_outcome)
            )
            if not self.full:
                self.full = True
                if self._on_full is not None:
                    self._on_full(True)
            return
        self._send(exchange, routing_key, body, properties, mandatory, on_outcome)

    def _send(self, exchange, routing_key, body, properties, mandatory, on_outcome):
        channel = self.channel
        if not channel.is_open:
            if on_outcome is not None:
                on_outcome(_FAILED)
            return
        # the broker numbers the channel's publishes 1, 2, ...: so do we
        self._seq += 1
        seq = self._seq
        self._pending[seq] = [on_outcome, False, time.monotonic()]
        # encoded here rather than by pika: see ocppgw.amqp.wire
        channel.connection._output_marshaled_frames((encode_publish(
            channel.channel_number, self._frame_max, exchange, routing_key, mandatory,
            body, message_id=self._prefix + str(seq), **properties),))

    def _on_return(self, _channel, _method, properties, _body) -> None:
        # RabbitMQ sends basic.return before the ack of the same publish.
        message_id = properties.message_id or ""
        if not message_id.startswith(self._prefix):
            return
        try:
            seq = int(message_id[self._prefix_len:])
        except ValueError:
            return
        entry = self._pending.get(seq)
        if entry is not None:
            entry[1] = True

    def _on_confirm(self, frame) -> None:
        # a confirm that came through pika rather than the FrameReader
        method = frame.method
        self.confirmed(
            method.delivery_tag, method.multiple, isinstance(method, pika.spec.Basic.Nack)
        )

    def confirmed(self, tag: int, multiple: bool, nacked: bool) -> None:
        """
        The broker settled publish C{tag} (and, if C{multiple}, every
        earlier one).
        """
        pending = self._pending
        observe = self.observe_latency
        now = time.monotonic() if observe is not None else 0.0
        if multiple:
            while pending:
                seq = next(iter(pending))
                if seq > tag:
                    break
                entry = pending.popitem(last=False)[1]
                if observe is not None:
                    observe(now - entry[2])
                self._settle(entry, nacked)
        else:
            entry = pending.pop(tag, None)
            if entry is not None:
                if observe is not None:
                    observe(now - entry[2])
                self._settle(entry, nacked)
        backlog = self._backlog
        while backlog and len(pending) < self._window:
            self._send(*backlog.popleft())
        if self.full and not backlog and len(pending) <= self._window // 2:
            self.full = False
            if self._on_full is not None:
                self._on_full(False)
        if not pending and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    @staticmethod
    def _settle(entry: list, nacked: bool) -> None:
        on_outcome = entry[0]
        if on_outcome is None:
            return
        if nacked:
            on_outcome(_FAILED)
        elif entry[1]:
            on_outcome(_UNROUTABLE)
        else:
            on_outcome(_CONFIRMED)

    def drained(self) -> defer.Deferred:
        """
        Fires when every publish so far is settled.
        """
        if not self._pending and not self._backlog:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._drained.append(d)
        return d

    def _closed(self, _channel, reason) -> None:
        entries = list(self._pending.values())
        entries.extend([item[5], False] for item in self._backlog)
        self._pending.clear()
        self._backlog.clear()
        if self.full:
            self.full = False
            if self._on_full is not None:
                self._on_full(False)
        for entry in entries:
            if entry[0] is not None:
                entry[0](_FAILED)
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)
        self._on_closed(self, reason)


class _DeclareChannel(_Channel):
    """
    A channel that only declares and binds charger queues, many at a time.

    The declare (no-wait) and the bind are written directly (see
    L{ocppgw.amqp.wire}) rather than through pika, which would send one
    at a time per channel; the broker answers the binds in order, and the
    L{FrameReader} hands us each bind-ok.
    """

    def __init__(self, channel, on_closed: Callable[["_DeclareChannel", object], None]):
        self.channel = channel
        # operations sent on this channel and not yet answered, oldest first
        self.in_flight: deque[tuple[str, defer.Deferred]] = deque()
        self._on_closed = on_closed
        channel.add_on_close_callback(self._closed)

    def declare_and_bind(self, queue, arguments, exchange, binding_key, d) -> None:
        channel = self.channel
        number = channel.channel_number
        self.in_flight.append((queue, d))
        channel.connection._output_marshaled_frames((
            encode_queue_declare(number, queue, durable=True, nowait=True, arguments=arguments),
            encode_queue_bind(number, queue, exchange, binding_key),
        ))

    def bound(self) -> None:
        _queue, d = self.in_flight.popleft()
        d.callback(None)

    def _closed(self, _channel, reason) -> None:
        self._on_closed(self, reason)


class _ConsumerChannel(_Channel):
    """
    A channel carrying many chargers' consumers.
    """

    def __init__(self, channel, on_closed: Callable[["_ConsumerChannel", object], None]):
        self.channel = channel
        self.consumers: dict[str, "Consumer"] = {}
        # consumer tags: unique on the channel, and telling in the broker's
        # management UI whose consumer it is
        self._tag_prefix = f"ocppgw.{channel.channel_number}.{os.urandom(3).hex()}."
        self._tags = itertools.count(1)
        self._on_closed = on_closed
        channel.add_on_close_callback(self._closed)
        channel.add_on_cancel_callback(self._cancelled_by_broker)

    def _cancel_ok(self, frame) -> None:
        """
        One cancel-ok, for the consumer it names.

        pika registers a C{basic_cancel} callback for every cancel-ok on the
        channel, without matching the consumer tag: with one callback per
        consumer, the first cancel-ok fired them all (requeueing the others'
        commands before their own cancel-ok) and each registration scanned
        all pending ones (quadratic: 14 ms of CPU per charger when 10,000
        reconnected at once, bench.storm). Every consumer passes this same
        method, which pika counts instead of adding, and it finds the
        consumer by the tag in the frame.
        """
        consumer = self.consumers.get(frame.method.consumer_tag)
        if consumer is not None and consumer._cancelling:
            consumer._finish_cancel()

    def start(self, consumer: "Consumer", queue: str) -> None:
        """
        Send C{basic.consume} for C{consumer} at once, whatever else is in
        flight on this channel (see L{ocppgw.amqp.wire}).

        pika is told of the consumer as its own C{basic_consume} would
        (so that it can cancel it, and handle a delivery we leave to it);
        the consume-ok comes back through L{consume_ok}.
        """
        channel = self.channel
        tag = f"{self._tag_prefix}{next(self._tags)}"
        consumer.tag = tag
        self.consumers[tag] = consumer
        channel._consumers[tag] = consumer._message
        channel.connection._output_marshaled_frames(
            (encode_basic_consume(channel.channel_number, queue, tag),))

    def consume_ok(self, consumer_tag: str) -> None:
        consumer = self.consumers.get(consumer_tag)
        if consumer is not None and not consumer._ready.called:
            consumer._ready.callback(consumer)

    def deliver_to(self, consumer_tag: str) -> Optional["Consumer"]:
        """
        The consumer a delivery is for, when it can skip pika: pika knows
        the consumer and neither side is cancelling it (pika rejects
        those deliveries itself).
        """
        consumer = self.consumers.get(consumer_tag)
        if consumer is None or consumer._cancelling:
            return None
        channel = self.channel
        if consumer_tag not in channel._consumers or consumer_tag in channel._cancelled:
            return None
        return consumer

    def _cancelled_by_broker(self, frame) -> None:
        consumer = self.consumers.pop(frame.method.consumer_tag, None)
        if consumer is not None:
            consumer._lost("the charger's queue was deleted")

    def _closed(self, channel, reason) -> None:
        consumers, self.consumers = self.consumers, {}
        # When the connection is gone the broker requeues every delivery
        # and the bridge reconnects: consumers are restored, not lost.
        connection_gone = isinstance(reason, pika.exceptions.AMQPConnectionError) or not (
            channel.connection is not None and channel.connection.is_open
        )
        for consumer in consumers.values():
            consumer._lost(f"consumer channel closed: {reason}", connection_gone)
        self._on_closed(self, reason)


class Consumer:
    """
    One charger's consumer on its queue.

    Acks, rejects and requeues go to the channel the delivery came on; once
    that channel is gone they are moot (the broker has requeued the
    deliveries already) and are dropped.
    """

    __slots__ = (
        "_cc",
        "tag",
        "_on_delivery",
        "_on_lost",
        "_cancelling",
        "_requeue_later",
        "_ready",
        "cancelled",
    )

    def __init__(self, cc: _ConsumerChannel, on_delivery, on_lost) -> None:
        self._cc = cc
        self.tag: Optional[str] = None
        self._on_delivery = on_delivery
        self._on_lost = on_lost
        self._cancelling = False
        self._requeue_later: list[int] = []
        self._ready: defer.Deferred = defer.Deferred()
        self.cancelled: Optional[defer.Deferred] = None

    def _message(self, _channel, method, properties, body) -> None:
        # a delivery that came through pika rather than the FrameReader
        self._deliver(method.delivery_tag, body, properties.reply_to,
                      properties.correlation_id, method.redelivered)

    def _deliver(self, delivery_tag, body, reply_to, correlation_id, redelivered) -> None:
        self._on_delivery(
            Delivery((self._cc, delivery_tag), body, reply_to, correlation_id, redelivered)
        )

    def _lost(self, why: str, connection_gone: bool = False) -> None:
        if not self._ready.called:
            # consume never got its consume-ok (e.g. the queue is gone)
            self._on_lost = None
            self._ready.errback(ChannelGone(why))
            return
        if self._cancelling:
            self._finish_cancel()
            return
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost(why, connection_gone)

    # A delivery tag is only valid on the channel it came on. After a
    # reconnect, a session may still hold deliveries of the old connection:
    # acting on them must not touch the new channels (an unknown tag is a
    # channel error that would take every consumer on it down).

    def ack(self, delivery: Delivery) -> None:
        cc, tag = delivery.tag
        if cc.open:
            # pika's basic_ack, encoded directly (see ocppgw.amqp.wire)
            channel = cc.channel
            channel.connection._output_marshaled_frames(
                (encode_ack(channel.channel_number, tag),))

    def reject(self, delivery: Delivery) -> None:
        cc, tag = delivery.tag
        if cc.open:
            cc.channel.basic_reject(tag, requeue=False)

    def requeue(self, delivery: Delivery) -> None:
        cc, tag = delivery.tag
        if cc is not self._cc:
            if cc.open:
                cc.channel.basic_nack(tag, requeue=True)
        elif self._cancelling:
            self._requeue_later.append(tag)
        elif cc.open:
            cc.channel.basic_nack(tag, requeue=True)

    def cancel(self) -> defer.Deferred:
        """
        Stop consuming; requeues asked for meanwhile go out after cancel-ok.

        @return: a Deferred that fires once the consumer is cancelled.
        """
        if self.cancelled is not None:
            return self.cancelled
        self.cancelled = defer.Deferred()
        self._cancelling = True
        self._on_lost = None
        cc = self._cc
        if not cc.open or self.tag is None or self.tag not in cc.consumers:
            self._finish_cancel()
        else:
            cc.channel.basic_cancel(self.tag, callback=cc._cancel_ok)
        return self.cancelled

    def _finish_cancel(self) -> None:
        cc = self._cc
        cc.consumers.pop(self.tag, None)
        tags, self._requeue_later = self._requeue_later, []
        if cc.open:
            for tag in tags:
                cc.channel.basic_nack(tag, requeue=True)
        d = self.cancelled
        if d is not None and not d.called:
            d.callback(None)


class AmqpBridge:
    """
    The broker connection, its channels, and what ocppgw does over them.

    @ivar connected: whether the connection and its channels are up.
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
    ) -> None:
        self._reactor = reactor
        #: every broker URL, tried in turn (a cluster's nodes)
        self._urls = [url, *failover_urls]
        self._url_index = 0
        self._url = url
        self.exchange = exchange
        self.node = node
        self._prefetch = prefetch_count
        self._heartbeat = heartbeat
        self._connect_timeout = connect_timeout
        self._window = confirm_window
        self._n_publish = publish_channels
        self._n_consume = consumer_channels
        self._n_declare = declare_channels
        self._reconnect_max_delay = reconnect_max_delay
        self._connection: Optional[TwistedProtocolConnection] = None
        # reads deliveries and confirms past pika (see ocppgw.amqp.reader)
        self._reader = None
        self._publishers: list[_ConfirmChannel] = []
        self._declarers: list[_DeclareChannel] = []
        self._waiting_declares: list[tuple] = []
        self._consumer_channels: list[_ConsumerChannel] = []
        self._round_robin = itertools.count()
        self.connected = False
        self._stopping = False
        self._reconnect_call = None
        self._attempt = 0
        self._observers: list[Callable[[bool, str], None]] = []
        self._flow_observers: list[Callable[[bool], None]] = []
        # why publishing should pause: "blocked" (connection.blocked) and
        # the publish channels whose confirm window is full
        self._pause_reasons: set = set()
        self._control_handlers: list[Callable[[dict], None]] = []
        #: the other gateway processes on our exchange (see ocppgw.peers)
        self.peers = PeerDirectory(reactor)
        self._announcer: Optional[task.LoopingCall] = None
        self._control_queue: Optional[str] = None
        #: whether RabbitMQ blocks our publishes (connection.blocked)
        self.blocked = False
        #: called with the seconds each publish took to be confirmed
        self.observe_confirm: Optional[Callable[[float], None]] = None

    # -- lifecycle -----------------------------------------------------------

    def add_observer(self, observer: Callable[[bool, str], None]) -> None:
        """
        Call C{observer(connected, why)} when the connection goes up or down.
        """
        self._observers.append(observer)

    def _notify(self, connected: bool, why: str) -> None:
        for observer in list(self._observers):
            observer(connected, why)

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
                observer(self.paused)

    @defer.inlineCallbacks
    def start(self):
        """
        Connect, open the channels and declare the exchange.

        Fails (rather than retrying) so that a gateway pointed at a wrong
        broker, or refused by it, stops at start with a clear message.
        """
        self._stopping = False
        errors = []
        for index in range(len(self._urls)):
            self._url_index = index
            self._url = self._urls[index]
            try:
                yield self._connect()
            except Exception as error:
                errors.append(error)
                if self._stopping:
                    raise
                continue
            return
        if len(errors) == 1:
            raise errors[0]
        reasons = []
        for url, error in zip(self._urls, errors):
            text = str(error)
            shown = mask_url(url)
            reasons.append(text if shown in text else f"{shown}: {text}")
        raise BrokerUnavailable("no broker could be reached: " + "; ".join(reasons))

    def _parameters(self) -> pika.URLParameters:
        parameters = pika.URLParameters(self._url)
        parameters.heartbeat = self._heartbeat
        parameters.client_properties = {
            "connection_name": f"ocppgw {self.node}",
            "product": "ocppgw",
        }
        return parameters

    @defer.inlineCallbacks
    def _connect(self):
        parameters = self._parameters()
        connection = TwistedProtocolConnection(parameters, custom_reactor=self._reactor)
        # pika's Twisted connection reports a failed open as a bare
        # AMQPConnectionError; keep the broker's reason for the message.
        open_errors: list = []
        connection._impl.add_on_open_error_callback(
            lambda _connection, error: open_errors.append(error), remove_default=False
        )
        yield connectProtocol(
            _endpoint(self._reactor, self._url, self._connect_timeout), connection
        )
        transport = connection.transport
        no_delay = getattr(transport, "setTcpNoDelay", None)
        if no_delay is None and hasattr(transport, "getHandle"):
            no_delay = getattr(transport.getHandle(), "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        timeout = self._reactor.callLater(
            self._connect_timeout,
            lambda: connection.transport.loseConnection(),
        )
        try:
            yield connection.ready
        except Exception as error:
            # pika calls our error callback right after the one that
            # failed `ready`: give it that turn.
            yield deferLater(self._reactor, 0, lambda: None)
            reason = open_errors[0] if open_errors else error
            if isinstance(reason, (ConnectionDone, ConnectionLost)):
                # The adapter overwrites the broker's close reason with the
                # TCP close that follows it; a close during the AMQP
                # handshake is the broker refusing the login or vhost.
                why = "the broker closed the connection during login " \
                    "(check user, password and access to the vhost)"
            else:
                why = repr(reason)
            raise BrokerUnavailable(
                f"AMQP connection to {mask_url(self._url)} failed: {why}"
            ) from error
        finally:
            if timeout.active():
                timeout.cancel()
        self._connection = connection
        self._reader = install_reader(connection)
        connection.closed.addCallback(self._connection_closed, connection)
        connection._impl.add_on_connection_blocked_callback(self._blocked)
        connection._impl.add_on_connection_unblocked_callback(self._unblocked)
        try:
            yield self._declare_exchange(connection)
            yield self._start_control(connection)
            publishers = []
            for _ in range(self._n_publish):
                publishers.append((yield self._open_publisher(connection)))
            declarers = []
            for _ in range(self._n_declare):
                declarers.append((yield self._open_declarer(connection)))
            consumer_channels = []
            for _ in range(self._n_consume):
                consumer_channels.append((yield self._open_consumer_channel(connection)))
        except Exception:
            connection.close()
            raise
        for publisher in publishers:
            publisher.observe_latency = self.observe_confirm
        self._publishers = publishers
        self._declarers = declarers
        self._consumer_channels = consumer_channels
        self.connected = True
        self._attempt = 0
        self._introduce()
        _log.info(
            "Connected to the broker {url} as node {node}",
            url=mask_url(self._url),
            node=self.node,
        )
        self._notify(True, "connected")

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

    @defer.inlineCallbacks
    def declare_exchange(self, name: str) -> defer.Deferred:
        """
        Declare another durable topic exchange (the audit exchange) on a
        channel of its own; fails with L{DeclareFailed} when refused.
        """
        if self._connection is None:
            raise BrokerUnavailable("not connected to the broker")
        yield self._declare_exchange(self._connection, name)

    @defer.inlineCallbacks
    def _declare_exchange(self, connection, name: Optional[str] = None):
        channel = yield _channel(connection)
        closed: defer.Deferred = defer.Deferred()
        declared: defer.Deferred = defer.Deferred()
        channel.add_on_close_callback(lambda _ch, reason: closed.callback(reason))
        name = self.exchange if name is None else name
        channel.exchange_declare(
            name,
            exchange_type="topic",
            durable=True,
            callback=declared.callback,
        )
        result, index = yield defer.DeferredList(
            [declared, closed], fireOnOneCallback=True, consumeErrors=True
        )
        if index == 1:
            raise DeclareFailed(
                f"the broker refused to declare exchange {name!r}: {result}"
            )
        channel.close()

    # -- control messages between gateway processes ---------------------------

    def control_exchange(self) -> str:
        """
        The fanout exchange gateway processes tell each other things on.

        It is apart from the OCPP exchange so that no back end binding
        (C{#}) ever sees these messages.
        """
        return self.exchange + ".gateways"

    def add_control_handler(self, handler: Callable[[dict], None]) -> None:
        """
        Call C{handler(message)} for every control message from another
        gateway process (never for our own).
        """
        self._control_handlers.append(handler)

    @defer.inlineCallbacks
    def _start_control(self, connection):
        """
        Declare the control exchange and this process's exclusive queue on
        it, and consume it (no-ack: a control message lost with a dying
        connection concerns chargers that connection no longer serves).
        """
        channel = yield _channel(connection)
        done: defer.Deferred = defer.Deferred()
        # auto-delete: it goes away with the last gateway's queue
        channel.exchange_declare(
            self.control_exchange(), exchange_type="fanout", auto_delete=True,
            callback=done.callback,
        )
        yield done
        done = defer.Deferred()
        channel.queue_declare("", exclusive=True, auto_delete=True, callback=done.callback)
        frame = yield done
        queue = frame.method.queue
        done = defer.Deferred()
        channel.queue_bind(queue, self.control_exchange(), callback=done.callback)
        yield done
        done = defer.Deferred()
        channel.basic_consume(queue, self._control_message, auto_ack=True,
                              callback=done.callback)
        yield done
        self._control_queue = queue

    def _control_message(self, _channel, _method, properties, body) -> None:
        headers = properties.headers or {}
        node = headers.get("x-ocppgw-node")
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
            try:
                handler(message)
            except Exception:
                _log.failure("Control message handler failed")

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
            headers={"x-ocppgw-node": self.node},
            persistent=False,
            on_outcome=on_outcome,
        )

    @defer.inlineCallbacks
    def exchange_exists(self, name: str):
        """
        Whether exchange C{name} exists (a passive declare on a channel of
        its own, which the broker closes when it does not).

        Publishing to a missing exchange closes the publishing channel, and
        with it every charger's unconfirmed publishes: check first.

        @return: a Deferred firing with C{True} or C{False}.
        """
        connection = self._connection
        if connection is None or not self.connected:
            raise BrokerUnavailable("not connected to the broker")
        channel = yield _channel(connection)
        closed: defer.Deferred = defer.Deferred()
        declared: defer.Deferred = defer.Deferred()
        channel.add_on_close_callback(lambda _ch, reason: closed.callback(reason))
        channel.exchange_declare(name, passive=True, callback=declared.callback)
        _result, index = yield defer.DeferredList(
            [declared, closed], fireOnOneCallback=True, consumeErrors=True
        )
        if index == 0:
            channel.close()
        return index == 0

    @defer.inlineCallbacks
    def _open_publisher(self, connection):
        channel = yield _channel(connection)
        key = object()
        publisher = _ConfirmChannel(
            channel, self._window, self._publisher_closed,
            on_full=lambda full: self._set_pause(key, full),
        )
        publisher.observe_latency = self.observe_confirm
        yield publisher.start()
        self._reader.confirm_channel(publisher)
        return publisher

    @defer.inlineCallbacks
    def _open_declarer(self, connection):
        channel = yield _channel(connection)
        declarer = _DeclareChannel(channel, self._declarer_closed)
        self._reader.declare_channel(declarer)
        return declarer

    @defer.inlineCallbacks
    def _open_consumer_channel(self, connection):
        channel = yield _channel(connection)
        ready: defer.Deferred = defer.Deferred()
        # global_qos=False: RabbitMQ applies the limit to each consumer
        # that starts on the channel afterwards, i.e. per charger.
        channel.basic_qos(prefetch_count=self._prefetch, callback=ready.callback)
        yield ready
        cc = _ConsumerChannel(channel, self._consumer_channel_closed)
        self._reader.consumer_channel(cc)
        return cc

    def _replace_channel(self, channels: list, old, opener) -> None:
        """
        Reopen a channel that closed under us, while the connection lives.
        """
        connection = self._connection
        if (
            connection is None
            or not connection.is_open
            or not self.connected
            or self._stopping
        ):
            return

        def opened(new):
            if self._connection is connection and old in channels:
                channels[channels.index(old)] = new
                if channels is self._declarers:
                    self._declarer_opened()

        def failed(failure):
            _log.failure("Could not reopen an AMQP channel", failure)

        opener(connection).addCallbacks(opened, failed)

    def _publisher_closed(self, publisher, reason) -> None:
        if self.connected and not self._stopping:
            _log.warn("Publish channel closed: {reason}", reason=reason)
        self._replace_channel(self._publishers, publisher, self._open_publisher)

    def _declarer_closed(self, declarer: _DeclareChannel, reason) -> None:
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
        connection = self._connection
        broker_gone = connection is None or not connection.is_open or self._stopping
        for position, (_queue, d) in enumerate(in_flight):
            if broker_gone:
                d.errback(BrokerUnavailable(text))
            elif position == 0:
                d.errback(DeclareFailed(text))
            else:
                d.errback(ChannelGone(text))
        self._replace_channel(self._declarers, declarer, self._open_declarer)

    def _consumer_channel_closed(self, cc, reason) -> None:
        if self.connected and not self._stopping:
            _log.warn("Consumer channel closed: {reason}", reason=reason)
        self._replace_channel(self._consumer_channels, cc, self._open_consumer_channel)

    def _connection_closed(self, reason, connection) -> None:
        if connection is not self._connection:
            return
        was_connected = self.connected
        self.connected = False
        self.blocked = False
        self._connection = None
        self._control_queue = None
        # a new connection starts unblocked
        self._set_pause("blocked", False)
        why = f"broker connection closed: {reason}"
        waiting, self._waiting_declares = self._waiting_declares, []
        for *_args, d in waiting:
            d.errback(BrokerUnavailable(why))
        if not self._stopping:
            _log.error("{why}", why=why)
        if was_connected:
            self._notify(False, why)
        if not self._stopping:
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        self._attempt += 1
        delay = min(self._reconnect_max_delay, 0.5 * 2 ** min(self._attempt, 10))
        delay *= random.uniform(0.5, 1.0)
        _log.info("Reconnecting to the broker in {delay:.1f} s", delay=delay)
        self._reconnect_call = self._reactor.callLater(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_call = None
        if self._stopping:
            return
        # The node we lost (or could not reach) is the likeliest to be
        # down: try the next one.
        self._url_index = (self._url_index + 1) % len(self._urls)
        self._url = self._urls[self._url_index]

        def failed(failure):
            _log.warn("Broker reconnect failed: {error}", error=failure.getErrorMessage())
            if not self._stopping and not self.connected:
                self._schedule_reconnect()

        self._connect().addErrback(failed)

    @defer.inlineCallbacks
    def stop(self, confirm_timeout: float = 5.0):
        """
        Wait (bounded) for outstanding confirms, then close the connection.
        """
        self._stopping = True
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        if self._announcer is not None and self._announcer.running:
            self._announcer.stop()
        self._announcer = None
        connection = self._connection
        if connection is None:
            return
        if self.connected:
            self.publish_control({"type": peers.BYE, "node": self.node})
        drained = defer.DeferredList([p.drained() for p in self._publishers])
        timer = self._reactor.callLater(confirm_timeout, drained.cancel)
        try:
            yield drained
        except defer.CancelledError:
            _log.warn("Stopping with publishes the broker has not confirmed")
        finally:
            if timer.active():
                timer.cancel()
        self.connected = False
        closed = connection.closed
        connection.close()
        if closed is not None:
            yield closed

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
        Publish with confirms; C{on_outcome(PublishOutcome)} is called once.

        @param exchange: the exchange, C{None} for the OCPP exchange and
            C{""} for the default exchange (replies to C{reply_to}).
        @param ordered: always use the first publish channel, so that
            such publishes reach the broker in the order they were made
            (the audit trail); others are spread over the channels.
        """
        publishers = self._publishers
        if not self.connected or not publishers:
            if on_outcome is not None:
                on_outcome(_FAILED)
            return
        if len(publishers) == 1 or ordered:
            publisher = publishers[0]
        else:
            publisher = publishers[next(self._round_robin) % len(publishers)]
        if not publisher.open:
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
            "app_id": "ocppgw",
            "headers": headers,
        }
        publisher.publish(
            self.exchange if exchange is None else exchange,
            routing_key,
            body,
            properties,
            mandatory,
            on_outcome,
        )

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
        if not self.connected:
            d.errback(BrokerUnavailable("not connected to the broker"))
            return
        declarers = [c for c in self._declarers if c.open]
        if not declarers:
            # every declare channel is being reopened; wait for one
            self._waiting_declares.append((queue, binding_key, arguments, d))
            return
        declarer = min(declarers, key=lambda c: len(c.in_flight))
        declarer.declare_and_bind(queue, arguments, self.exchange, binding_key, d)

    def _declarer_opened(self) -> None:
        waiting, self._waiting_declares = self._waiting_declares, []
        for queue, binding_key, arguments, d in waiting:
            self._declare(queue, binding_key, arguments, d)

    def consume(self, queue: str, on_delivery, on_lost) -> defer.Deferred:
        """
        Start consuming C{queue}.

        @param on_delivery: called with a L{Delivery} for every message.
        @param on_lost: called with a reason if the consumer ends without
            being cancelled by us (queue deleted, channel or connection lost).
        @return: a Deferred firing with the L{Consumer} once consume-ok.
        """
        channels = [c for c in self._consumer_channels if c.open]
        if not self.connected or not channels:
            return defer.fail(BrokerUnavailable("not connected to the broker"))
        cc = min(channels, key=lambda c: len(c.consumers))
        consumer = Consumer(cc, on_delivery, on_lost)
        cc.start(consumer, queue)
        return consumer._ready
