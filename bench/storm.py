"""
storm: N chargers connect at once, each sends BootNotification answered by
a worker. Run twice: new chargers (their queues are declared now) and the
same chargers returning (their queues exist).

Prints the time until all are booted, connect (TCP start -> 101) and boot
(TCP start -> BootNotification answer) latency percentiles, refusals, the
server's peak RSS and the CPU each process spent per charger.

    python -m bench.storm                     # 10,000 chargers, gateway
    python -m bench.storm -n 2000 --targets gateway,bridge,echo
    python -m bench.storm -n 50000 --set listener.workers=3 --own-broker

A charger refused with 503 tries again after its Retry-After (--retries
times): a refusal counts only when it was final.
"""

from __future__ import annotations

import argparse
import time

from bench._common import (
    add_settings_argument, apply_settings,
    start_profile, stop_profile, loadgen_processes, LoadGen, broker_pid, delete_amqp, free_port, merge_samples, ms, percentiles,
    print_table, split, start_target, start_worker, unique, write_json, ws_url,
)
from bench.roundtrip import WORKER_KEYS, Meter


def one_storm(loadgen, urls, meter, retries: int = 0) -> dict:
    before = meter.snapshot()
    runs = loadgen.send([("connect", {"urls": part, "retries": retries})
                         for part in split(urls, len(loadgen))])
    after = meter.snapshot()
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        raise RuntimeError(errors[0])
    refused: dict = {}
    for r in runs:
        for k, v in r["refused"].items():
            refused[k] = refused.get(k, 0) + v
    booted = sum(r["booted"] for r in runs)
    start = min(r["started"] for r in runs)
    last = max(r["last"] for r in runs)
    delta = Meter.delta(before, after)
    return {
        "chargers": len(urls), "booted": booted, "refused": refused,
        "retried": sum(r.get("retried", 0) for r in runs),
        "seconds": last - start,
        "connect": percentiles(merge_samples(runs, "connect")),
        "boot": percentiles(merge_samples(runs, "boot")),
        "cpu_per_charger_us": {k: v / max(1, booted) * 1e6 for k, v in delta.items() if k != "t"},
    }


def bench_target(target: str, args) -> dict:
    exchange = unique("bench-storm")
    port = free_port()
    identities = [unique("st") for _ in range(args.chargers)]
    urls = [ws_url(port, i) for i in identities]
    server = start_target(target, port, exchange, ping=60, expires_ms=args.expires_ms)
    worker = start_worker(exchange, WORKER_KEYS) if target != "echo" else None
    loadgen = LoadGen(loadgen_processes(args.chargers, args.procs))
    meter = Meter(server, worker, loadgen, broker_pid())
    result: dict = {"target": target}
    try:
        spy = start_profile(server.pid, args.profile) if args.profile and target == "gateway" else None
        result["new"] = one_storm(loadgen, urls, meter, args.retries)
        stop_profile(spy)
        result["new"]["peak_rss"] = server.memory()["hwm"]
        loadgen.all("close")
        time.sleep(args.pause)
        spy = start_profile(server.pid, args.profile_returning) \
            if args.profile_returning and target == "gateway" else None
        result["returning"] = one_storm(loadgen, urls, meter, args.retries)
        stop_profile(spy)
        result["returning"]["peak_rss"] = server.memory()["hwm"]
        loadgen.all("close")
    finally:
        loadgen.close()
        if worker is not None:
            worker.stop()
        server.stop()
        if target == "gateway":
            result["cleanup_seconds"] = delete_amqp(exchange, ["ocpp." + i for i in identities])
        elif target == "bridge":
            delete_amqp(exchange, [])
    return result


def report(results, args) -> None:
    base = {r["target"]: r for r in results}
    for r in results:
        rows = []
        for phase in ("new", "returning"):
            s = r[phase]
            cpu = ", ".join(f"{k} {v:.0f} µs" for k, v in s["cpu_per_charger_us"].items())
            rows += [
                (f"{phase}: all booted", f"{s['seconds']:.2f} s",
                 f"{s['booted']} of {s['chargers']}", f"refused {s['refused'] or 0}",
                 f"retried after 503: {s['retried']}"),
                ("  connect latency", *(f"{k} {ms(v)}" for k, v in s["connect"].items())),
                ("  boot latency", *(f"{k} {ms(v)}" for k, v in s["boot"].items())),
                ("  CPU per charger", cpu),
                ("  server peak RSS", f"{s['peak_rss'] / 2**20:.1f} MiB"),
            ]
            for ref in ("bridge", "echo"):
                if ref in base and ref != r["target"]:
                    other = base[ref][phase]
                    rows.append((
                        f"  vs {ref}",
                        f"time {s['seconds'] / max(other['seconds'], 1e-9):.2f}x",
                        f"server CPU {s['cpu_per_charger_us']['server'] / max(other['cpu_per_charger_us']['server'], 1e-9):.2f}x",
                    ))
        print_table(f"storm: {r['target']}, {args.procs} load processes", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--chargers", type=int, default=10000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--targets", default="gateway")
    parser.add_argument("--retries", type=int, default=5,
                        help="times a charger refused with 503 tries again after Retry-After")
    parser.add_argument("--pause", type=float, default=5.0,
                        help="seconds between the two storms (old connections close)")
    parser.add_argument("--expires-ms", type=int, default=600000,
                        help="x-expires of the charger queues: a safety net, they are deleted at the end")
    add_settings_argument(parser)
    parser.add_argument("--json")
    parser.add_argument("--profile", help="py-spy collapsed stacks of the gateway, new chargers' storm")
    parser.add_argument("--profile-returning",
                        help="py-spy collapsed stacks of the gateway, returning chargers' storm")
    args = parser.parse_args(argv)
    apply_settings(args)
    results = [bench_target(t, args) for t in args.targets.split(",")]
    report(results, args)
    write_json(args.json, {"benchmark": "storm", "args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
