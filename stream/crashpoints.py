"""A test hook: the stream worker SIGKILLs itself at a chosen point of its commit cycle.

FRESHET_STREAM_TEST_CRASH_AT=<point>:<n> kills the worker (a real SIGKILL, no clean-up runs) the
n-th time it passes <point>; the chaos tests use it to prove that no point loses or
doubles anything. Unset (the default), `reached` is a no-op. Never set it in production.
"""

from __future__ import annotations

import logging
import os
import signal

from freshet.settings import SettingsError

log = logging.getLogger("freshet.stream")

# In the order one micro-batch's effects and one commit pass them.
POINTS = {
    "redis-written": "a micro-batch's rows are in Redis, not yet on disk nor checkpointed",
    "offline-written": "a commit wrote the Parquet parts, no changelog record sent yet",
    "changelog-partial": "a commit's changelog records are durable for one partition only",
    "changelog-flushed": "a commit's changelog records are durable, its offsets not yet committed",
    "committed": "a commit's offsets are committed",
}


class CrashPoints:
    """Counts the passes of one armed point and kills the process on the n-th.

    >>> CrashPoints("").armed("committed"), CrashPoints("committed:1").armed("committed")
    (False, True)
    >>> CrashPoints("nowhere:1")
    Traceback (most recent call last):
    ...
    freshet.settings.SettingsError: FRESHET_STREAM_TEST_CRASH_AT names no crash point 'nowhere'; known: changelog-flushed, changelog-partial, committed, offline-written, redis-written
    """

    def __init__(self, spec: str):
        self.point, self.at, self.passes = "", 0, 0
        if not spec:
            return
        point, _, n = spec.rpartition(":")
        if point not in POINTS:
            raise SettingsError(f"FRESHET_STREAM_TEST_CRASH_AT names no crash point {point or spec!r}; "
                                f"known: {', '.join(sorted(POINTS))}")
        if not n.isdigit() or int(n) < 1:
            raise SettingsError(f"FRESHET_STREAM_TEST_CRASH_AT={spec!r}: the count after ':' must be a positive integer")
        self.point, self.at = point, int(n)
        log.warning("test hook FRESHET_STREAM_TEST_CRASH_AT=%s: this worker SIGKILLs itself when %s (pass %d)",
                    spec, POINTS[point], self.at)

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
