"""Task accuracy (greedy, pass@k, maj@k, per level), shared by the evaluation job, the training stages' in-loop
evaluation and the benchmarks.

A generation function is any callable ``problems -> completions`` (the caller renders prompts the way its
model expects: a chat template, a prefilled ``<think>``, the pretraining layout), so the SFT stage's HF
``generate``, GRPO's engine pool, the evaluation job's Ray Data pipeline and a test's lambda all score the
same way::

    from r1ray.tasks.accuracy import task_accuracy
    m = task_accuracy(lambda ps: [p.completion for p in ps], problems)   # {"accuracy": 1.0, "accuracy_d1": ...}

Completions are verified by each task's verifier in the reward sandbox (``r1ray.tasks.rewards.score``:
time-boxed, never raising; failures counted in ``eval_verify_failures``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from r1ray.tasks.base import Problem, extract_answer
from r1ray.tasks.rewards import DEFAULT_TIMEOUT_S

__all__ = [
    "NO_THINK_MAX_TOKENS",
    "PROMPT_FORMATS",
    "GenerateFn",
    "answer_key",
    "level_metrics",
    "maj_at_k",
    "pass_at_k",
    "render_prompt",
    "score_no_think",
    "score_problems",
    "score_samples",
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
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[float], int]:
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


def score_no_think(completions: Sequence[str], problems: Sequence[Problem], *, timeout_s: float = DEFAULT_TIMEOUT_S
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
                  timeout_s: float = DEFAULT_TIMEOUT_S, batch_size: int | None = None) -> dict[str, float]:
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. 2021 (Codex): ``1 - C(n-c, k) / C(n, k)``, the chance that
    at least one of ``k`` samples drawn without replacement from ``n`` samples, ``c`` of them correct, is
    correct. Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (the paper's numerically stable form: no huge
    binomials)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise ValueError(f"pass_at_k: n, c and k must be integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def maj_at_k(answers: Sequence[str | None], scores: Sequence[float], k: int) -> float:
    """maj@k (self-consistency): the score of the most frequent answer among the first ``k`` samples.

    ``answers[i]`` is sample i's extracted answer in a canonical form (equal strings = the same answer; None =
    no answer, which does not vote) and ``scores[i]`` its score. Ties go to the answer that appeared first;
    no answer at all scores 0."""
    if len(answers) != len(scores):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(scores)} scores")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k needs 1 <= k <= {len(answers)} samples, got k={k}")
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers[:k]):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return 0.0
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return float(scores[first[best]])


def score_samples(texts: Sequence[str], problems: Sequence[Problem], samples: int, ks: Sequence[int], *,
                  prefilled_think: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S
                  ) -> tuple[dict[str, list[float]], list[float], int]:
    """Per-item task accuracy of one greedy completion and ``samples`` sampled ones per problem: ``texts`` holds
    the greedy completions of ``problems`` first, then each round of samples in the same order. Returns
    ``({"accuracy": greedy, "pass@k": ..., "maj@k": ...}, every completion's score, verifier failures)``;
    ``level_metrics`` makes per-level means of any of them."""
    n = len(problems)
    if len(texts) != n * (1 + samples):
        raise ValueError(f"{len(texts)} completions for {n} problems with {samples} samples each (+1 greedy)")
    scores, failures = score_problems(texts, list(problems) * (1 + samples), prefilled_think=prefilled_think,
                                      timeout_s=timeout_s)
    drawn = [[scores[n * (1 + j) + i] for j in range(samples)] for i in range(n)]
    keys = [[answer_key(texts[n * (1 + j) + i]) for j in range(samples)] for i in range(n)]
    per_item: dict[str, list[float]] = {"accuracy": scores[:n]}
    for k in ks if samples else []:
        per_item[f"pass@{k}"] = [pass_at_k(samples, int(round(sum(s))), k) for s in drawn]
        per_item[f"maj@{k}"] = [maj_at_k(keys[i], drawn[i], k) for i in range(n)]
    return per_item, scores, failures
