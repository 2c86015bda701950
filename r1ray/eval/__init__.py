"""Evaluation: pure metrics (``metrics``), task accuracy by generation shared with the training stages
(``generation``), and the evaluation job's run (``config``, ``run``): perplexity, task accuracy with pass@k and
maj@k, BLEU/ROUGE, on an export (Ray Data over a pool of engine actors) or any OpenAI-compatible endpoint.

See docs/evaluate.md.
"""
