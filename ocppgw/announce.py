"""
Telling everyone who listens that a charger came or went: the log, the
audit trail, the metrics (and the status page's recent disconnects) and
the presence messages on the broker.

One place, so that an arrival and a departure are told the same way
wherever they happen (a close, a takeover, an outage, the drain).
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger

from ocppgw import framing
from ocppgw.presence import Presence

# The gateway's namespace: operators filter the connect and disconnect
# lines on it.
_log = Logger(namespace="ocppgw.gateway")


class Announcer:
    """
    Announces the arrivals and departures of one gateway's chargers.
    """

    def __init__(self, clock, node: str, presence: Presence, metrics=None,
                 audit=None) -> None:
        """
        @param metrics: an L{ocppgw.metrics.Metrics}, or C{None}.
        @param audit: an L{ocppgw.audit.AuditTrail}, or C{None}.
        """
        self._clock = clock
        self._node = node
        self._presence = presence
        self._metrics = metrics
        self._audit = audit

    def connected(self, link) -> None:
        """C{link}'s charger is attached (its WebSocket is open)."""
        _log.info(
            "{identity} connected from {peer} speaking {version}",
            identity=link.identity,
            peer=link.peer,
            version=link.version.subprotocol,
            listener=link.listener,
            event="connected",
        )
        if self._audit is not None:
            self._audit.event(
                link.identity, link.version.subprotocol, "connected",
                peer=link.peer, listener=link.listener, node=self._node,
            )
        self._presence.connected(link)

    def disconnected(self, link, replaced: bool, code: Optional[int], reason: str) -> None:
        """
        C{link}'s charger is gone, or C{replaced} by a newer connection
        (which announces no offline status).
        """
        duration = self._clock.seconds() - link.connected_at
        _log.info(
            "{identity} disconnected ({why}, code {code}) after {duration:.1f} s",
            identity=link.identity,
            why="replaced" if replaced else "gone",
            code=code,
            reason=framing.truncate_for_log(reason) if reason else reason,
            duration=round(duration, 3),
            peer=link.peer,
            version=link.version.subprotocol,
            listener=link.listener,
            frames_in=link.stats.frames_in,
            frames_out=link.stats.frames_out,
            event="disconnected",
        )
        if self._metrics is not None:
            self._metrics.disconnect(
                link.version.routing_prefix, "replaced" if replaced else code,
                link, reason, duration,
            )
        if self._audit is not None:
            self._audit.event(
                link.identity, link.version.subprotocol, "disconnected",
                code=code, replaced=replaced, duration=round(duration, 3), node=self._node,
            )
        if not replaced:
            self._presence.disconnected(link, code)
