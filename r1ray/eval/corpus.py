"""Held-out corpus perplexity of a model directory, in this process: what the pipeline's report card measures after
every training stage, to make forgetting visible (an SFT or RL stage that erases language shows here first).

    corpus_perplexity("outputs/runs/sft/final", "outputs/data/default")
    # {"perplexity": 31.2, "bits_per_token": 4.96, "tokens": 32385, "rows": 127}

Scores the packed rows of a data artifact's split as they are (each row's tokens after the first), like the
evaluation job's perplexity suite on the same data, without Ray: a small model on a few hundred rows takes seconds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["corpus_perplexity"]


def corpus_perplexity(model_dir: str, data: str, *, split: str = "validation", max_rows: int | None = None,
                      batch_rows: int = 8) -> dict[str, Any]:
    """Perplexity and bits per token of ``model_dir`` on ``split`` of the data artifact ``data`` (its tokenizer
    must be the model's: the ids are scored as they are)."""
    import torch

    from r1ray.data.shards import DataArtifact
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.train.core.sampler import token_store

    artifact = DataArtifact.load(data)
    if load_tokenizer(artifact.tokenizer_dir).get_vocab() != load_tokenizer(model_dir).get_vocab():
        raise ValueError(f"{data} is tokenized with another tokenizer than {model_dir}; corpus perplexity scores "
                         "the artifact's token ids as they are")
    if not artifact.rows(split):
        raise ValueError(f"{data} has no {split} rows")
    rows = token_store(artifact, split)
    n = len(rows) if max_rows is None else min(max_rows, len(rows))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, batch_rows):
            ids = torch.from_numpy(np.asarray(rows[i:i + batch_rows], dtype=np.int64))
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                           ids[:, 1:].reshape(-1), reduction="sum"))
            tokens += int(ids[:, 1:].numel())
    return {"perplexity": math.exp(nll / tokens), "bits_per_token": nll / tokens / math.log(2), "tokens": tokens,
            "rows": n}
