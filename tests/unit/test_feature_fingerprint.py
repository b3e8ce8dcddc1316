"""What makes a feature view's definition a new version, and where each version is stored.

The fingerprint must be the same for a view as feature_repo/ defines it and as Feast's registry
gives it back (else every `freshet apply` would register a new version), and must change with
what the view computes, not with its metadata.
"""

from __future__ import annotations

import copy
import importlib.util
from datetime import timedelta
from pathlib import Path

import pytest
from feast.aggregation import Aggregation
from feast.infra.online_stores.helpers import _mmh3, compute_versioned_name

from freshet.features import fingerprint, stored_name
from freshet.redis_layout import OnlineLayout, ViewLayout

REPO = Path(__file__).resolve().parents[2] / "feature_repo"


@pytest.fixture(scope="module")
def definitions(tmp_path_factory):
    data = tmp_path_factory.mktemp("fv")
    mp = pytest.MonkeyPatch()
    mp.setenv("FRESHET_DATA_DIR", str(data))
    spec = importlib.util.spec_from_file_location("_fv_definitions", REPO / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mp.undo()
    return module, data


@pytest.fixture(scope="module")
def registered(definitions):
    """The card view as a file registry gives it back after `apply` (sqlite online store: no Redis)."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    module, data = definitions
    config = RepoConfig(project="fv", provider="local", registry=str(data / "registry.db"),
                        online_store={"type": "sqlite", "path": str(data / "online.db")},
                        offline_store={"type": "file"}, entity_key_serialization_version=3)
    store = FeatureStore(config=config)
    store.apply([module.card, module.merchant, module.card_txn_stats])
    return store.get_stream_feature_view("card_txn_stats")


def test_a_view_read_back_from_the_registry_has_the_fingerprint_it_was_defined_with(definitions, registered):
    defined = definitions[0].card_txn_stats
    assert fingerprint(registered) == fingerprint(defined)


def test_a_new_window_is_a_new_definition_and_metadata_is_not(definitions):
    defined = definitions[0].card_txn_stats
    renamed = copy.copy(defined)
    renamed.description, renamed.ttl, renamed.tags = "other words", timedelta(days=9), {"owner": "x"}
    assert fingerprint(renamed) == fingerprint(defined)
    wider = copy.copy(defined)
    wider.aggregations = [*defined.aggregations,
                          Aggregation(column="amount", function="sum", time_window=timedelta(minutes=10),
                                      slide_interval=timedelta(minutes=1))]
    assert fingerprint(wider) != fingerprint(defined)
    reordered = copy.copy(defined)
    reordered.aggregations = list(reversed(defined.aggregations))
    assert fingerprint(reordered) == fingerprint(defined)


def test_each_version_is_stored_where_feast_reads_it(registered):
    v2 = copy.copy(registered)
    v2.current_version_number = 2
    assert stored_name("card_txn_stats", 2) == compute_versioned_name(v2, True) == "card_txn_stats_v2"
    assert stored_name("card_txn_stats", 0) == compute_versioned_name(registered, True)
    layout = OnlineLayout("fv", {"card_txn_stats@v2": ViewLayout.from_feast(v2)})
    assert layout.ts_field("card_txn_stats@v2") == b"_ts:card_txn_stats_v2"
    codec = layout._codec("card_txn_stats@v2")
    assert codec.fields["sum_amount_300s"] == _mmh3("card_txn_stats_v2:sum_amount_300s")
