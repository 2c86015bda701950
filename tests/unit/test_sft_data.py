"""SFT data: the assistant-only mask (token by token), padded and packed batches (no attention or position
crossing a conversation boundary), jsonl loading errors, and the SFT config's plan-time checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from r1ray.train.stages.sft_data import (
    IGNORE,
    assistant_spans,
    collate,
    load_jsonl,
    pack_batch,
    pad_batch,
    tokenize_conversation,
)

CONVERSATION = [
    {"role": "system", "content": "You are a careful tutor."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "reasoning_content": "12 + 30 = 42.", "content": "<answer>42</answer>"},
    {"role": "user", "content": "And 7 times 6?"},
    {"role": "assistant", "content": "<think>\n7 * 6 = 42\n</think>\n<answer>42</answer>"},
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from r1ray.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def expected_assistant_text(messages) -> list[str]:
    """What the ChatML template writes for each assistant turn after ``<|im_start|>assistant\\n``
    (written out by hand here, independently of the code under test)."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            think = f"<think>\n{m['reasoning_content']}\n</think>\n" if m.get("reasoning_content") else ""
            out.append(think + m["content"] + "<|im_end|>\n")
    return out


def test_every_non_assistant_token_is_masked_token_by_token(tok):
    ex = tokenize_conversation(tok, CONVERSATION)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    # the independent expectation: character ranges of the hand-written assistant turns, each right after
    # the generation prompt of its turn
    expected_ranges, at = [], 0
    for seg in expected_assistant_text(CONVERSATION):
        start = text.index("<|im_start|>assistant\n" + seg, at) + len("<|im_start|>assistant\n")
        expected_ranges.append((start, start + len(seg)))
        at = start + len(seg)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(ex.ids) == enc["input_ids"]  # the example is the template's text, tokenized as a whole
    in_assistant = []
    for i, (tid, (s, e)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        inside = any(a <= s and e <= b for a, b in expected_ranges)
        outside = all(e <= a or s >= b for a, b in expected_ranges)
        assert inside or outside, f"token {i} ({tok.convert_ids_to_tokens(tid)!r}) straddles a turn boundary"
        assert bool(ex.target[i]) == inside, (
            f"token {i} {tok.convert_ids_to_tokens(tid)!r} at chars [{s}, {e}): target={bool(ex.target[i])}, "
            f"expected {inside}")
        in_assistant.append(inside)
    # and the targets decode to exactly the assistant turns, the rest to everything else
    assert tok.decode(ex.ids[ex.target], skip_special_tokens=False) == "".join(expected_assistant_text(CONVERSATION))
    rest = tok.decode(ex.ids[~ex.target], skip_special_tokens=False)
    assert "What is 12 + 30?" in rest and "careful tutor" in rest and "<|im_start|>assistant\n" in rest
    assert "<answer>" not in rest and "<think>" not in rest
    assert sum(in_assistant) == int(ex.target.sum()) > 0


def test_task_conversation_masks_the_prompt_and_trains_the_worked_solution(tok):
    from r1ray.tasks.registry import get_task
    from r1ray.train.stages.sft_data import task_conversation

    p = get_task("arithmetic").problem(3, seed=0, split="train", difficulty=2)
    ex = tokenize_conversation(tok, task_conversation(p))
    assert tok.decode(ex.ids[ex.target], skip_special_tokens=False) == p.completion + "<|im_end|>\n"
    assert p.question in tok.decode(ex.ids[~ex.target], skip_special_tokens=False)


def test_truncation_is_flagged_and_keeps_the_head(tok):
    full = tokenize_conversation(tok, CONVERSATION)
    cut = tokenize_conversation(tok, CONVERSATION, max_length=20)
    assert cut.truncated and not full.truncated and len(cut.ids) == 20
    assert list(cut.ids) == list(full.ids[:20]) and list(cut.target) == list(full.target[:20])


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    import copy

    t = copy.copy(tok)
    # renders the history differently once a later turn exists: prefixes are not prefixes
    t.chat_template = "{% for m in messages %}{{ m['role'] }}{% if loop.last %}!{% endif %}:{{ m['content'] }}\n" \
                      "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    with pytest.raises(ValueError, match="prefixes"):
        assistant_spans(t, CONVERSATION)
    t.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        assistant_spans(t, CONVERSATION)


def _examples(tok):
    convs = [
        [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "the answer is 4"}],
        [{"role": "user", "content": "what is it that was"}, {"role": "assistant", "content": "he she"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "to and in is it that for on"}],
    ]
    return [tokenize_conversation(tok, c) for c in convs]


def test_pad_and_pack_layouts_hold_the_same_targets_and_never_cross_a_boundary(tok):
    exs = _examples(tok)
    pad = pad_batch(exs, tok.pad_token_id)
    pack = pack_batch(exs)
    lengths = [len(e.ids) - 1 for e in exs]
    # padded: one row each, mask 1 on real tokens only, no target on padding
    assert pad["input_ids"].shape == (3, max(lengths))
    assert pad["attention_mask"].sum(1).tolist() == lengths
    assert (pad["targets"][pad["attention_mask"] == 0] == IGNORE).all()
    # packed: positions restart at 0 for every conversation
    assert pack["input_ids"].shape == (1, sum(lengths))
    starts = np.cumsum([0, *lengths[:-1]])
    assert (pack["position_ids"][0, starts] == 0).all()
    assert pack["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    # the target of each conversation's last input position is its own last token, never the next one's first
    for k, s in enumerate(starts):
        row = pack["targets"][0, s : s + lengths[k]]
        assert row.tolist() == pad["targets"][k, : lengths[k]].tolist()
        assert row[-1] == exs[k].ids[-1]  # "<|im_end|>\n" ends every assistant turn: a target
    batch = collate(exs, "pack", tok.pad_token_id)
    assert batch["n_targets"] == int((pack["targets"] != IGNORE).sum()) == sum(e.n_targets for e in exs)
    assert batch["n_tokens"] == sum(lengths)


def test_packed_loss_equals_each_conversation_alone(tok):
    """A tiny model: the packed row's per-token losses (transformers' block-diagonal mask from position ids)
    equal each conversation run alone, and the padded batch's equal them too."""
    import torch

    from r1ray.model import build_model
    from r1ray.model.build import ModelConfig
    from r1ray.train.core.losses import causal_lm_loss

    model = build_model(ModelConfig(preset="debug"), tok, seed=0).eval()
    exs = _examples(tok)
    t = {k: torch.from_numpy(v) for k, v in pack_batch(exs).items()}
    p = {k: torch.from_numpy(v) for k, v in pad_batch(exs, tok.pad_token_id).items()}
    with torch.no_grad():
        packed = causal_lm_loss(model, t["input_ids"], t["targets"], position_ids=t["position_ids"],
                                ignore_index=IGNORE, reduction="none")[0]
        padded = causal_lm_loss(model, p["input_ids"], p["targets"], attention_mask=p["attention_mask"],
                                ignore_index=IGNORE, reduction="none")
        alone = []
        for e in exs:
            one = {k: torch.from_numpy(v) for k, v in pad_batch([e], tok.pad_token_id).items()}
            alone.append(causal_lm_loss(model, one["input_ids"], one["targets"], ignore_index=IGNORE,
                                        reduction="none")[0])
    at = 0
    for k, a in enumerate(alone):
        torch.testing.assert_close(packed[at : at + len(a)], a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[k, : len(a)], a, rtol=1e-5, atol=1e-5)
        assert (a > 0).sum() == exs[k].n_targets  # a loss exactly on the assistant targets
        at += len(a)
    # without position ids restarting, attention would cross: the packed losses would differ (the test can fail)
    with torch.no_grad():
        crossed = causal_lm_loss(model, t["input_ids"], t["targets"], ignore_index=IGNORE, reduction="none")[0]
    assert not torch.allclose(crossed[len(alone[0]):], packed[len(alone[0]):], atol=1e-4)


def test_jsonl_loads_and_malformed_rows_name_the_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert len(load_jsonl(f)) == 2
    cases = {
        "{not json": "not valid JSON",
        json.dumps({"text": "x"}): "'messages' list",
        json.dumps({"messages": []}): "non-empty list",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}): "role must be one of",
        json.dumps({"messages": [{"role": "user", "content": 3}]}): "content must be a string",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}): "no non-empty assistant",
        json.dumps({"messages": [{"role": "assistant", "content": "x", "reasoning_content": 1}]}): "reasoning_content",
    }
    for bad, why in cases.items():
        f.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=why) as e:
            load_jsonl(f)
        assert f"{f}:3:" in str(e.value)
    with pytest.raises(ValueError, match="is not a file"):
        load_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_plan_names_unset_and_bad_inputs(tiny_tokenizer_dir, tmp_path):
    from r1ray.config import load_config
    from r1ray.model import build_model, save_model
    from r1ray.model.build import ModelConfig
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.train.stages.sft import SFTConfig, SFTStage, plan_problems

    with pytest.raises(ValueError, match="model.init_from is unset"):
        SFTStage.plan(SFTConfig())
    tok = load_tokenizer(tiny_tokenizer_dir)
    init = save_model(build_model(ModelConfig(preset="debug", max_position_embeddings=64), tok, seed=0), tok,
                      tmp_path / "init")
    cfg = load_config(SFTConfig, [f"model.init_from={init}", "data.max_length=100", "data.tasks={nope: 1.0}",
                                  "data.difficulty={1: 0.5, 7: 0.5}"])
    problems = " | ".join(plan_problems(cfg))
    assert "data.max_length=100 > the model's max_position_embeddings 64" in problems
    assert "unknown task 'nope'" in problems
    cfg = load_config(SFTConfig, [f"model.init_from={init}", "data.max_length=64", "data.difficulty={1: 0.5, 7: 0.5}"])
    assert "task 'arithmetic' has no difficulty level [7]" in " | ".join(plan_problems(cfg))
    cfg = load_config(SFTConfig, [f"model.init_from={tmp_path}", "data.max_length=64"])
    assert "not a Hugging Face model directory" in plan_problems(cfg)[0]
    with pytest.raises(Exception, match="data.eval_path is set without data.path"):
        load_config(SFTConfig, ["data.eval_path=x.jsonl"])


def test_generated_lists_are_seeded_disjoint_and_split_by_difficulty_weight():
    from r1ray.config import load_config
    from r1ray.train.stages.sft import SFTConfig, conversations, eval_problems, task_problems

    cfg = load_config(SFTConfig, ["data.train_examples=40", "data.difficulty={1: 0.75, 2: 0.25}",
                                  "train.eval_samples=8", "eval.problems_per_difficulty=5"])
    train = task_problems(cfg, 40, "train")
    assert [p.difficulty for p in train].count(1) == 30 and [p.difficulty for p in train].count(2) == 10
    assert [p.uid() for p in train] == [p.uid() for p in task_problems(cfg, 40, "train")]  # a pure function
    held = eval_problems(cfg)
    assert sorted(held) == [1, 2, 3] and all(len(v) == 5 for v in held.values())  # every arithmetic level
    assert not {p.uid() for p in train} & {p.uid() for v in held.values() for p in v}
    tr, val = conversations(cfg)
    assert len(tr) == 40 and len(val) == 8


def test_jsonl_holdout_is_seeded_and_disjoint(tmp_path):
    from r1ray.config import load_config
    from r1ray.train.stages.sft import SFTConfig, conversations

    f = tmp_path / "c.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(30)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(SFTConfig, [f"data.path={f}", "train.eval_samples=5"])
    train, val = conversations(cfg)
    assert len(train) == 25 and len(val) == 5
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in val}
    assert conversations(cfg) == (train, val)
    assert cfg.eval_tasks == {}  # no task accuracy on a user's jsonl unless eval.tasks asks for it


def test_replay_rows_join_the_samples_as_plain_language_modelling(tiny_tokenizer_dir, tmp_path):
    """``data.replay``: corpus rows become samples past the conversations (a seeded choice, a pure function of the
    config), every token a target; a missing or differently tokenized corpus is named before any compute."""
    from r1ray.config import load_config
    from r1ray.data.synthetic_shards import write_data_artifact
    from r1ray.model import build_model, save_model
    from r1ray.model.build import ModelConfig
    from r1ray.model.tokenizer import load_tokenizer, train_tokenizer
    from r1ray.train.stage import WorkerInfo
    from r1ray.train.stages.sft import SFTConfig, SFTStage, plan_problems, replay_rows

    tok = load_tokenizer(tiny_tokenizer_dir)
    init = save_model(build_model(ModelConfig(preset="debug", max_position_embeddings=256), tok, seed=0), tok,
                      tmp_path / "init")
    data = write_data_artifact(tmp_path / "data", tiny_tokenizer_dir, seq_len=32, train_docs=200)
    base = [f"model.init_from={init}", "data.train_examples=30", "data.max_length=256", "data.layout=pack"]
    cfg = load_config(SFTConfig, [*base, "data.replay.fraction=0.25", f"data.replay.data={data}",
                                  "data.replay.rows=1"])
    assert plan_problems(cfg) == []
    rows, order = replay_rows(cfg, 30)
    assert len(order) == 10 and len(set(order.tolist())) == 10 and order.max() < len(rows)  # 0.25 of 40 samples
    assert np.array_equal(order, replay_rows(cfg, 30)[1])
    stage = SFTStage(cfg)
    stage.worker = WorkerInfo(rank=0, world_size=1, local_rank=0, use_gpu=False, device="cpu")
    stage.setup(stage.worker, {})
    assert stage.num_samples() == 40
    batch = stage.make_batch(np.array([0, 35]), "cpu")  # one conversation, one corpus row
    row = np.asarray(rows[order[5]], dtype=np.int64)
    assert batch["input_ids"][0, -31:].tolist() == row[:-1].tolist()  # the row, packed after the conversation
    assert batch["targets"][0, -31:].tolist() == row[1:].tolist()  # every token of it a target
    # data.replay.rows=2: a sample is two consecutive rows, one 64-token window of the stream
    long = load_config(SFTConfig, [*base, "data.replay.fraction=0.25", f"data.replay.data={data}", "data.replay.rows=2"])
    stage = SFTStage(long)
    stage.setup(WorkerInfo(rank=0, world_size=1, local_rank=0, use_gpu=False, device="cpu"), {})
    w = int(stage.replay_order[5])
    assert stage.replay_order.max() < len(rows) // 2
    sample = stage._replay(35)
    assert sample.ids.tolist() == [*map(int, rows[2 * w]), *map(int, rows[2 * w + 1])] and sample.target.all()
    # unset data, another tokenizer: named before any compute
    assert "needs data.replay.data" in plan_problems(load_config(SFTConfig, [*base, "data.replay.fraction=0.2"]))[0]
    other = train_tokenizer([f"other text {i}" for i in range(300)], tmp_path / "tok2", vocab_size=300)
    assert other is not None
    other_data = write_data_artifact(tmp_path / "data2", tmp_path / "tok2", seq_len=32, train_docs=50)
    cfg = load_config(SFTConfig, [*base, "data.replay.fraction=0.2", f"data.replay.data={other_data}"])
    assert "another tokenizer" in plan_problems(cfg)[0]
