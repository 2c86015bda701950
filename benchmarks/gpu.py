"""GPU benchmark: a plain PyTorch loop against r1ray's training loop, and the HF engine's serving throughput.

    python benchmarks/gpu.py                          # ~4-6 min on one H100/H200: 350m, seq 2048, micro-batch 16
    python benchmarks/gpu.py --skip-compile --steps 5  # shorter
    python benchmarks/gpu.py --json out.json           # also write the results as JSON
    python benchmarks/gpu.py --cpu-smoke               # plumbing check without a GPU (~1-2 min on 2 cores)

Training, the model of the ``--preset`` (default 350m) on random tokens of a 32k vocabulary, one GPU, bf16:

- plain PyTorch, eager: the model in bf16, ``torch.optim.AdamW(fused=True)``, ``F.cross_entropy`` on the
  fp32-upcast logits (as such a loop is usually written); ``--warmup`` steps, then ``--steps`` timed ones.
- plain PyTorch, ``torch.compile(model)``: the same, compiled (its first step holds the compile time).
- r1ray ZeRO-2 / ZeRO-3: ``r1ray.train.stages.pretrain.run`` (Ray Train, one worker, DeepSpeed, bf16) on the same
  model and batch; throughput is what the loop reports per window of ``--steps`` steps after a warm-up window
  (the last window, which holds the final evaluation, is dropped). A compiled r1ray row appears when the
  training config has a compile option.

MFU is counted twice: 6N (matmul parameters) and 6N + attention (PaLM appendix B), against the card's dense
bf16 peak (``r1ray.train.core.flops``). Peak memory is ``torch.cuda.max_memory_allocated`` (the r1ray rows show it
only if the loop reports it).

Serving: ``r1ray.infer.make_engine`` (HF engine, bf16) on a randomly initialised ``--serve-preset`` model,
``--serve-tokens`` new tokens per sequence (``ignore_eos``), at batch 1 and batch 32, each over prompt and KV
lengths the process has not met before (the per-new-length cost is what serving pays).

Needs a CUDA GPU: on a machine without one it exits with status 2 and says so.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, metrics_collector, write_json  # noqa: E402 - the benchmarks' shared module

# --------------------------------------------------------------------------------------------------
# data: a word-level tokenizer with exactly --vocab entries, random token rows
# --------------------------------------------------------------------------------------------------


def make_tokenizer(out: Path, vocab: int) -> str:
    """A tokenizer of exactly ``vocab`` ids (r1ray's special and reasoning tokens, then filler words), so the
    model's embedding and head have the benchmark's vocabulary (BPE on a small corpus stops far short)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from r1ray.model.tokenizer import BOS, EOS, IM_END, IM_START, PAD, REASONING_TOKENS, SPECIAL_TOKENS

    words = SPECIAL_TOKENS + REASONING_TOKENS
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[IM_START, IM_END])
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return str(out)


def make_random_data(work: Path, vocab: int, seq_len: int, train_rows: int, val_rows: int) -> tuple[str, str]:
    """A data artifact (packed-shard format, as ``r1ray.data.synthetic_shards`` writes) of random token rows."""
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from r1ray.artifacts import sha256_file, write_manifest
    from r1ray.data.shards import SHARD_SCHEMA
    from r1ray.model.tokenizer import tokenizer_sha256

    tok_dir = make_tokenizer(work / "tokenizer", vocab)
    out = work / "data"
    shutil.copytree(tok_dir, out / "tokenizer")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", train_rows), ("validation", val_rows)):
        (out / split).mkdir(parents=True)
        rel = f"{split}/shard-00000.parquet"
        ids = rng.integers(8, vocab, size=(n, seq_len), dtype=np.int32)
        pq.write_table(pa.table({"input_ids": list(ids)}, schema=SHARD_SCHEMA), out / rel)
        splits[split] = {"shards": [{"path": rel, "rows": n, "sha256": sha256_file(str(out / rel))}], "rows": n}
    write_manifest(str(out), stage="data", config={"random": True, "seq_len": seq_len, "vocab": vocab},
                   counts={"tokens_train": train_rows * seq_len, "tokens_validation": val_rows * seq_len},
                   seq_len=seq_len, splits=splits,
                   tokenizer={"path": "tokenizer", "sha256": tokenizer_sha256(out / "tokenizer"), "vocab_size": vocab})
    return tok_dir, str(out)


def flops_per_token(preset: str, tok_dir: str, seq_len: int) -> tuple[float, float, int]:
    """(6N, 6N + attention, N) of the preset, counted on a meta-device model (no memory)."""
    import torch

    from r1ray.model import ModelConfig, build_model
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.train.core.flops import train_flops_per_token

    with torch.device("meta"):
        model = build_model(ModelConfig(preset=preset), load_tokenizer(tok_dir))
    with_attn = train_flops_per_token(model, seq_len)
    attn = 12.0 * model.config.num_hidden_layers * model.config.hidden_size * seq_len
    return with_attn - attn, with_attn, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# training: plain PyTorch
# --------------------------------------------------------------------------------------------------


def plain_loop(args, tok_dir: str, *, compiled: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from r1ray.model import ModelConfig, build_model
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.train.core.optim import param_groups

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tok = load_tokenizer(tok_dir)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(ModelConfig(preset=args.preset), tok, seed=0).to(args.device, dtype).train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=cuda)
    step_model = torch.compile(model) if compiled else model
    vocab = len(tok)
    g = torch.Generator(device=args.device).manual_seed(0)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        ids = torch.randint(8, vocab, (args.micro_batch, args.seq_len), device=args.device, generator=g)
        logits = step_model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else None
    step_model = model = opt = None  # free the memory before the next configuration
    if compiled:
        torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    tokens = args.steps * args.micro_batch * (args.seq_len - 1)
    return {"config": f"plain PyTorch, {'torch.compile' if compiled else 'eager'}, fused AdamW",
            "tokens_per_second": tokens / seconds, "peak_bytes": peak, "warmup_seconds": warm_s}


# --------------------------------------------------------------------------------------------------
# training: r1ray's loop through the real driver
# --------------------------------------------------------------------------------------------------


def compile_override() -> str | None:
    """The override that turns compilation on in the r1ray loop, if its config has one."""
    from r1ray.train.stages.pretrain import PretrainConfig

    for section in ("train", "model"):
        sub = PretrainConfig.model_fields[section].annotation
        if "compile" in getattr(sub, "model_fields", {}):
            return f"{section}.compile=true"
    return None


def r1ray_loop(args, data: str, work: Path, zero: int, compile_flag: str | None = None) -> dict[str, Any]:
    from r1ray.config import load_config
    from r1ray.train.stages.pretrain import PretrainConfig, run

    tag = f"zero{zero}{'-compiled' if compile_flag else ''}"
    root = work / f"r1ray-{tag}"
    root.mkdir(parents=True, exist_ok=True)
    metrics_path = root / "metrics.jsonl"
    total = 2 * args.steps + args.warmup_windows * args.steps  # warm-up window(s), a timed one, the last
    overrides = [
        f"run_name=bench-{tag}", f"data.path={data}", f"storage.root={root}", f"data.cache_dir={work}/cache",
        "data.validate_with_ray_data=false", f"model.preset={args.preset}", f"train.max_steps={total}",
        f"train.global_batch_size={args.micro_batch}", f"train.micro_batch_size={args.micro_batch}",
        f"train.log_every={args.steps}", "train.eval_every=0", f"train.eval_samples={args.micro_batch}",
        "checkpoint.every=0", "checkpoint.export_hf=false", f"deepspeed.zero_stage={zero}",
        f"deepspeed.precision={'bf16' if args.device == 'cuda' else 'fp32'}",
        f"scaling.use_gpu={str(args.device == 'cuda').lower()}", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        "optim.lr=3e-4", "optim.warmup_steps=1", "logging.wandb.mode=disabled", "logging.level=WARNING",
        "ray.include_dashboard=false", f"ray.num_cpus={4 if args.device == 'cuda' else 2}", "train.max_failures=0",
    ] + ([compile_flag] if compile_flag else [])
    cfg = load_config(PretrainConfig, overrides)
    t0 = time.perf_counter()
    result = run(cfg, callbacks=[metrics_collector(str(metrics_path))])
    wall = time.perf_counter() - t0
    rows = sorted((json.loads(x) for x in metrics_path.read_text().splitlines()), key=lambda r: r.get("step", 0))
    rows = [r for r in rows if "tokens_per_second" in r]
    kept = rows[args.warmup_windows:-1]
    if not kept:
        raise SystemExit(f"r1ray {tag}: {len(rows)} report windows, none left after the warm-up and the last")
    tps = statistics.median(r["tokens_per_second"] for r in kept)
    peak = next((kept[-1][k] for k in ("cuda_peak_bytes", "cuda_max_allocated_bytes", "gpu_peak_memory_bytes")
                 if k in kept[-1]), None)
    return {"config": f"r1ray loop, ZeRO-{zero}{', compiled' if compile_flag else ''}", "tokens_per_second": tps,
            "peak_bytes": peak, "loop_mfu": kept[-1].get("mfu"), "wall_seconds_incl_startup": wall,
            "status": result.status, "windows": [round(r["tokens_per_second"]) for r in rows]}


# --------------------------------------------------------------------------------------------------
# serving
# --------------------------------------------------------------------------------------------------


def serving(args, tok_dir: str, work: Path) -> list[dict[str, Any]]:
    import random

    import torch

    from r1ray.infer import SamplingParams, make_engine
    from r1ray.model import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    path = work / "serve-model"
    save_model(build_model(ModelConfig(preset=args.serve_preset), tok, seed=0), tok, path)
    steps: list[tuple[int, int, float]] = []
    eng = make_engine(str(path), backend="hf", device=args.device,
                      dtype="bfloat16" if args.device == "cuda" else "float32", max_batch_size=32, max_queue=64,
                      on_batch=lambda n, t, s: steps.append((n, t, s)))
    rng = random.Random(0)
    vocab = len(tok)
    params = SamplingParams(max_tokens=args.serve_tokens, temperature=0, ignore_eos=True)
    out = []
    try:
        eng.generate([[rng.randrange(8, vocab) for _ in range(5)]], SamplingParams(max_tokens=4, temperature=0))
        # prompt lengths no earlier request used, KV ranges that do not overlap: every length is fresh
        cases = [(1, [700]), (32, [300 + 7 * i for i in range(32)])] if args.device == "cuda" else \
            [(1, [40]), (32, [10 + i for i in range(32)])]
        for batch, lengths in cases:
            prompts = [[rng.randrange(8, vocab) for _ in range(n)] for n in lengths]
            steps.clear()
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = eng.generate(prompts, params)
            seconds = time.perf_counter() - t0
            tokens = sum(len(r.token_ids) for r in res)
            decode = [s for n, _, s in steps[1:]]  # after the first (prefill) step
            out.append({"batch": batch, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
                        "tokens_per_second_per_sequence": tokens / seconds / batch,
                        "median_step_ms": 1000 * statistics.median(decode) if decode else None})
    finally:
        eng.shutdown()
    return out


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f}"


def print_report(res: dict[str, Any]) -> None:
    print()
    print(f"## Training ({res['train_setup']}; {res['device']})")
    print()
    print("| | tokens/s | vs plain eager | MFU (6N) | MFU (6N + attention) | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    base = next((r["tokens_per_second"] for r in res["training"] if "eager" in r["config"]), None)
    for r in res["training"]:
        ratio = f"{r['tokens_per_second'] / base:.2f}x" if base else "-"
        mfu = [f"{100 * m:.1f}%" if m is not None else "n/a" for m in (r.get("mfu_6n"), r.get("mfu_6n_attn"))]
        print(f"| {r['config']} | {r['tokens_per_second']:,.0f} | {ratio} | {mfu[0]} | {mfu[1]} | "
              f"{gib(r.get('peak_bytes'))} |")
    if res.get("serving"):
        print()
        print(f"## Serving, HF engine ({res['serve_setup']})")
        print()
        print("| batch | tokens/s (all) | tokens/s per sequence | median decode step ms |")
        print("|---:|---:|---:|---:|")
        for s in res["serving"]:
            step = f"{s['median_step_ms']:.1f}" if s["median_step_ms"] is not None else "n/a"
            print(f"| {s['batch']} | {s['tokens_per_second']:,.0f} | {s['tokens_per_second_per_sequence']:,.1f} | "
                  f"{step} |")
    print()
    print(f"total {res['seconds']:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argument_parser(__doc__)
    ap.add_argument("--preset", default="350m", help="training model preset (default 350m)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of the plain loops (default 3)")
    ap.add_argument("--warmup-windows", type=int, default=1, help="r1ray report windows dropped at the start")
    ap.add_argument("--zero", default="2,3", help="ZeRO stages of the r1ray rows (default 2,3)")
    ap.add_argument("--skip-compile", action="store_true", help="no torch.compile rows (saves ~1 min)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--serve-preset", default="125m")
    ap.add_argument("--serve-tokens", type=int, default=128)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check this script's plumbing on CPU: tiny model, a few steps, numbers not worth reading")
    args = ap.parse_args(argv)
    args.device = "cuda"
    if args.cpu_smoke:
        args.device, args.preset, args.seq_len, args.micro_batch, args.vocab = "cpu", "debug", 64, 4, 512
        args.steps, args.warmup, args.zero, args.skip_compile = 2, 1, "2", True
        args.serve_preset, args.serve_tokens = "debug", 8

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("benchmarks/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
              f"(torch {torch.__version__}). Run benchmarks/train_step.py for the CPU benchmark.", file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from r1ray.train.core.flops import gpu_peak_flops

    t_start = time.perf_counter()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = gpu_peak_flops(device, "bf16") if args.device == "cuda" else None
    work = Path(tempfile.mkdtemp(prefix="r1ray-bench-gpu-"))
    zeros = [int(z) for z in args.zero.split(",") if z]
    steps_per_run = (args.warmup_windows + 2) * args.steps
    tok_dir, data = make_random_data(work, args.vocab, args.seq_len, train_rows=steps_per_run * args.micro_batch + 16,
                                     val_rows=args.micro_batch)
    prec = "bf16" if args.device == "cuda" else "fp32"
    f6n, f_attn, n_params = flops_per_token(args.preset, tok_dir, args.seq_len)
    res: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": device, "peak_bf16_flops": peak, "torch": torch.__version__, "python": platform.python_version(),
        "train_setup": f"{args.preset} ({n_params / 1e6:.0f}M parameters), vocab {args.vocab}, seq {args.seq_len}, "
                       f"micro-batch {args.micro_batch}, {prec}, {args.steps} timed steps",
        "serve_setup": f"{args.serve_preset}, {args.serve_tokens} new tokens per sequence, fresh lengths, {prec}",
        "training": [], "serving": [],
    }
    print(f"{device}; work dir {work}", flush=True)
    if not args.skip_train:
        # r1ray first: its Ray worker gets a GPU this process has not allocated on yet
        flag = compile_override()
        for zero in zeros:
            print(f"[r1ray ZeRO-{zero}] ...", flush=True)
            res["training"].append(r1ray_loop(args, data, work, zero))
        if flag and not args.skip_compile:
            print("[r1ray ZeRO-2, compiled] ...", flush=True)
            res["training"].append(r1ray_loop(args, data, work, 2, flag))
        print("[plain eager] ...", flush=True)
        res["training"].insert(0, plain_loop(args, tok_dir, compiled=False))
        if not args.skip_compile:
            print("[plain torch.compile] ...", flush=True)
            res["training"].insert(1, plain_loop(args, tok_dir, compiled=True))
        for r in res["training"]:
            r["mfu_6n"] = r["tokens_per_second"] * f6n / peak if peak else None
            r["mfu_6n_attn"] = r["tokens_per_second"] * f_attn / peak if peak else None
    if not args.skip_serve:
        print("[serving] ...", flush=True)
        res["serving"] = serving(args, tok_dir, work)
    res["seconds"] = time.perf_counter() - t_start
    print_report(res)
    write_json(res, args.json)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    ok = all(math.isfinite(r["tokens_per_second"]) for r in res["training"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
