"""
Broker nodes killed under gateways that serve chargers: the scenario of
the multi-node fault test and of C{bench/chaos.py}.

A L{Scenario} runs, on a RabbitMQ cluster of our own
(L{tests.faults.cluster.RabbitCluster}):

- gateway processes (C{twistd ocppgw}, quorum charger queues with single
  active consumer), each pointed at a different node first and at the
  others as failover;
- chargers (half OCPP 1.6, half 2.0.1) that send a Heartbeat every second
  and answer each CSMS command after 0.2-1.5 s, as real ones do;
- a back end on a node that is never killed, answering Heartbeats and
  sending a stream of commands (only those the broker confirmed count as
  sent);
- a plan of C{kill -9}s of the node a gateway uses, each followed (after
  the chargers are served again) by that node's restart;
- while a node is down, a probe that keeps opening new connections to the
  gateways (each must be 101 or 503, never 500), and a poll of every
  gateway's C{/readyz}.

It records what a check needs: commands sent, delivered (per charger, in
order) and answered; how long after each kill every charger was served
again (its first Heartbeat answered after the kill); readiness and probe
answers. L{Results} sums it up.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Optional

import orjson
from twisted.internet import defer, protocol, task, threads
from twisted.logger import Logger

from ocppgw.amqp import BackEndClient
from ocppgw.testing import FakeBackEnd, FakeCharger, unique_name
from tests.faults import rawws
from tests.support import free_port

_log = Logger()

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TIME = {"currentTime": "2026-01-01T00:00:00Z"}
_ACCEPTED = {"status": "Accepted"}
#: a command each version's schemas accept
_COMMAND = {
    "ocpp1.6": ("Reset", {"type": "Soft"}),
    "ocpp2.0.1": ("Reset", {"type": "OnIdle"}),
}


class _Child(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data):
        self.output = (self.output + data)[-200_000:]

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)


class GatewayProcess:
    """
    One C{twistd -n ocppgw} child with its own configuration file.
    """

    def __init__(self, reactor, directory: str, name: str, urls: list, exchange: str,
                 extra: str = "") -> None:
        self._reactor = reactor
        self.name = name
        self.port = free_port()
        self.admin_port = free_port()
        self.config = os.path.join(directory, f"{name}.ini")
        self.log = os.path.join(directory, f"{name}.log")
        with open(self.config, "w") as f:
            f.write(
                f"[listener]\ntcp.port = {self.port}\ndrain_window = 1\n"
                f"[admin]\ntcp.port = {self.admin_port}\n"
                f"[amqp]\nurl = {urls[0]}\nfailover_urls = {' '.join(urls[1:])}\n"
                f"exchange = {exchange}\nnode = {name}\nheartbeat = 5\n"
                "reconnect_max_delay = 2\noutage_grace = 300\n"
                "[queue]\nx-queue-type = quorum\nx-single-active-consumer = true\n"
                "x-expires = 600000\n"
                f"{extra}"
            )
        self.child: Optional[_Child] = None

    @defer.inlineCallbacks
    def start(self, timeout: float = 60.0):
        self.child = _Child()
        self._reactor.spawnProcess(
            self.child, sys.executable,
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", f"--logfile={self.log}", "ocppgw", "--config", self.config],
            env={**os.environ, "PYTHONPATH": _REPO}, path=_REPO,
        )
        deadline = time.monotonic() + timeout
        while (yield self.readyz()) != 200:
            if self.child.ended.called or time.monotonic() > deadline:
                raise RuntimeError(f"gateway {self.name} did not start: {self.tail()}")
            yield task.deferLater(self._reactor, 0.2, lambda: None)

    def tail(self, lines: int = 40) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return self.child.output.decode(errors="replace") if self.child else ""

    def url(self, identity: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ocpp/{identity}"

    @defer.inlineCallbacks
    def readyz(self):
        """The status of C{GET /readyz}, or 0 when nothing answers."""
        from tests.support import http

        try:
            status, _headers, _body = yield http(self.admin_port, "/readyz")
        except Exception:
            return 0
        return status

    def stop(self) -> defer.Deferred:
        if self.child is None or self.child.ended.called:
            return defer.succeed(None)
        self.child.transport.signalProcess("TERM")
        return self.child.ended

    def kill(self) -> defer.Deferred:
        if self.child is None or self.child.ended.called:
            return defer.succeed(None)
        self.child.transport.signalProcess("KILL")
        return self.child.ended


class SlowCharger:
    """
    A charger that beats every second and answers commands slowly.

    @ivar served: times (reactor seconds) at which a Heartbeat sent then
        was answered by the back end.
    """

    def __init__(self, reactor, rng: random.Random, gateway: GatewayProcess,
                 identity: str, subprotocol: str) -> None:
        self._reactor = reactor
        self._rng = rng
        self.gateway = gateway
        self.identity = identity
        self.subprotocol = subprotocol
        self.charger: Optional[FakeCharger] = None
        self.served: list[float] = []
        self.refused_beats = 0
        self._running = False
        #: the Heartbeat loop, until it ends (see L{stop})
        self._beats: Optional[defer.Deferred] = None
        # (moment, Deferred) fired by the first Heartbeat sent after moment
        # and answered
        self._served_waiters: list = []

    @defer.inlineCallbacks
    def connect(self):
        self.charger = yield FakeCharger.connect(
            self._reactor, self.gateway.url(self.identity), (self.subprotocol,))
        self._running = True
        self._answer_loop()
        self._beats = self._beat_loop()

    def stop(self) -> defer.Deferred:
        """
        Stop sending Heartbeats: fires once the loop has ended, its last
        wait between two Heartbeats included (else a test could end with
        that timer still pending).
        """
        self._running = False
        return self._beats if self._beats is not None else defer.succeed(None)

    @property
    def closed(self) -> bool:
        return self.charger is not None and self.charger.closed.called

    def _answer_loop(self) -> None:
        def answer(command):
            delay = self._rng.uniform(0.2, 1.5)
            self._reactor.callLater(delay, self._answer, command)
            if self._running:
                self.charger.next_call().addCallback(answer)

        self.charger.next_call().addCallback(answer)

    def _answer(self, command) -> None:
        if not self.closed:
            self.charger.answer(command, _ACCEPTED)

    @defer.inlineCallbacks
    def _beat_loop(self):
        while self._running and not self.closed:
            sent = self._reactor.seconds()
            answer = yield self._beat()
            if answer is not None and answer[0] == 3:
                self.served.append(sent)
                waiters, self._served_waiters = self._served_waiters, []
                for moment, d in waiters:
                    if d.called:
                        continue  # given up on (timed out)
                    if sent >= moment:
                        d.callback(sent - moment)
                    else:
                        self._served_waiters.append((moment, d))
            elif answer is not None:
                self.refused_beats += 1
            elapsed = self._reactor.seconds() - sent
            yield task.deferLater(self._reactor, max(0.0, 1.0 - elapsed), lambda: None)

    def _beat(self) -> defer.Deferred:
        """
        The answer to a Heartbeat, or None after 5 s without one (the back
        end's answer may be lost with a node: a real charger retries).
        """
        result: defer.Deferred = defer.Deferred()
        call = self.charger.call("Heartbeat", {})
        call.addBoth(lambda answer: result.called or result.callback(
            answer if isinstance(answer, list) else None))
        timer = self._reactor.callLater(5.0, lambda: result.called or result.callback(None))
        result.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return result

    def served_after(self, moment: float) -> Optional[float]:
        """Seconds from C{moment} to the first Heartbeat sent and answered after it."""
        for sent in self.served:
            if sent >= moment:
                return sent - moment
        return None

    def when_served_after(self, moment: float) -> defer.Deferred:
        """Fires with L{served_after}C{(moment)} once there is one."""
        seconds = self.served_after(moment)
        if seconds is not None:
            return defer.succeed(seconds)
        d: defer.Deferred = defer.Deferred()
        self._served_waiters.append((moment, d))
        return d


class Results:
    """What a scenario saw, and the figures of its summary line."""

    def __init__(self) -> None:
        self.sent: dict[str, str] = {}       # message id -> identity
        self.answered: dict[str, int] = {}   # message id -> answers seen
        self.recoveries: list[tuple[str, float]] = []   # (what, seconds)
        self.unrecovered: list[str] = []
        self.probe_statuses: dict[int, int] = {}
        self.readyz: dict[str, list] = {}    # gateway -> [(time, status)]
        self.duplicates: dict[str, list] = {}
        self.closed: list[str] = []
        self._all_answered: list[defer.Deferred] = []

    def confirmed(self, message_id: str, identity: str) -> None:
        self.sent[message_id] = identity

    def answer(self, message_id: str) -> None:
        self.answered[message_id] = self.answered.get(message_id, 0) + 1
        if self._all_answered and not self.lost:
            waiters, self._all_answered = self._all_answered, []
            for d in waiters:
                d.callback(None)

    def all_answered(self) -> defer.Deferred:
        """Fires once every command sent so far was answered."""
        if not self.lost:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._all_answered.append(d)
        return d

    @property
    def lost(self) -> list[str]:
        return sorted(set(self.sent) - set(self.answered))

    @property
    def max_recovery(self) -> float:
        return max((seconds for _what, seconds in self.recoveries), default=0.0)

    def summary(self) -> str:
        twice = sum(len(ids) for ids in self.duplicates.values())
        answered_twice = sum(1 for count in self.answered.values() if count > 1)
        return (
            f"chaos: sent={len(self.sent)} answered={len(self.answered)} "
            f"lost={len(self.lost)} duplicated={twice} answers_twice={answered_twice} "
            f"unrecovered={len(self.unrecovered)} closed={len(self.closed)} "
            f"max_recovery={self.max_recovery:.1f}s "
            f"probe={dict(sorted(self.probe_statuses.items()))}"
        )


class Scenario:
    """
    Gateways, chargers, a back end and a plan of node kills on a cluster.
    """

    def __init__(self, reactor, cluster, directory: str, *, gateways: int = 2,
                 chargers: int = 40, commands_per_second: float = 20.0,
                 seed: Optional[int] = None) -> None:
        self._reactor = reactor
        self.cluster = cluster
        self.seed = seed if seed is not None else random.randrange(2**32)
        self.rng = random.Random(self.seed)
        self.exchange = unique_name("chaos")
        size = cluster.size
        # gateway n starts on node n and fails over to the next ones; the
        # back end uses the last node, which the plan never kills
        self.gateways = [
            GatewayProcess(reactor, directory, unique_name(f"gw{n}"),
                           [cluster.url((n + k) % size) for k in range(size)], self.exchange)
            for n in range(gateways)
        ]
        self.backend_node = size - 1
        self.chargers = [
            SlowCharger(reactor, self.rng, self.gateways[n % gateways], unique_name("CH"),
                        "ocpp1.6" if n % 2 == 0 else "ocpp2.0.1")
            for n in range(chargers)
        ]
        self.rate = commands_per_second
        self.results = Results()
        self.backend: Optional[FakeBackEnd] = None
        self._sequence = 0
        self._streaming = False
        self._probing = False
        #: the command stream, until it ends (see stop)
        self._sending: defer.Deferred = defer.succeed(None)

    # -- set-up and tear-down ----------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        yield defer.gatherResults([gateway.start() for gateway in self.gateways])
        self.backend = yield FakeBackEnd.start(
            self._reactor, self.cluster.url(self.backend_node), self.exchange)
        self.backend.handle("Heartbeat", lambda m, p: _TIME)
        self._collect_answers()
        yield defer.gatherResults([charger.connect() for charger in self.chargers])

    @defer.inlineCallbacks
    def stop(self):
        self._streaming = self._probing = False
        beats = [charger.stop() for charger in self.chargers]
        for charger in self.chargers:
            if charger.charger is not None and not charger.closed:
                charger.charger.drop()
        yield defer.gatherResults(beats + [self._sending], consumeErrors=True)
        yield defer.gatherResults([gateway.stop() for gateway in self.gateways],
                                  consumeErrors=True)
        if self.backend is not None:
            yield self.backend.stop()
        yield self._delete()

    @defer.inlineCallbacks
    def _delete(self):
        try:
            admin = yield BackEndClient.connect(
                self._reactor, self.cluster.url(self.backend_node), self.exchange)
        except Exception:
            return
        try:
            for charger in self.chargers:
                yield admin.delete_queue("ocpp." + charger.identity)
            yield admin.delete_exchange(self.exchange)
        finally:
            yield admin.close()

    # -- the command stream ------------------------------------------------------

    def start_commands(self) -> None:
        self._streaming = True
        self._sending = self._send_loop()

    def stop_commands(self) -> None:
        self._streaming = False

    @defer.inlineCallbacks
    def _send_loop(self):
        interval = 1.0 / self.rate
        while self._streaming:
            charger = self.rng.choice(self.chargers)
            self._send(charger)
            yield task.deferLater(self._reactor, interval, lambda: None)

    def _send(self, charger: SlowCharger) -> None:
        self._sequence += 1
        message_id = f"cmd-{self._sequence}"
        action, payload = _COMMAND[charger.subprotocol]
        d = self.backend.send_to_charger(charger.identity, [2, message_id, action, payload])

        def confirmed(_):
            self.results.confirmed(message_id, charger.identity)

        # a refused publish was never sent: the back end would retry it
        d.addCallbacks(confirmed, lambda _failure: None)

    def _collect_answers(self) -> None:
        backend = self.backend

        def take(message):
            if message.routing_key.endswith(".Reset.conf"):
                self.results.answer(message.correlation_id)
            backend.next_message().addCallback(take)

        backend.next_message().addCallback(take)

    def drain(self, timeout: float = 120.0) -> defer.Deferred:
        """
        Fires once every command sent was answered, or after C{timeout}
        (the check then names what was lost).
        """
        return self.results.all_answered().addTimeout(
            timeout, self._reactor, onTimeoutCancel=lambda _r, _t: None)

    # -- faults --------------------------------------------------------------------

    def _probe_loop(self):
        """New chargers keep arriving at every gateway while a node is down."""
        statuses = self.results.probe_statuses

        def one(gateway):
            try:
                sock = rawws.handshake("127.0.0.1", gateway.port,
                                       f"/ocpp/{unique_name('probe')}", timeout=10)
            except rawws.Refused as refused:
                return refused.status
            except OSError:
                return 0
            sock.close()
            return 101

        @defer.inlineCallbacks
        def loop():
            while self._probing:
                for gateway in self.gateways:
                    status = yield threads.deferToThread(one, gateway)
                    statuses[status] = statuses.get(status, 0) + 1
                yield task.deferLater(self._reactor, 0.25, lambda: None)

        return loop()

    @defer.inlineCallbacks
    def _readyz_loop(self):
        while self._probing:
            for gateway in self.gateways:
                status = yield gateway.readyz()
                self.results.readyz.setdefault(gateway.name, []).append(
                    (self._reactor.seconds(), status))
            yield task.deferLater(self._reactor, 0.25, lambda: None)

    @defer.inlineCallbacks
    def kill_and_restart(self, node: int, recovery_limit: float = 30.0):
        """
        Kill C{node} hard, wait until every charger is served again (at
        most C{recovery_limit}), then start the node again.
        """
        self._probing = True
        probing = defer.gatherResults([self._probe_loop(), self._readyz_loop()])
        killed_at = self._reactor.seconds()
        yield threads.deferToThread(self.cluster.kill, node)
        # a little past the limit, so that a late one is measured, not lost
        yield defer.DeferredList([
            charger.when_served_after(killed_at).addTimeout(
                recovery_limit + 5, self._reactor, onTimeoutCancel=lambda _r, _t: None)
            for charger in self.chargers
        ])
        for charger in self.chargers:
            seconds = charger.served_after(killed_at)
            if seconds is None:
                self.results.unrecovered.append(charger.identity)
            else:
                self.results.recoveries.append((f"node {node}", seconds))
        self._probing = False
        yield probing
        yield threads.deferToThread(self.cluster.start_node, node)

    def check_chargers(self) -> None:
        """Record chargers that got a command twice, or were closed."""
        for charger in self.chargers:
            if charger.charger is None:
                continue
            ids = charger.charger.received_call_ids
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:
                self.results.duplicates[charger.identity] = twice
            if charger.closed:
                self.results.closed.append(charger.identity)

    def readiness_went(self, gateway: GatewayProcess, since: float) -> list:
        """The distinct /readyz statuses of C{gateway} since C{since}, in order."""
        seen = []
        for moment, status in self.results.readyz.get(gateway.name, []):
            if moment >= since and (not seen or seen[-1] != status):
                seen.append(status)
        return seen


def dump(results: Results) -> bytes:
    return orjson.dumps({
        "sent": len(results.sent), "answered": len(results.answered),
        "lost": results.lost[:20], "duplicates": results.duplicates,
        "recoveries_max": results.max_recovery, "unrecovered": results.unrecovered,
        "closed": results.closed, "probe": results.probe_statuses,
    })
