"""
The live status page of the admin listener: what an on-call engineer
looks at first.

C{GET /} on the admin listener serves one static HTML page (plain HTML, a
little CSS and JavaScript, no build step, nothing fetched from elsewhere)
that polls two JSON endpoints of the same listener: C{/chargers} (the
connected chargers) and C{/status}, built here by L{snapshot}: the broker
link's state, counts of connected chargers by version and listener, and
the last refused handshakes and ended connections with their reasons.

Those last two come from L{RecentEvents}: two ring buffers of a fixed
length (L{RECENT}), so a refusal storm or a fleet reconnecting costs a
bounded, small amount of memory and the page shows the newest. What a
charger sent (its identity, its close reason) is kept cut and escaped
like in the log; the page shows every value as text, never as HTML.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections import deque
from importlib import resources
from typing import Iterable, Optional

from ocppgw.version import VERSION
from ocppgw.framing import truncate_for_log
from ocppgw.logs import utc_iso

#: Refusals and disconnects kept for the page (each list); enough to see
#: a pattern, small enough to read at a glance.
RECENT = 50

#: Longest reason text kept (a charger chooses its close reason).
_REASON_LIMIT = 120


def _text(value: Optional[str]) -> Optional[str]:
    return None if value is None else truncate_for_log(value, _REASON_LIMIT)


class RecentEvents:
    """
    The last L{RECENT} refused handshakes and ended connections, newest
    last; everything runs in the reactor thread, so no lock.

    @param clock: for the time of each event (C{seconds()}).
    """

    def __init__(self, clock, size: int = RECENT) -> None:
        self._clock = clock
        self.refusals: deque = deque(maxlen=size)
        self.disconnects: deque = deque(maxlen=size)

    def refused(self, listener: str, status: int, *, peer: Optional[str] = None,
                identity: Optional[str] = None, reason: str = "") -> None:
        """A handshake was answered with HTTP C{status} instead of 101."""
        self.refusals.append({
            "time": utc_iso(self._clock.seconds()),
            "listener": listener,
            "status": status,
            "reason": _text(reason),
            "peer": peer,
            "identity": _text(identity),
        })

    def disconnected(self, identity: str, version: str, listener: str, code, *,
                     peer: Optional[str] = None, reason: str = "",
                     duration: Optional[float] = None) -> None:
        """
        A charger's connection ended; C{code} is the WebSocket close code,
        C{"none"} for a close frame without one, or C{"replaced"}.
        """
        self.disconnects.append({
            "time": utc_iso(self._clock.seconds()),
            "identity": _text(identity),
            "version": version,
            "listener": listener,
            "peer": peer,
            "code": code,
            "reason": _text(reason),
            "duration": None if duration is None else round(duration, 1),
        })


def snapshot(*, node: str, broker_state: str, readiness: dict, chargers: Iterable,
             recent: RecentEvents, now: float) -> dict:
    """
    The body of C{GET /status}.

    @param broker_state: the broker link's state in a word (see
        L{ocppgw.service.GatewayService.broker_state}); shown as it is.
    @param chargers: the connected chargers (with C{version} and
        C{listener}).
    """
    by_version: dict[str, int] = {}
    by_listener: dict[str, int] = {}
    total = 0
    for link in chargers:
        total += 1
        version = link.version.subprotocol
        by_version[version] = by_version.get(version, 0) + 1
        by_listener[link.listener] = by_listener.get(link.listener, 0) + 1
    return {
        "node": node,
        "version": VERSION,
        "time": utc_iso(now),
        "broker": broker_state,
        "ready": all(readiness.values()),
        "checks": readiness,
        "chargers": {
            "total": total,
            "by_version": dict(sorted(by_version.items())),
            "by_listener": dict(sorted(by_listener.items())),
        },
        # newest first, as the page lists them
        "refusals": list(reversed(recent.refusals)),
        "disconnects": list(reversed(recent.disconnects)),
    }


class Page:
    """
    The page's HTML (C{ocppgw/status.html}, shipped with the package) and
    the Content-Security-Policy that lets exactly its own inline script
    and style run: the hashes of those two, and requests to its own
    origin only.
    """

    def __init__(self, html: bytes) -> None:
        self.html = html
        text = html.decode("utf-8")
        hashes = {
            kind: " ".join(
                "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest())
                .decode("ascii") + "'"
                for body in re.findall(rf"<{kind}>(.*?)</{kind}>", text, re.S)
            )
            for kind in ("script", "style")
        }
        self.content_security_policy = (
            "default-src 'none'; "
            f"script-src {hashes['script']}; style-src {hashes['style']}; "
            "connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ).encode("ascii")


@functools.cache
def page() -> Page:
    """The status page, read from the package once."""
    return Page(resources.files("ocppgw").joinpath("status.html").read_bytes())
