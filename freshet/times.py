"""Time conversions every stage shares: whatever a producer or a file calls a time, in
epoch seconds (UTC), and epoch seconds back to ISO-8601 for people.

Producers send epoch seconds, epoch milliseconds or ISO-8601 text; files hold Arrow or
pandas timestamps. One set of rules reads them all, so the stream, the backfill and the
retrainer cannot disagree about when an event happened.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

# 1e11 seconds is the year 5138: a larger epoch number is milliseconds.
MILLIS_ABOVE = 1e11


def to_epoch(value: Any) -> float:
    """Epoch seconds from a number (milliseconds recognised by size), ISO-8601 text or a datetime.

    Naive ISO text and naive datetimes are UTC. Raises TypeError for other types (bool
    included) and ValueError for text that is not ISO-8601.

    >>> to_epoch(1_700_000_000), to_epoch(1_700_000_000_500), to_epoch("2023-11-14T22:13:20Z")
    (1700000000.0, 1700000000.5, 1700000000.0)
    >>> to_epoch(True)
    Traceback (most recent call last):
    ...
    TypeError: bool is not a time
    """
    kind = type(value)
    if kind is float or kind is int or (kind is not bool and isinstance(value, (int, float))):
        return value / 1000.0 if value > MILLIS_ABOVE else float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, datetime):  # pandas' Timestamp is one too
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    raise TypeError(f"{kind.__name__} is not a time")


def epoch_or_none(value: Any) -> float | None:
    """Like to_epoch, but None for anything that is not a finite time (None, bool, NaN, bad text).

    >>> epoch_or_none("yesterday") is None, epoch_or_none(float("nan")) is None, epoch_or_none(10)
    (True, True, 10.0)
    """
    if value is None:
        return None
    try:
        seconds = to_epoch(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) else None


def iso_utc(ts: float, timespec: str = "seconds") -> str:
    """Epoch seconds as ISO-8601 UTC with a Z, to `timespec` (as datetime.isoformat).

    >>> iso_utc(1_700_000_000.25), iso_utc(1_700_000_000.25, "auto")
    ('2023-11-14T22:13:20Z', '2023-11-14T22:13:20.250000Z')
    """
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


def epoch_seconds(series: Any, field: str | None = None):
    """A pandas column of times as a float64 NumPy array of epoch seconds.

    Timestamp columns convert in one step (naive ones are UTC); other columns go value by
    value through to_epoch, whose TypeError/ValueError names `field` (default: the column's).
    Missing values (None, NaN, NaT) are NaN.
    """
    import numpy as np
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(series):
        s = series.dt.tz_localize("UTC") if series.dt.tz is None else series
        return ((s - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=float, na_value=np.nan)
    out = np.empty(len(series), dtype="float64")
    for i, value in enumerate(series):
        if value is None or value != value:  # None, NaN, NaT: unknown
            out[i] = np.nan
            continue
        try:
            out[i] = to_epoch(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"field {field or series.name!r}: {exc}") from None
    return out
