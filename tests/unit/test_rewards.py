"""Rewards: exact values on crafted completions; score() never raises, times out hostile input, counts failures."""

from __future__ import annotations

import math
import time

import pytest

from r1ray.tasks.registry import get_task
from r1ray.tasks.rewards import (
    REWARDS,
    RewardContext,
    format_reward,
    get_reward,
    language_reward,
    length_reward,
    list_rewards,
    score,
    tag_count_reward,
)
from r1ray.tasks.sandbox import Sandbox

CTX = RewardContext()
PRE = RewardContext(prefilled_think=True)
ALL = {"accuracy": 1.0, "format": 0.5, "tag_count": 0.25, "length": 1.0, "language": 0.1}


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()


@pytest.fixture(scope="module")
def problems():
    mix = [("arithmetic", 1), ("countdown", 2), ("knights_knaves", 1)]
    return [get_task(name).problem(i, seed=0, difficulty=d) for i in range(4) for name, d in mix]


def test_registry():
    assert list_rewards() == ["accuracy", "format", "language", "length", "tag_count"]
    assert get_reward("format") is REWARDS["format"]
    with pytest.raises(ValueError, match="unknown reward 'fmt'.*accuracy"):
        get_reward("fmt")


def test_format_reward(problems):
    p = problems[0]
    good = p.completion
    assert format_reward(good, p, CTX) == 1.0
    assert format_reward("  <think>a</think>\n\n<answer>1</answer>\n", p, CTX) == 1.0
    bad = [
        "<think>a</think>",  # no answer
        "<answer>1</answer>",  # no think
        "<think>a</think><answer>1</answer> and more",  # text after the answer
        "so: <think>a</think><answer>1</answer>",  # text before the think
        "<think>a</think> hmm <answer>1</answer>",  # text between
        "<think>a</think><answer>1</answer><answer>2</answer>",  # two answers
        "<think>a<think>b</think><answer>1</answer>",  # nested think
        "<think> </think><answer>1</answer>",  # empty think
        "<think>a</think><answer> </answer>",  # empty answer
        "<answer>1</answer><think>a</think>",  # wrong order
        "<think>a</think><answer>1",  # unterminated
    ]
    for c in bad:
        assert format_reward(c, p, CTX) == 0.0, c


def test_format_reward_with_a_prefilled_think(problems):
    p = problems[0]
    inside = p.completion.removeprefix("<think>")  # the chat template already wrote <think>
    assert format_reward(inside, p, PRE) == 1.0
    assert format_reward(inside, p, CTX) == 0.0
    assert format_reward(p.completion, p, PRE) == 0.0  # a second <think> breaks the layout
    assert tag_count_reward(inside, p, PRE) == 1.0 and tag_count_reward(inside, p, CTX) == 0.75
    r = score([inside, p.completion], [p, p], {"format": 1.0}, prefilled_think=True)
    assert r.per_reward["format"] == [1.0, 0.0]


def test_tag_count_reward(problems):
    p = problems[0]
    assert tag_count_reward(p.completion, p, CTX) == 1.0
    assert tag_count_reward("<think>a</think><answer>1", p, CTX) == 0.75
    assert tag_count_reward("<think>a</think></think><answer>1</answer>", p, CTX) == 0.75
    assert tag_count_reward("no tags", p, CTX) == 0.0


def test_length_reward_is_dapo_overlong_penalty(problems):
    p = problems[0]

    def at(n, max_len=100, buffer=20):
        return length_reward("x" * n, p, RewardContext(max_length=max_len, overlong_buffer=buffer))

    assert at(0) == at(80) == 0.0
    assert at(90) == pytest.approx(-0.5) and at(100) == pytest.approx(-1.0) and at(85) == pytest.approx(-0.25)
    assert at(101) == -1.0 and at(10_000) == -1.0
    # default buffer: 20% of the maximum; lengths may come in tokens
    assert length_reward("x", p, RewardContext(max_length=100, length=90)) == pytest.approx(-0.5)
    r = score(["a", "b"], [p, p], {"length": 1.0}, max_completion_tokens=100, completion_tokens=[10, 95])
    assert r.per_reward["length"] == [0.0, pytest.approx(-0.75)]
    with pytest.raises(ValueError, match="exactly one of max_completion_chars or max_completion_tokens"):
        score(["a"], [p], {"length": 1.0})


def test_language_reward(problems):
    p = problems[0]
    assert language_reward(p.completion, p, CTX) == 1.0
    assert language_reward("Ça déjà vu, naïve café", p, CTX) == 1.0  # Latin with diacritics
    assert language_reward("abcd" + "数学问题", p, CTX) == pytest.approx(0.5)
    assert language_reward("Думаю so", p, CTX) == pytest.approx(2 / 7)
    assert language_reward("1 + 2 = 3 <think></think>" + "数" * 0, p, CTX) == 1.0
    assert language_reward("123 ！？", p, CTX) == 1.0  # no letters at all


def test_accuracy_through_score_on_every_task(problems, sandbox):
    completions = [p.completion for p in problems]
    r = score(completions, problems, ALL, max_completion_chars=5000, sandbox=sandbox)
    assert r.per_reward["accuracy"] == [1.0] * len(problems)
    assert r.per_reward["format"] == [1.0] * len(problems)
    assert r.failures == dict.fromkeys(ALL, 0)
    assert r.total == [pytest.approx(1.0 + 0.5 + 0.25 + 0.0 + 0.1)] * len(problems)
    wrong = [c.replace(p.answer, "0 + 0") for c, p in zip(completions, problems, strict=True)]
    r = score(wrong, problems, {"accuracy": 1.0}, sandbox=sandbox)
    assert r.per_reward["accuracy"] == [0.0] * len(problems)
    # problems may come as dicts (as score_remote sends them)
    r = score(completions[:2], [p.to_dict() for p in problems[:2]], {"accuracy": 2.0}, sandbox=sandbox)
    assert r.total == [2.0, 2.0]


def test_bad_arguments_raise_before_any_work(problems):
    p = problems[0]
    with pytest.raises(ValueError, match="2 completions but 1 problems"):
        score(["a", "b"], [p], {"format": 1.0})
    with pytest.raises(ValueError, match="unknown reward"):
        score(["a"], [p], {"formt": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        score(["a"], [p], {"format": float("nan")})
    with pytest.raises(ValueError, match="timeout_s"):
        score(["a"], [p], {"format": 1.0}, timeout_s=0)


def test_score_never_raises_on_adversarial_completions(problems, sandbox):
    arith, countdown = problems[0], problems[1]
    huge = "1" + "0" * 1_000_000
    hostile = [
        f"<think>x</think><answer>{huge}</answer>",  # 10**1_000_000 written out, 1 MB
        "<think>x</think><answer>10**10**10</answer>",  # ... and as an expression
        "<think>x</think><answer>$10^{10^{10}}$</answer>",
        "<think>x</think><answer>" + "(" * 50_000 + "1" + ")" * 50_000 + "</answer>",  # deep nesting
        "<think>x</think><answer>" + "(" * 90 + "3" + ")" * 90 + "</answer>",
        "<think>" * 100_000 + "<answer>" * 100_000,  # unterminated tags, 1.5 MB
        "<answer>" + "9" * 1_000_000,  # unterminated answer
        "x" * 1_000_000,  # 1 MB of nothing
        "\udcff\ud800\x00\x1b[31m\ufffd" * 10_000 + "<answer>\x00</answer>",  # lone surrogates, control bytes
        "</answer><answer>",
        None,  # not even a string
        "",
    ]
    items = [p for _ in range(len(hostile)) for p in (arith, countdown)]
    completions = [c for c in hostile for _ in (0, 1)]
    t0 = time.perf_counter()
    r = score(completions, items, ALL, max_completion_chars=4096, timeout_s=1.0, sandbox=sandbox)
    elapsed = time.perf_counter() - t0
    assert len(r.total) == len(completions)
    assert all(math.isfinite(v) for v in r.total)
    assert r.per_reward["accuracy"] == [0.0] * len(completions)
    assert r.per_reward["format"][:2] == [1.0, 1.0] and r.per_reward["length"][:2] == [-1.0, -1.0]
    assert r.failures["format"] == r.failures["tag_count"] == 2  # the None completion, on two problems
    assert r.failures["accuracy"] >= 2
    # each sample/reward pair is bounded by the timeout (plus a replacement child's start on a loaded machine)
    assert elapsed < 60, elapsed


def test_a_call_past_the_timeout_is_killed_counted_and_the_batch_goes_on(problems, sandbox):
    p = problems[0]
    slow = "<think>x</think><answer>$10^{10^{10}}$</answer>"  # minutes inside sympy (measured)
    completions = [p.completion, slow, p.completion, p.completion]
    restarts = sandbox.restarts
    t0 = time.perf_counter()
    r = score(completions, [p] * 4, {"accuracy": 1.0, "format": 1.0}, timeout_s=0.5, sandbox=sandbox)
    elapsed = time.perf_counter() - t0
    assert r.per_reward["accuracy"] == [1.0, 0.0, 1.0, 1.0]
    assert r.per_reward["format"] == [1.0, 1.0, 1.0, 1.0]  # the other reward on that sample still ran
    assert r.failures == {"accuracy": 1, "format": 0}
    assert sandbox.restarts == restarts + 1
    assert elapsed < 60, elapsed
    # the replacement child serves the next call
    assert score([p.completion], [p], {"accuracy": 1.0}, sandbox=sandbox).total == [1.0]


def test_a_sandbox_child_killed_from_outside_changes_no_score(problems, sandbox):
    """SIGKILL the sandbox's child from outside while it scores a long batch (an operator, the OOM killer, chaos):
    the call or the gap it died in runs again in a fresh child, so every score equals the undisturbed batch's and
    no failure is counted."""
    import os
    import signal
    import threading

    batch = problems * 800  # 9,600 samples x 5 rewards: about a second of scoring
    completions = [p.completion for p in batch]
    ref = score(completions, batch, ALL, max_completion_chars=5000, sandbox=sandbox)
    assert ref.failures == dict.fromkeys(ALL, 0)
    restarts = sandbox.restarts
    killer = threading.Timer(0.1, os.kill, (sandbox._child.proc.pid, signal.SIGKILL))
    killer.start()
    r = score(completions, batch, ALL, max_completion_chars=5000, sandbox=sandbox)
    killer.join()
    assert sandbox.restarts == restarts + 1  # the kill landed while it scored
    assert r.per_reward == ref.per_reward and r.failures == dict.fromkeys(ALL, 0)


def test_a_ctrl_c_in_the_terminal_does_not_kill_the_sandbox_child(problems, sandbox):
    """Ctrl-C signals the whole process group: the child ignores SIGINT (no traceback, no lost scoring); its
    parent decides when it ends."""
    import signal

    p = problems[0]
    assert score([p.completion], [p], {"accuracy": 1.0}, sandbox=sandbox).total == [1.0]
    child, restarts = sandbox._child, sandbox.restarts
    child.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert child.alive()
    assert score([p.completion], [p], {"accuracy": 1.0}, sandbox=sandbox).total == [1.0]
    assert sandbox.restarts == restarts and sandbox._child is child


def test_a_failing_verifier_scores_zero_and_is_counted(problems, sandbox):
    p = problems[0]
    broken = {**p.to_dict(), "task": "no_such_task"}  # get_task raises inside the accuracy reward
    r = score([p.completion, p.completion], [p.to_dict(), broken], {"accuracy": 1.0, "format": 1.0}, sandbox=sandbox)
    assert r.per_reward["accuracy"] == [1.0, 0.0] and r.failures == {"accuracy": 1, "format": 0}
    assert r.total == [2.0, 1.0]


def test_sandbox_overhead_is_small(problems, sandbox):
    """Not a timing target (the machine is shared), a guard against a per-sample round trip creeping in."""
    batch = problems * 64  # 768 samples x 5 rewards
    completions = [p.completion for p in batch]
    score(completions[:8], batch[:8], ALL, max_completion_chars=5000, sandbox=sandbox)  # warm
    r = score(completions, batch, ALL, max_completion_chars=5000, sandbox=sandbox)
    assert r.failures == dict.fromkeys(ALL, 0)
    assert r.seconds / len(batch) < 0.01  # measured ~0.1 ms per sample (5 rewards) on an idle 2-core machine


def test_decoded_reasoning_tags_survive_skip_special_tokens(tiny_tokenizer_dir, problems):
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    for p in problems[:3]:
        ids = tok(p.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for tag in ("<think>", "</think>", "<answer>", "</answer>"):
            assert tok.convert_tokens_to_ids(tag) in ids  # one token each, never split
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded == p.completion  # EOS dropped, reasoning tags kept
        assert format_reward(decoded, p, CTX) == 1.0
        assert get_task(p.task).verify(decoded, p) == 1.0


def test_timeouts_work_outside_the_main_thread(problems, sandbox):
    """math-verify's own signal.alarm timeout raises off the main thread; ours must not care which thread."""
    import threading

    p = problems[0]
    results = []
    slow = "<think>x</think><answer>$10^{10^{10}}$</answer>"
    t = threading.Thread(target=lambda: results.append(
        score([slow, p.completion], [p, p], {"accuracy": 1.0}, timeout_s=0.5, sandbox=sandbox)))
    t.start()
    t.join(120)
    assert not t.is_alive()
    (r,) = results
    assert r.per_reward["accuracy"] == [0.0, 1.0] and r.failures == {"accuracy": 1}
