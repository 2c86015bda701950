"""Structured outputs, forced tool calls, the thinking budget and the prefix cache of the HF engine, in-process
on a random tiny Llama (which never writes valid JSON on its own), plus the tool-call parser and renderer."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from r1ray.infer import SamplingParams
from r1ray.infer.hf import HFEngine, PrefixCache
from r1ray.infer.text import count_reasoning_tokens, split_reasoning
from r1ray.infer.types import Guidance
from r1ray.model.tokenizer import END_THINK, THINK, render_chat
from r1ray.serve.tools import ToolCallStream, forced_guidance, parse_tool_calls, render_prompt

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "unit": {"type": "string", "enum": ["cm", "kg"]},
                                           "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                                    "maxItems": 3}},
          "required": ["answer", "unit", "tags"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"}}, "required": ["city"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def engine(tiny_tokenizer_dir):
    from r1ray.model.build import ModelConfig, build_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(preset="debug", max_position_embeddings=1024), tok, seed=0)
    eng = HFEngine(model, tok, max_batch_size=8, prefix_cache_mb=16, prefix_block_tokens=8)
    yield eng
    eng.shutdown()


def _answer(engine, out) -> str:
    reasoning, content = split_reasoning(out.text, out.finish_reason)
    return content if reasoning is not None else out.text


def test_json_schema_holds_for_sampled_and_greedy_choices(engine):
    g = Guidance("json_schema", json.dumps(SCHEMA))
    free = engine.generate(["the a of"] * 4, [SamplingParams(max_tokens=80, temperature=1.0, seed=i)
                                              for i in range(4)])
    assert not any(_valid(o.text) for o in free), "the random model writes valid JSON unconstrained: a weak test"
    # a random model that opens <think> may never close it: a budget makes every reply reach its answer
    params = [SamplingParams(max_tokens=150, temperature=1.0, seed=i, guidance=g, thinking_budget=8) for i in range(6)]
    params.append(SamplingParams(max_tokens=150, temperature=0, guidance=g, thinking_budget=8))
    for out in engine.generate(["the a of"] * len(params), params):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(_answer(engine, out)), SCHEMA)


def _valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_regex_choice_and_json_object(engine):
    outs = engine.generate(["we"] * 3, [
        SamplingParams(max_tokens=40, temperature=1.0, seed=1, thinking_budget=0,
                       guidance=Guidance("regex", r"[0-9]{3}-[a-z]{2,4}")),
        SamplingParams(max_tokens=40, temperature=1.0, seed=2, thinking_budget=0,
                       guidance=Guidance("choice", choices=("yes", "no", "maybe so"))),
        SamplingParams(max_tokens=40, temperature=1.0, seed=3, thinking_budget=0,
                       guidance=Guidance("json_object"))])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", outs[0].text), outs[0].text
    assert outs[1].text in ("yes", "no", "maybe so")
    assert all(o.finish_reason == "stop" for o in outs[:2])
    assert outs[2].text.startswith("{")  # any JSON object: the random model's keys run long; a closed one below
    objs = engine.generate(["we"] * 8, [SamplingParams(max_tokens=200, temperature=1.0, seed=i, thinking_budget=0,
                                                       guidance=Guidance("json_object")) for i in range(8)])
    done = [o for o in objs if o.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(o.text), dict) for o in done)


def test_constraint_starts_after_the_thinking(engine):
    """A reply that thinks (here: a prompt that opened <think>) thinks freely; after </think> the grammar holds."""
    g = Guidance("regex", "[a-z]{5}")
    outs = engine.generate(["the a of"] * 4, [SamplingParams(max_tokens=60, temperature=1.0, seed=i, guidance=g,
                                                             thinking_budget=6, starts_in_thinking=True)
                                              for i in range(4)])
    for o in outs:
        n = o.token_ids.index(engine.end_think_id)
        assert n <= 6  # the budget: at most 6 thinking tokens, then </think>
        assert not re.fullmatch("[a-z]*", engine.tokenizer.decode(o.token_ids[:n]))  # the thinking is not constrained
        assert re.fullmatch("[a-z]{5}", split_reasoning(o.text, o.finish_reason, prefilled=True)[1]), o.text


def test_thinking_budget_forces_end_of_thinking(engine):
    base = SamplingParams(max_tokens=30, temperature=1.0, seed=5, starts_in_thinking=True)
    [free] = engine.generate(["the"], base)
    assert engine.end_think_id not in free.token_ids[:4]
    [cut] = engine.generate(["the"], SamplingParams(**{**base.__dict__, "thinking_budget": 4}))
    assert cut.token_ids[:4] == free.token_ids[:4]  # the same thinking until the budget
    assert cut.token_ids[4] == engine.end_think_id
    assert count_reasoning_tokens(cut.token_ids, engine.think_id, engine.end_think_id, prefilled=True,
                                  finish_reason=cut.finish_reason) == 5
    [none] = engine.generate(["the"], SamplingParams(**{**base.__dict__, "starts_in_thinking": False,
                                                         "thinking_budget": 0, "temperature": 0}))
    assert engine.think_id not in none.token_ids[:1]


def test_forced_tool_call_has_valid_arguments(engine):
    outs = engine.generate(["the a"] * 4, [SamplingParams(max_tokens=120, temperature=1.0, seed=i, thinking_budget=2,
                                                          guidance=forced_guidance(TOOLS)) for i in range(4)])
    names = set()
    for o in outs:
        content, calls = parse_tool_calls(_answer(engine, o))
        assert content is None and len(calls) == 1, o.text
        fn = calls[0]["function"]
        names.add(fn["name"])
        params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == fn["name"])
        jsonschema.validate(json.loads(fn["arguments"]), params)
    [named] = engine.generate(["the a"], SamplingParams(max_tokens=120, temperature=1.0, seed=9, thinking_budget=0,
                                                        guidance=forced_guidance(TOOLS, "add")))
    assert parse_tool_calls(named.text)[1][0]["function"]["name"] == "add"


@pytest.mark.parametrize("g, needle", [
    (Guidance("json_schema", '{"type": "objec"}'), 'invalid JSON schema: Unsupported type "objec"'),
    (Guidance("json_schema", "{nope"), "the JSON schema is not valid JSON"),
    (Guidance("regex", "(ab"), "invalid regex"),
    (Guidance("grammar", "root ::= missing"), "invalid grammar"),
    (Guidance("choice"), "choice needs at least one string"),
])
def test_invalid_guidance_is_a_value_error_naming_it(engine, g, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        engine.generate(["x"], SamplingParams(max_tokens=4, guidance=g))
    assert engine.load()["pending"] == 0  # refused before it took a slot


def test_prefix_cache_reuses_kv_and_changes_no_token(engine, tiny_tokenizer_dir):
    from r1ray.model.tokenizer import load_tokenizer

    plain = HFEngine(engine.model, load_tokenizer(tiny_tokenizer_dir), max_batch_size=8)
    g = torch.Generator().manual_seed(0)
    system = torch.randint(10, engine.vocab_size - 10, (100,), generator=g).tolist()
    prompts = [system + [11 + i, 12] for i in range(3)]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    hits0 = engine.prefix_cache.hits
    with_cache = [engine.generate([p], greedy)[0].token_ids for p in prompts]
    assert engine.prefix_cache.hits - hits0 == 2  # the 2nd and 3rd prompts found the first's 96-token prefix
    assert engine.prefix_stats["cached_tokens"] >= 2 * 96
    assert with_cache == [plain.generate([p], greedy)[0].token_ids for p in prompts]
    plain.shutdown()


def test_identical_prompts_of_a_batch_are_prefilled_once(tiny_tokenizer_dir, engine):
    from r1ray.model.tokenizer import load_tokenizer

    eng = HFEngine(engine.model, load_tokenizer(tiny_tokenizer_dir), max_batch_size=8)
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=i) for i in range(4)]
    together = eng.generate(["the a of the"] * 4, params)
    n = len(together[0].prompt_token_ids)
    assert eng.prefix_stats["shared_tokens"] == 3 * n
    alone = [eng.generate(["the a of the"], p)[0].token_ids for p in params]
    assert [o.token_ids for o in together] == alone
    eng.shutdown()


def test_prefix_cache_lru_eviction_and_collision_check():
    t = lambda n: torch.zeros(1, 1, n, 2)  # noqa: E731 - one layer, 8 bytes per token per tensor
    cache = PrefixCache(max_bytes=2 * 2 * 8 * 8, block=4)  # room for two 8-token prefixes (keys and values)
    a, b, c = [1] * 9, [2] * 9, [3] * 9
    for ids in (a, b):
        cache.insert(ids, [(t(9), t(9))])
    assert cache.lookup(a + [5])[0] == 8
    cache.insert(c, [(t(9), t(9))])  # evicts b, the least recently used
    assert cache.lookup(b + [5]) is None and cache.lookup(c + [5])[0] == 8
    assert cache.lookup([1] * 5 + [7] * 4)[0] == 4  # a shared first block
    assert cache.lookup([7] * 9) is None


def test_tool_call_parser_and_stream():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
           '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    stream, out = ToolCallStream(), []
    for i in range(0, len(text), 3):
        out += stream.feed(text[i:i + 3])
    out += stream.feed("", True)
    assert "".join(x for k, x in out if k == "content").strip() == "Let me check."
    assert [(x["index"], x["function"]["name"]) for k, x in out if k == "tool_call"] == [(0, "get_weather"), (1, "add")]
    both = ToolCallStream().feed(text, True)  # two calls in one delta: indexes 0 and 1
    assert [x["index"] for k, x in both if k == "tool_call"] == [0, 1]
    broken = ToolCallStream()
    assert broken.feed("hi <tool_call>{", True) == [("content", "hi "), ("content", "<tool_call>{")]


def test_tool_prompt_rendering():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
    assert render_prompt(msgs, None) == render_chat(msgs, add_generation_prompt=True)
    p = render_prompt(msgs + [
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": "4 C"}, {"role": "tool", "content": "rain"}], [TOOLS[0]])
    assert p.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and '"name": "get_weather"' in p
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            "</tool_call><|im_end|>\n") in p
    assert ("<|im_start|>user\n<tool_response>\n4 C\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n") in p


def test_count_reasoning_tokens_follows_split_reasoning():
    think, end = 1, 2
    assert count_reasoning_tokens([1, 5, 6, 2, 7], think, end, prefilled=False, finish_reason="stop") == 4
    assert count_reasoning_tokens([5, 1, 2], think, end, prefilled=False, finish_reason="stop") == 0
    assert count_reasoning_tokens([5, 6], think, end, prefilled=True, finish_reason="length") == 2
    assert count_reasoning_tokens([1, 5, 6], think, end, prefilled=False, finish_reason="stop") == 0
    assert THINK != END_THINK


def test_generate_decodes_once_and_equals_the_streamed_text(engine):
    """``generate`` decodes a sequence's text once at its end; it equals the text token-by-token decoding (what
    ``stream`` sends) builds from the same tokens (random byte-level tokens: incomplete UTF-8 characters too)."""
    from r1ray.infer.hf import _Seq

    outs = engine.generate(["the a of"] * 12, [SamplingParams(max_tokens=40, temperature=1.0, seed=i)
                                               for i in range(12)])
    for o in outs:
        seq = _Seq([1], SamplingParams(), lambda ev: None)
        for tid in o.token_ids:
            if tid in engine.stop_token_ids:
                break
            seq.out_ids.append(tid)
            engine._detok(seq)
        assert o.text == seq.text
    assert any("\ufffd" in o.text for o in outs)  # the hard case is exercised
