"""Written arithmetic (r1ray.tasks.procedures) and the worked solutions built from it: every line right, every
answer accepted by the task's own verifier, on 10,000 random problems per level; the checker catches a wrong line."""

from __future__ import annotations

import random
import re
import textwrap

import pytest

from r1ray.tasks.arithmetic import ArithmeticTask, generate_many
from r1ray.tasks.procedures import add_lines, check_lines, div_lines, mul_lines, op_lines, sub_lines


def worked(text: str) -> list[str]:
    """A worked solution written as it reads, one line per line."""
    return textwrap.dedent(text).strip().splitlines()


def test_column_addition_by_hand():
    assert add_lines(367, 125) == worked("""
        ones 7+5+0=12, write 2, carry 1
        tens 6+2+1=9, write 9, carry 0
        hundreds 3+1+0=4, write 4, carry 0
        367+125=492
    """)
    # a final carry gets a column of its own; a missing digit is 0
    assert add_lines(95, 7) == worked("""
        ones 5+7+0=12, write 2, carry 1
        tens 9+0+1=10, write 0, carry 1
        hundreds 0+0+1=1, write 1, carry 0
        95+7=102
    """)
    assert add_lines(3, 4) == ["3+4=7"]


def test_column_subtraction_borrows_by_hand():
    assert sub_lines(402, 158) == worked("""
        ones 2-8-0 is below 0, so 12-8-0=4, write 4, borrow 1
        tens 0-5-1 is below 0, so 10-5-1=4, write 4, borrow 1
        hundreds 4-1-1=2, write 2, borrow 0
        402-158=244
    """)
    with pytest.raises(ValueError, match="a >= b"):
        sub_lines(3, 5)


def test_partial_products_and_long_division_by_hand():
    assert mul_lines(47, 8) == worked("""
        ones 7*8=56, 56+0=56, write 6, carry 5
        tens 4*8=32, 32+5=37, write 7, carry 3
        hundreds write 3
        47*8=376
    """)
    lines = mul_lines(47, 23)  # a partial product per digit of 23, then their column sum
    assert "47*3=141" in lines and "47*20=940" in lines and "141+940=1081" in lines
    assert lines[-1] == "47*23=1081" and check_lines(lines) is None
    assert div_lines(376, 8) == worked("""
        3/8=0, 0*8=0, 3-0=3
        37/8=4, 4*8=32, 37-32=5
        56/8=7, 7*8=56, 56-56=0
        376/8=47
    """)
    with pytest.raises(ValueError, match="exact division"):
        div_lines(10, 3)


def test_random_operations_are_right_line_by_line():
    r = random.Random(0)
    for _ in range(3000):
        a, b = r.randint(0, 99_999), r.randint(0, 99_999)
        for op, (x, y) in {"+": (a, b), "-": (max(a, b), min(a, b)), "*": (max(a, b), r.randint(0, 99)),
                           "/": (a * r.randint(1, 9) + 0, 0)}.items():
            if op == "/":
                d = r.randint(1, 9)
                x, y = r.randint(0, 9999) * d, d
            lines, value = op_lines(x, op, y)
            assert check_lines(lines) is None, lines
            assert lines[-1] == f"{x}{op}{y}={value}"


@pytest.mark.parametrize("bad", [
    "ones 7+5+0=12, write 2, carry 0",                          # wrong carry
    "tens 6-2-0=3, write 3, borrow 0",                          # wrong difference
    "ones 2-8-0 is below 0, so 12-8-0=5, write 5, borrow 1",
    "ones 7*8=56, 56+0=56, write 5, carry 6",
    "tens 4*8=32, 32+5=36, write 6, carry 3",
    "37/8=4, 4*8=32, 37-32=6",
    "47*8=377",
    "10/3=3",                                                   # not exact
])
def test_checker_catches_a_wrong_line(bad):
    assert check_lines(["some prose", bad]) == bad


@pytest.mark.parametrize("level", [1, 2, 3])
def test_ten_thousand_worked_solutions_per_level_are_right_and_verified(level):
    """Every line of every worked solution re-executed, and the task's own verifier accepts the completion."""
    task = ArithmeticTask()
    templates = set()
    for i in range(10_000):
        split = "eval" if i % 10 == 0 else "train"
        p = task.problem(i, seed=i % 3, split=split, difficulty=level)
        lines = p.solution.split("\n")
        assert check_lines(lines) is None, p.solution
        assert lines[-1] == f"So the answer is {p.answer}."
        assert task.verify(p.completion, p) == 1.0
        assert p.meta["steps"] == {1: 1, 2: 2}.get(level, p.meta["steps"]) and 1 <= p.meta["steps"] <= 4
        templates.add(p.meta["template"])
    assert len(templates) == {1: 1, 2: 1, 3: 2}[level]


def test_levels_count_their_operations_and_the_corpus_holds_every_level():
    task = ArithmeticTask()
    steps = {lv: {task.problem(i, seed=0, difficulty=lv).meta["steps"] for i in range(400)} for lv in (1, 2, 3)}
    assert steps == {1: {1}, 2: {2}, 3: {3, 4}}
    named = re.compile(r"^.+: \d+[-+*/]\d+$", re.M)
    counts = [len(named.findall(s.solution)) for s in generate_many(0, 600)]
    assert all(check_lines(s.solution.split("\n")) is None for s in generate_many(0, 600))
    assert {c for c in counts[0::3]} == {1} and {c for c in counts[1::3]} == {2} and {c for c in counts[2::3]} == {3, 4}


@pytest.mark.parametrize("name", ["countdown", "knights_knaves"])
def test_ten_thousand_worked_solutions_per_level_of_the_other_tasks_are_verified(name):
    """Countdown's construction (each operation worked in writing) and knights' case analysis: the task's own
    verifier accepts every worked solution, and every written computation in it is right."""
    from r1ray.tasks.registry import get_task

    task = get_task(name)
    for level in task.difficulties:
        for i in range(10_000):
            p = task.problem(i, seed=i % 3, split="eval" if i % 10 == 0 else "train", difficulty=level)
            assert task.verify(p.completion, p) == 1.0, p.solution
            if name == "countdown":
                assert check_lines(p.solution.split("\n")) is None, p.solution


def test_the_longest_worked_solution_fits_the_default_completion_cap(tmp_path):
    """Every stage that generates answers stops at ``MAX_COMPLETION_TOKENS`` by default: a cap below the longest
    worked solution scores a correct answer 0 (320 tokens cut half of the four-operation stories). Measured with a
    digit-splitting BPE trained like the data stage's, on the task's own documents (merges at least as good as
    the default corpus's, so its count is a lower bound: the constant keeps a margin above it)."""
    from r1ray.model.tokenizer import train_tokenizer
    from r1ray.tasks.base import MAX_COMPLETION_TOKENS

    tok = train_tokenizer((d.text for d in generate_many(0, 6000, chat_fraction=0.5)), tmp_path, vocab_size=2048)
    task = ArithmeticTask()
    longest = {lv: max(len(tok(task.problem(i, seed=0, split="eval" if i % 10 == 0 else "train",
                                            difficulty=lv).completion + "<|im_end|>")["input_ids"])
                       for i in range(10_000 if lv == 3 else 1000)) for lv in (1, 2, 3)}
    assert longest[1] < longest[2] < longest[3] <= MAX_COMPLETION_TOKENS, longest
    assert longest[3] > 320, longest  # the old cap: four-operation stories pass it
    assert MAX_COMPLETION_TOKENS - longest[3] <= 64, longest  # a margin, not a blank cheque for rambling
