"""
A throw-away RabbitMQ node for fault tests, next to the shared one.

It runs under its own node name, ports and data directory (so stopping it
or setting a memory alarm on it touches nobody else), with RabbitMQ's own
scripts: C{rabbitmq-server -detached} and C{rabbitmqctl -n <node> ...}.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

from twisted.internet import threads

from tests.support import free_port


def rabbitmq_available() -> bool:
    """
    Whether a node of our own can be started here: RabbitMQ's scripts are
    installed and we may run them (Debian's wrappers need root or the
    rabbitmq user).
    """
    if not (shutil.which("rabbitmq-server") and shutil.which("rabbitmqctl")):
        return False
    try:
        import pwd

        return os.geteuid() in (0, pwd.getpwnam("rabbitmq").pw_uid)
    except (KeyError, ImportError):
        return os.geteuid() == 0


class ThrowAwayBroker:
    """
    One RabbitMQ node of our own; L{start} and L{stop} block (use them in
    C{setUpClass}/C{tearDownClass}), the fault operations return Deferreds.
    """

    def __init__(self) -> None:
        self.node = f"ocppgw-fault-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.directory = tempfile.mkdtemp(prefix="ocppgw-fault-")
        # the node runs as the rabbitmq user and writes here
        os.chmod(self.directory, 0o777)
        with open(os.path.join(self.directory, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        os.chmod(os.path.join(self.directory, "rabbitmq.conf"), 0o644)
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def _env(self) -> dict:
        d = self.directory
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(d, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(d, "log"),
            "RABBITMQ_CONFIG_FILE": os.path.join(d, "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(d, "enabled_plugins"),
            "RABBITMQ_PID_FILE": os.path.join(d, "pid"),
        }

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args],
            env=self._env(), capture_output=True, text=True, check=check, timeout=120,
        )

    def start(self, timeout: float = 90.0) -> None:
        subprocess.run(
            ["rabbitmq-server", "-detached"], env=self._env(), check=True,
            capture_output=True, timeout=60,
        )
        deadline = time.monotonic() + timeout
        # the node registers with epmd a moment after -detached returns
        while True:
            done = self.ctl("await_startup", "--timeout", "30", check=False)
            if done.returncode == 0 and self.amqp_answers():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.node} did not start: {done.stderr}")
            time.sleep(0.5)

    def amqp_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.settimeout(5)
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return s.recv(1) == b"\x01"
        except OSError:
            return False

    def stop(self) -> None:
        self.ctl("stop", check=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- faults, as Deferreds (rabbitmqctl blocks for a while) ---------------

    def stop_app(self):
        return threads.deferToThread(self.ctl, "stop_app")

    def start_app(self):
        def start():
            self.ctl("start_app")
            self.ctl("await_startup", "--timeout", "60")
        return threads.deferToThread(start)

    def set_memory_watermark(self, fraction: float):
        return threads.deferToThread(
            self.ctl, "set_vm_memory_high_watermark", repr(fraction)
        )


_shared: ThrowAwayBroker | None = None
_failed: Exception | None = None


def shared_fault_broker() -> ThrowAwayBroker:
    """
    The node the fault tests of this run share, started on first use and
    stopped when the test process exits (trial has no per-module or
    per-class teardown). Each test leaves it running and without alarms.
    """
    global _shared, _failed
    if _failed is not None:
        # do not spend another start-up timeout on every test
        raise RuntimeError(f"the fault broker did not start: {_failed}")
    if _shared is None:
        broker = ThrowAwayBroker()
        atexit.register(broker.stop)
        try:
            broker.start()
        except Exception as error:
            _failed = error
            raise
        _shared = broker
    return _shared
