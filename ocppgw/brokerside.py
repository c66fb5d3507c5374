"""
What the gateway does when its broker side tells it something: the link
opened or was lost, the outage grace ran out, the exchange was declared
again, publishing paused or resumed, another gateway process took a
charger over.

The bridge calls these (the gateway registers them); each acts on the
gateway's chargers through the gateway's public interface, so that the
gateway itself keeps to what the chargers' edge asks of it.
"""

from __future__ import annotations

import math

from twisted.internet import defer
from twisted.logger import Logger

from ocppgw import topology
from ocppgw.charger import CLOSE_REPLACED, CLOSE_SERVICE_RESTART, ChargerState

# the gateway's own namespace: operators filter its log lines by it
_log = Logger(namespace="ocppgw.gateway")


class BrokerSide:
    """
    The broker-side observers of one L{ocppgw.gateway.Gateway}.
    """

    def __init__(self, gateway) -> None:
        """
        @param gateway: the L{ocppgw.gateway.Gateway} (which imports this
            module: only its public attributes are used here).
        """
        self._gateway = gateway

    def link_state(self, connected: bool, why: str) -> None:
        """
        The broker link opened, or was lost (told once per loss, before
        anything in flight on the lost connection is settled).

        Lost: every charger is told (its consumer is gone, the broker
        requeues its unacknowledged commands) but stays for
        C{outage_grace} seconds -- new ones get 503 meanwhile -- and is
        then closed with 1012 rather than left talking to nobody.
        Open: presence messages owed since the loss are published, and
        every kept charger's queue and consumer is restored.
        """
        gateway = self._gateway
        if connected:
            gateway.outage.end()
            gateway.presence.flush()
            links = [link for link in gateway.chargers.values()
                     if link.state is ChargerState.BROKER_LOST]
            if links:
                _log.info("Restoring {count} chargers' consumers", count=len(links))
            for link in links:
                link.restore()
            return
        for link in list(gateway.chargers.values()):
            link.broker_lost()
        if gateway.accepting:  # (shutting down: the drain closes the chargers)
            gateway.outage.begin()

    def outage_over(self) -> None:
        """
        The outage grace ran out: if the broker is still away, close every
        kept charger with 1012, so it tries another gateway or later.
        """
        gateway = self._gateway
        if gateway.bridge.connected:
            return
        links = list(gateway.chargers.values())
        if links:
            _log.warn(
                "Broker still unreachable: closing {count} chargers (1012)", count=len(links)
            )
        for link in links:
            gateway.detach(link, replaced=False, code=CLOSE_SERVICE_RESTART)
            link.close(CLOSE_SERVICE_RESTART, "Broker unavailable")

    def topology_restored(self) -> None:
        """
        The exchange was deleted under us and declared again: bind every
        charger's queue again, and publish what is owed.
        """
        gateway = self._gateway
        links = list(gateway.chargers.values())
        _log.info("Binding {count} chargers' queues again", count=len(links))
        gateway.presence.flush()
        done = defer.DeferredList([link.rebind() for link in links], consumeErrors=True)
        done.addCallback(lambda _: _log.info(
            "Bindings of {count} chargers' queues restored", count=len(links),
            event="amqp_bindings_restored"))
        gateway.rebinding = done

    def flow(self, paused: bool) -> None:
        """
        Stop reading from every charger while publishing is paused.
        """
        gateway = self._gateway
        gateway.reading_paused = paused
        for link in list(gateway.chargers.values()):
            if paused:
                link.edge.pause_reading()
            else:
                link.edge.resume_reading()

    def control(self, message: dict) -> None:
        """
        A message from another gateway process.

        A takeover closes this process's connection of the charger (and
        refuses a handshake of it still being prepared here) only if that
        claim is older than the takeover's: a takeover can arrive after
        the charger has already come back here, and must not close the
        newest connection (see L{takeover_is_newer}).
        """
        gateway = self._gateway
        if message.get("type") != topology.CONTROL_TAKEOVER:
            return
        identity = message.get("identity")
        if not isinstance(identity, str):
            return
        node = str(message.get("node"))[:255]
        claim = gateway.claim_in_progress(identity)
        if claim is not None and takeover_is_newer(message, claim.claimed_at, gateway.node):
            # refused with 409 once its queue is declared
            claim.superseded()
        link = gateway.chargers.get(identity)
        if link is None:
            return
        if not takeover_is_newer(message, link.claimed_at, gateway.node):
            _log.info(
                "{identity} stays: gateway {node} took it over before this connection came",
                identity=identity,
                node=node,
                peer=link.peer,
                listener=link.listener,
                event="takeover_stale",
            )
            return
        _log.info(
            "{identity} reconnected to gateway {node}: replacing the connection here",
            identity=identity,
            node=node,
            peer=link.peer,
            version=link.version.subprotocol,
            listener=link.listener,
            event="replacing",
        )
        gateway.detach(link, replaced=True, code=CLOSE_REPLACED[0], reason=CLOSE_REPLACED[1])
        link.close(*CLOSE_REPLACED)


#: A takeover claimed more than this many seconds before the claim here is
#: not taken for a late message but for clocks that disagree: it closes the
#: connection here, as a newer one would (see L{takeover_is_newer}).
LATE_TAKEOVER_WINDOW = 10.0


def takeover_is_newer(message: dict, claimed_at: float, node: str) -> bool:
    """
    Whether the takeover C{message} claimed its charger after this
    process's claim of it (made at C{claimed_at} by gateway C{node}).

    Claims are ordered by their clock time, then by node name, so that of
    two processes that each hear of the other's claim exactly one gives
    its connection up. That is exact for the workers of one host; across
    hosts it relies on their clocks being synchronised (NTP). With clocks
    apart, a newer claim can look older; then both connections would
    stay, the older one until it closes or its pings time out. So only a
    takeover claimed at most L{LATE_TAKEOVER_WINDOW} seconds before the
    claim here counts as late (a message that long in flight means a
    gateway far behind its work); anything older, and a takeover without
    a claim time (from an older gateway version), counts as newer.
    """
    claimed = message.get("claimed")
    if isinstance(claimed, bool) or not isinstance(claimed, (int, float)) \
            or not math.isfinite(claimed) or claimed_at - claimed > LATE_TAKEOVER_WINDOW:
        return True
    return (claimed, str(message.get("node"))) > (claimed_at, node)
