"""Online serving against Feast on the same data: in-process reads, HTTP features, HTTP predictions.

    python bench/serving.py [--quick] [--concurrency 50] [--duration S] [--rate 2000] [--workers N]
                            [--features-rate R] [--seed N] [--shadow] [--redis-cluster]

Everything runs on this machine, on loopback, on the embedded stack (Tansu + Valkey):
one Redis, one Feast registry, one model in MLflow (sqlite). Measured in one run:

- in-process: OnlineFeatureReader.read vs FeatureStore.get_online_features, 1 entity x
  20 features across 2 views, sequential calls; and a bare Redis PING's round trip with
  the thread sleeping on the socket and polling it (FRESHET_REDIS_POLL_US);
- HTTP /get-online-features (the same request) on `freshet serve` and on `feast serve`
  (Feast's own server), both started here as subprocesses with the same number of worker
  processes (--workers; `feast serve -w N`): first each one's maximum throughput (closed
  loop), then both at one offered rate they both sustain (open loop, --features-rate,
  by default half the slower one's maximum): the latency comparison;
- HTTP /predict (36 features from Redis + 1 request field, a StandardScaler +
  LogisticRegression from the registry, every prediction logged to Kafka): its maximum
  throughput (closed loop) and its latency at a fixed offered load (--rate, open loop);
- with --shadow, /predict again while a second version scores every request in shadow
  (`freshet models shadow`), then once more after it is cleared: `shadow_*_ratio` compare
  the shadow run with the mean of the runs before and after it;
- with --redis-cluster, the online store is a local Redis Cluster of three primaries
  (freshet.app.stack.LocalRedisCluster) instead of the embedded stack's one Redis: freshet
  serves with FRESHET_REDIS_CLUSTER=on (its fast reader splits each request's keys by
  primary) and `feast serve` with `redis_type: redis_cluster`; the JSON says `"redis": "cluster"`.

Latency at saturation is queueing (closed loop: mean latency = clients / throughput), so
latency is compared at a fixed rate, from the time each request was due, not from when a
busy client got round to sending it.

Every HTTP figure comes with its failed requests (non-2xx answers and connection errors,
`failed`, by status in `statuses`); latencies and req/s count 2xx answers only. A client
whose request fails opens a new connection and goes on, so the offered load holds. A run
with any failed request, or an offered rate a server answered less than 95% of within the
measured window (`answered_rps`), reports
`"ok": false` and exits 1. In-process reads raise on an error, which stops the bench.

The load generator is a separate process (asyncio + uvloop, raw HTTP/1.1 keep-alive, one
connection per client) so it does not share the server's interpreter; on a 2-core machine
it still shares the CPUs with the server and Redis, which the numbers include, and so does
anything else running: the JSON records the load average and each server's CPU (all its
processes) during each HTTP scenario. Progress goes to stderr; the last stdout line is one
JSON object: read_* are the in-process reads (read_speedup_vs_feast is the ratio of
medians), http_rps_ratio_vs_feast_serve compares saturated throughput, http_at_rate_*
latency at the same offered rate, predict_rps is /predict's saturated throughput and
predict_p99_ms its p99 at --rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Feast, MLflow and scikit-learn take ~25 s of CPU to import from source. Where bytecode is
# neither shipped (the Makefile compiles it) nor written (PYTHONDONTWRITEBYTECODE), cache it in
# a private directory, not in .venv, for this process and the servers it starts.
CHILD_ENV = dict(os.environ)
_feast = importlib.util.find_spec("feast")
if sys.dont_write_bytecode and _feast and not (Path(_feast.origin).parent / "__pycache__").is_dir():
    PYCACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "freshet" / "pycache"
    sys.dont_write_bytecode = False
    sys.pycache_prefix = str(PYCACHE)
    CHILD_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(PYCACHE)

TOKEN = "bench-token"
MODEL = "fraud"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def summary(latencies_s: list[float], seconds: float | None = None) -> dict:
    ms = [x * 1000 for x in latencies_s]
    out = {"n": len(ms), "p50_ms": round(pct(ms, 50), 4), "p99_ms": round(pct(ms, 99), 4),
           "p999_ms": round(pct(ms, 99.9), 4), "mean_ms": round(sum(ms) / max(1, len(ms)), 4)}
    if seconds:
        out["rps"] = round(len(ms) / seconds, 1)
    return out


# ---------------------------------------------------------------------------
# load generator (runs in its own process: `bench/serving.py --loadgen SPEC.json`)
# ---------------------------------------------------------------------------

async def _loadgen(spec: dict) -> dict:
    requests = [r.encode("latin-1") for r in spec["requests"]]
    host, port = spec["host"], spec["port"]
    conc, warmup, duration = spec["concurrency"], spec["warmup_s"], spec["duration_s"]
    clock = time.perf_counter
    start = clock()
    # a request belongs to the measured window by when it was due (open loop) or sent (closed)
    measure_from, stop_at = start + warmup, start + warmup + duration
    latencies: list[float] = []  # answered 2xx only: an error's latency is not a served request's
    statuses: dict[str, int] = {}
    errors: list[str] = []
    # answered (2xx) within the window, whenever sent: below the offered rate when a server falls behind
    counts = {"failed": 0, "errors": 0, "behind": 0, "in_flight": 0, "answered_in_window": 0}

    rate = spec.get("rate")  # total requests/s, open loop; None = closed loop (as fast as answered)
    interval = conc / rate if rate else 0.0

    async def exchange(reader, writer, req: bytes) -> int:
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        at = low.find(b"content-length:")
        if at < 0:
            raise ValueError("response without Content-Length")
        await reader.readexactly(int(low[at + 15:low.find(b"\r\n", at)]))
        return status

    async def client(i: int) -> None:
        reader = writer = None
        k = i * 7919
        due = clock() + (i / conc) * interval  # clients spread evenly over one interval
        while True:
            req = requests[k % len(requests)]
            k += 1
            if rate:
                # latency counts from when the request was due, so a slow answer that delays
                # the next request is charged to it (no coordinated omission)
                t0, due = due, due + interval
                if t0 >= stop_at:
                    break
                wait = t0 - clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif t0 >= measure_from:
                    counts["behind"] += 1  # sent late: the offered rate was not kept up
            else:
                t0 = clock()
                if t0 >= stop_at:
                    break
            status = None
            measured = t0 >= measure_from
            counts["in_flight"] += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                status = await exchange(reader, writer, req)
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                # the client goes on (a new connection for the next request): one that stopped
                # would lower the offered load and hide every later failure
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
            t1 = clock()
            counts["in_flight"] -= 1
            if measured:
                key = "error" if status is None else str(status)
                statuses[key] = statuses.get(key, 0) + 1
                if status is not None and 200 <= status < 300:
                    latencies.append(t1 - t0)
                else:
                    counts["failed"] += 1
                    counts["errors"] += status is None
            if status is not None and 200 <= status < 300 and measure_from <= t1 < stop_at:
                counts["answered_in_window"] += 1
            if status is None and not rate:
                await asyncio.sleep(0.01)  # closed loop: no busy loop on a refused connection
        if writer is not None:
            writer.close()

    clients = asyncio.gather(*(client(i) for i in range(conc)))
    try:
        # a server that stops answering must not stop the bench: requests still open then fail
        await asyncio.wait_for(clients, timeout=warmup + duration + 10)
    except asyncio.TimeoutError:
        # a request sent in the warm-up that never came back stalled its client in the run too
        counts["failed"] += counts["in_flight"]
        statuses["timeout"] = counts["in_flight"]
        errors.append(f"{counts['in_flight']} requests still unanswered 10 s after the end of the run")
    return {"latencies": latencies, "statuses": statuses, "errors": errors, "counts": counts, "seconds": duration}


def loadgen_main(spec_path: str) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    spec = json.loads(Path(spec_path).read_text())
    result = asyncio.run(_loadgen(spec))
    Path(spec["out"]).write_text(json.dumps(result))


def http_request(path: str, body: dict, token: str | None) -> str:
    raw = json.dumps(body, separators=(",", ":"))
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(raw.encode())}\r\n\r\n{raw}")


def run_load(port: int, requests: list[str], concurrency: int, warmup_s: float, duration_s: float,
             workdir: Path, label: str, rate: float | None = None) -> dict:
    spec = {"host": "127.0.0.1", "port": port, "requests": requests, "concurrency": concurrency,
            "warmup_s": warmup_s, "duration_s": duration_s, "rate": rate, "out": str(workdir / f"{label}.out.json")}
    spec_path = workdir / f"{label}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--loadgen", str(spec_path)], env=CHILD_ENV,
                          timeout=warmup_s + duration_s + 60, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    raw = json.loads(Path(spec["out"]).read_text())
    out = summary(raw["latencies"], raw["seconds"])
    out.update(failed=raw["counts"]["failed"], connection_errors=raw["counts"]["errors"], statuses=raw["statuses"])
    if rate:
        out.update(offered_rps=rate, answered_rps=round(raw["counts"]["answered_in_window"] / raw["seconds"], 1),
                   sent_behind_schedule=raw["counts"]["behind"])
    if raw["errors"]:
        out["first_errors"] = raw["errors"]
    return out


# ---------------------------------------------------------------------------
# the system under test
# ---------------------------------------------------------------------------

def apply_repo(settings) -> None:
    """Apply feature_repo/ in-process (Feast's own objects), which skips the ~10 s `feast` CLI start."""
    from freshet import features

    os.environ.update(features.feast_env(settings))
    spec = importlib.util.spec_from_file_location("freshet_bench_definitions",
                                                  features.repo_path(settings) / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from feast import Entity, FeatureService, FeatureView
    from feast.stream_feature_view import StreamFeatureView

    objects = [v for v in vars(module).values()
               if isinstance(v, (Entity, FeatureView, StreamFeatureView, FeatureService))]
    features.feature_store(settings).apply(objects)


def populate(settings, cards: int, merchants: int, seed: int) -> tuple[list[str], list[str]]:
    from freshet.endpoints import redis_client
    from freshet.features import load_registry
    from freshet.redis_layout import OnlineLayout

    rng = random.Random(seed)
    registry = load_registry(settings)
    layout = OnlineLayout.from_registry(registry)
    client = redis_client(settings)
    now = time.time()
    card_ids = [f"card-{i:06d}" for i in range(cards)]
    merchant_ids = [f"merchant-{i:05d}" for i in range(merchants)]

    def rows(view, keys):
        spec = registry.views[view]
        for k in keys:
            yield (k,), {a.name: (rng.randint(0, 50) if a.dtype == "INT64" else round(rng.uniform(0, 500), 2))
                         for a in spec.aggregations}, now - rng.uniform(0, 600)

    for view, keys in (("card_txn_stats", card_ids), ("merchant_txn_stats", merchant_ids)):
        batch = list(rows(view, keys))
        for i in range(0, len(batch), 2000):
            layout.write(client, view, batch[i:i + 2000])
    return card_ids, merchant_ids


def register_model(settings, seed: int) -> list[str]:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from freshet.features import load_registry
    from freshet.models import ModelRegistry

    reg = load_registry(settings)
    names = [*reg.feature_services["fraud_model_v1"], "amount"]
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 500, size=(2000, len(names)))
    y = (x[:, 1] + x[:, -1] + rng.normal(0, 100, 2000) > 500).astype(int)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    models = ModelRegistry(settings)
    version = models.register_sklearn(MODEL, pipe, names, {"feature_service": "fraud_model_v1", "seed": seed,
                                                           "dataset_fingerprint": "bench-synthetic"},
                                      {"train_accuracy": float(pipe.score(x, y))})
    models.promote(MODEL, version)
    return names


def register_shadow(settings, names: list[str], seed: int) -> str:
    """A second version over the same inputs (another sample, so other coefficients), set as the shadow."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from freshet.models import ModelRegistry

    rng = np.random.default_rng(seed + 1)
    x = rng.uniform(0, 500, size=(2000, len(names)))
    y = (x[:, 2] + x[:, -1] + rng.normal(0, 100, 2000) > 500).astype(int)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    models = ModelRegistry(settings)
    version = models.register_sklearn(MODEL, pipe, names, {"feature_service": "fraud_model_v1", "seed": seed + 1,
                                                           "dataset_fingerprint": "bench-synthetic-shadow"},
                                      {"train_accuracy": float(pipe.score(x, y))})
    models.set_challenger(MODEL, "shadow", version)
    return str(version)


def wait_shadow(port: int, wanted: str | None, timeout: float) -> None:
    """Until the server's /ready says it scores `wanted` in shadow (None: no shadow)."""
    import httpx

    deadline, doc = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        doc = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5, headers={"Authorization": f"Bearer {TOKEN}"}).json()
        if (doc.get("challengers") or {}).get("shadow") == wanted:
            return
        time.sleep(0.25)
    raise RuntimeError(f"the server did not switch its shadow to {wanted} within {timeout:.0f}s: /ready says {doc}")


class Servers:
    """The two HTTP servers under test, as child processes this bench owns."""

    def __init__(self, settings, workdir: Path):
        self.settings = settings
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, cmd: list[str], env: dict, name: str) -> subprocess.Popen:
        logf = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_freshet(self, port: int, workers: int = 1) -> subprocess.Popen:
        s = self.settings
        env = {**CHILD_ENV, "PYTHONPATH": str(ROOT), "FRESHET_KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers,
               "FRESHET_REDIS_URL": s.redis_url, "FRESHET_REDIS_CLUSTER": s.redis_cluster,
               "FRESHET_DATA_DIR": str(s.data_path),
               "FRESHET_FEATURE_REPO": s.feature_repo, "FRESHET_HTTP_PORT": str(port),
               "FRESHET_HTTP_HOST": "127.0.0.1", "FRESHET_API_TOKEN": TOKEN, "FRESHET_LOG_LEVEL": "WARNING"}
        code = ("import logging; logging.basicConfig(level='WARNING'); from freshet.settings import load_settings; "
                f"from freshet.serving.workers import run; run(load_settings(), workers={workers})")
        return self._spawn([sys.executable, "-c", code], env, "freshet-serve")

    def start_feast(self, port: int, workers: int = 1) -> subprocess.Popen:
        from freshet import features

        env = {**CHILD_ENV, **features.feast_env(self.settings)}
        feast = str(Path(sys.executable).with_name("feast"))
        repo = self.settings.feature_repo
        if self.settings.redis_cluster == "on":  # the repo as `freshet apply` deploys it: redis_type redis_cluster
            repo = str(features._repo_for_sql_registry(Path(repo), self.workdir / "feature_repo", self.settings))
        return self._spawn([feast, "-c", repo, "serve", "-h", "127.0.0.1", "-p", str(port),
                     "--no-access-log", "-w", str(workers), "--max-requests", "100000000"], env, "feast-serve")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def wait_http(url: str, timeout: float, headers: dict | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, headers=headers or {}, timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s: {last}")


def _cpu_seconds(session: int) -> float:
    """CPU seconds used so far by the live processes of a session: a server started with
    start_new_session and its workers (`--workers`, gunicorn's), which are its children."""
    from freshet.endpoints import proc_stat

    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = proc_stat(int(entry.name))
        except OSError:  # gone meanwhile
            continue
        if fields[3] == str(session):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_quiet(pids: list[int], timeout: float, window: float = 0.5, busy: float = 0.05) -> float:
    """Until the servers have finished booting (below `busy` of a core over `window`), so the
    in-process reads do not share the two CPUs with their start-up; returns the seconds waited."""
    started = time.monotonic()
    before = sum(_cpu_seconds(p) for p in pids)
    while time.monotonic() - started < timeout:
        time.sleep(window)
        now = sum(_cpu_seconds(p) for p in pids)
        if now - before < busy * window:
            break
        before = now
    return time.monotonic() - started


def wait_workers(port: int, workers: int, timeout: float) -> None:
    """Until every worker answers /predict: generated request ids start with a per-process prefix."""
    import httpx

    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    body = {"entities": {"card_id": "card-000000", "merchant_id": "merchant-00000"}}
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(seen)} of {workers} workers answered after {timeout:.0f}s")
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json=body, timeout=5,  # a new connection each time
                       headers={"Authorization": f"Bearer {TOKEN}"})
        if r.status_code == 200:
            seen.add(r.json()["request_id"][:16])
        else:
            time.sleep(0.2)


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------

def bench_in_process(settings, store, refs, cards, merchants, iterations: int, seed: int) -> dict:
    from freshet.serving.online import OnlineFeatureReader

    rng = random.Random(seed)
    reader = OnlineFeatureReader(settings, store=store)
    plan = reader.plan(refs, full_feature_names=True)
    pairs = [(rng.choice(cards), rng.choice(merchants)) for _ in range(iterations)]
    # same answers first
    for c, m in pairs[:50]:
        ours = reader.read(plan, {"card_id": [c], "merchant_id": [m]})
        theirs = store.get_online_features(features=refs, entity_rows=[{"card_id": c, "merchant_id": m}],
                                           full_feature_names=True).to_dict()
        assert all(theirs[n] == v for n, v in zip(ours.feature_names, ours.values)), "values differ from Feast"
    clock = time.perf_counter
    for c, m in pairs[:200]:  # warm both
        reader.read(plan, {"card_id": [c], "merchant_id": [m]})
        store.get_online_features(features=refs, entity_rows=[{"card_id": c, "merchant_id": m}],
                                  full_feature_names=True)
    ours_lat, feast_lat = [], []
    # interleaved in blocks so both see the same machine conditions
    block = 100
    feast_every = 4  # Feast is ~10x slower: fewer Feast calls keep the run bounded
    for b in range(0, iterations, block):
        for c, m in pairs[b:b + block]:
            t0 = clock()
            reader.read(plan, {"card_id": [c], "merchant_id": [m]})
            ours_lat.append(clock() - t0)
        if (b // block) % feast_every == 0:
            for c, m in pairs[b:b + block]:
                t0 = clock()
                store.get_online_features(features=refs, entity_rows=[{"card_id": c, "merchant_id": m}],
                                          full_feature_names=True)
                feast_lat.append(clock() - t0)
    reader.close()
    return {"freshet": summary(ours_lat), "feast": summary(feast_lat), **redis_round_trips(reader, 2000)}


def redis_round_trips(reader, n: int) -> dict:
    """A bare PING's round trip, with the thread sleeping on the socket and polling it first:
    the floor under any read, and what FRESHET_REDIS_POLL_US buys."""
    from freshet.serving.online import RespConnection

    ping, clock = b"*1\r\n$4\r\nPING\r\n", time.perf_counter
    out = {}
    for label, poll_s in (("ping_waiting", 0.0), ("ping_polling", reader.sync.poll_s)):
        conn, lat = RespConnection(reader.endpoint, poll_s=poll_s), []
        for _ in range(n):
            t0 = clock()
            conn.execute(ping, 1)
            lat.append(clock() - t0)
        conn.close()
        out[label] = summary(lat)
    return out


def shadow_cost(http: dict) -> dict:
    """/predict with a shadow against the mean of the runs before and after it."""
    def ratio(key: str, field: str) -> float:
        without = (http[f"freshet_predict{key}"][field] + http[f"freshet_predict_after{key}"][field]) / 2
        return round(http[f"freshet_predict_shadow{key}"][field] / max(without, 1e-9), 3)

    return {"http_predict_shadow_saturated": http["freshet_predict_shadow"],
            "http_predict_shadow_at_rate": http["freshet_predict_shadow_at_rate"],
            "http_predict_after_saturated": http["freshet_predict_after"],
            "http_predict_after_at_rate": http["freshet_predict_after_at_rate"],
            "shadow_rps_ratio": ratio("", "rps"),
            "shadow_p99_ratio_at_rate": ratio("_at_rate", "p99_ms"),
            "shadow_cpu_ratio_at_rate": ratio("_at_rate", "server_cores")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 60 s) for CI")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--duration", type=float, help="seconds measured per HTTP scenario (default 15, quick 2.5)")
    ap.add_argument("--rate", type=float, default=2000.0,
                    help="offered load (req/s, open loop) at which /predict latency is measured")
    ap.add_argument("--workers", type=int, default=1,
                    help="freshet serve processes sharing the port, and `feast serve -w` workers alike")
    ap.add_argument("--features-rate", type=float,
                    help="offered load (req/s, open loop) at which both servers' /get-online-features latency is "
                         "compared (default: half the slower server's maximum, rounded down to 50)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--shadow", action="store_true",
                    help="then /predict again with a second version scoring every request in shadow, between "
                         "two runs without it: what a shadow costs")
    ap.add_argument("--redis-cluster", action="store_true",
                    help="the online store on a local three-primary Redis Cluster instead of one Redis")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs of both servers)")
    ap.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loadgen:
        loadgen_main(args.loadgen)
        return 0

    started = time.monotonic()
    duration = args.duration or (2.5 if args.quick else 15.0)
    warmup = 0.5 if args.quick else 3.0
    iterations = 3000 if args.quick else 20000
    workdir = Path(tempfile.mkdtemp(prefix="freshet-bench-serving-"))
    log(f"work dir {workdir}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")

    from freshet.settings import load_settings
    from freshet.app.stack import EmbeddedStack, free_port

    stack = EmbeddedStack(workdir / "stack")
    endpoints = stack.start()
    servers = cluster = None
    try:
        redis_url, redis_cluster = endpoints.redis_url, "off"
        if args.redis_cluster:
            from freshet.app.stack import LocalRedisCluster

            cluster = LocalRedisCluster(workdir / "cluster").start()
            redis_url, redis_cluster = cluster.url, "on"
            log(f"Redis Cluster: primaries on ports {cluster.ports}")
        settings = load_settings({}, kafka_bootstrap_servers=endpoints.kafka, redis_url=redis_url,
                                 redis_cluster=redis_cluster, data_dir=str(workdir / "data"),
                                 feature_repo=str(ROOT / "feature_repo"), log_level="WARNING")
        log(f"embedded stack: kafka {endpoints.kafka}, redis {redis_url}")
        apply_repo(settings)
        from freshet.features import feature_store, load_registry

        # Both servers boot (each imports Feast, ~10 s of CPU here) while the data is written;
        # freshet's picks the model up from the freshet.models event when it is promoted.
        servers = Servers(settings, workdir)
        ours_port, feast_port = free_port(), free_port()
        feast_proc = servers.start_feast(feast_port, args.workers)
        ours_proc = servers.start_freshet(ours_port, args.workers)
        store = feature_store(settings)
        cards, merchants = populate(settings, 2000 if args.quick else 20000, 500 if args.quick else 2000, args.seed)
        log(f"applied feature_repo, wrote {len(cards)} cards and {len(merchants)} merchants "
            f"({time.monotonic() - started:.0f}s)")
        model_features = register_model(settings, args.seed)
        log(f"registered and promoted model {MODEL} with {len(model_features)} inputs "
            f"({time.monotonic() - started:.0f}s)")

        reg = load_registry(settings, store)
        refs = [f"card_txn_stats:{f}" for f in reg.views["card_txn_stats"].feature_names[:10]] + \
               [f"merchant_txn_stats:{f}" for f in reg.views["merchant_txn_stats"].feature_names[:10]]

        # Both in-process readers run in this process: spare them the full collections over
        # Feast's and MLflow's ~300k long-lived objects (`freshet serve` does the same at start)
        import gc

        gc.collect()
        gc.freeze()
        wait_http(f"http://127.0.0.1:{ours_port}/ready", 120)
        wait_http(f"http://127.0.0.1:{feast_port}/health", 120)
        if args.workers > 1:
            wait_workers(ours_port, args.workers, 120)
        waited = wait_quiet([p.pid for p in servers.procs], 60)
        log(f"both servers up ({time.monotonic() - started:.0f}s), idle after {waited:.1f}s more; "
            f"in-process reads, {iterations} calls")
        in_proc = bench_in_process(settings, store, refs, cards, merchants, iterations, args.seed)
        log(f"in-process: freshet p50 {in_proc['freshet']['p50_ms']:.3f} ms p99 {in_proc['freshet']['p99_ms']:.3f}"
            f" ms; feast p50 {in_proc['feast']['p50_ms']:.3f} ms p99 {in_proc['feast']['p99_ms']:.3f} ms; "
            f"Redis PING p50 {in_proc['ping_waiting']['p50_ms']:.3f} ms sleeping on the socket, "
            f"{in_proc['ping_polling']['p50_ms']:.3f} ms polling it")

        rng = random.Random(args.seed)
        feature_bodies = [{"features": refs, "full_feature_names": True,
                           "entities": {"card_id": [rng.choice(cards)], "merchant_id": [rng.choice(merchants)]}}
                          for _ in range(512)]
        predict_bodies = [{"entities": {"card_id": rng.choice(cards), "merchant_id": rng.choice(merchants)},
                           "fields": {"amount": round(rng.uniform(1, 900), 2)}} for _ in range(512)]

        # the same request answers the same on both servers
        import httpx

        b = feature_bodies[0]
        ours_doc = httpx.post(f"http://127.0.0.1:{ours_port}/get-online-features", json=b,
                              headers={"Authorization": f"Bearer {TOKEN}"}).json()
        feast_doc = httpx.post(f"http://127.0.0.1:{feast_port}/get-online-features", json=b).json()
        ours_vals = dict(zip(ours_doc["metadata"]["feature_names"], (r["values"] for r in ours_doc["results"])))
        feast_vals = dict(zip(feast_doc["metadata"]["feature_names"], (r["values"] for r in feast_doc["results"])))
        assert ours_vals == feast_vals, "freshet serve and feast serve answered differently"

        http = {}
        pids = {ours_port: ours_proc.pid, feast_port: feast_proc.pid}  # each server's session

        def measure(label: str, port: int, path: str, bodies: list[dict], token: str | None,
                    rate: float | None) -> dict:
            mode = f"open loop at {rate:g} req/s" if rate else "closed loop"
            log(f"HTTP {label}: {args.concurrency} clients, {mode}, {warmup:g}s warm-up + {duration:g}s")
            reqs = [http_request(path, body, token) for body in bodies]
            cpu_before, wall_before = _cpu_seconds(pids[port]), time.monotonic()
            h = http[label] = run_load(port, reqs, args.concurrency, warmup, duration, workdir, label, rate)
            # the server's CPU over warm-up and run, per request answered in that time (approximate:
            # the warm-up's requests are not counted, so this slightly overstates it)
            cpu = _cpu_seconds(pids[port]) - cpu_before
            h["server_cores"] = round(cpu / (time.monotonic() - wall_before), 2)
            done = f"{h['answered_rps']:.0f} of {rate:g} req/s answered 2xx in time" if rate \
                else f"{h['rps']:.0f} req/s answered 2xx"
            log(f"  {done}, p50 {h['p50_ms']:.2f} ms, p99 {h['p99_ms']:.2f} ms, p999 {h['p999_ms']:.2f} ms, "
                f"failed {h['failed']} (statuses {h['statuses']}), server {h['server_cores']} cores"
                + (f", {h['sent_behind_schedule']} sent behind schedule" if rate else ""))
            return h

        # 1. maximum throughput of each server (closed loop: latency here is queueing)
        ours_sat = measure("freshet_features", ours_port, "/get-online-features", feature_bodies, TOKEN, None)
        feast_sat = measure("feast_features", feast_port, "/get-online-features", feature_bodies, None, None)
        # 2. latency of both at one offered rate that both sustain: half the slower one's maximum
        features_rate = args.features_rate or max(50.0, (min(ours_sat["rps"], feast_sat["rps"]) * 0.5) // 50 * 50)
        measure("freshet_features_at_rate", ours_port, "/get-online-features", feature_bodies, TOKEN, features_rate)
        measure("feast_features_at_rate", feast_port, "/get-online-features", feature_bodies, None, features_rate)
        # 3. /predict: maximum throughput, and latency at --rate
        measure("freshet_predict", ours_port, "/predict", predict_bodies, TOKEN, None)
        measure("freshet_predict_at_rate", ours_port, "/predict", predict_bodies, TOKEN, args.rate)
        if args.shadow:
            # without, with, without again: the with-shadow run is compared with the runs around it
            shadow_version = register_shadow(settings, model_features, args.seed)
            wait_shadow(ours_port, shadow_version, 60)
            log(f"version {shadow_version} scores every /predict request in shadow")
            measure("freshet_predict_shadow", ours_port, "/predict", predict_bodies, TOKEN, None)
            measure("freshet_predict_shadow_at_rate", ours_port, "/predict", predict_bodies, TOKEN, args.rate)
            from freshet.models import ModelRegistry

            ModelRegistry(settings).clear_challenger(MODEL, "shadow")
            wait_shadow(ours_port, None, 60)
            log("shadow cleared")
            measure("freshet_predict_after", ours_port, "/predict", predict_bodies, TOKEN, None)
            measure("freshet_predict_after_at_rate", ours_port, "/predict", predict_bodies, TOKEN, args.rate)
        metrics = httpx.get(f"http://127.0.0.1:{ours_port}/metrics").text
        logged = next((float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("freshet_predictions_logged_total")), 0.0)
        dropped = sum(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("freshet_predictions_dropped_total"))
    finally:
        if servers is not None:
            servers.stop()
        if cluster is not None:
            cluster.stop()
        stack.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    f_in, k_in = in_proc["freshet"], in_proc["feast"]
    ours_h, feast_h = http["freshet_features"], http["feast_features"]
    ours_r, feast_r = http["freshet_features_at_rate"], http["feast_features_at_rate"]
    sat_h, rate_h = http["freshet_predict"], http["freshet_predict_at_rate"]
    failed = {label: h["failed"] for label, h in http.items()}
    # open loop: every request due in the window is counted, so `rps` is the offered rate; whether the
    # server kept up shows in what it answered within the window
    sustained = {label: h["answered_rps"] >= 0.95 * h["offered_rps"] for label, h in http.items()
                 if "offered_rps" in h}
    result = {
        "bench": "serving",
        # a run with any failed request, or an offered rate a server did not keep up with, failed
        "ok": not any(failed.values()) and all(sustained.values()),
        "failed_requests": failed,
        "offered_rate_sustained": sustained,
        "quick": args.quick,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "redis": "cluster" if args.redis_cluster else "one",
        "feast_serve_workers": args.workers,
        "duration_s": duration,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "read_features": "1 entity x 20 features across 2 views",
        # in-process reads: a call that raised would have stopped the bench, so these have 0 errors
        "read_p50_ms": f_in["p50_ms"],
        "read_p99_ms": f_in["p99_ms"],
        "read_p999_ms": f_in["p999_ms"],
        "feast_read_p50_ms": k_in["p50_ms"],
        "feast_read_p99_ms": k_in["p99_ms"],
        "read_speedup_vs_feast": round(k_in["p50_ms"] / f_in["p50_ms"], 2),
        "read_p99_speedup_vs_feast": round(k_in["p99_ms"] / f_in["p99_ms"], 2),
        "read_redis_poll_us": settings.redis_poll_us,
        "redis_ping_p50_ms_waiting": in_proc["ping_waiting"]["p50_ms"],
        "redis_ping_p50_ms_polling": in_proc["ping_polling"]["p50_ms"],
        # /get-online-features, saturated (closed loop): throughput; its latency is queueing
        "http_features": ours_h,
        "feast_serve_features": feast_h,
        "http_rps_ratio_vs_feast_serve": round(ours_h["rps"] / max(feast_h["rps"], 1e-9), 2),
        "http_p99_ratio_vs_feast_serve": round(ours_h["p99_ms"] / feast_h["p99_ms"], 3),
        # /get-online-features at one offered rate both sustain (open loop): latency
        "features_rate_rps": features_rate,
        "http_features_at_rate": ours_r,
        "feast_serve_features_at_rate": feast_r,
        "http_at_rate_p50_ratio_vs_feast_serve": round(ours_r["p50_ms"] / feast_r["p50_ms"], 3),
        "http_at_rate_p99_ratio_vs_feast_serve": round(ours_r["p99_ms"] / feast_r["p99_ms"], 3),
        "http_at_rate_cpu_ratio_vs_feast_serve": round(ours_r["server_cores"] / max(feast_r["server_cores"], 1e-9), 3),
        # /predict: max throughput from the closed loop; latency at the offered rate (open loop)
        "http_predict_saturated": sat_h,
        "http_predict_at_rate": rate_h,
        "predict_rps": sat_h["rps"],
        "predict_p50_ms": rate_h["p50_ms"],
        "predict_p99_ms": rate_h["p99_ms"],
        "predict_p999_ms": rate_h["p999_ms"],
        "predict_rate_rps": args.rate,
        "predict_saturated_p99_ms": sat_h["p99_ms"],
        "predictions_logged": logged,
        "predictions_dropped": dropped,
        # /metrics is per process: with several workers these are the counts of whichever answered
        "predictions_counted_by": "the server" if args.workers == 1 else f"one of {args.workers} workers",
        "targets": {
            "no_failed_requests": not any(failed.values()),
            "read_p99_le_0.3ms": f_in["p99_ms"] <= 0.3,
            "read_speedup_ge_5x": k_in["p50_ms"] / f_in["p50_ms"] >= 5,
            "predict_p99_le_5ms_at_2000rps": rate_h["p99_ms"] <= 5 and args.rate >= 2000 and rate_h["failed"] == 0
                                             and sustained["freshet_predict_at_rate"],
            "predict_rps_ge_2000": sat_h["rps"] >= 2000 and sat_h["failed"] == 0,
            "http_rps_ge_5x_feast_serve": ours_h["rps"] >= 5 * feast_h["rps"] and ours_h["failed"] == 0,
            "http_p99_no_worse_than_feast_serve_at_same_rate": ours_r["p99_ms"] <= feast_r["p99_ms"]
                                                                and ours_r["failed"] == 0,
        },
        **(shadow_cost(http) if args.shadow else {}),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
