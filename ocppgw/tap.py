"""
C{twistd ocppgw}: command-line options and the service maker, and
C{ocppgw run}, which runs the same service with twistd's own runner.

twistd finds the gateway through Twisted's plugin discovery: it scans
C{twisted/plugins/} on C{sys.path}. That directory is there for a regular
install and for a checkout on C{sys.path}, but not for every install mode
(a default editable install, a zipapp). C{ocppgw run} hands twistd's
runner the service maker directly instead, so the same options, logging,
signal handling (SIGTERM drains, SIGINT too, SIGHUP reloads) and exit on
a failed start apply without discovery. Reusing the runner rather than
writing daemon plumbing of our own keeps the two ways of starting the
gateway from drifting apart.
"""

from __future__ import annotations

from typing import Optional

from twisted.application.service import ServiceMaker
from twisted.python import usage

from ocppgw.config import ConfigError, Settings, defaults, load


class Options(usage.Options):
    """
    Options of C{twistd ocppgw}.
    """

    synopsis = "[--config etc/ocppgw.ini]"
    longdesc = (
        "Run the ocppgw OCPP-J gateway: chargers connect over WebSocket and "
        "every frame is bridged to RabbitMQ. Every setting lives in the INI "
        "file; see docs/configuration.md for the reference."
    )
    optParameters = [
        ["config", "c", None, "Path of the INI configuration file (defaults apply without one)."],
        ["worker", None, None,
         "Internal: run as worker N of a [listener] workers group (started by the supervisor)."],
    ]

    def postOptions(self) -> None:
        try:
            self["settings"] = settings = read_settings(self["config"])
        except ConfigError as error:
            # Not a usage.UsageError: twistd would print its whole usage
            # text first and bury the problem. SystemExit prints only the
            # problems, each naming the file, and ends with status 1.
            raise SystemExit(error.located(self["config"] or "<defaults>")) from None
        from ocppgw.logs import install_for_twistd

        # twistd reads its parent options' "logger" after this, before it
        # starts logging: the configuration file picks format and level.
        install_for_twistd(settings.log, getattr(self, "parent", None))


def read_settings(path: Optional[str]) -> Settings:
    """
    The settings of the INI file at C{path} (the defaults without one),
    with the checks that only apply to a process C{twistd ocppgw} starts.

    @raise ConfigError: naming each problem's C{section.key}.
    """
    settings = load(path) if path else defaults()
    listener = settings.listener
    if listener.workers > 1 and (
        (listener.tcp_enabled and listener.tcp_port == 0)
        or (listener.ssl_enabled and listener.ssl_port == 0)
    ):
        raise ConfigError("listener.workers: several workers need fixed listener ports, not 0")
    return settings


#: What twistd runs as C{twistd ocppgw}; the plugin module
#: (C{twisted/plugins/ocppgw_plugin.py}) exposes this object, and
#: L{run_foreground} hands it to twistd's runner directly.
serviceMaker = ServiceMaker(
    "ocppgw",
    __name__,
    "OCPP-J gateway between charge stations and RabbitMQ",
    "ocppgw",
)


def run_foreground(config: Optional[str] = None, worker: Optional[str] = None) -> int:
    """
    Run the gateway in the foreground, as C{twistd --nodaemon --pidfile=
    ocppgw} would, without needing Twisted's plugin discovery.

    @param config: the INI file (the defaults without one).
    @param worker: internal: the worker number, for a C{[listener] workers}
        group's supervisor.
    @return: 0 once the gateway has stopped (after a SIGTERM or SIGINT, its
        drain). twistd itself ends by re-raising the signal it stopped
        for; a foreground command that was asked to stop and drained has
        done its job, so it says so with 0. A configuration error ends
        the process with status 1 (C{SystemExit}), and so does a failed
        start (L{ocppgw.service.GatewayService}).
    """
    # twistd's own option parser and runner (the classes `twistd` uses on
    # POSIX; the gateway needs POSIX signals anyway).
    from twisted.scripts._twistd_unix import ServerOptions, UnixApplicationRunner

    class _ServerOptions(ServerOptions):
        # the one plugin, without scanning sys.path for twisted/plugins/
        _getPlugins = staticmethod(lambda interface: [serviceMaker])

    argv = ["--nodaemon", "--pidfile=", serviceMaker.tapname]
    if config:
        argv += ["--config", config]
    if worker:
        argv += ["--worker", worker]
    options = _ServerOptions()
    options.parseOptions(argv)
    UnixApplicationRunner(options).run()
    return 0


def makeService(options: Options):
    """
    Build the service for twistd; a failure to start ends the process with 1.

    SIGHUP reloads certificates and credentials (see L{GatewayService.reload}).
    Certificate or password files that exist but cannot be used end the
    start with their reason, not a traceback.
    """
    import dataclasses

    from twisted.internet import reactor

    from ocppgw.auth import PasswordFileError
    from ocppgw.openfiles import raise_soft_limit
    from ocppgw.service import GatewayService
    from ocppgw.tls import TLSConfigError
    from ocppgw.tuning import HeapTrimmer, tune_gc
    from ocppgw.validation import SchemaError

    settings = options["settings"]
    if settings.listener.workers > 1 and not options.get("worker"):
        from ocppgw.workers import WorkersService

        return WorkersService(reactor, options.get("config"), settings.listener.workers)
    reuse_port = False
    if options.get("worker"):
        # one of several processes on these ports: its own node name, and
        # its own admin port (base + n - 1) so that each can be scraped
        index = int(options["worker"])
        amqp = dataclasses.replace(settings.amqp, node=f"{settings.amqp.node}/{index}")
        admin = settings.admin
        if admin.tcp_port:
            admin = dataclasses.replace(admin, tcp_port=admin.tcp_port + index - 1)
        settings = dataclasses.replace(settings, amqp=amqp, admin=admin)
        reuse_port = True
    tune_gc()
    raise_soft_limit()
    try:
        gateway = GatewayService(
            settings, reactor, exit_on_startup_failure=True, reload_signal=True,
            reuse_port=reuse_port,
        )
    except (TLSConfigError, PasswordFileError, SchemaError, OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"ocppgw could not start: {error}") from None
    HeapTrimmer(reactor).setServiceParent(gateway)
    return gateway
