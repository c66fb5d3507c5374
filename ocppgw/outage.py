"""
The gateway's side of a broker outage: how long chargers are kept, and
which of them still wait for their consumer.

When the broker connection breaks, the attached chargers stay (their
sessions answer CALLs with CALLERROR InternalError meanwhile) for
C{[amqp] outage_grace} seconds; new chargers get 503. Once the broker is
back every kept charger's queue is declared again and its consumer
restored; until the last one is (L{ocppgw.charger.AWAITING_BROKER}),
readiness says no. If the grace ends first, the gateway closes them with
1012 (unless C{[amqp] outage_keep_chargers}), so none is left talking to
nobody.

Nothing here does I/O: the gateway tells it when the broker goes and
comes back, and it calls the gateway back when the grace is over.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer

from ocppgw.charger import AWAITING_BROKER


class BrokerOutage:
    """
    The grace timer of one outage, and the chargers awaiting the broker.

    @ivar grace: seconds the chargers are kept (0: closed at once).
    @ivar keep_chargers: keep them however long it lasts.
    @ivar awaiting: the links in L{AWAITING_BROKER} states.
    """

    def __init__(self, clock, grace: float, keep_chargers: bool,
                 over: Callable[[], None]) -> None:
        """
        @param over: called when the grace ends with no broker.
        """
        self._clock = clock
        self.grace = grace
        self.keep_chargers = keep_chargers
        self._over = over
        self._timer = None
        self.awaiting: set = set()
        self._waiters: list[defer.Deferred] = []

    def link_moved(self, link) -> None:
        """A charger's link changed state (its C{on_state})."""
        awaiting = self.awaiting
        if link.state in AWAITING_BROKER:
            awaiting.add(link)
            return
        if link not in awaiting:
            return
        awaiting.discard(link)
        if not awaiting and self._waiters:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def consumers_restored(self) -> defer.Deferred:
        """
        Fires once no charger waits for its consumer to come back (at
        once if none does).
        """
        if not self.awaiting:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d

    def begin(self) -> None:
        """
        The broker is lost: the grace starts (once per outage), unless the
        chargers are kept however long it lasts.
        """
        if self.keep_chargers or self._timer is not None:
            return
        if self.grace <= 0:
            self._over()
        else:
            self._timer = self._clock.callLater(self.grace, self._grace_over)

    def end(self) -> None:
        """The broker is back (or the gateway drains): no grace to wait for."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _grace_over(self) -> None:
        self._timer = None
        self._over()
