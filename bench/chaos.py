"""
chaos: RabbitMQ nodes killed hard, over and over, under gateway processes
serving slow chargers and a stream of commands.

The scenario of the multi-node fault test (tests/faults/chaos.py), longer
and bigger: a 3-node cluster of its own (never the broker on 5672), two
gateway processes with quorum charger queues, chargers that beat every
second and answer commands after 0.2-1.5 s, and a back end sending
commands; then, round after round, the node gateway n uses is killed with
kill -9, and started again once every charger is served. Prints one line
per kill and a summary:

    chaos: sent=… answered=… lost=… duplicated=… answers_twice=…
           unrecovered=… closed=… max_recovery=…s probe={status: count}

lost: commands the broker took that were never answered; duplicated:
commands a charger received twice (every charger stays connected to its
gateway throughout); max_recovery: the longest time from a kill until a
charger had a Heartbeat answered again. Exit status 1 if anything was
lost or duplicated, a charger closed or never served again, or a new
charger answered 500.

    python -m bench.chaos                           # 200 chargers, 6 kills
    python -m bench.chaos --chargers 400 --kills 10 --rate 50 --seed 7
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from twisted.internet import defer, task, threads


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chargers", type=int, default=200)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--rate", type=float, default=50.0, help="commands per second")
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--between", type=float, default=10.0,
                        help="seconds of traffic between a node's restart and the next kill")
    parser.add_argument("--recovery-limit", type=float, default=30.0)
    parser.add_argument("--seed", type=int)
    return parser.parse_args(argv)


@defer.inlineCallbacks
def run(reactor, options) -> int:
    from tests.faults.chaos import Scenario
    from tests.faults.cluster import RabbitCluster, cluster_unavailable

    reason = cluster_unavailable()
    if reason is not None:
        print(f"chaos: cannot run a cluster here: {reason}")
        return 2
    cluster = RabbitCluster(3)
    print("chaos: starting a 3-node cluster ...", flush=True)
    yield threads.deferToThread(cluster.start)
    scenario = Scenario(reactor, cluster, tempfile.mkdtemp(prefix="ocppgw-chaos-"),
                        gateways=options.gateways, chargers=options.chargers,
                        commands_per_second=options.rate, seed=options.seed)
    try:
        yield scenario.start()
        print(f"chaos: {options.chargers} chargers on {options.gateways} gateways, "
              f"{options.rate:g} commands/s, seed {scenario.seed}", flush=True)
        scenario.start_commands()
        yield task.deferLater(reactor, options.between, lambda: None)
        for kill in range(options.kills):
            node = kill % options.gateways  # the node gateway n started on
            before = len(scenario.results.recoveries)
            yield scenario.kill_and_restart(node, options.recovery_limit)
            seconds = [s for _w, s in scenario.results.recoveries[before:]]
            print(f"chaos: kill {kill + 1}: node {node}, chargers served again after "
                  f"max {max(seconds, default=0):.1f} s, sent so far "
                  f"{len(scenario.results.sent)}", flush=True)
            yield task.deferLater(reactor, options.between, lambda: None)
        scenario.stop_commands()
        yield scenario.drain(timeout=120)
        scenario.check_chargers()
    finally:
        yield scenario.stop()
        yield threads.deferToThread(cluster.stop)
    results = scenario.results
    print(results.summary())
    bad = (results.lost or results.duplicates or results.closed or results.unrecovered
           or 500 in results.probe_statuses)
    return 1 if bad else 0


def main(argv=None) -> None:
    options = parse(sys.argv[1:] if argv is None else argv)

    def finished(code):
        if code:
            raise SystemExit(code)  # react ends the process with it

    task.react(lambda reactor: run(reactor, options).addCallback(finished))


if __name__ == "__main__":
    main()
