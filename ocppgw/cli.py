"""
The C{ocppgw} command: one subcommand per task.

Each subcommand is a function C{add_<name>(subparsers)} that declares its
arguments and sets C{run} to the function doing the work; L{main} only
dispatches. Adding a subcommand is one such function and one line in
L{SUBCOMMANDS}.

- C{ocppgw passwd FILE IDENTITY}: add or change a charger's password in a
  password file (C{[auth] password_file}); C{--delete} removes it. The
  running gateway picks the change up by itself.
"""

from __future__ import annotations

import argparse
import binascii
import getpass
import os
import sys
import tempfile
from typing import Callable, Optional, Sequence

from ocppgw.auth import (
    PasswordFileError,
    hash_password,
    parse_password_file,
    render_password_file,
)
from urllib.parse import quote

from ocppgw.identity import BadIdentity, identity_from_path


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


#: Every subcommand, in the order `ocppgw --help` lists them.
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_passwd,)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ocppgw", description="ocppgw tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    options = parser.parse_args(argv)
    return options.run(options)


if __name__ == "__main__":
    sys.exit(main())
