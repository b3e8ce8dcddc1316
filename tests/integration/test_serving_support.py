"""Shared by the serving tests: the example feature repo applied once per test session.

`feast apply` costs ~15 s, so the first module that asks applies the repo into a
session-wide data dir and later modules reuse that registry. Holds no tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest

from freshet.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2] / "feature_repo"


@pytest.fixture(scope="session")
def applied_settings(services, tmp_path_factory) -> Settings:
    """Settings whose data dir holds a registry with the example feature repo applied."""
    from freshet import features

    data_dir = tmp_path_factory.getbasetemp() / "serving-applied"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    settings = load_settings(env, kafka_bootstrap_servers=services.kafka, redis_url=services.redis_url,
                             data_dir=str(data_dir), feature_repo=str(REPO))
    if not (data_dir / "registry.db").exists():
        features.apply(settings)
    return settings


@pytest.fixture(scope="session")
def feast_store(applied_settings):
    from freshet import features

    return features.feature_store(applied_settings)


def with_topics(settings: Settings, unique: str, **overrides) -> Settings:
    """The applied settings with this test's own topics (and any other overrides)."""
    return dataclasses.replace(
        settings, topic_predictions=f"{unique}.predictions", topic_models=f"{unique}.models",
        topic_labels=f"{unique}.labels", topic_drift=f"{unique}.drift", topic_retrain=f"{unique}.retrain",
        topic_deadletter=f"{unique}.deadletter", **overrides,
    )


@contextlib.contextmanager
def serve(app):
    """Run an ASGI app under uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    from freshet.app.stack import free_port

    port = free_port()
    from freshet.serving.transport import http_protocol

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning",
                                           loop="asyncio", access_log=False, http=http_protocol()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def fit_fraud_pipeline(seed: int = 0, n_features: int = 3):
    """A small StandardScaler + LogisticRegression fitted on synthetic data."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, n_features)) * 10 + 5
    y = (x[:, 0] + rng.normal(size=300) * 5 > 5).astype(int)
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1 + seed)).fit(x, y)
