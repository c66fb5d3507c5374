"""
Per-frame cost of payload validation: a typical MeterValues CALL from a
charger through the session, with [validation] mode off, warn and enforce.

    python bench/validation.py [--frames 20000] [--repeat 7] [--version ocpp1.6]

It prints microseconds per frame for each mode (best of --repeat runs,
so that a busy machine disturbs the figure less), the cost of the check
alone, and the difference enforce - off. The effects do nothing, so what
is measured is the gateway's own work for one frame: JSON parsing, the
envelope rules, the schema check and the routing decision; no socket, no
broker. The frame is valid, as nearly all frames of a real fleet are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ocppgw.framing import VERSIONS  # noqa: E402
from ocppgw.session import ChargerSession  # noqa: E402
from ocppgw.validation import ENFORCE, OFF, WARN, Validation  # noqa: E402

NOW = "2026-01-01T12:00:00.000Z"

#: A periodic sample as chargers send it: energy, power, and current and
#: voltage of one phase.
METER_VALUES = {
    "ocpp1.6": {
        "connectorId": 1,
        "transactionId": 4711,
        "meterValue": [
            {
                "timestamp": NOW,
                "sampledValue": [
                    {"value": "12345.6", "context": "Sample.Periodic",
                     "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
                    {"value": "7200", "context": "Sample.Periodic",
                     "measurand": "Power.Active.Import", "unit": "W"},
                    {"value": "31.9", "context": "Sample.Periodic",
                     "measurand": "Current.Import", "phase": "L1", "unit": "A"},
                    {"value": "230.1", "context": "Sample.Periodic",
                     "measurand": "Voltage", "phase": "L1-N", "unit": "V"},
                ],
            }
        ],
    },
}
METER_VALUES["ocpp2.0.1"] = METER_VALUES["ocpp2.1"] = METER_VALUES["ocpp2.0"] = {
    "evseId": 1,
    "meterValue": [
        {
            "timestamp": NOW,
            "sampledValue": [
                {"value": 12345.6, "context": "Sample.Periodic",
                 "measurand": "Energy.Active.Import.Register",
                 "unitOfMeasure": {"unit": "Wh"}},
                {"value": 7200, "context": "Sample.Periodic",
                 "measurand": "Power.Active.Import", "unitOfMeasure": {"unit": "W"}},
                {"value": 31.9, "context": "Sample.Periodic",
                 "measurand": "Current.Import", "phase": "L1", "unitOfMeasure": {"unit": "A"}},
                {"value": 230.1, "context": "Sample.Periodic",
                 "measurand": "Voltage", "phase": "L1-N", "unitOfMeasure": {"unit": "V"}},
            ],
        }
    ],
}


class _NoEffects:
    """Session effects that do nothing (the broker is not measured)."""

    def send_to_charger(self, frame):
        raise AssertionError(f"unexpected answer: {frame!r}")

    def publish(self, *args, **kwargs):
        pass


class _NoClock:
    def callLater(self, *args):
        raise AssertionError("no timers expected")


def _per_frame(session: ChargerSession, frame: bytes, frames: int, repeat: int) -> float:
    handle = session.charger_frame
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(frames):
            handle(frame)
        best = min(best, time.perf_counter() - start)
    return best / frames * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--version", default="ocpp1.6", choices=sorted(VERSIONS))
    options = parser.parse_args(argv)
    version = VERSIONS[options.version]
    payload = METER_VALUES[version.subprotocol]
    frame = orjson.dumps([2, "m1", "MeterValues", payload])

    started = time.perf_counter()
    Validation(ENFORCE, [version])
    compile_seconds = time.perf_counter() - started

    results = {}
    for mode in (OFF, WARN, ENFORCE):
        checker = Validation(mode, [version]).checker_for("CP1", version)
        session = ChargerSession("CP1", version, _NoEffects(), _NoClock(), checker=checker)
        results[mode] = _per_frame(session, frame, options.frames, options.repeat)

    checker = Validation(ENFORCE, [version]).checker_for("CP1", version)
    check = checker.request
    assert check("MeterValues", payload) is None, "the benchmark frame must be valid"
    best = float("inf")
    for _ in range(options.repeat):
        start = time.perf_counter()
        for _ in range(options.frames):
            check("MeterValues", payload)
        best = min(best, time.perf_counter() - start)
    check_only = best / options.frames * 1e6

    print(f"MeterValues CALL, {version.subprotocol}, {len(frame)} bytes, "
          f"4 sampled values; best of {options.repeat} x {options.frames} frames")
    print(f"schemas of {version.subprotocol} read in {compile_seconds:.2f} s "
          "(once per process; each compiled on its first use)")
    for mode, micros in results.items():
        print(f"  mode={mode:<8} {micros:7.2f} us/frame")
    print(f"  schema check alone {check_only:7.2f} us/frame")
    print(f"  enforce - off      {results[ENFORCE] - results[OFF]:7.2f} us/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
