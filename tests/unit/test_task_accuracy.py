"""r1ray.tasks.accuracy (task accuracy shared with the training stages) and the evaluation config."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1ray.config import ConfigError, load_config
from r1ray.eval.config import EvaluateConfig
from r1ray.tasks.accuracy import answer_key, render_prompt, task_accuracy
from r1ray.tasks.registry import sample_problems

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def problems():
    return [p for level in (1, 2) for p in sample_problems({"arithmetic": 1, "countdown": 1}, 6, seed=0, split="eval",
                                                              difficulty=level)]


def test_worked_solutions_score_one_and_wrong_answers_zero(problems):
    m = task_accuracy(lambda ps: [p.completion for p in ps], problems, batch_size=4)
    assert m == {"accuracy": 1.0, "accuracy_d1": 1.0, "accuracy_d2": 1.0, "n": 12.0, "eval_verify_failures": 0.0}
    # right on level 1 only
    half = task_accuracy(lambda ps: [p.completion if p.difficulty == 1 else "<answer>nope</answer>" for p in ps],
                         problems)
    assert (half["accuracy"], half["accuracy_d1"], half["accuracy_d2"]) == (0.5, 1.0, 0.0)
    with pytest.raises(ValueError, match="returned 1 completions for 12"):
        task_accuracy(lambda ps: ["x"], problems)


def test_prefilled_think_completions(problems):
    from r1ray.model.tokenizer import THINK

    # the prompt ended in "<think>\n": completions start inside the reasoning; accuracy reads the answer alone
    m = task_accuracy(lambda ps: [p.completion[len(THINK):] for p in ps], problems, prefilled_think=True)
    assert m["accuracy"] == 1.0


def test_answer_keys_vote_by_value():
    assert answer_key("<think>x</think><answer>42</answer>") == answer_key("<answer> 84/2 </answer>")
    assert answer_key("<answer>42.0</answer>") == answer_key("<answer>42</answer>")
    assert answer_key("<answer>Ann is a Knight</answer>") == answer_key("<answer>ann  is a knight</answer>")
    assert answer_key("no tags") is None and answer_key("<answer></answer>") is None


def test_render_prompt_formats(problems, tiny_tokenizer_dir):
    from r1ray.model.tokenizer import load_tokenizer

    p = problems[0]
    assert render_prompt(p, "question") == f"Question: {p.question}\n"
    assert render_prompt(p, "question", prefill_think=True).endswith("<think>\n")
    tok = load_tokenizer(tiny_tokenizer_dir)
    chat = render_prompt(p, "chat", tok)
    assert p.question in chat and chat == tok.apply_chat_template(p.messages(), add_generation_prompt=True,
                                                                  tokenize=False)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        render_prompt(p, "chat")
    with pytest.raises(ValueError, match="unknown prompt format"):
        render_prompt(p, "plain")


def test_config_model_forms_and_errors():
    cfg = load_config(EvaluateConfig, ["model=outputs/runs/sft", "compare.endpoint.url=http://h:8000/v1/",
                                       "compare.endpoint.model=m"])
    assert cfg.model.path == "outputs/runs/sft" and cfg.compare.endpoint.url == "http://h:8000/v1"
    with pytest.raises(ConfigError) as e:
        load_config(EvaluateConfig, ["tasks.samples=2", "tasks.k=[1,4]", "run_name=a/b",
                                     "model.path=x", "model.endpoint.url=http://h", "model.endpoint.model=m"])
    text = str(e.value)
    assert "k: every k must be in [1, samples=2]" in text and "run_name:" in text and "exactly one of path" in text
    with pytest.raises(ConfigError, match="prefill_think with an endpoint"):
        load_config(EvaluateConfig, ["model.endpoint.url=http://h", "model.endpoint.model=m",
                                     "tasks.prefill_think=true"])


@pytest.mark.parametrize("name", ["debug", "default"])
def test_shipped_configs_validate(name):
    cfg = load_config(EvaluateConfig, ["--config", str(ROOT / "configs" / "evaluate" / f"{name}.yaml")])
    assert cfg.run_name == name and cfg.model is None


def test_plan_problems_gsm8k_file_levels_and_caps(tmp_path):
    import json

    from r1ray.eval.run import plan_problems

    f = tmp_path / "gsm.jsonl"
    f.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys {i + 1}. How many?",
                                     "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"}) + "\n"
                         for i in range(5)))
    opts = {"gsm8k": {"path": str(f), "eval_path": str(f)}}
    cfg = load_config(EvaluateConfig, values={"tasks.tasks": {"gsm8k": 1.0}, "tasks.options": opts,
                                              "tasks.difficulties": [1, 2], "tasks.items_per_level": 10})
    ps = plan_problems(cfg)
    assert len(ps) == 5 and len({p.question for p in ps}) == 5  # capped at the file's size; level 2 skipped
    assert all(p.task == "gsm8k" and p.split == "eval" for p in ps)
    assert ps == plan_problems(cfg)  # a pure function of the config
    with pytest.raises(ValueError, match="none of the tasks"):
        plan_problems(load_config(EvaluateConfig, values={"tasks.tasks": {"gsm8k": 1.0}, "tasks.options": opts,
                                                          "tasks.difficulties": [3]}))


def test_text_chunks_cut_at_whitespace():
    from r1ray.eval.run import _chunks

    text = "alpha beta gamma delta " * 10
    parts = _chunks(text, 30)
    assert "".join(parts) == text.rstrip() or "".join(parts) == text
    assert all(len(p) <= 30 for p in parts) and len(parts) > 5
    assert _chunks("x" * 70, 30) == ["x" * 30, "x" * 30, "x" * 10]


def test_no_think_prompt_opens_the_answer_and_leaves_no_room_to_think(problems, tiny_tokenizer_dir):
    """``accuracy_no_think``: the prompt closes an empty reasoning and opens the answer, and the completion gets
    16 tokens, so a model that writes its worked solution after ``</think>`` anyway (measured: the default model
    does) cannot reach an answer tag; a direct answer scores."""
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.tasks.accuracy import NO_THINK_MAX_TOKENS, score_no_think

    p = next(q for q in problems if q.task == "arithmetic")
    assert render_prompt(p, "question", no_think=True) == f"Question: {p.question}\n<think>\n</think>\n<answer>"
    with pytest.raises(ValueError, match="exclude each other"):
        render_prompt(p, "question", no_think=True, prefill_think=True)
    scores, _ = score_no_think([f"{p.answer}</answer>", f"{int(p.answer) + 1}</answer>"], [p, p])
    assert scores == [1.0, 0.0]
    tok = load_tokenizer(tiny_tokenizer_dir)
    worked = p.completion.split("<think>", 1)[1]  # the worked solution a model writes after the forced </think>
    assert len(tok(worked)["input_ids"]) > NO_THINK_MAX_TOKENS
