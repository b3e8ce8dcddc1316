"""The stream worker's crash points (freshet.crashpoints): where one micro-batch and one commit can die.

FRESHET_STREAM_TEST_CRASH_AT=<point>:<n> kills the worker the n-th time it passes <point>; the
chaos tests use it to prove that no point loses or doubles anything.

>>> stream_crash_points("nowhere:1")
Traceback (most recent call last):
...
freshet.settings.SettingsError: FRESHET_STREAM_TEST_CRASH_AT names no crash point 'nowhere'; known: changelog-flushed, changelog-partial, committed, offline-written, redis-written
"""

from __future__ import annotations

from freshet.crashpoints import CrashPoints

# In the order one micro-batch's effects and one commit pass them.
POINTS = {
    "redis-written": "a micro-batch's rows are in Redis, not yet on disk nor checkpointed",
    "offline-written": "a commit wrote the Parquet parts, no changelog record sent yet",
    "changelog-partial": "a commit's changelog records are durable for one partition only",
    "changelog-flushed": "a commit's changelog records are durable, its offsets not yet committed",
    "committed": "a commit's offsets are committed",
}


def stream_crash_points(spec: str) -> CrashPoints:
    return CrashPoints(spec, POINTS, "FRESHET_STREAM_TEST_CRASH_AT")
