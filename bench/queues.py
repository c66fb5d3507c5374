"""
queues: RabbitMQ's memory and CPU per charger, by charger queue type.

For each queue type this starts a RabbitMQ node (or a cluster, --nodes 3)
of its own, with its own node name, ports, data directory and Erlang
cookie (tests/faults/cluster.py; the broker on 5672 is never touched),
then gateways (`twistd -n ocppgw`) pointed at it with the queue type set
through their `[queue]` settings, and connects N real chargers through
them (bench/loadgen.py). So the broker sees exactly what production gives
it: the gateway's declare arguments, its bindings, its declare and
consumer channels and one consumer per charger.

For each type it prints, per charger:

- broker memory while the chargers are online (queue + binding + consumer)
  and once they have gone (the queue kept for commands): the Erlang VM's
  own total (`rabbitmqctl status`), its resident set (RSS, /proc) and the
  largest categories of `rabbitmq-diagnostics memory_breakdown`;
- broker CPU per charger for a new charger (queue declared, bound,
  consumed, BootNotification routed) and a returning one (queue exists);
- the time until all were booted, and the gateways' CPU per charger.

The figures are deltas from the moment the gateways and the CSMS worker
were connected and no charger was, divided by the chargers booted.

    python -m bench.queues                          # 10,000 chargers, 4 types
    python -m bench.queues -n 50000 --types classic-v2
    python -m bench.queues -n 10000 --types quorum --nodes 3

Chargers are spread over several gateway processes (--per-gateway, default
16,000 each) because every process here may hold at most 20,000 open files
and one source address reaches one port through ~28,000 ephemeral ports.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from typing import Optional

from bench import _common
from bench._common import (
    LoadGen, cpu_seconds, free_port, memory, print_table, split, start_target, start_worker,
    unique, write_json, ws_url,
)
from bench.roundtrip import WORKER_KEYS
from tests.faults.cluster import ClusterError, RabbitCluster

#: The queue types compared, as the gateway's [queue] settings that choose them.
QUEUE_TYPES = {
    "classic-v1": {"x-queue-type": "classic", "x-queue-version": "1"},
    "classic-v2": {"x-queue-type": "classic", "x-queue-version": "2"},
    "lazy": {"x-queue-type": "classic", "x-queue-version": "1", "x-queue-mode": "lazy"},
    "quorum": {"x-queue-type": "quorum"},
}

#: Seconds a RabbitMQ tool may take to answer (status after a storm of
#: quorum queue declarations took more than 60 s on the 2-core machine;
#: with 10,000 quorum queues it did not answer at all, see Broker.snapshot).
TOOL_TIMEOUT = 180.0


def uptime() -> str:
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return "load average " + " ".join(load)


class Broker:
    """A RabbitMQ node or cluster of the benchmark's own, and its figures."""

    def __init__(self, nodes: int) -> None:
        self.cluster = RabbitCluster(nodes)
        self.cluster.start()
        self.pids = [self.cluster.pid(n) for n in range(nodes)]
        #: whether the nodes' command-line tools still answer (see snapshot)
        self.tools_answer = True

    def url(self, index: int) -> str:
        return self.cluster.url(index % self.cluster.size)

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def snapshot(self) -> dict:
        """
        Erlang total, RSS and the memory breakdown, summed over the nodes.
        Once a node's command-line tools stop answering (a node running
        10,000 quorum queues did not answer `rabbitmqctl status` for
        10 minutes), the Erlang total is None and the breakdown empty:
        the RSS still reads from /proc.
        """
        out: dict = {"erlang": 0, "rss": 0, "breakdown": {}}
        for n, pid in enumerate(self.pids):
            out["rss"] += memory(pid)["rss"]
            if not self.tools_answer:
                continue
            try:
                # a node that has just created thousands of quorum queues
                # can take minutes to answer
                status = json.loads(self.cluster.ctl(
                    n, "status", "--formatter", "json", timeout=TOOL_TIMEOUT).stdout)
                done = self.cluster.diagnostics(n, "memory_breakdown", "--unit", "bytes",
                                                "--formatter", "json", timeout=TOOL_TIMEOUT)
            except (subprocess.TimeoutExpired, ClusterError) as error:
                print(f"  the node's tools did not answer ({type(error).__name__}): "
                      "RSS only from now on", flush=True)
                self.tools_answer = False
                continue
            out["erlang"] += int(status["memory"]["total"]["erlang"])
            for key, value in json.loads(done.stdout).items():
                if key != "total":
                    out["breakdown"][key] = out["breakdown"].get(key, 0) + _bytes(value)
        if not self.tools_answer:
            out["erlang"] = None
            out["breakdown"] = {}
        return out

    def queue_count(self) -> Optional[int]:
        if not self.tools_answer:
            return None
        try:
            done = self.cluster.ctl(0, "list_queues", "name", "--formatter", "json",
                                    timeout=TOOL_TIMEOUT)
        except (subprocess.TimeoutExpired, ClusterError):
            self.tools_answer = False
            return None
        return sum(1 for row in json.loads(done.stdout)
                   if row["name"].startswith("ocpp."))

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until the node stops growing (quorum queues write their WAL late)."""
        deadline = time.monotonic() + timeout

        def size() -> int:
            reading = self.snapshot()
            return reading["rss"] if reading["erlang"] is None else reading["erlang"]

        last = size()
        while time.monotonic() < deadline:
            time.sleep(3.0)
            now = size()
            if abs(now - last) < 2 * 2**20:
                return
            last = now

    def stop(self) -> None:
        self.cluster.stop()


def _bytes(value) -> int:
    # the JSON formatter gives bytes, as a number or {"bytes": n} by version
    if isinstance(value, dict):
        return int(value.get("bytes", 0))
    return int(value)


def connect_all(loadgen: LoadGen, urls: list) -> dict:
    started = time.monotonic()
    runs = loadgen.send([("connect", {"urls": part}) for part in split(urls, len(loadgen))])
    refused: dict = {}
    for r in runs:
        for reason, count in (r.get("refused") or {}).items():
            refused[reason] = refused.get(reason, 0) + count
    return {"booted": sum(r.get("booted", 0) for r in runs), "refused": refused,
            "seconds": time.monotonic() - started}


def per_charger(before: dict, after: dict, chargers: int) -> dict:
    n = max(1, chargers)
    breakdown = {
        key: (after["breakdown"].get(key, 0) - before["breakdown"].get(key, 0)) / n
        for key in after["breakdown"]
    }
    erlang = None if after["erlang"] is None or before["erlang"] is None \
        else (after["erlang"] - before["erlang"]) / n
    return {"erlang": erlang,
            "rss": (after["rss"] - before["rss"]) / n, "breakdown": breakdown}


def bench_type(name: str, args) -> dict:
    print(f"{name}: starting a {args.nodes}-node broker ({uptime()})", flush=True)
    broker = Broker(args.nodes)
    exchange = unique("bench-queues")
    gateways, worker, loadgen = [], None, None
    result: dict = {"type": name, "chargers": args.chargers, "nodes": args.nodes,
                    "arguments": QUEUE_TYPES[name]}
    try:
        count = max(1, math.ceil(args.chargers / args.per_gateway))
        ports = []
        for index in range(count):
            _common.GATEWAY_SETTINGS[:] = [
                f"amqp.url={broker.url(index)}",
                # the storm of declares may take longer than the default
                "websocket.handshake_timeout=600",
                *(f"queue.{key}={value}" for key, value in QUEUE_TYPES[name].items()),
                *args.set,
            ]
            port = free_port()
            gateways.append(start_target("gateway", port, exchange, ping=300))
            ports.append(port)
        worker = start_worker(exchange, WORKER_KEYS, url=broker.url(args.nodes - 1))
        loadgen = LoadGen(args.procs)
        identities = [unique("q") for _ in range(args.chargers)]
        urls = [ws_url(ports[i % count], identity) for i, identity in enumerate(identities)]
        time.sleep(2.0)
        before = broker.snapshot()
        result["load_before"] = uptime()

        cpu0, gw0 = broker.cpu(), sum(g.cpu() for g in gateways)
        new = connect_all(loadgen, urls)
        cpu1, gw1 = broker.cpu(), sum(g.cpu() for g in gateways)
        booted = new["booted"]
        broker.settle()
        online = broker.snapshot()
        result["queues"] = broker.queue_count()
        result["load_online"] = uptime()

        loadgen.all("close")
        broker.settle()
        offline = broker.snapshot()

        result["new"] = {**new, "broker_cpu": (cpu1 - cpu0) / max(1, booted),
                         "gateway_cpu": (gw1 - gw0) / max(1, booted)}
        if args.returning:
            cpu2, gw2 = broker.cpu(), sum(g.cpu() for g in gateways)
            returning = connect_all(loadgen, urls)
            cpu3, gw3 = broker.cpu(), sum(g.cpu() for g in gateways)
            loadgen.all("close")
            result["returning"] = {
                **returning, "broker_cpu": (cpu3 - cpu2) / max(1, returning["booted"]),
                "gateway_cpu": (gw3 - gw2) / max(1, returning["booted"])}
        result["load_after"] = uptime()
        result.update({
            "online": per_charger(before, online, booted),
            "offline": per_charger(before, offline, booted),
            "broker_before": before, "broker_online": online, "broker_offline": offline,
        })
    finally:
        if loadgen is not None:
            loadgen.close()
        if worker is not None:
            worker.stop()
        for gateway in gateways:
            gateway.stop()
        broker.stop()
    return result


def _refusals(refused: dict) -> str:
    return json.dumps(refused) if refused else "none"


def kib(value: Optional[float]) -> str:
    # None: the node's tools did not answer (see Broker.snapshot)
    return "-" if value is None else f"{value / 1024:.1f} KiB"


def report(results: list) -> None:
    for r in results:
        online, offline = r["online"], r["offline"]
        top = sorted(online["breakdown"].items(), key=lambda kv: -kv[1])[:5]
        storms = [storm for storm in ("new", "returning") if storm in r]
        rows = [
            (f"chargers booted ({' / '.join(storms)})",
             " / ".join(str(r[storm]["booted"]) for storm in storms),
             f"charger queues on the broker: {r['queues']}",
             *(f"{storm} not connected: " + _refusals(r[storm]["refused"]) for storm in storms)),
            ("broker memory per charger, online", f"Erlang {kib(online['erlang'])}",
             f"RSS {kib(online['rss'])}"),
            ("  largest categories", ", ".join(f"{k} {kib(v)}" for k, v in top)),
            ("broker memory per charger, offline", f"Erlang {kib(offline['erlang'])}",
             f"RSS {kib(offline['rss'])}", "(queue kept, no consumer)"),
            ("new chargers: all booted", f"{r['new']['seconds']:.1f} s",
             f"broker CPU {r['new']['broker_cpu'] * 1e6:.0f} us/charger",
             f"gateway CPU {r['new']['gateway_cpu'] * 1e6:.0f} us/charger"),
            ("machine", r["load_before"], r["load_online"], r["load_after"]),
        ]
        if "returning" in r:
            rows.insert(-1, (
                "returning chargers: all booted", f"{r['returning']['seconds']:.1f} s",
                f"broker CPU {r['returning']['broker_cpu'] * 1e6:.0f} us/charger",
                f"gateway CPU {r['returning']['gateway_cpu'] * 1e6:.0f} us/charger"))
        print_table(f"queues: {r['type']} {r['arguments']}, {r['chargers']} chargers, "
                    f"{r['nodes']} node(s)", rows)


def markdown(results: list) -> str:
    """One table row per run, for bench/README.md (``--markdown FILE...``)."""
    lines = [
        "| queue type | nodes | chargers | broker memory per charger online: Erlang / RSS "
        "| offline: Erlang / RSS | largest categories online | new: all booted, broker / "
        "gateway CPU each | returning: all booted, broker / gateway CPU each | load average |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        online, offline = r["online"], r["offline"]
        top = sorted(online["breakdown"].items(), key=lambda kv: -kv[1])[:3]
        storms = []
        for storm in ("new", "returning"):
            if storm not in r:
                storms.append("–")
                continue
            x = r[storm]
            missing = r["chargers"] - x["booted"]
            storms.append(f"{x['seconds']:.1f} s, {x['broker_cpu'] * 1e6:,.0f} / "
                          f"{x['gateway_cpu'] * 1e6:,.0f} µs"
                          + (f" ({missing:,} not connected)" if missing else ""))
        lines.append(
            f"| {r['type']} | {r['nodes']} | {r['chargers']:,} "
            f"| {kib(online['erlang'])} / {kib(online['rss'])} "
            f"| {kib(offline['erlang'])} / {kib(offline['rss'])} "
            f"| {', '.join(f'{k} {kib(v)}' for k, v in top)} "
            f"| {storms[0]} | {storms[1]} "
            f"| {r['load_before'].split()[-3]} → {r['load_after'].split()[-3]} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--chargers", type=int, default=10000)
    parser.add_argument("--types", default=",".join(QUEUE_TYPES),
                        help="comma-separated, of " + ", ".join(QUEUE_TYPES))
    parser.add_argument("--nodes", type=int, default=1, help="RabbitMQ nodes in the cluster")
    parser.add_argument("--per-gateway", type=int, default=16000,
                        help="chargers per gateway process")
    parser.add_argument("--procs", type=int, default=4, help="load-generator processes")
    parser.add_argument("--no-returning", dest="returning", action="store_false",
                        help="skip the storm of returning chargers (queues exist)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="another gateway setting")
    parser.add_argument("--json")
    parser.add_argument("--markdown", nargs="+", metavar="JSON",
                        help="print the table of earlier runs' JSON files and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        results = []
        for path in args.markdown:
            with open(path) as f:
                results += json.load(f)["results"]
        print(markdown(results))
        return results
    from tests.faults.cluster import cluster_unavailable

    reason = cluster_unavailable()
    if reason:
        raise SystemExit(f"no RabbitMQ node of our own can run here: {reason}")
    names = args.types.split(",")
    unknown = [name for name in names if name not in QUEUE_TYPES]
    if unknown:
        raise SystemExit(f"unknown queue type(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(QUEUE_TYPES)}")
    print(f"{_common.machine()}; {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}",
          file=sys.stderr)
    results = [bench_type(name, args) for name in names]
    report(results)
    write_json(args.json, {"benchmark": "queues", "args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
