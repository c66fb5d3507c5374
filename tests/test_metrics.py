"""
ocppgw.metrics without a gateway: the bounded action label, the hot-path
counters and histogram as Prometheus sees them, private registries.
"""

from __future__ import annotations

from prometheus_client import generate_latest
from twisted.trial import unittest

from ocppgw import metrics
from tests.support import samples, value


class MetricsTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.metrics = metrics.Metrics(process=False)

    def scrape(self) -> dict:
        return samples(generate_latest(self.metrics.registry))

    def test_made_up_actions_are_bounded(self):
        """
        A charger sending ever new action names cannot grow the registry
        (or the gateway's memory): past MAX_ACTIONS they count as "other".
        """
        stats = self.metrics.charger("ocpp16")
        for n in range(metrics.MAX_ACTIONS + 100):
            stats.frame_in(2, f"Made{n}")
            stats.frame_in(2, f"Made{n}")
        scraped = self.scrape()
        series = [key for key in scraped if key[0] == "ocppgw_frames_total"]
        self.assertEqual(len(series), metrics.MAX_ACTIONS + 1)
        self.assertEqual(
            value(scraped, "ocppgw_frames_total", direction="in", version="ocpp16",
                  action="other", kind="call"),
            200,
        )
        self.assertEqual(
            value(scraped, "ocppgw_frames_total", direction="in", version="ocpp16",
                  action="Made0", kind="call"),
            2,
        )
        self.assertEqual(len(self.metrics._frame_counts), metrics.MAX_ACTIONS + 1)
        self.assertEqual(stats.frames_in, 2 * (metrics.MAX_ACTIONS + 100))

    def test_confirm_histogram_buckets(self):
        for seconds in (0.0001, 0.0003, 0.0003, 0.5, 99.0):
            self.metrics.observe_confirm(seconds)
        scraped = self.scrape()
        bucket = "ocppgw_publish_confirm_seconds_bucket"
        self.assertEqual(value(scraped, bucket, le="0.00025"), 1)
        self.assertEqual(value(scraped, bucket, le="0.0005"), 3)
        self.assertEqual(value(scraped, bucket, le="0.5"), 4)
        self.assertEqual(value(scraped, bucket, le="+Inf"), 5)
        self.assertEqual(value(scraped, "ocppgw_publish_confirm_seconds_count"), 5)
        self.assertAlmostEqual(value(scraped, "ocppgw_publish_confirm_seconds_sum"), 99.5007)

    def test_call_timeouts_and_round_trips(self):
        stats = self.metrics.charger("ocpp201")
        stats.csms_call(0.2, False, "Reset")
        stats.csms_call(30.0, True, "Reset")
        scraped = self.scrape()
        self.assertEqual(value(scraped, "ocppgw_csms_call_seconds_count", version="ocpp201"), 1)
        self.assertEqual(
            value(scraped, "ocppgw_csms_call_timeouts_total", version="ocpp201", action="Reset"), 1
        )

    def test_registries_are_separate(self):
        other = metrics.Metrics(process=False)
        self.metrics.handshake("ws", 101)
        self.assertEqual(
            value(self.scrape(), "ocppgw_handshakes_total", listener="ws", result="accepted",
                  status="101"),
            1,
        )
        self.assertEqual(
            value(samples(generate_latest(other.registry)), "ocppgw_handshakes_total",
                  listener="ws", result="accepted", status="101"),
            0,
        )

    def test_refusals_and_tls_failures(self):
        self.metrics.connection_refused("ws", "proxy_header_missing")
        self.metrics.connection_refused("ws", "proxy_header_missing")
        for n in range(metrics.MAX_TLS_REASONS + 3):
            self.metrics.tls_handshake_failure("wss", f"reason {n}")
        scraped = self.scrape()
        self.assertEqual(
            value(scraped, "ocppgw_connections_refused_total", listener="ws",
                  reason="proxy_header_missing"),
            2,
        )
        series = [key for key in scraped if key[0] == "ocppgw_tls_handshake_failures_total"]
        self.assertEqual(len(series), metrics.MAX_TLS_REASONS + 1)
        self.assertEqual(
            value(scraped, "ocppgw_tls_handshake_failures_total", listener="wss",
                  reason="other"),
            3,
        )

class MemoryLimitTests(unittest.SynchronousTestCase):
    """ocppgw_memory_limit_bytes: the cgroup's limit, or the rlimit, or none."""

    def setUp(self):
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        self.rlimit = float("inf") if soft == resource.RLIM_INFINITY else float(soft)

    def limit_file(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text + "\n")
        return path

    def test_cgroup_limit(self):
        path = self.limit_file("1073741824")
        self.assertEqual(metrics.memory_limit([path]), min(1073741824.0, self.rlimit))

    def test_no_limit(self):
        """cgroup v2 writes "max", v1 a huge number; a missing file is skipped."""
        for text in ("max", "9223372036854771712"):
            path = self.limit_file(text)
            self.assertEqual(metrics.memory_limit(["/nonexistent/memory.max", path]), self.rlimit)

    def test_first_existing_file_decides(self):
        v2, v1 = self.limit_file("max"), self.limit_file("1073741824")
        self.assertEqual(metrics.memory_limit([v2, v1]), self.rlimit)
