"""Greedy accuracy of one export on arithmetic, broken down by level and by the number of operations of each story
(level 3 mixes stories of three and four operations), with one failed completion per bucket to read.

    python benchmarks/arithmetic_breakdown.py <export dir>                    # levels 1-3, 100 eval problems each
    python benchmarks/arithmetic_breakdown.py <export dir> --levels 3 --problems 200 --format question
    python benchmarks/arithmetic_breakdown.py <export dir> --lengths 256   # corpus documents against a row length

``--format chat`` (default) prompts as SFT, GRPO and the evaluation job do; ``question`` as the corpus's plain
documents (``Question: ...\\n<think>\\n``). Problems come from the task's eval split (never trained on), decoded
with the serving engine (``HFEngine``) on CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1ray.tasks.base import MAX_COMPLETION_TOKENS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", help="a model export directory (safetensors + tokenizer)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--problems", type=int, default=100, help="eval-split problems per level")
    ap.add_argument("--format", choices=["chat", "question"], default="chat")
    ap.add_argument("--max-tokens", type=int, default=MAX_COMPLETION_TOKENS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, default=None, metavar="SEQ_LEN",
                    help="instead: token lengths of 600 corpus documents per level and form, against SEQ_LEN")
    args = ap.parse_args()
    if args.lengths:
        return lengths(args.export, args.lengths, args.seed)

    import torch
    from transformers import AutoModelForCausalLM

    from r1ray.infer.hf import HFEngine
    from r1ray.infer.types import SamplingParams
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.tasks.accuracy import render_prompt
    from r1ray.tasks.arithmetic import ArithmeticTask

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.export)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(args.export), tok, max_batch_size=32,
                      max_queue=max(64, args.problems))
    task = ArithmeticTask()
    fmt = "question" if args.format == "question" else "chat"
    print("| level | operations | problems | greedy accuracy |\n|---|---|---|---|")
    failures = {}
    for level in args.levels:
        probs = [task.problem(i, seed=args.seed, split="eval", difficulty=level) for i in range(args.problems)]
        prompts = [tok(render_prompt(p, fmt, tok, prefill_think=fmt == "question"), add_special_tokens=False)
                   ["input_ids"] for p in probs]
        outs = engine.generate(prompts, [SamplingParams(max_tokens=args.max_tokens, temperature=0)] * len(prompts))
        buckets: dict[int, list[float]] = {}
        for p, o in zip(probs, outs, strict=True):
            text = ("<think>\n" + o.text) if fmt == "question" else o.text
            ok = task.verify(text, p)
            buckets.setdefault(int(p.meta["steps"]), []).append(ok)
            if not ok:
                failures.setdefault((level, int(p.meta["steps"])), (p, text))
        for steps in sorted(buckets):
            v = buckets[steps]
            print(f"| {level} | {steps} | {len(v)} | {100 * sum(v) / len(v):.1f}% |")
    for (level, steps), (p, text) in sorted(failures.items()):
        print(f"\n--- a failure, level {level}, {steps} operations (gold {p.answer}) ---\n{p.question}\n{text[:1500]}")


def lengths(export: str, seq_len: int, seed: int) -> None:
    """Token lengths of the default corpus's reasoning documents (``generate``, half in chat form) by level and
    form, with the export's tokenizer, and the share longer than one packed row of ``seq_len`` tokens."""
    import statistics

    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.tasks.arithmetic import CORPUS_LEVELS, generate

    tok = load_tokenizer(export)
    by: dict[tuple[int, str], list[int]] = {}
    for i in range(600 * len(CORPUS_LEVELS)):
        doc = generate(seed, i, chat_fraction=0.5)
        n = len(tok(doc.text, add_special_tokens=False)["input_ids"])
        by.setdefault((CORPUS_LEVELS[i % len(CORPUS_LEVELS)], "chat" if doc.chat else "plain"), []).append(n)
    print(f"| level | form | documents | median tokens | max tokens | longer than {seq_len} |\n|---|---|---|---|---|---|")
    for (level, form), v in sorted(by.items()):
        print(f"| {level} | {form} | {len(v)} | {statistics.median(v):.0f} | {max(v)} | "
              f"{100 * sum(x > seq_len for x in v) / len(v):.0f}% |")


if __name__ == "__main__":
    main()
