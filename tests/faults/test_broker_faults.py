"""
The gateway against a broker that goes away, fails over, or blocks
publishers: a throw-away RabbitMQ node of our own (see L{ThrowAwayBroker}).
"""

from __future__ import annotations


from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from ocppgw.amqp import BackEndClient
from ocppgw.testing import FakeBackEnd, FakeCharger, amqp_url, unique_name
from tests.faults import rawws
from tests.faults.broker import rabbitmq_available, shared_fault_broker
from tests.support import deep_merge, start_gateway


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def when(observe, predicate) -> defer.Deferred:
    """
    Fires the first time C{predicate(*args)} holds for an observer call.
    """
    d: defer.Deferred = defer.Deferred()

    def observer(*args):
        if not d.called and predicate(*args):
            d.callback(args)

    observe(observer)
    return d


class OwnBrokerTests(unittest.TestCase):
    """
    One throw-away node for the class; every test leaves it running and
    without alarms.
    """

    timeout = 90

    def setUp(self):
        if not rabbitmq_available():
            raise unittest.SkipTest("RabbitMQ is not installed here")
        # blocking, once per run: the node boots in ~10 s
        self.broker = shared_fault_broker()

    @defer.inlineCallbacks
    def start_gateway(self, url=None, **sections):
        self.exchange = unique_name("fault")
        values = deep_merge(
            {
                "listener": {"tcp.ip": "127.0.0.1", "tcp.port": "0", "drain_window": "0"},
                "amqp": {
                    "url": url or self.broker.url,
                    "exchange": self.exchange,
                    "node": unique_name("node"),
                    "reconnect_max_delay": "1",
                    "heartbeat": "5",
                },
                "queue": {"x-expires": "600000"},
                "admin": {"tcp.port": "0"},
            },
            sections,
        )
        service = yield start_gateway(self, values)
        self.service = service
        self.port = service.listening_port.getHost().port
        return service

    def url(self, identity):
        return f"ws://127.0.0.1:{self.port}/ocpp/{identity}"

    @defer.inlineCallbacks
    def backend(self, url=None, bindings=("#",)):
        backend = yield FakeBackEnd.start(reactor, url or self.broker.url, self.exchange,
                                          bindings=bindings)
        self.addCleanup(backend.stop)
        return backend

    @defer.inlineCallbacks
    def charger(self, identity):
        charger = yield FakeCharger.connect(reactor, self.url(identity))
        self.addCleanup(lambda: charger.closed.called or charger.drop())
        return charger

    def reconnected(self):
        return when(self.service.bridge.add_observer, lambda connected, why: connected)

    def disconnected(self):
        return when(self.service.bridge.add_observer, lambda connected, why: not connected)

    def restart_on_cleanup(self):
        def restart():
            if not self.broker.amqp_answers():
                return self.broker.start_app()
        self.addCleanup(restart)

    @defer.inlineCallbacks
    def test_broker_stopped_and_started(self):
        """
        While the broker is down: a new charger gets 503 with a Retry-After,
        a connected one is kept and its CALL is answered InternalError.
        Once it is back: the kept charger's consumer is restored (a command
        reaches it) and new chargers are accepted.
        """
        yield self.start_gateway(amqp={"outage_grace": "60"})
        backend = yield self.backend()
        backend.handle("Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"})
        kept_id = unique_name("CP")
        kept = yield self.charger(kept_id)
        self.assertEqual((yield kept.call("Heartbeat", {}))[0], 3)

        down = self.disconnected()
        self.restart_on_cleanup()
        yield self.broker.stop_app()
        yield down
        refused = yield threads.deferToThread(
            self.assertRaises, rawws.Refused,
            rawws.handshake, "127.0.0.1", self.port, f"/ocpp/{unique_name('CP')}",
        )
        self.assertEqual(refused.status, 503)
        self.assertTrue(1 <= int(refused.headers["retry-after"]) <= 10)
        answer = yield kept.call("Heartbeat", {})
        self.assertEqual((answer[0], answer[2]), (4, "InternalError"))
        self.assertFalse(kept.closed.called)

        up = self.reconnected()
        yield self.broker.start_app()
        yield up
        # the back end reconnects too (its connection died with the node)
        backend = yield self.backend()
        backend.handle("Heartbeat", lambda m, p: {"currentTime": "2026-01-01T00:00:00Z"})
        yield backend.send_to_charger(kept_id, [2, "after", "Reset", {"type": "Soft"}])
        command = yield kept.next_call()
        self.assertEqual(command[1], "after")
        self.assertEqual((yield kept.call("Heartbeat", {}))[0], 3)
        fresh = yield self.charger(unique_name("CP"))
        self.assertEqual((yield fresh.call("Heartbeat", {}))[0], 3)

    @defer.inlineCallbacks
    def test_failover_to_next_url(self):
        """
        With the node of C{url} down, the bridge connects to the next URL,
        declares the topology there and restores the kept charger's
        consumer on it.
        """
        yield self.start_gateway(amqp={"failover_urls": amqp_url(), "outage_grace": "60"})
        self.addCleanup(self._delete_on_shared, self.exchange)
        identity = unique_name("CP")
        self._identity = identity
        charger = yield self.charger(identity)
        up = when(self.service.bridge.add_observer,
                  lambda connected, why: connected)
        self.restart_on_cleanup()
        yield self.broker.stop_app()
        yield up
        self.assertEqual(self.service.bridge.url, amqp_url())
        # the link opens before the kept charger's queue is declared on the
        # new node: a command published in between would be unroutable
        yield self.service.gateway.consumers_restored()
        shared = yield self.backend(url=amqp_url())
        # the charger's queue exists on the shared broker now: a command
        # published there reaches the charger, which stayed connected
        # (mandatory: were it unroutable, the publish fails instead of the
        # test waiting for a command that was dropped)
        yield shared.send_to_charger(identity, [2, "moved", "Reset", {"type": "Soft"}],
                                     mandatory=True)
        command = yield charger.next_call()
        self.assertEqual(command[1], "moved")
        self.assertFalse(charger.closed.called)

    @defer.inlineCallbacks
    def _delete_on_shared(self, exchange):
        admin = yield BackEndClient.connect(reactor, amqp_url(), exchange)
        try:
            identity = getattr(self, "_identity", None)
            if identity:
                yield admin.delete_queue("ocpp." + identity)
            yield admin.delete_exchange(exchange)
        finally:
            yield admin.close()

    @defer.inlineCallbacks
    def test_memory_alarm_while_charger_floods(self):
        """
        A memory alarm blocks publishing while a charger floods: the
        gateway stops reading from chargers (the flooder's socket blocks),
        its RSS stays bounded, and once the alarm clears everything the
        charger sent is published.
        """
        yield self.start_gateway()
        backend = yield self.backend(bindings=("ocpp16.DataTransfer.req",))
        identity = unique_name("CP")
        sock = yield threads.deferToThread(
            rawws.handshake, "127.0.0.1", self.port, f"/ocpp/{identity}"
        )
        self.addCleanup(sock.close)
        filler = "x" * 2000
        total = 10000  # ~20 MB of frames
        frames = [
            rawws.text_frame(
                f'[2,"f{i}","DataTransfer",{{"vendorId":"v","data":"{filler}"}}]'.encode()
            )
            for i in range(total)
        ]
        sent = [0]
        # drop the frames' memory from the baseline comparison
        baseline = rss_bytes()

        def flood():
            sock.settimeout(120)
            for frame in frames:
                sock.sendall(frame)
                sent[0] += 1

        paused = when(self.service.bridge.add_flow_observer, lambda paused: paused)
        self.addCleanup(self.broker.set_memory_watermark, 0.4)
        yield self.broker.set_memory_watermark(0.00001)
        flooding = threads.deferToThread(flood)
        yield paused
        self.assertTrue(self.service.gateway.reading_paused)
        # wait until the flooder is held by TCP backpressure: no progress
        # over a whole second
        last = -1
        while sent[0] != last:
            last = sent[0]
            yield task.deferLater(reactor, 1.0, lambda: None)
        self.assertLess(sent[0], total)
        growth = rss_bytes() - baseline
        self.assertLess(growth, 15 * 1024 * 1024, f"RSS grew by {growth} bytes")

        resumed = when(self.service.bridge.add_flow_observer, lambda paused: not paused)
        yield self.broker.set_memory_watermark(0.4)
        yield resumed
        yield flooding
        self.assertEqual(sent[0], total)
        seen = set()
        while len(seen) < total:
            message = yield backend.next_message("ocpp16.DataTransfer.req")
            seen.add(message.correlation_id)
        self.assertEqual(len(seen), total)
