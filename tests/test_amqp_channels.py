"""
The channel roles (ocppgw.amqp.channels): cancelling many consumers on
one channel, each cancel completing on its own cancel-ok and not on the
first one the channel receives; and the watch that gives up on a route
the broker keeps refusing.
"""

from pika import frame, spec
from pika.callback import CallbackManager
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.amqp.channels import Consumer, ConsumerChannel, NackWatch


class _Channel:
    """The parts of a pika channel a consumer channel uses, registering
    cancel callbacks the way pika 1.x does (no consumer-tag filter)."""

    channel_number = 3
    is_open = True

    def __init__(self):
        self.callbacks = CallbackManager()
        self.cancels = []
        self.nacks = []

    def add_on_close_callback(self, callback):
        pass

    def add_on_cancel_callback(self, callback):
        pass

    def basic_cancel(self, consumer_tag, callback=None):
        self.cancels.append(consumer_tag)
        self.callbacks.add(self.channel_number, spec.Basic.CancelOk, callback)

    def basic_nack(self, tag, requeue):
        self.nacks.append(tag)

    def cancel_ok(self, tag):
        self.callbacks.process(
            self.channel_number, spec.Basic.CancelOk, self,
            frame.Method(self.channel_number, spec.Basic.CancelOk(consumer_tag=tag)))


class _Connection:
    """The parts of a L{BrokerConnection} a channel role uses: alive."""

    alive = True
    lost_reason = None

    @staticmethod
    def call(method, *args, **kwargs):
        method(*args, **kwargs)
        return True


class CancelTests(unittest.TestCase):
    def test_each_cancel_waits_for_its_own_cancel_ok(self):
        channel = _Channel()
        cc = ConsumerChannel(_Connection(), channel, lambda *_: None)
        consumers = []
        for n in range(3):
            consumer = Consumer(cc, lambda delivery: None, lambda why: None)
            consumer.tag = f"tag{n}"
            cc.consumers[consumer.tag] = consumer
            consumers.append(consumer)
        fired = []
        for n, consumer in enumerate(consumers):
            consumer.cancel().addCallback(lambda _, n=n: fired.append(n))
            consumer.requeue(type("D", (), {"tag": (cc, 100 + n)})())
        self.assertEqual(channel.cancels, ["tag0", "tag1", "tag2"])

        channel.cancel_ok("tag1")
        self.assertEqual(fired, [1])
        self.assertEqual(channel.nacks, [101])  # requeued after its cancel-ok only
        channel.cancel_ok("tag0")
        channel.cancel_ok("tag2")
        self.assertEqual(fired, [1, 0, 2])
        self.assertEqual(channel.nacks, [101, 100, 102])
        self.assertEqual(cc.consumers, {})


class NackWatchTests(SynchronousTestCase):
    """
    A route is given up on after NackWatch.SECONDS of refusals with at
    least NackWatch.AT_LEAST of them, and no acceptance in between.
    """

    def setUp(self):
        self.clock = Clock()
        self.watch = NackWatch(now=self.clock.seconds)

    def refuse(self, count, every=1.0, route="r"):
        results = []
        for _ in range(count):
            results.append(self.watch.refused(route))
            self.clock.advance(every)
        return results

    def test_given_up_after_seconds_and_count(self):
        self.assertEqual(self.refuse(6), [False] * 5 + [True])

    def test_many_quick_refusals_are_not_enough(self):
        self.assertEqual(set(self.refuse(100, every=0.01)), {False})

    def test_an_accepted_publish_starts_over(self):
        self.refuse(5)
        self.watch.accepted("r")
        self.assertEqual(self.refuse(5), [False] * 5)

    def test_routes_apart(self):
        self.refuse(5, route="a")
        self.watch.accepted("b")
        self.assertTrue(self.watch.refused("a"))


class _WritingConnection(_Connection):
    def __init__(self):
        self.written = []

    def write(self, frames):
        self.written.extend(frames)


class PikaDeliveryTests(SynchronousTestCase):
    """
    Deliveries pika hands out itself (rather than the frame reader) go
    through one callback per channel, which finds the consumer by its tag.
    """

    def setUp(self):
        self.channel = _Channel()
        self.channel._consumers = {}
        self.cc = ConsumerChannel(_WritingConnection(), self.channel, lambda *_: None)
        self.delivered = {}
        self.consumers = []
        for name in ("a", "b"):
            consumer = Consumer(self.cc, self.delivered.setdefault(name, []).append,
                                lambda why: None)
            self.cc.start(consumer, f"queue-{name}")
            self.consumers.append(consumer)

    def deliver(self, consumer_tag, delivery_tag):
        callback = self.channel._consumers[self.consumers[0].tag]
        callback(self.channel,
                 spec.Basic.Deliver(consumer_tag=consumer_tag, delivery_tag=delivery_tag),
                 spec.BasicProperties(reply_to="CP1", correlation_id="c1"), b"[2]")

    def test_one_callback_for_every_consumer(self):
        a, b = self.consumers
        self.assertIs(self.channel._consumers[a.tag], self.channel._consumers[b.tag])

    def test_delivery_reaches_the_consumer_its_tag_names(self):
        self.deliver(self.consumers[1].tag, 7)
        self.assertEqual(self.delivered["a"], [])
        [delivery] = self.delivered["b"]
        self.assertEqual((delivery.tag, delivery.body, delivery.reply_to),
                         ((self.cc, 7), b"[2]", "CP1"))

    def test_delivery_for_a_consumer_no_longer_here_is_requeued(self):
        self.deliver("gone-tag", 9)
        self.assertEqual(self.channel.nacks, [9])
        self.assertEqual((self.delivered["a"], self.delivered["b"]), ([], []))
