"""Evaluation: pure metrics (``metrics``) and the evaluation job's run (``config``, ``run``): perplexity, task
accuracy with pass@k and maj@k (scored by ``r1ray.tasks.accuracy``, which the training stages share), BLEU/ROUGE, on
an export (Ray Data over a pool of engine actors, ``r1ray.infer.batch``) or any OpenAI-compatible endpoint.

See docs/evaluate.md.
"""
