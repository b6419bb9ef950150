"""Carrying out an ImportPlan (or, dry, saying what would be done): ``applyPlan``."""

from __future__ import annotations

import os

from qmailtx.delivery.maildir import makeMaildir
from qmailtx.fs import FileSystem
from qmailtx.vdomain.interfaces import AlreadyExists, IUserStore
from qmailtx.vdomain.layout import domainFolder, userFolder
from qmailtx.vdomain.records import User
from qmailtx.vdomain.sqlite import SQLiteUserStore
from qmailtx.vdomain.vpopmail.files import MailCopy, copyMaildir, placeFile, problem, readText
from qmailtx.vdomain.vpopmail.plan import (
    AliasImport,
    DomainImport,
    FileImport,
    ImportPlan,
    UserImport,
)
from qmailtx.vdomain.vpopmail.report import (
    CREATE,
    FAIL,
    SKIP,
    ImportReport,
    Outcome,
    mailText,
    plural,
    userDetail,
)


class _Conflict(Exception):
    pass


def _makeFolder(path: str) -> None:
    """A domain or user folder: 0700 like qmailctl's (never group-writable:
    qmail-local refuses such a home)."""
    os.makedirs(path, mode=0o700, exist_ok=True)


class _Applier:
    """Carries out an ImportPlan; ``view`` is None for a database that is
    known to be empty (a dry run against a file that does not exist yet)."""

    def __init__(
        self,
        store: IUserStore,
        view: IUserStore | None,
        report: ImportReport,
        data: str,
    ) -> None:
        self.store = store
        self.view = view
        self.report = report
        self.data = data
        self.dryRun = report.dryRun
        self.wrote = False
        self.used: set[str] = set()  # files whose lines were (or would be) imported

    def outcome(self, kind: str, name: str, action: str, detail: str = "") -> None:
        self.report.outcomes.append(Outcome(kind, name, action, detail))

    def fail(self, kind: str, name: str, message: str) -> None:
        self.report.errors.append(message)
        self.outcome(kind, name, FAIL, message)

    def run(self, plan: ImportPlan) -> None:
        imported: set[str] = set()
        for d in plan.domains:
            keepClear = self.domain(d)
            if keepClear is None:
                continue
            imported.add(d.domain.name)
            for alias, target in plan.aliasDomains:
                if target == d.domain.name:
                    self.aliasDomain(alias, target)
            for u in d.users:
                self.user(u, keepClear)
            for a in d.aliases:
                self.alias(a)
            for f in d.files:
                self.file(f)
        for alias, target in plan.aliasDomains:
            if target not in imported:
                self.fail(
                    "alias domain",
                    f"{alias} -> {target}",
                    f"alias domain {alias}: its domain {target} was not imported",
                )

    # -- domains

    def domain(self, d: DomainImport) -> bool | None:
        """Add the domain; whether clear passwords are kept (None: domain refused)."""
        name = d.domain.name
        detail = f"catch-all {d.domain.catchall}"
        if d.domain.clearPasswords:
            detail += ", clear passwords"
        canonical = self.view.canonicalDomain(name) if self.view is not None else None
        if canonical is None:
            if not self.dryRun:
                try:
                    self.store.addDomain(d.domain)
                except AlreadyExists as e:
                    self.fail("domain", name, f"{d.folder}: {e}; nothing of it imported")
                    return None
                try:
                    self.wrote = True
                    _makeFolder(domainFolder(self.data, name).path)
                except OSError as e:
                    self.report.errors.append(problem(e.filename or name, e))
            self.outcome("domain", name, CREATE, detail)
            return d.domain.clearPasswords
        if canonical != name:
            self.fail(
                "domain",
                name,
                f"{d.folder}: {name} is an alias domain of {canonical}; nothing of it imported",
            )
            return None
        existing = self.view.domain(name) if self.view is not None else None
        self.outcome("domain", name, SKIP, "exists already; its settings are left as they are")
        if existing is not None and existing.catchall != d.domain.catchall:
            self.report.warnings.append(
                f"{d.folder}: {name} exists with catch-all {existing.catchall};"
                f" the tree's {d.domain.catchall} is not applied"
            )
        if existing is not None and d.domain.clearPasswords and not existing.clearPasswords:
            self.report.warnings.append(
                f"{d.folder}: {name} exists without clear passwords;"
                " the imported users' clear passwords are dropped"
            )
            return False
        return True

    def aliasDomain(self, alias: str, target: str) -> None:
        name = f"{alias} -> {target}"
        canonical = self.view.canonicalDomain(alias) if self.view is not None else None
        if canonical == target:
            self.outcome("alias domain", name, SKIP, "exists already")
        elif canonical is not None:
            self.fail("alias domain", name, f"alias domain {alias}: {alias} is taken already")
        else:
            if not self.dryRun:
                try:
                    self.store.addAliasDomain(alias, target)
                except AlreadyExists as e:
                    self.fail("alias domain", name, f"alias domain {alias}: {e}")
                    return
            self.outcome("alias domain", name, CREATE)

    # -- users

    def user(self, u: UserImport, keepClear: bool) -> None:
        user = u.user
        if not keepClear and user.clearSecret is not None:
            user = User(
                user.name, user.domain, user.passwordHash, None, user.quota, user.flags, user.gecos
            )
        view = self.view
        if view is not None and view.user(user.name, user.domain) is not None:
            self.outcome("user", user.address, SKIP, "exists already; mail not copied")
            return
        if view is not None and view.alias(user.name, user.domain) is not None:
            self.fail("user", user.address, f"{u.source}: {user.address} is an alias already")
            return
        detail = userDetail(user)
        destination = os.path.join(userFolder(self.data, user.name, user.domain).path, "Maildir")
        names = "".join(f"; {os.path.basename(f.destination)}" for f in u.files)
        self.used.update(f.source for f in u.files)
        if self.dryRun:
            if u.maildir is not None and self.report.copyMail:
                copy = MailCopy(user.address, u.maildir, destination, u.mail.messages, u.mail.bytes)
                self.report.mail.append(copy)
                detail += f"; {mailText(copy, done=False)}"
            self.outcome("user", user.address, CREATE, detail + names)
            return
        folder = os.path.dirname(destination)
        try:
            self.wrote = True
            if os.path.lexists(folder):
                self.report.warnings.append(
                    f"{folder} exists already (an earlier run?); {user.address}'s import adds to it"
                )
            for path in (os.path.dirname(folder), folder, destination):
                _makeFolder(path)
            if u.maildir is not None and self.report.copyMail:
                owner = os.stat(self.data).st_uid  # the server's account
                copy = copyMaildir(u.maildir, destination, user.address, owner)
                self.report.mail.append(copy)
                detail += f"; {mailText(copy, done=True)}"
                for path in copy.skipped:
                    self.report.warnings.append(f"{path}: not a plain file or folder; left behind")
            else:
                makeMaildir(FileSystem(), destination)
            for f in u.files:
                self.writeFile(f)
        except (OSError, _Conflict) as e:
            message = problem(e.filename, e) if isinstance(e, OSError) and e.filename else str(e)
            self.fail("user", user.address, f"{u.source}: {message}; user not added")
            return
        try:
            self.store.addUser(user)
        except AlreadyExists as e:
            self.fail("user", user.address, f"{u.source}: {e}")
            return
        self.outcome("user", user.address, CREATE, detail + names)

    # -- aliases and files

    def alias(self, a: AliasImport) -> None:
        alias = a.alias
        view = self.view
        existing = view.alias(alias.name, alias.domain) if view is not None else None
        if existing is not None:
            self.outcome("alias", alias.address, SKIP, "exists already")
            if set(existing.targets) != set(alias.targets):
                self.report.warnings.append(
                    f"{a.source}: alias {alias.address} exists with other targets; left as it is"
                )
            return
        if view is not None and view.user(alias.name, alias.domain) is not None:
            self.fail("alias", alias.address, f"{a.source}: {alias.address} is a user already")
            return
        if not self.dryRun:
            try:
                self.store.addAlias(alias)
            except AlreadyExists as e:
                self.fail("alias", alias.address, f"{a.source}: {e}")
                return
        self.used.add(a.source)
        n = len(alias.targets)
        self.outcome("alias", alias.address, CREATE, f"{n} {plural('target', n)}")

    def file(self, f: FileImport) -> None:
        if os.path.lexists(f.destination):
            try:
                same = readText(f.destination) == f.text
            except OSError:
                same = False
            if same:
                self.outcome("file", f.destination, SKIP, "exists already")
            else:
                self.fail("file", f.destination, f"{f.destination}: exists with other content")
            return
        if not self.dryRun:
            try:
                self.wrote = True
                self.writeFile(f)
            except (OSError, _Conflict) as e:
                self.fail("file", f.destination, f"{f.destination}: {e}")
                return
        self.used.add(f.source)
        self.outcome("file", f.destination, CREATE, f"from {f.source}")

    def writeFile(self, f: FileImport) -> None:
        """Write a dot-qmail file (mode 0600), unless the same text is there."""
        if os.path.lexists(f.destination):
            if readText(f.destination) != f.text:
                raise _Conflict(f"{f.destination} exists with other content")
            return
        folder = os.path.dirname(f.destination)
        _makeFolder(folder)

        def write(temporary: str) -> None:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(f.text.encode("utf-8", "surrogateescape"))

        placeFile(f.destination, folder, write)


def applyPlan(store: IUserStore, plan: ImportPlan, dryRun: bool, copyMail: bool) -> ImportReport:
    """Carry out ``plan`` (see ``qmailtx.vdomain.vpopmail``); dry, only report.

    A dry run neither writes to ``store`` nor to the data folder; it reads the
    store to tell what would be skipped, except an SQLite database whose file
    does not exist yet (opening it would create it): that one counts as empty.
    """
    report = ImportReport(
        plan.root,
        plan.data,
        dryRun,
        copyMail,
        warnings=list(plan.warnings),
        errors=list(plan.errors),
    )
    view: IUserStore | None = store
    if dryRun and isinstance(store, SQLiteUserStore) and not os.path.exists(store.path):
        view = None
    applier = _Applier(store, view, report, plan.data)
    applier.run(plan)
    report.rewrites = [r for r in plan.rewrites if r.path in applier.used]
    if applier.wrote:
        os.sync()
    return report
