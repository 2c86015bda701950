"""SFT quality: greedy exact-match accuracy of the default SFT run on held-out problems per difficulty level,
before training and at each checkpoint; and the speed of the two batch layouts (pad vs pack).

    python benchmarks/sft_quality.py                    # the default run + accuracy of every checkpoint
    python benchmarks/sft_quality.py --layout-only      # pad vs pack, forward+backward, same conversations
    python benchmarks/sft_quality.py --problems 200 --every 250 storage.root=/tmp/bench train.max_steps=1500

The run is ``python jobs/sft.py``'s embedded default (the default pretraining export, prepared when missing,
fine-tuned on generated arithmetic traces), with a checkpoint every ``--every`` steps kept and evaluation in
the loop only at the end; each checkpoint's HF export is then scored on the driver with the same
``greedy_accuracy`` the stage uses, on ``--problems`` held-out problems per level (the tasks' eval split). The
SFT time reported is the training run alone (its evaluations included); the checkpoint scoring comes after.
Extra ``key=value`` arguments override the SFT config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def layout_speed(init: str, reps: int = 30, micro: int = 8) -> dict[str, float]:
    """Seconds per forward+backward of ``micro`` conversations in each layout (the same conversations,
    interleaved so a change in machine load hits both alike); ratio > 1: pad is faster."""
    import torch

    from r1ray.config import load_config
    from r1ray.model import build_model
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.train.core.losses import causal_lm_loss
    from r1ray.train.stages.sft import SFTConfig, conversations
    from r1ray.train.stages.sft_data import IGNORE, collate, tokenize_conversation

    cfg = load_config(SFTConfig, [f"model.init_from={init}", "data.train_examples=512", "data.difficulty={1: 1, 2: 1, 3: 1}"])
    tok = load_tokenizer(init)
    model = build_model(cfg.model, tok)
    train, _ = conversations(cfg)
    times = {"pad": [], "pack": []}
    tokens = {"pad": 0, "pack": 0}
    for r in range(reps):
        convs = train[r * micro : (r + 1) * micro]
        exs = [tokenize_conversation(tok, c) for c in convs]
        for layout in ("pad", "pack") if r % 2 else ("pack", "pad"):
            b = collate(exs, layout, tok.pad_token_id)
            t = {k: torch.from_numpy(v) for k, v in b.items() if hasattr(v, "shape")}
            t0 = time.perf_counter()
            loss = causal_lm_loss(model, t["input_ids"], t["targets"], attention_mask=t.get("attention_mask"),
                                  position_ids=t.get("position_ids"), ignore_index=IGNORE)
            loss.backward()
            if r >= 3:  # warm-up
                times[layout].append(time.perf_counter() - t0)
                tokens[layout] += t["input_ids"].numel()
            model.zero_grad(set_to_none=True)
    out = {f"{k}_ms": 1000 * sorted(v)[len(v) // 2] for k, v in times.items()}
    out.update({f"{k}_positions": tokens[k] / len(times[k]) for k in tokens})
    out["pack_over_pad_time"] = out["pack_ms"] / out["pad_ms"]
    return out


def stage_defaults(cls) -> dict:
    """The sections a stage config redeclares with its own defaults (SFT's train/optim/checkpoint), as a base
    for ``load_config``: ``load_config`` rebuilds a section from its class defaults when an override touches
    it (``train.eval_every=0`` would reset SFT's 2000 steps to the loop's 200), reported to the lead."""
    from r1ray.config import R1Config

    return {name: f.default.model_dump(mode="json", exclude_unset=True) for name, f in cls.model_fields.items()
            if isinstance(f.default, R1Config) and f.default.model_fields_set}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=200, help="held-out problems per difficulty level")
    ap.add_argument("--every", type=int, default=None, help="checkpoint (and score) every N steps")
    ap.add_argument("--levels", default="1,2,3", help="difficulty levels to score")
    ap.add_argument("--layout-only", action="store_true", help="only measure pad vs pack")
    ap.add_argument("--init", default=None, help="layout-only: the model directory (default: the default export)")
    args, overrides = ap.parse_known_args(argv)

    import torch

    from r1ray.config import load_config
    from r1ray.observe.log import setup_logging
    from r1ray.pipeline.upstream import prepare
    from r1ray.train.stages.sft import SFTConfig, eval_problems, greedy_accuracy, run

    setup_logging("INFO")
    torch.set_num_threads(2)
    base = stage_defaults(SFTConfig)
    cfg = load_config(SFTConfig, overrides, base=base)
    if args.layout_only:
        init = args.init or prepare("sft", cfg).model.init_from
        print(json.dumps(layout_speed(init), indent=1))
        return
    every = args.every or max(1, cfg.train.max_steps // 6)
    levels = [int(x) for x in args.levels.split(",")]
    cfg = load_config(SFTConfig, [*overrides, f"checkpoint.every={every}", "checkpoint.keep=100",
                                  "train.eval_every=0", "eval.before=false",
                                  f"eval.problems_per_difficulty={args.problems}",
                                  f"eval.difficulties=[{','.join(map(str, levels))}]"], base=base)
    t0 = time.perf_counter()
    cfg = prepare("sft", cfg)
    prepare_s = time.perf_counter() - t0
    result = run(cfg)
    if result.status != "completed":
        raise SystemExit(f"the SFT run ended {result.status}")
    sft_s = result.seconds

    from r1ray.model import build_model
    from r1ray.model.tokenizer import load_tokenizer

    problems = eval_problems(cfg)
    rows = []
    points = [(0, cfg.model.init_from)] + sorted(
        (int(p.parent.name.split("_")[1].split("-")[0]), str(p)) for p in Path(result.run_dir).glob("checkpoint_*/hf"))
    for step, path in points:
        t1 = time.perf_counter()
        tok = load_tokenizer(path)
        model = build_model(cfg.model.model_copy(update={"init_from": path}), tok).eval()
        m = greedy_accuracy(model, tok, problems, max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size).local()
        rows.append((step, m, time.perf_counter() - t1))
        print(f"step {step:>5}: " + "  ".join(f"d{lv} {100 * m[f'accuracy_d{lv}']:.1f}%" for lv in levels)
              + f"  ({time.perf_counter() - t1:.0f}s)", flush=True)
    print()
    print(f"SFT run: {result.steps} steps of {cfg.train.global_batch_size} conversations, {sft_s:.0f}s "
          f"(upstream ready in {prepare_s:.0f}s); {args.problems} held-out problems per level, greedy, exact match")
    print("| step | " + " | ".join(f"level {lv}" for lv in levels) + " | all |")
    print("|---:|" + "---:|" * (len(levels) + 1))
    for step, m, _ in rows:
        print(f"| {step} | " + " | ".join(f"{100 * m[f'accuracy_d{lv}']:.1f}%" for lv in levels)
              + f" | {100 * m['accuracy']:.1f}% |")
    print("\nin-loop final evaluation of the run (same problems): "
          + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.metrics.items()) if k.startswith("accuracy")))


if __name__ == "__main__":
    main(sys.argv[1:])
