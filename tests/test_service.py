"""
The service tree: the twistd plugin, makeService, start-up failures and a
clean stop (SIGTERM) with chargers connected.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from twisted.application.service import IServiceMaker
from twisted.internet import defer, reactor
from twisted.plugin import getPlugins
from twisted.trial import unittest

import ocppgw
from ocppgw.amqp import BackEndClient
from ocppgw.service import GatewayService
from ocppgw.tap import Options
from ocppgw.testing import FakeBackEnd, FakeCharger, amqp_url, unique_name
from tests.support import REPO, ProcessOutput, config_file, free_port


class PluginTests(unittest.TestCase):
    def test_twistd_finds_the_plugin(self):
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("ocppgw", makers)
        self.assertIs(makers["ocppgw"].options, Options)

    def test_bad_config_key_named(self):
        """
        A bad configuration ends the process with only its problems, each
        naming the file and C{section.key} (SystemExit: status 1 and the
        text on stderr), not twistd's usage text.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[listener]\ntcp.port = 99999\n")
        options = Options()
        error = self.assertRaises(SystemExit, options.parseOptions, ["--config", path])
        self.assertTrue(str(error.code).startswith(f"{path}: listener.tcp.port: "), error.code)

    def test_unknown_key_named(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[amqp]\nexchnage = x\n[listener]\ntcp.prot = 1\n")
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--config", path])
        self.assertEqual(
            str(error.code).splitlines(),
            [
                f"{path}: listener.tcp.prot: unknown key (did you mean tcp.port?)",
                f"{path}: amqp.exchnage: unknown key (did you mean exchange?)",
            ],
        )

    def test_unreadable_config(self):
        error = self.assertRaises(
            SystemExit, Options().parseOptions, ["--config", "/nonexistent/ocppgw.ini"]
        )
        self.assertEqual(
            error.code, "/nonexistent/ocppgw.ini: cannot read: No such file or directory"
        )

    def test_workers_need_fixed_ports(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[listener]\nworkers = 2\ntcp.port = 0\n")
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--config", path])
        self.assertEqual(
            error.code, f"{path}: listener.workers: several workers need fixed listener ports, not 0"
        )

    def test_shipped_config_loads(self):
        options = Options()
        options.parseOptions(["--config", os.path.join(REPO, "etc", "ocppgw.ini")])
        settings = options["settings"]
        self.assertEqual(
            (settings.listener.tcp_ip, settings.listener.tcp_port, settings.listener.ws_path),
            ("127.0.0.1", 19520, "/ocpp"),
        )


class MakeServiceTests(unittest.TestCase):
    timeout = 30

    def test_same_tree_as_twistd(self):
        service = ocppgw.makeService({"amqp": {"exchange": "x"}}, reactor=reactor)
        self.assertIsInstance(service, GatewayService)
        self.assertEqual(service.settings.amqp.exchange, "x")

    @defer.inlineCallbacks
    def test_start_declares_exchange_and_stop_closes_chargers(self):
        """
        makeService starts (exchange declared, listening) and stops cleanly:
        chargers are closed with 1012 and held commands go back to their
        queue, unanswered.
        """
        exchange = unique_name("svc-test")
        service = ocppgw.makeService(
            {
                "listener": {"tcp.port": "0"},
                "admin": {"tcp.port": "0"},
                "amqp": {"url": amqp_url(), "exchange": exchange},
            },
            reactor=reactor,
        )
        service.startService()
        yield service.started
        backend = yield FakeBackEnd.start(reactor, amqp_url(), exchange)
        identity = unique_name("CP")
        port = service.listening_port.getHost().port
        charger = yield FakeCharger.connect(reactor, f"ws://127.0.0.1:{port}/ocpp/{identity}")
        yield backend.send_to_charger(identity, [2, "h1", "Reset", {"type": "Soft"}])
        yield backend.send_to_charger(identity, [2, "h2", "Reset", {"type": "Hard"}])
        yield charger.next_call()
        yield service.stopService()
        code, _ = yield charger.closed
        self.assertEqual(code, 1012)
        self.assertFalse(service.bridge.connected)
        client = yield BackEndClient.connect(reactor, amqp_url(), exchange)
        try:
            # both commands are back in the queue, neither acked
            frame = yield client._channel.queue_declare("ocpp." + identity, passive=True)
            self.assertEqual(frame.method.message_count, 2)
        finally:
            yield client.delete_queue("ocpp." + identity)
            yield client.delete_exchange(exchange)
            yield client.close()
            yield backend.stop()

    @defer.inlineCallbacks
    def test_broker_refusal_fails_start(self):
        service = ocppgw.makeService(
            {
                "listener": {"tcp.port": "0"},
                "admin": {"tcp.port": "0"},
                "amqp": {"url": "amqp://guest:wrong-password@127.0.0.1:5672/%2F"},
            },
            reactor=reactor,
        )
        service.startService()
        yield self.assertFailure(service.started, Exception)
        self.assertIsNone(service.listening_port)


class TwistdTests(unittest.TestCase):
    """
    C{twistd -n ocppgw} as a real process.
    """

    timeout = 60

    def twistd(self, config_text: str, marker: bytes | None = None) -> ProcessOutput:
        path = config_file(self, config_text)
        collect = ProcessOutput(marker)
        reactor.spawnProcess(
            collect,
            sys.executable,
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "ocppgw", "--config", path],
            env={**os.environ, "PYTHONPATH": REPO},
            path=REPO,
        )
        self.path = path
        return collect

    @defer.inlineCallbacks
    def test_bad_config_exits_nonzero_with_named_key(self):
        """
        Only the problems are printed, each naming the file: not twistd's
        usage text, not its own name.
        """
        child = self.twistd("[ocpp]\ncall_timeout = -5\n[listener]\ntcp.prot = 1\n")
        ended = yield child.ended
        self.assertEqual(ended.exitCode, 1)
        self.assertEqual(
            child.output.decode().splitlines(),
            [
                f"{self.path}: listener.tcp.prot: unknown key (did you mean tcp.port?)",
                f"{self.path}: ocpp.call_timeout: -5 is not a number of seconds > 0",
            ],
        )

    @defer.inlineCallbacks
    def test_broker_refusal_exits_nonzero(self):
        child = self.twistd(
            "[listener]\ntcp.port = 0\n[admin]\ntcp.port = 0\n"
            "[amqp]\nurl = amqp://guest:wrong@127.0.0.1:5672/%2F\nconnect_timeout = 5\n",
        )
        ended = yield child.ended
        self.assertEqual(ended.exitCode, 1)
        self.assertIn(b"ocppgw could not start: [amqp] url: ", child.output)
        self.assertIn(b"the broker closed the connection during login", child.output)
        self.assertNotIn(b"wrong", child.output)

    @defer.inlineCallbacks
    def test_unreachable_broker_named(self):
        """
        A broker URL that refuses the TCP connection is named with its key
        and its URL, password masked.
        """
        port = free_port()
        child = self.twistd(
            "[listener]\ntcp.port = 0\n[admin]\ntcp.port = 0\n"
            f"[amqp]\nurl = amqp://guest:hush@127.0.0.1:{port}/%2F\n",
        )
        ended = yield child.ended
        self.assertEqual(ended.exitCode, 1)
        self.assertIn(
            f"ocppgw could not start: [amqp] url amqp://guest:****@127.0.0.1:{port}/%2F: "
            "Connection was refused".encode(),
            child.output,
        )
        self.assertNotIn(b"hush", child.output)

    @defer.inlineCallbacks
    def test_port_taken_named_and_exits_nonzero(self):
        """
        A port that cannot be bound ends the start at once (even before
        the reactor runs, as the admin listener's does) with status 1,
        naming its setting.
        """
        for section, key in (("admin", "tcp.port"), ("listener", "tcp.port")):
            taken = socket.socket()
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            self.addCleanup(taken.close)
            port = taken.getsockname()[1]
            ports = {"admin": 0, "listener": 0, section: port}
            child = self.twistd(
                f"[listener]\ntcp.port = {ports['listener']}\n"
                f"[admin]\ntcp.port = {ports['admin']}\n[amqp]\nurl = {amqp_url()}\n",
            )
            ended = yield child.ended
            self.assertEqual(ended.exitCode, 1, child.output)
            self.assertIn(
                f"ocppgw could not start: Couldn't listen on 127.0.0.1:{port}: "
                f"[{section}] {key}: [Errno 98] Address already in use".encode(),
                child.output,
            )

    @defer.inlineCallbacks
    def test_sigterm_closes_chargers_with_1012(self):
        port = free_port()
        exchange = unique_name("twistd-test")
        child = self.twistd(
            f"[listener]\ntcp.port = {port}\n[admin]\ntcp.port = 0\n[amqp]\nurl = {amqp_url()}\nexchange = {exchange}\n",
            b"listening on ws://",
        )
        yield child.ready
        identity = unique_name("CP")
        charger = yield FakeCharger.connect(reactor, f"ws://127.0.0.1:{port}/ocpp/{identity}")
        os.kill(child.transport.pid, signal.SIGTERM)
        code, _ = yield charger.closed
        self.assertEqual(code, 1012)
        ended = yield child.ended
        # twistd ends by re-raising the signal it stopped for
        self.assertEqual(ended.signal, signal.SIGTERM)
        self.assertIn(b"ocppgw stopped", child.output)
        client = yield BackEndClient.connect(reactor, amqp_url(), exchange)
        yield client.delete_queue("ocpp." + identity)
        yield client.delete_exchange(exchange)
        yield client.close()


#: Runs `ocppgw` (the command line's main) as an install would that has no
#: twisted/plugins/ on sys.path: the checkout is taken off sys.path, and a
#: directory holding only a link to the ocppgw package is put first.
_WITHOUT_PLUGIN_PATH = """\
import os, sys
repo, shim = sys.argv.pop(1), sys.argv.pop(1)
sys.path[:] = [shim] + [p for p in sys.path if os.path.abspath(p or ".") != repo]
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
found = any(maker.tapname == "ocppgw" for maker in getPlugins(IServiceMaker))
print("twistd finds the ocppgw plugin:", found, flush=True)
from ocppgw.cli import main
sys.exit(main())
"""


def _plugin_installed_outside_checkout() -> bool:
    """Whether an installed copy (not the checkout) holds the twistd plugin."""
    for entry in sys.path:
        entry = os.path.abspath(entry or ".")
        if entry != REPO and os.path.exists(
            os.path.join(entry, "twisted", "plugins", "ocppgw_plugin.py")
        ):
            return True
    return False


class RunTests(unittest.TestCase):
    """
    C{ocppgw run} as a real process, where twistd's plugin discovery cannot
    see the gateway: same service, same signals as C{twistd -n ocppgw}.
    """

    timeout = 60

    def ocppgw(self, *args: str, marker: bytes | None = None) -> ProcessOutput:
        shim = os.path.abspath(self.mktemp())
        os.makedirs(shim)
        os.symlink(os.path.join(REPO, "ocppgw"), os.path.join(shim, "ocppgw"))
        collect = ProcessOutput(marker)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        reactor.spawnProcess(
            collect,
            sys.executable,
            [sys.executable, "-c", _WITHOUT_PLUGIN_PATH, REPO, shim, *args],
            env={**env, "PYTHONUNBUFFERED": "1"},
            path=shim,
        )
        return collect

    @defer.inlineCallbacks
    def test_run_drains_on_sigterm_and_exits_0(self):
        """
        The gateway starts, a charger connects and exchanges a frame,
        SIGHUP reloads (the charger stays), SIGTERM closes the charger with
        1012 and the process ends with status 0 after its drain.
        """
        port = free_port()
        exchange = unique_name("run-test")
        path = config_file(
            self,
            f"[listener]\ntcp.port = {port}\ndrain_window = 0.5\n[admin]\ntcp.port = 0\n"
            f"[amqp]\nurl = {amqp_url()}\nexchange = {exchange}\n",
        )
        child = self.ocppgw("run", "--config", path, marker=b"listening on ws://")
        yield child.ready
        if not _plugin_installed_outside_checkout():
            # the case `ocppgw run` exists for: twistd would not know ocppgw
            self.assertIn(b"twistd finds the ocppgw plugin: False", child.output)
        backend = yield FakeBackEnd.start(reactor, amqp_url(), exchange)
        self.addCleanup(backend.stop)
        backend.handle("Heartbeat", lambda message, payload: {"currentTime": "2026-01-01T00:00:00Z"})
        identity = unique_name("CP")
        charger = yield FakeCharger.connect(reactor, f"ws://127.0.0.1:{port}/ocpp/{identity}")
        answer = yield charger.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)

        reloaded = child.wait_for(b"Reloading TLS material and credentials")
        os.kill(child.transport.pid, signal.SIGHUP)
        yield reloaded
        answer = yield charger.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)

        os.kill(child.transport.pid, signal.SIGTERM)
        code, _ = yield charger.closed
        self.assertEqual(code, 1012)
        ended = yield child.ended
        self.assertEqual((ended.exitCode, ended.signal), (0, None), child.output)
        self.assertIn(b"ocppgw stopped", child.output)
        client = yield BackEndClient.connect(reactor, amqp_url(), exchange)
        yield client.delete_queue("ocpp." + identity)
        yield client.delete_exchange(exchange)
        yield client.close()

    @defer.inlineCallbacks
    def test_bad_config(self):
        path = config_file(self, "[listener]\ntcp.prot = 1\n")
        child = self.ocppgw("run", "--config", path)
        ended = yield child.ended
        self.assertEqual(ended.exitCode, 1)
        lines = child.output.decode().splitlines()
        self.assertEqual(
            lines[1:], [f"{path}: listener.tcp.prot: unknown key (did you mean tcp.port?)"]
        )
