"""Task accuracy by generation, shared by the evaluation job and the training stages' in-loop evaluation.

A generation function is any callable ``problems -> completions`` (the caller renders prompts the way its
model expects: a chat template, a prefilled ``<think>``, the pretraining layout), so the SFT stage's HF
``generate``, GRPO's engine pool, the evaluation job's Ray Data pipeline and a test's lambda all score the
same way::

    from r1ray.eval.generation import task_accuracy
    m = task_accuracy(lambda ps: [p.completion for p in ps], problems)   # {"accuracy": 1.0, "accuracy_d1": ...}

Completions are verified by each task's verifier in the reward sandbox (``r1ray.tasks.rewards.score``:
time-boxed, never raising; failures counted in ``eval_verify_failures``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from r1ray.tasks.base import Problem, extract_answer

__all__ = [
    "NO_THINK_MAX_TOKENS",
    "PROMPT_FORMATS",
    "GenerateFn",
    "answer_key",
    "level_metrics",
    "render_prompt",
    "score_no_think",
    "score_problems",
    "task_accuracy",
]

PromptFormat = Literal["chat", "question"]
PROMPT_FORMATS = ("chat", "question")
"""``chat``: the tokenizer's chat template over ``Problem.messages()`` (SFT/GRPO models). ``question``: the
pretraining corpus's layout ``"Question: {question}\\n"`` (r1ray.tasks.arithmetic's documents), for base models."""

NO_THINK_MAX_TOKENS = 16
"""Tokens a completion gets when the thinking is suppressed: room for a number and ``</answer>``, none for a
worked solution written after the forced ``</think>`` (which a model trained on worked solutions does at once)."""

GenerateFn = Callable[[Sequence[Problem]], Sequence[str]]


def render_prompt(problem: Problem, fmt: str, tokenizer: Any = None, *, prefill_think: bool = False,
                  no_think: bool = False) -> str:
    """The prompt text for ``problem`` in format ``fmt`` (``chat`` needs ``tokenizer``); with ``prefill_think``
    the prompt ends in ``<think>\\n``, so the completion starts inside the reasoning; with ``no_think`` it ends in
    ``<think>\\n</think>\\n<answer>``, an empty reasoning and an opened answer, so the completion is the answer
    alone (score it as ``<answer>`` + completion, with ``NO_THINK_MAX_TOKENS``)."""
    from r1ray.model.tokenizer import ANSWER, END_THINK, THINK

    if prefill_think and no_think:
        raise ValueError("prefill_think and no_think exclude each other")

    if fmt == "chat":
        if tokenizer is None:
            raise ValueError("prompt format 'chat' needs the model's tokenizer (its chat template)")
        text = tokenizer.apply_chat_template(problem.messages(), add_generation_prompt=True, tokenize=False)
    elif fmt == "question":
        text = f"Question: {problem.question}\n"
    else:
        raise ValueError(f"unknown prompt format {fmt!r}; valid: {', '.join(PROMPT_FORMATS)}")
    if no_think:
        return text + f"{THINK}\n{END_THINK}\n{ANSWER}"
    return text + f"{THINK}\n" if prefill_think else text


def answer_key(completion: str) -> str | None:
    """A canonical form of the completion's final ``<answer>`` for majority voting: the exact value of a plain
    number (``"42"``, ``"42.0"`` and ``"84/2"`` vote together), else the answer with case and whitespace
    folded; None when there is no answer."""
    from r1ray.tasks.mathcheck import parse_number

    ans = extract_answer(completion)
    if ans is None or not ans:
        return None
    value = parse_number(ans)
    return f"={value}" if value is not None else " ".join(ans.lower().split())


def score_problems(completions: Sequence[str], problems: Sequence[Problem], *, prefilled_think: bool = False,
                   timeout_s: float = 2.0) -> tuple[list[float], int]:
    """Each completion's accuracy under its task's verifier (0 or 1; a verifier that fails scores 0) and the
    number of verifier failures."""
    from r1ray.tasks.rewards import score

    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
    if not problems:
        return [], 0
    res = score(list(completions), list(problems), {"accuracy": 1.0}, timeout_s=timeout_s,
                prefilled_think=prefilled_think)
    return list(res.per_reward["accuracy"]), int(sum(res.failures.values()))


def score_no_think(completions: Sequence[str], problems: Sequence[Problem], *, timeout_s: float = 2.0
                   ) -> tuple[list[float], int]:
    """``score_problems`` for completions of ``render_prompt(..., no_think=True)``, whose prompt opened the
    answer: each is scored as ``<answer>`` + completion."""
    from r1ray.model.tokenizer import ANSWER

    return score_problems([ANSWER + c for c in completions], problems, timeout_s=timeout_s)


def level_metrics(scores: Sequence[float], problems: Sequence[Problem], prefix: str = "accuracy") -> dict[str, float]:
    """``{prefix: mean, f"{prefix}_d{level}": mean per difficulty level}`` (levels with no problem absent)."""
    out: dict[str, float] = {}
    if not problems:
        return out
    out[prefix] = float(sum(scores) / len(scores))
    by: dict[int, list[float]] = {}
    for s, p in zip(scores, problems, strict=True):
        by.setdefault(p.difficulty, []).append(s)
    for level in sorted(by):
        out[f"{prefix}_d{level}"] = float(sum(by[level]) / len(by[level]))
    return out


def task_accuracy(generate_fn: GenerateFn, problems: Sequence[Problem], *, prefilled_think: bool = False,
                  timeout_s: float = 2.0, batch_size: int | None = None) -> dict[str, float]:
    """Greedy accuracy of ``generate_fn`` on ``problems``: ``accuracy``, ``accuracy_d<level>`` per difficulty,
    ``n`` and ``eval_verify_failures``. ``generate_fn`` gets the problems (in ``batch_size`` slices when given)
    and returns one completion each; decoding is its business (the training stages pass greedy decoding).
    ``prefilled_think``: the prompts ended in ``<think>`` (the completions start inside the reasoning)."""
    problems = list(problems)
    step = batch_size or max(1, len(problems))
    completions: list[str] = []
    for i in range(0, len(problems), step):
        chunk = problems[i:i + step]
        out = list(generate_fn(chunk))
        if len(out) != len(chunk):
            raise ValueError(f"generate_fn returned {len(out)} completions for {len(chunk)} problems")
        completions.extend(out)
    scores, failures = score_problems(completions, problems, prefilled_think=prefilled_think, timeout_s=timeout_s)
    m = level_metrics(scores, problems)
    m["n"] = float(len(problems))
    m["eval_verify_failures"] = float(failures)
    return m
