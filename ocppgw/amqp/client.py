"""
The CSMS side of the AMQP contract, as a worker (or a login check) uses it.

Not on the gateway's hot path: it serves the command line, the examples,
the C{amqp} credentials checker and the tests (L{ocppgw.testing}).
"""

from __future__ import annotations

import os
from typing import Optional

import pika
import pika.exceptions
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import deferLater
from twisted.python import failure

from ocppgw import topology
from ocppgw.topology import DIRECT_REPLY_TO
from ocppgw.amqp.connection import endpoint_for
from ocppgw.amqp.errors import BrokerUnavailable
from ocppgw.logs import mask_url


def _chain(d: defer.Deferred) -> defer.Deferred:
    """
    A new Deferred with C{d}'s result, leaving C{d} usable by others.
    """
    chained: defer.Deferred = defer.Deferred()

    def both(result):
        if isinstance(result, failure.Failure):
            chained.errback(result)
        else:
            chained.callback(result)
        return result

    d.addBoth(both)
    return chained


class Message:
    """
    A message as a back end sees it (plain fields, no pika types).
    """

    __slots__ = (
        "exchange",
        "routing_key",
        "body",
        "redelivered",
        "content_type",
        "correlation_id",
        "reply_to",
        "type",
        "headers",
        "delivery_mode",
        "app_id",
        "timestamp",
        "message_id",
        "delivery_tag",
    )

    def __init__(self, method, properties, body: bytes) -> None:
        self.exchange = method.exchange
        self.routing_key = method.routing_key
        self.redelivered = method.redelivered
        self.body = body
        self.content_type = properties.content_type
        self.correlation_id = properties.correlation_id
        self.reply_to = properties.reply_to
        self.type = properties.type
        self.headers = properties.headers or {}
        self.delivery_mode = properties.delivery_mode
        self.app_id = properties.app_id
        self.timestamp = properties.timestamp
        self.message_id = properties.message_id
        self.delivery_tag = getattr(method, "delivery_tag", None)

    def __repr__(self) -> str:
        return f"<Message {self.routing_key!r} {self.body[:80]!r}>"


@defer.inlineCallbacks
def check_login(reactor, url: str, username: bytes, password: bytes, timeout: float = 5.0):
    """
    Whether the broker at C{url} accepts C{username}/C{password} (the
    URL's own user is ignored): open a connection, and close it at once.

    Used to let RabbitMQ (its users, LDAP, ...) authenticate chargers; no
    connection is kept per charger.

    @return: a Deferred firing C{True} (accepted) or C{False} (refused),
        or failing with L{BrokerUnavailable} when the broker cannot be
        reached or answers something else.
    """
    parameters = pika.URLParameters(url)
    parameters.credentials = pika.PlainCredentials(username, password, erase_on_connect=True)
    parameters.heartbeat = 0
    parameters.client_properties = topology.client_properties(
        topology.LOGIN_CHECK_CONNECTION_NAME)
    connection = TwistedProtocolConnection(parameters, custom_reactor=reactor)
    open_errors: list = []
    connection._impl.add_on_open_error_callback(
        lambda _connection, error: open_errors.append(error), remove_default=False
    )
    try:
        yield connectProtocol(endpoint_for(reactor, url, timeout), connection)
    except Exception as error:
        raise BrokerUnavailable(f"cannot reach {mask_url(url)}: {error}") from None
    timer = reactor.callLater(timeout, connection.transport.abortConnection)
    try:
        yield connection.ready
    except Exception as error:
        yield deferLater(reactor, 0, lambda: None)
        reason = open_errors[0] if open_errors else error
        if isinstance(reason, (pika.exceptions.AuthenticationError,
                               pika.exceptions.ProbableAuthenticationError,
                               pika.exceptions.ProbableAccessDeniedError,
                               ConnectionDone, ConnectionLost)) and timer.active():
            # As in AmqpBridge._connect: a close during the AMQP handshake
            # is the broker refusing the login or the vhost.
            return False
        raise BrokerUnavailable(f"login check at {mask_url(url)} failed: {reason!r}") from None
    finally:
        if timer.active():
            timer.cancel()
    closed = connection.closed
    connection.close()
    yield closed
    return True


#: AMQP delivery mode of a message the broker keeps across a restart.
PERSISTENT = 2


class BackEndClient:
    """
    The CSMS side of the contract, as a worker uses it: consume charger
    frames, send frames to chargers, call a charger and wait for its answer.

    It is not on the gateway's hot path; it serves the command line, the
    examples and the tests (L{ocppgw.testing}), and keeps them off pika.
    """

    def __init__(self, reactor, connection: TwistedProtocolConnection, channel, exchange: str):
        self._reactor = reactor
        self._connection = connection
        self._channel = channel
        self.exchange = exchange
        self._replies: dict[str, defer.Deferred] = {}
        self._reply_consumer = None

    @classmethod
    @defer.inlineCallbacks
    def connect(cls, reactor, url: str, exchange: str = "ocpp"):
        """
        Connect, open a confirming channel and declare the exchange.
        """
        connection = TwistedProtocolConnection(
            pika.URLParameters(url), custom_reactor=reactor
        )
        yield connectProtocol(endpoint_for(reactor, url, 10.0), connection)
        connection.transport.setTcpNoDelay(True)
        yield connection.ready
        channel = yield connection.channel()
        yield channel.confirm_delivery()
        yield channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        return cls(reactor, connection, channel, exchange)

    @defer.inlineCallbacks
    def declare_queue(self, name: str, binding_keys=(), *, durable=False,
                      exclusive=False, auto_delete=True, arguments=None):
        """
        Declare a queue and bind it to the OCPP exchange.
        """
        yield self._channel.queue_declare(
            name, durable=durable, exclusive=exclusive, auto_delete=auto_delete,
            arguments=arguments,
        )
        for key in binding_keys:
            yield self._channel.queue_bind(name, self.exchange, routing_key=key)
        return name

    @defer.inlineCallbacks
    def consume(self, queue: str, auto_ack: bool = True, *, prefetch: int = 0,
                arguments: Optional[dict] = None):
        """
        @param prefetch: a per-consumer prefetch (RabbitMQ streams need one,
            with C{auto_ack=False}).
        @param arguments: consume arguments (for a stream,
            C{{"x-stream-offset": "first"}} or a timestamp).
        @return: a L{defer.DeferredQueue} of L{Message}s (and, with
            C{auto_ack=False}, an C{ack(message_tag)} is needed: use
            L{ack}).
        """
        if prefetch:
            yield self._channel.basic_qos(prefetch_count=prefetch)
        queue_object, _tag = yield self._channel.basic_consume(
            queue, auto_ack=auto_ack, arguments=arguments
        )
        messages: defer.DeferredQueue = defer.DeferredQueue()

        def pump(item):
            _channel, method, properties, body = item
            messages.put(Message(method, properties, body))
            return queue_object.get().addCallback(pump)

        queue_object.get().addCallback(pump).addErrback(lambda _f: None)
        return messages

    def send_to_charger(self, identity: str, frame: bytes, *, reply_to=None,
                        correlation_id=None, exchange=None, routing_key=None,
                        mandatory: bool = False) -> defer.Deferred:
        """
        Publish a frame for a charger (routing key = its identity).

        @param mandatory: have the broker return the frame when no queue is
            bound for it: the Deferred then fails with
            C{pika.exceptions.UnroutableError} as soon as the broker says
            so. pika's Twisted channel credits a return to the next
            confirm, so this is exact only with one publish in flight on
            this client (as the command line has).
        """
        return self._channel.basic_publish(
            self.exchange if exchange is None else exchange,
            identity if routing_key is None else routing_key,
            frame,
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=PERSISTENT,
                reply_to=reply_to,
                correlation_id=correlation_id,
            ),
            mandatory=mandatory,
        )

    @defer.inlineCallbacks
    def call(self, identity: str, frame: bytes, timeout: float = 35.0,
             correlation_id: Optional[str] = None, mandatory: bool = False):
        """
        Send a CALL to a charger and wait for its answer over RabbitMQ's
        direct reply-to.

        @param mandatory: see L{send_to_charger}.
        @return: the L{Message} with the charger's answer.
        @raise defer.TimeoutError: when nothing comes back in C{timeout}.
        @raise pika.exceptions.UnroutableError: with C{mandatory}, when no
            queue is bound for the charger's identity.
        """
        if self._reply_consumer is None:
            # one consumer of the pseudo-queue per channel: the broker
            # refuses a second one, so concurrent first calls share it
            self._reply_consumer = self._channel.basic_consume(
                DIRECT_REPLY_TO, auto_ack=True
            )
            self._reply_consumer.addCallback(
                lambda result: self._pump_replies(result[0]) or result
            )
        yield _chain(self._reply_consumer)
        correlation_id = correlation_id or os.urandom(8).hex()
        waiting: defer.Deferred = defer.Deferred()
        self._replies[correlation_id] = waiting
        waiting.addTimeout(timeout, self._reactor)
        try:
            yield self.send_to_charger(
                identity, frame, reply_to=DIRECT_REPLY_TO, correlation_id=correlation_id,
                mandatory=mandatory,
            )
            answer = yield waiting
        finally:
            self._replies.pop(correlation_id, None)
            if not waiting.called:
                waiting.addErrback(lambda _f: None)
                waiting.cancel()
        return answer

    def _pump_replies(self, queue_object) -> None:
        def pump(item):
            _channel, method, properties, body = item
            waiting = self._replies.pop(properties.correlation_id, None)
            if waiting is not None and not waiting.called:
                waiting.callback(Message(method, properties, body))
            return queue_object.get().addCallback(pump)

        queue_object.get().addCallback(pump).addErrback(lambda _f: None)

    def ack(self, message: Message) -> None:
        self._channel.basic_ack(message.delivery_tag)

    @defer.inlineCallbacks
    def queue_exists(self, name: str):
        """
        Whether the queue C{name} exists (a passive declare on a channel of
        its own, because the broker closes the channel when it does not).
        """
        channel = yield self._connection.channel()
        try:
            yield channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 404:
                return False
            raise
        channel.close()
        return True

    def delete_queue(self, name: str) -> defer.Deferred:
        return self._channel.queue_delete(name)

    def delete_exchange(self, name: str) -> defer.Deferred:
        return self._channel.exchange_delete(name)

    @defer.inlineCallbacks
    def close(self):
        if self._connection.is_open:
            closed = self._connection.closed
            self._connection.close()
            if closed is not None:
                yield closed
