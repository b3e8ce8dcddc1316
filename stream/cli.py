"""Subcommands of the stream stage: stream, backfill, training-set."""

from __future__ import annotations

import argparse
import gc
import logging
import sys

log = logging.getLogger("freshet.stream")


def tune_collector() -> None:
    """The cyclic collector as a worker runs it (bench/engine_cpu.py too, to time what a worker does).

    Entity states are many small long-lived dicts and lists: with the default thresholds the
    collector walks all of them again and again (they hold no cycles freshet relies on
    collecting). Start-up objects are frozen out of its view altogether.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def cmd_stream(args, settings) -> int:
    from freshet import feature_versions, kafka
    from freshet.endpoints import check_redis_mode, resolve_endpoints
    from freshet.stream.engine import StreamEngine
    from freshet.stream.idempotence import stream_idempotence

    settings = resolve_endpoints(settings)
    check_redis_mode(settings)
    kafka.check_reachable(settings)
    # each view's active version and its pending one, if any (freshet.feature_versions)
    registry = feature_versions.stream_registry(settings)
    topics = list(registry.views_by_topic())
    kafka.ensure_topics(settings, [*topics, settings.topic_deadletter])
    idempotent = stream_idempotence(settings)
    metrics = None
    if settings.stream_metrics_port:
        from freshet.stream.metrics import StreamMetrics

        metrics = StreamMetrics()
        metrics.serve(settings.stream_metrics_port, settings.http_host)
        log.info("stream metrics on http://%s:%d/metrics", settings.http_host, settings.stream_metrics_port)
    engine = StreamEngine(settings, registry, app_id=args.app_id, idempotent=idempotent, metrics=metrics)
    log.info("stream worker %s: %d views on topics %s", args.app_id, len(registry.views), ", ".join(topics))
    for stored, (view, number, state) in registry.versions.items():
        if state == feature_versions.PENDING:
            log.info("feature view %s: version %d is pending; built from the raw log as partitions are taken (as "
                     "%s), active once every partition is built", view, number, stored)
    tune_collector()
    sys.argv = [sys.argv[0]]  # Faust's worker parses argv; ours is already parsed
    engine.run()
    return 0


def cmd_backfill(args, settings) -> int:
    from freshet.stream.backfill import main

    return main(args, settings)


def cmd_training_set(args, settings) -> int:
    from freshet.stream.backfill import training_set_main

    return training_set_main(args, settings)


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    p = sub.add_parser(
        "stream", help="run a stream worker computing the registry's stream feature views",
        description="Faust worker: consumes every KafkaSource topic of the registry's stream feature "
                    "views, writes features to Redis (Feast layout) and Parquet. Start more processes "
                    "with the same --app-id to share partitions.")
    p.add_argument("--app-id", default="freshet-stream", help="consumer group and table namespace")
    handlers["stream"] = cmd_stream

    p = sub.add_parser(
        "backfill", help="recompute features from the offline raw log (or a Parquet/CSV file)",
        description="Replays events through the same aggregation code as the stream, producing "
                    "point-in-time feature rows; --online also writes the latest values to Redis.")
    p.add_argument("--input", help="Parquet or CSV file of events (default: the offline raw log)")
    p.add_argument("--view", action="append", help="only these views (repeatable)")
    p.add_argument("--online", action="store_true", help="write the latest value per entity to Redis")
    p.add_argument("--output", help="write point-in-time feature rows to this Parquet file")
    handlers["backfill"] = cmd_backfill

    p = sub.add_parser(
        "training-set", help="join labels to features as of each label's time",
        description="Point-in-time correct training set: for every label row, every feature of the "
                    "feature service as of the label's timestamp, recomputed from the raw event log. "
                    "Rows with no events in a window get empty-window values, never dropped.")
    p.add_argument("--labels", required=True, help="Parquet/CSV with entity keys, event_ts and label")
    p.add_argument("--feature-service", default=None, help="default: the registry's only/first service")
    p.add_argument("--output", required=True, help="Parquet file to write")
    handlers["training-set"] = cmd_training_set
