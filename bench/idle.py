"""
idle: N chargers connect, boot and stay idle with pings on.

Prints the server's RSS per charger (RSS delta / N once the chargers have
been idle for a while), the broker's memory per charger (Erlang memory
delta from `rabbitmqctl status`), and the CPU the server spends while they
idle (pings every --ping seconds).

With --steady SECONDS, the idle chargers then carry a steady load for that
long: each sends one Heartbeat and one MeterValues per --interval seconds
(50,000 chargers, 60 s: 1,667 CALLs/s), and it prints their latency and
the CPU of every process per CALL and as a share of a core.

    python -m bench.idle                      # 10,000 chargers, gateway
    python -m bench.idle -n 2000 --targets gateway,bridge,echo
    python -m bench.idle -n 50000 --set listener.workers=3 --own-broker --steady 120
"""

from __future__ import annotations

import argparse
import time

from bench._common import (
    add_settings_argument, apply_settings, broker_pid, loadgen_processes, merge_samples, ms,
    percentiles, process_tree, LoadGen, broker_memory, delete_amqp, free_port, memory,
    print_table, split, start_target, start_worker, unique, write_json, ws_url,
)
from bench.roundtrip import WORKER_KEYS, Meter, cpu_cells, per_rt

#: what a charger sends under --steady, once each per --interval
STEADY_MIX = ("Heartbeat", "MeterValues")


def _settled_rss(server, timeout: float = 30.0) -> int:
    """The server's RSS once start-up has stopped growing it."""
    deadline = time.monotonic() + timeout
    rss = server.memory()["rss"]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = server.memory()["rss"]
        if now - rss < 256 * 1024:
            return now
        rss = now
    return rss


def bench_target(target: str, args) -> dict:
    exchange = unique("bench-idle")
    port = free_port()
    identities = [unique("id") for _ in range(args.chargers)]
    server = start_target(target, port, exchange, ping=args.ping, tls=args.tls)
    worker = start_worker(exchange, WORKER_KEYS + ["ocpp16.MeterValues.req"]) \
        if target != "echo" else None
    loadgen = LoadGen(loadgen_processes(args.chargers, args.procs))
    result: dict = {"target": target, "chargers": args.chargers, "ping": args.ping,
                    "tls": args.tls}
    try:
        rss0 = _settled_rss(server)
        workers0 = _worker_rss(server)
        broker0 = broker_memory()
        urls = [ws_url(port, i, args.tls) for i in identities]
        connect_started = time.monotonic()
        runs = loadgen.send([("connect", {"urls": part, "retries": args.retries})
                             for part in split(urls, len(loadgen))])
        result["connect_seconds"] = time.monotonic() - connect_started
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            raise RuntimeError(errors[0])
        booted = sum(r.get("booted", 0) for r in runs)
        # chargers dropped before their boot was answered connect again,
        # as real ones do (a few rounds at most)
        result["reconnected"] = []
        for _round in range(3):
            if booted >= args.chargers:
                break
            again = loadgen.all("reconnect", retries=args.retries)
            runs += again
            result["reconnected"].append(sum(r.get("booted", 0) for r in again))
            booted += result["reconnected"][-1]
        result["connect_seconds"] = time.monotonic() - connect_started
        result["booted"] = booted
        result["retried"] = sum(r.get("retried", 0) for r in runs)
        refused: dict = {}
        for r in runs:
            for reason, count in (r.get("refused") or {}).items():
                refused[reason] = refused.get(reason, 0) + count
        result["refused"] = refused
        time.sleep(2.0)  # let the last consumers settle
        cpu0 = server.cpu()
        idle = loadgen.all("idle", seconds=args.seconds)
        cpu1 = server.cpu()
        rss1 = server.memory()["rss"]
        result["workers_rss"] = [(workers0.get(pid, 0), rss)
                                 for pid, rss in _worker_rss(server).items()]
        broker1 = broker_memory()
        result.update({
            "open": sum(r["open"] for r in idle),
            "pings": sum(r["pings"] for r in idle),
            "rss_before": rss0, "rss_after": rss1,
            "rss_per_charger": (rss1 - rss0) / max(1, booted),
            "broker_per_charger": (broker1 - broker0) / max(1, booted)
            if broker0 is not None and broker1 is not None else None,
            "idle_cpu_pct": 100 * (cpu1 - cpu0) / args.seconds,
            "loadgen_cpu_pct": 100 * sum(r["cpu"] for r in idle) / args.seconds,
        })
        if args.steady:
            result["steady"] = _steady(server, worker, loadgen, booted, args)
        loadgen.all("close")
    finally:
        loadgen.close()
        if worker is not None:
            worker.stop()
        server.stop()
        if target == "gateway":
            delete_amqp(exchange, ["ocpp." + i for i in identities])
        elif target == "bridge":
            delete_amqp(exchange, [])
    return result


def _worker_rss(server) -> dict:
    """RSS of each gateway worker (with [listener] workers = N), by pid."""
    out = {}
    for pid in process_tree(server.pid)[1:]:
        try:
            out[pid] = memory(pid)["rss"]
        except OSError:
            pass
    return out


def _steady(server, worker, loadgen, chargers: int, args) -> dict:
    """
    Every charger sends each call of L{STEADY_MIX} once per
    C{args.interval} seconds, for C{args.steady} seconds.
    """
    rate = chargers * len(STEADY_MIX) / args.interval
    meter = Meter(server, worker, loadgen, broker_pid())
    before = meter.snapshot()
    runs = loadgen.all("open_loop", rate=rate / len(loadgen), seconds=args.steady,
                       mix=STEADY_MIX)
    after = meter.snapshot()
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        raise RuntimeError(errors[0])
    answered = sum(r["answered"] for r in runs)
    delta = Meter.delta(before, after)
    # the share of a core over the load itself, not the drain after it
    return {
        "rate": rate, "sent": sum(r["sent"] for r in runs), "answered": answered,
        "lost": sum(r["lost"] for r in runs),
        "callerrors": sum(r.get("errors", 0) for r in runs), **percentiles(merge_samples(runs, "lat")),
        "cpu": per_rt(delta, answered),
        "cpu_pct_of_load": {k: 100 * v / args.steady for k, v in delta.items() if k != "t"},
    }


def report(results) -> None:
    base = {r["target"]: r for r in results}
    for r in results:
        rows = [
            ("chargers booted / open after idle", f"{r['booted']} / {r['open']}",
             "not connected: " + (", ".join(f"{k} {v}" for k, v in r["refused"].items())
                                  or "none")),
            ("server RSS per charger", f"{r['rss_per_charger'] / 1024:.1f} KiB",
             f"({r['rss_before'] / 2**20:.0f} -> {r['rss_after'] / 2**20:.0f} MiB)"),
            ("broker memory per charger",
             "-" if r["broker_per_charger"] is None else f"{r['broker_per_charger'] / 1024:.1f} KiB"),
            (f"server CPU while idle (pings every {r['ping']:g} s)", f"{r['idle_cpu_pct']:.2f} %",
             f"pings answered {r['pings']}", f"load generators {r['loadgen_cpu_pct']:.2f} %"),
        ]
        if r.get("workers_rss"):
            rows.append(("gateway workers' RSS (start -> end)", ", ".join(
                f"{a / 2**20:.0f} -> {b / 2**20:.0f} MiB" for a, b in r["workers_rss"])))
        rows.append(("connect + boot of all", f"{r['connect_seconds']:.1f} s",
                     f"retried after 503: {r['retried']}",
                     f"booted after reconnecting: {r['reconnected'] or 0}"))
        if "steady" in r:
            st = r["steady"]
            rows += [
                (f"steady: {'+'.join(STEADY_MIX)} per charger per {ARGS.interval:g} s",
                 f"{st['rate']:.0f} CALLs/s", f"answered {st['answered']} of {st['sent']}",
                 f"lost {st['lost']}", f"CALLERROR {st['callerrors']}"),
                ("  latency", f"p50 {ms(st['p50'])}", f"p99 {ms(st['p99'])}",
                 f"p99.9 {ms(st['p99.9'])}"),
                ("  CPU per CALL (share of a core)", cpu_cells(st["cpu"])),
            ]
        for ref in ("echo", "bridge"):
            if ref in base and ref != r["target"]:
                rows.append((f"RSS per charger vs {ref}",
                             f"{r['rss_per_charger'] / max(1, base[ref]['rss_per_charger']):.2f}x"))
        print_table(f"idle: {r['target']}, {r['chargers']} chargers "
                    f"({'wss' if r.get('tls') else 'plain ws'})", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--chargers", type=int, default=10000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="idle time measured")
    parser.add_argument("--ping", type=float, default=10.0, help="server ping interval")
    parser.add_argument("--targets", default="gateway")
    parser.add_argument("--steady", type=float, default=0.0,
                        help="then this many seconds of steady load (0: none)")
    parser.add_argument("--interval", type=float, default=60.0,
                        help="under --steady, seconds between a charger's Heartbeats "
                             "(and between its MeterValues)")
    parser.add_argument("--retries", type=int, default=5,
                        help="times a charger refused with 503 tries again after Retry-After")
    parser.add_argument("--tls", action="store_true",
                        help="wss:// (gateway and echo; a throw-away self-signed certificate)")
    add_settings_argument(parser)
    parser.add_argument("--json")
    global ARGS
    ARGS = args = parser.parse_args(argv)
    apply_settings(args)
    results = [bench_target(t, args) for t in args.targets.split(",")]
    report(results)
    write_json(args.json, {"benchmark": "idle", "args": vars(args), "results": results})
    return results


ARGS = None

if __name__ == "__main__":
    main()
