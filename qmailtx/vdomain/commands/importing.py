"""``qmailctl import-vpopmail DIR``: hands over to ``qmailtx.vdomain.vpopmail``.

That module is imported only when the command runs, and an installation
without it refuses the command rather than failing to start.
"""

from __future__ import annotations

import argparse
import importlib

from qmailtx.vdomain.commands.context import (
    EXIT_OK,
    EXIT_REFUSED,
    CommandError,
    Context,
    Result,
)


def importVpopmail(ctx: Context, args: argparse.Namespace) -> Result:
    try:
        vpopmail = importlib.import_module("qmailtx.vdomain.vpopmail")
    except ModuleNotFoundError as e:
        if e.name != "qmailtx.vdomain.vpopmail":
            raise
        raise CommandError("import-vpopmail is not available in this installation") from None
    report = vpopmail.runImport(
        ctx.store, ctx.data, args.directory, dryRun=args.dry_run, copyMail=not args.no_mail
    )
    return Result(list(report.lines()), report.asDict(), EXIT_OK if report.ok else EXIT_REFUSED)
