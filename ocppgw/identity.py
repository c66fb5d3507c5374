"""
The charge point identity, taken from the WebSocket URL path.

A charger connects to C{ws[s]://host:port/<ws_path>/<identity>} (OCPP-J 1.6
§3.1.1; 2.0.1/2.1 Part 4 §3.1.1); for compatibility with C{rabbitmq_web_ocpp}
the form C{/<ws_path>/<vhost>/<identity>} is accepted too. The identity is the
last path segment, percent-decoded: real chargers send C{RDAM%20123}. One
trailing C{/} is ignored (C{/ocpp/CP1/} is the charger C{CP1}): chargers
whose firmware joins the configured base URL and the identity with a C{/}
of their own send it, and it cannot name anything else.

The identity becomes the binding key of the charger's queue and part of its
name, so it must be exactly one topic word that is not a wildcard:

 - no C{.}: it would split the key into several words, which could match
   the C{<version>.<Action>.<kind>} keys chargers publish with;
 - not C{#} anywhere, and not exactly C{*}: those words are wildcards in a
   binding key and would deliver other chargers' commands to this one
   (C{*} inside a longer word, as in C{DE*ABC*E123}, is an ordinary
   character);
 - no C{/} and no control characters: they have no place in a name that is
   logged, shown in the RabbitMQ UI and compared in Basic auth.

What is allowed (docs/connecting.md) is the OCPP 2.x C{identifierString} character
set without C{.} (2.0.1/2.1 Part 4 §3.1.1, which also sets the maximum of 48
characters), plus the space of the specs' own example C{RDAM 123}: ASCII
letters and digits, space and C{* - _ = : + | @ ~ ! $ & ' ( ) , ;}.

Part 4 §3.1.1 also says a C{:} "might not be used" because the identity is
the Basic auth username, and Basic auth splits user and password at the
first C{:}. It is harmless for routing, so the contract keeps it: such a
charger can connect without Basic auth (or with a client certificate) but
can never pass a Basic auth check.

This module is pure: no Twisted, autobahn or pika.
"""

from __future__ import annotations

import string
from typing import Final, Optional

#: OCPP 2.x allows at most 48 characters (Part 4 §3.1.1); configurable.
DEFAULT_MAX_LENGTH: Final = 48

_ALLOWED: Final = frozenset(string.ascii_letters + string.digits + " *-_=:+|@~!$&'(),;")
_HEX_DIGITS: Final = frozenset(string.hexdigits)
# Refused characters safe to name in a message (printable, no quotes or
# escapes that could confuse an HTTP status line or a log reader).
_NAMEABLE: Final = frozenset(".#/%?")


class BadIdentity(ValueError):
    """
    The request path does not name an acceptable charge point identity.

    The message says which rule failed and is safe to log: it never contains
    the identity or anything else taken from the path, since a decoded
    C{%0D%0A} would otherwise forge log lines or HTTP status lines.
    """


def _percent_decode(segment: str) -> str:
    """
    Decode C{%XX} escapes strictly, unlike L{urllib.parse.unquote}, which
    leaves broken escapes in place and turns invalid UTF-8 into U+FFFD: both
    would let two different raw paths name the same charger.

    @raise BadIdentity: a C{%} not followed by two hex digits, or bytes that
        are not UTF-8.
    """
    if "%" not in segment:
        return segment
    head, *escaped = segment.split("%")
    try:
        raw = bytearray(head.encode("utf-8"))
        for piece in escaped:
            pair = piece[:2]
            if len(pair) != 2 or not _HEX_DIGITS.issuperset(pair):
                raise BadIdentity("the path contains a broken percent-escape")
            raw.append(int(pair, 16))
            raw += piece[2:].encode("utf-8")
        return raw.decode("utf-8")
    except UnicodeError:
        raise BadIdentity("the path is not valid UTF-8 once percent-decoded") from None


def _check(identity: str, max_length: int) -> None:
    if not identity:
        raise BadIdentity("the identity is empty")
    if len(identity) > max_length:
        raise BadIdentity(f"the identity is longer than {max_length} characters")
    if identity == "*":
        raise BadIdentity("the identity '*' is a routing wildcard")
    if _ALLOWED.issuperset(identity):
        return
    bad = next(c for c in identity if c not in _ALLOWED)
    if bad in _NAMEABLE:
        raise BadIdentity(f"the identity contains '{bad}'")
    if bad < " " or bad == "\x7f":
        raise BadIdentity("the identity contains a control character")
    raise BadIdentity("the identity contains a character that is not allowed")


def identity_from_path(
    raw_path: str,
    ws_path: str = "/ocpp",
    vhost: Optional[str] = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> str:
    """
    The charge point identity named by a WebSocket request path.

    @param raw_path: the request target as received, not percent-decoded,
        possibly with a query string (which is ignored). Pass the raw target,
        not a parsed path: a parser that drops a C{#fragment} would turn
        C{/ocpp/AB#C} into the identity C{AB}.
    @param ws_path: the configured path prefix, e.g. C{"/ocpp"}; C{"/"}
        means identities directly under the root.
    @param vhost: when given, C{<ws_path>/<vhost>/<identity>} is accepted as
        well, with the vhost segment percent-decoded before it is compared
        (the default vhost C{/} arrives as C{%2F}).
    @param max_length: the longest identity accepted, in characters.
    @return: the decoded identity.
    @raise BadIdentity: the path names no acceptable identity; answer 400.
    """
    path = raw_path.partition("?")[0]
    prefix = ws_path.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise BadIdentity(f"the path does not start with {prefix}")
    rest = path[len(prefix) :]
    if rest.endswith("/"):
        # One trailing "/" after the identity is a firmware quirk, not
        # another resource; "//" is not.
        rest = rest[:-1]
    segments = rest.split("/")
    if segments[-1] == "" and len(segments) > 1:
        raise BadIdentity("the path ends with '//'")
    if len(segments) == 2 and vhost is not None:
        if _percent_decode(segments[0]) != vhost:
            raise BadIdentity("the path names another virtual host")
    elif len(segments) != 1:
        raise BadIdentity("the identity must be the only segment after the path")
    identity = _percent_decode(segments[-1])
    _check(identity, max_length)
    return identity
