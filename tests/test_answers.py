"""
A session's redelivery memory (ocppgw.answers.AnswerMemory) on its own, on
a Clock: answers from publish to ack, redeliveries answered from memory,
refused publishes tried again with a back-off.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.answers import (
    FIRST_RETRY_DELAY,
    MAX_CONFIRMED,
    Answer,
    AnswerMemory,
    AnswerState,
)
from ocppgw.outcome import Delivery, PublishOutcome
from tests.test_session import RecordingEffects

KEY = "ocpp16.Reset.conf"


def delivery(tag, reply_to=None, redelivered=False):
    return Delivery(tag, b'[2,"r1","Reset",{}]', reply_to=reply_to, correlation_id="k",
                    redelivered=redelivered)


class AnswerMemoryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.effects = RecordingEffects()
        self.memory = AnswerMemory(self.effects, self.clock)

    def answer(self, message_id="r1", tag="t1", reply_to=None):
        self.memory.publish(message_id, KEY, b'[3,"r1",{}]', None, delivery(tag, reply_to))
        return self.effects.published[-1]["on_outcome"]

    def test_the_record_is_slotted(self):
        self.assertFalse(hasattr(Answer("m", KEY, b"", None, delivery("t")), "__dict__"))

    def test_acked_once_confirmed_and_body_forgotten(self):
        confirm = self.answer()
        self.assertEqual(self.effects.acked, [])
        confirm(PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, ["t1"])
        kept = self.memory._answers["r1"]
        self.assertIs(kept.state, AnswerState.CONFIRMED)
        self.assertIsNone(kept.body)

    def test_redelivery_of_a_confirmed_answer_is_acked_not_sent(self):
        self.answer()(PublishOutcome.CONFIRMED)
        self.assertTrue(self.memory.redelivered("r1", delivery("t2", redelivered=True)))
        self.assertEqual(self.effects.acked, ["t1", "t2"])
        self.assertEqual(len(self.effects.published), 1)
        self.assertFalse(self.memory.redelivered("other", delivery("t3")))

    def test_redelivery_while_pending_waits_for_the_same_publish(self):
        confirm = self.answer()
        self.assertTrue(self.memory.redelivered("r1", delivery("t2", redelivered=True)))
        self.assertEqual(len(self.effects.published), 1)
        confirm(PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, ["t1", "t2"])

    def test_refused_answer_published_again_with_back_off(self):
        self.answer()(PublishOutcome.FAILED)
        self.assertEqual(self.effects.acked, [])
        self.clock.advance(FIRST_RETRY_DELAY)
        self.assertEqual(len(self.effects.published), 2)
        self.effects.published[-1]["on_outcome"](PublishOutcome.FAILED)
        self.clock.advance(FIRST_RETRY_DELAY)
        self.assertEqual(len(self.effects.published), 2)  # the delay doubled
        self.clock.advance(FIRST_RETRY_DELAY)
        self.assertEqual(len(self.effects.published), 3)
        self.effects.published[-1]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, ["t1"])

    def test_redelivery_of_a_refused_answer_publishes_it_at_once(self):
        self.answer()(PublishOutcome.FAILED)
        self.effects.lost.add("t1")  # its connection is gone
        self.memory.redelivered("r1", delivery("t2", redelivered=True))
        self.assertEqual(len(self.effects.published), 2)
        self.effects.published[-1]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, ["t2"])
        self.clock.advance(60)  # the retry was cancelled
        self.assertEqual(len(self.effects.published), 2)

    def test_reply_to_failure_does_not_bring_the_command_back(self):
        routed = self.answer(reply_to="amq.rabbitmq.reply-to")
        self.assertEqual(self.effects.replies[0]["reply_to"], "amq.rabbitmq.reply-to")
        self.effects.replies[0]["on_outcome"](PublishOutcome.FAILED)
        self.assertEqual(self.effects.acked, [])
        routed(PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, ["t1"])

    def test_broker_lost_forgets_deliveries_and_retries(self):
        self.answer("r1", "t1")(PublishOutcome.FAILED)
        self.memory.broker_lost()
        self.clock.advance(60)
        self.assertEqual(len(self.effects.published), 1)
        self.assertEqual(self.memory.end(), [])

    def test_end_hands_back_commands_whose_answer_was_refused(self):
        self.answer("r1", "t1")(PublishOutcome.FAILED)
        self.answer("r2", "t2")(PublishOutcome.CONFIRMED)
        self.assertEqual([d.tag for d in self.memory.end()], ["t1"])
        self.clock.advance(60)
        self.assertEqual(len(self.effects.published), 2)

    def test_only_a_few_confirmed_answers_are_kept(self):
        for number in range(MAX_CONFIRMED + 5):
            self.answer(f"r{number}", f"t{number}")(PublishOutcome.CONFIRMED)
        self.assertEqual(len(self.memory._answers), MAX_CONFIRMED)
        self.assertFalse(self.memory.redelivered("r0", delivery("again")))
