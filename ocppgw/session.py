"""
The per-charger state machine: what happens to every frame of one charger.

A L{ChargerSession} knows nothing of sockets, WebSockets or AMQP. It is
driven by events -- a frame from the charger, a command delivered from the
charger's queue, the outcome of a publish, a timer -- and answers through a
small L{SessionEffects} interface that the gateway implements with the real
edge and bridge (and that the tests implement with a recorder).

The rules it keeps (DESIGN §3):

- A charger's CALL is published to C{<version>.<Action>.req}; if no queue is
  bound for it the charger gets CALLERROR C{NotImplemented}, if the broker
  does not confirm it C{InternalError}, so nothing is silently lost.
- Answers from the CSMS (CALLRESULT/CALLERROR) go to the charger at once,
  never behind queued CALLs, and only if the charger has a CALL open with that
  id: anything else is a frame the charger could not have asked for.
- CALLs from the CSMS are sent one at a time (the OCPP-J rule); later ones
  wait in a queue bounded by the consumer's prefetch. A command is
  acknowledged to the broker only once the charger's answer (or the timeout
  CALLERROR) has been published and confirmed, so an unanswered command is
  redelivered when the charger comes back.
- When the session ends, the commands it still holds are handed back to be
  requeued.
- When the broker connection breaks, the charger may stay connected: its
  unacknowledged commands come back (C{redelivered}) on the new consumer.
  A command the charger already has (the outstanding one) or has already
  answered is then not sent again: the session remembers the message ids
  and answers, re-publishes an answer the broker never confirmed, and
  acknowledges. Commands that were only held are simply forgotten, since
  the broker delivers them again.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from typing import Callable, Optional, Protocol

from twisted.logger import Logger

from ocppgw import framing, topology
from ocppgw.framing import BadFrame, ErrorKind, Frame, OcppVersion

_log = Logger()

#: How many of a charger's own CALLs we remember while waiting for the
#: CSMS's answer. OCPP-J allows one; a few more tolerate chargers that
#: pipeline, and the bound keeps a charger that never gets answers small.
MAX_OPEN_CHARGER_CALLS = 16

#: How many answers to CSMS CALLs a session remembers, so that a command
#: redelivered after a broker reconnect is not sent to the charger again.
#: Only commands answered just before the connection broke (whose ack may
#: not have reached the broker) can come back answered; a charger answers
#: one CALL at a time, so a handful is plenty, and the memory of thousands
#: of idle chargers stays small.
MAX_REMEMBERED_ANSWERS = 8
#: Larger answers are not remembered (a charger could otherwise pin
#: megabytes per connection); such a command, if redelivered, is sent again.
MAX_REMEMBERED_ANSWER_SIZE = 16384

# States of a remembered answer's publish.
_PENDING = "pending"
_CONFIRMED = "confirmed"
_FAILED = "failed"


class PublishOutcome(enum.Enum):
    """
    What the broker did with a publish.
    """

    #: Confirmed, and routed to at least one queue (or not mandatory).
    CONFIRMED = "confirmed"
    #: Confirmed but returned: no queue is bound for the routing key.
    UNROUTABLE = "unroutable"
    #: Not confirmed: nacked, or the channel or connection went away.
    FAILED = "failed"


OutcomeCallback = Callable[[PublishOutcome], None]


class Delivery:
    """
    One command taken from a charger's queue, as the session sees it.

    C{tag} is opaque to the session; the gateway uses it to ack or reject.
    """

    __slots__ = ("tag", "body", "reply_to", "correlation_id", "redelivered")

    def __init__(
        self,
        tag: object,
        body: bytes,
        reply_to: Optional[str] = None,
        correlation_id: Optional[str] = None,
        redelivered: bool = False,
    ) -> None:
        self.tag = tag
        self.body = body
        self.reply_to = reply_to
        self.correlation_id = correlation_id
        self.redelivered = redelivered

    def __repr__(self) -> str:
        return f"<Delivery tag={self.tag!r} reply_to={self.reply_to!r}>"


class SessionEffects(Protocol):
    """
    What a session asks of the world. Implemented by the gateway.
    """

    def send_to_charger(self, frame: bytes) -> None:
        """Write one text frame to the charger."""

    def publish(
        self,
        routing_key: str,
        body: bytes,
        correlation_id: str,
        action: Optional[str],
        mandatory: bool,
        on_outcome: Optional[OutcomeCallback],
        extra_headers: Optional[dict] = None,
    ) -> None:
        """Publish a frame to the OCPP exchange on the charger's behalf."""

    def publish_reply(
        self,
        reply_to: str,
        correlation_id: Optional[str],
        body: bytes,
        on_outcome: Optional[OutcomeCallback],
        extra_headers: Optional[dict] = None,
    ) -> None:
        """Publish an answer to a command's C{reply_to} address."""

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge a command: it is done with."""

    def reject(self, delivery: Delivery, reason: str) -> None:
        """Reject a command without requeueing it (it dead-letters)."""

    def requeue(self, delivery: Delivery) -> None:
        """Give a command back to its queue for later."""

    def close(self, code: int, reason: str) -> None:
        """Close the charger's WebSocket with C{code}."""


class _OutstandingCall:
    """
    The CSMS CALL the charger has been sent and has not answered yet.
    """

    __slots__ = ("delivery", "message_id", "action", "timer")

    def __init__(self, delivery: Delivery, frame: Frame) -> None:
        self.delivery = delivery
        self.message_id = frame.message_id
        self.action = frame.action
        self.timer = None


class _AckWhenPublished:
    """
    Acknowledge a command once every publish of its answer is settled.

    The answer goes to the routing key and, when the command asked for it,
    to its C{reply_to}; the routing-key publish decides: if the broker did
    not take it, the command is requeued so the answer is not lost.
    """

    __slots__ = ("_session", "_delivery", "_waiting", "_failed", "_message_id")

    def __init__(self, session: "ChargerSession", delivery: Delivery, waiting: int,
                 message_id: Optional[str] = None):
        self._session = session
        self._delivery = delivery
        self._waiting = waiting
        self._failed = False
        self._message_id = message_id

    def routed(self, outcome: PublishOutcome) -> None:
        if outcome is PublishOutcome.FAILED:
            self._failed = True
        self._settle()

    def replied(self, outcome: PublishOutcome) -> None:
        # A reply_to that is gone (the caller gave up) must not bring the
        # command back: the answer was published on the routing key.
        self._settle()

    def _settle(self) -> None:
        self._waiting -= 1
        if self._waiting:
            return
        self._session._settled(self._delivery, self._failed, self._message_id)


class ChargerSession:
    """
    The state of one connected charger, driven by events.

    @ivar identity: the charger identity from the URL.
    @ivar version: the negotiated OCPP version.
    """

    __slots__ = (
        "identity",
        "version",
        "_effects",
        "_clock",
        "_call_timeout",
        "_max_bad_frames",
        "_bad_frames",
        "_open_charger_calls",
        "_outstanding",
        "_held",
        "_unsettled",
        "_ended",
        "_answers",
    )

    def __init__(
        self,
        identity: str,
        version: OcppVersion,
        effects: SessionEffects,
        clock,
        call_timeout: float = 30.0,
        max_bad_frames: int = 10,
    ) -> None:
        """
        @param clock: an L{IReactorTime} for the call timeout.
        @param call_timeout: seconds the charger has to answer a CSMS CALL.
        @param max_bad_frames: malformed frames tolerated before closing
            the connection with 1002.
        """
        self.identity = identity
        self.version = version
        self._effects = effects
        self._clock = clock
        self._call_timeout = call_timeout
        self._max_bad_frames = max_bad_frames
        self._bad_frames = 0
        self._open_charger_calls: OrderedDict[str, str] = OrderedDict()
        self._outstanding: Optional[_OutstandingCall] = None
        self._held: deque[tuple[Delivery, Frame]] = deque()
        # Commands whose answer is published but not yet confirmed: they
        # are neither held nor outstanding, and must not be requeued.
        self._unsettled = 0
        self._ended = False
        # message id -> [routing key, body, extra headers, state, waiting]
        # of the last answers to CSMS CALLs; state is _PENDING, _CONFIRMED
        # or _FAILED, waiting the redeliveries that wait for a pending one
        self._answers: OrderedDict[str, list] = OrderedDict()

    # -- introspection (admin, tests) -------------------------------------

    @property
    def outstanding_call(self) -> Optional[tuple[str, str]]:
        """(message id, action) of the CSMS CALL awaiting the charger."""
        if self._outstanding is None:
            return None
        return (self._outstanding.message_id, self._outstanding.action)

    @property
    def held_calls(self) -> int:
        """How many CSMS CALLs wait behind the outstanding one."""
        return len(self._held)

    # -- events from the charger ------------------------------------------

    def charger_frame(self, data: bytes) -> None:
        """
        The charger sent a text frame.
        """
        if self._ended:
            return
        try:
            frame = framing.parse_frame(data, self.version)
        except BadFrame as bad:
            self._bad_frame(bad)
            return
        kind = frame.message_type
        if kind == framing.CALL:
            self._charger_call(frame, data)
        elif kind == framing.CALLRESULT or kind == framing.CALLERROR:
            self._charger_answer(frame, data)
        elif kind == framing.SEND:
            # SEND expects no answer, so an unroutable one has nobody to
            # be told; it is not published mandatory.
            self._effects.publish(
                topology.routing_key(
                    self.version.routing_prefix, frame.action, topology.KIND_REQUEST
                ),
                data,
                frame.message_id,
                frame.action,
                False,
                None,
            )
        else:  # CALLRESULTERROR: the charger refuses a CSMS answer.
            self._publish_unmatched_answer(frame, data)

    def stop_reading(self) -> None:
        """
        Ignore the charger's further frames (its connection is being closed
        for misbehaving); what the session holds is handed back by L{end}.
        """
        self._ended = True

    def rate_limited(self, data: bytes) -> None:
        """
        The charger sent a frame over its message rate limit.

        A CALL is answered with a CALLERROR and not published (the charger
        may retry it later); the answer to the CSMS's outstanding CALL still
        goes through, since there is at most one; anything else is dropped.
        """
        if self._ended:
            return
        try:
            frame = framing.parse_frame(data, self.version)
        except BadFrame as bad:
            self._bad_frame(bad)
            return
        kind = frame.message_type
        if kind == framing.CALL:
            self._effects.send_to_charger(
                framing.encode_call_error(
                    self.version,
                    frame.message_id,
                    ErrorKind.GENERIC_ERROR,
                    "Too many messages; slow down and retry later",
                    {"reason": "rate-limit"},
                )
            )
        elif (
            kind in (framing.CALLRESULT, framing.CALLERROR)
            and self._outstanding is not None
            and self._outstanding.message_id == frame.message_id
        ):
            self._charger_answer(frame, data)

    def _bad_frame(self, bad: BadFrame) -> None:
        self._bad_frames += 1
        _log.info(
            "Bad frame from {identity}: {code}: {description}",
            identity=self.identity,
            code=bad.code,
            description=bad.description,
        )
        if bad.reply is not None:
            self._effects.send_to_charger(bad.reply)
        if self._bad_frames >= self._max_bad_frames:
            self._ended = True
            self._effects.close(1002, "Too many malformed frames")

    def _charger_call(self, frame: Frame, data: bytes) -> None:
        message_id = frame.message_id
        action = frame.action
        open_calls = self._open_charger_calls
        open_calls[message_id] = action
        open_calls.move_to_end(message_id)
        if len(open_calls) > MAX_OPEN_CHARGER_CALLS:
            open_calls.popitem(last=False)

        def published(outcome: PublishOutcome) -> None:
            if outcome is PublishOutcome.CONFIRMED:
                return
            self._open_charger_calls.pop(message_id, None)
            if self._ended:
                return
            if outcome is PublishOutcome.UNROUTABLE:
                kind = ErrorKind.NOT_IMPLEMENTED
                description = "No back end handles this action"
            else:
                kind = ErrorKind.INTERNAL_ERROR
                description = "The message could not be delivered; try again"
            self._effects.send_to_charger(
                framing.encode_call_error(self.version, message_id, kind, description)
            )

        self._effects.publish(
            topology.routing_key(
                self.version.routing_prefix, action, topology.KIND_REQUEST
            ),
            data,
            message_id,
            action,
            True,
            published,
        )

    def _charger_answer(self, frame: Frame, data: bytes) -> None:
        outstanding = self._outstanding
        if outstanding is None or outstanding.message_id != frame.message_id:
            self._publish_unmatched_answer(frame, data)
            return
        kind = (
            topology.KIND_CONFIRMATION
            if frame.message_type == framing.CALLRESULT
            else topology.KIND_ERROR
        )
        self._finish_outstanding(outstanding, kind, data, None)

    def _publish_unmatched_answer(self, frame: Frame, data: bytes) -> None:
        kind = (
            topology.KIND_CONFIRMATION
            if frame.message_type == framing.CALLRESULT
            else topology.KIND_ERROR
        )
        self._effects.publish(
            topology.routing_key(
                self.version.routing_prefix, topology.UNKNOWN_ACTION, kind
            ),
            data,
            frame.message_id,
            None,
            False,
            None,
        )

    # -- events from the back end -----------------------------------------

    def delivery(self, delivery: Delivery) -> None:
        """
        A command arrived from the charger's queue.
        """
        if self._ended:
            # Too late for this connection; the next one will get it.
            self._effects.requeue(delivery)
            return
        try:
            frame = framing.parse_frame(delivery.body, self.version)
        except BadFrame as bad:
            self._effects.reject(
                delivery, f"not an OCPP-J frame for {self.version.subprotocol}: "
                f"{bad.description}"
            )
            return
        kind = frame.message_type
        if kind == framing.CALL:
            if delivery.redelivered and self._redelivered_call(delivery, frame):
                return
            if self._outstanding is None:
                self._send_call(delivery, frame)
            else:
                self._held.append((delivery, frame))
        elif kind == framing.CALLRESULT or kind == framing.CALLERROR:
            if self._open_charger_calls.pop(frame.message_id, None) is None:
                self._effects.reject(
                    delivery, "answer to a CALL the charger does not have open"
                )
                return
            self._effects.send_to_charger(delivery.body)
            self._effects.ack(delivery)
        else:  # SEND, CALLRESULTERROR: nothing to wait for.
            self._effects.send_to_charger(delivery.body)
            self._effects.ack(delivery)

    def _redelivered_call(self, delivery: Delivery, frame: Frame) -> bool:
        """
        A command came back after a broker reconnect: if the charger has it
        already, adopt the new delivery instead of sending it again.

        @return: whether the delivery was dealt with.
        """
        outstanding = self._outstanding
        if outstanding is not None and outstanding.message_id == frame.message_id:
            outstanding.delivery = delivery
            return True
        answer = self._answers.get(frame.message_id)
        if answer is None:
            return False
        state = answer[3]
        if state is _CONFIRMED:
            self._effects.ack(delivery)
        elif state is _PENDING:
            # settled when the publish in flight is (no second copy)
            answer[4].append(delivery)
        else:
            self._republish(frame.message_id, answer, delivery)
        return True

    def _republish(self, message_id: str, answer: list, delivery: Delivery) -> None:
        """
        Publish a remembered answer again, for a redelivered command.
        """
        routing_key, body, extra_headers = answer[0], answer[1], answer[2]
        answer[3] = _PENDING
        reply_to = delivery.reply_to
        settle = _AckWhenPublished(self, delivery, 2 if reply_to else 1, message_id)
        self._unsettled += 1
        self._effects.publish(
            routing_key, body, message_id, None, False, settle.routed, extra_headers
        )
        if reply_to:
            self._effects.publish_reply(
                reply_to, delivery.correlation_id, body, settle.replied, extra_headers
            )

    def broker_lost(self) -> None:
        """
        The broker connection broke; the charger stays connected.

        Every unacknowledged command goes back to the queue on the broker's
        side, so the held ones are forgotten here (they will be delivered
        again); the outstanding one stays outstanding, to be matched with
        its redelivery.
        """
        self._held.clear()

    def _send_call(self, delivery: Delivery, frame: Frame) -> None:
        outstanding = _OutstandingCall(delivery, frame)
        self._outstanding = outstanding
        self._effects.send_to_charger(delivery.body)
        outstanding.timer = self._clock.callLater(
            self._call_timeout, self._call_timed_out, outstanding
        )

    def _call_timed_out(self, outstanding: _OutstandingCall) -> None:
        outstanding.timer = None
        if self._outstanding is not outstanding:
            return
        body = framing.encode_call_error(
            self.version,
            outstanding.message_id,
            ErrorKind.GENERIC_ERROR,
            f"No answer from the charge point within {self._call_timeout:g} s",
            {"reason": "timeout"},
        )
        self._finish_outstanding(
            outstanding, topology.KIND_ERROR, body, {topology.HEADER_TIMEOUT: True}
        )

    def _finish_outstanding(
        self,
        outstanding: _OutstandingCall,
        kind: str,
        body: bytes,
        extra_headers: Optional[dict],
    ) -> None:
        """
        Publish the answer to the outstanding CALL and move on to the next.
        """
        self._outstanding = None
        if outstanding.timer is not None:
            outstanding.timer.cancel()
            outstanding.timer = None
        delivery = outstanding.delivery
        reply_to = delivery.reply_to
        routing_key = topology.routing_key(
            self.version.routing_prefix, outstanding.action, kind
        )
        answers = self._answers
        if len(body) <= MAX_REMEMBERED_ANSWER_SIZE:
            answers[outstanding.message_id] = [routing_key, body, extra_headers, _PENDING, []]
            answers.move_to_end(outstanding.message_id)
            if len(answers) > MAX_REMEMBERED_ANSWERS:
                answers.popitem(last=False)
        else:
            answers.pop(outstanding.message_id, None)
        settle = _AckWhenPublished(
            self, delivery, 2 if reply_to else 1, outstanding.message_id
        )
        self._unsettled += 1
        self._effects.publish(
            routing_key,
            body,
            outstanding.message_id,
            None,
            False,
            settle.routed,
            extra_headers,
        )
        if reply_to:
            self._effects.publish_reply(
                reply_to, delivery.correlation_id, body, settle.replied, extra_headers
            )
        if not self._ended:
            self._send_next_held()

    def _settled(self, delivery: Delivery, failed: bool, message_id=None) -> None:
        self._unsettled -= 1
        answer = self._answers.get(message_id) if message_id is not None else None
        if answer is not None:
            answer[3] = _FAILED if failed else _CONFIRMED
            waiting, answer[4] = answer[4], []
            for other in waiting:
                if failed:
                    self._republish(message_id, answer, other)
                else:
                    self._effects.ack(other)
        if failed:
            self._effects.requeue(delivery)
        else:
            self._effects.ack(delivery)

    def _send_next_held(self) -> None:
        if self._held:
            delivery, frame = self._held.popleft()
            self._send_call(delivery, frame)

    # -- the end ----------------------------------------------------------

    def end(self) -> list[Delivery]:
        """
        The connection is gone (or replaced): stop, and return the commands
        that were sent or held but not answered, for the caller to requeue
        once the consumer is cancelled.
        """
        self._ended = True
        unanswered: list[Delivery] = []
        if self._outstanding is not None:
            if self._outstanding.timer is not None:
                self._outstanding.timer.cancel()
            unanswered.append(self._outstanding.delivery)
            self._outstanding = None
        unanswered.extend(delivery for delivery, _ in self._held)
        self._held.clear()
        return unanswered

    def handover(self) -> OrderedDict:
        """
        The charger's own CALLs still awaiting the CSMS's answer, so that a
        connection replacing this one can still receive those answers.
        """
        return self._open_charger_calls

    def adopt_open_calls(self, open_calls: OrderedDict) -> None:
        """
        Take over the open CALLs of the connection this one replaces.
        """
        for message_id, action in open_calls.items():
            self._open_charger_calls.setdefault(message_id, action)
