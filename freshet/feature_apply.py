"""`freshet apply`'s registry step, run as `python -m freshet.feature_apply REPO` (a process of
its own, so feature_repo/definitions.py reads this deployment's environment).

It is `feast apply --no-promote` with one difference: a stream feature view whose definition
(`feature_versions.fingerprint`) is the active version's, or the pending version's, is handed to
Feast as the registry holds its active version, with the repo's metadata (description, tags,
owner, TTL). Feast 0.67 compares a view
read back from its registry unequal to the same view defined in Python (its mode, udf_string and
join key column differ in form) and would register a new version of every view at every apply.
A view whose definition changed becomes a new version that is not active: the stream builds it
and switches to it (freshet.feature_versions).
"""

from __future__ import annotations

import sys
from pathlib import Path

METADATA = ("description", "tags", "owner", "ttl", "online", "offline")


def main(argv: list[str]) -> int:
    import feast.repo_operations as ops
    from feast import FeatureStore
    from feast.repo_config import load_repo_config

    from freshet.features import fingerprint

    repo = Path(argv[0]).resolve()
    sys.path.append(str(repo))  # the repo's modules import each other, as under `feast apply`
    config = load_repo_config(repo, repo / "feature_store.yaml")
    parse_repo = ops.parse_repo

    def parse_unchanged_as_registered(root):
        contents = parse_repo(root)
        store = FeatureStore(config=config)
        views = contents.stream_feature_views
        for i, defined in enumerate(views):
            try:
                registered = store.registry.get_stream_feature_view(defined.name, config.project)
            except Exception:  # noqa: BLE001 - not registered yet: a new view, v0
                continue
            wanted = fingerprint(defined)
            newest = max((r["version_number"] for r in store.list_feature_view_versions(defined.name)), default=0)
            known = {fingerprint(registered)}
            if newest > (registered.current_version_number or 0):  # a pending version: already registered
                known.add(fingerprint(store.registry.get_feature_view_by_version(defined.name, config.project, newest)))
            if wanted in known:
                for attr in METADATA:
                    setattr(registered, attr, getattr(defined, attr))
                views[i] = registered
        return contents

    ops.parse_repo = parse_unchanged_as_registered
    ops.apply_total(config, repo, skip_source_validation=False, no_promote=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
