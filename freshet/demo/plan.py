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

# Defaults a bare `freshet demo` runs with: about 4 minutes of traffic after ~30 s of
# start-up, so the whole run (report included) stays within 5 minutes on 2 cores.
DEFAULT_MINUTES = 3.5
DEFAULT_RATE = 200.0          # events per wall second; the stream worker does ~500-1000/s here
DEFAULT_TIME_SCALE = 10.0     # simulated seconds per wall second: a 30 s label delay is 3 s
DEFAULT_CARDS = 10_000        # simulated rate / cards = 0.002/s keeps velocity a fraud signal
DEFAULT_DRIFT = ("covariate@1.5", "concept@2.5")
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
    ['--cards', '10000', '--drift', 'covariate@600']
    """

    minutes: float = DEFAULT_MINUTES
    rate: float = DEFAULT_RATE
    seed: int = 0
    drift: tuple[DemoDrift, ...] = ()
    time_scale: float = DEFAULT_TIME_SCALE
    cards: int = DEFAULT_CARDS
    predict_share: float = 1.0
    bootstrap_labels: int = 1000  # labelled transactions before the first model is asked for
    http_port: int = 0
    kafka_port: int = 0
    redis_port: int = 0

    @property
    def traffic_s(self) -> float:
        return self.minutes * 60.0

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

    def produce_args(self, topic: str, start_ts: float) -> list[str]:
        """The `freshet produce` options that play this plan's traffic, its drift in simulated seconds."""
        argv = ["--topic", topic, "--rate", f"{self.rate:g}", "--duration", f"{self.traffic_s:g}",
                "--seed", str(self.seed), "--time-scale", f"{self.time_scale:g}", "--start-ts",
                f"{start_ts:.6f}", "--cards", str(self.cards)]
        for d in self.drift:
            argv += ["--drift", f"{d.kind}@{d.sim_seconds(self.time_scale):g}"]
        return argv

    def monitor_config(self, registry: FeatureRegistry) -> tuple[dict[str, Any], int]:
        """What the demo asks `freshet monitor` to watch, and how many features it leaves out.

        A demo compresses time: its whole run is a fraction of the 1-hour and 1-day windows,
        so counts, sums, distinct counts, minima and maxima over those windows keep growing
        (or shrinking) as the windows fill and would raise drift alerts with no drift at all.
        The demo watches every feature that is stationary on its time scale (every function
        over windows under a third of the simulated run, means and last values over longer
        ones) plus the request's amount; and it shortens the retraining cooldown to a fifth
        of the run (at most 45 s) so that a drift after an early retraining is still
        answered by a promotion with time left to serve it.
        """
        horizon = self.traffic_s * self.time_scale / 3.0
        service = next(iter(registry.feature_services), None)
        refs = registry.feature_services.get(service) or [
            f"{v.name}:{f}" for v in registry.views.values() for f in v.feature_names]
        specs = {f"{v.name}:{a.name}": a for v in registry.views.values() for a in v.aggregations}
        watched = [r for r in refs if r in specs and (specs[r].window_s <= horizon
                                                      or specs[r].function in ("mean", "last"))]
        config = {"seed": self.seed,
                  "models": [{"model": MODEL, "numeric_features": [*watched, "amount"]}],
                  "policy": {"cooldown_s": round(min(45.0, self.traffic_s / 5.0), 1), "window_s": 120.0}}
        return config, len(refs) - len(watched)
