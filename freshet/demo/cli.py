"""Subcommands of the demo layer: demo (the main job) and produce (the workload alone)."""

from __future__ import annotations

import argparse

from freshet.demo import run, workload
from freshet.endpoints import resolve_endpoints


def cmd_produce(args, settings) -> int:
    return workload.main(args, resolve_endpoints(settings)) or 0


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
    run.register(sub, handlers)
    p = sub.add_parser("produce", help="publish the example card-transaction workload to Kafka")
    workload.add_arguments(p)
    handlers["produce"] = cmd_produce
