"""
The roles the bridge gives its AMQP channels, and a charger's consumer.

- L{ConfirmChannel}: publishes in confirm mode, tracking its own delivery
  tags (pika's Twisted channel credits a C{basic.return} to the wrong
  publish when acks are batched), matching returns by C{message_id},
  bounded by a window;
- L{DeclareChannel}: declares and binds charger queues, many in flight,
  apart from everything else because a failing declare closes its
  channel;
- L{ConsumerChannel}: carries many chargers' L{Consumer}s, started
  without waiting on each other.

Publishes, acks, declarations, binds and consumes are encoded by
L{ocppgw.amqp.wire}; confirms, deliveries, bind-oks and consume-oks are
read by L{ocppgw.amqp.reader}. pika keeps the channels' lifecycle.

Every role belongs to one L{BrokerConnection} and sends only through it
(L{BrokerConnection.write}, L{BrokerConnection.call}), so nothing goes out
on a connection that is lost. When the connection is lost the bridge
I{retires} every role at once: outcomes and Deferreds in flight are
settled then, and the close callbacks pika calls later during its own
teardown find the role retired and do nothing.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import OrderedDict, deque
from typing import Callable, Optional

import pika
import pika.exceptions
from twisted.internet import defer
from twisted.logger import Logger

from ocppgw import topology
from ocppgw.amqp.connection import BrokerConnection, guarded
from ocppgw.amqp.errors import BrokerUnavailable, ChannelGone
from ocppgw.amqp.wire import (
    encode_ack, encode_basic_consume, encode_publish, encode_queue_bind, encode_queue_declare,
)
from ocppgw.outcome import Delivery, PublishOutcome

_CONFIRMED = PublishOutcome.CONFIRMED
_UNROUTABLE = PublishOutcome.UNROUTABLE
_FAILED = PublishOutcome.FAILED

_log = Logger()


class _Channel:
    """
    Base of our channel roles: a pika channel on a connection, and whether
    it is usable.
    """

    channel = None
    conn: BrokerConnection = None
    #: set when the connection is lost (see the module docstring)
    retired = False

    @property
    def open(self) -> bool:
        # pika refuses methods on a closing channel, not only a closed one;
        # and a channel pika reports open may be on a lost connection
        return not self.retired and self.conn.alive and self.channel.is_open

    def retire(self, why: str) -> None:
        """
        The connection is lost: settle what is in flight, once.
        """
        if not self.retired:
            self.retired = True
            self._settle_all(why)

    def _settle_all(self, why: str) -> None:
        raise NotImplementedError  # each role knows what it has in flight

    def _channel_closed(self, _channel, reason) -> None:
        # pika's close callback: during pika's teardown of a lost
        # connection the role is retired already
        if self.retired:
            return
        if not self.conn.alive:
            self.retire(str(reason))
            return
        self.retired = True
        self._settle_all(str(reason))
        self._on_closed(self, reason)


class NackWatch:
    """
    Says when the broker has refused (nacked) every publish to one routing
    key for a while, with no publish to it accepted in between.

    RabbitMQ 3.10 can leave a channel refusing every publish to a quorum
    queue whose leader's node was killed just before that channel's first
    publish to it (measured on a 3-node cluster: 60 s and more, at a
    thousand nacks a second), while a new channel is served at once. Such
    a channel is closed and replaced; a broker that refuses for another
    reason (a quorum queue without a quorum) refuses the new channel too,
    which costs a channel every C{seconds}.
    """

    __slots__ = ("_seconds", "_at_least", "_now", "_routes")

    #: most routes watched at once (a route only while it is refused)
    MAX_ROUTES = 1024
    #: a route is given up on after this many seconds of refusals ...
    SECONDS = 5.0
    #: ... and at least this many refusals
    AT_LEAST = 5

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._seconds = self.SECONDS
        self._at_least = self.AT_LEAST
        self._now = now
        # routing key -> [first refusal, refusals since]
        self._routes: dict = {}

    def accepted(self, route: str) -> None:
        if self._routes:
            self._routes.pop(route, None)

    def refused(self, route: str) -> bool:
        """
        @return: whether C{route} is refused for long enough now.
        """
        now = self._now()
        watched = self._routes.get(route)
        if watched is None:
            if len(self._routes) >= self.MAX_ROUTES:
                del self._routes[next(iter(self._routes))]
            self._routes[route] = [now, 1]
            return False
        watched[1] += 1
        return watched[1] >= self._at_least and now - watched[0] >= self._seconds

    def reset(self) -> None:
        self._routes.clear()


class ConfirmChannel(_Channel):
    """
    A publish channel in confirm mode that tracks its own delivery tags.
    """

    def __init__(self, conn: BrokerConnection, channel, window: int,
                 on_closed: Callable[["ConfirmChannel", object], None],
                 on_full: Optional[Callable[[bool], None]] = None,
                 on_refusing: Optional[Callable[["ConfirmChannel", str], None]] = None):
        """
        @param on_refusing: called with the channel and a routing key when
            the broker keeps refusing every publish to it (L{NackWatch}).
        """
        self.conn = conn
        self.channel = channel
        self._window = window
        # Called with True when publishes start waiting for room in the
        # window, and with False once the window is half empty again.
        self._on_full = on_full
        self.full = False
        self._on_refusing = on_refusing
        self.nacks = NackWatch()
        self._seq = 0
        # seq -> [on_outcome, returned, sent at, routing key]
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
        channel.add_on_return_callback(guarded(self._on_return, "a publish return"))
        channel.add_on_close_callback(guarded(self._channel_closed, "a publish channel's close"))

    def start(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.channel.confirm_delivery(
            ack_nack_callback=guarded(self._on_confirm, "a publish confirm"),
            callback=lambda _frame: d.callback(self),
        )
        return self.conn.wait(d)

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
        if not self.open:
            if on_outcome is not None:
                on_outcome(_FAILED)
            return
        channel = self.channel
        # the broker numbers the channel's publishes 1, 2, ...: so do we
        self._seq += 1
        seq = self._seq
        self._pending[seq] = [on_outcome, False, time.monotonic(), routing_key]
        # encoded here rather than by pika: see ocppgw.amqp.wire
        self.conn.write((encode_publish(
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
        nacks = self.nacks
        refusing = None
        if multiple:
            settled = []
            while pending:
                seq = next(iter(pending))
                if seq > tag:
                    break
                settled.append(pending.popitem(last=False)[1])
        else:
            entry = pending.pop(tag, None)
            settled = [] if entry is None else [entry]
        for entry in settled:
            if observe is not None:
                observe(now - entry[2])
            if nacked:
                if nacks.refused(entry[3]):
                    refusing = entry[3]
            else:
                nacks.accepted(entry[3])
        if refusing is not None and self._on_refusing is not None and self.open:
            # given up before the outcomes are told, so that nothing their
            # callbacks publish goes out on this channel
            nacks.reset()
            self._on_refusing(self, refusing)
        for entry in settled:
            self._settle(entry, nacked)
        if self.retired:
            return
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
            outcome = _FAILED
        elif entry[1]:
            outcome = _UNROUTABLE
        else:
            outcome = _CONFIRMED
        try:
            on_outcome(outcome)
        except Exception:
            # one publisher's bug must not keep the others' outcomes back
            _log.failure("Error handling a publish outcome")

    def drained(self) -> defer.Deferred:
        """
        Fires when every publish so far is settled.
        """
        if not self._pending and not self._backlog:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._drained.append(d)
        return d

    def _settle_all(self, why: str) -> None:
        entries = list(self._pending.values())
        entries.extend([item[5], False] for item in self._backlog)
        self._pending.clear()
        self._backlog.clear()
        if self.full:
            self.full = False
            if self._on_full is not None:
                self._on_full(False)
        for entry in entries:
            self._settle(entry, True)
        waiting, self._drained = self._drained, []
        for d in waiting:
            d.callback(None)


class DeclareChannel(_Channel):
    """
    A channel that only declares and binds charger queues, many at a time.

    The declare (no-wait) and the bind are written directly (see
    L{ocppgw.amqp.wire}) rather than through pika, which would send one
    at a time per channel; the broker answers the binds in order, and the
    L{FrameReader} hands us each bind-ok.
    """

    def __init__(self, conn: BrokerConnection, channel,
                 on_closed: Callable[["DeclareChannel", object], None]):
        self.conn = conn
        self.channel = channel
        # operations sent on this channel and not yet answered, oldest first
        self.in_flight: deque[tuple[str, defer.Deferred]] = deque()
        self._on_closed = on_closed
        channel.add_on_close_callback(guarded(self._channel_closed, "a declare channel's close"))

    def declare_and_bind(self, queue, arguments, exchange, binding_key, d) -> None:
        number = self.channel.channel_number
        if not self.conn.write((
            encode_queue_declare(number, queue, durable=True, nowait=True, arguments=arguments),
            encode_queue_bind(number, queue, exchange, binding_key),
        )):
            d.errback(BrokerUnavailable(self.conn.lost_reason or "not connected"))
            return
        self.in_flight.append((queue, d))

    def bound(self) -> None:
        if self.in_flight:
            _queue, d = self.in_flight.popleft()
            d.callback(None)

    def _channel_closed(self, _channel, reason) -> None:
        # the bridge fails the culprit and retries the others (it needs
        # the in-flight list, so this role settles nothing itself)
        if self.retired:
            return
        self.retired = True
        if not self.conn.alive:
            self._settle_all(str(reason))
            return
        self._on_closed(self, reason)

    def _settle_all(self, why: str) -> None:
        in_flight, self.in_flight = self.in_flight, deque()
        for _queue, d in in_flight:
            d.errback(BrokerUnavailable(why))


class ConsumerChannel(_Channel):
    """
    A channel carrying many chargers' consumers.
    """

    def __init__(self, conn: BrokerConnection, channel,
                 on_closed: Callable[["ConsumerChannel", object], None]):
        self.conn = conn
        self.channel = channel
        self.consumers: dict[str, "Consumer"] = {}
        # consumer tags: unique on the channel, and telling in the broker's
        # management UI whose consumer it is
        self._tag_prefix = topology.consumer_tag_prefix(
            channel.channel_number, os.urandom(3).hex())
        self._tags = itertools.count(1)
        self._on_closed = on_closed
        #: the one callback every cancel on this channel passes pika (see
        #: L{_cancel_ok}), made once: pika counts a callback it already
        #: has, where a new wrapper per cancel would be added again
        self.cancel_ok_callback = guarded(self._cancel_ok, "a cancel-ok")
        #: the one delivery callback pika holds for every consumer on this
        #: channel (see L{_pika_delivery}): a wrapper per consumer cost
        #: ~300 bytes per charger, for deliveries that almost all skip pika
        self.delivery_callback = guarded(self._pika_delivery, "a delivery")
        channel.add_on_close_callback(guarded(self._channel_closed, "a consumer channel's close"))
        channel.add_on_cancel_callback(guarded(self._cancelled_by_broker, "a consumer's cancel"))

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

    def _pika_delivery(self, channel, method, properties, body) -> None:
        """
        A delivery pika handled itself rather than the FrameReader: to
        the consumer its tag names, or back to the queue if none here
        knows it any more.
        """
        consumer = self.consumers.get(method.consumer_tag)
        if consumer is not None:
            consumer._message(channel, method, properties, body)
        elif self.open:
            self.conn.call(channel.basic_nack, method.delivery_tag, requeue=True)

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
        if not self.open:
            consumer.settle_start(BrokerUnavailable(self.conn.lost_reason or "channel closed"))
            return
        self.consumers[tag] = consumer
        channel._consumers[tag] = self.delivery_callback
        self.conn.write((encode_basic_consume(channel.channel_number, queue, tag),))

    def consume_ok(self, consumer_tag: str) -> None:
        consumer = self.consumers.get(consumer_tag)
        if consumer is not None and consumer.ready is not None:
            consumer.settle_start(consumer)

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

    def _settle_all(self, why: str) -> None:
        consumers, self.consumers = self.consumers, {}
        # With the connection gone the broker requeues every delivery and
        # the gateway restores the consumers once the bridge is back (it
        # learns of the loss from the bridge, once); with the channel
        # alone gone, each consumer is lost.
        connection_gone = not self.conn.alive
        for consumer in consumers.values():
            consumer._lost(f"consumer channel closed: {why}", connection_gone)


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
        "ready",
        "cancelled",
    )

    def __init__(self, cc: ConsumerChannel, on_delivery, on_lost) -> None:
        self._cc = cc
        self.tag: Optional[str] = None
        self._on_delivery = on_delivery
        self._on_lost = on_lost
        self._cancelling = False
        # tags to requeue once cancelled (made on the first)
        self._requeue_later: Optional[list[int]] = None
        #: fires with this consumer once the broker's consume-ok came (or
        #: fails); C{None} once it has, so that an idle charger's consumer
        #: does not keep a fired Deferred (~300 bytes)
        self.ready: Optional[defer.Deferred] = defer.Deferred()
        self.cancelled: Optional[defer.Deferred] = None

    def settle_start(self, result) -> None:
        """The consume is settled: C{result} is this consumer, or a failure."""
        ready, self.ready = self.ready, None
        if isinstance(result, Exception):
            ready.errback(result)
        else:
            ready.callback(result)

    def _message(self, _channel, method, properties, body) -> None:
        # a delivery that came through pika rather than the FrameReader
        self._deliver(method.delivery_tag, body, properties.reply_to,
                      properties.correlation_id, method.redelivered)

    def _deliver(self, delivery_tag, body, reply_to, correlation_id, redelivered) -> None:
        try:
            self._on_delivery(
                Delivery((self._cc, delivery_tag), body, reply_to, correlation_id, redelivered)
            )
        except Exception:
            # left unacknowledged: it comes back when the consumer ends
            _log.failure("Error handling a command from a charger's queue")

    def _lost(self, why: str, connection_gone: bool = False) -> None:
        if self.ready is not None:
            # consume never got its consume-ok (the queue is gone, or the
            # connection is)
            self._on_lost = None
            self.settle_start(BrokerUnavailable(why) if connection_gone else ChannelGone(why))
            return
        if self._cancelling:
            self._finish_cancel()
            return
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None and not connection_gone:
            on_lost(why)

    # A delivery tag is only valid on the channel it came on. After a
    # reconnect, a session may still hold deliveries of the old connection:
    # acting on them must not touch the new channels (an unknown tag is a
    # channel error that would take every consumer on it down).

    @staticmethod
    def current(delivery: Delivery) -> bool:
        """
        Whether C{delivery}'s tag still means something: its channel is
        open on the connection in use.
        """
        return delivery.tag[0].open

    def ack(self, delivery: Delivery) -> None:
        cc, tag = delivery.tag
        if cc.open:
            # pika's basic_ack, encoded directly (see ocppgw.amqp.wire)
            cc.conn.write((encode_ack(cc.channel.channel_number, tag),))

    def reject(self, delivery: Delivery) -> None:
        cc, tag = delivery.tag
        if cc.open:
            cc.conn.call(cc.channel.basic_reject, tag, requeue=False)

    def requeue(self, delivery: Delivery) -> None:
        cc, tag = delivery.tag
        if cc is self._cc and self._cancelling:
            if self._requeue_later is None:
                self._requeue_later = []
            self._requeue_later.append(tag)
        elif cc.open:
            cc.conn.call(cc.channel.basic_nack, tag, requeue=True)

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
        if (
            not cc.open
            or self.tag is None
            or self.tag not in cc.consumers
            or not cc.conn.call(cc.channel.basic_cancel, self.tag, callback=cc.cancel_ok_callback)
        ):
            self._finish_cancel()
        return self.cancelled

    def _finish_cancel(self) -> None:
        cc = self._cc
        cc.consumers.pop(self.tag, None)
        tags, self._requeue_later = self._requeue_later or (), None
        # a lost connection's tags are moot: the broker requeued them
        if cc.open:
            for tag in tags:
                cc.conn.call(cc.channel.basic_nack, tag, requeue=True)
        d = self.cancelled
        if d is not None and not d.called:
            d.callback(None)
