"""
How the gateway ends a connection it closes: the closing handshake, then a
graceful TCP close (FIN), never a reset -- seen by a raw socket client that
answers the close frame as a charger does. A load balancer in front logs a
reset as a session the server broke off.
"""

from __future__ import annotations

from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from ocppgw.edge import ChargerFactory
from tests import rawclient
from tests.support import GatewayTestCase


def _closed_by_gateway(response: rawclient.Response):
    """
    In a thread: answer the gateway's close frame, then read until TCP
    ends; fires with (code, reason, "fin" or "reset").
    """

    def run():
        code, reason = response.close_handshake()
        return code, reason, response.how_closed()

    return threads.deferToThread(run)


class CleanCloseTests(GatewayTestCase):
    settings = {"listener": {"drain_window": "0.2"}}

    @defer.inlineCallbacks
    def open(self, identity: str):
        response = yield rawclient.handshake(self.port, f"/ocpp/{identity}", keep_open=True)
        self.addCleanup(response.close)
        self.assertEqual(response.status, 101)
        return response

    @defer.inlineCallbacks
    def assertClosedWithFin(self, close, expected_code: int):
        """
        C{close(identity)} makes the gateway close the charger's
        connection; the charger answers the close frame and sees a FIN.
        """
        identity = self.identity("FIN")
        old = yield self.open(identity)
        ending = _closed_by_gateway(old)
        yield close(identity)
        code, _reason, how = yield ending
        self.assertEqual((code, how), (expected_code, "fin"))

    def test_takeover1000(self):
        return self.assertClosedWithFin(self.open, 1000)

    def test_drain1012(self):
        return self.assertClosedWithFin(lambda _: self.gateway_service.stopService(), 1012)

    def test_shutdown1001(self):
        return self.assertClosedWithFin(
            lambda _: self.gateway_service.gateway.close_all(), 1001
        )

    @defer.inlineCallbacks
    def test_chargerClosesFirst(self):
        """A close the charger starts ends gracefully too (as before)."""
        response = yield self.open(self.identity("FIN"))

        def run():
            response.send_frame(0x8, b"\x03\xe8")
            opcode, body = response.read_frame()
            return opcode, body, response.how_closed()

        opcode, body, how = yield threads.deferToThread(run)
        self.assertEqual((opcode, body[:2], how), (0x8, b"\x03\xe8", "fin"))


class _Hub:
    def __init__(self):
        self.closed = []

    def charger_closed(self, edge, code, reason):
        self.closed.append(code)


class _StuckTransport(StringTransport):
    """A transport whose graceful close never completes (nothing is read)."""

    def __init__(self):
        super().__init__()
        self.aborted = False

    def abortConnection(self):
        self.aborted = True

    def unregisterProducer(self):
        self.producer = None


class CloseFallbackTests(unittest.SynchronousTestCase):
    """
    In memory: a graceful close the charger does not let go of is aborted
    after the close timeout, and not before.
    """

    def setUp(self):
        self.clock = Clock()
        self.factory = ChargerFactory(_Hub(), self.clock, close_timeout=5.0)
        self.protocol = self.factory.buildProtocol(None)
        self.transport = _StuckTransport()
        self.protocol.makeConnection(self.transport)

    def test_abortAfterCloseTimeout(self):
        self.protocol.wasClean = True
        self.protocol.dropConnection(abort=True)
        self.assertTrue(self.transport.disconnecting)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(4.9)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.4)
        self.assertTrue(self.transport.aborted)

    def test_noAbortOnceClosed(self):
        self.protocol.wasClean = True
        self.protocol.dropConnection(abort=True)
        self.protocol.connectionLost()
        self.clock.advance(10)
        self.assertFalse(self.transport.aborted)

    def test_uncleanDropAbortsAtOnce(self):
        """Anything else that aborts (a ping timeout) still does."""
        self.protocol.dropConnection(abort=True)
        self.assertTrue(self.transport.aborted)
