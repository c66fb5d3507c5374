"""
L{ocppgw.lograte}: a burst of lines per key and window, the rest counted
and summed up in one line when the window ends.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial import unittest

from ocppgw.lograte import RateLimitedLog


class RateLimitedLogTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.limited = RateLimitedLog(
            Logger(observer=self.events.append), self.clock, burst=3, interval=60.0
        )

    def emit(self, key="a", peer="p", level=LogLevel.info) -> bool:
        return self.limited.emit(key, level, "Refused {peer}", peer=peer, reason=key)

    def messages(self):
        return [formatEvent(e) for e in self.events]

    def test_burstThenCounted(self):
        results = [self.emit(peer=f"p{n}") for n in range(5)]
        self.assertEqual(results, [True, True, True, False, False])
        self.assertEqual(self.messages(), ["Refused p0", "Refused p1", "Refused p2"])

    def test_summaryWhenTheWindowEnds(self):
        for n in range(7):
            self.clock.advance(1)
            self.emit(peer=f"p{n}", level=LogLevel.warn)
        self.clock.advance(53.9)
        self.assertEqual(len(self.events), 3)
        self.clock.advance(0.2)
        summary = self.events[-1]
        self.assertEqual(
            formatEvent(summary),
            "4 more like this in 60 s were not logged one by one; the last: Refused p6",
        )
        self.assertEqual((summary["suppressed"], summary["reason"], summary["peer"]),
                         (4, "a", "p6"))
        self.assertEqual(summary["log_level"], LogLevel.warn)
        # a new window starts with the next event
        self.assertTrue(self.emit(peer="later"))
        self.assertEqual(self.messages()[-1], "Refused later")

    def test_keysAreIndependent(self):
        for _ in range(4):
            self.emit("a")
        self.assertTrue(self.emit("b"))

    def test_quietWindowEndsWithoutSummary(self):
        for _ in range(3):
            self.emit()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(61)
        self.assertTrue(self.emit())
        self.assertEqual(len(self.events), 4)

    def test_flush(self):
        for _ in range(5):
            self.emit()
        self.clock.advance(10)
        self.limited.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.events[-1]["suppressed"], 2)
        self.assertIn("2 more like this in 10 s", formatEvent(self.events[-1]))
        self.assertTrue(self.emit())
