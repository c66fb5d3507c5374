"""
ocppgw's log output: human-readable text or JSON lines, a level filter, and
pika's standard-library logging forwarded into C{twisted.logger}.

ocppgw logs with C{twisted.logger} and structured fields: C{identity},
C{peer}, C{version}, C{listener} and C{event} (C{connected},
C{disconnected}, C{refused}, ...) where they apply, plus what each event
has to say (C{code}, C{reason}, C{duration}, ...). Untrusted text (frames,
close reasons) is logged only through L{ocppgw.framing.truncate_for_log}.

In JSON mode (C{[log] format = json}) each event is one line::

    {"time": "2026-11-24T07:00:00.123Z", "level": "info", "namespace":
     "ocppgw.gateway", "message": "CP1 connected from tcp4:10.0.0.5:50122
     speaking ocpp1.6", "identity": "CP1", "peer": "tcp4:10.0.0.5:50122",
     "version": "ocpp1.6", "listener": "ws", "event": "connected"}

Every field of the event whose value is a string, number, boolean or null
is copied; Twisted's own C{log_*} bookkeeping is not. A logged failure
adds C{error} and C{traceback}.

Under C{twistd}, L{install_for_twistd} hands twistd an observer factory
(twistd's C{--logger} option, unless the operator gave one) so that the
configuration file decides: JSON or text, and the level, written where
twistd would write (stdout with C{-n}, else C{--logfile}, default
C{twistd.log}). With C{--syslog} twistd's own observer is left alone.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import IO, Iterable

import orjson
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

#: [log] level -> twisted.logger level.
LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

#: Longest string field written as is; longer ones are cut (a field is
#: never meant to carry a frame, this is a last guard for the log's size).
MAX_FIELD = 1000


def utc_iso(seconds: float) -> str:
    """
    C{seconds} since the epoch as the gateway writes times everywhere (log,
    admin API, status page): UTC, milliseconds, a Z.
    """
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@implementer(ILogObserver)
def mask_url(url: str) -> str:
    """
    Return *url* with its password replaced by ``****``, for logs and errors.

    The user information is taken to end at the *last* ``@``, so a password
    containing an unencoded ``@`` or ``/`` is masked too, and when the URL
    is too mangled to tell the user from the password both are masked: more
    is hidden than needed rather than less.
    """
    head, at, host = url.rpartition("@")
    if not at:
        return url
    scheme, separator, userinfo = head.partition("://")
    if not separator:
        return f"****@{host}"
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}:****@{host}" if colon else url


class JsonLinesObserver:
    """
    Writes each log event as one JSON object on one line.

    Twisted's C{jsonFileLogObserver} writes record-separated JSON of the
    whole event (including Twisted's internals, and objects it cannot
    serialise as C{"unpersistable"}); log collectors want one flat object
    per line with the fields that matter.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        record = {
            "time": utc_iso(event.get("log_time") or 0.0),
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in record:
                continue
            if isinstance(value, str):
                record[key] = value if len(value) <= MAX_FIELD else value[:MAX_FIELD] + "..."
            elif value is None or isinstance(value, (bool, int, float)):
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        try:
            line = orjson.dumps(record).decode("utf-8")
        except TypeError:
            # e.g. a lone surrogate from a decoded byte string
            line = json.dumps(record, ensure_ascii=True, default=str)
        self._stream.write(line + "\n")
        self._stream.flush()


def observer(settings, stream: IO[str] | None = None) -> ILogObserver:
    """
    The observer for C{[log]} C{settings} (a L{ocppgw.config.LogSettings}),
    writing to C{stream} (default: standard output).
    """
    stream = sys.stdout if stream is None else stream
    inner = JsonLinesObserver(stream) if settings.format == "json" else textFileLogObserver(stream)
    return FilteringLogObserver(
        inner, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[settings.level])]
    )


def _twistd_stream(options) -> IO[str]:
    """
    Where twistd would write its log (see C{UnixAppLogger._getLogObserver}):
    stdout in the foreground unless a log file is named, else the file.
    """
    name = options.get("logfile") or ""
    if name == "-" or (options.get("nodaemon") and not name):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(name or "twistd.log")


# What install_for_twistd chose, for twistd_observer: twistd takes its
# --logger as a dotted name and calls it without arguments.
_twistd_choice: dict = {}


def install_for_twistd(settings, twistd_options) -> None:
    """
    Make twistd log as the configuration says (see the module docstring).

    @param twistd_options: twistd's C{ServerOptions} (the C{parent} of
        the plugin's options): it resolves C{"logger"} once the plugin's
        options are parsed, and calls it before logging starts.
    """
    if twistd_options is None or twistd_options.get("logger") or twistd_options.get("syslog"):
        return
    _twistd_choice["settings"] = settings
    _twistd_choice["options"] = twistd_options
    twistd_options["logger"] = f"{__name__}.twistd_observer"


def twistd_observer() -> ILogObserver:
    """The observer factory L{install_for_twistd} names to twistd."""
    return observer(_twistd_choice["settings"], _twistd_stream(_twistd_choice["options"]))


class TwistedLogHandler(logging.Handler):
    """
    Forwards standard-library log records (pika's) to C{twisted.logger}.

    Twisted's C{STDLibLogObserver} goes the other way; this handler makes
    pika's records ordinary ocppgw log events, under the logger's name as
    namespace, so they get the same format and level filter.
    """

    _LEVELS = (
        (logging.CRITICAL, LogLevel.critical),
        (logging.ERROR, LogLevel.error),
        (logging.WARNING, LogLevel.warn),
        (logging.INFO, LogLevel.info),
    )

    def __init__(self) -> None:
        super().__init__()
        self._loggers: dict[str, Logger] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = self._loggers.get(record.name)
            if log is None:
                log = self._loggers[record.name] = Logger(namespace=record.name)
            level = next(
                (ours for number, ours in self._LEVELS if record.levelno >= number),
                LogLevel.debug,
            )
            log.emit(level, "{stdlib_message}", stdlib_message=record.getMessage())
        except Exception:
            self.handleError(record)


def bridge_stdlib(level: str, names: Iterable[str] = ("pika",)) -> None:
    """
    Send the standard-library loggers C{names} to C{twisted.logger}.

    pika logs every channel opened at INFO; below C{debug} only its
    warnings and errors are kept.
    """
    threshold = logging.DEBUG if level == "debug" else max(
        logging.WARNING, getattr(logging, level.upper().replace("WARN", "WARNING"), logging.WARNING)
    )
    for name in names:
        stdlib = logging.getLogger(name)
        for handler in list(stdlib.handlers):
            if isinstance(handler, TwistedLogHandler):
                stdlib.removeHandler(handler)
        stdlib.addHandler(TwistedLogHandler())
        stdlib.setLevel(threshold)
        # the root logger (if anyone configured it) must not print it twice
        stdlib.propagate = False
