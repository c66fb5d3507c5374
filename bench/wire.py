"""
wire: bytes and TCP segments per OCPP frame, charger side and AMQP side.

One charger (a real WebSocket client, no compression) sends CALLs to a
real gateway one at a time, each answered by the benchmark's CSMS worker
through RabbitMQ; the kernel's own per-socket counters (`ss -ti`:
bytes_sent, bytes_received, segs_out, segs_in) are read before and after,
for the charger's socket and for every AMQP socket of the gateway and of
the worker. Payload bytes include the WebSocket framing (and the TLS
records with --tls); segments let you add the headers of your network:
52 bytes of IPv4 + TCP (with timestamps) per segment, 72 with IPv6, plus
38 of Ethernet framing on the wire.

    python -m bench.wire                 # Heartbeat and MeterValues, ws://
    python -m bench.wire --tls           # the same over wss:// (TLS 1.3)

Prints, per CALL and its CALLRESULT: bytes each way and segments on the
charger's connection; the gateway's AMQP bytes (publish + confirm, the
answer delivered from the charger's queue) and the worker's.
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import subprocess
import uuid

from bench._common import (
    delete_amqp, free_port, print_table, start_target, start_worker, unique, write_json, ws_url,
)

#: A MeterValues of OCPP 1.6 as chargers send them during a session: one
#: meter value, four sampled values (energy register, power, current, voltage).
METER_VALUES = {
    "connectorId": 1, "transactionId": 1234567,
    "meterValue": [{"timestamp": "2026-12-05T16:00:00.000Z", "sampledValue": [
        {"value": "12345678", "context": "Sample.Periodic", "measurand":
         "Energy.Active.Import.Register", "location": "Outlet", "unit": "Wh"},
        {"value": "11040.0", "context": "Sample.Periodic", "measurand":
         "Power.Active.Import", "location": "Outlet", "unit": "W"},
        {"value": "16.0", "context": "Sample.Periodic", "measurand": "Current.Import",
         "phase": "L1", "location": "Outlet", "unit": "A"},
        {"value": "230.1", "context": "Sample.Periodic", "measurand": "Voltage",
         "phase": "L1-N", "location": "Outlet", "unit": "V"},
    ]}],
}

FRAMES = {
    "Heartbeat": {},
    "MeterValues": METER_VALUES,
}

KEYS = ["ocpp16.BootNotification.req", "ocpp16.Heartbeat.req", "ocpp16.MeterValues.req"]

_COUNTER = re.compile(r"\b(bytes_sent|bytes_received|segs_out|segs_in):(\d+)")
_PEER = re.compile(r"\S+:(\d+)\s+\S+:(\d+)")


def socket_counters(match: str, pid: int | None = None) -> dict:
    """
    The kernel's counters summed over the established TCP sockets that
    C{ss} selects with the filter C{match}, of process C{pid} when given.
    """
    out = subprocess.run(["ss", "-tinpH", "state", "established", match],
                         capture_output=True, text=True, check=True).stdout
    totals = {"bytes_sent": 0, "bytes_received": 0, "segs_out": 0, "segs_in": 0}
    owned = False
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            owned = pid is None or f"pid={pid}," in line
            continue
        if owned:
            for key, value in _COUNTER.findall(line):
                totals[key] += int(value)
    return totals


def delta(before: dict, after: dict, rounds: int) -> dict:
    return {key: (after[key] - before[key]) / rounds for key in before}


def run(args) -> dict:
    import websocket  # websocket-client: a plain, compression-free client

    exchange = unique("bench-wire")
    port = free_port()
    gateway = start_target("gateway", port, exchange, tls=args.tls)
    worker = start_worker(exchange, KEYS)
    identity = unique("wire")
    result: dict = {"tls": args.tls, "rounds": args.rounds, "frames": {}}
    try:
        ws = websocket.create_connection(
            ws_url(port, identity, args.tls), subprotocols=["ocpp1.6"],
            sslopt={"cert_reqs": ssl.CERT_NONE, "check_hostname": False})
        if args.tls:
            result["tls_version"] = ws.sock.version()
        local_port = ws.sock.getsockname()[1]

        def call(action: str, payload: dict) -> bytes:
            message = [2, str(uuid.uuid4()), action, payload]
            ws.send(json.dumps(message, separators=(",", ":")))
            answer = ws.recv()
            if json.loads(answer)[0] != 3:
                raise RuntimeError(f"{action} answered {answer!r}")
            return answer

        call("BootNotification", {"chargePointVendor": "bench", "chargePointModel": "m1"})
        broker = f"( dport = :{args.broker_port} )"
        for action, payload in FRAMES.items():
            frame = json.dumps([2, str(uuid.uuid4()), action, payload], separators=(",", ":"))
            answer = call(action, payload)
            before = (socket_counters(f"( sport = :{local_port} )"),
                      socket_counters(broker, gateway.pid), socket_counters(broker, worker.pid))
            for _ in range(args.rounds):
                call(action, payload)
            after = (socket_counters(f"( sport = :{local_port} )"),
                     socket_counters(broker, gateway.pid), socket_counters(broker, worker.pid))
            charger, gateway_amqp, worker_amqp = (
                delta(b, a, args.rounds) for b, a in zip(before, after))
            result["frames"][action] = {
                "frame_bytes": len(frame), "answer_bytes": len(answer),
                "charger": charger, "gateway_amqp": gateway_amqp, "worker_amqp": worker_amqp,
            }
        ws.close()
    finally:
        worker.stop()
        gateway.stop()
        delete_amqp(exchange, ["ocpp." + identity])
    return result


def report(result: dict) -> None:
    for action, r in result["frames"].items():
        c, g, w = r["charger"], r["gateway_amqp"], r["worker_amqp"]
        rows = [
            ("OCPP-J text (CALL / CALLRESULT)", f"{r['frame_bytes']} / {r['answer_bytes']} B"),
            ("charger socket: sent / received", f"{c['bytes_sent']:.0f} / {c['bytes_received']:.0f} B",
             f"segments out / in {c['segs_out']:.2f} / {c['segs_in']:.2f}"),
            ("  + IPv4/TCP headers (52 B a segment)",
             f"{c['bytes_sent'] + c['bytes_received'] + 52 * (c['segs_out'] + c['segs_in']):.0f} B"
             " a round trip"),
            ("gateway AMQP: sent / received", f"{g['bytes_sent']:.0f} / {g['bytes_received']:.0f} B",
             f"segments out / in {g['segs_out']:.2f} / {g['segs_in']:.2f}"),
            ("worker AMQP: sent / received", f"{w['bytes_sent']:.0f} / {w['bytes_received']:.0f} B",
             f"segments out / in {w['segs_out']:.2f} / {w['segs_in']:.2f}"),
        ]
        scheme = f"wss, {result.get('tls_version')}" if result["tls"] else "ws"
        print_table(f"wire: {action} round trip ({scheme}), mean of {result['rounds']}", rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--tls", action="store_true", help="wss:// (throw-away ECDSA certificate)")
    parser.add_argument("--broker-port", type=int, default=5672,
                        help="AMQP port of the broker the benchmark uses")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = run(args)
    report(result)
    write_json(args.json, {"benchmark": "wire", "args": vars(args), **result})
    return result


if __name__ == "__main__":
    main()
