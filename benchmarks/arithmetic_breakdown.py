"""Greedy accuracy of one export on arithmetic, broken down by level and by the number of operations of each story
(level 3 mixes stories of three and four operations), with one failed completion per bucket to read.

    python benchmarks/arithmetic_breakdown.py <export dir>                    # levels 1-3, 100 eval problems each
    python benchmarks/arithmetic_breakdown.py <export dir> --levels 3 --problems 200 --format question
    python benchmarks/arithmetic_breakdown.py <export dir> --lengths 256   # corpus documents against a row length
    python benchmarks/arithmetic_breakdown.py --errors <evaluation artifact>  # why the greedy answers failed

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
    ap.add_argument("export", nargs="?", help="a model export directory (safetensors + tokenizer)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--problems", type=int, default=100, help="eval-split problems per level")
    ap.add_argument("--format", choices=["chat", "question"], default="chat")
    ap.add_argument("--max-tokens", type=int, default=MAX_COMPLETION_TOKENS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, default=None, metavar="SEQ_LEN",
                    help="instead: token lengths of 600 corpus documents per level and form, against SEQ_LEN")
    ap.add_argument("--errors", metavar="EVAL_DIR", default=None,
                    help="instead: classify the failed greedy arithmetic answers of an evaluation artifact "
                         "(python jobs/evaluate.py writes <storage.root>/eval/<run_name>/samples.jsonl); no model run")
    args = ap.parse_args()
    if args.errors:
        return errors(args.errors)
    if not args.export:
        ap.error("give an export directory (or --errors EVAL_DIR)")
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


def classify(question: str, output: str, finish_reason: str) -> str:
    """Why a failed worked solution failed, the first slip in reading order:

    - ``cut``: it stopped at the token limit;
    - ``copy``: an operation takes a number that is neither in the story nor an earlier result, or its result line
      ``a op b=c`` restates other operands than its header ``...: a op b``;
    - ``computation (op)``: a result line is wrong (or missing) for its operands;
    - ``plan``: every operation takes numbers from the story or earlier results and computes them right, and the
      answer is still wrong: a sentence skipped or misread, or a wrong operation chosen.
    """
    import re

    if finish_reason == "length":
        return "cut"
    known = {int(x) for x in re.findall(r"\d+", question)}
    header = None
    for line in output.splitlines():
        line = line.strip()
        h = re.fullmatch(r".*: (\d+)([-+*/])(\d+)", line)
        if h:
            header = (int(h[1]), h[2], int(h[3]))
            if header[0] not in known or header[2] not in known:
                return "copy"
            continue
        m = re.fullmatch(r"(\d+)([-+*/])(\d+)(?:=(\d+))?", line)
        if m:
            a, op, b, c = int(m[1]), m[2], int(m[3]), m[4]
            if header is not None and (a, op, b) != header:
                return "copy"
            true = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else None}[op]
            if c is None or int(c) != true:
                return f"computation ({op})"
            known.add(int(c))
    return "plan"


def errors(eval_dir: str) -> None:
    """The failed greedy arithmetic answers of an evaluation artifact, by level and kind (``classify``)."""
    import collections
    import json

    rows = [json.loads(line) for line in (Path(eval_dir) / "samples.jsonl").read_text().splitlines()]
    # greedy with its thinking: sample -1 (0, 1, ... are the temperature samples of pass@k, "no_think" the
    # completions with the thinking suppressed)
    rows = [r for r in rows if r.get("suite") == "tasks" and r.get("task") == "arithmetic" and r.get("sample") == -1]
    kinds = ["cut", "plan", "copy", "computation (+)", "computation (-)", "computation (*)", "computation (/)"]
    print(f"| level | problems | failed | {' | '.join(kinds)} |\n|---|---|---|{'---|' * len(kinds)}")
    examples = {}
    for level in sorted({r["level"] for r in rows}):
        items = [r for r in rows if r["level"] == level]
        failed = [r for r in items if r["score"] < 1]
        kind = {id(r): classify(_question(r), r["output"], r["finish_reason"]) for r in failed}
        count = collections.Counter(kind.values())
        for r in failed:
            examples.setdefault((level, kind[id(r)]), r)
        print(f"| {level} | {len(items)} | {len(failed)} | " + " | ".join(str(count.get(k, 0)) for k in kinds) + " |")
    for (level, kind), r in sorted(examples.items()):
        print(f"\n--- level {level}, {kind} (gold {r['gold']}) ---\n{_question(r)}\n{r['output'][:1200]}")


def _question(row: dict) -> str:
    """The story of an evaluation sample's chat prompt (the user turn's first line)."""
    prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
    return prompt.split("user\n", 1)[-1].split("\n", 1)[0]


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
