"""qmail-send's retry schedule as a pure function.

next = birth + (floor(sqrt(now - birth)) + chanskip)^2, chanskip 10 for the
local channel and 20 for the remote one: remote attempts at about 0, 400,
1600, 3600, 6400 s..., local ones at 0, 100, 400, 900 s... After
``queuelifetime`` one last attempt is made; a temporary failure then becomes
permanent. The last attempt is brought forward to the lifetime itself rather
than waiting for the next step of the schedule.
"""

from __future__ import annotations

import math

CHANSKIP = {"local": 10, "remote": 20}
GIVE_UP = "I'm not going to try again; this message has been in the queue too long."


def nextRetry(birth: float, now: float, channel: str, lifetime: float) -> float:
    age = max(now - birth, 0.0)
    step = (math.floor(math.sqrt(age)) + CHANSKIP[channel]) ** 2
    following = birth + step
    deadline = birth + lifetime
    if now < deadline < following:
        return deadline
    return max(following, now)


def isFinalAttempt(birth: float, now: float, lifetime: float) -> bool:
    return now - birth >= lifetime
