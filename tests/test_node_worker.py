"""
The Node.js worker (examples/node/worker.js, amqplib) against a real
gateway, broker and charger: the back end is language-neutral.

Skipped only where Node.js is not installed. Its npm dependencies are
installed with C{npm ci} (from the committed package-lock.json) when
C{examples/node/node_modules} is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from twisted.internet import defer, protocol, reactor, threads, utils

from ocppgw.amqp import BackEndClient
from ocppgw.testing import amqp_url, unique_name
from tests.support import GatewayTestCase

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
WORKER = str(NODE_DIR / "worker.js")
NODE = shutil.which("node")
NPM = shutil.which("npm")


def _npm_ci() -> None:
    if (NODE_DIR / "node_modules" / "amqplib").is_dir():
        return
    subprocess.run(
        [NPM, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True,
        capture_output=True, timeout=300,
    )


class _Worker(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ready: defer.Deferred = defer.Deferred()
        self.answered: list[bytes] = []
        self._waiting: list[tuple[bytes, defer.Deferred]] = []
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready: " in self.output and not self.ready.called:
            self.ready.callback(None)
        for marker, d in list(self._waiting):
            if marker in self.output:
                self._waiting.remove((marker, d))
                d.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def wait_for(self, marker: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if marker in self.output:
            d.callback(None)
        else:
            self._waiting.append((marker, d))
        return d

    def processEnded(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value)


class NodeWorkerTests(GatewayTestCase):
    timeout = 120

    if NODE is None:
        skip = "Node.js is not installed (node not on PATH)"
    elif NPM is None and not (NODE_DIR / "node_modules" / "amqplib").is_dir():
        skip = "npm is not installed and examples/node/node_modules is missing"

    @defer.inlineCallbacks
    def setUp(self):
        yield threads.deferToThread(_npm_ci)
        yield super().setUp()
        self.worker_queue = unique_name("csms.node")
        self.worker = _Worker()
        reactor.spawnProcess(
            self.worker, NODE,
            [NODE, WORKER, "serve", "--url", amqp_url(), "--exchange", self.exchange,
             "--queue", self.worker_queue],
            env=dict(os.environ), path=str(NODE_DIR),
        )
        self.addCleanup(self._stop_worker)
        yield self.worker.ready

    @defer.inlineCallbacks
    def _stop_worker(self):
        if not self.worker.ended.called:
            self.worker.transport.signalProcess(signal.SIGTERM)
        yield self.worker.ended
        client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        yield client.delete_queue(self.worker_queue)
        yield client.close()

    @defer.inlineCallbacks
    def test_answers_boot_notification_and_heartbeat(self):
        """
        A real 1.6 charger's BootNotification and Heartbeat, and a 2.0.1
        charger's BootNotification, are answered by the Node.js worker.
        """
        identity = self.identity()
        charger = yield self.connect(identity)
        boot = yield charger.call(
            "BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"}
        )
        self.assertEqual(boot[0], 3, boot)
        self.assertEqual(boot[2]["status"], "Accepted")
        self.assertEqual(boot[2]["interval"], 300)
        self.assertTrue(boot[2]["currentTime"].endswith("Z"))
        beat = yield charger.call("Heartbeat", {})
        self.assertEqual(sorted(beat[2]), ["currentTime"])

        other = self.identity()
        charger201 = yield self.connect(other, ("ocpp2.0.1",))
        boot201 = yield charger201.call(
            "BootNotification",
            {"reason": "PowerUp", "chargingStation": {"model": "M", "vendorName": "V"}},
        )
        self.assertEqual(boot201[2]["status"], "Accepted")
        yield self.worker.wait_for(f"{other} ocpp2.0.1 BootNotification answered".encode())

    @defer.inlineCallbacks
    def test_sends_a_command(self):
        """C{node worker.js call} sends a CALL and prints the charger's answer."""
        identity = self.identity()
        charger = yield self.connect(identity)
        done = utils.getProcessOutputAndValue(
            NODE,
            [WORKER, "call", identity, "Reset", '{"type": "Soft"}',
             "--url", amqp_url(), "--exchange", self.exchange, "--timeout", "20"],
            env=dict(os.environ), path=str(NODE_DIR), reactor=reactor,
        )
        command = yield charger.next_call()
        self.assertEqual(command[2:], ["Reset", {"type": "Soft"}])
        charger.answer(command, {"status": "Accepted"})
        out, err, status = yield done
        self.assertEqual(status, 0, err)
        self.assertEqual(json.loads(out), [3, command[1], {"status": "Accepted"}])
