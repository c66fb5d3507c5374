"""
L{ocppgw.workers}: the listening sockets several gateway processes share,
over real sockets (the kernel's choice of a socket is what is tested).
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial import unittest

from ocppgw.testing import FakeBackEnd, amqp_url, unique_name
from ocppgw.workers import (
    MAX_RESTART_DELAY, RESTART_DELAY, STABLE_AFTER, WorkersService, listen_reuse_port,
    next_restart_delay,
)
from tests import rawclient
from tests.certs import ThrowAwayPKI
from tests.support import config_file, delete_from_broker, free_port, spawn_twistd

#: Client addresses that the affinity program spreads over both of two
#: workers (the hash is fixed, so this holds on every run).
SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 10))


class _Accepted(protocol.Protocol):
    def connectionMade(self):
        peer = self.transport.getPeer()
        self.factory.accepted.put((self.factory.index, peer.host, peer.port))


class _Group:
    """
    Two listening sockets of one C{SO_REUSEPORT} group on one port, as two
    workers hold them; C{accepted} tells which one took each connection.
    """

    def __init__(self, testcase: unittest.TestCase, affinity_workers: int) -> None:
        self.port = free_port()
        self.accepted: defer.DeferredQueue = defer.DeferredQueue()
        for index in range(2):
            factory = protocol.Factory.forProtocol(_Accepted)
            factory.index, factory.accepted = index, self.accepted
            listening = listen_reuse_port(reactor, "127.0.0.1", self.port, factory,
                                          affinity_workers=affinity_workers)
            testcase.addCleanup(listening.stopListening)

    @defer.inlineCallbacks
    def worker_for(self, source: str):
        """Connect from C{source}: the index of the socket that accepted."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(source, 0))
        client = yield connectProtocol(endpoint, protocol.Protocol())
        local_port = client.transport.getHost().port
        index, host, port = yield self.accepted.get()
        client.transport.loseConnection()
        if (host, port) != (source, local_port):
            raise AssertionError(f"accepted {host}:{port}, connected from {source}:{local_port}")
        return index


class SourceAddressAffinityTests(unittest.TestCase):
    """
    C{[listener] worker_affinity = source_address}: a client address always
    reaches the same worker, so a reconnecting wss charger finds the worker
    that holds the key of its TLS session ticket.
    """

    def setUp(self):
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("SO_REUSEPORT groups with a BPF program are Linux's")

    @defer.inlineCallbacks
    def test_same_address_same_worker(self):
        group = _Group(self, affinity_workers=2)
        chosen = {}
        for source in SOURCES:
            workers = set()
            for _ in range(6):
                workers.add((yield group.worker_for(source)))
            self.assertEqual(len(workers), 1, f"{source} reached workers {workers}")
            chosen[source] = workers.pop()
        # and the addresses are spread over both workers
        self.assertEqual(set(chosen.values()), {0, 1}, chosen)

    @defer.inlineCallbacks
    def test_without_affinity_an_address_reaches_either(self):
        """
        The kernel's own choice hashes the client's port too: one address
        reconnecting (from new ports) reaches both workers. 24 connects all
        to one of two sockets would happen once in 2^23 runs.
        """
        group = _Group(self, affinity_workers=0)
        workers = set()
        for _ in range(24):
            workers.add((yield group.worker_for("127.0.0.2")))
        self.assertEqual(workers, {0, 1})


class ResumptionAcrossWorkersTests(unittest.TestCase):
    """
    Two workers of a real C{twistd ocppgw} on one wss port with
    C{worker_affinity = source_address}: a charger that keeps its TLS
    session resumes it on every reconnect, whichever worker it reached.
    """

    timeout = 120

    def setUp(self):
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("SO_REUSEPORT groups with a BPF program are Linux's")
        self.identities: list[str] = []

    @defer.inlineCallbacks
    def test_reconnects_resume_on_their_worker(self):
        pki = ThrowAwayPKI(os.path.abspath(self.mktemp()))
        server = pki.issue("localhost", server=True, kind="ec")
        exchange, port = unique_name("affinity"), free_port()
        path = config_file(self, (
            f"[listener]\ntcp.enabled = false\nssl.enabled = true\nssl.port = {port}\n"
            f"ssl.profile = 0\nssl.certfile = {server.certfile}\n"
            f"ssl.keyfile = {server.keyfile}\n"
            f"workers = 2\nworker_affinity = source_address\ndrain_window = 0\n"
            f"[admin]\ntcp.port = 0\n"
            f"[amqp]\nurl = {amqp_url()}\nexchange = {exchange}\n"
            f"[queue]\nx-expires = 30000\n"
        ))
        backend = yield FakeBackEnd.start(reactor, amqp_url(), exchange,
                                          bindings=("ocppgw.connected",))
        self.addCleanup(backend.stop)
        child = spawn_twistd(path)
        self.addCleanup(self._stop, child, exchange)
        # both workers listening, or every connection would reach the one
        while child.output.count(b" listening on wss://") < 2:
            if child.ended.called:
                self.fail(child.output.decode(errors="replace")[-2000:])
            yield task.deferLater(reactor, 0.1, lambda: None)
        context = rawclient.client_context(pki.cafile)
        reconnects = 4
        for source in SOURCES:
            identity = unique_name("AF")
            self.identities.append(identity)
            first = yield rawclient.handshake(port, f"/ocpp/{identity}", context=context,
                                              source=source)
            self.assertEqual(first.status, 101)
            self.assertFalse(first.session_reused)
            session = first.session
            for _ in range(reconnects):
                again = yield rawclient.handshake(port, f"/ocpp/{identity}", context=context,
                                                  source=source, session=session)
                self.assertEqual(again.status, 101)
                self.assertTrue(again.session_reused, f"{source} made a full handshake")
                session = again.session
        # which worker (node) took each connection, from the gateways' own events
        nodes: dict = {}
        for _ in range(len(SOURCES) * (1 + reconnects)):
            event = json.loads((yield backend.next_message("ocppgw.connected")).body)
            nodes.setdefault(event["identity"], set()).add(event["node"])
        self.assertEqual(sorted(nodes), sorted(self.identities))
        for identity, its_nodes in nodes.items():
            self.assertEqual(len(its_nodes), 1, f"{identity} reached {its_nodes}")
        # and the chargers were spread over both workers
        self.assertEqual(len(set().union(*nodes.values())), 2, nodes)

    @defer.inlineCallbacks
    def _stop(self, child, exchange):
        if not child.ended.called:
            child.transport.signalProcess("TERM")
            yield child.ended
        yield delete_from_broker(exchange, self.identities)


class _SpawningClock(task.Clock):
    """A clock that records the processes it is asked to spawn."""

    def __init__(self):
        super().__init__()
        self.spawned: list = []

    def spawnProcess(self, process_protocol, executable, args, env=None, childFDs=None):
        transport = _FakeProcess(1000 + len(self.spawned))
        process_protocol.makeConnection(transport)
        self.spawned.append((process_protocol, args))
        return transport


class _FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals: list = []

    def signalProcess(self, signum):
        self.signals.append(signum)


class RestartBackOffTests(unittest.SynchronousTestCase):
    """
    The supervisor restarts a dead worker after a second, and waits longer
    each time for one that keeps dying as soon as it starts.
    """

    def setUp(self):
        self.clock = _SpawningClock()
        self.supervisor = WorkersService(self.clock, None, 1)
        self.supervisor.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if self.supervisor.running:
            self.supervisor.stopService()
            for worker, _args in self.clock.spawned:
                if not worker.ended.called:
                    worker.processEnded(Failure(ProcessDone(0)))

    def die_after(self, seconds):
        """Let the running worker live C{seconds}, then die; the wait before its restart."""
        self.clock.advance(seconds)
        worker, _args = self.clock.spawned[-1]
        count = len(self.clock.spawned)
        worker.processEnded(Failure(ProcessTerminated(1)))
        [restart] = self.clock.getDelayedCalls()
        delay = restart.getTime() - self.clock.seconds()
        self.clock.advance(delay)
        self.assertEqual(len(self.clock.spawned), count + 1)
        return delay

    def test_a_worker_dying_at_start_waits_longer_each_time(self):
        delays = [self.die_after(0.5) for _ in range(9)]
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0])

    def test_a_worker_that_ran_a_while_is_restarted_after_a_second(self):
        self.assertEqual([self.die_after(0.5) for _ in range(3)], [1.0, 2.0, 4.0])
        self.assertEqual(self.die_after(STABLE_AFTER), RESTART_DELAY)
        self.assertEqual(self.die_after(1.0), 2.0)

    def test_no_restart_after_stop(self):
        worker, _args = self.clock.spawned[-1]
        worker.processEnded(Failure(ProcessTerminated(1)))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.supervisor.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(MAX_RESTART_DELAY)
        self.assertEqual(len(self.clock.spawned), 1)

    def test_restart_delay_rule(self):
        self.assertEqual(next_restart_delay(None, 0.1), RESTART_DELAY)
        self.assertEqual(next_restart_delay(4.0, STABLE_AFTER - 1), 8.0)
        self.assertEqual(next_restart_delay(4.0, STABLE_AFTER), RESTART_DELAY)
        self.assertEqual(next_restart_delay(MAX_RESTART_DELAY, 0.0), MAX_RESTART_DELAY)
