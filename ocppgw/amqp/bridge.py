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

The channel roles live in L{ocppgw.amqp.channels}; this module holds the
connection, its lifecycle and what the gateway asks of it.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
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
from ocppgw.amqp.channels import (
    Consumer, _channel, _ConfirmChannel, _ConsumerChannel, _DeclareChannel,
)
from ocppgw.amqp.errors import BrokerUnavailable, ChannelGone, DeclareFailed
from ocppgw.amqp.reader import install_reader
from ocppgw.config import mask_url
from ocppgw.peers import PeerDirectory
from ocppgw.session import PublishOutcome

_log = Logger()

_FAILED = PublishOutcome.FAILED

#: Persistent delivery mode: charger frames survive a broker restart.
_PERSISTENT = 2


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
        # Each reason names the setting and the URL (password masked), so
        # that an operator knows which line of the file to look at.
        reasons = []
        for index, (url, error) in enumerate(zip(self._urls, errors)):
            key = "[amqp] url" if index == 0 else "[amqp] failover_urls"
            text = str(error) or error.__class__.__name__
            shown = mask_url(url)
            reasons.append(f"{key}: {text}" if shown in text else f"{key} {shown}: {text}")
        if len(reasons) == 1:
            raise BrokerUnavailable(reasons[0]) from errors[0]
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
