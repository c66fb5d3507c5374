"""
What a charger's autobahn connection costs, trimmed.

An idle charger is mostly its WebSocket connection, and autobahn keeps a
lot per connection that a gateway with tens of thousands of them never
uses. L{TrimmedWebSocket} is a mixin for the edge's protocol that removes
it, and L{BucketTimer} batches autobahn's per-connection timers. None of
it changes what a charger sees on the wire.

What each trim saves, per open idle charger, measured with
C{python -m bench.trims} (2,000 connections opened in memory, one OCPP
frame each, one trim turned off at a time; Python heap as tracemalloc
sees it, 2,650 B per connection with every trim on):

- L{TrimmedWebSocket.compact}: ~1,860 B. autobahn's instance dict (about
  110 attributes) with the handshake's leftovers and the flags still at
  their class defaults removed, rebuilt at the size of what is left; the
  transport's dict likewise.
- the send queue made on first use: ~730 B (an empty C{deque}).
- the frame unmasker dropped after each message: ~200 B.
- one shared traffic counter: ~150 B.
- L{TrimmedWebSocket.drop_request}: nothing once the connection is open
  (L{TrimmedWebSocket.compact} drops the same attributes); it frees the
  request (~1.5 KB) from the moment the charger is accepted.

and in RSS, with real sockets: the whole gateway holds about 9 KiB per
idle charger including its AMQP consumer (C{python -m bench.idle
--targets gateway}), of which the smaller socket reads (L{READ_SIZE})
save about 1.2 KiB. Two trims save CPU rather than memory: autobahn
formats a debug line for every chunk it reads and every write, and builds
a Deferred with callbacks for every message to fire its C{message} event,
which nobody here observes.

permessage-deflate, when a listener enables it, is tuned here too
(L{accept_deflate}, L{LeanDeflate}): zlib's defaults cost ~100 KiB more
RSS per idle charger (C{bench/compress.py}).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

from autobahn.websocket.compress import (
    PerMessageDeflate,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)
from autobahn.websocket.protocol import TrafficStats
from twisted.internet.defer import Deferred
from twisted.logger import Logger

_log = Logger()


#: permessage-deflate (RFC 7692) when a listener has C{compress} on. zlib's
#: defaults keep a 32 KiB window and up to ~256 KiB of compressor state per
#: connection for as long as it is open (~100 KiB more RSS per idle
#: charger, bench/compress.py); OCPP messages are a few hundred bytes, so
#: the gateway's compressor uses the smallest window RFC 7692 lets zlib use
#: (2^9 bytes) and memory level, and starts every message afresh (no
#: context takeover), so that it is freed between messages
#: (L{LeanDeflate}). The charger's window is bounded the same way when its
#: offer allows it (C{client_max_window_bits}); otherwise its own choice
#: stands, which costs up to 32 KiB for the decompressor's window. The
#: charger's context is never refused: it keeps its decompressor.
DEFLATE_WINDOW_BITS = 9
DEFLATE_MEM_LEVEL = 1


def accept_deflate(offers) -> Optional[PerMessageDeflateOfferAccept]:
    """
    autobahn's C{perMessageCompressionAccept} for a listener with
    compression: accept the first permessage-deflate offer, tuned as
    described at L{DEFLATE_WINDOW_BITS}.
    """
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(
                offer,
                request_max_window_bits=(
                    DEFLATE_WINDOW_BITS if offer.accept_max_window_bits else 0
                ),
                no_context_takeover=True,
                window_bits=DEFLATE_WINDOW_BITS,
                mem_level=DEFLATE_MEM_LEVEL,
            )
    return None


class LeanDeflate(PerMessageDeflate):
    """
    autobahn's permessage-deflate, minus the compressor it keeps between
    messages: without context takeover it makes a new one for every
    message anyway, and an idle charger would hold its zlib state
    (~9 KiB even with L{accept_deflate}'s small window) for nothing.
    """

    def end_compress_message(self):
        data = super().end_compress_message()
        if self.server_no_context_takeover:
            self._compressor = None
        return data


def refuse_compression(offers) -> None:
    """autobahn's C{perMessageCompressionAccept} for a listener without compression."""
    return None


#: What autobahn keeps per connection that an open connection does not need
#: as its own: leftovers of the opening handshake (never read once open) and
#: flags that keep one value until the connection closes. They are class
#: attributes with these values, and an open connection drops its copies
#: that equal them: ~25 of autobahn's ~70 attributes, so the connection's
#: instance dict can be rebuilt at half the size (L{TrimmedWebSocket.compact}).
HANDSHAKE_LEFTOVERS = (
    "http_headers", "http_request_data", "http_request_host", "http_request_params",
    "http_request_path", "http_request_uri", "http_response_data", "http_status_line",
    "websocket_extensions", "websocket_origin", "websocket_protocols", "_wskey",
    "_transport_details",
)
UNTIL_CLOSE = {
    "websocket_version": 13,
    "wasServingFlashSocketPolicyFile": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasCloseHandshakeTimeout": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "wasOpenHandshakeTimeout": False,
    "wasServerConnectionDropTimeout": False,
    "closedByMe": False,
    "droppedByMe": False,
    "failedByMe": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "_isMessageCompressed": False,
    "_perMessageCompress": None,
    "trackedTimings": None,
}
#: One traffic counter for all connections: autobahn counts into it on
#: every frame, and ocppgw never reads it.
TRAFFIC_SINK = TrafficStats()

#: Bytes asked of a charger's socket per read. Twisted reads 64 KiB at a
#: time: each read allocates 64 KiB and shrinks it to what came, and with
#: thousands of chargers those shrunken blocks scatter the long-lived
#: objects over the heap so that freed memory cannot be returned. OCPP
#: frames are mostly a few hundred bytes; a large one takes a few more
#: reads. With 10,000 idle chargers this saves about 1.2 KiB of RSS per
#: charger (measured with bench.idle).
READ_SIZE = 4096


def socket_transport(transport):
    """
    The transport that reads the socket: C{transport} itself, or the one
    under a TLS or PROXY-protocol wrapper.
    """
    while transport is not None and not hasattr(transport, "socket"):
        transport = getattr(transport, "transport", None)
    return transport


class TrimmedWebSocket:
    """
    Mixin for an autobahn C{WebSocketServerProtocol} (put it first among
    the bases): the trims described in the module docstring.

    The protocol calls L{drop_request} once it has read the handshake
    request for the last time, and L{trim_open} once the connection is
    open.
    """

    # autobahn gives every connection a send queue (a deque) that is only
    # used for sync or chopped writes, which ocppgw makes only when
    # closing: it is created when first used.
    _send_queue = None

    # the extensions negotiated: a list autobahn fills during the handshake
    # and never changes after; an open connection without any reads this
    # empty tuple instead of keeping an empty list
    websocket_extensions_in_use = ()

    def connectionMade(self) -> None:
        reader = socket_transport(self.transport)
        if reader is not None and getattr(reader, "bufferSize", 0) > READ_SIZE:
            reader.bufferSize = READ_SIZE
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        # autobahn's, minus a debug line whose arguments it formats for
        # every chunk read even with debug logging off
        self._dataReceived(data)

    def onMessageEnd(self) -> None:
        # autobahn's, minus firing its "message" event for observers
        # (none here), which built a Deferred and callbacks per frame
        if not self.failedByMe:
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None
        # the frame's unmasker, kept by autobahn until the next frame
        self.current_frame_masker = None

    def _onOpen(self) -> None:
        # autobahn's, minus copying the TLS channel binding and the peer's
        # certificate (parsed into a dict) into its transport details,
        # which nothing here reads: the edge reads the certificate once,
        # at the handshake, and the details are dropped when the
        # connection is compacted. About 7 % of the gateway's CPU in a
        # storm of mTLS (profile 3) chargers.
        self.onOpen()

    def sendData(self, data: bytes, sync: bool = False, chopsize=None) -> None:
        if sync or chopsize or self._send_queue is not None:
            super().sendData(data, sync, chopsize)
        else:
            # autobahn's own path minus a debug line it formats every time
            self.transport.write(data)

    @property
    def send_queue(self) -> deque:
        queue = self._send_queue
        if queue is None:
            queue = self._send_queue = deque()
        return queue

    @send_queue.setter
    def send_queue(self, queue: deque) -> None:
        if queue:
            self._send_queue = queue
        else:
            self.__dict__.pop("_send_queue", None)

    # autobahn gives every connection two Deferreds, fired when it opens
    # and when it closes, for whoever waits on them; nothing waits on a
    # charger's. Kept, they cost two Deferreds per connection, and the
    # closing one, fired with the connection itself, holds it in a
    # reference cycle that only a full pass of the garbage collector
    # frees. Each use gets a throwaway Deferred, and what autobahn sets
    # is not kept.
    is_open = is_closed = property(lambda self: Deferred(), lambda self, _future: None)

    @property
    def trafficStats(self) -> TrafficStats:
        return TRAFFIC_SINK

    @trafficStats.setter
    def trafficStats(self, _stats) -> None:
        pass

    def drop_request(self) -> None:
        """
        Forget the handshake request (its headers and raw bytes): it is
        not read again once the charger is accepted.
        """
        self.http_headers = {}
        self.http_request_data = None

    def trim_open(self) -> None:
        """
        The connection is open: keep no compressor between messages, and
        compact what is left (L{compact}).
        """
        deflate = self._perMessageCompress
        if type(deflate) is PerMessageDeflate:
            # autobahn builds it from its own registry; the subclass only
            # changes what is kept between messages
            deflate.__class__ = LeanDeflate
        self.compact()

    def compact(self) -> None:
        """
        Drop what the open connection does not need (see L{UNTIL_CLOSE})
        and rebuild its instance dict at the size of what is left.
        """
        attributes = self.__dict__
        for name in HANDSHAKE_LEFTOVERS:
            attributes.pop(name, None)
        if attributes.get("websocket_extensions_in_use", True) == []:
            del attributes["websocket_extensions_in_use"]
        for name, value in UNTIL_CLOSE.items():
            current = attributes.get(name, attributes)
            if type(current) is type(value) and current == value:
                del attributes[name]
        if attributes.get("_listeners") is None:
            # autobahn's observer bookkeeping, read only by .on()/.fire()
            # with listeners; nobody subscribes to a charger's events
            attributes.pop("_valid_events", None)
            attributes.pop("_results", None)
        self.__dict__ = dict(attributes)
        # Twisted's transport grew its dict past its 15 attributes too
        transport = self.transport
        if transport is not None and hasattr(transport, "__dict__"):
            transport.__dict__ = dict(transport.__dict__)


for _name in HANDSHAKE_LEFTOVERS:
    setattr(TrimmedWebSocket, _name, None)
for _name, _value in UNTIL_CLOSE.items():
    setattr(TrimmedWebSocket, _name, _value)


class _BucketCall:
    __slots__ = ("timer", "due", "func", "args", "kwargs")

    def __init__(self, timer, due, func, args, kwargs):
        self.timer = timer
        self.due = due
        self.func = func
        self.args = args
        self.kwargs = kwargs

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer._cancel(self)
            self.timer = None


class BucketTimer:
    """
    autobahn's per-connection timers (pings, pong and handshake timeouts),
    batched so that ten thousand chargers share a few reactor timers
    (autobahn reads it as its factory's C{_batched_timer}).

    Due times are rounded I{up} to the bucket: a timer never fires early,
    and at most one bucket late. txaio's own batched timer truncates the
    due time to whole seconds (C{int(now + delay)}), so a timeout could
    fire up to a second early and a sub-second pong timeout would drop
    chargers that do answer.
    """

    def __init__(self, reactor, bucket_seconds: float = 0.2) -> None:
        self._reactor = reactor
        self._bucket = bucket_seconds
        # due bucket number -> (IDelayedCall, set of _BucketCall)
        self._buckets: dict[int, tuple] = {}

    def call_later(self, delay: float, func, *args, **kwargs) -> _BucketCall:
        now = self._reactor.seconds()
        due = math.ceil((now + delay) / self._bucket)
        # most calls have no keyword arguments: no empty dict kept for them
        call = _BucketCall(self, due, func, args, kwargs or None)
        bucket = self._buckets.get(due)
        if bucket is None:
            delayed = self._reactor.callLater(
                max(0.0, due * self._bucket - now), self._fire, due
            )
            bucket = self._buckets[due] = (delayed, set())
        bucket[1].add(call)
        return call

    def _cancel(self, call: _BucketCall) -> None:
        bucket = self._buckets.get(call.due)
        if bucket is None:
            return
        bucket[1].discard(call)
        if not bucket[1]:
            del self._buckets[call.due]
            bucket[0].cancel()

    def _fire(self, due: int) -> None:
        _delayed, calls = self._buckets.pop(due)
        for call in calls:
            call.timer = None
            try:
                if call.kwargs is None:
                    call.func(*call.args)
                else:
                    call.func(*call.args, **call.kwargs)
            except Exception:
                _log.failure("Error in a WebSocket timer")


__all__ = [
    "BucketTimer", "DEFLATE_MEM_LEVEL", "DEFLATE_WINDOW_BITS", "LeanDeflate", "READ_SIZE",
    "TrimmedWebSocket", "accept_deflate", "refuse_compression", "socket_transport",
]
