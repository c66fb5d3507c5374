"""
roundtrip: C chargers send CALLs answered by a worker through RabbitMQ.

Prints, per target (the gateway and, with --targets, the baselines):

- one charger alone: p50/p99 latency;
- saturation: every charger keeps one Heartbeat outstanding; round trips/s
  and the CPU each process spent per round trip (server under test,
  worker, load generators, broker);
- fixed offered rates (fractions of that saturation): p50/p99/p99.9;
- CSMS -> charger commands (gateway only): saturation and latency at 50 %.

    python -m bench.roundtrip                         # 1,000 chargers, gateway
    python -m bench.roundtrip --targets gateway,bridge,echo --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench import _common
from bench._common import (
    add_settings_argument, apply_settings,
    HERE, LoadGen, broker_pid, cpu_seconds, delete_amqp, process_tree, merge_samples, ms,
    percentiles, print_table, split, start_target, start_worker, unique, free_port,
    ws_url, write_json,
)

WORKER_KEYS = ["ocpp16.Heartbeat.req", "ocpp16.BootNotification.req", "bare.req"]


class Meter:
    """CPU seconds of each process taking part, between two snapshots."""

    def __init__(self, servers, workers, loadgen, broker):
        """
        @param servers: the server process(es) under test, summed as "server".
        @param workers: the worker process(es), summed as "worker".
        """
        if not isinstance(servers, (list, tuple)):
            servers = [servers]
        if workers is not None and not isinstance(workers, (list, tuple)):
            workers = [workers]
        # a server with workers = N forks: count its whole process tree
        self.servers = servers
        self.pids = {}
        if workers:
            self.pids["worker"] = [p.pid for p in workers]
        if broker:
            self.pids["broker"] = [broker]
        self.loadgen = loadgen
        #: pid of each gateway worker seen -> its label ("gw1", ...)
        self.worker_labels: dict = {}

    def snapshot(self) -> dict:
        out = {"server": sum(p.cpu() for p in self.servers)}
        # with [listener] workers = N, each worker's share too
        for server in self.servers:
            for pid in process_tree(server.pid)[1:]:
                label = self.worker_labels.setdefault(pid, f"gw{len(self.worker_labels) + 1}")
                try:
                    out[label] = cpu_seconds(pid)
                except OSError:
                    pass
        for name, pids in self.pids.items():
            total = 0.0
            for pid in pids:
                try:
                    total += cpu_seconds(pid)
                except OSError:
                    pass
            out[name] = total
        out["loadgen"] = self.loadgen.cpu()
        out["t"] = time.monotonic()
        return out

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        """What each process spent between snapshots C{a} and C{b} (only
        those in both: a worker that ended or started between them is in
        "server" alone)."""
        return {k: b[k] - a[k] for k in a if k in b}


def per_rt(delta: dict, count: int) -> dict:
    """CPU microseconds per round trip, per process, and each one's load."""
    wall = delta["t"]
    return {k: {"us_per_rt": v / max(count, 1) * 1e6, "cpu_pct": 100 * v / wall}
            for k, v in delta.items() if k != "t"}


def cpu_cells(cpu: dict) -> str:
    return ", ".join(f"{k} {v['us_per_rt']:.0f} µs ({v['cpu_pct']:.0f} %)" for k, v in cpu.items())


def run_commands(exchange, identities, seconds, rate, meter):
    before = meter.snapshot()
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "commander.py"), _common.AMQP_URL, exchange,
         str(seconds), str(rate), *identities],
        capture_output=True, text=True, check=True,
    ).stdout
    after = meter.snapshot()
    result = json.loads(out.strip().splitlines()[-1])
    delta = Meter.delta(before, after)
    return result, delta


def bench_target(target: str, args) -> dict:
    exchange = unique("bench-rt")
    ports = [free_port() for _ in range(args.gateways)]
    identities = [unique("rt") for _ in range(args.chargers)]
    # several servers: separate processes on separate ports, chargers
    # spread over them (what workers = N with SO_REUSEPORT does)
    servers = [start_target(target, port, exchange, ping=60) for port in ports]
    server = servers[0]
    workers = []
    if target != "echo":
        queue = unique("bench.worker")
        workers = [start_worker(exchange, WORKER_KEYS, queue=queue) for _ in range(args.workers)]
    loadgen = LoadGen(args.procs)
    meter = Meter(servers, workers, loadgen, broker_pid())
    result: dict = {"target": target, "chargers": args.chargers, "gateways": args.gateways}
    try:
        urls = [ws_url(ports[n % len(ports)], i) for n, i in enumerate(identities)]
        connected = loadgen.send([("connect", {"urls": part}) for part in split(urls, len(loadgen))])
        errors = [r["error"] for r in connected if "error" in r]
        if errors:
            raise RuntimeError(errors[0])
        booted = sum(r["booted"] for r in connected)
        result["booted"] = booted
        if booted < args.chargers:
            print(f"  only {booted} of {args.chargers} chargers booted", file=sys.stderr)

        # one charger alone
        commands = [("closed_loop", {"seconds": args.seconds, "chargers": 1})]
        commands += [("idle", {"seconds": args.seconds})] * (len(loadgen) - 1)
        alone = loadgen.send(commands)[0]
        result["alone"] = {"rate": alone["count"] / args.seconds,
                           **percentiles(merge_samples([alone], "lat"))}

        # saturation
        spy = None
        if args.profile and target == "gateway":
            # py-spy samples the gateway from outside, at saturation only
            spy = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid",
                 str(server.pid), "--duration", str(int(args.seconds)), "--rate", "250",
                 "--nonblocking", "--format", "raw", "--output", args.profile],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = meter.snapshot()
        sat = loadgen.all("closed_loop", seconds=args.seconds)
        after = meter.snapshot()
        if spy is not None:
            spy.wait()
        count = sum(r["count"] for r in sat)
        rate = count / args.seconds
        result["saturation"] = {
            "rate": rate, **percentiles(merge_samples(sat, "lat")),
            "cpu": per_rt(Meter.delta(before, after), count),
        }

        result["fixed"] = []
        for fraction in args.fractions:
            offered = rate * fraction
            before = meter.snapshot()
            runs = loadgen.all("open_loop", rate=offered / len(loadgen), seconds=args.seconds)
            after = meter.snapshot()
            answered = sum(r["answered"] for r in runs)
            result["fixed"].append({
                "fraction": fraction, "offered": offered, "answered": answered,
                "lost": sum(r["lost"] for r in runs),
                **percentiles(merge_samples(runs, "lat")),
                "cpu": per_rt(Meter.delta(before, after), answered),
            })

        if target == "gateway" and args.commands:
            sample = identities[: args.command_chargers]
            res, delta = run_commands(exchange, sample, args.seconds, 0, meter)
            cmd_rate = res["count"] / args.seconds
            result["commands"] = {"rate": cmd_rate, **percentiles(res["lat"]),
                                  "cpu": per_rt(delta, res["count"]),
                                  "commander_cpu_s": res["cpu"]}
            res, delta = run_commands(exchange, sample, args.seconds, cmd_rate * 0.5, meter)
            result["commands_50"] = {"offered": cmd_rate * 0.5, "answered": res["answered"],
                                     "lost": res["lost"], **percentiles(res["lat"]),
                                     "cpu": per_rt(delta, res["answered"])}
        result["server_memory"] = {"rss": sum(s.memory()["rss"] for s in servers)}
        loadgen.all("close")
    finally:
        loadgen.close()
        for worker in workers:
            worker.stop()
        for s in servers:
            s.stop()
        if target == "gateway":
            delete_amqp(exchange, ["ocpp." + i for i in identities])
        elif target == "bridge":
            delete_amqp(exchange, [])
    return result


def report(results: list) -> None:
    base = {r["target"]: r for r in results}
    for r in results:
        rows = [
            ("one charger alone", f"{r['alone']['rate']:.0f}/s",
             f"p50 {ms(r['alone']['p50'])}", f"p99 {ms(r['alone']['p99'])}"),
            ("saturation", f"{r['saturation']['rate']:.0f} rt/s",
             f"p50 {ms(r['saturation']['p50'])}", f"p99 {ms(r['saturation']['p99'])}"),
            ("  CPU per round trip", cpu_cells(r["saturation"]["cpu"])),
        ]
        for ref in ("bridge", "echo"):
            if ref in base and ref != r["target"]:
                other = base[ref]
                ratio = r["saturation"]["rate"] / other["saturation"]["rate"]
                cpu = (r["saturation"]["cpu"]["server"]["us_per_rt"]
                       / max(other["saturation"]["cpu"]["server"]["us_per_rt"], 1e-9))
                alone = r["alone"]["p50"] / max(other["alone"]["p50"] or 1e-9, 1e-9)
                rows.append((f"  vs {ref}", f"rate {ratio:.2f}x", f"server CPU per rt {cpu:.2f}x",
                             f"alone p50 {alone:.2f}x"))
        for f in r["fixed"]:
            rows.append((f"offered {f['fraction'] * 100:.0f} % ({f['offered']:.0f}/s)",
                         f"got {f['answered'] / max(1, f['offered']) / ARGS.seconds * 100:.0f} %",
                         f"p50 {ms(f['p50'])}", f"p99 {ms(f['p99'])}", f"p99.9 {ms(f['p99.9'])}",
                         f"server {f['cpu']['server']['us_per_rt']:.0f} µs/rt"))
        if "commands" in r:
            c, c50 = r["commands"], r["commands_50"]
            rows += [
                ("CSMS commands, saturation", f"{c['rate']:.0f}/s", f"p50 {ms(c['p50'])}",
                 f"p99 {ms(c['p99'])}", f"server {c['cpu']['server']['us_per_rt']:.0f} µs/cmd",
                 f"commander {c['commander_cpu_s'] / max(1, c['rate'] * ARGS.seconds) * 1e6:.0f} µs/cmd"),
                ("CSMS commands at 50 %", f"{c50['offered']:.0f}/s", f"p50 {ms(c50['p50'])}",
                 f"p99 {ms(c50['p99'])}", f"p99.9 {ms(c50['p99.9'])}", f"lost {c50['lost']}"),
            ]
        rows.append(("server RSS", f"{r['server_memory']['rss'] / 2**20:.1f} MiB"))
        print_table(f"roundtrip: {r['target']} x{r['gateways']}, {r['chargers']} chargers, "
                    f"{ARGS.procs} load processes", rows)


def main(argv=None) -> list:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--chargers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=4, help="load-generator processes")
    parser.add_argument("--fractions", default="0.25,0.5,0.75")
    parser.add_argument("--targets", default="gateway", help="gateway,bridge,echo")
    parser.add_argument("--no-commands", dest="commands", action="store_false")
    parser.add_argument("--gateways", type=int, default=1,
                        help="server processes, each on its own port")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--command-chargers", type=int, default=1000)
    add_settings_argument(parser)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--profile", help="py-spy collapsed stacks of the gateway at saturation")
    ARGS = args = parser.parse_args(argv)
    apply_settings(args)
    args.fractions = [float(f) for f in args.fractions.split(",") if f]
    results = [bench_target(t, args) for t in args.targets.split(",")]
    report(results)
    write_json(args.json, {"benchmark": "roundtrip", "args": vars(args), "results": results})
    return results


ARGS = None

if __name__ == "__main__":
    main()
