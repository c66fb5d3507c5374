"""
An open charger connection keeps only what it needs (ocppgw.edge), and
still works like any other: frames both ways, pings, close codes.
"""

from twisted.internet import defer

from ocppgw.edge import READ_SIZE
from tests.support import GatewayTestCase


class FootprintTests(GatewayTestCase):
    settings = {"websocket": {"ws_opts.idle_timeout": "0.3", "ping_timeout": "5"}}

    @defer.inlineCallbacks
    def test_open_connection_is_trimmed_and_works(self):
        self.backend.handle("Heartbeat", lambda _m, _p: {"currentTime": "2026-01-01T00:00:00Z"})
        identity = self.identity()
        charger = yield self.connect(identity)
        answer = yield charger.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)
        edge = self.gateway_service.gateway.chargers[identity].edge
        attributes = vars(edge)
        for name in ("http_headers", "http_request_data", "http_response_data", "wasClean",
                     "localCloseCode", "_send_queue", "trafficStats"):
            self.assertNotIn(name, attributes)
        # the defaults autobahn reads stay readable
        self.assertIs(edge.wasClean, False)
        self.assertEqual(edge.websocket_version, 13)
        self.assertIsNone(edge.localCloseCode)
        self.assertLess(len(attributes), 45)
        # autobahn's observer bookkeeping and last unmasker are gone
        for name in ("_valid_events", "_results"):
            self.assertNotIn(name, attributes)
        self.assertIsNone(edge.current_frame_masker)
        # no open/closed Deferreds of autobahn's (nobody waits on them; the
        # closed one would hold the connection in a reference cycle), and
        # no Deferred of the consumer's start once it is up
        for name in ("is_open", "is_closed"):
            self.assertNotIn(name, attributes)
        self.assertIsNone(edge.link.starting)
        self.assertIsNotNone(edge.link.consumer)
        self.assertIsNone(edge.link.consumer.ready)
        # nothing kept for what is empty: extensions, commands held back
        # or requeued at a cancel, the ping timer's keyword arguments
        self.assertNotIn("websocket_extensions_in_use", attributes)
        self.assertEqual(edge.websocket_extensions_in_use, ())
        self.assertIsNone(edge.link.consumer._requeue_later)
        self.assertEqual(edge.link.session.held_calls, 0)
        self.assertIs(type(edge.link.session._held), tuple)
        self.assertIsNone(edge.autoPingPendingCall.kwargs)
        # the socket is read in small pieces, and a frame of many pieces
        # arrives whole
        self.assertEqual(edge.transport.bufferSize, READ_SIZE)
        self.backend.handle("DataTransfer",
                            lambda _m, payload: {"status": "Accepted", "data": payload["data"]})
        big = "x" * (5 * READ_SIZE)
        answer = yield charger.call("DataTransfer", {"vendorId": "v", "data": big})
        self.assertEqual(answer[2]["data"], big)

        # pings (every 0.3 s) are answered by the client and keep it open
        yield self.wait(1.0)
        self.assertIs(self.gateway_service.gateway.chargers.get(identity), edge.link)
        answer = yield charger.call("Heartbeat", {})
        self.assertEqual(answer[0], 3)

        # a CSMS command reaches it, and the close code is the gateway's
        reply = self.backend.call(identity, b'[2,"r1","Reset",{"type":"Soft"}]')
        command = yield charger.next_call()
        charger.answer(command, {"status": "Accepted"})
        message = yield reply
        self.assertEqual(message.body, b'[3,"r1",{"status":"Accepted"}]')
        yield self.gateway_service.stopService()
        code, _reason = yield charger.closed
        self.assertEqual(code, 1012)  # "service restart", spread over the drain window
        self.assertIs(edge.wasClean, True)
        self.assertEqual(edge.localCloseCode, 1012)

    def wait(self, seconds):
        from twisted.internet import reactor, task

        return task.deferLater(reactor, seconds, lambda: None)
