"""Written arithmetic a small model can follow: column addition and subtraction, multiplication by partial
products, long division, one line per column or digit, each line a single-digit fact.

With a tokenizer that splits numbers into digits (the data stage's default), every number is a row of digit
tokens and every line below asks the model for one small table fact plus the carry, borrow or remainder of the
line before: the computation generalises to numbers it has never seen, where a one-token-per-number vocabulary
makes each answer a lookup in a table of thousands of facts.

    add_lines(367, 125)
    # ['ones 7+5+0=12, write 2, carry 1',
    #  'tens 6+2+1=9, write 9, carry 0',
    #  'hundreds 3+1+0=4, write 4, carry 0',
    #  '367+125=492']

Columns are named (``ones``, ``tens``, ...) so the model can find the digits a line needs by name; a missing
digit is 0; a final carry gets a column of its own. Two single digits are one fact (``7+5=12``). Expressions
are written without spaces: with the digit-splitting tokenizer a space before a digit is a token of its own.
``check_lines`` re-executes any block of these lines and returns the first wrong one: the tests run it on every
worked solution, so a procedure that skips or miscomputes a step cannot ship.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["PLACES", "add_lines", "check_lines", "div_lines", "mul_lines", "op_lines", "sub_lines"]

PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions", "ten-millions",
          "hundred-millions", "billions", "ten-billions", "hundred-billions", "trillions")
"""Column names, lowest first."""


def _digits(n: int) -> list[int]:
    """Digits of a non-negative integer, lowest first."""
    return [int(c) for c in reversed(str(n))]


def _place(i: int) -> str:
    if i >= len(PLACES):
        raise ValueError(f"numbers past {len(PLACES)} digits have no column name (column {i})")
    return PLACES[i]


def add_lines(a: int, b: int) -> list[str]:
    """Column addition of two non-negative integers, lowest column first, then ``a + b = s``."""
    _check_operands(a, b)
    if a < 10 and b < 10:
        return [f"{a}+{b}={a + b}"]
    da, db = _digits(a), _digits(b)
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        lines.append(f"{_place(i)} {x}+{y}+{carry}={s}, write {s % 10}, carry {s // 10}")
        carry = s // 10
    if carry:
        i = max(len(da), len(db))
        lines.append(f"{_place(i)} 0+0+{carry}={carry}, write {carry}, carry 0")
    lines.append(f"{a}+{b}={a + b}")
    return lines


def sub_lines(a: int, b: int) -> list[str]:
    """Column subtraction ``a - b`` (``a >= b >= 0``) with borrows, lowest column first, then ``a - b = d``."""
    _check_operands(a, b)
    if b > a:
        raise ValueError(f"sub_lines needs a >= b, got {a} - {b}")
    if a < 10:
        return [f"{a}-{b}={a - b}"]
    da, db = _digits(a), _digits(b)
    lines, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        d = x - y - borrow
        if d >= 0:
            lines.append(f"{_place(i)} {x}-{y}-{borrow}={d}, write {d}, borrow 0")
            borrow = 0
        else:
            lines.append(f"{_place(i)} {x}-{y}-{borrow} is below 0, so 1{x}-{y}-{borrow}={d + 10}, write {d + 10}, "
                         "borrow 1")
            borrow = 1
    lines.append(f"{a}-{b}={a - b}")
    return lines


def mul_lines(a: int, b: int) -> list[str]:
    """``a * b``: ``a`` times each digit of ``b`` column by column (a partial product per digit of ``b``, shifted
    by its place), then the partial products added by columns; ``a * b = p`` last. A column is a times-table fact
    and then the carry added (``5*5=25, 25+1=26``): two small facts instead of one of ~900."""
    _check_operands(a, b)
    if a < 10 and b < 10:
        return [f"{a}*{b}={a * b}"]
    if len(str(b)) > 1 and len(str(a)) == 1:
        raise ValueError(f"mul_lines takes the multi-digit number first: write {b}*{a}, not {a}*{b}")
    lines: list[str] = []
    partials: list[int] = []
    for j, m in enumerate(_digits(b)):
        if len(str(b)) > 1:
            lines.append(f"{a}*{m * 10 ** j}:" if j else f"{a}*{m}:")
        if a < 10:
            lines.append(f"{a}*{m}={a * m}")
        else:
            carry = 0
            for i, x in enumerate(_digits(a)):
                s = x * m + carry
                lines.append(f"{_place(i)} {x}*{m}={x * m}, {x * m}+{carry}={s}, write {s % 10}, carry {s // 10}")
                carry = s // 10
            if carry:
                lines.append(f"{_place(len(str(a)))} write {carry}")
        partials.append(a * m * 10 ** j)
        if len(str(b)) > 1:
            lines.append(f"{a}*{m * 10 ** j}={a * m * 10 ** j}")
    total = partials[0]
    for p in partials[1:]:
        lines += add_lines(total, p)
        total += p
    lines.append(f"{a}*{b}={a * b}")
    return lines


def div_lines(a: int, b: int) -> list[str]:
    """Long division ``a / b`` (exact, ``1 <= b <= 99``): bring down one digit of ``a`` at a time, divide, multiply
    back, subtract; ``a / b = q`` last."""
    _check_operands(a, b)
    if b == 0 or a % b:
        raise ValueError(f"div_lines needs an exact division by a positive number, got {a} / {b}")
    if a < 10:
        return [f"{a}/{b}={a // b}"]
    lines, rem = [], 0
    for d in str(a):
        cur = rem * 10 + int(d)
        q = cur // b
        rem = cur - q * b
        lines.append(f"{cur}/{b}={q}, {q}*{b}={q * b}, {cur}-{q * b}={rem}")
    lines.append(f"{a}/{b}={a // b}")
    return lines


_OPS = {"+": add_lines, "-": sub_lines, "*": mul_lines, "/": div_lines}
_VALUE = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def op_lines(a: int, op: str, b: int) -> tuple[list[str], int]:
    """The worked lines of ``a op b`` and its value."""
    if op not in _OPS:
        raise ValueError(f"unknown operation {op!r}; one of {sorted(_OPS)}")
    return _OPS[op](a, b), _VALUE[op](a, b)


def _check_operands(a: int, b: int) -> None:
    if not (isinstance(a, int) and isinstance(b, int)) or a < 0 or b < 0:
        raise ValueError(f"written arithmetic takes non-negative integers, got {a!r} and {b!r}")


# --- Checking: every line re-executed ----------------------------------------------------------------------

# Each line shape whose arithmetic can be re-executed, and what must hold of its numbers (in the order they
# appear; a fact's operator stays a string).
_CHECKS: tuple[tuple[re.Pattern[str], Callable[..., bool]], ...] = (
    (re.compile(r"^(?:[a-z-]+ )?(\d)\+(\d)\+(\d)=(\d+), write (\d), carry (\d)$"),  # a column of an addition
     lambda x, y, c, t, w, c2: x + y + c == t and w == t % 10 and c2 == t // 10),
    (re.compile(r"^(?:[a-z-]+ )?(\d)-(\d)-(\d)=(\d), write (\d), borrow 0$"),  # a subtraction column, no borrow
     lambda x, y, c, t, w: x - y - c == t and w == t),
    (re.compile(r"^(?:[a-z-]+ )?(\d)-(\d)-(\d) is below 0, so 1(\d)-(\d)-(\d)=(\d+), write (\d), borrow 1$"),
     lambda x, y, c, x2, y2, c2, t, w: x - y - c < 0 and (x2, y2, c2) == (x, y, c) and 10 + x - y - c == t and w == t),
    (re.compile(r"^(?:[a-z-]+ )?(\d)\*(\d)=(\d+), (\d+)\+(\d+)=(\d+), write (\d), carry (\d+)$"),  # a product digit
     lambda x, y, p, p2, c, t, w, c2: x * y == p == p2 and p + c == t and w == t % 10 and c2 == t // 10),
    (re.compile(r"^(\d+)/(\d+)=(\d+), (\d+)\*(\d+)=(\d+), (\d+)-(\d+)=(\d+)$"),  # a long-division step
     lambda cur, b, q, q2, b2, p, cur2, p2, r: (q2, b2, cur2, p2) == (q, b, cur, p) and q == cur // b and p == q * b
     and r == cur - p),
    (re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$"),  # a fact a op b = c
     lambda a, op, b, c: (op != "/" or (b and a % b == 0)) and (op != "-" or a >= b) and _VALUE[op](a, b) == c),
)


def check_lines(lines: list[str]) -> str | None:
    """The first line whose arithmetic is wrong (a column, a division step or an ``a op b=c`` result), or None.
    Lines of other shapes (headers, prose) are skipped."""
    for line in lines:
        s = line.strip().rstrip(".")
        for pattern, holds in _CHECKS:
            if m := pattern.match(s):
                if not holds(*(int(g) if g.isdigit() else g for g in m.groups())):
                    return line
                break
    return None
