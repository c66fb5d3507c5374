"""
Accept-rate and message-rate limits.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.limits import OVER, TOO_MANY, WITHIN, Admission, MessageRateLimit, TokenBucket
from tests.support import GatewayTestCase, RawHandshakeMixin


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        clock = Clock()
        bucket = TokenBucket(clock, rate=2, burst=3)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        clock.advance(0.5)  # one token back
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        clock.advance(100)  # never more than the burst
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])

    def test_zero_rate_is_unlimited(self):
        bucket = TokenBucket(Clock(), rate=0, burst=1)
        self.assertTrue(all(bucket.take() for _ in range(1000)))


class MessageRateLimitTests(SynchronousTestCase):
    """
    One charger's message rate: a token bucket and the streak of frames
    over it.
    """

    def test_streak_ends_in_too_many(self):
        clock = Clock()
        limit = MessageRateLimit(clock, rate=1, burst=2, max_violations=3)
        self.assertEqual([limit.check() for _ in range(5)],
                         [WITHIN, WITHIN, OVER, OVER, TOO_MANY])
        self.assertEqual(limit.violations, 3)
        self.assertEqual(limit.check(), TOO_MANY)

    def test_a_second_within_the_rate_ends_the_streak(self):
        clock = Clock()
        limit = MessageRateLimit(clock, rate=1, burst=1, max_violations=3)
        self.assertEqual([limit.check(), limit.check(), limit.check()],
                         [WITHIN, OVER, OVER])
        clock.advance(1.0)  # a token back, but not a second since the last excess
        self.assertEqual(limit.check(), WITHIN)
        self.assertEqual(limit.violations, 2)
        clock.advance(1.5)
        self.assertEqual(limit.check(), WITHIN)
        self.assertEqual(limit.violations, 0)
        self.assertEqual([limit.check(), limit.check()], [OVER, OVER])

    def test_within_tests_false(self):
        limit = MessageRateLimit(Clock(), rate=5, burst=5, max_violations=1)
        self.assertFalse(limit.check())
        self.assertEqual(limit.last_violation, 0.0)


class AdmissionTests(SynchronousTestCase):
    def test_rate_refusal_with_random_retry_after(self):
        draws = []

        def random_int(low, high):
            draws.append((low, high))
            return high

        clock = Clock()
        admission = Admission(clock, rate=1, burst=2, retry_after_max=7, random_int=random_int)
        self.assertIsNone(admission.admit())
        self.assertIsNone(admission.admit())
        self.assertEqual(admission.admit(), 7)
        self.assertEqual(draws, [(1, 7)])
        self.assertEqual(admission.refused, 1)
        clock.advance(1)
        self.assertIsNone(admission.admit())

    def test_concurrent_handshakes_capped(self):
        admission = Admission(Clock(), max_concurrent=2, random_int=lambda low, high: 3)
        self.assertIsNone(admission.admit())
        self.assertIsNone(admission.admit())
        self.assertEqual(admission.admit(), 3)
        admission.done()
        self.assertIsNone(admission.admit())
        self.assertEqual(admission.in_progress, 2)


class AcceptRateHandshakeTests(RawHandshakeMixin, GatewayTestCase):
    """
    Over the accept rate: 503 with a Retry-After, and no queue declared.
    """

    settings = {"listener": {"accept_rate": "0.01", "accept_burst": "1",
                             "retry_after_max": "5"}}

    @defer.inlineCallbacks
    def test_second_handshake_refused_with_retry_after(self):
        yield self.assertUpgraded(f"/ocpp/{self.identity()}")
        refused_identity = self.identity()
        response = yield self.assertRefused(f"/ocpp/{refused_identity}", 503)
        self.assertTrue(1 <= int(response.header("retry-after")) <= 5, response)
        # refused before any broker work: its queue was never declared
        channel = self.backend.client._channel
        try:
            yield channel.queue_declare("ocpp." + refused_identity, passive=True)
        except Exception as error:
            self.assertIn("NOT_FOUND", str(error))
        else:
            self.fail("the refused charger's queue exists")
