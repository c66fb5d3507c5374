"""
The service tree: what C{twistd ocppgw} runs and what embedders get from
L{makeService}.

::

    GatewayService (MultiService)
     |- the admin listener (metrics, health, chargers) first, so that
     |  liveness probes answer while the broker connection is made
     |- the AMQP bridge: the exchange (and the audit exchange, when on)
     |  must be declared before a charger is accepted, and a broker that
     |  refuses us must stop the start-up with a clear message
     '- the listeners (ws and/or wss, see ocppgw.listeners), once the
        bridge is up

SIGHUP (when C{reload_signal} is set, as under twistd) calls L{reload}:
certificates, CA bundle, CRL, identity map and password file are read
again; connected chargers keep their sessions.

Stopping (SIGTERM under twistd) runs the other way: stop listening, close
the chargers with 1012 spread over C{[listener] drain_window} (so the fleet
moves to other gateways gradually) and requeue the commands they held, wait
(bounded) for the broker to confirm what is in flight, close the AMQP
connection, and last the admin listener (so that /readyz says "not ready"
throughout).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Union

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from ocppgw import config as _config
from ocppgw import logs, openfiles
from ocppgw.admin import AdminAPI
from ocppgw.amqp import AmqpBridge
from ocppgw.audit import AuditTrail
from ocppgw.config import Settings
from ocppgw.edge import ChargerFactory
from ocppgw.framing import VERSIONS
from ocppgw.gateway import Gateway
from ocppgw.limits import Admission
from ocppgw.acceptgate import AcceptGate
from ocppgw.listeners import Security
from ocppgw.refusals import Refusals
from ocppgw.validation import Validation
from ocppgw.metrics import GatewayState, Metrics
from ocppgw.status import RecentEvents, snapshot as status_snapshot

_log = Logger()

#: Listen backlog of the charger listeners: connections the kernel has
#: completed and holds until the gateway accepts them. When it is full the
#: kernel drops new SYNs, and a charger retries only after 1, 2, 4 ... 64 s
#: and gives up after about two minutes: in a reconnection storm a short
#: backlog turns a few seconds of queueing into minutes of back-off and
#: failed connects (bench.storm, 50,000 returning chargers). Linux caps it
#: at net.core.somaxconn (4096 by default since 5.4).
CHARGER_BACKLOG = 65535


def _server_endpoint(reactor, host: str, port: int, backlog: int = 1024):
    if ":" in host:
        return TCP6ServerEndpoint(reactor, port, backlog=backlog, interface=host)
    return TCP4ServerEndpoint(reactor, port, backlog=backlog, interface=host)


def bridge_from_settings(settings: Settings, reactor) -> AmqpBridge:
    """The L{AmqpBridge} the C{[amqp]} section describes."""
    amqp = settings.amqp
    return AmqpBridge(
        reactor,
        amqp.url,
        amqp.exchange,
        settings.amqp.node,
        prefetch_count=amqp.prefetch_count,
        heartbeat=amqp.heartbeat,
        connect_timeout=amqp.connect_timeout,
        confirm_window=amqp.confirm_window,
        publish_channels=amqp.publish_channels,
        consumer_channels=amqp.consumer_channels,
        declare_channels=amqp.declare_channels,
        failover_urls=amqp.failover_urls,
        reconnect_max_delay=amqp.reconnect_max_delay,
        topology_check_interval=amqp.topology_check_interval,
    )


def admission_from_settings(settings: Settings, reactor) -> Optional[Admission]:
    """
    The accept limits of C{[listener]} (shared by every listener), or
    C{None} when there are none.
    """
    listener = settings.listener
    if not (listener.accept_rate or listener.max_handshakes):
        return None
    return Admission(
        reactor,
        rate=listener.accept_rate,
        burst=listener.accept_burst,
        max_concurrent=listener.max_handshakes,
        retry_after_max=listener.retry_after_max,
    )


class GatewayService(service.MultiService, GatewayState):
    """
    The whole gateway as one Twisted service.

    @ivar gateway: the L{Gateway} (registry of connected chargers).
    @ivar bridge: the L{AmqpBridge}.
    @ivar started: a Deferred that fires once the gateway listens, or
        fails with the reason it could not start.
    @ivar listening_port: the bound C{IListeningPort}, once started.
    @ivar metrics: the gateway's L{Metrics} (its own registry).
    @ivar admin_port: the admin listener's C{IListeningPort}, if enabled.
    """

    def __init__(
        self,
        settings: Settings,
        reactor,
        *,
        bridge: Optional[AmqpBridge] = None,
        exit_on_startup_failure: bool = False,
        reuse_port: bool = False,
        reload_signal: bool = False,
        threadpool=None,
    ) -> None:
        super().__init__()
        self.setName("ocppgw")
        self.settings = settings
        self._reactor = reactor
        self.node = settings.amqp.node
        self.bridge = bridge or bridge_from_settings(settings, reactor)
        #: the last refusals and disconnects, for the status page
        self.recent = RecentEvents(reactor)
        self.metrics = Metrics(recent=self.recent)
        self.bridge.observe_confirm = self.metrics.observe_confirm
        audit = settings.audit
        self.audit = (
            AuditTrail(self.bridge, audit.exchange, self.node, reactor) if audit.enabled else None
        )
        # Compiled here, once, before anything listens: a schema that cannot
        # be loaded stops the start (SchemaError), like a bad config.
        self.validation = Validation.from_settings(
            settings.validation,
            [VERSIONS[name] for name in settings.listener.subprotocols],
        )
        self.gateway = self._build_gateway()
        # one admission for every listener: the limits are the process's
        admission = admission_from_settings(settings, reactor)
        #: lets at most [listener] max_opening connections of this process be
        #: in their opening handshake, the others wait their turn; or None
        self._accept_gate = (AcceptGate(settings.listener.max_opening, reactor)
                            if settings.listener.max_opening else None)
        #: TLS material, checkers and one authenticator per listener
        self.security = Security(settings, reactor, threadpool=threadpool)
        #: connections refused before the handshake, counted and logged
        self.refusals = Refusals(reactor, self.metrics)
        #: "tcp" and/or "ssl" -> ChargerFactory
        self.factories = {
            kind: self._charger_factory(kind, admission)
            for kind in self.security.listener_kinds()
        }
        self.factory = next(iter(self.factories.values()))
        self.metrics.watch(self)
        self.admin = AdminAPI(
            self.metrics.registry,
            self.gateway,
            self.readiness,
            reactor,
            username=settings.admin.username,
            password=settings.admin.password,
            status=self.status,
        )
        self.admin_port = None
        self._exit_on_startup_failure = exit_on_startup_failure
        # a worker of a [listener] workers group shares its ports
        self._reuse_port = reuse_port
        self._reload_signal = reload_signal
        self._previous_sighup = None
        self.started: defer.Deferred = defer.Deferred()
        #: the first listener's port (ws if enabled); see listening_ports
        self.listening_port = None
        #: "tcp" and/or "ssl" -> the bound IListeningPort
        self.listening_ports: dict = {}

    def _build_gateway(self) -> Gateway:
        """The L{Gateway}, from C{[ocpp]}, C{[amqp]}, C{[websocket]} and C{[queue]}."""
        settings = self.settings
        ocpp, amqp, ws = settings.ocpp, settings.amqp, settings.websocket
        return Gateway(
            self._reactor,
            self.bridge,
            node=self.node,
            queue_arguments=settings.queue_arguments(),
            call_timeout=ocpp.call_timeout,
            max_bad_frames=settings.websocket.max_bad_frames,
            max_message_id_length=ocpp.max_message_id_length,
            offline_status=ocpp.offline_status,
            presence_events=ocpp.presence_events,
            outage_grace=amqp.outage_grace,
            outage_keep_chargers=amqp.outage_keep_chargers,
            max_message_rate=ws.max_message_rate,
            message_burst=ws.message_burst,
            max_rate_violations=ws.max_rate_violations,
            max_owed_presence=amqp.owed_presence_max,
            validation=self.validation,
            metrics=self.metrics,
            audit=self.audit,
        )

    def _charger_factory(self, kind: str, admission: Optional[Admission]) -> ChargerFactory:
        """The L{ChargerFactory} of the C{tcp} or C{ssl} listener."""
        listener, ws = self.settings.listener, self.settings.websocket
        return ChargerFactory(
            self.gateway,
            self._reactor,
            ws_path=listener.ws_path,
            vhost=listener.vhost or None,
            subprotocols=listener.subprotocols,
            max_identity_length=listener.max_identity_length,
            max_message_size=ws.ws_opts_max_frame_size,
            ping_interval=ws.ws_opts_idle_timeout,
            ping_timeout=ws.ping_timeout,
            handshake_timeout=ws.handshake_timeout,
            close_timeout=ws.close_timeout,
            max_connections=listener.max_connections,
            authenticator=self.security.authenticator(kind),
            forwarded_certificates=self.security.forwarded_certificates(kind),
            admission=admission,
            gate=self._accept_gate,
            retry_after_max=listener.retry_after_max,
            listener="ws" if kind == "tcp" else "wss",
            metrics=self.metrics,
            refusals=self.refusals,
            default_subprotocol=(
                listener.default_subprotocol if kind == "tcp"
                else listener.ssl_default_subprotocol
            ) or None,
            default_subprotocol_key=(
                "listener.default_subprotocol" if kind == "tcp"
                else "listener.ssl.default_subprotocol"
            ),
            compress=ws.ws_opts_compress,
        )

    # -- GatewayState (read by metrics and /readyz) ------------------------

    def chargers(self):
        return self.gateway.chargers.values()

    def broker_connected(self) -> bool:
        return self.bridge.connected

    def status(self) -> dict:
        """The body of the admin listener's C{GET /status}."""
        return status_snapshot(
            node=self.node,
            broker_state=self.broker_state(),
            readiness=self.readiness(),
            chargers=self.chargers(),
            recent=self.recent,
            now=self._reactor.seconds(),
        )

    def broker_blocked(self) -> bool:
        return getattr(self.bridge, "blocked", False)

    def broker_state(self) -> str:
        """
        The broker link's state in a word (idle, connecting, open, lost,
        reconnecting, closing, closed), as the status page shows it.
        """
        return self.bridge.state.value

    def broker_link(self) -> dict:
        bridge, gateway = self.bridge, self.gateway
        return {
            "state": bridge.state.value,
            "losses": bridge.link.losses,
            "topology_restores": bridge.topology_restores,
            "awaiting_restore": len(gateway.awaiting_broker),
            "presence_owed": gateway.presence.owed,
            "presence_dropped": gateway.presence.dropped,
        }

    def validation_stats(self):
        return self.validation.stats

    def accept_gate(self):
        return self._accept_gate

    def readiness(self) -> dict:
        # Not ready from the moment the broker link is lost until every
        # kept charger's consumer is restored: a load balancer should not
        # send new chargers meanwhile (they would get 503).
        return {
            "broker": bool(self.bridge.connected),
            "consumers": not self.gateway.awaiting_broker,
            "listening": self.listening_port is not None,
            "accepting": self.gateway.accepting,
        }

    # -- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        logs.bridge_stdlib(self.settings.log.level)
        d = self._start()
        d.addCallbacks(self._running, self._startup_failed)

    @defer.inlineCallbacks
    def _start(self):
        self.security.start()
        admin = self.settings.admin
        if admin.enabled:
            endpoint = _server_endpoint(self._reactor, admin.tcp_ip, admin.tcp_port, backlog=50)
            self.admin_port = yield _listen(endpoint, self.admin.site(), "[admin] tcp.port")
        yield self.bridge.start()
        yield self._check_dead_letter_exchange()
        if self.audit is not None:
            yield self.bridge.declare_exchange(self.audit.exchange)
        listener = self.settings.listener
        for kind, factory in self.factories.items():
            host = listener.tcp_ip if kind == "tcp" else listener.ssl_ip
            port = listener.tcp_port if kind == "tcp" else listener.ssl_port
            if self._reuse_port:
                from ocppgw.workers import ReusePortEndpoint

                affinity = (listener.workers if listener.worker_affinity == "source_address"
                            else 0)
                base = ReusePortEndpoint(self._reactor, host, port, CHARGER_BACKLOG, affinity)
            else:
                base = _server_endpoint(self._reactor, host, port, CHARGER_BACKLOG)
            factory = self.security.wrap(kind, factory)
            if self._accept_gate is not None:
                factory = self._accept_gate.wrap(factory)
            self.listening_ports[kind] = yield _listen(base, factory, f"[listener] {kind}.port")
        self.listening_port = next(iter(self.listening_ports.values()))
        if self._reload_signal:
            self._install_sighup()

    @defer.inlineCallbacks
    def _check_dead_letter_exchange(self):
        """
        Commands refused by validation are copied to the charger queues'
        dead-letter exchange with the reason in headers; a publish to a
        missing exchange would close the channel every charger publishes
        on, so it is only done when the exchange exists now.
        """
        exchange = self.settings.queue.x_dead_letter_exchange
        if not exchange or self.validation.mode == "off":
            return
        if (yield self.bridge.exchange_exists(exchange)):
            self.gateway.dead_letter_exchange = exchange
        else:
            _log.warn(
                "Dead-letter exchange {exchange} does not exist: commands refused by "
                "validation are rejected without the reason in headers",
                exchange=exchange,
            )

    def _running(self, _):
        for kind, port in self.listening_ports.items():
            address = port.getHost()
            _log.info(
                "ocppgw node {node} listening on {scheme}://{host}:{port}{path}/<identity> "
                "(security profile {profile})",
                node=self.node,
                scheme="ws" if kind == "tcp" else "wss",
                host=address.host,
                port=address.port,
                path=self.settings.listener.ws_path,
                profile=self.security.profile(kind),
            )
        openfiles.announce(self.settings.listener.max_connections, _log)
        if self.admin_port is not None:
            admin = self.admin_port.getHost()
            _log.info(
                "Admin API on http://{host}:{port}/ (status page; status, metrics, healthz, "
                "readyz, chargers)",
                host=admin.host,
                port=admin.port,
            )
        self.started.callback(self)

    def reload(self) -> None:
        """
        Re-read certificates, CA bundle, CRL, identity map and password
        file. New chargers see the new material; connected ones keep their
        sessions. What cannot be read is logged and the old material kept.
        """
        _log.info("Reloading TLS material and credentials")
        self.security.reload()

    def _install_sighup(self) -> None:
        import signal

        def handler(_signum, _frame):
            # Signal handlers run between bytecodes of whatever the
            # reactor thread was doing: only schedule the work.
            self._reactor.callFromThread(self.reload)

        self._previous_sighup = signal.signal(signal.SIGHUP, handler)

    def _remove_sighup(self) -> None:
        import signal

        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None

    @defer.inlineCallbacks
    def _startup_failed(self, failure):
        _log.critical(
            "ocppgw could not start: {error}", error=failure.getErrorMessage()
        )
        if self.admin_port is not None:
            port, self.admin_port = self.admin_port, None
            yield port.stopListening()
        self.started.errback(failure)
        if self._exit_on_startup_failure:
            # twistd has no way to end with a non-zero status once the
            # reactor runs; stop it and leave with 1 after its shutdown.
            # A failure before the reactor runs (a port that cannot be
            # bound fails at once) stops it as soon as it does.
            self._reactor.addSystemEventTrigger("after", "shutdown", _exit, 1)
            self._reactor.callWhenRunning(self._reactor.stop)

    @defer.inlineCallbacks
    def stopService(self):
        """
        Stop listening, close chargers (1012) over the drain window,
        requeue, drain confirms.
        """
        yield defer.maybeDeferred(super().stopService)
        self._remove_sighup()
        self.gateway.stop_accepting()
        ports, self.listening_ports = self.listening_ports, {}
        for port in ports.values():
            yield port.stopListening()
        if self._accept_gate is not None:
            self._accept_gate.close_waiting()
        self.listening_port = None
        window = self.settings.listener.drain_window
        # Bounded: requeues wait for cancel-oks, which a broker that went
        # silent never sends; the broker requeues them itself anyway.
        yield _within(
            self._reactor, self.gateway.drain(window), window + DRAIN_GRACE,
            "draining the chargers",
        )
        self.refusals.stop()
        yield self.bridge.stop()
        yield self.security.stop()
        # last: /readyz says "not ready" while the gateway drains
        if self.admin_port is not None:
            yield self.admin_port.stopListening()
            self.admin_port = None
        _log.info("ocppgw stopped")


@defer.inlineCallbacks
def _listen(endpoint, factory, key: str):
    """
    C{endpoint.listen(factory)}; a port that cannot be bound is reported
    with the setting that names it.
    """
    try:
        port = yield endpoint.listen(factory)
    except CannotListenError as error:
        raise CannotListenError(error.interface, error.port, f"{key}: {error.socketError}")
    return port


#: Seconds a drain may take beyond its window (cancel-oks, requeues).
DRAIN_GRACE = 5.0


def _within(reactor, d: defer.Deferred, seconds: float, what: str) -> defer.Deferred:
    """
    Wait for C{d} at most C{seconds}, then go on (logging that it did).
    """
    done: defer.Deferred = defer.Deferred()

    def give_up():
        _log.warn("Gave up {what} after {seconds:g} s", what=what, seconds=seconds)
        done.callback(None)

    timer = reactor.callLater(seconds, give_up)

    def finished(result):
        if timer.active():
            timer.cancel()
            done.callback(None)
        return result

    d.addBoth(finished)
    return done


def _exit(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def makeService(
    config: Union[Settings, str, os.PathLike, dict, None] = None,
    reactor=None,
    **kwargs,
) -> GatewayService:
    """
    Build the gateway's service tree, for C{twistd} or for embedding.

    @param config: a L{Settings}, the path of an INI file, a dict of
        sections (see L{ocppgw.config.settings_from_dict}), or C{None} for
        the defaults.
    @param reactor: the reactor to use; the global one if C{None}.
    @param kwargs: passed to L{GatewayService} (e.g. a C{bridge}).
    @raise ocppgw.config.ConfigError: for a bad configuration.
    """
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    if config is None:
        settings = _config.defaults()
    elif isinstance(config, Settings):
        settings = config
    elif isinstance(config, dict):
        settings = _config.settings_from_dict(config)
    else:
        settings = _config.load(config)
    return GatewayService(settings, reactor, **kwargs)
