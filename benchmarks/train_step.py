"""Training-step benchmark: r1ray's worker loop against a bare PyTorch loop, and ZeRO memory per worker.

    python benchmarks/train_step.py                      # ~4-6 min on 2 cores: tiny preset, ZeRO-2, 1 and 2 workers
    python benchmarks/train_step.py --quick              # ~2-3 min: debug preset, short runs, memory on 'tiny'
    python benchmarks/train_step.py --json out.json      # also write the results as JSON (else printed at the end)

1. Throughput. The real code path: ``r1ray.train.stages.pretrain.run`` (Ray Train ``TorchTrainer`` + a DeepSpeed
   engine per worker, the exactly-once sampler, the loop's all-reduces, LR schedule, clipping) trains
   ``--steps`` steps on a synthetic data artifact; a Ray Train callback collects the tokens/s that rank 0
   reports every ``--log-every`` steps. The first window (engine warm-up) and the last one (it holds the
   final evaluation) are dropped. The baseline, in the same run: a bare single-process loop with the same
   model (``r1ray.model.build_model``, same seed), the same batches (same global order, same micro-batches
   and accumulation), the same thread count, ``torch.optim.AdamW(fused=True)`` (what r1ray's config gives
   DeepSpeed) with the same groups, the same LR
   schedule and gradient clipping, timed over the same number of steps after the same warm-up. The
   baseline runs before and after r1ray (the machine is shared; the mean of both is used) and the ratio is
   r1ray / bare (target >= 0.95). Configurations: ``WxT`` = W workers x T threads each; "1x2" compares like
   with like (one process, 2 threads); "2x1" is data parallel over the same 2 threads; "1x1" leaves one
   core to Ray's own processes. Third measurement (``--bare-in-ray``, on by default): the same bare loop
   inside a Ray Train worker with the same CPUs on a local Ray started like r1ray's, so that the table
   separates what running in a Ray worker costs any code (Ray's controller, raylet, GCS, dashboard and
   Train's helper actors share the cores) from what r1ray's loop and DeepSpeed cost.

2. Memory of model states per worker for ZeRO 0/1/2/3 with 2 workers: each worker builds its engine with
   r1ray's own ``ds_config`` + ``build_engine`` (what the loop runs), takes one optimizer step, runs the next
   forward/backward, and then counts the bytes of every distinct tensor storage the engine holds for the
   model: parameters (or their ZeRO-3 partitions), gradients (incl. ZeRO's gradient partitions), optimizer
   state (AdamW moments), fp32 master copies, and other buffers DeepSpeed keeps (e.g. the gradient
   reduction bucket). Not RSS: the storages themselves, deduplicated, on each rank.
"""

from __future__ import annotations

import argparse
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

WORDS = "the a of to and in is it that for on with as was he she they we you at by".split()


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def make_data(work: Path, seq_len: int, train_docs: int) -> tuple[str, str]:
    """A tokenizer and a synthetic data artifact in the packed-shard format (no downloads)."""
    from r1ray.data.synthetic_shards import write_data_artifact
    from r1ray.model.tokenizer import train_tokenizer

    tok_dir = work / "tokenizer"
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30)) + f" {i} + {i + 3} = {2 * i + 3}."
             for i in range(400)]
    train_tokenizer(texts, tok_dir, vocab_size=400)
    data = write_data_artifact(work / "data", tok_dir, seq_len=seq_len, train_docs=train_docs, val_docs=80,
                               rows_per_shard=256)
    return str(tok_dir), data


# --------------------------------------------------------------------------------------------------
# 1. throughput: r1ray's loop
# --------------------------------------------------------------------------------------------------


def r1ray_throughput(args, data: str, work: Path, workers: int, threads: int, tag: str) -> dict[str, Any]:
    from r1ray.config import load_config
    from r1ray.train.stages.pretrain import PretrainConfig, run

    root = work / f"r1ray-{tag}"
    metrics_path = root / "metrics.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(PretrainConfig, [
        f"run_name=bench-{tag}", f"data.path={data}", f"storage.root={root}", f"data.cache_dir={work}/cache",
        "data.validate_with_ray_data=false", f"model.preset={args.preset}", f"train.max_steps={args.steps}",
        f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}",
        f"train.log_every={args.log_every}", "train.eval_every=0", "train.eval_samples=1",
        f"train.torch_threads={threads}", "checkpoint.every=0", "checkpoint.export_hf=false",
        f"deepspeed.zero_stage={args.zero}", f"scaling.num_workers={workers}", "optim.lr=1e-3",
        "optim.warmup_steps=2", "logging.wandb.mode=disabled", "logging.level=WARNING",
        f"ray.include_dashboard={str(args.dashboard).lower()}", f"ray.num_cpus={max(workers, threads * workers) + 1}",
    ])
    t0 = time.perf_counter()
    result = retry_ray_start(lambda: run(cfg, callbacks=[metrics_collector(str(metrics_path))]))
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = sorted((r for r in rows if "time" in r and "step" in r), key=lambda r: r["step"])
    # Wall-clock throughput between reports (everything the loop does between them counts: reporting,
    # logging, metrics), dropping the warm-up window and the last one (final evaluation and checkpoint).
    kept = rows[1:-1]
    if len(kept) < 2:
        raise SystemExit(f"--steps {args.steps}: need at least 4 reports (got {len(rows)}); raise --steps")
    windows = [((b["step"] - a["step"]) * tokens_per_step(args), b["time"] - a["time"])
               for a, b in zip(kept, kept[1:], strict=False)]
    tokens, seconds = sum(t for t, _ in windows), sum(s for _, s in windows)
    return {
        "config": tag, "workers": workers, "threads_per_worker": threads, "zero_stage": args.zero,
        "tokens_per_second": tokens / seconds,
        "median_window_tokens_per_second": statistics.median(t / s for t, s in windows),
        "measured_steps": kept[-1]["step"] - kept[0]["step"],
        "window_tokens_per_second": [round(t / s, 1) for t, s in windows],
        "final_train_loss": result.train_loss, "wall_seconds_incl_startup": wall,
    }


def retry_ray_start(fn, attempts: int = 3):
    """Call ``fn`` (which starts a local Ray), again if Ray's node did not come up: on a loaded machine
    ``ray.init`` can hit its fixed 30 s wait for the raylet ("timed out during startup")."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - ray.init raises a bare Exception for this
            if "timed out during startup" not in str(e) or i == attempts - 1:
                raise
            print(f"  Ray did not start ({e}); retrying", flush=True)
            import ray

            if ray.is_initialized():
                ray.shutdown()


def tokens_per_step(args) -> int:
    """Predicted tokens of one optimizer step (what the loop counts): rows x (seq_len - 1)."""
    return args.global_batch * (args.seq_len - 1)


# --------------------------------------------------------------------------------------------------
# 1. throughput: the bare baseline
# --------------------------------------------------------------------------------------------------


def bare_throughput(args, data: str, threads: int) -> dict[str, Any]:
    """One process, no Ray, no DeepSpeed: the same model, batches, optimizer, schedule and clipping."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from r1ray.config import OptimConfig
    from r1ray.data.shards import DataArtifact
    from r1ray.model import build_model
    from r1ray.model.build import ModelConfig
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.train.core.optim import lr_at, param_groups
    from r1ray.train.core.sampler import GlobalOrder, step_micro_batches, token_store

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        art = DataArtifact.load(data)
        tok = load_tokenizer(art.tokenizer_dir)
        rows = token_store(art, "train", args.cache_dir)
        order = GlobalOrder(len(rows), 0)
        model = build_model(ModelConfig(preset=args.preset), tok, seed=0)
        model.train()
        optim = OptimConfig(lr=1e-3, warmup_steps=2)
        # the optimizer r1ray's config gives DeepSpeed (torch's fused AdamW kernel)
        opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas,
                                eps=optim.eps, weight_decay=optim.weight_decay, fused=True)
        warm = args.log_every
        measure = args.log_every * max(1, args.steps // args.log_every - 2)
        total = warm + measure
        t_start = None
        windows: list[float] = []  # tokens/s of each report window after the warm-up, like the loop's
        for step in range(total):
            if step == warm:
                t_start = t_window = time.perf_counter()
            elif step > warm and (step - warm) % args.log_every == 0:
                now = time.perf_counter()
                windows.append(args.log_every * tokens_per_step(args) / (now - t_window))
                t_window = now
            torch.manual_seed(step)
            micro = step_micro_batches(step, args.global_batch, args.micro_batch, 0, 1)
            batches = [torch.from_numpy(np.asarray(rows[order.rows(idx)], dtype=np.int64)) for idx in micro]
            n_tokens = sum(b.numel() - b.shape[0] for b in batches)
            for g in opt.param_groups:
                g["lr"] = lr_at(optim, step, total)
            for ids in batches:
                logits = model(input_ids=ids).logits[:, :-1]
                s = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                    reduction="sum")
                (s / n_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        windows.append(args.log_every * tokens_per_step(args) / (now - t_window))
        seconds = now - t_start
    finally:
        torch.set_num_threads(prev_threads)
    return {"threads": threads, "tokens_per_second": measure * tokens_per_step(args) / seconds,
            "measured_steps": measure, "windows": windows}


def bare_in_ray_throughput(args, data: str, work: Path, threads: int) -> dict[str, Any]:
    """The bare loop of ``bare_throughput``, unchanged, inside a Ray Train worker holding ``threads`` CPUs on a
    local Ray started as r1ray's runs start it (same CPU count, dashboard on or off). r1ray / this ratio is the
    cost of r1ray's loop and DeepSpeed alone; this / bare is what running in a Ray worker costs the same code
    (Ray's own processes share the cores)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    out = work / f"bare-in-ray-{threads}.json"  # one machine: the worker writes, the driver reads

    def fn(config):
        Path(config["out"]).write_text(json.dumps(bare_throughput(config["args"], config["data"], config["threads"])))

    retry_ray_start(lambda: ray.init(num_cpus=threads + 1, include_dashboard=args.dashboard,
                                     logging_level="WARNING", configure_logging=False))
    try:
        trainer = TorchTrainer(
            fn, train_loop_config={"args": args, "data": data, "threads": threads, "out": str(out)},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=ray.train.RunConfig(name="bare-in-ray", storage_path=str(work / "bare-in-ray")),
        )
        res = trainer.fit()
        if res.error is not None:
            raise res.error
        return json.loads(out.read_text())
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------------
# 2. memory of model states per worker
# --------------------------------------------------------------------------------------------------


def _storage_key(t) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (st.data_ptr(), st.nbytes())


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of every distinct tensor storage the engine holds for the model, by role (see module doc)."""
    import torch

    seen: set[tuple[int, int]] = set()
    out = {"params": 0, "grads": 0, "optimizer_state": 0, "fp32_master": 0, "reduce_buckets": 0, "other_buffers": 0}
    where: dict[str, int] = {}

    def add(t, kind: str, path: str = "") -> None:
        if not torch.is_tensor(t) or t.device.type == "meta":
            return
        key = _storage_key(t)
        if key is None or key[1] == 0 or key in seen:
            return
        seen.add(key)
        out[kind] += key[1]
        if path:
            where[path] = where.get(path, 0) + key[1]

    module = engine.module
    for p in module.parameters():
        add(getattr(p, "ds_tensor", None), "params")  # ZeRO-3: this rank's partition
        add(p.data, "params")
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        for v in state.values():
            add(v, "optimizer_state")
    for group in inner.param_groups:  # ZeRO-1/2/3 step on flat fp32 partitions: the master copy
        for p in group["params"]:
            add(p, "fp32_master")
    for group in inner.param_groups:
        for p in group["params"]:
            add(p.grad, "grads")
    for p in module.parameters():
        add(p.grad, "grads")
    for name in ("averaged_gradients", "grads_in_partition", "fp32_partitioned_groups_flat_grad"):
        walk(getattr(opt, name, None), lambda t, path: add(t, "grads"))
    walk(vars(opt), lambda t, path: add(t, _kind_of(path), path))
    out["total"] = sum(out.values())
    out["found_in_optimizer"] = dict(sorted(where.items(), key=lambda kv: -kv[1])[:4])
    return out


def _kind_of(path: str) -> str:
    """Role of a tensor found inside the ZeRO optimizer, from its attribute path."""
    if "fp32_partitioned_groups_flat" in path or "single_partition_of_fp32_groups" in path:
        return "fp32_master"
    if "bucket" in path:
        return "reduce_buckets"
    return "other_buffers"


def walk(obj, fn, depth: int = 0, seen: set[int] | None = None, path: str = "optimizer") -> None:
    """Call ``fn(tensor, path)`` for every tensor reachable from ``obj`` through lists/tuples/dicts and
    DeepSpeed's own objects (e.g. ZeRO's gradient buckets); never into modules or other libraries' objects."""
    import torch

    seen = set() if seen is None else seen
    if depth > 6 or obj is None or id(obj) in seen:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        fn(obj, path)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            walk(v, fn, depth + 1, seen, f"{path}.{k}" if isinstance(k, str) else path)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            walk(v, fn, depth + 1, seen, path)
    elif type(obj).__module__.startswith("deepspeed") and not isinstance(obj, torch.nn.Module):
        for k, v in getattr(obj, "__dict__", {}).items():
            walk(v, fn, depth + 1, seen, f"{path}.{k}")


def _memory_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from r1ray.config import DeepSpeedConfig, OptimConfig
    from r1ray.model import build_model
    from r1ray.model.build import ModelConfig
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.train.core.deepspeed import build_engine, ds_config

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    tok = load_tokenizer(cfg["tokenizer"])
    model = build_model(ModelConfig(preset=cfg["preset"]), tok, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    ds, optim = DeepSpeedConfig(zero_stage=cfg["zero"]), OptimConfig(lr=1e-3)
    config = ds_config(ds, optim, micro_batch_size=1, grad_accum=1, world_size=world, use_gpu=False,
                       hidden_size=None if cfg.get("fixed_bucket") else model.config.hidden_size)
    t0 = time.perf_counter()
    engine = build_engine(model, ds, optim, config)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(rank)
    vocab = len(tok)

    def fwd_bwd():
        ids = torch.from_numpy(rng.integers(0, vocab, size=(1, cfg["seq_len"]), dtype=np.int64))
        logits = engine(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        engine.backward(loss)

    fwd_bwd()
    engine.step()  # optimizer state now exists
    fwd_bwd()  # gradients of the next step are held: the steady-state peak of model states
    mem = model_state_bytes(engine)
    engine.step()
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, mem)
    return {"n_params": n_params, "build_seconds": build_s, "config": config, "per_rank": per_rank}


def zero_memory(args, tokenizer: str, work: Path) -> list[dict[str, Any]]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    rows = []
    retry_ray_start(lambda: ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="WARNING",
                                     runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}))
    try:
        # ZeRO-3 is measured twice: buckets sized to the model (what r1ray runs) and DeepSpeed's fixed 50M
        # elements (the baseline, as r1ray ran before), in the same run.
        runs = [(z, False) for z in args.zero_stages] + ([(3, True)] if 3 in args.zero_stages else [])
        for zero, fixed in runs:
            trainer = TorchTrainer(
                _memory_worker,
                train_loop_config={"tokenizer": tokenizer, "preset": args.mem_preset, "zero": zero,
                                   "seq_len": args.seq_len, "fixed_bucket": fixed},
                scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                run_config=ray.train.RunConfig(name=f"zero{zero}{'-fixed' if fixed else ''}",
                                               storage_path=str(work / "mem-runs")),
            )
            res = trainer.fit()
            if res.error is not None:
                raise res.error
            out = res.return_value
            rows.append({"zero_stage": f"{zero} (fixed 50M bucket)" if fixed else zero,
                         "preset": args.mem_preset, "n_params": out["n_params"],
                         "per_rank": out["per_rank"], "build_seconds": out["build_seconds"],
                         "reduce_bucket_size": out["config"]["zero_optimization"].get("reduce_bucket_size")})
            print(f"  ZeRO-{rows[-1]['zero_stage']}: {fmt_bytes(max(r['total'] for r in out['per_rank']))} per rank",
                  flush=True)
    finally:
        ray.shutdown()
    return rows


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def print_report(res: dict[str, Any]) -> None:
    print()
    print(f"## Throughput ({res['throughput_setup']})")
    print()
    print("| config | r1ray tokens/s | bare PyTorch tokens/s (before / after) | ratio | r1ray median window | "
          "bare median window | ratio of medians |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in res["throughput"]:
        b = row["bare"]
        print(f"| {row['config']} ({row['workers']} worker(s) x {row['threads_per_worker']} thread(s), ZeRO-"
              f"{row['zero_stage']}) | {row['tokens_per_second']:,.0f} | {b['mean']:,.0f} "
              f"({b['before']:,.0f} / {b['after']:,.0f}) | {row['ratio']:.3f} | "
              f"{row['median_window_tokens_per_second']:,.0f} | {b['median_window']:,.0f} | "
              f"**{row['ratio_median_windows']:.3f}** |")
    inside = [row for row in res["throughput"] if "bare_in_ray" in row]
    if inside:
        print()
        print("| config | bare in a plain process | the same bare loop in a Ray Train worker | Ray worker / plain | "
              "r1ray | r1ray / bare-in-Ray-worker |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in inside:
            print(f"| {row['config']} | {row['bare']['mean']:,.0f} | {row['bare_in_ray']['tokens_per_second']:,.0f} | "
                  f"{row['bare_in_ray_vs_bare']:.3f} | {row['tokens_per_second']:,.0f} | "
                  f"**{row['ratio_vs_bare_in_ray']:.3f}** |")
    if res.get("memory"):
        mem = res["memory"]
        base = max(r["total"] for r in mem[0]["per_rank"]) if mem[0]["zero_stage"] == 0 else None
        n = mem[0]["n_params"]
        print()
        print(f"## Model-state memory per worker, 2 workers, fp32, AdamW ('{mem[0]['preset']}' preset, "
              f"{n / 1e6:.1f}M parameters = {fmt_bytes(4 * n)} of fp32 weights)")
        print()
        print("| ZeRO | params | grads | AdamW state | fp32 master | reduce buckets | other | total per rank | "
              "vs ZeRO-0 | total without buckets | vs ZeRO-0 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        base_nb = None
        for r in mem:
            worst = max(r["per_rank"], key=lambda x: x["total"])
            nb = worst["total"] - worst["reduce_buckets"]
            if r["zero_stage"] == 0:
                base_nb = nb
            vs = f"{(worst['total'] / base - 1) * 100:+.0f}%" if base else "-"
            vs_nb = f"{(nb / base_nb - 1) * 100:+.0f}%" if base_nb else "-"
            cells = [fmt_bytes(worst[k]) for k in ("params", "grads", "optimizer_state", "fp32_master",
                                                   "reduce_buckets", "other_buffers", "total")]
            print(f"| {r['zero_stage']} | " + " | ".join(cells) + f" | {vs} | {fmt_bytes(nb)} | {vs_nb} |")
    print()
    print(f"load average at start / end: {res['load_average_start']} / {res['load_average_end']}")


def main(argv: list[str] | None = None) -> int:
    ap = argument_parser(__doc__)
    ap.add_argument("--preset", default="tiny", help="model preset of the throughput runs (default tiny)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128)")
    ap.add_argument("--global-batch", type=int, default=16, help="samples per optimizer step (default 16)")
    ap.add_argument("--micro-batch", type=int, default=8, help="samples per forward/backward (default 8)")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps of each r1ray run (default 120)")
    ap.add_argument("--log-every", type=int, default=5, help="report window in steps (default 5)")
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="ZeRO stage of the throughput runs")
    ap.add_argument("--configs", default="1x2,2x1",
                    help="throughput configurations WxT (workers x threads each), comma-separated (default 1x2,2x1)")
    ap.add_argument("--mem-preset", default="125m", help="model preset of the memory table (default 125m)")
    ap.add_argument("--zero-stages", default="0,1,2,3", help="ZeRO stages of the memory table (default 0,1,2,3)")
    ap.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True,
                    help="start the Ray dashboard with the r1ray runs (default on, as jobs do: without it Ray Train's "
                         "placement-group cleaner polls a State API that is not there)")
    ap.add_argument("--bare-in-ray", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the bare loop inside a Ray Train worker (separates Ray's cost from r1ray's)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="small and short: debug preset, seq 32, 12 steps, memory on 'tiny' (for CI/smoke runs)")
    ap.add_argument("--json", help="write the results here as JSON (default: print the JSON after the table)")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.seq_len, args.steps, args.log_every, args.mem_preset = "debug", 32, 12, 3, "tiny"
    args.zero_stages = [int(z) for z in str(args.zero_stages).split(",") if z]
    configs = []
    for c in args.configs.split(","):
        w, t = (int(x) for x in c.lower().split("x"))
        configs.append((w, t))

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # a loaded machine can start the dashboard agent slower than the raylet's default wait for it
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    work = Path(tempfile.mkdtemp(prefix="r1ray-bench-train-"))
    args.cache_dir = str(work / "cache")
    res: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/train_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_start": load_average(),
        "throughput_setup": f"preset {args.preset}, seq_len {args.seq_len}, global batch {args.global_batch}, "
                            f"micro-batch {args.micro_batch}, {args.steps} steps, report window {args.log_every} steps, "
                            "fp32 CPU",
        "throughput": [], "memory": [],
    }
    import torch

    res["machine"]["torch"] = torch.__version__
    # enough rows that no sample repeats within a run
    need_rows = args.steps * args.global_batch + args.global_batch
    train_docs = max(600, int(need_rows * args.seq_len / 20))
    tokenizer, data = make_data(work, args.seq_len, train_docs)
    print(f"work dir {work}; data {data}", flush=True)

    if not args.skip_throughput:
        for w, t in configs:
            threads = w * t
            tag = f"{w}x{t}"
            print(f"[{tag}] bare PyTorch, {threads} thread(s) ...", flush=True)
            before = bare_throughput(args, data, threads)
            print(f"[{tag}] r1ray: {w} worker(s) x {t} thread(s), ZeRO-{args.zero} ...", flush=True)
            r = r1ray_throughput(args, data, work, w, t, tag)
            print(f"[{tag}] bare PyTorch again ...", flush=True)
            after = bare_throughput(args, data, threads)
            mean = (before["tokens_per_second"] + after["tokens_per_second"]) / 2
            median = statistics.median(before["windows"] + after["windows"])
            r["bare"] = {"threads": threads, "before": before["tokens_per_second"],
                         "after": after["tokens_per_second"], "mean": mean, "measured_steps": before["measured_steps"],
                         "median_window": median, "windows": before["windows"] + after["windows"]}
            r["ratio"] = r["tokens_per_second"] / mean
            if args.bare_in_ray:
                print(f"[{tag}] bare PyTorch inside a Ray Train worker, {threads} thread(s) ...", flush=True)
                inside = bare_in_ray_throughput(args, data, work, threads)
                r["bare_in_ray"] = inside
                r["ratio_vs_bare_in_ray"] = r["tokens_per_second"] / inside["tokens_per_second"]
                r["bare_in_ray_vs_bare"] = inside["tokens_per_second"] / mean
            # the machine is shared: a median over report windows shrugs off windows hit by other work
            r["ratio_median_windows"] = r["median_window_tokens_per_second"] / median
            res["throughput"].append(r)
            print(f"[{tag}] r1ray {r['tokens_per_second']:,.0f} tok/s vs bare {mean:,.0f} tok/s: ratio {r['ratio']:.3f}",
                  flush=True)
            if args.bare_in_ray:
                print(f"[{tag}] bare inside a Ray Train worker {r['bare_in_ray']['tokens_per_second']:,.0f} tok/s "
                      f"({r['bare_in_ray_vs_bare']:.3f} of bare); r1ray / bare-in-Ray {r['ratio_vs_bare_in_ray']:.3f}",
                      flush=True)
    if not args.skip_memory:
        print(f"memory: ZeRO {args.zero_stages}, 2 workers, preset {args.mem_preset} ...", flush=True)
        res["memory"] = zero_memory(args, tokenizer, work)
    res["load_average_end"] = load_average()
    print_report(res)
    write_json(res, args.json)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(math.isfinite(r["ratio"]) for r in res["throughput"]) else 1


if __name__ == "__main__":
    sys.exit(main())
