"""
C{[listener] workers = N}: N gateway processes sharing one listening port.

One Python process runs on one core; a host with more cores runs several
gateways. Each worker is a complete gateway process, C{ocppgw run} (its own
AMQP connection, its own node name), that binds the port with
C{SO_REUSEPORT}, so the kernel spreads incoming connections over the workers. The processes
that share a port cooperate exactly as gateways on different hosts do:
"last connection wins" across them goes through the takeover message (see
L{ocppgw.gateway}).

The process started by C{twistd} is only the supervisor: it starts the
workers, restarts one that dies, passes SIGHUP (reload TLS material and
credentials) on, and on SIGTERM passes the signal on and waits for every
worker to finish its drain.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Optional

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

_log = Logger()

#: Seconds before a worker that died is started again.
RESTART_DELAY = 1.0


def listen_reuse_port(reactor, host: str, port: int, factory, backlog: int = 1024):
    """
    Listen on C{host:port} with C{SO_REUSEPORT}, so that other processes can
    listen on the same port and the kernel balances connections over them.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        # adoptStreamPort duplicates the descriptor; ours is closed below
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    finally:
        sock.close()


class ReusePortEndpoint:
    """
    A server endpoint for L{listen_reuse_port} (so that it can be wrapped
    like any other, e.g. by the PROXY protocol endpoint).
    """

    def __init__(self, reactor, host: str, port: int, backlog: int = 1024) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._backlog = backlog

    def listen(self, factory) -> defer.Deferred:
        return defer.maybeDeferred(
            listen_reuse_port, self._reactor, self._host, self._port, factory, self._backlog
        )


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor: "WorkersService", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason.value)


class WorkersService(service.Service):
    """
    Starts C{count} workers and keeps them running until stopped.
    """

    def __init__(self, reactor, config_path: Optional[str], count: int,
                 python: str = sys.executable) -> None:
        self._reactor = reactor
        self._config_path = config_path
        self._count = count
        self._python = python
        self.workers: dict[int, _Worker] = {}
        self._stopping = False
        self._previous_sighup = None

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for index in range(1, self._count + 1):
            self._spawn(index)

        def sighup(_signum, _frame):
            # only schedule: a signal handler interrupts the reactor thread
            self._reactor.callFromThread(self.signal_workers, signal.SIGHUP)

        self._previous_sighup = signal.signal(signal.SIGHUP, sighup)

    def signal_workers(self, signum: int) -> None:
        """
        Send C{signum} to every running worker.
        """
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(signum)
            except Exception:
                pass  # it is ending; _ended restarts it if needed

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        # `ocppgw run` is `twistd -n ocppgw` without plugin discovery, so
        # the workers start in every install mode the supervisor did
        args = [self._python, "-m", "ocppgw.cli", "run", "--worker", str(index)]
        if self._config_path:
            args += ["--config", os.path.abspath(self._config_path)]
        worker = _Worker(self, index)
        self.workers[index] = worker
        # the workers log to the supervisor's stdout and stderr
        self._reactor.spawnProcess(
            worker, self._python, args, env=os.environ.copy(),
            childFDs={0: "w", 1: 1, 2: 2},
        )
        _log.info("Started gateway worker {index} (pid {pid})", index=index,
                  pid=worker.transport.pid)

    def _ended(self, worker: _Worker, reason) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            return
        _log.error(
            "Gateway worker {index} ended ({reason}); restarting it in {delay} s",
            index=worker.index, reason=str(reason), delay=RESTART_DELAY,
        )
        self._reactor.callLater(RESTART_DELAY, self._spawn, worker.index)

    def stopService(self):
        """
        SIGTERM every worker (each drains its chargers) and wait for all.
        """
        super().stopService()
        self._stopping = True
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        waits = []
        for worker in list(self.workers.values()):
            try:
                worker.transport.signalProcess(signal.SIGTERM)
            except Exception:
                pass  # already gone
            waits.append(worker.ended)
        return defer.DeferredList(waits)
