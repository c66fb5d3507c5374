"""
Shared fixtures for tests that run a real gateway against the real broker.
"""

from __future__ import annotations

import socket
from urllib.parse import quote

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from ocppgw.amqp import BackEndClient
from ocppgw.config import settings_from_dict
from ocppgw.service import GatewayService
from ocppgw.testing import FakeBackEnd, FakeCharger, amqp_url, unique_name


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
