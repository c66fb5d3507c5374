"""
The gateway says how many chargers its open-files limit allows and warns
when [listener] max_connections is above it; its charger listeners take
the longest accept backlog the kernel allows.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

from twisted.internet import defer, reactor
from twisted.logger import Logger
from twisted.trial import unittest

from ocppgw import openfiles
from ocppgw import service as service_module
from ocppgw.testing import amqp_url, unique_name
from tests.support import REPO, ProcessOutput, config_file, delete_exchange, start_gateway


class _Events:
    """A log observer that keeps what it is given."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def levels(self):
        return [event["log_level"].name for event in self.events]


class RoomTests(unittest.TestCase):
    def test_limit_less_what_is_in_use_and_the_headroom(self):
        found = openfiles.room(20000, 30)
        self.assertEqual(found.chargers, 20000 - 30 - openfiles.HEADROOM)
        self.assertFalse(found.too_small_for(found.chargers))
        self.assertTrue(found.too_small_for(found.chargers + 1))

    def test_never_below_zero(self):
        self.assertEqual(openfiles.room(50, 40).chargers, 0)

    def test_unlimited(self):
        found = openfiles.room(None, 30)
        self.assertIsNone(found.chargers)
        self.assertFalse(found.too_small_for(10**9))


class AnnounceTests(unittest.TestCase):
    def announce(self, max_connections, limit, in_use):
        events = _Events()
        found = openfiles.announce(max_connections, Logger(observer=events),
                                   limit=lambda: limit, in_use=lambda: in_use)
        return found, events

    def test_room_said_without_warning(self):
        found, events = self.announce(10000, 20000, 36)
        self.assertEqual(found.chargers, 20000 - 36 - openfiles.HEADROOM)
        self.assertEqual(events.levels(), ["info"])
        event = events.events[0]
        self.assertEqual((event["limit"], event["in_use"], event["chargers"]),
                         (20000, 36, found.chargers))

    def test_warns_naming_the_setting(self):
        found, events = self.announce(100000, 20000, 36)
        self.assertEqual(events.levels(), ["info", "warn"])
        warning = events.events[1]
        self.assertIn("[listener] max_connections", warning["log_format"])
        self.assertIn("LimitNOFILE", warning["log_format"])
        self.assertEqual((warning["max_connections"], warning["chargers"], warning["limit"]),
                         (100000, found.chargers, 20000))

    def test_unlimited_no_warning(self):
        found, events = self.announce(100000, None, 36)
        self.assertIsNone(found.chargers)
        self.assertEqual(events.levels(), ["info"])

    def test_uncountable_descriptors_count_as_none(self):
        found, _events = self.announce(100, 1000, None)
        self.assertEqual(found.chargers, 1000 - openfiles.HEADROOM)


class ProcessTests(unittest.TestCase):
    def test_open_descriptors_counts_a_new_one(self):
        before = openfiles.open_descriptors()
        if before is None:
            raise unittest.SkipTest("no /proc/self/fd here")
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertEqual(openfiles.open_descriptors(), before + 2)

    def test_raise_soft_limit_to_hard(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        lower = min(soft, 256 if hard == resource.RLIM_INFINITY else hard) // 2
        resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
        raised = openfiles.raise_soft_limit()
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
        self.assertEqual(raised, None if hard == resource.RLIM_INFINITY else hard)


#: Lowers the open-files limit (soft and hard), then runs twistd ocppgw.
_WITH_LIMIT = """\
import resource, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
from twisted.scripts.twistd import run
run()
"""


class TwistdTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_gateway_warns_at_start(self):
        """
        A real gateway whose limit is 500 files says how many chargers
        that is and warns that max_connections (1000) is more.
        """
        exchange = unique_name("openfiles")
        self.addCleanup(delete_exchange, exchange)
        path = config_file(
            self,
            "[listener]\ntcp.port = 0\nmax_connections = 1000\n[admin]\ntcp.port = 0\n"
            f"[amqp]\nurl = {amqp_url()}\nexchange = {exchange}\n",
        )
        child = ProcessOutput(b"max_connections = 1000 exceeds")
        reactor.spawnProcess(
            child, sys.executable,
            [sys.executable, "-c", _WITH_LIMIT, "500", "-n", "--pidfile=", "ocppgw",
             "--config", path],
            env={**os.environ, "PYTHONPATH": REPO}, path=REPO,
        )
        yield child.ready
        child.transport.signalProcess("TERM")
        yield child.ended
        self.assertIn(b"Open-files limit 500 (", child.output)
        self.assertRegex(child.output.decode(), r"room for 4\d\d chargers in this process")


def _listen_backlog(port: int):
    """
    The backlog of the socket listening on C{port}, as C{ss} shows it
    (Send-Q of a listening socket), or C{None} without C{ss}.
    """
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return int(out.split()[2])


class BacklogTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_charger_listener_backlog_as_long_as_the_kernel_allows(self):
        """
        A reconnection storm waits in the kernel's accept queue, not in
        the chargers' SYN back-off: the charger listener asks for the
        longest backlog (the kernel caps it at net.core.somaxconn).
        """
        exchange = unique_name("backlog")
        self.addCleanup(delete_exchange, exchange)
        service = yield start_gateway(self, {
            "listener": {"tcp.port": "0"}, "admin": {"tcp.port": "0"},
            "amqp": {"url": amqp_url(), "exchange": exchange},
        })
        backlog = _listen_backlog(service.listening_port.getHost().port)
        if backlog is None:
            raise unittest.SkipTest("ss (iproute2) is needed to read a backlog")
        with open("/proc/sys/net/core/somaxconn") as f:
            somaxconn = int(f.read())
        self.assertEqual(backlog, min(service_module.CHARGER_BACKLOG, somaxconn))
