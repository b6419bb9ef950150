"""qmailctl: vpopmail's vadddomain/vadduser/valias jobs over the user database.

``qmailctl [--config FILE] [--json] COMMAND ...``::

    domain add D [--clear-passwords]       domain del D [--keep-mail]
    domain list                            domain info D
    domain alias ALIAS D                   domain unalias ALIAS
    domain catchall D bounce-no-mailbox|delete|forward ADDRESS|mailbox USER
    domain clear-passwords D on|off
    user add U@D [--password-stdin] [--quota SIZE] [--name GECOS]
    user del U@D [--keep-mail]             user passwd U@D --password-stdin
    user quota U@D SIZE                    user info U@D
    user list D                            user flags U@D [--set F] [--clear F]
    user vacation U@D --subject S (--message-file F | --message-stdin) [--period DAYS]
    user vacation U@D --off
    alias add A@D TARGET...                alias del A@D [TARGET]
    alias list D
    import-vpopmail DIR [--dry-run] [--no-mail]
    policies                               (each listener's policies, stage by stage)

Without ``--config`` the built-in defaults apply (data in ``./var``). Every
change is written to the user database at once, in its own short
transaction; a running server sees it at its next lookup. A deleted
mailbox is moved out of the live tree with ``retireFolder`` (which waits
for deliveries in progress) into ``<data>/deleted/``, and removed unless
``--keep-mail``. Passwords are read from the first line of standard input
and never printed; neither are hashes. Run as root, qmailctl hands the
folders and database files it creates to the owner of the data folder (the
server's account), as vpopmail does for vpopmail:vchkpw.

With ``--json`` (before or after the command) stdout carries one JSON value:
an array for lists, an object for ``info``, ``{"ok": true, ...}`` for a
change, and ``{"error": "..."}`` for a failure. Notes for people (such as
"this account has no password") always go to stderr.

Exit codes:

- 0: done.
- 1: refused: bad input (address, domain name, quota), unknown domain, user
  or alias, an existing name, a configuration error, a file error.
- 2: usage error (unknown command, missing argument).
- 111: the user database is unavailable (temporary; try again).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from qmailtx.config import ConfigError, defaultConfig, loadConfig
from qmailtx.vdomain.commands.alias import aliasAdd, aliasDel, aliasList
from qmailtx.vdomain.commands.context import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TEMPORARY,
    EXIT_USAGE,
    PROG,
    CommandError,
    Context,
    Handler,
    Result,
)
from qmailtx.vdomain.commands.domain import (
    domainAdd,
    domainAlias,
    domainCatchAll,
    domainClearPasswords,
    domainDel,
    domainInfo,
    domainList,
    domainUnalias,
)
from qmailtx.vdomain.commands.importing import importVpopmail
from qmailtx.vdomain.commands.policies import listPolicies
from qmailtx.vdomain.commands.user import (
    userAdd,
    userDel,
    userFlags,
    userInfo,
    userList,
    userPasswd,
    userQuota,
    userVacation,
)
from qmailtx.vdomain.interfaces import DatabaseUnavailable, UserDatabaseError
from qmailtx.vdomain.layout import BadName
from qmailtx.vdomain.records import CatchAllAction


class _UsageError(Exception):
    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises on bad usage instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.format_usage(), f"{self.prog}: error: {message}")


# -- the parser ------------------------------------------------------------------


def _buildParser() -> _Parser:
    # Options also accepted after the command (not overriding the ones before it).
    common = _Parser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="answer in JSON"
    )
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="config file")

    parser = _Parser(
        prog=PROG,
        description="Manage hosted domains, users and aliases (vpopmail's jobs).",
        epilog="exit codes: 0 done, 1 refused, 2 usage error, 111 database unavailable",
    )
    parser.add_argument(
        "--config", metavar="FILE", default=None, help="config file (default: built-in, ./var)"
    )
    parser.add_argument("--json", action="store_true", default=False, help="answer in JSON")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def group(name: str, help: str) -> argparse._SubParsersAction[_Parser]:
        p = commands.add_parser(name, help=help, parents=[common])
        return p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def command(
        actions: argparse._SubParsersAction[_Parser], name: str, handler: Handler, help: str
    ) -> _Parser:
        p = actions.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(handler=handler)
        return p

    domain = group("domain", "hosted domains")
    p = command(domain, "add", domainAdd, "add a domain and its folder")
    p.add_argument("domain")
    p.add_argument(
        "--clear-passwords", action="store_true", help="keep passwords in clear (CRAM-MD5, APOP)"
    )
    p = command(domain, "del", domainDel, "delete a domain with its users, aliases and mail")
    p.add_argument("domain")
    p.add_argument("--keep-mail", action="store_true", help="keep the folder in <data>/deleted/")
    command(domain, "list", domainList, "list the domains")
    p = command(domain, "info", domainInfo, "show a domain")
    p.add_argument("domain")
    p = command(domain, "alias", domainAlias, "make ALIAS another name of DOMAIN")
    p.add_argument("alias")
    p.add_argument("domain")
    p = command(domain, "unalias", domainUnalias, "delete an alias domain")
    p.add_argument("alias")
    p = command(domain, "catchall", domainCatchAll, "what mail for unknown users becomes")
    p.add_argument("domain")
    p.add_argument("mode", choices=[a.value for a in CatchAllAction])
    p.add_argument("target", nargs="?", help="forward: an ADDRESS; mailbox: a USER of the domain")
    p = command(domain, "clear-passwords", domainClearPasswords, "keep new passwords in clear")
    p.add_argument("domain")
    p.add_argument("setting", choices=["on", "off"])

    user = group("user", "mailbox users")
    p = command(user, "add", userAdd, "add a user and its Maildir")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    p.add_argument("--quota", metavar="SIZE", help="100MB, 104857600, 104857600S,1000C, NOQUOTA")
    p.add_argument("--name", metavar="GECOS", default="", help="the user's full name")
    p = command(user, "del", userDel, "delete a user and its mail")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument("--keep-mail", action="store_true", help="keep the folder in <data>/deleted/")
    p = command(user, "passwd", userPasswd, "set a user's password")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        required=True,
        help="read the password from standard input",
    )
    p = command(user, "quota", userQuota, "set a user's quota")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument("size", metavar="SIZE")
    p = command(user, "info", userInfo, "show a user")
    p.add_argument("address", metavar="USER@DOMAIN")
    p = command(user, "list", userList, "list the users of a domain")
    p.add_argument("domain")
    p = command(user, "flags", userFlags, "show or change a user's flags")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument("--set", action="append", default=[], metavar="FLAG", help="e.g. no_pop")
    p.add_argument("--clear", action="append", default=[], metavar="FLAG")
    p = command(user, "vacation", userVacation, "switch the auto-responder on or off")
    p.add_argument("address", metavar="USER@DOMAIN")
    p.add_argument("--subject", metavar="S")
    p.add_argument("--period", metavar="DAYS", type=int, help="answer a sender once per DAYS (7)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--message-file", metavar="F")
    how.add_argument("--message-stdin", action="store_true")
    how.add_argument("--off", action="store_true")

    alias = group("alias", "valiases: addresses forwarded elsewhere")
    p = command(alias, "add", aliasAdd, "add targets to an alias")
    p.add_argument("address", metavar="ALIAS@DOMAIN")
    p.add_argument(
        "targets", nargs="+", metavar="TARGET", help="an address, /path/Maildir/, |program"
    )
    p = command(alias, "del", aliasDel, "delete an alias, or one target of it")
    p.add_argument("address", metavar="ALIAS@DOMAIN")
    p.add_argument("target", nargs="?", metavar="TARGET")
    p = command(alias, "list", aliasList, "list the aliases of a domain")
    p.add_argument("domain")

    p = commands.add_parser(
        "policies", help="list each listener's policies per SMTP stage", parents=[common]
    )
    p.set_defaults(handler=listPolicies)

    p = commands.add_parser("import-vpopmail", help="import a vpopmail tree", parents=[common])
    p.set_defaults(handler=importVpopmail)
    p.add_argument("directory", metavar="DIR", help="the vpopmail home (holding domains/)")
    p.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    p.add_argument("--no-mail", action="store_true", help="import accounts, not the mail")
    return parser


# -- main ----------------------------------------------------------------------------


def _emitJson(stdout: TextIO, value: Any) -> None:
    stdout.write(json.dumps(value, indent=None, sort_keys=False) + "\n")


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one qmailctl command; returns the exit code (see the module docstring)."""
    args_ = list(sys.argv[1:] if argv is None else argv)
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    wantJson = "--json" in args_

    def fail(message: str, code: int) -> int:
        if wantJson:
            _emitJson(stdout, {"error": message})
        else:
            stderr.write(f"{PROG}: {message}\n")
        return code

    parser = _buildParser()
    try:
        args = parser.parse_args(args_)
    except _UsageError as e:
        if wantJson:
            _emitJson(stdout, {"error": str(e)})
        stderr.write(e.usage + str(e) + "\n")
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    wantJson = args.json

    try:
        config = defaultConfig() if args.config is None else loadConfig(args.config)
    except ConfigError as e:
        return fail(str(e), EXIT_REFUSED)

    ctx = Context(config, stdin, stderr)
    try:
        result: Result = args.handler(ctx, args)
    except CommandError as e:
        return fail(str(e), e.code)
    except DatabaseUnavailable as e:
        return fail(f"temporary failure: {e}", EXIT_TEMPORARY)
    except (UserDatabaseError, BadName) as e:
        return fail(str(e), EXIT_REFUSED)
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        return fail(f"file error{where}: {e.strerror or e}", EXIT_REFUSED)
    finally:
        ctx.close()

    if wantJson:
        data = result.data
        if ctx.warnings and isinstance(data, dict):
            data = {**data, "warnings": ctx.warnings}
        _emitJson(stdout, data)
    else:
        for line in result.lines:
            stdout.write(line + "\n")
    stdout.flush()
    return result.code


if __name__ == "__main__":
    sys.exit(main())
