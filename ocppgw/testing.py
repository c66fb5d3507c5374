"""
Test helpers for code that talks to ocppgw, shipped like C{treq.testing}.

- L{FakeCharger}: a scriptable OCPP-J charger over a real WebSocket
  (autobahn's Twisted client, so it runs on any reactor).
- L{FakeBackEnd}: a CSMS worker on a real RabbitMQ: it sees charger frames
  as the contract describes them, answers CALLs with handlers you give it,
  and sends commands to chargers.
- L{unique_name}: names that keep concurrent test runs apart on a shared
  broker.
- L{FakeBridge}: the broker side of an L{ocppgw.gateway.Gateway} in
  memory (an L{ocppgw.broker.Bridge}): tests of code built on the gateway
  play broker and CSMS with it, on a clock, without RabbitMQ.

Example (inside a trial test with a gateway running)::

    backend = yield FakeBackEnd.start(reactor, url, exchange)
    backend.handle("BootNotification", lambda message, payload: {...})
    charger = yield FakeCharger.connect(reactor, "ws://127.0.0.1:19520/ocpp/CP1")
    answer = yield charger.call("BootNotification", {...})
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections import deque
from typing import Callable, Optional, Sequence

import orjson
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol, wrapClientTLS

from ocppgw import topology
from ocppgw.amqp import BackEndClient, Message
from ocppgw.amqp.errors import BrokerUnavailable, ChannelGone
from ocppgw.closecodes import CloseCode
from ocppgw.outcome import Delivery, PublishOutcome

#: The broker the test suites use; override with OCPPGW_TEST_AMQP_URL.
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def amqp_url() -> str:
    """
    The AMQP URL of the broker for tests.
    """
    return os.environ.get("OCPPGW_TEST_AMQP_URL", DEFAULT_AMQP_URL)


def unique_name(prefix: str = "t") -> str:
    """
    A name no other test run uses (valid as identity, queue or exchange).
    """
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def basic_auth(identity: str, password) -> dict:
    """
    The C{Authorization} header of security profiles 1 and 2, for
    L{FakeCharger.connect}. C{password} is text (OCPP 2.x) or bytes (the
    raw AuthorizationKey of OCPP 1.6).
    """
    import base64

    if isinstance(password, str):
        password = password.encode("utf-8")
    token = base64.b64encode(identity.encode("utf-8") + b":" + password).decode("ascii")
    return {"Authorization": f"Basic {token}"}


class ChargerClosed(Exception):
    """
    The connection closed (or was refused) before the frame was answered.
    """

    def __init__(self, code, reason) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class _ChargerClientProtocol(WebSocketClientProtocol):
    charger: "FakeCharger"

    def onOpen(self):
        self.charger._opened(self)

    def onMessage(self, payload, isBinary):
        self.charger._message(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.charger._closed_with(code, reason)


class FakeCharger:
    """
    A charger that tests drive frame by frame.

    @ivar subprotocol: the subprotocol the gateway chose.
    @ivar calls: a DeferredQueue of CALL frames (lists) sent by the CSMS.
    @ivar other: a DeferredQueue of every other frame not awaited by
        L{call}.
    @ivar closed: a Deferred firing with C{(code, reason)} when the
        connection ends.
    @ivar received_call_ids: the message id of every CALL received, in
        order (to check that nothing came twice).
    """

    def __init__(self) -> None:
        self.protocol: Optional[_ChargerClientProtocol] = None
        self.subprotocol: Optional[str] = None
        self.calls: defer.DeferredQueue = defer.DeferredQueue()
        self.other: defer.DeferredQueue = defer.DeferredQueue()
        self.closed: defer.Deferred = defer.Deferred()
        self._open: defer.Deferred = defer.Deferred()
        self._waiting: dict[str, defer.Deferred] = {}
        self._ids = itertools.count(1)
        self.received_call_ids: list = []

    @classmethod
    def connect(
        cls,
        reactor,
        url: str,
        subprotocols: Sequence[str] = ("ocpp1.6",),
        headers: Optional[dict] = None,
        tls=None,
    ) -> defer.Deferred:
        """
        Connect to C{url}; fires with the L{FakeCharger} once open, or fails
        with L{ChargerClosed} if the gateway refuses the handshake.

        @param headers: extra request headers, e.g. C{Authorization} (see
            L{basic_auth}).
        @param tls: for C{wss://} URLs, the client TLS options (an
            C{IOpenSSLClientConnectionCreator}, e.g. from
            C{twisted.internet.ssl.optionsForClientTLS} with a trust root
            and, for security profile 3, a client certificate).
        """
        charger = cls()
        factory = WebSocketClientFactory(
            url, protocols=list(subprotocols), headers=headers or {}, reactor=reactor
        )
        # autobahn's client gives the gateway 1 s to answer its close frame
        # and then drops TCP (1006 on the gateway's side): on a busy
        # machine the answer can take longer than that
        factory.setProtocolOptions(autoPingInterval=0, failByDrop=False,
                                   closeHandshakeTimeout=10)

        def build(_addr=None):
            protocol = _ChargerClientProtocol()
            protocol.factory = factory
            protocol.charger = charger
            return protocol

        host, port = factory.host, factory.port
        endpoint = clientFromString(reactor, f"tcp:host={host}:port={port}:timeout=10")
        if factory.isSecure:
            if tls is None:
                from twisted.internet.ssl import optionsForClientTLS

                tls = optionsForClientTLS(host)
            endpoint = wrapClientTLS(tls, endpoint)
        d = connectProtocol(endpoint, build())
        d.addErrback(charger._open_failed)
        return charger._open

    # -- callbacks from the protocol ----------------------------------------

    def _opened(self, protocol) -> None:
        self.protocol = protocol
        self.subprotocol = protocol.websocket_protocol_in_use
        self._open.callback(self)

    def _open_failed(self, failure) -> None:
        if not self._open.called:
            self._open.errback(failure)

    def _message(self, payload: bytes, is_binary: bool) -> None:
        frame = orjson.loads(payload)
        if frame[0] == 2:
            self.received_call_ids.append(frame[1])
            self.calls.put(frame)
            return
        waiting = self._waiting.pop(frame[1], None) if len(frame) > 1 else None
        if waiting is not None:
            waiting.callback(frame)
        else:
            self.other.put(frame)

    def _closed_with(self, code, reason) -> None:
        error = ChargerClosed(code, reason)
        if not self._open.called:
            self._open.errback(error)
        for waiting in list(self._waiting.values()):
            waiting.errback(error)
        self._waiting.clear()
        if not self.closed.called:
            self.closed.callback((code, reason))

    # -- what a test does -----------------------------------------------------

    def send(self, frame) -> None:
        """
        Send a frame: a list (encoded as JSON) or raw bytes/str as they are.
        """
        if isinstance(frame, (list, tuple)):
            frame = orjson.dumps(list(frame))
        elif isinstance(frame, str):
            frame = frame.encode("utf-8")
        self.protocol.sendMessage(frame, False)

    def send_binary(self, data: bytes) -> None:
        self.protocol.sendMessage(data, True)

    def call(self, action: str, payload: dict, message_id: Optional[str] = None) -> defer.Deferred:
        """
        Send a CALL; fires with the answer frame (CALLRESULT or CALLERROR).
        """
        message_id = message_id or f"m{next(self._ids)}"
        d: defer.Deferred = defer.Deferred()
        self._waiting[message_id] = d
        self.send([2, message_id, action, payload])
        return d

    def next_call(self) -> defer.Deferred:
        """
        The next CALL from the CSMS (a list).
        """
        return self.calls.get()

    def answer(self, call_frame: list, payload: dict) -> None:
        self.send([3, call_frame[1], payload])

    def answer_error(self, call_frame: list, code: str, description: str = "") -> None:
        self.send([4, call_frame[1], code, description, {}])

    def close(self, code: int = int(CloseCode.NORMAL)) -> defer.Deferred:
        if self.protocol is not None:
            self.protocol.sendClose(code)
        return self.closed

    def drop(self) -> defer.Deferred:
        """
        Lose the TCP connection without a close handshake (like LTE loss).
        """
        self.protocol.transport.abortConnection()
        return self.closed


Handler = Callable[[Message, object], dict]


class FakeBackEnd:
    """
    A CSMS worker on the real broker, for tests and demos.

    It consumes every charger frame published to the OCPP exchange (its own
    exclusive queue bound with C{#} unless told otherwise). Frames of an
    action that has a handler are answered; every message is kept in
    L{received} and can be awaited with L{next_message}.
    """

    def __init__(self, client: BackEndClient, queue: str) -> None:
        self.client = client
        self.queue = queue
        #: every message received, in order
        self.received: list[Message] = []
        self._unclaimed: list[Message] = []
        self._waiters: list[tuple[Optional[str], defer.Deferred]] = []
        self._handlers: dict[str, Handler] = {}

    @classmethod
    @defer.inlineCallbacks
    def start(cls, reactor, url: str, exchange: str, bindings: Sequence[str] = ("#",)):
        client = yield BackEndClient.connect(reactor, url, exchange)
        queue = unique_name("backend")
        yield client.declare_queue(queue, bindings, exclusive=True, auto_delete=True)
        backend = cls(client, queue)
        incoming = yield client.consume(queue)
        backend._pump(incoming)
        return backend

    def _pump(self, incoming: defer.DeferredQueue) -> None:
        def got(message: Message):
            self._dispatch(message)
            return incoming.get().addCallback(got)

        # the consumer's queue fails when the connection closes (stop, or
        # a broker that went away): that ends the pump, it is no error
        incoming.get().addCallback(got).addErrback(lambda _failure: None)

    def _dispatch(self, message: Message) -> None:
        handler = self._handlers.get(message.type or "")
        if (
            handler is not None
            and message.routing_key.endswith(".req")
            # the gateway's own offline StatusNotification expects no answer
            and not message.headers.get(topology.HEADER_SYNTHETIC)
        ):
            frame = orjson.loads(message.body)
            payload = handler(message, frame[3])
            # nobody waits for this confirm; a back end stopped before it
            # comes must not leave an unhandled error behind
            self.client.send_to_charger(
                message.reply_to, orjson.dumps([3, frame[1], payload])
            ).addErrback(lambda _failure: None)
        self.received.append(message)
        for position, (routing_key, waiting) in enumerate(self._waiters):
            if routing_key is None or routing_key == message.routing_key:
                del self._waiters[position]
                waiting.callback(message)
                return
        self._unclaimed.append(message)

    def handle(self, action: str, handler: Handler) -> None:
        """
        Answer every CALL of C{action} with C{handler(message, payload)}.
        """
        self._handlers[action] = handler

    def next_message(self, routing_key: Optional[str] = None) -> defer.Deferred:
        """
        The oldest message not yet taken (optionally the oldest with
        C{routing_key}); messages with other keys stay for later calls.
        """
        for position, message in enumerate(self._unclaimed):
            if routing_key is None or routing_key == message.routing_key:
                del self._unclaimed[position]
                return defer.succeed(message)
        waiting: defer.Deferred = defer.Deferred()
        self._waiters.append((routing_key, waiting))
        return waiting

    def send_to_charger(self, identity: str, frame, **kwargs) -> defer.Deferred:
        if isinstance(frame, (list, tuple)):
            frame = orjson.dumps(list(frame))
        return self.client.send_to_charger(identity, frame, **kwargs)

    def call(self, identity: str, frame, timeout: float = 35.0) -> defer.Deferred:
        if isinstance(frame, (list, tuple)):
            frame = orjson.dumps(list(frame))
        return self.client.call(identity, frame, timeout=timeout)

    def stop(self) -> defer.Deferred:
        return self.client.close()


# -- a broker in memory ----------------------------------------------------------


class Published:
    """
    One publish a L{FakeBridge} took, waiting for the test to settle it
    as the broker would: L{confirm}, L{unroutable} (confirmed but no
    queue bound for it) or L{fail} (nacked, or lost with the link).

    @ivar exchange: C{None} for the OCPP exchange, C{""} for the default
        exchange (a reply to a C{reply_to} address), else its name.
    @ivar properties: the keyword arguments of the publish
        (C{correlation_id}, C{type}, C{reply_to}, C{headers},
        C{mandatory}, C{persistent}, C{ordered}).
    @ivar outcome: the L{PublishOutcome} once settled, else C{None}.
    """

    def __init__(self, exchange, routing_key: str, body: bytes, properties: dict,
                 on_outcome) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.properties = properties
        self.outcome: Optional[PublishOutcome] = None
        self._on_outcome = on_outcome

    def __repr__(self) -> str:
        return f"<Published {self.routing_key!r} {self.outcome}>"

    @property
    def frame(self):
        """The body read as JSON (an OCPP-J frame, or a presence event)."""
        return orjson.loads(self.body)

    @property
    def headers(self) -> dict:
        return dict(self.properties.get("headers") or {})

    def settle(self, outcome: PublishOutcome) -> None:
        """Tell the publisher C{outcome}; a publish is settled once."""
        if self.outcome is not None:
            raise RuntimeError(f"{self!r} is settled already")
        self.outcome = outcome
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def confirm(self) -> None:
        self.settle(PublishOutcome.CONFIRMED)

    def unroutable(self) -> None:
        self.settle(PublishOutcome.UNROUTABLE)

    def fail(self) -> None:
        self.settle(PublishOutcome.FAILED)


class Pending:
    """
    A declare, consume or cancel a L{FakeBridge} holds (see
    L{FakeBridge.hold}) until the test lets it L{succeed} or L{fail}.

    @ivar kind: C{"declare"}, C{"consume"} or C{"cancel"}.
    @ivar queue: the queue it is about.
    """

    def __init__(self, bridge: "FakeBridge", kind: str, queue: str, finish) -> None:
        self.bridge = bridge
        self.kind = kind
        self.queue = queue
        self._finish = finish

    def __repr__(self) -> str:
        return f"<Pending {self.kind} {self.queue!r}>"

    def succeed(self) -> None:
        self.bridge.pending.remove(self)
        self._finish(None)

    def fail(self, error: Exception) -> None:
        self.bridge.pending.remove(self)
        self._finish(error)


class _Message:
    __slots__ = ("body", "reply_to", "correlation_id", "redelivered")

    def __init__(self, body: bytes, reply_to, correlation_id) -> None:
        self.body = body
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.redelivered = False


class FakeQueue:
    """
    A charger's queue in a L{FakeBridge}: its C{ready} messages (not
    delivered, oldest first) and its consumers, the first active of which
    gets them.
    """

    def __init__(self, name: str, binding_key: str, arguments: dict) -> None:
        self.name = name
        self.binding_key = binding_key
        self.arguments = dict(arguments)
        self.ready: deque = deque()
        self.consumers: list["FakeConsumer"] = []

    @property
    def ready_bodies(self) -> list[bytes]:
        return [message.body for message in self.ready]


class FakeConsumer:
    """
    A consumer on a L{FakeQueue}, as L{FakeBridge.consume} gives it (an
    L{ocppgw.broker.CommandConsumer}).

    @ivar unacked: delivery tag -> message, delivered and not yet settled.
    @ivar cancelled: C{None} until L{cancel} is called, then a Deferred
        that fires once the cancel is confirmed.
    """

    def __init__(self, bridge: "FakeBridge", queue: FakeQueue, on_delivery, on_lost) -> None:
        self._bridge = bridge
        self.queue = queue
        self._on_delivery = on_delivery
        self._on_lost = on_lost
        self._connection = bridge._connection
        self.active = False
        self.cancelled: Optional[defer.Deferred] = None
        self.unacked: dict[int, _Message] = {}
        self._requeue_later: list[int] = []

    def __repr__(self) -> str:
        return f"<FakeConsumer {self.queue.name!r} active={self.active}>"

    @property
    def alive(self) -> bool:
        """Whether its connection is still the bridge's (its tags mean something)."""
        return self._connection == self._bridge._connection and self._bridge.connected

    def _deliver(self, tag: int, message: _Message) -> None:
        self.unacked[tag] = message
        self._on_delivery(Delivery((self, tag), message.body, message.reply_to,
                                   message.correlation_id, message.redelivered))

    # -- CommandConsumer -----------------------------------------------------

    @staticmethod
    def _owner(delivery: Delivery):
        owner, tag = delivery.tag
        return owner, tag

    def current(self, delivery: Delivery) -> bool:
        owner, _tag = self._owner(delivery)
        return owner.alive

    def ack(self, delivery: Delivery) -> None:
        owner, tag = self._owner(delivery)
        if owner.alive and tag in owner.unacked:
            self._bridge.acked.append(owner.unacked.pop(tag).body)
            self._bridge._dispatch(owner.queue)

    def reject(self, delivery: Delivery) -> None:
        owner, tag = self._owner(delivery)
        if owner.alive and tag in owner.unacked:
            self._bridge.rejected.append(owner.unacked.pop(tag).body)
            self._bridge._dispatch(owner.queue)

    def requeue(self, delivery: Delivery) -> None:
        owner, tag = self._owner(delivery)
        if not owner.alive or tag not in owner.unacked:
            return
        if owner.cancelled is not None and owner.active:
            # as the real consumer does: after the cancel is confirmed,
            # or the command could come straight back to this consumer
            owner._requeue_later.append(tag)
            return
        owner._requeue(tag)

    def _requeue(self, tag: int) -> None:
        message = self.unacked.pop(tag)
        message.redelivered = True
        self._bridge.requeued.append(message.body)
        self.queue.ready.appendleft(message)
        self._bridge._dispatch(self.queue)

    def cancel(self) -> defer.Deferred:
        if self.cancelled is not None:
            return self.cancelled
        self.cancelled = defer.Deferred()
        self._on_lost = None
        if not self.alive or not self.active:
            self._cancel_ok(None)
        else:
            self._bridge._maybe_hold("cancel", self.queue.name, self._cancel_ok)
        return self.cancelled

    def _cancel_ok(self, _error) -> None:
        # a cancel cannot fail: held, it completes with the link's loss
        if self.cancelled.called:
            return  # the link was lost meanwhile, which ended it
        self.active = False
        if self in self.queue.consumers:
            self.queue.consumers.remove(self)
        later, self._requeue_later = self._requeue_later, []
        if self.alive:
            for tag in sorted(later, reverse=True):
                self._requeue(tag)
        self.cancelled.callback(None)
        self._bridge._dispatch(self.queue)

    def _lose(self, why: str, connection_gone: bool) -> None:
        self.active = False
        if self in self.queue.consumers:
            self.queue.consumers.remove(self)
        if self.cancelled is not None and not self.cancelled.called:
            self._requeue_later = []
            self.cancelled.callback(None)
            return
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None and not connection_gone:
            on_lost(why)


class FakeBridge:
    """
    The broker side of the gateway in memory: an L{ocppgw.broker.Bridge}
    for tests that need no RabbitMQ, shipped so that code built on
    L{ocppgw.gateway.Gateway} can be tested the same way.

    It keeps what a broker would: every publish (L{published}, settled by
    the test), every charger queue declared (L{queues}) with its messages
    and consumers, and the acks, rejects and requeues of commands. A test
    plays the broker and the CSMS with it::

        clock = MemoryReactorClock()  # twisted.internet.testing
        bridge = FakeBridge()
        gateway = Gateway(clock, bridge, node="n1", queue_arguments={})
        factory = ChargerFactory(gateway, clock)
        # ... charger "CP1" connects to factory, e.g. an autobahn client
        # over autobahn.twisted.testing.create_memory_agent ...
        bridge.send_to_charger("CP1", [2, "c1", "Reset", {"type": "Soft"}])
        # ... the charger got it, and answers ...
        [answer] = bridge.published_to("ocpp16.Reset.conf")
        answer.confirm()              # now the command is acked
        bridge.lose()                 # the broker link breaks
        clock.advance(10)             # within [amqp] outage_grace
        bridge.come_back()            # the link is open again

    (This repository's C{tests/support.py} has such a harness,
    C{InMemoryGateway}, and C{tests/test_gateway.py} uses it.)

    Declares, consumes and cancels are answered at once, as a quick broker
    would, unless the test holds them (L{hold}): then they wait in
    L{pending} until it lets each succeed or fail, so that what happens
    meanwhile can be tested.

    @ivar published: every L{Published}, in order, settled or not.
    @ivar controls: every control message sent to other gateway processes.
    @ivar declared: C{(queue, binding_key, arguments)} of every declare
        asked for, in order.
    @ivar queues: queue name -> L{FakeQueue}, once declared.
    @ivar acked: bodies of the commands acked, in order;
        likewise C{rejected} and C{requeued}.
    @ivar peers: what L{may_have_peers} says.
    """

    def __init__(self, *, connected: bool = True, prefetch: int = 10) -> None:
        self._connected = connected
        #: which connection is current: tags of an older one mean nothing
        self._connection = 0
        self._prefetch = prefetch
        self._tags = itertools.count(1)
        self._observers: list = []
        self._flow_observers: list = []
        self._control_handlers: list = []
        self._topology_observers: list = []
        self._held: set[str] = set()
        self.pending: list[Pending] = []
        self.published: list[Published] = []
        self.controls: list[dict] = []
        self.declared: list[tuple] = []
        self.queues: dict[str, FakeQueue] = {}
        self.acked: list[bytes] = []
        self.rejected: list[bytes] = []
        self.requeued: list[bytes] = []
        self.peers = False

    # -- what the test does ------------------------------------------------------

    def hold(self, *kinds: str) -> None:
        """
        Keep every later C{"declare"}, C{"consume"} and/or C{"cancel"}
        waiting in L{pending} instead of answering it at once.
        """
        unknown = set(kinds) - {"declare", "consume", "cancel"}
        if unknown:
            raise ValueError(f"cannot hold {sorted(unknown)}")
        self._held.update(kinds)

    def release(self, *kinds: str) -> None:
        """Answer C{kinds} at once again (what is pending stays pending)."""
        self._held.difference_update(kinds)

    def pending_of(self, kind: str) -> list[Pending]:
        return [p for p in self.pending if p.kind == kind]

    def unsettled(self) -> list[Published]:
        """The publishes not settled yet, in order."""
        return [p for p in self.published if p.outcome is None]

    def published_to(self, routing_key: str) -> list[Published]:
        """Every publish with C{routing_key}, in order."""
        return [p for p in self.published if p.routing_key == routing_key]

    def settle_all(self, outcome: PublishOutcome = PublishOutcome.CONFIRMED) -> list[Published]:
        """Settle every unsettled publish with C{outcome}; returns them."""
        waiting = self.unsettled()
        for publish in waiting:
            publish.settle(outcome)
        return waiting

    def send_to_charger(self, identity: str, frame, *, reply_to: Optional[str] = None,
                        correlation_id: Optional[str] = None) -> None:
        """
        A command from the CSMS: C{frame} (a list, encoded as JSON, or
        bytes as they are) into the charger's queue, as a publish with
        routing key C{identity} would put it there.

        @raise LookupError: the charger's queue was never declared (the
            publish would be unroutable).
        """
        if isinstance(frame, (list, tuple)):
            frame = orjson.dumps(list(frame))
        queue = self.queue_of(identity)
        if queue is None:
            raise LookupError(f"no queue was declared for {identity!r}")
        queue.ready.append(_Message(frame, reply_to, correlation_id))
        self._dispatch(queue)

    def queue_of(self, identity: str) -> Optional[FakeQueue]:
        """The charger's queue, if it was declared."""
        return self.queues.get(topology.charger_queue(identity))

    def consumer_of(self, identity: str) -> Optional[FakeConsumer]:
        """The consumer that gets the charger's commands now, if any."""
        queue = self.queue_of(identity)
        if queue is None:
            return None
        return next((c for c in queue.consumers if c.active and c.cancelled is None), None)

    def lose(self, why: str = "connection lost") -> None:
        """
        The broker link breaks: observers are told first, then everything
        in flight fails (publishes, declares, consumes), cancels in flight
        complete, and every unacknowledged command goes back to its queue,
        marked redelivered, as the broker does when a connection dies.
        """
        if not self._connected:
            return
        self._connected = False
        self._connection += 1
        for observer in list(self._observers):
            observer(False, why)
        for queue in self.queues.values():
            for consumer in list(queue.consumers):
                back = [consumer.unacked[tag] for tag in sorted(consumer.unacked)]
                consumer.unacked.clear()
                for message in reversed(back):
                    message.redelivered = True
                    queue.ready.appendleft(message)
                consumer._lose(why, connection_gone=True)
        for pending in list(self.pending):
            pending.fail(BrokerUnavailable(why))
        for publish in self.unsettled():
            publish.fail()

    def come_back(self, why: str = "reconnected") -> None:
        """The broker link is open again (a new connection)."""
        if self._connected:
            return
        self._connected = True
        for observer in list(self._observers):
            observer(True, why)

    def delete_queue(self, identity: str, why: str = "queue deleted") -> None:
        """
        An operator deletes the charger's queue while the link lives: its
        messages are gone and its consumers are told they are lost.
        """
        queue = self.queues.pop(topology.charger_queue(identity))
        for consumer in list(queue.consumers):
            consumer.unacked.clear()
            consumer._lose(why, connection_gone=False)

    def pause(self) -> None:
        """The broker blocks publishing (a memory or disk alarm)."""
        for observer in list(self._flow_observers):
            observer(True)

    def resume(self) -> None:
        for observer in list(self._flow_observers):
            observer(False)

    def control_message(self, message: dict) -> None:
        """A control message from another gateway process arrives."""
        for handler in list(self._control_handlers):
            handler(message)

    def exchange_declared_again(self) -> None:
        """The OCPP exchange was deleted and declared again: bindings are gone."""
        for observer in list(self._topology_observers):
            observer()

    # -- Bridge ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def add_observer(self, observer) -> None:
        self._observers.append(observer)

    def add_flow_observer(self, observer) -> None:
        self._flow_observers.append(observer)

    def add_control_handler(self, handler) -> None:
        self._control_handlers.append(handler)

    def add_topology_observer(self, observer) -> None:
        self._topology_observers.append(observer)

    def may_have_peers(self) -> bool:
        return self.peers

    def publish_control(self, message: dict, on_outcome=None) -> None:
        self.controls.append(message)
        if on_outcome is not None:
            on_outcome(PublishOutcome.CONFIRMED if self._connected else PublishOutcome.FAILED)

    def publish(self, exchange, routing_key, body, *, on_outcome=None, **properties) -> None:
        if not self._connected:
            if on_outcome is not None:
                on_outcome(PublishOutcome.FAILED)
            return
        self.published.append(Published(exchange, routing_key, body, properties, on_outcome))

    def declare_queue(self, queue: str, binding_key: str, arguments: dict) -> defer.Deferred:
        self.declared.append((queue, binding_key, dict(arguments)))
        if not self._connected:
            return defer.fail(BrokerUnavailable("not connected to the broker"))
        d: defer.Deferred = defer.Deferred()

        def finish(error) -> None:
            if error is not None:
                d.errback(error)
                return
            if queue not in self.queues:
                self.queues[queue] = FakeQueue(queue, binding_key, arguments)
            d.callback(None)

        self._maybe_hold("declare", queue, finish)
        return d

    def consume(self, queue: str, on_delivery, on_lost) -> defer.Deferred:
        if not self._connected:
            return defer.fail(BrokerUnavailable("not connected to the broker"))
        d: defer.Deferred = defer.Deferred()

        def finish(error) -> None:
            if error is None and queue not in self.queues:
                error = ChannelGone(f"NOT_FOUND - no queue '{queue}'")
            if error is not None:
                d.errback(error)
                return
            consumer = FakeConsumer(self, self.queues[queue], on_delivery, on_lost)
            consumer.active = True
            consumer.queue.consumers.append(consumer)
            d.callback(consumer)
            self._dispatch(consumer.queue)

        self._maybe_hold("consume", queue, finish)
        return d

    # -- the broker's side ---------------------------------------------------------

    def _maybe_hold(self, kind: str, queue: str, finish) -> None:
        if kind in self._held:
            self.pending.append(Pending(self, kind, queue, finish))
        else:
            finish(None)

    def _dispatch(self, queue: FakeQueue) -> None:
        """Deliver ready messages to the queue's first active consumer, up to the prefetch."""
        while queue.ready and self._connected:
            consumer = next(
                (c for c in queue.consumers if c.active and c.cancelled is None), None
            )
            if consumer is None or len(consumer.unacked) >= self._prefetch:
                return
            consumer._deliver(next(self._tags), queue.ready.popleft())
