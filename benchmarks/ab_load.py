"""Load test of A/B serving on loopback: a 90/10 split under a closed loop of clients, then the router's cost.

    python benchmarks/ab_load.py                          # 60 s at concurrency 32 over 90/10, then the baselines
    python benchmarks/ab_load.py --skip-baselines         # the acceptance run alone
    python benchmarks/ab_load.py --duration 10 --baseline-duration 5   # a quick look

1. **Split.** An A/B app (``r1ray.serve.ab``): variants ``a`` (weight 90) and ``b`` (weight 10) serving the same
   random ``--preset`` Llama, alias ``r1ray``. ``--concurrency`` clients (each sends its next request when the last
   one ends) ask the alias for exactly ``--max-tokens`` tokens (``ignore_eos``) for ``--duration`` seconds, without
   a user id (each request drawn afresh; ``--users N`` sends one of N user ids instead, sticky). Passes when no
   request fails and the realised share of ``b`` (from each response's ``model``) is within ``--tolerance``
   points of 10 %; the binomial standard deviation of that share is printed beside it.
2. **Baselines** (same model, same engine settings, same load, one replica each): the one-model app (no router)
   against an A/B app with a single variant (all of the router: the extra hop through a deployment handle, the
   body read twice), at concurrency 1 and ``--concurrency``: latency added and throughput kept by the router.

The load generator, Serve's proxy, the router and the replicas share the machine's CPUs: on a 2-core box that
caps every number. Exit code 1 when the split run fails its criteria.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import build_model, free_port  # noqa: E402 - the sibling benchmark's model builder

ALIAS = "r1ray"


@dataclass
class Run:
    label: str
    concurrency: int
    seconds: float = 0.0
    status: Counter = field(default_factory=Counter)
    served: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(self.status.values())

    @property
    def failed(self) -> int:
        return self.n - self.status.get(200, 0)

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def row(self) -> str:
        return (f"| {self.label} | {self.concurrency} | {self.n} | {self.n / self.seconds:.1f} | "
                f"{1000 * self.pct(0.5):.0f} | {1000 * self.pct(0.99):.0f} | {self.failed} |")


HEADER = "| setup | concurrency | requests | req/s | p50 ms | p99 ms | failed |\n|---|---|---|---|---|---|---|"


async def load(url: str, model: str, concurrency: int, duration: float, max_tokens: int, users: int,
               label: str) -> Run:
    import httpx

    run = Run(label, concurrency)
    body = {"model": model, "prompt": "the", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker(k: int) -> None:
            i = 0
            while time.monotonic() < deadline:  # bounded by the deadline
                i += 1
                headers = {"X-User-Id": f"user-{(k * 7919 + i) % users}"} if users else {}
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/completions", json=body, headers=headers)
                    run.status[r.status_code] += 1
                    if r.status_code == 200:
                        run.served[r.json()["model"]] += 1
                        run.latencies.append(time.perf_counter() - t0)
                    elif len(run.errors) < 5:
                        run.errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    run.status[-1] += 1
                    if len(run.errors) < 5:
                        run.errors.append(repr(e))

        t0 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        run.seconds = time.monotonic() - t0
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the split run")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--weights", default="90,10", help="weights of variants a,b")
    ap.add_argument("--tolerance", type=float, default=3.0, help="points the share of b may miss its weight by")
    ap.add_argument("--users", type=int, default=0, help="send one of N user ids per request (sticky); 0: none")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--model", help="HF model directory (default: build a random --preset model)")
    ap.add_argument("--num-cpus", type=float, default=0.5, help="logical CPUs per variant replica")
    ap.add_argument("--baseline-duration", type=float, default=15.0, help="seconds per baseline level")
    ap.add_argument("--skip-baselines", action="store_true")
    args = ap.parse_args()
    wa, wb = (float(x) for x in args.weights.split(","))

    import ray
    from ray import serve

    from r1ray.serve.app import build_app
    from r1ray.serve.config import ServeConfig
    from r1ray.serve.launch import deploy, wait_ready

    tmp = tempfile.TemporaryDirectory()
    model_path = args.model or build_model(Path(tmp.name), args.preset)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    port = free_port(18700)
    common = {"http": {"port": port}, "auth": {"api_key_env": None}, "deployment": {"num_cpus": args.num_cpus},
              "engine": {"max_batch_size": 16, "device": "cpu", "dtype": "float32"}, "limits": {"max_queue": 64}}
    ab = ServeConfig.model_validate({**common, "aliases": [ALIAS], "variants": {
        "a": {"model_path": model_path, "weight": wa}, "b": {"model_path": model_path, "weight": wb}}})
    t0 = time.monotonic()
    info = deploy(ab)
    print(f"A/B app ready in {time.monotonic() - t0:.1f} s: {info.model_path}", flush=True)
    results = []
    try:
        split = asyncio.run(load(info.url, ALIAS, args.concurrency, args.duration, args.max_tokens, args.users,
                                 f"A/B {args.weights}"))
        results.append(split)
        expected = wb / (wa + wb)
        share = split.served["b"] / max(1, sum(split.served.values()))
        sd = math.sqrt(expected * (1 - expected) / max(1, sum(split.served.values())))
        if not args.skip_baselines:
            for label, cfg, model in (
                ("one-model app (no router)", ServeConfig.model_validate({**common, "model_path": model_path,
                                                                          "model_name": "m"}), "m"),
                ("A/B app, one variant", ServeConfig.model_validate({**common, "aliases": [ALIAS], "variants": {
                    "m": {"model_path": model_path}}}), ALIAS),
            ):
                serve.delete(ab.app_name)
                serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
                wait_ready(info.url, 600)
                for c in (1, args.concurrency):
                    results.append(asyncio.run(load(info.url, model, c, args.baseline_duration, args.max_tokens,
                                                    0, label)))
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    print(f"\n{args.max_tokens} tokens per request, {args.preset} preset, variant replicas of {args.num_cpus} CPU\n")
    print(HEADER)
    for r in results:
        print(r.row())
    print(f"\nsplit run: {split.n} requests in {split.seconds:.0f} s at concurrency {split.concurrency}; served "
          f"{dict(split.served)}; share of b {100 * share:.2f} % (weight {100 * expected:.1f} %, binomial sd "
          f"{100 * sd:.2f} points, tolerance {args.tolerance} points); failed {split.failed}")
    if split.errors:
        print("first errors:", *split.errors, sep="\n  ")
    if len(results) == 5:
        solo1, solo_c, ab1, ab_c = results[1:]
        print(f"router cost: +{1000 * (ab1.pct(0.5) - solo1.pct(0.5)):.0f} ms p50 at concurrency 1 "
              f"({1000 * statistics.median(solo1.latencies):.0f} -> {1000 * statistics.median(ab1.latencies):.0f} "
              f"ms); throughput at concurrency {args.concurrency}: {ab_c.n / ab_c.seconds / (solo_c.n / solo_c.seconds):.2f}x "
              "of the one-model app")
    ok = split.failed == 0 and abs(100 * (share - expected)) <= args.tolerance
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
