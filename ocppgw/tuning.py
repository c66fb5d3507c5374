"""
Process-wide tuning for a gateway process: the garbage collector.

A gateway holds tens of thousands of long-lived objects per thousand
chargers, and a connect storm allocates fast. With CPython's default
thresholds (700, 10, 10) the collector runs every few hundred allocations
and keeps re-scanning the long-lived chargers: about a tenth of the CPU of
a connect storm. Raising the thresholds and freezing what exists after
start-up (the modules, the configuration) leaves collection to the rare
reference cycles, which is all it is needed for here.

C{twistd ocppgw} calls L{tune_gc}; an application that embeds the
gateway decides for its whole process and may call it too.
"""

from __future__ import annotations

import gc

#: Allocations between young-generation collections (CPython: 700).
GEN0_THRESHOLD = 50_000
#: Young collections per middle one, middle per full one (CPython: 10, 10).
GEN1_THRESHOLD = 20
GEN2_THRESHOLD = 20


def tune_gc() -> None:
    """
    Move everything alive now out of the collector's sight and raise its
    thresholds.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
