"""
hub: the gateway's own work per frame, in memory: Gateway.charger_frame
(audit check, rate limit, session, publish) for a charger's CALL, and a
CSMS command's round trip (delivery, send, the charger's answer, confirm,
ack), with a stand-in edge and bridge that do nothing.

    python -m bench.hub [--number 30000] [--source /other/checkout]

Prints CPU nanoseconds per frame (process time, best of --repeat runs), so
other processes on a busy machine disturb the figure little. No sockets,
no broker: what changes between two checkouts of the gateway's per-frame
code shows here long before it shows in bench.roundtrip.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit


class _Factory:
    listener = "ws"


class _Edge:
    factory = _Factory()
    link = None
    #: read by checkouts from before ocppgw.charger existed
    inherited_calls = None

    def __init__(self, version) -> None:
        self.identity = "CP1"
        self.version = version
        self.peer = "tcp4:127.0.0.1:1"

    def send_frame(self, frame) -> None:
        pass

    def close(self, code, reason) -> None:
        pass

    def pause_reading(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=30000)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--source", help="measure the ocppgw of this checkout")
    options = parser.parse_args()
    if options.source:
        sys.path.insert(0, options.source)

    from twisted.internet import defer
    from twisted.internet.task import Clock

    from ocppgw.framing import OCPP16
    from ocppgw.gateway import Gateway
    from ocppgw.metrics import Metrics
    from ocppgw.outcome import Delivery, PublishOutcome
    from ocppgw.validation import WARN, Validation

    class Bridge:
        connected = True

        def declare_queue(self, *args):
            return defer.succeed(None)

        def consume(self, *args):
            return defer.Deferred()

        def publish(self, *args, on_outcome=None, **kwargs):
            if on_outcome is not None:
                on_outcome(PublishOutcome.CONFIRMED)

        def may_have_peers(self):
            return False

        def add_observer(self, observer):
            pass

        add_flow_observer = add_control_handler = add_topology_observer = add_observer

    def attached(**settings):
        gateway = Gateway(Clock(), Bridge(), node="n", queue_arguments={},
                          metrics=Metrics(process=False), **settings)
        edge = _Edge(OCPP16)
        defer.ensureDeferred(gateway.charger_connecting(edge, "CP1", OCPP16))
        gateway.charger_opened(edge)
        return gateway, edge

    def charger_call(gateway, edge):
        frame = gateway.charger_frame
        data = b'[2,"m1","Heartbeat",{}]'
        return lambda: frame(edge, data)

    def command(gateway, edge):
        session, frame = edge.link.session, gateway.charger_frame
        delivery = Delivery("t", b'[2,"c1","Reset",{"type":"Soft"}]')
        answer = b'[3,"c1",{"status":"Accepted"}]'

        def run():
            session.delivery(delivery)
            frame(edge, answer)

        return run

    def warn():
        return Validation(WARN, [OCPP16])

    cases = (
        ("charger CALL", charger_call, {}),
        ("charger CALL, validation warn", charger_call, {"validation": warn()}),
        ("charger CALL, warn + rate limit", charger_call,
         {"validation": warn(), "max_message_rate": 1e12, "message_burst": 10**9}),
        ("CSMS command round trip", command, {}),
        ("CSMS command, validation warn", command, {"validation": warn()}),
    )
    number = options.number
    for name, make, settings in cases:
        run = make(*attached(**settings))
        best = min(timeit.repeat(run, number=number, repeat=options.repeat,
                                 timer=time.process_time))
        print(f"{name:34s} {best / number * 1e9:7.0f} ns")


if __name__ == "__main__":
    main()
