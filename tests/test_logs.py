"""
JSON log lines: their shape, the level filter, pika's stdlib logging
forwarded, the connect/disconnect lines of a real gateway, and
C{twistd ocppgw} writing JSON lines when the configuration says so.
"""

from __future__ import annotations

import io
import logging
import os
import signal

import orjson
from twisted.internet import defer, reactor
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.trial import unittest

from ocppgw import logs
from ocppgw.config import LogSettings
from ocppgw.testing import FakeCharger, amqp_url, unique_name
from ocppgw.amqp import BackEndClient
from tests.support import GatewayTestCase, LogEvents, free_port, start_gateway
from tests import test_service


def lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


class JsonObserverTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.stream = io.StringIO()
        self.log = Logger(
            namespace="ocppgw.test",
            observer=logs.observer(LogSettings(format="json", level="info"), self.stream),
        )

    def test_one_object_per_line_with_fields(self):
        self.log.info(
            "{identity} connected from {peer}",
            identity="CP 1", peer="tcp4:10.0.0.5:5000", version="ocpp1.6",
            listener="ws", event="connected", duration=1.5, replaced=False,
            thing=object(),
        )
        [record] = lines(self.stream)
        self.assertEqual(record["message"], "CP 1 connected from tcp4:10.0.0.5:5000")
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "ocppgw.test")
        self.assertTrue(record["time"].endswith("Z"))
        for key, expected in (
            ("identity", "CP 1"), ("peer", "tcp4:10.0.0.5:5000"), ("version", "ocpp1.6"),
            ("listener", "ws"), ("event", "connected"), ("duration", 1.5), ("replaced", False),
        ):
            self.assertEqual(record[key], expected, key)
        self.assertNotIn("thing", record)
        self.assertFalse([key for key in record if key.startswith("log_")])

    def test_level_filter(self):
        self.log.debug("hidden")
        self.log.warn("shown")
        self.assertEqual([r["message"] for r in lines(self.stream)], ["shown"])

    def test_failure_has_traceback(self):
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("it broke")
        [record] = lines(self.stream)
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIn("division by zero", record["error"])

    def test_newline_and_long_fields_stay_one_line(self):
        self.log.info("{reason}", reason="a\nb" + "x" * 5000)
        [record] = lines(self.stream)
        self.assertEqual(len(record["reason"]), logs.MAX_FIELD + 3)
        self.assertEqual(self.stream.getvalue().count("\n"), 1)


class StdlibBridgeTests(unittest.SynchronousTestCase):
    def test_pika_records_become_twisted_events(self):
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        logs.bridge_stdlib("info", names=("pika.test",))
        stdlib = logging.getLogger("pika.test")
        stdlib.info("chatty %s", 1)
        stdlib.warning("socket %s closed", "x")
        stdlib.error("bad")
        mine = [e for e in seen if e.get("log_namespace") == "pika.test"]
        self.assertEqual(
            [(e["log_level"], e["stdlib_message"]) for e in mine],
            [(LogLevel.warn, "socket x closed"), (LogLevel.error, "bad")],
        )
        # installing twice does not double the records
        logs.bridge_stdlib("debug", names=("pika.test",))
        del seen[:]
        stdlib.info("now shown")
        self.assertEqual(
            [e["stdlib_message"] for e in seen if e.get("log_namespace") == "pika.test"],
            ["now shown"],
        )


class GatewayJsonLogTests(GatewayTestCase):
    @defer.inlineCallbacks
    def test_connect_and_disconnect_lines(self):
        """
        A real charger's connect and disconnect are one JSON line each,
        with identity, peer, version, listener and event, and the
        disconnect with its code and duration.
        """
        stream = io.StringIO()
        observer = logs.observer(LogSettings(format="json", level="info"), stream)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        identity = self.identity()
        charger = yield self.connect(identity)
        yield charger.close()
        # the gateway logs the disconnect when it sees the close: wait for
        # its registry to drop the charger
        while identity in self.gateway_service.gateway.chargers:
            yield self.backend.client._channel.queue_declare(self.backend.queue, passive=True)
        records = [r for r in lines(stream) if r.get("identity") == identity]
        events = {r["event"]: r for r in records if "event" in r}
        connected, disconnected = events["connected"], events["disconnected"]
        for record in (connected, disconnected):
            self.assertEqual(record["version"], "ocpp1.6")
            self.assertEqual(record["listener"], "ws")
            self.assertTrue(record["peer"].startswith("tcp4:127.0.0.1:"))
            self.assertEqual(record["namespace"], "ocppgw.gateway")
        self.assertEqual(disconnected["code"], 1000)
        self.assertIsInstance(disconnected["duration"], float)
        self.assertEqual(disconnected["frames_in"], 0)


class TakeoverLogTests(GatewayTestCase):
    """
    What the logs say when a charger's newer connection replaces the old
    one: C{event = replacing} on the gateway that closes the old
    connection, and the old connection's C{disconnected} line with the
    close code it was sent (1000).
    """

    @defer.inlineCallbacks
    def check_replaced(self, log, identity, old):
        code, _ = yield old.closed
        self.assertEqual(code, 1000)
        gone = yield log.wait_for(event="disconnected", identity=identity)
        self.assertEqual((gone["code"], gone["why"]), (1000, "replaced"))
        self.assertEqual(gone["reason"], "Replaced by a new connection")
        [replacing] = log.matching(event="replacing", identity=identity)
        self.assertEqual(replacing["version"], "ocpp1.6")
        return replacing

    @defer.inlineCallbacks
    def test_same_gateway(self):
        log = LogEvents(self)
        identity = self.identity()
        old = yield self.connect(identity)
        yield self.connect(identity)
        yield self.check_replaced(log, identity, old)

    @defer.inlineCallbacks
    def test_other_gateway(self):
        """The charger moved to another gateway: this one closes it."""
        other = yield start_gateway(self, {
            "listener": {"tcp.ip": "127.0.0.1", "tcp.port": "0"},
            "admin": {"tcp.port": "0"},
            "amqp": {"url": amqp_url(), "exchange": self.exchange, "node": unique_name("node")},
            "queue": {"x-expires": "600000"},
        })
        log = LogEvents(self)
        identity = self.identity()
        old = yield self.connect(identity)
        peer = self.gateway_service.gateway.chargers[identity].peer
        port = other.listening_port.getHost().port
        new = yield FakeCharger.connect(reactor, f"ws://127.0.0.1:{port}/ocpp/{identity}")
        self.addCleanup(self._close_charger, new)
        replacing = yield self.check_replaced(log, identity, old)
        self.assertEqual(replacing["node"], other.node)
        self.assertEqual((replacing["peer"], replacing["listener"]), (peer, "ws"))


class TwistdJsonLogTests(unittest.TestCase):
    """C{twistd -n ocppgw} with C{[log] format = json}."""

    timeout = 60
    twistd = test_service.TwistdTests.twistd

    @defer.inlineCallbacks
    def test_json_lines_on_stdout(self):
        port = free_port()
        exchange = unique_name("twistd-json")
        child = self.twistd(
            f"[listener]\ntcp.port = {port}\n[admin]\ntcp.port = 0\n"
            f"[amqp]\nurl = {amqp_url()}\nexchange = {exchange}\n[log]\nformat = json\n",
            b"listening on ws://",
        )
        yield child.ready
        identity = unique_name("CP")
        charger = yield FakeCharger.connect(reactor, f"ws://127.0.0.1:{port}/ocpp/{identity}")
        os.kill(child.transport.pid, signal.SIGTERM)
        yield charger.closed
        yield child.ended
        records = [orjson.loads(line) for line in child.output.splitlines() if line.strip()]
        messages = [r["message"] for r in records]
        self.assertTrue(any("listening on ws://" in m for m in messages), messages)
        connected = [r for r in records if r.get("event") == "connected"]
        self.assertEqual([r["identity"] for r in connected], [identity])
        self.assertTrue(any(r["message"] == "ocppgw stopped" for r in records))
        client = yield BackEndClient.connect(reactor, amqp_url(), exchange)
        yield client.delete_queue("ocpp." + identity)
        yield client.delete_exchange(exchange)
        yield client.close()
