"""
compress: the memory an idle charger costs with permessage-deflate.

N chargers (the C{websockets} client, which compresses) connect, send a
BootNotification-sized message, get the answer, and stay idle; the
server's RSS per charger is reported for each server setup:

- C{echo-off}, C{echo-zlib}, C{echo-tuned}: a bare autobahn echo server
  with compression refused, accepted with zlib's defaults (autobahn's own
  accept: 2^15 windows, memory level 8, context kept between messages),
  and accepted with ocppgw's tuning (L{ocppgw.trims.accept_deflate} and
  L{ocppgw.trims.LeanDeflate});
- C{gateway-off}, C{gateway-on}: the gateway (twistd ocppgw) with
  C{ws_opts.compress} false and true, answered by the bench worker.

    python -m bench.compress                   # 1,000 chargers, every setup
    python -m bench.compress -n 500 --setups echo-zlib,echo-tuned --offer plain

C{--offer bounded} (the default) offers C{client_max_window_bits}, as
C{websockets} and browsers do, so the server may bound the charger's
window too; C{--offer plain} offers bare C{permessage-deflate}, and the
charger's window (2^15) stands.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time

from bench._common import (
    Proc, delete_amqp, free_port, print_table, start_target, start_worker, unique,
    wait_listening, write_json, ws_url,
)
from bench.roundtrip import WORKER_KEYS

SETUPS = ("echo-off", "echo-zlib", "echo-tuned", "gateway-off", "gateway-on")

#: a BootNotification of a usual size, so that both directions compress
BOOT = ('[2,"{id}","BootNotification",{{"chargePointVendor":"Example","chargePointModel":'
        '"ACME-22kW","chargePointSerialNumber":"SN-0001234567","firmwareVersion":"1.38.00",'
        '"iccid":"8944500102198304826","imsi":"262011234567890","meterType":"DZG",'
        '"meterSerialNumber":"MSN-987654"}}]')


def serve(mode: str, port: int) -> None:
    """The bare echo server (run as its own process)."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
    from twisted.internet import reactor

    from autobahn.websocket.compress import PerMessageDeflate

    from ocppgw.trims import LeanDeflate, accept_deflate

    def zlib_defaults(offers):
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return PerMessageDeflateOfferAccept(offer)
        return None

    accept = {"off": lambda offers: None, "zlib": zlib_defaults, "tuned": accept_deflate}[mode]

    class Echo(WebSocketServerProtocol):
        def onConnect(self, request):
            return "ocpp1.6"

        def onOpen(self):
            # as ocppgw's edge does: no compressor kept between messages
            if mode == "tuned" and type(self._perMessageCompress) is PerMessageDeflate:
                self._perMessageCompress.__class__ = LeanDeflate

        def onMessage(self, payload, is_binary):
            self.sendMessage(payload, is_binary)

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    factory.setProtocolOptions(autoPingInterval=0, perMessageCompressionAccept=accept)
    reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")
    reactor.run()


async def _chargers(urls, offer: str, pipe) -> None:
    from websockets.asyncio.client import connect
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

    if offer == "plain":
        factory = ClientPerMessageDeflateFactory(client_max_window_bits=None)
    else:
        factory = ClientPerMessageDeflateFactory(client_max_window_bits=True)
    connections, compressed = [], 0
    for index, url in enumerate(urls):
        connection = await connect(url, subprotocols=["ocpp1.6"], ping_interval=None,
                                   compression=None, extensions=[factory], open_timeout=60)
        compressed += bool(connection.protocol.extensions)
        await connection.send(BOOT.format(id=f"b{index}"))
        await connection.recv()
        connections.append(connection)
    pipe.send({"open": len(connections), "compressed": compressed})
    pipe.recv()  # measured: close
    for connection in connections:
        await connection.close()
    pipe.send("closed")


def _run_chargers(urls, offer, pipe) -> None:
    asyncio.run(_chargers(urls, offer, pipe))


def _settled_rss(server, timeout: float = 20.0) -> int:
    rss = server.memory()["rss"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = server.memory()["rss"]
        if abs(now - rss) < 64 * 1024:
            return now
        rss = now
    return rss


def bench_setup(setup: str, args) -> dict:
    target, _, mode = setup.partition("-")
    port = free_port()
    exchange = unique("bench-compress")
    identities = [unique("cz") for _ in range(args.chargers)]
    worker = None
    if target == "gateway":
        from bench import _common

        _common.GATEWAY_SETTINGS[:] = [f"websocket.ws_opts.compress={mode == 'on'}".lower()]
        server = start_target("gateway", port, exchange, ping=0)
        worker = start_worker(exchange, WORKER_KEYS)
    else:
        server = Proc(setup, [sys.executable, "-m", "bench.compress", "--serve", mode, str(port)])
        wait_listening(port, server)
    result = {"setup": setup, "chargers": args.chargers, "offer": args.offer}
    parent, child = multiprocessing.Pipe()
    clients = multiprocessing.Process(
        target=_run_chargers, args=([ws_url(port, i) for i in identities], args.offer, child))
    try:
        rss0 = _settled_rss(server)
        clients.start()
        result.update(parent.recv())
        rss1 = _settled_rss(server)
        result.update({"rss_before": rss0, "rss_after": rss1,
                       "kib_per_charger": (rss1 - rss0) / 1024 / max(1, result["open"])})
        parent.send("close")
        parent.recv()
    finally:
        clients.join(60)
        server.stop()
        if worker is not None:
            worker.stop()
        if target == "gateway":
            delete_amqp(exchange, ["ocpp." + i for i in identities])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--chargers", type=int, default=1000)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--offer", choices=("bounded", "plain"), default="bounded")
    parser.add_argument("--json")
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    results = [bench_setup(setup, args) for setup in args.setups.split(",")]
    print_table(
        f"idle chargers with permessage-deflate ({args.chargers} chargers, offer {args.offer})",
        [("setup", "open", "compressed", "KiB/charger")]
        + [(r["setup"], r["open"], r["compressed"], f"{r['kib_per_charger']:.1f}")
           for r in results],
    )
    write_json(args.json, {"chargers": args.chargers, "offer": args.offer, "results": results})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
