"""
What the broker side and a charger's session tell each other about: the
outcome of a publish, and a command delivered from a charger's queue.

A leaf module (it imports nothing of ocppgw), so that the AMQP layer and
the session both use these without depending on each other.
"""

from __future__ import annotations

import enum
from typing import Callable, Optional


class PublishOutcome(enum.Enum):
    """
    What the broker did with a publish.
    """

    #: Confirmed, and routed to at least one queue (or not mandatory).
    CONFIRMED = "confirmed"
    #: Confirmed but returned: no queue is bound for the routing key.
    UNROUTABLE = "unroutable"
    #: Not confirmed: nacked, or the channel or connection went away.
    FAILED = "failed"


OutcomeCallback = Callable[[PublishOutcome], None]


class Delivery:
    """
    One command taken from a charger's queue, as the session sees it.

    C{tag} is opaque to the session; the gateway uses it to ack or reject.
    """

    __slots__ = ("tag", "body", "reply_to", "correlation_id", "redelivered")

    def __init__(
        self,
        tag: object,
        body: bytes,
        reply_to: Optional[str] = None,
        correlation_id: Optional[str] = None,
        redelivered: bool = False,
    ) -> None:
        self.tag = tag
        self.body = body
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.redelivered = redelivered

    def __repr__(self) -> str:
        return f"<Delivery tag={self.tag!r} reply_to={self.reply_to!r}>"


__all__ = ["Delivery", "OutcomeCallback", "PublishOutcome"]
