"""
workers: the same chargers against C{[listener] workers = 1} and
C{workers = 2}, then one of the two workers killed.

For each setting: N new chargers connect and boot (gateway CPU per
connect), then 1,000 of them keep one Heartbeat in flight each for
--seconds (gateway CPU per round trip, all gateway processes together).
With two workers it also prints how the kernel (SO_REUSEPORT) split the
chargers, and then kills one worker with SIGKILL: how many chargers the
other one lost (must be 0), and how the killed one's chargers came back
(they reconnect at once; the supervisor restarts the worker after 1 s, so
they land on the survivor or on the restarted worker).

    python -m bench.workers                  # 10,000 chargers
    python -m bench.workers -n 2000 --seconds 5 --own-broker

Each worker owns everything on its path: its process and interpreter
(no GIL shared), its epoll reactor, its accepted sockets (the kernel hands
each connection to one listening socket), its AMQP connection and
channels, its confirm window, its consumers and its chargers' sessions.
The supervisor only starts, restarts and signals them. What they share is
the kernel's accept queue hashing and the broker, which is its own
process.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from bench._common import (
    add_settings_argument, apply_settings, broker_pid, delete_amqp, free_port,
    loadgen_processes, print_table, process_tree, start_target,
    start_worker, unique, write_json, ws_url, LoadGen, GATEWAY_SETTINGS,
)
from bench.roundtrip import WORKER_KEYS, Meter, cpu_cells, per_rt
from bench.storm import one_storm


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def workers_of(server) -> list:
    """The gateway worker processes (children of the supervisor), by pid."""
    return sorted(process_tree(server.pid)[1:])


def wait_workers(server, count: int, timeout: float = 60.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = workers_of(server)
        if len(pids) == count:
            return pids
        time.sleep(0.2)
    raise RuntimeError(f"{count} workers did not start:\n{server.output()[-3000:]}")


def wait_stable(loadgen, seconds: float = 2.0, timeout: float = 30.0) -> int:
    """The number of open chargers once it has not changed for C{seconds}."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = sum(r["open"] for r in loadgen.all("stats"))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            break
        time.sleep(0.2)
    return last


def round_trips(loadgen, meter, chargers: int, seconds: float) -> dict:
    before = meter.snapshot()
    runs = loadgen.all("closed_loop", seconds=seconds, chargers=max(1, chargers // len(loadgen)))
    after = meter.snapshot()
    count = sum(r["count"] for r in runs)
    return {"rate": count / seconds, "cpu": per_rt(Meter.delta(before, after), count)}


def kill_one(server, loadgen, chargers: int, files0: dict, retries: int) -> dict:
    """
    SIGKILL the first worker; count what the other lost and where the
    killed worker's chargers went.
    """
    victim, survivor = wait_workers(server, 2)
    held = {pid: open_files(pid) for pid in (victim, survivor)}
    victims_chargers = held[victim] - files0[victim]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    still_open = wait_stable(loadgen)
    dropped = chargers - still_open
    reconnected = loadgen.all("reconnect", retries=retries)
    back = sum(r["booted"] for r in reconnected)
    seconds = time.monotonic() - killed
    pids = wait_workers(server, 2)
    restarted = [pid for pid in pids if pid != survivor]
    survivor_took = open_files(survivor) - held[survivor]
    return {
        "open_before": chargers, "open_after_kill": still_open,
        "victims_chargers": victims_chargers,
        "survivor_lost": dropped - victims_chargers,
        "dropped": dropped, "reconnected": back,
        "refused": {k: v for r in reconnected for k, v in r["refused"].items()},
        "retried": sum(r.get("retried", 0) for r in reconnected),
        "to_survivor": survivor_took, "to_restarted": back - survivor_took,
        "restarted_pid": restarted[0] if restarted else None,
        "seconds_until_all_back": seconds,
        "all_open_at_end": sum(r["open"] for r in loadgen.all("stats")),
    }


def run(workers: int, args) -> dict:
    exchange = unique("bench-workers")
    port = free_port()
    identities = [unique("wk") for _ in range(args.chargers)]
    urls = [ws_url(port, i) for i in identities]
    GATEWAY_SETTINGS[:] = [*args.set, f"listener.workers={workers}"]
    server = start_target("gateway", port, exchange, ping=60)
    worker = start_worker(exchange, WORKER_KEYS)
    loadgen = LoadGen(loadgen_processes(args.chargers, args.procs))
    meter = Meter(server, worker, loadgen, broker_pid())
    result: dict = {"workers": workers, "chargers": args.chargers}
    try:
        pids = wait_workers(server, workers) if workers > 1 else [server.pid]
        files0 = {pid: open_files(pid) for pid in pids}
        result["connect"] = one_storm(loadgen, urls, meter, args.retries)
        result["split"] = [open_files(pid) - files0[pid] for pid in pids]
        result["round_trip"] = round_trips(loadgen, meter, args.round_trip_chargers, args.seconds)
        if workers == 2:
            result["kill"] = kill_one(server, loadgen, result["connect"]["booted"], files0,
                                      args.retries)
        loadgen.all("close")
    finally:
        loadgen.close()
        worker.stop()
        server.stop()
        delete_amqp(exchange, ["ocpp." + i for i in identities])
    return result


def report(results, args) -> None:
    one = results[0]
    for r in results:
        c, rt = r["connect"], r["round_trip"]
        rows = [
            ("connect + boot", f"{c['booted']} of {r['chargers']} in {c['seconds']:.1f} s"),
            ("  CPU per connect", ", ".join(f"{k} {v:.0f} µs"
                                            for k, v in c["cpu_per_charger_us"].items())),
            ("chargers per worker (open files gained)", ", ".join(str(n) for n in r["split"])),
            (f"round trips ({args.round_trip_chargers} chargers)", f"{rt['rate']:.0f}/s"),
            ("  CPU per round trip", cpu_cells(rt["cpu"])),
        ]
        if r is not one:
            rows.append(("gateway CPU vs workers = 1",
                         f"per connect {c['cpu_per_charger_us']['server'] / one['connect']['cpu_per_charger_us']['server']:.2f}x",
                         f"per round trip {rt['cpu']['server']['us_per_rt'] / one['round_trip']['cpu']['server']['us_per_rt']:.2f}x"))
        if "kill" in r:
            k = r["kill"]
            rows += [
                ("one worker killed (SIGKILL)",
                 f"it held {k['victims_chargers']}; dropped {k['dropped']}; "
                 f"the other worker lost {k['survivor_lost']}"),
                ("  dropped ones back", f"{k['reconnected']} of {k['dropped']} in "
                 f"{k['seconds_until_all_back']:.1f} s", f"to the survivor {k['to_survivor']}, "
                 f"to the restarted worker {k['to_restarted']}",
                 f"refused {k['refused'] or 0}, retried after 503: {k['retried']}"),
                ("  open at the end", f"{k['all_open_at_end']} of {k['open_before']}"),
            ]
        print_table(f"workers = {r['workers']}: {r['chargers']} chargers", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--chargers", type=int, default=10000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0, help="round-trip phase")
    parser.add_argument("--round-trip-chargers", type=int, default=1000)
    parser.add_argument("--retries", type=int, default=5)
    add_settings_argument(parser)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    apply_settings(args)
    results = [run(1, args), run(2, args)]
    report(results, args)
    write_json(args.json, {"benchmark": "workers", "args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    main()
