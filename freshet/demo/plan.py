"""What a `freshet demo` run is asked to do: its plan (traffic, drift injections, ports) and
the checks it passes before anything starts; DemoError, for a run that cannot go on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from freshet.demo.workload import read_drift
from freshet.settings import DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    from freshet.features import FeatureRegistry

# Defaults a bare `freshet demo` runs with: 6 minutes of traffic, so the concept drift at 2.75 min
# leaves 195 s of it for its retraining (40-80 s of label wait, then training) to be served; with
# the set-up, history and report, the whole run takes about 9-10 minutes on 2 cores.
DEFAULT_MINUTES = 6.0
DEFAULT_RATE = 50.0           # events per wall second, all of them scored over the API
DEFAULT_TIME_SCALE = 50.0     # simulated seconds per wall second: a 30 s label delay is 0.6 s, and the
                              # 6 minutes of traffic are 5 simulated hours. Serving reads an entity's
                              # features as of its newest event, so what happens to it while a
                              # transaction waits to be scored (a second, say) is in its features and
                              # not in the training set's: the faster simulated time runs, the more
DEFAULT_CARDS = 500           # simulated rate / cards = 0.002/s keeps velocity a fraud signal
DEFAULT_DRIFT = ("covariate@1", "concept@2.75")
HISTORY_BEYOND_WINDOW_S = 2 * 3600  # history beyond the longest window: the first model's training rows
BOOTSTRAP_HOURS = 2.0         # the first model trains on the newest this many hours of the history
HISTORY_SPEEDUP = 100         # history is published this many times faster than live traffic
MODEL = DEFAULT_MODEL_NAME    # the model the demo trains, serves and watches


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class DemoDrift:
    """A drift injection at a minute of traffic (wall clock, from the first event).

    >>> DemoDrift.parse("concept@2.5")
    DemoDrift(kind='concept', minute=2.5)
    >>> DemoDrift.parse("covariate@90s").minute
    1.5
    """

    kind: str
    minute: float

    @classmethod
    def parse(cls, text: str) -> "DemoDrift":
        """"KIND@MINUTE": a number of traffic minutes, or with an s/m/h suffix (DriftSpecError if not)."""
        return cls(*read_drift(text, unit="m"))

    def sim_seconds(self, time_scale: float) -> float:
        return self.minute * 60.0 * time_scale


@dataclass(frozen=True)
class DemoPlan:
    """What one demo run does: how much traffic, how fast, which drift when, on which ports.

    >>> plan = DemoPlan(minutes=2, rate=100, drift=(DemoDrift("covariate", 1.0),))
    >>> plan.produce_args("transactions", start_ts=1_700_000_000.0)[-4:]
    ['--cards', '500', '--drift', 'covariate@3000']
    >>> plan.produce_args("transactions", start_ts=1_700_000_000.0, skip=2000)[-4:]  # after 1000 s of history
    ['--skip', '2000', '--drift', 'covariate@4000']
    """

    minutes: float = DEFAULT_MINUTES
    rate: float = DEFAULT_RATE
    seed: int = 0
    drift: tuple[DemoDrift, ...] = ()
    time_scale: float = DEFAULT_TIME_SCALE
    cards: int = DEFAULT_CARDS
    predict_share: float = 1.0
    bootstrap_labels: int = 1000  # cold start only: labelled transactions before the first model is asked for
    # simulated hours of history published before live traffic (the first model is trained on
    # it); None: the longest feature window plus 3 hours; 0: a cold start
    history_hours: float | None = None
    http_port: int = 0
    kafka_port: int = 0
    redis_port: int = 0

    @property
    def traffic_s(self) -> float:
        return self.minutes * 60.0

    @property
    def sim_rate(self) -> float:
        """Events per simulated second."""
        return self.rate / self.time_scale

    @property
    def warm(self) -> bool:
        return self.history_hours is None or self.history_hours > 0

    def history_s(self, longest_window_s: float) -> float:
        """Simulated seconds of history before live traffic: enough that every window is full
        behind every row the first model trains on (its newest labels: a few hours' worth).

        >>> DemoPlan().history_s(86400.0), DemoPlan(history_hours=2).history_s(86400.0)
        (93600.0, 7200.0)
        """
        if self.history_hours is not None:
            return self.history_hours * 3600.0
        return float(longest_window_s + HISTORY_BEYOND_WINDOW_S)

    def history_events(self, history_s: float) -> int:
        return int(history_s * self.sim_rate)

    @property
    def bootstrap_labels_warm(self) -> int:
        """Labels the first model trains on after a history: its newest BOOTSTRAP_HOURS."""
        return max(2000, int(BOOTSTRAP_HOURS * 3600 * self.sim_rate))

    def history_args(self, topic: str, start_ts: float, events: int) -> list[str]:
        """`freshet produce` options that publish the history: the same world and clock as the
        live traffic, HISTORY_SPEEDUP times faster.

        >>> DemoPlan().history_args("transactions", 1_700_000_000.0, 1000)[:6]
        ['--topic', 'transactions', '--rate', '5000', '--time-scale', '5000']
        """
        k = HISTORY_SPEEDUP
        return ["--topic", topic, "--rate", f"{self.rate * k:g}", "--time-scale", f"{self.time_scale * k:g}",
                "--count", str(events), "--seed", str(self.seed), "--start-ts", f"{start_ts:.6f}",
                "--cards", str(self.cards), "--quiet"]

    def check(self) -> None:
        """Raise DemoError naming the option to change, before anything starts."""
        from freshet.app.stack import port_in_use

        for name, flag, port in (("HTTP API", "--http-port", self.http_port),
                                 ("Kafka broker", "--kafka-port", self.kafka_port),
                                 ("Redis", "--redis-port", self.redis_port)):
            if port and port_in_use(port):
                raise DemoError(f"port {port} for the {name} is in use; pick another ({flag}) or 0 for a free one")
        for d in self.drift:
            if d.minute >= self.minutes:
                raise DemoError(f"drift {d.kind}@{d.minute:g} is at or after the end of traffic "
                                f"(--minutes {self.minutes:g}); inject it earlier or run longer")

    def public(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["drift"] = [f"{d.kind}@{d.minute:g}" for d in self.drift]
        return out

    def produce_args(self, topic: str, start_ts: float, skip: int = 0) -> list[str]:
        """The `freshet produce` options that play this plan's traffic, its drift in simulated
        seconds; after `skip` events of history (published from the same `start_ts`)."""
        argv = ["--topic", topic, "--rate", f"{self.rate:g}", "--duration", f"{self.traffic_s:g}",
                "--seed", str(self.seed), "--time-scale", f"{self.time_scale:g}", "--start-ts",
                f"{start_ts:.6f}", "--cards", str(self.cards)]
        if skip:
            argv += ["--skip", str(skip)]
        offset = skip / self.sim_rate
        for d in self.drift:
            argv += ["--drift", f"{d.kind}@{offset + d.sim_seconds(self.time_scale):g}"]
        return argv

    def monitor_config(self, registry: FeatureRegistry) -> tuple[dict[str, Any], int]:
        """What the demo asks `freshet monitor` to watch, and how many of the model's features it leaves out.

        The features of the views keyed by card plus the request's amount and the score; each
        version is judged against the training reference logged with it. The merchant view is
        left out: a merchant's counts and sums follow its popularity (Zipf-like), rows of one
        merchant come in bunches (its bursts and sprees), and a reference of a few thousand of
        the newest training rows pins their quantiles down too loosely for a detector that
        treats rows as independent. Measured in a run: the served merchant values equalled the
        point-in-time recomputation (9% of 600 differed, by the events that arrived while the
        transaction waited to be scored), yet the middle quantiles of the 1,440-row reference
        sat 10-20% below those of the first 2,500 live predictions, and the monitor alerted on them.
        The windows tell the monitor how long a windowed feature needs before it means something
        when a version has no reference (the demo's predictions are timed by the wall clock, which
        runs `time_scale` times slower than event time, hence the windows divided by it). The
        retraining cooldown is a fifth of the run (at most 45 s) so that a drift after an earlier
        retraining is still answered by a promotion with time left to serve it.
        """
        service = next(iter(registry.feature_services), None)
        refs = registry.feature_services.get(service) or [
            f"{v.name}:{f}" for v in registry.views.values() for f in v.feature_names]
        in_place = {name for name, v in registry.views.items() if "card_id" in v.join_keys}
        watched = [r for r in refs if r.split(":")[0] in in_place]
        specs = {f"{v.name}:{a.name}": a for v in registry.views.values() for a in v.aggregations}
        windows = {r: round(specs[r].window_s / self.time_scale, 3) for r in watched if r in specs}
        config = {"seed": self.seed,
                  "models": [{"model": MODEL, "numeric_features": [*watched, "amount"], "windows": windows}],
                  "policy": {"cooldown_s": round(min(45.0, self.traffic_s / 5.0), 1), "window_s": 120.0}}
        return config, len(refs) - len(watched)
