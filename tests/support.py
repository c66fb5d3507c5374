"""
Fixtures that several test modules share: a real gateway against the
real broker (L{GatewayTestCase}, L{SecurityTestCase}), a gateway in memory
on a fake broker (L{InMemoryGateway}), a charger's session alone
(L{RecordingEffects}), and helpers for the broker, the admin listener,
processes, logs and hand-written handshakes.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import os
import socket
import subprocess
import sys
from typing import Optional
from urllib.parse import quote

import orjson
from autobahn.twisted.testing import create_memory_agent
from autobahn.twisted.websocket import WebSocketClientProtocol
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from ocppgw import cli
from ocppgw.amqp import BackEndClient
from ocppgw.broker import Bridge
from ocppgw.config import settings_from_dict
from ocppgw.edge import ChargerFactory
from ocppgw.gateway import Gateway
from ocppgw.service import GatewayService
from ocppgw.testing import FakeBackEnd, FakeBridge, FakeCharger, amqp_url, unique_name
from tests.certs import ThrowAwayPKI
from tests.rawhttp import WEBSOCKET_GUID, raw_request, upgrade_request, websocket_key


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delete_exchange(name: str) -> defer.Deferred:
    """
    Delete a test's exchange from the shared broker.
    """
    return delete_from_broker(name)


@defer.inlineCallbacks
def start_gateway(testcase: unittest.TestCase, values: dict):
    """
    A L{GatewayService} built from settings C{values} (by section), started,
    and stopped when C{testcase} cleans up.
    """
    service = GatewayService(settings_from_dict(values), reactor)
    service.startService()
    testcase.addCleanup(lambda: service.running and service.stopService())
    yield service.started
    return service


class LogEvents:
    """
    Every log event published while a test runs, and a way to wait for
    one (instead of sleeping until it has probably been logged).
    """

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.events: list[dict] = []
        self._waiting: list = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        for entry in list(self._waiting):
            predicate, d = entry
            if predicate(event):
                self._waiting.remove(entry)
                d.callback(event)

    def matching(self, **fields) -> list[dict]:
        return [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]

    def wait_for(self, **fields) -> defer.Deferred:
        """The first event (already seen or still to come) with C{fields}."""
        seen = self.matching(**fields)
        if seen:
            return defer.succeed(seen[0])
        d = defer.Deferred()
        self._waiting.append(
            (lambda event: all(event.get(k) == v for k, v in fields.items()), d)
        )
        return d


@defer.inlineCallbacks
def delete_from_broker(exchange: str, identities=()):
    """
    Delete a test's charger queues and its exchange from the shared broker.
    """
    admin = yield BackEndClient.connect(reactor, amqp_url(), exchange)
    try:
        for identity in identities:
            yield admin.delete_queue("ocpp." + identity)
        yield admin.delete_exchange(exchange)
    finally:
        yield admin.close()


def deep_merge(base: dict, extra: dict) -> dict:
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in extra.items():
        merged.setdefault(section, {}).update(values)
    return merged


class GatewayTestCase(unittest.TestCase):
    """
    Runs a gateway on a free port with its own exchange, and a back end.

    Every identity made with L{identity} has its queue deleted afterwards,
    and the exchange is deleted too, so runs leave nothing on the broker.
    """

    #: extra settings, by section, for a test class
    settings: dict = {}
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.exchange = unique_name("ocpp-test")
        self._identities = []
        values = deep_merge(
            {
                # within any open-files limit: the default (100000) is above
                # this machine's, and the gateway warns about that at start
                "listener": {"tcp.ip": "127.0.0.1", "tcp.port": "0",
                             "max_connections": "1000"},
                # a free port: concurrent runs must not fight over 9100
                "admin": {"tcp.port": "0"},
                "amqp": {
                    "url": amqp_url(),
                    "exchange": self.exchange,
                    # unique, so that a test closing "its" connection on the
                    # broker never hits a concurrent run's gateway
                    "node": unique_name("node"),
                    "consumer_channels": "2",
                    "declare_channels": "2",
                },
                "queue": {"x-expires": "600000"},
            },
            self.settings,
        )
        self.gateway_service = GatewayService(settings_from_dict(values), reactor)
        self.gateway_service.startService()
        self.addCleanup(self._cleanup)
        yield self.gateway_service.started
        self.port = self.gateway_service.listening_port.getHost().port
        self.backend = yield FakeBackEnd.start(reactor, amqp_url(), self.exchange)

    @defer.inlineCallbacks
    def _cleanup(self):
        if self.gateway_service.running:
            yield self.gateway_service.stopService()
        backend = getattr(self, "backend", None)
        if backend is not None:
            yield backend.stop()
        yield delete_from_broker(self.exchange, self._identities)

    def identity(self, prefix: str = "CP") -> str:
        identity = unique_name(prefix)
        self._identities.append(identity)
        return identity

    def url(self, identity: str, path: str = "/ocpp") -> str:
        return f"ws://127.0.0.1:{self.port}{path}/{quote(identity, safe='')}"

    @defer.inlineCallbacks
    def connect(self, identity: str, subprotocols=("ocpp1.6",)):
        charger = yield FakeCharger.connect(reactor, self.url(identity), subprotocols)
        self.addCleanup(self._close_charger, charger)
        return charger

    @staticmethod
    def _close_charger(charger: FakeCharger):
        if not charger.closed.called:
            return charger.drop()
        return None


# -- a gateway in memory ------------------------------------------------------


class MemoryCharger(WebSocketClientProtocol):
    """
    A charger's WebSocket client connected to an L{InMemoryGateway} over
    in-memory transports: what it received, and how it was refused or
    closed.

    @ivar received: every frame the gateway sent, decoded, in order.
    @ivar code: the close code once closed (1006 for a refused handshake).
    """

    def __init__(self) -> None:
        super().__init__()
        self.received: list = []
        self.opened = False
        self.code = None
        self.reason = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append(orjson.loads(payload))

    def onClose(self, wasClean: bool, code, reason) -> None:
        self.code, self.reason = code, reason

    @property
    def closed(self) -> bool:
        return self.code is not None

    @property
    def status(self) -> int:
        """The HTTP status of the gateway's answer to the opening handshake."""
        return int(self.http_status_line.split()[1])

    @property
    def response_headers(self) -> dict:
        return self.http_headers

    def send(self, frame) -> None:
        """Send a frame: a list (encoded as JSON) or text as it is."""
        if isinstance(frame, (list, tuple)):
            frame = orjson.dumps(list(frame))
        elif isinstance(frame, str):
            frame = frame.encode("utf-8")
        self.sendMessage(frame, False)


class _Pumps:
    """
    Moves the bytes of every in-memory connection at once, when told
    (autobahn's own pumper polls on the global reactor instead, which a
    L{SynchronousTestCase} does not run).
    """

    def __init__(self) -> None:
        self._pumps: list = []

    def add(self, pump) -> None:
        self._pumps.append(pump)

    def flush(self) -> None:
        for pump in list(self._pumps):
            pump.flush()
            if pump.clientIO.disconnected and pump.serverIO.disconnected:
                self._pumps.remove(pump)


def protocol_only(implementation, protocol: type):
    """
    A view of C{implementation} with nothing but the members C{protocol}
    declares, so that code given it cannot come to depend on more.
    """
    members = {name for name in vars(protocol) if not name.startswith("_")}

    class View:
        def __getattr__(self, name):
            if name not in members:
                raise AttributeError(f"{name!r} is not part of {protocol.__name__}")
            return getattr(implementation, name)

    return View()


class InMemoryGateway:
    """
    A L{Gateway} on a L{FakeBridge}, with its WebSocket edge (a real
    L{ChargerFactory}) and its chargers (real autobahn clients) connected
    by autobahn's in-memory agent: no broker, no sockets, time on a
    C{MemoryReactorClock}. Everything runs synchronously; L{flush} (done
    by every helper here) moves the bytes.
    """

    def __init__(self, gateway_options: Optional[dict] = None,
                 factory_options: Optional[dict] = None,
                 bridge: Optional[FakeBridge] = None,
                 clock: Optional[MemoryReactorClock] = None) -> None:
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.bridge = bridge if bridge is not None else FakeBridge()
        # the gateway sees only what the Bridge protocol promises
        self.gateway = Gateway(self.clock, protocol_only(self.bridge, Bridge), node="node-1",
                               queue_arguments={"x-queue-type": "classic"},
                               **(gateway_options or {}))
        self.factory = ChargerFactory(self.gateway, self.clock, **(factory_options or {}))
        self._pumps = _Pumps()
        self._agent = create_memory_agent(
            self.clock, self._pumps, lambda: self.factory.buildProtocol(None)
        )

    def flush(self) -> None:
        """Run what is due now (a reactor turn) and move the bytes."""
        self.clock.advance(0)
        self._pumps.flush()

    def advance(self, seconds: float) -> None:
        """Let C{seconds} pass, moving the bytes that makes flow."""
        self.clock.advance(seconds)
        self._pumps.flush()

    def connect(self, identity: str, subprotocols=("ocpp1.6",), headers=None,
                path: str = "/ocpp/") -> MemoryCharger:
        """
        A charger opening its WebSocket, as far as the gateway lets it
        (check C{opened}, or C{status} and C{code} for a refusal).
        """
        options = {"protocols": list(subprotocols)}
        if headers:
            options["headers"] = headers
        # the agent's Deferred fires only once open: keep the charger as
        # it is made, to tell how it was refused
        made: list = []

        def make() -> MemoryCharger:
            made.append(MemoryCharger())
            return made[-1]

        self._agent.open(f"ws://gateway.test{path}{identity}", options, make)
        charger = made[0]
        self.flush()
        return charger


# -- the real broker ----------------------------------------------------------


def close_broker_connections(connection_name: str) -> defer.Deferred:
    """
    Close, from the broker's side, every connection named C{connection_name}.
    """

    def close():
        # The plain listing (not JSON) prints pids the way
        # close_connection accepts them.
        listing = subprocess.run(
            ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
            check=True, capture_output=True, text=True,
        ).stdout
        closed = 0
        for line in listing.splitlines():
            pid, _, properties = line.partition("\t")
            if pid.startswith("<") and connection_name in properties:
                subprocess.run(
                    ["rabbitmqctl", "-q", "close_connection", pid, "closed by test"],
                    check=True, capture_output=True,
                )
                closed += 1
        return closed

    return threads.deferToThread(close)


# -- the admin listener and its metrics ---------------------------------------


@defer.inlineCallbacks
def http(port: int, path: str, method: bytes = b"GET", headers: dict | None = None):
    """
    One request to the admin listener: (status, headers, body bytes).
    """
    agent = Agent(reactor)
    response = yield agent.request(
        method,
        f"http://127.0.0.1:{port}{path}".encode("ascii"),
        Headers({k: [v] for k, v in (headers or {}).items()}),
    )
    body = yield readBody(response)
    return response.code, response.headers, body


def samples(text: bytes) -> dict:
    """
    The scraped samples as {(name, ((label, value), ...)): value}.
    """
    found = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


# -- a charger's session without a gateway ------------------------------------


class RecordingEffects:
    """
    A L{SessionEffects} that records what the session asks for.
    """

    def __init__(self):
        self.sent = []
        self.published = []
        self.replies = []
        self.acked = []
        self.rejected = []
        self.requeued = []
        self.closed = []
        #: tags of deliveries whose broker connection is gone
        self.lost = set()

    def send_to_charger(self, frame):
        self.sent.append(json.loads(frame))

    def publish(
        self,
        routing_key,
        body,
        correlation_id,
        action,
        mandatory,
        on_outcome,
        extra_headers=None,
    ):
        self.published.append(
            dict(
                routing_key=routing_key,
                body=body,
                correlation_id=correlation_id,
                action=action,
                mandatory=mandatory,
                on_outcome=on_outcome,
                extra_headers=extra_headers,
            )
        )

    def publish_reply(
        self, reply_to, correlation_id, body, on_outcome, extra_headers=None
    ):
        self.replies.append(
            dict(
                reply_to=reply_to,
                correlation_id=correlation_id,
                body=body,
                on_outcome=on_outcome,
            )
        )

    def ack(self, delivery):
        self.acked.append(delivery.tag)

    def reject(self, delivery, reason):
        self.rejected.append((delivery.tag, reason))

    def requeue(self, delivery):
        self.requeued.append(delivery.tag)

    def current(self, delivery):
        return delivery.tag not in self.lost

    def close(self, code, reason):
        self.closed.append(code)


def frame(*elements) -> bytes:
    return json.dumps(list(elements)).encode()


# -- processes ----------------------------------------------------------------


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_file(testcase, text: str) -> str:
    """A configuration file with C{text} in C{testcase}'s temporary directory."""
    path = os.path.abspath(testcase.mktemp())
    with open(path, "w") as f:
        f.write(text)
    return path


class ProcessOutput(protocol.ProcessProtocol):
    """
    Collects a child's output (stdout and stderr together); C{ready} fires
    when C{marker} is printed, L{wait_for} when any other text is.
    """

    def __init__(self, marker: bytes | None):
        self.output = b""
        self.marker = marker
        self.ready: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self._waiting: list[tuple[bytes, int, defer.Deferred]] = []
        if marker is not None:
            self._waiting.append((marker, 0, self.ready))

    def wait_for(self, text: bytes) -> defer.Deferred:
        """Fires once C{text} appears in output printed from now on."""
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((text, len(self.output), d))
        self._check()
        return d

    def _check(self) -> None:
        for entry in list(self._waiting):
            text, since, d = entry
            if text in self.output[since:]:
                self._waiting.remove(entry)
                d.callback(None)

    def outReceived(self, data):
        self.output += data
        self._check()

    errReceived = outReceived

    def processEnded(self, reason):
        waiting, self._waiting = self._waiting, []
        for text, _since, d in waiting:
            d.errback(RuntimeError(
                f"ended before {text!r} was printed:\n" + self.output.decode(errors="replace")
            ))
        self.ended.callback(reason.value)


def spawn_twistd(config_path: str) -> ProcessOutput:
    """
    C{twistd -n ocppgw --config config_path} as a child of the test, run
    from the checkout; its output collected (see L{ProcessOutput}).
    """
    child = ProcessOutput(None)
    reactor.spawnProcess(
        child, sys.executable,
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "ocppgw", "--config", config_path],
        env={**os.environ, "PYTHONPATH": REPO}, path=REPO,
    )
    return child


# -- asyncio clients ----------------------------------------------------------


#: Bound on every asyncio step, well inside the test timeout.
STEP_TIMEOUT = 10.0


def as_deferred(coro, timeout: float = STEP_TIMEOUT) -> defer.Deferred:
    """
    Run a coroutine on the asyncio loop the reactor runs on, bounded by
    C{timeout}, as a Deferred.
    """
    return defer.Deferred.fromFuture(
        asyncio.ensure_future(asyncio.wait_for(coro, timeout))
    )


# -- logs ---------------------------------------------------------------------


class LogCapture:
    """Events logged while a test runs."""

    def __init__(self, testcase) -> None:
        self.events: list = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def with_event(self, event: str) -> list:
        return [e for e in self.events if e.get("event") == event]


# -- security profiles and TLS ------------------------------------------------


SERVER_NAME = "localhost"


def add_password(path: str, identity: str, password: bytes, *, hex_: bool = False) -> None:
    import io
    import sys

    stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO((password.hex() if hex_ else password.decode())
                                            .encode() + b"\n"))
    stdout = sys.stdout
    sys.stdout = io.StringIO()
    try:
        argv = ["passwd", path, identity, "--stdin"] + (["--hex"] if hex_ else [])
        if cli.main(argv) != 0:
            raise AssertionError("ocppgw passwd failed")
    finally:
        sys.stdin, sys.stdout = stdin, stdout


class SecurityTestCase(GatewayTestCase):
    """
    A gateway whose settings are made per test (files in a temporary
    directory): override L{security_settings}.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.pki = ThrowAwayPKI(os.path.join(self.directory, "pki"))
        self._identities = []
        self.settings = self.security_settings()
        early = self._identities
        yield super().setUp()
        # the base class starts a new list; keep the settings' identities
        # in it so their queues are deleted too
        self._identities.extend(early)

    def security_settings(self) -> dict:
        raise NotImplementedError

    def port_of(self, kind: str) -> int:
        return self.gateway_service.listening_ports[kind].getHost().port

    def path(self, identity: str) -> str:
        return "/ocpp/" + quote(identity, safe="")

    def wss_url(self, identity: str) -> str:
        return f"wss://localhost:{self.port_of('ssl')}{self.path(identity)}"

    def client_tls(self, issued=None, pki=None):
        trust = Certificate.loadPEM(open(self.pki.cafile).read())
        client = None
        if issued is not None:
            client = PrivateCertificate.loadPEM(
                open(issued.certfile).read() + open(issued.keyfile).read()
            )
        return optionsForClientTLS(SERVER_NAME, trustRoot=trust, clientCertificate=client)

    @defer.inlineCallbacks
    def connect_wss(self, identity, issued=None, headers=None, subprotocols=("ocpp1.6",)):
        charger = yield FakeCharger.connect(
            reactor, self.wss_url(identity), subprotocols, headers=headers,
            tls=self.client_tls(issued),
        )
        self.addCleanup(self._close_charger, charger)
        return charger


# -- hand-written handshakes -------------------------------------------------


class RawHandshakeMixin:
    """
    Raw handshake helpers for a L{GatewayTestCase}.
    """

    def setUp(self):
        # A failure inside autobahn's handshake callbacks is logged when its
        # Deferred is garbage-collected; collect once the gateway is gone
        # (this cleanup runs after GatewayTestCase's) so that it is blamed
        # on the test that caused it.
        self.addCleanup(gc.collect)
        return super().setUp()

    def handshake(self, path: str, protocols: Optional[str] = "ocpp1.6", **kw):
        return raw_request(self.port, upgrade_request(self.port, path, protocols, **kw))

    @defer.inlineCallbacks
    def assertRefused(self, path: str, status: int = 400, protocols="ocpp1.6"):
        """
        The handshake for C{path} is answered with C{status} and no upgrade.
        """
        response = yield self.handshake(path, protocols)
        self.assertEqual(
            response.status, status, f"{path!r} offering {protocols!r}: {response!r}"
        )
        self.assertIsNone(response.header("sec-websocket-accept"))
        return response

    @defer.inlineCallbacks
    def assertUpgraded(self, path: str, protocols="ocpp1.6"):
        """
        The handshake for C{path} is answered with 101 and a correct accept
        key; returns the response.
        """
        key = websocket_key()
        response = yield self.handshake(path, protocols, key=key)
        self.assertEqual(
            response.status, 101, f"{path!r} offering {protocols!r}: {response!r}"
        )
        expected = base64.b64encode(
            hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()
        ).decode("ascii")
        self.assertEqual(response.header("sec-websocket-accept"), expected)
        return response

    def own(self, identity: str) -> str:
        """Have the queue of a hand-made identity deleted after the test."""
        self._identities.append(identity)
        return identity


class SilentClient(protocol.Protocol):
    """
    Connects, sends half a request, and waits to be dropped.
    """

    def __init__(self) -> None:
        self.lost: defer.Deferred = defer.Deferred()
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(b"GET /ocpp/CP1 HTTP/1.1\r\nHost: x\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)
