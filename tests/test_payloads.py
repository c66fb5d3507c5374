"""
The payload policy (ocppgw.payloads) on its own: what is counted, logged,
marked and refused, and how a refused command is settled.
"""

from __future__ import annotations

import json

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ocppgw import topology
from ocppgw.framing import CALL, CALLERROR, CALLRESULT, OCPP16, OCPP21, ErrorKind, Frame
from ocppgw.outcome import Delivery, PublishOutcome
from ocppgw.payloads import (
    FROM_BACKEND,
    FROM_CHARGER,
    PayloadPolicy,
    command_violation,
)
from ocppgw.session import NO_STATS
from ocppgw.validation import ENFORCE, NO_SCHEMA_ACTION, WARN, Validation, Violation
from tests.test_validation import Effects as DeadLetterEffects

BAD_BOOT = {"chargePointVendor": "V"}  # chargePointModel is required (1.6)


class CountingStats:
    def __init__(self):
        self.out = []

    def frame_out(self, message_type, action):
        self.out.append((message_type, action))


def policy(mode=ENFORCE, version=OCPP16, effects=None, stats=NO_STATS):
    validation = Validation(mode, [version])
    checker = validation.checker_for("CP1", version)
    return validation, checker, PayloadPolicy(checker, version, "CP1",
                                              effects or DeadLetterEffects(), stats)


class PolicyTests(SynchronousTestCase):
    def test_warn_passes_with_headers_counted_logged_once(self):
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        validation, checker, payloads = policy(WARN)
        violation = checker.request("BootNotification", BAD_BOOT)
        for _ in range(3):
            headers = payloads.passes("BootNotification", violation)
            self.assertEqual(headers[topology.HEADER_VALIDATION_CODE],
                             "OccurenceConstraintViolation")
            self.assertIn("chargePointModel", headers[topology.HEADER_VALIDATION_ERROR])
        key = ("ocpp1.6", FROM_CHARGER, "BootNotification")
        self.assertEqual(validation.stats.invalid[key], 3)
        self.assertEqual(validation.stats.refused[key], 0)
        self.assertEqual(payloads.logged, {(FROM_CHARGER, "BootNotification")})
        self.assertEqual(len([e for e in logged if e.get("action") == "BootNotification"]), 1)

    def test_enforce_refuses(self):
        validation, checker, payloads = policy(ENFORCE)
        violation = checker.request("BootNotification", BAD_BOOT)
        self.assertIsNone(payloads.passes("BootNotification", violation))
        self.assertTrue(payloads.refuses(FROM_BACKEND, "BootNotification", violation))
        self.assertEqual(payloads.logged, {(FROM_CHARGER, "BootNotification"),
                                           (FROM_BACKEND, "BootNotification")})

    def test_made_up_actions_remembered_under_one_name(self):
        validation, checker, payloads = policy(WARN)
        for number in range(20):
            action = f"Made{number}Up"
            payloads.passes(action, checker.request(action, {}))
        self.assertEqual(payloads.logged, {(FROM_CHARGER, NO_SCHEMA_ACTION)})

    def test_invalid_call_result_in_21_is_refused_to_the_charger_too(self):
        stats = CountingStats()
        effects = DeadLetterEffects()
        _, _, payloads = policy(ENFORCE, OCPP21, effects, stats)
        violation = Violation(ErrorKind.FORMAT_VIOLATION, "bad field")
        answer = Frame(CALLRESULT, "c1", None, {"x": 1})
        body = payloads.refuse_call_result(answer, "c1", "Reset", violation)
        self.assertEqual(effects.sent, [[5, "c1", "FormatViolation", "bad field", {}]])
        self.assertEqual(stats.out, [(5, "Reset")])
        self.assertEqual(json.loads(body)[:3], [4, "c1", "FormatViolation"])
        self.assertEqual(json.loads(body)[4], {"reason": "validation"})

    def test_invalid_call_result_in_16_only_to_the_back_end(self):
        effects = DeadLetterEffects()
        _, _, payloads = policy(ENFORCE, OCPP16, effects)
        violation = Violation(ErrorKind.FORMAT_VIOLATION, "bad field")
        body = payloads.refuse_call_result(Frame(CALLRESULT, "c1", None, {}), "c1", "Reset",
                                           violation)
        self.assertEqual(effects.sent, [])
        self.assertEqual(json.loads(body)[:3], [4, "c1", "FormationViolation"])


class RefuseCommandTests(SynchronousTestCase):
    """
    A refused command is acknowledged once its sender is told (reply and
    dead-letter copy settled), rejected when it cannot be.
    """

    def setUp(self):
        self.effects = DeadLetterEffects()
        _, self.checker, self.payloads = policy(ENFORCE, effects=self.effects)
        self.frame = Frame(CALL, "r1", "Reset", {})
        self.violation = self.checker.request("Reset", {})

    def test_acked_after_reply_and_dead_letter(self):
        delivery = Delivery("t1", b"[]", reply_to="amq.rabbitmq.reply-to", correlation_id="k")
        self.payloads.refuse_command(delivery, self.frame, self.violation)
        self.assertEqual(len(self.effects.replies), 1)
        reply = json.loads(self.effects.replies[0]["body"])
        self.assertEqual(reply[:2], [4, "r1"])
        self.assertIn("Not sent to CP1", reply[3])
        self.assertEqual(self.effects.acked, [])
        self.effects.replies[0]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [])
        self.effects.dead_lettered[0]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, ["t1"])
        self.assertEqual(self.effects.rejected, [])

    def test_dead_letter_copy_lost_rejects(self):
        delivery = Delivery("t1", b"[]")
        self.payloads.refuse_command(delivery, self.frame, self.violation)
        self.effects.dead_lettered[0]["on_outcome"](PublishOutcome.FAILED)
        self.assertEqual([tag for tag, _ in self.effects.rejected], ["t1"])
        self.assertEqual(self.effects.acked, [])

    def test_outcome_at_once_does_not_settle_early(self):
        self.effects.dead_letter = lambda delivery, headers, on_outcome: (
            on_outcome(PublishOutcome.CONFIRMED) or True)
        delivery = Delivery("t1", b"[]", reply_to="q")
        self.payloads.refuse_command(delivery, self.frame, self.violation)
        self.assertEqual(self.effects.acked, [])  # the reply is still out
        self.effects.replies[0]["on_outcome"](PublishOutcome.UNROUTABLE)
        self.assertEqual(self.effects.acked, ["t1"])

    def test_nobody_to_tell_rejects_at_once(self):
        self.effects.dead_letter_exchange = False
        self.payloads.refuse_command(Delivery("t1", b"[]"), self.frame, self.violation)
        self.assertEqual(len(self.effects.rejected), 1)
        self.assertIn("not sent to the charger", self.effects.rejected[0][1])


class CommandViolationTests(SynchronousTestCase):
    def setUp(self):
        _, self.checker, _ = policy(ENFORCE)

    def test_call_checked_against_its_request_schema(self):
        action, violation = command_violation(
            self.checker, Frame(CALL, "r1", "Reset", {}), {})
        self.assertEqual(action, "Reset")
        self.assertIs(violation.kind, ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION)
        self.assertIsNone(command_violation(
            self.checker, Frame(CALL, "r1", "Reset", {"type": "Soft"}), {}))

    def test_call_result_checked_against_the_open_call(self):
        answer = Frame(CALLRESULT, "m1", None, {})
        self.assertIsNone(command_violation(self.checker, answer, {}))
        action, _ = command_violation(self.checker, answer, {"m1": "BootNotification"})
        self.assertEqual(action, "BootNotification")

    def test_errors_are_not_checked(self):
        error = Frame(CALLERROR, "m1", None, None, "GenericError", "", {})
        self.assertIsNone(command_violation(self.checker, error, {"m1": "Heartbeat"}))
