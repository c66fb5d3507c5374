"""
C{twistd ocppgw}: command-line options and the service maker.
"""

from __future__ import annotations

from twisted.python import usage

from ocppgw.config import ConfigError, load


class Options(usage.Options):
    """
    Options of C{twistd ocppgw}.
    """

    synopsis = "[--config etc/ocppgw.ini]"
    longdesc = (
        "Run the ocppgw OCPP-J gateway: chargers connect over WebSocket and "
        "every frame is bridged to RabbitMQ. Every setting lives in the INI "
        "file; see README.md for the reference."
    )
    optParameters = [
        ["config", "c", None, "Path of the INI configuration file (defaults apply without one)."],
        ["worker", None, None,
         "Internal: run as worker N of a [listener] workers group (started by the supervisor)."],
    ]

    def postOptions(self) -> None:
        from ocppgw.config import defaults

        try:
            self["settings"] = load(self["config"]) if self["config"] else defaults()
        except ConfigError as error:
            # usage.UsageError makes twistd print the message and exit 1.
            raise usage.UsageError(str(error)) from None
        listener = self["settings"].listener
        if listener.workers > 1 and listener.tcp_port == 0:
            raise usage.UsageError(
                "listener.workers: several workers need a fixed listener.tcp.port, not 0"
            )


def makeService(options: Options):
    """
    Build the service for twistd; a failure to start ends the process with 1.
    """
    import dataclasses

    from twisted.internet import reactor

    from ocppgw.service import GatewayService

    settings = options["settings"]
    if options["worker"]:
        # one of several processes on this port: its own node name
        amqp = dataclasses.replace(
            settings.amqp, node=f"{settings.amqp.node}/{options['worker']}"
        )
        settings = dataclasses.replace(settings, amqp=amqp)
        return GatewayService(settings, reactor, exit_on_startup_failure=True,
                              reuse_port=True)
    if settings.listener.workers > 1:
        from ocppgw.workers import WorkersService

        return WorkersService(reactor, options["config"], settings.listener.workers)
    return GatewayService(settings, reactor, exit_on_startup_failure=True)
