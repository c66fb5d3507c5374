"""
The accept gate: a process stops accepting while too many connections are
in their opening handshake, and takes the waiting ones once some are done.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.acceptgate import AcceptGate
from tests import rawclient, test_security
from tests.support import GatewayTestCase, SecurityTestCase, http, samples


class FakeFactory(protocol.Factory):
    """The listener's own factory: records what it builds."""

    def __init__(self) -> None:
        self.built = []

    def buildProtocol(self, addr):
        made = protocol.Protocol()
        self.built.append((addr, made))
        return made


class AcceptGateTests(SynchronousTestCase):
    """The gate over in-memory transports (no reactor)."""

    def setUp(self):
        self.clock = Clock()
        self.gate = AcceptGate(2, self.clock)
        self.listener = FakeFactory()
        self.factory = self.gate.wrap(self.listener)

    def accept(self, n):
        transport = StringTransport()
        made = self.factory.buildProtocol(("10.0.0.1", n))
        made.makeConnection(transport)
        if made in [p for _, p in self.listener.built]:
            # as a charger connection's protocol does
            self.gate.connection_made()
        return made, transport

    def test_beyond_the_limit_connections_wait_unread(self):
        self.accept(1)
        self.accept(2)
        waiting, transport = self.accept(3)
        self.assertEqual(len(self.listener.built), 2)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual((self.gate.opening, self.gate.waiting, self.gate.waited), (2, 1, 1))

    def test_one_over_lets_the_longest_waiting_in(self):
        self.accept(1)
        self.accept(2)
        _, third = self.accept(3)
        _, fourth = self.accept(4)
        self.gate.handshake_over()
        [_, _, (addr, made)] = self.listener.built
        self.assertEqual(addr, ("10.0.0.1", 3))
        self.assertIs(made.transport, third)
        self.assertIs(third.protocol, made)
        self.assertEqual(third.producerState, "producing")
        self.assertEqual(fourth.producerState, "paused")
        self.assertEqual(self.gate.waiting, 1)

    def test_no_room_while_others_wait(self):
        """A newcomer does not overtake the waiting ones."""
        self.accept(1)
        self.accept(2)
        self.accept(3)
        self.gate.opening -= 1  # (a count that dropped without letting anyone in)
        self.accept(4)
        self.assertEqual((len(self.listener.built), self.gate.waiting), (2, 2))

    def test_listener_refusing_the_connection_closes_it(self):
        self.accept(1)
        self.accept(2)
        _, transport = self.accept(3)
        self.listener.buildProtocol = lambda addr: None
        self.gate.handshake_over()
        self.assertTrue(transport.disconnecting)

    def test_listener_failing_to_build_aborts_the_connection(self):
        """The next one waiting is not stuck behind it, nor left unread."""
        self.accept(1)
        self.accept(2)
        _, third = self.accept(3)

        def broken(addr):
            raise RuntimeError("no protocol")

        self.listener.buildProtocol = broken
        self.gate.handshake_over()
        self.assertTrue(third.disconnecting)
        [failure] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(failure.value), "no protocol")

    def test_waiting_connections_closed_when_stopping(self):
        self.accept(1)
        self.accept(2)
        _, third = self.accept(3)
        self.gate.close_waiting()
        self.assertTrue(third.disconnecting)
        self.assertEqual(self.gate.waiting, 0)
        self.gate.handshake_over()
        self.assertEqual(len(self.listener.built), 2)

    def test_waiting_logged_when_it_begins_at_most_once_a_minute(self):
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.accept(1)
        self.accept(2)
        self.accept(3)
        self.accept(4)
        self.gate.close_waiting()
        self.clock.advance(59)
        self.accept(5)
        self.gate.close_waiting()
        self.clock.advance(1)
        self.accept(6)
        waits = [e for e in logged if e.get("event") == "accept_waiting"]
        self.assertEqual([e["waited"] for e in waits], [0, 3])

    def test_connection_lost_while_waiting_leaves_the_queue(self):
        self.accept(1)
        self.accept(2)
        waiting, _ = self.accept(3)
        waiting.connectionLost(None)
        self.assertEqual(self.gate.waiting, 0)


class _Silent(protocol.Protocol):
    """
    A TCP client that sends C{first} (nothing by default) and then says
    nothing: a charger that has not sent its request yet.
    """

    def __init__(self, first: bytes = b"") -> None:
        self.first = first
        self.lost = defer.Deferred()

    def connectionMade(self):
        if self.first:
            self.transport.write(self.first)

    def connectionLost(self, reason=None):
        self.lost.callback(None)


class GateWatching:
    """
    Mixin for a test case of a running gateway (C{gateway_service}) with a
    gate: L{until} waits for the gate's counts to reach a state.
    """

    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: self.watch_gate())
        return d

    def watch_gate(self):
        """Wake L{until}'s waiters whenever the gate's counts move."""
        self.gate = gate = self.gateway_service.accept_gate()
        self._waiters = []
        for name in ("connection_made", "handshake_over", "wait"):
            moved = getattr(gate, name)

            def watched(*args, moved=moved):
                moved(*args)
                for predicate, d in list(self._waiters):
                    if predicate():
                        self._waiters.remove((predicate, d))
                        d.callback(None)

            setattr(gate, name, watched)

    def until(self, predicate) -> defer.Deferred:
        if predicate():
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((predicate, d))
        return d

    @defer.inlineCallbacks
    def silent(self, port: int, first: bytes = b""):
        client = _Silent(first)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.lost.called or self.drop(client))
        return client

    @staticmethod
    def drop(client):
        client.transport.abortConnection()
        return client.lost


class GatedGatewayTests(GateWatching, GatewayTestCase):
    """A gateway with C{[listener] max_opening = 2}, over real sockets."""

    settings = {"listener": {"max_opening": "2"}}

    @defer.inlineCallbacks
    def test_waiting_connection_taken_once_one_is_done(self):
        first = yield self.silent(self.port)
        yield self.silent(self.port)
        yield self.until(lambda: self.gate.opening == 2)
        # accepted at once, but it waits
        yield self.silent(self.port)
        yield self.until(lambda: self.gate.waiting == 1)
        self.assertEqual(self.gate.opening, 2)
        let_in = self.until(lambda: self.gate.waiting == 0)
        yield self.drop(first)
        yield let_in
        # the waiting one took the place of the one that went
        self.assertEqual(self.gate.opening, 2)

    @defer.inlineCallbacks
    def test_charger_opens_once_its_turn_comes(self):
        first = yield self.silent(self.port)
        yield self.silent(self.port)
        yield self.until(lambda: self.gate.opening == 2)
        self.backend.handle("Heartbeat", lambda _m, _p: {"currentTime": "2026-01-01T00:00:00Z"})
        identity = self.identity()
        connecting = self.connect(identity)
        yield self.until(lambda: self.gate.waiting == 1)
        yield self.drop(first)
        charger = yield connecting
        answer = yield charger.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)
        self.assertIn(identity, self.gateway_service.gateway.chargers)
        # open connections are not counted
        self.assertEqual(self.gate.opening, 1)

    @defer.inlineCallbacks
    def test_waiting_connections_closed_at_stop(self):
        yield self.silent(self.port)
        yield self.silent(self.port)
        waiting = yield self.silent(self.port)
        yield self.until(lambda: self.gate.waiting == 1)
        yield self.gateway_service.stopService()
        yield waiting.lost
        self.assertEqual(self.gate.waiting, 0)

    @defer.inlineCallbacks
    def test_metrics(self):
        yield self.silent(self.port)
        yield self.silent(self.port)
        yield self.silent(self.port)
        yield self.until(lambda: self.gate.waiting == 1)
        status, _headers, body = yield http(
            self.gateway_service.admin_port.getHost().port, "/metrics")
        self.assertEqual(status, 200)
        scraped = samples(body)
        self.assertEqual(
            [scraped.get((name, ())) for name in (
                "ocppgw_connections_opening", "ocppgw_connections_waiting",
                "ocppgw_connections_waited_total")],
            [2, 1, 1])


class GatedProxyTlsTests(GateWatching, SecurityTestCase):
    """
    The whole listener stack is built for a connection let in: the PROXY
    header, TLS and the WebSocket handshake all come after its wait.
    """

    def security_settings(self):
        settings = test_security.ProxyProtocolTlsTests.security_settings(self)
        settings["listener"]["max_opening"] = "1"
        return settings

    @defer.inlineCallbacks
    def test_proxied_tls_charger_waits_then_opens(self):
        port = self.port_of("ssl")
        # its PROXY header read, its TLS handshake not begun: it holds the one place
        first = yield self.silent(port, rawclient.proxy_v2("198.51.100.7", 40000))
        yield self.until(lambda: self.gate.opening == 1)
        handshake = rawclient.handshake(
            port, self.path(self.charger_id),
            proxy=rawclient.proxy_v2("198.51.100.9", 50000),
            context=rawclient.client_context(self.pki.cafile),
            headers=rawclient.basic(self.charger_id, "pw-pw-pw"), keep_open=True,
        )
        yield self.until(lambda: self.gate.waiting == 1)
        yield self.drop(first)
        response = yield handshake
        self.addCleanup(response.close)
        self.assertEqual(response.status, 101)
        link = self.gateway_service.gateway.chargers[self.charger_id]
        self.assertEqual(link.edge.peer, "tcp4:198.51.100.9:50000")
        self.assertEqual((self.gate.opening, self.gate.waiting, self.gate.waited), (0, 0, 1))
