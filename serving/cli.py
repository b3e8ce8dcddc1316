"""Subcommand of the serving stage: serve."""

from __future__ import annotations

import argparse
import logging

from freshet.settings import DEFAULT_MODEL_NAME

log = logging.getLogger("freshet.serving")


def cmd_serve(args, settings) -> int:
    import dataclasses

    from freshet.endpoints import check_redis_mode, resolve_endpoints
    from freshet.errors import CliError
    from freshet.serving import auth, transport, workers

    if args.workers < 1:
        raise CliError(f"--workers must be at least 1, got {args.workers}")
    settings = resolve_endpoints(settings)
    check_redis_mode(settings)
    if args.port is not None or args.host is not None:
        settings = dataclasses.replace(settings, http_port=args.port or settings.http_port,
                                       http_host=args.host or settings.http_host)
    log.info("serving on %s://%s:%d (OpenAPI docs at /docs; tokens: FRESHET_API_TOKEN (admin), "
             "FRESHET_API_TOKEN_PREDICT, FRESHET_API_TOKEN_FEATURES, else the files %s-*)",
             transport.scheme(settings), settings.http_host, settings.http_port, auth.token_path(settings))
    return workers.run(settings, model_name=args.model, workers=args.workers)


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    p = sub.add_parser(
        "serve", help="HTTP API: online features, predictions, models, health, metrics",
        description="Feast-compatible POST /get-online-features, POST /predict, model admin, /health, "
                    "/ready and /metrics. Every endpoint but health, ready and metrics needs "
                    "'Authorization: Bearer <token>' of its scope: features (FRESHET_API_TOKEN_FEATURES), "
                    "predict (FRESHET_API_TOKEN_PREDICT) or admin (FRESHET_API_TOKEN, every scope). HTTPS with "
                    "FRESHET_HTTP_TLS_CERTFILE and FRESHET_HTTP_TLS_KEYFILE.")
    p.add_argument("--host", help="overrides FRESHET_HTTP_HOST")
    p.add_argument("--port", type=int, help="overrides FRESHET_HTTP_PORT")
    p.add_argument("--model", help=f"registered model name to serve (overrides FRESHET_MODEL_NAME, default {DEFAULT_MODEL_NAME})")
    p.add_argument("--workers", type=int, default=1,
                   help="serving processes sharing the port (SO_REUSEPORT), each with its own Redis and Kafka "
                        "clients; Ctrl-C stops them all (default: 1). /metrics answers for all of them.")
    handlers["serve"] = cmd_serve
