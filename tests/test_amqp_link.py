"""
The broker link's state machine (ocppgw.amqp.link): its transition table,
and a link that refuses a move the table does not allow.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import pika

from ocppgw.amqp.link import TRANSITIONS, BrokerLink, LinkState
from ocppgw.states import InvalidTransition
from ocppgw.testing import amqp_url


class TransitionTableTests(SynchronousTestCase):
    def test_every_state_has_a_row(self):
        self.assertEqual(set(TRANSITIONS), set(LinkState))

    def test_a_lost_link_always_reconnects_or_stops(self):
        self.assertEqual(TRANSITIONS[LinkState.OPEN], {LinkState.LOST, LinkState.CLOSING})
        self.assertEqual(TRANSITIONS[LinkState.LOST],
                         {LinkState.RECONNECTING, LinkState.CLOSING})
        for state in LinkState:
            if state not in (LinkState.CLOSING, LinkState.CLOSED):
                self.assertIn(LinkState.CLOSING, TRANSITIONS[state], state)

    def test_link_refuses_an_invalid_move(self):
        link = BrokerLink(Clock(), [amqp_url()], parameters=pika.URLParameters,
                          setup=lambda connection: defer.succeed(None))
        self.assertRaises(InvalidTransition, link._goto, LinkState.OPEN, "test")
        self.assertIs(link.state, LinkState.IDLE)
