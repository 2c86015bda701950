"""Compress a model (structured pruning, torchao INT8/FP8, GGUF for llama.cpp) behind a quality gate: the base and
the compressed model are evaluated with the evaluation job, and ``<storage.root>/runs/<run_name>/final`` is
published only when accuracy and perplexity stay within the gate's limits. Exit code 1 when the gate refuses.

    python jobs/compress.py                                       # the default SFT export, INT8 + GGUF
    python jobs/compress.py --config configs/compress/debug.yaml model=outputs/runs/sft
    python jobs/compress.py model=outputs/runs/sft/final prune.enabled=true prune.mlp_fraction=0.25
"""

from __future__ import annotations

import sys

from r1ray.cli import main
from r1ray.compress.config import CompressConfig as CONFIG


def run(cfg: CONFIG):
    from r1ray.compress.run import run as compress
    from r1ray.compress.run import summary
    from r1ray.pipeline.upstream import prepare_compress

    result = compress(prepare_compress(cfg))
    print(summary(result))
    if not result.passed:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main(CONFIG, run)
