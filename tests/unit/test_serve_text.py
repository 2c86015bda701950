"""Stop strings with streaming hold-back, and the <think> splitter (whole and streamed)."""

from __future__ import annotations

import random

import pytest

from r1ray.infer.text import ReasoningStream, find_stop, split_reasoning, stop_holdback


def test_stop_holdback_and_find():
    assert stop_holdback("hello wor", ["world"]) == 3
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("ab", ["b!", "abc"]) == 2
    assert find_stop("one two three", ["two", "three"]) == 4
    assert find_stop("one two", ["zzz"]) == -1
    assert find_stop("xxSTOP", ["STOP"], start=4) == 2  # a stop that straddles the emitted boundary


@pytest.mark.parametrize("text,expected", [
    ("<think>\nabc\n</think>\nThe answer.", ("abc", "The answer.")),
    ("<think>abc</think>x", ("abc", "x")),
    ("  <think>a\n\nb\n</think>  y z ", ("a\n\nb", "y z ")),
    ("no reasoning here", (None, "no reasoning here")),
    ("text then <think>late</think>", (None, "text then <think>late</think>")),
    ("<think>\nunfinished thought", ("unfinished thought", "")),
])
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


@pytest.mark.parametrize("text", [
    "<think>\nabc\n</think>\nThe answer.",
    "<think>abc</think>x",
    "  <think>a\n\nb\n</think>  y z ",
    "no reasoning here",
    "<think>\nunfinished thought\n",
    "<thin",
    "<think></think>",
    "</think>odd",
])
def test_reasoning_stream_matches_whole_text_for_any_split(text):
    rng = random.Random(0)
    want_r, want_c = split_reasoning(text)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        rs = ReasoningStream()
        out = []
        for k, p in enumerate(pieces):
            out += rs.feed(p, final=k == len(pieces) - 1)
        got_r = "".join(t for f, t in out if f == "reasoning_content")
        got_c = "".join(t for f, t in out if f == "content")
        assert got_r == (want_r or ""), pieces
        assert got_c == want_c, pieces
