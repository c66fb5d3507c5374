"""
The frame audit trail: every frame of every charger, both directions, and
its connects and disconnects, mirrored to an audit exchange.

Off by default (C{[audit] enabled}). When on, the gateway declares a
durable topic exchange (C{[audit] exchange}, default C{ocpp.audit}) and
publishes to it:

- each frame a charger sends, as received (malformed ones too), with
  routing key C{<identity>.in};
- each frame sent to a charger, as sent, with routing key
  C{<identity>.out};
- a JSON event C{{"event": "connected"|"disconnected", ...}} with routing
  key C{<identity>.event}.

Every message carries the headers C{x-ocppgw-direction} (C{in}, C{out} or
C{event}), C{x-ocpp-identity}, C{x-ocpp-version}, C{x-ocppgw-node} and
C{x-ocppgw-time} (milliseconds since the epoch, when the gateway saw the
frame), plus the usual C{timestamp} property.

Nothing consumes the exchange unless the operator binds a queue to it; the
intended one is a RabbitMQ I{stream} queue (C{x-queue-type: stream}) bound
with C{#} (or C{<identity>.#} for one charger), from which any charger's
history can be replayed from a point in time (C{x-stream-offset}). The
audit publishes all go over one channel, so the stream holds them in the
order the gateway saw them. They are not mandatory: with nothing bound,
the broker drops them.
"""

from __future__ import annotations

import orjson

from ocppgw import topology
from ocppgw.topology import (
    AUDIT_EVENT as EVENT,
    AUDIT_IN as IN,
    AUDIT_OUT as OUT,
    AUDIT_HEADER_DIRECTION as HEADER_DIRECTION,
    AUDIT_HEADER_TIME as HEADER_TIME,
    audit_routing_key as routing_key,
)


class AuditTrail:
    """
    Publishes the audit trail of every charger through the bridge.
    """

    def __init__(self, bridge, exchange: str, node: str, clock) -> None:
        self._bridge = bridge
        self.exchange = exchange
        self._node = node
        self._clock = clock

    def _publish(self, identity: str, version: str, direction: str, body: bytes) -> None:
        self._bridge.publish(
            self.exchange,
            routing_key(identity, direction),
            body,
            headers={
                HEADER_DIRECTION: direction,
                topology.HEADER_IDENTITY: identity,
                topology.HEADER_VERSION: version,
                topology.HEADER_NODE: self._node,
                HEADER_TIME: int(self._clock.seconds() * 1000),
            },
            ordered=True,
        )

    def frame(self, identity: str, version: str, direction: str, body: bytes) -> None:
        """A frame from (C{IN}) or to (C{OUT}) a charger."""
        self._publish(identity, version, direction, body)

    def event(self, identity: str, version: str, event: str, **fields) -> None:
        """A connect or disconnect of a charger."""
        self._publish(
            identity, version, EVENT, orjson.dumps({"event": event, "identity": identity, **fields})
        )
