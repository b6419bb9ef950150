""".qmail parsing, lookup and the program environment (qmail-local's rules)."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from qmailtx.delivery.dotqmail import (
    BLANK_FIRST_LINE,
    DOTQMAIL_NUL,
    DOTQMAIL_WRITABLE,
    FILE_IN_FORWARD_ONLY,
    HOME_STICKY,
    HOME_WRITABLE,
    PROGRAM_IN_FORWARD_ONLY,
    DotQmailError,
    Forward,
    MaildirLine,
    MboxLine,
    Program,
    checkHomeDirectory,
    dtLine,
    findDotQmail,
    ownerSender,
    parseDotQmail,
    qmailEnvironment,
    quoteAddress,
    readDotQmail,
    rpLine,
    safeExtension,
    ufLine,
)
from qmailtx.delivery.interfaces import Outcome


class ParseTests(SynchronousTestCase):
    def assertFails(self, text: str, message: str, forwardOnly: bool = False) -> None:
        error = self.assertRaises(DotQmailError, parseDotQmail, text, forwardOnly)
        self.assertEqual(error.text, message)
        self.assertTrue(error.temporary)

    def test_lineTypes(self) -> None:
        text = (
            "# a comment\n"
            "|preline /usr/bin/vacation djb\n"
            "&me@new.example\n"
            "you@old.example\n"
            "9lives@cat.example\n"
            "./Maildir/\n"
            "/var/mail/djb\n"
            ".mbox\n"
        )
        self.assertEqual(
            parseDotQmail(text),
            [
                Program("preline /usr/bin/vacation djb"),
                Forward("me@new.example"),
                Forward("you@old.example"),
                Forward("9lives@cat.example"),
                MaildirLine("./Maildir/"),
                MboxLine("/var/mail/djb"),
                MboxLine(".mbox"),
            ],
        )

    def test_tabsAndSpacesAtTheEndAreStripped(self) -> None:
        # P22 test 1 and 2
        self.assertEqual(parseDotQmail("./Maildir/\t\t\n"), [MaildirLine("./Maildir/")])
        self.assertEqual(parseDotQmail("&fwd@example.com \t\n"), [Forward("fwd@example.com")])
        self.assertEqual(parseDotQmail("./Mailbox \t \t\n"), [MboxLine("./Mailbox")])

    def test_blankFirstLineIsTemporary(self) -> None:
        self.assertFails("\t\t\n./Maildir/\n", BLANK_FIRST_LINE)
        self.assertFails(" \n./Maildir/\n", BLANK_FIRST_LINE)
        self.assertFails("\n./Maildir/\n", BLANK_FIRST_LINE)

    def test_emptyTextIsABlankFirstLine(self) -> None:
        self.assertFails("", BLANK_FIRST_LINE)

    def test_laterBlankLinesAreSkipped(self) -> None:
        text = "./Maildir/\n\n\t\t\n   \n&a@b.example\n"
        self.assertEqual(parseDotQmail(text), [MaildirLine("./Maildir/"), Forward("a@b.example")])

    def test_lastLineWithoutNewline(self) -> None:
        self.assertEqual(parseDotQmail("#x\n|true"), [Program("true")])

    def test_programTextIsVerbatim(self) -> None:
        self.assertEqual(
            parseDotQmail("| preline  '$x' ; exit 99 \n"),
            [Program(" preline  '$x' ; exit 99")],
        )

    def test_unknownFirstCharactersForward(self) -> None:
        # qmail-local's default case: anything not # . / | + & is a forward
        text = '"quoted"@x.example\n-dash@x.example\n ./leadingspace\n'
        self.assertEqual(
            parseDotQmail(text),
            [Forward('"quoted"@x.example'), Forward("-dash@x.example"), Forward(" ./leadingspace")],
        )

    def test_forwardAddressIsNotChecked(self) -> None:
        self.assertEqual(
            parseDotQmail("& me@x.example\n&\n"), [Forward(" me@x.example"), Forward("")]
        )

    def test_forwardOnlyRefusesFilesAndPrograms(self) -> None:
        self.assertEqual(
            parseDotQmail("# list\n&a@x.example\nb@x.example\n", forwardOnly=True),
            [Forward("a@x.example"), Forward("b@x.example")],
        )
        self.assertFails("&a@x.example\n./Maildir/\n", FILE_IN_FORWARD_ONLY, True)
        self.assertFails("/var/mail/x\n", FILE_IN_FORWARD_ONLY, True)
        self.assertFails("&a@x.example\n|true\n", PROGRAM_IN_FORWARD_ONLY, True)

    def test_plusListMakesLaterLinesForwardOnly(self) -> None:
        self.assertEqual(
            parseDotQmail("|true\n+list\n&a@x.example\n"),
            [Program("true"), Forward("a@x.example")],
        )
        self.assertFails("./Maildir/\n+list\n./Maildir/\n", FILE_IN_FORWARD_ONLY)

    def test_otherPlusLinesAreIgnored(self) -> None:
        self.assertEqual(parseDotQmail("+lists\n+\n|true\n"), [Program("true")])

    def test_nulIsRefused(self) -> None:
        self.assertFails("./Maildir/\0\n", DOTQMAIL_NUL)

    def test_errorAsResult(self) -> None:
        result = DotQmailError(BLANK_FIRST_LINE).asResult()
        self.assertEqual((result.outcome, result.text), (Outcome.TEMPORARY, BLANK_FIRST_LINE))
        result = DotQmailError("no", temporary=False).asResult()
        self.assertEqual(result.outcome, Outcome.PERMANENT)


class FindTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)

    def make(self, name: str, text: str = "./Maildir/\n") -> str:
        path = os.path.join(self.folder, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        return path

    def test_safeExtension(self) -> None:
        self.assertEqual(safeExtension("Foo.Bar-BAZ"), "foo:bar-baz")

    def test_exactNameLowerCasedWithColons(self) -> None:
        path = self.make(".qmail-foo:bar")
        self.assertEqual(findDotQmail(self.folder, "Foo.Bar"), (path, None))

    def test_prefixDefaultsFromTheLongest(self) -> None:
        ab = self.make(".qmail-a-b-default")
        a = self.make(".qmail-a-default")
        self.make(".qmail-default")
        self.assertEqual(findDotQmail(self.folder, "a-b-C.d"), (ab, "C.d"))
        self.assertEqual(findDotQmail(self.folder, "A-x-y"), (a, "x-y"))

    def test_defaultKeepsTheWholeExtension(self) -> None:
        path = self.make(".qmail-default")
        self.assertEqual(findDotQmail(self.folder, "Joe.Smith"), (path, "Joe.Smith"))
        self.assertEqual(findDotQmail(self.folder, ""), (path, ""))

    def test_trailingDashTriesItsOwnDefault(self) -> None:
        path = self.make(".qmail-a-default")
        self.assertEqual(findDotQmail(self.folder, "a-"), (path, ""))

    def test_exactDefaultNameSetsDefaultToDefault(self) -> None:
        # qmail-local's quirk: DEFAULT is the literal "default"
        path = self.make(".qmail-list-default")
        self.assertEqual(findDotQmail(self.folder, "list-default"), (path, "default"))

    def test_nothingFound(self) -> None:
        self.make(".qmail-other")
        self.assertIsNone(findDotQmail(self.folder, "joe"))

    def test_bareUserIsDotQmailOnly(self) -> None:
        self.make(".qmail-default")
        self.assertIsNone(findDotQmail(self.folder, "", dash=""))
        path = self.make(".qmail")
        self.assertEqual(findDotQmail(self.folder, "", dash=""), (path, None))

    def test_onlyRegularFilesCount(self) -> None:
        os.mkdir(os.path.join(self.folder, ".qmail-joe"))
        path = self.make(".qmail-default")
        self.assertEqual(findDotQmail(self.folder, "joe"), (path, "joe"))

    def test_symlinkIsFollowed(self) -> None:
        target = self.make("real")
        os.symlink(os.path.abspath(target), os.path.join(self.folder, ".qmail-joe"))
        self.assertEqual(
            findDotQmail(self.folder, "joe"), (os.path.join(self.folder, ".qmail-joe"), None)
        )

    def test_slashNeverLeavesTheFolder(self) -> None:
        os.makedirs(os.path.join(self.folder, ".qmail-x"))
        with open(os.path.join(self.folder, "escape"), "w") as f:
            f.write("./Maildir/\n")
        path = self.make(".qmail-default")
        self.assertEqual(findDotQmail(self.folder, "x/../../escape"), (path, "x/../../escape"))
        os.unlink(path)
        self.assertIsNone(findDotQmail(self.folder, "x/../../escape"))

    def test_nulInExtensionIsNoName(self) -> None:
        path = self.make(".qmail-default")
        self.assertEqual(findDotQmail(self.folder, "a\0b"), (path, "a\0b"))

    def test_unreadableFolderIsTemporary(self) -> None:
        if os.geteuid() == 0:
            raise self.skipTest("root ignores permissions")
        self.make(".qmail-default")
        os.chmod(self.folder, 0o000)
        self.addCleanup(os.chmod, self.folder, 0o700)
        error = self.assertRaises(DotQmailError, findDotQmail, self.folder, "joe")
        self.assertTrue(error.temporary)
        self.assertIn("(#4.3.0)", error.text)


class ReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)

    def make(self, data: bytes, mode: int = 0o600) -> str:
        path = os.path.join(self.folder, ".qmail")
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def test_reads(self) -> None:
        path = self.make(b"./Maildir/\n&a@x.example\n")
        self.assertEqual(readDotQmail(path), [MaildirLine("./Maildir/"), Forward("a@x.example")])

    def test_groupOrWorldWritableIsRefused(self) -> None:
        for mode in (0o620, 0o602):
            path = self.make(b"./Maildir/\n", mode)
            error = self.assertRaises(DotQmailError, readDotQmail, path)
            self.assertEqual((error.text, error.temporary), (DOTQMAIL_WRITABLE, True))

    def test_executeBitMeansForwardOnly(self) -> None:
        path = self.make(b"&a@x.example\n", 0o700)
        self.assertEqual(readDotQmail(path), [Forward("a@x.example")])
        path = self.make(b"&a@x.example\n|true\n", 0o700)
        error = self.assertRaises(DotQmailError, readDotQmail, path)
        self.assertEqual(error.text, PROGRAM_IN_FORWARD_ONLY)

    def test_emptyFileMeansDefaultDelivery(self) -> None:
        path = self.make(b"", 0o700)  # the x bit does not apply to the default
        self.assertEqual(readDotQmail(path, "./Maildir/"), [MaildirLine("./Maildir/")])
        error = self.assertRaises(DotQmailError, readDotQmail, path)
        self.assertEqual(error.text, BLANK_FIRST_LINE)

    def test_commentsOnlyDeliverNothing(self) -> None:
        path = self.make(b"# discard\n")
        self.assertEqual(readDotQmail(path, "./Maildir/"), [])

    def test_bytesSurviveDecoding(self) -> None:
        path = self.make(b"/home/\xff\xfe/mbox\n|echo \xe9\n")
        mbox, program = readDotQmail(path)
        assert isinstance(mbox, MboxLine) and isinstance(program, Program)
        self.assertEqual(os.fsencode(mbox.path), b"/home/\xff\xfe/mbox")
        self.assertEqual(os.fsencode(program.command), b"echo \xe9")

    def test_missingFileIsTemporary(self) -> None:
        error = self.assertRaises(DotQmailError, readDotQmail, os.path.join(self.folder, "nope"))
        self.assertTrue(error.temporary)
        self.assertIn("Unable to open", error.text)


class HomeAndOwnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = self.mktemp()
        os.makedirs(self.folder)
        os.chmod(self.folder, 0o755)  # noqa: S103

    def touch(self, name: str) -> None:
        open(os.path.join(self.folder, name), "w").close()

    def test_home(self) -> None:
        checkHomeDirectory(self.folder)
        os.chmod(self.folder, 0o775)  # noqa: S103
        self.assertEqual(
            self.assertRaises(DotQmailError, checkHomeDirectory, self.folder).text, HOME_WRITABLE
        )
        os.chmod(self.folder, 0o1755)  # noqa: S103
        self.assertEqual(
            self.assertRaises(DotQmailError, checkHomeDirectory, self.folder).text, HOME_STICKY
        )
        checkHomeDirectory(self.folder, editingIsFatal=False)

    def test_ownerSender(self) -> None:
        args = (self.folder, "-", "List")
        self.assertEqual(ownerSender(*args, "a@b.example", "joe-list", "x.example"), "a@b.example")
        self.touch(".qmail-list-owner")
        self.assertEqual(
            ownerSender(*args, "a@b.example", "joe-list", "x.example"), "joe-list-owner@x.example"
        )
        self.touch(".qmail-list-owner-default")
        self.assertEqual(
            ownerSender(*args, "a@b.example", "joe-list", "x.example"),
            "joe-list-owner-@x.example-@[]",
        )

    def test_bouncesKeepTheirSender(self) -> None:
        self.touch(".qmail-list-owner")
        for sender in ("", "#@[]"):
            self.assertEqual(
                ownerSender(self.folder, "-", "list", sender, "l", "x.example"), sender
            )


class EnvironmentTests(SynchronousTestCase):
    def test_quoting(self) -> None:
        self.assertEqual(quoteAddress(""), "")
        self.assertEqual(quoteAddress("a.b+c@x.example"), "a.b+c@x.example")
        self.assertEqual(quoteAddress("a b@x.example"), '"a b"@x.example')
        self.assertEqual(quoteAddress(".a@x.example"), '".a"@x.example')
        self.assertEqual(quoteAddress("a..b@x.example"), '"a..b"@x.example')
        self.assertEqual(quoteAddress('a"b\\c@d@x.example'), '"a\\"b\\\\c@d"@x.example')
        self.assertEqual(quoteAddress("local"), "local")

    def test_lines(self) -> None:
        self.assertEqual(rpLine(""), "Return-Path: <>\n")
        self.assertEqual(rpLine("a b@x.example"), 'Return-Path: <"a b"@x.example>\n')
        self.assertEqual(
            dtLine("x.example-joe@x.example"), "Delivered-To: x.example-joe@x.example\n"
        )
        self.assertEqual(dtLine("a\nb@x"), "Delivered-To: a_b@x\n")

    def test_ufLineIsUTC(self) -> None:
        self.assertEqual(
            ufLine("a b\t@x.example", 0), "From a-b-@x.example Thu Jan 01 00:00:00 1970\n"
        )
        self.assertEqual(ufLine("", 1719835200.5), "From MAILER-DAEMON Mon Jul 01 12:00:00 2024\n")

    def test_environment(self) -> None:
        env = qmailEnvironment(
            user="vpopmail",
            home="/home/vpopmail/domains/mail.example.co.uk",
            local="mail.example.co.uk-joe-list-x-y",
            host="mail.example.co.uk",
            ext="joe-list-x-y",
            sender="a@b.example",
            when=0,
            newSender="joe-owner@mail.example.co.uk",
            default="list-x-y",
        )
        self.assertEqual(
            env,
            {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "USER": "vpopmail",
                "HOME": "/home/vpopmail/domains/mail.example.co.uk",
                "LOCAL": "mail.example.co.uk-joe-list-x-y",
                "HOST": "mail.example.co.uk",
                "HOST2": "mail.example.co",
                "HOST3": "mail.example",
                "HOST4": "mail",
                "RECIPIENT": "mail.example.co.uk-joe-list-x-y@mail.example.co.uk",
                "SENDER": "a@b.example",
                "NEWSENDER": "joe-owner@mail.example.co.uk",
                "EXT": "joe-list-x-y",
                "EXT2": "list-x-y",
                "EXT3": "x-y",
                "EXT4": "y",
                "DEFAULT": "list-x-y",
                "DTLINE": "Delivered-To: mail.example.co.uk-joe-list-x-y@mail.example.co.uk\n",
                "RPLINE": "Return-Path: <a@b.example>\n",
                "UFLINE": "From a@b.example Thu Jan 01 00:00:00 1970\n",
            },
        )

    def test_shortNamesAndDefaults(self) -> None:
        env = qmailEnvironment(
            user="joe", home="/home/joe", local="joe", host="localhost", ext="",
            sender="", recipient="joe@localhost", when=0,
        )  # fmt: skip
        self.assertNotIn("DEFAULT", env)
        self.assertEqual(env["NEWSENDER"], "")
        self.assertEqual([env[k] for k in ("EXT", "EXT2", "EXT3", "EXT4")], ["", "", "", ""])
        self.assertEqual([env[k] for k in ("HOST2", "HOST3", "HOST4")], ["localhost"] * 3)
        self.assertEqual(env["UFLINE"], "From MAILER-DAEMON Thu Jan 01 00:00:00 1970\n")
        env = qmailEnvironment(
            user="joe", home="/", local="joe-a", host="a.b", ext="a", sender="s@x", when=0,
        )  # fmt: skip
        self.assertEqual((env["EXT2"], env["HOST2"], env["HOST3"]), ("", "a", "a"))
        self.assertEqual(env["RECIPIENT"], "joe-a@a.b")
