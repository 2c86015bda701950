"""GRPO side by side: r1ray (Ray Train + DeepSpeed learner, pool of engine actors) against TRL's GRPOTrainer.

    python benchmarks/grpo_step.py                       # 30 steps x {8, 64} completions per step, both sides
    python benchmarks/grpo_step.py --steps 12 --sizes 8  # a shorter check
    python benchmarks/grpo_step.py --json out.json

Both sides, in the same run: the same tiny Llama (``tiny`` preset, ~1M parameters with this vocabulary), built
here from nothing and warmed up with ``--sft-steps`` steps of supervised training on worked arithmetic
solutions (plain PyTorch, so the policy writes the format and sometimes the answer); the same tokenizer
(trained here), the same prompts (arithmetic level 1, the chat template), the same reward code
(``r1ray.tasks.rewards.score`` with accuracy 1.0 + format 0.2), G = 8, the same max completion length,
temperature 1, lr, beta 0, loss type DAPO, one update per rollout batch. Completions per step = 8 (1 prompt)
and 64 (8 prompts).

Throughput: completions/s of each step (G x prompts / the step's wall time) , median over steps 5-30 (the
first steps hold warm-up). r1ray's step times are the intervals between its per-step rollout records
(``<run_dir>/grpo/rollouts-rank0.jsonl``: each written at the same point of a step); TRL's come from a
``TrainerCallback`` at each ``on_step_end``. Held-out accuracy: greedy on ``--eval-problems`` eval-split
problems, on each side's final weights, through the same ``HFEngine``.

Layout on a 2-core machine: r1ray runs 1 learner worker (1 CPU) and 1 engine (1 CPU) on an embedded Ray with
4 logical CPUs (reward tasks take 0.25), a step's completions as one micro-batch (one pool unit), on-policy with
1 and 2 learner threads (faster kept) and with ``grpo.async_rollouts`` (``--r1ray-modes``); TRL runs in one
process, once with 1 and once with 2 torch threads (``--trl-threads``), and its faster run is kept. Both sides
stop a completion at ``<|im_end|>`` or EOS. The machine may be shared: both sides run back to back, and the
numbers are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

G = 8
REWARDS = {"accuracy": 1.0, "format": 0.2}


def build_start(out: Path, sft_steps: int, seed: int) -> Path:
    """Tokenizer + tiny Llama, warmed up on worked solutions (plain PyTorch); saved as an HF directory."""
    import torch

    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import train_tokenizer
    from r1ray.tasks.registry import sample_problems

    probs = sample_problems({"arithmetic": 1.0}, 2000, seed=seed + 1, split="train", difficulty=1)
    tok_dir = out / "tokenizer"
    texts = [p.question + "\n" + p.completion for p in probs]
    tok = train_tokenizer(texts, tok_dir, vocab_size=1024)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(preset="tiny", max_position_embeddings=512), tok, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = []
    for p in probs:
        prompt = tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
        ids = tok(prompt + p.completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        rows.append((ids, n_prompt))
    model.train()
    for step in range(sft_steps):
        batch = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
        width = max(len(r) for r, _ in batch)
        ids = torch.full((16, width), tok.pad_token_id)
        labels = torch.full((16, width), -100)
        for i, (r, n) in enumerate(batch):
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, n:len(r)] = torch.tensor(r[n:])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            print(f"  sft step {step}: loss {loss.item():.3f}", flush=True)
    return save_model(model.eval(), tok, out / "start")


def accuracy(model_dir: str, n: int, max_tokens: int, seed: int) -> float:
    from r1ray.infer.hf import HFEngine
    from r1ray.infer.types import SamplingParams
    from r1ray.tasks.registry import sample_problems
    from r1ray.tasks.rewards import score

    probs = sample_problems({"arithmetic": 1.0}, n, seed=seed, split="eval", difficulty=1)
    eng = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", max_batch_size=64, max_queue=1024)
    try:
        prompts = [eng.tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
                   for p in probs]
        outs = eng.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    finally:
        eng.shutdown()
    return statistics.mean(score([o.text for o in outs], probs, {"accuracy": 1.0}).per_reward["accuracy"])


def run_r1ray(start: Path, root: Path, prompts_per_step: int, steps: int, max_tokens: int, lr: float,
              seed: int, threads: int = 1, mode: str = "sync") -> dict[str, Any]:
    from r1ray.config import load_config
    from r1ray.train.grpo import GRPOConfig, run

    micro = min(prompts_per_step, 8)  # one micro-batch (one pool unit) of <= 64 completions, as TRL's one batch
    cfg = load_config(GRPOConfig, [
        f"model.init_from={start}", f"storage.root={root}", f"run_name=r1ray-{mode}-{prompts_per_step}-{threads}", f"seed={seed}",
        f"train.max_steps={steps}", f"train.global_batch_size={prompts_per_step}", f"train.micro_batch_size={micro}",
        "train.eval_every=0", f"train.log_every={steps}", f"checkpoint.every={steps}", f"optim.lr={lr}",
        # the whole block: a dotted override of one optim field resets the others to OptimConfig's defaults
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0.0",
        "deepspeed.zero_stage=0", "scaling.num_workers=1", "scaling.cpus_per_worker=1", f"train.torch_threads={threads}",
        "grpo.engine_torch_threads=1",
        f"grpo.group_size={G}", f"grpo.rewards={json.dumps(REWARDS)}", f"grpo.max_completion_tokens={max_tokens}",
        "grpo.loss_type=dapo", "grpo.beta=0", "grpo.eval_problems=8", "ray.num_cpus=4", "ray.include_dashboard=false",
        "logging.wandb.mode=disabled", f"grpo.async_rollouts={mode == 'async'}",
    ])
    t0 = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - t0
    recs: dict[int, dict] = {}
    for line in Path(result.run_dir, "grpo", "rollouts-rank0.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["step"]] = r
    times = [recs[s]["time"] for s in sorted(recs)]
    per_step = [prompts_per_step * G / (b - a) for a, b in zip(times, times[1:], strict=False)]
    return {"per_step": per_step, "wall_s": wall, "export": result.export_path,
            "zero_variance": statistics.mean(r["frac_zero_variance_groups"] for r in recs.values()),
            "reward": [recs[s]["reward_mean"] for s in sorted(recs)]}


def run_trl(start: Path, out: Path, prompts_per_step: int, steps: int, max_tokens: int, lr: float,
            seed: int, threads: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from r1ray.tasks.base import Problem
    from r1ray.tasks.registry import sample_problems
    from r1ray.tasks.rewards import score

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(start))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(start), dtype=torch.float32)
    # stop where r1ray's engine stops: at the end of the assistant turn (<|im_end|>) as well as at EOS. TRL stops
    # at the generation config's EOS ids only, and this tokenizer's EOS never follows an assistant turn: without
    # this every TRL completion runs to the maximum length (2.3x r1ray's tokens; found in this session's run)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [tok.eos_token_id, im_end]
    probs = sample_problems({"arithmetic": 1.0}, prompts_per_step * steps, seed=seed, split="train", difficulty=1)
    ds = Dataset.from_list([{
        "prompt": tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False),
        "problem": json.dumps(p.to_dict())} for p in probs])
    zero_var: list[float] = []

    def reward(completions, problem, **_):
        ps = [Problem.from_dict(json.loads(x)) for x in problem]
        total = score(list(completions), ps, REWARDS).total
        for i in range(0, len(total), G):
            zero_var.append(float(max(total[i:i + G]) == min(total[i:i + G])))
        return total

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=prompts_per_step * G, num_generations=G,
        max_completion_length=max_tokens, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
        weight_decay=0.0, warmup_steps=0, beta=0.0, loss_type="dapo", temperature=1.0, use_cpu=True, bf16=False,
        report_to=[], logging_steps=steps, save_strategy="no", seed=seed, gradient_accumulation_steps=1,
        num_iterations=1, shuffle_dataset=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    t0 = time.perf_counter()
    stamps.append(t0)
    trainer.train()
    wall = time.perf_counter() - t0
    export = out / "final"
    trainer.model.save_pretrained(str(export), safe_serialization=True)
    tok.save_pretrained(str(export))
    per_step = [prompts_per_step * G / (b - a) for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"per_step": per_step, "wall_s": wall, "export": str(export),
            "zero_variance": statistics.mean(zero_var) if zero_var else None}


def fastest(name: str, size: int, counts: list[int], one_run, first: int, a: argparse.Namespace) -> dict[str, Any]:
    """Run once per thread count; the fastest run's figures (completions/s, held-out accuracy)."""
    best = None
    for threads in counts:
        res = one_run(threads)
        cps = statistics.median(res["per_step"][first:])
        print(f"{name:5s} {size}/step, {threads} thread(s): {cps:.1f} completions/s", flush=True)
        if best is None or cps > best[0]:
            best = (cps, threads, res)
    cps, threads, res = best
    summary = {"completions_per_s": cps, "threads": threads, "wall_s": res["wall_s"],
               "accuracy": accuracy(res["export"], a.eval_problems, a.max_tokens, a.seed),
               "zero_variance_groups": res["zero_variance"]}
    print(f"{name:5s} {size}/step: {summary}", flush=True)
    return summary


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64], help="completions per step (multiples of 8)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--trl-threads", type=int, nargs="+", default=[1, 2], help="TRL runs once per count; best kept")
    ap.add_argument("--r1ray-threads", type=int, nargs="+", default=[1, 2],
                    help="on-policy r1ray runs once per count of learner torch threads (the engine keeps 1); best "
                         "kept (async runs use 1: the learner and the engine then run at once, one core each)")
    ap.add_argument("--r1ray-modes", nargs="+", default=["sync", "async"], choices=["sync", "async"],
                    help="sync: on-policy (generate, then learn); async: grpo.async_rollouts (one step off-policy)")
    ap.add_argument("--json", type=str, default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    root = Path(tempfile.mkdtemp(prefix="r1ray-grpo-bench-"))
    print(f"building the start model in {root} ...", flush=True)
    start = build_start(root, a.sft_steps, a.seed)
    acc0 = accuracy(str(start), a.eval_problems, a.max_tokens, a.seed)
    print(f"start: held-out accuracy {acc0:.3f}", flush=True)
    first = min(4, a.steps - 2)  # steps 5..N: intervals from the 5th step on
    rows = []
    for size in a.sizes:
        prompts = size // G
        out: dict[str, Any] = {"completions_per_step": size}
        # r1ray: learner threads (the learner and the engine take turns); TRL: oversubscribed OpenMP threads
        # spin on a loaded machine. Both: the faster run is kept.
        for mode in a.r1ray_modes:
            key = "r1ray" if mode == "sync" else "r1ray_async"
            out[key] = fastest(key, size, a.r1ray_threads if mode == "sync" else [1],
                               lambda th, p=prompts, md=mode: run_r1ray(start, root / "r1ray", p, a.steps, a.max_tokens,
                                                                       a.lr, a.seed, th, md), first, a)
        if not a.skip_trl:
            out["trl"] = fastest("trl", size, a.trl_threads, lambda th, p=prompts, sz=size: run_trl(
                start, root / f"trl-{sz}-{th}", p, a.steps, a.max_tokens, a.lr, a.seed, th), first, a)
            for key in ("r1ray", "r1ray_async"):
                if key in out:
                    out[f"ratio_{key}"] = out[key]["completions_per_s"] / out["trl"]["completions_per_s"]
        rows.append(out)
    print(f"\nstart accuracy {acc0:.3f}; {a.steps} steps, G={G}, max {a.max_tokens} tokens")
    nan = float("nan")
    print(f"{'per step':>9} | {'r1ray c/s':>9} {'acc':>6} | {'async c/s':>9} {'acc':>6} | {'TRL c/s':>9} {'acc':>6} | "
          f"{'ratio':>5} {'async':>6}")
    for o in rows:
        r, ra, t = o.get("r1ray", {}), o.get("r1ray_async", {}), o.get("trl", {})
        print(f"{o['completions_per_step']:>9} | {r.get('completions_per_s', nan):>9.1f} {r.get('accuracy', nan):>6.3f}"
              f" | {ra.get('completions_per_s', nan):>9.1f} {ra.get('accuracy', nan):>6.3f}"
              f" | {t.get('completions_per_s', nan):>9.1f} {t.get('accuracy', nan):>6.3f}"
              f" | {o.get('ratio_r1ray', nan):>5.2f} {o.get('ratio_r1ray_async', nan):>6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"start_accuracy": acc0, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
