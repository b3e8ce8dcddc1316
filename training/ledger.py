"""What each registered version was trained for and what was decided about it, as MLflow tags.

Owns the alert tags that make retraining requests idempotent (`alert_tag`, `unhandled`, `TrainingLedger`).

Every alert id a registered version was trained for is a tag of its run
(`freshet.alert.<id>`): a request whose alert ids were all handled trains nothing. The
promotion decision and its reason are tags of the run and of the model version.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Mapping, Sequence

from freshet.training.evaluation import Decision

_TAG_SAFE = re.compile(r"^[A-Za-z0-9_.\- /]{1,200}$")


def alert_tag(alert_id: str) -> str:
    """The MLflow run tag marking that a run was trained for this alert id.

    >>> alert_tag("0123abcd")
    'freshet.alert.0123abcd'
    """
    alert_id = str(alert_id)
    if not _TAG_SAFE.match(alert_id):
        alert_id = "h" + hashlib.sha1(alert_id.encode()).hexdigest()[:24]
    return f"freshet.alert.{alert_id}"


def unhandled(reason: Sequence[str], handled: Mapping[str, str]) -> list[str]:
    """The alert ids of `reason` no earlier training covered, in order, once each.

    >>> unhandled(["a", "b", "a", "c"], {"b": "2"})
    ['a', 'c']
    """
    return [r for r in dict.fromkeys(map(str, reason)) if r not in handled]


class TrainingLedger:
    """One model's trainings as MLflow keeps them: `handled` looks alerts up, `record` writes a decision."""

    def __init__(self, client: Any, model: str):
        self.client = client  # an MlflowClient
        self.model = model

    def handled(self, alert_ids: Iterable[str]) -> dict[str, str]:
        """alert id -> the version already trained for it, for the ids an earlier training covered."""
        from freshet.models import EXPERIMENT

        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return {}
        model = self.model.replace("'", "\\'")
        out = {}
        for aid in dict.fromkeys(map(str, alert_ids)):
            runs = self.client.search_runs([exp.experiment_id], f"tags.`{alert_tag(aid)}` = '{model}'", max_results=1)
            if runs:
                out[aid] = runs[0].data.tags.get("freshet.version", "?")
        return out

    def record(self, version: str, reason: list[str], request_ids: list[str], decision: Decision,
               promoted: bool, champion: str | None) -> None:
        """The decision as tags of the run and the version; alert tags last, so a crash before retrains."""
        from mlflow.entities import RunTag

        mv = self.client.get_model_version(self.model, version)
        common = {"freshet.promoted": str(promoted).lower(), "freshet.promotion_decision": decision.reason[:4900],
                  "freshet.champion_before": champion or ""}
        for k, v in common.items():
            self.client.set_model_version_tag(self.model, version, k, v)
        tags = {**common, "freshet.version": version, "freshet.reason": json.dumps(reason)[:4900],
                "freshet.request_ids": json.dumps(request_ids[:20])[:4900]}
        tags.update({alert_tag(a): self.model for a in reason[:200]})
        self.client.log_batch(mv.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
