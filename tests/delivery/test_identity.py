"""program_user: resolving it, judging folders for it, and when it applies."""

from __future__ import annotations

import os
import pwd
import stat

from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from qmailtx.delivery.identity import (
    ProgramUser,
    ProgramUserError,
    programIdentity,
    resolveProgramUser,
)
from qmailtx.service import ProgramIdentityLog

USER = ProgramUser("u", 1001, 2001, frozenset({2001, 3001}))


def _folder(uid: int, gid: int, mode: int) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, gid, 0, 0, 0, 0))


class ResolveTests(SynchronousTestCase):
    def test_nameGivesItsUidGidAndGroups(self) -> None:
        nobody = pwd.getpwnam("nobody")
        user = resolveProgramUser("nobody")
        self.assertEqual((user.uid, user.gid), (nobody.pw_uid, nobody.pw_gid))
        self.assertIn(nobody.pw_gid, user.groups)
        self.assertEqual(user.describe(), f"nobody (uid {nobody.pw_uid}, gid {nobody.pw_gid})")

    def test_rootIsRefused(self) -> None:
        for text in ("root", "0:0"):
            with self.assertRaises(ProgramUserError) as caught:
                resolveProgramUser(text)
            self.assertIn("qmail never runs deliveries as root", str(caught.exception))

    def test_unknownNameIsRefused(self) -> None:
        with self.assertRaises(ProgramUserError) as caught:
            resolveProgramUser("no-such-user-qmailtx")
        self.assertEqual(str(caught.exception), "unknown user 'no-such-user-qmailtx'")


class CanEnterTests(SynchronousTestCase):
    def test_ownerGroupAndOtherBits(self) -> None:
        self.assertTrue(USER.canEnter(_folder(1001, 0, 0o700)))
        self.assertFalse(USER.canEnter(_folder(1001, 3001, 0o070)))  # owner bits decide
        self.assertTrue(USER.canEnter(_folder(0, 3001, 0o710)))  # a supplementary group
        self.assertFalse(USER.canEnter(_folder(0, 3001, 0o701)))
        self.assertTrue(USER.canEnter(_folder(0, 0, 0o701)))
        self.assertFalse(USER.canEnter(_folder(0, 0, 0o770)))


class WhenItAppliesTests(SynchronousTestCase):
    def test_onlyWhileRoot(self) -> None:
        self.assertIs(programIdentity(USER, lambda: 0), USER)
        self.assertIsNone(programIdentity(USER, lambda: 1000))
        self.assertIsNone(programIdentity(None, lambda: 1000))

    def test_rootWithoutAUserIsRefused(self) -> None:
        with self.assertRaises(ProgramUserError):
            programIdentity(None, lambda: 0)


class StartUpLogTests(SynchronousTestCase):
    def test_saysOnceWhoProgramsRunAs(self) -> None:
        service = ProgramIdentityLog(USER)
        with capturedLogs() as events:
            service.startService()
        [event] = events
        if os.geteuid() == 0:
            self.assertEqual(event["user"], "u (uid 1001, gid 2001)")
        else:
            self.assertEqual((event["uid"], event["gid"]), (os.geteuid(), os.getegid()))
            self.assertNotIn("user", event)
