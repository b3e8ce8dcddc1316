"""Subcommand of the serving stage: serve."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("freshet.serving")


def cmd_serve(args, settings) -> int:
    import dataclasses

    from freshet.cli import resolve_endpoints
    from serving import app

    settings = resolve_endpoints(settings)
    if args.port is not None or args.host is not None:
        settings = dataclasses.replace(settings, http_port=args.port or settings.http_port,
                                       http_host=args.host or settings.http_host)
    log.info("serving on http://%s:%d (OpenAPI docs at /docs; token: FRESHET_API_TOKEN or %s)",
             settings.http_host, settings.http_port, app.token_path(settings))
    app.run(settings, model_name=args.model)
    return 0


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    p = sub.add_parser(
        "serve", help="HTTP API: online features, predictions, models, health, metrics",
        description="Feast-compatible POST /get-online-features, POST /predict, model admin, /health, "
                    "/ready and /metrics. Every endpoint but health, ready and metrics needs "
                    "'Authorization: Bearer <FRESHET_API_TOKEN>'.")
    p.add_argument("--host", help="overrides FRESHET_HTTP_HOST")
    p.add_argument("--port", type=int, help="overrides FRESHET_HTTP_PORT")
    p.add_argument("--model", default="fraud", help="registered model name to serve (default: fraud)")
    handlers["serve"] = cmd_serve
