"""Scoring off the learner: ``score`` in a Ray task, so a slow verifier never stalls a training step.

::

    ref = score_remote(completions, problems, {"accuracy": 1.0, "format": 0.2})
    result = ray.get(ref)  # a ScoreResult

Problems travel as plain dicts (``Problem.to_dict``). The task asks for a fraction of a CPU (``NUM_CPUS``)
because it mostly waits on its sandbox child; each Ray worker process keeps its own warm sandbox between
calls. Split a large batch into several calls to verify in parallel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r1ray.tasks.base import Problem
from r1ray.tasks.rewards import ScoreResult, score

__all__ = ["NUM_CPUS", "score_remote"]

NUM_CPUS = 0.25


def _score_task(completions: list[str], problems: list[dict], weights: dict[str, float],
                kw: dict[str, Any]) -> ScoreResult:
    return score(completions, [Problem.from_dict(p) for p in problems], weights, **kw)


_remote_fn = None


def score_remote(
    completions: Sequence[str],
    problems: Sequence[Problem | dict],
    weights: dict[str, float],
    *,
    num_cpus: float = NUM_CPUS,
    **kw: Any,
):
    """Start ``score(completions, problems, weights, **kw)`` in a Ray task; returns its ``ObjectRef``.

    Arguments are checked here (bad weights, lengths or options raise ``ValueError`` now, not at ``ray.get``).
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from r1ray.tasks.rewards import get_reward

    global _remote_fn
    for name in weights:
        get_reward(name)
    if len(completions) != len(problems):
        raise ValueError(f"score_remote: {len(completions)} completions but {len(problems)} problems")
    bad = sorted(set(kw) - _SCORE_OPTIONS)
    if bad:
        raise ValueError(f"score_remote: unknown options {bad}; valid: {sorted(_SCORE_OPTIONS)}")
    if _remote_fn is None:
        _remote_fn = ray.remote(_score_task)
    dicts = [p.to_dict() if isinstance(p, Problem) else dict(p) for p in problems]
    # Outside any placement group: called from a learner worker, Ray would otherwise schedule the task inside the
    # worker's own group when that group captures child tasks (Ray Train under Ray Tune does), whose one CPU the
    # worker holds: the task would wait forever.
    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    return _remote_fn.options(num_cpus=num_cpus, max_retries=2, scheduling_strategy=outside).remote(
        list(completions), dicts, dict(weights), kw)


_SCORE_OPTIONS = {"timeout_s", "prefilled_think", "max_completion_chars", "max_completion_tokens",
                  "completion_tokens", "overlong_buffer"}
