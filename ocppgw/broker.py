"""
What the gateway needs of the broker side, as typed protocols.

The gateway (L{ocppgw.gateway}) and its presence messages
(L{ocppgw.presence}) reach the broker only through these few calls, so
that anything implementing them can stand in for the AMQP bridge:
L{ocppgw.amqp.AmqpBridge} does it over RabbitMQ, and
L{ocppgw.testing.FakeBridge} does it in memory, for tests that need no
broker.

A leaf module (it imports nothing of ocppgw but the leaf L{ocppgw.outcome}),
so that both sides can name these protocols without depending on each
other.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

from twisted.internet import defer

from ocppgw.outcome import Delivery, OutcomeCallback


@runtime_checkable
class CommandConsumer(Protocol):
    """
    One charger's consumer on its command queue, as the bridge's
    C{consume} gives it.

    A delivery's tag belongs to the connection it came on: once that
    connection is gone, acks and requeues of its deliveries are dropped
    (the broker has requeued them already), so the gateway may call these
    at any time.
    """

    def ack(self, delivery: Delivery) -> None:
        """The command is done with: remove it from the queue."""

    def reject(self, delivery: Delivery) -> None:
        """The command can never be sent: remove it (dead-lettered by the queue, if set up)."""

    def requeue(self, delivery: Delivery) -> None:
        """
        Give the command back to the queue. Asked for while the consumer
        is being cancelled, it goes out only after the cancel is
        confirmed, so that it cannot come straight back to this consumer.
        """

    def current(self, delivery: Delivery) -> bool:
        """Whether C{delivery} came on the connection in use (acking it means something)."""

    def cancel(self) -> defer.Deferred:
        """Stop consuming; fires once the broker confirmed it (and the requeues asked for meanwhile went out)."""


@runtime_checkable
class Bridge(Protocol):
    """
    The broker, as the gateway uses it: publishes with confirms, charger
    queues and their consumers, and what it tells about its link.
    """

    @property
    def connected(self) -> bool:
        """Whether the link to the broker is open (publishes, declares and consumes can work)."""

    def add_observer(self, observer: Callable[[bool, str], None]) -> None:
        """
        Call C{observer(connected, why)} when the link opens (C{True}) and
        when it is lost (C{False}, once per loss, before anything in flight
        on the lost connection is settled).
        """

    def add_flow_observer(self, observer: Callable[[bool], None]) -> None:
        """Call C{observer(paused)} when publishing should stop (C{True}) and when it may go on."""

    def add_control_handler(self, handler: Callable[[dict], None]) -> None:
        """Call C{handler(message)} with every message another gateway process sends (L{publish_control})."""

    def add_topology_observer(self, observer: Callable[[], None]) -> None:
        """Call C{observer()} once the exchanges were declared again after being deleted: bind again."""

    def may_have_peers(self) -> bool:
        """Whether another gateway process may be listening to control messages."""

    def publish_control(self, message: dict, on_outcome: Optional[OutcomeCallback] = None) -> None:
        """Tell every other gateway process C{message} (a JSON object)."""

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
        on_outcome: Optional[OutcomeCallback] = None,
        ordered: bool = False,
    ) -> None:
        """
        Publish with confirms; C{on_outcome(PublishOutcome)} is called
        once (at once with C{FAILED} when the link is not open).

        @param exchange: C{None} for the OCPP exchange, C{""} for the
            default exchange (replies to a C{reply_to} address).
        @param ordered: reach the broker in the order made, with the
            other ordered publishes.
        """

    def declare_queue(self, queue: str, binding_key: str, arguments: dict) -> defer.Deferred:
        """
        Declare a charger's durable queue and bind it to the OCPP
        exchange. Fails with L{ocppgw.amqp.DeclareFailed} when the broker
        refuses the queue, L{ocppgw.amqp.BrokerUnavailable} or
        L{ocppgw.amqp.ChannelGone} when the link cannot carry it.
        """

    def consume(
        self,
        queue: str,
        on_delivery: Callable[[Delivery], None],
        on_lost: Callable[[str], None],
    ) -> defer.Deferred:
        """
        Start consuming C{queue}: fires with a L{CommandConsumer} once the
        broker confirmed it, fails with L{ocppgw.amqp.BrokerUnavailable}
        when the link is lost first.

        @param on_lost: called with a reason if the consumer ends without
            being cancelled while the link lives (the queue was deleted).
        """


__all__ = ["Bridge", "CommandConsumer"]
