"""
A charger session's answers to CSMS CALLs, from publish to the command's ack.

A command is acknowledged to the broker only once the charger's answer
(or the timeout's CALLERROR) is published I{and confirmed}. Until then the
answer is kept here, because the command may come back:

- The broker connection is lost while the answer awaits its confirm, or
  after the confirm but before the ack reached the broker. The broker
  requeues the command and delivers it again (C{redelivered}) once the
  consumer is restored. The charger, still connected, must not get it a
  second time: the redelivery is answered from here -- acknowledged if
  the answer was confirmed, published again (then acknowledged) if it was
  not.
- The broker refuses the publish while the connection lives (a nack, a
  publish channel closed because the exchange was deleted): the answer is
  published again after a back-off (1 s, doubling, at most 30 s), the
  command staying unacknowledged meanwhile. (Requeueing it instead would
  bring it straight back and loop as fast as the broker refuses.)

A confirmed answer is remembered without its body (only that it was
confirmed), so that the memory of thousands of chargers stays small; an
answer not yet confirmed keeps its body, whatever its size, until it is.
"""

from __future__ import annotations

import enum
from typing import Optional

from twisted.logger import Logger

from ocppgw.outcome import Delivery, PublishOutcome

_log = Logger()

#: Confirmed answers remembered per session. Only commands answered just
#: before a connection broke (whose ack may not have reached the broker)
#: come back answered; a charger answers one CALL at a time, so a handful
#: is plenty.
MAX_CONFIRMED = 8
#: Answers kept in all, confirmed or not. Unconfirmed ones are bounded by
#: the charger's prefetch in practice; this bound only stops a session
#: whose publishes never succeed from growing (the oldest is forgotten,
#: and its command, if delivered again, is sent to the charger again).
MAX_KEPT = 64

#: First delay before publishing a refused answer again; doubled each time.
FIRST_RETRY_DELAY = 1.0
#: Longest delay between two attempts.
MAX_RETRY_DELAY = 30.0


class AnswerState(enum.Enum):
    """Where an answer's publish is."""

    PENDING = "pending"
    CONFIRMED = "confirmed"
    FAILED = "failed"


class Answer:
    """
    One answer to a CSMS CALL, and the deliveries of its command that wait
    for it to be settled.
    """

    __slots__ = ("message_id", "routing_key", "body", "extra_headers", "state",
                 "deliveries", "timer", "attempts")

    def __init__(self, message_id: str, routing_key: str, body: bytes,
                 extra_headers: Optional[dict], delivery: Delivery) -> None:
        self.message_id = message_id
        self.routing_key = routing_key
        self.body = body
        self.extra_headers = extra_headers
        self.state = AnswerState.PENDING
        #: the command's deliveries to acknowledge once it is confirmed
        self.deliveries: list[Delivery] = [delivery]
        self.timer = None
        self.attempts = 0

    def forget_body(self) -> None:
        self.routing_key = self.body = self.extra_headers = None


class _Settle:
    """
    Counts the publishes of one attempt (routing key, and reply_to when
    the command asked for it); the routing-key publish decides the
    outcome: a reply_to that is gone (the caller gave up) must not bring
    the command back.
    """

    __slots__ = ("_memory", "_answer", "_waiting", "_failed")

    def __init__(self, memory: "AnswerMemory", answer: Answer, waiting: int) -> None:
        self._memory = memory
        self._answer = answer
        self._waiting = waiting
        self._failed = False

    def routed(self, outcome: PublishOutcome) -> None:
        if outcome is PublishOutcome.FAILED:
            self._failed = True
        self._settle()

    def replied(self, _outcome: PublishOutcome) -> None:
        self._settle()

    def _settle(self) -> None:
        self._waiting -= 1
        if not self._waiting:
            self._memory._settled(self._answer, self._failed)


class AnswerMemory:
    """
    Publishes a session's answers and remembers them (see the module
    docstring). Drives the session's L{SessionEffects} for publishes, acks
    and requeues.
    """

    __slots__ = ("_effects", "_clock", "_answers", "_ended")

    def __init__(self, effects, clock) -> None:
        self._effects = effects
        self._clock = clock
        # message id -> Answer, oldest first (a plain dict: see the session)
        self._answers: dict[str, Answer] = {}
        self._ended = False

    def publish(self, message_id: str, routing_key: str, body: bytes,
                extra_headers: Optional[dict], delivery: Delivery) -> None:
        """
        Publish the answer to the command C{delivery}; it is acknowledged
        once the broker confirms.
        """
        answer = Answer(message_id, routing_key, body, extra_headers, delivery)
        self._remember(answer)
        self._publish(answer)

    def redelivered(self, message_id: str, delivery: Delivery) -> bool:
        """
        A command came back from the broker: settle it from memory if it
        was answered.

        @return: whether it was (else it is a command to send).
        """
        answer = self._answers.get(message_id)
        if answer is None:
            return False
        state = answer.state
        if state is AnswerState.CONFIRMED:
            self._effects.ack(delivery)
        elif state is AnswerState.PENDING:
            # settled with the publish in flight (no second copy)
            answer.deliveries.append(delivery)
        else:
            self._cancel_retry(answer)
            answer.deliveries = [d for d in answer.deliveries if self._effects.current(d)]
            answer.deliveries.append(delivery)
            self._publish(answer)
        return True

    def broker_lost(self) -> None:
        """
        The broker connection is lost: the deliveries held here are moot
        (the broker requeued their commands and will deliver them again),
        and so are retries, which the redeliveries will drive instead.
        """
        for answer in self._answers.values():
            self._cancel_retry(answer)
            if answer.state is not AnswerState.PENDING:
                answer.deliveries = []

    def end(self) -> list[Delivery]:
        """
        The session ended: the commands whose answer the broker refused
        are handed back, to be requeued.
        """
        self._ended = True
        unsettled = []
        for answer in self._answers.values():
            if answer.state is AnswerState.FAILED:
                self._cancel_retry(answer)
                unsettled.extend(answer.deliveries)
                answer.deliveries = []
        return unsettled

    # -- inside ------------------------------------------------------------------

    def _remember(self, answer: Answer) -> None:
        answers = self._answers
        answers.pop(answer.message_id, None)
        answers[answer.message_id] = answer
        if len(answers) <= MAX_CONFIRMED:
            return
        confirmed = [key for key, kept in answers.items()
                     if kept.state is AnswerState.CONFIRMED]
        for key in confirmed[:len(answers) - MAX_CONFIRMED]:
            del answers[key]
        while len(answers) > MAX_KEPT:
            oldest = next(iter(answers))
            forgotten = answers.pop(oldest)
            _log.warn("Forgetting the unconfirmed answer {message_id}: too many kept",
                      message_id=oldest)
            if forgotten.state is AnswerState.FAILED:
                # its command goes back to the queue (and to the charger)
                self._cancel_retry(forgotten)
                for delivery in forgotten.deliveries:
                    self._effects.requeue(delivery)
                forgotten.deliveries = []

    def _publish(self, answer: Answer) -> None:
        answer.state = AnswerState.PENDING
        answer.attempts += 1
        # the command's properties: any of its deliveries carries them
        latest = answer.deliveries[-1] if answer.deliveries else None
        reply_to = latest.reply_to if latest is not None else None
        settle = _Settle(self, answer, 2 if reply_to else 1)
        effects = self._effects
        effects.publish(answer.routing_key, answer.body, answer.message_id, None, False,
                        settle.routed, answer.extra_headers)
        if reply_to:
            effects.publish_reply(reply_to, latest.correlation_id, answer.body,
                                  settle.replied, answer.extra_headers)

    def _settled(self, answer: Answer, failed: bool) -> None:
        effects = self._effects
        deliveries, answer.deliveries = answer.deliveries, []
        if not failed:
            answer.state = AnswerState.CONFIRMED
            answer.forget_body()
            answer.attempts = 0
            for delivery in deliveries:
                effects.ack(delivery)
            return
        answer.state = AnswerState.FAILED
        # deliveries of a lost connection are moot: the redelivery will
        # publish the answer again
        live = [delivery for delivery in deliveries if effects.current(delivery)]
        if self._ended:
            for delivery in live:
                effects.requeue(delivery)
            return
        answer.deliveries = live
        if live:
            delay = min(MAX_RETRY_DELAY, FIRST_RETRY_DELAY * 2 ** min(answer.attempts - 1, 6))
            _log.warn(
                "The broker did not take the answer {message_id}: publishing it again "
                "in {delay:g} s", message_id=answer.message_id, delay=delay,
            )
            answer.timer = self._clock.callLater(delay, self._retry, answer)

    def _retry(self, answer: Answer) -> None:
        answer.timer = None
        if answer.state is not AnswerState.FAILED or self._answers.get(
                answer.message_id) is not answer:
            return
        answer.deliveries = [d for d in answer.deliveries if self._effects.current(d)]
        if answer.deliveries:
            self._publish(answer)

    @staticmethod
    def _cancel_retry(answer: Answer) -> None:
        if answer.timer is not None:
            if answer.timer.active():
                answer.timer.cancel()
            answer.timer = None
