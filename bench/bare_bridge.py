"""
Baseline (b): the thinnest autobahn + pika relay, with no OCPP logic.

    python bench/bare_bridge.py PORT EXCHANGE AMQP_URL PING_SECONDS

Frame in -> publish (routing key bare.req, reply_to this bridge's queue,
correlation_id the connection) -> worker -> consume -> frame out to the
connection. One AMQP connection with Nagle off, one channel, no publisher
confirms, non-persistent: what the stack can do at best.
"""

import itertools
import sys

import pika
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer, protocol, reactor

port, exchange, url, ping = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
connections = {}
ids = itertools.count()
state = {}


class Relay(WebSocketServerProtocol):
    def onConnect(self, request):
        self.key = str(next(ids))
        connections[self.key] = self
        return "ocpp1.6"

    def onMessage(self, payload, isBinary):
        state["channel"].basic_publish(exchange, "bare.req", payload, state["props"][self.key])

    def onClose(self, wasClean, code, reason):
        connections.pop(getattr(self, "key", None), None)


def deliver(_channel, _method, properties, body):
    relay = connections.get(properties.correlation_id)
    if relay is not None:
        relay.sendMessage(body, False)


@defer.inlineCallbacks
def start():
    conn = yield protocol.ClientCreator(reactor, TwistedProtocolConnection, pika.URLParameters(url)).connectTCP("127.0.0.1", 5672)
    conn.transport.setTcpNoDelay(True)
    yield conn.ready
    channel = yield conn.channel()
    yield channel.exchange_declare(exchange, "topic", durable=True)
    queue = f"bare.bridge.{id(conn):x}"
    yield channel.queue_declare(queue, exclusive=True, auto_delete=True)
    yield channel.queue_bind(queue, exchange, routing_key=queue)
    channel._channel.basic_consume(queue, deliver, auto_ack=True)
    state["channel"] = channel._channel
    state["props"] = PropsCache(queue)
    factory = WebSocketServerFactory()
    factory.protocol = Relay
    factory.setProtocolOptions(autoPingInterval=ping, autoPingTimeout=30, perMessageCompressionAccept=lambda o: None)
    reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")
    print("bridge ready", flush=True)


class PropsCache(dict):
    """One BasicProperties per connection, made on first use."""

    def __init__(self, queue):
        self.queue = queue

    def __missing__(self, key):
        props = self[key] = pika.BasicProperties(reply_to=self.queue, correlation_id=key)
        return props


reactor.callWhenRunning(start)
reactor.run()
