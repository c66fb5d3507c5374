"""
L{ocppgw.trims}: the batched timer autobahn's per-connection timers use.
"""

from twisted.internet.task import Clock
from twisted.trial import unittest

from ocppgw.trims import BucketTimer


class BucketTimerTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(100.05)
        self.timer = BucketTimer(self.clock, bucket_seconds=0.2)
        self.fired = []

    def test_never_early_at_most_one_bucket_late(self):
        """
        A call is due at the end of the bucket its due time falls in: not
        before its delay, and less than a bucket after it.
        """
        self.timer.call_later(0.5, self.fired.append, "a")
        self.clock.advance(0.49)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.2)
        self.assertEqual(self.fired, ["a"])

    def test_one_reactor_call_per_bucket(self):
        """Calls due in the same bucket share one reactor timer."""
        for delay in (1.01, 1.05, 1.1):
            self.timer.call_later(delay, self.fired.append, delay)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1.2)
        self.assertEqual(sorted(self.fired), [1.01, 1.05, 1.1])

    def test_cancel(self):
        """
        A cancelled call does not run; the bucket's reactor timer goes
        with its last call; cancelling twice is harmless.
        """
        first = self.timer.call_later(1.0, self.fired.append, 1)
        second = self.timer.call_later(1.0, self.fired.append, 2)
        first.cancel()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        second.cancel()
        second.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(2)
        self.assertEqual(self.fired, [])

    def test_error_logged_others_run(self):
        """A call that raises is logged; the others in its bucket still run."""

        def broken():
            raise ZeroDivisionError()

        self.timer.call_later(1.0, broken)
        self.timer.call_later(1.0, self.fired.append, "ok")
        self.clock.advance(1.2)
        self.assertEqual(self.fired, ["ok"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
