"""Which broker a data dir's offsets came from, and what a new broker means for them.

Owns `BrokerRecord` (`<data>/broker.json`) and `reconcile`, which moves the state keyed by
(partition, offset) out of the way when the broker is another incarnation than the one it
was recorded under.

The embedded broker keeps nothing on disk: restarted, its partitions count offsets from 0
again. Three things in the data dir remember (partition, offset) pairs: the raw log and the
label log (readers drop rows that share one, so new events and labels would vanish as
"duplicates") and the monitor's state (its saved offsets would skip the new records). Each
comes from the topics of the broker that is gone, so they go together: moved to
`<data>/previous-broker/<old incarnation>/`, kept for whoever wants them, and logged. What
does not depend on offsets stays: feature rows (Feast's offline feature log), models, the
retraining history.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("freshet.stack")

RECORD_FILE = "broker.json"
PREVIOUS_DIR = "previous-broker"
# Paths under the data dir that hold (partition, offset) pairs of the broker's topics.
OFFSET_KEYED = (
    Path("offline") / "raw",  # raw log: readers drop rows sharing (partition, offset)
    Path("offline") / "labels",  # label log: the same, plus the next offset to copy
    Path("monitor") / "state.json",  # detectors saved with the offsets they cover
)


@dataclass
class BrokerRecord:
    """The broker incarnation a data dir's offset-keyed state belongs to."""

    incarnation: str
    kafka: str
    recorded_at: float

    @classmethod
    def read(cls, data_dir: Path) -> BrokerRecord | None:
        try:
            return cls(**json.loads((data_dir / RECORD_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{RECORD_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, data_dir / RECORD_FILE)


def reconcile(data_dir: str | os.PathLike, incarnation: str, kafka: str) -> list[Path]:
    """Make the data dir's offset-keyed state belong to this broker incarnation.

    Same incarnation as recorded: nothing moves. Another one (or none recorded beside
    offset-keyed state): that state is moved to `previous-broker/<old id>/`, the reason
    and every path are logged, and the new incarnation is recorded. Returns where things went.
    """
    data_dir = Path(data_dir).resolve()
    before = BrokerRecord.read(data_dir)
    moved: list[Path] = []
    if before is None or before.incarnation != incarnation:
        stale = [rel for rel in OFFSET_KEYED if (data_dir / rel).exists()]
        if stale:
            target = _previous_dir(data_dir, before)
            for rel in stale:
                dest = target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(data_dir / rel, dest)
                moved.append(dest)
            log.warning(
                "the broker at %s is a new incarnation (%s; this data dir's offsets came from %s), so its "
                "partitions count offsets afresh: moved the state keyed by (partition, offset) to %s so new "
                "records are not taken for old ones: %s. The raw log, the label log and the monitor start "
                "afresh; feature rows, models and the retraining history are kept",
                kafka, incarnation, f"{before.incarnation} at {before.kafka}" if before else "an unrecorded broker",
                target, ", ".join(str(rel) for rel in stale))
    BrokerRecord(incarnation, kafka, time.time()).write(data_dir)
    return moved


def _previous_dir(data_dir: Path, before: BrokerRecord | None) -> Path:
    """Where the state of the incarnation `before` goes (a fresh folder each time)."""
    name = before.incarnation if before else "unrecorded"
    target = data_dir / PREVIOUS_DIR / name
    if target.exists():  # the same incarnation moved aside twice (or "unrecorded" again): keep both
        target = target.with_name(f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(2).hex()}")
    return target
