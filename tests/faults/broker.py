"""
A throw-away RabbitMQ node for fault tests, next to the shared one.

It runs under its own node name, ports, data directory and Erlang cookie
(so stopping it or setting a memory alarm on it touches nobody else): a
cluster of one node (L{tests.faults.cluster.RabbitCluster}), driven with
C{rabbitmqctl -n <node> ...}.
"""

from __future__ import annotations

from twisted.internet import threads

from tests.faults.cluster import RabbitCluster, amqp_answers, cluster_unavailable


def rabbitmq_available() -> bool:
    """
    Whether a node of our own can be started here (see
    L{cluster_unavailable} for why not).
    """
    return cluster_unavailable() is None


class ThrowAwayBroker:
    """
    One RabbitMQ node of our own; L{start} and L{stop} block (use them in
    C{setUpClass}/C{tearDownClass}), the fault operations return Deferreds.
    """

    def __init__(self) -> None:
        self._cluster = RabbitCluster(size=1)
        node = self._cluster.nodes[0]
        self.node = node.name
        self.port = node.port
        self.url = node.url

    def ctl(self, *args: str, check: bool = True):
        return self._cluster.ctl(0, *args, check=check, timeout=120)

    def start(self, timeout: float = 90.0) -> None:
        self._cluster.start(timeout)

    def amqp_answers(self) -> bool:
        return amqp_answers(self.port, timeout=5)

    def stop(self) -> None:
        self._cluster.stop()

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
        # the node stops itself at exit (RabbitCluster registers that)
        try:
            broker.start()
        except Exception as error:
            _failed = error
            raise
        _shared = broker
    return _shared
