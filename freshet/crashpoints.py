"""A test hook: a process SIGKILLs itself at a chosen point of its work.

A component names its points (what has happened, what not yet, when the point is passed) and
the setting that arms one, `<point>:<n>`: the n-th pass of <point> kills the process with a real
SIGKILL (no clean-up runs). The crash tests use it to prove that a kill at each point loses and
doubles nothing, at the moment that matters rather than when a test's poll happens to look.
Unset (the default), `reached` is a no-op. Never set it in production.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping

from freshet.settings import SettingsError

log = logging.getLogger("freshet")


class CrashPoints:
    """Counts the passes of one armed point and kills the process on the n-th.

    >>> points = {"saved": "the state is saved"}
    >>> CrashPoints("", points, "X").armed("saved"), CrashPoints("saved:1", points, "X").armed("saved")
    (False, True)
    >>> CrashPoints("nowhere:1", points, "FRESHET_X_TEST_CRASH_AT")
    Traceback (most recent call last):
    ...
    freshet.settings.SettingsError: FRESHET_X_TEST_CRASH_AT names no crash point 'nowhere'; known: saved
    """

    def __init__(self, spec: str, points: Mapping[str, str], setting: str):
        self.point, self.at, self.passes = "", 0, 0
        if not spec:
            return
        point, _, n = spec.rpartition(":")
        if point not in points:
            raise SettingsError(f"{setting} names no crash point {point or spec!r}; known: {', '.join(sorted(points))}")
        if not n.isdigit() or int(n) < 1:
            raise SettingsError(f"{setting}={spec!r}: the count after ':' must be a positive integer")
        self.point, self.at = point, int(n)
        log.warning("test hook %s=%s: this process SIGKILLs itself when %s (pass %d)", setting, spec, points[point],
                    self.at)

    def armed(self, point: str) -> bool:
        """True when the next pass of `point` may be the fatal one (to make it meaningful first)."""
        return point == self.point and self.passes + 1 == self.at

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.passes += 1
        if self.passes == self.at:
            log.warning("test hook: SIGKILL at %s (pass %d)", point, self.passes)
            for handler in logging.getLogger().handlers + log.handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
