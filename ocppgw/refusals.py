"""
Connections turned away before the WebSocket handshake completes, counted
and logged.

These refusals happen below HTTP or before a request is complete, so no
status code tells them apart, and most of them are what a misconfigured
load balancer or a scanner looks like: a balancer without C{send-proxy}
in front of a C{proxy_protocol} listener has every connection refused, and
that must be visible at once, not fail silently. Each refusal is

- counted in C{ocppgw_connections_refused_total} by listener and reason
  (TLS handshake failures also in C{ocppgw_tls_handshake_failures_total}
  by the OpenSSL reason), and
- logged at info with the peer address, the listener and the reason
  (C{event = refused}, C{reason}), at most L{ocppgw.lograte.BURST} lines
  per listener and reason a minute plus one summary line for the rest, so
  whoever opens connections cannot decide how much of the log they fill.

The reasons (the C{reason} label and log field) are L{REASONS}.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger, LogLevel

from ocppgw.lograte import BURST, INTERVAL, RateLimitedLog

_log = Logger()


class Refused(Exception):
    """
    The hub will not take this charger; answered before the upgrade.

    @ivar status: the HTTP status code.
    @ivar reason: a fixed reason phrase (never charger-supplied text).
    @ivar headers: extra response headers, as (name, value) pairs (the
        C{WWW-Authenticate} challenge of a 401).
    """

    def __init__(self, status: int, reason: str, headers=()) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)

#: The TCP peer is not in C{[listener] trusted_proxies}: refused before a
#: byte of its PROXY header is read.
PROXY_UNTRUSTED = "proxy_untrusted"
#: The connection does not start with a PROXY protocol v1 or v2 header.
PROXY_MISSING = "proxy_header_missing"
#: It starts like one, but the header is malformed.
PROXY_INVALID = "proxy_header_invalid"
#: The TLS handshake failed (no shared cipher, bad client certificate, ...).
TLS_HANDSHAKE = "tls_handshake"
#: The opening handshake (PROXY header, TLS, HTTP request, and the
#: gateway's own work before the 101) took longer than
#: C{[websocket] handshake_timeout}.
HANDSHAKE_TIMEOUT = "handshake_timeout"
#: The handshake request was over its size limit (answered 431).
REQUEST_TOO_LARGE = "request_too_large"
#: The handshake request had too many header lines (answered 431).
TOO_MANY_HEADERS = "too_many_headers"

#: reason -> what the log line says about it
REASONS = {
    PROXY_UNTRUSTED: "not a trusted proxy (listener.trusted_proxies), PROXY header not read",
    PROXY_MISSING: "no PROXY protocol header (does the balancer send one?)",
    PROXY_INVALID: "invalid PROXY protocol header",
    TLS_HANDSHAKE: "TLS handshake failed",
    HANDSHAKE_TIMEOUT: "opening handshake not completed in time",
    REQUEST_TOO_LARGE: "handshake request too large",
    TOO_MANY_HEADERS: "too many request headers",
}


def peer_string(address, fallback: str = "unknown") -> str:
    """autobahn's peer notation (C{tcp4:1.2.3.4:5678}) for an address."""
    if isinstance(address, IPv6Address):
        return f"tcp6:{address.host}:{address.port}"
    if isinstance(address, IPv4Address):
        return f"tcp4:{address.host}:{address.port}"
    return fallback


class Refusals:
    """
    Counts and logs the refusals of every listener of one gateway.

    @param metrics: an L{ocppgw.metrics.Metrics}, or C{None}.
    """

    def __init__(self, reactor, metrics=None, *, burst: int = BURST,
                 interval: float = INTERVAL) -> None:
        self._metrics = metrics
        self._lines = RateLimitedLog(_log, reactor, burst=burst, interval=interval)

    def refused(self, listener: str, reason: str, peer: str,
                detail: Optional[str] = None, **fields) -> None:
        """
        One connection on C{listener} was refused for C{reason} (one of
        L{REASONS}); C{detail} says more (no client-supplied text).
        """
        if self._metrics is not None:
            self._metrics.connection_refused(listener, reason)
        why = REASONS[reason] + (f": {detail}" if detail else "")
        self._lines.emit(
            (listener, reason), LogLevel.info, "Refused {peer} on {listener}: {why}",
            peer=peer, listener=listener, reason=reason, why=why, event="refused", **fields,
        )

    def tls_failed(self, listener: str, peer: str, tls_reason: str) -> None:
        """A TLS handshake failed; C{tls_reason} is OpenSSL's reason."""
        if self._metrics is not None:
            self._metrics.tls_handshake_failure(listener, tls_reason)
        self.refused(listener, TLS_HANDSHAKE, peer, tls_reason, tls_reason=tls_reason)

    def stop(self) -> None:
        """Log what was left out so far (the gateway stops)."""
        self._lines.flush()
