"""
The admin listener: an HTTP API for operators and orchestrators, served by
C{twisted.web} on its own port (C{[admin]}, default C{127.0.0.1:9100}).

==========================  ==============================================
C{GET /}                    the live status page (L{ocppgw.status}): HTML
                            that polls C{/status} and C{/chargers}
C{GET /status}              JSON: broker link state, readiness, chargers
                            by version and listener, the last refusals
                            and disconnects with their reasons
C{GET /metrics}             Prometheus text format (L{ocppgw.metrics})
C{GET /healthz}             200 while the process runs (liveness)
C{GET /readyz}              200 when the broker is connected, the charger
                            listener is bound and the gateway is not
                            draining; else 503. The body names each check.
C{GET /chargers}            JSON list of connected chargers
C{GET /chargers/<id>}       one charger (404 if not connected)
C{DELETE /chargers/<id>}    close that charger's connection with 1000
==========================  ==============================================

The identity in the path is percent-encoded like in the charger's own URL
(C{/chargers/RDAM%20123}).

With C{[admin] username} and C{password} set, C{/}, C{/status},
C{/metrics} and C{/chargers} need HTTP Basic auth; C{/healthz} and C{/readyz} never do, so
that kubelet and load balancers can probe them, and they reveal nothing
but up/ready. There is no access log: Prometheus scraping every few
seconds would drown the gateway's own log.
"""

from __future__ import annotations

import base64
import hmac
from typing import Callable, Optional
from urllib.parse import unquote

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import resource, server

from ocppgw import status
from ocppgw.closecodes import CloseCode
from ocppgw.logs import utc_iso

_JSON = b"application/json"


def _json(request, status: int, body) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", _JSON)
    request.setHeader(b"cache-control", b"no-store")
    return orjson.dumps(body) + b"\n"


def describe_charger(link, now: float) -> dict:
    """A connected charger as the admin API shows it."""
    outstanding = link.session.outstanding_call
    return {
        "identity": link.identity,
        "version": link.version.subprotocol,
        "listener": link.listener,
        "remote": link.peer,
        "connected_since": utc_iso(link.connected_at),
        "connected_seconds": round(now - link.connected_at, 3),
        "frames_in": link.stats.frames_in,
        "frames_out": link.stats.frames_out,
        "outstanding_call": (
            None
            if outstanding is None
            else {"message_id": outstanding[0], "action": outstanding[1]}
        ),
        "held_calls": link.session.held_calls,
    }


class _Endpoint(resource.Resource):
    """A leaf that may require Basic auth."""

    isLeaf = True

    def __init__(self, admin: "AdminAPI", guarded: bool) -> None:
        super().__init__()
        self._admin = admin
        self._guarded = guarded

    def render(self, request):
        # No version banner (twisted.web sets one before rendering).
        request.setHeader(b"server", b"ocppgw")
        if self._guarded and not self._admin.authorized(request):
            request.setHeader(b"www-authenticate", b'Basic realm="ocppgw admin"')
            return _json(request, 401, {"error": "unauthorized"})
        return super().render(request)


class _StatusPage(_Endpoint):
    """C{/}: the status page, with headers that let nothing else run."""

    def render_GET(self, request):
        page = status.page()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", page.content_security_policy)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return page.html


class _Status(_Endpoint):
    def render_GET(self, request):
        return _json(request, 200, self._admin.status())


class _Metrics(_Endpoint):
    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._admin.registry)


class _Health(_Endpoint):
    def render_GET(self, request):
        return _json(request, 200, {"status": "ok"})


class _Ready(_Endpoint):
    def render_GET(self, request):
        checks = self._admin.readiness()
        ready = all(checks.values())
        return _json(request, 200 if ready else 503, {"ready": ready, "checks": checks})


class _Chargers(_Endpoint):
    """C{/chargers} and C{/chargers/<identity>} (the rest of the path)."""

    def _identity(self, request) -> Optional[str]:
        parts = [part for part in request.postpath if part]
        if not parts:
            return None
        if len(parts) > 1:
            return ""  # no identity holds a "/"
        try:
            return unquote(parts[0].decode("ascii"), errors="strict")
        except (UnicodeDecodeError, ValueError):
            return ""

    def render_GET(self, request):
        admin = self._admin
        identity = self._identity(request)
        now = admin.clock.seconds()
        if identity is None:
            chargers = sorted(admin.gateway.chargers.values(), key=lambda link: link.identity)
            return _json(request, 200, [describe_charger(link, now) for link in chargers])
        link = admin.gateway.chargers.get(identity)
        if link is None:
            return _json(request, 404, {"error": "not connected"})
        return _json(request, 200, describe_charger(link, now))

    def render_DELETE(self, request):
        identity = self._identity(request)
        if identity is None:
            return _json(request, 405, {"error": "name one charger: DELETE /chargers/<identity>"})
        if not self._admin.gateway.disconnect(identity):
            return _json(request, 404, {"error": "not connected"})
        return _json(request, 202, {"identity": identity, "closing": True,
                                   "code": int(CloseCode.NORMAL)})


class _Site(server.Site):
    """A site without an access log (see the module docstring)."""

    noisy = False
    displayTracebacks = False

    def log(self, request) -> None:
        pass


class AdminAPI:
    """
    What the admin endpoints serve, and the site that serves them.

    @param registry: the gateway's Prometheus registry.
    @param gateway: the L{ocppgw.gateway.Gateway} (its C{chargers} and
        C{disconnect}).
    @param readiness: returns C{{check: bool}}.
    @param clock: for the charger's connected time.
    @param status: returns the body of C{/status} (see L{ocppgw.status});
        without it, neither C{/status} nor the page at C{/} is served.
    """

    def __init__(
        self,
        registry,
        gateway,
        readiness: Callable[[], dict],
        clock,
        *,
        username: str = "",
        password: str = "",
        status: Optional[Callable[[], dict]] = None,
    ) -> None:
        self.registry = registry
        self.status = status
        self.gateway = gateway
        self.readiness = readiness
        self.clock = clock
        self._credentials = (
            b"Basic " + base64.b64encode(f"{username}:{password}".encode("utf-8"))
            if username
            else None
        )

    def authorized(self, request) -> bool:
        if self._credentials is None:
            return True
        given = request.getHeader(b"authorization") or b""
        return hmac.compare_digest(given.encode("latin-1") if isinstance(given, str) else given,
                                   self._credentials)

    def site(self) -> server.Site:
        root = resource.Resource()
        root.putChild(b"metrics", _Metrics(self, guarded=True))
        root.putChild(b"healthz", _Health(self, guarded=False))
        root.putChild(b"readyz", _Ready(self, guarded=False))
        root.putChild(b"chargers", _Chargers(self, guarded=True))
        if self.status is not None:
            root.putChild(b"", _StatusPage(self, guarded=True))
            root.putChild(b"status", _Status(self, guarded=True))
        return _Site(root)
