"""
Presence: what the back end is told when chargers come and go.

When a charger goes away (not when a newer connection replaces it) the
gateway publishes an offline C{StatusNotification} shaped for its version
(as the broker plugin does), and, with presence events on, C{connected}
and C{disconnected} events on C{ocppgw.connected}/C{ocppgw.disconnected}.

These messages are owed to the back end even when the broker cannot take
them: a charger that leaves during a broker outage must still be reported
offline once the broker is back, or a CSMS would show it online forever.
So every presence message is kept, in the order it was made, until the
broker has confirmed it; one whose publish fails (the link is down, or
lost while it was in flight) waits and is published again, in order,
when the link opens (L{Presence.flush}). That is at-least-once: a message
whose confirm was lost with the connection is published a second time
(the back end recognises it by its C{correlation_id}, and by the time in
its body, which is when the charger left, not when it was published).
The memory is bounded (C{max_owed}): beyond it the oldest messages are
dropped, logged and counted.
"""

from __future__ import annotations

import itertools
import os
import orjson
from twisted.logger import Logger

from ocppgw import framing, topology
from ocppgw.logs import utc_iso
from ocppgw.outcome import PublishOutcome

_log = Logger()

_FAILED = PublishOutcome.FAILED


class _Owed:
    """One presence message, until the broker confirms it."""

    __slots__ = ("routing_key", "body", "correlation_id", "type", "reply_to", "headers",
                 "in_flight")

    def __init__(self, routing_key, body, correlation_id, type_, reply_to, headers) -> None:
        self.routing_key = routing_key
        self.body = body
        self.correlation_id = correlation_id
        self.type = type_
        self.reply_to = reply_to
        self.headers = headers
        self.in_flight = False


class Presence:
    """
    Publishes presence messages, keeping those the broker has not taken.

    @ivar dropped: messages dropped because more than C{max_owed} waited.
    """

    def __init__(self, bridge, clock, node: str, *, offline_status: bool = True,
                 events: bool = True, max_owed: int = 100000) -> None:
        self._bridge = bridge
        self._clock = clock
        self._node = node
        self.offline_status = offline_status
        self.events = events
        self._max_owed = max_owed
        # sequence number -> message, oldest first
        self._owed: dict[int, _Owed] = {}
        self._sequence = itertools.count()
        self.dropped = 0

    @property
    def owed(self) -> int:
        """Messages made and not yet confirmed by the broker."""
        return len(self._owed)

    # -- what happened -------------------------------------------------------

    def connected(self, link) -> None:
        if self.events:
            self._event(link, topology.ROUTING_KEY_CONNECTED, "connected")

    def disconnected(self, link, code) -> None:
        """A charger went away for good (not replaced)."""
        if self.offline_status:
            self._offline_status(link)
        if self.events:
            self._event(link, topology.ROUTING_KEY_DISCONNECTED, "disconnected", code=code)

    def _offline_status(self, link) -> None:
        message_id = topology.OFFLINE_MESSAGE_ID_PREFIX + os.urandom(8).hex()
        body = framing.offline_status_notification(
            link.version, message_id, utc_iso(self._clock.seconds())
        )
        self._add(
            topology.routing_key(
                link.version.routing_prefix, "StatusNotification", topology.KIND_REQUEST
            ),
            body, message_id, "StatusNotification", link.identity,
            {**link.headers, topology.HEADER_SYNTHETIC: True},
        )

    def _event(self, link, routing_key: str, event: str, **extra) -> None:
        body = {
            "event": event,
            "identity": link.identity,
            "version": link.version.subprotocol,
            "node": self._node,
            "remote": link.peer,
            "time": utc_iso(self._clock.seconds()),
        }
        body.update(extra)
        self._add(routing_key, orjson.dumps(body), None, event, None, link.headers)

    # -- keeping and publishing ------------------------------------------------

    def _add(self, routing_key, body, correlation_id, type_, reply_to, headers) -> None:
        owed = self._owed
        sequence = next(self._sequence)
        entry = owed[sequence] = _Owed(routing_key, body, correlation_id, type_, reply_to, headers)
        if len(owed) > self._max_owed:
            self._drop_oldest()
        self._publish(sequence, entry)

    def _drop_oldest(self) -> None:
        owed = self._owed
        oldest = next(iter(owed))
        del owed[oldest]
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            _log.warn(
                "{dropped} presence messages dropped: more than {limit} waited for the broker",
                dropped=self.dropped, limit=self._max_owed,
            )

    def _publish(self, sequence: int, entry: _Owed) -> None:
        entry.in_flight = True

        def settled(outcome: PublishOutcome) -> None:
            entry.in_flight = False
            if outcome is not _FAILED:
                self._owed.pop(sequence, None)

        # ordered: one charger's connected and disconnected reach the
        # broker in the order they happened
        self._bridge.publish(
            None,
            entry.routing_key,
            entry.body,
            correlation_id=entry.correlation_id,
            type=entry.type,
            reply_to=entry.reply_to,
            headers=entry.headers,
            on_outcome=settled,
            ordered=True,
        )

    def flush(self) -> None:
        """
        Publish, in order, every message that is waiting (the link has
        opened, or the exchange was declared again).
        """
        waiting = [(seq, entry) for seq, entry in self._owed.items() if not entry.in_flight]
        if not waiting:
            return
        _log.info("Publishing {count} presence messages owed since the broker was lost",
                  count=len(waiting), event="presence_owed")
        for sequence, entry in waiting:
            if not self._bridge.connected:
                return
            self._publish(sequence, entry)

    def stats(self) -> dict:
        return {"owed": self.owed, "dropped": self.dropped}


__all__ = ["Presence"]
