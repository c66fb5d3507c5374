"""
ocppgw.status without a gateway: the bounded lists of refusals and
disconnects, what they keep of untrusted text, the page's content policy.
"""

from __future__ import annotations

import base64
import hashlib
import re

from twisted.internet.task import Clock
from twisted.trial import unittest

from ocppgw import status


class RecentEventsTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.recent = status.RecentEvents(self.clock)

    def snapshot(self) -> dict:
        return status.snapshot(
            node="gw1", broker_state="open", readiness={"broker": True}, chargers=[],
            recent=self.recent, now=self.clock.seconds(),
        )

    def test_bounded_newest_first(self):
        """A storm of refusals keeps the last RECENT, newest first."""
        for n in range(status.RECENT + 25):
            self.clock.advance(1)
            self.recent.refused("ws", 503, peer=f"tcp4:10.0.0.1:{n}", reason="Service Unavailable")
        refusals = self.snapshot()["refusals"]
        self.assertEqual(len(refusals), status.RECENT)
        self.assertEqual(refusals[0]["peer"], f"tcp4:10.0.0.1:{status.RECENT + 24}")
        self.assertEqual(refusals[-1]["peer"], "tcp4:10.0.0.1:25")
        self.assertEqual(refusals[0]["time"], "1970-01-01T00:01:15.000Z")

    def test_untrusted_text_cut_and_escaped(self):
        """A charger's close reason is kept short and on one line."""

        self.recent.disconnected("CP\n1", "ocpp1.6", "ws", 4000, reason="x" * 500 + "\r\nFAKE")
        [entry] = self.snapshot()["disconnects"]
        self.assertNotIn("\n", entry["identity"])
        self.assertNotIn("\n", entry["reason"])
        self.assertLess(len(entry["reason"]), 160)
        self.assertIn("more characters", entry["reason"])


class PageTests(unittest.SynchronousTestCase):
    def test_policy_names_the_inline_script_and_style(self):
        page = status.page()
        text = page.html.decode("utf-8")
        policy = page.content_security_policy.decode("ascii")
        for kind in ("script", "style"):
            [body] = re.findall(rf"<{kind}>(.*?)</{kind}>", text, re.S)
            digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode()
            self.assertIn(f"{kind}-src 'sha256-{digest}'", policy)
        self.assertIn("connect-src 'self'", policy)
