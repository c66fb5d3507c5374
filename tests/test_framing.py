"""
Tests for L{ocppgw.framing}: OCPP-J parsing, refusal, encoding.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import Any, Optional

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ocppgw import framing
from ocppgw.framing import (
    CALL,
    CALLERROR,
    CALLRESULT,
    CALLRESULTERROR,
    OCPP16,
    OCPP20,
    OCPP21,
    OCPP201,
    SEND,
    VERSIONS,
    BadFrame,
    ErrorKind,
    Frame,
    OcppVersion,
    error_code,
    parse_frame,
)

ALL_VERSIONS = (OCPP16, OCPP20, OCPP201, OCPP21)
BEFORE_21 = (OCPP16, OCPP20, OCPP201)
K = ErrorKind


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


class VersionTests(SynchronousTestCase):
    """
    The supported versions and what distinguishes them.
    """

    def test_versions(self) -> None:
        """
        One version per supported subprotocol, with the routing prefixes of
        C{rabbitmq_web_ocpp}.
        """
        self.assertEqual(
            {s: v.routing_prefix for s, v in VERSIONS.items()},
            {
                "ocpp1.6": "ocpp16",
                "ocpp2.0": "ocpp20",
                "ocpp2.0.1": "ocpp201",
                "ocpp2.1": "ocpp21",
            },
        )
        self.assertEqual(list(VERSIONS.values()), list(ALL_VERSIONS))

    def test_soap_only(self) -> None:
        """
        1.2 and 1.5 are known to be SOAP-only and are not supported versions.
        """
        self.assertEqual(framing.SOAP_ONLY_SUBPROTOCOLS, {"ocpp1.2", "ocpp1.5"})
        self.assertFalse(framing.SOAP_ONLY_SUBPROTOCOLS & set(VERSIONS))

    def test_message_types(self) -> None:
        """
        Only 2.1 has CALLRESULTERROR and SEND.
        """
        for version in BEFORE_21:
            self.assertFalse(version.has_send)
            self.assertEqual(version.message_types, {2, 3, 4})
        self.assertTrue(OCPP21.has_send)
        self.assertEqual(OCPP21.message_types, {2, 3, 4, 5, 6})

    def test_frozen(self) -> None:
        """
        Versions are immutable values.
        """
        with self.assertRaises(dataclasses.FrozenInstanceError):
            OCPP16.has_send = True  # type: ignore[misc]
        with self.assertRaises(TypeError):
            OCPP16.error_codes[K.FORMAT_VIOLATION] = "x"  # type: ignore[index]
        self.assertEqual(OCPP201, OcppVersion("ocpp2.0.1", "ocpp201", False, True))
        self.assertEqual(
            hash(OCPP201), hash(OcppVersion("ocpp2.0.1", "ocpp201", False, True))
        )


class ErrorCodeTests(SynchronousTestCase):
    """
    L{error_code} spells every kind for every version.
    """

    OCPP2 = {
        K.FORMAT_VIOLATION: "FormatViolation",
        K.GENERIC_ERROR: "GenericError",
        K.INTERNAL_ERROR: "InternalError",
        K.MESSAGE_TYPE_NOT_SUPPORTED: "MessageTypeNotSupported",
        K.NOT_IMPLEMENTED: "NotImplemented",
        K.NOT_SUPPORTED: "NotSupported",
        K.OCCURRENCE_CONSTRAINT_VIOLATION: "OccurrenceConstraintViolation",
        K.PROPERTY_CONSTRAINT_VIOLATION: "PropertyConstraintViolation",
        K.PROTOCOL_ERROR: "ProtocolError",
        K.RPC_FRAMEWORK_ERROR: "RpcFrameworkError",
        K.SECURITY_ERROR: "SecurityError",
        K.TYPE_CONSTRAINT_VIOLATION: "TypeConstraintViolation",
    }

    # OCPP-J 1.6 Table 7 has exactly these ten codes.
    OCPP16_TABLE = {
        "NotImplemented",
        "NotSupported",
        "InternalError",
        "ProtocolError",
        "SecurityError",
        "FormationViolation",
        "PropertyConstraintViolation",
        "OccurenceConstraintViolation",
        "TypeConstraintViolation",
        "GenericError",
    }

    def test_ocpp2(self) -> None:
        """
        2.0, 2.0.1 and 2.1 use the 2.0.1 Part 4 Table 8 spellings.
        """
        for version in (OCPP20, OCPP201, OCPP21):
            self.assertEqual({k: error_code(version, k) for k in K}, self.OCPP2)

    def test_ocpp16_spellings(self) -> None:
        """
        1.6 keeps its own spellings of two codes.
        """
        self.assertEqual(error_code(OCPP16, K.FORMAT_VIOLATION), "FormationViolation")
        self.assertEqual(
            error_code(OCPP16, K.OCCURRENCE_CONSTRAINT_VIOLATION),
            "OccurenceConstraintViolation",
        )

    def test_ocpp16_has_no_framework_codes(self) -> None:
        """
        1.6 lacks RpcFrameworkError and MessageTypeNotSupported; they become
        its catch-all, GenericError.
        """
        self.assertEqual(error_code(OCPP16, K.RPC_FRAMEWORK_ERROR), "GenericError")
        self.assertEqual(
            error_code(OCPP16, K.MESSAGE_TYPE_NOT_SUPPORTED), "GenericError"
        )

    def test_ocpp16_only_table_7(self) -> None:
        """
        Every code sent to a 1.6 charger is in the 1.6 table, and every
        entry of the table can be sent.
        """
        self.assertEqual({error_code(OCPP16, k) for k in K}, self.OCPP16_TABLE)

    def test_is_error_code(self) -> None:
        """
        L{framing.is_error_code} knows each version's table, spelled as
        that version spells it.
        """
        for code in self.OCPP16_TABLE:
            self.assertTrue(framing.is_error_code(OCPP16, code), code)
        for version in (OCPP20, OCPP201, OCPP21):
            for code in self.OCPP2.values():
                self.assertTrue(framing.is_error_code(version, code), code)
            self.assertFalse(framing.is_error_code(version, "FormationViolation"))
        for code in ("FormatViolation", "RpcFrameworkError", "Rejected", "", "genericerror"):
            self.assertFalse(framing.is_error_code(OCPP16, code), code)


class ParseValidTests(SynchronousTestCase):
    """
    Valid frames of every type, in every version that has them.
    """

    def test_call(self) -> None:
        for version in ALL_VERSIONS:
            frame = parse_frame(
                b'[2,"19223201","BootNotification",{"reason":"PowerUp"}]', version
            )
            self.assertEqual(
                frame,
                Frame(CALL, "19223201", "BootNotification", {"reason": "PowerUp"}),
            )
            self.assertIsNone(frame.error_code)

    def test_call_result(self) -> None:
        for version in ALL_VERSIONS:
            frame = parse_frame(b'[3,"19223201",{"status":"Accepted"}]', version)
            self.assertEqual(
                frame, Frame(CALLRESULT, "19223201", None, {"status": "Accepted"})
            )

    def test_call_error(self) -> None:
        for version in ALL_VERSIONS:
            frame = parse_frame(
                b'[4,"162376037","NotSupported","not here",{"x":1}]', version
            )
            self.assertEqual(frame.message_type, CALLERROR)
            self.assertEqual(frame.message_id, "162376037")
            self.assertEqual(frame.error_code, "NotSupported")
            self.assertEqual(frame.error_description, "not here")
            self.assertEqual(frame.error_details, {"x": 1})
            self.assertIsNone(frame.action)
            self.assertIsNone(frame.payload)

    def test_call_error_any_code(self) -> None:
        """
        The code of a received error is passed on, not checked against the
        version's table: the back end decides what it means.
        """
        frame = parse_frame(b'[4,"1","FormationViolation","",{}]', OCPP201)
        self.assertEqual(frame.error_code, "FormationViolation")

    def test_call_result_error_21(self) -> None:
        frame = parse_frame(b'[5,"1","FormatViolation","bad",{}]', OCPP21)
        self.assertEqual(
            frame, Frame(CALLRESULTERROR, "1", None, None, "FormatViolation", "bad", {})
        )

    def test_send_21(self) -> None:
        frame = parse_frame(
            b'[6,"19223201","NotifyPeriodicEventStream",{"id":123}]', OCPP21
        )
        self.assertEqual(
            frame, Frame(SEND, "19223201", "NotifyPeriodicEventStream", {"id": 123})
        )

    def test_bytes_and_str(self) -> None:
        """
        A frame may be given as the received UTF-8 bytes or as text.
        """
        expected = Frame(CALL, "1", "Heartbeat", {})
        for data in ('[2,"1","Heartbeat",{}]', b'[2,"1","Heartbeat",{}]'):
            self.assertEqual(parse_frame(data, OCPP16), expected)

    def test_whitespace_and_unicode(self) -> None:
        """
        Any valid JSON encoding of a frame is accepted.
        """
        frame = parse_frame(
            ' [ 2 , "\\u00e9t\u00e9" , "DataTransfer" , {"text": "\u2603"} ] '.encode(),
            OCPP16,
        )
        self.assertEqual(
            frame, Frame(CALL, "\u00e9t\u00e9", "DataTransfer", {"text": "\u2603"})
        )

    def test_id_lengths(self) -> None:
        """
        Ids of 1 and 36 characters are valid; "-1" is an ordinary id.
        """
        for message_id in ("x", "-1", "a" * 36, "\U0001f600" * 36):
            frame = parse_frame(dumps([3, message_id, {}]), OCPP16)
            self.assertEqual(frame.message_id, message_id)

    def test_action_lengths(self) -> None:
        for action in ("A", "SignedFirmwareStatusNotification", "A" * 64, "Get2"):
            self.assertEqual(
                parse_frame(dumps([2, "1", action, {}]), OCPP16).action, action
            )

    def test_large_numbers_in_payload(self) -> None:
        """
        Numbers JSON allows but Python cannot hold exactly are not an error.
        """
        frame = parse_frame(
            b'[2,"1","MeterValues",{"v":1e308,"w":123456789012345678901234567890}]',
            OCPP16,
        )
        self.assertEqual(frame.payload, {"v": 1e308, "w": 1.2345678901234568e29})

    def test_repr_hides_payload(self) -> None:
        frame = parse_frame(b'[2,"1","DataTransfer",{"secret":"s3cr3t"}]', OCPP16)
        self.assertNotIn("s3cr3t", repr(frame))
        self.assertIn("DataTransfer", repr(frame))


class RefusalTestCase(SynchronousTestCase):
    """
    Check a L{BadFrame} and the answer it carries.
    """

    def assertRefused(
        self,
        data: bytes | str,
        version: OcppVersion,
        kind: ErrorKind,
        message_id: str,
        answer: Optional[int],
    ) -> BadFrame:
        bad = self.assertRaises(BadFrame, parse_frame, data, version)
        self.assertIs(bad.kind, kind)
        self.assertEqual(bad.code, error_code(version, kind))
        self.assertEqual(bad.message_id, message_id)
        self.assertLessEqual(len(bad.description), 120)
        if answer is None:
            self.assertIsNone(bad.reply)
        else:
            assert bad.reply is not None
            self.assertEqual(
                orjson.loads(bad.reply),
                [answer, message_id, bad.code, bad.description, {}],
            )
        return bad


class MalformedEnvelopeTests(RefusalTestCase):
    """
    Frames whose envelope is broken: the charger is owed an
    RpcFrameworkError CALLERROR, with id "-1" unless its id can be read.
    """

    def test_not_json(self) -> None:
        for data in (
            b"",
            b"hello",
            b'[2,"1","A",{}',
            b"\xff\xfe",
            b"\xef\xbb\xbf[]",
            b"NaN",
            "[2,'1']",
        ):
            for version in ALL_VERSIONS:
                bad = self.assertRefused(
                    data, version, K.RPC_FRAMEWORK_ERROR, "-1", CALLERROR
                )
                self.assertIsNone(bad.message_type)

    def test_not_json_code_per_version(self) -> None:
        self.assertEqual(
            self.assertRaises(BadFrame, parse_frame, b"x", OCPP16).code, "GenericError"
        )
        self.assertEqual(
            self.assertRaises(BadFrame, parse_frame, b"x", OCPP201).code,
            "RpcFrameworkError",
        )

    def test_not_array(self) -> None:
        for data in (b"{}", b'{"id":"1"}', b"2", b'"[2]"', b"null", b"true"):
            for version in ALL_VERSIONS:
                self.assertRefused(
                    data, version, K.RPC_FRAMEWORK_ERROR, "-1", CALLERROR
                )

    def test_empty_array(self) -> None:
        for version in ALL_VERSIONS:
            self.assertRefused(b"[]", version, K.RPC_FRAMEWORK_ERROR, "-1", CALLERROR)

    def test_type_not_integer(self) -> None:
        """
        A type that is not a JSON integer (booleans included, though Python
        counts them as ints) is an envelope error; a readable id is used.
        """
        for first in (
            b'"2"',
            b"2.0",
            b"true",
            b"false",
            b"null",
            b"[2]",
            b"{}",
            b"1e4",
        ):
            data = b"[" + first + b',"abc","Heartbeat",{}]'
            for version in ALL_VERSIONS:
                bad = self.assertRefused(
                    data, version, K.RPC_FRAMEWORK_ERROR, "abc", CALLERROR
                )
                self.assertIsNone(bad.message_type)
        for version in ALL_VERSIONS:
            self.assertRefused(
                b"[true, 5]", version, K.RPC_FRAMEWORK_ERROR, "-1", CALLERROR
            )

    def test_huge_type_number(self) -> None:
        """
        Integers beyond 64 bits parse as floats, so they are "not an integer".
        """
        for version in ALL_VERSIONS:
            self.assertRefused(
                b'[123456789012345678901234567890,"1"]',
                version,
                K.RPC_FRAMEWORK_ERROR,
                "1",
                CALLERROR,
            )

    def test_deeply_nested(self) -> None:
        """
        Nesting beyond the parser's limit is refused, not a crash.
        """
        data = b'[2,"1","A",' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"]"
        self.assertRefused(data, OCPP16, K.RPC_FRAMEWORK_ERROR, "-1", CALLERROR)
        self.assertRefused(
            b"[" * 100000, OCPP21, K.RPC_FRAMEWORK_ERROR, "-1", CALLERROR
        )

    def test_invalid_unicode(self) -> None:
        """
        Lone surrogates and invalid UTF-8 are not valid JSON text.
        """
        for data in (
            b'[2,"\\ud800","A",{}]',
            b'[2,"\xed\xa0\x80","A",{}]',
            '[2,"\ud800","A",{}]',
        ):
            self.assertRefused(data, OCPP201, K.RPC_FRAMEWORK_ERROR, "-1", CALLERROR)


class MalformedIdTests(RefusalTestCase):
    """
    An id that is not a string of 1 to 36 characters cannot be read.
    """

    BAD_IDS = (None, 1, 1.5, True, [], {}, "", "a" * 37)

    def test_call(self) -> None:
        for message_id in self.BAD_IDS:
            for version in ALL_VERSIONS:
                bad = self.assertRefused(
                    dumps([2, message_id, "Heartbeat", {}]),
                    version,
                    K.RPC_FRAMEWORK_ERROR,
                    "-1",
                    CALLERROR,
                )
                self.assertEqual(bad.message_type, CALL)

    def test_call_result(self) -> None:
        for message_id in self.BAD_IDS:
            for version in BEFORE_21:
                self.assertRefused(
                    dumps([3, message_id, {}]),
                    version,
                    K.RPC_FRAMEWORK_ERROR,
                    "-1",
                    None,
                )
            self.assertRefused(
                dumps([3, message_id, {}]),
                OCPP21,
                K.RPC_FRAMEWORK_ERROR,
                "-1",
                CALLRESULTERROR,
            )

    def test_errors_and_send(self) -> None:
        for message_id in self.BAD_IDS:
            for version in ALL_VERSIONS:
                self.assertRefused(
                    dumps([4, message_id, "GenericError", "", {}]),
                    version,
                    K.RPC_FRAMEWORK_ERROR,
                    "-1",
                    None,
                )
            self.assertRefused(
                dumps([5, message_id, "GenericError", "", {}]),
                OCPP21,
                K.RPC_FRAMEWORK_ERROR,
                "-1",
                None,
            )
            self.assertRefused(
                dumps([6, message_id, "NotifyPeriodicEventStream", {}]),
                OCPP21,
                K.RPC_FRAMEWORK_ERROR,
                "-1",
                None,
            )

    def test_id_missing(self) -> None:
        for version in ALL_VERSIONS:
            self.assertRefused(b"[2]", version, K.RPC_FRAMEWORK_ERROR, "-1", CALLERROR)


class LongIdTests(RefusalTestCase):
    """
    C{max_id_length} raises the 36-character limit, up to what fits an
    AMQP correlation_id (255 bytes of UTF-8).
    """

    def test_accepted_up_to_the_limit(self) -> None:
        for message_id in ("a" * 37, "a" * 255, "\u00e9" * 127, "\U0001f600" * 63):
            frame = parse_frame(dumps([2, message_id, "Heartbeat", {}]), OCPP16, 255)
            self.assertEqual(frame.message_id, message_id)
            frame = parse_frame(dumps([3, message_id, {}]), OCPP201, 255)
            self.assertEqual(frame.message_id, message_id)
            frame = parse_frame(dumps([4, message_id, "GenericError", "", {}]), OCPP21, 255)
            self.assertEqual(frame.message_id, message_id)
        frame = parse_frame(dumps([2, "a" * 100, "Heartbeat", {}]), OCPP16, 100)
        self.assertEqual(len(frame.message_id), 100)

    def test_refused_over_the_limit(self) -> None:
        """
        Over the limit in characters, or in the bytes of a correlation_id:
        unreadable, like any bad id; the description names the limit.
        """
        for message_id, limit in (("a" * 101, 100), ("a" * 256, 255),
                                  ("\u00e9" * 128, 255), ("\U0001f600" * 64, 255)):
            bad = self.assertRaises(
                BadFrame, parse_frame, dumps([2, message_id, "Heartbeat", {}]), OCPP16, limit)
            self.assertEqual(bad.message_id, "-1")
            self.assertIn(f"1 to {limit} characters", bad.description)
            bad = self.assertRaises(
                BadFrame, parse_frame, dumps([3, message_id, {}, 1]), OCPP16, limit)
            self.assertEqual(bad.message_id, "-1")

    def test_readable_id_uses_the_limit(self) -> None:
        """A broken frame with a long id is answered with that id."""
        message_id = "a" * 100
        bad = self.assertRaises(
            BadFrame, parse_frame, dumps([2, message_id, "Heartbeat", []]), OCPP16, 255)
        self.assertEqual(bad.message_id, message_id)
        self.assertEqual(orjson.loads(bad.reply)[1], message_id)


class MalformedCallTests(RefusalTestCase):
    """
    A broken CALL is answered with a CALLERROR in every version.
    """

    def test_wrong_length(self) -> None:
        for message in (
            [2, "abc"],
            [2, "abc", "Heartbeat"],
            [2, "abc", "Heartbeat", {}, {}],
        ):
            for version in ALL_VERSIONS:
                self.assertRefused(
                    dumps(message), version, K.RPC_FRAMEWORK_ERROR, "abc", CALLERROR
                )

    def test_action_not_string(self) -> None:
        for action in (None, 1, [], {}, True):
            for version in ALL_VERSIONS:
                self.assertRefused(
                    dumps([2, "abc", action, {}]),
                    version,
                    K.RPC_FRAMEWORK_ERROR,
                    "abc",
                    CALLERROR,
                )

    def test_action_not_a_name(self) -> None:
        """
        An action that cannot be an OCPP action name is not known to us:
        NotImplemented. This keeps dots, wildcards and huge strings out of
        routing keys.
        """
        for action in (
            "",
            "Boot.Notification",
            "#",
            "*",
            "Heart beat",
            "A" * 65,
            "Caf\u00e9",
            "A\n",
        ):
            for version in ALL_VERSIONS:
                self.assertRefused(
                    dumps([2, "abc", action, {}]),
                    version,
                    K.NOT_IMPLEMENTED,
                    "abc",
                    CALLERROR,
                )

    def test_payload_not_object(self) -> None:
        for payload in (None, [], "{}", 1, True):
            for version in ALL_VERSIONS:
                self.assertRefused(
                    dumps([2, "abc", "Heartbeat", payload]),
                    version,
                    K.FORMAT_VIOLATION,
                    "abc",
                    CALLERROR,
                )

    def test_payload_not_object_spelling(self) -> None:
        data = b'[2,"abc","Heartbeat",null]'
        self.assertEqual(
            self.assertRaises(BadFrame, parse_frame, data, OCPP16).code,
            "FormationViolation",
        )
        self.assertEqual(
            self.assertRaises(BadFrame, parse_frame, data, OCPP21).code,
            "FormatViolation",
        )


class MalformedAnswerTests(RefusalTestCase):
    """
    A broken CALLRESULT is answered with a CALLRESULTERROR in 2.1 and not at
    all before; broken errors are never answered.
    """

    def test_call_result_wrong_length(self) -> None:
        for message in ([3, "abc"], [3, "abc", {}, {}]):
            for version in BEFORE_21:
                self.assertRefused(
                    dumps(message), version, K.RPC_FRAMEWORK_ERROR, "abc", None
                )
            self.assertRefused(
                dumps(message), OCPP21, K.RPC_FRAMEWORK_ERROR, "abc", CALLRESULTERROR
            )

    def test_call_result_payload_not_object(self) -> None:
        for payload in (None, [], "x", 0):
            for version in BEFORE_21:
                bad = self.assertRefused(
                    dumps([3, "abc", payload]), version, K.FORMAT_VIOLATION, "abc", None
                )
                self.assertEqual(bad.message_type, CALLRESULT)
            self.assertRefused(
                dumps([3, "abc", payload]),
                OCPP21,
                K.FORMAT_VIOLATION,
                "abc",
                CALLRESULTERROR,
            )

    def test_call_error_wrong_length(self) -> None:
        for message in (
            [4, "abc"],
            [4, "abc", "GenericError", ""],
            [4, "abc", "E", "", {}, {}],
        ):
            for version in ALL_VERSIONS:
                self.assertRefused(
                    dumps(message), version, K.RPC_FRAMEWORK_ERROR, "abc", None
                )

    def test_call_error_fields(self) -> None:
        for message in ([4, "abc", None, "", {}], [4, "abc", "E", 1, {}]):
            for version in ALL_VERSIONS:
                self.assertRefused(
                    dumps(message), version, K.RPC_FRAMEWORK_ERROR, "abc", None
                )
        for details in (None, [], "", 1):
            for version in ALL_VERSIONS:
                bad = self.assertRefused(
                    dumps([4, "abc", "E", "", details]),
                    version,
                    K.FORMAT_VIOLATION,
                    "abc",
                    None,
                )
                self.assertEqual(bad.message_type, CALLERROR)

    def test_call_result_error_21(self) -> None:
        self.assertRefused(
            dumps([5, "abc", "E", "", []]), OCPP21, K.FORMAT_VIOLATION, "abc", None
        )
        self.assertRefused(
            dumps([5, "abc", "E"]), OCPP21, K.RPC_FRAMEWORK_ERROR, "abc", None
        )

    def test_send_21_never_answered(self) -> None:
        for message, kind in (
            ([6, "abc", "X"], K.RPC_FRAMEWORK_ERROR),
            ([6, "abc", 7, {}], K.RPC_FRAMEWORK_ERROR),
            ([6, "abc", "X.Y", {}], K.NOT_IMPLEMENTED),
            ([6, "abc", "X", None], K.FORMAT_VIOLATION),
        ):
            bad = self.assertRefused(dumps(message), OCPP21, kind, "abc", None)
            self.assertEqual(bad.message_type, SEND)


class UnknownMessageTypeTests(RefusalTestCase):
    """
    Integer message types the version does not have: ignored (no answer) in
    1.6 and 2.1, MessageTypeNotSupported CALLERROR in 2.0 and 2.0.1.
    """

    def test_unknown_everywhere(self) -> None:
        for number in (0, 1, 7, 99, -2, 2**63):
            data = dumps([number, "abc", "X", {}])
            for version in (OCPP16, OCPP21):
                bad = self.assertRefused(
                    data, version, K.MESSAGE_TYPE_NOT_SUPPORTED, "abc", None
                )
                self.assertEqual(bad.message_type, number)
            for version in (OCPP20, OCPP201):
                self.assertRefused(
                    data, version, K.MESSAGE_TYPE_NOT_SUPPORTED, "abc", CALLERROR
                )

    def test_21_types_before_21(self) -> None:
        """
        CALLRESULTERROR and SEND are unknown numbers before 2.1.
        """
        for message in (
            [5, "abc", "E", "", {}],
            [6, "abc", "NotifyPeriodicEventStream", {}],
        ):
            self.assertRefused(
                dumps(message), OCPP16, K.MESSAGE_TYPE_NOT_SUPPORTED, "abc", None
            )
            for version in (OCPP20, OCPP201):
                bad = self.assertRefused(
                    dumps(message),
                    version,
                    K.MESSAGE_TYPE_NOT_SUPPORTED,
                    "abc",
                    CALLERROR,
                )
                self.assertEqual(bad.code, "MessageTypeNotSupported")

    def test_unreadable_id(self) -> None:
        self.assertRefused(
            b"[9]", OCPP201, K.MESSAGE_TYPE_NOT_SUPPORTED, "-1", CALLERROR
        )
        self.assertRefused(
            b"[9, 5]", OCPP201, K.MESSAGE_TYPE_NOT_SUPPORTED, "-1", CALLERROR
        )

    def test_code_16(self) -> None:
        bad = self.assertRaises(BadFrame, parse_frame, b'[7,"a"]', OCPP16)
        self.assertEqual(bad.code, "GenericError")


class DescriptionSafetyTests(SynchronousTestCase):
    """
    Descriptions name the broken rule and never quote hostile input.
    """

    HOSTILE = "EVIL\r\n\x1b[31m<script>" * 2000

    def _descriptions(self, version: OcppVersion) -> list[BadFrame]:
        h = self.HOSTILE
        frames: list[Any] = [
            [2, "abc", h, {}],
            [2, h, "Heartbeat", {}],
            [2, "abc", "Heartbeat", h],
            [3, "abc", h],
            [4, "abc", h, h, h],
            [h, "abc"],
            [2, "abc", [h], {}],
            {h: h},
        ]
        data = [dumps(f) for f in frames] + [h.encode(), b'[2,"' + h.encode() + b'"']
        return [self.assertRaises(BadFrame, parse_frame, d, version) for d in data]

    def test_no_echo(self) -> None:
        for version in ALL_VERSIONS:
            for bad in self._descriptions(version):
                for text in (bad.description, str(bad), bad.message_id, repr(bad)):
                    self.assertNotIn("EVIL", text)
                    self.assertNotIn("\r", text)
                    self.assertNotIn("\n", text)
                self.assertLess(len(bad.description), 120)
                if bad.reply is not None:
                    self.assertLess(len(bad.reply), 200)

    def test_str(self) -> None:
        bad = self.assertRaises(BadFrame, parse_frame, b"[]", OCPP201)
        self.assertEqual(str(bad), "RpcFrameworkError: " + bad.description)

    def test_no_exception_context(self) -> None:
        """
        A refused non-JSON frame does not keep the decoder's exception (and
        with it the whole frame) alive.
        """
        bad = self.assertRaises(BadFrame, parse_frame, b"x" * 1000, OCPP16)
        self.assertIsNone(bad.__context__)
        self.assertIsNone(bad.__cause__)


class EncoderTests(SynchronousTestCase):
    """
    Frames the gateway sends.
    """

    def test_call(self) -> None:
        data = framing.encode_call("1", "Reset", {"type": "Hard"})
        self.assertIsInstance(data, bytes)
        self.assertEqual(orjson.loads(data), [2, "1", "Reset", {"type": "Hard"}])

    def test_call_result(self) -> None:
        self.assertEqual(
            orjson.loads(framing.encode_call_result("1", {"status": "Accepted"})),
            [3, "1", {"status": "Accepted"}],
        )

    def test_send(self) -> None:
        self.assertEqual(
            orjson.loads(
                framing.encode_send("1", "NotifyPeriodicEventStream", {"id": 1})
            ),
            [6, "1", "NotifyPeriodicEventStream", {"id": 1}],
        )

    def test_call_error_spelled_per_version(self) -> None:
        for version, code in (
            (OCPP16, "FormationViolation"),
            (OCPP201, "FormatViolation"),
        ):
            data = framing.encode_call_error(version, "7", K.FORMAT_VIOLATION, "bad")
            self.assertEqual(orjson.loads(data), [4, "7", code, "bad", {}])

    def test_call_error_details(self) -> None:
        data = framing.encode_call_error(
            OCPP16, "7", K.GENERIC_ERROR, "timeout", {"reason": "timeout"}
        )
        self.assertEqual(
            orjson.loads(data),
            [4, "7", "GenericError", "timeout", {"reason": "timeout"}],
        )

    def test_description_truncated(self) -> None:
        """
        2.x allows at most 255 characters of description.
        """
        data = framing.encode_call_error(
            OCPP201, "7", K.INTERNAL_ERROR, "\u00e9" * 1000
        )
        self.assertEqual(orjson.loads(data)[3], "\u00e9" * 255)

    def test_call_result_error(self) -> None:
        data = framing.encode_call_result_error(
            OCPP21, "9", K.OCCURRENCE_CONSTRAINT_VIOLATION, "x"
        )
        self.assertEqual(
            orjson.loads(data), [5, "9", "OccurrenceConstraintViolation", "x", {}]
        )

    def test_call_result_error_before_21(self) -> None:
        for version in BEFORE_21:
            self.assertRaises(
                ValueError,
                framing.encode_call_result_error,
                version,
                "9",
                K.GENERIC_ERROR,
                "x",
            )

    def test_replies_are_valid_frames(self) -> None:
        """
        What the gateway sends parses as a valid frame of the same version.
        """
        for version in ALL_VERSIONS:
            frame = parse_frame(
                framing.encode_call_error(version, "-1", K.RPC_FRAMEWORK_ERROR, ""),
                version,
            )
            self.assertEqual(frame.message_type, CALLERROR)
            self.assertEqual(
                frame.error_code, error_code(version, K.RPC_FRAMEWORK_ERROR)
            )


class OfflineStatusNotificationTests(SynchronousTestCase):
    """
    The "charger went away" StatusNotification, shaped like the plugin's.
    """

    TS = "2025-01-02T03:04:05Z"

    def test_16(self) -> None:
        frame = parse_frame(
            framing.offline_status_notification(OCPP16, "gw-1", self.TS), OCPP16
        )
        self.assertEqual(frame.message_type, CALL)
        self.assertEqual(frame.message_id, "gw-1")
        self.assertEqual(frame.action, "StatusNotification")
        self.assertEqual(
            frame.payload,
            {
                "connectorId": 0,
                "errorCode": "NoError",
                "status": "Unavailable",
                "timestamp": self.TS,
                "vendorId": "ocppgw",
                "vendorErrorCode": "Offline",
            },
        )

    def test_2x(self) -> None:
        for version in (OCPP20, OCPP201, OCPP21):
            frame = parse_frame(
                framing.offline_status_notification(version, "gw-2", self.TS), version
            )
            self.assertEqual(frame.action, "StatusNotification")
            self.assertEqual(
                frame.payload,
                {
                    "timestamp": self.TS,
                    "connectorStatus": "Unavailable",
                    "evseId": 0,
                    "connectorId": 0,
                    "customData": {"vendorId": "ocppgw", "vendorErrorCode": "Offline"},
                },
            )


class TruncateForLogTests(SynchronousTestCase):
    """
    L{framing.truncate_for_log} renders untrusted data on one safe line.
    """

    def test_short_unchanged(self) -> None:
        self.assertEqual(
            framing.truncate_for_log(b'[2,"1","Heartbeat",{}]'),
            '[2,"1","Heartbeat",{}]',
        )
        self.assertEqual(framing.truncate_for_log("h\u00e9llo"), "h\u00e9llo")

    def test_truncated(self) -> None:
        self.assertEqual(
            framing.truncate_for_log(b"a" * 300, 10), "aaaaaaaaaa... (290 more bytes)"
        )
        self.assertEqual(
            framing.truncate_for_log("a" * 11, 10), "aaaaaaaaaa... (1 more characters)"
        )

    def test_escapes(self) -> None:
        self.assertEqual(
            framing.truncate_for_log("a\r\nb\x1b\u2028\u202e\x85"),
            "a\\x0d\\x0ab\\x1b\\u2028\\u202e\\x85",
        )

    def test_invalid_utf8(self) -> None:
        """
        Invalid bytes, including a character cut by the limit, do not raise.
        """
        self.assertEqual(framing.truncate_for_log(b"\xff\xfe"), "\ufffd\ufffd")
        self.assertEqual(
            framing.truncate_for_log("\u00e9\u00e9".encode(), 3),
            "\u00e9\ufffd... (1 more bytes)",
        )


class PurityTests(SynchronousTestCase):
    """
    The framing module does no I/O and imports no network library.
    """

    def test_imports(self) -> None:
        tree = ast.parse(inspect.getsource(framing))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(node.module or "")
        for name in names:
            self.assertFalse(name.startswith(("twisted", "autobahn", "pika")), name)

    def test_frame_slots(self) -> None:
        frame = Frame(CALL, "1", "A", {})
        self.assertFalse(hasattr(frame, "__dict__"))
        self.assertFalse(hasattr(OCPP16, "__dict__"))


# -- properties -----------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=15,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
versions = st.sampled_from(ALL_VERSIONS)
message_ids = st.text(min_size=1, max_size=36)
actions = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
    min_size=1,
    max_size=64,
)
# First elements near the interesting ones, and anything else.
first_elements = st.integers(min_value=-1, max_value=8) | json_values
frame_like = st.builds(
    lambda first, rest: [first, *rest],
    first_elements,
    st.lists(message_ids | json_values, max_size=6),
)


class PropertyTests(SynchronousTestCase):
    """
    No input crashes the parser, refusals are consistent, and valid frames
    round-trip.
    """

    def check(self, data: bytes | str, version: OcppVersion) -> None:
        """
        Parse C{data}: a L{Frame} or a consistent L{BadFrame}, nothing else.
        """
        try:
            frame = parse_frame(data, version)
        except BadFrame as bad:
            self.assertEqual(bad.code, error_code(version, bad.kind))
            self.assertLessEqual(len(bad.description), 120)
            if bad.message_id != framing.UNKNOWN_MESSAGE_ID:
                self.assertTrue(0 < len(bad.message_id) <= 36)
            if bad.reply is not None:
                # The answer is itself a valid frame of the version.
                answer = parse_frame(bad.reply, version)
                self.assertIn(answer.message_type, (CALLERROR, CALLRESULTERROR))
                self.assertEqual(answer.message_id, bad.message_id)
                self.assertEqual(answer.error_code, bad.code)
                self.assertEqual(answer.error_details, {})
        else:
            self.assertIn(frame.message_type, version.message_types)
            self.assertTrue(0 < len(frame.message_id) <= 36)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), versions)
    def test_arbitrary_bytes(self, data: bytes, version: OcppVersion) -> None:
        self.check(data, version)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200), versions)
    def test_arbitrary_text(self, data: str, version: OcppVersion) -> None:
        self.check(data, version)

    @settings(max_examples=300, deadline=None)
    @given(json_values, versions)
    def test_arbitrary_json(self, value: Any, version: OcppVersion) -> None:
        self.check(dumps(value), version)

    @settings(max_examples=500, deadline=None)
    @given(frame_like, versions)
    def test_arbitrary_lists(self, value: list[Any], version: OcppVersion) -> None:
        self.check(dumps(value), version)
        self.check(dumps(value).decode(), version)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=1, max_size=50), frame_like, versions)
    def test_corrupted_frames(
        self, noise: bytes, value: list[Any], version: OcppVersion
    ) -> None:
        """
        Valid-looking JSON with bytes spliced in.
        """
        data = dumps(value)
        middle = len(data) // 2
        self.check(data[:middle] + noise + data[middle:], version)

    @settings(max_examples=200, deadline=None)
    @given(versions, st.sampled_from((CALL, SEND)), message_ids, actions, json_objects)
    def test_request_round_trip(
        self,
        version: OcppVersion,
        message_type: int,
        message_id: str,
        action: str,
        payload: dict[str, Any],
    ) -> None:
        if message_type == SEND and not version.has_send:
            message_type = CALL
        encode = framing.encode_call if message_type == CALL else framing.encode_send
        frame = parse_frame(encode(message_id, action, payload), version)
        self.assertEqual(frame, Frame(message_type, message_id, action, payload))

    @settings(max_examples=200, deadline=None)
    @given(versions, message_ids, json_objects)
    def test_call_result_round_trip(
        self, version: OcppVersion, message_id: str, payload: dict[str, Any]
    ) -> None:
        frame = parse_frame(framing.encode_call_result(message_id, payload), version)
        self.assertEqual(frame, Frame(CALLRESULT, message_id, None, payload))

    @settings(max_examples=200, deadline=None)
    @given(
        versions,
        message_ids,
        st.sampled_from(list(ErrorKind)),
        st.text(max_size=300),
        json_objects,
    )
    def test_error_round_trip(
        self,
        version: OcppVersion,
        message_id: str,
        kind: ErrorKind,
        description: str,
        details: dict[str, Any],
    ) -> None:
        frame = parse_frame(
            framing.encode_call_error(version, message_id, kind, description, details),
            version,
        )
        self.assertEqual(
            frame,
            Frame(
                CALLERROR,
                message_id,
                None,
                None,
                error_code(version, kind),
                description[:255],
                details,
            ),
        )
        if version.has_send:
            frame = parse_frame(
                framing.encode_call_result_error(
                    version, message_id, kind, description, details
                ),
                version,
            )
            self.assertEqual(frame.message_type, CALLRESULTERROR)
            self.assertEqual(frame.error_details, details)

    @settings(max_examples=200, deadline=None)
    @given(
        st.binary(max_size=500) | st.text(max_size=500),
        st.integers(min_value=0, max_value=100),
    )
    def test_truncate_for_log(self, data: bytes | str, limit: int) -> None:
        text = framing.truncate_for_log(data, limit)
        self.assertIsNone(framing._UNSAFE_FOR_LOG.search(text))
        # An escape is at most 6 characters (\\u2028), plus the note.
        self.assertLessEqual(len(text), 6 * limit + 40)
