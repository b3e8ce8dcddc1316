"""Fixtures shared by the integration tests (the broker and Redis come from tests/conftest.py).

`apply_feature_repo` registers feature_repo/ in a data dir's Feast registry in-process.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import pytest

from freshet import features
from freshet.settings import Settings


def _apply_in_process(settings: Settings) -> features.FeatureRegistry:
    # 'feast apply' minus a subprocess that spends most of its time importing Feast
    from feast import Entity, FeatureService
    from feast.stream_feature_view import StreamFeatureView

    settings.data_path.mkdir(parents=True, exist_ok=True)
    # the definitions read FRESHET_DATA_DIR for their offline paths
    old = os.environ.get("FRESHET_DATA_DIR")
    os.environ["FRESHET_DATA_DIR"] = str(settings.data_path)
    try:
        spec = importlib.util.spec_from_file_location("_freshet_repo_definitions",
                                                      features.repo_path(settings) / "definitions.py")
        defs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(defs)
    finally:
        if old is None:
            os.environ.pop("FRESHET_DATA_DIR")
        else:
            os.environ["FRESHET_DATA_DIR"] = old
    store = features.feature_store(settings)
    store.apply([o for o in vars(defs).values() if isinstance(o, (Entity, StreamFeatureView, FeatureService))])
    return features.load_registry(settings, store)


@pytest.fixture(scope="session")
def apply_feature_repo() -> Callable[[Settings], features.FeatureRegistry]:
    """`apply_feature_repo(settings)` applies feature_repo/ to that data dir's registry and returns it loaded."""
    return _apply_in_process
