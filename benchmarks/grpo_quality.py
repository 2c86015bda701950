"""GRPO quality: from a deliberately weak SFT start, how much held-out greedy accuracy GRPO adds in a time budget.

    python benchmarks/grpo_quality.py                           # the recipe (configs/grpo/quality.yaml), 2 CPUs
    python benchmarks/grpo_quality.py --sft-steps 600 --minutes 15 grpo.temperature=0.8   # GRPO overrides
    python benchmarks/grpo_quality.py --init-from /path/to/sft/export --json out.json

1. The start: the default pretraining export (``r1ray.pipeline.upstream``: data + pretraining, prepared under
   ``--root`` when missing) and the default SFT run on arithmetic traces (``--sft-of`` 2000 steps) stopped
   halfway (``--sft-steps`` 1000): the policy writes the format and gets some answers right, and the same SFT
   run would still gain ~16 points by its end. Or ``--init-from`` any export.
2. Held-out greedy accuracy of the start on ``--eval-problems`` eval-split problems of GRPO's task mix (the
   problems GRPO's own evaluation uses: same seed, split, level and count), through ``HFEngine``.
3. GRPO with ``configs/grpo/quality.yaml`` (plus any ``key=value`` overrides), its wall time measured from the
   call to its return (engine pool start, every step, evaluations, checkpoints, the export).
4. The same accuracy on GRPO's export. Prints start, end, the gain in points and GRPO's wall time against
   ``--minutes``; exits 1 when GRPO ran past the budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs" / "grpo" / "quality.yaml"


def weak_sft(root: Path, steps: int, of: int, seed: int) -> str:
    """The default pretraining export (prepared if missing) fine-tuned for the first ``steps`` steps of an
    ``of``-step SFT run (its learning-rate schedule), stopped there: the export of that checkpoint."""
    from r1ray.config import load_config
    from r1ray.pipeline.upstream import default_export
    from r1ray.train.sft import SFTConfig
    from r1ray.train.sft import run as sft

    base = [f"storage.root={root}", f"seed={seed}", "ray.include_dashboard=false", "logging.wandb.mode=disabled"]
    cfg = load_config(SFTConfig, [*base, "run_name=weak-sft"])
    init = default_export("pretrain", cfg)
    cfg = load_config(SFTConfig, [*base, f"run_name=weak-sft-{steps}-of-{of}", f"model.init_from={init}",
                                  f"train.max_steps={of}", f"train.stop_after_steps={steps}",
                                  f"checkpoint.every={steps}", "train.eval_every=0", "eval.before=false"])
    result = sft(cfg)
    export = result.export_path or (str(Path(result.checkpoint) / "hf") if result.checkpoint else None)
    if export is None or not Path(export, "config.json").is_file():
        raise RuntimeError(f"the weak SFT run ended {result.status} without an export")
    return export


def greedy_accuracy(model_dir: str, cfg: Any) -> float:
    """Greedy exact-match accuracy on GRPO's evaluation problems (its seed, split, levels and count)."""
    from r1ray.infer.hf import HFEngine
    from r1ray.infer.types import SamplingParams
    from r1ray.tasks.registry import sample_problems
    from r1ray.tasks.rewards import score

    g = cfg.grpo
    probs = sample_problems(g.tasks, g.eval_problems, seed=cfg.seed, split="eval", difficulty=g.difficulty,
                            options=g.task_options)
    eng = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", max_batch_size=64, max_queue=4096)
    try:
        prompts = [eng.tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False)
                   for p in probs]
        outs = eng.generate(prompts, SamplingParams(max_tokens=g.max_completion_tokens, temperature=0.0))
    finally:
        eng.shutdown()
    return statistics.mean(score([o.text for o in outs], probs, {"accuracy": 1.0}).per_reward["accuracy"])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=str, default=None, help="storage root (default: a new temporary directory)")
    ap.add_argument("--init-from", type=str, default=None, help="start from this export instead of a weak SFT")
    ap.add_argument("--sft-steps", type=int, default=1000, help="SFT steps before GRPO starts")
    ap.add_argument("--sft-of", type=int, default=2000,
                    help="the SFT run's length (its schedule): the start is that run stopped at --sft-steps")
    ap.add_argument("--minutes", type=float, default=15.0, help="GRPO's time budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None)
    a, overrides = ap.parse_known_args(argv)
    from r1ray.config import load_config
    from r1ray.train.grpo import GRPOConfig
    from r1ray.train.grpo import run as grpo

    root = Path(a.root or tempfile.mkdtemp(prefix="r1ray-grpo-quality-"))
    t0 = time.perf_counter()
    start = a.init_from or weak_sft(root, a.sft_steps, a.sft_of, a.seed)
    sft_s = time.perf_counter() - t0
    cfg = load_config(GRPOConfig, [f"--config={RECIPE}", f"model.init_from={start}", f"storage.root={root}",
                                   f"seed={a.seed}", *overrides])
    acc0 = greedy_accuracy(start, cfg)
    print(f"start {start}: held-out greedy accuracy {acc0:.3f} ({cfg.grpo.eval_problems} problems)", flush=True)
    t0 = time.perf_counter()
    result = grpo(cfg)
    wall = time.perf_counter() - t0
    if result.export_path is None:
        raise RuntimeError(f"GRPO ended {result.status} without an export")
    acc1 = greedy_accuracy(result.export_path, cfg)
    out = {"start": start, "start_accuracy": acc0, "end_accuracy": acc1, "gain_points": 100 * (acc1 - acc0),
           "grpo_seconds": wall, "budget_seconds": 60 * a.minutes, "steps": result.steps,
           "in_loop_accuracy": result.metrics.get("accuracy"), "setup_seconds": sft_s, "run_dir": result.run_dir}
    print(f"\nGRPO ({RECIPE.name}{' + ' + ' '.join(overrides) if overrides else ''}): {result.steps} steps in "
          f"{wall / 60:.1f} min (budget {a.minutes:.0f})")
    print(f"held-out greedy accuracy: {acc0:.3f} -> {acc1:.3f} ({out['gain_points']:+.1f} points; the run's own "
          f"final evaluation {out['in_loop_accuracy']})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0 if wall <= 60 * a.minutes else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
