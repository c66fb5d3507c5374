"""
The outage grace (ocppgw.outage.BrokerOutage) on a Clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.charger import ChargerState
from ocppgw.outage import BrokerOutage


class _Link:
    def __init__(self, state):
        self.state = state


class BrokerOutageTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.over = []
        self.outage = BrokerOutage(self.clock, 30, False, lambda: self.over.append(self.clock.seconds()))

    def test_grace_then_over(self):
        self.outage.begin()
        self.clock.advance(10)
        self.outage.begin()  # once per outage: the timer is not restarted
        self.clock.advance(20)
        self.assertEqual(self.over, [30])

    def test_broker_back_within_the_grace(self):
        self.outage.begin()
        self.clock.advance(29)
        self.outage.end()
        self.clock.advance(100)
        self.assertEqual(self.over, [])
        self.outage.begin()  # the next outage has its own grace
        self.clock.advance(30)
        self.assertEqual(self.over, [159])

    def test_no_grace_is_over_at_once(self):
        self.outage.grace = 0
        self.outage.begin()
        self.assertEqual(self.over, [0])

    def test_kept_chargers_have_no_end(self):
        self.outage.keep_chargers = True
        self.outage.begin()
        self.clock.advance(1000)
        self.assertEqual(self.over, [])

    def test_restored_once_nobody_awaits_the_broker(self):
        first, second = _Link(ChargerState.BROKER_LOST), _Link(ChargerState.BROKER_LOST)
        self.successResultOf(self.outage.consumers_restored())
        self.outage.link_moved(first)
        self.outage.link_moved(second)
        restored = self.outage.consumers_restored()
        first.state = ChargerState.RESTORING
        self.outage.link_moved(first)
        first.state = ChargerState.CONSUMING
        self.outage.link_moved(first)
        self.assertNoResult(restored)
        second.state = ChargerState.CLOSED
        self.outage.link_moved(second)
        self.successResultOf(restored)
        self.assertEqual(self.outage.awaiting, set())
