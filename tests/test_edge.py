"""
The WebSocket edge's pure helpers, in memory: subprotocol choice, the
completion of upgrade requests without C{Connection: Upgrade}, and the
permessage-deflate terms.
"""

from __future__ import annotations

from autobahn.websocket.compress import PerMessageDeflate, PerMessageDeflateOffer
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.edge import accept_deflate, add_connection_upgrade, choose_subprotocol

ENABLED = ("ocpp1.6", "ocpp2.0", "ocpp2.0.1", "ocpp2.1")


class ChooseSubprotocolTests(SynchronousTestCase):
    def test_charger_order(self):
        self.assertEqual(choose_subprotocol(["ocpp2.0.1", "ocpp1.6"], ENABLED), "ocpp2.0.1")

    def test_case_insensitive_own_spelling(self):
        """The charger's spelling comes back, for the 101 to echo."""
        self.assertEqual(choose_subprotocol(["OCPP1.6"], ENABLED), "OCPP1.6")
        self.assertEqual(choose_subprotocol([" Ocpp2.0.1 "], ENABLED), "Ocpp2.0.1")
        self.assertEqual(choose_subprotocol(["ocpp1.6"], ["OCPP1.6"]), "ocpp1.6")

    def test_soap_never(self):
        self.assertIsNone(choose_subprotocol(["OCPP1.5", "ocpp1.2"], ENABLED + ("ocpp1.5",)))

    def test_disabled_never(self):
        self.assertIsNone(choose_subprotocol(["OCPP2.1"], ["ocpp1.6"]))


def head(*lines: str) -> bytes:
    return ("\r\n".join(("GET /ocpp/CP1 HTTP/1.1",) + lines) + "\r\n\r\n").encode()


UPGRADE = ("Host: gw", "Upgrade: websocket", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
           "Sec-WebSocket-Version: 13")


class AddConnectionUpgradeTests(SynchronousTestCase):
    def test_missing_header_added(self):
        data = head(*UPGRADE) + b"\x81\x80rest"
        completed = add_connection_upgrade(data)
        self.assertEqual(completed, head(*UPGRADE, "Connection: Upgrade") + b"\x81\x80rest")

    def test_header_without_token_completed(self):
        completed = add_connection_upgrade(head(*UPGRADE, "Connection: keep-alive"))
        self.assertEqual(completed,
                         head(*UPGRADE, "Connection: keep-alive", "Connection: Upgrade"))

    def test_good_requests_untouched(self):
        for connection in ("Connection: Upgrade", "connection: keep-alive, upgrade",
                           "CONNECTION:UPGRADE", "Connection: upgrade , close"):
            self.assertIsNone(add_connection_upgrade(head(*UPGRADE, connection)), connection)

    def test_incomplete_request_waits(self):
        self.assertIsNone(add_connection_upgrade(b"GET /ocpp/CP1 HTTP/1.1\r\nHost: gw\r\n"))

    def test_not_a_websocket_upgrade_untouched(self):
        """Only a complete RFC 6455 upgrade is completed; autobahn answers the rest."""
        without = [line for line in UPGRADE]
        cases = {
            "plain GET": head("Host: gw"),
            "other upgrade": head(*[line.replace("websocket", "h2c") for line in without]),
            "no key": head(*[line for line in without if "Key" not in line]),
            "draft version": head(*[line.replace(": 13", ": 8") for line in without]),
            "no version": head(*[line for line in without if "Version" not in line]),
            "broken header block": head(*without, "bad header line"),
        }
        for why, data in cases.items():
            self.assertIsNone(add_connection_upgrade(data), why)


class AcceptDeflateTests(SynchronousTestCase):
    def test_small_windows_no_context(self):
        offer = PerMessageDeflateOffer.parse({"client_max_window_bits": [True]})
        accept = accept_deflate([offer])
        self.assertEqual(accept.get_extension_string(),
                         "permessage-deflate; client_max_window_bits=9")
        deflate = PerMessageDeflate.create_from_offer_accept(True, accept)
        self.assertEqual(
            (deflate.server_max_window_bits, deflate.client_max_window_bits,
             deflate.mem_level, deflate.server_no_context_takeover),
            (9, 9, 1, True),
        )

    def test_client_window_left_when_not_offered(self):
        accept = accept_deflate([PerMessageDeflateOffer.parse({})])
        self.assertEqual(accept.get_extension_string(), "permessage-deflate")
        deflate = PerMessageDeflate.create_from_offer_accept(True, accept)
        self.assertEqual((deflate.server_max_window_bits, deflate.client_max_window_bits),
                         (9, 15))

    def test_client_limits_respected(self):
        """A charger asking for a small server window or no context gets them."""
        offer = PerMessageDeflateOffer.parse(
            {"server_max_window_bits": ["10"], "server_no_context_takeover": [True]})
        accept = accept_deflate([offer])
        self.assertEqual(accept.get_extension_string(),
                         "permessage-deflate; server_no_context_takeover; "
                         "server_max_window_bits=10")

    def test_nothing_offered(self):
        self.assertIsNone(accept_deflate([]))
