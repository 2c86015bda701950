"""GRPO side by side: r1ray (Ray Train + DeepSpeed learner, pool of engine actors) against TRL's GRPOTrainer.

    python benchmarks/grpo_step.py                       # 30 steps x {8, 64} completions per step, 3 repeats
    python benchmarks/grpo_step.py --steps 4 --sizes 8 --repeats 1   # a smoke check
    python benchmarks/grpo_step.py --long --sizes 64     # reasoning-length row: level 2, max 320 tokens
    python benchmarks/grpo_step.py --json out.json

Both sides, in the same run: the same tiny Llama (``tiny`` preset, ~1M parameters with this vocabulary), built
here from nothing and warmed up with ``--sft-steps`` steps of supervised training on worked arithmetic
solutions at ``--difficulty`` (plain PyTorch, so the policy writes the format and sometimes the answer); the
same tokenizer (trained here), the same prompts (arithmetic at ``--difficulty``, default level 1, the chat
template; r1ray's level-mixing default curriculum is switched off), the same reward code
(``r1ray.tasks.rewards.score`` with accuracy 1.0 + format 0.2), G = 8, the same max completion length,
temperature 1, lr, beta 0, loss type DAPO, one update per rollout batch, float32. Completions per step = 8
(1 prompt) and 64 (8 prompts). ``--long`` is ``--difficulty 2 --max-tokens 320``: level-2 worked solutions
(two operations) are long, so completions are reasoning-length because the start model writes them, not
because generation ignores the stop token (TRL has no fair equivalent of ``ignore_eos``); the output's
tokens/completion column shows how long they came out.

Arms. r1ray on-policy at each ``--r1ray-threads`` learner thread count (the engine keeps 1 thread; learner and
engine take turns), r1ray with ``grpo.async_rollouts`` (1 thread each: they run at once), and TRL at each
``--trl-threads`` torch thread count, configured as its users would for a ~1M-parameter model on CPU:
``gradient_checkpointing=False`` (TRL's configs default it to True, which recomputes activations to save memory
this model does not need), ``bf16=False``, no vLLM.

Repeats, interleaved. For each size the arms run in turn, A B C ... then again A B C ..., ``--repeats`` times
(default 3), so a slow patch of a shared machine hits every arm rather than all repeats of one. One run's
throughput is the median over steps 5..N of (completions per step / the step's wall time): r1ray's step times
are the intervals between its per-step rollout records (``<run_dir>/grpo/rollouts-rank0.jsonl``: each written
at the same point of a step), TRL's come from a ``TrainerCallback`` at each ``on_step_end`` (step s = the time
from the end of step s-1). Per arm: the median over repeats, the min-max spread and every repeat's value. Each
side's best arm (the thread count, or on-policy/async, with the higher median) is compared: the ratio r1ray/TRL
is taken per repeat pair (repeat i of r1ray's arm / repeat i of TRL's best arm, which ran in the same round)
and reported as median with min-max.

Equal-length generation is checked, not assumed: per arm, the mean completion tokens and the clipped fraction
(completions that hit the max tokens), averaged over steps and repeats. r1ray's come from its rollout records
(``completion_length_mean``, ``completion_clipped_fraction``), TRL's from its own logged metrics
(``completions/mean_length``, ``completions/clipped_ratio``, caught by the callback's ``on_log``; one log at the
last step, averaged over every step like r1ray's). Both count the stop token, and both stop a completion at
``<|im_end|>`` or EOS (TRL >= 1.16 reads the model's generation config for its stop ids; an older TRL is
flagged). Held-out accuracy: greedy on ``--eval-problems`` eval-split problems at ``--difficulty``, on the final
weights of each side's best arm's last repeat, through the same ``HFEngine`` (a sanity check, not a race).

Layout on a 2-core machine: r1ray runs 1 learner worker (1 CPU) and 1 engine (1 CPU) on an embedded Ray with
4 logical CPUs (reward tasks take 0.25), a step's completions as one micro-batch (one pool unit); TRL runs in
this process. The output (stdout and ``--json``) states the conditions: thread counts, repeats, steps, sizes,
max tokens, difficulty, versions (torch, TRL, transformers, Ray, DeepSpeed), the machine's CPUs and its load
average before and after. Compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

G = 8
REWARDS = {"accuracy": 1.0, "format": 0.2}
LONG = {"max_tokens": 320, "difficulty": 2}  # --long: reasoning-length completions written by the start model


def max_positions(max_tokens: int) -> int:
    """Model context: 512 (the default run's), or room for a long completion after a level-2 prompt."""
    return max(512, max_tokens + 256)


def build_start(out: Path, sft_steps: int, seed: int, difficulty: int = 1, max_tokens: int = 128) -> Path:
    """Tokenizer + tiny Llama, warmed up on worked solutions (plain PyTorch); saved as an HF directory."""
    import torch

    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import train_tokenizer
    from r1ray.tasks.registry import sample_problems

    probs = sample_problems({"arithmetic": 1.0}, 2000, seed=seed + 1, split="train", difficulty=difficulty)
    tok_dir = out / "tokenizer"
    texts = [p.question + "\n" + p.completion for p in probs]
    tok = train_tokenizer(texts, tok_dir, vocab_size=1024)
    torch.manual_seed(seed)
    max_pos = max_positions(max_tokens)
    model = build_model(ModelConfig(preset="tiny", max_position_embeddings=max_pos), tok, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = []
    for p in probs:
        prompt = tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
        ids = tok(prompt + p.completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        if len(ids) <= max_pos:
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


def accuracy(model_dir: str, n: int, max_tokens: int, seed: int, difficulty: int = 1) -> float:
    from r1ray.infer.hf import HFEngine
    from r1ray.infer.types import SamplingParams
    from r1ray.tasks.registry import sample_problems
    from r1ray.tasks.rewards import score

    probs = sample_problems({"arithmetic": 1.0}, n, seed=seed, split="eval", difficulty=difficulty)
    eng = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", max_batch_size=64, max_queue=1024)
    try:
        prompts = [eng.tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
                   for p in probs]
        outs = eng.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    finally:
        eng.shutdown()
    return statistics.mean(score([o.text for o in outs], probs, {"accuracy": 1.0}).per_reward["accuracy"])


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def run_r1ray(start: Path, root: Path, prompts_per_step: int, steps: int, max_tokens: int, lr: float,
              seed: int, threads: int = 1, mode: str = "sync", difficulty: int = 1, repeat: int = 0) -> dict[str, Any]:
    from r1ray.config import load_config
    from r1ray.testing.runs import grpo_rollouts
    from r1ray.train.stages.grpo.stage import GRPOConfig, run

    micro = min(prompts_per_step, 8)  # one micro-batch (one pool unit) of <= 64 completions, as TRL's one batch
    name = f"r1ray-{mode}-{prompts_per_step}-{threads}-r{repeat}"  # a new name per repeat: a same name resumes
    cfg = load_config(GRPOConfig, [
        f"model.init_from={start}", f"storage.root={root}", f"run_name={name}", f"seed={seed}",
        f"train.max_steps={steps}", f"train.global_batch_size={prompts_per_step}", f"train.micro_batch_size={micro}",
        "train.eval_every=0", f"train.log_every={steps}", f"checkpoint.every={steps}", f"optim.lr={lr}",
        # the whole block: a dotted override of one optim field resets the others to OptimConfig's defaults
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0.0",
        "deepspeed.zero_stage=0", "scaling.num_workers=1", "scaling.cpus_per_worker=1", f"train.torch_threads={threads}",
        "grpo.engine_torch_threads=1",
        # TRL's prompts: every one at --difficulty (GRPOConfig's default curriculum mixes levels 1-3)
        "curriculum=null", f"grpo.difficulty={difficulty}", "grpo.eval_difficulties=[]",
        f"grpo.group_size={G}", f"grpo.rewards={json.dumps(REWARDS)}", f"grpo.max_completion_tokens={max_tokens}",
        "grpo.loss_type=dapo", "grpo.beta=0", "grpo.eval_problems=8", "ray.num_cpus=4", "ray.include_dashboard=false",
        "logging.wandb.mode=disabled", f"grpo.async_rollouts={mode == 'async'}",
    ])
    t0 = time.perf_counter()
    result = run(cfg)
    wall = time.perf_counter() - t0
    recs = grpo_rollouts(result.run_dir)
    # step s's time: from step s-1's record to step s's (records are written at the same point of every step)
    step_cps = {s: prompts_per_step * G / (recs[s]["time"] - recs[s - 1]["time"]) for s in sorted(recs)
                if s - 1 in recs}
    return {"per_step": list(step_cps.values()), "step_cps": step_cps, "wall_s": wall, "export": result.export_path,
            "zero_variance": statistics.mean(r["frac_zero_variance_groups"] for r in recs.values()),
            "reward": [recs[s]["reward_mean"] for s in sorted(recs)],
            "completion_tokens": _mean([r.get("completion_length_mean") for r in recs.values()]),
            "clipped_fraction": _mean([r.get("completion_clipped_fraction") for r in recs.values()])}


def run_trl(start: Path, out: Path, prompts_per_step: int, steps: int, max_tokens: int, lr: float,
            seed: int, threads: int, difficulty: int = 1) -> dict[str, Any]:
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
    # stop where r1ray's engine stops: at the end of the assistant turn (<|im_end|>) as well as at EOS. TRL (1.16)
    # stops, masks and counts clipped completions at the generation config's EOS ids plus the tokenizer's, and
    # this tokenizer's EOS never follows an assistant turn: without this every TRL completion runs to the maximum
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [tok.eos_token_id, im_end]
    probs = sample_problems({"arithmetic": 1.0}, prompts_per_step * steps, seed=seed, split="train",
                            difficulty=difficulty)
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
    logged: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            # TRL's own metrics, averaged over the steps since the last log (logging_steps = steps: all of them)
            if logs and "completions/mean_length" in logs:
                logged.update(logs)

    args = TRLConfig(
        output_dir=str(out), per_device_train_batch_size=prompts_per_step * G, num_generations=G,
        max_completion_length=max_tokens, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
        weight_decay=0.0, warmup_steps=0, beta=0.0, loss_type="dapo", temperature=1.0, use_cpu=True, bf16=False,
        # a ~1M-parameter model needs no activation recomputation; TRL's configs default it to True
        gradient_checkpointing=False,
        report_to=[], logging_steps=steps, save_strategy="no", seed=seed, gradient_accumulation_steps=1,
        num_iterations=1, shuffle_dataset=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    stop_ids = [int(i) for i in getattr(trainer, "eos_token_ids", [tok.eos_token_id])]
    if im_end not in stop_ids:
        print("WARNING: this TRL stops at the tokenizer's EOS only, not at <|im_end|>: its completions run to the "
              "maximum (see the clipped fraction); TRL >= 1.16 reads the generation config's stop ids", flush=True)
    t0 = time.perf_counter()
    stamps.append(t0)
    trainer.train()
    wall = time.perf_counter() - t0
    export = out / "final"
    trainer.model.save_pretrained(str(export), safe_serialization=True)
    tok.save_pretrained(str(export))
    # step s's time: from the end of step s-1 (the start of training for step 1) to the end of step s
    step_cps = {s: prompts_per_step * G / (stamps[s] - stamps[s - 1]) for s in range(1, len(stamps))}
    return {"per_step": list(step_cps.values()), "step_cps": step_cps, "wall_s": wall, "export": str(export),
            "zero_variance": statistics.mean(zero_var) if zero_var else None,
            "completion_tokens": logged.get("completions/mean_length"),
            "clipped_fraction": logged.get("completions/clipped_ratio"), "stops_at_im_end": im_end in stop_ids}


def measured(res: dict[str, Any], first: int) -> float:
    """One run's completions/s: the median over steps first+1..N (the first steps hold warm-up)."""
    vals = [v for s, v in res["step_cps"].items() if s > first] or list(res["step_cps"].values())
    return statistics.median(vals)


def fastest(name: str, size: int, counts: list[int], one_run, first: int, a: argparse.Namespace) -> dict[str, Any]:
    """Run once per thread count; the fastest run's figures (completions/s, held-out accuracy). One repeat, no
    interleaving: ``main`` runs ``arms`` instead."""
    best = None
    for threads in counts:
        res = one_run(threads)
        cps = measured(res, first)
        print(f"{name:5s} {size}/step, {threads} thread(s): {cps:.1f} completions/s", flush=True)
        if best is None or cps > best[0]:
            best = (cps, threads, res)
    cps, threads, res = best
    difficulty = getattr(a, "difficulty", None) or 1
    summary = {"completions_per_s": cps, "threads": threads, "wall_s": res["wall_s"],
               "accuracy": accuracy(res["export"], a.eval_problems, a.max_tokens, a.seed, difficulty),
               "zero_variance_groups": res["zero_variance"], "completion_tokens": res.get("completion_tokens"),
               "clipped_fraction": res.get("clipped_fraction")}
    print(f"{name:5s} {size}/step: {summary}", flush=True)
    return summary


def arms(size: int, start: Path, root: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    """The arms of one size, in their run order: r1ray on-policy per learner thread count, r1ray async (1 thread
    each for the learner and the engine, which then run at once), TRL per torch thread count. ``run(repeat)``
    runs the arm once."""
    prompts = size // G
    out = []
    if "sync" in a.r1ray_modes:
        for th in a.r1ray_threads:
            out.append({"key": f"r1ray_t{th}", "group": "r1ray", "threads": th, "label": f"r1ray on-policy {th}t",
                        "run": lambda rep, th=th: run_r1ray(start, root / "r1ray", prompts, a.steps, a.max_tokens,
                                                            a.lr, a.seed, th, "sync", a.difficulty, rep)})
    if "async" in a.r1ray_modes:
        out.append({"key": "r1ray_async_t1", "group": "r1ray_async", "threads": 1, "label": "r1ray async 1t",
                    "run": lambda rep: run_r1ray(start, root / "r1ray", prompts, a.steps, a.max_tokens, a.lr,
                                                 a.seed, 1, "async", a.difficulty, rep)})
    if not a.skip_trl:
        for th in a.trl_threads:
            out.append({"key": f"trl_t{th}", "group": "trl", "threads": th, "label": f"TRL {th}t",
                        "run": lambda rep, th=th: run_trl(start, root / f"trl-{size}-{th}-r{rep}", prompts, a.steps,
                                                          a.max_tokens, a.lr, a.seed, th, a.difficulty)})
    return out


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_repeat": values}


def summarize(arm: dict[str, Any], reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm over its repeats: median completions/s, min-max, every repeat; mean tokens and clipped fraction."""
    cps = [r["completions_per_s"] for r in reps]
    return {"arm": arm["key"], "group": arm["group"], "label": arm["label"], "threads": arm["threads"],
            "completions_per_s": statistics.median(cps), "completions_per_s_min": min(cps),
            "completions_per_s_max": max(cps), "completions_per_s_per_repeat": cps,
            "completion_tokens": _mean([r["completion_tokens"] for r in reps]),
            "completion_tokens_per_repeat": [r["completion_tokens"] for r in reps],
            "clipped_fraction": _mean([r["clipped_fraction"] for r in reps]),
            "clipped_fraction_per_repeat": [r["clipped_fraction"] for r in reps],
            "zero_variance_groups": _mean([r["zero_variance"] for r in reps]),
            "wall_s_per_repeat": [r["wall_s"] for r in reps],
            **({"stops_at_im_end": all(r["stops_at_im_end"] for r in reps)} if "stops_at_im_end" in reps[0] else {})}


def _v(x: float | None, spec: str) -> str:
    """``x`` in ``spec``, or a dash as wide (a side that logged no such figure)."""
    if x is not None:
        return format(x, spec)
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return "-".rjust(int(width)) if width else "-"


def _ratio(row: dict[str, Any], key: str) -> str:
    sp = row.get(f"ratio_{key}_spread")
    return f"{sp['median']:.2f} ({sp['min']:.2f}-{sp['max']:.2f})" if sp else "-"


def conditions(a: argparse.Namespace, first: int) -> dict[str, Any]:
    """What the numbers were measured under (printed with the table and written to --json)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "steps": a.steps, "measured_steps": f"{first + 1}-{a.steps}", "sizes": a.sizes, "group_size": G,
        "repeats": a.repeats, "order": "interleaved: every arm once per round, in the listed order, repeats rounds",
        "max_tokens": a.max_tokens, "difficulty": a.difficulty, "sft_steps": a.sft_steps, "lr": a.lr, "seed": a.seed,
        "eval_problems": a.eval_problems, "r1ray_modes": a.r1ray_modes, "r1ray_learner_threads": a.r1ray_threads,
        "r1ray_engine_threads": 1, "r1ray_async_threads": 1, "trl_threads": [] if a.skip_trl else a.trl_threads,
        "trl_gradient_checkpointing": False, "dtype": "float32",
        "torch": torch.__version__, "trl": ver("trl"), "transformers": ver("transformers"), "ray": ver("ray"),
        "deepspeed": ver("deepspeed"), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None, "cpu_model": cpu_model, "loadavg_start": list(os.getloadavg()),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64], help="completions per step (multiples of 8)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of every arm, interleaved (A B C, A B C, ...); medians, min-max and ratios over them")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="max completion tokens (default 128: a level-1 worked solution is <= 120 tokens; --long: 320)")
    ap.add_argument("--difficulty", type=int, default=None,
                    help="arithmetic level of the prompts, the SFT warm-up and the eval problems (default 1; --long: 2)")
    ap.add_argument("--long", action="store_true",
                    help=f"reasoning-length row: --difficulty {LONG['difficulty']} --max-tokens {LONG['max_tokens']} "
                         "(unless given): the start model writes long worked solutions")
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--trl-threads", type=int, nargs="+", default=[1, 2],
                    help="a TRL arm per torch thread count; the one with the higher median is compared")
    ap.add_argument("--r1ray-threads", type=int, nargs="+", default=[1, 2],
                    help="an on-policy r1ray arm per count of learner torch threads (the engine keeps 1); the one "
                         "with the higher median is compared (async runs use 1: the learner and the engine then run "
                         "at once, one core each)")
    ap.add_argument("--r1ray-modes", nargs="+", default=["sync", "async"], choices=["sync", "async"],
                    help="sync: on-policy (generate, then learn); async: grpo.async_rollouts (one step off-policy)")
    ap.add_argument("--json", type=str, default=None)
    a = ap.parse_args(argv)
    if a.max_tokens is None:
        a.max_tokens = LONG["max_tokens"] if a.long else 128
    if a.difficulty is None:
        a.difficulty = LONG["difficulty"] if a.long else 1
    if a.repeats < 1 or a.steps < 2 or any(s % G or s <= 0 for s in a.sizes):
        ap.error(f"--repeats >= 1, --steps >= 2 and --sizes positive multiples of {G}")
    if not a.skip_trl:  # fail now, not after the first round's r1ray runs
        from importlib.metadata import PackageNotFoundError, version
        try:
            trl_version = version("trl")
        except PackageNotFoundError:
            ap.error("TRL is not installed: pip install 'trl>=1.16' (or run with --skip-trl)")
        if tuple(int(x) for x in trl_version.split(".")[:2] if x.isdigit()) < (1, 16):
            print(f"WARNING: TRL {trl_version}: before 1.16 TRL may stop only at the tokenizer's EOS, not at "
                  "<|im_end|> (see each TRL arm's clipped fraction); pip install 'trl>=1.16'", flush=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    first = min(4, a.steps - 2)  # measured: steps first+1..N (5..N by default)
    cond = conditions(a, first)
    print("conditions: " + json.dumps(cond), flush=True)
    root = Path(tempfile.mkdtemp(prefix="r1ray-grpo-bench-"))
    print(f"building the start model in {root} ...", flush=True)
    start = build_start(root, a.sft_steps, a.seed, a.difficulty, a.max_tokens)
    acc0 = accuracy(str(start), a.eval_problems, a.max_tokens, a.seed, a.difficulty)
    print(f"start: held-out accuracy {acc0:.3f}", flush=True)
    rows = []
    for size in a.sizes:
        out: dict[str, Any] = {"completions_per_step": size}
        todo = arms(size, start, root, a)
        runs: dict[str, list[dict[str, Any]]] = {arm["key"]: [] for arm in todo}
        exports: dict[str, str] = {}
        for rep in range(a.repeats):
            for arm in todo:
                res = arm["run"](rep)
                one = {"completions_per_s": measured(res, first), "completion_tokens": res.get("completion_tokens"),
                       "clipped_fraction": res.get("clipped_fraction"), "zero_variance": res["zero_variance"],
                       "wall_s": res["wall_s"]}
                if "stops_at_im_end" in res:
                    one["stops_at_im_end"] = res["stops_at_im_end"]
                runs[arm["key"]].append(one)
                exports[arm["key"]] = res["export"]  # the last repeat's weights: held-out accuracy of the best
                print(f"{arm['label']:18s} {size}/step, repeat {rep + 1}/{a.repeats}: "
                      f"{one['completions_per_s']:.1f} completions/s, {_v(one['completion_tokens'], '.1f')} "
                      f"tokens/completion, clipped {_v(one['clipped_fraction'], '.3f')}", flush=True)
        out["arms"] = [summarize(arm, runs[arm["key"]]) for arm in todo]
        for group in ("r1ray", "r1ray_async", "trl"):
            cands = [s for s in out["arms"] if s["group"] == group]
            if not cands:
                continue
            best = dict(max(cands, key=lambda s: s["completions_per_s"]))
            best["accuracy"] = accuracy(exports[best["arm"]], a.eval_problems, a.max_tokens, a.seed, a.difficulty)
            out[group] = best
        if "trl" in out:
            trl = out["trl"]["completions_per_s_per_repeat"]
            for key in ("r1ray", "r1ray_async"):
                if key in out:
                    pairs = [r / t for r, t in zip(out[key]["completions_per_s_per_repeat"], trl, strict=True)]
                    out[f"ratio_{key}"] = statistics.median(pairs)
                    out[f"ratio_{key}_spread"] = spread(pairs)
            modes = [k for k in ("r1ray", "r1ray_async") if k in out]
            if modes:
                top = max(modes, key=lambda k: out[k]["completions_per_s"])
                out["ratio_best"] = {"mode": top, **out[f"ratio_{top}_spread"]}
        rows.append(out)
    cond["loadavg_end"] = list(os.getloadavg())
    report(rows, cond, acc0)
    if a.json:
        Path(a.json).write_text(json.dumps({"conditions": cond, "start_accuracy": acc0, "rows": rows}, indent=2))
    return 0


def report(rows: list[dict[str, Any]], cond: dict[str, Any], acc0: float) -> None:
    c = cond
    print(f"\nconditions: {c['steps']} steps (measured {c['measured_steps']}), sizes {c['sizes']}, G={c['group_size']}, "
          f"{c['repeats']} repeat(s) interleaved, max {c['max_tokens']} tokens, difficulty {c['difficulty']}, "
          f"r1ray learner threads {c['r1ray_learner_threads']} (engine 1, async 1+1), TRL threads {c['trl_threads']} "
          f"(gradient checkpointing off), torch {c['torch']}, TRL {c['trl']}, transformers {c['transformers']}, "
          f"ray {c['ray']}, deepspeed {c['deepspeed']}; {c['cpu_count']} CPUs ({c['cpu_affinity']} usable, "
          f"{c['cpu_model']}), load average {c['loadavg_start'][0]:.2f} before, {c['loadavg_end'][0]:.2f} after")
    print(f"start accuracy {acc0:.3f}")

    def rng(lo: float, hi: float, spec: str = ".1f") -> str:
        return f"{lo:{spec}}-{hi:{spec}}"

    for o in rows:
        print(f"\n{o['completions_per_step']} completions/step, per arm (median over repeats, min-max, each repeat; "
              f"tokens/completion and clipped fraction averaged over steps and repeats):")
        print(f"  {'arm':18s} | {'c/s':>6} {'min-max':>11} | {'repeats':24s} | {'tokens':>6} {'clipped':>7} "
              f"{'zero-var':>8}")
        for s in o["arms"]:
            reps = " ".join(f"{x:.1f}" for x in s["completions_per_s_per_repeat"])
            print(f"  {s['label']:18s} | {s['completions_per_s']:>6.1f} "
                  f"{rng(s['completions_per_s_min'], s['completions_per_s_max']):>11} | {reps:24s} | "
                  f"{_v(s['completion_tokens'], '>6.1f')} {_v(s['clipped_fraction'], '>7.3f')} "
                  f"{_v(s['zero_variance_groups'], '>8.2f')}"
                  + ("  (did NOT stop at <|im_end|>: TRL too old)" if s.get("stops_at_im_end") is False else ""))
    nan = float("nan")
    print("\nbest arm of each side (c/s: median over repeats; ratio: per repeat pair, median (min-max)):")
    print(f"{'per step':>9} | {'r1ray c/s':>9} {'thr':>3} {'acc':>6} | {'async c/s':>9} {'acc':>6} | "
          f"{'TRL c/s':>9} {'thr':>3} {'acc':>6} | {'ratio on-policy':>19} | {'ratio async':>19}")
    for o in rows:
        r, ra, t = o.get("r1ray", {}), o.get("r1ray_async", {}), o.get("trl", {})
        print(f"{o['completions_per_step']:>9} | {r.get('completions_per_s', nan):>9.1f} {r.get('threads', '-'):>3} "
              f"{r.get('accuracy', nan):>6.3f} | {ra.get('completions_per_s', nan):>9.1f} "
              f"{ra.get('accuracy', nan):>6.3f} | {t.get('completions_per_s', nan):>9.1f} {t.get('threads', '-'):>3} "
              f"{t.get('accuracy', nan):>6.3f} | {_ratio(o, 'r1ray'):>19} | {_ratio(o, 'r1ray_async'):>19}")
        if "ratio_best" in o:
            b = o["ratio_best"]
            print(f"{'':>9}   best r1ray mode {b['mode']}: {b['median']:.2f}x TRL (min {b['min']:.2f}, max "
                  f"{b['max']:.2f}; per repeat {' '.join(f'{x:.2f}' for x in b['per_repeat'])})")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
