"""What structured outputs and prefix caching cost and save in the HF engine, on this machine's CPUs.

Two measurements, each against a baseline run in the same process, interleaved (A B A B):

- ``--what constrained``: batches of 16 sequences decoded together (``--batches`` per measurement), 128 tokens each, unconstrained (``ignore_eos``) against
  the same batch under a JSON schema (an array of at least 300 integers: it cannot end before 128 tokens) and
  under a regex (``[a-z ]{2000}``). Prints tokens/s per arm and each pair's ratio constrained / unconstrained.
- ``--what prefix``: a 1,500-token prompt prefix (a long system prompt) followed by a different short question each
  time: time to first token with the prefix cache (after one request has filled it) and without. Prints the TTFT
  of each pair and the ratio without / with.

The model is the ``mini`` preset (random weights; speed does not depend on what it learned), saved and loaded back
with the real loading code, with a 4,096-token byte-level BPE tokenizer trained here.

    python benchmarks/serve_features.py --what constrained --repeats 3
    python benchmarks/serve_features.py --what prefix --repeats 5
    python benchmarks/serve_features.py --what constrained --only json_schema --repeats 1 --batches 24   # one arm
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"},
                                                      "minItems": 300}}, "required": ["values"]}


def build(out: Path) -> str:
    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import train_tokenizer

    model_dir = out / "mini-2k"
    if (model_dir / "config.json").is_file():
        return str(model_dir)
    import random

    rng = random.Random(0)  # pseudo-words from a fixed seed: enough distinct pieces for a 4,096-token vocabulary
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(2, 9))) for _ in range(6000)]
    texts = [" ".join(rng.choice(words) for _ in range(40)) + f' {{"n": {i}, "v": [{i}, {i + 3}]}}'
             for i in range(6000)]
    tok = train_tokenizer(texts, out / "tokenizer", vocab_size=4096)
    model = build_model(ModelConfig(preset="mini", max_position_embeddings=2048), tok, seed=0)
    return str(save_model(model, tok, model_dir))


def constrained(engine, repeats: int, batches: int, only: str | None = None) -> int:
    from r1ray.infer.types import Guidance, SamplingParams

    arms = {
        "unconstrained": SamplingParams(max_tokens=128, temperature=1.0, ignore_eos=True),
        # thinking_budget 0: the reply may not open <think> (it would think unconstrained, and could end there)
        "json_schema": SamplingParams(max_tokens=128, temperature=1.0, thinking_budget=0,
                                      guidance=Guidance("json_schema", json.dumps(SCHEMA))),
        "regex": SamplingParams(max_tokens=128, temperature=1.0, thinking_budget=0,
                                guidance=Guidance("regex", "[a-z ]{2000}")),
    }
    if only is not None:  # one arm alone, for timing whole processes against each other
        arms = {only: arms[only]}
    prompts = [f"the answer of {i} is" for i in range(16)]
    engine.generate(prompts, next(iter(arms.values())))  # warm-up (and the grammar compiled once)
    rates: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(repeats):
        for arm, p in arms.items():
            t0 = time.perf_counter()
            outs = []
            for b in range(batches):
                params = [SamplingParams(**{**p.__dict__, "seed": 1000 * r + 100 * b + i}) for i in range(len(prompts))]
                outs += engine.generate(prompts, params)
            dt = time.perf_counter() - t0
            n = sum(len(o.token_ids) for o in outs)
            if arm != "unconstrained":
                assert all(len(o.token_ids) == 128 for o in outs), "a constrained arm ended early"
            rates[arm].append(n / dt)
            print(f"repeat {r} {arm:14s} {n} tokens in {dt:.2f} s = {n / dt:.0f} tokens/s", flush=True)
    for arm in ("json_schema", "regex") if only is None else ():
        ratios = [c / u for c, u in zip(rates[arm], rates["unconstrained"], strict=True)]
        print(f"{arm}: tokens/s ratio to unconstrained per pair {', '.join(f'{x:.3f}' for x in ratios)}; "
              f"median {statistics.median(ratios):.3f} (cost {100 * (1 - statistics.median(ratios)):.1f}%)")
    return 0


def prefix(model_dir: str, repeats: int, threads: int) -> int:
    import torch

    from r1ray.infer.hf import HFEngine
    from r1ray.infer.types import SamplingParams

    cached = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", torch_threads=threads, prefix_cache_mb=256)
    plain = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", torch_threads=threads)
    g = torch.Generator().manual_seed(0)
    vocab = cached.vocab_size
    system = torch.randint(10, vocab, (1500,), generator=g).tolist()
    one = SamplingParams(max_tokens=1, temperature=0)
    cached.generate([system + [11, 12]], one)  # fills the cache
    plain.generate([system + [11, 12]], one)  # the same warm-up
    pairs = []
    for r in range(repeats):
        question = torch.randint(10, vocab, (12,), generator=g).tolist()
        t_plain = plain.generate([system + question], one)[0].ttft_s
        t_cached = cached.generate([system + question], one)[0].ttft_s
        pairs.append((t_plain, t_cached))
        print(f"repeat {r}: TTFT without cache {1000 * t_plain:.1f} ms, with {1000 * t_cached:.1f} ms, "
              f"ratio {t_plain / t_cached:.2f}", flush=True)
    ratios = [a / b for a, b in pairs]
    print(f"prefix cache: 1,512-token prompts sharing a 1,500-token prefix; TTFT ratio without / with per pair "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f} "
          f"(without {1000 * statistics.median(a for a, _ in pairs):.1f} ms, with "
          f"{1000 * statistics.median(b for _, b in pairs):.1f} ms); cache hits {cached.prefix_cache.hits}, "
          f"{cached.prefix_cache.bytes / 2**20:.1f} MiB")
    for e in (cached, plain):
        e.shutdown()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=["constrained", "prefix"], required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=8, help="batches of 16 per constrained measurement")
    ap.add_argument("--only", choices=["unconstrained", "json_schema", "regex"],
                    help="run one constrained-decoding arm alone (to time whole processes against each other)")
    ap.add_argument("--workdir", default="/tmp/r1ray-serve-features")
    args = ap.parse_args()
    model_dir = build(Path(args.workdir))
    print(f"conditions: mini preset (random weights), {args.threads} torch threads, CPU float32, batch 16",
          flush=True)
    if args.what == "prefix":
        return prefix(model_dir, args.repeats, args.threads)
    from r1ray.infer.hf import HFEngine

    engine = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", torch_threads=args.threads,
                               max_batch_size=16)
    try:
        return constrained(engine, args.repeats, args.batches, args.only)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    sys.exit(main())
