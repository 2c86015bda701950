"""score_remote in a real local Ray: scoring runs in a Ray task, off the caller, and gives what score gives."""

from __future__ import annotations

import pytest

from r1ray.tasks.registry import sample_problems
from r1ray.tasks.remote import score_remote
from r1ray.tasks.rewards import ScoreResult, score

RAY_NUM_CPUS = 1
WEIGHTS = {"accuracy": 1.0, "format": 0.5, "tag_count": 0.25, "language": 0.1, "length": 1.0}


@pytest.fixture(scope="module")
def problems():
    mix = {"arithmetic": 1.0, "countdown": 1.0, "knights_knaves": 1.0}
    return sample_problems(mix, 24, seed=0, split="eval", difficulty=1)


def test_score_remote_matches_local_score(ray_local, problems):
    import ray

    completions = [p.completion if i % 3 else p.completion.replace(p.answer, "nope") for i, p in enumerate(problems)]
    ref = score_remote(completions, problems, WEIGHTS, max_completion_chars=4000)
    assert isinstance(ref, ray.ObjectRef)
    remote = ray.get(ref, timeout=300)
    local = score(completions, problems, WEIGHTS, max_completion_chars=4000)
    assert isinstance(remote, ScoreResult)
    assert remote.per_reward == local.per_reward and remote.total == local.total
    assert remote.per_reward["accuracy"] == [0.0 if i % 3 == 0 else 1.0 for i in range(len(problems))]
    assert remote.failures == dict.fromkeys(WEIGHTS, 0)


def test_score_remote_survives_hostile_completions_and_a_timeout(ray_local, problems):
    """In a Ray worker (not the main thread's signal world): the kill-on-timeout path still works."""
    import ray

    p = next(q for q in problems if q.task == "arithmetic")
    completions = [p.completion, "<think>x</think><answer>$10^{10^{10}}$</answer>", "<answer>" * 100_000, None]
    ref = score_remote(completions, [p] * 4, {"accuracy": 1.0, "format": 1.0}, timeout_s=0.5, prefilled_think=False)
    r = ray.get(ref, timeout=300)
    assert r.per_reward["accuracy"] == [1.0, 0.0, 0.0, 0.0]
    assert r.per_reward["format"] == [1.0, 1.0, 0.0, 0.0]
    assert r.failures == {"accuracy": 2, "format": 1}  # the timeout and the None; None fails format too


def test_score_remote_checks_arguments_before_submitting(ray_local, problems):
    with pytest.raises(ValueError, match="unknown reward"):
        score_remote(["x"], problems[:1], {"nope": 1.0})
    with pytest.raises(ValueError, match="unknown options"):
        score_remote(["x"], problems[:1], {"format": 1.0}, max_chars=3)
    with pytest.raises(ValueError, match="1 completions but 2 problems"):
        score_remote(["x"], problems[:2], {"format": 1.0})
