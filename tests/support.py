"""
Shared fixtures: a real gateway against the real broker
(L{GatewayTestCase}), and a gateway in memory on a fake broker
(L{InMemoryGateway}).
"""

from __future__ import annotations

import socket
from typing import Optional
from urllib.parse import quote

import orjson
from autobahn.twisted.testing import create_memory_agent
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from ocppgw.amqp import BackEndClient
from ocppgw.broker import Bridge
from ocppgw.config import settings_from_dict
from ocppgw.edge import ChargerFactory
from ocppgw.gateway import Gateway
from ocppgw.service import GatewayService
from ocppgw.testing import FakeBackEnd, FakeBridge, FakeCharger, amqp_url, unique_name


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
                "listener": {"tcp.ip": "127.0.0.1", "tcp.port": "0"},
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


# -- a gateway in memory -------------------------------------------------------------


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
