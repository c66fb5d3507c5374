"""
What a charger's session does with a payload that breaks its schema.

The session checks payloads itself (L{ocppgw.validation.PayloadChecker},
one call per frame, nothing when the charger is not checked); what
happens next is decided here:

- The violation is counted (by direction and action) and logged once per
  action and connection: a charger with a quirk repeats it every few
  seconds, and the counters keep counting.
- In C{warn} mode the frame passes, marked with the validation headers
  (L{PayloadPolicy.headers}) when it is published.
- In C{enforce} mode it is refused. What the session answers the charger
  is the session's business; an invalid command from the back end is not
  sent to the charger, and its sender is told here
  (L{PayloadPolicy.refuse_command}).

Invalid frames are well-formed OCPP-J, so they never count as bad frames.
"""

from __future__ import annotations

from twisted.logger import Logger

from typing import Optional

from ocppgw import framing, topology
from ocppgw.framing import ErrorKind, Frame, OcppVersion
from ocppgw.outcome import Delivery, PublishOutcome
from ocppgw.validation import NO_SCHEMA_ACTION, PayloadChecker, Violation

# The session's namespace: these lines are the session's.
_log = Logger(namespace="ocppgw.session")

#: Direction words of L{ocppgw.validation.ValidationStats}.
FROM_CHARGER = "charger"
FROM_BACKEND = "backend"


def command_violation(checker: PayloadChecker, frame: Frame,
                      open_calls: dict) -> Optional[tuple[str, Violation]]:
    """
    Check a frame from the back end before it goes anywhere.

    @param open_calls: the charger's open CALLs (message id -> action),
        which say what schema a CALLRESULT's payload must follow.
    @return: C{(action, violation)} when the payload breaks its schema.
    """
    kind = frame.message_type
    if kind == framing.CALL or kind == framing.SEND:
        action = frame.action
        violation = checker.request(action, frame.payload)
    elif kind == framing.CALLRESULT:
        action = open_calls.get(frame.message_id)
        if action is None:
            return None  # refused by the session: no CALL to answer
        violation = checker.response(action, frame.payload)
    else:
        return None  # errors carry no payload to check
    if violation is None:
        return None
    return action, violation


class PayloadPolicy:
    """
    One session's handling of invalid payloads, made on its first one (a
    charger that sends none costs nothing).
    """

    __slots__ = ("_checker", "_version", "_identity", "_effects", "_stats", "logged")

    def __init__(self, checker: PayloadChecker, version: OcppVersion, identity: str,
                 effects, stats) -> None:
        """
        @param effects: the session's L{ocppgw.session.SessionEffects}.
        @param stats: the session's frame counters.
        """
        self._checker = checker
        self._version = version
        self._identity = identity
        self._effects = effects
        self._stats = stats
        #: (direction, action) pairs logged already on this connection
        self.logged: set[tuple[str, str]] = set()

    def headers(self, violation: Violation) -> dict:
        """The headers that mark a frame with C{violation} when published."""
        return {
            topology.HEADER_VALIDATION_ERROR: violation.description,
            topology.HEADER_VALIDATION_CODE: framing.error_code(
                self._version, violation.kind
            ),
        }

    def passes(self, action: str, violation: Violation) -> Optional[dict]:
        """
        Count and log an invalid payload from the charger.

        @return: the headers to publish it with (warn mode), or C{None}
            when it is refused (enforce mode).
        """
        if self.refuses(FROM_CHARGER, action, violation):
            return None
        return self.headers(violation)

    def refuses(self, direction: str, action: str, violation: Violation) -> bool:
        """
        Count and log an invalid payload.

        @param direction: L{FROM_CHARGER} or L{FROM_BACKEND}.
        @return: whether it is refused (enforce mode).
        """
        checker = self._checker
        refused = checker.enforce
        # Actions without a schema are counted and logged under one name:
        # a peer can make up any number of action names, and neither the
        # counters nor this memory may grow with them.
        known = action if violation.kind is not ErrorKind.NOT_IMPLEMENTED else NO_SCHEMA_ACTION
        checker.count(direction, known, refused)
        if (direction, known) not in self.logged:
            self.logged.add((direction, known))
            _log.warn(
                "Invalid {action} payload {direction} {identity} ({version}), "
                "{outcome}: {code}: {description} (further ones of this "
                "connection are only counted)",
                action=action,
                direction="from" if direction == FROM_CHARGER else "for",
                identity=self._identity,
                version=self._version.subprotocol,
                outcome="refused" if refused else "passed on",
                code=framing.error_code(self._version, violation.kind),
                description=framing.truncate_for_log(violation.description),
            )
        return refused

    def refuse_call_result(self, frame: Frame, message_id: str, action: str,
                           violation: Violation) -> bytes:
        """
        Enforce mode: the charger's CALLRESULT to the CSMS CALL
        C{message_id} breaks the response schema. 2.1 refuses it with a
        CALLRESULTERROR (2.1 Part 4 §4.2.3); every version reports it to
        the back end as a CALLERROR in place of the answer, so the command
        completes and no worker reads the invalid payload as an answer.

        @return: that CALLERROR, for the session to publish as the answer.
        """
        version = self._version
        if version.has_send:
            self._stats.frame_out(framing.CALLRESULTERROR, action)
            self._effects.send_to_charger(
                framing.encode_call_result_error(
                    version, frame.message_id, violation.kind, violation.description
                )
            )
        return framing.encode_call_error(
            version,
            message_id,
            violation.kind,
            f"Invalid CALLRESULT from the charge point: {violation.description}",
            {"reason": "validation"},
        )

    def refuse_command(self, delivery: Delivery, frame: Frame, violation: Violation) -> None:
        """
        An invalid command from the back end is not sent to the charger;
        its sender learns why: a CALLERROR to its C{reply_to}, and a copy of
        the command with the reason in headers on the queue's dead-letter
        exchange. With neither, it is rejected (dropped) and logged.
        """
        effects = self._effects
        version = self._version
        code = framing.error_code(version, violation.kind)
        # Logged by the gateway: the description may quote peer-chosen names.
        reason = framing.truncate_for_log(f"{code}: {violation.description}")
        headers = self.headers(violation)
        settle = SettleRefusal(effects, delivery, reason)
        # One count for this function itself, released at the end: an
        # outcome may be reported at once (broker down) and must not
        # settle the command before every publish is started.
        settle.expect()
        told = False
        if delivery.reply_to:
            told = True
            settle.expect()
            effects.publish_reply(
                delivery.reply_to,
                delivery.correlation_id,
                framing.encode_call_error(
                    version,
                    frame.message_id,
                    violation.kind,
                    f"Not sent to {self._identity}: {violation.description}",
                    {"reason": "validation"},
                ),
                settle.replied,
                headers,
            )
        settle.expect()
        if effects.dead_letter(delivery, headers, settle.dead_lettered):
            told = True
        else:
            settle.unexpect()
        if told:
            settle.release()
        else:
            effects.reject(delivery, f"not sent to the charger: {reason}")


class SettleRefusal:
    """
    Acknowledge a refused command once the reply and the dead-letter copy
    that tell its sender why are settled; reject it (native dead-lettering,
    without our headers) if the dead-letter copy could not be published.
    """

    __slots__ = ("_effects", "_delivery", "_reason", "_waiting", "_failed")

    def __init__(self, effects, delivery: Delivery, reason: str) -> None:
        self._effects = effects
        self._delivery = delivery
        self._reason = reason
        self._waiting = 0
        self._failed = False

    def expect(self) -> None:
        self._waiting += 1

    def unexpect(self) -> None:
        self._waiting -= 1

    def release(self) -> None:
        self._settle()

    def replied(self, outcome: PublishOutcome) -> None:
        # A reply_to that is gone has nobody left to tell.
        self._settle()

    def dead_lettered(self, outcome: PublishOutcome) -> None:
        if outcome is PublishOutcome.FAILED:
            self._failed = True
        self._settle()

    def _settle(self) -> None:
        self._waiting -= 1
        if self._waiting:
            return
        if self._failed:
            self._effects.reject(self._delivery, self._reason)
        else:
            self._effects.ack(self._delivery)


__all__ = ["FROM_BACKEND", "FROM_CHARGER", "PayloadPolicy", "SettleRefusal"]
