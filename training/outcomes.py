"""What one retraining did: its outcome, as the caller gets it and as the outcome log keeps it.

Owns `OutcomeLog` (<data_dir>/retrain/outcomes.jsonl, one JSON line per retraining) and `summary_line`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import orjson

log = logging.getLogger("freshet.retrain")


class OutcomeLog:
    """Every retraining's outcome, whatever its status, appended as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def finish(self, outcome: dict[str, Any], status: str, why: str) -> dict[str, Any]:
        """The outcome with its status, the sentence saying why and its end time; appended to the log."""
        outcome["status"] = status
        outcome["decision"] = why
        outcome["finished_at"] = time.time()
        if status in ("skipped", "insufficient_data"):
            log.info("retrain %s: %s: %s", outcome["model"], status.replace("_", " "), why)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(orjson.dumps(outcome, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        except OSError as exc:
            log.warning("could not append the outcome to %s: %s", self.path, exc)
        return outcome


def summary_line(outcome: Mapping[str, Any]) -> str:
    """One line for the terminal.

    >>> summary_line({"model": "fraud", "status": "not_promoted", "version": "3", "champion_before": "2",
    ...               "metrics": {"auc": 0.8123, "log_loss": 0.2, "error_rate": None},
    ...               "champion_metrics": {"auc": 0.8101}, "decision": "+0.0022 < margin"})
    'fraud: not promoted | version 3 | auc 0.8123 log_loss 0.2000 error n/a | champion v2 auc 0.8101 | +0.0022 < margin'
    """
    status = outcome.get("status", "")
    m = outcome.get("metrics") or {}
    c = outcome.get("champion_metrics") or {}
    parts = [f"{outcome.get('model')}: {status.replace('_', ' ')}"]
    if outcome.get("version"):
        parts.append(f"version {outcome['version']}")
    if m:
        parts.append(f"auc {_fmt(m.get('auc'))} log_loss {_fmt(m.get('log_loss'))} error {_fmt(m.get('error_rate'))}")
    if c:
        parts.append(f"champion v{outcome.get('champion_before')} auc {_fmt(c.get('auc'))}")
    parts.append(str(outcome.get("decision", "")))
    return " | ".join(p for p in parts if p)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"
