"""Stop strings with streaming hold-back, and the <think> splitter (whole and streamed)."""

from __future__ import annotations

import random

import pytest

from r1ray.infer.text import ReasoningStream, find_stop, prompt_opens_think, split_reasoning, stop_holdback


def test_stop_holdback_and_find():
    assert stop_holdback("hello wor", ["world"]) == 3
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("ab", ["b!", "abc"]) == 2
    assert find_stop("one two three", ["two", "three"]) == 4
    assert find_stop("one two", ["zzz"]) == -1
    assert find_stop("xxSTOP", ["STOP"], start=4) == 2  # a stop that straddles the emitted boundary


# (reply, finish_reason, prefilled, (reasoning_content, content)): the rules of docs/serve.md, case by case.
CASES = [
    # Closed reasoning: verbatim between the tags, the newline after <think> kept; content verbatim after.
    ("<think>\nabc\n</think>\n\nThe answer.", "stop", False, ("\nabc\n", "\n\nThe answer.")),
    ("<think>abc</think>x", "stop", False, ("abc", "x")),
    ("  <think>a\n\nb\n</think>  y z ", "stop", False, ("a\n\nb\n", "  y z ")),
    ("<think>abc</think>", "stop", False, ("abc", None)),
    ("<think></think>", "stop", False, ("", None)),
    # No reasoning: tags later in the reply are plain text.
    ("no reasoning here", "stop", False, (None, "no reasoning here")),
    ("text then <think>late</think>", "stop", False, (None, "text then <think>late</think>")),
    ("<thin", "stop", False, (None, "<thin")),
    ("", "stop", False, (None, "")),
    # Never closed: cut by max_tokens -> reasoning only; ended otherwise -> it is the answer.
    ("<think>\nunfinished thought\n", "length", False, ("\nunfinished thought\n", None)),
    ("<think>\nthe answer is 5", "stop", False, (None, "\nthe answer is 5")),
    ("<think>the answer is 5", "cancelled", False, (None, "the answer is 5")),
    # The template prefilled <think>: the reply holds only the closing tag (or starts with it).
    ("</think>odd", "stop", False, ("", "odd")),
    ("\n</think>\n\n5", "stop", False, ("", "\n\n5")),
    ("\nweighing it\n</think>\n\n5", "stop", True, ("\nweighing it\n", "\n\n5")),
    ("</think>5", "stop", True, ("", "5")),
    ("still weighing", "length", True, ("still weighing", None)),
    ("just 5", "stop", True, (None, "just 5")),
]
IDS = [f"{c[0][:24]!r}-{c[1]}{'-prefilled' if c[2] else ''}" for c in CASES]


@pytest.mark.parametrize("text,finish,prefilled,expected", CASES, ids=IDS)
def test_split_reasoning(text, finish, prefilled, expected):
    assert split_reasoning(text, finish, prefilled=prefilled) == expected


def test_prompt_opens_think():
    assert prompt_opens_think("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_think("<|im_start|>assistant\n")
    assert not prompt_opens_think("<think>\nold\n</think>\nx<|im_end|>\n<|im_start|>assistant\n")
    assert not prompt_opens_think("<think> already thinking")


def stream_split(pieces: list[str], finish: str, prefilled: bool) -> tuple[str, str]:
    rs = ReasoningStream(prefilled=prefilled)
    out = []
    for k, p in enumerate(pieces):
        out += rs.feed(p, finish if k == len(pieces) - 1 else None)
    assert all(t for _, t in out), out  # no empty deltas
    return "".join(t for f, t in out if f == "reasoning_content"), "".join(t for f, t in out if f == "content")


@pytest.mark.parametrize("text,finish,prefilled,expected", CASES, ids=IDS)
def test_reasoning_stream_matches_whole_text_for_any_split(text, finish, prefilled, expected):
    rng = random.Random(0)
    want_r, want_c = expected
    if want_r is None and want_c and (prefilled or text.lstrip().startswith("<think>")):
        # Never closed and not cut by max_tokens: the deltas went out as reasoning while the reply could still
        # close; the last chunk repeats all of it as content (the answer).
        want_r = want_c
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(max(len(text) - 1, 0), rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream_split(pieces, finish, prefilled) == (want_r or "", want_c or ""), pieces
