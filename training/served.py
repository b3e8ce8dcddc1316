"""The served-prediction log: freshet.predictions copied into Parquet, and examples joined to it.

Owns `PredictionArchive` (`sync` copies, `read` gives each request once), `attach_requests`
(each labelled example's request time and served features), `use_served` and the `TRAINING_FEATURES`
choice: train on features recomputed as served (the default) or on the logged values.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from freshet.contracts import ContractError, Prediction, json_object
from freshet.offline_store import Location, OfflineStore
from freshet.settings import Settings
from freshet.training.labels import LabelLog
from freshet.training.pipeline import input_column

# where a training set's feature values come from (FRESHET_TRAINING_FEATURES)
RECOMPUTED, SERVED = "recomputed", "served"
TRAINING_FEATURES = (RECOMPUTED, SERVED)

PREDICTION_COLUMNS = pa.schema([
    ("request_id", pa.string()),
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("request_ts", pa.float64()),  # wall clock serving answered at, epoch s (exact: features are as of it)
    ("ts", pa.timestamp("us", tz="UTC")),  # the same, as a time (the part files' dates)
    ("entities", pa.string()),  # JSON object
    ("features", pa.string()),  # JSON object: model input -> value served
    ("_partition", pa.int32()),
    ("_offset", pa.int64()),
])


def prediction_log_path(store: OfflineStore, topic: str) -> Location:
    return store.predictions(topic)


def prediction_row(raw: bytes) -> dict[str, Any]:
    """One freshet.predictions/1 message as an archive row; raises ContractError naming what is wrong.

    >>> r = prediction_row(b'{"schema": "freshet.predictions/1", "request_id": "tx1", "model": "fraud", '
    ...                    b'"model_version": "2", "entities": {"card_id": "c1"}, "features": {"amount": 5.0}, '
    ...                    b'"prediction": {"score": 0.1, "label": 0}, "ts": 20.5}')
    >>> r["request_id"], r["request_ts"], json.loads(r["features"])
    ('tx1', 20.5, {'amount': 5.0})
    """
    p = Prediction.decode(json_object(raw))
    ts = float(p.ts)
    if not math.isfinite(ts):
        raise ContractError(f"field 'ts' must be finite, got {p.ts!r}")
    return {"request_id": p.request_id, "model": p.model, "model_version": str(p.model_version),
            "request_ts": ts, "ts": ts, "entities": json.dumps(p.entities), "features": json.dumps(p.features)}


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    cols = {f.name: [r[f.name] for r in rows] for f in PREDICTION_COLUMNS}
    cols["ts"] = [int(round(v * 1e6)) for v in cols["ts"]]
    return pa.table({f.name: pa.array(cols[f.name], f.type if f.name != "ts" else pa.int64()).cast(f.type)
                     for f in PREDICTION_COLUMNS}, schema=PREDICTION_COLUMNS)


class PredictionArchive(LabelLog):
    """freshet.predictions as Parquet part files under `offline/predictions/<topic>/` of the offline store."""

    PREFIX = "predictions"
    GROUP = "freshet-prediction-log"
    _decode = staticmethod(prediction_row)
    _table = staticmethod(_table)

    def __init__(self, settings: Settings, topic: str | None = None):
        super().__init__(settings, topic or settings.topic_predictions)
        self.root = prediction_log_path(OfflineStore.of(settings), self.topic)

    def read(self, files: list[Location] | None = None) -> pd.DataFrame:
        """Every request once (a request id logged twice, by a retried publish, counts once)."""
        from freshet.stream.offline import read_parts

        table = read_parts(self.root, files=files)  # files: only these parts (a snapshot)
        if table is None:
            return pd.DataFrame({f.name: pd.Series(dtype=object) for f in PREDICTION_COLUMNS})
        df = table.to_pandas()
        df = df.drop_duplicates(["_partition", "_offset"]).sort_values(["_partition", "_offset"], kind="stable")
        return df.drop_duplicates("request_id", keep="first").reset_index(drop=True)


def attach_requests(examples: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """The examples with `request_ts` (when serving answered each one's request, NaN if it never
    did) and `served` (the logged feature values, a dict, or None), joined by request id."""
    out = examples.copy()
    if not len(predictions) or not len(out):
        out["request_ts"] = np.nan
        out["served"] = None
        return out
    logged = predictions.set_index("request_id")
    pos = logged.index.get_indexer(out["request_id"])
    found = pos >= 0
    request_ts = np.full(len(out), np.nan)
    request_ts[found] = logged["request_ts"].to_numpy(dtype=float)[pos[found]]
    texts = logged["features"].to_numpy(dtype=object)
    out["request_ts"] = request_ts
    out["served"] = [json.loads(texts[p]) if p >= 0 else None for p in pos]
    return out


def use_served(data: pd.DataFrame, refs: Sequence[str]) -> None:
    """Replace each feature column ("view:feature" -> "view__feature") of a training set by the
    value logged with the row's request, where the served model read that feature."""
    served = data["served"].tolist() if "served" in data.columns else [None] * len(data)
    for ref in refs:
        column = input_column(ref)
        recomputed = data[column].tolist()
        data[column] = [s[ref] if isinstance(s, dict) and ref in s else r for s, r in zip(served, recomputed)]


def attach_served_requests(settings: Settings, examples: pd.DataFrame, predictions: pd.DataFrame,
                           outcome: dict[str, Any] | None = None) -> pd.DataFrame:
    """`attach_requests` with the archived `predictions` (`PredictionArchive.read`);
    `outcome["training_features"]` says where features come from and how many examples were served."""
    out = attach_requests(examples, predictions)
    if outcome is not None:
        outcome["training_features"] = {"source": settings.training_features,
                                        "served_examples": int(np.isfinite(out["request_ts"]).sum()),
                                        "examples": len(out)}
    return out
