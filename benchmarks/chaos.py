"""Chaos over a long GRPO run: random SIGKILLs of learner ranks, rollout engines, the engine pool's controller, reward
tasks and reward sandbox children.

    python benchmarks/chaos.py --steps 60 --kills 40              # on-policy
    python benchmarks/chaos.py --steps 60 --kills 40 --mode async  # one step off-policy rollouts

Builds a tiny policy (``debug`` preset, tokenizer trained here), runs GRPO on it uninterrupted (the reference),
then the same run again while ``r1ray.testing.chaos.Chaos`` kills random victims at random moments (a gap drawn
in ``--gap`` seconds after each kill), by PID, from outside the run. Prints one line per kill (victim, the run's
progress then, seconds until the next completed step), the median seconds from a kill to the next completed step
per victim kind, and whether the run matched the reference: every step's completions (a hash of their tokens)
and the final export, byte for byte. Exit status 1 on any divergence.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASE = [
    "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every=0", "train.log_every=5",
    "checkpoint.every=2", "checkpoint.keep=2", "optim.lr=0.02", "optim.warmup_steps=0", "optim.schedule=constant",
    "deepspeed.zero_stage=2", "scaling.num_workers=1", "logging.wandb.mode=disabled", "grpo.group_size=8",
    "grpo.rewards={tag_count: 1.0}", "grpo.max_completion_tokens=24", "grpo.eval_problems=8", "grpo.temperature=1.0",
    "grpo.loss_type=dapo", "ray.include_dashboard=false", "curriculum=null", "grpo.difficulty=1",
    "grpo.eval_difficulties=[]", "train.max_failures=-1",
]
ASYNC = ["grpo.async_rollouts=true", "grpo.tis_cap=2.0"]


def build_policy(out: Path) -> str:
    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import train_tokenizer

    words = "the a of to and in is it that for on with as was he she they we you at by".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(30)) + f" {i} + {i + 3} = {2 * i + 3}."
             for i in range(400)]
    tok = train_tokenizer(texts, out / "tokenizer", vocab_size=400)
    model = build_model(ModelConfig(preset="debug", max_position_embeddings=512), tok, seed=3)
    return str(save_model(model, tok, out / "policy"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--gap", type=float, nargs=2, default=[3.0, 12.0], help="seconds between kills (uniform)")
    ap.add_argument("--mode", choices=["sync", "async"], default="sync")
    ap.add_argument("--victims", nargs="+", default=["learner", "engine", "pool_controller", "reward", "sandbox"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import ray

    from r1ray.config import load_config
    from r1ray.testing.chaos import Chaos, leftovers, seconds_to_next_step
    from r1ray.testing.runs import grpo_rollouts
    from r1ray.train.stages.grpo.stage import GRPOConfig, run

    work = Path(args.workdir or tempfile.mkdtemp(prefix="r1ray-chaos-"))
    policy = build_policy(work)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", configure_logging=False)
    extra = [f"train.max_steps={args.steps}", f"model.init_from={policy}", *(ASYNC if args.mode == "async" else [])]

    def cfg(name: str):
        return load_config(GRPOConfig, [*BASE, *extra, f"storage.root={work / name}", f"run_name={name}"])

    t0 = time.time()
    ref = run(cfg("ref"))
    ref_s = time.time() - t0
    rec_path = work / "chaos" / "runs" / "chaos" / "grpo" / "rollouts-rank0.jsonl"

    def progress() -> str:
        lines = rec_path.read_text().splitlines() if rec_path.exists() else []
        return f"after step {json.loads(lines[-1])['step']}" if lines else "before step 1"

    t0 = time.time()
    with Chaos(kinds=args.victims, kills=args.kills, gap_s=tuple(args.gap), first_after_s=0.5, seed=args.seed,
               progress=progress, wait_until=rec_path.exists) as chaos:
        out = run(cfg("chaos"))
    chaos_s = time.time() - t0
    a, b = grpo_rollouts(ref.run_dir), grpo_rollouts(out.run_dir)
    times = [(s, r["time"]) for s, r in sorted(b.items())]
    diverged = [s for s in sorted(a) if a[s]["completion_hash"] != b.get(s, {}).get("completion_hash")]
    same_export = Path(ref.export_path, "model.safetensors").read_bytes() == \
        Path(out.export_path, "model.safetensors").read_bytes()
    print(f"\nGRPO {args.mode}, {args.steps} steps: reference {ref_s:.0f} s; with chaos {chaos_s:.0f} s, "
          f"{len(chaos.done)} kills, {out.restarts} worker-group restarts, status {out.status}")
    for line in chaos.report(times):
        print("  " + line)
    print("\nseconds from a kill to the next completed step, per victim (median, min-max, n):")
    for kind, xs in sorted(seconds_to_next_step(chaos.done, times).items()):
        print(f"  {kind:15s} {statistics.median(xs):6.1f}  {min(xs):5.1f}-{max(xs):5.1f}  n={len(xs)}")
    print(f"\nsteps whose completions differ from the reference: {diverged or 'none'}; export byte-identical: "
          f"{same_export}")
    deadline = time.time() + 30  # actors of the finished run exit shortly after it returns
    while (left := leftovers()) and time.time() < deadline:
        time.sleep(0.5)
    print(f"processes left behind: {left or 'none'}")
    ray.shutdown()
    return 0 if (not diverged and same_export and out.status == "completed") else 1


if __name__ == "__main__":
    sys.exit(main())
