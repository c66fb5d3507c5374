"""
The cluster the HA fault tests run on (L{tests.faults.cluster}), against
real RabbitMQ nodes: three of them joined, a quorum queue that keeps a
message when the node of its leader is killed with C{kill -9}, the killed
node back in the cluster, and the system broker untouched throughout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from urllib.parse import urlsplit

import pika
from twisted.internet import threads
from twisted.trial import unittest

from ocppgw.testing import amqp_url, unique_name
from tests.faults import cluster as cluster_module
from tests.faults.cluster import (
    ClusterError,
    RabbitCluster,
    cluster_unavailable,
    node_pids,
    reap_orphans,
    shared_cluster,
)


def blocking_connection(url: str) -> pika.BlockingConnection:
    """
    A pika connection that gives up within seconds instead of hanging a
    test thread on a dead node.
    """
    return pika.BlockingConnection(
        pika.URLParameters(url + "?connection_attempts=1&socket_timeout=5"
                           "&blocked_connection_timeout=10")
    )


def cluster_name_of(url: str) -> str:
    """
    The C{cluster_name} a broker announces in its Connection.Start.
    """
    connection = blocking_connection(url)
    try:
        name = connection._impl.server_properties["cluster_name"]
    finally:
        connection.close()
    return name.decode() if isinstance(name, bytes) else name


def listener_process(port: int):
    """
    (pid, start time) of the process that listens on TCP C{port}, read from
    C{/proc} only; C{None} when no process of ours can see it.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # state 0A is LISTEN
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            links = {os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")}
        except OSError:
            continue
        if links & inodes:
            return int(entry), cluster_module._start_time(int(entry))
    return None


def system_broker():
    """
    How the system broker looks from outside: the process serving its AMQP
    port (so a restart would show) and the cluster name it announces.
    """
    parts = urlsplit(amqp_url())
    local = parts.hostname in ("127.0.0.1", "localhost", "::1")
    return (
        listener_process(parts.port or 5672) if local else None,
        cluster_name_of(amqp_url()),
    )


class _Requires:
    def setUp(self):
        reason = cluster_unavailable()
        if reason is not None:
            raise unittest.SkipTest(reason)


#: the system broker as the first test of this module found it
_system_before = None


class SharedClusterTests(_Requires, unittest.TestCase):
    """
    The cluster of this test process (L{shared_cluster}), with every node
    running at the start of each test.
    """

    # the first test also starts the cluster (about 13 s, more on a busy machine)
    timeout = 180

    def setUp(self):
        super().setUp()
        return threads.deferToThread(self._set_up)

    def _set_up(self):
        global _system_before
        if _system_before is None:
            _system_before = system_broker()
        self.cluster = shared_cluster()
        # a test that kills nodes leaves the cluster whole again
        self.addCleanup(threads.deferToThread, self.cluster.restore)

    def test_three_nodes_running(self):
        """
        Every node runs, sees all three running and no other member, and
        serves AMQP under the cluster's name.
        """
        return threads.deferToThread(self._three_nodes_running)

    def _three_nodes_running(self):
        cluster = self.cluster
        self.assertEqual(cluster.size, 3)
        self.assertEqual(len({node.name for node in cluster.nodes}), 3)
        ports = [port for node in cluster.nodes for port in (node.port, node.dist_port)]
        self.assertEqual(len(set(ports)), 6)
        for n in range(3):
            self.assertTrue(cluster.alive(n))
            self.assertEqual(cluster.running(n), [0, 1, 2])
            self.assertEqual(cluster.members(n), [0, 1, 2])
            self.assertEqual(cluster_name_of(cluster.url(n)), cluster.cluster_name)
        self.assertEqual(cluster.urls(), [cluster.url(n) for n in range(3)])

    def test_quorum_queue_survives_its_leader_killed(self):
        """
        A persistent message confirmed into a quorum queue through node 0
        is still there after the node holding the queue's leader dies with
        kill -9: once the leader has moved, a follower node delivers it.
        The killed node then comes back with start_node and rejoins.
        """
        return threads.deferToThread(self._leader_killed)

    def _leader_killed(self):
        cluster = self.cluster
        queue = unique_name("ha-queue")
        connection = blocking_connection(cluster.url(0))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
            # raises if the broker nacks it or cannot route it
            channel.basic_publish(
                "", queue, b"kept", pika.BasicProperties(delivery_mode=2), mandatory=True
            )
        finally:
            connection.close()
        self.addCleanup(self._delete_queue, queue)

        old = cluster.leader(queue)
        self.assertIn(old, (0, 1, 2))
        cluster.kill(old)
        self.assertFalse(cluster.alive(old))
        self.assertEqual(node_pids([cluster.nodes[old].name]), {})
        survivors = [n for n in range(3) if n != old]
        cluster.await_running(survivors)

        new = cluster.await_leader(queue, not_on=old)
        self.assertIn(new, survivors)
        # through the node that is neither the old nor the new leader
        (follower,) = [n for n in survivors if n != new]
        connection = blocking_connection(cluster.url(follower))
        try:
            channel = connection.channel()
            delivered = next(channel.consume(queue, inactivity_timeout=15))
            method, properties, body = delivered
            self.assertIsNotNone(method, "the message was not delivered within 15 s")
            self.assertEqual((body, properties.delivery_mode, method.redelivered),
                             (b"kept", 2, False))
            channel.basic_ack(method.delivery_tag)
            channel.cancel()
            left = channel.queue_declare(queue, passive=True).method.message_count
            self.assertEqual(left, 0)
        finally:
            connection.close()

        cluster.start_node(old)
        self.assertTrue(cluster.alive(old))
        for n in range(3):
            self.assertEqual(cluster.running(n), [0, 1, 2])
        # the queue has its replica on the returned node again
        status = cluster.queues(old, "quorum_status", queue, "--formatter", "json").stdout
        self.assertIn(cluster.nodes[old].name, status)
        self.assertNotIn("nodedown", status)

    def _delete_queue(self, queue):
        def delete():
            connection = blocking_connection(self.cluster.url(0))
            try:
                connection.channel().queue_delete(queue)
            finally:
                connection.close()
        return threads.deferToThread(delete)

    def test_system_broker_untouched(self):
        """
        The system broker is served by the same process as before the
        cluster started and still announces its own name; no node of ours
        has it as a member, and our nodes and tools use a cookie of their
        own, in a HOME of their own.
        """
        return threads.deferToThread(self._system_untouched)

    def _system_untouched(self):
        cluster = self.cluster
        process, name = system_broker()
        self.assertEqual((process, name), _system_before)
        self.assertNotEqual(name, cluster.cluster_name)
        if process is not None:
            self.assertNotIn(process[0], node_pids([node.name for node in cluster.nodes]))
        for n in range(3):
            # any name that is not ours raises
            self.assertEqual(cluster.members(n), [0, 1, 2])
        cookie = os.path.join(cluster.home, ".erlang.cookie")
        self.assertEqual(os.stat(cookie).st_mode & 0o777, 0o400)
        self.assertTrue(cluster.home.startswith(cluster.directory))
        for node in cluster.nodes:
            with open(f"/proc/{cluster.pid(node.index)}/environ", "rb") as f:
                self.assertIn(f"HOME={cluster.home}".encode(), f.read().split(b"\0"))


class LifeCycleTests(_Requires, unittest.TestCase):
    """
    Failures, and the guards that keep us from killing what is not ours.
    """

    timeout = 90

    def test_failed_start_leaves_nothing(self):
        """
        A node that cannot start (its AMQP port taken) fails start() with
        its name and the errors of its log, and nothing is left running
        or on disk.
        """
        cluster = RabbitCluster(size=1)
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", cluster.nodes[0].port))
        blocker.listen()

        def start():
            return self.assertRaises(ClusterError, cluster.start)

        def check(error):
            message = str(error)
            self.assertIn(cluster.nodes[0].name, message)
            self.assertIn("could_not_start_listener", message)
            self.assertEqual(node_pids([cluster.nodes[0].name]), {})
            self.assertFalse(os.path.exists(cluster.directory))

        return threads.deferToThread(start).addCallback(check)

    def test_kill_checks_the_process(self):
        """
        kill() refuses a pid file whose process is not that node (here: the
        test process itself, then a pid that is gone), and kills nothing.
        """
        cluster = RabbitCluster(size=1)
        self.addCleanup(cluster.stop)
        pid_file = cluster.nodes[0].pid_file
        os.makedirs(os.path.dirname(pid_file))
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        self.assertIsNone(cluster.pid(0))
        self.assertRaises(ClusterError, cluster.kill, 0)
        gone = subprocess.Popen(["true"])
        gone.wait()
        with open(pid_file, "w") as f:
            f.write(str(gone.pid))
        self.assertRaises(ClusterError, cluster.kill, 0)
        self.assertFalse(cluster.alive(0))

    def test_stop_twice(self):
        """
        stop() removes the directory of a cluster never started and may be
        called again; a stopped cluster cannot start.
        """
        cluster = RabbitCluster(size=2)
        self.assertTrue(os.path.isdir(cluster.directory))
        cluster.stop()
        cluster.stop()
        self.assertFalse(os.path.exists(cluster.directory))
        self.assertRaises(ClusterError, cluster.start)

    def test_orphans_of_a_dead_run_are_reaped(self):
        """
        A node VM whose owning process is gone is killed and its directory
        removed; one whose owner lives (this process) is left alone. The
        stand-ins are processes that look like RabbitMQ VMs: named
        beam.smp, with C{-s rabbit boot} and a node name in the environment.
        """
        tools = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tools, True)
        vm = os.path.join(tools, "beam.smp")
        os.symlink(sys.executable, vm)
        gone = subprocess.Popen(["true"])
        gone.wait()
        dead_owner = f"{gone.pid}:{cluster_module._start_time(os.getpid())}"

        def stand_in(owner, directory):
            env = {
                "RABBITMQ_NODENAME": f"ocppgw-ha0-{unique_name('x')}@localhost",
                "OCPPGW_CLUSTER_OWNER": owner,
                "HOME": os.path.join(directory, "home"),
            }
            process = subprocess.Popen(
                [vm, "-c", "import time; print('up', flush=True); time.sleep(60)",
                 "-s", "rabbit", "boot"],
                env=env, stdout=subprocess.PIPE,
            )
            self.addCleanup(process.stdout.close)
            self.addCleanup(lambda: process.poll() is None and process.kill())
            # it runs our code, so it has exec'd with its name and arguments
            self.assertEqual(process.stdout.readline(), b"up\n")
            return env["RABBITMQ_NODENAME"], process

        orphan_dir = tempfile.mkdtemp(prefix=cluster_module._PREFIX)
        self.addCleanup(shutil.rmtree, orphan_dir, True)
        orphan, orphan_process = stand_in(dead_owner, orphan_dir)
        kept_dir = tempfile.mkdtemp(prefix=cluster_module._PREFIX)
        self.addCleanup(shutil.rmtree, kept_dir, True)
        kept, kept_process = stand_in(cluster_module._owner(), kept_dir)
        # both look like servers of ours before the reaping
        self.assertEqual(set(node_pids([orphan, kept]).values()), {orphan, kept})

        self.assertIn(orphan, reap_orphans())
        orphan_process.wait(timeout=10)
        self.assertFalse(os.path.exists(orphan_dir))
        self.assertIsNone(kept_process.poll())
        self.assertTrue(os.path.isdir(kept_dir))
