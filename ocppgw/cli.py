"""
The C{ocppgw} command: one subcommand per task.

Each subcommand is a function C{add_<name>(subparsers)} that declares its
arguments and sets C{run} to the function doing the work; L{main} only
dispatches. Adding a subcommand is one such function and one line in
L{SUBCOMMANDS}.

- C{ocppgw run [--config FILE]}: run the gateway in the foreground, the
  same service with the same options and signals as C{twistd -n ocppgw}
  (see L{ocppgw.tap.run_foreground}), in every install mode.
- C{ocppgw passwd FILE IDENTITY}: add or change a charger's password in a
  password file (C{[auth] password_file}); C{--delete} removes it. The
  running gateway picks the change up by itself.
- C{ocppgw call IDENTITY ACTION [PAYLOAD]}: send a CSMS CALL to a charger
  through RabbitMQ (direct reply-to) and print its answer.
- C{ocppgw check-config FILE}: validate a configuration file.
- C{ocppgw chargers [IDENTITY] [--json] [--disconnect]}: the connected
  chargers, from the admin API.

Exit statuses of call, check-config and chargers:

- 0: done (C{call}: the charger answered with a CALLRESULT);
- 1: C{call}: the charger answered with a CALLERROR (or the gateway's
  timeout error); C{check-config}: the file has problems; C{chargers}: the
  admin API refused or failed;
- 2: bad command line;
- 3: C{call}: no answer within C{--timeout};
- 4: no such charger (C{call}: it has no queue, so it never connected or its
  queue expired, or its queue is not bound to the exchange, so the broker
  returned the command unroutable; C{chargers IDENTITY}: not connected);
- 5: the broker or the admin listener could not be reached.

Where a broker or an admin listener is needed, C{--config} reads them from
the gateway's own INI file (C{[amqp] url}, C{[amqp] exchange},
C{[admin]}); options on the command line win.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from typing import Callable, Optional, Sequence

from ocppgw.auth import (
    PasswordFileError,
    hash_password,
    parse_password_file,
    render_password_file,
)
from urllib.parse import quote

from ocppgw import config as _config
from ocppgw.identity import BadIdentity, identity_from_path
from ocppgw.logs import mask_url


def _read_password(options) -> bytes:
    if options.stdin:
        line = sys.stdin.buffer.readline().rstrip(b"\r\n")
    else:
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise SystemExit("ocppgw passwd: the passwords differ")
        line = first.encode("utf-8")
    if options.hex:
        try:
            password = binascii.unhexlify(line.strip())
        except (binascii.Error, ValueError):
            raise SystemExit("ocppgw passwd: --hex needs an even number of hex digits") from None
    else:
        password = line
    if not password:
        raise SystemExit("ocppgw passwd: empty password")
    return password


def _write_atomically(path: str, text: str) -> None:
    """
    Write C{text} to C{path} through a temporary file and a rename, so the
    gateway never reads a half-written file; the file is private (0600).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".ocppgw-passwd-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def run_passwd(options) -> int:
    try:
        # the same rules as an identity in a charger's URL
        identity_from_path("/ocpp/" + quote(options.identity, safe=""), "/ocpp", None, 255)
    except BadIdentity as error:
        print(f"ocppgw passwd: {error}", file=sys.stderr)
        return 2
    try:
        with open(options.file, encoding="utf-8") as file:
            entries = parse_password_file(file.read(), options.file)
    except FileNotFoundError:
        entries = {}
    except (OSError, UnicodeDecodeError, PasswordFileError) as error:
        print(f"ocppgw passwd: {error}", file=sys.stderr)
        return 1
    if options.delete:
        if entries.pop(options.identity, None) is None:
            print(f"ocppgw passwd: {options.identity} is not in {options.file}", file=sys.stderr)
            return 1
        verb = "removed"
    else:
        verb = "changed" if options.identity in entries else "added"
        entries[options.identity] = hash_password(_read_password(options))
    _write_atomically(options.file, render_password_file(entries))
    print(f"{options.identity} {verb}")
    return 0


def add_passwd(subparsers) -> None:
    parser = subparsers.add_parser(
        "passwd",
        help="add, change or remove a charger in a password file",
        description="Add, change (default) or remove a charger's Basic auth password in "
        "the password file of [auth] password_file. The file is created if needed.",
    )
    parser.add_argument("file", help="the password file")
    parser.add_argument("identity", help="the charger identity (the Basic username)")
    parser.add_argument("--delete", action="store_true", help="remove the charger")
    parser.add_argument("--stdin", action="store_true",
                        help="read the password from the first line of standard input")
    parser.add_argument("--hex", action="store_true",
                        help="the password is hex (an OCPP 1.6 AuthorizationKey: the charger "
                        "sends these bytes)")
    parser.set_defaults(run=run_passwd)


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


# -- run ----------------------------------------------------------------------


def run_run(options: argparse.Namespace) -> int:
    from ocppgw.tap import run_foreground

    return run_foreground(options.config, options.worker)


def add_run(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the gateway in the foreground (as `twistd -n ocppgw`)",
        description="Run the gateway in the foreground: the service `twistd --nodaemon "
        "--pidfile= ocppgw` runs, with the same options, logging and signals (SIGTERM "
        "or Ctrl-C: drain and stop, then exit 0; SIGHUP: reload certificates and "
        "credentials). It needs no Twisted plugin discovery, so it works in every "
        "install mode.",
    )
    parser.add_argument(
        "--config", "-c", metavar="FILE",
        help="the INI configuration file (defaults apply without one)",
    )
    # a [listener] workers supervisor starts its workers with this
    parser.add_argument("--worker", metavar="N", help=argparse.SUPPRESS)
    parser.set_defaults(run=run_run)


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


def run_call(options: argparse.Namespace) -> int:
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
    import pika.exceptions
    from twisted.internet import defer

    from ocppgw import topology
    from ocppgw.amqp import BackEndClient

    @defer.inlineCallbacks
    def run():
        try:
            client = yield BackEndClient.connect(reactor, url, exchange)
        except Exception as error:
            return _fail(
                f"cannot reach the broker at {mask_url(url)}: {error}", EXIT_UNREACHABLE
            )
        try:
            exists = yield client.queue_exists(topology.charger_queue(identity))
            if not exists:
                return _fail(
                    f"no queue for charger {identity!r}: it never connected, or its queue expired",
                    EXIT_NO_CHARGER,
                )
            try:
                # mandatory, with the channel's publisher confirms: a queue
                # that exists but is not bound to the exchange (a wrong
                # exchange, a binding removed by hand) gets the command
                # returned at once instead of dropped, which would leave us
                # waiting for the timeout
                answer = yield client.call(
                    identity, json.dumps(frame).encode("utf-8"), timeout=timeout,
                    mandatory=True,
                )
            except pika.exceptions.UnroutableError:
                return _fail(
                    f"the broker returned the command unroutable: queue "
                    f"{topology.charger_queue(identity)!r} exists but is not bound to exchange "
                    f"{exchange!r} with key {identity!r} (another exchange? [amqp] exchange "
                    f"or --exchange)",
                    EXIT_NO_CHARGER,
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


def add_call(subparsers) -> None:
    parser = subparsers.add_parser("call", help="send a CSMS CALL to a charger through RabbitMQ and print its answer", description="Send a CSMS CALL to a charger through RabbitMQ and print its answer.")
    _call_arguments(parser)
    parser.set_defaults(run=run_call)


# -- check-config ---------------------------------------------------------------


def _check_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the INI file to check, e.g. etc/ocppgw.ini")


def run_check_config(options: argparse.Namespace) -> int:
    """
    The one configuration check: what C{twistd ocppgw} and C{ocppgw run}
    would refuse at start, each problem as C{FILE: section.key: reason}.
    """
    from ocppgw.tap import read_settings

    try:
        read_settings(options.file)
    except _config.ConfigError as error:
        print(error.located(options.file), file=sys.stderr)
        return EXIT_ERROR
    print(f"{options.file}: ok")
    return EXIT_OK


def add_check_config(subparsers) -> None:
    parser = subparsers.add_parser("check-config", help="validate a configuration file without starting anything", description="Validate a configuration file without starting anything.")
    _check_config_arguments(parser)
    parser.set_defaults(run=run_check_config)


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


def run_chargers(options: argparse.Namespace) -> int:
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


def add_chargers(subparsers) -> None:
    parser = subparsers.add_parser("chargers", help="list connected chargers from the admin API (or show, or disconnect, one)", description="List connected chargers from the admin API (or show, or disconnect, one).")
    _chargers_arguments(parser)
    parser.set_defaults(run=run_chargers)


#: Every subcommand, in the order `ocppgw --help` lists them.
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_run,
    add_passwd,
    add_call,
    add_check_config,
    add_chargers,
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ocppgw",
        description="ocppgw: run the gateway (`ocppgw run`, or `twistd ocppgw`) and the "
        "operator's tools.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    options = parser.parse_args(argv)
    return options.run(options)


if __name__ == "__main__":
    sys.exit(main())
