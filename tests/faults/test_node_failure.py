"""
RabbitMQ nodes killed hard under two gateway processes.

A 3-node cluster of our own, quorum charger queues with single active
consumer, two C{twistd ocppgw} processes each pointed at another node
first, 40 chargers that beat every second and answer commands after
0.2-1.5 s, a back end sending 20 commands a second. The node the first
gateway uses is killed (C{kill -9}) and started again, then the node the
second one uses (by then both). Afterwards: every command the broker
took was answered, none reached a charger twice (they all stayed
connected), every charger was served again within 30 s of each kill, a
gateway that lost its node said so on /readyz and came back, and no new
charger was ever answered 500.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.faults.chaos import Scenario
from tests.faults.cluster import cluster_unavailable, shared_cluster

#: seconds within which every charger must be served again after a kill
RECOVERY_LIMIT = 30.0


class NodeFailureTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        reason = cluster_unavailable()
        if reason is not None:
            raise unittest.SkipTest(reason)
        self.cluster = shared_cluster()  # blocking, once per run (~15 s)

    @defer.inlineCallbacks
    def test_nodes_killed_under_two_gateways(self):
        scenario = Scenario(reactor, self.cluster, self.mktemp_dir(), gateways=2,
                            chargers=40, commands_per_second=20)
        self.addCleanup(scenario.stop)
        self.addCleanup(lambda: self.cluster.restore())
        try:
            yield scenario.start()
            scenario.start_commands()
            yield task.deferLater(reactor, 3, lambda: None)  # traffic before the first kill
            first, second = scenario.gateways
            # gateway n starts on node n
            killed_first = reactor.seconds()
            yield scenario.kill_and_restart(0, RECOVERY_LIMIT)
            killed_second = reactor.seconds()
            yield scenario.kill_and_restart(1, RECOVERY_LIMIT)
            yield task.deferLater(reactor, 3, lambda: None)  # traffic after
            scenario.stop_commands()
            yield scenario.drain(timeout=90)
            scenario.check_chargers()
        except BaseException:
            for gateway in scenario.gateways:
                print(f"\n--- {gateway.name} ---\n{gateway.tail(60)}")
            raise
        results = scenario.results
        print(f"\n{results.summary()} seed={scenario.seed}")
        self.assertGreater(len(results.sent), 100)
        self.assertEqual(results.lost, [])
        self.assertEqual(results.duplicates, {})
        self.assertEqual(results.closed, [])
        self.assertEqual(results.unrecovered, [])
        self.assertLessEqual(results.max_recovery, RECOVERY_LIMIT)
        self.assertNotIn(500, results.probe_statuses)
        self.assertTrue(set(results.probe_statuses) <= {101, 503}, results.probe_statuses)
        # the first gateway lost its node: not ready, then ready again
        went = scenario.readiness_went(first, killed_first)
        self.assertIn(503, went)
        self.assertEqual(went[-1], 200)
        for gateway in scenario.gateways:
            went = scenario.readiness_went(gateway, killed_second)
            self.assertIn(503, went, gateway.name)
            self.assertEqual(went[-1], 200, gateway.name)

    def mktemp_dir(self) -> str:
        import os

        path = self.mktemp()
        os.makedirs(path)
        return os.path.abspath(path)
