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

import ctypes
import os
import signal
import socket
import struct
import sys
from typing import Optional

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

_log = Logger()

#: Seconds before a worker that died is started again.
RESTART_DELAY = 1.0
#: A worker that dies within this many seconds of its start waits twice as
#: long as the last time before the next start (up to L{MAX_RESTART_DELAY}):
#: one that cannot start (a port taken, a broker refusing it) is not started
#: again every second, and its error is not logged every second.
STABLE_AFTER = 30.0
MAX_RESTART_DELAY = 60.0


def next_restart_delay(previous: Optional[float], lived: float) -> float:
    """
    Seconds to wait before starting again a worker that ended after
    C{lived} seconds, the last wait having been C{previous} (C{None}
    before any).
    """
    if previous is None or lived >= STABLE_AFTER:
        return RESTART_DELAY
    return min(previous * 2, MAX_RESTART_DELAY)


#: C{SO_ATTACH_REUSEPORT_CBPF} (Linux 4.5, C{asm-generic/socket.h}); Python's
#: socket module does not name it.
SO_ATTACH_REUSEPORT_CBPF = 51

# Classic BPF opcodes (linux/filter.h) and the offset that makes an absolute
# load read from the packet's IP header (SKF_NET_OFF, -0x100000).
_LD_W_ABS, _LD_B_ABS = 0x20, 0x30
_ALU_RSH_K, _ALU_MUL_K, _ALU_MOD_K = 0x74, 0x24, 0x94
_JMP_JEQ_K, _JMP_JA, _RET_A = 0x15, 0x05, 0x16
_NET = 0x100000


def _ip_header(offset: int) -> int:
    """The absolute load offset of byte C{offset} of the IP header."""
    return (offset - _NET) & 0xFFFFFFFF


#: Knuth's multiplicative hash constant: spreads neighbouring addresses
#: (127.0.0.2, .3, ...) and addresses sharing their low bits over the workers.
_HASH_MULTIPLIER = 2654435761


def source_address_program(workers: int) -> bytes:
    """
    A classic BPF program for C{SO_ATTACH_REUSEPORT_CBPF} that picks the
    socket of a C{SO_REUSEPORT} group from the client's address alone: the
    last 32 bits of its IPv4 or IPv6 source address, hashed, modulo
    C{workers}. The kernel's own choice hashes address I{and port}, and a
    reconnecting charger comes from a new port, so it lands on any worker;
    its TLS session ticket is encrypted with a key only the worker that
    issued it holds (the TLS binding offers no way to share one), so only
    the same worker can resume it. An index past the sockets the group has
    (a worker being restarted) makes the kernel fall back to its own choice.
    """
    program = (
        (_LD_B_ABS, 0, 0, _ip_header(0)),            # A = first byte of the IP header
        (_ALU_RSH_K, 0, 0, 4),                # A = IP version
        (_JMP_JEQ_K, 0, 2, 6),                # IPv6? else skip to the IPv4 load
        (_LD_W_ABS, 0, 0, _ip_header(20)),           # A = last 32 bits of the IPv6 source
        (_JMP_JA, 0, 0, 1),
        (_LD_W_ABS, 0, 0, _ip_header(12)),           # A = IPv4 source address
        (_ALU_MUL_K, 0, 0, _HASH_MULTIPLIER),
        (_ALU_RSH_K, 0, 0, 16),
        (_ALU_MOD_K, 0, 0, workers),
        (_RET_A, 0, 0, 0),
    )
    return b"".join(struct.pack("HBBI", *instruction) for instruction in program)


def attach_source_affinity(sock: socket.socket, workers: int) -> None:
    """
    Have the kernel give C{sock}'s C{SO_REUSEPORT} group its connections
    by client address (L{source_address_program}). Attached by each worker
    to its own socket: the group keeps the last one, and all are the same.
    """
    code = source_address_program(workers)
    filters = ctypes.create_string_buffer(code)
    # struct sock_fprog: unsigned short len; struct sock_filter *filter
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(filters))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def listen_reuse_port(reactor, host: str, port: int, factory, backlog: int = 1024,
                      affinity_workers: int = 0):
    """
    Listen on C{host:port} with C{SO_REUSEPORT}, so that other processes can
    listen on the same port and the kernel balances connections over them;
    with C{affinity_workers}, by client address over that many workers
    (L{attach_source_affinity}).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        # after listen(): a socket joins its group when it starts listening,
        # and a program attached before would stay with a group of its own
        if affinity_workers:
            attach_source_affinity(sock, affinity_workers)
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

    def __init__(self, reactor, host: str, port: int, backlog: int = 1024,
                 affinity_workers: int = 0) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._backlog = backlog
        self._affinity_workers = affinity_workers

    def listen(self, factory) -> defer.Deferred:
        return defer.maybeDeferred(
            listen_reuse_port, self._reactor, self._host, self._port, factory, self._backlog,
            self._affinity_workers,
        )


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor: "WorkersService", index: int, started_at: float) -> None:
        self.supervisor = supervisor
        self.index = index
        #: reactor seconds when it was started
        self.started_at = started_at
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
        # by worker index: the last wait before a start, and the pending start
        self._restart_delays: dict[int, float] = {}
        self._restarts: dict[int, object] = {}
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
        self._restarts.pop(index, None)
        if self._stopping:
            return
        # `ocppgw run` is `twistd -n ocppgw` without plugin discovery, so
        # the workers start in every install mode the supervisor did
        args = [self._python, "-m", "ocppgw.cli", "run", "--worker", str(index)]
        if self._config_path:
            args += ["--config", os.path.abspath(self._config_path)]
        worker = _Worker(self, index, self._reactor.seconds())
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
        lived = self._reactor.seconds() - worker.started_at
        delay = next_restart_delay(self._restart_delays.get(worker.index), lived)
        self._restart_delays[worker.index] = delay
        _log.error(
            "Gateway worker {index} ended ({reason}) after {lived:.1f} s; restarting it in {delay:g} s",
            index=worker.index, reason=str(reason), lived=lived, delay=delay,
        )
        self._restarts[worker.index] = self._reactor.callLater(delay, self._spawn, worker.index)

    def stopService(self):
        """
        SIGTERM every worker (each drains its chargers) and wait for all.
        """
        super().stopService()
        self._stopping = True
        for restart in self._restarts.values():
            if restart.active():
                restart.cancel()
        self._restarts.clear()
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
