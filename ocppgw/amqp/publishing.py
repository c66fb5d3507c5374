"""
Publishing with confirms over a connection's publish channels, and the
flow control that comes with it.

pika's Twisted channel keeps only the last C{basic.return} and credits it
to the lowest tag of a multiple ack, so the publish channels
(L{ocppgw.amqp.channels.ConfirmChannel}) are plain pika channels that
track delivery tags themselves, with a bounded number in flight. This
module spreads publishes over them, holds publishes while a closed one is
being replaced, and says when publishers should pause: the broker blocked
the connection (a memory or disk alarm), or a confirm window is full.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Optional

import pika.exceptions
from twisted.internet import defer
from twisted.logger import Logger

from ocppgw import topology
from ocppgw.amqp.channels import ConfirmChannel
from ocppgw.amqp.connection import BrokerConnection, guarded
from ocppgw.amqp.link import LinkState
from ocppgw.outcome import PublishOutcome

_log = Logger()

_FAILED = PublishOutcome.FAILED


class Publishing:
    """
    The publish side of the bridge.

    @ivar channels: the current connection's channel set, or C{None}.
    @ivar blocked: whether RabbitMQ blocks our publishes (connection.blocked).
    @ivar observe_confirm: called with the seconds each publish took to be
        confirmed, or C{None}.
    """

    def __init__(self, link, exchange: str, window: int,
                 replace_channel: Callable, exchange_lost: Callable[[str], None],
                 exchange_names: Callable[[], tuple]) -> None:
        """
        @param link: the L{ocppgw.amqp.link.BrokerLink}.
        @param replace_channel: the bridge's
            C{replace_channel(kind, old, opener)}.
        @param exchange_lost: called with why when a publish channel was
            closed because one of our exchanges is missing.
        @param exchange_names: our exchanges' names.
        """
        self._link = link
        self.exchange = exchange
        self.window = window
        #: the current connection's channel set (see L{ocppgw.amqp.bridge}),
        #: or C{None} while the link is not open; kept here, where every
        #: publish reads it
        self.channels = None
        self._replace_channel = replace_channel
        self._exchange_lost = exchange_lost
        self._exchange_names = exchange_names
        self._round_robin = itertools.count()
        self._flow_observers: list[Callable[[bool], None]] = []
        # why publishing should pause: "blocked" (connection.blocked) and
        # the publish channels whose confirm window is full
        self._pause_reasons: set = set()
        self.blocked = False
        self.observe_confirm: Optional[Callable[[float], None]] = None

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

    def set_pause(self, reason, on: bool) -> None:
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

    def watch_blocking(self, conn: BrokerConnection) -> None:
        """Follow connection.blocked and connection.unblocked on C{conn}."""
        impl = conn.impl
        impl.add_on_connection_blocked_callback(guarded(self._blocked, "connection.blocked"))
        impl.add_on_connection_unblocked_callback(
            guarded(self._unblocked, "connection.unblocked"))

    def connection_lost(self) -> None:
        """A new connection starts unblocked."""
        self.blocked = False
        self.set_pause("blocked", False)

    def _blocked(self, _connection, frame) -> None:
        self.blocked = True
        _log.warn(
            "The broker blocks publishing: {reason}",
            reason=getattr(frame.method, "reason", ""),
            event="amqp_blocked",
        )
        self.set_pause("blocked", True)

    def _unblocked(self, _connection, _frame) -> None:
        self.blocked = False
        _log.info("The broker unblocked publishing", event="amqp_unblocked")
        self.set_pause("blocked", False)

    # -- publish channels ------------------------------------------------------

    @defer.inlineCallbacks
    def open_channel(self, conn: BrokerConnection):
        """Open one publish channel on C{conn}, in confirm mode."""
        channel = yield conn.channel()
        key = object()
        publisher = ConfirmChannel(
            conn, channel, self.window, self._publisher_closed,
            on_full=lambda full: self.set_pause(key, full),
            on_refusing=self._publisher_refusing,
        )
        publisher.observe_latency = self.observe_confirm
        yield publisher.start()
        conn.reader.confirm_channel(publisher)
        return publisher

    def reopened(self, channels) -> None:
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
        self._replace_channel("publishers", publisher, self.open_channel)
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and \
                reason.reply_code == 404 and "exchange" in reason.reply_text:
            if any(f"'{name}'" in reason.reply_text for name in self._exchange_names()):
                self._exchange_lost(f"publishing failed: {reason.reply_text}")

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
        self._replace_channel("publishers", publisher, self.open_channel)

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
        channels = self.channels
        if channels is None or self._link.state is not LinkState.OPEN:
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

    def _publish_now(self, channels, exchange, routing_key, body, properties,
                     mandatory, ordered, on_outcome) -> None:
        publishers = channels.publishers
        if len(publishers) == 1 or ordered:
            publisher = publishers[0]
        else:
            publisher = publishers[next(self._round_robin) % len(publishers)]
        if not publisher.open:
            if (channels.reopening_publishers and channels.conn.alive
                    and len(channels.waiting_publishes) < self.window):
                # its replacement is on its way: wait for it, in order
                channels.waiting_publishes.append(
                    (exchange, routing_key, body, properties, mandatory, ordered, on_outcome))
            elif on_outcome is not None:
                on_outcome(_FAILED)
            return
        publisher.publish(exchange, routing_key, body, properties, mandatory, on_outcome)

    def drained(self) -> defer.Deferred:
        """Fires once every publish channel has no publish awaiting its confirm."""
        channels = self.channels
        if channels is None:
            return defer.succeed(None)
        return defer.DeferredList([p.drained() for p in channels.publishers])


__all__ = ["Publishing"]
