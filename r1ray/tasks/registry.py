"""The task registry by name, and a deterministic weighted mix of tasks.

::

    task = get_task("countdown")
    p = task.problem(7, seed=0, split="train", difficulty=2)
    task.verify(p.completion, p)  # 1.0
    sample_problems({"arithmetic": 0.5, "countdown": 0.5}, 64, seed=0, split="train", difficulty=1)

``rg:<name>`` is any reasoning-gym dataset (``r1ray.tasks.rg``). Names are strings so configs can hold them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from functools import lru_cache

from r1ray.tasks.arithmetic import ArithmeticTask
from r1ray.tasks.base import Problem, Task
from r1ray.tasks.countdown import CountdownTask
from r1ray.tasks.gsm8k import Gsm8kTask
from r1ray.tasks.knights import KnightsKnavesTask

__all__ = ["TASKS", "get_task", "list_tasks", "sample_problems", "task_for_verify"]

TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "knights_knaves": KnightsKnavesTask,
    "gsm8k": Gsm8kTask,
}


def list_tasks() -> list[str]:
    """Registered names; ``rg:<dataset>`` adds every reasoning-gym dataset when it is installed."""
    return sorted(TASKS) + ["rg:<dataset>"]


def get_task(name: str, **options) -> Task:
    """A task by name; ``options`` go to its constructor (``gsm8k``: ``path``, ``eval_path``)."""
    if name.startswith("rg:"):
        from r1ray.tasks.rg import ReasoningGymTask

        return ReasoningGymTask(name[3:], **options)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(list_tasks())}")
    try:
        return TASKS[name](**options)
    except TypeError as e:
        raise ValueError(f"task {name!r}: bad options {sorted(options)} ({e})") from None


@lru_cache(maxsize=256)
def task_for_verify(name: str) -> Task:
    """The task instance whose ``verify`` scores ``name``'s problems (verifiers never depend on options)."""
    return get_task(name)


@lru_cache(maxsize=64)
def _cached_task(name: str, options_json: str) -> Task:
    # Callers ask for one problem at a time (GRPO: sample_problems(..., 1, start=i) per prompt): building the
    # task each time would re-read a gsm8k file or re-walk a reasoning-gym stream.
    return get_task(name, **json.loads(options_json))


def _pick(mix: list[tuple[str, float]], total: float, seed: int, k: int) -> str:
    # One RNG per global sample index: the mix is a pure function of (seed, k), with O(1) random access.
    u = random.Random(int(hashlib.sha256(f"r1ray-mix:{seed}:{k}".encode()).hexdigest()[:16], 16)).random()
    acc = 0.0
    for name, w in mix:
        acc += w / total
        if u < acc:
            return name
    return mix[-1][0]


def sample_problems(
    mix: dict[str, float],
    n: int,
    *,
    seed: int,
    split: str,
    difficulty: int | dict[str, int],
    start: int = 0,
    options: dict[str, dict] | None = None,
) -> list[Problem]:
    """Problems ``start .. start+n-1`` of a weighted mix: each global index ``k`` picks a task with
    probability ``weight / sum(weights)`` (from its own RNG) and takes that task's problem ``k``, so every
    problem appears once per task and the list is a pure function of the arguments. ``options`` holds
    constructor options per task (``{"gsm8k": {"path": ...}}``)."""
    if not mix:
        raise ValueError("sample_problems: mix is empty; give {task_name: weight}")
    bad = {k: w for k, w in mix.items() if not isinstance(w, (int, float)) or w < 0}
    if bad:
        raise ValueError(f"sample_problems: weights must be non-negative numbers, got {bad}")
    entries = sorted((k, float(w)) for k, w in mix.items() if w > 0)
    if not entries:
        raise ValueError(f"sample_problems: every weight in {mix} is 0")
    if n < 0 or start < 0:
        raise ValueError(f"sample_problems: n and start must be >= 0, got n={n}, start={start}")
    levels = difficulty if isinstance(difficulty, dict) else {k: difficulty for k, _ in entries}
    missing = [k for k, _ in entries if k not in levels]
    if missing:
        raise ValueError(f"sample_problems: difficulty has no level for {missing}")
    options = options or {}
    tasks = {k: _cached_task(k, json.dumps(options.get(k, {}), sort_keys=True, default=str)) for k, _ in entries}
    total = sum(w for _, w in entries)
    out = []
    for k in range(start, start + n):
        name = _pick(entries, total, seed, k)
        out.append(tasks[name].problem(k, seed=seed, split=split, difficulty=levels[name]))
    return out


def level_shares(n: int, weights: dict[int, float]) -> dict[int, int]:
    """``n`` split over difficulty levels by ``weights``, by largest remainder (the counts sum to ``n``)."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    out = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], k))[: n - sum(out.values())]:
        out[k] += 1
    return out


def sample_problems_by_level(mix: dict[str, float], levels: dict[int, float], n: int, *, seed: int, split: str,
                             options: dict[str, dict] | None = None) -> list[Problem]:
    """``n`` problems of the task mix, shared over the difficulty ``levels`` by weight (``level_shares``), level by
    level in ascending order of the levels' keys as given."""
    out: list[Problem] = []
    for level, count in level_shares(n, levels).items():
        if count:
            out += sample_problems(mix, count, seed=seed, split=split, difficulty=level, options=options)
    return out
