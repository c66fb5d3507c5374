"""
The one rule of the state machines (ocppgw.states): a move not in the
table raises, naming the machine and the move.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ocppgw.amqp.link import TRANSITIONS, LinkState
from ocppgw.states import InvalidTransition, check_transition


class CheckTransitionTests(SynchronousTestCase):
    def test_move_not_in_the_table_raises(self):
        check_transition(TRANSITIONS, LinkState.OPEN, LinkState.LOST, "link")
        with self.assertRaises(InvalidTransition) as caught:
            check_transition(TRANSITIONS, LinkState.OPEN, LinkState.CONNECTING, "link")
        self.assertIn("open -> connecting", str(caught.exception))
