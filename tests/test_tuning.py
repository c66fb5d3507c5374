"""
twistd ocppgw tunes the garbage collector of its process.
"""

import gc

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
