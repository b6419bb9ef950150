"""qmailctl: domains, users, aliases and vacations, through main() and the console script."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from qmailtx.vdomain.admin import main
from qmailtx.vdomain.layout import domainFolder, maildirOf, userFolder
from qmailtx.vdomain.passwords import verifyPassword
from qmailtx.vdomain.records import (
    CatchAll,
    CatchAllAction,
    QuotaLimit,
    User,
    UserFlags,
    Vacation,
)
from qmailtx.vdomain.sqlite import SQLiteUserStore

QMAILCTL = os.path.join(os.path.dirname(sys.executable), "qmailctl")


class AdminTestCase(SynchronousTestCase):
    """A config file naming a fresh data folder, and ways to run qmailctl on it."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.data = os.path.join(base, "data")
        self.config = os.path.join(base, "qmailtx.toml")
        with open(self.config, "w") as f:
            f.write(f'[paths]\ndata = "{self.data}"\n')
        self.database = os.path.join(self.data, "users.sqlite3")
        self._store: SQLiteUserStore | None = None

    @property
    def store(self) -> SQLiteUserStore:
        """The database as the server sees it (a separate connection)."""
        if self._store is None:
            self._store = SQLiteUserStore(self.database)
            self.addCleanup(self._store.close)
        return self._store

    def run_(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        """main() in this process: (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["--config", self.config, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err
        )
        return code, out.getvalue(), err.getvalue()

    def ok(self, *argv: str, stdin: str = "") -> str:
        code, out, err = self.run_(*argv, stdin=stdin)
        self.assertEqual(code, 0, f"qmailctl {' '.join(argv)}: {err}{out}")
        return out

    def json_(self, *argv: str, stdin: str = "", code: int = 0) -> Any:
        got, out, err = self.run_("--json", *argv, stdin=stdin)
        self.assertEqual(got, code, f"qmailctl {' '.join(argv)}: {err}{out}")
        return json.loads(out)

    def refused(self, *argv: str, stdin: str = "", code: int = 1) -> str:
        got, out, err = self.run_(*argv, stdin=stdin)
        self.assertEqual((got, out), (code, ""), err)
        if code == 2:
            self.assertIn("qmailctl", err)  # argparse's usage, or our own message
        else:
            self.assertTrue(err.startswith("qmailctl: "), err)
        return err

    def script(self, *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        """The installed console script, as an administrator runs it."""
        return subprocess.run(
            [QMAILCTL, "--config", self.config, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def addDomainAndUser(self, word: str = "pw", *extra: str) -> None:
        self.ok("domain", "add", "example.com", *extra)
        self.ok("user", "add", "alice@example.com", "--password-stdin", stdin=word + "\n")


class ConsoleScriptTests(AdminTestCase):
    """The fixed command lines, through the real console script."""

    def test_domainAddAndUserAdd(self) -> None:
        done = self.script("domain", "add", "Example.COM")
        self.assertEqual((done.returncode, done.stdout), (0, "added domain example.com\n"))
        self.assertTrue(domainFolder(self.data, "example.com").isdir())

        done = self.script(
            "user",
            "add",
            "Alice@example.com",
            "--password-stdin",
            "--quota",
            "104857600",
            stdin="s3cret word\n",
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, "added user alice@example.com (quota 100MB)\n")
        self.assertEqual(done.stderr, "")
        maildir = maildirOf(self.data, "alice", "example.com")
        for sub in ("cur", "new", "tmp"):
            self.assertTrue(maildir.child(sub).isdir())
        self.assertFalse(maildir.child("maildirsize").exists())
        user = self.store.user("alice", "example.com")
        assert user is not None
        self.assertTrue(verifyPassword("s3cret word", user.passwordHash))
        self.assertFalse(verifyPassword("s3cret word\n", user.passwordHash))
        self.assertNotIn("s3cret", user.passwordHash)
        self.assertIsNone(user.clearSecret)
        self.assertEqual(user.quota, QuotaLimit(104857600))

    def test_refusalsAndJson(self) -> None:
        self.assertEqual(self.script("domain", "add", "example.com").returncode, 0)
        done = self.script("user", "add", "bob@nowhere.example", "--password-stdin", stdin="x\n")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stderr, "qmailctl: no such domain: nowhere.example\n")

        done = self.script("--json", "user", "add", "bob@example.com", stdin="")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout)["address"], "bob@example.com")
        self.assertIn("no password", done.stderr)

        done = self.script("user", "add", "bob@example.com", "--json")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(json.loads(done.stdout), {"error": "bob@example.com exists already"})

    def test_usageError(self) -> None:
        done = self.script("user", "frobnicate")
        self.assertEqual(done.returncode, 2)
        self.assertIn("invalid choice", done.stderr)
        self.assertEqual(done.stdout, "")

    def test_noReactor(self) -> None:
        """The command line never imports (so never installs) the global reactor."""
        code = (
            "import sys, qmailtx.vdomain.admin\n"
            "sys.exit('twisted.internet.reactor' in sys.modules)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)


class DomainTests(AdminTestCase):
    def test_addListInfo(self) -> None:
        self.ok("domain", "add", "b.example")
        self.ok("domain", "add", "a.example", "--clear-passwords")
        self.assertEqual(self.ok("domain", "list"), "a.example\nb.example\n")
        listed = self.json_("domain", "list")
        self.assertEqual([d["name"] for d in listed], ["a.example", "b.example"])
        self.assertEqual(listed[0]["clearPasswords"], True)
        self.assertEqual(listed[1]["catchall"], {"action": "bounce-no-mailbox", "target": ""})
        info = self.ok("domain", "info", "a.example").splitlines()
        self.assertIn("clear passwords: yes", info)
        self.assertIn("catchall: bounce-no-mailbox", info)
        self.assertIn("users: 0", info)
        info = self.json_("domain", "info", "b.example")
        self.assertEqual((info["name"], info["users"], info["aliases"]), ("b.example", 0, []))
        self.assertEqual(info["folder"], domainFolder(self.data, "b.example").path)

    def test_addRefusesDuplicatesAndBadNames(self) -> None:
        self.ok("domain", "add", "example.com")
        self.assertIn("exists already", self.refused("domain", "add", "EXAMPLE.com"))
        for bad in ("-bad.example", "a..b", "[127.0.0.1]", "exa_mple.com", ""):
            self.assertIn("not a domain name", self.refused("domain", "add", "--", bad))
        self.assertEqual(
            self.json_("domain", "add", "..", code=1)["error"][:17], "not a domain name"
        )

    def test_delRetiresFolder(self) -> None:
        self.addDomainAndUser()
        self.ok("domain", "alias", "alias.example", "example.com")
        self.ok("alias", "add", "info@example.com", "alice@example.com")
        self.ok("domain", "del", "example.com")
        self.assertIsNone(self.store.canonicalDomain("example.com"))
        self.assertIsNone(self.store.canonicalDomain("alias.example"))
        self.assertIsNone(self.store.user("alice", "example.com"))
        self.assertIsNone(self.store.alias("info", "example.com"))
        self.assertFalse(domainFolder(self.data, "example.com").exists())
        self.assertEqual(os.listdir(os.path.join(self.data, "deleted", "example.com")), [])
        self.assertIn("no such domain", self.refused("domain", "del", "example.com"))

    def test_delKeepMail(self) -> None:
        self.addDomainAndUser()
        mail = maildirOf(self.data, "alice", "example.com").child("new").child("1.x.host")
        mail.setContent(b"Subject: hi\n\nhello\n")
        result = self.json_("domain", "del", "example.com", "--keep-mail")
        self.assertEqual(result["ok"], True)
        self.assertFalse(domainFolder(self.data, "example.com").exists())
        kept = glob.glob(os.path.join(self.data, "deleted", "example.com", "alice.*"))
        self.assertEqual(len(kept), 1)
        with open(os.path.join(kept[0], "Maildir", "new", "1.x.host"), "rb") as f:
            self.assertEqual(f.read(), b"Subject: hi\n\nhello\n")
        self.assertTrue(os.path.isdir(result["keptIn"]))

    def test_aliasDomain(self) -> None:
        self.ok("domain", "add", "example.com")
        self.assertEqual(
            self.ok("domain", "alias", "Alias.Example", "example.com"),
            "added alias domain alias.example -> example.com\n",
        )
        self.assertEqual(self.store.canonicalDomain("alias.example"), "example.com")
        self.assertEqual(self.ok("domain", "list"), "example.com (aliases: alias.example)\n")
        # users are reached through the alias domain too
        self.ok("user", "add", "carol@alias.example")
        self.assertIsNotNone(self.store.user("carol", "example.com"))
        self.assertIn(
            "exists already", self.refused("domain", "alias", "alias.example", "example.com")
        )
        self.assertIn("alias domain of", self.refused("domain", "del", "alias.example"))
        self.assertIn("no such domain", self.refused("domain", "alias", "x.example", "no.example"))
        self.assertEqual(
            self.json_("domain", "unalias", "alias.example"),
            {"ok": True, "alias": "alias.example", "domain": "example.com"},
        )
        self.assertIsNone(self.store.canonicalDomain("alias.example"))
        self.assertIn("no such alias domain", self.refused("domain", "unalias", "alias.example"))
        self.assertIn("not an alias domain", self.refused("domain", "unalias", "example.com"))

    def test_catchAll(self) -> None:
        self.addDomainAndUser()
        self.ok("domain", "catchall", "example.com", "delete")
        self.assertEqual(self.catchall(), CatchAll(CatchAllAction.DELETE))
        self.ok("domain", "catchall", "example.com", "forward", "Postmaster@Other.Example")
        self.assertEqual(
            self.catchall(), CatchAll(CatchAllAction.FORWARD, "Postmaster@other.example")
        )
        out = self.json_("domain", "catchall", "example.com", "mailbox", "Alice")
        self.assertEqual(out["catchall"], {"action": "mailbox", "target": "alice"})
        self.assertEqual(self.catchall(), CatchAll(CatchAllAction.MAILBOX, "alice"))
        self.ok("domain", "catchall", "example.com", "bounce-no-mailbox")
        self.assertEqual(self.catchall(), CatchAll())

        err = self.refused("domain", "catchall", "example.com", "mailbox", "nobody")
        self.assertEqual(err, "qmailctl: no such user: nobody@example.com\n")
        self.refused("domain", "catchall", "example.com", "forward", "not an address")
        self.refused("domain", "catchall", "example.com", "forward", code=2)
        self.refused("domain", "catchall", "example.com", "delete", "x@y.example", code=2)
        self.refused("domain", "catchall", "example.com", "explode", code=2)
        self.assertEqual(self.catchall(), CatchAll())

    def catchall(self) -> CatchAll:
        domain = self.store.domain("example.com")
        assert domain is not None
        return domain.catchall

    def test_clearPasswordsSetting(self) -> None:
        self.addDomainAndUser("before")
        self.ok("domain", "clear-passwords", "example.com", "on")
        user = self.store.user("alice", "example.com")
        assert user is not None
        self.assertIsNone(user.clearSecret)
        self.ok("user", "passwd", "alice@example.com", "--password-stdin", stdin="after\n")
        user = self.store.user("alice", "example.com")
        assert user is not None
        self.assertEqual(user.clearSecret, "after")


class UserTests(AdminTestCase):
    def test_addRefusals(self) -> None:
        self.addDomainAndUser()
        err = self.refused("user", "add", "ALICE@example.com", "--password-stdin", stdin="x\n")
        self.assertEqual(err, "qmailctl: alice@example.com exists already\n")
        err = self.refused("user", "add", "bob@unknown.example")
        self.assertEqual(err, "qmailctl: no such domain: unknown.example\n")
        for bad in ("bob", "bob@", "@example.com", "b b@example.com", "bob@exa mple.com"):
            self.assertIn("not an address", self.refused("user", "add", bad))
        for bad in ('".bob"@example.com', "-bob@example.com", "a/b@example.com"):
            self.assertIn("not usable as a user name", self.refused("user", "add", "--", bad))
        self.assertIn(
            "not a quota", self.refused("user", "add", "b@example.com", "--quota", "lots")
        )
        self.assertIn(
            "empty", self.refused("user", "add", "b@example.com", "--password-stdin", stdin="\n")
        )
        self.assertIn(
            "no password on standard input",
            self.refused("user", "add", "b@example.com", "--password-stdin"),
        )
        self.ok("alias", "add", "info@example.com", "alice@example.com")
        self.assertIn("alias", self.refused("user", "add", "info@example.com"))
        self.assertIsNone(self.store.user("b", "example.com"))

    def test_addWithoutPassword(self) -> None:
        self.ok("domain", "add", "example.com")
        code, out, err = self.run_("user", "add", "bob@example.com", "--quota", "1000C")
        self.assertEqual((code, out), (0, "added user bob@example.com (quota 1000 messages)\n"))
        self.assertIn("bob@example.com has no password and cannot log in", err)
        user = self.store.user("bob", "example.com")
        assert user is not None
        self.assertEqual((user.passwordHash, user.quota), ("", QuotaLimit(None, 1000)))

    def test_addRefusesLeftoverFolder(self) -> None:
        self.ok("domain", "add", "example.com")
        userFolder(self.data, "bob", "example.com").makedirs()
        self.assertIn("exists already", self.refused("user", "add", "bob@example.com"))
        self.assertIsNone(self.store.user("bob", "example.com"))

    def test_clearPasswordDomain(self) -> None:
        self.addDomainAndUser("open sesame", "--clear-passwords")
        user = self.store.user("alice", "example.com")
        assert user is not None
        self.assertEqual(user.clearSecret, "open sesame")
        self.assertTrue(verifyPassword("open sesame", user.passwordHash))

    def test_addJsonWithQuotaAndName(self) -> None:
        self.ok("domain", "add", "example.com")
        out = self.json_(
            "user",
            "add",
            "bob@example.com",
            "--password-stdin",
            "--quota",
            "100MB,",
            stdin="p\n",
            code=1,
        )
        self.assertIn("not a quota", out["error"])
        out = self.json_(
            "user",
            "add",
            "bob@example.com",
            "--password-stdin",
            "--quota",
            "104857600S,1000C",
            "--name",
            "Bob Example",
            stdin="p\r\n",
        )
        self.assertEqual(out["ok"], True)
        self.assertEqual(
            out["quota"], {"bytes": 104857600, "count": 1000, "maildirsize": "104857600S,1000C"}
        )
        self.assertEqual(out["maildir"], maildirOf(self.data, "bob", "example.com").path)
        user = self.store.user("bob", "example.com")
        assert user is not None
        self.assertEqual(user.gecos, "Bob Example")
        self.assertTrue(verifyPassword("p", user.passwordHash))

    def test_delRetiresFolder(self) -> None:
        self.addDomainAndUser()
        mail = maildirOf(self.data, "alice", "example.com").child("new").child("1.x.host")
        mail.setContent(b"hello\n")
        self.assertEqual(
            self.ok("user", "del", "alice@example.com"), "deleted user alice@example.com\n"
        )
        self.assertIsNone(self.store.user("alice", "example.com"))
        self.assertFalse(userFolder(self.data, "alice", "example.com").exists())
        self.assertEqual(os.listdir(os.path.join(self.data, "deleted", "example.com")), [])
        self.assertEqual(
            self.refused("user", "del", "alice@example.com"),
            "qmailctl: no such user: alice@example.com\n",
        )

    def test_delKeepMail(self) -> None:
        self.addDomainAndUser()
        self.ok("domain", "catchall", "example.com", "mailbox", "alice")
        mail = maildirOf(self.data, "alice", "example.com").child("new").child("1.x.host")
        mail.setContent(b"hello\n")
        code, out, err = self.run_("user", "del", "alice@example.com", "--keep-mail")
        self.assertEqual(code, 0, err)
        self.assertIn("catch-all mailbox", err)
        self.assertFalse(userFolder(self.data, "alice", "example.com").exists())
        (kept,) = glob.glob(os.path.join(self.data, "deleted", "example.com", "alice.*"))
        self.assertIn(f"mail kept in {kept}", out)
        with open(os.path.join(kept, "Maildir", "new", "1.x.host"), "rb") as f:
            self.assertEqual(f.read(), b"hello\n")

    def test_delJson(self) -> None:
        self.addDomainAndUser()
        self.assertEqual(
            self.json_("user", "del", "alice@example.com"),
            {"ok": True, "address": "alice@example.com", "keptIn": None},
        )

    def test_passwd(self) -> None:
        self.addDomainAndUser("old")
        self.assertEqual(
            self.json_("user", "passwd", "alice@example.com", "--password-stdin", stdin="new\n"),
            {"ok": True, "address": "alice@example.com"},
        )
        user = self.store.user("alice", "example.com")
        assert user is not None
        self.assertTrue(verifyPassword("new", user.passwordHash))
        self.assertFalse(verifyPassword("old", user.passwordHash))
        self.refused("user", "passwd", "alice@example.com", code=2)
        self.refused("user", "passwd", "nobody@example.com", "--password-stdin", stdin="x\n")

    def test_quota(self) -> None:
        self.addDomainAndUser()
        self.assertEqual(
            self.ok("user", "quota", "alice@example.com", "2GB"),
            "quota of alice@example.com: 2GB\n",
        )
        self.assertEqual(self.user().quota, QuotaLimit(2 << 30))
        out = self.json_("user", "quota", "alice@example.com", "NOQUOTA")
        self.assertEqual(out, {"ok": True, "address": "alice@example.com", "quota": None})
        self.assertIsNone(self.user().quota)
        self.refused("user", "quota", "alice@example.com", "-5")
        self.refused("user", "quota", "nobody@example.com", "5MB")

    def user(self) -> User:
        user = self.store.user("alice", "example.com")
        assert user is not None
        return user

    def test_infoShowsNoSecrets(self) -> None:
        self.addDomainAndUser("Sup3rSecret", "--clear-passwords")
        maildir = maildirOf(self.data, "alice", "example.com")
        maildir.child("maildirsize").setContent(b"1000S\n300 2\n-100 -1\n")
        hashed = self.user().passwordHash
        for out in (
            self.ok("user", "info", "alice@example.com"),
            self.ok("--json", "user", "info", "alice@example.com"),
        ):
            self.assertNotIn("Sup3rSecret", out)
            self.assertNotIn(hashed, out)
            self.assertNotIn(hashed.split("$")[-1], out)
        lines = self.ok("user", "info", "alice@example.com").splitlines()
        self.assertIn("password: set", lines)
        self.assertIn("clear secret: kept", lines)
        self.assertIn(f"maildir: {maildir.path}", lines)
        self.assertIn("usage: 200 bytes in 1 messages", lines)
        info = self.json_("user", "info", "alice@example.com")
        self.assertEqual(info["address"], "alice@example.com")
        self.assertEqual((info["hasPassword"], info["hasClearSecret"]), (True, True))
        self.assertEqual(info["usage"], {"bytes": 200, "count": 1})
        self.assertEqual((info["vacation"], info["flags"], info["quota"]), (None, [], None))

    def test_list(self) -> None:
        self.addDomainAndUser()
        self.ok("user", "add", "bob@example.com", "--quota", "5MB")
        self.assertEqual(
            self.ok("user", "list", "example.com"), "alice@example.com\nbob@example.com\n"
        )
        listed = self.json_("user", "list", "example.com")
        self.assertEqual([u["address"] for u in listed], ["alice@example.com", "bob@example.com"])
        self.assertEqual([u["hasPassword"] for u in listed], [True, False])
        self.assertEqual(listed[1]["quota"]["bytes"], 5 << 20)
        self.assertNotIn("passwordHash", json.dumps(listed))
        self.refused("user", "list", "unknown.example")

    def test_flags(self) -> None:
        self.addDomainAndUser()
        out = self.json_(
            "user", "flags", "alice@example.com", "--set", "no_pop", "--set", "NO-SMTP"
        )
        self.assertEqual(out["flags"], ["no_pop", "no_smtp"])
        self.assertEqual(self.user().flags, UserFlags.NO_POP | UserFlags.NO_SMTP)
        self.ok("user", "flags", "alice@example.com", "--clear", "no_pop")
        self.assertIn("flags: no_smtp", self.ok("user", "info", "alice@example.com"))
        self.assertEqual(self.user().flags, UserFlags.NO_SMTP)
        self.assertIn(
            "unknown flag", self.refused("user", "flags", "alice@example.com", "--set", "bogus")
        )

    def test_vacation(self) -> None:
        self.addDomainAndUser()
        message = self.mktemp()
        with open(message, "w") as f:
            f.write("I am away.\n")
        self.ok(
            "user", "vacation", "alice@example.com", "--subject", "Away", "--message-file", message
        )
        self.assertEqual(
            self.store.vacation("alice", "example.com"),
            Vacation("Away", "I am away.\n", 7 * 24 * 3600),
        )
        out = self.json_(
            "user",
            "vacation",
            "alice@example.com",
            "--subject",
            "Gone",
            "--message-stdin",
            "--period",
            "2",
            stdin="Back soon.\n",
        )
        self.assertEqual(out["vacation"], {"subject": "Gone", "period": 2 * 24 * 3600})
        self.assertEqual(
            self.store.vacation("alice", "example.com"), Vacation("Gone", "Back soon.\n", 172800)
        )
        self.assertIn("vacation: on: Gone", self.ok("user", "info", "alice@example.com"))
        self.assertEqual(
            self.json_("user", "vacation", "alice@example.com", "--off"),
            {"ok": True, "address": "alice@example.com", "vacation": None},
        )
        self.assertIsNone(self.store.vacation("alice", "example.com"))
        self.refused("user", "vacation", "alice@example.com", "--subject", "x", code=2)
        self.refused("user", "vacation", "alice@example.com", "--off", "--message-stdin", code=2)
        self.refused(
            "user", "vacation", "alice@example.com", "--subject", "a\nBcc: x", "--message-stdin"
        )
        self.refused("user", "vacation", "nobody@example.com", "--subject", "x", "--message-stdin")


class AliasTests(AdminTestCase):
    def test_addListDel(self) -> None:
        self.addDomainAndUser()
        out = self.ok("alias", "add", "Info@example.com", "alice@example.com", "&bob@Other.Example")
        self.assertEqual(
            out, "info@example.com -> &alice@example.com\ninfo@example.com -> &bob@other.example\n"
        )
        self.ok("alias", "add", "info@example.com", "/srv/archive/Maildir/", "|/usr/bin/true")
        self.ok("alias", "add", "info@example.com", "alice@example.com")  # not repeated
        alias = self.store.alias("info", "example.com")
        assert alias is not None
        self.assertEqual(
            alias.targets,
            ("&alice@example.com", "&bob@other.example", "/srv/archive/Maildir/", "|/usr/bin/true"),
        )
        self.ok("alias", "add", "sales-default@example.com", "./Maildir/")
        listed = self.json_("alias", "list", "example.com")
        self.assertEqual(
            listed,
            [
                {"address": "info@example.com", "targets": list(alias.targets)},
                {"address": "sales-default@example.com", "targets": ["./Maildir/"]},
            ],
        )
        self.assertEqual(len(self.ok("alias", "list", "example.com").splitlines()), 5)

        out = self.json_("alias", "del", "info@example.com", "bob@other.example")
        self.assertEqual(
            out["targets"], ["&alice@example.com", "/srv/archive/Maildir/", "|/usr/bin/true"]
        )
        self.ok("alias", "del", "info@example.com")
        self.assertIsNone(self.store.alias("info", "example.com"))
        self.assertIn("no such alias", self.refused("alias", "del", "info@example.com"))
        self.assertIn(
            "has no target",
            self.refused("alias", "del", "sales-default@example.com", "x@y.example"),
        )

    def test_addRefusals(self) -> None:
        self.addDomainAndUser()
        self.assertIn("is a user", self.refused("alias", "add", "alice@example.com", "b@x.example"))
        self.assertIn("no such domain", self.refused("alias", "add", "a@no.example", "b@x.example"))
        self.assertIn("not an address", self.refused("alias", "add", "a@example.com", "bob"))
        self.refused("alias", "add", "a@example.com", code=2)
        self.assertEqual(self.store.aliases("example.com"), [])


class OwnershipTests(AdminTestCase):
    def test_rootHandsNewFilesToTheServer(self) -> None:
        """Run as root, qmailctl gives what it makes to the data folder's owner."""
        if os.geteuid() != 0:
            raise SkipTest("needs root")
        os.makedirs(self.data)
        os.chown(self.data, 65534, 65534)
        self.addDomainAndUser()
        made = [
            self.database,
            os.path.join(self.data, "domains"),
            domainFolder(self.data, "example.com").path,
            userFolder(self.data, "alice", "example.com").path,
            maildirOf(self.data, "alice", "example.com").child("new").path,
        ]
        for path in made:
            self.assertEqual(os.stat(path).st_uid, 65534, path)


class FailureTests(AdminTestCase):
    def test_configError(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["--config", self.config + ".missing", "domain", "list"], stdout=out, stderr=err
        )
        self.assertEqual(code, 1)
        self.assertIn("qmailctl: config file", err.getvalue())

    def test_databaseUnavailable(self) -> None:
        with open(self.config, "a") as f:
            f.write(f'[users]\ndatabase = "{self.data}"\n')  # a folder: cannot be opened
        os.makedirs(self.data)
        err = self.refused("domain", "list", code=111)
        self.assertIn("temporary failure", err)
        self.assertIn("error", self.json_("domain", "add", "example.com", code=111))

    def test_usageErrorJson(self) -> None:
        out = self.json_("domain", code=2)
        self.assertIn("required", out["error"])


class PolicyListingTests(AdminTestCase):
    def test_listsEachListenersStages(self) -> None:
        code, out, _ = self.run_("policies")
        self.assertEqual(code, 0)
        self.assertIn(
            "smtp (tcp:2525:interface=127.0.0.1): MAIL: -; "
            "RCPT: badmailfrom, nullsender, badrcptto, relay, rcptcheck; DATA: exeblock",
            out,
        )
        code, out, _ = self.run_("--json", "policies")
        listeners = {entry["listener"]: entry for entry in json.loads(out)}
        self.assertEqual(listeners["submission"]["stages"]["DATA"], ["exeblock"])
        self.assertTrue(listeners["smtps"]["implicitTLS"])

    def test_unknownPolicyIsReported(self) -> None:
        with open(self.config, "a") as f:
            f.write('\n[submission]\npolicies = ["relay", "nosuch"]\n')
        code, _, err = self.run_("policies")
        self.assertEqual(code, 1)
        self.assertIn("unknown policy 'nosuch'", err)
