"""
Baseline (a): a bare autobahn WebSocket echo server, the stack's own limit.

    python bench/bare_echo.py PORT PING_SECONDS [CERTFILE KEYFILE]

Accepts subprotocol ocpp1.6, echoes every text message, pings like the
gateway does. Nothing else: no OCPP, no broker.
"""

import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Echo(WebSocketServerProtocol):
    def onConnect(self, request):
        return "ocpp1.6"

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


port, ping = int(sys.argv[1]), float(sys.argv[2])
factory = WebSocketServerFactory()
factory.protocol = Echo
factory.setProtocolOptions(autoPingInterval=ping, autoPingTimeout=30, perMessageCompressionAccept=lambda o: None)
if len(sys.argv) > 4:  # CERTFILE KEYFILE: wss://
    from twisted.internet import ssl

    context = ssl.DefaultOpenSSLContextFactory(sys.argv[4], sys.argv[3])
    reactor.listenSSL(port, factory, context, backlog=4096, interface="127.0.0.1")
else:
    reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")
reactor.run()
