"""
Accept-rate and message-rate limits, and the session's handling of
commands redelivered after a broker reconnect.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.framing import OCPP16
from ocppgw.limits import Admission, TokenBucket
from ocppgw.session import ChargerSession, Delivery, PublishOutcome
from tests.support import GatewayTestCase, RawHandshakeMixin, RecordingEffects, frame


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


class RedeliveryTests(SynchronousTestCase):
    """
    After a broker reconnect the unacknowledged commands come back with
    C{redelivered}; the charger must not get them twice.
    """

    def setUp(self):
        self.effects = RecordingEffects()
        self.session = ChargerSession("CP", OCPP16, self.effects, Clock())

    def call(self, message_id, tag, redelivered=False):
        body = frame(2, message_id, "Reset", {"type": "Soft"})
        self.session.delivery(Delivery(tag, body, redelivered=redelivered))

    def test_outstanding_call_not_resent(self):
        self.call("c1", 1)
        self.call("c2", 2)
        self.session.broker_lost()
        self.call("c1", 11, redelivered=True)
        self.call("c2", 12, redelivered=True)
        self.assertEqual([f[1] for f in self.effects.sent], ["c1"])
        # the answer settles the new delivery, then c2 goes out
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        self.effects.published[-1]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [11])
        self.assertEqual([f[1] for f in self.effects.sent], ["c1", "c2"])

    def test_unconfirmed_answer_republished_not_resent(self):
        self.call("c1", 1)
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        self.effects.published[-1]["on_outcome"](PublishOutcome.FAILED)
        self.session.broker_lost()
        self.call("c1", 11, redelivered=True)
        self.assertEqual([f[1] for f in self.effects.sent], ["c1"])
        republished = self.effects.published[-1]
        self.assertEqual(republished["routing_key"], "ocpp16.Reset.conf")
        self.assertEqual(json.loads(republished["body"]), [3, "c1", {"status": "Accepted"}])
        republished["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [11])

    def test_confirmed_answer_just_acked(self):
        self.call("c1", 1)
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        self.effects.published[-1]["on_outcome"](PublishOutcome.CONFIRMED)
        published = len(self.effects.published)
        self.call("c1", 11, redelivered=True)
        self.assertEqual(self.effects.acked, [1, 11])
        self.assertEqual(len(self.effects.published), published)
        self.assertEqual([f[1] for f in self.effects.sent], ["c1"])

    def test_not_redelivered_same_id_sent(self):
        """
        Without the broker's C{redelivered} flag a command is new, even
        with a message id seen before.
        """
        self.call("c1", 1)
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        self.effects.published[-1]["on_outcome"](PublishOutcome.CONFIRMED)
        self.call("c1", 2)
        self.assertEqual([f[1] for f in self.effects.sent], ["c1", "c1"])

    def test_redelivery_while_answer_pending_waits_for_it(self):
        """
        A command redelivered while its answer's publish is in flight is
        settled by that publish: no second copy of the answer.
        """
        self.call("c1", 1)
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        pending = self.effects.published[-1]
        self.call("c1", 11, redelivered=True)
        self.assertEqual(len(self.effects.published), 1)
        pending["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(sorted(self.effects.acked), [1, 11])
        self.assertEqual(len(self.effects.published), 1)


class RateLimitedFrameTests(SynchronousTestCase):
    def setUp(self):
        self.effects = RecordingEffects()
        self.session = ChargerSession("CP", OCPP16, self.effects, Clock())

    def test_call_refused_not_published(self):
        self.session.rate_limited(frame(2, "m1", "Heartbeat", {}))
        self.assertEqual(self.effects.published, [])
        [answer] = self.effects.sent
        self.assertEqual(answer[:3], [4, "m1", "GenericError"])

    def test_answer_to_outstanding_call_goes_through(self):
        self.session.delivery(Delivery(1, frame(2, "c1", "Reset", {"type": "Soft"})))
        self.session.rate_limited(frame(3, "c1", {"status": "Accepted"}))
        self.assertEqual(self.effects.published[-1]["routing_key"], "ocpp16.Reset.conf")

    def test_other_frames_dropped(self):
        self.session.rate_limited(frame(3, "unknown", {}))
        self.assertEqual((self.effects.published, self.effects.sent), ([], []))


class PausedPingTimeoutTests(SynchronousTestCase):
    """
    While reading is paused (flow control) a pong timeout does not drop
    the charger; it is re-armed when reading resumes.
    """

    def test_timeout_deferred_until_resume(self):
        from ocppgw.edge import ChargerFactory

        clock = Clock()
        factory = ChargerFactory(hub=None, reactor=clock, ping_interval=10, ping_timeout=2)
        edge = factory.protocol()
        edge.factory = factory
        edge.transport = None
        dropped = []
        edge.dropConnection = lambda abort=False: dropped.append(abort)
        edge.autoPingPending = b"ping"
        edge.pause_reading()
        edge.onAutoPingTimeout()
        self.assertEqual(dropped, [])
        edge.resume_reading()
        clock.advance(1.9)
        self.assertEqual(dropped, [])
        clock.advance(0.5)
        self.assertEqual(dropped, [True])
