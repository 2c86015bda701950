"""Tasks: worked solutions verify, corruptions don't, splits are disjoint by hash, mixes are deterministic."""

from __future__ import annotations

import json
import re
import socket
from collections import Counter

import pytest

from r1ray.tasks import base
from r1ray.tasks.arithmetic import ArithmeticTask, generate_many
from r1ray.tasks.countdown import check, evaluate
from r1ray.tasks.knights import parse_roles, solve
from r1ray.tasks.mathcheck import answers_match, parse_number
from r1ray.tasks.procedures import check_lines
from r1ray.tasks.registry import get_task, list_tasks, sample_problems

BUILTIN = ["arithmetic", "countdown", "knights_knaves"]


def _completion(answer: str, think: str = "work") -> str:
    return f"<think>\n{think}\n</think>\n<answer>{answer}</answer>"


def _corrupt(p: base.Problem) -> list[str]:
    """Wrong answers for ``p`` that a lenient verifier might let through."""
    if p.task in ("arithmetic", "gsm8k"):
        return [str(int(p.answer) + 1), f"{p.answer}.5", f"-{p.answer}" if p.answer != "0" else "7"]
    if p.task == "countdown":
        n = p.meta["numbers"][0]
        return [f"{p.answer} + 1", f"({p.answer}) * {n} / {n}",  # right value, but a number used twice
                re.sub(r"\d+", lambda m: str(int(m.group()) + 1), p.answer, count=1), str(p.meta["target"])]
    if p.task == "knights_knaves":
        first = p.meta["names"][0]
        flipped = "knave" if p.meta["roles"][first] == "knight" else "knight"
        return [p.answer.replace(f"{first} is a {p.meta['roles'][first]}", f"{first} is a {flipped}"),
                p.answer.split(",")[0]]  # only one person named
    raise AssertionError(p.task)


@pytest.mark.parametrize("name", BUILTIN)
def test_worked_solutions_score_one_and_corruptions_zero(name):
    task = get_task(name)
    for difficulty in task.difficulties:
        for split in base.SPLITS:
            for i in range(40):
                p = task.problem(i, seed=3, split=split, difficulty=difficulty)
                assert (p.task, p.index, p.split, p.difficulty) == (name, i, split, difficulty)
                assert task.verify(p.completion, p) == 1.0, p
                assert task.verify(_completion(p.answer), p) == 1.0
                for wrong in _corrupt(p):
                    assert task.verify(_completion(wrong), p) == 0.0, (p.answer, wrong)
                assert task.verify(p.solution, p) == 0.0  # no <answer> tag at all
                assert task.verify("<answer></answer>", p) == 0.0
                json.dumps(p.meta)  # JSON-able


def test_problem_layout_and_round_trip():
    p = get_task("arithmetic").problem(0, seed=0)
    assert p.completion == f"<think>\n{p.solution}\n</think>\n<answer>{p.answer}</answer>"
    (msg,) = p.messages()
    assert msg["role"] == "user" and msg["content"].startswith(p.question)
    assert "<think>" in msg["content"] and "<answer>" in msg["content"]
    assert base.Problem.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert p.uid() == base.problem_uid("arithmetic", "  " + p.question.upper().replace(" ", "\n "))
    assert p.uid() != base.problem_uid("countdown", p.question)


@pytest.mark.parametrize("name", BUILTIN)
def test_problems_are_pure_functions_of_their_arguments(name):
    task, other = get_task(name), get_task(name)
    for d in task.difficulties:
        assert task.problem(5, seed=1, difficulty=d) == other.problem(5, seed=1, difficulty=d)
        assert task.problem(5, seed=1, difficulty=d) != task.problem(5, seed=2, difficulty=d)
        assert task.problem(5, seed=1, difficulty=d) != task.problem(6, seed=1, difficulty=d)
    questions = {task.problem(i, seed=0).question for i in range(300)}
    assert len(questions) > 250


def test_arithmetic_levels_count_their_steps_and_every_step_is_right():
    task = ArithmeticTask()
    for difficulty, (lo, hi) in {1: (1, 1), 2: (2, 2), 3: (3, 4)}.items():
        for i in range(200):
            p = task.problem(i, seed=0, difficulty=difficulty)
            lines = p.solution.split("\n")
            assert check_lines(lines) is None, p.solution
            results = [m for m in (re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", line) for line in lines) if m]
            named = [line for line in lines if re.search(r": \d+[-+*/]\d+$", line)]
            assert lo <= len(named) == p.meta["steps"] <= hi, (difficulty, p.solution)
            assert int(results[-1].group(4)) == int(p.answer) >= 0


def test_default_corpus_generator_is_pinned():
    """r1ray/data/sources.py builds the default corpus from generate_many (every level, train split): a
    change to it changes every default artifact downstream, so it is pinned here (update the hash on purpose)."""
    import hashlib

    texts = "\x00".join(s.text for s in generate_many(0, 500))
    assert hashlib.sha256(texts.encode()).hexdigest() == (
        "9676df9f8bcb20a7efa9b2d97e3a624a789105e1d0099415abc6a0e9eda70417"
    )


def test_countdown_instances_are_all_solvable():
    task = get_task("countdown")
    for seed in range(12):
        for difficulty in task.difficulties:
            for split in base.SPLITS:
                for i in range(25):
                    p = task.problem(i, seed=seed, split=split, difficulty=difficulty)
                    numbers, target = p.meta["numbers"], p.meta["target"]
                    assert len(numbers) == {1: 3, 2: 4, 3: 5}[difficulty]
                    assert ", ".join(map(str, numbers)) in p.question and str(target) in p.question
                    # the gold expression is a witness: it reaches the target with each number at most once
                    value, used = evaluate(p.answer)
                    assert value == target and not (Counter(used) - Counter(numbers))
                    assert 1 <= target <= 1000 and check(p.answer, numbers, target)
                    # the worked steps are right and end at the target
                    steps = re.findall(r"^Take (\d+)([-+*/])(\d+):\n(?:.*\n)*?(?:\d+[-+*/]\d+)=(\d+)\nRemaining",
                                       p.solution, re.M)
                    assert len(steps) == len(numbers) - 1 and int(steps[-1][3]) == target
                    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
                    assert all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in steps)


def test_countdown_verifier_is_safe_and_strict():
    nums, target = [3, 7, 25], 46
    assert check("25 + 3 * 7", nums, target)
    assert check("25+3*7 = 46", nums, target) and not check("25+3*7 = 47", nums, target)
    assert check("(7 * 3) + 25", nums, target) and check("7*3+25", nums, target)
    assert not check("25 + 3 * 7 + 0", nums, target)  # 0 is not given
    assert not check("25 + 21", nums, target)  # 21 is not given
    assert not check("7 * 7 - 3", nums, 46)  # 7 twice
    hostile = ["__import__('os').system('true')", "46 if 1 else 0", "2**10", "-(-46)", "46.0", "True*46",
               "(" * 5000 + "46" + ")" * 5000, "9" * 5000, "1/0", "[46][0]", "x", "", "lambda: 46"]
    for expr in hostile:
        assert not check(expr, [46, 2, 10, 0, 1], 46), expr
    with pytest.raises(ValueError):
        evaluate("(" * 100 + "1" + ")" * 100)  # longer than the length cap


def test_knights_puzzles_have_unique_solutions_found_by_brute_force():
    task = get_task("knights_knaves")
    for difficulty in task.difficulties:
        for i in range(60):
            p = task.problem(i, seed=1, difficulty=difficulty)
            n = len(p.meta["names"])
            solutions = solve([tuple(s) for s in p.meta["statements"]], n)
            assert len(solutions) == 1
            assert {p.meta["names"][k]: ("knight" if v else "knave") for k, v in enumerate(solutions[0])} \
                == p.meta["roles"]
            assert p.solution.count("Suppose") == 2**n


def test_knights_answer_normalization():
    names = ["Ann", "Bob", "Cleo"]
    gold = {"Ann": "knight", "Bob": "knave", "Cleo": "knave"}
    for text in ["Ann is a knight, Bob is a knave, Cleo is a knave", "ann: KNIGHT; bob: knave; cleo: knave.",
                 "Ann is a knight and Bob and Cleo are knaves", "Ann is a Knight. Bob is a Knave. Cleo is a Knave"]:
        assert parse_roles(text, names) == gold, text
    for text in ["Ann is a knight, Bob is a knave", "Ann is a knight and a knave, Bob is a knave, Cleo is a knave",
                 "Ann is a knight, Bob is a knave, Cleo", "everyone is a knight",
                 "Ann is a knight or a knave, Bob is a knave, Cleo is a knave"]:
        assert parse_roles(text, names) != gold, text


def test_answer_equivalence():
    assert parse_number("1,234") == 1234 and parse_number("\\boxed{42}") == 42 and parse_number("$-3/4$") == -0.75
    for pred, gold in [("42", "42"), ("42.0", "42"), (" 1,234 ", "1234"), ("\\boxed{42}", "42"), ("$42$", "42"),
                       ("0.75", "3/4"), ("\\frac{3}{4}", "3/4"), ("\\dfrac{3}{4}", "0.75"), ("-5", "-5"),
                       ("\\frac34", "0.75")]:
        assert answers_match(pred, gold), (pred, gold)
    for pred, gold in [("43", "42"), ("42.5", "42"), ("0.76", "3/4"), ("", "1"), (None, "1"), ("x", "1"),
                       ("1" * 5000, "1"), ("\\frac{3}{5}", "3/4")]:
        assert not answers_match(pred, gold), (pred, gold)


def test_extract_answer_is_the_last_complete_pair_and_linear():
    assert base.extract_answer("<answer>1</answer> then <answer> 3 </answer>") == "3"
    assert base.extract_answer("<answer>1") is None and base.extract_answer("1</answer>") is None
    assert base.extract_answer("<answer>" * 200_000 + "x") is None  # 1.6 MB of unterminated tags


@pytest.mark.parametrize("name", BUILTIN)
def test_train_and_eval_splits_are_disjoint_by_uid(name):
    task = get_task(name)
    difficulty = task.difficulties[-1]
    train = {task.problem(i, seed=0, split="train", difficulty=difficulty).uid() for i in range(2000)}
    evals = [task.problem(i, seed=0, split="eval", difficulty=difficulty) for i in range(300)]
    eval_uids = {p.uid() for p in evals}
    assert not train & eval_uids
    assert all(base.split_of(u) == "train" for u in train) and all(base.split_of(u) == "eval" for u in eval_uids)
    # the easiest level too, where the problem space is smallest
    easy_eval = {task.problem(i, seed=0, split="eval", difficulty=1).uid() for i in range(200)}
    easy_train = {task.problem(i, seed=0, split="train", difficulty=1).uid() for i in range(1000)}
    assert not easy_eval & easy_train


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'nope'.*arithmetic.*countdown"):
        get_task("nope")
    assert {"arithmetic", "countdown", "knights_knaves", "gsm8k"} <= set(list_tasks())
    task = get_task("arithmetic")
    with pytest.raises(ValueError, match="split='test'"):
        task.problem(0, seed=0, split="test")
    with pytest.raises(ValueError, match="difficulty=9"):
        task.problem(0, seed=0, difficulty=9)
    with pytest.raises(ValueError, match="index"):
        task.problem(-1, seed=0)
    with pytest.raises(ValueError, match="bad options"):
        get_task("countdown", path="x")


def test_sample_problems_is_deterministic_and_follows_the_weights():
    mix = {"arithmetic": 3.0, "countdown": 1.0, "knights_knaves": 0.0}
    a = sample_problems(mix, 400, seed=0, split="train", difficulty=1)
    assert a == sample_problems(mix, 400, seed=0, split="train", difficulty=1)
    assert a[100:150] == sample_problems(mix, 50, seed=0, split="train", difficulty=1, start=100)
    assert a != sample_problems(mix, 400, seed=1, split="train", difficulty=1)
    counts = Counter(p.task for p in a)
    assert set(counts) == {"arithmetic", "countdown"}
    assert 0.68 < counts["arithmetic"] / 400 < 0.82
    assert len({(p.task, p.index) for p in a}) == 400  # no problem twice
    levels = sample_problems(mix, 40, seed=0, split="eval", difficulty={"arithmetic": 3, "countdown": 2})
    assert {(p.task, p.difficulty, p.split) for p in levels} == {("arithmetic", 3, "eval"), ("countdown", 2, "eval")}
    with pytest.raises(ValueError, match="no level for"):
        sample_problems(mix, 4, seed=0, split="train", difficulty={"arithmetic": 1})
    with pytest.raises(ValueError, match="non-negative"):
        sample_problems({"arithmetic": -1}, 4, seed=0, split="train", difficulty=1)
    with pytest.raises(ValueError, match="unknown task"):
        sample_problems({"arith": 1}, 4, seed=0, split="train", difficulty=1)


def _write_gsm8k(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_gsm8k_loader(tmp_path):
    rows = [
        {"question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
         "answer": f"Tom buys {i + 2}.\nHe has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n"
                   f"#### {2 * i + 2:,}"}
        for i in range(600)
    ]
    path = tmp_path / "gsm.jsonl"
    _write_gsm8k(path, rows)
    task = get_task("gsm8k", path=str(path))
    n_train, n_eval = task.size("train"), task.size("eval")
    assert n_train + n_eval == 600 and 20 < n_eval < 110
    train = [task.problem(i, split="train") for i in range(n_train)]
    evals = [task.problem(i, split="eval") for i in range(n_eval)]
    assert not {p.uid() for p in train} & {p.uid() for p in evals}
    big = next(p for p in train + evals if int(p.answer) >= 1000)
    assert "," not in big.answer
    for p in train[:50] + evals[:20]:
        assert "<<" not in p.solution and p.solution.endswith(f"So the answer is {p.answer}.")
        assert task.verify(p.completion, p) == 1.0
        assert task.verify(_completion(f"{int(p.answer):,}"), p) == 1.0
        for wrong in _corrupt(p):
            assert task.verify(_completion(wrong), p) == 0.0
    # a verifier needs no file: the reward worker builds the task by name only
    assert get_task("gsm8k").verify(train[0].completion, train[0]) == 1.0
    with pytest.raises(ValueError, match="needs a file"):
        get_task("gsm8k").problem(0)

    held = tmp_path / "test.jsonl"
    _write_gsm8k(held, rows[:10])
    with_eval = get_task("gsm8k", path=str(path), eval_path=str(held))
    assert with_eval.size("eval") == 10 and with_eval.size("train") == 590

    bad = tmp_path / "bad.jsonl"
    _write_gsm8k(bad, rows[:2] + [{"question": "q", "answer": "no final line"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: 'answer' must end with '#### <number>'"):
        get_task("gsm8k", path=str(bad)).problem(0)


def test_generation_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a task tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(AssertionError, match="network connection"):  # the guard is live
        socket.create_connection(("127.0.0.1", 9))
    made = {}
    for name in BUILTIN + ["rg:basic_arithmetic", "rg:knights_knaves", "rg:countdown", "rg:gsm_symbolic"]:
        if name.startswith("rg:"):
            pytest.importorskip("reasoning_gym")
        task = get_task(name)
        made[name] = [task.problem(i, seed=0, split="eval") for i in range(5)]
    # every task produced real problems with the network refused
    assert all(len(ps) == 5 and all(p.question and p.answer for p in ps) for ps in made.values()), made


def test_reasoning_gym_adapter():
    pytest.importorskip("reasoning_gym")
    task = get_task("rg:basic_arithmetic")
    assert task.problem(3, seed=0) == get_task("rg:basic_arithmetic").problem(3, seed=0)
    train = [task.problem(i, seed=0, split="train") for i in range(400)]
    evals = [task.problem(i, seed=0, split="eval") for i in range(40)]
    assert not {p.uid() for p in train} & {p.uid() for p in evals}
    for p in train[:30] + evals[:10]:
        assert task.verify(p.completion, p) == 1.0
        assert task.verify(_completion(str(int(float(p.answer)) + 1)), p) == 0.0
        assert p.meta["worked_solution"] is False
    # seeds do not overlap (reasoning-gym's own items are Random(seed + idx))
    assert task.problem(1, seed=0) != task.problem(0, seed=1)
    cot = get_task("rg:gsm_symbolic").problem(0, seed=0)
    assert cot.meta["worked_solution"] and "####" not in cot.solution and len(cot.solution.splitlines()) > 2
    leveled = get_task("rg:basic_arithmetic", levels={1: {"min_terms": 2, "max_terms": 2},
                                                      2: {"min_terms": 5, "max_terms": 5}})
    assert leveled.difficulties == (1, 2)
    assert len(re.findall(r"[-+*/]", leveled.problem(0, seed=0, difficulty=2).question)) > \
        len(re.findall(r"[-+*/]", leveled.problem(0, seed=0, difficulty=1).question))
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        get_task("rg:no_such_dataset")


def test_grpo_epoch_over_a_finite_task_draws_every_row_once_refills_included(tmp_path):
    """A finite task's problem ``k`` is its row ``k % rows``: GRPO's epoch (``grpo.train_problems``) is sized so the
    cursor's indices and dynamic sampling's refill candidates are distinct rows, in every epoch; a larger epoch
    is refused, naming the field, the task and its rows."""
    from r1ray.train.stages.grpo.rollouts import refill_index
    from r1ray.train.stages.grpo.stage import GENERATED_EPOCH, GRPOSection, epoch_problems

    path = tmp_path / "gsm.jsonl"
    _write_gsm8k(path, [{"question": f"Ann has {i} pens and gets {i + 3} more. How many?",
                         "answer": f"#### {2 * i + 3}"} for i in range(200)])
    rows = get_task("gsm8k", path=str(path)).size("train")
    opts = {"gsm8k": {"path": str(path)}}
    assert epoch_problems(GRPOSection()) == GENERATED_EPOCH  # generated tasks: no finite split to respect
    assert epoch_problems(GRPOSection(tasks={"gsm8k": 1.0}, task_options=opts)) == rows
    # a mix with a generated task: the finite task bounds the epoch (its indices are a subset of [0, T))
    assert epoch_problems(GRPOSection(tasks={"gsm8k": 1.0, "arithmetic": 1.0}, task_options=opts)) == rows

    g = GRPOSection(tasks={"gsm8k": 1.0}, task_options=opts, dynamic_sampling=True, max_refill_rounds=2)
    epoch = epoch_problems(g)
    assert epoch == rows // 3
    for e in range(3):  # three epochs of cursor positions: each draws every cursor row and every refill row once
        positions = range(e * epoch, (e + 1) * epoch)
        indices = list(range(epoch)) + [refill_index(epoch, p, 2, r) for p in positions for r in range(2)]
        questions = [p.question for k in indices
                     for p in sample_problems(g.tasks, 1, seed=0, split="train", difficulty=1, start=k, options=opts)]
        assert len(set(questions)) == len(questions) == 3 * epoch
    # the old refill index (train_problems + position * rounds + round) would have wrapped onto rows drawn before
    assert len({(epoch + p * 2 + r) % rows for p in range(epoch, 2 * epoch) for r in range(2)} | set(range(epoch))) \
        < 3 * epoch

    too_many = GRPOSection(tasks={"gsm8k": 1.0}, task_options=opts, train_problems=rows + 1)
    with pytest.raises(ValueError, match=rf"grpo.train_problems={rows + 1}: task gsm8k has {rows} train rows.*"
                                         rf"train_problems<={rows}"):
        epoch_problems(too_many)
    with pytest.raises(ValueError, match=r"refill rows per cursor problem.*train on a row twice"):
        epoch_problems(g.model_copy(update={"train_problems": epoch + 1}))
    assert epoch_problems(g.model_copy(update={"train_problems": 5})) == 5
