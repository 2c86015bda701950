"""Evaluate a model: perplexity, task accuracy (greedy, pass@k, maj@k per difficulty level) and BLEU/ROUGE, on an
export (Ray Data over a pool of engine actors) or any OpenAI-compatible endpoint.

    python jobs/evaluate.py                                       # newest default export (trained first if missing)
    python jobs/evaluate.py --config configs/evaluate/debug.yaml model=outputs/runs/default
    python jobs/evaluate.py model.endpoint.url=http://127.0.0.1:8000/v1 model.endpoint.model=r1ray-default
    python jobs/evaluate.py model=outputs/runs/default compare=outputs/runs/sft tasks.prompt_format=chat
"""

from __future__ import annotations

from r1ray.cli import main
from r1ray.eval.config import EvaluateConfig as CONFIG


def run(cfg: CONFIG):
    from r1ray.eval.run import run as evaluate
    from r1ray.pipeline.upstream import prepare_evaluate

    result = evaluate(prepare_evaluate(cfg))
    print(result.summary)
    print(f"results in {result.artifact} (results.parquet, summary.md, samples.jsonl, manifest.json); "
          f"{result.seconds:.0f}s")
    return result


if __name__ == "__main__":
    main(CONFIG, run)
