"""Import a vpopmail tree: vpasswd users, ``.qmail-*`` aliases, catch-alls, Maildirs.

``qmailctl import-vpopmail DIR [--dry-run] [--no-mail]`` calls ``runImport``.
Three layers, each in its module of this package:

1. ``parse``, pure parsing: ``parseVpasswdLine``, ``parseVdelivermailInstruction``,
   ``aliasNameOf``, ``parseAliasLines``, ``rewriteTarget``.
2. ``scan``: ``scanTree(root, data)`` reads the tree (writes nothing) and
   returns an ``ImportPlan`` (``plan``): domains with their catch-all, users,
   aliases, alias domains, Maildirs to copy, path rewrites, warnings and errors.
3. ``apply``: ``applyPlan(store, plan, dryRun, copyMail)`` carries it out (or,
   dry, only says what it would do) and returns an ``ImportReport`` (``report``).

``rewrite`` holds the scan's path rewrites of delivery lines, ``files`` the
file work of the last two: reading the tree's text files, placing new files,
counting and copying Maildirs (``copyMaildir``).

The tree: ``DIR`` is a vpopmail home (holding ``domains/``) or the
``domains/`` folder itself. A domain folder is one holding ``vpasswd``,
directly below ``domains/`` or one level further down (vpopmail's hashing
when there are many domains). A symbolic link there pointing at a domain
folder is an alias domain (``vaddaliasdomain``). vpopmail's SQL backends are
not read.

What is imported, and how:

- ``vpasswd`` lines (``name:crypted_pw:uid:gid:gecos:dir:quota[:clear_pw]``)
  become users: the crypted password as it is (``$1$``, ``$6$``, DES: our
  verifier knows them and asks for a rehash at the next login), gid as the
  flag bits 1:1, the quota through ``parseQuota``. A clear password becomes
  the user's ``clearSecret`` and turns the new domain's ``clearPasswords`` on.
  The uid field (vpopmail's APOP marker) is ignored.
- ``.qmail-default`` (``| .../vdelivermail '' <instruction>``) becomes the
  domain's catch-all: bounce, delete, forward to an address, or the mailbox of
  a user of the same domain when the instruction is that user's folder. Any
  other content is reported and leaves the catch-all at bounce.
- ``.qmail-<name>`` files in a domain folder become valias rows, one target
  per delivery line (comments and blank lines dropped, trailing blanks cut).
  A file whose name is also a user's is kept as that file in the new domain
  folder, where the delivery code reads it before users, as qmail-local did.
- A user's ``.qmail`` and ``.qmail-<ext>`` files are copied into the new user
  folder (vdelivermail and qmail-local read them there).
- File and Maildir lines pointing into a user folder of the imported tree
  (at the tree's old path, from the vpasswd ``dir`` fields, or where it is
  now) are rewritten to ``<data>/domains/<domain>/<user>/...``; each rewrite
  is reported. Program lines naming the old tree are reported, not changed.
- Each user's Maildir (``<dir>/Maildir`` if present, else the folder found in
  the domain folder) is brought to ``<data>/domains/<domain>/<user>/Maildir/``:
  messages in ``cur/`` and ``new/`` (of the Maildir and of its Maildir++
  folders) are hard-linked when source and target share a file system and
  the message already belongs to the data folder's owner (a message file is
  never changed in place), everything else (``maildirsize``, uid lists,
  keywords) is copied; ``tmp/`` contents and symbolic links are left behind.
  Copies and new folders belong to the running user: run as the server's
  account, or have the caller hand root's files over (as ``qmailctl`` does).
  With ``copyMail=False`` an empty Maildir is made instead.

Existing things are never changed: a domain, user, alias domain or alias
already in the database is reported as skipped (its users and aliases are
still imported into an existing domain). A re-run therefore only adds what
is missing. ``ImportReport.ok`` is False when something could not be
imported: an unparseable vpasswd line or quota, an unusable name, a name
taken by something of another kind (an alias where a user should go), an
unreadable file, a failed copy. Warnings (behaviour that changes, things
left behind) do not make it False. ``DatabaseUnavailable`` is not caught.

A user's mail is copied before the user is added, so a failed copy leaves
no user behind and a re-run copies again (files already there are kept).
Everything written is flushed with ``os.sync()`` at the end. All of this
blocks: it is for ``qmailctl``, not for the reactor thread.
"""

from __future__ import annotations

from qmailtx.vdomain.interfaces import IUserStore
from qmailtx.vdomain.vpopmail.apply import applyPlan
from qmailtx.vdomain.vpopmail.files import MailCopy, copyMaildir
from qmailtx.vdomain.vpopmail.parse import (
    VpasswdEntry,
    VpopmailFormatError,
    aliasNameOf,
    parseAliasLines,
    parseVdelivermailInstruction,
    parseVpasswdLine,
    rewriteTarget,
)
from qmailtx.vdomain.vpopmail.plan import ImportPlan
from qmailtx.vdomain.vpopmail.report import CREATE, FAIL, SKIP, ImportReport, Outcome
from qmailtx.vdomain.vpopmail.scan import scanTree

__all__ = [
    "CREATE",
    "FAIL",
    "SKIP",
    "ImportPlan",
    "ImportReport",
    "MailCopy",
    "Outcome",
    "VpasswdEntry",
    "VpopmailFormatError",
    "aliasNameOf",
    "applyPlan",
    "copyMaildir",
    "parseAliasLines",
    "parseVdelivermailInstruction",
    "parseVpasswdLine",
    "rewriteTarget",
    "runImport",
    "scanTree",
]


def runImport(
    store: IUserStore, data: str, root: str, dryRun: bool, copyMail: bool
) -> ImportReport:
    """Import the vpopmail tree at ``root`` into ``store`` and ``<data>/domains``."""
    return applyPlan(store, scanTree(root, data), dryRun=dryRun, copyMail=copyMail)
