"""
Test helpers for code that talks to ocppgw, shipped like C{treq.testing}.

- L{FakeCharger}: a scriptable OCPP-J charger over a real WebSocket
  (autobahn's Twisted client, so it runs on any reactor).
- L{FakeBackEnd}: a CSMS worker on a real RabbitMQ: it sees charger frames
  as the contract describes them, answers CALLs with handlers you give it,
  and sends commands to chargers.
- L{unique_name}: names that keep concurrent test runs apart on a shared
  broker.

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
from typing import Callable, Optional, Sequence

import orjson
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, connectProtocol, wrapClientTLS

from ocppgw.amqp import BackEndClient, Message
from ocppgw import topology
from ocppgw.closecodes import CloseCode

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
