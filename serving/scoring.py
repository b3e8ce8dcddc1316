"""Predictions: the served model version scored on features read from Redis and request fields.

Owns how a model version reads its inputs, the /predict answer and handing every prediction to the log.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time

import orjson

from freshet.challengers import CANARY, goes_to_canary
from freshet.models import LinearModel, ModelFollower, ServedChallengers
from freshet.serving.errors import JSON, HTTPError
from freshet.serving.metrics import ServingMetrics
from freshet.serving.online import PRESENT, OnlineFeatureReader, ReadPlan, RequestError, UnknownFeature
from freshet.serving.predictions import PredictionLog
from freshet.serving.validation import parse_instances, predict_request

log = logging.getLogger("freshet.serving.scoring")
NO_CHALLENGERS = ServedChallengers()

# input plans kept before the cache starts over (versions served by one process: a handful)
MAX_PLANS = 16


class InputPlan:
    """How one model version reads its inputs: feature refs from Redis, the rest from the request."""

    def __init__(self, model: LinearModel, reader: OnlineFeatureReader):
        refs = [f for f in model.feature_names if ":" in f]
        self.read: ReadPlan | None = reader.plan(refs, full_feature_names=True) if refs else None
        self.fields = [f for f in model.feature_names if ":" not in f]
        position = {r: i for i, r in enumerate(self.read.refs)} if self.read else {}
        # per model input: (True, index into the read result, index of its view) or (False, field name, -1)
        self.inputs = [(True, position[f], self.read.feature_view[position[f]]) if ":" in f else (False, f, -1)
                       for f in model.feature_names]
        self.key_types: dict[str, str] = {}
        for vr in (self.read.views if self.read else []):
            self.key_types.update(zip(vr.view.join_keys, vr.view.join_key_types))
        self.generation = reader.generation

    def rows(self, result, fields_rows: list[dict]) -> list[list]:
        """One row of model inputs per instance; missing and stale features are None (the model fills them)."""
        inputs = self.inputs
        if result is None:
            return [[fields.get(ref) for _, ref, _ in inputs] for fields in fields_rows]
        values, row_status = result.values, result.row_status
        rows = []
        for r, fields in enumerate(fields_rows):
            present = [statuses[r] is PRESENT for statuses in row_status]  # per view
            rows.append([(values[ref][r] if present[view] else None) if from_store else fields.get(ref)
                         for from_store, ref, view in inputs])
        return rows


class Predictor:
    """Answers /predict with the model version `follower` serves; `counts` are predictions by version."""

    def __init__(self, reader: OnlineFeatureReader, follower: ModelFollower | None,
                 prediction_log: PredictionLog | None, metrics: ServingMetrics, model_name: str):
        self.reader = reader
        self.follower = follower
        self.prediction_log = prediction_log
        self.metrics = metrics
        self.model_name = model_name
        self.counts: dict[tuple[str, str], int] = {}
        self.shadow_counts: dict[tuple[str, str], int] = {}  # scored in shadow, by (model, version)
        self.shadow_failures = 0
        self._plans: dict[tuple[str, str], InputPlan] = {}
        # request ids: 64 random bits per process + a counter, unique without a syscall per request
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count()

    async def predict(self, body: bytes) -> tuple[int, bytes, bytes]:
        """Score one instance or a batch with the served model version (a canary's share with the canary)."""
        model = self._served_model()
        challengers = self.follower.challengers if self.follower is not None else NO_CHALLENGERS
        instances, batch = predict_request(body, model.name, self.reader.settings.max_rows_per_request)
        if self.prediction_log is not None and not self.prediction_log.admit(len(instances)):
            raise HTTPError(503, f"the prediction log is backed up ({self.prediction_log.queued} of "
                                 f"{self.prediction_log.max_pending} queued): a batch may not take its last "
                                 f"{self.prediction_log.reserve}; retry later", "instances",
                            headers=[(b"retry-after", b"1")])
        canary = challengers.canary
        picks = ([type(i) is dict and goes_to_canary(i, challengers.canary_share) for i in instances]
                 if canary is not None else None)
        if not picks or not any(picks):
            out = await self._answer(model, instances, batch, challengers.shadow)
        else:
            if batch:  # validated whole first, so an error names the instance's index in the request
                plan = self._plan(model)
                parse_instances(instances, batch, plan.key_types, plan.fields, model.name)
            out = [None] * len(instances)
            for version, role in ((model, None), (canary, CANARY)):
                index = [i for i, p in enumerate(picks) if bool(p) == (role == CANARY)]
                if index:
                    answers = await self._answer(version, [instances[i] for i in index], batch,
                                                 challengers.shadow if role is None else None, role)
                    for i, answer in zip(index, answers):
                        out[i] = {**answer, "model_version": version.version} if batch else answer
            if not batch and picks[0]:
                model = canary
        head = {"model": model.name, "model_version": model.version}
        doc = {**head, "predictions": out} if batch else {**head, **out[0]}
        return 200, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), JSON

    async def _answer(self, model: LinearModel, instances: list, batch: bool, shadow: LinearModel | None,
                      role: str | None = None) -> list[dict]:
        """The answers of `model` to `instances` (logged, with `shadow`'s scores beside them)."""
        plan = self._plan(model)
        columns, fields_rows, request_ids = parse_instances(instances, batch, plan.key_types, plan.fields,
                                                            model.name)
        result = await self.reader.read_async(plan.read, columns) if plan.read else None
        shadowed = None
        if shadow is not None and shadow.version != model.version:
            shadowed = await self._shadow(shadow, plan, result, instances, batch, columns, fields_rows)
        out = self._predictions(model, plan.rows(result, fields_rows), columns, request_ids, role, shadowed)
        if result is not None:
            self.metrics.observe_features(result)
        return out

    async def _shadow(self, shadow: LinearModel, plan: "InputPlan", result, instances: list, batch: bool,
                      columns: dict[str, list], fields_rows: list[dict]) -> list[dict] | None:
        """The shadow's answers to the same instances, for the log only; None (counted) when it cannot score
        them: a shadow never fails a request."""
        try:
            splan = self._plan(shadow)
            if splan.key_types != plan.key_types:
                columns = parse_instances(instances, batch, splan.key_types, splan.fields, shadow.name)[0]
            if splan.read is None:
                sresult = None
            elif plan.read is not None and splan.read.refs == plan.read.refs and splan.key_types == plan.key_types:
                sresult = result  # the same features: read once
            else:
                sresult = await self.reader.read_async(splan.read, columns)
            rows = splan.rows(sresult, fields_rows)
            scores = [shadow.score_one(rows[0])] if len(rows) == 1 else shadow.predict_proba(rows)
        except Exception as exc:  # noqa: BLE001 - the champion's answer stands
            self.shadow_failures += 1
            if self.shadow_failures in (1, 10, 100) or self.shadow_failures % 10_000 == 0:
                log.warning("shadow version %s of %s could not score a request (%d so far): %s", shadow.version,
                            shadow.name, self.shadow_failures, exc)
            return None
        served = (shadow.name, shadow.version)
        self.shadow_counts[served] = self.shadow_counts.get(served, 0) + len(rows)
        return [{"model_version": shadow.version, "prediction": {"score": float(s), "label": shadow.label(float(s))}}
                for s in scores]

    def _served_model(self) -> LinearModel:
        model = self.follower.model if self.follower is not None else None
        if model is None:
            reason = self.follower.last_error if self.follower is not None else "model serving is off"
            raise HTTPError(503, f"no model to serve: {reason}; promote a version of {self.model_name!r} "
                                 "(freshet retrain --bootstrap)", headers=[(b"retry-after", b"5")])
        return model

    def _plan(self, model: LinearModel) -> InputPlan:
        plan = self._plans.get((model.name, model.version))
        if plan is None or plan.generation != self.reader.generation:
            try:
                plan = InputPlan(model, self.reader)
            except (UnknownFeature, RequestError) as exc:
                raise HTTPError(503, f"model {model.name!r} version {model.version} needs features the "
                                     f"registry does not serve: {exc}") from None
            if len(self._plans) > MAX_PLANS:
                self._plans.clear()
            self._plans[(model.name, model.version)] = plan
        return plan

    def _predictions(self, model: LinearModel, rows: list[list], columns: dict[str, list],
                     request_ids: list[str | None], role: str | None = None,
                     shadowed: list[dict] | None = None) -> list[dict]:
        """One answer per instance, each handed to the prediction log."""
        scores = [model.score_one(rows[0])] if len(rows) == 1 else model.predict_proba(rows)
        now = time.time()
        names = model.feature_names
        log_ = self.prediction_log
        out = []
        for r, x in enumerate(rows):
            score = float(scores[r])
            label = model.label(score)
            request_id = request_ids[r] or f"{self._id_prefix}{next(self._ids):016x}"
            features = dict(zip(names, x))
            entities = {k: col[r] for k, col in columns.items()}
            prediction = {"score": score, "label": label}
            if log_ is not None:
                log_.publish(request_id, model.name, model.version, entities, features, prediction, now,
                             role=role, shadow=shadowed[r] if shadowed else None)
            out.append({"request_id": request_id, "score": score, "label": label, "features": features,
                        "missing": [n for n, v in zip(names, x) if v is None]})
        served = (model.name, model.version)
        self.counts[served] = self.counts.get(served, 0) + len(out)
        return out
