"""Numeric answer equivalence: an exact fast path for plain numbers, then ``math-verify`` for LaTeX and the rest.

The fast path (integers, decimals, ``a/b``, ``\\frac{a}{b}``, an optional ``\\boxed{}``/``$...$`` wrapper,
thousands separators) compares exact fractions and covers almost every answer our tasks produce, in
microseconds. Anything else (``\\dfrac34``, ``x = 12``, ``\\sqrt{4}``, ...) goes to math-verify (HF's answer
equivalence library, sympy-based), imported lazily.

math-verify's own timeouts use ``signal.alarm``, which raises outside the main thread (a Ray worker thread),
and no signal can interrupt one long C call such as sympy's ``10**(10**10)``. So math-verify runs here with its
timeouts OFF, and the caller bounds the time: rewards run in a child process killed on timeout
(``r1ray.tasks.sandbox``).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["MAX_ANSWER_CHARS", "answers_match", "parse_number", "warm_up"]

MAX_ANSWER_CHARS = 1000
"""A predicted answer longer than this never matches: no gold answer is that long, and it bounds the work."""

_WRAPPERS = (re.compile(r"^\\boxed\{(.*)\}$", re.S), re.compile(r"^\$+(.*?)\$+$", re.S),
             re.compile(r"^\\\((.*)\\\)$", re.S), re.compile(r"^\\\[(.*)\\\]$", re.S))
_FRAC = re.compile(r"^(-?)\\d?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}$")
_PLAIN = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(\s*/\s*[-+]?\d+)?$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(\D|$))")


def parse_number(text: str) -> Fraction | None:
    """An exact value for a plainly written number, else None. Never raises."""
    s = text.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return None
    for _ in range(3):  # peel nested wrappers: $\boxed{3}$
        for w in _WRAPPERS:
            m = w.match(s)
            if m:
                s = m.group(1).strip()
    s = _THOUSANDS.sub("", s).rstrip(".").strip()
    m = _FRAC.match(s)
    try:
        if m:
            num, den = int(m.group(2)), int(m.group(3))
            return -Fraction(num, den) if m.group(1) else Fraction(num, den)
        if _PLAIN.match(s):
            return Fraction(s.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _math_verify_match(pred: str, gold: str) -> bool:
    import math_verify
    from math_verify import grader, parser

    # We bound time ourselves (see the module docstring); silence its one-time "timeout disabled" warning.
    grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True
    gold_parsed = math_verify.parse(f"${gold}$", parsing_timeout=None)
    # The text is already the answer (from <answer>); math-verify finds LaTeX only between delimiters.
    pred_parsed = math_verify.parse(pred if "$" in pred else f"${pred}$", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None))


def warm_up() -> None:
    """Import math-verify and compile its lazily built regexes now, so no sample pays for it under a timeout."""
    try:
        _math_verify_match("\\frac{1}{2}", "1/2")
    except ImportError:  # optional: the fast path still works without it
        pass


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether ``pred`` states the same value as ``gold`` (exact for plain numbers, math-verify otherwise)."""
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return False
    g, p = parse_number(gold), parse_number(pred)
    if g is not None and p is not None:
        return g == p
    if g is not None and not any(ch.isdigit() for ch in pred):
        # Nothing numeric to compare with a numeric gold; sympy can spend a second on a word like "nope"
        # (read as the product n*o*p*e), and early GRPO policies write many such words.
        return False
    return _math_verify_match(pred, gold)
