"""
Several gateway processes on one broker, and chargers that misbehave.
"""

from __future__ import annotations

import time

import orjson
import pika
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from ocppgw import topology
from ocppgw.amqp import BackEndClient
from ocppgw.testing import FakeBackEnd, FakeCharger, amqp_url, unique_name
from tests.support import deep_merge, start_gateway


class GatewaysTestCase(unittest.TestCase):
    """
    Gateways with their own node names on the shared broker, one exchange.
    """

    timeout = 60

    def setUp(self):
        self.exchange = unique_name("gateways")
        self.identities = []
        self.addCleanup(self._delete)

    @defer.inlineCallbacks
    def gateway(self, **sections):
        values = deep_merge(
            {
                "listener": {"tcp.ip": "127.0.0.1", "tcp.port": "0", "drain_window": "0"},
                "amqp": {"url": amqp_url(), "exchange": self.exchange,
                         "node": unique_name("node")},
                "queue": {"x-expires": "600000"},
                "admin": {"tcp.port": "0"},
            },
            sections,
        )
        service = yield start_gateway(self, values)
        return service

    def identity(self):
        identity = unique_name("CP")
        self.identities.append(identity)
        return identity

    @staticmethod
    def url(service, identity):
        return f"ws://127.0.0.1:{service.listening_port.getHost().port}/ocpp/{identity}"

    @defer.inlineCallbacks
    def charger(self, service, identity):
        charger = yield FakeCharger.connect(reactor, self.url(service, identity))
        self.addCleanup(lambda: charger.closed.called or charger.drop())
        return charger

    @defer.inlineCallbacks
    def backend(self):
        backend = yield FakeBackEnd.start(reactor, amqp_url(), self.exchange)
        self.addCleanup(backend.stop)
        return backend

    @defer.inlineCallbacks
    def watch_control(self):
        """
        A queue of our own on the gateways' control exchange: what they
        tell each other, as L{ocppgw.amqp.client.Message}s.
        """
        client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        self.addCleanup(client.close)
        queue = yield client.declare_queue(unique_name("watch"), exclusive=True)
        yield client._channel.queue_bind(queue, topology.control_exchange(self.exchange))
        messages = yield client.consume(queue)
        self.control_client = client
        return messages

    @defer.inlineCallbacks
    def next_control(self, messages, kind=None):
        """The next control message (of type C{kind}, if given), decoded."""
        while True:
            message = yield messages.get()
            decoded = orjson.loads(message.body)
            if kind is None or decoded.get("type") == kind:
                return decoded, message

    def tell_gateways(self, body: bytes, headers: dict) -> defer.Deferred:
        """Publish a control message, as a gateway process would."""
        return self.control_client._channel.basic_publish(
            topology.control_exchange(self.exchange), "", body,
            pika.BasicProperties(headers=headers))

    @defer.inlineCallbacks
    def _delete(self):
        admin = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        try:
            for identity in self.identities:
                yield admin.delete_queue("ocpp." + identity)
            yield admin.delete_exchange(self.exchange)
        finally:
            yield admin.close()


class CrossProcessTakeoverTests(GatewaysTestCase):
    @defer.inlineCallbacks
    def test_charger_moves_to_another_gateway(self):
        """
        A charger reconnects to gateway B while its old connection still
        looks alive on gateway A: A closes the old connection (1000) within
        being told by B (not after a timeout of its own), the command the old connection had been sent is
        requeued and delivered to the new one, and a command sent while the
        charger moves reaches only the new connection, once.
        """
        queue = {"x-single-active-consumer": "true"}
        a = yield self.gateway(queue=queue)
        b = yield self.gateway(queue=queue)
        backend = yield self.backend()
        identity = self.identity()
        old = yield self.charger(a, identity)
        yield backend.send_to_charger(identity, [2, "c1", "Reset", {"type": "Soft"}])
        command = yield old.next_call()
        self.assertEqual(command[1], "c1")
        # the old connection never answers (its network is gone)
        new = yield self.charger(b, identity)
        yield backend.send_to_charger(identity, [2, "c2", "Reset", {"type": "Hard"}])
        closed = yield old.closed
        # the takeover's own close, sent when B's takeover message reached A
        self.assertEqual(closed, (1000, "Replaced by a new connection"))
        self.assertNotIn(identity, a.gateway.chargers)
        # c1 is requeued by A after its consumer is cancelled, c2 may
        # already be on its way to B: the order across a move is not kept
        for _ in range(2):
            command = yield new.next_call()
            new.answer(command, {"status": "Accepted"})
        answers = []
        for _ in range(2):
            message = yield backend.next_message("ocpp16.Reset.conf")
            answers.append(message.correlation_id)
        self.assertEqual(sorted(answers), ["c1", "c2"])
        self.assertEqual(old.received_call_ids, ["c1"])
        self.assertEqual(sorted(new.received_call_ids), ["c1", "c2"])
        # the replaced connection announced no offline status
        self.assertEqual(
            [m for m in backend.received if m.routing_key == "ocppgw.disconnected"], []
        )


    @defer.inlineCallbacks
    def test_late_takeover_leaves_the_newest_connection(self):
        """
        A charger connects to gateway A, then to gateway B, and A's takeover
        reaches B only after that (here: A's very message, published again
        once the charger is on B). B keeps the newest connection, and the
        charger's commands reach it.
        """
        a = yield self.gateway()
        b = yield self.gateway()
        yield a.gateway.bridge.peers.wait_for(b.gateway.bridge.node)
        yield b.gateway.bridge.peers.wait_for(a.gateway.bridge.node)
        messages = yield self.watch_control()
        backend = yield self.backend()
        identity = self.identity()
        first = yield self.charger(a, identity)
        takeover, sent_by_a = yield self.next_control(messages, "takeover")
        self.assertEqual((takeover["identity"], takeover["node"]),
                         (identity, a.gateway.bridge.node))
        newest = yield self.charger(b, identity)
        closed = yield first.closed
        self.assertEqual(closed, (1000, "Replaced by a new connection"))
        link = b.gateway.chargers[identity]
        # A's takeover arrives at B late; then one B must act on, for a
        # charger of its own: once that one is closed, B has read both
        marker = self.identity()
        marked = yield self.charger(b, marker)
        yield self.tell_gateways(sent_by_a.body, sent_by_a.headers)
        yield self.tell_gateways(
            orjson.dumps({"type": "takeover", "identity": marker, "node": "elsewhere",
                          "claimed": time.time() + 1}),
            {topology.HEADER_NODE: "elsewhere"})
        yield marked.closed
        self.assertIs(b.gateway.chargers.get(identity), link)
        yield backend.send_to_charger(identity, [2, "c1", "Reset", {"type": "Soft"}])
        command = yield newest.next_call()
        self.assertEqual(command[1], "c1")


class RateLimitTests(GatewaysTestCase):
    @defer.inlineCallbacks
    def test_flooding_charger_limited_neighbour_served(self):
        """
        A charger flooding 10,000 frames/s gets CALLERRORs over its rate
        and is then closed (1008) after 15,000 frames over it (about 1.5 s);
        its neighbour's heartbeats are answered all along meanwhile (how fast
        is measured by the benchmarks, not here).
        """
        service = yield self.gateway(
            websocket={"max_message_rate": "20", "message_burst": "20",
                       "max_rate_violations": "15000"},
        )
        backend = yield self.backend()
        backend.handle("Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"})
        flooder = yield self.charger(service, self.identity())
        neighbour = yield self.charger(service, self.identity())
        latencies = []
        refused = []

        def flood_tick(state=[0]):
            # 10,000 frames/s: 100 frames every 10 ms
            for _ in range(100):
                # stop once the gateway starts closing, not only once closed
                if flooder.protocol.state != flooder.protocol.STATE_OPEN:
                    return
                state[0] += 1
                flooder.send([2, f"f{state[0]}", "Heartbeat", {}])

        loop = task.LoopingCall(flood_tick)
        loop.clock = reactor
        if not flooder.closed.called:
            loop.start(0.01)
        stop_at = time.monotonic() + 5.0
        while time.monotonic() < stop_at and not flooder.closed.called:
            started = time.monotonic()
            answer = yield neighbour.call("Heartbeat", {})
            latencies.append(time.monotonic() - started)
            self.assertEqual(answer[0], 3)
            yield task.deferLater(reactor, 0.1, lambda: None)
        code, _ = yield flooder.closed
        if loop.running:
            loop.stop()
        self.assertEqual(code, 1008)
        while flooder.other.pending:
            frame = flooder.other.pending.pop(0)
            if frame[0] == 4:
                refused.append(frame)
        self.assertTrue(refused)
        self.assertEqual(refused[0][2], "GenericError")
        # answered while the flood went on, not only after it: the flood
        # lasts 15,000 frames over the rate at 10,000 frames/s, at least
        # 1.5 s, and a heartbeat is sent every 0.1 s after the last answer
        self.assertGreaterEqual(len(latencies), 5, latencies)
        print(f"\nneighbour heartbeat during the flood: max {max(latencies) * 1000:.0f} ms"
              f" over {len(latencies)}")
        # the neighbour is still served after the flooder is gone
        answer = yield neighbour.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)


class BrokerConnectionKilledTests(GatewaysTestCase):
    @defer.inlineCallbacks
    def test_commands_in_flight_survive_a_killed_connection(self):
        """
        The broker closes the gateway's connection while 20 chargers each
        have one command sent and one held, and are sending CALLs: the
        chargers stay, every command reaches its charger exactly once and
        every answer reaches the back end; each charger CALL is either
        answered by the back end or refused with InternalError (retryable),
        never dropped.
        """
        from tests.support import close_broker_connections

        service = yield self.gateway(amqp={"outage_grace": "30"})
        backend = yield self.backend()
        backend.handle("Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"})
        chargers = {}
        for _ in range(20):
            identity = self.identity()
            chargers[identity] = yield self.charger(service, identity)
        for identity in chargers:
            for n in (1, 2):
                yield backend.send_to_charger(
                    identity, [2, f"{identity}-c{n}", "Reset", {"type": "Soft"}]
                )
        firsts = {}
        for identity, charger in chargers.items():
            firsts[identity] = yield charger.next_call()
        reconnected: defer.Deferred = defer.Deferred()
        service.bridge.add_observer(
            lambda up, why: up and not reconnected.called and reconnected.callback(None)
        )
        in_flight = [charger.call("Heartbeat", {}) for charger in chargers.values()]
        closed = yield close_broker_connections(f"ocppgw {service.node}")
        self.assertEqual(closed, 1)
        in_flight += [charger.call("Heartbeat", {}) for charger in chargers.values()]
        outcomes = yield defer.gatherResults(in_flight)
        for answer in outcomes:
            self.assertTrue(answer[0] == 3 or answer[2] == "InternalError", answer)
        yield reconnected
        for identity, charger in chargers.items():
            charger.answer(firsts[identity], {"status": "Accepted"})
        for identity, charger in chargers.items():
            second = yield charger.next_call()
            self.assertEqual(second[1], f"{identity}-c2")
            charger.answer(second, {"status": "Accepted"})
        answers = []
        while len(answers) < 40:
            message = yield backend.next_message("ocpp16.Reset.conf")
            answers.append(message.correlation_id)
        self.assertEqual(
            sorted(answers), sorted(f"{i}-c{n}" for i in chargers for n in (1, 2))
        )
        for identity, charger in chargers.items():
            self.assertFalse(charger.closed.called)
            self.assertEqual(charger.received_call_ids, [f"{identity}-c1", f"{identity}-c2"])
        # after the reconnect the chargers' CALLs reach the back end again
        answer = yield next(iter(chargers.values())).call("Heartbeat", {})
        self.assertEqual(answer[0], 3)


class QuorumTakeoverTests(CrossProcessTakeoverTests):
    """
    The same move with quorum charger queues (C{[queue] x-queue-type}).
    """

    @defer.inlineCallbacks
    def gateway(self, **sections):
        sections.setdefault("queue", {})["x-queue-type"] = "quorum"
        service = yield super().gateway(**sections)
        return service


class SlowChargerTests(GatewaysTestCase):
    @defer.inlineCallbacks
    def test_commands_for_a_charger_that_does_not_answer_stay_in_the_broker(self):
        """
        A charger that never answers has one command sent and at most
        prefetch_count - 1 held by the gateway; the rest wait in its queue.
        """
        service = yield self.gateway(amqp={"prefetch_count": "5"})
        backend = yield self.backend()
        identity = self.identity()
        charger = yield self.charger(service, identity)
        for n in range(50):
            yield backend.send_to_charger(identity, [2, f"c{n}", "Reset", {"type": "Soft"}])
        first = yield charger.next_call()
        self.assertEqual(first[1], "c0")
        session = service.gateway.chargers[identity].session
        while session.held_calls < 4:
            yield task.deferLater(reactor, 0.05, lambda: None)
        frame = yield backend.client._channel.queue_declare("ocpp." + identity, passive=True)
        self.assertEqual(frame.method.message_count, 45)
        self.assertEqual(session.held_calls, 4)
        self.assertEqual(charger.received_call_ids, ["c0"])


class FailoverStartTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_start_tries_the_next_url(self):
        """
        At start a node that does not answer is skipped for the next URL;
        when none answers the start fails naming each one (password masked).
        """
        from ocppgw.amqp import AmqpBridge, BrokerUnavailable
        from tests.support import free_port

        dead = f"amqp://guest:secret@127.0.0.1:{free_port()}/%2F"
        exchange = unique_name("failover")
        bridge = AmqpBridge(reactor, dead, exchange, unique_name("node"),
                            failover_urls=(amqp_url(),), connect_timeout=2)
        yield bridge.start()
        try:
            self.assertTrue(bridge.connected)
        finally:
            yield bridge.stop()
            admin = yield BackEndClient.connect(reactor, amqp_url(), exchange)
            yield admin.delete_exchange(exchange)
            yield admin.close()
        other_dead = f"amqp://guest:secret@127.0.0.1:{free_port()}/%2F"
        bridge = AmqpBridge(reactor, dead, exchange, unique_name("node"),
                            failover_urls=(other_dead,), connect_timeout=2)
        error = yield self.assertFailure(bridge.start(), BrokerUnavailable)
        self.assertIn(dead.replace("secret", "****"), str(error))
        self.assertIn(other_dead.replace("secret", "****"), str(error))
        self.assertNotIn("secret", str(error))
