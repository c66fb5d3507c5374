"""
Takeover messages between gateway processes, batched.

When a charger connects, every other gateway process sharing the broker
must let go of an older connection of that charger (see
L{ocppgw.gateway}). The message goes through a fanout exchange, so each
one costs a publish, its confirm and a delivery to I{every} process: with
N processes, N deliveries per connect. In a reconnection storm that is a
tenth or more of a connect's CPU, for a message that almost never finds
an older connection.

L{TakeoverBatch} sends the identities that connect within
L{TAKEOVER_WINDOW} seconds as one message, so a storm pays for a message
per window rather than per charger. The cost is that window of delay
before another process closes the charger's old connection; until then
that connection may still receive a command of the charger's queue, which
is requeued when it is detached, as it would be without the delay.

The wire format (JSON on the control exchange, type
L{topology.CONTROL_TAKEOVER}): a batch of one is
C{{"type": "takeover", "identity": ..., "node": ...}}, which every
release understands; a larger batch carries C{"identities": [...]}
instead. L{identities_of} reads both.
"""

from __future__ import annotations

from typing import Callable, Optional

from ocppgw import topology

#: Seconds the identities connecting are gathered before one takeover
#: message names them all.
TAKEOVER_WINDOW = 0.01
#: Identities named by one message at most (a longer batch is sent at once).
MAX_IDENTITIES = 500


def identities_of(message: dict) -> list[str]:
    """
    The identities a takeover control message names (none for any other
    message, or a malformed one).
    """
    if message.get("type") != topology.CONTROL_TAKEOVER:
        return []
    many = message.get("identities")
    if isinstance(many, list):
        return [identity for identity in many if isinstance(identity, str)]
    one = message.get("identity")
    return [one] if isinstance(one, str) else []


class TakeoverBatch:
    """
    Identities this process takes over, waiting to be told to the others.

    @param clock: an C{IReactorTime}.
    @param publish: sends one control message (the bridge's
        C{publish_control}).
    @param node: this process's node name, put in every message.
    """

    def __init__(self, clock, publish: Callable[[dict], None], node: str,
                 window: float = TAKEOVER_WINDOW, max_identities: int = MAX_IDENTITIES) -> None:
        self._clock = clock
        self._publish = publish
        self._node = node
        self._window = window
        self._max = max_identities
        self._identities: list[str] = []
        self._timer: Optional[object] = None

    def add(self, identity: str) -> None:
        """Tell the other processes, within the window, that we take C{identity}."""
        self._identities.append(identity)
        if len(self._identities) >= self._max:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._window, self._due)

    def _due(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Send what is gathered now (nothing if nothing is)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        identities, self._identities = self._identities, []
        if not identities:
            return
        message: dict = {"type": topology.CONTROL_TAKEOVER, "node": self._node}
        if len(identities) == 1:
            message["identity"] = identities[0]
        else:
            message["identities"] = identities
        self._publish(message)


__all__ = ["MAX_IDENTITIES", "TAKEOVER_WINDOW", "TakeoverBatch", "identities_of"]
