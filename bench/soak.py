"""Soak: mixed load on the embedded stack for minutes, watching memory, latency per minute and failures.

    python bench/soak.py [--quick] [--duration S] [--stream-rate 2000] [--predict-rate 1000]
                         [--features-rate 500] [--promote-every 120]

Runs, each as its own process on loopback: the embedded Tansu broker and Valkey, `freshet stream`,
`freshet serve`, `freshet monitor`, `freshet produce` (card transactions and their labels at
--stream-rate events/s), and two open-loop HTTP load generators: /predict at --predict-rate and
/get-online-features at --features-rate requests/s (latency counted from when a request was
due, so a stall is charged to the requests it delays). Every --promote-every seconds a new
version is trained (`freshet retrain --once --force`, falling back to a model fitted here on
synthetic data when the labels so far do not make a training set) and promoted through the
admin API, which gates it; the serving process hot-swaps under load.

Every 5 s the RSS of every process is sampled. The last stdout line is one JSON object:
`rss_mb` per process and minute, `rss_growth` per process from the end of minute 2 (minute 1
with --quick, which runs 2 minutes) to the end, `p99_ms` per endpoint and minute (and
`p99_worst_over_first`: the worst minute over the first), `errors` (non-2xx answers and
connection errors, by endpoint and status), `failed_during_promotions` (failed requests due
within 1 s before to 5 s after a promotion), the rates achieved and the load average.
The machine's other work shares the CPUs: read the numbers with `loadavg`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FRESHET = str(Path(sys.executable).with_name("freshet"))
TOKENS = {"admin": "soak-admin", "predict": "soak-predict", "features": "soak-features"}
MODEL = "fraud"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q / 100 * len(s)))] * 1000, 3)


# ---------------------------------------------------------------------------
# the load generator (its own process: `bench/soak.py --loadgen SPEC.json`)
# ---------------------------------------------------------------------------

async def _loadgen(spec: dict) -> dict:
    """Open loop at spec["rate"] requests/s over spec["concurrency"] keep-alive connections.

    Returns, per request due in the run: (seconds since the start it was due, latency or None, status).
    """
    requests = [r.encode("latin-1") for r in spec["requests"]]
    conc, rate, duration = spec["concurrency"], spec["rate"], spec["duration_s"]
    interval = conc / rate
    start = time.perf_counter() + 0.5
    stop_at = start + duration
    results: list[tuple[float, float | None, str]] = []
    in_flight = [0]

    async def exchange(reader, writer, req: bytes) -> int:
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        low = head.lower()
        at = low.find(b"content-length:")
        await reader.readexactly(int(low[at + 15:low.find(b"\r\n", at)]))
        return int(head[9:12])

    async def client(i: int) -> None:
        reader = writer = None
        k = i * 7919
        due = start + (i / conc) * interval
        while due < stop_at:
            t0, due = due, due + interval
            wait = t0 - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            req = requests[k % len(requests)]
            k += 1
            in_flight[0] += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
                status = str(await exchange(reader, writer, req))
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                status = type(exc).__name__
                if writer is not None:
                    writer.close()
                reader = writer = None
            in_flight[0] -= 1
            latency = time.perf_counter() - t0
            results.append((round(t0 - start, 4), latency if status.startswith("2") else None, status))
        if writer is not None:
            writer.close()

    try:
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(conc))), timeout=duration + 30)
    except asyncio.TimeoutError:
        results += [(duration, None, "unanswered_at_end")] * in_flight[0]
    return {"started_at": time.time() - (time.perf_counter() - start), "results": results}


def loadgen_main(spec_path: str) -> None:
    import uvloop

    uvloop.install()
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["out"]).write_text(json.dumps(asyncio.run(_loadgen(spec))))


def http_request(path: str, body: dict, token: str) -> str:
    raw = json.dumps(body, separators=(",", ":"))
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {len(raw.encode())}\r\n\r\n{raw}")


# ---------------------------------------------------------------------------
# the system under test
# ---------------------------------------------------------------------------

def _serving_bench():
    """bench/serving.py as a module: its feature-repo apply, Redis population and model registration."""
    spec = importlib.util.spec_from_file_location("freshet_bench_serving", ROOT / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Soak:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="freshet-soak-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.promotions: list[dict] = []
        self.rss: dict[str, list[tuple[float, float]]] = {}

    def start(self):
        from freshet.app.stack import EmbeddedStack, free_port
        from freshet.settings import load_settings

        self.stack = EmbeddedStack(self.tmp / "stack")
        ep = self.stack.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
        self.port = free_port()
        self.settings = load_settings(env, kafka_bootstrap_servers=ep.kafka, redis_url=ep.redis_url,
                                      data_dir=str(self.tmp / "data"), feature_repo=str(ROOT / "feature_repo"),
                                      http_port=self.port, api_token=TOKENS["admin"],
                                      api_token_predict=TOKENS["predict"], api_token_features=TOKENS["features"],
                                      kafka_partitions=2)
        self.env = {**env, **self.settings.to_env(), "FRESHET_LOG_LEVEL": "WARNING"}
        bench = _serving_bench()
        log("applying the feature repo, populating Redis, registering version 1")
        bench.apply_repo(self.settings)
        self.cards, self.merchants = bench.populate(self.settings, 5000, 500, seed=1)
        self.register_synthetic = lambda seed: bench.register_model(self.settings, seed)
        self.names = self.register_synthetic(0)
        from freshet import kafka

        kafka.ensure_topics(self.settings, [self.settings.topic_predictions, self.settings.topic_labels,
                                            self.settings.topic_models, "transactions"])
        total = self.args.duration + 120
        self._spawn("stream", [FRESHET, "stream"])
        self._spawn("serve", [FRESHET, "serve"])
        self._spawn("monitor", [FRESHET, "monitor", "--start", "latest", "--snapshot-every", "10"])
        self._spawn("produce", [FRESHET, "produce", "--rate", str(self.args.stream_rate), "--duration", str(total),
                                "--quiet", "--label-delay", "5"])
        self._wait_ready()
        self.pids = {"broker": ep.kafka_pid, "valkey": ep.redis_pid}
        self.pids.update({name: p.pid for name, p in self.procs.items()})

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.tmp / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def _wait_ready(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}); see {self.tmp / (name + '.log')}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=2).status_code == 200:
                    log("serving is ready")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("serve did not become ready")

    def loadgen(self, label: str, path: str, bodies: list[dict], token: str, rate: float, conc: int):
        spec = {"host": "127.0.0.1", "port": self.port, "rate": rate, "concurrency": conc,
                "duration_s": self.args.duration, "requests": [http_request(path, b, token) for b in bodies],
                "out": str(self.tmp / f"{label}.out.json")}
        spec_path = self.tmp / f"{label}.spec.json"
        spec_path.write_text(json.dumps(spec))
        return subprocess.Popen([sys.executable, __file__, "--loadgen", str(spec_path)], stderr=subprocess.PIPE)

    def bodies(self):
        rng = random.Random(2)
        predict = [{"entities": {"card_id": rng.choice(self.cards), "merchant_id": rng.choice(self.merchants)},
                    "fields": {"amount": round(rng.uniform(1, 500), 2)}} for _ in range(2000)]
        # the service's two views share feature names: full names keep them apart
        features = [{"feature_service": "fraud_model_v1", "full_feature_names": True,
                     "entities": {"card_id": [rng.choice(self.cards)], "merchant_id": [rng.choice(self.merchants)]}}
                    for _ in range(2000)]
        return predict, features

    def sample_rss(self, t: float) -> None:
        import psutil

        for name, pid in self.pids.items():
            if pid is None:
                continue
            try:
                proc = psutil.Process(pid)
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                continue
            self.rss.setdefault(name, []).append((t, rss / 2 ** 20))

    def promote(self, n: int, t: float) -> None:
        import httpx

        started = time.monotonic()
        how = "retrain"
        proc = subprocess.run([FRESHET, "retrain", "--once", "--force", "--reason", f"soak-{n}", "--json",
                               "--min-rows", "100"], env=self.env, capture_output=True, text=True, timeout=300)
        version = None
        try:
            outcome = json.loads(proc.stdout.strip().splitlines()[-1])
            version = outcome.get("version")
        except (ValueError, IndexError):
            outcome = {"status": f"exit {proc.returncode}"}
        if version is None:  # too few labels joined yet: a version fitted here, so a promotion still happens
            how = f"synthetic ({outcome.get('status')})"
            from freshet.models import ModelRegistry

            models = ModelRegistry(self.settings, publish_events=False)
            before = models.current_version(MODEL)
            self.register_synthetic(n)  # registers and promotes in the registry ...
            version = models.current_version(MODEL)
            models.client.set_registered_model_alias(MODEL, "champion", before)  # ... the API promotes it below
        swap_at = time.monotonic()
        resp = httpx.post(f"http://127.0.0.1:{self.port}/models/{MODEL}/promote",
                          headers={"Authorization": f"Bearer {TOKENS['admin']}"}, json={"version": str(version)},
                          timeout=60)
        self.promotions.append({"n": n, "how": how, "version": str(version), "status": resp.status_code,
                                "at_s": round(t + (swap_at - started), 1), "in_run": t + (swap_at - started) <
                                self.args.duration,
                                "swap_s": round(time.monotonic() - swap_at, 3),
                                "train_s": round(swap_at - started, 1)})
        log(f"promotion {n}: version {version} ({how}) -> {resp.status_code}")

    def run(self) -> dict:
        args = self.args
        predict, features = self.bodies()
        t0 = time.monotonic()
        gens = {"predict": self.loadgen("predict", "/predict", predict, TOKENS["predict"], args.predict_rate, 64),
                "features": self.loadgen("features", "/get-online-features", features, TOKENS["features"],
                                         args.features_rate, 32)}
        next_promote, n = t0 + args.promote_every, 1
        promoting: threading.Thread | None = None  # a training takes minutes: sampling goes on meanwhile
        while time.monotonic() - t0 < args.duration:
            t = time.monotonic() - t0
            self.sample_rss(t)
            busy = promoting is not None and promoting.is_alive()
            if not busy and time.monotonic() >= next_promote and t < args.duration - 20:
                promoting = threading.Thread(target=self.promote, args=(n, t), daemon=True)
                promoting.start()
                n += 1
                next_promote += args.promote_every
            time.sleep(5)
        self.sample_rss(time.monotonic() - t0)
        if promoting is not None:
            promoting.join(600)
        for g in gens.values():
            g.wait(timeout=120)
        return self.report({k: json.loads((self.tmp / f"{k}.out.json").read_text()) for k in gens})

    def report(self, loads: dict) -> dict:
        import psutil

        args = self.args
        minutes = max(1, int(round(args.duration / 60)))
        base_min = 1 if args.duration <= 150 else 2
        p99, errors, failed_promo, rates = {}, {}, 0, {}
        windows = [(p["at_s"] - 1, p["at_s"] + p["swap_s"] + 5) for p in self.promotions]
        for name, load in loads.items():
            per_min: dict[int, list[float]] = {}
            errs: dict[str, int] = {}
            ok = 0
            for due, latency, status in load["results"]:
                m = min(minutes - 1, int(due // 60))
                if latency is not None:
                    per_min.setdefault(m, []).append(latency)
                    ok += 1
                else:
                    errs[status] = errs.get(status, 0) + 1
                    failed_promo += any(a <= due <= b for a, b in windows)
            p99[name] = [pct(per_min.get(m, []), 99) for m in range(minutes)]
            errors[name] = errs
            rates[name] = round(ok / args.duration, 1)
        rss_mb, growth = {}, {}
        for name, samples in self.rss.items():
            rss_mb[name] = [round(max((v for t, v in samples if m * 60 <= t < (m + 1) * 60), default=0), 1)
                            for m in range(minutes)]
            base = [v for t, v in samples if t <= base_min * 60]
            alive = self.pids.get(name) is not None and psutil.pid_exists(self.pids[name])
            if base and samples and alive:
                growth[name] = round(samples[-1][1] / base[-1] - 1, 4)
        worst = {k: (round(max(v for v in ps if v) / ps[0], 2) if ps and ps[0] else None) for k, ps in p99.items()}
        return {"bench": "soak", "duration_s": args.duration, "offered": {"stream_eps": args.stream_rate,
                "predict_rps": args.predict_rate, "features_rps": args.features_rate},
                "answered_rps": rates, "p99_ms": p99, "p99_worst_over_first": worst,
                "errors": errors, "errors_total": sum(sum(e.values()) for e in errors.values()),
                "failed_during_promotions": failed_promo, "promotions": self.promotions,
                "rss_mb": rss_mb, "rss_growth": growth, "rss_growth_from_minute": base_min,
                "loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        self.stack.stop()


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        loadgen_main(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 minutes instead of 10")
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--stream-rate", type=float, default=2000.0)
    ap.add_argument("--predict-rate", type=float, default=1000.0)
    ap.add_argument("--features-rate", type=float, default=500.0)
    ap.add_argument("--promote-every", type=float, default=120.0)
    args = ap.parse_args()
    if args.quick:
        args.duration = 120.0
        args.promote_every = min(args.promote_every, 60.0)
    soak = Soak(args)
    try:
        soak.start()
        log(f"soaking for {args.duration:.0f}s (work dir {soak.tmp})")
        result = soak.run()
    finally:
        soak.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
