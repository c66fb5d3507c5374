"""
Gateways knowing of each other: the directory over a clock, and real
gateways on the broker introducing themselves.
"""

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from ocppgw import peers
from ocppgw.amqp import AmqpBridge
from ocppgw.peers import PeerDirectory
from ocppgw.testing import amqp_url, unique_name
from tests.faults.test_gateways import GatewaysTestCase
from tests.support import delete_exchange


class PeerDirectoryTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.peers = PeerDirectory(self.clock, grace=5, expiry=90)

    def test_assumes_peers_until_listening(self):
        self.assertTrue(self.peers.may_have_peers())

    def test_assumes_peers_during_grace(self):
        self.peers.listening()
        self.clock.advance(4.9)
        self.assertTrue(self.peers.may_have_peers())
        self.clock.advance(0.1)
        self.assertFalse(self.peers.may_have_peers())

    def test_known_peer(self):
        self.peers.listening()
        self.clock.advance(10)
        self.peers.heard("gw-b")
        self.assertTrue(self.peers.may_have_peers())
        self.assertEqual(self.peers.known(), ["gw-b"])

    def test_peer_expires_unless_heard_again(self):
        self.peers.listening()
        self.peers.heard("gw-b")
        self.peers.heard("gw-c")
        self.clock.advance(60)
        self.peers.heard("gw-c")
        self.clock.advance(31)
        self.assertEqual(self.peers.known(), ["gw-c"])
        self.clock.advance(60)
        self.assertEqual(self.peers.known(), [])
        self.assertFalse(self.peers.may_have_peers())

    def test_bye_forgets(self):
        self.peers.listening()
        self.clock.advance(10)
        self.peers.heard("gw-b")
        self.peers.gone("gw-b")
        self.assertFalse(self.peers.may_have_peers())

    def test_listening_again_starts_over(self):
        self.peers.listening()
        self.peers.heard("gw-b")
        self.clock.advance(10)
        self.peers.listening()  # a broker reconnect
        self.assertEqual(self.peers.known(), [])
        self.assertTrue(self.peers.may_have_peers())

    def test_wait_for(self):
        waiting = self.peers.wait_for("gw-b")
        self.assertNoResult(waiting)
        self.peers.heard("gw-b")
        self.assertEqual(self.successResultOf(waiting), "gw-b")
        self.assertEqual(self.successResultOf(self.peers.wait_for("gw-b")), "gw-b")


class IntroductionTests(unittest.TestCase):
    """
    Bridges on one exchange (what each gateway process has) on the broker.
    """

    timeout = 30

    def setUp(self):
        self.exchange = unique_name("peers")
        self.addCleanup(delete_exchange, self.exchange)

    @defer.inlineCallbacks
    def bridge(self):
        bridge = AmqpBridge(reactor, amqp_url(), self.exchange, unique_name("node"),
                            declare_channels=1, consumer_channels=1)
        yield bridge.start()
        self.addCleanup(lambda: bridge.connected and bridge.stop())
        return bridge

    @defer.inlineCallbacks
    def test_gateways_learn_of_each_other_and_of_goodbyes(self):
        a = yield self.bridge()
        b = yield self.bridge()
        # b said hello on start; a answered that it is here
        yield a.peers.wait_for(b.node)
        yield b.peers.wait_for(a.node)
        self.assertEqual(a.peers.known(), [b.node])
        self.assertEqual(b.peers.known(), [a.node])
        yield b.stop()
        # c's hello is queued for a behind b's goodbye
        c = yield self.bridge()
        yield a.peers.wait_for(c.node)
        self.assertEqual(a.peers.known(), [c.node])

    @defer.inlineCallbacks
    def test_alone_after_grace(self):
        self.patch(peers, "GRACE", 0.0)
        a = yield self.bridge()
        self.assertFalse(a.may_have_peers())


class TakeoverBroadcastTests(GatewaysTestCase):
    """
    A gateway broadcasts a takeover for a connecting charger only while it
    knows of another gateway.
    """

    @defer.inlineCallbacks
    def test_alone_no_takeover(self):
        self.patch(peers, "GRACE", 0.0)
        service = yield self.gateway()
        messages = yield self.watch_control()
        yield self.charger(service, self.identity())
        # what the gateway says next is its announcement, not a takeover
        service.gateway.bridge.control.announce()
        message, _ = yield self.next_control(messages)
        self.assertEqual(message["type"], peers.HERE)

    @defer.inlineCallbacks
    def test_takeover_when_another_gateway_is_known(self):
        self.patch(peers, "GRACE", 0.0)
        a = yield self.gateway()
        b = yield self.gateway()
        yield a.gateway.bridge.peers.wait_for(b.gateway.bridge.node)
        messages = yield self.watch_control()
        identity = self.identity()
        yield self.charger(a, identity)
        message, _ = yield self.next_control(messages)
        self.assertEqual((message["type"], message["identity"]), ("takeover", identity))
