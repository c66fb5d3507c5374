"""
How many chargers a gateway process's open-files limit lets it hold.

Every connected charger is one socket, so one file descriptor, and a
process can have at most C{RLIMIT_NOFILE} of them. Past that, C{accept()}
fails with C{EMFILE}: the kernel has already completed the charger's TCP
handshake, the gateway cannot take the connection, and the charger sees a
connection that never answers until its own timeout. Nothing in
C{[listener] max_connections} can prevent that, so at start the gateway
says how many chargers its limit leaves room for and warns when
C{max_connections} is above it.

The limit is per process: with C{[listener] workers = N} each worker has
its own, and the host holds about N times the figure each worker logs.
Raise it where the process is started (systemd C{LimitNOFILE=}, the
container runtime's C{nofile} ulimit, C{ulimit -n}); the README's
operations section says how.

The module reads the limit and counts descriptors; it decides nothing
about connections itself.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Callable, Optional

#: Descriptors kept free for what a gateway opens after start besides
#: chargers: a reconnecting AMQP connection (to a failover URL) beside the
#: one that is going away, admin API and metrics clients, TLS material and
#: password files read on SIGHUP, log files, the DNS resolver. A gateway
#: with TLS, admin API and one AMQP URL has about 20 open at start.
HEADROOM = 64


def soft_limit() -> Optional[int]:
    """
    This process's open-files limit (soft C{RLIMIT_NOFILE}), or C{None}
    when it is unlimited.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_soft_limit() -> Optional[int]:
    """
    Raise the soft open-files limit to the hard one and return it.

    The soft limit stays low by default (systemd: 1024) only for programs
    that still use C{select()}, which cannot watch descriptors above 1023;
    a gateway uses epoll, so the hard limit is the real one. An
    application that embeds the gateway decides this for its own process.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # e.g. a hard limit above the kernel's nr_open: keep the soft one
    return soft_limit()


def open_descriptors(directory: str = "/proc/self/fd") -> Optional[int]:
    """
    How many descriptors this process has open now, or C{None} where
    C{/proc} cannot tell.
    """
    try:
        return len(os.listdir(directory))
    except OSError:
        return None


@dataclass(frozen=True)
class Room:
    """
    What the open-files limit allows one gateway process.

    @ivar limit: the soft C{RLIMIT_NOFILE}; C{None} = unlimited.
    @ivar in_use: descriptors open besides chargers when counted.
    @ivar chargers: chargers the limit leaves room for; C{None} = no limit.
    """

    limit: Optional[int]
    in_use: int
    chargers: Optional[int]

    def too_small_for(self, max_connections: int) -> bool:
        return self.chargers is not None and max_connections > self.chargers


def room(limit: Optional[int], in_use: int, headroom: int = HEADROOM) -> Room:
    """
    The chargers a process with C{limit} open files, C{in_use} of them
    taken by other things, can hold: the rest less L{HEADROOM}.
    """
    if limit is None:
        return Room(None, in_use, None)
    return Room(limit, in_use, max(0, limit - in_use - headroom))


def announce(max_connections: int, log, *, limit: Callable[[], Optional[int]] = soft_limit,
             in_use: Callable[[], Optional[int]] = open_descriptors) -> Room:
    """
    Log how many chargers this process's open-files limit allows, and warn
    when C{[listener] max_connections} is higher. Call it once the
    listeners and the AMQP connection are open, so that they are counted.

    @param log: a L{twisted.logger.Logger}.
    """
    counted = in_use()
    found = room(limit(), counted if counted is not None else 0)
    if found.chargers is None:
        log.info("Open-files limit: unlimited ([listener] max_connections = {max_connections} "
                 "applies)", max_connections=max_connections)
        return found
    log.info(
        "Open-files limit {limit} ({in_use} in use, {headroom} kept free): room for "
        "{chargers} chargers in this process",
        limit=found.limit, in_use=found.in_use, headroom=HEADROOM, chargers=found.chargers,
    )
    if found.too_small_for(max_connections):
        log.warn(
            "[listener] max_connections = {max_connections} exceeds the {chargers} chargers "
            "the open-files limit ({limit}) allows this process: chargers beyond that are "
            "not refused with 503 but left unanswered. Raise the limit (systemd "
            "LimitNOFILE=, the container's nofile ulimit, ulimit -n) or lower "
            "max_connections; with workers = N the limit applies to each worker",
            max_connections=max_connections, chargers=found.chargers, limit=found.limit,
        )
    return found
