"""Shared by the compression tests (no tests here): a tiny model trained in seconds on text it can learn
exactly, so a faithful compression keeps its accuracy and a destroyed one visibly loses it.

The text cycles through 21 words (each word is followed by the next one of the list), so after a few
hundred steps the model continues any run of words correctly: reference-suite exact match near 100%, and
perplexity on the training text near 1.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = "the a of to and in is it that for on with as was he she they we you at by".split()


def cycle_text(start: int, n: int) -> str:
    return " ".join(WORDS[(start + j) % len(WORDS)] for j in range(n))


def train_tiny(tokenizer_dir: str | Path, out_dir: str | Path, *, family: str = "llama", steps: int = 50,
               preset: str = "debug", seed: int = 0) -> Path:
    """A ``preset`` model (vocabulary of ``tokenizer_dir``) trained on the word cycle, saved as an HF directory."""
    import torch

    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    tok = load_tokenizer(tokenizer_dir)
    model = build_model(ModelConfig(preset=preset, family=family, max_position_embeddings=128), tok, seed=seed)
    docs = [tok(cycle_text(i, 24), add_special_tokens=False)["input_ids"] for i in range(len(WORDS))]
    width = min(len(d) for d in docs)
    data = torch.tensor([d[:width] for d in docs])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_model(model, tok, out_dir)


def write_eval_files(out_dir: str | Path, n: int = 12) -> tuple[Path, Path]:
    """(perplexity jsonl of word-cycle documents, reference jsonl of prompt -> next four words)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ppl, ref = out / "ppl.jsonl", out / "ref.jsonl"
    ppl.write_text("".join(json.dumps({"text": cycle_text(i * 5, 24)}) + "\n" for i in range(n)))
    ref.write_text("".join(json.dumps({"prompt": cycle_text(i * 3, 6), "reference": cycle_text(i * 3 + 6, 4)}) + "\n"
                           for i in range(n)))
    return ppl, ref


def trained_dir(tmp_path_factory, tokenizer_dir: str | Path, family: str = "llama") -> Path:
    """The trained tiny model of this test session (trained once, on the first call, for every module)."""
    out = tmp_path_factory.getbasetemp() / f"compress-trained-{family}"
    if not (out / "config.json").is_file():
        train_tiny(tokenizer_dir, out, family=family)
    return out
