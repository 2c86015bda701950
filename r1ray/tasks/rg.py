"""``rg:<name>``: any reasoning-gym dataset as a task (``pip install reasoning-gym``; an optional dependency).

reasoning-gym (PyPI) is a maintained library of ~100 procedural generators with scorers. Its generators use
only data files shipped in the wheel (nothing is downloaded at run time: its source has no HTTP or hub calls),
so ``get_task("rg:basic_arithmetic")`` or ``get_task("rg:gsm_symbolic", levels={1: {...}, 2: {...}})`` work
offline. Keyword options are the dataset's config fields; ``levels`` maps our difficulty levels to config
overrides (without it there is one level).

What it lacks for us, and how this adapter fills it:
- Worked solutions: almost no generator gives one (``gsm_symbolic`` gives ``answer_cot``, used here). Others
  get a one-line solution and ``meta["worked_solution"] = False``: use them for GRPO and evaluation, not SFT.
- Seeding: an item is ``Random(seed + idx)``, so seed 1 item 0 equals seed 0 item 1. We derive each
  ``(seed, difficulty)`` dataset seed from a hash, so streams do not overlap.
- The hash split: ``problem(index, split)`` walks the dataset's items in order and returns the ``index``-th one
  of that split (memoized, so sequential indices cost one item each).
- Scores: reasoning-gym's scorers give shaping credit (countdown returns 0.01 for any non-empty wrong text);
  ``verify`` reports accuracy, so it is 1.0 only for a full score. Scorers run the model's text through
  e.g. sympy's ``parse_expr``; the reward sandbox time-boxes them like every verifier.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from r1ray.tasks import base

__all__ = ["PREFIX", "ReasoningGymTask", "available"]

PREFIX = "rg:"
DEFAULT_SIZE = 100_000
"""Items per (seed, difficulty) stream; indices past what a split finds there raise."""


def _rg():
    try:
        import reasoning_gym
    except ImportError as e:
        raise ValueError("rg:<name> tasks need reasoning-gym: pip install reasoning-gym") from e
    return reasoning_gym


def available() -> list[str]:
    """reasoning-gym's dataset names (empty when it is not installed)."""
    try:
        import reasoning_gym.factory
    except ImportError:
        return []
    return sorted(reasoning_gym.factory.DATASETS)


@lru_cache(maxsize=64)
def _scorer(dataset: str):
    return _rg().get_score_answer_fn(dataset)


class ReasoningGymTask:
    def __init__(self, dataset: str, *, levels: dict[int, dict[str, Any]] | None = None,
                 size: int = DEFAULT_SIZE, **config: Any):
        rg = _rg()
        if dataset not in rg.factory.DATASETS:
            raise ValueError(f"rg:{dataset}: unknown reasoning-gym dataset; valid: {', '.join(available())}")
        self.dataset, self.name, self.size = dataset, PREFIX + dataset, size
        self.levels = {int(k): {**config, **v} for k, v in (levels or {1: {}}).items()}
        self.difficulties = tuple(sorted(self.levels))
        self._datasets: dict[tuple[int, int], Any] = {}
        for d in self.difficulties:  # fail on a bad config now, not at the first problem
            self._dataset(0, d)
        self._walk: dict[tuple[int, int, str], list[int]] = {}
        self._next: dict[tuple[int, int], int] = {}

    def _dataset(self, seed: int, difficulty: int):
        key = (seed, difficulty)
        cache = self._datasets
        if key not in cache:
            derived = int(hashlib.sha256(f"{self.name}:{seed}:{difficulty}".encode()).hexdigest()[:12], 16)
            cache[key] = _rg().create_dataset(self.dataset, seed=derived, size=self.size,
                                              **self.levels[difficulty])
        return cache[key]

    def _item(self, seed: int, difficulty: int, j: int) -> dict[str, Any]:
        return self._dataset(seed, difficulty)[j]

    def problem(self, index: int, *, seed: int, split: str = "train", difficulty: int = 1) -> base.Problem:
        base.check_args(self.name, self.difficulties, index, split, difficulty)
        found = self._walk.setdefault((seed, difficulty, split), [])
        while len(found) <= index:
            j = self._next.get((seed, difficulty), 0)
            if j >= self.size:
                raise ValueError(f"{self.name}: only {len(found)} {split} problems in the first {self.size} "
                                 f"items; pass size= larger than {self.size}")
            self._next[(seed, difficulty)] = j + 1
            s = base.split_of(base.problem_uid(self.name, self._item(seed, difficulty, j)["question"]))
            self._walk.setdefault((seed, difficulty, s), []).append(j)
        item = self._item(seed, difficulty, found[index])
        try:
            metadata = json.loads(json.dumps(item["metadata"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.name}: item metadata is not JSON-able ({e}); this dataset can't be used") from e
        cot = metadata.get("answer_cot")
        if isinstance(cot, str) and cot.strip():
            solution = "\n".join(ln.strip() for ln in cot.split("####")[0].strip().splitlines() if ln.strip())
        else:
            solution = f"The answer is {item['answer']}."
        meta = {"rg_dataset": self.dataset, "rg_metadata": metadata, "worked_solution": bool(cot)}
        return base.Problem(self.name, index, split, difficulty, item["question"], str(item["answer"]),
                            solution, meta)

    def verify(self, completion: str, problem: base.Problem) -> float:
        got = base.extract_answer(completion)
        if got is None:
            return 0.0
        entry = {"question": problem.question, "answer": problem.answer, "metadata": problem.meta["rg_metadata"]}
        return 1.0 if float(_scorer(problem.meta["rg_dataset"])(got, entry)) >= 1.0 else 0.0
