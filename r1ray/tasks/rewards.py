"""Rule-based rewards (a registry by name) and ``score``: weighted rewards over a batch, time-boxed, never raising.

=============  ==========  =================================================================================
name           range       what it scores
=============  ==========  =================================================================================
accuracy       [0, 1]      the task's own verifier on the full completion (``get_task(problem.task).verify``)
format         {0, 1}      exactly one ``<think>…</think>`` then exactly one ``<answer>…</answer>``, both
                           non-empty, nothing but whitespace around or between them
tag_count      [0, 1]      0.25 for each of the four tags present exactly once (open-r1's partial credit)
length         [-1, 0]     DAPO's overlong penalty: 0 up to ``max - buffer``, then linear down to -1 at
                           ``max``, and -1 beyond (lengths in characters, or tokens when given)
language       [0, 1]      language consistency: the share of letters that are Latin script (ASCII and the
                           Latin-1/Extended blocks) among all letters; 1.0 when there are no letters. This is
                           DeepSeek-R1's "proportion of target-language words" with a script test as the
                           detector: it penalizes drifting into another script (CJK, Cyrillic, ...) in the
                           reasoning, not e.g. English vs French
=============  ==========  =================================================================================

``prefilled_think=True`` is for chat templates that end the prompt with ``<think>``: the completion starts
inside the think block, so ``format`` and ``tag_count`` score it as if ``<think>`` preceded it (and a second
``<think>`` written by the model breaks the format).

``score`` runs every reward on every sample in a sandbox process (``r1ray.tasks.sandbox``) with a per-call
timeout. A call that raises, returns a non-finite number or times out scores 0 for that sample and is
counted in ``ScoreResult.failures[name]``. Bad arguments (unknown reward name, mismatched lengths, a length
reward without a maximum) are the caller's bug and raise ``ValueError`` before any work.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from r1ray.model.tokenizer import ANSWER, END_ANSWER, END_THINK, THINK
from r1ray.tasks.base import Problem

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "OVERLONG_BUFFER_FRACTION",
    "REWARDS",
    "RewardContext",
    "RewardFn",
    "ScoreResult",
    "get_reward",
    "list_rewards",
    "run_reward",
    "score",
]

DEFAULT_TIMEOUT_S = 2.0
OVERLONG_BUFFER_FRACTION = 0.2
"""Default overlong buffer as a share of the maximum length (DAPO: 4096 of 20480 tokens)."""


@dataclass(frozen=True)
class RewardContext:
    """What a reward may need besides the completion and the problem."""

    prefilled_think: bool = False
    length: int | None = None
    """This completion's length in the unit of ``max_length`` (characters when ``score`` measures it)."""
    max_length: int | None = None
    overlong_buffer: int | None = None


RewardFn = Callable[[str, Problem, RewardContext], float]


def accuracy_reward(completion: str, problem: Problem, ctx: RewardContext) -> float:
    from r1ray.tasks.registry import task_for_verify

    return float(task_for_verify(problem.task).verify(completion, problem))


def _with_prefill(completion: str, ctx: RewardContext) -> str:
    return THINK + completion if ctx.prefilled_think else completion


def format_reward(completion: str, problem: Problem, ctx: RewardContext) -> float:
    # Structural checks with str.find/count (linear) rather than a regex with lazy groups, which backtracks
    # quadratically on long completions full of unterminated tags.
    text = _with_prefill(completion, ctx).strip()
    if any(text.count(tag) != 1 for tag in (THINK, END_THINK, ANSWER, END_ANSWER)):
        return 0.0
    if not (text.startswith(THINK) and text.endswith(END_ANSWER)):
        return 0.0
    end_think, answer = text.find(END_THINK), text.find(ANSWER)
    if answer < end_think or text[end_think + len(END_THINK) : answer].strip():
        return 0.0
    think_body = text[len(THINK) : end_think]
    answer_body = text[answer + len(ANSWER) : -len(END_ANSWER)]
    return 1.0 if think_body.strip() and answer_body.strip() else 0.0


def tag_count_reward(completion: str, problem: Problem, ctx: RewardContext) -> float:
    text = _with_prefill(completion, ctx)
    return sum(0.25 for tag in (THINK, END_THINK, ANSWER, END_ANSWER) if text.count(tag) == 1)


def length_reward(completion: str, problem: Problem, ctx: RewardContext) -> float:
    if ctx.max_length is None:
        raise ValueError("the length reward needs a maximum length")
    n = len(completion) if ctx.length is None else ctx.length
    buffer = ctx.overlong_buffer if ctx.overlong_buffer is not None else int(ctx.max_length * OVERLONG_BUFFER_FRACTION)
    expected = ctx.max_length - buffer
    if n <= expected:
        return 0.0
    if n > ctx.max_length:
        return -1.0
    return (expected - n) / buffer


# Letters = word characters that are neither digits nor underscore; Latin = ASCII letters plus the Latin-1
# Supplement and Latin Extended-A/B letters (U+00C0-U+024F, minus the two math signs) and Latin Extended
# Additional (U+1E00-U+1EFF).
_LETTER = re.compile(r"[^\W\d_]")
_LATIN = re.compile(r"[A-Za-z\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u024F\u1E00-\u1EFF]")


def language_reward(completion: str, problem: Problem, ctx: RewardContext) -> float:
    if completion.isascii():  # every letter is Latin (the common case, and 1 MB of it costs microseconds)
        return 1.0
    letters = _LETTER.subn("", completion)[1]
    if letters == 0:
        return 1.0
    return _LATIN.subn("", completion)[1] / letters


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "length": length_reward,
    "language": language_reward,
}


def list_rewards() -> list[str]:
    return sorted(REWARDS)


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(list_rewards())}")
    return REWARDS[name]


def run_reward(name: str, completion: Any, problem: Any, ctx: RewardContext) -> float | None:
    """One reward on one sample: its value, or None when it raised or gave a non-number (never raises)."""
    try:
        if not isinstance(completion, str):
            return None
        if isinstance(problem, dict):
            problem = Problem.from_dict(problem)
        value = float(REWARDS[name](completion, problem, ctx))
        return value if math.isfinite(value) else None
    except Exception:  # noqa: BLE001 - hostile input: any error is a counted failure, by design
        return None


@dataclass
class ScoreResult:
    total: list[float]
    """Per sample: the weighted sum of its rewards (a failed reward counts 0)."""
    per_reward: dict[str, list[float]]
    """Per reward name (those with a weight, even 0): its value on each sample (0 where it failed)."""
    failures: dict[str, int] = field(default_factory=dict)
    """Per reward name: samples on which it raised, returned a non-number or timed out."""
    seconds: float = 0.0


def score(
    completions: Sequence[str],
    problems: Sequence[Problem | dict],
    weights: dict[str, float],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    prefilled_think: bool = False,
    max_completion_chars: int | None = None,
    max_completion_tokens: int | None = None,
    completion_tokens: Sequence[int] | None = None,
    overlong_buffer: int | None = None,
    sandbox=None,
) -> ScoreResult:
    """Weighted rewards of ``completions`` against ``problems`` (``Problem`` or its ``to_dict``).

    The length reward measures characters against ``max_completion_chars``, or, when the caller has token
    counts, ``completion_tokens`` against ``max_completion_tokens``; ``overlong_buffer`` is in the same unit
    (default ``OVERLONG_BUFFER_FRACTION`` of the maximum). ``sandbox`` defaults to this process's shared one.
    """
    t0 = time.perf_counter()
    for name, w in weights.items():
        get_reward(name)
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"score: weight of {name!r} must be a finite number, got {w!r}")
    if len(completions) != len(problems):
        raise ValueError(f"score: {len(completions)} completions but {len(problems)} problems")
    if "length" in weights:
        if (max_completion_chars is None) == (max_completion_tokens is None):
            raise ValueError("score: the length reward needs exactly one of max_completion_chars or "
                             "max_completion_tokens")
        if max_completion_tokens is not None and (completion_tokens is None
                                                  or len(completion_tokens) != len(completions)):
            raise ValueError("score: max_completion_tokens needs completion_tokens, one count per completion")
    max_length = max_completion_tokens if max_completion_tokens is not None else max_completion_chars
    if max_length is not None and max_length <= 0:
        raise ValueError(f"score: the maximum completion length must be positive, got {max_length}")
    if overlong_buffer is not None and not (max_length is None or 0 < overlong_buffer <= max_length):
        raise ValueError(f"score: overlong_buffer must be in (0, {max_length}], got {overlong_buffer}")

    names = list(weights)
    items = []
    for i, (c, p) in enumerate(zip(completions, problems, strict=True)):
        length = completion_tokens[i] if max_completion_tokens is not None else None
        items.append((c, p, RewardContext(prefilled_think, length, max_length, overlong_buffer)))
    if sandbox is None:
        from r1ray.tasks.sandbox import default_sandbox

        sandbox = default_sandbox()
    values = sandbox.run(items, names, timeout_s) if items and names else [[] for _ in items]

    per_reward = {name: [0.0] * len(items) for name in names}
    failures = {name: 0 for name in names}
    total = [0.0] * len(items)
    for i, row in enumerate(values):
        for name, v in zip(names, row, strict=True):
            if v is None:
                failures[name] += 1
                continue
            per_reward[name][i] = v
            total[i] += weights[name] * v
    return ScoreResult(total, per_reward, failures, time.perf_counter() - t0)
