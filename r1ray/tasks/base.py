"""The task contract: a ``Problem`` (question, gold answer, worked solution) and the ``Task`` protocol.

A task is a pure function from ``(index, seed, split, difficulty)`` to a ``Problem`` plus a verifier that
scores a full completion. Train and eval splits are disjoint by construction: a problem belongs to the eval
split iff the bucket of its canonical hash (``Problem.uid``) is below ``EVAL_BUCKETS`` out of ``BUCKETS``, and
``problem(index, split=...)`` draws candidates for ``index`` until one lands in the requested split
(:func:`first_in_split`), so no question ever appears in both.

The answer extraction here is linear-time on hostile input (``str.rfind``, no backtracking regex): rewards run
it on every GRPO completion, including 1 MB of unterminated tags.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from r1ray.model.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK

__all__ = [
    "BUCKETS",
    "EVAL_BUCKETS",
    "INSTRUCTION",
    "MAX_COMPLETION_TOKENS",
    "SPLITS",
    "Problem",
    "Task",
    "bucket",
    "check_args",
    "extract_answer",
    "first_in_split",
    "split_of",
]

SPLITS = ("train", "eval")
BUCKETS = 100
EVAL_BUCKETS = 10
"""A problem is in the eval split iff ``bucket(uid) < EVAL_BUCKETS`` (10% of the problem space)."""
MAX_COMPLETION_TOKENS = 416
"""The default longest completion of every stage that generates task answers (GRPO's rollouts, SFT's and the
evaluation's accuracy, the compression gate, teacher traces): the longest worked solution of the default task is
383 tokens with the data stage's default tokenizer (a four-operation arithmetic story; 10,000 level-3
problems, ``tests/unit/test_procedures.py``), plus the end token and a margin. A cap below it scores a correct solution 0
(320 cut 54% of four-operation stories)."""
MAX_CANDIDATES = 10_000
"""Candidates drawn for one index before giving up (eval needs ~10 on average; a tiny problem space more)."""

INSTRUCTION = (
    f"Think step by step inside {THINK} {END_THINK}, then give only the final answer inside "
    f"{ANSWER} {END_ANSWER}."
)
"""Appended to every question in ``Problem.messages``; the worked solutions follow exactly this layout."""


def user_turn(question: str) -> list[dict[str, str]]:
    """The chat prompt of a question: one user turn, the question followed by ``INSTRUCTION``."""
    return [{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}]


@dataclass(frozen=True)
class Problem:
    task: str
    """Registry name of the task that made it (its verifier is ``get_task(task).verify``)."""
    index: int
    """Index within ``(seed, split, difficulty)``."""
    split: str
    """``"train"`` or ``"eval"``."""
    difficulty: int
    """1 = easiest."""
    question: str
    """The plain-language question (no tags, no format instruction)."""
    answer: str
    """Gold answer, canonical text (``"42"``, ``"3/4"``, ``"Ann is a knight, Bob is a knave"``)."""
    solution: str
    """The worked reasoning, one step per line: the body of ``<think>``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Task-specific, JSON-able (countdown numbers/target, knights' statements, ...)."""

    @property
    def completion(self) -> str:
        """The R1-format target: ``<think>\\n{solution}\\n</think>\\n<answer>{answer}</answer>``."""
        return f"{THINK}\n{self.solution}\n{END_THINK}\n{ANSWER}{self.answer}{END_ANSWER}"

    def messages(self) -> list[dict[str, str]]:
        """The chat prompt: one user turn, the question followed by the format instruction."""
        return user_turn(self.question)

    def uid(self) -> str:
        """Canonical hash of the problem: task name + normalized question (case and whitespace folded)."""
        return problem_uid(self.task, self.question)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Problem:
        return cls(**d)


def normalize_question(question: str) -> str:
    return " ".join(question.lower().split())


def problem_uid(task: str, question: str) -> str:
    return hashlib.sha256(f"{task}\n{normalize_question(question)}".encode()).hexdigest()


def bucket(uid: str) -> int:
    return int(uid[:8], 16) % BUCKETS


def split_of(uid: str) -> str:
    return "eval" if bucket(uid) < EVAL_BUCKETS else "train"


@runtime_checkable
class Task(Protocol):
    """A registered task. ``verify`` must depend only on the problem (never on the task's constructor
    options), so a reward worker can verify any problem with ``get_task(problem.task).verify``."""

    name: str
    difficulties: tuple[int, ...]

    def problem(self, index: int, *, seed: int, split: str = "train", difficulty: int = 1) -> Problem: ...

    def verify(self, completion: str, problem: Problem) -> float: ...


def check_args(task: str, difficulties: tuple[int, ...], index: int, split: str, difficulty: int) -> None:
    """Bad arguments are errors that name the value and the valid choices."""
    if split not in SPLITS:
        raise ValueError(f"{task}: split={split!r} is not one of {SPLITS}")
    if difficulty not in difficulties:
        raise ValueError(f"{task}: difficulty={difficulty!r} is not one of {difficulties}")
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"{task}: index must be a non-negative int, got {index!r}")


def first_in_split(
    task: str,
    make: Callable[[random.Random], tuple[str, str, str, dict[str, Any]]],
    *,
    index: int,
    seed: int,
    split: str,
    difficulty: int,
) -> Problem:
    """Draw candidates for ``index`` (each from its own RNG keyed by task, seed, difficulty, index and attempt)
    until one's uid falls in ``split``. ``make(rng)`` returns ``(question, answer, solution, meta)``.

    O(1) expected per index (≈1.1 draws for train, ≈10 for eval), and a pure function of the arguments.
    """
    for attempt in range(MAX_CANDIDATES):
        rng = random.Random(f"r1ray-task:{task}:{seed}:{difficulty}:{index}:{attempt}")
        question, answer, solution, meta = make(rng)
        if split_of(problem_uid(task, question)) == split:
            return Problem(task, index, split, difficulty, question, answer, solution, meta)
    raise RuntimeError(
        f"{task}: no {split} problem after {MAX_CANDIDATES} candidates at difficulty {difficulty}; "
        "the problem space at this level is too small for a hash split"
    )


def extract_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>...</answer>``, stripped; None when there is none. Linear time."""
    end = completion.rfind(END_ANSWER)
    if end < 0:
        return None
    start = completion.rfind(ANSWER, 0, end)
    if start < 0:
        return None
    return completion[start + len(ANSWER) : end].strip()
