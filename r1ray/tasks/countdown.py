"""Countdown: reach a target from given numbers with + - * /, each number used at most once.

Every instance is solvable by construction: the generator combines the numbers pairwise with random
operations (keeping every intermediate a positive integer) and the result is the target, so the building
steps are the worked solution (each operation worked in writing, ``r1ray.tasks.procedures``) and the built
expression a gold answer. (TinyZero downloads its set, and its
spare generator can emit unsolvable targets; reasoning-gym's scorer runs sympy's ``parse_expr``, an ``eval``,
on the model's text.)

The verifier parses the answer with ``ast`` and evaluates only number literals and ``+ - * /`` (exact
fractions, no ``eval``), then checks that the literals are a sub-multiset of the given numbers. Size limits
keep hostile answers cheap: at most ``MAX_EXPR_CHARS`` characters, literals of at most ``MAX_LITERAL_DIGITS``
digits. ``"expr = target"`` is accepted when the right side is the target.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction

from r1ray.tasks import base
from r1ray.tasks.procedures import op_lines

__all__ = ["LEVELS", "CountdownTask", "evaluate", "format_expr"]

LEVELS: dict[int, tuple[int, int]] = {1: (3, 25), 2: (4, 50), 3: (5, 100)}
"""Difficulty -> (how many numbers, largest number). Targets stay within ``[1, MAX_TARGET]``."""
MAX_TARGET = 1000
MAX_EXPR_CHARS = 200
MAX_LITERAL_DIGITS = 6

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def format_expr(node) -> str:
    """An expression tree (int leaves, ``(op, left, right)`` nodes) with only the parentheses it needs."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    ls, rs = format_expr(left), format_expr(right)
    if not isinstance(left, int) and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    if not isinstance(right, int) and (_PREC[right[0]] < _PREC[op] or (_PREC[right[0]] == _PREC[op] and op in "-/")):
        rs = f"({rs})"
    return f"{ls} {op} {rs}"


def _combine(r: random.Random, a: int, b: int) -> tuple[str, int, int, int] | None:
    """A random operation on ``a`` and ``b`` (in either order) keeping the result a positive integer."""
    choices = [("+", a, b), ("*", a, b)]
    if a != b:
        hi, lo = max(a, b), min(a, b)
        choices.append(("-", hi, lo))
        if lo > 1 and hi % lo == 0:
            choices += [("/", hi, lo)] * 2  # rarer to be possible, so weighted up
    op, x, y = r.choice(choices)
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
    return op, x, y, value


def _build(r: random.Random, count: int, largest: int):
    for _ in range(1000):
        numbers = [r.randint(1, largest) for _ in range(count)]
        items = [(n, n) for n in numbers]  # (tree, value)
        steps = []
        while len(items) > 1:
            i, j = r.sample(range(len(items)), 2)
            (ta, a), (tb, b) = items[i], items[j]
            op, x, y, value = _combine(r, a, b)
            tx, ty = (ta, tb) if x == a and y == b else (tb, ta)
            items = [it for k, it in enumerate(items) if k not in (i, j)] + [((op, tx, ty), value)]
            rest = ", ".join(str(v) for _, v in items)
            lines, _ = op_lines(x, op, y) if op != "*" or x >= y else op_lines(y, op, x)
            steps += [f"Take {x}{op}{y}:", *lines, f"Remaining: {rest}."]
        tree, target = items[0]
        if 1 <= target <= MAX_TARGET and target not in numbers:
            return sorted(numbers), target, tree, steps
    raise RuntimeError(f"countdown: no target in [1, {MAX_TARGET}] from {count} numbers up to {largest}")


class CountdownTask:
    name = "countdown"
    difficulties = tuple(LEVELS)

    def problem(self, index: int, *, seed: int, split: str = "train", difficulty: int = 1) -> base.Problem:
        base.check_args(self.name, self.difficulties, index, split, difficulty)
        count, largest = LEVELS[difficulty]

        def make(r: random.Random):
            numbers, target, tree, steps = _build(r, count, largest)
            answer = format_expr(tree)
            nums = ", ".join(map(str, numbers))
            question = (
                f"Using the numbers {nums}, write an arithmetic expression that equals {target}. "
                "You may use + - * / and parentheses, and each number at most once."
            )
            solution = "\n".join([f"Numbers: {nums}. Target: {target}.", *steps, f"So {answer} = {target}."])
            return question, answer, solution, {"numbers": numbers, "target": target}

        return base.first_in_split(self.name, make, index=index, seed=seed, split=split, difficulty=difficulty)

    def verify(self, completion: str, problem: base.Problem) -> float:
        got = base.extract_answer(completion)
        if got is None:
            return 0.0
        return 1.0 if check(got, problem.meta["numbers"], problem.meta["target"]) else 0.0


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value and number literals of an expression of ints and ``+ - * /``; ValueError otherwise."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError) as e:
        raise ValueError(f"not an expression: {e}") from None
    literals: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if node.value < 0 or len(str(node.value)) > MAX_LITERAL_DIGITS:
                raise ValueError("number literal out of range")
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            a, b = ev(node.left), ev(node.right)
            op = _AST_OPS[type(node.op)]
            if op == "/":
                if b == 0:
                    raise ValueError("division by zero")
                return a / b
            return a + b if op == "+" else a - b if op == "-" else a * b
        raise ValueError(f"{type(node).__name__} is not allowed (only numbers and + - * /)")

    return ev(tree.body), literals


def check(answer: str, numbers: list[int], target: int) -> bool:
    """Whether ``answer`` (optionally ``"expr = target"``) reaches ``target`` using each number at most once."""
    expr = answer
    if "=" in answer:
        expr, _, rhs = answer.partition("=")
        if rhs.strip() != str(target):
            return False
    try:
        value, used = evaluate(expr)
    except (ValueError, RecursionError):
        return False
    return value == target and not (Counter(used) - Counter(numbers))
