"""
The HAProxy setup of docs/load-balancer.md, run: HAProxy in TCP mode with
send-proxy-v2 and HTTP health checks on /readyz in front of two gateways. Skipped when
haproxy is not installed (Debian: apt-get install haproxy).

HAProxy's own log tells how each session ended: C{--} when both sides
closed normally, C{SD} when the server broke the connection off (what a
reset after the closing handshake looked like).
"""

from __future__ import annotations

import os
import re
import shutil

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from ocppgw.testing import FakeCharger
from tests.faults.test_gateways import GatewaysTestCase
from tests.support import free_port

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
)

# docs/load-balancer.md's example, with the test's ports (and logging to stdout).
CONFIG = """\
global
    log stdout format raw local0
    maxconn 1000

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 90s
    timeout server 90s
    timeout tunnel 5m

frontend ocpp
    bind 127.0.0.1:{port}
    default_backend gateways

backend gateways
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
{servers}
"""
SERVER = ("    server gw{n} 127.0.0.1:{port} send-proxy-v2 check port {admin} "
          "inter 500ms fall 1 rise 1\n")

#: a tcplog line: client, ..., backend/server, timers, bytes, termination state
_SESSION = re.compile(
    r"^127\.0\.0\.1:(?P<port>\d+) \[[^]]+\] ocpp gateways/(?P<server>\S+) \S+ \d+ "
    r"(?P<state>\S\S) "
)


class _HAProxy(protocol.ProcessProtocol):
    def __init__(self):
        self.output = ""
        self.ended = defer.Deferred()
        self._waiting = []

    def outReceived(self, data):
        self.output += data.decode("utf-8", "replace")
        for entry in list(self._waiting):
            pattern, d = entry
            if re.search(pattern, self.output, re.M):
                self._waiting.remove(entry)
                d.callback(None)

    errReceived = outReceived

    def wait_for(self, pattern: str) -> defer.Deferred:
        d = defer.Deferred()
        self._waiting.append((pattern, d))
        self.outReceived(b"")
        return d

    def sessions(self) -> dict:
        """Client port -> (server, termination state), for ended sessions."""
        return {
            int(m["port"]): (m["server"], m["state"])
            for m in (_SESSION.match(line) for line in self.output.splitlines()) if m
        }

    def processEnded(self, reason):
        self.ended.callback(None)


class HAProxyTests(GatewaysTestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        if HAPROXY is None:
            raise unittest.SkipTest("haproxy is not installed (apt-get install haproxy)")
        super().setUp()
        self.gateways = []
        for _ in range(2):
            service = yield self.gateway(
                listener={"proxy_protocol": "true", "trusted_proxies": "127.0.0.1",
                          "drain_window": "0.5"},
            )
            self.gateways.append(service)
        self.port = free_port()
        servers = "".join(
            SERVER.format(n=n, port=service.listening_port.getHost().port,
                          admin=service.admin_port.getHost().port)
            for n, service in enumerate(self.gateways, 1)
        )
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as file:
            file.write(CONFIG.format(port=self.port, servers=servers))
        self.haproxy = _HAProxy()
        process = reactor.spawnProcess(
            self.haproxy, HAPROXY, [HAPROXY, "-db", "-f", path], env=os.environ
        )

        def stop():
            if not self.haproxy.ended.called:
                process.signalProcess("TERM")
            return self.haproxy.ended

        self.addCleanup(stop)
        # haproxy says nothing when it is ready: try until it accepts (it
        # binds within milliseconds; the health checks start with the
        # servers up)
        for _ in range(100):
            try:
                probe = yield FakeCharger.connect(reactor, self.url_via(self.identity()))
            except Exception:
                if self.haproxy.ended.called:
                    raise AssertionError("haproxy did not start:\n" + self.haproxy.output)
                yield task.deferLater(reactor, 0.05, lambda: None)
                continue
            yield probe.close()
            break

    def url_via(self, identity: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ocpp/{identity}"

    @defer.inlineCallbacks
    def charger(self, identity: str):
        charger = yield FakeCharger.connect(reactor, self.url_via(identity))
        self.addCleanup(lambda: charger.closed.called or charger.drop())
        return charger

    @defer.inlineCallbacks
    def test_splitRealAddressesCleanCloses(self):
        """
        Chargers through HAProxy are spread over both gateways, each
        gateway sees the charger's own address (the PROXY header), and
        the connections the gateways close -- one replaced by the
        charger's new connection (1000), those of a draining gateway
        (1012) -- end their HAProxy sessions normally (C{--}, not C{SD}).
        """
        chargers, local_ports = {}, {}
        for _ in range(6):
            identity = self.identity()
            chargers[identity] = yield self.charger(identity)
            local_ports[identity] = chargers[identity].protocol.transport.getHost().port
        placed = {}
        for n, service in enumerate(self.gateways, 1):
            for identity, link in service.gateway.chargers.items():
                placed[identity] = (f"gw{n}", link.peer)
        self.assertEqual(sorted(placed), sorted(chargers))
        self.assertEqual(sorted(gw for gw, _ in placed.values()), ["gw1"] * 3 + ["gw2"] * 3)
        for identity, port in local_ports.items():
            self.assertEqual(placed[identity][1], f"tcp4:127.0.0.1:{port}")

        moving = next(iter(chargers))
        old = chargers.pop(moving)
        chargers[moving] = yield self.charger(moving)
        code, _ = yield old.closed
        self.assertEqual(code, 1000)
        old_port = local_ports[moving]
        yield self.haproxy.wait_for(rf"^127\.0\.0\.1:{old_port} ")
        self.assertEqual(self.haproxy.sessions()[old_port][1], "--")
        local_ports[moving] = chargers[moving].protocol.transport.getHost().port

        draining = self.gateways[0]
        on_first = list(draining.gateway.chargers)
        yield draining.stopService()
        for identity in on_first:
            code, _ = yield chargers[identity].closed
            self.assertEqual(code, 1012)
        ports = {local_ports[i] for i in on_first}
        for port in ports:
            yield self.haproxy.wait_for(rf"^127\.0\.0\.1:{port} .* gateways/gw1 ")
        sessions = self.haproxy.sessions()
        self.assertEqual({sessions[port] for port in ports}, {("gw1", "--")})
