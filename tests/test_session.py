"""
The per-charger state machine, driven by events with a fake clock.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.framing import OCPP16, OCPP21, OCPP201
from ocppgw.session import ChargerSession, Delivery, PublishOutcome
from tests.support import RecordingEffects, frame


class SessionTestsMixin:
    version = OCPP16

    def setUp(self):
        self.clock = Clock()
        self.effects = RecordingEffects()
        self.session = ChargerSession(
            "CP 1",
            self.version,
            self.effects,
            self.clock,
            call_timeout=30,
            max_bad_frames=3,
        )


class ChargerToBackEndTests(SessionTestsMixin, SynchronousTestCase):
    def test_call_published_raw_with_routing_key(self):
        """
        A CALL is published byte for byte, mandatory, on
        C{<version>.<Action>.req}, with its id as correlation id.
        """
        data = b'[2, "m1", "BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"}]'
        self.session.charger_frame(data)
        [p] = self.effects.published
        self.assertEqual(p["routing_key"], "ocpp16.BootNotification.req")
        self.assertIs(p["body"], data)
        self.assertEqual(p["correlation_id"], "m1")
        self.assertEqual(p["action"], "BootNotification")
        self.assertTrue(p["mandatory"])
        self.assertEqual(self.effects.sent, [])

    def test_unroutable_call_answered_not_implemented(self):
        self.session.charger_frame(frame(2, "m1", "FancyAction", {}))
        self.effects.published[0]["on_outcome"](PublishOutcome.UNROUTABLE)
        [answer] = self.effects.sent
        self.assertEqual(answer[:3], [4, "m1", "NotImplemented"])

    def test_unconfirmed_call_answered_internal_error(self):
        self.session.charger_frame(frame(2, "m1", "Heartbeat", {}))
        self.effects.published[0]["on_outcome"](PublishOutcome.FAILED)
        [answer] = self.effects.sent
        self.assertEqual(answer[:3], [4, "m1", "InternalError"])

    def test_confirmed_call_not_answered_by_gateway(self):
        self.session.charger_frame(frame(2, "m1", "Heartbeat", {}))
        self.effects.published[0]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.sent, [])

    def test_bad_frame_answered_and_not_published(self):
        self.session.charger_frame(b"not json")
        self.assertEqual(self.effects.published, [])
        [answer] = self.effects.sent
        self.assertEqual(answer[0], 4)
        self.assertEqual(answer[1], "-1")

    def test_too_many_bad_frames_close_1002(self):
        for _ in range(3):
            self.session.charger_frame(b"[")
        self.assertEqual(self.effects.closed, [1002])
        # nothing more is processed after the close
        self.session.charger_frame(frame(2, "m1", "Heartbeat", {}))
        self.assertEqual(self.effects.published, [])

    def test_unknown_answer_routed_as_response(self):
        self.session.charger_frame(frame(3, "nobody-asked", {}))
        [p] = self.effects.published
        self.assertEqual(p["routing_key"], "ocpp16.response.conf")
        self.assertFalse(p["mandatory"])

    def test_action_with_dots_refused(self):
        """
        An action that would add words to the routing key is not published.
        """
        self.session.charger_frame(frame(2, "m1", "a.b.c", {}))
        self.assertEqual(self.effects.published, [])
        self.assertEqual(self.effects.sent[0][:3], [4, "m1", "NotImplemented"])


class BackEndToChargerTests(SessionTestsMixin, SynchronousTestCase):
    def deliver(self, tag, *elements, reply_to=None, correlation_id=None):
        delivery = Delivery(tag, frame(*elements), reply_to, correlation_id)
        self.session.delivery(delivery)
        return delivery

    def test_answer_to_open_call_sent_at_once(self):
        """
        A CALLRESULT for the charger's own CALL is sent and acked at once,
        even while a CSMS CALL is outstanding.
        """
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"})
        self.session.charger_frame(frame(2, "m1", "Heartbeat", {}))
        self.deliver(2, 3, "m1", {"currentTime": "2026-01-01T00:00:00Z"})
        self.assertEqual([f[1] for f in self.effects.sent], ["c1", "m1"])
        self.assertEqual(self.effects.acked, [2])

    def test_answer_nobody_asked_for_is_rejected(self):
        self.deliver(1, 3, "never-sent", {})
        self.assertEqual(self.effects.sent, [])
        self.assertEqual(self.effects.rejected[0][0], 1)

    def test_malformed_command_rejected_not_sent(self):
        self.session.delivery(Delivery(7, b'{"not": "a frame"}'))
        self.assertEqual(self.effects.sent, [])
        self.assertEqual([tag for tag, _ in self.effects.rejected], [7])

    def test_one_call_at_a_time(self):
        """
        A second CSMS CALL waits until the first is answered; the first is
        acked only when the answer's publish is confirmed.
        """
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"})
        self.deliver(2, 2, "c2", "Reset", {"type": "Hard"})
        self.assertEqual([f[1] for f in self.effects.sent], ["c1"])
        self.assertEqual(self.session.held_calls, 1)

        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        [p] = self.effects.published
        self.assertEqual(p["routing_key"], "ocpp16.Reset.conf")
        self.assertEqual([f[1] for f in self.effects.sent], ["c1", "c2"])
        self.assertEqual(self.effects.acked, [])
        p["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [1])

    def test_call_error_answer_routed_as_error(self):
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"})
        self.session.charger_frame(frame(4, "c1", "NotSupported", "", {}))
        self.assertEqual(self.effects.published[0]["routing_key"], "ocpp16.Reset.error")

    def test_unconfirmed_answer_published_again_after_a_delay(self):
        """
        An answer the broker refuses (nack, publish channel closed) while
        the connection lives is published again after a back-off of 1 s,
        then 2 s, ...; the command stays unacknowledged meanwhile and is
        neither requeued (it would come straight back) nor sent again.
        """
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"})
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        first = self.effects.published[0]
        first["on_outcome"](PublishOutcome.FAILED)
        self.assertEqual((self.effects.requeued, self.effects.acked), ([], []))
        self.clock.advance(0.99)
        self.assertEqual(len(self.effects.published), 1)
        self.clock.advance(0.01)
        second = self.effects.published[1]
        self.assertEqual((second["routing_key"], second["body"]),
                         (first["routing_key"], first["body"]))
        second["on_outcome"](PublishOutcome.FAILED)
        self.clock.advance(1.99)
        self.assertEqual(len(self.effects.published), 2)
        self.clock.advance(0.01)
        self.effects.published[2]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual((self.effects.requeued, self.effects.acked), ([], [1]))
        self.assertEqual([f[1] for f in self.effects.sent], ["c1"])

    def test_unconfirmed_answer_of_a_lost_connection_waits_for_redelivery(self):
        """
        When the answer's publish failed because the broker connection was
        lost, the command's delivery is moot: nothing is published again
        until the broker delivers the command again.
        """
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"})
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        self.effects.lost.add(1)
        self.session.broker_lost()
        self.effects.published[0]["on_outcome"](PublishOutcome.FAILED)
        self.clock.advance(60)
        self.assertEqual(len(self.effects.published), 1)
        self.assertEqual((self.effects.requeued, self.effects.acked), ([], []))
        self.session.delivery(Delivery(
            11, frame(2, "c1", "Reset", {"type": "Soft"}), redelivered=True))
        self.assertEqual(len(self.effects.published), 2)
        self.effects.published[1]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [11])
        self.assertEqual([f[1] for f in self.effects.sent], ["c1"])

    def test_unconfirmed_answer_requeued_when_the_session_ends(self):
        """
        A command whose answer waits to be published again goes back to
        the queue when the charger leaves, with the unanswered ones.
        """
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"})
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        self.effects.published[0]["on_outcome"](PublishOutcome.FAILED)
        self.assertEqual([d.tag for d in self.session.end()], [1])
        self.clock.advance(60)
        self.assertEqual(len(self.effects.published), 1)

    def test_answer_sent_to_reply_to(self):
        self.deliver(
            1,
            2,
            "c1",
            "Reset",
            {"type": "Soft"},
            reply_to="amq.rabbitmq.reply-to.abc",
            correlation_id="corr-9",
        )
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        [reply] = self.effects.replies
        self.assertEqual(reply["reply_to"], "amq.rabbitmq.reply-to.abc")
        self.assertEqual(reply["correlation_id"], "corr-9")
        self.assertEqual(json.loads(reply["body"]), [3, "c1", {"status": "Accepted"}])
        # acked once both publishes are settled
        self.effects.published[0]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [])
        reply["on_outcome"](PublishOutcome.FAILED)
        self.assertEqual(self.effects.acked, [1])

    def test_call_timeout_published_and_next_sent(self):
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"}, reply_to="r")
        self.deliver(2, 2, "c2", "Reset", {"type": "Hard"})
        self.clock.advance(29.9)
        self.assertEqual(self.effects.published, [])
        self.clock.advance(0.2)
        [p] = self.effects.published
        self.assertEqual(p["routing_key"], "ocpp16.Reset.error")
        body = json.loads(p["body"])
        self.assertEqual(body[:3], [4, "c1", "GenericError"])
        self.assertEqual(p["extra_headers"], {"x-ocppgw-timeout": True})
        self.assertEqual(len(self.effects.replies), 1)
        self.assertEqual([f[1] for f in self.effects.sent], ["c1", "c2"])
        # a late answer is no longer matched
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        self.assertEqual(
            self.effects.published[-1]["routing_key"], "ocpp16.response.conf"
        )

    def test_end_returns_unanswered_commands(self):
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"})
        self.deliver(2, 2, "c2", "Reset", {"type": "Hard"})
        unanswered = self.session.end()
        self.assertEqual([d.tag for d in unanswered], [1, 2])
        # the timer is cancelled: nothing is published later
        self.clock.advance(60)
        self.assertEqual(self.effects.published, [])
        # a delivery arriving after the end is handed back
        self.deliver(3, 2, "c3", "Reset", {"type": "Soft"})
        self.assertEqual(self.effects.requeued, [3])

    def test_answered_but_unconfirmed_is_not_requeued_at_end(self):
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"})
        self.session.charger_frame(frame(3, "c1", {"status": "Accepted"}))
        self.assertEqual(self.session.end(), [])
        self.effects.published[0]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [1])

    def test_open_calls_handed_over(self):
        self.session.charger_frame(frame(2, "m1", "Heartbeat", {}))
        successor = ChargerSession("CP 1", self.version, self.effects, self.clock)
        successor.adopt_open_calls(self.session.handover())
        successor.delivery(Delivery(5, frame(3, "m1", {"currentTime": "x"})))
        self.assertEqual(self.effects.acked, [5])


class Ocpp201Tests(SessionTestsMixin, SynchronousTestCase):
    version = OCPP201

    def test_routing_prefix(self):
        self.session.charger_frame(frame(2, "m1", "Heartbeat", {}))
        self.assertEqual(
            self.effects.published[0]["routing_key"], "ocpp201.Heartbeat.req"
        )

    def test_send_frame_is_not_ocpp201(self):
        self.session.charger_frame(frame(6, "m1", "NotifyPeriodicEventStream", {}))
        self.assertEqual(self.effects.published, [])
        self.assertEqual(self.effects.sent[0][2], "MessageTypeNotSupported")


class Ocpp21Tests(SessionTestsMixin, SynchronousTestCase):
    version = OCPP21

    def test_send_published_not_mandatory(self):
        self.session.charger_frame(frame(6, "m1", "NotifyPeriodicEventStream", {}))
        [p] = self.effects.published
        self.assertEqual(p["routing_key"], "ocpp21.NotifyPeriodicEventStream.req")
        self.assertFalse(p["mandatory"])

    def test_send_from_back_end_goes_through(self):
        self.session.delivery(Delivery(1, frame(6, "s1", "Foo", {})))
        self.assertEqual(self.effects.sent, [[6, "s1", "Foo", {}]])
        self.assertEqual(self.effects.acked, [1])


class MalformedAnswerTests(SessionTestsMixin, SynchronousTestCase):
    """
    A malformed CALLRESULT/CALLERROR whose id is the outstanding CSMS
    CALL's is that CALL's answer: published at once as sent, marked, the
    command acked once confirmed and the next one sent, no bad frame
    counted (max_bad_frames is 3 here).
    """

    def deliver(self, tag, *elements):
        self.session.delivery(Delivery(tag, frame(*elements), "reply-here", f"corr-{tag}"))

    def test_details_not_an_object(self):
        self.deliver(1, 2, "c1", "GetCompositeSchedule", {"connectorId": 1, "duration": 60})
        self.deliver(2, 2, "c2", "Reset", {"type": "Soft"})
        data = b'[4,"c1","NotImplemented","not implemented","GetCompositeSchedule"]'
        self.session.charger_frame(data)
        [p] = self.effects.published
        self.assertEqual(p["routing_key"], "ocpp16.GetCompositeSchedule.error")
        self.assertIs(p["body"], data)
        self.assertEqual(p["correlation_id"], "c1")
        self.assertEqual(p["extra_headers"],
                         {"x-ocppgw-malformed": "the error details must be a JSON object"})
        [reply] = self.effects.replies
        self.assertEqual((reply["reply_to"], reply["body"]), ("reply-here", data))
        # nothing goes back to the charger for an error, the next CALL does
        self.assertEqual([f[1] for f in self.effects.sent], ["c1", "c2"])
        self.assertEqual(self.session.outstanding_call, ("c2", "Reset"))
        p["on_outcome"](PublishOutcome.CONFIRMED)
        reply["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [1])

    def test_not_counted_as_bad_frames(self):
        for n, data in enumerate((
            b'[3,"c%d",{"status":"Accepted"},"extra"]',
            b'[4,"c%d","GenericError","x",{},{}]',
            b'[4,"c%d",7,"x",{}]',
            b'[3,"c%d",[]]',
        )):
            self.deliver(n, 2, f"c{n}", "Reset", {"type": "Soft"})
            self.session.charger_frame(data % n)
        self.assertEqual(self.effects.closed, [])
        self.assertEqual(
            [p["routing_key"] for p in self.effects.published],
            ["ocpp16.Reset.conf", "ocpp16.Reset.error", "ocpp16.Reset.error",
             "ocpp16.Reset.conf"],
        )
        for p in self.effects.published:
            self.assertIn("x-ocppgw-malformed", p["extra_headers"])

    def test_other_id_is_a_bad_frame(self):
        """A malformed frame that answers nothing keeps today's rules."""
        self.deliver(1, 2, "c1", "Reset", {"type": "Soft"})
        for _ in range(3):
            self.session.charger_frame(b'[4,"other","NotImplemented","no","Reset"]')
        self.assertEqual(self.effects.published, [])
        self.assertEqual(self.effects.closed, [1002])
        # still unanswered: handed back to be requeued when the session ends
        self.assertEqual([d.tag for d in self.session.end()], [1])

    def test_unreadable_id_never_matches(self):
        """
        An id that cannot be read is reported as "-1": that is no answer,
        even to a CSMS CALL whose id is "-1".
        """
        self.deliver(1, 2, "-1", "Reset", {"type": "Soft"})
        self.session.charger_frame(b'[4,42,"NotImplemented","no",{}]')
        self.assertEqual(self.effects.published, [])
        self.assertEqual(self.session.outstanding_call, ("-1", "Reset"))

    def test_unknown_error_code_marked(self):
        self.deliver(1, 2, "c1", "UnlockConnector", {"connectorId": 1})
        self.session.charger_frame(frame(4, "c1", "FormatViolation", "", {}))
        [p] = self.effects.published
        self.assertEqual(p["routing_key"], "ocpp16.UnlockConnector.error")
        self.assertEqual(p["extra_headers"],
                         {"x-ocppgw-malformed": "the error code is not one ocpp1.6 defines"})

    def test_known_error_code_not_marked(self):
        self.deliver(1, 2, "c1", "UnlockConnector", {"connectorId": 1})
        self.session.charger_frame(frame(4, "c1", "FormationViolation", "", {}))
        self.assertIsNone(self.effects.published[0]["extra_headers"])

    def test_ocpp21_call_result_refused_and_passed_on(self):
        """2.1 answers a broken CALLRESULT with a CALLRESULTERROR; it is passed on too."""
        self.session = ChargerSession("CP 1", OCPP21, self.effects, self.clock, max_bad_frames=1)
        self.deliver(1, 2, "c1", "Reset", {"type": "Immediate"})
        self.session.charger_frame(b'[3,"c1","Accepted"]')
        self.assertEqual(self.effects.sent[-1][:3], [5, "c1", "FormatViolation"])
        [p] = self.effects.published
        self.assertEqual(p["routing_key"], "ocpp21.Reset.conf")
        self.assertEqual(p["extra_headers"],
                         {"x-ocppgw-malformed": "the payload must be a JSON object"})
        self.assertEqual(self.effects.closed, [])


class LongMessageIdTests(SessionTestsMixin, SynchronousTestCase):
    """max_message_id_length applies to the charger's frames and the back end's."""

    def setUp(self):
        super().setUp()
        self.session = ChargerSession(
            "CP 1", self.version, self.effects, self.clock, max_message_id_length=100)

    def test_both_directions(self):
        charger_id, csms_id = "m" * 100, "c" * 100
        self.session.charger_frame(frame(2, charger_id, "Heartbeat", {}))
        self.assertEqual(self.effects.published[0]["correlation_id"], charger_id)
        self.session.delivery(Delivery(1, frame(3, charger_id, {"currentTime": "x"})))
        self.session.delivery(Delivery(2, frame(2, csms_id, "Reset", {"type": "Soft"})))
        self.assertEqual([f[1] for f in self.effects.sent], [charger_id, csms_id])
        self.assertEqual(self.effects.acked, [1])

    def test_longer_refused(self):
        self.session.charger_frame(frame(2, "m" * 101, "Heartbeat", {}))
        self.assertEqual(self.effects.published, [])
        self.assertEqual(self.effects.sent[0][:2], [4, "-1"])
        self.session.delivery(Delivery(1, frame(2, "c" * 101, "Reset", {"type": "Soft"})))
        self.assertEqual([tag for tag, _ in self.effects.rejected], [1])


class SessionPartsTests(SynchronousTestCase):
    """The session's small parts: its open CALLs and its null stats."""

    def test_open_calls_bounded_oldest_first(self):
        from ocppgw.session import MAX_OPEN_CHARGER_CALLS, OpenCalls

        calls = OpenCalls()
        self.assertFalse(hasattr(calls, "__dict__"))
        for number in range(MAX_OPEN_CHARGER_CALLS + 2):
            calls.remember(f"m{number}", "Heartbeat")
        self.assertEqual(len(calls), MAX_OPEN_CHARGER_CALLS)
        self.assertNotIn("m0", calls)
        calls.remember("m2", "DataTransfer")  # again: now the newest
        self.assertEqual(list(calls)[-1], "m2")
        calls.adopt({"m2": "Reset", "x": "Authorize"})
        self.assertEqual((calls["m2"], calls["x"]), ("DataTransfer", "Authorize"))

    def test_without_stats_nothing_is_counted(self):
        from ocppgw.session import NO_STATS

        effects = RecordingEffects()
        session = ChargerSession("CP", OCPP16, effects, Clock())
        self.assertIs(session._stats, NO_STATS)
        session.charger_frame(b'[3,"nobody","x"]')  # a bad frame: counted nowhere
        session.charger_frame(frame(2, "m1", "Heartbeat", {}))
        self.assertEqual(len(effects.published), 1)


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
