"""
twistd ocppgw tunes the garbage collector of its process and gives freed
heap memory back.
"""

import gc

from twisted.internet import task
from twisted.trial import unittest

from ocppgw import tap, tuning


class TuneGcTests(unittest.TestCase):
    def setUp(self):
        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        self.addCleanup(gc.unfreeze)

    def test_tune_gc(self):
        tuning.tune_gc()
        self.assertEqual(
            gc.get_threshold(),
            (tuning.GEN0_THRESHOLD, tuning.GEN1_THRESHOLD, tuning.GEN2_THRESHOLD),
        )
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_twistd_service_tunes(self):
        options = tap.Options()
        options.parseOptions([])
        service = tap.makeService(options)
        self.assertEqual(gc.get_threshold()[0], tuning.GEN0_THRESHOLD)
        self.assertEqual(service.name, "ocppgw")
        self.assertIsInstance(service.getServiceNamed("heap-trimmer"), tuning.HeapTrimmer)


class HeapTrimmerTests(unittest.TestCase):
    def test_trims_every_interval_while_running(self):
        clock = task.Clock()
        calls = []
        trimmer = tuning.HeapTrimmer(clock, trim=lambda: calls.append(clock.seconds()),
                                     interval=30)
        trimmer.startService()
        clock.advance(29)
        self.assertEqual(calls, [])
        clock.advance(1)
        clock.advance(30)
        self.assertEqual(calls, [30, 60])
        trimmer.stopService()
        clock.advance(60)
        self.assertEqual(calls, [30, 60])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_glibc_trim_runs(self):
        trim = tuning.glibc_malloc_trim()
        if trim is None:
            raise unittest.SkipTest("no glibc malloc_trim on this system")
        self.assertIn(trim(), (0, 1))
