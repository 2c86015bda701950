"""Compression benchmark: base (fp32) vs INT8, as ratios measured in the same run on this machine's CPU.

Part 1, which INT8 (speed and size): a model of ``--preset`` (random weights; speed and size do not depend on
them) with a ``--vocab`` vocabulary, decoded greedily at batch 1 and 16 in fp32, with torch's dynamic INT8
(``torch.ao.quantization.quantize_dynamic`` in r1ray's safetensors format, with and without the output head),
torchao INT8 weight-only and torchao INT8 dynamic-activation (safetensors through transformers). Each variant is
saved and reloaded as it ships; sizes are of its weight files.

Part 2, the gate (with ``--model``): the compression job on a trained export (INT8 + GGUF), which evaluates base
and compressed with the evaluation job and prints the report table (size, decode tok/s, p50 latency, accuracy,
perplexity). Give ``--ppl-files`` (jsonl/text) and, for a model not trained on tasks, ``--reference`` (a jsonl of
prompt/reference pairs) with ``--accuracy reference/exact_match``.

    python benchmarks/compress.py                                   # part 1, 125m preset, 32k vocabulary
    python benchmarks/compress.py --preset tiny --vocab 4096 --threads 2
    python benchmarks/compress.py --skip-speed --model outputs/runs/sft/final --ppl-files corpus.jsonl

Targets (issue 15): INT8 >= 1.8x smaller on disk, >= 1.5x faster decode at batch 1, accuracy within 1.5 points.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(preset: str, vocab: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from r1ray.model.build import PRESETS

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=512, **PRESETS[preset])
    return AutoModelForCausalLM.from_config(cfg).eval()


def variants(base, tmp: Path):
    """name -> (model, bytes of its weight files). Every variant is saved and reloaded the way it ships."""
    import torch
    from transformers import AutoModelForCausalLM

    from r1ray.compress.measure import weights_bytes
    from r1ray.compress.quantize import quant_config, quantize_dir
    from r1ray.model.build import load_model

    src = tmp / "fp32"
    base.save_pretrained(src)
    _save_dummy_tokenizer(src, base.config.vocab_size)
    out = {"fp32": (base, weights_bytes(src))}
    for head in (True, False):
        q = quantize_dir(src, tmp / f"int8-{head}", method="int8", output_head=head)
        label = "torch dynamic INT8" + (" + head (job default)" if head else ", head fp32")
        out[label] = (load_model(q).eval(), weights_bytes(q))
    for method, label in (("int8_torchao", "torchao INT8 weight-only"),
                          ("int8_torchao_dynamic", "torchao INT8 dyn. act.")):
        m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32,
                                                 quantization_config=quant_config(method, output_head=False))
        m.save_pretrained(tmp / method)
        out[label] = (load_model(tmp / method).eval(), weights_bytes(tmp / method))
    return out


def _save_dummy_tokenizer(path: Path, vocab: int) -> None:
    """quantize_dir copies the tokenizer: give the random model a small byte-level BPE (ids below its vocab)."""
    from r1ray.model.tokenizer import train_tokenizer

    words = [f"w{i}" for i in range(2000)]
    train_tokenizer([" ".join(words[i:i + 50]) for i in range(0, 2000, 50)], path, vocab_size=min(vocab, 1024))


def speed_table(args) -> None:
    import torch

    from r1ray.compress.measure import measure_model

    torch.set_num_threads(args.threads)
    base = build(args.preset, args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        models = variants(base, Path(tmp))
        rows = {}
        for rep in range(args.rounds):  # interleaved rounds: a load spike hits every variant alike
            for name, (m, _) in models.items():
                sp = measure_model(m, batch_sizes=[1, 16], new_tokens=args.new_tokens, prompt_tokens=16,
                                   repeats=args.repeats, seed=rep)
                rows.setdefault(name, []).append(sp)
                print(f"  round {rep}: {name}: b1 {sp.decode_tokens_per_s[1]:.1f} tok/s, "
                      f"b16 {sp.decode_tokens_per_s[16]:.1f} tok/s", flush=True)
        f32 = rows["fp32"]
        b1_0 = statistics.median(s.decode_tokens_per_s[1] for s in f32)
        b16_0 = statistics.median(s.decode_tokens_per_s[16] for s in f32)
        size0 = models["fp32"][1]
        print(f"\n## INT8 on CPU: preset {args.preset}, vocabulary {args.vocab}, {args.threads} threads, "
              f"{args.new_tokens} new tokens, median of {args.rounds} rounds x {args.repeats}\n")
        print("| variant | size (MB) | x smaller | decode b1 (tok/s) | x fp32 | decode b16 (tok/s) | x fp32 | p50 (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, sps in rows.items():
            b1 = statistics.median(s.decode_tokens_per_s[1] for s in sps)
            b16 = statistics.median(s.decode_tokens_per_s[16] for s in sps)
            p50 = statistics.median(s.p50_latency_s for s in sps)
            size = models[name][1]
            sz = "-" if size is None else f"{size / 1e6:.1f}"
            ratio = "-" if size is None else f"{size0 / size:.2f}"
            print(f"| {name} | {sz} | {ratio} | {b1:.1f} | {b1 / b1_0:.2f} | {b16:.1f} | {b16 / b16_0:.2f} | "
                  f"{p50:.3f} |")


def gate_table(args) -> int:
    from r1ray.compress.config import CompressConfig
    from r1ray.compress.run import run, summary

    data = {"model": args.model, "run_name": "bench-int8", "storage": {"root": args.storage},
            "quantize": {"method": "int8"}, "ray": {"include_dashboard": False},
            "eval": {"perplexity": {"files": args.ppl_files, "max_rows": 64},
                     "tasks": {"enabled": args.accuracy.startswith("tasks/"), "difficulties": [1],
                               "items_per_level": args.items, "samples": 0, "k": []},
                     "reference": {"path": args.reference, "max_tokens": args.reference_tokens}},
            "gate": {"accuracy_metric": args.accuracy},
            "report": {"torch_threads": args.threads, "new_tokens": args.new_tokens}}
    result = run(CompressConfig.model_validate(data))
    print(summary(result))
    return 0 if result.passed else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--model", help="a trained export for part 2 (the gate)")
    ap.add_argument("--ppl-files", nargs="*", default=[])
    ap.add_argument("--reference")
    ap.add_argument("--reference-tokens", type=int, default=16)
    ap.add_argument("--accuracy", default="tasks/accuracy")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--storage", default=str(Path(tempfile.gettempdir()) / "r1ray-bench-compress"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not args.skip_speed:
        speed_table(args)
    rc = gate_table(args) if args.model else 0
    print(f"\n({time.perf_counter() - t0:.0f}s; timings on a shared machine: compare ratios, not absolutes)")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
