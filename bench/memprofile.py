"""
Where an idle charger's memory goes: runs the gateway in this process
under tracemalloc, connects N chargers from load-generator processes, and
prints the allocations per charger by source line.

    python -m bench.memprofile -n 1000
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--chargers", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--target", default="gateway", choices=("gateway", "echo"))
    parser.add_argument("--tune-gc", action="store_true", help="as twistd ocppgw does (ocppgw.tuning)")
    parser.add_argument("--no-trace", action="store_true", help="only the GC time, without tracemalloc")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the attributes")
    args = parser.parse_args()

    from twisted.internet import reactor, threads

    from bench._common import (
        AMQP_URL, LoadGen, delete_amqp, free_port, split, start_worker, unique, ws_url,
    )
    from bench.roundtrip import WORKER_KEYS

    exchange = unique("bench-mem")
    port = free_port()
    identities = [unique("mem") for _ in range(args.chargers)]
    worker = start_worker(exchange, WORKER_KEYS)
    loadgen = LoadGen(args.procs)

    if args.target == "gateway":
        from ocppgw.service import makeService

        service = makeService({
            "listener": {"tcp.port": str(port)},
            "amqp": {"url": AMQP_URL, "exchange": exchange, "node": unique("mem")},
            "websocket": {"ws_opts.idle_timeout": "10"},
        }, reactor=reactor)
        service.startService()
        started = service.started
    else:
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
        from twisted.internet import defer

        class Echo(WebSocketServerProtocol):
            def onConnect(self, request):
                return "ocpp1.6"

            def onMessage(self, payload, isBinary):
                self.sendMessage(payload, isBinary)

        factory = WebSocketServerFactory()
        factory.protocol = Echo
        factory.setProtocolOptions(autoPingInterval=10, autoPingTimeout=30)
        reactor.listenTCP(port, factory, interface="127.0.0.1")
        started = defer.succeed(None)

    import time as _time

    gc_time = [0.0, 0, None]

    def gc_callback(phase, info):
        if phase == "start":
            gc_time[2] = _time.perf_counter()
        elif gc_time[2] is not None:
            gc_time[0] += _time.perf_counter() - gc_time[2]
            gc_time[1] += 1

    if args.tune_gc:
        from ocppgw.tuning import tune_gc

        tune_gc()

    def run(_):
        # warm up with a few chargers so one-time allocations are not counted
        warm = [unique("warm") for _ in range(20)]
        identities.extend(warm)  # deleted at the end with the others
        warm_urls = [ws_url(port, i) for i in warm]
        loadgen.send([("connect", {"urls": part}) for part in split(warm_urls, len(loadgen))])
        gc.collect()
        if not args.no_trace:
            tracemalloc.start(3)
        before = None if args.no_trace else tracemalloc.take_snapshot()
        urls = [ws_url(port, i) for i in identities[:args.chargers]]
        cpu0 = _time.process_time()
        gc.callbacks.append(gc_callback)
        results = loadgen.send([("connect", {"urls": part}) for part in split(urls, len(loadgen))])
        gc.callbacks.remove(gc_callback)
        cpu = _time.process_time() - cpu0
        print(f"connect storm: {cpu * 1e6 / args.chargers:.0f} µs CPU per charger, of which GC "
              f"{gc_time[0] * 1e6 / args.chargers:.0f} µs ({100 * gc_time[0] / cpu:.1f} %, "
              f"{gc_time[1]} collections)")
        booted = sum(r.get("booted", 0) for r in results)
        import time
        time.sleep(3)
        return before, booted

    def report(result):
        before, booted = result
        if before is None:
            reactor.stop()
            return
        gc.collect()
        after = tracemalloc.take_snapshot()
        stats = after.compare_to(before, "lineno")
        total = sum(s.size_diff for s in stats)
        print(f"{booted} chargers: {total / booted:.0f} bytes per charger (traced Python allocations)")
        for s in stats[: args.top]:
            frame = s.traceback[0]
            print(f"{s.size_diff / booted:8.0f} B {s.count_diff / booted:6.2f} blocks  "
                  f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}")
        if args.target == "gateway" and service.gateway.chargers:
            import sys
            edge = next(iter(service.gateway.chargers.values())).edge
            attrs = vars(edge)
            print(f"transport: {len(vars(edge.transport))} attributes, {sys.getsizeof(vars(edge.transport))} B")
            print(f"one charger's protocol: {len(attrs)} attributes, "
                  f"instance dict {sys.getsizeof(attrs)} B")
            if args.verbose:
                for name in sorted(attrs):
                    print(f"  {name} = {attrs[name]!r:.60}")
                link = next(iter(service.gateway.chargers.values()))
                _inventory(link, service.gateway)
        reactor.stop()

    def failed(failure):
        print(failure)
        reactor.stop()

    started.addCallback(lambda _: threads.deferToThread(run, None)).addCallbacks(report, failed)
    reactor.run()
    loadgen.close()
    worker.stop()
    delete_amqp(exchange, ["ocpp." + i for i in identities] if args.target == "gateway" else [])


def _inventory(link, gateway) -> None:
    """
    Print the objects one charger holds on its own -- reached from its
    link, its connection and its transport, and referred to by nothing
    else -- by path, with their sizes.
    """
    import sys

    roots = [("link", link), ("edge", link.edge), ("transport", link.edge.transport)]
    mine = {id(obj) for _, obj in roots}
    queue = list(roots)
    total = 0
    while queue:
        path, obj = queue.pop(0)
        size = sys.getsizeof(obj)
        total += size
        print(f"  {size:6d} B  {type(obj).__qualname__:28.28s} {path}")
        if isinstance(obj, (bytes, str, int, float)):
            continue
        if isinstance(obj, dict):
            children = [(f"{path}[{k!r:.24}]", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        else:
            children = []
            names = [] if isinstance(obj, type) else list(getattr(obj, "__dict__", None) or {})
            for klass in type(obj).__mro__:
                slots = getattr(klass, "__slots__", ())
                names.extend([slots] if isinstance(slots, str) else slots)
            for name in names:
                try:
                    children.append((f"{path}.{name}", getattr(obj, name)))
                except AttributeError:
                    pass
            if getattr(obj, "__dict__", None) is not None and not isinstance(obj, type):
                children.append((f"{path}.__dict__", obj.__dict__))
            if hasattr(obj, "__self__") and hasattr(obj, "__func__"):
                children.append((f"{path}.__self__", obj.__self__))
        for child_path, child in children:
            if id(child) in mine or child is None or isinstance(child, (bool, type)):
                continue
            referrers = [r for r in gc.get_referrers(child)
                         if r is not queue and r is not children and id(r) in mine]
            if isinstance(child, (str, bytes, int, float)):
                # not tracked: count it when only this charger can hold it
                if sys.getrefcount(child) > 3:
                    continue
            elif not referrers or len(gc.get_referrers(child)) - 2 > len(referrers):
                continue
            mine.add(id(child))
            queue.append((child_path, child))
    print(f"  {total} B in all")


if __name__ == "__main__":
    main()
