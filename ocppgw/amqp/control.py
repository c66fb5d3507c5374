"""
The control exchange: how gateway processes on one broker tell each other
things (takeovers of a charger, who is there).

A fanout exchange C{<exchange>.gateways} (L{topology.control_exchange})
beside the OCPP exchange, so that no back-end binding ever sees these
messages. Each process has an exclusive queue on it and consumes it
without acks: a control message lost with a dying connection concerns
chargers that connection no longer serves. Messages are JSON objects with
a C{type}; the sender's node is in the L{topology.HEADER_NODE} header, and
a process ignores its own. The C{hello}/C{here}/C{bye} messages keep
L{ocppgw.peers.PeerDirectory} current; every other type goes to the
handlers (the gateway's takeovers).
"""

from __future__ import annotations

from typing import Callable, Optional

import orjson
from twisted.internet import defer, task
from twisted.logger import Logger

from ocppgw import peers, topology
from ocppgw.amqp.connection import BrokerConnection, guarded
from ocppgw.amqp.errors import DeclareFailed
from ocppgw.amqp.exchanges import on_own_channel
from ocppgw.peers import PeerDirectory

_log = Logger()


class ControlPlane:
    """
    This process's side of the control exchange.

    @ivar peers: the other gateway processes on our exchange.
    """

    def __init__(self, reactor, exchange: str, node: str, publish: Callable,
                 connected: Callable[[], bool]) -> None:
        """
        @param publish: the bridge's C{publish}.
        @param connected: whether the link is open.
        """
        self._reactor = reactor
        self.exchange = topology.control_exchange(exchange)
        self.node = node
        self._publish = publish
        self._connected = connected
        self._handlers: list[Callable[[dict], None]] = []
        self.peers = PeerDirectory(reactor)
        self._announcer: Optional[task.LoopingCall] = None

    def add_handler(self, handler: Callable[[dict], None]) -> None:
        """
        Call C{handler(message)} for every control message from another
        gateway process (never for our own).
        """
        self._handlers.append(handler)

    def declare_exchange(self, conn: BrokerConnection) -> defer.Deferred:
        # auto-delete: it goes away with the last gateway's queue
        return on_own_channel(
            conn,
            lambda channel, callback: channel.exchange_declare(
                self.exchange, exchange_type="fanout", auto_delete=True,
                callback=callback),
            lambda reason: DeclareFailed(f"control exchange refused: {reason}"),
        )

    def bind_again(self, conn: BrokerConnection, queue: str) -> defer.Deferred:
        """Bind our queue C{queue} to the control exchange declared again."""
        return on_own_channel(
            conn,
            lambda channel, callback: channel.queue_bind(
                queue, self.exchange, callback=callback),
            lambda reason: DeclareFailed(f"control queue not bound again: {reason}"),
        )

    @defer.inlineCallbacks
    def start(self, conn: BrokerConnection):
        """
        Declare the control exchange and this process's exclusive queue on
        it, and consume it.

        @return: the queue's name.
        """
        yield self.declare_exchange(conn)
        channel = yield conn.channel()
        done: defer.Deferred = defer.Deferred()
        conn.call(channel.queue_declare, "", exclusive=True, auto_delete=True,
                  callback=done.callback)
        frame = yield conn.wait(done)
        queue = frame.method.queue
        done = defer.Deferred()
        conn.call(channel.queue_bind, queue, self.exchange, callback=done.callback)
        yield conn.wait(done)
        done = defer.Deferred()
        conn.call(channel.basic_consume, queue,
                  guarded(self._message, "a control message"),
                  auto_ack=True, callback=done.callback)
        yield conn.wait(done)
        return queue

    def _message(self, _channel, _method, properties, body) -> None:
        headers = properties.headers or {}
        node = headers.get(topology.HEADER_NODE)
        if node == self.node:
            return
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            _log.warn("Unreadable control message ({size} bytes)", size=len(body))
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if isinstance(node, str) and node:
            if kind == peers.BYE:
                self.peers.gone(node)
            else:
                self.peers.heard(node)
        if kind in peers.TYPES:
            if kind == peers.HELLO:
                self.publish({"type": peers.HERE, "node": self.node})
            return
        for handler in list(self._handlers):
            guarded(handler, "a control message handler")(message)

    def introduce(self) -> None:
        """
        Our control queue is up: say hello, and keep saying we are here.
        """
        self.peers.listening()
        self.publish({"type": peers.HELLO, "node": self.node})
        if self._announcer is None:
            self._announcer = task.LoopingCall(self.announce)
            self._announcer.clock = self._reactor
            self._announcer.start(peers.ANNOUNCE_INTERVAL, now=False)

    def announce(self) -> None:
        """Say we are here (every L{peers.ANNOUNCE_INTERVAL} seconds)."""
        if self._connected():
            self.publish({"type": peers.HERE, "node": self.node})

    def stop_announcing(self) -> None:
        if self._announcer is not None and self._announcer.running:
            self._announcer.stop()
        self._announcer = None

    def say_goodbye(self) -> None:
        """Tell the others we are leaving."""
        self.publish({"type": peers.BYE, "node": self.node})

    def publish(self, message: dict, on_outcome=None) -> None:
        """
        Tell every other gateway process C{message} (a JSON object).
        """
        self._publish(
            self.exchange,
            "",
            orjson.dumps(message),
            headers={topology.HEADER_NODE: self.node},
            persistent=False,
            on_outcome=on_outcome,
        )


__all__ = ["ControlPlane"]
