"""GRPO against its controls on the level SFT never saw: the SFT start, GRPO, rejection-sampling fine-tuning and
continued SFT at equal wall time, several seeds, the recipe's choices made on a dev split, results on a test split.

    python benchmarks/grpo_quality.py --root /tmp/q                       # the default start, 3 seeds, 3 arms
    python benchmarks/grpo_quality.py --root /tmp/q --select 2.5e-4 5e-4 1e-3   # choose GRPO's lr on the dev split
    python benchmarks/grpo_quality.py --start /path/to/sft/export --minutes 8 --seeds 0 1 2 --json out.json

1. The start: ``--start`` or the default SFT export under ``--root`` (the embedded default chain: data, pretraining,
   SFT on levels 1 and 2 of arithmetic, built through ``r1ray.pipeline.upstream`` when missing).
2. Problems of arithmetic level 3 (stories of three or four operations; no SFT trace is one; the pretraining corpus
   holds worked level-3 documents of the *train* split, half in chat form) from the task's *eval* split, cut in two by a hash of each question: ``--dev`` problems to choose on,
   ``--test`` problems to report on. Neither is ever trained on (every arm draws from the train split).
3. Each arm gets the same wall-clock budget (``--minutes``, from its call to its return: start-up, generation,
   training, checkpoint and export), ended by the loop's stop request (``<run_dir>/STOP``) at the deadline:
   - ``grpo``: ``GRPOConfig``'s defaults (the default pipeline's recipe) from the start;
   - ``rft``: rejection-sampling fine-tuning with r1ray's sequence distillation: the start samples one completion at
     temperature 1 for each of ``--rft-prompts`` level-3 train problems, keeps those its verifier accepts, and is
     fine-tuned on them (SFT's loss) until the deadline;
   - ``sft``: SFT continued on the start's own data (levels 1 and 2, fresh problems) until the deadline: more
     compute with no reward;
   - ``sft-gold`` (only when named): SFT on level 3's gold worked solutions, the imitation GRPO never gets to see.
   The rft and sft arms train with GRPO's optimizer settings (``control_optim``; ``--control-lr`` to change them).
4. For the start and every arm: greedy pass@1 and pass@8 (8 samples at temperature 1) on the test problems, and
   greedy accuracy on ``--test`` problems of levels 1 and 2 (what the arm did to the levels it was not trained on).
   Arms run seed by seed, interleaved (grpo, rft, sft, then the next seed), so a slow stretch of the machine does
   not fall on one arm. Printed: mean and min-max over seeds; ``--json`` writes every number.
5. Extra ``key=value`` arguments override the grpo arm's config (a recipe variant, e.g. ``curriculum=null``).
   Every arm also prints its greedy pass@1 on the dev split: compare variants there (seed 0), then run the
   chosen one over the seeds and report the test split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r1ray.tasks.base import MAX_COMPLETION_TOKENS  # noqa: E402

BASE = ["ray.include_dashboard=false", "logging.wandb.mode=disabled"]


# --------------------------------------------------------------------------------------------------
# Problems: dev and test halves of the eval split
# --------------------------------------------------------------------------------------------------


def split_problems(level: int, n_dev: int, n_test: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """``n_dev`` and ``n_test`` eval-split problems of arithmetic ``level``, a problem going to dev or test by a hash
    of its question (so the halves never share a question)."""
    from r1ray.tasks.registry import get_task

    task, dev, test, seen, i = get_task("arithmetic"), [], [], set(), 0
    while len(dev) < n_dev or len(test) < n_test:
        p = task.problem(i, seed=seed, split="eval", difficulty=level)
        i += 1
        if p.uid() in seen:
            continue
        seen.add(p.uid())
        half = dev if int(hashlib.sha256(("dev-test:" + p.uid()).encode()).hexdigest()[:8], 16) % 2 == 0 else test
        if len(half) < (n_dev if half is dev else n_test):
            half.append(p)
    return dev, test


def score(model_dir: str, problems: list[Any], samples: int = 0, max_tokens: int = MAX_COMPLETION_TOKENS) -> dict[str, float]:
    """Greedy pass@1 and (with ``samples``) pass@``samples`` at temperature 1, through ``HFEngine``."""
    from r1ray.infer.hf import HFEngine
    from r1ray.infer.types import SamplingParams
    from r1ray.tasks.rewards import score as verify

    eng = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", max_batch_size=64, max_queue=1 << 16)
    try:
        prompts = [eng.tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
                   for p in problems]
        greedy = eng.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        sampled = eng.generate([q for q in prompts for _ in range(samples)],
                               [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1000 * i + j)
                                for i in range(len(prompts)) for j in range(samples)]) if samples else []
    finally:
        eng.shutdown()
    acc = verify([o.text for o in greedy], problems, {"accuracy": 1.0}).per_reward["accuracy"]
    out = {"pass@1": statistics.mean(acc), "length": statistics.mean(len(o.token_ids) for o in greedy)}
    if samples:
        hits = verify([o.text for o in sampled], [p for p in problems for _ in range(samples)],
                      {"accuracy": 1.0}).per_reward["accuracy"]
        out[f"pass@{samples}"] = statistics.mean(max(hits[i * samples:(i + 1) * samples]) for i in range(len(problems)))
        out["sampled_accuracy"] = statistics.mean(hits)
    return out


# --------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------


class _Deadline:
    """Write ``<run_dir>/STOP`` from the deadline on (again every second: a run clears a stale request when its
    training starts, so a request written while it was still planning is repeated)."""

    def __init__(self, run_dir: str, seconds: float) -> None:
        self.run_dir, self.at, self.done = Path(run_dir), time.monotonic() + seconds, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from r1ray.train.core.loop import STOP_FILE

        while not self.done.wait(1.0):
            if time.monotonic() >= self.at:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / STOP_FILE).write_text("time budget\n")

    def __enter__(self) -> _Deadline:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()


def _export(result: Any) -> str:
    export = result.export_path or (str(Path(result.checkpoint) / "hf") if result.checkpoint else None)
    if export is None or not Path(export, "config.json").is_file():
        raise RuntimeError(f"the run {result.run_dir} ended {result.status} without an export")
    return export


def control_optim(args: Any) -> list[str]:
    """The optimizer of the rft and sft arms: GRPO's default (learning rate, warmup, constant schedule, no weight
    decay), so the arms differ in their data and objective only; ``--control-lr`` replaces its learning rate.
    SFT's own recipe (peak 2e-3, decayed over its planned steps) would run at its peak here, where the deadline
    ends a run planned for 100,000 steps: at 2e-3 both arms unlearned the start (seed 0, 5 min: continued SFT
    level 1 91% -> 56%, level 3 60% -> 0%; RFT level 1 -> 39%)."""
    from r1ray.train.stages.grpo.stage import GRPOConfig

    o = GRPOConfig.model_fields["optim"].default
    lr = args.control_lr if args.control_lr is not None else o.lr
    return [f"optim.lr={lr}", f"optim.warmup_steps={o.warmup_steps}", f"optim.schedule={o.schedule}",
            f"optim.weight_decay={o.weight_decay}"]


def run_arm(arm: str, start: str, root: Path, seed: int, minutes: float, args: Any, overrides: list[str]) -> dict:
    """One arm from ``start`` for ``minutes`` of wall time: its export, steps and seconds."""
    from r1ray.config import load_config

    name = f"{arm}-s{seed}-{time.strftime('%H%M%S')}"
    common = [*BASE, f"storage.root={root}", f"seed={seed}", f"run_name={name}", "checkpoint.every=0",
              "train.eval_every=0"]
    if arm == "grpo":
        from r1ray.train.stages.grpo.stage import GRPOConfig, run

        cfg = load_config(GRPOConfig, [*common, f"model.init_from={start}", "train.max_steps=100000",
                                       "grpo.eval_difficulties=[]", *overrides])
    elif arm == "rft":
        from r1ray.train.stages.distill import DistillConfig, run

        cfg = load_config(DistillConfig, [*common, *control_optim(args), f"model.init_from={start}",
                                          f"distill.teacher={start}",
                                          "distill.mode=sequence", "distill.keep_correct=true",
                                          "distill.teacher_temperature=1.0", f"distill.traces={args.rft_prompts}",
                                          "data.difficulty=3", "data.max_length=640",
                                          "eval.problems_per_difficulty=0", "eval.before=false",
                                          "train.max_steps=100000", "train.eval_samples=2"])
    elif arm in ("sft", "sft-gold"):
        from r1ray.train.stages.sft import SFTConfig, run

        data = ["data.difficulty=3"] if arm == "sft-gold" else []
        cfg = load_config(SFTConfig, [*common, *control_optim(args), f"model.init_from={start}",
                                      "eval.problems_per_difficulty=0",
                                      "eval.before=false", "train.max_steps=100000", "data.replay.fraction=0",
                                      "data.max_length=640", *data])
    else:
        raise ValueError(f"unknown arm {arm!r}")
    t0 = time.perf_counter()
    with _Deadline(cfg.run_dir, 60 * minutes):
        try:
            if arm == "rft":  # the start's samples, verified: the traces step, inside the arm's wall time
                from r1ray.pipeline.upstream import prepare

                cfg = prepare("distill", cfg)
            result = run(cfg)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the "too few traces" refusal
            if arm != "rft" or "traces kept" not in str(e):
                raise
            # the start's samples held too few verified level-3 answers to fine-tune on: RFT has nothing to learn
            # from, so the arm is the start itself (reported, not hidden)
            print(f"seed {seed} rft: {e}", flush=True)
            return {"export": start, "steps": 0, "seconds": time.perf_counter() - t0, "status": "no traces"}
    return {"export": _export(result), "steps": result.steps, "seconds": time.perf_counter() - t0,
            "status": result.status}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=str, required=True, help="storage root (the default start is built here)")
    ap.add_argument("--start", type=str, default=None, help="an SFT export to start from (default: the default SFT)")
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-time budget of every arm")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", type=str, nargs="+", default=["grpo", "rft", "sft"],
                    choices=["grpo", "rft", "sft", "sft-gold"])
    ap.add_argument("--dev", type=int, default=100, help="dev problems (level 3)")
    ap.add_argument("--test", type=int, default=200, help="test problems (level 3; and of levels 1 and 2)")
    ap.add_argument("--samples", type=int, default=8, help="samples per test problem for pass@k")
    ap.add_argument("--rft-prompts", type=int, default=1500, help="rft: level-3 train problems sampled once each")
    ap.add_argument("--select", type=float, nargs="*", default=None,
                    help="choose GRPO's optim.lr among these on the dev split (seed 0), then run the arms with it")
    ap.add_argument("--control-lr", type=float, default=None,
                    help="learning rate of the rft and sft arms (default: GRPO's; control_optim)")
    ap.add_argument("--json", type=str, default=None)
    a, overrides = ap.parse_known_args(argv)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    if a.start:
        start = a.start
    else:
        from r1ray.config import load_config
        from r1ray.pipeline.upstream import default_export
        from r1ray.train.stages.sft import SFTConfig

        start = default_export("sft", load_config(SFTConfig, [*BASE, f"storage.root={root}"]))
    dev, test3 = split_problems(3, a.dev, a.test)
    tests = {3: test3, **{lv: split_problems(lv, 0, a.test)[1] for lv in (1, 2)}}

    def measure(model_dir: str) -> dict[str, float]:
        out = {f"d3_{k}": v for k, v in score(model_dir, tests[3], a.samples).items()}
        if dev:  # greedy on the dev split: what a recipe variant is chosen on (never the test split)
            out["dev_pass@1"] = score(model_dir, dev)["pass@1"]
        for lv in (1, 2):
            out[f"d{lv}_pass@1"] = score(model_dir, tests[lv])["pass@1"]
        return out

    report: dict[str, Any] = {"start": start, "minutes": a.minutes, "seeds": a.seeds, "overrides": overrides,
                              "dev": len(dev), "test": len(test3)}
    report["start_scores"] = s0 = measure(start)
    print(f"start {start}: level 3 pass@1 {s0['d3_pass@1']:.3f} pass@{a.samples} {s0[f'd3_pass@{a.samples}']:.3f}; "
          f"levels 1/2 pass@1 {s0['d1_pass@1']:.3f}/{s0['d2_pass@1']:.3f}", flush=True)
    if a.select:
        chosen, best = None, -1.0
        report["select"] = []
        for lr in a.select:
            arm = run_arm("grpo", start, root, a.seeds[0], a.minutes, a, [*overrides, f"optim.lr={lr}"])
            acc = score(arm["export"], dev)["pass@1"]
            report["select"].append({"lr": lr, "dev_pass@1": acc, "steps": arm["steps"]})
            print(f"select: GRPO lr {lr:g}: dev pass@1 {acc:.3f} ({arm['steps']} steps)", flush=True)
            if acc > best:
                chosen, best = lr, acc
        overrides = [*overrides, f"optim.lr={chosen}"]
        print(f"select: lr {chosen:g} (dev pass@1 {best:.3f})", flush=True)
    runs: dict[str, list[dict]] = {arm: [] for arm in a.arms}
    for seed in a.seeds:
        for arm in a.arms:
            r = run_arm(arm, start, root, seed, a.minutes, a, overrides if arm == "grpo" else [])
            r.update(measure(r["export"]))
            runs[arm].append({"seed": seed, **r})
            print(f"seed {seed} {arm}: dev pass@1 {r.get('dev_pass@1', float('nan')):.3f}; "
                  f"level 3 pass@1 {r['d3_pass@1']:.3f} pass@{a.samples} "
                  f"{r[f'd3_pass@{a.samples}']:.3f}; levels 1/2 {r['d1_pass@1']:.3f}/{r['d2_pass@1']:.3f}; "
                  f"{r['steps']} steps in {r['seconds']:.0f}s", flush=True)
    report["runs"] = runs
    k = a.samples
    print(f"\nlevel 3 (the RL-only level), {len(test3)} test problems; {a.minutes:g} min per arm; seeds {a.seeds}; "
          "mean (min-max) in %")
    print(f"| arm | pass@1 | pass@{k} | level 1 pass@1 | level 2 pass@1 | steps | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| SFT start | {_fmt([s0['d3_pass@1']])} | {_fmt([s0[f'd3_pass@{k}']])} | {_fmt([s0['d1_pass@1']])} | "
          f"{_fmt([s0['d2_pass@1']])} | | |")
    for arm, rs in runs.items():
        print(f"| {arm} | {_fmt([r['d3_pass@1'] for r in rs])} | {_fmt([r[f'd3_pass@{k}'] for r in rs])} | "
              f"{_fmt([r['d1_pass@1'] for r in rs])} | {_fmt([r['d2_pass@1'] for r in rs])} | "
              f"{statistics.mean(r['steps'] for r in rs):.0f} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    if "grpo" in runs:
        gain = [100 * (r["d3_pass@1"] - s0["d3_pass@1"]) for r in runs["grpo"]]
        print(f"\nGRPO gain on level 3: {statistics.mean(gain):+.1f} points (seeds: "
              f"{', '.join(f'{g:+.1f}' for g in gain)})")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
