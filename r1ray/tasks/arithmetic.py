"""Arithmetic word problems with a ``<think>`` worked solution that carries out the computation, in three levels.

Each solution names a step (``3 boxes of 46 pencils: 46 * 3``), then works it in writing
(``r1ray.tasks.procedures``: columns with carries and borrows, partial products, long division), one small fact
per line, and ends with ``So the answer is N.``::

    task = ArithmeticTask()
    p = task.problem(7, seed=0, split="train", difficulty=1)
    p.question   # "Mia has 467 pencils. She gets 285 more pencils. How many pencils does Mia have now?"
    p.solution   # "Mia has 467 + 285 pencils.\\nones 7 + 5 + 0 = 12, write 2, carry 1\\n...\\nSo the answer is 752."
    task.verify(p.completion, p)  # 1.0

Levels: 1 = one operation on numbers up to three digits; 2 = two operations; 3 = three or four operations in
templates that levels 1 and 2 never use (the default pipeline keeps level 3 out of SFT and the pretraining
corpus: GRPO learns it from the reward alone). The problem space is large (hundreds of thousands of questions per
level), so the hash split holds out questions, not templates.

``generate``/``generate_many`` are the data stage's ``reasoning`` source: documents ``Question: ...`` followed by
the completion, drawn from the *train* split of ``CORPUS_LEVELS``. ``reward``/``format_reward`` are the plain
rule-based rewards (``r1ray.tasks.rewards`` holds the registered ones).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from r1ray.model.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK
from r1ray.tasks import base, mathcheck
from r1ray.tasks.procedures import op_lines

__all__ = [
    "CORPUS_LEVELS", "LEVELS", "ArithmeticTask", "ReasoningSample", "generate", "generate_many", "extract_answer",
    "reward", "format_reward", "worked",
]

_NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Yuki", "Ines", "Kofi", "Ana"]
_PRONOUN = {n: ("She" if n in {"Mia", "Ava", "Zoe", "Lena", "Sara", "Yuki", "Ines", "Ana"} else "He") for n in _NAMES}
_ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "coins", "shells", "cards", "eggs", "stamps"]
_CONTAINERS = ["boxes", "bags", "packs", "crates", "jars"]

Step = tuple[str, int, str, int]
"""One named operation: (what it computes, in words; left operand; ``+ - * /``; right operand)."""


def worked(steps: list[Step | str]) -> tuple[list[str], int]:
    """Solution lines for a plan: each step ``(words, a, op, b)`` as ``words: a op b`` then its written
    computation (``r1ray.tasks.procedures``); a plain string is a line of prose. Returns (lines, last value)."""
    lines: list[str] = []
    value = None
    for step in steps:
        if isinstance(step, str):
            lines.append(step)
            continue
        words, a, op, b = step
        body, value = op_lines(a, op, b)
        lines.append(f"{words}: {a} {op} {b}")
        lines += body
    if value is None:
        raise ValueError("a worked solution needs at least one operation")
    return lines, value


# --- Level 1: one operation -------------------------------------------------------------------------------


def _add(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    a, b = r.randint(10, 999), r.randint(10, 999)
    he = _PRONOUN[name]
    problem = f"{name} has {a} {item}. {he} gets {b} more {item}. How many {item} does {name} have now?"
    return problem, [(f"{name} has", a, "+", b)], a + b


def _sub(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    a = r.randint(100, 999)
    b = r.randint(10, a - 1)
    he = _PRONOUN[name]
    problem = f"{name} has {a} {item}. {he} gives {b} {item} to a friend. How many {item} does {name} have left?"
    return problem, [(f"{name} has left", a, "-", b)], a - b


def _mul(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    n, per = r.randint(2, 9), r.randint(10, 99)
    cont = r.choice(_CONTAINERS)
    problem = f"{name} buys {n} {cont} with {per} {item} in each. How many {item} does {name} buy?"
    return problem, [(f"{n} {cont} of {per} {item}", per, "*", n)], n * per


def _div(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    friends, each = r.randint(2, 9), r.randint(10, 99)
    total = friends * each
    problem = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    return problem, [("Each friend gets", total, "/", friends)], each


# --- Level 2: two operations ------------------------------------------------------------------------------


def _shop(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    start, buy = r.randint(5, 99), r.randint(2, 99)
    give = r.randint(1, start + buy - 1)
    he = _PRONOUN[name]
    problem = (f"{name} has {start} {item}. {he} gets {buy} more {item} and then gives {give} {item} to a friend. "
               f"How many {item} does {name} have now?")
    return problem, [("After getting more", start, "+", buy), ("After giving away", start + buy, "-", give)], \
        start + buy - give


def _boxes(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    start, n, per = r.randint(0, 99), r.randint(2, 9), r.randint(2, 30)
    cont = r.choice(_CONTAINERS)
    he = _PRONOUN[name]
    problem = (f"{name} has {start} {item}. {he} buys {n} {cont} with {per} {item} in each. "
               f"How many {item} does {name} have now?")
    return problem, [(f"{n} {cont} of {per} {item}", per, "*", n), ("In total", start, "+", per * n)], \
        start + per * n


def _share(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    friends, each, extra = r.randint(2, 9), r.randint(2, 30), r.randint(1, 40)
    total = friends * each
    problem = (f"{name} shares {total} {item} equally among {friends} friends, and then each friend finds {extra} "
               f"more {item}. How many {item} does each friend have?")
    return problem, [("Each friend first gets", total, "/", friends), ("After finding more", each, "+", extra)], \
        each + extra


def _rate(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    per_day, days = r.randint(2, 30), r.randint(2, 9)
    made = per_day * days
    lost = r.randint(1, made - 1)
    problem = (f"{name} collects {per_day} {item} every day for {days} days, then loses {lost} of them. "
               f"How many {item} are left?")
    return problem, [(f"In {days} days {name} collects", per_day, "*", days), ("After losing some", made, "-", lost)], \
        made - lost


# --- Level 3: three or four operations, in wordings levels 1 and 2 never use -------------------------------


def _two_people(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    other = r.choice([n for n in _NAMES if n != name])
    a, times, b = r.randint(3, 40), r.randint(2, 9), r.randint(1, 40)
    problem = (f"{name} has {a} {item}. {other} has {times} times as many {item} as {name}, plus {b} more. "
               f"How many {item} do they have together?")
    return problem, [(f"{times} times as many as {name}", a, "*", times), (f"{other} has", a * times, "+", b),
                     ("Together", a, "+", a * times + b)], a + a * times + b


def _shop_and_find(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    start, n, per = r.randint(0, 60), r.randint(2, 9), r.randint(2, 30)
    cont = r.choice(_CONTAINERS)
    bought = n * per
    give = r.randint(1, start + bought - 1)
    extra = r.randint(1, 40)
    he = _PRONOUN[name]
    left = start + bought - give
    problem = (f"{name} has {start} {item}. {he} buys {n} {cont} with {per} {item} in each, gives {give} {item} to a "
               f"friend, and then finds {extra} more {item}. How many {item} does {name} have now?")
    return problem, [(f"{n} {cont} of {per} {item}", per, "*", n), (f"With the {start} {name} had", start, "+", bought),
                     ("After giving away", start + bought, "-", give), ("After finding more", left, "+", extra)], \
        left + extra


def _buy_and_share(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    friends, each = r.randint(2, 9), r.randint(3, 30)
    total = friends * each
    n = r.randint(2, min(9, total - 1))
    per = r.randint(1, (total - 1) // n)
    bought = n * per
    start = total - bought
    cont = r.choice(_CONTAINERS)
    he = _PRONOUN[name]
    problem = (f"{name} has {start} {item}. {he} buys {n} {cont} with {per} {item} in each, and then shares all the "
               f"{item} equally among {friends} friends. How many {item} does each friend get?")
    return problem, [(f"{n} {cont} of {per} {item}", per, "*", n), ("In total", start, "+", bought),
                     ("Each friend gets", total, "/", friends)], each


LEVELS: dict[int, tuple[Callable[[random.Random, str, str], tuple[str, list, int]], ...]] = {
    1: (_add, _sub, _mul, _div),
    2: (_shop, _boxes, _share, _rate),
    3: (_two_people, _shop_and_find, _buy_and_share),
}
"""Templates per difficulty: 1 = one operation, 2 = two, 3 = three or four (wordings of its own)."""

CORPUS_LEVELS = (1, 2)
"""Levels of the data stage's ``reasoning`` documents: level 3 stays out of pretraining (GRPO's level)."""


def _make(r: random.Random, difficulty: int) -> tuple[str, str, str, dict]:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    template = r.choice(LEVELS[difficulty])
    question, plan, answer = template(r, name, item)
    lines, value = worked(plan)
    if value != answer:  # the plan is the computation: a template whose words and numbers disagree is a bug
        raise AssertionError(f"{template.__name__}: worked value {value} != answer {answer} for {question!r}")
    lines.append(f"So the answer is {answer}.")
    return question, str(answer), "\n".join(lines), {"steps": sum(1 for s in plan if not isinstance(s, str)),
                                                      "template": template.__name__.lstrip("_"),
                                                      "ops": "".join(s[2] for s in plan if not isinstance(s, str))}


class ArithmeticTask:
    """Arithmetic word problems; answers are non-negative integers, verified as numbers (``mathcheck``)."""

    name = "arithmetic"
    difficulties = tuple(LEVELS)

    def problem(self, index: int, *, seed: int, split: str = "train", difficulty: int = 1) -> base.Problem:
        base.check_args(self.name, self.difficulties, index, split, difficulty)
        return base.first_in_split(self.name, lambda r: _make(r, difficulty), index=index, seed=seed, split=split,
                                   difficulty=difficulty)

    def verify(self, completion: str, problem: base.Problem) -> float:
        return 1.0 if mathcheck.answers_match(base.extract_answer(completion), problem.answer) else 0.0


# --- The data stage's reasoning documents ------------------------------------------------------------------


@dataclass(frozen=True)
class ReasoningSample:
    index: int
    problem: str
    """The question, in plain words."""
    solution: str
    """The worked solution (the ``<think>`` body)."""
    answer: int
    """The ground truth."""

    @property
    def completion(self) -> str:
        """What a model should produce after the prompt: ``<think>...</think>`` then ``<answer>N</answer>``."""
        return f"{THINK}\n{self.solution}\n{END_THINK}\n{ANSWER}{self.answer}{END_ANSWER}"

    @property
    def prompt(self) -> str:
        return f"Question: {self.problem}\n"

    @property
    def text(self) -> str:
        """The pretraining document: the prompt followed by the completion."""
        return self.prompt + self.completion


def generate(seed: int, index: int, levels: tuple[int, ...] = CORPUS_LEVELS) -> ReasoningSample:
    """Document ``index`` of the corpus stream for ``seed``: train-split problem ``index // len(levels)`` of level
    ``levels[index % len(levels)]``. The same arguments always give the same sample."""
    level = levels[index % len(levels)]
    p = ArithmeticTask().problem(index // len(levels), seed=seed, split="train", difficulty=level)
    return ReasoningSample(index=index, problem=p.question, solution=p.solution, answer=int(p.answer))


def generate_many(seed: int, n: int, start: int = 0, levels: tuple[int, ...] = CORPUS_LEVELS
                  ) -> Iterator[ReasoningSample]:
    for i in range(start, start + n):
        yield generate(seed, i, levels)


_ANSWER_RE = re.compile(re.escape(ANSWER) + r"\s*(.*?)\s*" + re.escape(END_ANSWER), re.S)
_FORMAT_RE = re.compile(
    r"^\s*" + re.escape(THINK) + r".+?" + re.escape(END_THINK) + r"\s*" + re.escape(ANSWER) + r".+?"
    + re.escape(END_ANSWER) + r"\s*$",
    re.S,
)


def extract_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>...</answer>``, stripped; None when there is none."""
    found = _ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def reward(completion: str, answer: int | str) -> float:
    """1.0 when the last ``<answer>`` holds the ground truth (integers compared as numbers), else 0.0."""
    got = extract_answer(completion)
    if got is None:
        return 0.0
    got = got.replace(",", "").strip()
    try:
        return 1.0 if int(float(got)) == int(answer) and float(got) == int(float(got)) else 0.0
    except (ValueError, OverflowError):
        return 1.0 if got == str(answer).strip() else 0.0


def format_reward(completion: str) -> float:
    """1.0 when the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>``."""
    return 1.0 if _FORMAT_RE.match(completion) else 0.0
