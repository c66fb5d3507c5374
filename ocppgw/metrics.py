"""
Prometheus metrics of one gateway.

Every L{Metrics} has its own C{CollectorRegistry}: two gateways in one
process (tests, embedding) never share or collide on a series, and the
admin listener serves exactly its own gateway's registry.

Two kinds of numbers:

- I{events} (frames, handshakes, bad frames, call round trips, publish
  confirm latency) are counted where they happen. Frames and publish
  confirms are on the hot path: they are plain integers in a dict keyed by
  a small tuple (and a bucket list), turned into Prometheus families only
  when scraped, with no lock (everything runs in the reactor thread).
  Measured with C{timeit} on the project's machine: a frame count costs
  0.29 us (key tuple, lookup, increment) against 0.41 us for a pre-bound
  C{prometheus_client} counter child alone, and a confirm observation
  0.26 us against 1.1 us for C{Histogram.observe}. The action label
  comes from the charger: the number of distinct actions is capped
  (L{MAX_ACTIONS}) and later ones are counted as C{other}, so a charger
  making up action names cannot grow the registry without bound.
- I{state} (connected chargers by version and listener, outstanding and
  held CSMS calls, broker connected and blocked, readiness) is read from the
  gateway when Prometheus scrapes, by L{GatewayCollector}: nothing to keep
  in step on connect and disconnect.

Process RSS and open files come from C{prometheus_client}'s
C{ProcessCollector} (C{process_resident_memory_bytes},
C{process_open_fds}, C{process_max_fds}). The memory the process may use
is ours, C{ocppgw_memory_limit_bytes} (L{memory_limit}), so that an alert
can compare RSS with it wherever the gateway runs.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)

from ocppgw.version import VERSION

if TYPE_CHECKING:
    from ocppgw.status import RecentEvents

#: How many distinct OCPP actions get their own label value; OCPP 2.1 has
#: about 90 actions in each direction, so real traffic never reaches it.
MAX_ACTIONS = 256
#: Label value for actions beyond L{MAX_ACTIONS}.
OTHER_ACTION = "other"
#: Label value for frames whose action is not known (a malformed frame's
#: error answer).
NO_ACTION = "-"
#: How many distinct OpenSSL reasons get their own label value in
#: C{ocppgw_tls_handshake_failures_total}; later ones are counted as
#: L{OTHER_TLS_REASON}. OpenSSL's reasons come from a fixed table, so this
#: is only a guard.
MAX_TLS_REASONS = 64
OTHER_TLS_REASON = "other"

#: Message type number -> the C{kind} label.
KINDS = {
    2: "call",
    3: "callresult",
    4: "callerror",
    5: "callresulterror",
    6: "send",
}

IN = "in"
OUT = "out"

# Publish confirms take well under a millisecond on a healthy broker and
# seconds when it is under a memory alarm: buckets from 0.25 ms to 10 s.
_CONFIRM_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)
# A charger answers a CSMS CALL in tens of milliseconds to the call timeout
# (30 s by default).
_CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """
    The metrics of one gateway, in a private registry.

    @ivar registry: the C{CollectorRegistry} the admin listener serves.
    """

    def __init__(self, *, process: bool = True, recent: Optional["RecentEvents"] = None) -> None:
        """
        @param process: also export the process's RSS, open files and CPU
            (C{ProcessCollector}); off in tests that build many gateways.
        @param recent: where refused handshakes and ended connections are
            also kept, with their details, for the status page.
        """
        self.recent = recent
        registry = self.registry = CollectorRegistry(auto_describe=True)
        self._handshakes = Counter(
            "ocppgw_handshakes",
            "WebSocket opening handshakes answered, by listener, result and HTTP status.",
            ["listener", "result", "status"],
            registry=registry,
        )
        self._refused = Counter(
            "ocppgw_connections_refused",
            "Connections refused before the WebSocket handshake completed, by listener "
            "and reason (PROXY header, TLS handshake, handshake timeout, request limits).",
            ["listener", "reason"],
            registry=registry,
        )
        self._tls_failures = Counter(
            "ocppgw_tls_handshake_failures",
            "TLS handshakes that failed, by listener and OpenSSL's reason.",
            ["listener", "reason"],
            registry=registry,
        )
        self._tls_reasons: set[str] = set()
        self._declare_charger_metrics(registry)
        if process:
            ProcessCollector(registry=registry)
            registry.register(_MemoryLimitCollector())
        #: (direction, version prefix, message type, action) -> frames
        self._frame_counts: dict[tuple, int] = {}
        self._actions: set[str] = set()
        self._confirm = _Buckets(_CONFIRM_BUCKETS)
        self.observe_confirm: Callable[[float], None] = self._confirm.observe
        registry.register(_HotPathCollector(self))

    def _declare_charger_metrics(self, registry: CollectorRegistry) -> None:
        """What chargers do once connected: bad frames, disconnects, CSMS CALLs."""
        self._bad_frames = Counter(
            "ocppgw_bad_frames",
            "Malformed frames from chargers, by the OCPP error code they were answered with.",
            ["version", "code"],
            registry=registry,
        )
        self._disconnects = Counter(
            "ocppgw_disconnects",
            "Charger connections that ended, by WebSocket close code (1006: TCP ended "
            "without a close frame; none: a close frame without a status code; "
            "replaced: a newer connection won).",
            ["version", "code"],
            registry=registry,
        )
        self._call_seconds = Histogram(
            "ocppgw_csms_call_seconds",
            "Round-trip time of CSMS CALLs: sent to the charger until it answered.",
            ["version"],
            registry=registry,
            buckets=_CALL_BUCKETS,
        )
        self._call_timeouts = Counter(
            "ocppgw_csms_call_timeouts",
            "CSMS CALLs the charger did not answer within [ocpp] call_timeout.",
            ["version", "action"],
            registry=registry,
        )

    # -- label helpers ---------------------------------------------------------

    def _action(self, action: Optional[str]) -> str:
        if not action:
            return NO_ACTION
        actions = self._actions
        if action in actions:
            return action
        if len(actions) >= MAX_ACTIONS:
            return OTHER_ACTION
        actions.add(action)
        return action

    def frame(self, direction: str, prefix: str, message_type: int, action: Optional[str]) -> None:
        """Count one frame (the hot path: a tuple and a dict increment)."""
        key = (direction, prefix, message_type, action)
        counts = self._frame_counts
        if key in counts:
            counts[key] += 1
            return
        label = self._action(action)
        if label != action:
            key = (direction, prefix, message_type, label)
        counts[key] = counts.get(key, 0) + 1

    # -- events ----------------------------------------------------------------

    def handshake(self, listener: str, status: int, *, peer: Optional[str] = None,
                  identity: Optional[str] = None, reason: str = "") -> None:
        """
        An opening handshake was answered with C{status} (101 = accepted);
        a refusal's details go to the status page.
        """
        result = "accepted" if status == 101 else "refused"
        self._handshakes.labels(listener, result, str(status)).inc()
        if status != 101 and self.recent is not None:
            self.recent.refused(listener, status, peer=peer, identity=identity, reason=reason)

    def connection_refused(self, listener: str, reason: str) -> None:
        """A connection was refused before the handshake (L{ocppgw.refusals})."""
        self._refused.labels(listener, reason).inc()

    def tls_handshake_failure(self, listener: str, reason: str) -> None:
        """A TLS handshake failed for OpenSSL's C{reason}."""
        reasons = self._tls_reasons
        if reason not in reasons:
            if len(reasons) >= MAX_TLS_REASONS:
                reason = OTHER_TLS_REASON
            else:
                reasons.add(reason)
        self._tls_failures.labels(listener, reason).inc()

    def bad_frame(self, prefix: str, code: str) -> None:
        self._bad_frames.labels(prefix, code).inc()

    def disconnect(self, prefix: str, code, link=None, reason: str = "",
                   duration: Optional[float] = None) -> None:
        """
        A connection ended: C{code} is the close code, C{None} for a close
        frame without one, or C{"replaced"}; C{link} (the charger) and the
        rest are for the status page.
        """
        label = "none" if code is None else str(code)
        self._disconnects.labels(prefix, label).inc()
        if link is not None and self.recent is not None:
            self.recent.disconnected(
                link.identity, link.version.subprotocol, link.listener,
                code if isinstance(code, int) else label,
                peer=link.peer, reason=reason, duration=duration,
            )

    def csms_call(self, prefix: str, seconds: float, timed_out: bool, action: str) -> None:
        if timed_out:
            self._call_timeouts.labels(prefix, self._action(action)).inc()
        else:
            self._call_seconds.labels(prefix).observe(seconds)

    def charger(self, prefix: str) -> "ChargerStats":
        """The per-charger counters handed to a session."""
        return ChargerStats(self, prefix)

    def watch(self, state: "GatewayState") -> None:
        """Read the gateway's state at every scrape."""
        self.registry.register(GatewayCollector(state))


class _Buckets:
    """
    A histogram as a list of bucket counts: C{observe} is a bisect and two
    additions (no lock: everything runs in the reactor thread).
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list:
        buckets, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return buckets


#: cgroup files with the memory limit: v2 (unified), then v1.
CGROUP_MEMORY_LIMITS = (
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)
# cgroup v1 writes "no limit" as the largest page-aligned 63-bit number;
# anything this large is no limit.
_NO_LIMIT = 2 ** 62


def memory_limit(files: Iterable[str] = CGROUP_MEMORY_LIMITS) -> float:
    """
    Bytes of memory the process may use: the smallest of its cgroup's
    limit (a container's memory limit) and its address-space rlimit, or
    infinity when neither is set. Read at each scrape: a container's limit
    can change while it runs.
    """
    import resource

    limits = []
    for path in files:
        try:
            with open(path, encoding="ascii") as file:
                text = file.read().strip()
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < _NO_LIMIT:
            limits.append(int(text))
        break  # the first file that exists is this system's cgroup version
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return float(min(limits)) if limits else float("inf")


class _MemoryLimitCollector:
    def describe(self):
        return []

    def collect(self):
        yield GaugeMetricFamily(
            "ocppgw_memory_limit_bytes",
            "Memory the process may use: its cgroup's limit or its address-space rlimit "
            "(+Inf: none).",
            value=memory_limit(),
        )


class _HotPathCollector:
    """The frame counts and confirm latencies, as families at scrape time."""

    def __init__(self, metrics: "Metrics") -> None:
        self._metrics = metrics

    def describe(self):
        return []

    def collect(self):
        metrics = self._metrics
        frames = CounterMetricFamily(
            "ocppgw_frames",
            "Valid OCPP-J frames from (in) and to (out) chargers.",
            labels=["direction", "version", "action", "kind"],
        )
        for (direction, prefix, message_type, action), count in sorted(
            metrics._frame_counts.items(), key=lambda item: tuple(map(str, item[0]))
        ):
            frames.add_metric(
                [direction, prefix, action or NO_ACTION, KINDS.get(message_type, str(message_type))],
                count,
            )
        yield frames
        confirm = metrics._confirm
        yield HistogramMetricFamily(
            "ocppgw_publish_confirm_seconds",
            "Time from publishing to the broker's confirm (or nack).",
            buckets=confirm.cumulative(),
            sum_value=confirm.sum,
        )


class ChargerStats:
    """
    One charger's frame counts (shown by C{/chargers}) feeding L{Metrics}.

    The session calls it; it knows the charger's version, so the session
    passes only what changes per frame.
    """

    __slots__ = ("_metrics", "_prefix", "frames_in", "frames_out")

    def __init__(self, metrics: Optional[Metrics], prefix: str) -> None:
        self._metrics = metrics
        self._prefix = prefix
        self.frames_in = 0
        self.frames_out = 0

    def frame_in(self, message_type: int, action: Optional[str]) -> None:
        self.frames_in += 1
        if self._metrics is not None:
            self._metrics.frame(IN, self._prefix, message_type, action)

    def frame_out(self, message_type: int, action: Optional[str]) -> None:
        self.frames_out += 1
        if self._metrics is not None:
            self._metrics.frame(OUT, self._prefix, message_type, action)

    def bad_frame(self, code: str) -> None:
        if self._metrics is not None:
            self._metrics.bad_frame(self._prefix, code)

    def csms_call(self, seconds: float, timed_out: bool, action: str) -> None:
        if self._metrics is not None:
            self._metrics.csms_call(self._prefix, seconds, timed_out, action)


class GatewayState:
    """
    What L{GatewayCollector} reads at a scrape; implemented by the service.
    """

    def chargers(self) -> Iterable:
        """The attached chargers (objects with C{version}, C{listener}, C{session})."""
        raise NotImplementedError

    def broker_connected(self) -> bool:
        raise NotImplementedError

    def broker_blocked(self) -> bool:
        raise NotImplementedError

    def readiness(self) -> dict:
        """C{{check: bool}}; ready when every check is true."""
        raise NotImplementedError

    def broker_link(self) -> Optional[dict]:
        """
        The broker link's C{state} and counters (C{losses},
        C{topology_restores}, C{awaiting_restore}, C{presence_owed},
        C{presence_dropped}), or None.
        """
        return None

    def validation_stats(self):
        """The L{ocppgw.validation.ValidationStats} of payload checks, or None."""
        return None

    def accept_gate(self):
        """The L{ocppgw.acceptgate.AcceptGate} of the listeners, or None."""
        return None


#: Every state of the broker link, for a gauge that is 1 for the current one.
LINK_STATES = ("idle", "connecting", "open", "lost", "reconnecting", "closing", "closed")


def _link_families(link: dict):
    state = GaugeMetricFamily(
        "ocppgw_amqp_link_state",
        "1 for the broker link's current state (connecting, open, lost, reconnecting, ...).",
        labels=["state"],
    )
    for name in LINK_STATES:
        state.add_metric([name], int(link["state"] == name))
    yield state
    yield CounterMetricFamily(
        "ocppgw_amqp_link_losses",
        "Times the broker connection was lost (closed by the broker, TCP gone, or silent "
        "for longer than the heartbeat allows).",
        value=link["losses"],
    )
    yield CounterMetricFamily(
        "ocppgw_amqp_topology_restores",
        "Times the OCPP exchange was found deleted under the gateway and declared again.",
        value=link["topology_restores"],
    )
    yield GaugeMetricFamily(
        "ocppgw_chargers_awaiting_restore",
        "Connected chargers whose command queue consumer is not back yet after a broker loss.",
        value=link["awaiting_restore"],
    )
    yield GaugeMetricFamily(
        "ocppgw_presence_owed",
        "Presence messages (offline status, connected/disconnected events) not yet "
        "confirmed by the broker.",
        value=link["presence_owed"],
    )
    yield CounterMetricFamily(
        "ocppgw_presence_dropped",
        "Presence messages dropped because more than [amqp] owed_presence_max waited.",
        value=link["presence_dropped"],
    )


class GatewayCollector:
    """
    Gauges computed from the gateway's state when Prometheus scrapes.
    """

    def __init__(self, state: GatewayState) -> None:
        self._state = state

    def describe(self):
        # Describing would call collect() (auto_describe) and read the state
        # at registration time, before the gateway runs.
        return []

    def collect(self):
        state = self._state
        yield from _charger_families(state)
        yield from _broker_families(state)
        ready = GaugeMetricFamily(
            "ocppgw_ready",
            "Readiness checks of /readyz (1 = passing).",
            labels=["check"],
        )
        for check, passing in state.readiness().items():
            ready.add_metric([check], int(passing))
        yield ready
        stats = state.validation_stats()
        if stats is not None:
            yield from _validation_families(stats)
        gate = state.accept_gate()
        if gate is not None:
            yield from _gate_families(gate)
        info = InfoMetricFamily("ocppgw_build", "ocppgw version.")
        info.add_metric([], {"version": VERSION})
        yield info


def _charger_families(state):
    """Chargers connected, and the CSMS CALLs they have outstanding and held."""
    connected: dict[tuple[str, str], int] = {}
    outstanding = held = 0
    for link in state.chargers():
        key = (link.version.routing_prefix, link.listener)
        connected[key] = connected.get(key, 0) + 1
        session = link.session
        if session.outstanding_call is not None:
            outstanding += 1
        held += session.held_calls
    family = GaugeMetricFamily(
        "ocppgw_chargers_connected",
        "Chargers connected now, by OCPP version and listener.",
        labels=["version", "listener"],
    )
    for (version, listener), count in sorted(connected.items()):
        family.add_metric([version, listener], count)
    yield family
    yield GaugeMetricFamily(
        "ocppgw_csms_calls_outstanding",
        "CSMS CALLs sent to chargers and not answered yet.",
        value=outstanding,
    )
    yield GaugeMetricFamily(
        "ocppgw_csms_calls_held",
        "CSMS CALLs held by the gateway behind a charger's outstanding one.",
        value=held,
    )


def _broker_families(state):
    """The broker connection: up, blocked, and its link's history."""
    yield GaugeMetricFamily(
        "ocppgw_amqp_connected",
        "1 while the broker connection and its channels are up.",
        value=int(state.broker_connected()),
    )
    yield GaugeMetricFamily(
        "ocppgw_amqp_blocked",
        "1 while RabbitMQ blocks the gateway's publishes (memory or disk alarm).",
        value=int(state.broker_blocked()),
    )
    link = state.broker_link()
    if link is not None:
        yield from _link_families(link)


def _gate_families(gate):
    """Connections in their opening handshake, and those waiting for it."""
    yield GaugeMetricFamily(
        "ocppgw_connections_opening",
        "Connections in their opening handshake now ([listener] max_opening at most).",
        value=gate.opening,
    )
    yield GaugeMetricFamily(
        "ocppgw_connections_waiting",
        "Connections accepted and waiting for their opening handshake to begin.",
        value=gate.waiting,
    )
    yield CounterMetricFamily(
        "ocppgw_connections_waited",
        "Connections that waited for their opening handshake to begin.",
        value=gate.waited,
    )


def _validation_families(stats):
    """Invalid and refused payloads, by version, direction and action."""
    for name, counts, text in (
        ("ocppgw_invalid_payloads", stats.invalid,
         "Payloads that broke their OCPP JSON schema ([validation] warn or enforce)."),
        ("ocppgw_refused_payloads", stats.refused,
         "Invalid payloads refused ([validation] mode = enforce)."),
    ):
        family = CounterMetricFamily(name, text, labels=["version", "direction", "action"])
        for (subprotocol, direction, action), count in sorted(counts.items()):
            family.add_metric([subprotocol, direction, action], count)
        yield family
