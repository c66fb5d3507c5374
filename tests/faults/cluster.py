"""
A RabbitMQ cluster of our own on this machine, for tests that kill broker
nodes hard.

Every node runs under a name no other run uses (C{ocppgw-ha0-<hex>@localhost}
...), with its own AMQP and distribution ports, data, log and pid files, and
the nodes of one cluster share a random Erlang cookie that lives in a HOME
of the cluster's own. The cookie is what keeps the cluster and the system
broker (C{rabbit@localhost} on 5672) apart: with another cookie neither side
can reach the other, so nothing here can stop, reconfigure or join it, and
no C{rabbitmqctl} of ours can touch it.

We run RabbitMQ's real scripts in C{/usr/lib/rabbitmq/bin}: the wrappers in
C{/usr/sbin} switch to the rabbitmq user, and with it to that user's HOME
and cookie (the system node's). The system's C{rabbitmq-env.conf} (node name)
and C{rabbitmq.conf} (port 5672) are replaced by files of each node's own,
and the enabled-plugins file is empty so that no management or Prometheus
listener collides with the system node's.

RabbitMQ 3.10 sets the node name at run time: it is not on C{beam.smp}'s
command line, only in its environment. A process is taken for one of our
nodes only when C{/proc/<pid>/environ} says C{RABBITMQ_NODENAME=<that node>},
so a stale pid file can never make us kill another process.

Everything here blocks (C{rabbitmqctl} takes about half a second per call):
use it from C{setUp}/C{setUpClass}, through L{shared_cluster}, or from
reactor code with C{threads.deferToThread}.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional, Sequence

from tests.support import free_port

#: RabbitMQ's scripts that run as the calling user (those in /usr/sbin
#: switch to the rabbitmq user and take its HOME and cookie).
SCRIPTS = "/usr/lib/rabbitmq/bin"

#: Ports the system broker, its plugins or the CLI tools may use: AMQP(S),
#: its distribution port (AMQP + 20000), management, Prometheus, the CLI
#: tools' distribution range (35672-35682) and epmd.
_RESERVED_PORTS = frozenset(
    {4369, 5671, 5672, 15671, 15672, 15692, 25672, *range(35672, 35683)}
)

#: How long the whole cluster may take to come up. Three nodes are up and
#: joined in about 13 s on two cores; the rest is for a machine that runs
#: other test suites at the same time.
START_TIMEOUT = 90.0

#: Marks the VMs a process started (pid and start time of that process),
#: so that a later run can tell the nodes of a run that died without
#: stopping them (killed, or ended by SIGTERM, which skips atexit).
_OWNER_VARIABLE = "OCPPGW_CLUSTER_OWNER"

#: How the names of our nodes and the directories of our clusters begin.
_NODE_PREFIX = "ocppgw-ha"
_PREFIX = "ocppgw-cluster-"


def cluster_unavailable() -> Optional[str]:
    """
    Why a cluster of our own cannot run here, or C{None} when it can.
    """
    for script in ("rabbitmq-server", "rabbitmqctl", "rabbitmq-queues"):
        path = os.path.join(SCRIPTS, script)
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (RabbitMQ is needed for a cluster of our own)"
    if shutil.which("erl") is None:
        return "erl (Erlang/OTP) is not on PATH"
    if not os.path.isdir("/proc/self"):
        return "no /proc: a node could not be told apart from other processes before kill -9"
    return None


class ClusterError(RuntimeError):
    """
    A node did not start, stop or (re)join in time, or a tool failed; the
    message says which node and carries the end of its log.
    """


# -- processes --------------------------------------------------------------------


def _read(path: str, mode: str = "rb"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return b"" if "b" in mode else ""


def _environ(pid: int) -> list:
    # a zombie has no environment left: it counts as gone
    return _read(f"/proc/{pid}/environ").split(b"\0")


def _is_server(pid: int) -> bool:
    """
    Whether C{pid} is a RabbitMQ server VM. The CLI tools run in a
    C{beam.smp} of their own that has the node's environment too, but not
    C{-s rabbit boot} on its command line.
    """
    return (
        _read(f"/proc/{pid}/comm", "r").strip() == "beam.smp"
        and b"\0-s\0rabbit\0boot\0" in _read(f"/proc/{pid}/cmdline")
    )


def _start_time(pid: int) -> Optional[str]:
    """
    When process C{pid} started (clock ticks after boot): with the pid, it
    names one process for good, since pids are reused.
    """
    stat = _read(f"/proc/{pid}/stat", "r")
    try:
        return stat.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return None


def _servers() -> Iterable:
    """
    Every living RabbitMQ server VM with its environment. Only those: an
    epmd that one of our nodes happened to start carries the node's
    environment too, and every other node on the machine needs it.
    """
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _is_server(int(entry)):
            yield int(entry), _environ(int(entry))


def node_pids(names: Sequence[str]) -> dict:
    """
    The pids of the VMs that run the nodes C{names}, mapped to their names.
    """
    wanted = {f"RABBITMQ_NODENAME={name}".encode(): name for name in names}
    found = {}
    for pid, environ in _servers():
        for variable in environ:
            if variable in wanted:
                found[pid] = wanted[variable]
                break
    return found


def _runs_node(pid: int, name: str) -> bool:
    return _is_server(pid) and f"RABBITMQ_NODENAME={name}".encode() in _environ(pid)


def _kill_vms(names: Sequence[str], timeout: float = 10.0) -> None:
    """
    C{kill -9} every VM running one of the nodes C{names} and wait until
    they are gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        pids = node_pids(names)
        if not pids:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"nodes survive kill -9: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _owner() -> str:
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def reap_orphans() -> list:
    """
    Kill the nodes of earlier runs whose process is gone (ended by
    SIGKILL or SIGTERM, which skip interpreter-exit handlers) and remove
    their directories; nodes of runs that still live are left alone.
    Returns the names of the nodes killed. Called by L{RabbitCluster.start}.
    """
    orphans = {}
    for pid, environ in _servers():
        variables = dict(v.split(b"=", 1) for v in environ if b"=" in v)
        owner = variables.get(_OWNER_VARIABLE.encode(), b"").decode()
        name = variables.get(b"RABBITMQ_NODENAME", b"").decode()
        if not owner or not name.startswith(_NODE_PREFIX):
            continue
        owner_pid, _, started = owner.partition(":")
        if owner_pid.isdigit() and _start_time(int(owner_pid)) == started:
            continue
        home = variables.get(b"HOME", b"").decode()
        orphans[name] = os.path.dirname(home)
    if orphans:
        _kill_vms(list(orphans))
    temp = os.path.join(tempfile.gettempdir(), _PREFIX)
    for directory in set(orphans.values()):
        # only a directory this module made
        if directory.startswith(temp):
            shutil.rmtree(directory, ignore_errors=True)
    return sorted(orphans)


# -- ports ------------------------------------------------------------------------


def _listen_port(taken: set) -> int:
    """
    A port nothing listens on, chosen below the kernel's ephemeral range
    when there is room: a killed node's ports must stay free until it is
    started again, and outgoing connections (chargers, gateways, other
    tests' L{free_port}) take their ports from the ephemeral range.
    """
    try:
        low = int(_read("/proc/sys/net/ipv4/ip_local_port_range", "r").split()[0])
    except (ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(10000, low) if low > 11000 else free_port()
        if port in taken or port in _RESERVED_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port


def amqp_answers(port: int, timeout: float = 2.0) -> bool:
    """
    Whether an AMQP 0-9-1 broker answers on 127.0.0.1:C{port}: the protocol
    header gets a Connection.Start frame (type 1) back.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(1) == b"\x01"
    except OSError:
        return False


# -- the cluster ------------------------------------------------------------------


class Node:
    """
    One node's name, ports and files.
    """

    def __init__(self, index: int, tag: str, base: str, taken: set) -> None:
        #: position in the cluster (node 0 is the one the others join)
        self.index = index
        self.name = f"{_NODE_PREFIX}{index}-{tag}@localhost"
        #: AMQP port on 127.0.0.1
        self.port = _listen_port(taken)
        #: Erlang distribution port (set explicitly, not AMQP + 20000)
        self.dist_port = _listen_port(taken)
        self.directory = os.path.join(base, f"ha{index}")
        self.pid_file = os.path.join(self.directory, "pid")
        self.log_file = os.path.join(self.directory, "log", self.name + ".log")
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def __repr__(self) -> str:
        return f"<Node {self.name} amqp={self.port} dist={self.dist_port}>"

    def write_files(self, cluster_name: str) -> None:
        os.makedirs(os.path.dirname(self.log_file))
        with open(os.path.join(self.directory, "rabbitmq.conf"), "w") as f:
            f.write(
                f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
                f"cluster_name = {cluster_name}\n"
            )
        with open(os.path.join(self.directory, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        # in place of /etc/rabbitmq/rabbitmq-env.conf: distribution (and an
        # epmd the node may have to start) on the loopback interface only
        with open(os.path.join(self.directory, "rabbitmq-env.conf"), "w") as f:
            f.write(
                "ERL_EPMD_ADDRESS=127.0.0.1\n"
                'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n'
            )

    def environment(self, home: str) -> dict:
        """
        The environment of this node's VM and of the tools that talk to it.
        """
        # nothing of an outer RabbitMQ or Erlang setting may leak in
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_")) and key != "CONF_ENV_FILE"
        }
        if "LANG" not in env and "LC_ALL" not in env:
            # the CLI tools warn on every call without a UTF-8 locale
            env["LANG"] = "C.UTF-8"
        d = self.directory
        env.update(
            HOME=home,
            RABBITMQ_CONF_ENV_FILE=os.path.join(d, "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=os.path.join(d, "rabbitmq.conf"),
            # absent, so that no /etc/rabbitmq/advanced.config applies
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(d, "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(d, "enabled_plugins"),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=os.path.join(d, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.dirname(self.log_file),
            RABBITMQ_PID_FILE=self.pid_file,
            # a VM that dies before RabbitMQ logs anything leaves its dump here
            ERL_CRASH_DUMP=os.path.join(d, "erl_crash.dump"),
        )
        env[_OWNER_VARIABLE] = _owner()
        return env

    def failure(self, what: str) -> ClusterError:
        """
        An error saying what went wrong with this node, with its logged
        errors and the end of its log.
        """
        lines = _read(self.log_file, "r").splitlines()
        errors = [line for line in lines if "[error]" in line or "[critical]" in line]
        report = [f"{self.name} (AMQP {self.port}, distribution {self.dist_port}) {what}"]
        if errors:
            report += [f"--- errors in {self.log_file}:", *errors[-10:]]
        report += [f"--- end of {self.log_file}:", *(lines[-20:] or ["(empty)"])]
        # a VM that dies before RabbitMQ can log says why in its crash dump
        # (e.g. its distribution port taken)
        dump = _read(os.path.join(self.directory, "erl_crash.dump"), "r")
        report += [line for line in dump[:4000].splitlines() if line.startswith("Slogan:")]
        return ClusterError("\n".join(report))


class RabbitCluster:
    """
    C{size} RabbitMQ nodes on this machine, joined into one cluster.

    Nodes are numbered from 0: node C{n} is C{nodes[n]}, named
    C{ocppgw-ha<n>-<hex>@localhost}. Every method blocks; none needs the
    reactor.
    """

    def __init__(self, size: int = 3) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, not {size}")
        tag = uuid.uuid4().hex[:8]
        #: reported by every node (AMQP server property C{cluster_name})
        self.cluster_name = f"ocppgw-{tag}"
        self.directory = tempfile.mkdtemp(prefix=f"{_PREFIX}{tag}-")
        #: HOME of every node and tool of ours: it holds the cluster's cookie
        self.home = os.path.join(self.directory, "home")
        taken: set = set()
        #: the L{Node}s, by index
        self.nodes = [Node(index, tag, self.directory, taken) for index in range(size)]
        self._started = False
        self._stopped = False
        # a run that fails, or forgets stop(), leaves nothing behind
        atexit.register(self.stop)

    @property
    def size(self) -> int:
        return len(self.nodes)

    def url(self, n: int) -> str:
        """
        The AMQP URL of node C{n} (guest, default vhost).
        """
        return self.nodes[n].url

    def urls(self) -> list:
        """
        The AMQP URLs of all nodes, by index.
        """
        return [node.url for node in self.nodes]

    def index(self, name: str) -> int:
        """
        The index of the node named C{name}; L{ClusterError} for a name
        that is not one of ours.
        """
        for node in self.nodes:
            if node.name == name:
                return node.index
        raise ClusterError(f"{name} is not a node of cluster {self.cluster_name}")

    # -- RabbitMQ's tools -----------------------------------------------------------

    def _tool_call(self, script: str, n: int, args: Sequence[str]) -> dict:
        node = self.nodes[n]
        return dict(
            args=[os.path.join(SCRIPTS, script), "-q", "-n", node.name, *args],
            env=node.environment(self.home), cwd=self.directory,
        )

    def _tool(self, script: str, n: int, args: Sequence[str], check: bool, timeout: float):
        node = self.nodes[n]
        done = subprocess.run(
            **self._tool_call(script, n, args), capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise ClusterError(
                f"{script} -n {node.name} {' '.join(args)} failed "
                f"({done.returncode}): {(done.stderr or done.stdout).strip()}"
            )
        return done

    def ctl(self, n: int, *args: str, check: bool = True, timeout: float = 60.0):
        """
        C{rabbitmqctl -q -n <node n> *args} with the cluster's cookie.
        Returns the C{subprocess.CompletedProcess}; when C{check}, a non-zero
        exit raises L{ClusterError} with the tool's message.
        """
        return self._tool("rabbitmqctl", n, args, check, timeout)

    def queues(self, n: int, *args: str, check: bool = True, timeout: float = 60.0):
        """
        C{rabbitmq-queues -q -n <node n> *args} (quorum queue status and
        membership), like L{ctl}.
        """
        return self._tool("rabbitmq-queues", n, args, check, timeout)

    def diagnostics(self, n: int, *args: str, check: bool = True, timeout: float = 60.0):
        """
        C{rabbitmq-diagnostics -q -n <node n> *args} (memory breakdown,
        status), like L{ctl}.
        """
        return self._tool("rabbitmq-diagnostics", n, args, check, timeout)

    def _json(self, n: int, *args: str):
        return json.loads(self.ctl(n, *args, "--formatter", "json").stdout)

    # -- state ------------------------------------------------------------------------

    def pid(self, n: int) -> Optional[int]:
        """
        The pid in node C{n}'s pid file, when that process lives and its
        environment says it is node C{n}; else C{None}.
        """
        try:
            pid = int(_read(self.nodes[n].pid_file, "r").strip())
        except ValueError:
            return None
        return pid if _runs_node(pid, self.nodes[n].name) else None

    def alive(self, n: int) -> bool:
        """
        Whether node C{n}'s VM runs and its AMQP port answers.
        """
        return self.pid(n) is not None and amqp_answers(self.nodes[n].port)

    def members(self, n: Optional[int] = None) -> list:
        """
        The indices of every node that node C{n} (default: the first one
        alive) has in its cluster, running or not.
        """
        status = self._json(self._asked(n), "cluster_status")
        names = status.get("disk_nodes", []) + status.get("ram_nodes", [])
        return sorted(self.index(name) for name in names)

    def running(self, n: Optional[int] = None) -> list:
        """
        The indices of the nodes that node C{n} (default: the first one
        alive) reports running in its cluster.
        """
        status = self._json(self._asked(n), "cluster_status")
        return sorted(self.index(name) for name in status["running_nodes"])

    def _asked(self, n: Optional[int]) -> int:
        if n is not None:
            return n
        for m in range(self.size):
            if self.alive(m):
                return m
        raise ClusterError(f"no node of cluster {self.cluster_name} is alive")

    def leader(self, queue: str, vhost: str = "/") -> Optional[int]:
        """
        The index of the node that holds the leader of quorum queue C{queue}
        as a living node reports it; C{None} when there is none right now
        (3.10 leaves a queue out of C{list_queues} for a moment after its
        leader's node died) or no such queue.
        """
        rows = self._json(self._asked(None), "list_queues", "-p", vhost,
                          "--timeout", "10", "name", "leader")
        for row in rows:
            if row.get("name") == queue and row.get("leader"):
                return self.index(row["leader"])
        return None

    def await_leader(self, queue: str, *, not_on: Optional[int] = None, vhost: str = "/",
                     timeout: float = 30.0) -> int:
        """
        Wait until quorum queue C{queue} has its leader on a living node
        other than C{not_on}, and return that node's index: after L{kill} of
        the leader's node, the moment the queue serves again.
        """
        deadline = time.monotonic() + timeout
        while True:
            n = self.leader(queue, vhost)
            if n is not None and n != not_on and self.alive(n):
                return n
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"queue {queue!r} has no leader off node {not_on} after {timeout} s"
                )
            time.sleep(0.2)

    # -- life cycle ---------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """
        Start every node, join the others to node 0 and wait until every
        node reports all of them running. On failure nothing is left
        running (the cluster is stopped and its directory removed) and
        L{ClusterError} names the node, with the end of its log.
        """
        if self._started or self._stopped:
            raise ClusterError(f"cluster {self.cluster_name} was started before; make a new one")
        self._started = True
        deadline = time.monotonic() + timeout
        try:
            reap_orphans()
            self._write_files()
            for n in range(self.size):
                self._launch(n)
            for n in range(self.size):
                self._await_boot(n, deadline)
            if self.size > 1:
                self._join_all()
            self._await_running(range(self.size), deadline)
        except BaseException:
            self.stop()
            raise

    def _write_files(self) -> None:
        os.makedirs(self.home)
        cookie = os.path.join(self.home, ".erlang.cookie")
        with open(cookie, "w") as f:
            f.write("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)))
        # Erlang refuses a cookie file that others may read
        os.chmod(cookie, 0o400)
        for node in self.nodes:
            node.write_files(self.cluster_name)

    def _join_all(self) -> None:
        """
        C{stop_app; join_cluster <node 0>; start_app} for every other node:
        the joins one after the other (each changes the cluster's schema),
        the stops and the starts at the same time.
        """
        others = range(1, self.size)
        with ThreadPoolExecutor(len(others)) as pool:
            list(pool.map(lambda n: self.ctl(n, "stop_app"), others))
            for n in others:
                self.ctl(n, "join_cluster", self.nodes[0].name)
            list(pool.map(lambda n: self.ctl(n, "start_app"), others))

    def _launch(self, n: int) -> None:
        node = self.nodes[n]
        done = subprocess.run(
            [os.path.join(SCRIPTS, "rabbitmq-server"), "-detached"],
            env=node.environment(self.home), cwd=node.directory,
            capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0:
            raise node.failure(
                f"was not launched: rabbitmq-server -detached exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()}"
            )

    def _await_boot(self, n: int, deadline: float) -> None:
        """
        Wait until node C{n} has booted: its AMQP listener opens late in the
        boot, C{await_startup} confirms the rest. A VM that goes away
        meanwhile fails at once rather than at the deadline.
        """
        node = self.nodes[n]
        launched = time.monotonic()
        while not amqp_answers(node.port, timeout=1.0):
            # grace: -detached returns before the VM runs under its name
            if time.monotonic() - launched > 3 and not node_pids([node.name]):
                raise node.failure("exited while booting")
            if time.monotonic() > deadline:
                raise node.failure("did not open its AMQP port in time")
            time.sleep(0.2)
        remaining = max(1, int(deadline - time.monotonic()))
        done = self.ctl(n, "await_startup", "--timeout", str(remaining), check=False,
                        timeout=remaining + 30)
        if done.returncode != 0:
            raise node.failure(f"did not finish booting: {done.stderr.strip()}")

    def await_running(self, indices: Iterable[int], timeout: float = 30.0) -> None:
        """
        Wait until each node of C{indices} reports exactly those nodes
        running (after L{kill}: until the survivors have noticed).
        """
        self._await_running(indices, time.monotonic() + timeout)

    def _await_running(self, indices: Iterable[int], deadline: float) -> None:
        want = sorted(indices)

        def wait(n: int) -> None:
            seen = None
            while True:
                done = self.ctl(n, "cluster_status", "--formatter", "json", check=False)
                if done.returncode == 0:
                    seen = sorted(self.index(name)
                                  for name in json.loads(done.stdout)["running_nodes"])
                    if seen == want:
                        return
                if time.monotonic() > deadline:
                    raise self.nodes[n].failure(f"sees nodes {seen} running, not {want}")
                time.sleep(0.3)

        with ThreadPoolExecutor(len(want)) as pool:
            list(pool.map(wait, want))

    def kill(self, n: int, timeout: float = 10.0) -> None:
        """
        C{kill -9} node C{n}'s VM, once its pid file and
        C{/proc/<pid>/environ} agree that the process is that node; return
        once the VM is gone and its AMQP port no longer answers.
        """
        node = self.nodes[n]
        pid = self.pid(n)
        if pid is None:
            raise ClusterError(f"{node.name} is not running (no VM of it in {node.pid_file})")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while _runs_node(pid, node.name) or amqp_answers(node.port, timeout=0.5):
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} (pid {pid}) still answers {timeout} s after kill -9")
            time.sleep(0.02)

    def start_node(self, n: int, timeout: float = 60.0) -> None:
        """
        Start node C{n} again (after L{kill}) and wait until it runs and
        every living node, itself included, reports it back in the cluster.
        """
        node = self.nodes[n]
        if node_pids([node.name]):
            raise ClusterError(f"{node.name} is still running")
        deadline = time.monotonic() + timeout
        self._launch(n)
        self._await_boot(n, deadline)
        self._await_running([m for m in range(self.size) if m == n or self.alive(m)], deadline)

    def restore(self, timeout: float = 60.0) -> None:
        """
        Start every node that is down (a VM that runs without answering
        AMQP is killed first), so that a test leaves a shared cluster whole.
        """
        for n in range(self.size):
            if not self.alive(n):
                _kill_vms([self.nodes[n].name])
                self.start_node(n, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """
        Stop every node (C{rabbitmqctl shutdown}, all at once), C{kill -9}
        what still runs after that, remove every directory. Safe to call
        twice; also runs at interpreter exit.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        deadline = time.monotonic() + timeout
        # processes rather than threads: this also runs at interpreter
        # exit, when no new thread may start
        stopping = []
        try:
            for n in range(self.size):
                if self.pid(n) is not None:
                    stopping.append(subprocess.Popen(
                        **self._tool_call("rabbitmqctl", n, ["shutdown"]),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    ))
            for tool in stopping:
                try:
                    tool.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    tool.kill()
                    tool.wait()
        finally:
            # whatever did not stop in time
            _kill_vms([node.name for node in self.nodes])
            shutil.rmtree(self.directory, ignore_errors=True)


_shared: Optional[RabbitCluster] = None
_failed: Optional[BaseException] = None


def shared_cluster() -> RabbitCluster:
    """
    The 3-node cluster the tests of this process share: started on first
    use (blocking, about 13 s), stopped and removed when the process exits
    (trial has no per-module teardown). Every caller gets it with all nodes
    running: a node an earlier test killed and left down is started again
    first.
    """
    global _shared, _failed
    if _failed is not None:
        # do not spend another start-up timeout on every test
        raise ClusterError(f"the test cluster did not start: {_failed}")
    if _shared is None:
        cluster = RabbitCluster(3)
        try:
            cluster.start()
        except BaseException as error:
            _failed = error
            raise
        _shared = cluster
    _shared.restore()
    return _shared


def _measure(rounds: int) -> None:
    """
    Print how long the cluster takes to start; per round, with the node of
    a quorum queue's leader killed: how long until a publish through a
    surviving node is confirmed again on a channel that had published to
    the queue before, how long until the CLI reports the new leader, what
    a channel whose first publish to the queue comes right after the kill
    gets then and once the leader has moved, and how long the killed node
    takes to come back. Then stop.
    """
    import pika
    import pika.exceptions

    persistent = pika.BasicProperties(delivery_mode=2)

    def publish_until_confirmed(channel, queue, limit):
        # while the queue has no leader, 3.10 nacks the publish at once
        began, nacked = time.monotonic(), 0
        while time.monotonic() - began < limit:
            try:
                channel.basic_publish("", queue, b"m", persistent)
                return time.monotonic() - began, nacked
            except pika.exceptions.NackError:
                nacked += 1
        return None, nacked

    reason = cluster_unavailable()
    if reason:
        raise SystemExit(f"no cluster here: {reason}")
    cluster = RabbitCluster(3)
    try:
        began = time.monotonic()
        cluster.start()
        print(f"start, 3 nodes joined: {time.monotonic() - began:.1f} s")
        queue = f"measure-{uuid.uuid4().hex[:8]}"
        with pika.BlockingConnection(pika.URLParameters(cluster.url(0))) as connection:
            connection.channel().queue_declare(
                queue, durable=True, arguments={"x-queue-type": "quorum"}
            )
        for round_ in range(rounds):
            old = cluster.await_leader(queue)
            survivor = (old + 1) % cluster.size
            with pika.BlockingConnection(pika.URLParameters(cluster.url(survivor))) as connection:
                used, fresh = connection.channel(), connection.channel()
                used.confirm_delivery()
                fresh.confirm_delivery()
                used.basic_publish("", queue, b"before", persistent)
                killed = time.monotonic()
                cluster.kill(old)
                # its first publish to the queue: answered at once
                first, _ = publish_until_confirmed(fresh, queue, 0.001)
                confirmed, nacked = publish_until_confirmed(used, queue, 30)
                new = cluster.await_leader(queue, not_on=old)
                reported = time.monotonic() - killed
                # and once the leader has moved
                late, late_nacked = publish_until_confirmed(fresh, queue, 10)
            began = time.monotonic()
            cluster.start_node(old)
            back = time.monotonic() - began
            print(
                f"round {round_ + 1}: leader on node {old} killed; through node {survivor}: "
                f"publish confirmed after {confirmed:.2f} s ({nacked} nacked before); "
                f"CLI reports the leader on node {new} after {reported:.2f} s; "
                f"a channel first publishing to it right after the kill: "
                + ("confirmed" if first is not None else "nacked")
                + (", then confirmed" if late is not None
                   else f", then nacked for 10 s after the leader moved ({late_nacked} nacks)")
                + f"; node {old} back in the cluster after {back:.1f} s"
            )
    finally:
        began = time.monotonic()
        cluster.stop()
        print(f"stop: {time.monotonic() - began:.1f} s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tests.faults.cluster",
        description="Start a 3-node cluster of our own, time a leader's node "
                    "killed and restarted, and remove the cluster.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="kills (default 3)")
    _measure(parser.parse_args().rounds)
