"""
The exchanges a gateway declares, and noticing that one was deleted.

An operator may delete the OCPP exchange under a running gateway (and
declare it again, which drops every charger queue's binding). A publish
channel closed with 404 for it, or a periodic passive check of a
I{sentinel} exchange bound into it (see L{topology.sentinel_exchange}),
shows it; L{Exchanges.lost} then has everything declared again and tells
its observers (the gateway re-binds its chargers' queues).

Each declare here runs on a channel of its own (L{on_own_channel}): the
broker refuses a declare by closing its channel, which must not take
anything else with it.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from ocppgw import topology
from ocppgw.amqp.connection import BrokerConnection, guarded
from ocppgw.amqp.errors import BrokerUnavailable, DeclareFailed

_log = Logger()

#: Seconds between two passive checks that the exchanges still exist.
DEFAULT_TOPOLOGY_CHECK_INTERVAL = 15.0


@defer.inlineCallbacks
def on_own_channel(conn: BrokerConnection, method, refused):
    """
    Run one synchronous AMQP method on a channel of its own, which the
    broker may close to refuse it; the channel is closed afterwards.

    @param method: called with the channel and the callback for its
        answer.
    @param refused: makes the exception for the broker's close reason.
    """
    channel = yield conn.channel()
    closed: defer.Deferred = defer.Deferred()
    answered: defer.Deferred = defer.Deferred()
    channel.add_on_close_callback(guarded(
        lambda _ch, reason: closed.called or closed.callback(reason), "a channel's close"))
    if not conn.call(method, channel, answered.callback):
        raise BrokerUnavailable(conn.lost_reason or "not connected")
    result, index = yield conn.wait(defer.DeferredList(
        [answered, closed], fireOnOneCallback=True, consumeErrors=True
    ))
    if index == 1:
        raise refused(result)
    conn.call(channel.close)
    return result


def declare_topic_exchange(conn: BrokerConnection, name: str) -> defer.Deferred:
    """Declare the durable topic exchange C{name}; L{DeclareFailed} if refused."""
    return on_own_channel(
        conn,
        lambda channel, callback: channel.exchange_declare(
            name, exchange_type="topic", durable=True, callback=callback
        ),
        lambda reason: DeclareFailed(
            f"the broker refused to declare exchange {name!r}: {reason}"
        ),
    )


class Exchanges:
    """
    The OCPP exchange, the extra ones (the audit trail's), this process's
    sentinel, and the periodic check that they still exist.

    @ivar restores: times an exchange was found deleted and declared again.
    """

    def __init__(self, reactor, exchange: str, current: Callable[[], Optional[object]],
                 connected: Callable[[], bool], restore: Callable[[object], defer.Deferred],
                 check_interval: float = DEFAULT_TOPOLOGY_CHECK_INTERVAL) -> None:
        """
        @param current: returns the current connection's channel set (with
            its C{conn} and C{sentinel}), or C{None} before the link opens
            and once it is lost.
        @param connected: whether the link is open (see
            L{ocppgw.amqp.AmqpBridge.connected}).
        @param restore: declares everything again on a channel set's
            connection (after L{lost}).
        """
        self._reactor = reactor
        self.exchange = exchange
        self._current = current
        self._connected = connected
        self._restore = restore
        self._check_interval = check_interval
        #: more exchanges to declare on every connection (the audit trail's)
        self.extra: list[str] = []
        self._observers: list[Callable[[], None]] = []
        self._checker: Optional[task.LoopingCall] = None
        self._restoring = False
        # names this process's sentinel exchange: the same on every
        # connection, so that reconnecting leaves no sentinel behind
        self._sentinel_token = os.urandom(4).hex()
        self.restores = 0

    def add_observer(self, observer: Callable[[], None]) -> None:
        """Call C{observer()} once the exchanges were declared again."""
        self._observers.append(observer)

    def names(self) -> tuple[str, ...]:
        """Every exchange of ours: the OCPP one, the control one, the extra ones."""
        return (self.exchange, topology.control_exchange(self.exchange), *self.extra)

    @defer.inlineCallbacks
    def declare_all(self, conn: BrokerConnection):
        """Declare the OCPP exchange and the extra ones, in that order."""
        for name in (self.exchange, *self.extra):
            yield declare_topic_exchange(conn, name)

    def _open_conn(self) -> BrokerConnection:
        channels = self._current()
        if channels is None or not self._connected():
            raise BrokerUnavailable("not connected to the broker")
        return channels.conn

    @defer.inlineCallbacks
    def declare_extra(self, name: str):
        """
        Declare another durable topic exchange, now and on every later
        connection.
        """
        if name not in self.extra:
            self.extra.append(name)
        yield declare_topic_exchange(self._open_conn(), name)

    @defer.inlineCallbacks
    def exists(self, name: str):
        """Whether exchange C{name} exists (a passive declare)."""
        conn = self._open_conn()
        try:
            yield on_own_channel(
                conn,
                lambda channel, callback: channel.exchange_declare(
                    name, passive=True, callback=callback),
                lambda reason: DeclareFailed(str(reason)),
            )
        except DeclareFailed:
            return False
        return True

    # -- the sentinel --------------------------------------------------------

    @defer.inlineCallbacks
    def declare_sentinel(self, conn: BrokerConnection):
        """
        Declare this connection's sentinel exchange and bind it into the
        OCPP exchange (see L{topology.sentinel_exchange}).

        @return: its name.
        """
        name = topology.sentinel_exchange(self.exchange, self._sentinel_token)
        yield on_own_channel(
            conn,
            lambda channel, callback: channel.exchange_declare(
                name, exchange_type="fanout", auto_delete=True, callback=callback),
            lambda reason: DeclareFailed(f"the broker refused exchange {name!r}: {reason}"),
        )
        yield on_own_channel(
            conn,
            lambda channel, callback: channel.exchange_bind(
                destination=self.exchange, source=name,
                routing_key=topology.SENTINEL_ROUTING_KEY, callback=callback),
            lambda reason: DeclareFailed(f"the broker refused to bind {name!r}: {reason}"),
        )
        return name

    def delete_sentinel(self, timeout: float) -> defer.Deferred:
        """
        Delete our sentinel when stopping (it would outlive us otherwise);
        bounded, and a failure only logged.
        """
        channels = self._current()
        if channels is None:
            return defer.succeed(None)
        d = on_own_channel(
            channels.conn,
            lambda channel, callback: channel.exchange_delete(channels.sentinel, callback=callback),
            lambda reason: DeclareFailed(f"sentinel not deleted: {reason}"),
        )
        timer = self._reactor.callLater(timeout, d.cancel)

        def done(result):
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                _log.warn("Could not delete the sentinel exchange {name}: {error}",
                          name=channels.sentinel, error=result.getErrorMessage())
            return None

        return d.addBoth(done)

    # -- the exchange deleted under us -------------------------------------------

    def start_check(self) -> None:
        """Check every C{check_interval} seconds that our exchanges exist."""
        if self._check_interval <= 0 or self._checker is not None:
            return
        self._checker = task.LoopingCall(self._check)
        self._checker.clock = self._reactor
        self._checker.start(self._check_interval, now=False).addErrback(
            lambda f: _log.failure("Topology check failed", f)
        )

    def stop_check(self) -> None:
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        self._checker = None

    @defer.inlineCallbacks
    def _check(self):
        """
        A passive declare of our sentinel and of the control exchange: if
        either is gone, an exchange of ours was deleted.
        """
        channels = self._current()
        if channels is None or self._restoring:
            return
        control = topology.control_exchange(self.exchange)
        for name, what in (
            (channels.sentinel, f"the exchange {self.exchange!r} was deleted"),
            (control, f"the exchange {control!r} was deleted"),
        ):
            try:
                exists = yield self.exists(name)
            except BrokerUnavailable:
                return  # the link handles that
            if not exists:
                self.lost(what)
                return

    def lost(self, why: str) -> None:
        """
        An exchange of ours is gone: declare everything again (the
        C{restore} given at construction) and tell the observers, which
        bind their queues again. One at a time.
        """
        channels = self._current()
        if channels is None or self._restoring:
            return
        self._restoring = True
        self.restores += 1
        _log.error(
            "{why}: declaring the exchanges again and restoring the bindings "
            "(queues bound to the exchange lost their bindings with it)",
            why=why, event="amqp_topology_lost",
        )

        def restored(_):
            self._restoring = False
            if self._current() is not channels:
                return
            _log.info("Exchanges declared again; restoring bindings", event="amqp_topology_restored")
            for observer in list(self._observers):
                guarded(observer, "a topology observer")()

        def failed(failure):
            self._restoring = False
            if failure.check(BrokerUnavailable):
                return  # lost meanwhile: the reconnect declares everything
            _log.failure("Could not declare the exchanges again", failure)

        self._restore(channels).addCallbacks(restored, failed)


__all__ = ["DEFAULT_TOPOLOGY_CHECK_INTERVAL", "Exchanges", "declare_topic_exchange",
           "on_own_channel"]
