"""
How the gateway ends a connection it closes: the closing handshake, then a
graceful TCP close (FIN), never a reset -- seen by a raw socket client that
answers the close frame as a charger does. A load balancer in front logs a
reset as a session the server broke off.
"""

from __future__ import annotations

from twisted.internet import defer, threads

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
