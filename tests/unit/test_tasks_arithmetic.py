"""The R1-style reasoning generator: deterministic, arithmetically right, and the rule-based rewards."""

from __future__ import annotations

import re

from r1ray.tasks.arithmetic import extract_answer, format_reward, generate, generate_many, reward
from r1ray.tasks.procedures import check_lines


def test_deterministic_from_seed_and_index():
    assert generate(0, 5) == generate(0, 5)
    assert generate(0, 5) != generate(1, 5)
    assert [s.index for s in generate_many(3, 4, start=10)] == [10, 11, 12, 13]
    assert len({generate(0, i).problem for i in range(200)}) > 190


def test_every_step_is_correct_arithmetic_and_the_answer_follows():
    for s in generate_many(0, 500):
        lines = s.solution.split("\n")
        assert check_lines(lines) is None, s.solution
        results = [re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", line) for line in lines]
        results = [m for m in results if m]
        assert results, s.solution
        assert int(results[-1].group(4)) == s.answer and lines[-1] == f"So the answer is {s.answer}."
        assert s.answer >= 0
        assert s.text.startswith("Question: ") and s.text.endswith(f"<answer>{s.answer}</answer>")
        assert "<think>\n" in s.completion and "\n</think>\n" in s.completion


def test_rewards():
    s = generate(0, 1)
    assert reward(s.completion, s.answer) == 1.0 and format_reward(s.completion) == 1.0
    assert reward(f"<think>x</think><answer> {s.answer:,} </answer>", s.answer) == 1.0
    assert reward(f"<think>x</think><answer>{s.answer + 1}</answer>", s.answer) == 0.0
    assert reward("the answer is 3", 3) == 0.0 and format_reward("the answer is 3") == 0.0
    assert reward("<answer>1</answer> then <answer>3</answer>", 3) == 1.0  # the last answer counts
    assert reward("<answer>3.5</answer>", 3) == 0.0
    assert extract_answer("<answer>\n 42\n</answer>") == "42"
    assert format_reward("<answer>3</answer>") == 0.0
