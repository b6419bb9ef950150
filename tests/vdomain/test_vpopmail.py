"""Importing a vpopmail tree: parsing, the dry run, the import, re-runs, qmailctl."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.vdomain.records import (
    Alias,
    CatchAll,
    CatchAllAction,
    Domain,
    QuotaLimit,
    User,
    UserFlags,
)
from qmailtx.vdomain.sqlite import SQLiteUserStore
from qmailtx.vdomain.vpopmail import (
    CREATE,
    FAIL,
    SKIP,
    ImportReport,
    VpopmailFormatError,
    aliasNameOf,
    copyMaildir,
    parseAliasLines,
    parseVdelivermailInstruction,
    parseVpasswdLine,
    rewriteTarget,
    runImport,
    scanTree,
)

# Made outside Python (see tests/vdomain/test_passwords.py).
MD5_PASSWORD = "$1$abcdefgh$G//4keteveJp0qb8z2DxG/"  # openssl passwd -1 -salt abcdefgh password
MD5_SECRET = "$1$vpop$zvJR3Y.jiQYiuj70nodAU."  # openssl passwd -1 -salt vpop 'Secret!23'
SHA512_PASSWORD = (  # openssl passwd -6 -salt saltsalt password
    "$6$saltsalt$qFmFH.bQmmtXzyBY0s9v7Oicd2z4XSIecDzlB5KiA2/"
    "jctKu9YterLp8wwnSq.qc.eoxqOmSuNp2xS0ktL3nh/"
)
DES_PASSWORD = "abJnggxhB/yWI"  # perl -e 'print crypt("password", "ab")'

OLD = "/home/vpopmail/domains"
VDELIVERMAIL = "| /home/vpopmail/bin/vdelivermail ''"


def write(path: str, content: str | bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    with open(path, "wb") as f:
        f.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def makeMaildir(path: str) -> None:
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)


class ParsingTests(SynchronousTestCase):
    def test_vpasswdLine(self) -> None:
        entry = parseVpasswdLine(
            f"Alice:{SHA512_PASSWORD}:1:18:Alice Liddell:{OLD}/example.com/alice:52428800S",
            "Example.COM",
        )
        self.assertEqual(
            entry.user,
            User(
                "alice",
                "example.com",
                SHA512_PASSWORD,
                None,
                QuotaLimit(52428800, None),
                UserFlags.NO_POP | UserFlags.BOUNCE_MAIL,
                "Alice Liddell",
            ),
        )
        self.assertEqual(entry.directory, f"{OLD}/example.com/alice")

    def test_vpasswdClearPassword(self) -> None:
        """The eighth field is the clear password, colons and all; empty is none."""
        entry = parseVpasswdLine("bob:x:1:0::/d/bob:NOQUOTA:se:cr:et", "example.com")
        self.assertEqual(entry.user.clearSecret, "se:cr:et")
        self.assertIsNone(entry.user.quota)
        self.assertEqual(entry.directory, "/d/bob")
        entry = parseVpasswdLine("bob:x:1:0::/d/bob:NOQUOTA:", "example.com")
        self.assertIsNone(entry.user.clearSecret)

    def test_vpasswdQuotaForms(self) -> None:
        cases = {
            "NOQUOTA": None,
            "52428800S": QuotaLimit(52428800, None),
            "5000000S,100C": QuotaLimit(5000000, 100),
            "1000000": QuotaLimit(1000000, None),
            "1MB": QuotaLimit(1 << 20, None),
            "1000KB": QuotaLimit(1000 * 1024, None),
        }
        for text, quota in cases.items():
            entry = parseVpasswdLine(f"u:x:1:0:::{text}", "example.com")
            self.assertEqual(entry.user.quota, quota, text)
            self.assertEqual(entry.directory, "")

    def test_vpasswdEmptyGidIsNoFlags(self) -> None:
        self.assertEqual(parseVpasswdLine("u:x:1::::NOQUOTA", "d").user.flags, UserFlags(0))

    def test_vpasswdBadLines(self) -> None:
        for line in [
            "alice:x:1:0:Alice:/d/alice",  # six fields
            "alice:x:1:0x10:Alice:/d/alice:NOQUOTA",  # gid not decimal
            "alice:x:1:0:Alice:/d/alice:lots",  # quota
            ":x:1:0:Alice:/d/alice:NOQUOTA",  # no name
            ".alice:x:1:0:Alice:/d/alice:NOQUOTA",
            "al/ice:x:1:0:Alice:/d/alice:NOQUOTA",
            "al ice:x:1:0:Alice:/d/alice:NOQUOTA",
        ]:
            self.assertRaises(VpopmailFormatError, parseVpasswdLine, line, "example.com")

    def test_vdelivermailInstructions(self) -> None:
        cases = {
            f"{VDELIVERMAIL} bounce-no-mailbox\n": CatchAll(CatchAllAction.BOUNCE),
            f"{VDELIVERMAIL} delete\n": CatchAll(CatchAllAction.DELETE),
            f"{VDELIVERMAIL} boss@example.org\n": CatchAll(
                CatchAllAction.FORWARD, "boss@example.org"
            ),
            "|/v/bin/vdelivermail '' &boss@example.org": CatchAll(
                CatchAllAction.FORWARD, "boss@example.org"
            ),
            f"{VDELIVERMAIL} {OLD}/example.com/postmaster\n": CatchAll(
                CatchAllAction.MAILBOX, f"{OLD}/example.com/postmaster"
            ),
            '# comment\n\n|vdelivermail "" ./postmaster/Maildir/ \t\n': CatchAll(
                CatchAllAction.MAILBOX, "./postmaster/Maildir/"
            ),
        }
        for text, expected in cases.items():
            self.assertEqual(parseVdelivermailInstruction(text), expected, text)

    def test_notVdelivermail(self) -> None:
        for text in ["", "&boss@example.org\n", "|/usr/bin/maildrop\n", "# | vdelivermail\n"]:
            self.assertIsNone(parseVdelivermailInstruction(text), text)

    def test_badVdelivermail(self) -> None:
        for text in [
            f"{VDELIVERMAIL}\n",  # one argument: vdelivermail defers
            f"{VDELIVERMAIL} delete extra\n",
            f"{VDELIVERMAIL} 'unterminated\n",
            f"{VDELIVERMAIL} postmaster\n",  # no @, no path
            f"{VDELIVERMAIL} delete\n{VDELIVERMAIL} delete\n",
        ]:
            self.assertRaises(VpopmailFormatError, parseVdelivermailInstruction, text)

    def test_aliasNames(self) -> None:
        self.assertEqual(aliasNameOf(".qmail-info"), "info")
        self.assertEqual(aliasNameOf(".qmail-sales:team"), "sales.team")
        self.assertEqual(aliasNameOf(".qmail-list-default"), "list-default")
        self.assertEqual(aliasNameOf(".qmail-list-owner"), "list-owner")
        self.assertEqual(aliasNameOf(".qmail-Info"), "info")
        self.assertIsNone(aliasNameOf(".qmail-default"))
        self.assertIsNone(aliasNameOf(".qmail-"))
        self.assertIsNone(aliasNameOf(".qmail"))
        self.assertIsNone(aliasNameOf("vpasswd"))
        self.assertRaises(VpopmailFormatError, aliasNameOf, ".qmail-info.bak")

    def test_aliasLines(self) -> None:
        text = "# who\n&a@example.org\t\n\nb@example.org  \n|prog  arg \n/x/Maildir/\n"
        self.assertEqual(
            parseAliasLines(text),
            ("&a@example.org", "b@example.org", "|prog  arg", "/x/Maildir/"),
        )

    def test_rewriteTarget(self) -> None:
        moves = {"/old/d/alice": "/new/domains/d/alice", "/old/d/al": "/new/domains/d/al"}
        self.assertEqual(
            rewriteTarget("/old/d/alice/Maildir/", moves), "/new/domains/d/alice/Maildir/"
        )
        self.assertEqual(rewriteTarget("/old/d/al/Maildir/", moves), "/new/domains/d/al/Maildir/")
        self.assertEqual(rewriteTarget("/old/d/alicia/Maildir/", moves), "/old/d/alicia/Maildir/")
        self.assertEqual(rewriteTarget("&/old/d/alice", moves), "&/old/d/alice")
        self.assertEqual(rewriteTarget("|cat /old/d/alice", moves), "|cat /old/d/alice")


class TreeTestCase(SynchronousTestCase):
    """A vpopmail tree: example.com (plain), example.net (hashed under 0/),
    example.org (an alias domain of example.com)."""

    def makeTree(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.root = os.path.join(base, "vpopmail")
        self.data = os.path.join(base, "data")
        self.database = os.path.join(self.data, "users.sqlite3")
        com = os.path.join(self.root, "domains", "example.com")
        net = os.path.join(self.root, "domains", "0", "example.net")
        self.com, self.net = com, net
        write(
            os.path.join(com, "vpasswd"),
            f"postmaster:{MD5_PASSWORD}:1:0:Postmaster:{OLD}/example.com/postmaster:NOQUOTA\n"
            f"alice:{SHA512_PASSWORD}:1:2:Alice Liddell:{OLD}/example.com/alice:52428800S:"
            "password\n",
        )
        write(
            os.path.join(com, ".qmail-default"),
            f"{VDELIVERMAIL} {OLD}/example.com/postmaster\n",
        )
        write(os.path.join(com, ".qmail-info"), "&one@example.org\t\n&two@example.org \n")
        write(os.path.join(com, ".qmail-sales:team"), "# the team\n&team@example.org\n")
        write(
            os.path.join(com, ".qmail-list-default"),
            f"|/usr/bin/ezmlm-send '{OLD}/example.com/list'\n",
        )
        write(
            os.path.join(com, ".qmail-copy"),
            f"&boss@example.org\n{OLD}/example.com/alice/Maildir/\n",
        )
        write(os.path.join(com, "vpasswd.cdb"), b"\0cdb")
        makeMaildir(os.path.join(com, "postmaster", "Maildir"))
        alice = os.path.join(com, "alice", "Maildir")
        makeMaildir(alice)
        self.messages = {
            "cur/1000000000.1.host,S=20:2,S": b"Subject: one\n\nbody\n",
            "new/1000000001.2.host,S=21": b"Subject: two\n\nbody2\n",
            ".Sent/cur/1000000002.3.host,S=22:2,S": b"Subject: three\n\nbody3\n",
        }
        for name, content in self.messages.items():
            write(os.path.join(alice, name), content)
        self.plainFiles = {
            "maildirsize": b"52428800S\n61 3\n",
            "courierimapuidlist": b"1 4 1000000000\n",
            ".Sent/maildirfolder": b"",
            ".Sent/dovecot-uidlist": b"3 V1 N2\n",
        }
        for name, content in self.plainFiles.items():
            write(os.path.join(alice, name), content)
        makeMaildir(os.path.join(alice, ".Sent"))
        write(os.path.join(alice, "tmp", "1000000009.9.host"), b"half a message")
        write(
            os.path.join(com, "alice", ".qmail"),
            f"&alice@elsewhere.example\n{OLD}/example.com/alice/Maildir/\n",
        )
        os.symlink(com, os.path.join(self.root, "domains", "example.org"))

        write(
            os.path.join(net, "vpasswd"),
            f"bob:{MD5_SECRET}:1:16:Bob:{OLD}/0/example.net/bob:1MB\n"
            f"carol:{DES_PASSWORD}:1:0:Carol:{net}/carol:5000000S,100C\n",
        )
        write(os.path.join(net, ".qmail-default"), f"{VDELIVERMAIL} bounce-no-mailbox\n")
        makeMaildir(os.path.join(net, "bob", "Maildir"))
        write(os.path.join(net, "bob", "Maildir", "new", "1.1.h"), b"hi bob\n")
        makeMaildir(os.path.join(net, "carol", "Maildir"))

    def runImport(self, dryRun: bool = False, copyMail: bool = True) -> ImportReport:
        store = SQLiteUserStore(self.database)
        try:
            return runImport(store, self.data, self.root, dryRun=dryRun, copyMail=copyMail)
        finally:
            store.close()

    def openStore(self) -> SQLiteUserStore:
        store = SQLiteUserStore(self.database)
        self.addCleanup(store.close)
        return store


class ImportTests(TreeTestCase):
    def setUp(self) -> None:
        self.makeTree()

    def test_scanFindsEverything(self) -> None:
        plan = scanTree(self.root, self.data)
        self.assertEqual(plan.errors, [])
        self.assertEqual([d.domain.name for d in plan.domains], ["example.com", "example.net"])
        self.assertEqual(plan.aliasDomains, [("example.org", "example.com")])
        com, net = plan.domains
        self.assertEqual(com.domain.catchall, CatchAll(CatchAllAction.MAILBOX, "postmaster"))
        self.assertTrue(com.domain.clearPasswords)
        self.assertEqual(net.domain.catchall, CatchAll(CatchAllAction.BOUNCE))
        self.assertFalse(net.domain.clearPasswords)
        self.assertEqual([u.user.name for u in com.users], ["postmaster", "alice"])
        self.assertEqual(
            [a.alias.name for a in com.aliases], ["copy", "info", "list-default", "sales.team"]
        )
        alice = com.users[1]
        self.assertEqual(alice.maildir, os.path.join(self.com, "alice", "Maildir"))
        self.assertEqual(alice.mail.messages, 3)
        self.assertEqual(alice.mail.bytes, sum(len(m) for m in self.messages.values()))
        # the ezmlm list folder stays in the old tree: said so
        self.assertTrue(
            any(".qmail-list-default:1" in w and "old vpopmail tree" in w for w in plan.warnings),
            plan.warnings,
        )

    def test_dryRunWritesNothing(self) -> None:
        report = self.runImport(dryRun=True)
        self.assertTrue(report.ok, report.errors)
        self.assertFalse(os.path.exists(self.data))
        self.assertFalse(os.path.exists(self.database))
        self.assertTrue(report.dryRun)
        self.assertEqual({o.action for o in report.outcomes}, {CREATE})
        names = [(o.kind, o.name) for o in report.outcomes]
        self.assertEqual(
            names,
            [
                ("domain", "example.com"),
                ("alias domain", "example.org -> example.com"),
                ("user", "postmaster@example.com"),
                ("user", "alice@example.com"),
                ("alias", "copy@example.com"),
                ("alias", "info@example.com"),
                ("alias", "list-default@example.com"),
                ("alias", "sales.team@example.com"),
                ("domain", "example.net"),
                ("user", "bob@example.net"),
                ("user", "carol@example.net"),
            ],
        )
        text = "\n".join(report.lines())
        self.assertIn("dry run: nothing written", text)
        self.assertIn("domain example.com: would create (catch-all mailbox postmaster", text)
        self.assertIn("user alice@example.com: would create (quota 52428800S, flags NO_POP", text)
        self.assertIn("mail: 3 messages", text)
        self.assertIn(f"rewrite {self.com}/.qmail-copy:2: {OLD}/example.com/alice/Maildir/", text)
        self.assertIn(
            "would create 2 domains, 1 alias domain, 4 users, 4 aliases; 1 warning; 0 errors", text
        )
        self.assertIsInstance(json.dumps(report.asDict()), str)

    def test_dryRunAgainstExistingDatabaseReportsSkips(self) -> None:
        store = self.openStore()
        store.addDomain(Domain("example.net"))
        store.addUser(User("bob", "example.net"))
        report = self.runImport(dryRun=True)
        actions = {o.name: o.action for o in report.outcomes}
        self.assertEqual(actions["example.net"], SKIP)
        self.assertEqual(actions["bob@example.net"], SKIP)
        self.assertEqual(actions["carol@example.net"], CREATE)
        self.assertIsNone(store.user("carol", "example.net"))
        self.assertFalse(os.path.exists(os.path.join(self.data, "domains")))

    def test_import(self) -> None:
        report = self.runImport()
        self.assertTrue(report.ok, report.errors)
        store = self.openStore()
        self.assertEqual(
            store.domains(),
            [
                Domain(
                    "example.com",
                    CatchAll(CatchAllAction.MAILBOX, "postmaster"),
                    True,
                    ("example.org",),
                ),
                Domain("example.net", CatchAll(CatchAllAction.BOUNCE), False),
            ],
        )
        self.assertEqual(
            store.users("example.com"),
            [
                User(
                    "alice",
                    "example.com",
                    SHA512_PASSWORD,
                    "password",
                    QuotaLimit(52428800, None),
                    UserFlags.NO_POP,
                    "Alice Liddell",
                ),
                User(
                    "postmaster",
                    "example.com",
                    MD5_PASSWORD,
                    None,
                    None,
                    UserFlags(0),
                    "Postmaster",
                ),
            ],
        )
        self.assertEqual(
            store.users("example.net"),
            [
                User(
                    "bob",
                    "example.net",
                    MD5_SECRET,
                    None,
                    QuotaLimit(1 << 20, None),
                    UserFlags.BOUNCE_MAIL,
                    "Bob",
                ),
                User(
                    "carol",
                    "example.net",
                    DES_PASSWORD,
                    None,
                    QuotaLimit(5000000, 100),
                    UserFlags(0),
                    "Carol",
                ),
            ],
        )
        aliceMaildir = os.path.join(self.data, "domains", "example.com", "alice", "Maildir")
        self.assertEqual(
            store.aliases("example.com"),
            [
                Alias("copy", "example.com", ("&boss@example.org", aliceMaildir + "/")),
                Alias("info", "example.com", ("&one@example.org", "&two@example.org")),
                Alias(
                    "list-default",
                    "example.com",
                    (f"|/usr/bin/ezmlm-send '{OLD}/example.com/list'",),
                ),
                Alias("sales.team", "example.com", ("&team@example.org",)),
            ],
        )
        self.assertEqual(
            report.counts()[CREATE], {"domain": 2, "alias domain": 1, "user": 4, "alias": 4}
        )

    def test_mailCopiedExactly(self) -> None:
        report = self.runImport()
        self.assertTrue(report.ok, report.errors)
        source = os.path.join(self.com, "alice", "Maildir")
        target = os.path.join(self.data, "domains", "example.com", "alice", "Maildir")
        for name, content in {**self.messages, **self.plainFiles}.items():
            self.assertEqual(read(os.path.join(target, name)), content, name)
        # messages are linked (same file system here), the rest copied
        for name in self.messages:
            self.assertTrue(
                os.path.samefile(os.path.join(source, name), os.path.join(target, name)), name
            )
        for name in self.plainFiles:
            self.assertFalse(
                os.path.samefile(os.path.join(source, name), os.path.join(target, name)), name
            )
        self.assertEqual(os.listdir(os.path.join(target, "tmp")), [])
        self.assertEqual(sorted(os.listdir(os.path.join(target, ".Sent", "tmp"))), [])
        self.assertEqual(
            read(
                os.path.join(self.data, "domains", "example.net", "bob", "Maildir", "new", "1.1.h")
            ),
            b"hi bob\n",
        )
        for sub in ("cur", "new", "tmp"):
            self.assertTrue(
                os.path.isdir(
                    os.path.join(self.data, "domains", "example.net", "carol", "Maildir", sub)
                )
            )
        [alice] = [m for m in report.mail if m.address == "alice@example.com"]
        self.assertEqual((alice.messages, alice.linked, alice.copied), (3, 3, 4))

    def test_messagesOfAnotherOwnerCopied(self) -> None:
        """A link would keep the old owner: only the data folder owner's files are linked."""
        source = os.path.join(self.com, "alice", "Maildir")
        target = os.path.abspath(self.mktemp())
        copy = copyMaildir(source, target, "alice@example.com", linkOwner=os.getuid() + 1)
        self.assertEqual((copy.messages, copy.linked, copy.copied, copy.present), (3, 0, 7, 0))
        for name, content in self.messages.items():
            self.assertEqual(read(os.path.join(target, name)), content)
            self.assertFalse(
                os.path.samefile(os.path.join(source, name), os.path.join(target, name))
            )
        again = copyMaildir(source, target, "alice@example.com")
        self.assertEqual((again.linked, again.copied, again.present), (0, 0, 7))

    def test_foldersNotGroupWritable(self) -> None:
        old = os.umask(0o002)
        try:
            self.assertTrue(self.runImport().ok)
        finally:
            os.umask(old)
        domain = os.path.join(self.data, "domains", "example.com")
        for folder in [
            domain,
            os.path.join(domain, "alice"),
            os.path.join(domain, "alice", "Maildir"),
        ]:
            self.assertEqual(os.stat(folder).st_mode & 0o777, 0o700, folder)

    def test_userDotQmailCopiedAndRewritten(self) -> None:
        self.runImport()
        folder = os.path.join(self.data, "domains", "example.com", "alice")
        self.assertEqual(
            read(os.path.join(folder, ".qmail")).decode(),
            f"&alice@elsewhere.example\n{folder}/Maildir/\n",
        )
        self.assertEqual(os.stat(os.path.join(folder, ".qmail")).st_mode & 0o777, 0o600)

    def test_noMail(self) -> None:
        report = self.runImport(copyMail=False)
        self.assertTrue(report.ok, report.errors)
        target = os.path.join(self.data, "domains", "example.com", "alice", "Maildir")
        self.assertEqual(sorted(os.listdir(target)), ["cur", "new", "tmp"])
        for sub in ("cur", "new", "tmp"):
            self.assertEqual(os.listdir(os.path.join(target, sub)), [])
        self.assertEqual(report.mail, [])

    def test_rerunSkips(self) -> None:
        self.assertTrue(self.runImport().ok)
        store = self.openStore()
        version = store.version()
        report = self.runImport()
        self.assertTrue(report.ok, report.errors)
        self.assertEqual({o.action for o in report.outcomes}, {SKIP})
        self.assertEqual(len(report.outcomes), 11)
        self.assertEqual(store.version(), version)
        self.assertIn("skipped 2 domains", report.lines()[-1])
        self.assertEqual(report.rewrites, [])  # only for what is imported

    def test_rerunAfterFixingALine(self) -> None:
        """A re-run imports what was missing and leaves the rest alone."""
        vpasswd = os.path.join(self.net, "vpasswd")
        good = read(vpasswd)
        write(vpasswd, good.replace(b"5000000S,100C", b"plenty"))
        first = self.runImport()
        self.assertFalse(first.ok)
        self.assertEqual(len(first.errors), 1)
        self.assertIn(f"{vpasswd}:2:", first.errors[0])
        self.assertIn("not a quota", first.errors[0])
        write(vpasswd, good)
        second = self.runImport()
        self.assertTrue(second.ok, second.errors)
        created = [o.name for o in second.outcomes if o.action == CREATE]
        self.assertEqual(created, ["carol@example.net"])

    def test_malformedVpasswdLine(self) -> None:
        vpasswd = os.path.join(self.com, "vpasswd")
        write(vpasswd, read(vpasswd) + b"\nbroken line without colons\ndave:x:1:zz::/d:NOQUOTA\n")
        report = self.runImport()
        self.assertFalse(report.ok)
        self.assertEqual(len(report.errors), 2)
        self.assertTrue(report.errors[0].startswith(f"{vpasswd}:4: "), report.errors)
        self.assertTrue(report.errors[1].startswith(f"{vpasswd}:5: "), report.errors)
        self.assertIn(f"error: {vpasswd}:4: ", "\n".join(report.lines()))
        store = self.openStore()
        self.assertEqual([u.name for u in store.users("example.com")], ["alice", "postmaster"])
        self.assertFalse(report.asDict()["ok"])

    def test_otherDotQmailDefault(self) -> None:
        write(os.path.join(self.net, ".qmail-default"), "&catchall@example.org\n")
        report = self.runImport()
        self.assertTrue(report.ok, report.errors)
        [warning] = [w for w in report.warnings if ".qmail-default" in w]
        self.assertIn("not a vdelivermail line (&catchall@example.org)", warning)
        self.assertIn("unknown users of example.net will bounce", warning)
        store = self.openStore()
        domain = store.domain("example.net")
        assert domain is not None
        self.assertEqual(domain.catchall, CatchAll(CatchAllAction.BOUNCE))

    def test_catchAllForwardAndDelete(self) -> None:
        write(os.path.join(self.net, ".qmail-default"), f"{VDELIVERMAIL} boss@example.org\n")
        write(os.path.join(self.com, ".qmail-default"), f"{VDELIVERMAIL} delete\n")
        self.assertTrue(self.runImport().ok)
        store = self.openStore()
        com, net = store.domains()
        self.assertEqual(com.catchall, CatchAll(CatchAllAction.DELETE))
        self.assertEqual(net.catchall, CatchAll(CatchAllAction.FORWARD, "boss@example.org"))

    def test_catchAllPathElsewhere(self) -> None:
        """A path to a mailbox of another domain, or to no mailbox: bounce, with a warning."""
        write(
            os.path.join(self.net, ".qmail-default"),
            f"{VDELIVERMAIL} {OLD}/example.com/alice\n",
        )
        write(os.path.join(self.com, ".qmail-default"), f"{VDELIVERMAIL} /var/spool/catch\n")
        report = self.runImport()
        self.assertTrue(report.ok, report.errors)
        store = self.openStore()
        self.assertEqual(
            [d.catchall for d in store.domains()], [CatchAll(CatchAllAction.BOUNCE)] * 2
        )
        text = "\n".join(report.warnings)
        self.assertIn("a mailbox of another domain", text)
        self.assertIn("no user folder of example.com", text)

    def test_catchAllRelativeMaildir(self) -> None:
        write(os.path.join(self.net, ".qmail-default"), f"{VDELIVERMAIL} ./carol/Maildir/\n")
        self.assertTrue(self.runImport().ok)
        domain = self.openStore().domain("example.net")
        assert domain is not None
        self.assertEqual(domain.catchall, CatchAll(CatchAllAction.MAILBOX, "carol"))

    def test_aliasNamedLikeAUserKeptAsFile(self) -> None:
        """qmail-local read .qmail-alice before vdelivermail: the file is kept."""
        write(os.path.join(self.com, ".qmail-alice"), f"{OLD}/example.com/postmaster/Maildir/\n")
        report = self.runImport()
        self.assertTrue(report.ok, report.errors)
        kept = os.path.join(self.data, "domains", "example.com", ".qmail-alice")
        self.assertEqual(
            read(kept).decode(),
            os.path.join(self.data, "domains", "example.com", "postmaster", "Maildir") + "/\n",
        )
        self.assertIsNone(self.openStore().alias("alice", "example.com"))
        again = self.runImport()
        self.assertTrue(again.ok, again.errors)
        self.assertIn(("file", kept, SKIP), [(o.kind, o.name, o.action) for o in again.outcomes])

    def test_existingThingsNeverChanged(self) -> None:
        store = self.openStore()
        store.addDomain(Domain("example.com", CatchAll(CatchAllAction.DELETE)))
        store.addUser(User("alice", "example.com", "$scrypt$keep"))
        store.addAlias(Alias("postmaster", "example.com", ("&pm@example.org",)))
        report = self.runImport()
        self.assertFalse(report.ok)
        actions = {o.name: o.action for o in report.outcomes}
        self.assertEqual(actions["example.com"], SKIP)
        self.assertEqual(actions["alice@example.com"], SKIP)
        self.assertEqual(actions["postmaster@example.com"], FAIL)
        self.assertEqual(actions["info@example.com"], CREATE)
        self.assertEqual(len(report.errors), 1)
        self.assertIn("postmaster@example.com is an alias already", report.errors[0])
        self.assertTrue(any("catch-all delete" in w for w in report.warnings), report.warnings)
        self.assertTrue(any("clear passwords are dropped" in w for w in report.warnings))
        domain = store.domain("example.com")
        assert domain is not None
        self.assertEqual(domain.catchall, CatchAll(CatchAllAction.DELETE))
        self.assertFalse(domain.clearPasswords)
        alice = store.user("alice", "example.com")
        assert alice is not None
        self.assertEqual(alice.passwordHash, "$scrypt$keep")
        # not copied for a user that was there already
        self.assertFalse(os.path.exists(os.path.join(self.data, "domains", "example.com", "alice")))

    def test_domainsFolderAsRoot(self) -> None:
        report = runImport(
            SQLiteUserStore(self.database),
            self.data,
            os.path.join(self.root, "domains"),
            dryRun=True,
            copyMail=True,
        )
        self.assertTrue(report.ok, report.errors)
        self.assertEqual(len([o for o in report.outcomes if o.kind == "domain"]), 2)

    def test_notATree(self) -> None:
        empty = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(empty, "domains"))
        report = runImport(SQLiteUserStore(self.database), self.data, empty, True, True)
        self.assertFalse(report.ok)
        self.assertIn("no domain folder", report.errors[0])
        report = runImport(SQLiteUserStore(self.database), self.data, empty + "/nope", True, True)
        self.assertFalse(report.ok)

    def test_importedPasswordsVerify(self) -> None:
        try:
            from qmailtx.vdomain.passwords import verifyPassword
        except ImportError:  # pragma: no cover
            raise self.skipTest("qmailtx.vdomain.passwords is not there") from None
        self.assertTrue(self.runImport().ok)
        store = self.openStore()
        expected = {
            ("postmaster", "example.com"): "password",
            ("alice", "example.com"): "password",
            ("bob", "example.net"): "Secret!23",
            ("carol", "example.net"): "password",
        }
        for (name, domain), secret in expected.items():
            user = store.user(name, domain)
            assert user is not None
            self.assertTrue(verifyPassword(secret, user.passwordHash), name)
            self.assertFalse(verifyPassword("wrong", user.passwordHash), name)


class CommandLineTests(TreeTestCase):
    """``qmailctl import-vpopmail``, run as the installed console script."""

    def setUp(self) -> None:
        self.script = os.path.join(os.path.dirname(sys.executable), "qmailctl")
        if not os.path.exists(self.script):
            raise self.skipTest("the qmailctl console script is not installed")
        self.makeTree()
        self.config = os.path.abspath(self.mktemp())
        write(self.config, f'[paths]\ndata = "{self.data}"\n')

    def qmailctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.script, "--config", self.config, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def test_dryRunThenImport(self) -> None:
        dry = self.qmailctl("import-vpopmail", self.root, "--dry-run")
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn("user alice@example.com: would create", dry.stdout)
        self.assertFalse(os.path.exists(self.data))
        done = self.qmailctl("import-vpopmail", self.root)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("user alice@example.com: created", done.stdout)
        store = self.openStore()
        self.assertEqual(len(store.users("example.com")), 2)
        again = self.qmailctl("--json", "import-vpopmail", self.root)
        self.assertEqual(again.returncode, 0, again.stderr)
        result = json.loads(again.stdout)
        self.assertTrue(result["ok"])
        self.assertEqual({item["action"] for item in result["items"]}, {SKIP})

    def test_json(self) -> None:
        result = self.qmailctl("--json", "import-vpopmail", self.root, "--dry-run", "--no-mail")
        self.assertEqual(result.returncode, 0, result.stderr)
        value = json.loads(result.stdout)
        self.assertEqual((value["ok"], value["dryRun"], value["copyMail"]), (True, True, False))
        self.assertEqual(value["counts"]["create"]["user"], 4)
        self.assertEqual(value["errors"], [])
        self.assertEqual(value["rewrites"][0]["line"], 2)

    def test_errorsGiveExitCodeOne(self) -> None:
        vpasswd = os.path.join(self.net, "vpasswd")
        write(vpasswd, read(vpasswd) + b"oops\n")
        result = self.qmailctl("--json", "import-vpopmail", self.root)
        self.assertEqual(result.returncode, 1, result.stderr)
        value = json.loads(result.stdout)
        self.assertFalse(value["ok"])
        self.assertEqual(len(value["errors"]), 1)
        self.assertIn(f"{vpasswd}:3:", value["errors"][0])
