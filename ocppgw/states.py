"""
The one rule of ocppgw's state machines: a move not in the table is a bug.

The broker link (L{ocppgw.amqp.link}) and each charger's link
(L{ocppgw.charger}) are small state machines whose allowed moves are a
table, C{{state: frozenset(next states)}}, kept beside the states so that
a reader sees the whole machine at once. Only low-frequency events (a
connection lost, a consumer restored) move them, never a frame.
"""

from __future__ import annotations

import enum


class InvalidTransition(RuntimeError):
    """A state machine was asked for a move its table does not allow."""


def check_transition(table: dict, old: enum.Enum, new: enum.Enum, what: str) -> None:
    """
    @raise InvalidTransition: naming C{what} when C{table} does not allow
        C{old} -> C{new}.
    """
    if new not in table[old]:
        raise InvalidTransition(f"{what}: {old.value} -> {new.value}")
