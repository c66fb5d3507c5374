"""
One AMQP connection (ocppgw.amqp.connection): the guard around pika's
callbacks and the heartbeat watchdog, on a Clock, and a real connection's
behaviour once it is lost (against the real broker).
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

import pika

from ocppgw.amqp.connection import BrokerConnection, Watchdog, guarded
from ocppgw.amqp.errors import BrokerUnavailable
from ocppgw.testing import amqp_url


class GuardTests(SynchronousTestCase):
    def test_exception_is_logged_not_raised(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def broken(x):
            raise ValueError(x)

        self.assertIsNone(guarded(broken, "a test callback")(1))
        failures = [e for e in events if e.get("log_failure") is not None]
        self.assertEqual(len(failures), 1)
        self.assertIn("a test callback", failures[0]["what"])
        self.flushLoggedErrors(ValueError)

    def test_result_passes_through(self):
        self.assertEqual(guarded(lambda x: x * 2, "double")(21), 42)


class _Impl:
    bytes_received = 0


class _Connection:
    """What the watchdog reads and calls of a L{BrokerConnection}."""

    def __init__(self):
        self.impl = _Impl()
        self.lost = []

    def lose(self, why):
        self.lost.append(why)


class WatchdogTests(SynchronousTestCase):
    """
    A heartbeat of 8 s: the watchdog ticks every 2 s and declares the
    connection lost after more than 8 s without a byte from the broker.
    """

    def setUp(self):
        self.clock = Clock()
        self.connection = _Connection()
        self.watchdog = Watchdog(self.clock, self.connection, 8)
        self.watchdog.start()
        self.addCleanup(self.watchdog.stop)

    def test_silence_longer_than_the_heartbeat_loses_the_connection(self):
        self.clock.pump([2.0] * 4)  # 8 s: two heartbeats missed, not more
        self.assertEqual(self.connection.lost, [])
        self.clock.advance(2.0)
        self.assertEqual(len(self.connection.lost), 1)
        self.assertIn("no frame from the broker for 10.0 s", self.connection.lost[0])
        # and only once
        self.clock.pump([2.0] * 10)
        self.assertEqual(len(self.connection.lost), 1)

    def test_traffic_keeps_it_alive(self):
        for _ in range(50):
            self.connection.impl.bytes_received += 8  # a heartbeat frame
            self.clock.advance(2.0)
        self.assertEqual(self.connection.lost, [])

    def test_a_late_tick_does_not_judge(self):
        """
        After the reactor was busy for longer than the heartbeat, the
        socket may hold unread bytes: the late tick waits for the next.
        """
        self.clock.advance(2.0)
        self.clock.advance(30.0)  # one tick, 30 s late
        self.assertEqual(self.connection.lost, [])
        self.connection.impl.bytes_received += 8  # read right after
        self.clock.advance(2.0)
        self.assertEqual(self.connection.lost, [])


class LostConnectionTests(unittest.TestCase):
    """
    A real connection, once lost, sends nothing and fails every wait; its
    owner is told once.
    """

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.losses = []
        self.connection = BrokerConnection(
            reactor, amqp_url(), pika.URLParameters(amqp_url()),
            lambda connection, why: self.losses.append(why),
        )
        yield self.connection.open(10)
        self.addCleanup(self.connection.close, 5)

    @defer.inlineCallbacks
    def test_nothing_sent_after_the_loss(self):
        channel = yield self.connection.channel()
        pending = self.connection.wait(defer.Deferred())  # an answer never coming
        self.assertTrue(self.connection.alive)
        self.connection.lose("test")
        self.assertFalse(self.connection.alive)
        self.assertEqual(self.losses, ["test"])
        yield self.assertFailure(pending, BrokerUnavailable)
        self.assertFalse(self.connection.write((b"\x08\x00\x00\x00\x00\x00\x00\xce",)))
        # a pika method on a channel pika may still report open
        self.assertFalse(self.connection.call(channel.basic_nack, 1, requeue=True))
        yield self.assertFailure(self.connection.channel(), BrokerUnavailable)
        yield self.connection.gone
        self.assertEqual(self.losses, ["test"])

    @defer.inlineCallbacks
    def test_teardown_error_in_pika_stays_in(self):
        """
        A channel close callback that raises while pika tears the lost
        connection down is logged; the loss is still reported, once. (The
        wedge this guards against: a publish channel's close failed an
        answer, and the requeue it caused was a basic_nack on a consumer
        channel pika still reported open, which raised into pika's
        teardown loop.)
        """
        first = yield self.connection.channel()
        second = yield self.connection.channel()
        raised = []

        def nack_on_close(_channel, _reason):
            self.assertTrue(second.is_open)  # pika tears it down later
            try:
                second.basic_nack(1, requeue=True)
            except pika.exceptions.ConnectionWrongStateError as error:
                raised.append(error)
                raise

        first.add_on_close_callback(nack_on_close)
        self.connection.protocol.transport.abortConnection()
        yield self.connection.gone
        self.assertEqual(len(raised), 1)
        self.assertEqual(len(self.losses), 1)
        self.assertIn("lost", self.losses[0])
        self.assertEqual(
            len(self.flushLoggedErrors(pika.exceptions.ConnectionWrongStateError)), 1)
