"""
What every benchmark shares: starting the server under test and its
helpers as separate processes, reading their CPU time and memory from
/proc, the broker's memory, the load-generator pool, and printing tables.

Figures are per-process CPU time (user + system, from /proc/<pid>/stat),
not wall-clock, so that they stay meaningful on a machine that is busy with
other work.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from typing import Optional

AMQP_URL = os.environ.get("OCPPGW_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: the ocppgw source tree the server runs from (another checkout to compare)
SOURCE = os.environ.get("OCPPGW_BENCH_SOURCE", ROOT)
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

#: what can be benchmarked: the gateway and the two baselines
TARGETS = ("gateway", "bridge", "echo")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_tree(pid: int) -> list:
    """C{pid} and its descendants (a gateway with workers = N forks N)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    total = 0.0
    for member in process_tree(pid):
        try:
            total += cpu_seconds(member)
        except OSError:
            pass
    return total


def memory(pid: int) -> dict:
    """RSS and peak RSS (VmHWM) in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value, _unit = line.split()
                out[key[:-1]] = int(value) * 1024
    # a process that has just exited (a zombie) has no memory lines
    return {"rss": out.get("VmRSS", 0), "hwm": out.get("VmHWM", 0)}


def self_cpu() -> float:
    return time.process_time()


#: the RabbitMQ node of this run when it started its own (L{use_own_broker})
_OWN_BROKER = None


def use_own_broker() -> str:
    """
    Start a RabbitMQ node of this run's own (tests/faults/cluster.py: own
    name, ports, data directory and cookie; stopped and removed at exit)
    and point the run at it: other runs' queues on the shared broker do
    not disturb its CPU and memory figures. Returns its AMQP URL.
    """
    global AMQP_URL, _OWN_BROKER
    from tests.faults.cluster import RabbitCluster

    _OWN_BROKER = RabbitCluster(1)
    _OWN_BROKER.start()
    AMQP_URL = _OWN_BROKER.url(0)
    os.environ["OCPPGW_BENCH_AMQP_URL"] = AMQP_URL
    return AMQP_URL


def _broker_status() -> dict:
    if _OWN_BROKER is not None:
        return json.loads(_OWN_BROKER.ctl(0, "status", "--formatter", "json").stdout)
    out = subprocess.run(
        ["rabbitmqctl", "status", "--formatter", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return json.loads(out)


def broker_memory() -> Optional[int]:
    """The broker's Erlang-allocated memory in bytes (rabbitmqctl status)."""
    try:
        return int(_broker_status()["memory"]["total"]["erlang"])
    except Exception as error:  # a benchmark without this figure still runs
        print(f"  (broker memory unavailable: {error})", file=sys.stderr)
        return None


def broker_pid() -> Optional[int]:
    try:
        return int(_broker_status()["pid"])
    except Exception:
        return None


class Proc:
    """A helper process (server under test, worker) we started."""

    def __init__(self, name: str, argv: list, env: Optional[dict] = None) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.popen = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                filter(None, [SOURCE, os.environ.get("OCPPGW_BENCH_EXTRA_PATH")])),
                **(env or {})},
        )
        self.pid = self.popen.pid

    def cpu(self) -> float:
        return tree_cpu_seconds(self.pid)

    def memory(self) -> dict:
        """RSS and peak RSS, summed over the process and its children."""
        out = {"rss": 0, "hwm": 0}
        for member in process_tree(self.pid):
            try:
                for key, value in memory(member).items():
                    out[key] += value
            except OSError:
                pass
        return out

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def signal(self, sig) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if os.environ.get("OCPPGW_BENCH_KEEP_LOGS"):
            print(f"{self.name} log kept: {self.log.name}")
        else:
            os.unlink(self.log.name)


def start_profile(pid: int, output: str) -> subprocess.Popen:
    """py-spy sampling C{pid} until L{stop_profile}, collapsed stacks to C{output}."""
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "250", "--nonblocking",
         "--format", "raw", "--output", output],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def stop_profile(proc: Optional[subprocess.Popen]) -> None:
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def wait_listening(port: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not listen on {port}:\n{proc.output()[-3000:]}")


def wait_line(proc: Proc, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.output():
            return
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready:\n{proc.output()[-3000:]}")


#: gateway settings given with --set section.key=value, for every run
GATEWAY_SETTINGS: list = []


def add_settings_argument(parser) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="a gateway setting for this run, e.g. --set amqp.consumer_channels=16",
    )
    parser.add_argument(
        "--own-broker", action="store_true",
        help="start a RabbitMQ node of this run's own instead of using the shared one",
    )


def apply_settings(args) -> None:
    GATEWAY_SETTINGS[:] = args.set
    if getattr(args, "own_broker", False):
        print(f"own RabbitMQ node: {use_own_broker()}", flush=True)


#: server key types: openssl req's -newkey arguments
SERVER_KEYS = {
    "ec": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "rsa": ["-newkey", "rsa:2048"],
}


def make_certificate(kind: str = "ec") -> tuple:
    """
    A throw-away self-signed server certificate: (certfile, keyfile), an
    ECDSA P-256 (C{ec}) or RSA-2048 (C{rsa}) key.
    """
    directory = tempfile.mkdtemp(prefix="bench-tls-")
    cert, key = os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")
    subprocess.run(
        ["openssl", "req", "-x509", *SERVER_KEYS[kind],
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )
    return cert, key


def gateway_ini(port: int, exchange: str, *, ping: float = 60, expires_ms: int = 600000,
                tls: bool = False, key: str = "ec", extra: Optional[dict] = None) -> str:
    """
    A gateway configuration for a benchmark run (a temporary INI file).

    With C{tls}, chargers connect to a wss:// listener on C{port} (profile
    0: no charger authentication, allowed on 127.0.0.1, unless C{extra}
    says otherwise), its certificate has a C{key} key (L{SERVER_KEYS}),
    and the plain listener moves to another free port.

    @param extra: more settings by section (the benchmark's own);
        C{--set} still overrides them.
    """
    sections: dict = {
        "listener": {"tcp.ip": "127.0.0.1", "tcp.port": str(port),
                     "max_connections": "200000"},
        "websocket": {"ws_opts.idle_timeout": f"{ping:g}", "handshake_timeout": "60"},
        "amqp": {"url": AMQP_URL, "exchange": exchange, "node": unique("bench")},
        "queue": {"x-expires": str(expires_ms)},
        # the default admin port (9100) may be taken by another run
        "admin": {"tcp.port": "0"},
    }
    if tls:
        certfile, keyfile = make_certificate(key)
        sections["listener"].update({
            "ssl.enabled": "true", "ssl.ip": "127.0.0.1", "ssl.port": str(port),
            "ssl.profile": "0", "ssl.certfile": certfile, "ssl.keyfile": keyfile,
            "tcp.port": str(free_port()),
        })
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    # --set overrides the defaults above
    for item in GATEWAY_SETTINGS:
        name, _, value = item.partition("=")
        section, _, key = name.partition(".")
        sections.setdefault(section, {})[key] = value
    text = "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
        for section, values in sections.items()
    )
    f = tempfile.NamedTemporaryFile("w", prefix="bench-gw-", suffix=".ini", delete=False)
    f.write(text)
    f.close()
    return f.name


def start_target(target: str, port: int, exchange: str, *, ping: float = 60,
                 expires_ms: int = 600000, tls: bool = False, key: str = "ec",
                 extra: Optional[dict] = None) -> Proc:
    """
    Start the server under test as its own process and wait until it listens.

    The gateway runs as C{twistd -n ocppgw} with a generated configuration,
    exactly as in production (default reactor: epoll).
    """
    python = sys.executable
    if target == "gateway":
        ini = gateway_ini(port, exchange, ping=ping, expires_ms=expires_ms, tls=tls, key=key,
                          extra=extra)
        twistd = os.path.join(os.path.dirname(python), "twistd")
        argv = [twistd, "-n", "--pidfile=", "ocppgw", "--config", ini]
    elif target == "bridge":
        if tls:
            raise ValueError("the bare bridge has no TLS listener")
        argv = [python, os.path.join(HERE, "bare_bridge.py"), str(port), exchange, AMQP_URL, str(ping)]
    elif target == "echo":
        argv = [python, os.path.join(HERE, "bare_echo.py"), str(port), str(ping),
                *(make_certificate(key) if tls else ())]
    else:
        raise ValueError(target)
    proc = Proc(target, argv)
    try:
        wait_listening(port, proc)
        if target == "bridge":
            wait_line(proc, "bridge ready")
    except BaseException:
        # a gateway that never listened (a bad setting) would otherwise
        # keep restarting its workers after the run is over
        proc.stop()
        raise
    return proc


def start_worker(exchange: str, keys: list, name: str = "worker", queue: str = "",
                 url: Optional[str] = None) -> Proc:
    """
    The CSMS worker that answers charger CALLs (bench/worker.py) on the
    broker at C{url} (default: the run's broker, read now, so that it is
    the run's own node after L{use_own_broker}); workers given the same
    C{queue} share it.
    """
    url = url or AMQP_URL
    argv = [sys.executable, os.path.join(HERE, "worker.py"), url, exchange,
            queue or "-", *keys]
    proc = Proc(name, argv)
    wait_line(proc, "worker ready")
    return proc


def delete_amqp(exchange: Optional[str], queues: list) -> float:
    """
    Delete a run's queues and exchange; returns the seconds it took. On a
    node of the run's own (L{use_own_broker}) nothing is deleted: the
    node goes at exit with everything in it.
    """
    import pika

    started = time.monotonic()
    if _OWN_BROKER is not None:
        return 0.0
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for queue in queues:
        channel.queue_delete(queue)
    if exchange:
        channel.exchange_delete(exchange)
    connection.close()
    return time.monotonic() - started


def percentiles(samples, points=(50, 99, 99.9)) -> dict:
    if not samples:
        return {f"p{p:g}": None for p in points}
    ordered = sorted(samples)
    n = len(ordered)
    return {f"p{p:g}": ordered[min(n - 1, int(n * p / 100))] for p in points}


def ms(value) -> str:
    return "-" if value is None else f"{value * 1000:.2f} ms"


# -- the load-generator pool ---------------------------------------------------


#: Sockets one load-generator process is given at most: every process here
#: may open 20,000 files (a hard limit), and it needs a few for itself.
SOCKETS_PER_PROCESS = 15000


def loadgen_processes(chargers: int, asked: int) -> int:
    """
    At least C{asked} load-generator processes, and enough that none holds
    more than L{SOCKETS_PER_PROCESS} chargers.
    """
    return max(asked, -(-chargers // SOCKETS_PER_PROCESS))


def source_address(index: int) -> str:
    """
    The loopback source address of load-generator process C{index}:
    127.0.0.2, 127.0.0.3, ... Each (source, gateway port) pair has its own
    ephemeral port range, so the range does not cap the chargers.
    """
    return f"127.0.0.{2 + index}"


class LoadGen:
    """
    Several load-generator processes (bench/loadgen.py), driven in lock-step:
    every command goes to all of them and their answers are gathered. Each
    connects from its own loopback address (L{source_address}).
    """

    def __init__(self, procs: int) -> None:
        from bench import loadgen

        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for index in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=loadgen.main, args=(child, index, source_address(index)),
                            daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def __len__(self) -> int:
        return len(self.procs)

    def send(self, commands: list) -> list:
        for pipe, command in zip(self.pipes, commands):
            pipe.send(command)
        results = [pipe.recv() for pipe in self.pipes]
        errors = sum(r.get("errors", 0) for r in results if isinstance(r, dict))
        if errors:
            # the figures leave them out; a run where nothing took the
            # CALLs (no worker on the gateway's broker) must not pass for
            # a fast one
            print(f"WARNING: {errors} CALLs were answered CALLERROR and are not counted "
                  "as round trips", file=sys.stderr, flush=True)
        return results

    def all(self, name: str, **kwargs) -> list:
        return self.send([(name, kwargs)] * len(self.pipes))

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("exit", {}))
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def split(items: list, parts: int) -> list:
    return [items[i::parts] for i in range(parts)]


def merge_samples(results: list, key: str) -> array:
    out = array("d")
    for r in results:
        out.frombytes(r[key])
    return out


def ws_url(port: int, identity: str, tls: bool = False) -> str:
    return f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/ocpp/{identity}"


def print_table(title: str, rows: list) -> None:
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows)
    for name, *values in rows:
        print(f"  {name:<{width}}  " + "  ".join(str(v) for v in values))


def write_json(path: Optional[str], data: dict) -> None:
    if path:
        data = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine(), **data}
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except Exception:
        model = "?"
    load = os.getloadavg()
    return f"{os.cpu_count()} cores, {model}, load {load[0]:.2f}"
