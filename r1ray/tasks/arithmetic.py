"""R1-style reasoning samples: arithmetic word problems with a ``<think>`` worked solution and an answer.

Deterministic from ``(seed, index)``: the data stage writes them into the default corpus, and the GRPO
stage reuses ``generate`` for prompts plus ``reward`` (rule-based: the ``<answer>`` must equal the ground
truth) without storing anything::

    s = generate(seed=0, index=7)
    s.problem      # "Mia has 14 pencils. She buys 3 boxes of 6 pencils. ... How many pencils does Mia have now?"
    s.solution     # "Mia starts with 14 pencils.\\n3 boxes of 6 pencils is 3 * 6 = 18 pencils.\\n..."
    s.answer       # 32
    s.text         # "Question: ...\\n<think>\\n...\\n</think>\\n<answer>32</answer>"
    reward(s.completion, s.answer) == 1.0

The registered task ``ArithmeticTask`` (``get_task("arithmetic")``) adds difficulty levels and the hash split
(see ``LEVELS``); ``generate`` stays as it was for the data stage.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from r1ray.model.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK
from r1ray.tasks import base, mathcheck

__all__ = [
    "LEVELS", "ArithmeticTask", "ReasoningSample", "generate", "generate_many", "extract_answer", "reward",
    "format_reward",
]

_NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Yuki", "Ines", "Kofi", "Ana"]
_PRONOUN = {n: ("She" if n in {"Mia", "Ava", "Zoe", "Lena", "Sara", "Yuki", "Ines", "Ana"} else "He") for n in _NAMES}
_ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "coins", "shells", "cards", "eggs", "stamps"]
_CONTAINERS = ["boxes", "bags", "packs", "crates", "jars"]


@dataclass(frozen=True)
class ReasoningSample:
    index: int
    problem: str
    """The question, in plain words."""
    solution: str
    """The worked solution: one line per step, each showing its arithmetic (the ``<think>`` body)."""
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


def _shop(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    start, buy, give = r.randint(5, 60), r.randint(2, 40), 0
    total = start + buy
    give = r.randint(1, total - 1)
    he = _PRONOUN[name]
    problem = (
        f"{name} has {start} {item}. {he} gets {buy} more {item} and then gives {give} {item} to a friend. "
        f"How many {item} does {name} have now?"
    )
    steps = [
        f"{name} starts with {start} {item}.",
        f"After getting {buy} more: {start} + {buy} = {total}.",
        f"After giving away {give}: {total} - {give} = {total - give}.",
    ]
    return problem, steps, total - give


def _boxes(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    start, n, per = r.randint(0, 30), r.randint(2, 9), r.randint(2, 12)
    cont = r.choice(_CONTAINERS)
    he = _PRONOUN[name]
    bought = n * per
    problem = (
        f"{name} has {start} {item}. {he} buys {n} {cont} with {per} {item} in each. "
        f"How many {item} does {name} have now?"
    )
    steps = [
        f"{name} starts with {start} {item}.",
        f"{n} {cont} of {per} {item} is {n} * {per} = {bought} {item}.",
        f"In total: {start} + {bought} = {start + bought}.",
    ]
    return problem, steps, start + bought


def _share(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    friends, each, extra = r.randint(2, 8), r.randint(2, 15), r.randint(0, 20)
    total = friends * each
    problem = (
        f"{name} shares {total} {item} equally among {friends} friends, and then each friend finds {extra} "
        f"more {item}. How many {item} does each friend have?"
    )
    steps = [
        f"Each friend first gets {total} / {friends} = {each} {item}.",
        f"After finding {extra} more: {each} + {extra} = {each + extra}.",
    ]
    return problem, steps, each + extra


def _rate(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    per_day, days, lost = r.randint(2, 20), r.randint(2, 10), 0
    made = per_day * days
    lost = r.randint(0, made // 2)
    problem = (
        f"{name} collects {per_day} {item} every day for {days} days, then loses {lost} of them. "
        f"How many {item} are left?"
    )
    steps = [
        f"In {days} days {name} collects {per_day} * {days} = {made} {item}.",
        f"After losing {lost}: {made} - {lost} = {made - lost}.",
    ]
    return problem, steps, made - lost


def _two_people(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    other = r.choice([n for n in _NAMES if n != name])
    a, times, b = r.randint(3, 25), r.randint(2, 5), r.randint(1, 30)
    other_has = a * times
    problem = (
        f"{name} has {a} {item}. {other} has {times} times as many {item} as {name}, plus {b} more. "
        f"How many {item} do they have together?"
    )
    steps = [
        f"{other} has {a} * {times} = {other_has}, plus {b}: {other_has} + {b} = {other_has + b}.",
        f"Together: {a} + {other_has + b} = {a + other_has + b}.",
    ]
    return problem, steps, a + other_has + b


_TEMPLATES = (_shop, _boxes, _share, _rate, _two_people)


def generate(seed: int, index: int) -> ReasoningSample:
    """Sample ``index`` of the stream for ``seed``: the same pair always gives the same sample."""
    r = random.Random(f"r1ray-reasoning:{seed}:{index}")
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    problem, steps, answer = r.choice(_TEMPLATES)(r, name, item)
    steps.append(f"So the answer is {answer}.")
    return ReasoningSample(index=index, problem=problem, solution="\n".join(steps), answer=answer)


def generate_many(seed: int, n: int, start: int = 0) -> Iterator[ReasoningSample]:
    for i in range(start, start + n):
        yield generate(seed, i)


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


# --- The registered task: difficulty levels over the same kind of word problem ---------------------------
# Level 1 is one operation, level 2 the two-step templates above (what ``generate`` mixes with level 3's
# ``_two_people``), level 3 three or four chained steps. ``generate``/``generate_many`` above are unchanged:
# the data stage's default corpus is built from them and must stay byte-identical.


def _add(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a, b = r.randint(2, 60), r.randint(2, 40)
    he = _PRONOUN[name]
    problem = f"{name} has {a} {item}. {he} gets {b} more {item}. How many {item} does {name} have now?"
    return problem, [f"{name} has {a} + {b} = {a + b} {item}."], a + b


def _sub(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    a = r.randint(5, 80)
    b = r.randint(1, a - 1)
    he = _PRONOUN[name]
    problem = f"{name} has {a} {item}. {he} gives {b} {item} to a friend. How many {item} does {name} have left?"
    return problem, [f"{name} has {a} - {b} = {a - b} {item} left."], a - b


def _mul(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    n, per = r.randint(2, 9), r.randint(2, 12)
    cont = r.choice(_CONTAINERS)
    problem = f"{name} buys {n} {cont} with {per} {item} in each. How many {item} does {name} buy?"
    return problem, [f"{n} {cont} of {per} {item} is {n} * {per} = {n * per} {item}."], n * per


def _div(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    friends, each = r.randint(2, 9), r.randint(2, 12)
    total = friends * each
    problem = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    return problem, [f"Each friend gets {total} / {friends} = {each} {item}."], each


def _shop_and_find(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    start, n, per = r.randint(0, 30), r.randint(2, 9), r.randint(2, 12)
    cont = r.choice(_CONTAINERS)
    bought = n * per
    give = r.randint(1, start + bought - 1)
    extra = r.randint(1, 20)
    he = _PRONOUN[name]
    left = start + bought - give
    problem = (
        f"{name} has {start} {item}. {he} buys {n} {cont} with {per} {item} in each, gives {give} {item} to a "
        f"friend, and then finds {extra} more {item}. How many {item} does {name} have now?"
    )
    steps = [
        f"{n} {cont} of {per} {item} is {n} * {per} = {bought} {item}.",
        f"With the {start} {name} had: {start} + {bought} = {start + bought}.",
        f"After giving away {give}: {start + bought} - {give} = {left}.",
        f"After finding {extra} more: {left} + {extra} = {left + extra}.",
    ]
    return problem, steps, left + extra


def _buy_and_share(r: random.Random, name: str, item: str) -> tuple[str, list[str], int]:
    friends, each = r.randint(2, 8), r.randint(3, 15)
    total = friends * each
    n = r.randint(2, 6)
    per = r.randint(1, max(1, (total - 1) // n))
    bought = n * per
    start = total - bought
    cont = r.choice(_CONTAINERS)
    he = _PRONOUN[name]
    problem = (
        f"{name} has {start} {item}. {he} buys {n} {cont} with {per} {item} in each, and then shares all the "
        f"{item} equally among {friends} friends. How many {item} does each friend get?"
    )
    steps = [
        f"{n} {cont} of {per} {item} is {n} * {per} = {bought} {item}.",
        f"In total: {start} + {bought} = {total}.",
        f"Each friend gets {total} / {friends} = {each}.",
    ]
    return problem, steps, each


LEVELS: dict[int, tuple] = {
    1: (_add, _sub, _mul, _div),
    2: (_shop, _boxes, _share, _rate),
    3: (_two_people, _shop_and_find, _buy_and_share),
}
"""Templates per difficulty: 1 = one operation, 2 = two steps, 3 = three or four steps."""


class ArithmeticTask:
    """Arithmetic word problems; answers are non-negative integers, verified as numbers (``mathcheck``)."""

    name = "arithmetic"
    difficulties = tuple(LEVELS)

    def problem(self, index: int, *, seed: int, split: str = "train", difficulty: int = 1) -> base.Problem:
        base.check_args(self.name, self.difficulties, index, split, difficulty)

        def make(r: random.Random):
            name, item = r.choice(_NAMES), r.choice(_ITEMS)
            problem, steps, answer = r.choice(LEVELS[difficulty])(r, name, item)
            steps.append(f"So the answer is {answer}.")
            return problem, str(answer), "\n".join(steps), {"steps": len(steps) - 1}

        return base.first_in_split(self.name, make, index=index, seed=seed, split=split, difficulty=difficulty)

    def verify(self, completion: str, problem: base.Problem) -> float:
        return 1.0 if mathcheck.answers_match(base.extract_answer(completion), problem.answer) else 0.0
