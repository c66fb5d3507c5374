"""
baseline: the same loads against the gateway and the stack's own limits,
side by side in one run, each gateway figure with its ratio to them:

- (a) a bare autobahn echo server (bench/bare_echo.py),
- (b) the thinnest autobahn + pika relay (bench/bare_bridge.py).

    python -m bench.baseline                   # roundtrip, idle and storm
    python -m bench.baseline --only roundtrip --json baseline.json

Sizes default to the single benchmarks' defaults; --scale shrinks them all
(0.1 = a tenth) for a quick check.
"""

from __future__ import annotations

import argparse

from bench import idle, roundtrip, storm
from bench._common import write_json

TARGETS = "gateway,bridge,echo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="roundtrip,idle,storm")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    out = {}
    only = args.only.split(",")
    common = ["--targets", TARGETS, "--procs", str(args.procs)]
    if "roundtrip" in only:
        out["roundtrip"] = roundtrip.main(
            ["-c", str(max(1, int(1000 * args.scale))), "--seconds", str(args.seconds), *common])
    if "idle" in only:
        out["idle"] = idle.main(
            ["-n", str(max(1, int(10000 * args.scale))), "--seconds", str(args.seconds * 3), *common])
    if "storm" in only:
        out["storm"] = storm.main(["-n", str(max(1, int(10000 * args.scale))), *common])
    write_json(args.json, {"benchmark": "baseline", "args": vars(args), "results": out})


if __name__ == "__main__":
    main()
