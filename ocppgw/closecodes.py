"""
The WebSocket close codes ocppgw sends or names: the one table of them.

A leaf module (it imports nothing of ocppgw), so that the edge, the
gateway and the per-charger session all name a code the same way. The
members are C{int}s: they go into a close frame, a metric label or a log
line exactly as the number would.
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    """
    Close codes of RFC 6455 §7.4.1 and the IANA WebSocket registry.

    autobahn's C{sendClose} accepts only 1000 and 3000-4999, so every
    other code here goes out through the edge's own close.
    """

    #: RFC 6455: normal closure. A connection replaced by a newer one of
    #: the same charger, or closed by an operator.
    NORMAL = 1000
    #: RFC 6455: "going away". The gateway shuts down.
    GOING_AWAY = 1001
    #: RFC 6455: protocol error. Too many malformed OCPP-J frames.
    PROTOCOL_ERROR = 1002
    #: RFC 6455: unsupported data. A binary message (OCPP-J is text).
    UNSUPPORTED_DATA = 1003
    #: RFC 6455: policy violation. A charger that keeps sending over its
    #: rate limit.
    POLICY_VIOLATION = 1008
    #: RFC 6455: message too big (sent by autobahn for the size limit).
    MESSAGE_TOO_BIG = 1009
    #: RFC 6455: internal error. The charger's broker side broke.
    INTERNAL_ERROR = 1011
    #: IANA registry: "Service Restart". A drain, or a broker outage:
    #: come back (elsewhere) later.
    SERVICE_RESTART = 1012


__all__ = ["CloseCode"]
