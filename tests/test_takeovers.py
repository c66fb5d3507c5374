"""
Takeover messages between gateway processes: gathered over a short window,
one message per window, in a format every release reads when it names one
charger.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.takeovers import MAX_IDENTITIES, TAKEOVER_WINDOW, TakeoverBatch, identities_of


class TakeoverBatchTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.sent: list[dict] = []
        self.batch = TakeoverBatch(self.clock, self.sent.append, "node-1")

    def test_one_identity_in_the_single_form_after_the_window(self):
        self.batch.add("CP1")
        self.clock.advance(TAKEOVER_WINDOW * 0.99)
        self.assertEqual(self.sent, [])
        self.clock.advance(TAKEOVER_WINDOW * 0.02)
        self.assertEqual(self.sent, [{"type": "takeover", "node": "node-1", "identity": "CP1"}])

    def test_identities_of_one_window_share_a_message(self):
        for identity in ("CP1", "CP2", "CP3"):
            self.batch.add(identity)
            self.clock.advance(TAKEOVER_WINDOW / 4)
        self.clock.advance(TAKEOVER_WINDOW)
        self.assertEqual(self.sent, [{"type": "takeover", "node": "node-1",
                                      "identities": ["CP1", "CP2", "CP3"]}])

    def test_the_next_window_starts_with_the_next_identity(self):
        self.batch.add("CP1")
        self.clock.advance(TAKEOVER_WINDOW)
        self.clock.advance(TAKEOVER_WINDOW * 5)
        self.batch.add("CP2")
        self.clock.advance(TAKEOVER_WINDOW)
        self.assertEqual([m["identity"] for m in self.sent], ["CP1", "CP2"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_full_batch_goes_at_once(self):
        identities = [f"CP{i}" for i in range(MAX_IDENTITIES + 1)]
        for identity in identities:
            self.batch.add(identity)
        self.assertEqual([m["identities"] for m in self.sent], [identities[:MAX_IDENTITIES]])
        self.clock.advance(TAKEOVER_WINDOW)
        self.assertEqual(self.sent[1]["identity"], identities[-1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush_sends_now_and_leaves_no_timer(self):
        self.batch.add("CP1")
        self.batch.flush()
        self.assertEqual(len(self.sent), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.batch.flush()
        self.assertEqual(len(self.sent), 1)


class IdentitiesOfTests(SynchronousTestCase):
    def test_both_forms(self):
        self.assertEqual(identities_of({"type": "takeover", "identity": "CP1"}), ["CP1"])
        self.assertEqual(identities_of({"type": "takeover", "identities": ["CP1", "CP2"]}),
                         ["CP1", "CP2"])

    def test_other_or_malformed_messages_name_nobody(self):
        for message in ({"type": "here", "identity": "CP1"},
                        {"type": "takeover"},
                        {"type": "takeover", "identity": 7},
                        {"type": "takeover", "identities": "CP1"}):
            self.assertEqual(identities_of(message), [], message)
        self.assertEqual(identities_of({"type": "takeover", "identities": ["CP1", 7, None]}),
                         ["CP1"])
