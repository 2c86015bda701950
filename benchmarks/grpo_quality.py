"""GRPO quality: from a deliberately weak SFT start, how much held-out greedy accuracy GRPO adds in a time budget.

    python benchmarks/grpo_quality.py                           # the recipe (configs/grpo/quality.yaml), 2 CPUs
    python benchmarks/grpo_quality.py --start half-sft          # the other start (below)
    python benchmarks/grpo_quality.py --minutes 15 grpo.temperature=0.8   # GRPO overrides
    python benchmarks/grpo_quality.py --init-from /path/to/sft/export --json out.json

1. The start, on the default pretraining export (``r1ray.pipeline.upstream``: data + pretraining, prepared under
   ``--root`` when missing):
   - ``flawed-teacher`` (default): the default SFT recipe (``--sft-steps`` 2000) on cold-start traces of
     level-1 arithmetic where ``--flaw`` (0.6) of them keep the correct working but answer with the question's
     first number. Imitation makes that shortcut the greedy answer while sampling still finds the right one
     (pass@k > pass@1): the weakness a verifiable reward can correct.
   - ``half-sft``: the default SFT run on gold traces (``--sft-of`` 2000 steps) stopped at step 1000: the policy
     writes the format and gets some answers right; its errors are arithmetic facts it does not know.
   - or ``--init-from`` any export.
2. Held-out greedy accuracy of the start on ``grpo.eval_problems`` (200) eval-split problems of GRPO's task mix (the
   problems GRPO's own evaluation uses: same seed, split, level and count), through ``HFEngine``.
3. GRPO with ``configs/grpo/quality.yaml`` (plus any ``key=value`` overrides), its wall time measured from the
   call to its return (engine pool start, every step, evaluations, checkpoints, the export).
4. The same accuracy on GRPO's export. Prints start, end, the gain in points and GRPO's wall time against
   ``--minutes``; exits 1 when GRPO ran past the budget.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs" / "grpo" / "quality.yaml"


def _sft(root: Path, seed: int, name: str, overrides: list[str]) -> str:
    """The default SFT recipe from the default pretraining export (prepared under ``root`` if missing), with
    ``overrides``, as run ``name``: the export it ends with (a stopped segment's checkpoint export)."""
    from r1ray.config import load_config
    from r1ray.pipeline.upstream import default_export
    from r1ray.train.sft import SFTConfig
    from r1ray.train.sft import run as sft

    base = [f"storage.root={root}", f"seed={seed}", "ray.include_dashboard=false", "logging.wandb.mode=disabled"]
    init = default_export("pretrain", load_config(SFTConfig, [*base, f"run_name={name}"]))
    result = sft(load_config(SFTConfig, [*base, f"run_name={name}", f"model.init_from={init}",
                                         "train.eval_every=0", "eval.before=false", *overrides]))
    export = result.export_path or (str(Path(result.checkpoint) / "hf") if result.checkpoint else None)
    if export is None or not Path(export, "config.json").is_file():
        raise RuntimeError(f"the SFT run {name} ended {result.status} without an export")
    return export


def _first_number(question: str) -> str | None:
    """The first integer in a question: what the flawed teacher answers with."""
    m = re.search(r"\d+", question)
    return m.group(0) if m else None


def weak_sft(root: Path, steps: int, of: int, seed: int) -> str:
    """The default pretraining export fine-tuned for the first ``steps`` steps of an ``of``-step SFT run (its
    learning-rate schedule), stopped there: the export of that checkpoint."""
    return _sft(root, seed, f"weak-sft-{steps}-of-{of}",
                [f"train.max_steps={of}", f"train.stop_after_steps={steps}", f"checkpoint.every={steps}"])


def flawed_teacher_sft(root: Path, steps: int, flaw: float, examples: int, seed: int) -> str:
    """The default pretraining export fine-tuned for ``steps`` steps (the default SFT recipe) on cold-start traces
    from a flawed teacher: ``examples`` level-1 problems of the arithmetic task's *train* split, each with its
    worked solution, where a seeded ``flaw`` fraction of them keep the correct working but end with the first
    number of the question (``So the answer is <it>.`` and ``<answer><it></answer>``), a shortcut a weak teacher
    takes. Imitation makes the shortcut the greedy answer while the policy still samples the right one: the
    pass@k > pass@1 start that a verifiable reward can correct. Returns the export of that run."""
    import random

    from r1ray.tasks.registry import get_task
    from r1ray.train.sft_data import task_conversation

    root.mkdir(parents=True, exist_ok=True)
    data = root / f"flawed-teacher-{flaw}-{examples}-{seed}.jsonl"
    task, rng, flawed = get_task("arithmetic"), random.Random(f"flawed-teacher:{seed}"), 0
    with data.open("w") as f:
        for i in range(examples):
            p = task.problem(i, seed=seed, split="train", difficulty=1)
            conv = task_conversation(p)
            first = _first_number(p.question)
            if rng.random() < flaw and first is not None and first != p.answer:
                body = conv[-1]["content"]
                bad = body.replace(f"So the answer is {p.answer}.", f"So the answer is {first}.").replace(
                    f"<answer>{p.answer}</answer>", f"<answer>{first}</answer>")
                if bad == body:
                    raise RuntimeError(f"the flaw did not apply to train problem {i}: {body!r}")
                conv[-1] = {"role": "assistant", "content": bad}
                flawed += 1
            f.write(json.dumps({"messages": conv}) + "\n")
    print(f"flawed teacher: {flawed} of {examples} traces answer with the question's first number ({data})",
          flush=True)
    return _sft(root, seed, f"flawed-sft-{steps}", [f"data.path={data}", f"train.max_steps={steps}",
                                                     f"checkpoint.every={steps}"])


def greedy_accuracy(model_dir: str, cfg: Any) -> tuple[float, float, dict[str, float]]:
    """Greedy exact-match accuracy on GRPO's evaluation problems (its seed, split, levels and count); the
    fraction of wrong answers that are the question's first number (the flawed teacher's shortcut); and the
    accuracy per operation of the gold solution's first step (``+ - * /``; ``other`` for a task without one)."""
    from r1ray.infer.hf import HFEngine
    from r1ray.infer.types import SamplingParams
    from r1ray.tasks.base import extract_answer
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
    acc = score([o.text for o in outs], probs, {"accuracy": 1.0}).per_reward["accuracy"]
    wrong = [(p, o) for p, o, a in zip(probs, outs, acc, strict=True) if a < 1.0]
    shortcut = sum(1 for p, o in wrong
                   if (first := _first_number(p.question)) is not None and extract_answer(o.text) == first)
    by_op: dict[str, list[float]] = {}
    for p, a in zip(probs, acc, strict=True):
        op = re.search(r" ([-+*/]) ", p.solution)
        by_op.setdefault(op.group(1) if op else "other", []).append(a)
    return (statistics.mean(acc), (shortcut / len(wrong) if wrong else 0.0),
            {k: statistics.mean(v) for k, v in sorted(by_op.items())})


def _ops(by_op: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in by_op.items())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=str, default=None, help="storage root (default: a new temporary directory)")
    ap.add_argument("--init-from", type=str, default=None, help="start from this export instead of a weak SFT")
    ap.add_argument("--start", choices=("flawed-teacher", "half-sft"), default="flawed-teacher",
                    help="flawed-teacher: SFT on traces of which --flaw end with the question's first number; "
                         "half-sft: the default SFT run stopped at --sft-steps of --sft-of")
    ap.add_argument("--flaw", type=float, default=0.6, help="flawed-teacher: the fraction of flawed traces")
    ap.add_argument("--flaw-examples", type=int, default=20_000, help="flawed-teacher: SFT traces")
    ap.add_argument("--sft-steps", type=int, default=None,
                    help="SFT steps before GRPO starts (default: 2000 for flawed-teacher, 1000 for half-sft)")
    ap.add_argument("--sft-of", type=int, default=2000,
                    help="half-sft: the SFT run's length (its schedule): the start is that run stopped at --sft-steps")
    ap.add_argument("--minutes", type=float, default=15.0, help="GRPO's time budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=str, default=None)
    a, overrides = ap.parse_known_args(argv)
    from r1ray.config import load_config
    from r1ray.train.grpo import GRPOConfig
    from r1ray.train.grpo import run as grpo

    root = Path(a.root or tempfile.mkdtemp(prefix="r1ray-grpo-quality-"))
    t0 = time.perf_counter()
    if a.init_from:
        start = a.init_from
    elif a.start == "flawed-teacher":
        start = flawed_teacher_sft(root, a.sft_steps or 2000, a.flaw, a.flaw_examples, a.seed)
    else:
        start = weak_sft(root, a.sft_steps or 1000, a.sft_of, a.seed)
    sft_s = time.perf_counter() - t0
    # A fresh run name each time: the same name under the same root would resume the finished run and return
    # at once (a run_name=... override still wins).
    run_name = f"grpo-quality-{'init' if a.init_from else a.start}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = load_config(GRPOConfig, [f"--config={RECIPE}", f"model.init_from={start}", f"storage.root={root}",
                                   f"seed={a.seed}", f"run_name={run_name}", *overrides])
    acc0, short0, ops0 = greedy_accuracy(start, cfg)
    print(f"start {start}: held-out greedy accuracy {acc0:.3f} ({cfg.grpo.eval_problems} problems; by operation "
          f"{_ops(ops0)}); {short0:.2f} of its wrong answers are the question's first number", flush=True)
    t0 = time.perf_counter()
    result = grpo(cfg)
    wall = time.perf_counter() - t0
    if result.export_path is None:
        raise RuntimeError(f"GRPO ended {result.status} without an export")
    acc1, short1, ops1 = greedy_accuracy(result.export_path, cfg)
    out = {"start": start, "start_accuracy": acc0, "end_accuracy": acc1, "gain_points": 100 * (acc1 - acc0),
           "start_shortcut_fraction": short0, "end_shortcut_fraction": short1,
           "start_accuracy_by_op": ops0, "end_accuracy_by_op": ops1,
           "grpo_seconds": wall, "budget_seconds": 60 * a.minutes, "steps": result.steps,
           "in_loop_accuracy": result.metrics.get("accuracy"), "setup_seconds": sft_s, "run_dir": result.run_dir}
    print(f"\nGRPO ({RECIPE.name}{' + ' + ' '.join(overrides) if overrides else ''}): {result.steps} steps in "
          f"{wall / 60:.1f} min (budget {a.minutes:.0f})")
    print(f"held-out greedy accuracy: {acc0:.3f} -> {acc1:.3f} ({out['gain_points']:+.1f} points; the run's own "
          f"final evaluation {out['in_loop_accuracy']})")
    print(f"by operation: {_ops(ops0)} -> {_ops(ops1)}")
    print(f"wrong answers that are the question's first number: {short0:.2f} -> {short1:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0 if wall <= 60 * a.minutes else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
