"""
The C{ocppgw} command line: operators' tools around a running gateway.

::

    ocppgw call IDENTITY ACTION [PAYLOAD] [--timeout 35]
    ocppgw check-config FILE
    ocppgw chargers [IDENTITY] [--json] [--disconnect]

Each subcommand is one function, registered with L{subcommand} under its
name together with a function that adds its arguments; L{main} builds the
parser from the registry. A new subcommand is one more registered pair.

Exit statuses, shared by all subcommands:

- 0: done (C{call}: the charger answered with a CALLRESULT);
- 1: C{call}: the charger answered with a CALLERROR (or the gateway's
  timeout error); C{check-config}: the file has problems; C{chargers}: the
  admin API refused or failed;
- 2: bad command line (argparse);
- 3: C{call}: no answer within C{--timeout};
- 4: no such charger (C{call}: it has no queue, so it never connected or its
  queue expired; C{chargers IDENTITY}: not connected);
- 5: the broker or the admin listener could not be reached.

Where a broker or an admin listener is needed, C{--config} reads them from
the gateway's own INI file (C{[amqp] url}, C{[amqp] exchange},
C{[admin]}); options on the command line win.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Sequence
from urllib.parse import quote

from ocppgw import config as _config

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_NO_CHARGER = 4
EXIT_UNREACHABLE = 5

#: Seconds C{call} waits: the gateway's default call timeout (30 s) plus a
#: margin, so that a charger that never answers gives the gateway's own
#: timeout CALLERROR rather than ours.
DEFAULT_CALL_TIMEOUT = 35.0

#: Environment variable with the admin API's password (never on the
#: command line, where other users can see it in the process list).
PASSWORD_ENV = "OCPPGW_ADMIN_PASSWORD"


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: name -> L{Subcommand}, in the order they were registered.
SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated C{run(options) -> exit status} as C{name}."""

    def register(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)
        return run

    return register


def _settings(options: argparse.Namespace) -> _config.Settings:
    path = getattr(options, "config", None)
    return _config.load(path) if path else _config.defaults()


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", metavar="FILE",
        help="the gateway's INI file, for the defaults of the options below",
    )


def _fail(message: str, status: int) -> int:
    print(f"ocppgw: {message}", file=sys.stderr)
    return status


def _run_reactor(main) -> int:
    """
    Run C{main(reactor)} (a Deferred of an exit status) on the global
    reactor and return its status. Only the command line does this.
    """
    from twisted.internet import defer, reactor

    outcome: dict[str, int] = {}

    def start():
        d = defer.maybeDeferred(main, reactor)

        def failed(failure):
            outcome["status"] = _fail(failure.getErrorMessage(), EXIT_UNREACHABLE)

        d.addCallbacks(lambda status: outcome.setdefault("status", status), failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return outcome.get("status", EXIT_UNREACHABLE)


# -- call ---------------------------------------------------------------------


def _call_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("identity", help="the charger's identity (as in its URL, not encoded)")
    parser.add_argument("action", help="the OCPP action, e.g. Reset, GetConfiguration")
    parser.add_argument(
        "payload", nargs="?", default="{}",
        help="the payload as a JSON object (default {})",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_CALL_TIMEOUT,
        help=f"seconds to wait for the answer (default {DEFAULT_CALL_TIMEOUT:g})",
    )
    parser.add_argument("--url", help="AMQP URL of the broker (default: [amqp] url)")
    parser.add_argument("--exchange", help="the OCPP exchange (default: [amqp] exchange)")
    _add_config(parser)


@subcommand(
    "call",
    "send a CSMS CALL to a charger through RabbitMQ and print its answer",
    _call_arguments,
)
def call(options: argparse.Namespace) -> int:
    """
    Send one CALL with RabbitMQ's direct reply-to and print the answer frame.
    """
    try:
        payload = json.loads(options.payload)
    except ValueError as error:
        return _fail(f"the payload is not JSON: {error}", EXIT_USAGE)
    if not isinstance(payload, dict):
        return _fail("the payload must be a JSON object", EXIT_USAGE)
    if options.timeout <= 0:
        return _fail("--timeout must be > 0", EXIT_USAGE)
    try:
        settings = _settings(options)
    except _config.ConfigError as error:
        return _fail(str(error), EXIT_USAGE)
    url = options.url or settings.amqp.url
    exchange = options.exchange or settings.amqp.exchange
    frame = [2, str(uuid.uuid4()), options.action, payload]
    return _run_reactor(
        lambda reactor: _call(reactor, url, exchange, options.identity, frame, options.timeout)
    )


def _call(reactor, url: str, exchange: str, identity: str, frame: list, timeout: float):
    from twisted.internet import defer

    from ocppgw import topology
    from ocppgw.amqp import BackEndClient

    @defer.inlineCallbacks
    def run():
        try:
            client = yield BackEndClient.connect(reactor, url, exchange)
        except Exception as error:
            return _fail(
                f"cannot reach the broker at {_config.mask_url(url)}: {error}", EXIT_UNREACHABLE
            )
        try:
            exists = yield client.queue_exists(topology.charger_queue(identity))
            if not exists:
                return _fail(
                    f"no queue for charger {identity!r}: it never connected, or its queue expired",
                    EXIT_NO_CHARGER,
                )
            try:
                answer = yield client.call(
                    identity, json.dumps(frame).encode("utf-8"), timeout=timeout
                )
            except defer.TimeoutError:
                return _fail(f"no answer from {identity!r} within {timeout:g} s", EXIT_TIMEOUT)
            text = answer.body.decode("utf-8", "replace")
            print(text)
            sys.stdout.flush()
            try:
                kind = json.loads(text)[0]
            except (ValueError, IndexError, KeyError, TypeError):
                return EXIT_ERROR
            if answer.headers.get(topology.HEADER_TIMEOUT):
                print("ocppgw: the charger did not answer in time (gateway timeout)",
                      file=sys.stderr)
            return EXIT_OK if kind == 3 else EXIT_ERROR
        finally:
            yield client.close()

    return run()


# -- check-config ---------------------------------------------------------------


def _check_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the INI file to check, e.g. etc/ocppgw.ini")


@subcommand(
    "check-config",
    "validate a configuration file without starting anything",
    _check_config_arguments,
)
def check_config(options: argparse.Namespace) -> int:
    try:
        _config.load(options.file)
    except _config.ConfigError as error:
        print(error, file=sys.stderr)
        return EXIT_ERROR
    print(f"{options.file}: ok")
    return EXIT_OK


# -- chargers ----------------------------------------------------------------------


def _chargers_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("identity", nargs="?", help="show (or disconnect) only this charger")
    parser.add_argument(
        "--admin", metavar="URL",
        help="the admin listener (default: http://<[admin] tcp.ip>:<[admin] tcp.port>)",
    )
    parser.add_argument(
        "--user", help=f"Basic auth user (default: [admin] username); password in ${PASSWORD_ENV}"
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    parser.add_argument(
        "--disconnect", action="store_true",
        help="close IDENTITY's connection (1000); it may reconnect at once",
    )
    _add_config(parser)


def _admin_request(url: str, method: str, user: str, password: str):
    request = urllib.request.Request(url, method=method)
    if user:
        token = base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _table(chargers: list) -> str:
    columns = ("identity", "version", "listener", "remote", "connected_since",
               "frames_in", "frames_out", "outstanding")
    rows = [[c.upper() for c in columns]]
    for entry in chargers:
        outstanding = entry.get("outstanding_call")
        rows.append([
            entry["identity"], entry["version"], entry["listener"], entry["remote"],
            entry["connected_since"], str(entry["frames_in"]), str(entry["frames_out"]),
            f"{outstanding['action']} ({outstanding['message_id']})" if outstanding else "-",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


@subcommand(
    "chargers",
    "list connected chargers from the admin API (or show, or disconnect, one)",
    _chargers_arguments,
)
def chargers(options: argparse.Namespace) -> int:
    try:
        settings = _settings(options)
    except _config.ConfigError as error:
        return _fail(str(error), EXIT_USAGE)
    admin = settings.admin
    host = f"[{admin.tcp_ip}]" if ":" in admin.tcp_ip else admin.tcp_ip
    base = (options.admin or f"http://{host}:{admin.tcp_port}").rstrip("/")
    user = options.user if options.user is not None else admin.username
    password = os.environ.get(PASSWORD_ENV, admin.password if user == admin.username else "")
    if options.disconnect and not options.identity:
        return _fail("--disconnect needs an IDENTITY", EXIT_USAGE)
    url = f"{base}/chargers"
    if options.identity:
        url += "/" + quote(options.identity, safe="")
    try:
        result = _admin_request(url, "DELETE" if options.disconnect else "GET", user, password)
    except urllib.error.HTTPError as error:
        if error.code == 404 and options.identity:
            return _fail(f"charger {options.identity!r} is not connected", EXIT_NO_CHARGER)
        return _fail(f"{url}: HTTP {error.code} {error.reason}", EXIT_ERROR)
    except (urllib.error.URLError, OSError) as error:
        return _fail(f"cannot reach the admin listener at {base}: {error}", EXIT_UNREACHABLE)
    if options.json or options.disconnect:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result if isinstance(result, list) else [result]))
    return EXIT_OK


# -- entry point -----------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The argument parser, one sub-parser per registered subcommand."""
    top = argparse.ArgumentParser(
        prog="ocppgw",
        description="Operate an ocppgw OCPP-J gateway (the gateway itself runs "
        "as `twistd ocppgw`).",
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in SUBCOMMANDS.values():
        sub = commands.add_parser(entry.name, help=entry.help, description=entry.help)
        entry.add_arguments(sub)
        sub.set_defaults(run=entry.run)
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    """C{ocppgw} (console script): run one subcommand, return its status."""
    options = parser().parse_args(argv)
    return options.run(options)


if __name__ == "__main__":
    sys.exit(main())
