"""
Which other gateway processes share our exchange, as far as we know.

Before it declares a charger's queue a gateway tells the other gateways
to let go of that charger (a I{takeover}, see L{ocppgw.gateway}). With one
gateway process, the usual deployment, nobody listens: the broadcast and
its delivery back to our own control queue cost about a tenth of the CPU
of a reconnecting charger, in the gateway and in the broker alike
(bench.storm, returning chargers). So gateways introduce themselves on
the control exchange -- C{hello} when their control queue is up, C{here}
in answer and then every L{ANNOUNCE_INTERVAL} seconds, C{bye} when they
stop -- and a gateway broadcasts takeovers only while it knows of another.

Until it has had time to hear the others (L{GRACE} seconds after its
control queue is up, at start and after every broker reconnect) a gateway
assumes they exist. A gateway not heard from for L{EXPIRY} seconds (it
died without a C{bye}) is forgotten; any control message from a gateway
makes it known again.

This is a plain object over an injected clock: the bridge feeds it what it
hears and asks it whether to broadcast.
"""

from __future__ import annotations

from twisted.internet import defer

#: seconds between a gateway's C{here} announcements
ANNOUNCE_INTERVAL = 30.0
#: seconds without news after which a gateway is taken to be gone
EXPIRY = 3 * ANNOUNCE_INTERVAL
#: seconds after our control queue is up during which we assume others
GRACE = 5.0

HELLO = "hello"
HERE = "here"
BYE = "bye"
#: the control message types that belong to this module
TYPES = frozenset((HELLO, HERE, BYE))


class PeerDirectory:
    """
    The other gateway processes we have heard from, with when.
    """

    def __init__(self, clock, grace: float | None = None, expiry: float | None = None) -> None:
        self._clock = clock
        self._grace = GRACE if grace is None else grace
        self._expiry = EXPIRY if expiry is None else expiry
        self._seen: dict[str, float] = {}
        self._listening_since: float | None = None
        self._waiting: dict[str, list[defer.Deferred]] = {}

    def listening(self) -> None:
        """
        Our control queue is (again) up: what we knew may be stale, and
        others may not have heard of us yet.
        """
        self._seen.clear()
        self._listening_since = self._clock.seconds()

    def heard(self, node: str) -> None:
        """
        A control message came from gateway C{node}.
        """
        self._seen[node] = self._clock.seconds()
        for d in self._waiting.pop(node, ()):
            d.callback(node)

    def gone(self, node: str) -> None:
        """
        Gateway C{node} said goodbye.
        """
        self._seen.pop(node, None)

    def known(self) -> list[str]:
        """
        The gateways heard from within L{EXPIRY}.
        """
        now = self._clock.seconds()
        for node, seen in list(self._seen.items()):
            if now - seen > self._expiry:
                del self._seen[node]
        return sorted(self._seen)

    def may_have_peers(self) -> bool:
        """
        Whether a takeover broadcast may reach another gateway.
        """
        since = self._listening_since
        if since is None or self._clock.seconds() - since < self._grace:
            return True
        return bool(self.known())

    def wait_for(self, node: str) -> defer.Deferred:
        """
        A Deferred that fires with C{node} once it is heard from (at once
        if it is known).
        """
        if node in self.known():
            return defer.succeed(node)
        d: defer.Deferred = defer.Deferred()
        self._waiting.setdefault(node, []).append(d)
        return d
