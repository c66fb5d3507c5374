"""
The charger queues: declaring and binding them, and their consumers.

Charger queues are declared on I{declare channels} of their own: a failing
declare (a queue that exists with other arguments) closes its channel, and
that must not take consumers or publishes with it. The declare is sent
C{nowait} and followed by a confirmed bind: bind-ok proves both. Many are
in flight per channel.

Consumers are spread over a few I{consumer channels} with a per-consumer
prefetch, started without waiting on each other (pika would send one
basic.consume per channel at a time).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from ocppgw.amqp.channels import Consumer, ConsumerChannel, DeclareChannel
from ocppgw.amqp.connection import BrokerConnection
from ocppgw.amqp.errors import BrokerUnavailable, ChannelGone, DeclareFailed

_log = Logger()


class ChargerQueues:
    """
    Declares charger queues and starts their consumers on the current
    connection's declare and consumer channels.
    """

    def __init__(self, exchange: str, prefetch_count: int,
                 current: Callable[[], Optional[object]], connected: Callable[[], bool],
                 replace_channel: Callable) -> None:
        """
        @param exchange: the OCPP exchange the queues are bound to.
        @param prefetch_count: unacknowledged commands per charger.
        @param current: returns the current connection's channel set, or
            C{None}.
        @param connected: whether the link is open.
        @param replace_channel: the bridge's
            C{replace_channel(kind, old, opener)}.
        """
        self.exchange = exchange
        self._prefetch = prefetch_count
        self._current = current
        self._connected = connected
        self._replace_channel = replace_channel

    @defer.inlineCallbacks
    def open_declarer(self, conn: BrokerConnection):
        channel = yield conn.channel()
        declarer = DeclareChannel(conn, channel, self._declarer_closed)
        conn.reader.declare_channel(declarer)
        return declarer

    @defer.inlineCallbacks
    def open_consumer_channel(self, conn: BrokerConnection):
        channel = yield conn.channel()
        ready: defer.Deferred = defer.Deferred()
        # global_qos=False: RabbitMQ applies the limit to each consumer
        # that starts on the channel afterwards, i.e. per charger.
        conn.call(channel.basic_qos, prefetch_count=self._prefetch, callback=ready.callback)
        yield conn.wait(ready)
        cc = ConsumerChannel(conn, channel, self._consumer_channel_closed)
        conn.reader.consumer_channel(cc)
        return cc

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
        self._replace_channel("declarers", declarer, self.open_declarer)

    def _consumer_channel_closed(self, cc: ConsumerChannel, reason) -> None:
        _log.warn("Consumer channel closed: {reason}", reason=reason)
        self._replace_channel("consumer_channels", cc, self.open_consumer_channel)

    def declare(
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
            return self.declare(queue, binding_key, arguments, retries - 1)

        d.addErrback(retry)
        return d

    def _declare(self, queue, binding_key, arguments, d) -> None:
        channels = self._current()
        if channels is None or not self._connected():
            d.errback(BrokerUnavailable("not connected to the broker"))
            return
        declarers = [c for c in channels.declarers if c.open]
        if not declarers:
            # every declare channel is being reopened; wait for one
            channels.waiting_declares.append((queue, binding_key, arguments, d))
            return
        declarer = min(declarers, key=lambda c: len(c.in_flight))
        declarer.declare_and_bind(queue, arguments, self.exchange, binding_key, d)

    def declarer_opened(self, channels) -> None:
        """
        A declare channel of the bridge's current channel set C{channels}
        is open: the declares that waited for one go out.
        """
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
        channels = self._current()
        if channels is None or not self._connected():
            return defer.fail(BrokerUnavailable("not connected to the broker"))
        open_channels = [c for c in channels.consumer_channels if c.open]
        if not open_channels:
            return defer.fail(BrokerUnavailable("no consumer channel is open"))
        cc = min(open_channels, key=lambda c: len(c.consumers))
        consumer = Consumer(cc, on_delivery, on_lost)
        ready = consumer.ready
        cc.start(consumer, queue)
        return ready


__all__ = ["ChargerQueues"]
