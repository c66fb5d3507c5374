"""
ocppgw's configuration: one INI file read into typed, validated, frozen settings.

Everything about an option lives in one row of :data:`SECTIONS`: its key, how
its value is read and checked (its *kind*), its default and a one-line
description.  That table drives parsing, the defaults, the error messages,
the shipped ``etc/ocppgw.ini`` (``python -m ocppgw.config --ini``) and the
configuration reference of the documentation (``--markdown``, put into
``docs/configuration.md`` when the site is built), so the documentation
cannot drift from the code.  Adding a key is one :class:`Option` row plus one field on its
section's dataclass; adding a section is one dataclass, one :class:`Section`
row and one field on :class:`Settings`.

Why so strict: the gateway is started by operators who may have a typo in a
key or a value.  A typo that silently falls back to a default (a charger
queue TTL, an exchange name) is far worse than a refusal at start, so every
problem is reported as ``section.key: reason`` and unknown sections and keys
are errors.  All problems are reported at once, so an operator fixes the file
in one go.

Two more rules: the AMQP URL's password never appears in an error, and this
module imports nothing from ``twisted.internet``, autobahn or pika, so that
tools and tests can read a configuration without starting anything.
"""

from __future__ import annotations

import argparse
import configparser
import difflib
import ipaddress
import math
import os
import re
import socket
import string
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar
from urllib.parse import urlsplit

from ocppgw.framing import VERSIONS
from ocppgw.logs import mask_url

__all__ = [
    "AdminSettings",
    "AmqpSettings",
    "AuditSettings",
    "AuthSettings",
    "ConfigError",
    "ListenerSettings",
    "LogSettings",
    "OcppSettings",
    "Option",
    "QueueSettings",
    "SECTIONS",
    "Section",
    "Settings",
    "ValidationSettings",
    "WebSocketSettings",
    "defaults",
    "load",
    "main",
    "mask_url",
    "parse",
    "render_ini",
    "render_markdown",
    "settings_from_dict",
]


class ConfigError(ValueError):
    """
    The configuration cannot be used.

    Each problem is one line starting with ``section.key: `` (or
    ``section: `` for a whole section, or ``<file>: `` when the file itself
    is unreadable), so an operator can find it in the file.

    :ivar problems: every problem found: unknown sections first, then
        section by section in the order of :data:`SECTIONS`.
    """

    def __init__(self, *problems: str) -> None:
        self.problems: tuple[str, ...] = problems
        super().__init__("\n".join(problems))

    def located(self, path: str | os.PathLike[str]) -> str:
        """
        The problems as lines ``<path>: section.key: reason``, the form
        compilers use, so that an operator (or an editor) goes straight to
        the file; a problem that already names the file is left as it is.
        """
        name = os.fspath(path)
        return "\n".join(
            problem if problem.startswith(name + ":") else f"{name}: {problem}"
            for problem in self.problems
        )


# ---------------------------------------------------------------------------
# Settings: what the rest of ocppgw reads.  Field names are the keys with
# "." and "-" turned into "_" (Option.field).  Defaults and descriptions live
# in SECTIONS below, not here, so that they exist exactly once.


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """Where chargers connect, and what the opening handshake accepts."""

    tcp_ip: str
    tcp_port: int
    ws_path: str
    vhost: str
    subprotocols: tuple[str, ...]
    default_subprotocol: str
    max_connections: int
    max_identity_length: int
    tcp_enabled: bool
    tcp_profile: int
    ssl_enabled: bool
    ssl_ip: str
    ssl_port: int
    ssl_profile: int
    ssl_default_subprotocol: str
    ssl_min_version: str
    ssl_ciphers: str
    ssl_certfile: str
    ssl_keyfile: str
    ssl_password_file: str
    ssl_alt_certfile: str
    ssl_alt_keyfile: str
    ssl_cacertfile: str
    ssl_crlfile: str
    ssl_verify: str
    ssl_fail_if_no_peer_cert: bool
    ssl_identity: str
    ssl_organization: str
    ssl_identity_map: str
    ssl_session_tickets: bool
    ssl_session_cache: bool
    ssl_session_timeout: float
    proxy_protocol: bool
    client_cert_header: str
    trusted_proxies: tuple[str, ...]
    allow_anonymous: bool
    accept_rate: float
    accept_burst: int
    max_handshakes: int
    max_opening: int
    retry_after_max: int
    drain_window: float
    workers: int
    worker_affinity: str


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """Limits and keep-alive of each charger's WebSocket connection."""

    ws_opts_max_frame_size: int
    ws_opts_idle_timeout: float
    ws_opts_compress: bool
    ping_timeout: float
    handshake_timeout: float
    close_timeout: float
    max_bad_frames: int
    max_message_rate: float
    message_burst: int
    max_rate_violations: int


@dataclass(frozen=True, slots=True)
class AmqpSettings:
    """
    The broker connection shared by all chargers.

    ``url`` is left out of ``repr`` because it holds the broker password and
    settings end up in logs; use :func:`mask_url` to show it.
    """

    url: str = field(repr=False)
    exchange: str
    prefetch_count: int
    heartbeat: int
    connect_timeout: float
    confirm_window: int
    publish_channels: int
    consumer_channels: int
    declare_channels: int
    node: str
    failover_urls: tuple[str, ...] = field(repr=False)
    outage_grace: float
    outage_keep_chargers: bool
    reconnect_max_delay: float
    topology_check_interval: float
    owed_presence_max: int


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """Arguments of the per-charger queues (see :meth:`Settings.queue_arguments`)."""

    x_queue_type: str
    x_queue_version: int
    x_queue_mode: str
    x_message_ttl: int
    x_expires: int
    x_dead_letter_exchange: str
    x_single_active_consumer: bool


@dataclass(frozen=True, slots=True)
class OcppSettings:
    """How the gateway behaves on the OCPP level."""

    call_timeout: float
    max_message_id_length: int
    offline_status: bool
    presence_events: bool


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """
    How Basic credentials (security profiles 1 and 2) are checked.

    ``amqp_url`` is left out of ``repr``: it may hold a password.
    """

    checker: str
    password_file: str
    http_url: str
    amqp_url: str = field(repr=False)
    timeout: float
    cache_ttl: float
    failure_delay: float
    hash_threads: int


@dataclass(frozen=True, slots=True)
class ValidationSettings:
    """Checking payloads against the OCPP JSON schemas (see ocppgw.validation)."""

    mode: str
    exempt_actions: tuple[str, ...]
    exempt_identities: tuple[str, ...]
    allow_additional_properties: bool
    schema_dir: str


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """
    The operators' HTTP listener (status page, metrics, health, chargers).

    ``password`` is left out of ``repr``: settings end up in logs.
    """

    enabled: bool
    tcp_ip: str
    tcp_port: int
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class LogSettings:
    """What the log looks like and how much of it there is."""

    format: str
    level: str


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The optional mirror of every frame to an audit exchange."""

    enabled: bool
    exchange: str


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration, one attribute per INI section."""

    listener: ListenerSettings
    websocket: WebSocketSettings
    amqp: AmqpSettings
    queue: QueueSettings
    ocpp: OcppSettings
    auth: AuthSettings
    validation: ValidationSettings
    admin: AdminSettings
    log: LogSettings
    audit: AuditSettings

    def queue_arguments(self) -> dict[str, str | int]:
        """
        The ``arguments`` table for declaring a charger queue.

        Every ``[queue]`` key is named after the queue argument it sets, so a
        new argument needs only a new row.  ``0`` and an empty value mean
        "not set" and are left out, because RabbitMQ gives an absent argument
        the meaning we document (no TTL, no expiry, no dead-lettering) while
        ``x-expires = 0`` would be refused.
        """
        return {
            option.key: value
            for option in _section("queue").options
            if (value := getattr(self.queue, option.field)) not in (0, "")
        }


# ---------------------------------------------------------------------------
# Kinds: how one value is read and checked.  A kind takes the INI text, or an
# already typed value (settings_from_dict), and returns the typed value or
# raises _Invalid with the reason; the caller adds "section.key: ".

_T_co = TypeVar("_T_co", covariant=True)


class _Invalid(ValueError):
    """A value a kind refuses; the message is the reason alone."""


class Kind(Protocol[_T_co]):
    """Reads and checks the value of one option."""

    @property
    def allowed(self) -> str:
        """What the option accepts, as a noun phrase ("an integer >= 1")."""
        ...

    def __call__(self, value: object) -> _T_co:
        """Return the typed value, or raise :class:`_Invalid` with the reason."""
        ...


def _show(value: object) -> str:
    """
    Show a refused value in an error: short, and visible even when empty
    or full of control characters.
    """
    if value == "":
        return "empty value"
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(value: object, kind: Kind[object]) -> _Invalid:
    """The standard reason: ``<value> is not <what the kind allows>``."""
    return _Invalid(f"{_show(value)} is not {kind.allowed}")


def _text(value: object, kind: Kind[object]) -> str:
    """The value as stripped text; typed callers must pass a ``str``."""
    if not isinstance(value, str):
        raise _refuse(value, kind)
    return value.strip()


_INTEGER = re.compile(r"[-+]?[0-9]+")
# Plain decimals only: "1e3", "inf" and "nan" are not durations anyone means.
_DECIMAL = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")


@dataclass(frozen=True, slots=True)
class Integer:
    """A whole number in ``minimum..maximum`` (no upper bound when ``None``)."""

    minimum: int
    maximum: int | None = None
    #: Replaces the generated description when the range needs explaining.
    noun: str | None = None

    @property
    def allowed(self) -> str:
        if self.noun is not None:
            return self.noun
        if self.maximum is None:
            return f"an integer >= {self.minimum}"
        return f"an integer from {self.minimum} to {self.maximum}"

    def __call__(self, value: object) -> int:
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            number = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            raise _refuse(value, self)
        if number < self.minimum or (self.maximum is not None and number > self.maximum):
            raise _refuse(value, self)
        return number


@dataclass(frozen=True, slots=True)
class Seconds:
    """
    A duration in seconds, fractions allowed.  Never negative; zero only
    where it has a meaning (such as "no pings"), because a zero timeout
    would fire before anything could happen.
    """

    zero_allowed: bool = False

    @property
    def allowed(self) -> str:
        return f"a number of seconds {'>=' if self.zero_allowed else '>'} 0"

    def __call__(self, value: object) -> float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            number = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            raise _refuse(value, self)
        if not math.isfinite(number) or number < 0 or (number == 0 and not self.zero_allowed):
            raise _refuse(value, self)
        return number


@dataclass(frozen=True, slots=True)
class Rate:
    """Events per second, fractions allowed; 0 means "no limit"."""

    allowed: ClassVar[str] = "a number per second >= 0 (0 = no limit)"

    def __call__(self, value: object) -> float:
        try:
            return Seconds(zero_allowed=True)(value)
        except _Invalid:
            raise _refuse(value, self) from None


@dataclass(frozen=True, slots=True)
class Boolean:
    """A switch, spelled any way configparser understands."""

    allowed: ClassVar[str] = "a boolean (true/false, yes/no, on/off, 1/0)"

    def __call__(self, value: object) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            state = configparser.ConfigParser.BOOLEAN_STATES.get(value.strip().lower())
            if state is not None:
                return state
        raise _refuse(value, self)


@dataclass(frozen=True, slots=True)
class Choice:
    """One word out of a fixed set (compared exactly: RabbitMQ does)."""

    choices: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(choice or "empty" for choice in self.choices)

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if text not in self.choices:
            raise _refuse(value, self)
        return text


# RFC 1123 host name label; the last label must not be all digits, so that a
# mistyped address ("10.0.0.300") is not taken for a host name.
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True)
class Host:
    """An address to listen on: an IPv4/IPv6 literal (no brackets) or a host name."""

    allowed: ClassVar[str] = "an IP address (IPv6 without brackets) or a host name"

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        try:
            ipaddress.ip_address(text)
        except ValueError:
            labels = text.split(".")
            if (
                len(text) > 253
                or not all(_HOST_LABEL.fullmatch(label) for label in labels)
                or labels[-1].isdigit()
            ):
                raise _refuse(value, self) from None
        return text


@dataclass(frozen=True, slots=True)
class UrlPath:
    """
    The URL path chargers connect under (``/ocpp``).

    It is matched against the raw request path before the identity, so it
    must be spelled the one way a charger sends it: no trailing ``/``, no
    empty segment, and no ``.`` (dot segments may be normalised by proxies),
    ``#`` (fragment) or ``%`` (encoded characters have two spellings).
    """

    allowed: ClassVar[str] = "a URL path such as /ocpp"
    characters: ClassVar[frozenset[str]] = frozenset(
        string.ascii_letters + string.digits + "-_~!$&'()*+,;=:@"
    )

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if not text.startswith("/"):
            raise _Invalid(f"{_show(text)} does not start with '/'")
        if text.endswith("/"):
            raise _Invalid(f"{_show(text)} ends with '/'")
        if "//" in text:
            raise _Invalid(f"{_show(text)} has an empty segment ('//')")
        for char in text:
            if char != "/" and char not in self.characters:
                raise _Invalid(
                    f"{_show(text)} contains {char!r}; a path segment may hold "
                    "letters, digits and - _ ~ ! $ & ' ( ) * + , ; = : @"
                )
        return text


@dataclass(frozen=True, slots=True)
class ShortText:
    """
    Free text that ends up in the AMQP protocol (a vhost name, a header
    value): printable, and at most 255 characters, the limit of an AMQP
    short string.  Empty is allowed; the option's description says what
    it means.
    """

    allowed: ClassVar[str] = "printable text of at most 255 characters"

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if len(text) > 255 or not text.isprintable():
            raise _refuse(value, self)
        return text


@dataclass(frozen=True, slots=True)
class NodeName:
    """
    The gateway's name in message headers; empty means host:pid, so that
    several gateway processes on one host are told apart.
    """

    allowed: ClassVar[str] = ShortText.allowed

    def __call__(self, value: object) -> str:
        return ShortText()(value) or f"{socket.gethostname()}:{os.getpid()}"


# The exchange name grammar of the AMQP 0-9-1 specification: RabbitMQ
# accepts more, but these names are safe with every client library.
_EXCHANGE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,255}")


@dataclass(frozen=True, slots=True)
class ExchangeName:
    """
    An exchange name.  ``declared`` exchanges are created by ocppgw, and
    RabbitMQ refuses to declare names starting with ``amq.``; exchanges that
    are only published to (dead-lettering) may be ``amq.*`` or empty (none).
    """

    declared: bool

    @property
    def allowed(self) -> str:
        base = "an exchange name (letters, digits, - _ . :)"
        return base if self.declared else f"empty or {base}"

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if text == "" and not self.declared:
            return text
        if not _EXCHANGE_NAME.fullmatch(text):
            raise _refuse(value, self)
        if self.declared and text.startswith("amq."):
            raise _Invalid(f"{text} is reserved by RabbitMQ (amq.*)")
        return text


@dataclass(frozen=True, slots=True)
class AmqpUrl:
    """
    A broker URL in pika's syntax.  Only its shape is checked here (pika
    checks the query options when connecting); errors show it masked.
    """

    allowed: ClassVar[str] = "an amqp:// or amqps:// URL"

    def __call__(self, value: object) -> str:
        if not isinstance(value, str):
            # Not shown at all: its repr could hold the password unmasked.
            raise _Invalid(f"a {type(value).__name__} is not {self.allowed}")
        text = value.strip()
        shown = _show(mask_url(text))
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            raise _Invalid(f"{shown} is not a valid URL") from None
        if parts.scheme not in ("amqp", "amqps"):
            raise _Invalid(f"{shown} is not {self.allowed}")
        if not parts.hostname:
            raise _Invalid(f"{shown} names no host")
        if port == 0:
            raise _Invalid(f"{shown} has port 0")
        return text


#: Every OCPP-J version ocppgw speaks, as WebSocket subprotocol names
#: (oldest first, as L{ocppgw.framing.VERSIONS} lists them).
OCPP_J_SUBPROTOCOLS = tuple(VERSIONS)

#: OpenSSL names of the TLS 1.2 suites the TLS listener offers by default,
#: strongest first: the four OCPP 2.0.1 requires of a CSMS (part 2,
#: A00.FR.318), ECDHE-ECDSA and plain RSA with AES-GCM, plus the ECDHE-RSA
#: variants of the RSA ones (forward secrecy for chargers with an RSA
#: certificate that can do ECDHE). TLS 1.3 suites are OpenSSL's own.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
)
#: The TLS versions ssl.min_version accepts, oldest first (OpenSSL's and
#: Python's spelling).
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: Versions that exist only as OCPP-S (SOAP): named so the error can say so.
SOAP_ONLY_SUBPROTOCOLS = ("ocpp1.2", "ocpp1.5")


@dataclass(frozen=True, slots=True)
class AmqpUrls:
    """
    Zero or more broker URLs separated by commas and/or spaces, each
    checked like :class:`AmqpUrl`.
    """

    allowed: ClassVar[str] = "amqp:// or amqps:// URLs separated by commas or spaces"

    def __call__(self, value: object) -> tuple[str, ...]:
        if isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, str):
            items = value.replace(",", " ").split()
        else:
            raise _Invalid(f"a {type(value).__name__} is not {self.allowed}")
        return tuple(AmqpUrl()(item) for item in items)


@dataclass(frozen=True, slots=True)
class Subprotocols:
    """
    A non-empty list of OCPP-J subprotocols, separated by commas and/or
    spaces.  The order does not matter: the charger's preference decides.
    """

    known: ClassVar[str] = ", ".join(OCPP_J_SUBPROTOCOLS)
    allowed: ClassVar[str] = f"a list of {known}"

    def __call__(self, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            names = value.replace(",", " ").split()
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            names = list(value)
        else:
            raise _refuse(value, self)
        if not names:
            raise _refuse(value, self)
        for index, name in enumerate(names):
            if name in SOAP_ONLY_SUBPROTOCOLS:
                raise _Invalid(f"{name} is SOAP-only, not OCPP-J")
            if name not in OCPP_J_SUBPROTOCOLS:
                raise _Invalid(f"{_show(name)} is not an OCPP-J subprotocol ({self.known})")
            if name in names[:index]:
                raise _Invalid(f"{name} is listed twice")
        return tuple(names)


@dataclass(frozen=True, slots=True)
class OptionalSubprotocol:
    """One OCPP-J subprotocol, or empty for none."""

    allowed: ClassVar[str] = f"empty or one of {', '.join(OCPP_J_SUBPROTOCOLS)}"

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if text and text not in OCPP_J_SUBPROTOCOLS:
            raise _refuse(value, self)
        return text


@dataclass(frozen=True, slots=True)
class CipherString:
    """
    An OpenSSL cipher list (``ciphers(1)``: names, ``:``-separated, with
    ``!``, ``+``, ``-`` and ``@SECLEVEL=n``).  Only its shape is checked
    here; OpenSSL decides at start whether it names any suite, and the
    error names this key.
    """

    allowed: ClassVar[str] = "an OpenSSL cipher list such as ECDHE-RSA-AES128-GCM-SHA256:DEFAULT"

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if not text or len(text) > 2000 or not text.isascii() or not text.isprintable():
            raise _refuse(value, self)
        return text


@dataclass(frozen=True, slots=True)
class FileName:
    """
    The path of a file ocppgw reads (a certificate, a key, a password
    file).  Empty means "none"; a given path must name a readable file, so
    that a typo is reported at start, not at the first charger.
    """

    allowed: ClassVar[str] = "empty or the path of a readable file"

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if text and not (os.path.isfile(text) and os.access(text, os.R_OK)):
            raise _Invalid(f"{_show(text)} is not a readable file")
        return text


@dataclass(frozen=True, slots=True)
class Profile:
    """An OCPP security profile a listener may use (0 = no authentication)."""

    profiles: tuple[int, ...]

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(map(str, self.profiles))

    def __call__(self, value: object) -> int:
        try:
            number = Integer(0)(value)
        except _Invalid:
            raise _refuse(value, self) from None
        if number not in self.profiles:
            raise _refuse(value, self)
        return number


@dataclass(frozen=True, slots=True)
class HttpUrl:
    """An http:// or https:// URL, or empty."""

    allowed: ClassVar[str] = "empty or an http:// or https:// URL"

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if not text:
            return text
        try:
            parts = urlsplit(text)
            parts.port
        except ValueError:
            raise _refuse(value, self) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _refuse(value, self)
        return text


@dataclass(frozen=True, slots=True)
class OptionalAmqpUrl:
    """An AMQP URL, or empty."""

    allowed: ClassVar[str] = "empty or an amqp:// or amqps:// URL"

    def __call__(self, value: object) -> str:
        if value == "" or (isinstance(value, str) and not value.strip()):
            return ""
        return AmqpUrl()(value)


_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")


@dataclass(frozen=True, slots=True)
class HeaderName:
    """An HTTP header name (letters, digits, dashes), or empty."""

    allowed: ClassVar[str] = "empty or an HTTP header name (letters, digits, -)"

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if text and not _HEADER_NAME.fullmatch(text):
            raise _refuse(value, self)
        return text


@dataclass(frozen=True, slots=True)
class Networks:
    """IP addresses or CIDR networks, separated by commas or spaces."""

    allowed: ClassVar[str] = "a list of IP addresses or networks (10.0.0.0/8, ::1)"

    def __call__(self, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            names = value.replace(",", " ").split()
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            names = list(value)
        else:
            raise _refuse(value, self)
        for name in names:
            try:
                ipaddress.ip_network(name, strict=False)
            except ValueError:
                raise _Invalid(f"{_show(name)} is not an IP address or network") from None
        return tuple(names)


def is_loopback(host: str) -> bool:
    """
    Whether *host* (a configured listener address) can only be reached
    from this machine.  Host names other than ``localhost`` are not
    resolved: they count as reachable from outside.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _consistency(settings: Settings) -> list[str]:
    """
    Problems that span several keys, found once every key is valid on its
    own.  The unauthenticated-listener rule is the one that keeps a
    development configuration from being put on the internet by accident.
    """
    listener = settings.listener
    problems = _listener_problems(listener)
    if listener.ssl_enabled:
        problems += _tls_listener_problems(listener)
    problems += _proxy_problems(listener)
    problems += _password_problems(listener, settings.auth)
    problems += _queue_problems(settings.queue)
    return problems


def _listener_problems(listener) -> list[str]:
    """No listener, an open one off loopback, defaults and suites that cannot work."""
    problems = []
    if not listener.tcp_enabled and not listener.ssl_enabled:
        problems.append("listener.tcp.enabled: no listener is enabled (tcp.enabled and "
                        "ssl.enabled are both false)")
    for prefix, enabled, host, profile in (
        ("tcp", listener.tcp_enabled, listener.tcp_ip, listener.tcp_profile),
        ("ssl", listener.ssl_enabled, listener.ssl_ip, listener.ssl_profile),
    ):
        if enabled and profile == 0 and not listener.allow_anonymous and not is_loopback(host):
            problems.append(
                f"listener.{prefix}.profile: 0 (no authentication) on {host}, which is not a "
                "loopback address: any charger could connect as any identity. Use profile "
                f"{'1' if prefix == 'tcp' else '2 or 3'}, bind to 127.0.0.1, or set "
                "allow_anonymous = true if you really mean it"
            )
    for key, default in (("default_subprotocol", listener.default_subprotocol),
                         ("ssl.default_subprotocol", listener.ssl_default_subprotocol)):
        if default and default not in listener.subprotocols:
            problems.append(f"listener.{key}: {default} is not one of listener.subprotocols")
    if (TLS_VERSIONS.index(listener.ssl_min_version) < TLS_VERSIONS.index("TLSv1.2")
            and listener.ssl_ciphers == ":".join(TLS12_CIPHERS)):
        problems.append(
            f"listener.ssl.ciphers: the default suites need TLS 1.2, so ssl.min_version = "
            f"{listener.ssl_min_version} would change nothing; name suites that old chargers "
            "have (for example DEFAULT, or ECDHE-RSA-AES128-SHA:AES128-SHA)")
    return problems


def _tls_listener_problems(listener) -> list[str]:
    """The TLS listener's certificate, verification and identity keys."""
    problems = []
    if not listener.ssl_certfile or not listener.ssl_keyfile:
        problems.append("listener.ssl.certfile: the TLS listener needs ssl.certfile "
                        "and ssl.keyfile")
    if bool(listener.ssl_alt_certfile) != bool(listener.ssl_alt_keyfile):
        problems.append("listener.ssl.alt_certfile: give both ssl.alt_certfile and "
                        "ssl.alt_keyfile, or neither")
    verify = listener.ssl_verify or ("verify_peer" if listener.ssl_profile == 3
                                     else "verify_none")
    if listener.ssl_profile == 3 and verify != "verify_peer":
        problems.append("listener.ssl.verify: profile 3 needs verify_peer (client "
                        "certificates)")
    if verify == "verify_peer" and not listener.ssl_cacertfile:
        problems.append("listener.ssl.cacertfile: verifying client certificates needs "
                        "the CA bundle that issued them")
    return problems + _certificate_identity_problems(listener)


def _certificate_identity_problems(listener) -> list[str]:
    """How a client certificate names its charger (TLS listener, or profile 3 behind a proxy)."""
    problems = []
    if listener.ssl_identity == "map" and not listener.ssl_identity_map:
        problems.append("listener.ssl.identity_map: ssl.identity = map needs the "
                        "mapping file")
    if listener.ssl_identity == "cn_and_o" and not listener.ssl_organization:
        problems.append("listener.ssl.organization: ssl.identity = cn_and_o needs the "
                        "organisation the certificates must name")
    return problems


def _proxy_problems(listener) -> list[str]:
    """The PROXY protocol and client certificates passed on by a TLS-ending proxy."""
    problems = []
    if listener.proxy_protocol and not listener.trusted_proxies:
        problems.append("listener.trusted_proxies: empty, so with proxy_protocol = true "
                        "every connection would be refused; list the load balancers' "
                        "addresses or networks")
    if listener.tcp_enabled and listener.tcp_profile == 3 and not (
            listener.client_cert_header and listener.trusted_proxies):
        problems.append("listener.tcp.profile: 3 on the plain listener needs a TLS-ending "
                        "proxy: set client_cert_header and trusted_proxies")
    if listener.tcp_enabled and listener.tcp_profile == 3:
        problems += _certificate_identity_problems(listener)
    return problems


def _password_problems(listener, auth) -> list[str]:
    """Profiles 1 and 2 need somewhere to check passwords."""
    problems = []
    basic = (listener.tcp_enabled and listener.tcp_profile == 1) or (
        listener.ssl_enabled and listener.ssl_profile == 2)
    if basic:
        if auth.checker == "file" and not auth.password_file:
            problems.append("auth.password_file: profiles 1 and 2 with checker = file need "
                            "a password file (see `ocppgw passwd`)")
        if auth.checker == "http" and not auth.http_url:
            problems.append("auth.http.url: checker = http needs the URL to POST to")
    return problems


def _queue_problems(queue) -> list[str]:
    """Queue arguments the chosen queue type does not take."""
    problems = []
    if queue.x_queue_type != "classic":
        # RabbitMQ refuses these arguments for other queue types, and would
        # refuse every charger's declare: say so once, at start.
        for key, value in (("x-queue-version", queue.x_queue_version),
                           ("x-queue-mode", queue.x_queue_mode)):
            if value not in (0, ""):
                problems.append(f"queue.{key}: applies to classic queues only, not to "
                                f"x-queue-type = {queue.x_queue_type} (leave it empty or 0)")
    return problems


def _words(value: object, kind: Kind[object]) -> list[str]:
    """A list given as text separated by commas and/or spaces, or as a sequence."""
    if isinstance(value, str):
        return value.replace(",", " ").split()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    raise _refuse(value, kind)


@dataclass(frozen=True, slots=True)
class ActionNames:
    """
    A possibly empty list of OCPP action names, separated by commas and/or
    spaces.  An action is what the framing accepts (ASCII letters and
    digits), so a name that could never match is refused, not ignored.
    """

    allowed: ClassVar[str] = "a list of OCPP action names (letters and digits), or empty"

    def __call__(self, value: object) -> tuple[str, ...]:
        names = _words(value, self)
        for name in names:
            if not (0 < len(name) <= 64 and name.isascii() and name.isalnum()):
                raise _Invalid(f"{_show(name)} is not an OCPP action name")
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class IdentityPatterns:
    """
    A possibly empty list of charger identity patterns, separated by commas
    and/or spaces: C{*} matches any run of characters, C{?} one character
    (so C{?} also stands for a space or a comma inside an identity).
    """

    allowed: ClassVar[str] = "a list of identity patterns with * and ?, or empty"

    def __call__(self, value: object) -> tuple[str, ...]:
        patterns = _words(value, self)
        for pattern in patterns:
            if len(pattern) > 255 or not pattern.isprintable() or "[" in pattern:
                # "[" would start a character class in the matcher.
                raise _Invalid(f"{_show(pattern)} is not an identity pattern")
        return tuple(dict.fromkeys(patterns))


@dataclass(frozen=True, slots=True)
class Directory:
    """An existing directory, or empty for "none"."""

    allowed: ClassVar[str] = "empty or an existing directory"

    def __call__(self, value: object) -> str:
        text = _text(value, self)
        if text and not os.path.isdir(text):
            raise _Invalid(f"{_show(text)} is not an existing directory")
        return text


#: How strictly payloads are checked against the schemas (ocppgw.validation).
VALIDATION_MODES = ("off", "warn", "enforce")


# ---------------------------------------------------------------------------
# The table.


@dataclass(frozen=True, slots=True)
class Option:
    """
    One configuration key.

    :ivar key: the INI key, spelled like rabbitmq_web_ocpp / Web MQTT where
        the concept exists there.
    :ivar kind: reads and checks the value.
    :ivar default: the default *as INI text*, so that it is validated like
        any value and printed exactly as an operator would write it.
    :ivar doc: one line for the shipped INI file and the documentation.
    """

    key: str
    kind: Kind[object]
    default: str
    doc: str

    @property
    def field(self) -> str:
        """The attribute name on the section's settings dataclass."""
        return self.key.replace(".", "_").replace("-", "_")


@dataclass(frozen=True, slots=True)
class Section:
    """One INI section: its settings dataclass, what it is for, its keys."""

    name: str
    settings: type
    doc: str
    options: tuple[Option, ...]

    def option(self, key: str) -> Option | None:
        """The option named *key*, or ``None``."""
        return next((option for option in self.options if option.key == key), None)


#: Every section and key ocppgw reads, in the order they are documented.
SECTIONS: tuple[Section, ...] = (
    Section("listener", ListenerSettings,
            "Where chargers connect: the plain ws:// listener and what its "
            "opening handshake accepts.", (
        Option("tcp.ip", Host(), "127.0.0.1",
               "Address of the plain ws:// listener."),
        Option("tcp.port", Integer(0, 65535, "a port (1-65535, or 0 for any free port)"), "19520",
               "Port of the plain ws:// listener; 0 picks a free port (for tests)."),
        Option("ws_path", UrlPath(), "/ocpp",
               "URL path before the charger identity: chargers connect to <ws_path>/<identity>."),
        Option("vhost", ShortText(), "",
               "When set, <ws_path>/<vhost>/<identity> is accepted too (compatibility form); "
               "the vhost as a name, not percent-encoded."),
        Option("subprotocols", Subprotocols(), ", ".join(OCPP_J_SUBPROTOCOLS),
               "OCPP versions offered, separated by commas or spaces; the charger's "
               "preference decides among them."),
        Option("default_subprotocol", OptionalSubprotocol(), "",
               "On the plain ws:// listener, the OCPP version a charger that offers no "
               "subprotocol at all is served as (some firmware sends none); the 101 then "
               "names none. Empty = refuse such a charger with HTTP 400. One of "
               "subprotocols."),
        Option("max_connections", Integer(1), "100000",
               "Open charger connections; more are refused with HTTP 503 before the upgrade."),
        Option("max_identity_length", Integer(1, 255), "48",
               "Longest charger identity accepted."),
        Option("tcp.enabled", Boolean(), "true",
               "Run the plain ws:// listener."),
        Option("tcp.profile", Profile((0, 1, 3)), "0",
               "OCPP security profile of the ws:// listener: 0 = no authentication "
               "(loopback only unless allow_anonymous), 1 = HTTP Basic auth, 3 = client "
               "certificate passed by a TLS-ending proxy (client_cert_header)."),
        Option("ssl.enabled", Boolean(), "false",
               "Run the TLS wss:// listener (needs ssl.certfile and ssl.keyfile)."),
        Option("ssl.ip", Host(), "127.0.0.1",
               "Address of the wss:// listener."),
        Option("ssl.port", Integer(0, 65535, "a port (1-65535, or 0 for any free port)"),
               "19521", "Port of the wss:// listener."),
        Option("ssl.profile", Profile((0, 2, 3)), "2",
               "OCPP security profile of the wss:// listener: 2 = TLS + Basic auth, "
               "3 = TLS + client certificate, 0 = TLS without authentication."),
        Option("ssl.default_subprotocol", OptionalSubprotocol(), "",
               "default_subprotocol for the wss:// listener."),
        Option("ssl.min_version", Choice(TLS_VERSIONS), "TLSv1.2",
               "Oldest TLS version accepted. TLSv1 and TLSv1.1 are broken (BEAST, "
               "SHA-1/MD5 handshakes, no AEAD suites) and only for chargers that can do "
               "nothing newer; with them ocppgw lowers OpenSSL's security level to 0 and "
               "warns at start, and ssl.ciphers must name suites they have."),
        Option("ssl.ciphers", CipherString(), ":".join(TLS12_CIPHERS),
               "OpenSSL cipher list for TLS 1.2 and older (TLS 1.3 suites are OpenSSL's "
               "own); the default is the suites OCPP 2.0.1 requires plus ECDHE-RSA."),
        Option("ssl.certfile", FileName(), "",
               "Server certificate (PEM), followed by every intermediate CA certificate up "
               "to the root (all are sent: chargers often trust only the root)."),
        Option("ssl.keyfile", FileName(), "",
               "Private key of ssl.certfile (PEM, may be encrypted: see ssl.password_file)."),
        Option("ssl.password_file", FileName(), "",
               "File whose first line is the password of encrypted key files."),
        Option("ssl.alt_certfile", FileName(), "",
               "A second server certificate with the other key type (RSA next to "
               "ECDSA), chosen by what the charger supports."),
        Option("ssl.alt_keyfile", FileName(), "",
               "Private key of ssl.alt_certfile."),
        Option("ssl.cacertfile", FileName(), "",
               "CA bundle (PEM) client certificates must chain to (profile 3)."),
        Option("ssl.crlfile", FileName(), "",
               "Certificate revocation lists (PEM) for client certificates; empty = "
               "no revocation check."),
        Option("ssl.verify", Choice(("", "verify_none", "verify_peer")), "",
               "Ask for and verify client certificates; empty = verify_peer with "
               "profile 3, verify_none otherwise."),
        Option("ssl.fail_if_no_peer_cert", Boolean(), "true",
               "With verify_peer, end the TLS handshake of a client without a "
               "certificate (false: answer it 403 over HTTP instead)."),
        Option("ssl.identity", Choice(("cn", "cn_and_o", "map")), "cn",
               "How a client certificate names its charger: cn = subject CN, "
               "cn_and_o = subject CN and the O must be ssl.organization, map = "
               "ssl.identity_map."),
        Option("ssl.organization", ShortText(), "",
               "Subject O client certificates must carry with ssl.identity = cn_and_o."),
        Option("ssl.identity_map", FileName(), "",
               "File of '<sha256 fingerprint or serial:hex> <identity>' lines for "
               "ssl.identity = map."),
        Option("ssl.session_tickets", Boolean(), "true",
               "Let chargers that keep their TLS session resume it with a session ticket "
               "(TLS 1.2 and 1.3): a reconnect then skips the certificate exchange and the "
               "key agreement. Tickets are resumed by the worker process that issued them, "
               "also across one SIGHUP reload."),
        Option("ssl.session_cache", Boolean(), "true",
               "Keep sessions by session id in the gateway (at most 20,480 per worker), "
               "for TLS 1.2 chargers that take no tickets."),
        Option("ssl.session_timeout", Seconds(), "7200",
               "Seconds a TLS session may be resumed; also how long a client certificate "
               "revoked by a new CRL can go on resuming the session it was verified in."),
        Option("proxy_protocol", Boolean(), "false",
               "Expect a HAProxy PROXY protocol v1/v2 header on every connection of both "
               "listeners; the address it gives is the charger's. Connections from "
               "addresses not in trusted_proxies are refused before the header is read."),
        Option("client_cert_header", HeaderName(), "",
               "With TLS ended by a trusted proxy: the request header carrying the "
               "charger's verified client certificate (URL-encoded PEM, as nginx's "
               "$ssl_client_escaped_cert), for tcp.profile = 3."),
        Option("trusted_proxies", Networks(), "127.0.0.0/8, ::1",
               "Addresses or networks (CIDR) of the load balancers and proxies allowed to "
               "send a PROXY header (proxy_protocol) or client_cert_header; default: "
               "loopback only. Other addresses are refused when proxy_protocol is on, "
               "and their client_cert_header is ignored."),
        Option("allow_anonymous", Boolean(), "false",
               "Allow a listener with profile 0 (no authentication) on a non-loopback "
               "address."),
        Option("accept_rate", Rate(), "0",
               "New WebSocket handshakes accepted per second (a token bucket; 0 = no limit); "
               "more are refused with HTTP 503 and a Retry-After before any broker work."),
        Option("accept_burst", Integer(1), "100",
               "Handshakes accepted at once before accept_rate applies (the bucket's size)."),
        Option("max_handshakes", Integer(0), "0",
               "Handshakes being prepared at the same time (queue declared, consumer set up); "
               "more are refused with HTTP 503 and a Retry-After (0 = no limit)."),
        Option("max_opening", Integer(0), "1000",
               "Connections in their opening handshake (TLS, request, queue declared) at "
               "once in one process; more are accepted but wait, unread, until one of these "
               "opens or goes. Bounds the memory a reconnection storm leaves behind "
               "(0 = no limit)."),
        Option("retry_after_max", Integer(1, 3600), "10",
               "A refused charger is told to retry after a random 1 to this many seconds, "
               "so that a refused wave comes back spread out."),
        Option("drain_window", Seconds(zero_allowed=True), "10",
               "At shutdown, chargers are closed with 1012 spread evenly over this many "
               "seconds, so the fleet reconnects elsewhere gradually."),
        Option("workers", Integer(1, 256), "1",
               "Gateway processes sharing the listening port (SO_REUSEPORT, Linux), so one "
               "host uses all its cores; each has its own node name. Needs a fixed tcp.port."),
        Option("worker_affinity", Choice(("none", "source_address")), "none",
               "With workers above 1: which worker the kernel gives a new connection. none = "
               "any (spread by address and port); source_address = always the same worker "
               "for the same client address, so a wss charger that reconnects resumes the "
               "TLS session its worker issued. Not behind a proxy or balancer that connects "
               "from a few addresses: all its chargers would go to one worker."),
    )),
    Section("websocket", WebSocketSettings,
            "Limits and keep-alive of each charger's WebSocket connection.", (
        Option("ws_opts.max_frame_size", Integer(1024), "1048576",
               "Largest message in bytes; a larger one closes the connection with 1009."),
        Option("ws_opts.idle_timeout", Seconds(zero_allowed=True), "60",
               "Seconds between server pings to a charger (0 = no pings, for chargers "
               "that never answer them); any frame from the charger counts as its pong."),
        Option("ws_opts.compress", Boolean(), "false",
               "Negotiate permessage-deflate with chargers that offer it, with small "
               "windows and no context kept between the gateway's messages: ~8-12 KiB "
               "more per idle charger, where zlib's defaults cost ~100 KiB."),
        Option("ping_timeout", Seconds(), "30",
               "Seconds to wait for the pong before the connection is dropped."),
        Option("handshake_timeout", Seconds(), "30",
               "Seconds a charger has to complete the opening handshake."),
        Option("close_timeout", Seconds(), "5",
               "Seconds to wait for the charger's close frame before dropping TCP."),
        Option("max_bad_frames", Integer(1), "10",
               "Malformed frames tolerated per connection before closing it with 1002."),
        Option("max_message_rate", Rate(), "0",
               "Messages per second one charger may send (a token bucket; 0 = no limit); "
               "a CALL over it is answered with a CALLERROR and not published."),
        Option("message_burst", Integer(1), "50",
               "Messages a charger may send at once before max_message_rate applies."),
        Option("max_rate_violations", Integer(1), "200",
               "Messages over the rate limit, with no quiet second in between, before "
               "the connection is closed with 1008."),
    )),
    Section("amqp", AmqpSettings,
            "The RabbitMQ connection shared by all chargers.", (
        Option("url", AmqpUrl(), "amqp://guest:guest@127.0.0.1:5672/%2F",
               "Broker URL (pika URL syntax; %2F is the default vhost /)."),
        Option("exchange", ExchangeName(declared=True), "ocpp",
               "Durable topic exchange that carries all OCPP traffic; declared at start."),
        Option("prefetch_count", Integer(1, 65535), "10",
               "Unacknowledged commands per charger (bounds the CSMS CALLs held for it)."),
        # pika wants whole seconds here.
        Option("heartbeat", Integer(0, 65535), "60",
               "AMQP heartbeat in seconds (0 = off)."),
        Option("connect_timeout", Seconds(), "10",
               "Seconds to connect to the broker and open the AMQP connection."),
        Option("confirm_window", Integer(1), "10000",
               "Publishes awaiting broker confirmation per channel before later ones wait "
               "and reading from chargers pauses. Pausing and resuming touches every "
               "charger's socket, so the window should hold a connect storm's publishes."),
        Option("publish_channels", Integer(1, 64), "1",
               "Channels that carry charger frames, with publisher confirms."),
        Option("consumer_channels", Integer(1, 256), "4",
               "Channels the per-charger consumers are spread over."),
        Option("declare_channels", Integer(1, 256), "32",
               "Channels for declaring and binding charger queues, kept apart so that a "
               "failing declare closes no one else's channel. The broker creates queues "
               "in parallel across channels, one at a time on each: new chargers arrive "
               "about twice as fast with 32 as with 4."),
        Option("node", NodeName(), "",
               "Name of this gateway in message headers (empty = host:pid)."),
        Option("failover_urls", AmqpUrls(), "",
               "More broker URLs (other nodes of the RabbitMQ cluster), separated by commas "
               "or spaces; connections are tried in turn, url first."),
        Option("outage_grace", Seconds(zero_allowed=True), "30",
               "Seconds connected chargers are kept while no broker is reachable (their CALLs "
               "get CALLERROR InternalError); then they are closed with 1012."),
        Option("outage_keep_chargers", Boolean(), "false",
               "Keep connected chargers for as long as the broker is unreachable instead "
               "of closing them after outage_grace."),
        Option("reconnect_max_delay", Seconds(), "30",
               "Longest wait between two reconnection attempts (exponential back-off with "
               "jitter, starting at 0.5 s)."),
        Option("topology_check_interval", Seconds(zero_allowed=True), "15",
               "Seconds between passive checks that the exchange is still the one the "
               "gateway bound its chargers' queues to; one deleted (or deleted and declared "
               "again) under the gateway is declared again and every connected charger's "
               "queue bound again (0 = notice only when a publish to it fails)."),
        Option("owed_presence_max", Integer(0), "100000",
               "Presence messages (offline StatusNotifications, connected and disconnected "
               "events) kept while the broker cannot take them and published in order once "
               "it can; beyond this many the oldest are dropped "
               "(ocppgw_presence_dropped_total)."),
    )),
    Section("queue", QueueSettings,
            "Arguments of the per-charger queues ocpp.<identity>, passed to queue.declare "
            "under the key's name; 0 or empty leaves the argument out. RabbitMQ refuses "
            "to redeclare an existing queue with other arguments: change them for "
            "existing queues with a policy.", (
        Option("x-queue-type", Choice(("classic", "quorum")), "classic",
               "Type of the charger queues: classic (one Erlang process per queue, on one "
               "node) or quorum (a Raft group per queue, replicated; it costs several "
               "times the broker memory of a classic queue, see docs/capacity.md)."),
        Option("x-queue-version", Integer(0, 2), "0",
               "Storage version of classic charger queues (RabbitMQ 3.10+): 1, or 2, the "
               "newer format (faster with messages; an empty charger queue costs the same "
               "in both); 0 = the broker's default (1 before RabbitMQ 3.13, 2 from then on, "
               "the only one in 4.x). Classic queues only."),
        Option("x-queue-mode", Choice(("", "default", "lazy")), "",
               "lazy = classic charger queues keep their messages on disk rather than in "
               "memory (RabbitMQ 3.12 and later ignore it: every classic queue is lazy "
               "then); empty = not set. Classic queues only."),
        # RabbitMQ refuses timer values above 2^32-1 ms (MAX_EXPIRY_TIMER).
        Option("x-message-ttl", Integer(0, 2**32 - 1), "300000",
               "Milliseconds a command waits in a charger's queue (0 = no TTL)."),
        Option("x-expires", Integer(0, 2**32 - 1), "604800000",
               "Milliseconds an unused charger queue is kept (0 = forever)."),
        Option("x-dead-letter-exchange", ExchangeName(declared=False), "",
               "Exchange for expired or rejected commands (empty = none)."),
        Option("x-single-active-consumer", Boolean(), "false",
               "Only one consumer of a charger queue receives commands, the next one takes "
               "over when it stops: with several gateway processes, a charger's new "
               "connection gets nothing until the old one is closed (RabbitMQ 3.8+)."),
    )),
    Section("ocpp", OcppSettings,
            "What the gateway does on the OCPP level.", (
        Option("call_timeout", Seconds(), "30",
               "Seconds a charger has to answer a CSMS CALL before a timeout CALLERROR "
               "is published."),
        Option("max_message_id_length", Integer(36, 255), "36",
               "Longest OCPP message id accepted, in characters (the specs say 36; some "
               "chargers send longer ones). Ids must also fit an AMQP correlation_id "
               "(255 bytes of UTF-8)."),
        Option("offline_status", Boolean(), "true",
               "Publish the offline StatusNotification when a charger goes away."),
        Option("presence_events", Boolean(), "true",
               "Publish connected/disconnected events."),
    )),
    Section("auth", AuthSettings,
            "How Basic credentials (security profiles 1 and 2) are checked. Results are "
            "cached briefly; a failed login is answered after failure_delay.", (
        Option("checker", Choice(("file", "http", "amqp")), "file",
               "file = password_file, http = POST to http.url, amqp = log in to "
               "RabbitMQ as the charger."),
        Option("password_file", FileName(), "",
               "identity:scrypt-hash lines, written by `ocppgw passwd`; re-read when "
               "it changes."),
        Option("http.url", HttpUrl(), "",
               "URL the credentials are POSTed to (form fields username, password); "
               "an answer starting with 'allow' lets the charger in."),
        Option("amqp.url", OptionalAmqpUrl(), "",
               "Broker to log in to with the charger's credentials; empty = [amqp] url "
               "(host, port and vhost; its user is not used)."),
        Option("timeout", Seconds(), "5",
               "Seconds to wait for the checker; then the charger gets HTTP 503."),
        Option("cache_ttl", Seconds(zero_allowed=True), "10",
               "Seconds a checked login is remembered (0 = not at all)."),
        Option("failure_delay", Seconds(zero_allowed=True), "1",
               "Seconds before a refused login is answered (slows down guessing)."),
        Option("hash_threads", Integer(1, 64), "2",
               "Threads that verify password hashes (each scrypt check takes ~16 MiB)."),
    )),
    Section("validation", ValidationSettings,
            "Checking payloads against the OCA JSON schemas of each OCPP version, in both "
            "directions. The schemas are read at start and compiled on first use.", (
        Option("mode", Choice(VALIDATION_MODES), "warn",
               "off: no checks; warn: invalid payloads pass, are counted, logged and marked "
               "with the x-ocppgw-validation-error header; enforce: they are refused with the "
               "OCPP error the version asks for."),
        Option("exempt_actions", ActionNames(), "",
               "Actions never checked, in either direction (for example DataTransfer), "
               "separated by commas or spaces."),
        Option("exempt_identities", IdentityPatterns(), "",
               "Chargers never checked: identity patterns with * and ?, separated by commas "
               "or spaces."),
        Option("allow_additional_properties", Boolean(), "false",
               "Accept fields the schemas do not define (a common vendor quirk) instead of "
               "refusing them as FormatViolation."),
        Option("schema_dir", Directory(), "",
               "Directory with one subdirectory per subprotocol (ocpp1.6, ocpp2.0, "
               "ocpp2.0.1, ocpp2.1) whose schemas replace the ones of the ocpp package "
               "(ocpp2.0 uses the ocpp2.0.1 schemas unless it has its own); empty = the "
               "package's."),
    )),
    Section("admin", AdminSettings,
            "The operators' HTTP listener: the status page (/), /status, /metrics "
            "(Prometheus), /healthz, /readyz and /chargers. Keep it off the chargers' "
            "network; /healthz and /readyz never ask for credentials, so that "
            "orchestrators can probe them.", (
        Option("enabled", Boolean(), "true",
               "Run the admin listener."),
        Option("tcp.ip", Host(), "127.0.0.1",
               "Address of the admin listener."),
        Option("tcp.port", Integer(0, 65535, "a port (1-65535, or 0 for any free port)"), "9100",
               "Port of the admin listener; 0 picks a free port (for tests)."),
        Option("username", ShortText(), "",
               "User name for HTTP Basic auth on the status page, /status, /metrics and "
               "/chargers (empty = no auth)."),
        Option("password", ShortText(), "",
               "Password for HTTP Basic auth; required when username is set."),
    )),
    Section("log", LogSettings,
            "The gateway's own log (twistd's log file, or stdout with twistd -n).", (
        Option("format", Choice(("text", "json")), "text",
               "text: human-readable lines; json: one JSON object per line with "
               "structured fields (identity, peer, version, listener, event)."),
        Option("level", Choice(("debug", "info", "warn", "error", "critical")), "info",
               "Lowest level logged (pika's own log starts at warn unless this is debug)."),
    )),
    Section("audit", AuditSettings,
            "Frame audit trail: every frame in both directions, and connects and "
            "disconnects, mirrored to an exchange (bind a stream queue to it to replay a "
            "charger's history).", (
        Option("enabled", Boolean(), "false",
               "Mirror frames and connection events to the audit exchange."),
        Option("exchange", ExchangeName(declared=True), "ocpp.audit",
               "Durable topic exchange of the audit trail; routing key "
               "<identity>.<in|out|event>; declared at start when enabled."),
    )),
)


def _section(name: str) -> Section:
    """The section called *name* (which must exist)."""
    return next(section for section in SECTIONS if section.name == name)


# ---------------------------------------------------------------------------
# Building settings.


def _unknown(name: str, known: Sequence[str]) -> str:
    """A "did you mean" hint for a misspelt section or key, or nothing."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _build_section(
    section: Section, given: Mapping[str, object]
) -> tuple[object | None, list[str]]:
    """
    Read one section from *given* (missing keys take their default).

    :return: the section's settings, or ``None`` when there are problems,
        and the problems.
    """
    keys = [option.key for option in section.options]
    problems = [
        f"{section.name}.{key}: unknown key{_unknown(key, keys)}"
        for key in given
        if section.option(key) is None
    ]
    values = {}
    for option in section.options:
        try:
            values[option.field] = option.kind(given.get(option.key, option.default))
        except _Invalid as reason:
            problems.append(f"{section.name}.{option.key}: {reason}")
    return (None if problems else section.settings(**values)), problems


def settings_from_dict(values: Mapping[str, Mapping[str, object]]) -> Settings:
    """
    Build settings from ``{section: {key: value}}``, every key optional.

    Values may be INI text (``"19520"``) or already typed (``19520``,
    ``("ocpp1.6",)``), so tests and embedding code can write
    ``settings_from_dict({"listener": {"tcp.port": 0}})``.

    :raises ConfigError: listing every problem.
    """
    names = [section.name for section in SECTIONS]
    problems = [
        f"{name}: unknown section{_unknown(name, names)}" for name in values if name not in names
    ]
    built = {}
    for section in SECTIONS:
        built[section.name], found = _build_section(section, values.get(section.name, {}))
        problems += found
    admin = built.get("admin")
    if admin is not None and bool(admin.username) != bool(admin.password):
        problems.append("admin.password: username and password are set together (both or neither)")
    if problems:
        raise ConfigError(*problems)
    settings = Settings(**built)
    problems = _consistency(settings)
    if problems:
        raise ConfigError(*problems)
    return settings


def defaults() -> Settings:
    """The settings of an empty configuration file."""
    return settings_from_dict({})


def _ini_parser() -> configparser.ConfigParser:
    """
    A parser for ``key = value`` lines, exactly as written.

    No interpolation (``%2F`` in URLs is literal), case-sensitive keys,
    ``=`` as the only delimiter (``:`` appears in URLs and IPv6 addresses),
    ``#``/``;`` comments also after a value when preceded by whitespace, and
    no DEFAULT section: its keys would silently apply to every section,
    so ``[DEFAULT]`` is reported as an unknown section instead.
    """
    parser = configparser.ConfigParser(
        interpolation=None,
        delimiters=("=",),
        inline_comment_prefixes=("#", ";"),
        empty_lines_in_values=False,
        # "[]" cannot be written, so no section is ever the DEFAULT one.
        default_section="",
    )
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    return parser


def _syntax_problems(error: configparser.Error, source: str) -> list[str]:
    """
    Turn a configparser error into problems.  The offending line is never
    quoted: it may hold the broker password.
    """
    if isinstance(error, configparser.DuplicateOptionError):
        return [f"{error.section}.{error.option}: duplicate key (line {error.lineno})"]
    if isinstance(error, configparser.DuplicateSectionError):
        return [f"{error.section}: duplicate section (line {error.lineno})"]
    if isinstance(error, configparser.MissingSectionHeaderError):
        return [f"{source}:{error.lineno}: a key before the first [section]"]
    if isinstance(error, configparser.ParsingError):
        return [f"{source}:{lineno}: not a 'key = value' line" for lineno, _line in error.errors]
    return [f"{source}: {error.message}"]


def parse(text: str, source: str = "<string>") -> Settings:
    """
    Read settings from INI *text*.

    :param source: where the text comes from, used in syntax errors.
    :raises ConfigError: listing every problem.
    """
    parser = _ini_parser()
    try:
        parser.read_string(text, source)
    except configparser.Error as error:
        raise ConfigError(*_syntax_problems(error, source)) from None
    return settings_from_dict({name: dict(parser.items(name)) for name in parser.sections()})


def load(path: str | os.PathLike[str]) -> Settings:
    """
    Read settings from the INI file at *path* (UTF-8, a BOM is allowed).

    :raises ConfigError: when the file cannot be read (``<path>: cannot
        read: <reason>``) or lists problems.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as file:
            text = file.read()
    except OSError as error:
        raise ConfigError(f"{name}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{name}: cannot read: not UTF-8 (byte {error.start})") from None
    return parse(text, source=name)


# ---------------------------------------------------------------------------
# Documentation generated from the table.

_INI_HEADER = """\
# ocppgw configuration.
#
# Every key is listed with its default, commented out: uncomment a line to
# change it. Unknown sections and keys are errors, so that a typo cannot
# silently fall back to a default. Check a file with
#   ocppgw check-config <file>
#
# This file is generated by `python -m ocppgw.config --ini` from the option
# table in ocppgw/config.py; a test keeps the two equal.
"""


def _comment(text: str) -> str:
    """*text* as wrapped ``#`` comment lines."""
    return textwrap.fill(text, width=78, initial_indent="# ", subsequent_indent="# ") + "\n"


def render_ini() -> str:
    """The fully commented INI file with every default (``etc/ocppgw.ini``)."""
    parts = [_INI_HEADER]
    for section in SECTIONS:
        parts.append(f"\n[{section.name}]\n" + _comment(section.doc))
        for option in section.options:
            parts.append("\n" + _comment(f"{option.doc} Allowed: {option.kind.allowed}."))
            parts.append(f"#{option.key} = {option.default}".rstrip() + "\n")
    return "".join(parts)


def _markdown(text: str) -> str:
    """
    *text* made safe for Markdown: ``|`` would end a table cell and
    ``<identity>`` would be swallowed as an HTML tag.
    """
    return text.replace("|", "\\|").replace("<", "\\<")


def render_markdown() -> str:
    """The documentation's reference tables, one table per section."""
    parts = []
    for section in SECTIONS:
        parts.append(f"### `[{section.name}]`\n\n{_markdown(section.doc)}\n\n")
        parts.append("| key | default | allowed | description |\n|---|---|---|---|\n")
        for option in section.options:
            default = f"`{option.default}`" if option.default else "(empty)"
            parts.append(
                f"| `{option.key}` | {default} | {_markdown(option.kind.allowed)} "
                f"| {_markdown(option.doc)} |\n"
            )
        parts.append("\n")
    return "".join(parts).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """
    ``python -m ocppgw.config``: print the INI file or the reference tables
    generated from :data:`SECTIONS` (``ocppgw check-config`` checks a file).

    :return: the exit status.
    """
    arguments = argparse.ArgumentParser(
        description="Print ocppgw's configuration reference; check a file with "
        "`ocppgw check-config FILE`."
    )
    action = arguments.add_mutually_exclusive_group(required=True)
    action.add_argument("--ini", action="store_true", help="print an INI file with every default")
    action.add_argument("--markdown", action="store_true", help="print the reference table")
    options = arguments.parse_args(argv)
    sys.stdout.write(render_ini() if options.ini else render_markdown())
    return 0

if __name__ == "__main__":
    sys.exit(main())
