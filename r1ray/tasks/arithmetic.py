"""Arithmetic word problems with a ``<think>`` worked solution that carries out the computation, in three levels.

The solution takes the question a sentence at a time: it quotes the sentence, writes the operation it asks for on
the running total (``She buys 3 boxes with 46 pencils in each: 46*3``), works it in writing
(``r1ray.tasks.procedures``: columns with carries and borrows, partial products, long division), one small fact
per line, and ends with ``So the answer is N.``::

    task = ArithmeticTask()
    p = task.problem(7, seed=0, split="train", difficulty=1)
    p.question   # "Mia has 167 pencils. She gets 85 more pencils. How many pencils does Mia have now?"
    p.solution   # "Mia has 167 pencils.\\nShe gets 85 more pencils: 167+85\\nones 7+5+0=12, write 2, carry 1..."
    task.verify(p.completion, p)  # 1.0

Levels: 1 = one operation (numbers up to three digits); 2 = a story of two operations; 3 = the same kind of story
told in three or four operations. The default pipeline's SFT traces cover levels 1 and 2; GRPO trains on level 3.
The problem space is large (hundreds of thousands of questions per level), so the hash split holds out questions,
not templates.

``generate``/``generate_many`` are the data stage's ``reasoning`` source: documents ``Question: ...`` followed by
the completion, or (a ``chat_fraction`` of them) the same problem as a chat conversation, drawn from the *train*
split of ``CORPUS_LEVELS`` (every level). ``reward``/``format_reward`` are the plain
rule-based rewards (``r1ray.tasks.rewards`` holds the registered ones).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from r1ray.model.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK, render_chat
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
    """Solution lines for a plan: each step ``(words, a, op, b)`` as ``words: a op b`` (no spaces) then its written
    computation (``r1ray.tasks.procedures``); a plain string is a line of prose. Returns (lines, last value)."""
    lines: list[str] = []
    value = None
    for step in steps:
        if isinstance(step, str):
            lines.append(step)
            continue
        words, a, op, b = step
        body, value = op_lines(a, op, b)
        lines.append(f"{words}: {a}{op}{b}")
        lines += body
    if value is None:
        raise ValueError("a worked solution needs at least one operation")
    return lines, value


# --- The templates ------------------------------------------------------------------------------------------
# A question is a short story: what someone has, then sentences that each change the total (gets, finds, gives,
# loses: one operation; buys boxes: a product, then a sum; shares among friends: a division, always last). The
# worked solution names each change and works it on the running total. Level 1 tells one operation, level 2 two,
# level 3 three or four.

_WORDS = {"gets": "After getting more", "finds": "After finding more", "gives": "After giving some away",
          "loses": "After losing some"}


def _change(kind: str, he: str, item: str, b: int) -> str:
    return {"gets": f"{he} gets {b} more {item}.", "finds": f"{he} finds {b} more {item}.",
            "gives": f"{he} gives {b} {item} to a friend.", "loses": f"{he} loses {b} {item}."}[kind]


def _story(r: random.Random, name: str, item: str, n_ops: int) -> tuple[str, list, int]:
    """A story of ``n_ops`` operations on a running total."""
    he, cont = _PRONOUN[name], r.choice(_CONTAINERS)
    total = r.randint(10, 199)
    sentences, plan = [f"{name} has {total} {item}."], []
    share = n_ops >= 2 and r.random() < 0.25
    left = n_ops - share
    friends = r.randint(2, 9)
    while left:
        kinds = ["gets", "finds", "gives", "loses"] + (["buys"] if left >= 2 and not (share and left == 2) else [])
        kind = r.choice(kinds)
        if kind == "buys":
            n, per = r.randint(2, 9), r.randint(2, 40)
            sentences.append(f"{he} buys {n} {cont} with {per} {item} in each.")
            plan += [(f"{n} {cont} of {per} {item}", per, "*", n), ("In total", total, "+", per * n)]
            total += per * n
            left -= 2
            continue
        if kind in ("gives", "loses") and total < 3:
            kind = "gets"
        sign = 1 if kind in ("gets", "finds") else -1
        amounts = range(2, 100) if sign > 0 else range(1, min(total, 100))
        if share and left == 1:  # the last change leaves a total the friends can share
            amounts = [b for b in amounts if (total + sign * b) % friends == 0] or amounts
        b = r.choice(amounts)
        sentences.append(_change(kind, he, item, b))
        plan.append((_WORDS[kind], total, "+" if sign > 0 else "-", b))
        total += sign * b
        left -= 1
    if share and total % friends == 0:
        sentences.append(f"{he} shares all the {item} equally among {friends} friends.")
        plan.append(("Each friend gets", total, "/", friends))
        return " ".join(sentences) + f" How many {item} does each friend get?", plan, total // friends
    if share:  # the amounts could not make the total divisible: one more change instead of the share
        sentences.append(_change("finds", he, item, 1))
        plan.append((_WORDS["finds"], total, "+", 1))
        total += 1
    return " ".join(sentences) + f" How many {item} does {name} have now?", plan, total


def _one_step(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    """Level 1: one change of what someone has, a purchase of boxes, or a fair share."""
    kind = r.choice(["change", "change", "mul", "div"])
    if kind == "change":
        return _story(r, name, item, 1)
    if kind == "mul":
        n, per, cont = r.randint(2, 9), r.randint(10, 99), r.choice(_CONTAINERS)
        return (f"{name} buys {n} {cont} with {per} {item} in each. How many {item} does {name} buy?",
                [(f"{n} {cont} of {per} {item}", per, "*", n)], n * per)
    friends, each = r.randint(2, 9), r.randint(10, 99)
    return (f"{name} shares {friends * each} {item} equally among {friends} friends. How many {item} does each "
            "friend get?", [("Each friend gets", friends * each, "/", friends)], each)


def _story2(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    return _story(r, name, item, 2)


def _story3(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    return _story(r, name, item, 3)


def _story4(r: random.Random, name: str, item: str) -> tuple[str, list, int]:
    return _story(r, name, item, 4)


LEVELS: dict[int, tuple[Callable[[random.Random, str, str], tuple[str, list, int]], ...]] = {
    1: (_one_step,),
    2: (_story2,),
    3: (_story3, _story4),
}
"""Templates per difficulty: 1 = one operation, 2 = two, 3 = three or four (a longer story than level 2's)."""

CORPUS_LEVELS = (1, 2, 3)
"""Levels of the data stage's ``reasoning`` documents: every level, as text (``Question: ...`` and its worked
solution, or the chat conversation of it), the way a web corpus holds worked examples. The SFT cold start's chat traces cover levels 1 and 2 only;
GRPO's level 3 is one the chat model has never been shown an answer to (docs/reasoning.md says why the corpus
holds it: a model this small gives a story longer than any it was trained on no chance at all, so RL has nothing
to sample)."""

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
    chat: bool = False
    """Rendered as a chat conversation (the template's ChatML turns) rather than ``Question: ...``."""

    @property
    def completion(self) -> str:
        """What a model should produce after the prompt: ``<think>...</think>`` then ``<answer>N</answer>``."""
        return f"{THINK}\n{self.solution}\n{END_THINK}\n{ANSWER}{self.answer}{END_ANSWER}"

    @property
    def prompt(self) -> str:
        return f"Question: {self.problem}\n"

    @property
    def text(self) -> str:
        """The pretraining document: the prompt followed by the completion, either as ``Question: ...`` text or,
        when ``chat``, as the conversation the chat template renders (the user turn is ``Problem.messages``'s)."""
        if self.chat:
            return render_chat([*base.user_turn(self.problem), {"role": "assistant", "content": self.completion}])
        return self.prompt + self.completion


def _is_chat(seed: int, index: int, chat_fraction: float) -> bool:
    if chat_fraction <= 0:
        return False
    return chat_fraction >= 1 or random.Random(f"{seed}:{index}:chat").random() < chat_fraction


def generate(seed: int, index: int, levels: tuple[int, ...] = CORPUS_LEVELS, chat_fraction: float = 0.0
             ) -> ReasoningSample:
    """Document ``index`` of the corpus stream for ``seed``: train-split problem ``index // len(levels)`` of level
    ``levels[index % len(levels)]``, in chat form with probability ``chat_fraction`` (drawn per document from
    ``seed`` and ``index``). The same arguments always give the same sample."""
    level = levels[index % len(levels)]
    p = ArithmeticTask().problem(index // len(levels), seed=seed, split="train", difficulty=level)
    return ReasoningSample(index=index, problem=p.question, solution=p.solution, answer=int(p.answer),
                           chat=_is_chat(seed, index, chat_fraction))


def generate_many(seed: int, n: int, start: int = 0, levels: tuple[int, ...] = CORPUS_LEVELS,
                  chat_fraction: float = 0.0) -> Iterator[ReasoningSample]:
    for i in range(start, start + n):
        yield generate(seed, i, levels, chat_fraction)


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
