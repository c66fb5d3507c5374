"""
Rate limits that keep one gateway responsive under a reconnection storm
and against a charger that floods it.

After a mobile network outage thousands of chargers reconnect within
seconds. Each accepted handshake costs a queue declaration and a consumer
on the broker before the 101, so taking them all at once makes every one
of them slow (and time out, and retry, and make it worse). L{Admission}
lets a steady rate through (a token bucket), caps how many handshakes are
prepared at the same time, and tells the rest to come back later with a
I{random} C{Retry-After}, so that a refused wave returns spread out
instead of as the next wave. It is consulted before any broker work.

L{MessageRateLimit} limits the messages of one charger: a token bucket,
and the streak of frames over it that ends in closing the charger.

Nothing here does I/O; time comes from an injected clock (C{seconds()}).
"""

from __future__ import annotations

import random
from typing import Callable, Optional


class TokenBucket:
    """
    C{rate} tokens per second, at most C{burst} saved up.

    A rate of 0 means no limit: L{take} always succeeds.
    """

    __slots__ = ("_clock", "rate", "burst", "_tokens", "_stamp")

    def __init__(self, clock, rate: float, burst: int) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._stamp = clock.seconds()

    def take(self) -> bool:
        """
        Take one token if there is one.
        """
        if not self.rate:
            return True
        return self._take_at(self._clock.seconds())

    def _take_at(self, now: float) -> bool:
        tokens = self._tokens + (now - self._stamp) * self.rate
        self._stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


#: What L{MessageRateLimit.check} says of a frame: within the rate,
WITHIN = 0
#: over it,
OVER = 1
#: over it, and the streak reached its limit: the charger is to be closed.
TOO_MANY = 2

#: A second without a frame over the rate ends a streak.
STREAK_GAP = 1.0


class MessageRateLimit(TokenBucket):
    """
    One charger's message rate: C{rate} frames per second, C{burst} at
    once, and the streak of frames over it. A charger that keeps sending
    over the rate (C{max_violations} frames, no second apart) is closed;
    one that slows down starts afresh.

    A bucket with the streak in the same object: one object per charger,
    and one clock read per frame.

    @ivar violations: frames over the rate in the current streak.
    @ivar last_violation: when the last one came.
    """

    __slots__ = ("max_violations", "violations", "last_violation")

    def __init__(self, clock, rate: float, burst: int, max_violations: int) -> None:
        super().__init__(clock, rate, burst)
        self.max_violations = max_violations
        self.violations = 0
        self.last_violation = 0.0

    def check(self) -> int:
        """
        Count one frame.

        @return: L{WITHIN} (0, so the common case tests false), L{OVER}
            or L{TOO_MANY}.
        """
        now = self._clock.seconds()
        if not self.rate or self._take_at(now):
            if self.violations and now - self.last_violation > STREAK_GAP:
                self.violations = 0
            return WITHIN
        self.violations += 1
        self.last_violation = now
        return TOO_MANY if self.violations >= self.max_violations else OVER


class Admission:
    """
    Which new handshakes may be prepared now.

    @ivar in_progress: handshakes admitted and not yet finished.
    @ivar refused: how many were refused so far (for logs and tests).
    """

    def __init__(
        self,
        clock,
        *,
        rate: float = 0.0,
        burst: int = 100,
        max_concurrent: int = 0,
        retry_after_max: int = 10,
        random_int: Callable[[int, int], int] = random.randint,
    ) -> None:
        """
        @param rate: handshakes per second (0 = no limit).
        @param burst: handshakes admitted at once before the rate applies.
        @param max_concurrent: handshakes prepared at the same time
            (0 = no limit).
        @param retry_after_max: the C{Retry-After} of a refusal is drawn
            from 1 to this many seconds.
        """
        self._bucket = TokenBucket(clock, rate, burst)
        self._max_concurrent = max_concurrent
        self._retry_after_max = max(1, retry_after_max)
        self._random_int = random_int
        self.in_progress = 0
        self.refused = 0

    def admit(self) -> Optional[int]:
        """
        Admit one handshake, or refuse it.

        @return: C{None} when admitted (call L{done} when it is finished,
            however it ends), or the seconds the charger should wait
            before retrying.
        """
        if self._max_concurrent and self.in_progress >= self._max_concurrent:
            return self._refuse()
        if not self._bucket.take():
            return self._refuse()
        self.in_progress += 1
        return None

    def done(self) -> None:
        """
        An admitted handshake has finished (accepted or refused).
        """
        self.in_progress -= 1

    def _refuse(self) -> int:
        self.refused += 1
        return self._random_int(1, self._retry_after_max)
