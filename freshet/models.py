"""Models on the MLflow registry, as MLflow models that are read, never unpickled.

Owns the export of a scikit-learn pipeline (imputer, scaler, logistic regression) to
parameters scored with numpy, registration as an MLflow model (the sklearn flavour saved
with skops, a signature, an input example) with lineage (Feast's tag names where they
exist), promotion and rollback through an MLflow alias, the `freshet.models` event on
every change, and the follower that hot-swaps the served version.

Serving's fast scorer is built from the registered skops file itself, loaded with
freshet's own list of trusted types (never the list the artifact names), so the version
`mlflow.pyfunc.load_model("models:/<name>@champion")` loads is the one serving scores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from freshet.challengers import CANARY, CANARY_SHARE_TAG, CLEARED, EVIDENCE_TAG, ROLES, SHADOW, parse_share
from freshet.contracts import ModelEvent
from freshet.settings import DEFAULT_MODEL_NAME, Settings

log = logging.getLogger("freshet.serving.models")

CHAMPION = "champion"
FORMAT = "freshet.linear-classifier/1"  # the exported parameters; also the JSON artifact of old versions
MLFLOW_FORMAT = "mlflow.sklearn+skops/1"  # a version's `freshet.format` tag: an MLflow model, skops inside
MODEL_FILE = "model.json"  # versions registered before MLflow models: still served, not pyfunc-loadable
MODEL_DIR = "model"  # the MLflow model's directory in the run's artifacts
SNAPSHOT_ARTIFACT = "training/snapshot.json"  # in the run: what rebuilds the training set
# The only types a skops file may hold beyond those skops trusts itself (scikit-learn's
# estimators, numpy arrays): what the supported pipeline needs. Never taken from the artifact.
TRUSTED_TYPES = ("numpy.dtype",)
REFERENCE_FILE = "reference.json"  # freshet.reference.TrainingReference of the version
EXPERIMENT = "freshet"
HISTORY_TAG = "freshet.champion_history"  # promoted versions, oldest first: what rollback walks back

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass
class TrainingData:
    """What a version was trained on, as MLflow keeps it: a dataset input of the run (`frame`, named
    by `digest`, read from `source`) and the snapshot document that rebuilds it."""

    frame: Any  # a pandas DataFrame: the model's inputs and the label
    digest: str
    snapshot: dict[str, Any]
    source: str  # a URI: where the data was read from

    def log(self, client: Any, run_id: str, name: str) -> None:
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the schema hint about integer columns: the label is one
            dataset = mlflow.data.from_pandas(self.frame, source=self.source, name=f"{name}-training",
                                              targets="label", digest=self.digest)._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", "training"),
                InputTag("freshet.snapshot", str(self.snapshot.get("digest", "")))]
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])
        client.log_dict(run_id, self.snapshot, SNAPSHOT_ARTIFACT)


class ModelNotFound(LookupError):
    """No such registered model, version or alias; the message says which and what exists."""


class UnsupportedModel(ValueError):
    """The estimator cannot be exported to the safe format; the message names the step."""


# ---------------------------------------------------------------------------
# the safe format: a linear classifier as plain numbers
# ---------------------------------------------------------------------------

def _step_name(obj: Any) -> str:
    return type(obj).__name__


def export_sklearn(pipeline: Any, feature_names: Sequence[str]) -> dict[str, Any]:
    """JSON-able parameters of [SimpleImputer] -> [StandardScaler] -> LogisticRegression (binary).

    Missing inputs (None, NaN) are filled with the imputer's statistics when there is
    an imputer, else with the scaler's mean (0 after scaling), else with 0.
    """
    steps = [s for _, s in pipeline.steps] if hasattr(pipeline, "steps") else [pipeline]
    *pre, clf = steps
    if _step_name(clf) != "LogisticRegression":
        raise UnsupportedModel(f"the last step must be LogisticRegression, got {_step_name(clf)}")
    coef = np.asarray(clf.coef_, dtype=float)
    if coef.shape[0] != 1 or len(clf.classes_) != 2:
        raise UnsupportedModel(f"only binary classifiers are supported; got classes {list(clf.classes_)}")
    n = coef.shape[1]
    if len(feature_names) != n:
        raise UnsupportedModel(f"{len(feature_names)} feature names for a model fitted on {n} features")
    mean, scale, fill = np.zeros(n), np.ones(n), None
    for step in pre:
        name = _step_name(step)
        if name == "SimpleImputer":
            if not (isinstance(step.missing_values, float) and math.isnan(step.missing_values)):
                raise UnsupportedModel("SimpleImputer must impute missing_values=np.nan")
            if getattr(step, "add_indicator", False):
                raise UnsupportedModel("SimpleImputer(add_indicator=True) is not supported")
            fill = np.asarray(step.statistics_, dtype=float)
        elif name == "StandardScaler":
            if step.with_mean:
                mean = np.asarray(step.mean_, dtype=float)
            if step.with_std:
                scale = np.asarray(step.scale_, dtype=float)
        else:
            raise UnsupportedModel(f"pipeline step {name} is not supported; use SimpleImputer, "
                                   "StandardScaler and LogisticRegression")
    if fill is None:
        fill = mean.copy()
    return {
        "format": FORMAT,
        "feature_names": list(feature_names),
        "fill": fill.tolist(),
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "coef": coef[0].tolist(),
        "intercept": float(np.asarray(clf.intercept_).ravel()[0]),
        "classes": [c.item() if hasattr(c, "item") else c for c in clf.classes_],
        "threshold": 0.5,
    }


@dataclass
class LinearModel:
    """A registered model version, scored with numpy: p = sigmoid(((x - mean) / scale) . coef + b).

    >>> m = LinearModel.from_dict({"format": FORMAT, "feature_names": ["a", "b"], "fill": [0, 0],
    ...     "mean": [1.0, 0.0], "scale": [2.0, 1.0], "coef": [1.0, -1.0], "intercept": 0.0,
    ...     "classes": [0, 1], "threshold": 0.5})
    >>> round(m.score_one([3.0, 1.0]), 6), m.label(0.5)
    (0.5, 0)
    """

    feature_names: list[str]
    fill: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    classes: list[Any]
    threshold: float = 0.5
    name: str = ""
    version: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "", version: str = "") -> "LinearModel":
        if d.get("format") != FORMAT:
            raise UnsupportedModel(f"model format {d.get('format')!r} is not {FORMAT!r}")
        arr = {k: np.asarray(d[k], dtype=float) for k in ("fill", "mean", "scale", "coef")}
        n = len(d["feature_names"])
        if any(len(a) != n for a in arr.values()):
            raise UnsupportedModel("model parameters and feature_names differ in length")
        return cls(list(d["feature_names"]), arr["fill"], arr["mean"], arr["scale"], arr["coef"],
                   float(d["intercept"]), list(d["classes"]), float(d.get("threshold", 0.5)), name, version)

    def matrix(self, rows: Sequence[Sequence[Any]]) -> np.ndarray:
        """Rows of raw inputs (None for missing) as a float matrix with missing values filled."""
        x = np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)
        missing = np.isnan(x)
        if missing.any():
            x[missing] = np.broadcast_to(self.fill, x.shape)[missing]
        return x

    def predict_proba(self, rows: Sequence[Sequence[Any]]) -> np.ndarray:
        """P(class 1) per row, equal to the exported pipeline's predict_proba(x)[:, 1]."""
        z = ((self.matrix(rows) - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def __post_init__(self) -> None:
        # plain floats for score_one: numpy's per-call overhead dwarfs a 40-term dot product
        self._terms = list(zip(self.fill.tolist(), self.mean.tolist(), self.scale.tolist(), self.coef.tolist()))

    def score_one(self, row: Sequence[Any]) -> float:
        """P(class 1) of one row, in plain Python (same value as predict_proba to ~1e-15)."""
        z = self.intercept
        for v, (fill, mean, scale, coef) in zip(row, self._terms):
            if v is None or v != v:
                v = fill
            z += (v - mean) / scale * coef
        if z >= 0:
            return 1.0 / (1.0 + math.exp(-z))
        e = math.exp(z)
        return e / (1.0 + e)

    def label(self, p: float) -> Any:
        return self.classes[1] if p > self.threshold else self.classes[0]


# ---------------------------------------------------------------------------
# the MLflow model: the sklearn flavour, serialized with skops
# ---------------------------------------------------------------------------

def model_signature(feature_names: Sequence[str]):
    """Inputs: one optional double column per feature (a missing one is imputed); output: P(class) per row."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("double", n, required=False) for n in feature_names])
    outputs = Schema([TensorSpec(np.dtype("float64"), (-1, 2))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def save_mlflow_model(pipeline: Any, feature_names: Sequence[str], path: Path, input_example: Any = None) -> None:
    """Save `pipeline` at `path` as an MLflow model: sklearn flavour in skops, pyfunc = predict_proba.

    Refuses (UnsupportedModel) a pipeline holding a type outside TRUSTED_TYPES: serving could not load it.
    """
    import mlflow.sklearn
    import pandas as pd
    import skops
    import skops.io as sio
    import sklearn

    untrusted = sorted(set(sio.get_untrusted_types(data=sio.dumps(pipeline))) - set(TRUSTED_TYPES))
    if untrusted:
        raise UnsupportedModel(f"the pipeline holds types freshet does not load: {', '.join(untrusted)}")
    names = list(feature_names)
    fitted = getattr(pipeline, "feature_names_in_", None)
    if fitted is not None and list(fitted) != names:
        raise UnsupportedModel(f"the pipeline was fitted on columns {list(fitted)[:3]}..., registered as "
                               f"{names[:3]}...: pyfunc would refuse the inputs it is given")
    if input_example is None:
        input_example = [export_sklearn(pipeline, names)["fill"]]  # the training means
    example = pd.DataFrame(np.asarray(input_example, dtype=float)[:5], columns=names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "X has feature names": a pipeline fitted on a bare array
        mlflow.sklearn.save_model(
            pipeline, str(path), serialization_format="skops", skops_trusted_types=list(TRUSTED_TYPES),
            signature=model_signature(names), input_example=example, pyfunc_predict_fn="predict_proba",
            # pinned here: inferring them runs the model in a subprocess (seconds per version)
            pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"skops=={skops.__version__}",
                              f"numpy=={np.__version__}", f"pandas=={pd.__version__}"],
            metadata={"freshet_format": MLFLOW_FORMAT})


def read_mlflow_model(path: str | Path, what: str = "the model") -> tuple[Any, list[str]]:
    """(pipeline, input names) of an MLflow model directory saved by `save_mlflow_model`.

    The MLmodel file is YAML (read safely); the estimator is loaded with skops and freshet's
    TRUSTED_TYPES only: a pickled model is refused, never unpickled."""
    from mlflow.models import Model

    path = Path(path)
    if not (path / "MLmodel").is_file():
        raise UnsupportedModel(f"{what} has no MLmodel file at {path}")
    meta = Model.load(str(path / "MLmodel"))
    flavor = meta.flavors.get("sklearn")
    if not flavor:
        raise UnsupportedModel(f"{what} has no sklearn flavour (flavours: {', '.join(meta.flavors)})")
    serialization = flavor.get("serialization_format")
    if serialization != "skops":
        raise UnsupportedModel(f"{what} is serialized as {serialization!r}; freshet never unpickles a model: "
                               "save it with serialization_format='skops' (or retrain it: "
                               "'freshet retrain --once --force')")
    if meta.signature is None:
        raise UnsupportedModel(f"{what} has no signature: its input names are unknown")
    import skops.io as sio
    from skops.io.exceptions import UntrustedTypesFoundException

    file = path / Path(str(flavor.get("pickled_model", "model.skops"))).name  # never outside the directory
    try:
        pipeline = sio.load(file, trusted=list(TRUSTED_TYPES))
    except UntrustedTypesFoundException as exc:
        raise UnsupportedModel(f"{what} holds types freshet does not load: {exc}") from None
    return pipeline, list(meta.signature.inputs.input_names())


# ---------------------------------------------------------------------------
# the registry: MLflow
# ---------------------------------------------------------------------------

def _flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(_flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


def _window_str(window: Any) -> tuple[str, str]:
    if isinstance(window, Mapping):
        return str(window.get("start", "")), str(window.get("end", ""))
    if isinstance(window, (list, tuple)) and len(window) == 2:
        return str(window[0]), str(window[1])
    return str(window or ""), ""


def _s3_artifact_env(settings: Settings) -> None:
    """Point MLflow's S3 artifact client (boto3, configured only by env vars) at the FRESHET_S3_*
    store: the artifacts of versions another host registered are read from there."""
    if not settings.mlflow_artifact_store:
        return
    from pathlib import Path

    env = {"MLFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url, "AWS_DEFAULT_REGION": settings.s3_region or "us-east-1",
           "AWS_ACCESS_KEY_ID": settings.s3_access_key_id,
           "AWS_SECRET_ACCESS_KEY": (Path(settings.s3_secret_access_key_file).expanduser().read_text().strip()
                                     if settings.s3_secret_access_key_file else settings.s3_secret_access_key)}
    os.environ.update({k: v for k, v in env.items() if v})


class ModelRegistry:
    """freshet's models in the MLflow registry at settings.mlflow_uri.

    Versions are MLflow model versions; the served one is the `champion` alias; the
    order of promotions (for rollback) is a tag on the registered model.
    """

    def __init__(self, settings: Settings, publish_events: bool = True):
        from mlflow import MlflowClient

        self.settings = settings
        self.uri = settings.mlflow_uri
        _s3_artifact_env(settings)
        if self.uri.startswith("sqlite:"):
            settings.data_path.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            try:
                self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                break
            except Exception:  # noqa: BLE001 - two processes creating the sqlite schema at once
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
        self.publish_events = publish_events
        self.event_delivered = False  # whether the last promotion's or rollback's event reached Kafka
        self._cache: dict[tuple[str, str], LinearModel] = {}
        self._lock = threading.Lock()

    # -- helpers --------------------------------------------------------------

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.settings.mlflow_artifact_store:
            location = self.settings.mlflow_artifact_store.rstrip("/")
        elif self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
            location = (self.settings.data_path / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=location)
        except Exception:  # noqa: BLE001 - a concurrent creator won: use theirs
            return self.client.get_experiment_by_name(EXPERIMENT).experiment_id

    def _registered(self, name: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException:
            known = [m.name for m in self.client.search_registered_models()]
            raise ModelNotFound(f"no registered model {name!r}; known: {', '.join(known) or 'none'}") from None

    def _version(self, name: str, ref: str | int):
        from mlflow.exceptions import MlflowException

        ref = str(ref)
        try:
            if ref.isdigit():
                return self.client.get_model_version(name, ref)
            return self.client.get_model_version_by_alias(name, ref)
        except MlflowException:
            self._registered(name)
            kind = "version" if ref.isdigit() else "alias"
            raise ModelNotFound(f"model {name!r} has no {kind} {ref!r}") from None

    def _history(self, name: str) -> list[str]:
        raw = self._registered(name).tags.get(HISTORY_TAG, "[]")
        try:
            return [str(v) for v in json.loads(raw)]
        except ValueError:
            return []

    # -- writing --------------------------------------------------------------

    def register_sklearn(self, name: str, pipeline: Any, feature_names: Sequence[str],
                         lineage: Mapping[str, Any] | None = None,
                         metrics: Mapping[str, float] | None = None,
                         reference: Mapping[str, Any] | None = None,
                         input_example: Any = None,
                         tags: Mapping[str, str] | None = None,
                         training_data: TrainingData | None = None) -> str:
        """Save as an MLflow model, log and register one version; returns its version number (not promoted).

        `reference` (a `freshet.reference.TrainingReference` as a dict) is logged next to the
        model: the distributions the monitor judges this version's traffic against.
        `input_example` (rows of inputs) defaults to the training means; `tags` go on the run and
        the version both; `training_data` is logged as the run's dataset input, with its snapshot."""
        from mlflow.entities import Metric, Param

        lineage = dict(lineage or {})
        export_sklearn(pipeline, feature_names)  # refuse what serving could not score, before logging anything
        refs = [f for f in feature_names if ":" in f]
        service = str(lineage.get("feature_service", ""))
        start, end = _window_str(lineage.get("training_window"))
        extra = {k: str(v)[:4900] for k, v in (tags or {}).items()}
        tags = {
            "mlflow.runName": f"{name}-train",
            "feast.project": str(lineage.get("project", "freshet")),
            "feast.feature_refs": ",".join(refs),
            "feast.feature_views": ",".join(sorted({r.split(":")[0] for r in refs})),
            "freshet.model": name,
            "freshet.format": MLFLOW_FORMAT,
            "freshet.feature_names": json.dumps(list(feature_names)),
            "freshet.training_start": start,
            "freshet.training_end": end,
            "freshet.dataset_fingerprint": str(lineage.get("dataset_fingerprint", "")),
            "freshet.seed": str(lineage.get("seed", "")),
            "freshet.lineage": json.dumps(lineage, default=str)[:4900],
        }
        if service:
            tags["feast.feature_service"] = service
        tags.update(extra)
        params = {}
        final = pipeline.steps[-1][1] if hasattr(pipeline, "steps") else pipeline
        params.update(_flat_params(final.get_params(), "model."))
        params.update(_flat_params(lineage.get("params", {})))
        if "seed" in lineage:
            params["seed"] = str(lineage["seed"])
        now = int(time.time() * 1000)
        run = self.client.create_run(self._experiment_id(), tags=tags)
        run_id = run.info.run_id
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, v) for k, v in params.items()],
        )
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp, MODEL_DIR)
            save_mlflow_model(pipeline, feature_names, model_dir, input_example)
            Path(model_dir, "lineage.json").write_text(json.dumps(lineage, default=str, indent=2))
            if reference is not None:
                Path(model_dir, REFERENCE_FILE).write_text(json.dumps(reference))
            self.client.log_artifacts(run_id, str(model_dir), artifact_path=MODEL_DIR)
        if training_data is not None:
            training_data.log(self.client, run_id, name)
        self.client.set_terminated(run_id)
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="freshet model, served from its champion alias")
        except MlflowException:
            pass  # already registered
        version_tags = {"freshet.format": MLFLOW_FORMAT,
                        "freshet.dataset_fingerprint": tags["freshet.dataset_fingerprint"],
                        "freshet.training_window": f"{start}/{end}"}
        if service:
            version_tags["feast.feature_service"] = service
        version_tags.update(extra)
        mv = self.client.create_model_version(name, f"{run.info.artifact_uri}/{MODEL_DIR}", run_id=run_id,
                                              tags=version_tags)
        log.info("registered %s version %s (run %s)", name, mv.version, run_id)
        return str(mv.version)

    def promote(self, name: str, version: str | int, alias: str = CHAMPION) -> ModelEvent:
        """Make `version` the served one; publishes a freshet.models event. Returns that event."""
        version = str(self._version(name, version).version)
        with self._lock:
            history = self._history(name)
            self.client.set_registered_model_alias(name, alias, version)
            if not history or history[-1] != version:
                history.append(version)
            self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-100:]))
            if alias == CHAMPION:  # a challenger that becomes the champion stops being one
                for role, v in self.challengers(name).items():
                    if role in ROLES and v == version:
                        self._clear_alias(name, role)
        log.info("promoted %s version %s to %s", name, version, alias)
        return self._announce(name, version, alias)

    # -- challengers: shadow and canary ----------------------------------------------

    def challengers(self, name: str) -> dict[str, Any]:
        """{"shadow": version or None, "canary": version or None, "canary_share": float} of a model."""
        reg = self._registered(name)
        aliases = {a: str(v) for a, v in (reg.aliases or {}).items()}
        share = 0.0
        if aliases.get(CANARY):
            try:
                share = parse_share(reg.tags.get(CANARY_SHARE_TAG, "0"))
            except ValueError:
                share = 0.0  # a tag edited by hand to nonsense: no traffic to the canary
        return {SHADOW: aliases.get(SHADOW), CANARY: aliases.get(CANARY), "canary_share": share}

    def set_challenger(self, name: str, role: str, version: str | int, share: float | None = None) -> ModelEvent:
        """Make `version` the shadow (scored beside the champion, never returned) or the canary (answers
        `share` of traffic); publishes a freshet.models event with the role as its stage."""
        if role not in ROLES:
            raise ValueError(f"a challenger is one of {', '.join(ROLES)}, not {role!r}")
        version = str(self._version(name, version).version)
        if version == self.current_version(name):
            raise ValueError(f"version {version} of {name!r} is the champion already; a {role} must be another "
                             "version (see 'freshet models list')")
        if role == CANARY:
            share = parse_share(share)
        with self._lock:
            self.client.set_registered_model_alias(name, role, version)
            if role == CANARY:
                self.client.set_registered_model_tag(name, CANARY_SHARE_TAG, repr(share))
        log.info("%s of %s is now version %s%s", role, name, version,
                 f" ({share:.1%} of traffic)" if role == CANARY else "")
        return self._announce(name, version, role, {"share": share} if role == CANARY else None)

    def clear_challenger(self, name: str, role: str) -> ModelEvent | None:
        """Remove the shadow or canary (None when there was none); publishes a `<role>_cleared` event."""
        if role not in ROLES:
            raise ValueError(f"a challenger is one of {', '.join(ROLES)}, not {role!r}")
        with self._lock:
            version = self.challengers(name)[role]
            if version is None:
                return None
            self._clear_alias(name, role)
        log.info("%s of %s (version %s) cleared", role, name, version)
        return self._announce(name, version, f"{role}_{CLEARED}")

    def _clear_alias(self, name: str, role: str) -> None:
        self.client.delete_registered_model_alias(name, role)
        if role == CANARY:
            try:
                self.client.delete_registered_model_tag(name, CANARY_SHARE_TAG)
            except Exception:  # noqa: BLE001 - no tag: nothing to clear
                pass

    def rollback(self, name: str, alias: str = CHAMPION, expected_current: str | None = None) -> ModelEvent:
        """Serve the version promoted before the current one again; publishes the event.

        With `expected_current`, only while that version is still the champion (ModelNotFound
        otherwise): an automatic rollback must not undo a promotion made since it was decided."""
        with self._lock:
            history = self._history(name)
            current = self.current_version(name, alias)
            if expected_current is not None and current != str(expected_current):
                raise ModelNotFound(f"model {name!r} is served at version {current}, not {expected_current}: "
                                    "not rolled back")
            while history and history[-1] == current:
                history.pop()
            if not history:
                raise ModelNotFound(f"model {name!r} has no earlier promoted version to roll back to")
            version = history[-1]
            self.client.set_registered_model_alias(name, alias, version)
            self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        log.info("rolled %s back from version %s to %s", name, current, version)
        return self._announce(name, version, alias)

    def announce(self, name: str, version: str, stage: str, metrics: Mapping[str, float]) -> ModelEvent:
        """Publish a freshet.models event about a version (e.g. the monitor's `rolled_back`)."""
        event = ModelEvent(model=name, version=str(version), stage=stage, metrics=dict(metrics))
        self.event_delivered = publish_model_event(self.settings, event) if self.publish_events else False
        return event

    def _announce(self, name: str, version: str, alias: str, extra: Mapping[str, float] | None = None) -> ModelEvent:
        mv = self.client.get_model_version(name, version)
        metrics = dict(self.client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
        metrics.update(extra or {})
        event = ModelEvent(model=name, version=version, stage=alias, metrics=metrics)
        self.event_delivered = publish_model_event(self.settings, event) if self.publish_events else False
        return event

    # -- reading --------------------------------------------------------------

    def current_version(self, name: str, alias: str = CHAMPION) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def load(self, name: str, ref: str | int = CHAMPION) -> LinearModel:
        """The model of a version number or alias, built from its registered artifact (cached per version)."""
        mv = self._version(name, ref)
        key = (name, str(mv.version))
        model = self._cache.get(key)
        if model is not None:
            return model
        fmt = mv.tags.get("freshet.format", FORMAT)
        if fmt == MLFLOW_FORMAT:
            pipeline, names = self.load_pipeline(name, mv.version)
            doc = export_sklearn(pipeline, names)
        elif fmt == FORMAT:  # registered before versions were MLflow models: the JSON is still safe to read
            with tempfile.TemporaryDirectory() as tmp:
                path = self.client.download_artifacts(mv.run_id, f"{MODEL_DIR}/{MODEL_FILE}", tmp)
                doc = json.loads(Path(path).read_text())  # JSON only: nothing is unpickled
        else:
            raise UnsupportedModel(f"model {name!r} version {mv.version} is in format {fmt!r}; freshet serves "
                                   f"{MLFLOW_FORMAT!r} (and the older {FORMAT!r}): register it again with "
                                   "'freshet retrain --once --force'")
        model = LinearModel.from_dict(doc, name, str(mv.version))
        model.info = {"run_id": mv.run_id, "source": mv.source, "format": fmt,
                      "feature_service": mv.tags.get("feast.feature_service", "")}
        self._cache[key] = model
        return model

    def load_pipeline(self, name: str, ref: str | int = CHAMPION) -> tuple[Any, list[str]]:
        """(the scikit-learn pipeline, its input names) of a version registered as an MLflow model."""
        mv = self._version(name, ref)
        fmt = mv.tags.get("freshet.format", FORMAT)
        if fmt != MLFLOW_FORMAT:
            raise UnsupportedModel(f"model {name!r} version {mv.version} was registered before versions were "
                                   f"MLflow models (format {fmt!r}): it has no MLmodel; retrain to replace it "
                                   "('freshet retrain --once --force')")
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(mv.run_id, MODEL_DIR, tmp)
            return read_mlflow_model(path, f"model {name!r} version {mv.version}")

    def load_reference(self, name: str, ref: str | int) -> dict[str, Any] | None:
        """The training reference logged with a version (a dict), or None for a version without one."""
        mv = self._version(name, ref)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(mv.run_id, f"model/{REFERENCE_FILE}", tmp)
            except Exception:  # noqa: BLE001 - registered before references existed, or by another tool
                return None
            return json.loads(Path(path).read_text())  # JSON only

    def training_snapshot(self, name: str, ref: str | int) -> dict[str, Any]:
        """The training snapshot logged with a version; ModelNotFound naming why for one without."""
        mv = self._version(name, ref)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(mv.run_id, SNAPSHOT_ARTIFACT, tmp)
            except Exception:  # noqa: BLE001 - trained before snapshots were recorded, or by another tool
                raise ModelNotFound(f"model {name!r} version {mv.version} has no training snapshot "
                                    f"({SNAPSHOT_ARTIFACT}): it was registered before freshet recorded them or "
                                    "by another tool, so it cannot be reproduced; retrain to get one that can "
                                    "('freshet retrain --once --force')") from None
            return json.loads(Path(path).read_text())  # JSON only

    def training_inputs(self, name: str, ref: str | int) -> list[dict[str, Any]]:
        """The dataset inputs of a version's run: name, digest, source, profile, tags."""
        mv = self._version(name, ref)
        run = self.client.get_run(mv.run_id)
        out = []
        for d in (run.inputs.dataset_inputs if run.inputs else []):
            out.append({"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source,
                        "profile": d.dataset.profile, "tags": {t.key: t.value for t in d.tags}})
        return out

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version, newest first, with aliases, metrics, parameters and lineage."""
        reg = self._registered(name)
        aliases: dict[str, list[str]] = {}
        for alias, version in (reg.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        out = []
        for mv in self.client.search_model_versions(f"name='{name}'"):
            out.append(self._describe(mv, aliases.get(str(mv.version), [])))
        return sorted(out, key=lambda d: int(d["version"]), reverse=True)

    def _describe(self, mv, aliases: list[str]) -> dict[str, Any]:
        run = self.client.get_run(mv.run_id) if mv.run_id else None
        tags = run.data.tags if run else {}
        return {
            "version": str(mv.version),
            "aliases": aliases,
            "stage": CHAMPION if CHAMPION in aliases else (aliases[0] if aliases else "registered"),
            "created_at": mv.creation_timestamp / 1000 if mv.creation_timestamp else None,
            "run_id": mv.run_id,
            "metrics": dict(run.data.metrics) if run else {},
            "params": dict(run.data.params) if run else {},
            "feature_service": tags.get("feast.feature_service", ""),
            "feature_names": json.loads(tags.get("freshet.feature_names", "[]")),
            "training_window": {"start": tags.get("freshet.training_start", ""),
                                "end": tags.get("freshet.training_end", "")},
            "dataset_fingerprint": tags.get("freshet.dataset_fingerprint", ""),
            "seed": tags.get("freshet.seed", ""),
            "format": mv.tags.get("freshet.format", FORMAT),
            "snapshot_digest": mv.tags.get("freshet.snapshot_digest", ""),
            "gate": mv.tags.get("freshet.gate", ""),
            "promotion_decision": mv.tags.get("freshet.promotion_decision", ""),
            "online_evidence": _json_tag(mv.tags.get(EVIDENCE_TAG)),
        }

    def models(self) -> list[dict[str, Any]]:
        """Every registered model with the version each alias points at."""
        return [{"name": m.name, "aliases": {a: str(v) for a, v in (m.aliases or {}).items()},
                 "description": m.description or ""}
                for m in self.client.search_registered_models()]


def _json_tag(raw: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def publish_model_event(settings: Settings, event: ModelEvent, timeout: float = 5.0) -> bool:
    """Send a freshet.models event; False (logged) if Kafka is unreachable: followers also poll."""
    if not settings.kafka_bootstrap_servers:
        return False
    from freshet import kafka

    try:
        kafka.ensure_topics(settings, [settings.topic_models], timeout=timeout)
        p = kafka.producer(settings, **{"message.timeout.ms": int(timeout * 1000)})
        p.produce(settings.topic_models, key=event.key(), value=event.encode())
        if p.flush(timeout) == 0:
            return True
    except Exception as exc:  # noqa: BLE001 - the registry already changed; followers poll it
        log.warning("could not publish model event for %s v%s: %s", event.model, event.version, exc)
        return False
    log.warning("model event for %s v%s not delivered within %.0fs; servers will pick it up by polling",
                event.model, event.version, timeout)
    return False


# ---------------------------------------------------------------------------
# hot swap
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ServedChallengers:
    """The shadow and canary versions a server scores with, replaced whole on a change."""

    shadow: LinearModel | None = None
    canary: LinearModel | None = None
    canary_share: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {SHADOW: self.shadow.version if self.shadow else None,
                CANARY: self.canary.version if self.canary else None,
                "canary_share": self.canary_share if self.canary else 0.0}


class ModelFollower:
    """Keeps `model` at the registry's champion: follows freshet.models, polls as a fallback.

    A request reads `follower.model` once and uses that object throughout, so a swap
    never fails or mixes versions within a request. With `challengers`, `follower.challengers`
    follows the shadow and canary aliases the same way (a request reads it once too).
    """

    def __init__(self, settings: Settings, name: str = DEFAULT_MODEL_NAME, registry: ModelRegistry | None = None,
                 alias: str = CHAMPION, poll_s: float = 30.0,
                 on_change: Callable[[LinearModel | None, LinearModel], None] | None = None,
                 gate: Callable[[LinearModel], None] | None = None, challengers: bool = True):
        self.settings = settings
        self.gate = gate  # raises for a version that must not be served: the current one stays
        self.name = name
        self.alias = alias
        self.poll_s = poll_s
        self.on_change = on_change
        self.registry = registry or ModelRegistry(settings, publish_events=False)
        self.model: LinearModel | None = None
        self.last_error = ""
        self.follow_challengers = challengers
        self.challengers = ServedChallengers()
        self.challenger_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._check_lock = threading.Lock()

    def check(self) -> bool:
        """Load and switch to the champion (and the challengers) if they changed; True if the champion did."""
        changed = self._check_champion()
        if self.follow_challengers and self.model is not None:  # no champion yet: no challenger either
            self._check_challengers()
        return changed

    def _check_challengers(self) -> None:
        with self._check_lock:
            try:
                wanted = self.registry.challengers(self.name)
                loaded = {}
                for role in ROLES:
                    version = wanted[role]
                    current = getattr(self.challengers, role)
                    if version is None or (self.model is not None and version == self.model.version):
                        loaded[role] = None
                    elif current is not None and current.version == version:
                        loaded[role] = current
                    else:
                        loaded[role] = self.registry.load(self.name, version)
                        if self.gate is not None:
                            self.gate(loaded[role])
            except Exception as exc:  # noqa: BLE001 - keep the challengers served so far
                self.challenger_error = f"could not load the challengers of {self.name!r}: {exc}"
                log.warning("%s", self.challenger_error)
                return
            new = ServedChallengers(loaded[SHADOW], loaded[CANARY],
                                    wanted["canary_share"] if loaded[CANARY] is not None else 0.0)
            old, self.challengers = self.challengers, new
            self.challenger_error = ""
        if new.describe() != old.describe():
            log.info("challengers of %s: %s (were %s)", self.name, new.describe(), old.describe())

    def _check_champion(self) -> bool:
        with self._check_lock:
            try:
                version = self.registry.current_version(self.name, self.alias)
                if version is None:
                    self.last_error = f"no version of model {self.name!r} has the alias {self.alias!r}"
                    return False
                if self.model is not None and self.model.version == version:
                    return False
                new = self.registry.load(self.name, version)
                if self.gate is not None:
                    self.gate(new)
            except Exception as exc:  # noqa: BLE001 - keep serving the current version
                self.last_error = f"could not load model {self.name!r}: {exc}"
                log.warning("%s", self.last_error)
                return False
            old, self.model = self.model, new
            self.last_error = ""
        log.info("serving model %s version %s (was %s)", self.name, new.version, old.version if old else "none")
        if self.on_change:
            self.on_change(old, new)
        return True

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._run, name="freshet-model-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def _consumer(self):
        from confluent_kafka import OFFSET_END, TopicPartition

        from freshet import kafka

        if not self.settings.kafka_bootstrap_servers:
            return None
        try:
            kafka.ensure_topics(self.settings, [self.settings.topic_models], timeout=2)
            c = kafka.consumer(self.settings, f"freshet-serve-{uuid.uuid4().hex[:8]}",
                               **{"auto.offset.reset": "latest"})
            meta = c.list_topics(self.settings.topic_models, timeout=5).topics[self.settings.topic_models]
            # assign, not subscribe: every server sees every event, no group join to wait for
            c.assign([TopicPartition(self.settings.topic_models, p, OFFSET_END) for p in meta.partitions])
            return c
        except Exception as exc:  # noqa: BLE001 - polling the registry still works
            log.warning("not following %s (%s); polling the registry every %.0fs",
                        self.settings.topic_models, exc, self.poll_s)
            return None

    def _run(self) -> None:
        consumer, retry_at = None, 0.0
        next_poll = time.monotonic() + (self.poll_s if self.model else min(self.poll_s, 2.0))
        try:
            while not self._stop.is_set():
                if consumer is None and time.monotonic() >= retry_at:
                    consumer = self._consumer()
                    retry_at = time.monotonic() + max(self.poll_s, 30.0)
                if consumer is None:
                    self._stop.wait(min(self.poll_s, 0.5))
                else:
                    msg = consumer.poll(0.2)
                    if msg is not None and not msg.error():
                        try:
                            event = ModelEvent.decode(msg.value())
                            if event.model == self.name:
                                self.check()
                        except ValueError as exc:
                            log.warning("ignoring bad %s message: %s", self.settings.topic_models, exc)
                if time.monotonic() >= next_poll:
                    self.check()
                    # a server still waiting for its first model asks more often
                    next_poll = time.monotonic() + (self.poll_s if self.model else min(self.poll_s, 2.0))
        finally:
            if consumer is not None:
                consumer.close()
