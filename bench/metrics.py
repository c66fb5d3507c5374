"""
Cost of counting on the hot path: ocppgw.metrics against plain
prometheus_client objects, and a charger frame through the session with
and without its stats.

    python bench/metrics.py [--number 1000000] [--repeat 5]

Prints nanoseconds per call (best of --repeat runs, so that a busy machine
disturbs the figure less). The session's effects do nothing: what is
measured is the gateway's own work for one Heartbeat CALL.
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from ocppgw.framing import VERSIONS  # noqa: E402
from ocppgw.metrics import _CONFIRM_BUCKETS, Metrics  # noqa: E402
from ocppgw.session import ChargerSession  # noqa: E402


class _Effects:
    def send_to_charger(self, frame): pass
    def publish(self, *args, **kwargs): pass
    def publish_reply(self, *args, **kwargs): pass
    def ack(self, delivery): pass
    def reject(self, delivery, reason): pass
    def dead_letter(self, delivery, headers, on_outcome): return False
    def requeue(self, delivery): pass
    def close(self, code, reason): pass


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arguments.add_argument("--number", type=int, default=1_000_000)
    arguments.add_argument("--repeat", type=int, default=5)
    options = arguments.parse_args()
    metrics = Metrics(process=False)
    registry = CollectorRegistry()
    child = Counter("c", "c", ["d", "v", "a", "k"], registry=registry).labels(
        "in", "ocpp16", "Heartbeat", "call"
    )
    histogram = Histogram("h", "h", registry=registry, buckets=_CONFIRM_BUCKETS)
    frame = b'[2,"m1","Heartbeat",{}]'
    version = VERSIONS["ocpp1.6"]
    plain = ChargerSession("CP1", version, _Effects(), Clock())
    counted = ChargerSession("CP1", version, _Effects(), Clock(), stats=metrics.charger("ocpp16"))
    cases = (
        ("Metrics.frame (ocppgw)", lambda: metrics.frame("in", "ocpp16", 2, "Heartbeat")),
        ("pre-bound Counter child .inc()", child.inc),
        ("confirm latency (ocppgw)", lambda: metrics.observe_confirm(0.0004)),
        ("Histogram.observe()", lambda: histogram.observe(0.0004)),
        ("session frame, no stats", lambda: plain.charger_frame(frame)),
        ("session frame, with stats", lambda: counted.charger_frame(frame)),
    )
    for name, call in cases:
        number = options.number if "session" not in name else options.number // 10
        best = min(timeit.repeat(call, number=number, repeat=options.repeat))
        print(f"{name:34} {best / number * 1e9:8.0f} ns")


if __name__ == "__main__":
    main()
