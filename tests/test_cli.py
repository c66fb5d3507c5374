"""
The C{ocppgw} command line, run as a real process against a real gateway,
broker and connected charger.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from ocppgw import cli
from ocppgw.testing import amqp_url, unique_name
from tests.support import REPO, GatewayTestCase, delete_exchange

BAD_CONFIG = "[listener]\ntcp.port = 70000\n"


def run_cli(*args: str) -> defer.Deferred:
    """C{python -m ocppgw.cli ARGS}: fires with (stdout, stderr, exit status)."""
    return utils.getProcessOutputAndValue(
        sys.executable,
        ["-m", "ocppgw.cli", *args],
        env={**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"},
        path=REPO,
        reactor=reactor,
    )


class CallTests(GatewayTestCase):
    timeout = 40

    def cli_call(self, identity: str, *args: str) -> defer.Deferred:
        return run_cli("call", identity, *args, "--url", amqp_url(), "--exchange", self.exchange)

    @defer.inlineCallbacks
    def test_call_prints_the_answer(self):
        identity = self.identity("RDAM 7")
        charger = yield self.connect(identity)
        done = self.cli_call(identity, "Reset", '{"type": "Soft"}')
        command = yield charger.next_call()
        self.assertEqual(command[2:], ["Reset", {"type": "Soft"}])
        charger.answer(command, {"status": "Accepted"})
        out, err, status = yield done
        self.assertEqual(status, cli.EXIT_OK, err)
        self.assertEqual(json.loads(out), [3, command[1], {"status": "Accepted"}])

    @defer.inlineCallbacks
    def test_callerror_exits_nonzero(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        done = self.cli_call(identity, "GetConfiguration")
        command = yield charger.next_call()
        self.assertEqual(command[3], {})
        charger.answer_error(command, "NotSupported", "no")
        out, err, status = yield done
        self.assertEqual(status, cli.EXIT_ERROR, err)
        self.assertEqual(json.loads(out)[:3], [4, command[1], "NotSupported"])

    @defer.inlineCallbacks
    def test_timeout(self):
        identity = self.identity()
        charger = yield self.connect(identity)
        done = self.cli_call(identity, "Reset", '{"type": "Hard"}', "--timeout", "1")
        yield charger.next_call()  # and never answer it
        out, err, status = yield done
        self.assertEqual(status, cli.EXIT_TIMEOUT, err)
        self.assertEqual(out, b"")
        self.assertIn(b"no answer from", err)

    @defer.inlineCallbacks
    def test_unbound_queue_is_refused_at_once(self):
        """
        The charger's queue exists but is not bound to the exchange: the
        command is published mandatory, the broker returns it, and the
        command line says so with status 4 at once. Waiting for the answer
        (600 s) would outlast this test's own timeout.
        """
        identity = self.identity()
        # the charger's queue is bound to the gateway's exchange only; the
        # command goes to another one (a wrong [amqp] exchange or
        # --exchange), where nothing is bound
        yield self.backend.client.declare_queue(
            "ocpp." + identity, [identity], auto_delete=False
        )
        other = unique_name("ocpp-test-other")
        self.addCleanup(delete_exchange, other)
        out, err, status = yield run_cli(
            "call", identity, "Reset", "{}", "--timeout", "600",
            "--url", amqp_url(), "--exchange", other,
        )
        self.assertEqual(status, cli.EXIT_NO_CHARGER, err)
        self.assertEqual(out, b"")
        self.assertIn(
            f"queue 'ocpp.{identity}' exists but is not bound to exchange '{other}'".encode(), err
        )

    @defer.inlineCallbacks
    def test_unknown_charger(self):
        out, err, status = yield self.cli_call(self.identity("never"), "Reset", "{}")
        self.assertEqual(status, cli.EXIT_NO_CHARGER, err)
        self.assertIn(b"never connected", err)

    @defer.inlineCallbacks
    def test_bad_payload(self):
        out, err, status = yield self.cli_call("CP1", "Reset", "[1, 2]")
        self.assertEqual(status, cli.EXIT_USAGE)
        self.assertIn(b"JSON object", err)


class ChargersCommandTests(GatewayTestCase):
    timeout = 40

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.gateway_service.admin_port.getHost().port}"

    @defer.inlineCallbacks
    def test_list_show_and_disconnect(self):
        identity = self.identity("RDAM 3")
        charger = yield self.connect(identity)
        out, err, status = yield run_cli("chargers", "--admin", self.admin)
        self.assertEqual(status, 0, err)
        header, row = out.decode().splitlines()
        self.assertTrue(header.startswith("IDENTITY"))
        self.assertTrue(row.startswith(identity + " "))
        self.assertIn("ocpp1.6", row)

        out, err, status = yield run_cli("chargers", identity, "--json", "--admin", self.admin)
        self.assertEqual(status, 0, err)
        self.assertEqual(json.loads(out)["identity"], identity)

        out, err, status = yield run_cli(
            "chargers", identity, "--disconnect", "--admin", self.admin
        )
        self.assertEqual(status, 0, err)
        code, _ = yield charger.closed
        self.assertEqual(code, 1000)

        out, err, status = yield run_cli("chargers", identity, "--admin", self.admin)
        self.assertEqual(status, cli.EXIT_NO_CHARGER)
        self.assertIn(b"not connected", err)

    @defer.inlineCallbacks
    def test_unreachable(self):
        listening = self.gateway_service.admin_port
        port = listening.getHost().port
        self.gateway_service.admin_port = None
        yield listening.stopListening()
        out, err, status = yield run_cli("chargers", "--admin", f"http://127.0.0.1:{port}")
        self.assertEqual(status, cli.EXIT_UNREACHABLE)
        self.assertIn(b"cannot reach the admin listener", err)


class ChargersAuthTests(GatewayTestCase):
    settings = {"admin": {"username": "ops", "password": "pw"}}
    timeout = 40

    @defer.inlineCallbacks
    def test_password_from_environment(self):
        admin = f"http://127.0.0.1:{self.gateway_service.admin_port.getHost().port}"
        out, err, status = yield run_cli("chargers", "--admin", admin, "--user", "ops")
        self.assertEqual(status, cli.EXIT_ERROR)
        self.assertIn(b"HTTP 401", err)
        os.environ[cli.PASSWORD_ENV] = "pw"
        self.addCleanup(os.environ.pop, cli.PASSWORD_ENV, None)
        out, err, status = yield run_cli("chargers", "--admin", admin, "--user", "ops")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines()[0].split()[0], "IDENTITY")


class InProcessTests(unittest.SynchronousTestCase):
    """What needs no reactor: check-config and --help."""

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(list(argv))
            except SystemExit as exit:
                status = exit.code
        return status, out.getvalue(), err.getvalue()

    def test_check_config_ok(self):
        path = os.path.join(REPO, "etc", "ocppgw.ini")
        status, out, _ = self.run_main("check-config", path)
        self.assertEqual((status, out), (0, f"{path}: ok\n"))

    def test_check_config_problems(self):
        """Every problem, each as FILE: section.key: reason."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(BAD_CONFIG + "[amqp]\nexchnage = x\n")
        status, out, err = self.run_main("check-config", path)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(
            err.splitlines(),
            [
                f"{path}: listener.tcp.port: 70000 is not a port (1-65535, or 0 for any free port)",
                f"{path}: amqp.exchnage: unknown key (did you mean exchange?)",
            ],
        )

    def test_check_config_what_start_refuses(self):
        """The checks twistd ocppgw makes beyond the file's own keys too."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[listener]\nworkers = 2\ntcp.port = 0\n")
        status, _, err = self.run_main("check-config", path)
        self.assertEqual(status, 1)
        self.assertEqual(
            err, f"{path}: listener.workers: several workers need fixed listener ports, not 0\n"
        )

    def test_help_everywhere(self):
        status, out, _ = self.run_main("--help")
        self.assertEqual(status, 0)
        for name in ("run", "passwd", "call", "check-config", "chargers"):
            self.assertIn(name, out)
            status, out_sub, _ = self.run_main(name, "--help")
            self.assertEqual(status, 0)
            self.assertIn(f"usage: ocppgw {name}", out_sub)

    def test_subcommands_registry(self):
        self.assertEqual(
            [add.__name__ for add in cli.SUBCOMMANDS],
            ["add_run", "add_passwd", "add_call", "add_check_config", "add_chargers"],
        )

    def test_disconnect_needs_identity(self):
        status, _, err = self.run_main("chargers", "--disconnect")
        self.assertEqual(status, cli.EXIT_USAGE)
        self.assertIn("needs an IDENTITY", err)
