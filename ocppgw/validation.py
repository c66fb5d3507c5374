"""
Payload validation: OCPP payloads checked against the OCA JSON schemas.

The framing (L{ocppgw.framing}) checks the RPC envelope; this module checks
what is inside: the payload of a CALL or SEND against the request schema of
its action, and the payload of a CALLRESULT against the response schema of
the CALL it answers, for the version the charger speaks. Both directions
use it: the charger's frames before they are published, and the back end's
commands and answers before they are sent to the charger.

Where the schemas come from
===========================

The OCA publishes the JSON schemas of OCPP 1.6 (draft-04), 2.0.1 and 2.1
(draft-06) with the specifications, under Creative Commons
Attribution-NoDerivatives 4.0. The C{ocpp} package on PyPI ships them
(C{ocpp/v16/schemas}, C{ocpp/v201/schemas}, C{ocpp/v21/schemas}), and we
read them from there as data; we never import the package. 2.0 was
superseded by 2.0.1 after errata and has the same messages, so it uses the
2.0.1 schemas. C{[validation] schema_dir} replaces the shipped schemas of a
version with a directory of one's own (for the original 2.0 schemas, or a
fixed copy of a broken one).

File names: C{<Action>Request.json} or C{<Action>.json} (1.6 and the 2.1
SEND messages) is the request, C{<Action>Response.json} the response.

Cost
====

The schemas are compiled to Python functions with C{fastjsonschema}, once
per process and each on its first use (all ~390 schemas of the three
versions would take ~3 s and ~70 MB at start), so checking a typical MeterValues payload costs about 10 µs
(C{bench/validation.py}). Two rewrites before compiling, which keep the
meaning of each schema, halve the cost of the 2.x ones:

- C{$ref}s to C{#/definitions/...} are inlined: fastjsonschema calls a
  function per reference and builds the field name for its error message
  eagerly, with C{str.format(**locals())} per array item;
- a string C{enum} becomes a custom C{format} backed by a frozenset: the
  generated code would compare the value with each member in turn (25
  measurands), and its error message is rebuilt to list the members.

A charger whose checks are off (mode C{off} or an exempt identity) gets no
checker at all: its session makes no call.

Errors
======

An action without a schema is C{NotImplemented} ("Requested Action is not
known by receiver"). A payload that breaks its schema gets the code that
names the broken rule (OCPP-J 1.6 §4.2.3 Table 7; 2.0.1 Part 4 §4.3 Table 8;
2.1 Table 9), spelled for the version by L{framing.error_code}:

- the type of a field (C{type}): C{TypeConstraintViolation};
- a missing required field, too few or too many items (C{required},
  C{minItems}, C{maxItems}, ...): C{OccurrenceConstraintViolation}
  (1.6: C{OccurenceConstraintViolation});
- a value out of its enumeration, range, length, pattern or format:
  C{PropertyConstraintViolation};
- the structure (a field the schema does not define, C{oneOf}, ...):
  C{FormatViolation} (1.6: C{FormationViolation}).

The description names the failing field (C{payload.meterValue[0].timestamp
must be date-time}) and is cut short: it may quote field names the peer
chose, so it is also escaped before it is logged.
"""

from __future__ import annotations

import collections
import collections.abc
import fnmatch
import functools
import importlib.util
import os
import re
from typing import Any, Callable, Final, Iterable, Mapping, Optional

import fastjsonschema
import orjson

from ocppgw.framing import ErrorKind, OcppVersion

#: The modes of C{[validation] mode}.
OFF: Final = "off"
WARN: Final = "warn"
ENFORCE: Final = "enforce"

#: Longest description of a violation; the CALLERROR allows 255 characters
#: (2.x Part 4 §4.2.3), and AMQP header values should stay short too.
MAX_DESCRIPTION_LENGTH: Final = 200

# Which OCPP error a broken JSON schema keyword means (see the module
# docstring). Keywords not listed are about structure: FormatViolation.
_RULE_KINDS: Final[Mapping[str, ErrorKind]] = {
    "type": ErrorKind.TYPE_CONSTRAINT_VIOLATION,
    "required": ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION,
    "minItems": ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION,
    "maxItems": ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION,
    "minProperties": ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION,
    "maxProperties": ErrorKind.OCCURRENCE_CONSTRAINT_VIOLATION,
    "enum": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "const": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "format": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "pattern": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "minLength": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "maxLength": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "minimum": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "maximum": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "exclusiveMinimum": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "exclusiveMaximum": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "multipleOf": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
    "uniqueItems": ErrorKind.PROPERTY_CONSTRAINT_VIOLATION,
}

# Where the ocpp package keeps each version's schemas, below its own
# directory. 2.0 has none of its own there (see the module docstring).
_PACKAGE_SCHEMAS: Final[Mapping[str, str]] = {
    "ocpp1.6": "v16/schemas",
    "ocpp2.0": "v201/schemas",
    "ocpp2.0.1": "v201/schemas",
    "ocpp2.1": "v21/schemas",
}

# Where a version looks in [validation] schema_dir, in order: 2.0 takes
# the 2.0.1 schemas there too, unless it has its own.
_OWN_SCHEMAS: Final[Mapping[str, tuple[str, ...]]] = {
    "ocpp1.6": ("ocpp1.6",),
    "ocpp2.0": ("ocpp2.0", "ocpp2.0.1"),
    "ocpp2.0.1": ("ocpp2.0.1",),
    "ocpp2.1": ("ocpp2.1",),
}

_REQUEST_SUFFIX: Final = "Request.json"
_RESPONSE_SUFFIX: Final = "Response.json"


class SchemaError(Exception):
    """
    The schemas cannot be loaded or compiled; the gateway does not start.
    """


class Violation:
    """
    Why a payload breaks its schema.

    @ivar kind: the L{ErrorKind} to answer with (spell it for the version
        with L{ocppgw.framing.error_code}).
    @ivar description: names the failing field and the rule; at most
        L{MAX_DESCRIPTION_LENGTH} characters, may quote peer-chosen names.
    """

    __slots__ = ("kind", "description")

    def __init__(self, kind: ErrorKind, description: str) -> None:
        self.kind = kind
        self.description = description[:MAX_DESCRIPTION_LENGTH]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Violation):
            return NotImplemented
        return (self.kind, self.description) == (other.kind, other.description)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Violation {self.kind.name} {self.description!r}>"


def _violation(error: fastjsonschema.JsonSchemaValueException) -> Violation:
    rule = error.rule or ""
    message = error.message
    if rule == "format":
        members = _ENUM_MEMBERS.get(error.rule_definition)
        if members is not None:
            # an enum in disguise (see _prepare): say it as enum would
            rule = "enum"
            message = f"{error.name} must be one of {list(members)}"
    # fastjsonschema calls the validated document "data": ours is the
    # payload, and saying so tells the reader where the path starts.
    if message.startswith("data"):
        message = "payload" + message[4:]
    kind = _RULE_KINDS.get(rule, ErrorKind.FORMAT_VIOLATION)
    return Violation(kind, message)


def _unknown_action(action: str) -> Violation:
    # The framing already limits an action to 64 ASCII letters and digits.
    return Violation(ErrorKind.NOT_IMPLEMENTED, f"{action} is not an action of this version")


def _accept(payload: Any) -> Any:
    """The check of an exempt action."""
    return payload


Check = Callable[[Any], Any]


class Schemas:
    """
    The compiled schemas of one OCPP version.

    @ivar requests: action -> function that raises
        C{fastjsonschema.JsonSchemaValueException} for an invalid request.
    @ivar responses: the same for the response of each action.
    @ivar source: the directory they were read from.
    """

    __slots__ = ("requests", "responses", "source")

    def __init__(self, requests: dict[str, Check], responses: dict[str, Check], source: str):
        self.requests = requests
        self.responses = responses
        self.source = source


def package_schema_dir(subprotocol: str) -> str:
    """
    The directory of the ocpp package's schemas for C{subprotocol}.

    The package is located, not imported: importing it would load its
    client code and jsonschema, which the gateway does not use.

    @raise SchemaError: the package is not installed.
    """
    spec = importlib.util.find_spec("ocpp")
    if spec is None or not spec.submodule_search_locations:
        raise SchemaError(
            "payload validation needs the OCPP JSON schemas of the ocpp package "
            "(pip install 'ocpp>=2.1'), [validation] schema_dir, or "
            "[validation] mode = off"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], _PACKAGE_SCHEMAS[subprotocol])


# Custom formats standing for string enums (see _prepare), shared by every
# compiled schema: format name -> membership test, and -> the members in
# the schema's order for error messages.
_ENUM_FORMATS: dict[str, Callable[[str], bool]] = {}
_ENUM_MEMBERS: dict[str, tuple[str, ...]] = {}
_ENUM_NAMES: dict[tuple[str, ...], str] = {}
_DEFINITIONS: Final = "#/definitions/"


def _enum_format(members: tuple[str, ...]) -> str:
    name = _ENUM_NAMES.get(members)
    if name is None:
        name = f"ocppgw-enum-{len(_ENUM_NAMES)}"
        _ENUM_NAMES[members] = name
        _ENUM_MEMBERS[name] = members
        _ENUM_FORMATS[name] = frozenset(members).__contains__
    return name


def _prepare(schema: Any, allow_additional_properties: bool) -> Any:
    """
    The schema rewritten for speed (module docstring, "Cost") and, when
    asked, without C{"additionalProperties": false}.
    """
    definitions = schema.get("definitions", {}) if isinstance(schema, dict) else {}
    cycles = []

    def rewrite(node: Any, expanding: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [rewrite(item, expanding) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_DEFINITIONS):
            name = ref[len(_DEFINITIONS):]
            if name in definitions and name not in expanding:
                # Draft-04/06: keywords beside a $ref are ignored.
                return rewrite(definitions[name], expanding + (name,))
            cycles.append(name)  # left as a reference
            return dict(node)
        out = {}
        for key, value in node.items():
            if key == "additionalProperties" and value is False and allow_additional_properties:
                continue
            if key in ("properties", "patternProperties", "definitions") and isinstance(value, dict):
                out[key] = {name: rewrite(sub, expanding) for name, sub in value.items()}
            else:
                out[key] = rewrite(value, expanding)
        members = out.get("enum")
        if (
            out.get("type") == "string"
            and isinstance(members, list)
            and members
            and all(isinstance(member, str) for member in members)
            and "format" not in out
        ):
            del out["enum"]
            out["format"] = _enum_format(tuple(members))
        return out

    prepared = rewrite(schema, ())
    if isinstance(prepared, dict) and not cycles:
        # Everything is inlined: the definitions would only make the
        # generated code (which quotes the schema in its errors) larger.
        prepared.pop("definitions", None)
    return prepared


class _CompiledOnUse(collections.abc.Mapping):
    """
    Action -> check, each schema compiled the first time it is needed.

    Compiling the ~390 schemas of the three versions up front takes about
    3 s and 70 MB of generated code, while a fleet uses a few dozen
    actions: the schemas are read and prepared at start (so a file that is
    not JSON still stops the start), and compiled on first use.
    """

    __slots__ = ("_prepared", "_compiled", "_paths")

    def __init__(self) -> None:
        self._prepared: dict[str, Any] = {}
        self._compiled: dict[str, Check] = {}
        self._paths: dict[str, str] = {}

    def add(self, action: str, schema: Any, path: str) -> None:
        self._prepared[action] = schema
        self._paths[action] = path

    def __getitem__(self, action: str) -> Check:
        check = self._compiled.get(action)
        if check is None:
            check = self._compiled[action] = _compile(
                self._prepared[action], self._paths[action]
            )
        return check

    def get(self, action: str, default: Any = None) -> Any:
        # the hot path: one dict lookup once compiled
        check = self._compiled.get(action)
        if check is not None:
            return check
        if action not in self._prepared:
            return default
        return self[action]

    def __contains__(self, action: object) -> bool:
        return action in self._prepared

    def __iter__(self):
        return iter(self._prepared)

    def __len__(self) -> int:
        return len(self._prepared)


def _compile(prepared: Any, path: str) -> Check:
    try:
        # use_default=False: a validator must not write defaults into the
        # payload it checks.
        return fastjsonschema.compile(prepared, formats=_ENUM_FORMATS, use_default=False)
    except fastjsonschema.JsonSchemaException as error:
        raise SchemaError(f"{path}: cannot load schema: {error}") from None


@functools.lru_cache(maxsize=None)
def compile_schemas(
    directory: str, allow_additional_properties: bool = False, eager: bool = True
) -> Schemas:
    """
    Read and compile every schema in C{directory}, once per process.

    Reading is cached: several gateways in one process (tests, embedding)
    share the result.

    @param eager: compile every schema now, so that a schema that cannot
        be compiled stops the start; with C{False} each is compiled on its
        first use (the shipped schemas, which the tests compile).
    @raise SchemaError: naming the file that cannot be read or compiled.
    """
    try:
        names = sorted(os.listdir(directory))
    except OSError as error:
        raise SchemaError(f"{directory}: cannot read schemas: {error.strerror or error}")
    requests = _CompiledOnUse()
    responses = _CompiledOnUse()
    for name in names:
        if not name.endswith(".json"):
            continue
        if name.endswith(_RESPONSE_SUFFIX):
            table, action = responses, name[: -len(_RESPONSE_SUFFIX)]
        elif name.endswith(_REQUEST_SUFFIX):
            table, action = requests, name[: -len(_REQUEST_SUFFIX)]
        else:
            table, action = requests, name[: -len(".json")]
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as file:
                schema = orjson.loads(file.read())
        except (OSError, orjson.JSONDecodeError) as error:
            raise SchemaError(f"{path}: cannot load schema: {error}") from None
        table.add(action, _prepare(schema, allow_additional_properties), path)
        if eager:
            table[action]
    if not requests:
        raise SchemaError(f"{directory}: no request schemas (<Action>Request.json) found")
    return Schemas(requests, responses, directory)


#: What L{ValidationStats} counts actions without a schema under. An
#: action name has only letters and digits, so no real action is spelled
#: like this. Not to be mistaken for L{ocppgw.topology.UNKNOWN_ACTION}, the
#: routing-key word of an answer whose CALL is unknown: this one never
#: reaches the broker.
NO_SCHEMA_ACTION = "(unknown)"


class ValidationStats:
    """
    How many payloads broke their schemas, for logs and metrics.

    @ivar invalid: C{(subprotocol, direction, action)} -> count of invalid
        payloads seen, in every mode; C{direction} is C{"charger"} for
        frames from chargers, C{"backend"} for frames for them; actions
        without a schema are counted as L{NO_SCHEMA_ACTION} (L{ocppgw.payloads} does
        that: made-up names must not grow the counters).
    @ivar refused: the same, counting those that were refused (enforce).
    """

    __slots__ = ("invalid", "refused")

    def __init__(self) -> None:
        self.invalid: collections.Counter = collections.Counter()
        self.refused: collections.Counter = collections.Counter()


class PayloadChecker:
    """
    What a session asks: is this payload valid for its action?

    One per OCPP version and configuration, shared by the sessions of every
    charger that is checked.

    @ivar enforce: refuse invalid payloads (else only count and log them).
    @ivar stats: the L{ValidationStats} to count into.
    """

    __slots__ = ("version", "enforce", "stats", "_requests", "_responses")

    def __init__(
        self,
        version: OcppVersion,
        schemas: Schemas,
        enforce: bool,
        exempt_actions: Iterable[str] = (),
        stats: Optional[ValidationStats] = None,
    ) -> None:
        self.version = version
        self.enforce = enforce
        self.stats = stats if stats is not None else ValidationStats()
        self._requests = schemas.requests
        self._responses = schemas.responses
        if exempt_actions:
            # Accepted even when this version does not know the action:
            # an exemption is a promise to let it through. A layer over the
            # shared tables, so that they stay compiled-on-use.
            exempt = dict.fromkeys(exempt_actions, _accept)
            self._requests = collections.ChainMap(exempt, self._requests)
            self._responses = collections.ChainMap(exempt, self._responses)

    def request(self, action: str, payload: dict) -> Optional[Violation]:
        """
        Check a CALL or SEND payload; C{None} when it is valid.
        """
        return _check(self._requests, action, payload)

    def response(self, action: str, payload: dict) -> Optional[Violation]:
        """
        Check a CALLRESULT payload answering a CALL of C{action}.
        """
        return _check(self._responses, action, payload)

    def count(self, direction: str, action: str, refused: bool) -> None:
        key = (self.version.subprotocol, direction, action)
        self.stats.invalid[key] += 1
        if refused:
            self.stats.refused[key] += 1


def _check(table: Mapping[str, Check], action: str, payload: dict) -> Optional[Violation]:
    check = table.get(action)
    if check is None:
        return _unknown_action(action)
    try:
        check(payload)
    except fastjsonschema.JsonSchemaValueException as error:
        return _violation(error)
    except Exception:  # noqa: BLE001 -- nothing a peer sends may escape
        return Violation(ErrorKind.FORMAT_VIOLATION, "payload could not be checked")
    return None


def _identity_matcher(patterns: Iterable[str]) -> Optional[Callable[[str], Any]]:
    """One compiled regular expression for all exempt identity patterns."""
    patterns = list(patterns)
    if not patterns:
        return None
    expression = "|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns)
    return re.compile(expression).match


class Validation:
    """
    The gateway's validation policy: which charger gets which checker.

    @ivar mode: L{OFF}, L{WARN} or L{ENFORCE}.
    @ivar stats: counts of invalid and refused payloads, for all chargers.
    """

    def __init__(
        self,
        mode: str,
        versions: Iterable[OcppVersion],
        *,
        exempt_actions: Iterable[str] = (),
        exempt_identities: Iterable[str] = (),
        allow_additional_properties: bool = False,
        schema_dir: str = "",
    ) -> None:
        """
        Compile the schemas of C{versions} (unless C{mode} is L{OFF}).

        @raise SchemaError: when a version's schemas cannot be loaded.
        """
        if mode not in (OFF, WARN, ENFORCE):
            raise ValueError(f"unknown validation mode {mode!r}")
        self.mode = mode
        self.stats = ValidationStats()
        self._exempt_identity = _identity_matcher(exempt_identities)
        self._checkers: dict[str, PayloadChecker] = {}
        if mode == OFF:
            return
        exempt_actions = tuple(exempt_actions)
        for version in versions:
            directory = ""
            if schema_dir:
                for name in _OWN_SCHEMAS[version.subprotocol]:
                    own = os.path.join(schema_dir, name)
                    if os.path.isdir(own):
                        directory = own
                        break
            if not directory:
                directory = package_schema_dir(version.subprotocol)
            schemas = compile_schemas(
                os.path.abspath(directory),
                allow_additional_properties,
                # one's own schemas are compiled now, to fail at start
                eager=bool(schema_dir),
            )
            self._checkers[version.subprotocol] = PayloadChecker(
                version, schemas, mode == ENFORCE, exempt_actions, self.stats
            )

    @classmethod
    def from_settings(cls, settings, versions: Iterable[OcppVersion]) -> "Validation":
        """
        Build from a L{ocppgw.config.ValidationSettings}.
        """
        return cls(
            settings.mode,
            versions,
            exempt_actions=settings.exempt_actions,
            exempt_identities=settings.exempt_identities,
            allow_additional_properties=settings.allow_additional_properties,
            schema_dir=settings.schema_dir,
        )

    def checker_for(self, identity: str, version: OcppVersion) -> Optional[PayloadChecker]:
        """
        The checker for a charger's session, or C{None} when it is not
        checked (mode off, or an exempt identity): decided once per
        connection, so an unchecked charger costs nothing per frame.
        """
        if self._exempt_identity is not None and self._exempt_identity(identity):
            return None
        return self._checkers.get(version.subprotocol)
