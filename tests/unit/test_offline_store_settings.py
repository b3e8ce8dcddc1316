"""The offline store's and the shared registries' settings: what is refused at start-up, naming the
setting, and where a local store puts its parts (the embedded default unchanged)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from freshet.features import offline_root
from freshet.offline_store import OfflineStore
from freshet.settings import SettingsError, load_settings

S3 = {"FRESHET_OFFLINE_STORE": "s3://bucket/prefix", "FRESHET_S3_ENDPOINT_URL": "http://127.0.0.1:8333"}


@pytest.mark.parametrize("env, fragment", [
    ({"FRESHET_OFFLINE_STORE": "gs://bucket/x"}, "FRESHET_OFFLINE_STORE='gs://bucket/x'"),
    ({"FRESHET_OFFLINE_STORE": "s3:///prefix"}, "names no bucket"),
    ({"FRESHET_S3_ENDPOINT_URL": "http://127.0.0.1:8333"}, "FRESHET_S3_ENDPOINT_URL is set but neither"),
    ({**S3, "FRESHET_S3_ENDPOINT_URL": "127.0.0.1:8333"}, "FRESHET_S3_ENDPOINT_URL='127.0.0.1:8333' must look like"),
    ({**S3, "FRESHET_S3_ACCESS_KEY_ID": "k"}, "FRESHET_S3_ACCESS_KEY_ID and a secret key"),
    ({**S3, "FRESHET_S3_SECRET_ACCESS_KEY": "s"}, "FRESHET_S3_ACCESS_KEY_ID and a secret key"),
    ({**S3, "FRESHET_S3_ACCESS_KEY_ID": "k", "FRESHET_S3_SECRET_ACCESS_KEY": "s",
      "FRESHET_S3_SECRET_ACCESS_KEY_FILE": "/nonexistent"}, "are both set"),
    ({**S3, "FRESHET_S3_ACCESS_KEY_ID": "k", "FRESHET_S3_SECRET_ACCESS_KEY_FILE": "/nonexistent"},
     "FRESHET_S3_SECRET_ACCESS_KEY_FILE=/nonexistent is not a readable file"),
    ({"FRESHET_MLFLOW_ARTIFACT_STORE": "/srv/artifacts"}, "FRESHET_MLFLOW_ARTIFACT_STORE='/srv/artifacts': use s3://"),
    ({"FRESHET_FEAST_REGISTRY": "sqlite:///r.db"}, "FRESHET_FEAST_REGISTRY must look like postgresql://"),
])
def test_bad_offline_store_and_registry_settings_name_the_setting(env, fragment):
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    assert fragment in str(err.value)


def test_a_secret_key_file_others_may_read_is_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s")
    secret.chmod(0o644)
    env = {**S3, "FRESHET_S3_ACCESS_KEY_ID": "k", "FRESHET_S3_SECRET_ACCESS_KEY_FILE": str(secret)}
    with pytest.raises(SettingsError, match="may be read by others \\(mode 644\\): chmod 600"):
        load_settings(env)
    secret.chmod(0o600)
    assert load_settings(env).s3_secret_access_key_file == str(secret)


def test_the_secret_key_is_masked_and_the_default_store_is_the_data_dirs_offline_directory(tmp_path):
    s = load_settings({**S3, "FRESHET_S3_ACCESS_KEY_ID": "k", "FRESHET_S3_SECRET_ACCESS_KEY": "hidden",
                       "FRESHET_FEAST_REGISTRY": "postgresql://u:pw@db/feast"})
    assert s.public_view()["s3_secret_access_key"] == "***" and s.public_view()["feast_registry"] == "***"
    default = load_settings({}, data_dir=str(tmp_path / "data"))
    assert default.offline_store == "" and offline_root(default) == str(tmp_path / "data" / "offline")
    store = OfflineStore.of(default)
    assert store.is_local and str(store.raw("tx")) == str(tmp_path / "data" / "offline" / "raw" / "tx")
    assert os.fspath(store.raw("tx")) == str(store.raw("tx"))
    other = OfflineStore.of(load_settings({}, offline_store=str(tmp_path / "shared")))
    assert str(other.labels("l")) == str(tmp_path / "shared" / "labels" / "l")
    assert other.at("offline/labels/l") == other.labels("l")


def test_feast_apply_against_the_sql_registry_runs_on_a_copy_of_the_repo_naming_it(tmp_path):
    import yaml

    from freshet.features import _repo_for_sql_registry, repo_config

    settings = load_settings({}, data_dir=str(tmp_path / "data"),
                             feast_registry="postgresql://u:pw@db:5432/feast")
    copy = _repo_for_sql_registry(Path(settings.feature_repo).resolve(), tmp_path / "repo")
    raw = yaml.safe_load((copy / "feature_store.yaml").read_text())
    # the URL (with its password) stays in the environment; Feast substitutes it
    assert raw["registry"]["registry_type"] == "sql" and raw["registry"]["path"] == "${FRESHET_FEAST_REGISTRY}"
    assert (copy / "definitions.py").read_text() == (Path(settings.feature_repo) / "definitions.py").read_text()
    config = repo_config(settings).registry
    assert config.registry_type == "sql" and config.path == "postgresql+psycopg://u:pw@db:5432/feast"


def test_the_mlflow_database_password_is_masked_and_the_rest_of_its_url_shown():
    s = load_settings({"FRESHET_MLFLOW_TRACKING_URI": "postgresql://mlflow:pw-123@db:5432/mlflow"})
    assert s.public_view()["mlflow_tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    assert "pw-123" not in repr(s) and s.mlflow_uri == "postgresql://mlflow:pw-123@db:5432/mlflow"
    assert load_settings({}).public_view()["mlflow_tracking_uri"] == ""
