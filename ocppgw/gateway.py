"""
The gateway: where the WebSocket edge, the sessions and the AMQP bridge meet.

The edge and the bridge do not know each other (docs/architecture.md,
"Shape"). This module implements the edge's L{ChargerHub}; per charger, a
L{ChargerLink} implements the session's L{SessionEffects} on top of the
bridge. It also owns the registry of connected chargers, which is what
makes "last connection wins" work:

1. a charger's handshake claims its identity (a later handshake for the
   same identity takes the claim over); from then on the charger is a
   L{ChargerLink}, whose states and moves are in L{ocppgw.charger};
2. an existing connection with that identity is detached -- its session
   ended, its consumer cancelled, its unanswered commands requeued after the
   cancel-ok -- and closed, and announces no offline status;
3. the charger's queue is declared and bound I{before} the 101, so that a
   CSMS answer to the very first frame has a queue to land in;
4. after the upgrade the consumer starts and the charger is announced.

Across several gateway processes (sharing one broker) the same rule holds
through a I{takeover} message: before declaring a charger's queue, the
process that takes a charger tells every other process (a fanout control
exchange, see L{ocppgw.amqp.AmqpBridge.publish_control}); a process that holds that
charger detaches and closes it as replaced, requeueing its unanswered
commands after its consumer is cancelled. With
C{[queue] x-single-active-consumer} the new consumer gets nothing before
the old one is cancelled, so no command reaches both connections. A
process that knows of no other (L{ocppgw.peers}) skips the broadcast.

When the broker connection breaks, chargers are kept for a grace period
(their CALLs get CALLERROR InternalError meanwhile); once the bridge is
back every kept charger's queue is declared again and its consumer
restored. Chargers still there when the grace period ends are closed with
1012 (or kept, if configured), so none is left talking to nobody.

Flow control: while the bridge says publishing should pause (the broker
blocked the connection, or a confirm window is full) no charger is read
from; they are resumed together.

Shutdown drains: chargers are closed with 1012 spread over a window, so
that the fleet reconnects to other processes gradually.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer, task
from twisted.logger import Logger

from ocppgw import topology
from ocppgw.amqp import BrokerUnavailable, ChannelGone, DeclareFailed
from ocppgw.broker import Bridge
from ocppgw.brokerside import BrokerSide
from ocppgw.charger import (
    CHARGER_TRANSITIONS,
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_REPLACED,
    CLOSE_SERVICE_RESTART,
    HANDSHAKING,
    ChargerLink,
    ChargerSettings,
    ChargerState,
)
from ocppgw.edge import ChargerProtocol
from ocppgw.refusals import Refused
from ocppgw.announce import Announcer
from ocppgw.audit import IN as AUDIT_IN
from ocppgw.closecodes import CloseCode
from ocppgw.framing import OcppVersion
from ocppgw.outage import BrokerOutage
from ocppgw.presence import Presence

_log = Logger()

#: Close code when the gateway shuts down.
CLOSE_GOING_AWAY = CloseCode.GOING_AWAY
#: (kept here for the names importers know; defined in L{ocppgw.topology})
CONTROL_TAKEOVER = topology.CONTROL_TAKEOVER

__all__ = [
    "CHARGER_TRANSITIONS", "CLOSE_GOING_AWAY", "CLOSE_INTERNAL", "CLOSE_POLICY",
    "CLOSE_REPLACED", "CLOSE_SERVICE_RESTART", "CONTROL_TAKEOVER", "ChargerLink",
    "ChargerState", "Gateway",
]


class Gateway:
    """
    The registry of chargers and the glue between edge, sessions and broker.
    """

    def __init__(
        self,
        reactor,
        bridge: Bridge,
        *,
        node: str,
        queue_arguments: dict,
        offline_status: bool = True,
        presence_events: bool = True,
        outage_grace: float = 30.0,
        outage_keep_chargers: bool = False,
        max_owed_presence: int = 100000,
        metrics=None,
        audit=None,
        **charger_settings,
    ) -> None:
        """
        @param max_owed_presence: presence messages kept while the broker
            cannot take them (see L{ocppgw.presence}).
        @param metrics: an L{ocppgw.metrics.Metrics}, or C{None}.
        @param audit: an L{ocppgw.audit.AuditTrail} that mirrors every
            frame and connection event, or C{None} (the default: off).
        @param charger_settings: the rest of L{ChargerSettings}
            (C{call_timeout}, C{max_bad_frames}, C{max_message_id_length},
            C{max_message_rate}, C{message_burst}, C{max_rate_violations},
            C{validation}).
        """
        self._reactor = reactor
        self.metrics = metrics
        self.audit = audit
        self.bridge = bridge
        self.node = node
        #: what every charger is configured with
        self.settings = ChargerSettings(node=node, queue_arguments=queue_arguments,
                                        **charger_settings)
        self.presence = Presence(
            bridge, reactor, node, offline_status=offline_status, events=presence_events,
            max_owed=max_owed_presence,
        )
        #: tells the log, audit, metrics and presence of arrivals and departures
        self.announce = Announcer(reactor, node, self.presence, metrics, audit)
        #: identity -> ChargerLink of attached chargers (ATTACHED and after)
        self.chargers: dict[str, ChargerLink] = {}
        #: the grace of a broker outage, and the chargers awaiting the broker
        self.broker_side = BrokerSide(self)
        self.outage = BrokerOutage(reactor, outage_grace, outage_keep_chargers,
                                   self.broker_side.outage_over)
        # one bound method for every link (not one each)
        self._link_moved = self.outage.link_moved
        #: fires once the last re-binding after the exchange was declared
        #: again (see L{BrokerSide.topology_restored}) is done; None before any
        self.rebinding: Optional[defer.Deferred] = None
        # identity -> the link of the handshake that most recently claimed
        # it, while that handshake is prepared (CLAIMED or DECLARING)
        self._claims: dict[str, ChargerLink] = {}
        self._accepting = True
        self.reading_paused = False
        bridge.add_observer(self.broker_side.link_state)
        bridge.add_flow_observer(self.broker_side.flow)
        bridge.add_control_handler(self.broker_side.control)
        bridge.add_topology_observer(self.broker_side.topology_restored)

    @property
    def dead_letter_exchange(self) -> Optional[str]:
        """
        Where refused commands are copied with the reason in headers (see
        L{ChargerSettings}); the service sets it once it is known to exist.
        """
        return self.settings.dead_letter_exchange

    @dead_letter_exchange.setter
    def dead_letter_exchange(self, exchange: Optional[str]) -> None:
        self.settings.dead_letter_exchange = exchange

    @property
    def outage_grace(self) -> float:
        """Seconds chargers are kept while the broker is gone."""
        return self.outage.grace

    @outage_grace.setter
    def outage_grace(self, seconds: float) -> None:
        self.outage.grace = seconds

    @property
    def awaiting_broker(self) -> set:
        """
        The chargers waiting for their consumer to come back after a
        broker loss (BROKER_LOST or RESTORING): readiness waits for them.
        """
        return self.outage.awaiting

    def consumers_restored(self) -> defer.Deferred:
        """
        Fires once no connected charger waits for its consumer to come
        back after a broker loss (at once if none does): what /readyz's
        C{consumers} check waits for.
        """
        return self.outage.consumers_restored()

    # -- ChargerHub --------------------------------------------------------------

    @defer.inlineCallbacks
    def charger_connecting(self, edge: ChargerProtocol, identity: str, version: OcppVersion):
        if not self._accepting:
            raise Refused(503, "Service Unavailable")
        if not self.bridge.connected:
            raise Refused(503, "Service Unavailable")
        link = self._claim(edge)
        # Other gateway processes that hold this charger let it go while
        # we declare its queue (when there are any: see ocppgw.peers).
        if self.bridge.may_have_peers():
            self.bridge.publish_control(
                {"type": CONTROL_TAKEOVER, "identity": identity, "node": self.node,
                 "claimed": link.claimed_at}
            )
        try:
            previous = self.chargers.get(identity)
            if previous is not None:
                yield self._replace(previous, link)
            link.declaring()
            try:
                yield link.declare_queue()
            except DeclareFailed as error:
                _log.error(
                    "Queue of {identity} cannot be declared: {error}",
                    identity=identity,
                    error=str(error),
                )
                raise Refused(500, "Internal Server Error")
            except (BrokerUnavailable, ChannelGone):
                raise Refused(503, "Service Unavailable")
            if link.state is not ChargerState.DECLARING:
                # A newer connection for this identity came in meanwhile
                # (or this one went).
                raise Refused(409, "Conflict")
        except BaseException:
            self._end_claim(link)
            raise

    def _claim(self, edge: ChargerProtocol) -> ChargerLink:
        """
        A handshake claims its identity: a newer claim wins over one whose
        handshake is still being prepared.
        """
        link = ChargerLink(edge, self.settings, self.bridge, self._reactor, audit=self.audit,
                           metrics=self.metrics, on_state=self._link_moved)
        older = self._claims.get(link.identity)
        if older is not None:
            older.superseded()
        self._claims[link.identity] = link
        # the edge's handle on its link: what its frames go to once open
        edge.link = link
        return link

    def claim_in_progress(self, identity: str) -> Optional[ChargerLink]:
        """
        The link of the handshake of C{identity} being prepared here (its
        identity claimed, its queue not yet declared), if there is one.
        """
        return self._claims.get(identity)

    def _end_claim(self, link: ChargerLink) -> None:
        """The handshake of C{link} is over: refused, or its charger went."""
        if self._claims.get(link.identity) is link:
            del self._claims[link.identity]
        link.refused()

    @defer.inlineCallbacks
    def _replace(self, previous: ChargerLink, link: ChargerLink):
        """
        Detach and close the connection C{link}'s handshake replaces; the
        answers to CALLs the charger sent on it can still come, to C{link}.
        """
        _log.info(
            "{identity} reconnected from {peer}: replacing the old connection",
            identity=link.identity,
            peer=link.peer,
            version=link.version.subprotocol,
            event="replacing",
        )
        yield self.detach(previous, replaced=True, code=CLOSE_REPLACED[0],
                           reason=CLOSE_REPLACED[1])
        previous.close(*CLOSE_REPLACED)
        link.session.adopt_open_calls(previous.session.handover())

    def charger_opened(self, edge: ChargerProtocol) -> None:
        link = edge.link
        if not self._accepting or link is None or link.state is not ChargerState.DECLARING:
            if link is not None:
                edge.link = None
                self._end_claim(link)
            if not self._accepting:
                # the handshake finished while the gateway began to drain
                edge.close(CLOSE_SERVICE_RESTART, "Gateway restarting")
            else:
                edge.close(*CLOSE_REPLACED)
            return
        identity = link.identity
        del self._claims[identity]
        link.attach(self._reactor.seconds())
        self.chargers[identity] = link
        if self.reading_paused:
            edge.pause_reading()
        if self.bridge.connected:
            link.start_consuming()
        else:
            # the link was lost between the queue's declare and the 101:
            # the charger waits for it like the others
            link.broker_lost()
        self.announce.connected(link)

    def charger_frame(self, edge: ChargerProtocol, data: bytes) -> None:
        link = edge.link
        if link is None:
            return
        if self.audit is not None:
            self.audit.frame(link.identity, link.version.subprotocol, AUDIT_IN, data)
        limit = link.rate_limit
        if limit is not None:
            verdict = limit.check()
            if verdict:
                link.over_rate(verdict, data)
                return
        link.session.charger_frame(data)

    def charger_closed(self, edge: ChargerProtocol, code, reason: str) -> None:
        link = edge.link
        if link is None:
            return
        edge.link = None
        if link.state in HANDSHAKING:
            self._end_claim(link)
            return
        if self.chargers.get(link.identity) is link:
            del self.chargers[link.identity]
        if not link.detached:  # else replaced, or detached by shutdown: already announced
            self.detach(link, replaced=False, code=code, reason=reason)
        link.connection_gone()

    # -- helpers --------------------------------------------------------------

    def detach(self, link: ChargerLink, replaced: bool, code=None, reason: str = "") -> defer.Deferred:
        """
        C{link}'s charger leaves the registry (once): its link is detached
        (consumer cancelled, commands requeued) and its going announced.
        """
        if link.detached:
            return defer.succeed(None)
        if self.chargers.get(link.identity) is link:
            del self.chargers[link.identity]
        d = link.detach(replaced)
        self.announce.disconnected(link, replaced, code, reason)
        return d

    # -- shutdown ---------------------------------------------------------------

    def stop_accepting(self) -> None:
        """
        The gateway is shutting down: refuse new chargers; the drain
        closes the others, so no outage timer is left to do it.
        """
        self._accepting = False
        self.outage.end()

    @property
    def accepting(self) -> bool:
        """False once the gateway is shutting down (draining)."""
        return self._accepting

    def disconnect(self, identity: str, code: int = CloseCode.NORMAL,
                   reason: str = "Disconnected by the operator") -> bool:
        """
        Close one charger's connection (the admin API's DELETE).

        @return: whether a charger with that identity was connected.
        """
        link = self.chargers.get(identity)
        if link is None:
            return False
        _log.info(
            "{identity} disconnected by the operator",
            identity=identity, peer=link.peer, version=link.version.subprotocol,
            event="operator_disconnect",
        )
        link.close(code, reason)
        return True

    def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "Gateway shutting down") -> defer.Deferred:
        """
        Close every charger and requeue what they held.

        @return: a Deferred firing when every consumer is cancelled and
            every held command requeued.
        """
        waits = []
        for link in list(self.chargers.values()):
            waits.append(self.detach(link, replaced=False, code=code))
            link.close(code, reason)
        return defer.DeferredList(waits, consumeErrors=True)

    def drain(self, window: float, code: int = CLOSE_SERVICE_RESTART,
              reason: str = "Gateway restarting") -> defer.Deferred:
        """
        Close every charger, spread evenly over C{window} seconds, and
        requeue what each held.

        @return: a Deferred firing once the last charger is detached and
            its commands requeued.
        """
        links = list(self.chargers.values())
        if not links or window <= 0:
            return self.close_all(code, reason)
        step = window / len(links)
        waits = []

        def close_one(link):
            if link.detached:
                return None
            d = self.detach(link, replaced=False, code=code)
            link.close(code, reason)
            return d

        for index, link in enumerate(links):
            waits.append(
                task.deferLater(self._reactor, index * step, close_one, link)
            )
        _log.info(
            "Draining {count} chargers over {window:g} s", count=len(links), window=window
        )
        return defer.DeferredList(waits, consumeErrors=True)
