"""
The examples (examples/worker.py, examples/charger.py), run as real
processes against a real gateway and broker.

The README's worked example promises that the worker answers
BootNotification, Heartbeat and StatusNotification for 1.6 and 2.0.1 and
that its C{call} command sends a command to a charger and prints the
answer: these tests keep that promise honest. Each script is a separate
process with its own connections; nothing here waits on a timer: every
step waits for a line a script prints, a frame, or a process's end.
"""

from __future__ import annotations

import json
import os
import re
import sys
from importlib import resources
from pathlib import Path

from twisted.internet import defer, protocol, reactor, utils

from ocppgw.amqp import BackEndClient
from ocppgw.testing import amqp_url, unique_name
from tests.support import GatewayTestCase

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WORKER = str(EXAMPLES / "worker.py")
CHARGER = str(EXAMPLES / "charger.py")

#: Exit statuses of "worker.py call" (see its docstring).
EXIT_RESULT, EXIT_ERROR, EXIT_TIMEOUT, EXIT_NO_CHARGER = 0, 1, 3, 4

BOOT_16 = {"chargePointVendor": "Example", "chargePointModel": "Wallbox 16"}
BOOT_201 = {
    "reason": "PowerUp",
    "chargingStation": {"vendorName": "Example", "model": "Wallbox 201"},
}
STATUS_16 = {
    "connectorId": 1,
    "errorCode": "NoError",
    "status": "Available",
    "timestamp": "2026-01-01T00:00:00Z",
}
STATUS_201 = {
    "timestamp": "2026-01-01T00:00:00Z",
    "connectorStatus": "Available",
    "evseId": 1,
    "connectorId": 1,
}


def _environment() -> dict:
    environment = dict(os.environ)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def response_schema(package: str, action: str):
    """
    The JSON schema of C{action}'s response in the C{ocpp} package (a test
    dependency), or C{None} without it.
    """
    try:
        import jsonschema  # noqa: F401  (a dependency of ocpp)

        schemas = resources.files("ocpp") / package / "schemas"
    except ImportError:
        return None
    schema = schemas / f"{action}Response.json"
    if not schema.is_file():
        return None
    return json.loads(schema.read_text(encoding="utf-8"))


class ScriptProcess(protocol.ProcessProtocol):
    """
    A running example script: its output lines, and Deferreds that fire
    when a line we wait for appears or the process ends.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.stderr = b""
        self.ended: defer.Deferred = defer.Deferred()
        self._partial = b""
        self._waiting: list[tuple[object, defer.Deferred]] = []

    def outReceived(self, data: bytes) -> None:
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for entry in list(self._waiting):
                predicate, d = entry
                if predicate(line):
                    self._waiting.remove(entry)
                    d.callback(line)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason) -> None:
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(
                AssertionError(
                    f"process ended ({reason.value}) before the line came;\n"
                    f"stdout: {self.lines}\nstderr: {self.stderr.decode('utf-8', 'replace')}"
                )
            )
        self.ended.callback(reason.value)

    def wait_for_line(self, predicate) -> defer.Deferred:
        """
        The next (or an already printed) line for which C{predicate} holds.
        """
        for line in self.lines:
            if predicate(line):
                return defer.succeed(line)
        d: defer.Deferred = defer.Deferred()
        if self.ended.called:
            d.errback(AssertionError(f"process has ended; stdout: {self.lines}"))
        else:
            self._waiting.append((predicate, d))
        return d

    def stop(self) -> defer.Deferred:
        if not self.ended.called:
            self.transport.signalProcess("TERM")
        return self.ended


class ExampleTestCase(GatewayTestCase):
    """
    A gateway, and helpers to run the example scripts against it.
    """

    def spawn(self, script: str, *arguments: str) -> ScriptProcess:
        process = ScriptProcess()
        reactor.spawnProcess(
            process,
            sys.executable,
            [sys.executable, script, *arguments],
            env=_environment(),
        )
        self.addCleanup(process.stop)
        return process

    @defer.inlineCallbacks
    def start_worker(self, *arguments: str, queue: str | None = None):
        """
        C{worker.py serve} on the test's exchange, once it consumes; its
        queue is C{worker.queue}.
        """
        if queue is None:
            queue = unique_name("example-worker")
            self.addCleanup(self._delete_queue, queue)
        worker = self.spawn(
            WORKER, "serve", "--url", amqp_url(), "--exchange", self.exchange,
            "--queue", queue, *arguments,
        )
        worker.queue = queue
        yield worker.wait_for_line(lambda line: line.startswith("ready:"))
        return worker

    def run_call(self, *arguments, exchange=None):
        """
        C{worker.py call ...}; fires with C{(stdout, stderr, exit status)}.
        """
        return utils.getProcessOutputAndValue(
            sys.executable,
            [WORKER, "call", "--url", amqp_url(), "--exchange", exchange or self.exchange,
             *arguments],
            env=_environment(),
            reactor=reactor,
        )

    @defer.inlineCallbacks
    def _delete_queue(self, queue: str):
        admin = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        try:
            yield admin.delete_queue(queue)
        finally:
            yield admin.close()


class ServeTests(ExampleTestCase):
    """
    C{worker.py serve} answers a charger's first CALLs per version.
    """

    def assertAnswers(self, answer, call_id, package, action):
        """
        C{answer} is a CALLRESULT to C{call_id} whose payload is valid for
        C{action} in the C{ocpp} package's schema for the version.
        """
        self.assertEqual(answer[:2], [3, call_id], answer)
        schema = response_schema(package, action)
        if schema is not None:
            import jsonschema

            jsonschema.validate(answer[2], schema)
        return answer[2]

    @defer.inlineCallbacks
    def check_version(self, subprotocol, package, boot, status):
        worker = yield self.start_worker()
        identity = self.identity()
        charger = yield self.connect(identity, (subprotocol,))
        self.assertEqual(charger.subprotocol, subprotocol)
        yield worker.wait_for_line(lambda line: line.startswith(f"{identity} connected"))

        answer = yield charger.call("BootNotification", boot, message_id="boot-1")
        payload = self.assertAnswers(answer, "boot-1", package, "BootNotification")
        self.assertEqual(payload["status"], "Accepted")
        self.assertEqual(payload["interval"], 300)

        answer = yield charger.call("Heartbeat", {}, message_id="hb-1")
        self.assertIn("currentTime", self.assertAnswers(answer, "hb-1", package, "Heartbeat"))

        answer = yield charger.call("StatusNotification", status, message_id="sn-1")
        self.assertEqual(
            self.assertAnswers(answer, "sn-1", package, "StatusNotification"), {}
        )

        # When the charger goes, the gateway's offline StatusNotification
        # reaches the worker, which records it and does not answer it.
        yield charger.close()
        yield worker.wait_for_line(lambda line: line.startswith(f"{identity} is offline"))
        yield worker.wait_for_line(lambda line: line.startswith(f"{identity} disconnected"))

    def test_ocpp16(self):
        return self.check_version("ocpp1.6", "v16", BOOT_16, STATUS_16)

    def test_ocpp201(self):
        return self.check_version("ocpp2.0.1", "v201", BOOT_201, STATUS_201)

    @defer.inlineCallbacks
    def test_otherActionNotImplemented(self):
        """
        The worker binds only the actions it answers; the gateway answers
        the others with NotImplemented (the test back end of
        L{GatewayTestCase} binds C{#}, so it is stopped first).
        """
        yield self.backend.client.delete_queue(self.backend.queue)
        yield self.backend.stop()
        self.backend = None
        yield self.start_worker()
        charger = yield self.connect(self.identity(), ("ocpp1.6",))
        answer = yield charger.call("Authorize", {"idTag": "TAG1"}, message_id="a-1")
        self.assertEqual(answer[:3], [4, "a-1", "NotImplemented"])


class CallTests(ExampleTestCase):
    """
    C{worker.py call} sends a command to a charger and prints its answer.
    """

    @defer.inlineCallbacks
    def test_result(self):
        identity = self.identity()
        charger = yield self.connect(identity, ("ocpp1.6",))
        done = self.run_call(identity, "Reset", '{"type": "Soft"}', "--timeout", "30")
        command = yield charger.next_call()
        self.assertEqual(command[2:], ["Reset", {"type": "Soft"}])
        charger.answer(command, {"status": "Accepted"})
        out, err, code = yield done
        self.assertEqual(code, EXIT_RESULT, err)
        self.assertEqual(json.loads(out), [3, command[1], {"status": "Accepted"}])

    @defer.inlineCallbacks
    def test_error(self):
        identity = self.identity()
        charger = yield self.connect(identity, ("ocpp2.0.1",))
        done = self.run_call(identity, "Reset", '{"type": "Immediate"}', "--timeout", "30")
        command = yield charger.next_call()
        charger.answer_error(command, "NotSupported", "not today")
        out, err, code = yield done
        self.assertEqual(code, EXIT_ERROR, err)
        self.assertEqual(json.loads(out), [4, command[1], "NotSupported", "not today", {}])
        self.assertIn(b"NotSupported", err)

    @defer.inlineCallbacks
    def test_noAnswer(self):
        """
        A charger that does not answer: the command gives up after
        C{--timeout} with its own exit status.
        """
        identity = self.identity()
        charger = yield self.connect(identity, ("ocpp1.6",))
        done = self.run_call(identity, "Reset", '{"type": "Soft"}', "--timeout", "0.5")
        yield charger.next_call()
        out, err, code = yield done
        self.assertEqual((out, code), (b"", EXIT_TIMEOUT), err)

    @defer.inlineCallbacks
    def test_noCharger(self):
        """
        An identity with no queue on the exchange: unroutable, said at once.
        """
        exchange = unique_name("ocpp-test-empty")
        self.addCleanup(self._delete_exchange, exchange)
        out, err, code = yield self.run_call(
            unique_name("CP"), "Reset", '{"type": "Soft"}', exchange=exchange
        )
        self.assertEqual((out, code), (b"", EXIT_NO_CHARGER), err)

    @defer.inlineCallbacks
    def test_badPayload(self):
        out, err, code = yield self.run_call("CP1", "Reset", "[1, 2]")
        self.assertEqual(code, 2, err)
        self.assertIn(b"JSON object", err)

    @defer.inlineCallbacks
    def _delete_exchange(self, exchange: str):
        admin = yield BackEndClient.connect(reactor, amqp_url(), exchange)
        try:
            yield admin.delete_exchange(exchange)
        finally:
            yield admin.close()


class QueueLifetimeTests(ExampleTestCase):
    """
    The worker's queue expires when no worker uses it, can be purged at
    start and deleted with C{clean}.
    """

    @defer.inlineCallbacks
    def declare(self, queue: str, arguments) -> defer.Deferred:
        """
        Declare C{queue} with C{arguments}: the broker refuses (the
        Deferred fails, closing the client's channel) when the queue exists
        with other ones.
        """
        client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        try:
            yield client.declare_queue(queue, durable=True, auto_delete=False,
                                       arguments=arguments)
        finally:
            yield client.close()

    @defer.inlineCallbacks
    def test_queue_expires(self):
        worker = yield self.start_worker("--expires", "600")
        queue = worker.queue
        self.assertIn("(deleted after 600 s unused)", worker.lines[0])
        # the same arguments are accepted, others are not: the queue has
        # x-expires = 600 s
        yield self.declare(queue, {"x-expires": 600_000})
        yield self.assertFailure(self.declare(queue, None), Exception)

    @defer.inlineCallbacks
    def test_purge_and_clean(self):
        queue = unique_name("example-worker")
        self.addCleanup(self._delete_queue, queue)
        yield self.declare(queue, {"x-expires": 1_800_000})
        client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        try:
            # a frame that came while no worker ran
            yield client.send_to_charger(queue, b"[2,\"old\",\"Heartbeat\",{}]",
                                         exchange="", routing_key=queue)
        finally:
            yield client.close()
        worker = yield self.start_worker("--purge", queue=queue)
        self.assertEqual(worker.lines[0], f"purged 1 messages that waited in {queue}")
        yield worker.stop()
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable,
            [WORKER, "clean", "--url", amqp_url(), "--queue", queue],
            env=_environment(), reactor=reactor,
        )
        self.assertEqual((out, code), (f"deleted {queue} (0 messages)\n".encode(), 0), err)
        client = yield BackEndClient.connect(reactor, amqp_url(), self.exchange)
        try:
            exists = yield client.queue_exists(queue)
        finally:
            yield client.close()
        self.assertFalse(exists)

    @defer.inlineCallbacks
    def test_old_queue_without_expiry(self):
        """
        A queue left by an older worker (no x-expires) cannot be declared
        again with it: serve says how to remove it.
        """
        queue = unique_name("example-worker")
        self.addCleanup(self._delete_queue, queue)
        yield self.declare(queue, None)
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable,
            [WORKER, "serve", "--url", amqp_url(), "--exchange", self.exchange, "--queue", queue],
            env=_environment(), reactor=reactor,
        )
        self.assertEqual(code, 1, err)
        self.assertIn(f"clean --queue {queue}".encode(), err)


#: Where the README's worked example shows each program's output: a
#: comment "<!-- output: NAME -->" right before a fenced block.
_OUTPUT_BLOCK = re.compile(r"<!-- output: ([a-z ]+) -->\n```\n(.*?)```", re.S)
#: What differs from run to run inside frames: message ids and timestamps.
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def readme_outputs() -> dict[str, list[str]]:
    """The output blocks of the README's worked example, by name."""
    text = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Worked example"):]
    section = section[:section.index("\n## ", 1)]
    return {name: block.splitlines() for name, block in _OUTPUT_BLOCK.findall(section)}


def _normalised(value):
    """A frame with its message ids and timestamps replaced by placeholders."""
    if isinstance(value, list):
        return [_normalised(item) for item in value]
    if isinstance(value, dict):
        return {key: _normalised(item) for key, item in value.items()}
    if isinstance(value, str) and _UUID.match(value):
        return "<message id>"
    if isinstance(value, str) and _TIME.match(value):
        return "<time>"
    return value


def _comparable(line: str):
    """A frame line (> or < and JSON) as its normalised frame; others as they are."""
    prefix, _, rest = line.partition(" ")
    if prefix in (">", "<") or line.startswith("["):
        frame = json.loads(rest if prefix in (">", "<") else line)
        return (prefix if prefix in (">", "<") else "", _normalised(frame))
    return line


class WorkedExampleTests(ExampleTestCase):
    """
    The README's worked example: worker, simulated charger and a command,
    three processes around a real gateway.
    """

    def assertShows(self, name: str, output: list[str], substitutions: dict) -> None:
        """
        The README's block C{name} (with C{substitutions} for what this
        run names differently) appears in C{output}, line by line in
        order; frames are compared without their ids and timestamps.
        """
        expected = readme_outputs()[name]
        self.assertTrue(expected, f"no output block {name!r} in the README")
        remaining = [_comparable(line) for line in output]
        for line in expected:
            if line.startswith("$ "):
                continue  # the command, as typed
            for old, new in substitutions.items():
                line = line.replace(old, new)
            wanted = _comparable(line)
            self.assertIn(wanted, remaining, f"README block {name!r}: {line!r} not in {output}")
            remaining = remaining[remaining.index(wanted) + 1:]

    @defer.inlineCallbacks
    def test_readme_output(self):
        """
        The worked example as the README shows it: each block of output
        there is what the programs print today.
        """
        worker = yield self.start_worker("--expires", "1800")
        identity = self.identity("CP")
        url = f"ws://127.0.0.1:{self.port}/ocpp"
        names = {
            "CP1": identity,
            "vm:2245": self.gateway_service.node,
            "csms.example-worker": worker.queue,
            "exchange ocpp": f"exchange {self.exchange}",
            "ws://127.0.0.1:19520/ocpp": url,
        }
        charger = self.spawn(CHARGER, "--url", url, identity)
        yield worker.wait_for_line(lambda line: line.startswith(f"{identity} ocpp1.6 Status"))
        yield charger.wait_for_line(lambda line: line.startswith("< [3") and "{}" in line)
        self.assertShows("worker serve", worker.lines, names)
        self.assertShows("charger", charger.lines, names)

        out, err, code = yield self.run_call(identity, "Reset", '{"type": "Soft"}')
        self.assertEqual(code, EXIT_RESULT, err)
        self.assertShows("worker call", out.decode().splitlines(), names)
        yield charger.wait_for_line(lambda line: line.startswith("> [3") and "Accepted" in line
                                    and "Reset" not in line and "currentTime" not in line)
        self.assertShows("charger call", charger.lines, names)

        yield charger.stop()
        yield worker.wait_for_line(lambda line: line.startswith(f"{identity} disconnected"))
        self.assertShows("worker stop", worker.lines, names)

    @defer.inlineCallbacks
    def test_workedExample(self):
        worker = yield self.start_worker()
        identity = self.identity("RDAM ")  # a space, percent-encoded by the charger
        charger = self.spawn(
            CHARGER, "--url", f"ws://127.0.0.1:{self.port}/ocpp", identity
        )
        yield charger.wait_for_line(lambda line: line.startswith("BootNotification: Accepted"))
        yield worker.wait_for_line(lambda line: line.startswith(f"{identity} ocpp1.6 Boot"))
        out, err, code = yield self.run_call(identity, "Reset", '{"type": "Soft"}')
        self.assertEqual(code, EXIT_RESULT, err)
        answer = json.loads(out)
        self.assertEqual(answer[2], {"status": "Accepted"})
        yield charger.wait_for_line(lambda line: line.startswith("CSMS called Reset"))
        # a command whose response has another shape gets a valid one
        out, err, code = yield self.run_call(identity, "GetConfiguration", "{}")
        self.assertEqual(code, EXIT_RESULT, err)
        self.assertEqual(json.loads(out)[2], {"configurationKey": []})


class GatewayTimeoutTests(ExampleTestCase):
    """
    A charger that never answers: the gateway's timeout CALLERROR reaches
    the caller over direct reply-to before the caller's own timeout.
    """

    settings = {"ocpp": {"call_timeout": "1"}}

    @defer.inlineCallbacks
    def test_gatewayTimeout(self):
        identity = self.identity()
        charger = yield self.connect(identity, ("ocpp1.6",))
        done = self.run_call(identity, "Reset", '{"type": "Hard"}', "--timeout", "30")
        command = yield charger.next_call()
        out, err, code = yield done
        self.assertEqual(code, EXIT_ERROR, err)
        answer = json.loads(out)
        self.assertEqual(answer[:3], [4, command[1], "GenericError"])
        self.assertIn(b"did not answer in time", err)
