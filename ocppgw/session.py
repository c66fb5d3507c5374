"""
The per-charger state machine: what happens to every frame of one charger.

A L{ChargerSession} knows nothing of sockets, WebSockets or AMQP. It is
driven by events -- a frame from the charger, a command delivered from the
charger's queue, the outcome of a publish, a timer -- and answers through a
small L{SessionEffects} interface that the gateway implements with the real
edge and bridge (and that the tests implement with a recorder).

The rules it keeps (docs/architecture.md, "The rules the session keeps"):

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
- With a payload checker (L{ocppgw.validation}), payloads are checked
  against the OCPP JSON schemas in both directions. In C{warn} mode an
  invalid frame passes, marked with a header when it is published; in
  C{enforce} mode an invalid CALL from the charger is answered with the
  CALLERROR the version asks for and not published, an invalid CALLRESULT
  is replaced by a CALLERROR for the back end (and, in 2.1, refused with a
  CALLRESULTERROR), and an invalid command from the back end is not sent:
  its sender is told (L{SessionEffects.dead_letter}, C{reply_to}). Such
  frames are well-formed OCPP-J, so they do not count as bad frames.
- A malformed CALLRESULT or CALLERROR whose message id is the outstanding
  CSMS CALL's is that CALL's answer all the same (chargers and simulators
  in the field send error details as a string, or extra elements): it is
  published at once, as the charger sent it, marked with the
  C{x-ocppgw-malformed} header, and does not count as a bad frame, so
  neither the back end nor the charger's next command waits for the call
  timeout. So is a CALLERROR whose error code its version does not define.
"""

from __future__ import annotations

from typing import Optional, Protocol, Union

from twisted.logger import Logger

from ocppgw import framing, topology
from ocppgw.answers import AnswerMemory
from ocppgw.closecodes import CloseCode
from ocppgw.framing import BadFrame, ErrorKind, Frame, OcppVersion
from ocppgw.outcome import Delivery, OutcomeCallback, PublishOutcome
from ocppgw.payloads import FROM_BACKEND, FROM_CHARGER, PayloadPolicy, command_violation
from ocppgw.validation import PayloadChecker, Violation

_log = Logger()

#: How many of a charger's own CALLs we remember while waiting for the
#: CSMS's answer. OCPP-J allows one; a few more tolerate chargers that
#: pipeline, and the bound keeps a charger that never gets answers small.
MAX_OPEN_CHARGER_CALLS = 16


class OpenCalls(dict):
    """
    The charger's own CALLs awaiting the CSMS's answer: message id ->
    action, oldest first, at most L{MAX_OPEN_CHARGER_CALLS}.

    A plain dict underneath (an empty OrderedDict costs twice as much per
    idle charger), with no instance dict of its own.
    """

    __slots__ = ()

    def remember(self, message_id: str, action: str) -> None:
        """Put C{message_id} last, dropping the oldest beyond the bound."""
        self.pop(message_id, None)
        self[message_id] = action
        if len(self) > MAX_OPEN_CHARGER_CALLS:
            del self[next(iter(self))]

    def adopt(self, others: dict) -> None:
        """Take over the open CALLs of a connection this one replaces."""
        for message_id, action in others.items():
            self.setdefault(message_id, action)


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

    def dead_letter(
        self, delivery: Delivery, headers: dict, on_outcome: OutcomeCallback
    ) -> bool:
        """
        Publish a refused command, as it came, to its queue's dead-letter
        exchange with C{headers} added (C{basic.reject} cannot add them).

        @return: C{False} when the queue has no dead-letter exchange
            (C{on_outcome} is then never called).
        """

    def requeue(self, delivery: Delivery) -> None:
        """Give a command back to its queue for later."""

    def current(self, delivery: Delivery) -> bool:
        """
        Whether C{delivery} came on the broker connection in use now (an
        ack or requeue for it still means something).
        """

    def close(self, code: int, reason: str) -> None:
        """Close the charger's WebSocket with C{code}."""


class NoStats:
    """
    What a session counts into when nobody counts (an
    L{ocppgw.metrics.ChargerStats} counts for the gateway).
    """

    __slots__ = ()

    def frame_in(self, message_type: int, action: Optional[str]) -> None:
        pass

    def frame_out(self, message_type: int, action: Optional[str]) -> None:
        pass

    def bad_frame(self, code: str) -> None:
        pass

    def csms_call(self, seconds: float, timed_out: bool, action: str) -> None:
        pass


NO_STATS = NoStats()


class _OutstandingCall:
    """
    The CSMS CALL the charger has been sent and has not answered yet.
    """

    __slots__ = ("delivery", "message_id", "action", "timer", "sent_at")

    def __init__(self, delivery: Delivery, frame: Frame, sent_at: float) -> None:
        self.delivery = delivery
        self.message_id = frame.message_id
        self.action = frame.action
        self.timer = None
        self.sent_at = sent_at


class FrameFaults:
    """
    What a session does with the charger's frames that break the rules:
    a malformed frame is answered as its version asks and counted (the
    connection is closed with 1002 after C{max_bad_frames}), except a
    malformed answer to the outstanding CSMS CALL, which is that CALL's
    answer all the same (see the module docstring); a frame over the
    charger's message rate is answered or dropped.

    The base of L{ChargerSession}, kept apart so that the session reads as
    the flow of well-formed frames; the attributes are the session's.
    """

    __slots__ = ()

    identity: str
    version: OcppVersion
    _effects: SessionEffects
    _clock: object
    _stats: object
    _ended: bool
    _bad_frames: int
    _max_bad_frames: int
    _max_id: int

    # the session's call flow
    def _outstanding_call_for(self, message_id) -> Optional[_OutstandingCall]:
        raise NotImplementedError

    def _charger_answer(self, frame: Frame, data: bytes,
                        outstanding: Optional[_OutstandingCall]) -> None:
        raise NotImplementedError

    def _finish_outstanding(self, outstanding: _OutstandingCall, kind: str, body: bytes,
                            extra_headers: Optional[dict]) -> None:
        raise NotImplementedError

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
        frame = self._parse(data)
        if frame is None:
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
        elif kind == framing.CALLRESULT or kind == framing.CALLERROR:
            answered = self._outstanding_call_for(frame.message_id)
            if answered is not None:
                self._charger_answer(frame, data, answered)

    def _parse(self, data: bytes) -> Optional[Frame]:
        """
        The charger's frame, or C{None} when there is nothing to do with it:
        the session has ended, or the frame is malformed (then it is
        answered as the version asks and counted towards C{max_bad_frames}).
        """
        if self._ended:
            return None
        try:
            return framing.parse_frame(data, self.version, self._max_id)
        except BadFrame as bad:
            answered = (
                self._outstanding_call_for(bad.message_id)
                if bad.message_id != framing.UNKNOWN_MESSAGE_ID
                and bad.message_type in (framing.CALLRESULT, framing.CALLERROR)
                else None
            )
            if answered is not None:
                self._malformed_answer(answered, bad, data)
            else:
                self._bad_frame(bad)
            return None

    def _malformed_answer(self, outstanding: _OutstandingCall, bad: BadFrame,
                          data: bytes) -> None:
        """
        A malformed CALLRESULT or CALLERROR that answers the outstanding
        CALL: it is that CALL's answer (see the module docstring). Whatever
        the version asks to send back for it (a 2.1 CALLRESULTERROR) is
        still sent.
        """
        _log.info(
            "Malformed answer from {identity} to {action} ({code}: {description}); "
            "published as its answer, marked malformed",
            identity=self.identity,
            action=outstanding.action,
            code=bad.code,
            description=bad.description,
        )
        stats = self._stats
        stats.frame_in(bad.message_type, outstanding.action)
        stats.csms_call(self._clock.seconds() - outstanding.sent_at, False, outstanding.action)
        if bad.reply is not None:
            stats.frame_out(framing.CALLRESULTERROR, outstanding.action)
            self._effects.send_to_charger(bad.reply)
        kind = (
            topology.KIND_ERROR
            if bad.message_type == framing.CALLERROR
            else topology.KIND_CONFIRMATION
        )
        self._finish_outstanding(
            outstanding, kind, data, {topology.HEADER_MALFORMED: bad.description}
        )

    def _bad_frame(self, bad: BadFrame) -> None:
        self._bad_frames += 1
        _log.info(
            "Bad frame from {identity}: {code}: {description}",
            identity=self.identity,
            code=bad.code,
            description=bad.description,
        )
        self._stats.bad_frame(bad.code)
        if bad.reply is not None:
            self._stats.frame_out(framing.CALLERROR, None)
            self._effects.send_to_charger(bad.reply)
        if self._bad_frames >= self._max_bad_frames:
            self._ended = True
            self._effects.close(CloseCode.PROTOCOL_ERROR, "Too many malformed frames")


class ChargerSession(FrameFaults):
    """
    The state of one connected charger, driven by events.

    @ivar identity: the charger identity from the URL.
    @ivar version: the negotiated OCPP version.
    """

    __slots__ = (
        "identity", "version", "_effects", "_clock", "_call_timeout", "_max_bad_frames",
        "_bad_frames", "_open_charger_calls", "_outstanding", "_held", "_ended", "_answers",
        "_checker", "_payloads", "_stats", "_max_id",
    )

    def __init__(
        self,
        identity: str,
        version: OcppVersion,
        effects: SessionEffects,
        clock,
        call_timeout: float = 30.0,
        max_bad_frames: int = 10,
        checker: Optional[PayloadChecker] = None,
        stats=None,
        max_message_id_length: int = framing.MAX_MESSAGE_ID_LENGTH,
    ) -> None:
        """
        @param clock: an L{IReactorTime} for the call timeout.
        @param call_timeout: seconds the charger has to answer a CSMS CALL.
        @param max_bad_frames: malformed frames tolerated before closing
            the connection with 1002.
        @param checker: checks payloads against the schemas of C{version};
            C{None} checks nothing (and costs nothing).
        @param stats: told of every frame in and out, bad frame and CSMS
            call round trip (an L{ocppgw.metrics.ChargerStats}), or C{None}
            (nothing is counted).
        @param max_message_id_length: the longest message id accepted in
            either direction (C{[ocpp] max_message_id_length}).
        """
        self.identity = identity
        self.version = version
        self._effects = effects
        self._clock = clock
        self._call_timeout = call_timeout
        self._max_bad_frames = max_bad_frames
        self._bad_frames = 0
        self._open_charger_calls = OpenCalls()
        self._outstanding: Optional[_OutstandingCall] = None
        # a list, not a deque: it holds at most prefetch_count commands, and
        # an empty deque costs 0.7 KB per idle charger; an empty tuple
        # (shared) while nothing is held
        self._held: Union[list[tuple[Delivery, Frame]], tuple] = ()
        self._ended = False
        # answers to CSMS CALLs until their commands are acknowledged, and
        # a memory of the last ones (see ocppgw.answers)
        self._answers = AnswerMemory(effects, clock)
        self._checker = checker
        # what to do with invalid payloads: made on the first one
        self._payloads: Optional[PayloadPolicy] = None
        self._stats = NO_STATS if stats is None else stats
        self._max_id = max_message_id_length

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

    def _outstanding_call_for(self, message_id) -> Optional[_OutstandingCall]:
        """
        The outstanding CSMS CALL if its message id is C{message_id} (a
        CALLRESULT or CALLERROR with that id is its answer), else C{None}.
        """
        outstanding = self._outstanding
        if outstanding is not None and outstanding.message_id == message_id:
            return outstanding
        return None

    # -- events from the charger ------------------------------------------

    def charger_frame(self, data: bytes) -> None:
        """
        The charger sent a text frame.
        """
        frame = self._parse(data)
        if frame is None:
            return
        kind = frame.message_type
        action = frame.action
        if action is None:  # an answer (or a 2.1 CALLRESULTERROR)
            answered = self._outstanding_call_for(frame.message_id)
            self._stats.frame_in(
                kind, answered.action if answered is not None else topology.UNKNOWN_ACTION
            )
            if kind == framing.CALLRESULT or kind == framing.CALLERROR:
                self._charger_answer(frame, data, answered)
            else:  # CALLRESULTERROR: the charger refuses a CSMS answer.
                self._publish_unmatched_answer(frame, data)
            return
        self._stats.frame_in(kind, action)
        if kind == framing.CALL:
            self._charger_call(frame, data)
        else:
            self._charger_send(frame, data)

    def _charger_call(self, frame: Frame, data: bytes) -> None:
        message_id = frame.message_id
        action = frame.action
        headers = None
        if self._checker is not None:
            violation = self._checker.request(action, frame.payload)
            if violation is not None:
                headers = self._payload_policy().passes(action, violation)
                if headers is None:
                    self._send_error(message_id, action, violation.kind, violation.description)
                    return
        self._open_charger_calls.remember(message_id, action)

        def published(outcome: PublishOutcome) -> None:
            if outcome is PublishOutcome.CONFIRMED:
                return
            self._open_charger_calls.pop(message_id, None)
            if self._ended:
                return
            if outcome is PublishOutcome.UNROUTABLE:
                self._send_error(message_id, action, ErrorKind.NOT_IMPLEMENTED,
                                 "No back end handles this action")
            else:
                self._send_error(message_id, action, ErrorKind.INTERNAL_ERROR,
                                 "The message could not be delivered; try again")

        self._effects.publish(
            topology.routing_key(self.version.routing_prefix, action, topology.KIND_REQUEST),
            data, message_id, action, True, published, headers,
        )

    def _send_error(self, message_id: str, action: str, kind: ErrorKind,
                    description: str) -> None:
        """Answer the charger's CALL C{message_id} with a CALLERROR."""
        self._stats.frame_out(framing.CALLERROR, action)
        self._effects.send_to_charger(
            framing.encode_call_error(self.version, message_id, kind, description)
        )

    def _charger_send(self, frame: Frame, data: bytes) -> None:
        headers = None
        if self._checker is not None:
            violation = self._checker.request(frame.action, frame.payload)
            if violation is not None:
                headers = self._payload_policy().passes(frame.action, violation)
                if headers is None:
                    return  # a SEND is never answered (2.1 §4.2.4)
        # SEND expects no answer, so an unroutable one has nobody to
        # be told; it is not published mandatory.
        self._effects.publish(
            topology.routing_key(self.version.routing_prefix, frame.action, topology.KIND_REQUEST),
            data, frame.message_id, frame.action, False, None, headers,
        )

    def _charger_answer(self, frame: Frame, data: bytes,
                        outstanding: Optional[_OutstandingCall]) -> None:
        """
        A CALLRESULT or CALLERROR: C{outstanding} is the CALL it answers,
        or C{None} when it answers nothing the session knows.
        """
        if outstanding is None:
            self._publish_unmatched_answer(frame, data)
            return
        self._stats.csms_call(
            self._clock.seconds() - outstanding.sent_at, False, outstanding.action
        )
        if frame.message_type == framing.CALLERROR:
            headers = None
            if not framing.is_error_code(self.version, frame.error_code):
                headers = {
                    topology.HEADER_MALFORMED:
                        f"the error code is not one {self.version.subprotocol} defines"
                }
            self._finish_outstanding(outstanding, topology.KIND_ERROR, data, headers)
            return
        headers = None
        if self._checker is not None:
            violation = self._checker.response(outstanding.action, frame.payload)
            if violation is not None:
                payloads = self._payload_policy()
                headers = payloads.headers(violation)
                if payloads.refuses(FROM_CHARGER, outstanding.action, violation):
                    body = payloads.refuse_call_result(
                        frame, outstanding.message_id, outstanding.action, violation
                    )
                    self._finish_outstanding(outstanding, topology.KIND_ERROR, body, headers)
                    return
        self._finish_outstanding(outstanding, topology.KIND_CONFIRMATION, data, headers)

    def _publish_unmatched_answer(self, frame: Frame, data: bytes) -> None:
        kind = (topology.KIND_CONFIRMATION if frame.message_type == framing.CALLRESULT
                else topology.KIND_ERROR)
        self._effects.publish(
            topology.routing_key(self.version.routing_prefix, topology.UNKNOWN_ACTION, kind),
            data, frame.message_id, None, False, None,
        )

    def _refused_command(self, delivery: Delivery, frame: Frame, action: str,
                         violation: Violation) -> bool:
        """
        An invalid command from the back end: refused in enforce mode (and
        then done with), passed on in warn mode.
        """
        payloads = self._payload_policy()
        if not payloads.refuses(FROM_BACKEND, action, violation):
            return False
        # The charger's CALL stays open: a valid answer may still come.
        payloads.refuse_command(delivery, frame, violation)
        return True

    def _payload_policy(self) -> PayloadPolicy:
        payloads = self._payloads
        if payloads is None:
            payloads = self._payloads = PayloadPolicy(
                self._checker, self.version, self.identity, self._effects, self._stats
            )
        return payloads

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
            frame = framing.parse_frame(delivery.body, self.version, self._max_id)
        except BadFrame as bad:
            self._effects.reject(
                delivery, f"not an OCPP-J frame for {self.version.subprotocol}: "
                f"{bad.description}"
            )
            return
        kind = frame.message_type
        checker = self._checker
        if checker is not None:
            invalid = command_violation(checker, frame, self._open_charger_calls)
            if invalid is not None and self._refused_command(delivery, frame, *invalid):
                return
        if kind == framing.CALL:
            if delivery.redelivered and self._redelivered_call(delivery, frame):
                return
            if self._outstanding is None:
                self._send_call(delivery, frame)
            elif self._held:
                self._held.append((delivery, frame))
            else:
                self._held = [(delivery, frame)]
        elif kind == framing.CALLRESULT or kind == framing.CALLERROR:
            action = self._open_charger_calls.pop(frame.message_id, None)
            if action is None:
                self._effects.reject(
                    delivery, "answer to a CALL the charger does not have open"
                )
                return
            self._stats.frame_out(kind, action)
            self._effects.send_to_charger(delivery.body)
            self._effects.ack(delivery)
        else:  # SEND, CALLRESULTERROR: nothing to wait for.
            self._stats.frame_out(kind, frame.action or topology.UNKNOWN_ACTION)
            self._effects.send_to_charger(delivery.body)
            self._effects.ack(delivery)

    def _redelivered_call(self, delivery: Delivery, frame: Frame) -> bool:
        """
        A command came back after a broker reconnect: if the charger has it
        already, adopt the new delivery instead of sending it again.

        @return: whether the delivery was dealt with.
        """
        outstanding = self._outstanding_call_for(frame.message_id)
        if outstanding is not None:
            outstanding.delivery = delivery
            return True
        return self._answers.redelivered(frame.message_id, delivery)

    def broker_lost(self) -> None:
        """
        The broker connection broke; the charger stays connected.

        Every unacknowledged command goes back to the queue on the broker's
        side, so the held ones are forgotten here (they will be delivered
        again); the outstanding one stays outstanding, to be matched with
        its redelivery, and so do answers the broker has not confirmed.
        """
        self._held = ()
        self._answers.broker_lost()

    def _send_call(self, delivery: Delivery, frame: Frame) -> None:
        outstanding = _OutstandingCall(delivery, frame, self._clock.seconds())
        self._outstanding = outstanding
        self._stats.frame_out(framing.CALL, frame.action)
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
        self._stats.csms_call(self._call_timeout, True, outstanding.action)
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
        routing_key = topology.routing_key(
            self.version.routing_prefix, outstanding.action, kind
        )
        self._answers.publish(
            outstanding.message_id, routing_key, body, extra_headers, outstanding.delivery
        )
        if not self._ended and self._held:
            delivery, frame = self._held.pop(0)
            if not self._held:
                self._held = ()
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
        self._held = ()
        unanswered.extend(self._answers.end())
        return unanswered

    def handover(self) -> dict:
        """
        The charger's own CALLs still awaiting the CSMS's answer, so that a
        connection replacing this one can still receive those answers.
        """
        return self._open_charger_calls

    def adopt_open_calls(self, open_calls: dict) -> None:
        """
        Take over the open CALLs of the connection this one replaces.
        """
        self._open_charger_calls.adopt(open_calls)
