"""
Log lines that an outsider can cause, bounded.

A connection without its PROXY header, a refused TLS handshake, a client
that never finishes its request: each deserves a log line, but whoever
opens connections decides how many of them there are. Logged one by one,
a scanner or a misconfigured balancer decides how much of the operator's
log (and disk, and log pipeline) they fill, and buries everything else.

L{RateLimitedLog} logs the first C{burst} events of each I{key} in a
window of C{interval} seconds. Later events of that key in the same window
are only counted; when the window ends, one summary line says how many
were left out and repeats the last of them, so the operator still learns
that it goes on, from where, and how much. The next event of the key
after that starts a new window.

Keys must come from a small fixed set (a reason, a listener name), never
from what a client sends: the limiter keeps one entry per key.

Time comes from an injected reactor (C{seconds()} and C{callLater()}).
"""

from __future__ import annotations

from typing import Hashable

from twisted.logger import Logger, LogLevel, formatEvent

#: Lines logged per key and window before the rest are only counted.
BURST = 10
#: Seconds per window: a steady stream of refusals costs at most BURST + 1
#: lines a minute per key.
INTERVAL = 60.0


class _Window:
    __slots__ = ("start", "logged", "suppressed", "level", "fields", "timer")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0
        self.level = LogLevel.info
        self.fields: dict = {}
        self.timer = None


class RateLimitedLog:
    """
    At most C{burst} lines per key every C{interval} seconds through
    C{log}, then one summary line for the rest.
    """

    def __init__(self, log: Logger, reactor, *, burst: int = BURST,
                 interval: float = INTERVAL) -> None:
        self._log = log
        self._reactor = reactor
        self.burst = burst
        self.interval = interval
        self._windows: dict[Hashable, _Window] = {}

    def emit(self, key: Hashable, level: LogLevel, format: str, **fields) -> bool:
        """
        Log C{format} with C{fields} at C{level}, unless C{key} has had
        its C{burst} lines in the current window.

        @return: whether the line was logged now.
        """
        now = self._reactor.seconds()
        window = self._windows.get(key)
        if window is not None and window.timer is None and now >= window.start + self.interval:
            window = None
        if window is None:
            window = self._windows[key] = _Window(now)
        if window.logged < self.burst:
            window.logged += 1
            self._log.emit(level, format, **fields)
            return True
        window.suppressed += 1
        window.level = level
        window.fields = dict(fields, log_format=format)
        if window.timer is None:
            window.timer = self._reactor.callLater(
                max(0.0, window.start + self.interval - now), self._summarise, key
            )
        return False

    def _summarise(self, key: Hashable) -> None:
        window = self._windows.pop(key)
        window.timer = None
        self._summary(window)

    def _summary(self, window: _Window) -> None:
        fields = dict(window.fields)
        last = formatEvent(fields)
        del fields["log_format"]
        seconds = round(min(self._reactor.seconds() - window.start, self.interval), 1)
        fields.update(suppressed=window.suppressed, seconds=seconds, last=last)
        self._log.emit(
            window.level,
            "{suppressed} more like this in {seconds:g} s were not logged one by one; "
            "the last: {last}",
            **fields,
        )

    def flush(self) -> None:
        """
        Log the summaries of every window with lines left out, now (when
        the service stops), and forget all windows.
        """
        windows, self._windows = self._windows, {}
        for window in windows.values():
            if window.timer is not None:
                window.timer.cancel()
                window.timer = None
                self._summary(window)
