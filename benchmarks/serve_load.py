"""Load test of the OpenAI-compatible Serve app on loopback: batched vs unbatched, and Serve's overhead.

    python benchmarks/serve_load.py                              # ~2.5 min: c=1,4,16,32, 10 s each
    python benchmarks/serve_load.py --concurrency 32 --duration 60 --skip-baselines   # the 60 s soak

For each concurrency (closed loop: each client sends its next request when the last one ends) it prints
requests/s, generated tokens/s, p50/p99 latency and p50 time to first token (streamed requests), and counts
non-2xx answers (client 0 streams every other request, to measure TTFT; all other requests ask for whole completions). Then, in the same run and on the same model:
  * unbatched serving: the same app redeployed with ``engine.max_batch_size=1``, at the baseline concurrency
    → the batched/unbatched throughput ratio;
  * the engine called in-process (no Ray, no HTTP) with the same batching at concurrency 1 and the baseline
    concurrency → Serve's overhead (latency added at c=1, throughput kept at the baseline concurrency).

Every request asks for exactly ``--max-tokens`` tokens (``ignore_eos``), so runs are comparable. Without
``--model`` a small random Llama (``--preset``) and a tokenizer are built in a temp dir (no downloads).
The load generator shares the machine's CPUs with the server: on a 2-core box that caps every number.
Exit code 1 if any request got a 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from r1ray.testing.ports import free_port


@dataclass
class LevelResult:
    label: str
    concurrency: int
    seconds: float
    ok: int = 0
    tokens: int = 0
    status: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    plain_latencies: list[float] = field(default_factory=list)
    """Latencies of the non-streamed requests only (for Serve's overhead over the in-process engine)."""
    ttfts: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds

    def pct(self, xs: list[float], q: float) -> float:
        if not xs:
            return float("nan")
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    @property
    def n5xx(self) -> int:
        return sum(v for k, v in self.status.items() if k >= 500)

    def row(self) -> str:
        other = {k: v for k, v in self.status.items() if k != 200}
        return (f"| {self.label} | {self.concurrency} | {self.ok} | {self.rps:.1f} | {self.tps:.0f} | "
                f"{1000 * self.pct(self.latencies, 0.5):.0f} | {1000 * self.pct(self.latencies, 0.99):.0f} | "
                f"{1000 * self.pct(self.ttfts, 0.5):.0f} | {other or '-'} |")


HEADER = ("| setup | concurrency | requests | req/s | tokens/s | p50 ms | p99 ms | TTFT p50 ms | non-200 |\n"
          "|---|---|---|---|---|---|---|---|---|")


def build_model(out: Path, preset: str) -> str:
    from r1ray.model.build import ModelConfig, save_model
    from r1ray.model.build import build_model as build
    from r1ray.model.tokenizer import train_tokenizer

    words = "the a of to and in is it that for on with as was he she they we you at by".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) + f" {i} + {i + 3} = {2 * i + 3}."
             for i in range(2000)]
    tok = train_tokenizer(texts, out / "tokenizer", vocab_size=2048)
    model = build(ModelConfig(preset=preset, max_position_embeddings=1024), tok, seed=0)
    return str(save_model(model, tok, out / f"{preset}-llama"))


async def http_level(url: str, model: str, concurrency: int, duration: float, max_tokens: int, label: str,
                     stream: bool) -> LevelResult:
    """Closed loop; client 0 streams every other request (for time to first token), the others never do
    (unless ``stream``)."""
    import httpx

    res = LevelResult(label, concurrency, duration)
    body = {"model": model, "prompt": "the cat sat on the", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker(streaming_client: bool) -> None:
            sent = 0
            while time.perf_counter() < deadline:
                streamed = stream or (streaming_client and sent % 2 == 0)
                sent += 1
                t0 = time.perf_counter()
                ttft, ntok = None, 0
                try:
                    if streamed:
                        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                            status = r.status_code
                            async for line in r.aiter_lines():
                                if line.startswith("data: {"):
                                    chunk = json.loads(line[6:])
                                    if ttft is None and chunk.get("choices"):
                                        ttft = time.perf_counter() - t0
                                    ntok += 1 if chunk.get("choices") else 0
                    else:
                        r = await client.post("/v1/completions", json=body)
                        status = r.status_code
                        if status == 200:
                            ntok = r.json()["usage"]["completion_tokens"]
                except httpx.HTTPError:
                    status = 599  # transport failure: counted as a 5xx
                if time.perf_counter() > deadline + 60:
                    break
                res.status[status] = res.status.get(status, 0) + 1
                if status == 200:
                    res.ok += 1
                    res.tokens += max_tokens if streamed else ntok
                    res.latencies.append(time.perf_counter() - t0)
                    if not streamed:
                        res.plain_latencies.append(res.latencies[-1])
                    if ttft is not None:
                        res.ttfts.append(ttft)
                elif status == 429:
                    await asyncio.sleep(0.05)

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(stream or k == 0) for k in range(concurrency)))
        res.seconds = time.perf_counter() - t_start
    return res


async def engine_level(engine, concurrency: int, duration: float, max_tokens: int) -> LevelResult:
    from r1ray.infer import SamplingParams

    res = LevelResult("engine in-process", concurrency, duration)
    ids = engine.encode("the cat sat on the")
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0, ttft, n = time.perf_counter(), None, 0
            async for ev in engine.stream(ids, params):
                n += len(ev.token_ids)
                if ttft is None:
                    ttft = time.perf_counter() - t0
            res.ok += 1
            res.tokens += n
            res.latencies.append(time.perf_counter() - t0)
            res.plain_latencies.append(res.latencies[-1])
            res.ttfts.append(ttft)
            res.status[200] = res.status.get(200, 0) + 1

    t_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.seconds = time.perf_counter() - t_start
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model directory to serve (default: build a random --preset model)")
    ap.add_argument("--preset", default="debug", help="model preset when --model is not given")
    ap.add_argument("--concurrency", default="1,4,16,32", help="comma-separated concurrency levels")
    for flag, kind, default, text in (
        ("--duration", float, 10.0, "seconds per level"),
        ("--max-tokens", int, 32, "tokens generated per request"),
        ("--baseline-concurrency", int, 16, "concurrency of the baseline runs"),
        ("--max-batch-size", int, 32, "engine.max_batch_size of the batched app"),
        ("--replica-cpus", float, 1.0, "deployment.num_cpus (= torch threads)"),
    ):
        ap.add_argument(flag, type=kind, default=default, help=text)
    ap.add_argument("--stream", action="store_true",
                    help="every client streams (default: only client 0 does, to measure time to first token)")
    ap.add_argument("--skip-baselines", action="store_true", help="skip the unbatched and in-process runs")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (default: a free port from 18500)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    stream = args.stream

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from r1ray.infer.hf import HFEngine
    from r1ray.observe.log import setup_logging
    from r1ray.serve.config import ServeConfig
    from r1ray.serve.launch import deploy

    setup_logging("WARNING")
    tmp = tempfile.TemporaryDirectory(prefix="r1ray-serve-bench-")
    model_path = args.model or build_model(Path(tmp.name), args.preset)
    port = args.port or free_port(18500)
    max_queue = max(64, 2 * max(levels + [args.baseline_concurrency]))

    def cfg(batch: int) -> ServeConfig:
        return ServeConfig.model_validate({
            "model_path": model_path, "model_name": "bench", "http": {"port": port},
            "deployment": {"num_cpus": args.replica_cpus},
            "engine": {"max_batch_size": batch, "batch_wait_timeout_s": 0.005},
            "limits": {"max_queue": max(max_queue, batch)}, "auth": {"api_key_env": None},
        })

    for attempt in range(3):  # Ray gives its raylet 30 s to register; a box busy with other jobs can miss that
        try:
            ray.init(address="local", num_cpus=max(3, int(args.replica_cpus) + 2), include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False)
            break
        except Exception as e:  # noqa: BLE001
            if attempt == 2:
                raise
            print(f"ray.init failed ({e}); retrying", flush=True)
            ray.shutdown()
    results: list[LevelResult] = []
    try:
        t0 = time.perf_counter()
        info = deploy(cfg(args.max_batch_size))
        print(f"batched app ready in {time.perf_counter() - t0:.1f} s at {info.url} "
              f"(model {model_path}, max_batch_size={args.max_batch_size}, {args.max_tokens} tokens/request)",
              flush=True)
        asyncio.run(http_level(info.url, "bench", 2, 2.0, args.max_tokens, "warmup", stream))
        for c in levels:
            r = asyncio.run(http_level(info.url, "bench", c, args.duration, args.max_tokens, "Serve, batched", stream))
            results.append(r)
            print(r.row(), flush=True)
        if not args.skip_baselines:
            t0 = time.perf_counter()
            serve.run(__import__("r1ray.serve.app", fromlist=["build_app"]).build_app(cfg(1)), name="r1ray",
                      route_prefix="/", blocking=False)
            print(f"unbatched app (max_batch_size=1) ready in {time.perf_counter() - t0:.1f} s", flush=True)
            asyncio.run(http_level(info.url, "bench", 2, 2.0, args.max_tokens, "warmup", stream))
            for c in sorted({1, args.baseline_concurrency}):
                r = asyncio.run(http_level(info.url, "bench", c, args.duration, args.max_tokens,
                                           "Serve, unbatched", stream))
                results.append(r)
                print(r.row(), flush=True)
            serve.delete("r1ray")
            eng = HFEngine.from_dir(model_path, torch_threads=max(1, int(args.replica_cpus)),
                                    max_batch_size=args.max_batch_size, max_queue=max_queue)
            try:
                asyncio.run(engine_level(eng, 2, 2.0, args.max_tokens))
                for c in sorted({1, args.baseline_concurrency}):
                    r = asyncio.run(engine_level(eng, c, args.duration, args.max_tokens))
                    results.append(r)
                    print(r.row(), flush=True)
            finally:
                eng.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    print("\n" + HEADER)
    for r in results:
        print(r.row())
    n5xx = sum(r.n5xx for r in results)
    by = {(r.label, r.concurrency): r for r in results}
    b = args.baseline_concurrency
    print()
    if ("Serve, unbatched", b) in by and ("Serve, batched", b) in by:
        ratio = by[("Serve, batched", b)].rps / by[("Serve, unbatched", b)].rps
        print(f"batched / unbatched throughput at concurrency {b}: {ratio:.2f}x (target >= 3x; the seed articles "
              "claim 2.3x)")
    if ("engine in-process", 1) in by and ("Serve, batched", 1) in by:
        s, e = by[("Serve, batched", 1)], by[("engine in-process", 1)]
        sp, ep = statistics.median(s.plain_latencies), statistics.median(e.plain_latencies)
        print(f"Serve overhead at concurrency 1: +{1000 * (sp - ep):.1f} ms p50 latency of a whole (non-streamed) "
              f"completion ({1000 * sp:.1f} ms through Serve, {1000 * ep:.1f} ms in-process)")
    if ("engine in-process", b) in by and ("Serve, batched", b) in by:
        print(f"Serve keeps {by[('Serve, batched', b)].tps / by[('engine in-process', b)].tps:.0%} of the in-process "
              f"engine's tokens/s at concurrency {b}")
    print(f"5xx answers: {n5xx}")
    return 1 if n5xx else 0


if __name__ == "__main__":
    sys.exit(main())
