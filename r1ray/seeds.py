"""Every seed r1ray derives, in one place: each is a pure function of the run's seed and a position (a step, a
problem, a sample), so a restarted or resumed run draws exactly what an uninterrupted one drew, on any number
of workers.
"""

from __future__ import annotations

import hashlib

__all__ = ["hashed_seed", "step_seed", "trace_seed"]


def hashed_seed(namespace: str, *parts: object) -> int:
    """A 60-bit seed from ``namespace`` and ``parts`` (SHA-256): GRPO's sample ``k`` of problem ``i`` at step
    ``s`` is ``hashed_seed("grpo", seed, s, i, k)``; an evaluation sample is ``hashed_seed("eval", seed, uid, j)``."""
    text = ":".join(str(p) for p in (f"r1ray-{namespace}", *parts))
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of a training worker before optimizer step ``step`` (dropout and any sampling in a step)."""
    return (seed * 1_000_003 + step) * 1009 + rank


def trace_seed(seed: int, index: int) -> int:
    """The sampling seed of teacher trace ``index`` (sequence-level distillation)."""
    return seed * 1_000_003 + index
