"""
Payload validation against the OCPP JSON schemas: the checker on its own,
and the session driven by events with a fake clock, for every version.
"""

from __future__ import annotations

import json
import os

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from ocppgw import framing
from ocppgw.framing import OCPP16, OCPP20, OCPP21, OCPP201, ErrorKind
from ocppgw.session import ChargerSession, Delivery, PublishOutcome
from ocppgw.validation import (
    ENFORCE,
    OFF,
    PayloadChecker,
    WARN,
    SchemaError,
    Validation,
    compile_schemas,
    package_schema_dir,
)
from tests.support import RecordingEffects

VALIDATION_ERROR = "x-ocppgw-validation-error"
VALIDATION_CODE = "x-ocppgw-validation-code"
IDENTITY = "CP 1"
NOW = "2026-01-01T12:00:00.000Z"


class Effects(RecordingEffects):
    """
    Records dead-letter copies too; C{dead_letter_exchange} says whether
    the charger's queue has one.
    """

    dead_letter_exchange = True

    def __init__(self):
        super().__init__()
        self.dead_lettered = []

    def dead_letter(self, delivery, headers, on_outcome):
        if not self.dead_letter_exchange:
            return False
        self.dead_lettered.append(
            dict(tag=delivery.tag, body=delivery.body, headers=headers, on_outcome=on_outcome)
        )
        return True


def call(message_id, action, payload) -> bytes:
    return json.dumps([2, message_id, action, payload]).encode()


def result(message_id, payload) -> bytes:
    return json.dumps([3, message_id, payload]).encode()


# -- examples, per version -------------------------------------------------
#
# For each version: a valid and an invalid example of BootNotification,
# MeterValues, StatusNotification (1.6) or TransactionEvent (2.x), and a
# CSMS command with a valid and an invalid answer. Each invalid example
# names the error kind it must produce.

_METER_16 = {
    "connectorId": 1,
    "transactionId": 42,
    "meterValue": [
        {
            "timestamp": NOW,
            "sampledValue": [
                {"value": "12345.6", "context": "Sample.Periodic",
                 "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
                {"value": "7200", "measurand": "Power.Active.Import", "unit": "W"},
            ],
        }
    ],
}

_METER_2X = {
    "evseId": 1,
    "meterValue": [
        {
            "timestamp": NOW,
            "sampledValue": [
                {"value": 12345.6, "context": "Sample.Periodic",
                 "measurand": "Energy.Active.Import.Register"},
                {"value": 7200, "measurand": "Power.Active.Import"},
            ],
        }
    ],
}

_BOOT_2X = {"reason": "PowerUp", "chargingStation": {"model": "M1", "vendorName": "V"}}
_TRANSACTION_2X = {
    "eventType": "Started",
    "timestamp": NOW,
    "triggerReason": "Authorized",
    "seqNo": 0,
    "transactionInfo": {"transactionId": "T-1"},
}
_START_2X = {"idToken": {"idToken": "04A2B3C4", "type": "ISO14443"}, "remoteStartId": 7}

EXAMPLES = {
    "ocpp1.6": dict(
        charger=[
            ("BootNotification",
             {"chargePointVendor": "V", "chargePointModel": "M1"},
             {"chargePointVendor": "V"},
             ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION, "chargePointModel"),
            ("MeterValues", _METER_16,
             {**_METER_16, "connectorId": "1"},
             ErrorKind.TYPE_CONSTRAINT_VIOLATION, "payload.connectorId"),
            ("StatusNotification",
             {"connectorId": 1, "errorCode": "NoError", "status": "Available"},
             {"connectorId": 1, "errorCode": "NoError", "status": "Sleeping"},
             ErrorKind.PROPERTY_CONSTRAINT_VIOLATION, "payload.status"),
        ],
        command=("RemoteStartTransaction", {"idTag": "04A2B3C4"},
                 {"idTag": "X" * 21}, ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
                 {"status": "Accepted"}, {"status": "Maybe"}),
        boot_answer={"currentTime": NOW, "interval": 300, "status": "Accepted"},
        codes={
            ErrorKind.TYPE_CONSTRAINT_VIOLATION: "TypeConstraintViolation",
            ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION: "OccurenceConstraintViolation",
            ErrorKind.PROPERTY_CONSTRAINT_VIOLATION: "PropertyConstraintViolation",
            ErrorKind.FORMAT_VIOLATION: "FormationViolation",
            ErrorKind.NOT_IMPLEMENTED: "NotImplemented",
        },
    ),
}
for _subprotocol in ("ocpp2.0.1", "ocpp2.1"):
    EXAMPLES[_subprotocol] = dict(
        charger=[
            ("BootNotification", _BOOT_2X,
             {"reason": "PowerUp"},
             ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION, "chargingStation"),
            ("MeterValues", _METER_2X,
             {"evseId": 1, "meterValue": [{"timestamp": NOW, "sampledValue": [{"value": "12"}]}]},
             ErrorKind.TYPE_CONSTRAINT_VIOLATION, "payload.meterValue[0].sampledValue[0].value"),
            ("TransactionEvent", _TRANSACTION_2X,
             {**_TRANSACTION_2X, "eventType": "Paused"},
             ErrorKind.PROPERTY_CONSTRAINT_VIOLATION, "payload.eventType"),
        ],
        command=("RequestStartTransaction", _START_2X,
                 {"idToken": {"idToken": "04A2B3C4", "type": "ISO14443"}},
                 ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION,
                 {"status": "Accepted"}, {"status": "Accepted", "vendorQuirk": 7}),
        boot_answer={"currentTime": NOW, "interval": 300, "status": "Accepted"},
        codes={
            ErrorKind.TYPE_CONSTRAINT_VIOLATION: "TypeConstraintViolation",
            ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION: "OccurrenceConstraintViolation",
            ErrorKind.PROPERTY_CONSTRAINT_VIOLATION: "PropertyConstraintViolation",
            ErrorKind.FORMAT_VIOLATION: "FormatViolation",
            ErrorKind.NOT_IMPLEMENTED: "NotImplemented",
        },
    )
EXAMPLES["ocpp2.0"] = EXAMPLES["ocpp2.0.1"]


class SchemaLoadingTests(SynchronousTestCase):
    """
    The shipped schemas load and compile for every version.
    """

    def test_every_version_loads(self):
        expected = {
            "ocpp1.6": ("BootNotification", "MeterValues", "RemoteStartTransaction",
                        "DataTransfer", "SignCertificate"),
            "ocpp2.0.1": ("BootNotification", "TransactionEvent", "RequestStartTransaction",
                          "NotifyEVChargingNeeds"),
            "ocpp2.1": ("BootNotification", "TransactionEvent", "RequestStartTransaction",
                        "NotifyPeriodicEventStream", "AFRRSignal"),
        }
        for subprotocol, actions in expected.items():
            schemas = compile_schemas(os.path.abspath(package_schema_dir(subprotocol)))
            for action in actions:
                self.assertIn(action, schemas.requests, (subprotocol, action))
            # every CALL has a response schema; SENDs have none
            self.assertEqual(
                set(schemas.requests) - set(schemas.responses),
                {"NotifyPeriodicEventStream"} if subprotocol == "ocpp2.1" else set(),
            )

    def test_shipped_schemas_compiled_on_first_use(self):
        """
        The shipped schemas are read at start but compiled only when an
        action is first checked (all of them would cost seconds and tens
        of MB at start); the test above compiles every one of them.
        """
        directory = os.path.abspath(package_schema_dir("ocpp1.6"))
        schemas = compile_schemas.__wrapped__(directory, False, eager=False)
        self.assertEqual(schemas.requests._compiled, {})
        self.assertIn("Heartbeat", schemas.requests)
        checker = PayloadChecker(OCPP16, schemas, enforce=True)
        self.assertIsNone(checker.request("Heartbeat", {}))
        self.assertEqual(list(schemas.requests._compiled), ["Heartbeat"])
        self.assertIsNotNone(checker.request("Heartbeat", {"extra": 1}))

    def test_ocpp20_uses_201_schemas(self):
        validation = Validation(ENFORCE, [OCPP20, OCPP201])
        self.assertIs(
            validation.checker_for(IDENTITY, OCPP20)._requests["BootNotification"],
            validation.checker_for(IDENTITY, OCPP201)._requests["BootNotification"],
        )

    def test_schema_dir_replaces_one_version(self):
        """
        A C{schema_dir} with an C{ocpp2.0} subdirectory gives 2.0 its own
        schemas; versions without a subdirectory keep the shipped ones.
        """
        base = self.mktemp()
        os.makedirs(os.path.join(base, "ocpp2.0"))
        schema = {
            "$schema": "http://json-schema.org/draft-06/schema#",
            "type": "object",
            "properties": {"reason": {"type": "string"}},
            "required": ["reason"],
        }
        with open(os.path.join(base, "ocpp2.0", "BootNotificationRequest.json"), "w") as f:
            json.dump(schema, f)
        validation = Validation(ENFORCE, [OCPP20, OCPP201], schema_dir=base)
        checker20 = validation.checker_for(IDENTITY, OCPP20)
        checker201 = validation.checker_for(IDENTITY, OCPP201)
        self.assertIsNone(checker20.request("BootNotification", {"reason": "x"}))
        self.assertEqual(
            checker20.request("Heartbeat", {}).kind, ErrorKind.NOT_IMPLEMENTED
        )
        self.assertEqual(
            checker201.request("BootNotification", {"reason": "x"}).kind,
            ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION,
        )

    def test_schema_dir_201_serves_20(self):
        """
        Without an C{ocpp2.0} subdirectory, 2.0 follows the 2.0.1 schemas
        of C{schema_dir}.
        """
        base = self.mktemp()
        os.makedirs(os.path.join(base, "ocpp2.0.1"))
        with open(os.path.join(base, "ocpp2.0.1", "HeartbeatRequest.json"), "w") as f:
            json.dump({"type": "object", "required": ["beat"]}, f)
        validation = Validation(ENFORCE, [OCPP20, OCPP201, OCPP16], schema_dir=base)
        for version in (OCPP20, OCPP201):
            self.assertEqual(
                validation.checker_for(IDENTITY, version).request("Heartbeat", {}).kind,
                ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION,
            )
        # 1.6 has no subdirectory: the shipped schemas
        self.assertIsNone(validation.checker_for(IDENTITY, OCPP16).request("Heartbeat", {}))

    def test_unloadable_schemas_stop_twistd(self):
        """
        Under twistd a schema that cannot be loaded ends the start with one
        line naming the file, not a traceback.
        """
        from ocppgw import tap
        from ocppgw.config import settings_from_dict

        base = self.mktemp()
        os.makedirs(os.path.join(base, "ocpp1.6"))
        with open(os.path.join(base, "ocpp1.6", "Heartbeat.json"), "w") as f:
            f.write("[")
        settings = settings_from_dict(
            {"listener": {"subprotocols": "ocpp1.6"}, "validation": {"schema_dir": base}}
        )
        error = self.assertRaises(SystemExit, tap.makeService, {"settings": settings})
        self.assertIn("Heartbeat.json: cannot load schema", str(error))

    def test_broken_schema_named(self):
        base = self.mktemp()
        os.makedirs(base)
        with open(os.path.join(base, "HeartbeatRequest.json"), "w") as f:
            f.write("{not json")
        error = self.assertRaises(SchemaError, compile_schemas, os.path.abspath(base))
        self.assertIn("HeartbeatRequest.json", str(error))

    def test_empty_directory_refused(self):
        base = self.mktemp()
        os.makedirs(base)
        self.assertRaises(SchemaError, compile_schemas, os.path.abspath(base))

    def test_off_compiles_nothing_and_checks_nothing(self):
        validation = Validation(OFF, [OCPP16])
        self.assertIsNone(validation.checker_for(IDENTITY, OCPP16))


class CheckerTests(SynchronousTestCase):
    """
    Rules that do not depend on the version.
    """

    def test_description_names_field_and_is_short(self):
        checker = Validation(ENFORCE, [OCPP16]).checker_for(IDENTITY, OCPP16)
        violation = checker.request(
            "BootNotification",
            {"chargePointVendor": "V", "chargePointModel": "M", "x" * 5000: 1},
        )
        self.assertEqual(violation.kind, ErrorKind.FORMAT_VIOLATION)
        self.assertTrue(violation.description.startswith("payload must not contain"))
        self.assertLessEqual(len(violation.description), 200)

    def test_enum_rewrite_keeps_meaning(self):
        """
        String enums are checked through a set (a speed-up): the error is
        still PropertyConstraintViolation listing the members, a value of
        the wrong type still TypeConstraintViolation.
        """
        checker = Validation(ENFORCE, [OCPP201]).checker_for(IDENTITY, OCPP201)
        payload = {**_TRANSACTION_2X, "triggerReason": "Whim"}
        violation = checker.request("TransactionEvent", payload)
        self.assertEqual(violation.kind, ErrorKind.PROPERTY_CONSTRAINT_VIOLATION)
        self.assertTrue(
            violation.description.startswith(
                "payload.triggerReason must be one of ['Authorized', "
            ),
            violation.description,
        )
        payload = {**_TRANSACTION_2X, "triggerReason": 3}
        self.assertEqual(
            checker.request("TransactionEvent", payload).kind,
            ErrorKind.TYPE_CONSTRAINT_VIOLATION,
        )

    def test_rewritten_schemas_agree_with_originals(self):
        """
        Every example, valid or not, is judged alike by the schema as
        published (compiled plainly) and by the rewritten one.
        """
        import fastjsonschema

        for subprotocol, examples in EXAMPLES.items():
            version = framing.VERSIONS[subprotocol]
            checker = Validation(ENFORCE, [version]).checker_for(IDENTITY, version)
            directory = package_schema_dir(subprotocol)
            suffix = ".json" if subprotocol == "ocpp1.6" else "Request.json"
            cases = [(a, p) for a, valid, invalid, *_ in examples["charger"]
                     for p in (valid, invalid)]
            action, valid, invalid, *_ = examples["command"]
            cases += [(action, valid), (action, invalid)]
            for action, payload in cases:
                with open(os.path.join(directory, action + suffix), "rb") as f:
                    plain = fastjsonschema.compile(json.load(f), use_default=False)
                try:
                    plain(json.loads(json.dumps(payload)))
                    plain_valid = True
                except fastjsonschema.JsonSchemaValueException:
                    plain_valid = False
                self.assertEqual(
                    checker.request(action, payload) is None, plain_valid, (subprotocol, action)
                )

    def test_validator_does_not_fill_defaults(self):
        checker = Validation(ENFORCE, [OCPP201]).checker_for(IDENTITY, OCPP201)
        payload = json.loads(json.dumps(_METER_2X))
        self.assertIsNone(checker.request("MeterValues", payload))
        self.assertEqual(payload, _METER_2X)

    def test_allow_additional_properties(self):
        payload = {"chargePointVendor": "V", "chargePointModel": "M", "vendorQuirk": 1}
        strict = Validation(ENFORCE, [OCPP16]).checker_for(IDENTITY, OCPP16)
        tolerant = Validation(
            ENFORCE, [OCPP16], allow_additional_properties=True
        ).checker_for(IDENTITY, OCPP16)
        self.assertEqual(
            strict.request("BootNotification", payload).kind, ErrorKind.FORMAT_VIOLATION
        )
        self.assertIsNone(tolerant.request("BootNotification", payload))
        # the other rules still hold
        self.assertEqual(
            tolerant.request("BootNotification", {"vendorQuirk": 1}).kind,
            ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION,
        )

    def test_exempt_identity_patterns(self):
        validation = Validation(ENFORCE, [OCPP16], exempt_identities=["LAB-*", "RDAM?123"])
        self.assertIsNone(validation.checker_for("LAB-7", OCPP16))
        self.assertIsNone(validation.checker_for("RDAM 123", OCPP16))
        self.assertIsNotNone(validation.checker_for("XLAB-7", OCPP16))
        self.assertIsNotNone(validation.checker_for("RDAM 1234", OCPP16))


class _VersionTests:
    """
    The session with a checker, for one version (set C{version}).
    """

    version: framing.OcppVersion

    def setUp(self):
        self.examples = EXAMPLES[self.version.subprotocol]

    def start(self, mode=ENFORCE, identity=IDENTITY, **options):
        self.validation = Validation(mode, [self.version], **options)
        self.effects = Effects()
        self.clock = Clock()
        self.session = ChargerSession(
            identity,
            self.version,
            self.effects,
            self.clock,
            checker=self.validation.checker_for(identity, self.version),
        )
        return self.session

    def code(self, kind):
        return self.examples["codes"][kind]

    # -- charger -> back end -------------------------------------------------

    def test_valid_charger_calls_published_unmarked(self):
        self.start()
        for number, (action, valid, _invalid, _kind, _field) in enumerate(
            self.examples["charger"]
        ):
            self.session.charger_frame(call(f"v{number}", action, valid))
        self.assertEqual(self.effects.sent, [])
        self.assertEqual(
            [(p["routing_key"], p["extra_headers"]) for p in self.effects.published],
            [
                (f"{self.version.routing_prefix}.{action}.req", None)
                for action, *_ in self.examples["charger"]
            ],
        )

    def test_enforce_refuses_invalid_charger_calls(self):
        self.start()
        for number, (action, _valid, invalid, kind, field) in enumerate(
            self.examples["charger"]
        ):
            self.session.charger_frame(call(f"i{number}", action, invalid))
            answer = self.effects.sent[-1]
            self.assertEqual(answer[:3], [4, f"i{number}", self.code(kind)], action)
            self.assertIn(field, answer[3])
            self.assertEqual(answer[4], {})
        self.assertEqual(self.effects.published, [])
        self.assertEqual(self.effects.closed, [])  # not malformed frames
        self.assertEqual(
            sum(self.validation.stats.refused.values()), len(self.examples["charger"])
        )

    def test_error_code_spellings(self):
        """
        Each kind of violation is answered with the code spelled the way
        this version spells it.
        """
        self.start()
        invalid = {
            ErrorKind.TYPE_CONSTRAINT_VIOLATION: ("Heartbeat", {}, "MeterValues"),
            ErrorKind.NOT_IMPLEMENTED: ("Frobnicate", {}, None),
        }
        for action, _valid, payload, kind, _field in self.examples["charger"]:
            invalid.setdefault(kind, (action, payload, None))
        boot = self.examples["charger"][0]
        invalid[ErrorKind.FORMAT_VIOLATION] = (boot[0], {**boot[1], "vendorQuirk": True}, None)
        # Heartbeat has no fields: a type violation comes from MeterValues
        meter = self.examples["charger"][1]
        invalid[ErrorKind.TYPE_CONSTRAINT_VIOLATION] = (meter[0], meter[2], None)
        for kind, (action, payload, _) in invalid.items():
            self.session.charger_frame(call(kind.name, action, payload))
            self.assertEqual(
                self.effects.sent[-1][:3], [4, kind.name, self.code(kind)], kind
            )
            self.assertEqual(
                self.effects.sent[-1][2], framing.error_code(self.version, kind)
            )
        self.assertEqual(len(self.effects.sent), 5)
        self.assertEqual(self.effects.published, [])

    def test_warn_passes_counts_and_marks(self):
        self.start(mode=WARN)
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        action, _valid, invalid, kind, field = self.examples["charger"][1]
        for number in range(3):
            self.session.charger_frame(call(f"w{number}", action, invalid))
        self.assertEqual(self.effects.sent, [])
        self.assertEqual(len(self.effects.published), 3)
        headers = self.effects.published[0]["extra_headers"]
        self.assertEqual(headers[VALIDATION_CODE], self.code(kind))
        self.assertIn(field, headers[VALIDATION_ERROR])
        key = (self.version.subprotocol, "charger", action)
        self.assertEqual(self.validation.stats.invalid[key], 3)
        self.assertEqual(self.validation.stats.refused[key], 0)
        # logged once per action and connection; the counter goes on
        warnings = [e for e in logged if e.get("action") == action]
        self.assertEqual(len(warnings), 1)

    def test_unknown_actions_counted_under_one_name(self):
        """
        Made-up action names do not grow the counters or the session.
        """
        self.start(mode=WARN)
        for number in range(50):
            self.session.charger_frame(call(f"u{number}", f"Made{number}Up", {}))
        self.assertEqual(len(self.effects.published), 50)
        self.assertEqual(
            dict(self.validation.stats.invalid),
            {(self.version.subprotocol, "charger", "(unknown)"): 50},
        )
        self.assertEqual(len(self.session._payloads.logged), 1)

    def test_exempt_action(self):
        action, _valid, invalid, _kind, _field = self.examples["charger"][1]
        self.start(exempt_actions=[action])
        self.session.charger_frame(call("x1", action, invalid))
        self.assertEqual(self.effects.sent, [])
        self.assertEqual(len(self.effects.published), 1)
        self.assertIsNone(self.effects.published[0]["extra_headers"])
        # other actions are still checked
        other, _valid, invalid, kind, _field = self.examples["charger"][0]
        self.session.charger_frame(call("x2", other, invalid))
        self.assertEqual(self.effects.sent[-1][2], self.code(kind))

    def test_exempt_identity(self):
        self.start(identity="LAB-7", exempt_identities=["LAB-*"])
        for number, (action, _valid, invalid, _kind, _field) in enumerate(
            self.examples["charger"]
        ):
            self.session.charger_frame(call(f"e{number}", action, invalid))
        self.assertEqual(self.effects.sent, [])
        self.assertEqual(len(self.effects.published), len(self.examples["charger"]))

    # -- back end -> charger -------------------------------------------------

    def test_valid_command_sent(self):
        self.start()
        action, valid, *_ = self.examples["command"]
        self.session.delivery(Delivery(1, call("c1", action, valid)))
        self.assertEqual(self.effects.sent, [[2, "c1", action, valid]])

    def test_invalid_command_never_reaches_charger_sender_told(self):
        self.start()
        action, valid, invalid, kind, *_ = self.examples["command"]
        body = call("c1", action, invalid)
        self.session.delivery(Delivery(1, body, reply_to="amq.rabbitmq.reply-to.x",
                                       correlation_id="corr-1"))
        self.assertEqual(self.effects.sent, [])
        # the sender's reply_to gets a CALLERROR naming the problem
        [reply] = self.effects.replies
        self.assertEqual(reply["reply_to"], "amq.rabbitmq.reply-to.x")
        self.assertEqual(reply["correlation_id"], "corr-1")
        error = json.loads(reply["body"])
        self.assertEqual(error[:3], [4, "c1", self.code(kind)])
        self.assertEqual(error[4], {"reason": "validation"})
        # and the dead-letter exchange a copy with the reason in headers
        [copy] = self.effects.dead_lettered
        self.assertEqual(copy["body"], body)
        self.assertEqual(copy["headers"][VALIDATION_CODE], self.code(kind))
        # acknowledged once both are settled
        self.assertEqual(self.effects.acked, [])
        reply["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [])
        copy["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [1])
        self.assertEqual(self.effects.rejected, [])
        # the invalid command held no slot: the next one goes at once
        self.session.delivery(Delivery(2, call("c2", action, valid)))
        self.assertEqual(self.effects.sent, [[2, "c2", action, valid]])

    def test_invalid_command_failed_dead_letter_rejected(self):
        self.start()
        action, _valid, invalid, *_ = self.examples["command"]
        self.session.delivery(Delivery(1, call("c1", action, invalid)))
        [copy] = self.effects.dead_lettered
        copy["on_outcome"](PublishOutcome.FAILED)
        self.assertEqual(self.effects.acked, [])
        self.assertEqual([tag for tag, _ in self.effects.rejected], [1])

    def test_invalid_command_nobody_to_tell_rejected(self):
        self.start()
        self.effects.dead_letter_exchange = False
        action, _valid, invalid, kind, *_ = self.examples["command"]
        self.session.delivery(Delivery(1, call("c1", action, invalid)))
        self.assertEqual(self.effects.sent, [])
        [(tag, reason)] = self.effects.rejected
        self.assertEqual(tag, 1)
        self.assertIn(self.code(kind), reason)

    def test_unknown_command_not_implemented(self):
        self.start()
        self.session.delivery(Delivery(1, call("c1", "Frobnicate", {}), reply_to="r"))
        self.assertEqual(self.effects.sent, [])
        self.assertEqual(
            json.loads(self.effects.replies[0]["body"])[2],
            self.code(ErrorKind.NOT_IMPLEMENTED),
        )

    def test_warn_sends_invalid_command(self):
        self.start(mode=WARN)
        action, _valid, invalid, *_ = self.examples["command"]
        self.session.delivery(Delivery(1, call("c1", action, invalid)))
        self.assertEqual(self.effects.sent, [[2, "c1", action, invalid]])
        self.assertEqual(
            self.validation.stats.invalid[(self.version.subprotocol, "backend", action)], 1
        )

    def test_invalid_answer_to_charger_call_not_sent(self):
        """
        The back end's CALLRESULT to a charger CALL is checked against the
        response schema of that CALL's action; an invalid one is not sent,
        and the charger's CALL stays open for a valid one.
        """
        self.start()
        action, valid, *_ = self.examples["charger"][0]
        self.session.charger_frame(call("b1", action, valid))
        self.session.delivery(Delivery(1, result("b1", {"status": "Accepted"})))
        self.assertEqual(self.effects.sent, [])
        [copy] = self.effects.dead_lettered
        self.assertEqual(
            copy["headers"][VALIDATION_CODE],
            self.code(ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION),
        )
        answer = self.examples["boot_answer"]
        self.session.delivery(Delivery(2, result("b1", answer)))
        self.assertEqual(self.effects.sent, [[3, "b1", answer]])
        self.assertEqual(self.effects.acked, [2])

    # -- the charger's answers -------------------------------------------------

    def test_valid_call_result_published(self):
        self.start()
        action, valid, _invalid, _kind, answer, _bad = self.examples["command"]
        self.session.delivery(Delivery(1, call("c1", action, valid)))
        self.session.charger_frame(result("c1", answer))
        [published] = self.effects.published
        self.assertEqual(
            published["routing_key"], f"{self.version.routing_prefix}.{action}.conf"
        )
        self.assertIsNone(published["extra_headers"])

    def test_invalid_call_result_enforced(self):
        """
        An invalid CALLRESULT is reported to the back end as a CALLERROR in
        place of the answer, in every version; 2.1 also refuses it to the
        charger with a CALLRESULTERROR.
        """
        self.start()
        action, valid, _invalid, _kind, _answer, bad = self.examples["command"]
        self.session.delivery(Delivery(1, call("c1", action, valid), reply_to="r"))
        self.effects.sent.clear()
        self.session.charger_frame(result("c1", bad))
        [published] = self.effects.published
        self.assertEqual(
            published["routing_key"], f"{self.version.routing_prefix}.{action}.error"
        )
        error = json.loads(published["body"])
        kind = (
            ErrorKind.PROPERTY_CONSTRAINT_VIOLATION
            if self.version is OCPP16
            else ErrorKind.FORMAT_VIOLATION
        )
        self.assertEqual(error[:3], [4, "c1", self.code(kind)])
        self.assertEqual(published["extra_headers"][VALIDATION_CODE], self.code(kind))
        self.assertEqual(self.effects.replies[0]["body"], published["body"])
        if self.version.has_send:
            self.assertEqual(self.effects.sent, [[5, "c1", self.code(kind), error[3][42:], {}]])
        else:
            self.assertEqual(self.effects.sent, [])
        # the command is done with once the broker has the error
        published["on_outcome"](PublishOutcome.CONFIRMED)
        self.effects.replies[0]["on_outcome"](PublishOutcome.CONFIRMED)
        self.assertEqual(self.effects.acked, [1])
        self.assertIsNone(self.session.outstanding_call)

    def test_invalid_call_result_warn(self):
        self.start(mode=WARN)
        action, valid, _invalid, _kind, _answer, bad = self.examples["command"]
        self.session.delivery(Delivery(1, call("c1", action, valid)))
        self.session.charger_frame(result("c1", bad))
        [published] = self.effects.published
        self.assertEqual(published["body"], result("c1", bad))
        self.assertIn(VALIDATION_ERROR, published["extra_headers"])
        self.assertEqual(self.effects.sent, [[2, "c1", action, valid]])


class Ocpp16Tests(_VersionTests, SynchronousTestCase):
    version = OCPP16


class Ocpp20Tests(_VersionTests, SynchronousTestCase):
    version = OCPP20


class Ocpp201Tests(_VersionTests, SynchronousTestCase):
    version = OCPP201


class Ocpp21Tests(_VersionTests, SynchronousTestCase):
    version = OCPP21

    def test_invalid_send_dropped(self):
        """
        A SEND is never answered (2.1 §4.2.4): an invalid one is dropped,
        counted and logged, in enforce mode.
        """
        self.start()
        frame = json.dumps([6, "s1", "NotifyPeriodicEventStream", {"id": "x"}]).encode()
        self.session.charger_frame(frame)
        self.assertEqual(self.effects.sent, [])
        self.assertEqual(self.effects.published, [])
        self.assertEqual(
            self.validation.stats.refused[("ocpp2.1", "charger", "NotifyPeriodicEventStream")],
            1,
        )
