"""
OCPP-J framing: the RPC envelope shared by every OCPP-J version.

This module is pure: it turns text frames into L{Frame}s, refuses the ones
that break OCPP-J with a L{BadFrame} that carries the answer the charger is
owed, and encodes the frames the gateway itself sends. It imports nothing
from Twisted, autobahn or pika, and keeps no state.

The wire, in prose
==================

Each WebSocket text message is one JSON array, UTF-8 encoded (OCPP-J 1.6
§4.1.2; 2.0.1 and 2.1 Part 4 §4.1.2)::

    CALL             [2, messageId, action, {payload}]
    CALLRESULT       [3, messageId, {payload}]
    CALLERROR        [4, messageId, errorCode, errorDescription, {errorDetails}]
    CALLRESULTERROR  [5, messageId, errorCode, errorDescription, {errorDetails}]
    SEND             [6, messageId, action, {payload}]

Types 2-4 exist in every version (§4.1.3). CALLRESULTERROR and SEND are new
in 2.1 (2.1 Part 4 §4.1.3): the first refuses a CALLRESULT, the second is a
request that is never answered (2.1 §4.2.4: "The receiver SHALL NOT respond
to a SEND message with a CALLRESULT or CALLERROR").

The message id is a string of at most 36 characters (1.6 §4.1.4 Table 3, 2.x
§4.1.4 Table 4). The spec sets no minimum; we require one character, because
an empty id cannot be matched to anything. Chargers in the field send
longer ids, so the limit can be raised (C{max_id_length}) up to 255
characters; an id also becomes the AMQP C{correlation_id}, a short string
of at most 255 bytes, so a longer id whose UTF-8 is over 255 bytes is
refused whatever the limit. The payload and the error details
are JSON objects. 1.6 §4.2.1 and 2.x §4.1.5 mention C{null} as a possible "no
payload" notation while calling C{{}} the good practice; the gateway's
contract (docs/connecting.md) requires an object so that no worker downstream ever
sees anything else, and we follow it. The error description is
C{string[255]} in 2.x (§4.2.3 Table 7): the encoders here truncate to that.

How a broken frame is answered
------------------------------

- A CALL that breaks the rules is answered with a CALLERROR (2.x Part 4
  §4.1.7: "When a message is not valid, the server SHALL respond with a
  CALLERROR"; 1.6 §4.2.3 lists the same situations as reasons for one).
- When the message id cannot be read, the CALLERROR carries C{"-1"} as its
  id (2.0.1 and 2.1 §4.2.3: "When also the MessageId cannot be read, the
  CALLERROR SHALL contain "-1" as MessageId"). 1.6 has no such rule; we use
  C{"-1"} there too, so that the charger's log shows why its frame vanished
  (a receiver with no CALL of that id can only log and drop it, so this is
  harmless). An id of the wrong type, empty or longer than the limit
  counts as unreadable: echoing it would itself break the id rules.
- Text that is not JSON, not an array, an empty array, or an array whose
  first element is not an integer cannot be shown not to be a CALL, so it
  gets a CALLERROR too (C{"-1"}, or the id when element 1 is a valid one).
- A CALLRESULT that breaks the rules is answered with a CALLRESULTERROR in
  2.1 (2.1 §4.2.3: it "is sent back on receipt of a CALLRESULT that contains
  errors"). Before 2.1 there is nothing to answer a response with (a
  CALLERROR "is sent in response to a CALL"), so it gets no answer.
- A broken CALLERROR or CALLRESULTERROR gets no answer: answering an error
  with an error lets two peers trade error frames forever.
- A broken SEND gets no answer (2.1 §4.2.4, quoted above).
- An integer message type the negotiated version does not have (for example
  5 or 6 in 1.6 or 2.0.1, or 7 anywhere): 1.6 §4.1.3 and 2.1 §4.1.3 and
  §4.4 say the receiver "SHALL ignore the message payload", so 1.6 and 2.1
  send nothing. 2.0.1 §4.4, the section about exactly this case, says to
  "respond with an CALLERROR with errorCode: MessageTypeNotSupported"
  (although its §4.1.3 says to ignore); we follow §4.4 for 2.0 and 2.0.1.
  Either way the frame is refused, never passed on, and counts as a bad
  frame.
- §4.2.3 forbids putting a corrupt message into the CALLERROR as is; our
  descriptions never quote the input at all (they name the rule that
  broke), which also keeps hostile content out of logs.

Which error code for which defect
---------------------------------

- The envelope is wrong (not JSON, not an array, empty, type not an integer,
  unreadable id, wrong number of elements, action / errorCode /
  errorDescription not a string): C{RpcFrameworkError}, "Content of the call
  is not a valid RPC Request" (2.0.1 Part 4 §4.3 Table 8, 2.1 Table 9).
- Unknown message type number: C{MessageTypeNotSupported} (same tables).
- Payload or error details not an object: C{FormatViolation}, "Payload for
  Action is syntactically incorrect".
- An action string that cannot be an OCPP action name: C{NotImplemented},
  "Requested Action is not known by receiver". The spec says only that the
  action is a case-sensitive string (§4.2.1); the rule is ours. The
  action becomes a word of the topic routing key C{<version>.<Action>.<kind>}:
  a C{.} would add words (and could match another binding), and AMQP caps
  routing keys at 255 bytes. Every OCPP action in every version is an ASCII
  CamelCase word of at most about 32 characters, so we accept 1 to 64 ASCII
  letters and digits.

1.6 spells two codes differently and lacks two (OCPP-J 1.6 §4.2.3
Table 7): C{FormationViolation} for C{FormatViolation},
C{OccurenceConstraintViolation} (one "r", the spelling 1.6 peers use on the
wire) for C{OccurrenceConstraintViolation}, and no C{RpcFrameworkError} or
C{MessageTypeNotSupported}. For those two we send C{GenericError}, "Any
other error not covered by the previous ones": every other 1.6 code speaks
about the payload of a known Action, which an envelope defect is not.
L{error_code} is the one place that spells codes; see C{_ERROR_CODES}.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Mapping, Optional, Union

import orjson

# Message type numbers (1.6 §4.1.3 Table 2; 2.1 Part 4 §4.1.3 Table 3).
CALL: Final = 2
CALLRESULT: Final = 3
CALLERROR: Final = 4
CALLRESULTERROR: Final = 5  # 2.1 only
SEND: Final = 6  # 2.1 only

_TYPE_NAMES: Final = {
    CALL: "CALL",
    CALLRESULT: "CALLRESULT",
    CALLERROR: "CALLERROR",
    CALLRESULTERROR: "CALLRESULTERROR",
    SEND: "SEND",
}

# "string[36]": 1.6 §4.1.4 Table 3, 2.0.1/2.1 Part 4 §4.1.4 Table 4.
MAX_MESSAGE_ID_LENGTH: Final = 36
# The id is the AMQP correlation_id, a short string: at most 255 bytes.
_MAX_ID_BYTES: Final = 255
# Up to this many characters the UTF-8 of any id fits in _MAX_ID_BYTES
# (4 bytes a character at most), so shorter limits need no byte count.
_ALWAYS_FITS: Final = _MAX_ID_BYTES // 4
# errorDescription is "string[255]": 2.0.1/2.1 Part 4 §4.2.3 Table 7.
MAX_ERROR_DESCRIPTION_LENGTH: Final = 255
# Ours, not the spec's: OCPP action names are at most ~32 characters; the
# action ends up in an AMQP routing key (max 255 bytes).
MAX_ACTION_LENGTH: Final = 64
# The id of a CALLERROR whose CALL's id cannot be read (2.0.1/2.1 §4.2.3).
UNKNOWN_MESSAGE_ID: Final = "-1"

#: Subprotocols that name OCPP versions which only ever had a SOAP binding;
#: a client offering them is refused, not treated as an unknown protocol.
SOAP_ONLY_SUBPROTOCOLS: Final = frozenset({"ocpp1.2", "ocpp1.5"})


class ErrorKind(enum.Enum):
    """
    A reason to refuse a message, independent of how a version spells it.

    Use L{error_code} to get the code to put on the wire.
    """

    FORMAT_VIOLATION = enum.auto()
    GENERIC_ERROR = enum.auto()
    INTERNAL_ERROR = enum.auto()
    MESSAGE_TYPE_NOT_SUPPORTED = enum.auto()
    NOT_IMPLEMENTED = enum.auto()
    NOT_SUPPORTED = enum.auto()
    OCCURRENCE_CONSTRAINT_VIOLATION = enum.auto()
    PROPERTY_CONSTRAINT_VIOLATION = enum.auto()
    PROTOCOL_ERROR = enum.auto()
    RPC_FRAMEWORK_ERROR = enum.auto()
    SECURITY_ERROR = enum.auto()
    TYPE_CONSTRAINT_VIOLATION = enum.auto()


# Each kind as (OCPP-J 1.6 Table 7, OCPP 2.0.1 Table 8 / 2.1 Table 9).
# 1.6 has no RpcFrameworkError or MessageTypeNotSupported: GenericError is
# its catch-all (see the module docstring).
_ERROR_CODES: Final[Mapping[ErrorKind, tuple[str, str]]] = {
    ErrorKind.FORMAT_VIOLATION: ("FormationViolation", "FormatViolation"),
    ErrorKind.GENERIC_ERROR: ("GenericError", "GenericError"),
    ErrorKind.INTERNAL_ERROR: ("InternalError", "InternalError"),
    ErrorKind.MESSAGE_TYPE_NOT_SUPPORTED: ("GenericError", "MessageTypeNotSupported"),
    ErrorKind.NOT_IMPLEMENTED: ("NotImplemented", "NotImplemented"),
    ErrorKind.NOT_SUPPORTED: ("NotSupported", "NotSupported"),
    ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION: (
        "OccurenceConstraintViolation",
        "OccurrenceConstraintViolation",
    ),
    ErrorKind.PROPERTY_CONSTRAINT_VIOLATION: (
        "PropertyConstraintViolation",
        "PropertyConstraintViolation",
    ),
    ErrorKind.PROTOCOL_ERROR: ("ProtocolError", "ProtocolError"),
    ErrorKind.RPC_FRAMEWORK_ERROR: ("GenericError", "RpcFrameworkError"),
    ErrorKind.SECURITY_ERROR: ("SecurityError", "SecurityError"),
    ErrorKind.TYPE_CONSTRAINT_VIOLATION: (
        "TypeConstraintViolation",
        "TypeConstraintViolation",
    ),
}

_OCPP16_SUBPROTOCOL: Final = "ocpp1.6"


@dataclass(frozen=True, slots=True)
class OcppVersion:
    """
    One OCPP-J version, as negotiated by its WebSocket subprotocol.

    What the parser needs to know about a version is an attribute here, so
    that it never compares version names. The error code spellings follow
    from the subprotocol: 1.6 has its own table, every 2.x the same one.

    @ivar subprotocol: the C{Sec-WebSocket-Protocol} value, e.g. C{"ocpp1.6"}.
    @ivar routing_prefix: the first word of AMQP routing keys, e.g.
        C{"ocpp16"} (compatible with C{rabbitmq_web_ocpp}).
    @ivar has_send: whether message types 5 (CALLRESULTERROR) and 6 (SEND)
        exist; only in 2.1.
    @ivar answers_unknown_message_type: whether an unknown message type number
        is answered with a CALLERROR (2.0.1 Part 4 §4.4) rather than ignored
        (1.6 §4.1.3, 2.1 Part 4 §4.4).
    @ivar message_types: the message type numbers this version has.
    @ivar error_codes: the wire spelling of each L{ErrorKind}; read it through
        L{error_code}.
    """

    subprotocol: str
    routing_prefix: str
    has_send: bool
    answers_unknown_message_type: bool
    message_types: frozenset[int] = field(init=False, repr=False, compare=False)
    error_codes: Mapping[ErrorKind, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        types = {CALL, CALLRESULT, CALLERROR}
        if self.has_send:
            types |= {CALLRESULTERROR, SEND}
        column = 0 if self.subprotocol == _OCPP16_SUBPROTOCOL else 1
        codes = {kind: spellings[column] for kind, spellings in _ERROR_CODES.items()}
        # Frozen dataclass: derived fields are set the way dataclasses do.
        object.__setattr__(self, "message_types", frozenset(types))
        object.__setattr__(self, "error_codes", MappingProxyType(codes))


OCPP16: Final = OcppVersion("ocpp1.6", "ocpp16", False, False)
# 2.0 was superseded by 2.0.1 after errata; its framing is the same.
OCPP20: Final = OcppVersion("ocpp2.0", "ocpp20", False, True)
OCPP201: Final = OcppVersion("ocpp2.0.1", "ocpp201", False, True)
OCPP21: Final = OcppVersion("ocpp2.1", "ocpp21", True, False)

#: The supported versions by subprotocol, oldest first.
VERSIONS: Final[Mapping[str, OcppVersion]] = MappingProxyType(
    {v.subprotocol: v for v in (OCPP16, OCPP20, OCPP201, OCPP21)}
)


def error_code(version: OcppVersion, kind: ErrorKind) -> str:
    """
    The error code that means C{kind}, spelled for C{version}.

    This is the only place codes are spelled, so that a 1.6 charger never
    receives a 2.x spelling it does not know.
    """
    return version.error_codes[kind]


def is_error_code(version: OcppVersion, code: str) -> bool:
    """
    Whether C{code} is one of the error codes C{version} defines (1.6
    Table 7, 2.0.1 Table 8, 2.1 Table 9), spelled as that version spells
    it: C{FormatViolation} is not a 1.6 code, C{FormationViolation} is.
    """
    return code in version.error_codes.values()


class Frame:
    """
    A valid OCPP-J message, parsed once, holding what routing needs.

    Fields that the message type does not have are C{None}: C{action} exists
    for CALL and SEND, C{payload} for CALL, SEND and CALLRESULT, the
    C{error_*} fields for CALLERROR and CALLRESULTERROR.
    """

    __slots__ = (
        "message_type",
        "message_id",
        "action",
        "payload",
        "error_code",
        "error_description",
        "error_details",
    )

    message_type: int
    message_id: str
    action: Optional[str]
    payload: Optional[dict[str, Any]]
    error_code: Optional[str]
    error_description: Optional[str]
    error_details: Optional[dict[str, Any]]

    def __init__(
        self,
        message_type: int,
        message_id: str,
        action: Optional[str] = None,
        payload: Optional[dict[str, Any]] = None,
        error_code: Optional[str] = None,
        error_description: Optional[str] = None,
        error_details: Optional[dict[str, Any]] = None,
    ) -> None:
        self.message_type = message_type
        self.message_id = message_id
        self.action = action
        self.payload = payload
        self.error_code = error_code
        self.error_description = error_description
        self.error_details = error_details

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable payloads

    def __repr__(self) -> str:
        # Never the payload: it is untrusted and may be large.
        name = _TYPE_NAMES.get(self.message_type, str(self.message_type))
        extra = self.action if self.action is not None else self.error_code
        return (
            f"<Frame {name} id={truncate_for_log(self.message_id, 40)}"
            f" {truncate_for_log(extra or '', 70)}>"
        )


class BadFrame(Exception):
    """
    A frame that breaks OCPP-J; carries the answer the charger is owed.

    @ivar kind: why the frame was refused.
    @ivar code: C{kind} spelled for the negotiated version.
    @ivar message_id: the frame's id, or C{"-1"} when it cannot be read.
    @ivar description: a short sentence naming the broken rule; it never
        quotes the frame, so it is safe to log and to send.
    @ivar reply: the encoded CALLERROR (or, in 2.1, CALLRESULTERROR) to send
        to the charger, or C{None} when the spec asks for no answer.
    @ivar message_type: the frame's message type when it was an integer,
        else C{None}; with C{message_id} it lets a session tell that a
        broken answer was meant for a CALL it holds.
    """

    kind: ErrorKind
    code: str
    message_id: str
    description: str
    reply: Optional[bytes]
    message_type: Optional[int]

    def __init__(
        self,
        kind: ErrorKind,
        code: str,
        message_id: str,
        description: str,
        reply: Optional[bytes],
        message_type: Optional[int] = None,
    ) -> None:
        super().__init__(kind, code, message_id, description)
        self.kind = kind
        self.code = code
        self.message_id = message_id
        self.description = description
        self.reply = reply
        self.message_type = message_type

    def __str__(self) -> str:
        return f"{self.code}: {self.description}"


# -- parsing --------------------------------------------------------------

_loads = orjson.loads  # one global lookup instead of two per frame


def _valid_id(message_id: Any, max_id: int) -> bool:
    """
    Whether C{message_id} is a usable message id: a string of 1 to
    C{max_id} characters whose UTF-8 fits an AMQP short string.
    """
    return (
        type(message_id) is str
        and 0 < len(message_id) <= max_id
        and (
            len(message_id) <= _ALWAYS_FITS
            or len(message_id.encode("utf-8")) <= _MAX_ID_BYTES
        )
    )


def _readable_id(message: list[Any], max_id: int) -> str:
    """The id to answer a broken frame with: its own when valid, else C{"-1"}."""
    if len(message) > 1 and _valid_id(message[1], max_id):
        return message[1]
    return UNKNOWN_MESSAGE_ID


def _refuse(
    version: OcppVersion,
    kind: ErrorKind,
    message_id: str,
    description: str,
    answer: Optional[int],
    message_type: Optional[int] = None,
) -> BadFrame:
    """
    Build the L{BadFrame} for a broken frame.

    @param answer: the message type to answer with (C{CALLERROR} or
        C{CALLRESULTERROR}), or C{None} for no answer.
    """
    code = version.error_codes[kind]
    reply = None
    if answer is not None:
        reply = _encode_error(answer, message_id, code, description, None)
    return BadFrame(kind, code, message_id, description, reply, message_type)


def _bad_id(
    version: OcppVersion, answer: Optional[int], message_type: int, max_id: int
) -> BadFrame:
    return _refuse(
        version,
        ErrorKind.RPC_FRAMEWORK_ERROR,
        UNKNOWN_MESSAGE_ID,
        f"the message id must be a string of 1 to {max_id} characters",
        answer,
        message_type,
    )


def _wrong_length(
    message: list[Any],
    expected: int,
    version: OcppVersion,
    answer: Optional[int],
    message_type: int,
    max_id: int,
) -> BadFrame:
    return _refuse(
        version,
        ErrorKind.RPC_FRAMEWORK_ERROR,
        _readable_id(message, max_id),
        f"a {_TYPE_NAMES[message_type]} has {expected} elements, not {len(message)}",
        answer,
        message_type,
    )


def parse_frame(
    data: Union[bytes, str],
    version: OcppVersion,
    max_id_length: int = MAX_MESSAGE_ID_LENGTH,
) -> Frame:
    """
    Parse one text frame received over a connection that speaks C{version}.

    This runs for every frame, so the valid path does only the checks the
    rules need and builds one L{Frame}; diagnosing a bad frame may cost more.

    @param data: the frame as received: UTF-8 bytes (the hot path) or text.
    @param max_id_length: the longest message id accepted, in characters
        (36 by the specs; up to 255, see the module docstring).
    @raise BadFrame: the frame breaks OCPP-J for C{version}; nothing else is
        raised, whatever C{data} holds.
    """
    try:
        message = _loads(data)
    except orjson.JSONDecodeError as exc:
        # Built outside the except block: the decode error holds the whole
        # document, which the BadFrame must not keep alive as its context.
        position: Optional[int] = exc.pos
    else:
        position = None
    if position is not None:
        raise _refuse(
            version,
            ErrorKind.RPC_FRAMEWORK_ERROR,
            UNKNOWN_MESSAGE_ID,
            f"the frame is not valid UTF-8 JSON (position {position})",
            CALLERROR,
        )
    # One test on the valid path; _bad_envelope tells which rule broke.
    if type(message) is not list or not message or type(message[0]) is not int:
        raise _bad_envelope(message, version, max_id_length)
    message_type = message[0]
    if message_type == CALL or (message_type == SEND and version.has_send):
        return _parse_request(message, message_type, version, max_id_length)
    if message_type == CALLRESULT:
        return _parse_result(message, version, max_id_length)
    if message_type == CALLERROR or (
        message_type == CALLRESULTERROR and version.has_send
    ):
        return _parse_error(message, message_type, version, max_id_length)
    # orjson yields at most 64-bit integers (larger ones become floats), so
    # the number in the description is short.
    raise _refuse(
        version,
        ErrorKind.MESSAGE_TYPE_NOT_SUPPORTED,
        _readable_id(message, max_id_length),
        f"message type {message_type} does not exist in {version.subprotocol}",
        CALLERROR if version.answers_unknown_message_type else None,
        message_type,
    )


def _bad_envelope(message: Any, version: OcppVersion, max_id: int) -> BadFrame:
    """
    Why decoded JSON is not an OCPP-J message: not a non-empty array, or
    a message type that is not an integer.
    """
    if type(message) is not list or not message:
        return _refuse(
            version,
            ErrorKind.RPC_FRAMEWORK_ERROR,
            UNKNOWN_MESSAGE_ID,
            "the frame is not a non-empty JSON array",
            CALLERROR,
        )
    # the message type is not an integer (True and False included)
    return _refuse(
        version,
        ErrorKind.RPC_FRAMEWORK_ERROR,
        _readable_id(message, max_id),
        "the message type must be an integer",
        CALLERROR,
    )


# The three kinds repeat their length and id checks inline rather than
# call a shared helper: these run for every frame, and a call costs about
# as much as the checks themselves.


def _parse_request(
    message: list[Any], message_type: int, version: OcppVersion, max_id: int
) -> Frame:
    """A CALL (answered with a CALLERROR when broken) or a 2.1 SEND (never answered)."""
    answer = CALLERROR if message_type == CALL else None
    if len(message) != 4:
        raise _wrong_length(message, 4, version, answer, message_type, max_id)
    message_id = message[1]
    if not _valid_id(message_id, max_id):
        raise _bad_id(version, answer, message_type, max_id)
    action = message[2]
    if type(action) is not str:
        raise _refuse(
            version,
            ErrorKind.RPC_FRAMEWORK_ERROR,
            message_id,
            "the action must be a string",
            answer,
            message_type,
        )
    if not (
        0 < len(action) <= MAX_ACTION_LENGTH
        and action.isascii()
        and action.isalnum()
    ):
        raise _refuse(
            version,
            ErrorKind.NOT_IMPLEMENTED,
            message_id,
            f"the action is not an OCPP action name (1 to {MAX_ACTION_LENGTH}"
            " ASCII letters and digits)",
            answer,
            message_type,
        )
    payload = message[3]
    if type(payload) is not dict:
        raise _not_an_object(version, message_id, answer, message_type)
    return Frame(message_type, message_id, action, payload)


def _parse_result(message: list[Any], version: OcppVersion, max_id: int) -> Frame:
    """A CALLRESULT: answered with a CALLRESULTERROR when broken, in 2.1 only."""
    answer = CALLRESULTERROR if version.has_send else None
    if len(message) != 3:
        raise _wrong_length(message, 3, version, answer, CALLRESULT, max_id)
    message_id = message[1]
    if not _valid_id(message_id, max_id):
        raise _bad_id(version, answer, CALLRESULT, max_id)
    payload = message[2]
    if type(payload) is not dict:
        raise _not_an_object(version, message_id, answer, CALLRESULT)
    return Frame(CALLRESULT, message_id, None, payload)


def _parse_error(
    message: list[Any], message_type: int, version: OcppVersion, max_id: int
) -> Frame:
    """A CALLERROR or a 2.1 CALLRESULTERROR: never answered (no error for an error)."""
    if len(message) != 5:
        raise _wrong_length(message, 5, version, None, message_type, max_id)
    message_id = message[1]
    if not _valid_id(message_id, max_id):
        raise _bad_id(version, None, message_type, max_id)
    code, description, details = message[2], message[3], message[4]
    if type(code) is not str or type(description) is not str:
        raise _refuse(
            version,
            ErrorKind.RPC_FRAMEWORK_ERROR,
            message_id,
            "the error code and description must be strings",
            None,
            message_type,
        )
    if type(details) is not dict:
        raise _refuse(
            version,
            ErrorKind.FORMAT_VIOLATION,
            message_id,
            "the error details must be a JSON object",
            None,
            message_type,
        )
    return Frame(message_type, message_id, None, None, code, description, details)


def _not_an_object(
    version: OcppVersion, message_id: str, answer: Optional[int], message_type: int
) -> BadFrame:
    return _refuse(
        version,
        ErrorKind.FORMAT_VIOLATION,
        message_id,
        "the payload must be a JSON object",
        answer,
        message_type,
    )


# -- encoding -------------------------------------------------------------


def encode_call(message_id: str, action: str, payload: Mapping[str, Any]) -> bytes:
    """Encode C{[2, id, action, payload]}."""
    return orjson.dumps((CALL, message_id, action, payload))


def encode_call_result(message_id: str, payload: Mapping[str, Any]) -> bytes:
    """Encode C{[3, id, payload]}."""
    return orjson.dumps((CALLRESULT, message_id, payload))


def encode_send(message_id: str, action: str, payload: Mapping[str, Any]) -> bytes:
    """Encode the 2.1 C{[6, id, action, payload]}; only valid on 2.1 links."""
    return orjson.dumps((SEND, message_id, action, payload))


def _encode_error(
    message_type: int,
    message_id: str,
    code: str,
    description: str,
    details: Optional[Mapping[str, Any]],
) -> bytes:
    return orjson.dumps(
        (
            message_type,
            message_id,
            code,
            description[:MAX_ERROR_DESCRIPTION_LENGTH],
            details if details is not None else {},
        )
    )


def encode_call_error(
    version: OcppVersion,
    message_id: str,
    kind: ErrorKind,
    description: str,
    details: Optional[Mapping[str, Any]] = None,
) -> bytes:
    """
    Encode C{[4, id, code, description, details]} with C{kind} spelled for
    C{version}.

    The description is cut to the 255 characters 2.x allows; the details
    default to C{{}}, which the spec asks for when there are none.
    """
    code = version.error_codes[kind]
    return _encode_error(CALLERROR, message_id, code, description, details)


def encode_call_result_error(
    version: OcppVersion,
    message_id: str,
    kind: ErrorKind,
    description: str,
    details: Optional[Mapping[str, Any]] = None,
) -> bytes:
    """
    Encode the 2.1 C{[5, id, code, description, details]}.

    @raise ValueError: C{version} has no CALLRESULTERROR (before 2.1).
    """
    if not version.has_send:
        raise ValueError(f"{version.subprotocol} has no CALLRESULTERROR")
    return _encode_error(
        CALLRESULTERROR, message_id, version.error_codes[kind], description, details
    )


_VENDOR_ID: Final = "ocppgw"


def offline_status_notification(
    version: OcppVersion, message_id: str, timestamp: str
) -> bytes:
    """
    A StatusNotification CALL saying the whole charger (connector/EVSE 0) is
    C{Unavailable} with vendor error code C{Offline}.

    The gateway publishes it on the charger's behalf when it goes away, in the
    shape C{rabbitmq_web_ocpp} uses (with our vendor id instead of
    C{"rabbitmq"}), so back ends written for the plugin work unchanged. 2.x
    has no vendorErrorCode in StatusNotification, hence C{customData}.

    @param timestamp: an RFC 3339 UTC time, e.g. C{"2025-01-01T00:00:00Z"}.
    """
    if version.subprotocol == _OCPP16_SUBPROTOCOL:
        payload: dict[str, Any] = {
            "connectorId": 0,
            "errorCode": "NoError",
            "status": "Unavailable",
            "timestamp": timestamp,
            "vendorId": _VENDOR_ID,
            "vendorErrorCode": "Offline",
        }
    else:
        payload = {
            "timestamp": timestamp,
            "connectorStatus": "Unavailable",
            "evseId": 0,
            "connectorId": 0,
            "customData": {"vendorId": _VENDOR_ID, "vendorErrorCode": "Offline"},
        }
    return encode_call(message_id, "StatusNotification", payload)


# -- logging --------------------------------------------------------------

# Characters that could forge or hide log lines: C0/C1 controls, DEL, the
# Unicode line/paragraph separators and the bidirectional overrides.
_UNSAFE_FOR_LOG = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def truncate_for_log(data: Union[bytes, str], limit: int = 200) -> str:
    """
    A short, single-line rendering of untrusted C{data} for log messages.

    At most C{limit} bytes (or characters) of the input are shown, with a
    note of how much was cut; characters that could break or spoof log lines
    are escaped. Use it for anything a charger or back end sent.
    """
    total = len(data)
    head = data[:limit]
    if isinstance(head, (bytes, bytearray, memoryview)):
        text = bytes(head).decode("utf-8", "replace")
    else:
        text = head
    text = _UNSAFE_FOR_LOG.sub(_escape, text)
    if total > limit:
        unit = "characters" if isinstance(data, str) else "bytes"
        text += f"... ({total - limit} more {unit})"
    return text
