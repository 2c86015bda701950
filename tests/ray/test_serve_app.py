"""The OpenAI-compatible Serve app, live on a local Ray: the official ``openai`` client, malformed requests
(named cases, then a probe of 200+ varied ones at concurrency 8), admission control (429), client
disconnects, greedy parity with the engine called in-process, vLLM's tokenizer routes, prompt scoring, the
``reasoning_content`` rules end to end, and lm-evaluation-harness's ``local-completions`` running both request
types against the app.

One Serve app for the whole module (cold start is the slow part). The served model is a tiny Llama whose
greedy reply to QUESTION is REPLY exactly (embedding rows wired into a token chain; attention stays random),
so ``reasoning_content`` and harness scores can be checked end to end without training. The engine is placed
on CPU in float32 explicitly, so the same numbers hold on a GPU machine.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port

RAY_NUM_CPUS = 3
API_KEY = "sk-test-r1ray"
QUESTION = "What is 2 + 3?"
REASONING, ANSWER = "the of and it", "she is 5"
REPLY = f"<think>{REASONING}</think>{ANSWER}"




def build_chain_model(tokenizer_dir, out_dir) -> str:
    """A random tiny Llama whose greedy continuation of the chat prompt for QUESTION is REPLY + <|im_end|>."""
    import torch

    from r1ray.model.build import ModelConfig, build_model, save_model
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = build_model(ModelConfig(preset="debug", max_position_embeddings=4096, tie_word_embeddings=False), tok,
                        seed=0)
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                     add_generation_prompt=True)
    last = tok(prompt, add_special_tokens=False)["input_ids"][-1]
    chain = [last, *tok(REPLY, add_special_tokens=False)["input_ids"], tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain), "the chain needs distinct tokens"
    # Dims 0..k-1 of the residual stream belong to the chain alone: zero them in every other embedding and in
    # every layer's output projections, so other tokens still get the random model's (diverse) predictions.
    k = len(chain) - 1
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    with torch.no_grad():
        emb[:, :k] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:k] = 0
            layer.mlp.down_proj.weight[:k] = 0
        for i, (a, b) in enumerate(zip(chain, chain[1:], strict=False)):
            emb[a] = 0
            emb[a, i] = 30.0
            head[b] = 0
            head[b, i] = 30.0
    save_model(model, tok, out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    return build_chain_model(tiny_tokenizer_dir, tmp_path_factory.mktemp("serve") / "chain-llama")


@pytest.fixture(scope="module")
def server(ray_local, model_dir):
    from ray import serve

    from r1ray.serve.config import ServeConfig
    from r1ray.serve.launch import run

    port = free_port(18000)
    cfg = ServeConfig.model_validate({
        "model_path": model_dir, "model_name": "chain", "http": {"port": port},
        "auth": {"api_key": API_KEY}, "deployment": {"num_cpus": 1},
        "engine": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01, "device": "cpu", "dtype": "float32"},
        "limits": {"max_queue": 6, "max_n": 4, "max_prompts": 32},
    })
    announced = []
    info = run(cfg.model_copy(update={"blocking": False}), announce=announced.append)  # what jobs/serve.py runs
    assert announced == [info]
    assert info.url == f"http://127.0.0.1:{port}" and "Authorization: Bearer" in info.curl
    yield info
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def _health(http) -> dict:
    r = http.get("/health")
    assert r.status_code == 200
    return r.json()


def _assert_alive(http) -> None:
    r = http.post("/v1/completions", json={"model": "chain", "prompt": "the", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_models_and_health(client, http):
    [card] = client.models.list().data
    assert card.id == "chain"
    assert _health(http)["status"] == "ok"
    assert httpx.get(http.base_url.join("/health")).status_code == 200  # probes need no key


def test_chat_reasoning_content_with_openai_client(client):
    r = client.chat.completions.create(model="chain", messages=[{"role": "user", "content": QUESTION}],
                                       temperature=0, max_tokens=40)
    msg = r.choices[0].message
    assert msg.content == ANSWER
    assert msg.model_extra["reasoning_content"] == REASONING
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 11  # <think>, 4 words, </think>, 2 words, " ", "5" (digits stand alone), <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + 11


def test_chat_streaming_splits_reasoning(client):
    stream = client.chat.completions.create(model="chain", messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True})
    reasoning, content, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == (REASONING, ANSWER, "stop")
    assert usage is not None and usage.completion_tokens == 11


def test_greedy_http_equals_engine_in_process(client, model_dir):
    from r1ray.infer import SamplingParams
    from r1ray.infer.hf import HFEngine

    prompts = ["a to in", "was he they", "1 + 2 =", "we you at by that for on with as"]
    eng = HFEngine.from_dir(model_dir, device="cpu", dtype="float32", torch_threads=1)
    try:
        outs = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    finally:
        eng.shutdown()
    direct = [c.text for c in outs]
    # Sequentially, then all at once (batched together in the replica, with left padding).
    one_by_one = [client.completions.create(model="chain", prompt=p, max_tokens=24, temperature=0).choices[0].text
                  for p in prompts]
    r = client.completions.create(model="chain", prompt=prompts, max_tokens=24, temperature=0)
    assert one_by_one == direct
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == direct
    assert [c.finish_reason for c in sorted(r.choices, key=lambda c: c.index)] == [c.finish_reason for c in outs]
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in outs)


def test_completion_streaming_stop_seed_n(client):
    kw = dict(model="chain", prompt="a to in", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == full
    # A stop string cuts the text before it and finishes with "stop".
    stop = full[5:9]
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    # Seeded sampling is reproducible; n choices each get their own seed.
    kw = dict(model="chain", prompt="a to in", max_tokens=12, temperature=1.0, top_p=0.95, seed=7, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    ta = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert ta == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(ta) == 3 and len(set(ta)) > 1


def test_logprobs_and_echo_shapes(client):
    r = client.completions.create(model="chain", prompt="the a of", max_tokens=5, temperature=0, logprobs=2,
                                  echo=True)
    c = r.choices[0]
    n_prompt = r.usage.prompt_tokens
    assert c.text.startswith("the a of")
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == c.text and lp.text_offset[1] == len(lp.tokens[0])
    # Greedy: the chosen token is the most likely one, and each top_logprobs dict holds the asked-for alternatives.
    for tok, x, top in zip(lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:], lp.top_logprobs[n_prompt:], strict=False):
        assert max(top.values()) == pytest.approx(x) and top[tok] == pytest.approx(x) and len(top) >= 2


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="chain", messages=[{"role": "user", "content": QUESTION}],
                                       temperature=0, max_tokens=40, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 11 and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content[:-1]) == REPLY


MALFORMED = [
    # (name, body bytes or json, headers, status, text that must be in the message)
    ("bad json", b'{"model": "chain", "prompt": ', None, 400, "not valid JSON"),
    ("not an object", b"[1, 2]", None, 400, "JSON object"),
    ("invalid utf-8", b'{"model": "chain", "prompt": "\xff\xfe"}', None, 400, "UTF-8"),
    ("lone surrogate", b'{"model": "chain", "prompt": "\\ud800"}', None, 400, "Unicode"),
    ("wrong type", {"model": "chain", "prompt": "hi", "temperature": "hot"}, None, 400, "temperature"),
    ("bool as int", {"model": "chain", "prompt": "hi", "max_tokens": True}, None, 400, "max_tokens"),
    ("negative max_tokens", {"model": "chain", "prompt": "hi", "max_tokens": -5}, None, 400, "max_tokens"),
    ("huge max_tokens", {"model": "chain", "prompt": "hi", "max_tokens": 10**12}, None, 400,
     "maximum context length is 4096"),
    ("oversized prompt", {"model": "chain", "prompt": "the " * 5000}, None, 400, "maximum context length is 4096"),
    ("missing prompt", {"model": "chain"}, None, 400, "prompt: required"),
    ("empty prompt list", {"model": "chain", "prompt": []}, None, 400, "prompt"),
    ("token out of vocab", {"model": "chain", "prompt": [1, 99999]}, None, 400, "outside the vocabulary"),
    ("n too large", {"model": "chain", "prompt": "hi", "n": 100}, None, 400, "n: at most 4 choices per prompt "
     "(limits.max_n)"),
    ("too many prompts", {"model": "chain", "prompt": ["hi"] * 33}, None, 400, "limits.max_prompts"),
    ("seed beyond 64 bits", {"model": "chain", "prompt": "hi", "seed": 2**64}, None, 400, "seed"),
    ("seed + n overflows", {"model": "chain", "prompt": "hi", "seed": 2**63 - 1, "n": 2}, None, 400,
     "seed + n - 1 must be at most 2**63 - 1"),
    ("NaN literal", b'{"model": "chain", "prompt": "hi", "temperature": NaN}', None, 400, "NaN is not valid JSON"),
    ("Infinity literal", b'{"model": "chain", "prompt": "hi", "top_p": -Infinity}', None, 400, "-Infinity"),
    ("overflowing float", b'{"model": "chain", "prompt": "hi", "temperature": 1e999}', None, 400, "out of range"),
    ("5000-digit integer", b'{"model": "chain", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", None, 400,
     "invalid number"),
    ("huge logit_bias", {"model": "chain", "prompt": "hi", "logit_bias": {"5": 1e300}}, None, 400, "logit_bias"),
    ("logit_bias not served", {"model": "chain", "prompt": "hi", "logit_bias": {"5": 3}}, None, 400,
     "not supported"),
    ("penalty not served", {"model": "chain", "prompt": "hi", "presence_penalty": 1.0}, None, 400,
     "presence_penalty"),
    ("best_of above n", {"model": "chain", "prompt": "hi", "best_of": 3}, None, 400, "best_of"),
    ("deeply nested", b'{"model": "chain", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None,
     400, "nests too deeply"),
    ("nested past the limit", b'{"model": "chain", "prompt": "hi", "x": ' + b"[" * 40 + b"]" * 40 + b"}", None,
     400, "limits.max_json_depth"),
    ("max_tokens 0 without echo", {"model": "chain", "prompt": "hi", "max_tokens": 0}, None, 400, "echo"),
    ("17 stops", {"model": "chain", "prompt": "hi", "stop": ["x"] * 17}, None, 400, "limits.max_stop"),
    ("stop too long", {"model": "chain", "prompt": "hi", "stop": ["x" * 600]}, None, 400, "limits.max_stop_chars"),
    ("unknown model", {"model": "gpt-9", "prompt": "hi"}, None, 404, "does not exist"),
    ("missing auth", {"model": "chain", "prompt": "hi"}, {"Authorization": ""}, 401, "API key"),
    ("wrong key", {"model": "chain", "prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, "API key"),
]


@pytest.mark.parametrize("name,body,headers,status,needle", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_completion_requests_get_4xx(http, name, body, headers, status, needle):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = http.post("/v1/completions", headers=headers or {}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"], err
    _assert_alive(http)


def test_malformed_chat_requests_get_4xx(http):
    cases = [
        ({"model": "chain"}, "messages"),
        ({"model": "chain", "messages": []}, "messages"),
        ({"model": "chain", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"model": "chain", "messages": [{"role": "user", "content": 5}]}, "content"),
        ({"model": "chain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "4096"),
        ({"model": "chain", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"model": "chain", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 17}, "stop"),
        ({"model": "chain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ]
    for body, needle in cases:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        assert needle in r.json()["error"]["message"], (body, r.text)
    assert http.post("/v1/chat/completions", content=b"{oops").status_code == 400
    _assert_alive(http)


def test_full_queue_answers_429_with_retry_after(http):
    body = {"model": "chain", "prompt": "the", "max_tokens": 400, "temperature": 0, "ignore_eos": True}

    def send(_):
        return http.post("/v1/completions", json=body)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(send, range(16)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 4, codes
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"
    assert _health(http)["pending"] == 0
    _assert_alive(http)


def _wait_idle(http, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if _health(http)["pending"] == 0:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise AssertionError(f"slot not freed within {timeout} s: {_health(http)}")


def test_client_disconnect_frees_its_slot(http, server):
    body = {"model": "chain", "prompt": "the", "max_tokens": 3500, "temperature": 0, "ignore_eos": True}
    # Streaming: read a few events, then hang up.
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert _health(http)["running"] == 1
    _wait_idle(http, 5.0)
    # Non-streaming: the client gives up after 1 s (3500 tokens take far longer).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=1.0)
    _wait_idle(http, 5.0)
    _assert_alive(http)


def test_error_body_is_openai_shaped(http):
    r = http.post("/v1/completions", json={"model": "chain", "prompt": "hi", "temperature": "x"})
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == "temperature"
    assert json.loads(r.text)  # plain JSON, not a FastAPI detail list


# ---------------------------------------------------------------------------------------------- harness routes


def test_model_by_id_and_tokenizer_routes(http, model_dir):
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    card = http.get("/v1/models/chain").json()
    assert card["id"] == "chain" and card["object"] == "model" and card["max_model_len"] == 4096
    r = http.get("/v1/models/gpt-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # vLLM's shapes: /tokenize (prompt or chat messages), /detokenize, /tokenizer_info.
    r = http.post("/tokenize", json={"model": "chain", "prompt": QUESTION, "return_token_strs": True}).json()
    ids = tok(QUESTION, add_special_tokens=False)["input_ids"]
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == 4096
    assert r["token_strs"] == tok.convert_ids_to_tokens(ids)
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": QUESTION}]}).json()
    rendered = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                       add_generation_prompt=True)
    assert chat["tokens"] == tok(rendered, add_special_tokens=False)["input_ids"] and chat["token_strs"] is None
    assert http.post("/detokenize", json={"tokens": chat["tokens"]}).json() == {"prompt": rendered}
    assert http.post("/detokenize", json={"tokens": [1, 10**6]}).status_code == 400
    assert http.post("/tokenize", json={"prompt": 5}).status_code == 400
    assert http.post("/tokenize", json={"model": "gpt-9", "prompt": "x"}).status_code == 404
    assert httpx.post(http.base_url.join("/tokenize"), json={"prompt": "x"}).status_code == 401
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    # lm-eval's remote tokenizer (tokenizer_backend=remote) works against these routes.
    from lm_eval.utils import RemoteTokenizer

    remote = RemoteTokenizer(str(http.base_url) + "/v1/completions", auth_token=API_KEY)
    assert remote.encode(QUESTION) == ids and remote.decode(ids) == QUESTION
    assert remote.eos_token_id == tok.eos_token_id


def test_echo_with_max_tokens_zero_scores_the_prompt(http):
    body = {"model": "chain", "prompt": ["the a of", "she was at the"], "echo": True, "logprobs": 1, "temperature": 0}
    scored = http.post("/v1/completions", json={**body, "max_tokens": 0})
    assert scored.status_code == 200, scored.text
    one = http.post("/v1/completions", json={**body, "max_tokens": 1}).json()
    s = scored.json()
    assert s["usage"]["completion_tokens"] == 0
    for a, b in zip(sorted(s["choices"], key=lambda c: c["index"]), sorted(one["choices"], key=lambda c: c["index"]),
                    strict=True):
        assert a["finish_reason"] == "length"
        n = len(a["logprobs"]["tokens"])
        assert a["logprobs"]["token_logprobs"] == b["logprobs"]["token_logprobs"][:n]  # the prompt's, exactly
        assert len(b["logprobs"]["tokens"]) == n + 1 and a["text"] == "".join(a["logprobs"]["tokens"])
    assert s["choices"][0]["text"] == "the a of" and s["choices"][0]["logprobs"]["token_logprobs"][0] is None


# ---------------------------------------------------------------------------------------------- reasoning


def _chat_both(client, **kw) -> tuple[tuple[str | None, str | None, str], tuple[str, str, str]]:
    """The whole reply's (reasoning_content, content, finish) and the streamed one's concatenations."""
    msgs = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="chain", messages=msgs, temperature=0, **kw)
    m = r.choices[0].message
    whole = ((m.model_extra or {}).get("reasoning_content"), m.content, r.choices[0].finish_reason)
    reasoning, content, finish = "", "", None
    for chunk in client.chat.completions.create(model="chain", messages=msgs, temperature=0, stream=True, **kw):
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    return whole, (reasoning, content, finish)


def test_reasoning_content_rules_end_to_end(client):
    # Closed: split, verbatim.
    assert _chat_both(client, max_tokens=40) == ((REASONING, ANSWER, "stop"), (REASONING, ANSWER, "stop"))
    # Cut by max_tokens while thinking: reasoning only, content null (streamed: no content).
    whole, streamed = _chat_both(client, max_tokens=3)  # <think>, "the", " of"
    assert whole == ("the of", None, "length") and streamed == ("the of", "", "length")
    # Ended (here by a stop string) without closing </think>: it is the answer, not hidden in reasoning.
    whole, streamed = _chat_both(client, max_tokens=40, stop=["it"])
    assert whole == (None, "the of and ", "stop")
    assert streamed == ("the of and ", "the of and ", "stop")  # reasoning deltas, then the answer as content


# ---------------------------------------------------------------------------------------------- structured outputs, tools, budgets

ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
                 "required": ["answer"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Lima"]}, "days": {
        "type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": False}}}


def _stream_chat(client, **kw):
    reasoning, content, finish, usage, calls = "", "", None, None, {}
    for chunk in client.chat.completions.create(model="chain", stream=True, stream_options={"include_usage": True},
                                                **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:  # assembled as the openai SDK's own helpers do
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
    return reasoning, content, finish, usage, [calls[i] for i in sorted(calls)]


def test_json_schema_output_after_thinking(client):
    """The chain model thinks, then (unconstrained) answers "she is 5"; under a schema it keeps its thinking and
    its answer is JSON valid for the schema, greedy and sampled, whole and streamed."""
    import jsonschema

    msgs = [{"role": "user", "content": QUESTION}]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="chain", messages=msgs, temperature=0, max_tokens=60,
                                       response_format=fmt)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == REASONING == msg.model_extra["reasoning"]
    jsonschema.validate(json.loads(msg.content), ANSWER_SCHEMA)
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="chain", messages=msgs, temperature=1.0, seed=3, n=3, max_tokens=60,
                                       response_format={"type": "json_object"})
    assert all(isinstance(json.loads(c.message.content), dict) for c in r.choices)
    reasoning, content, finish, usage, _ = _stream_chat(client, messages=msgs, temperature=0, max_tokens=60,
                                                         response_format=fmt)
    assert reasoning == REASONING and finish == "stop"
    jsonschema.validate(json.loads(content), ANSWER_SCHEMA)
    assert usage.completion_tokens_details.reasoning_tokens == 6  # <think>, 4 words, </think>


def test_regex_choice_and_invalid_constraints(client, http):
    msgs = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="chain", messages=msgs, temperature=0, max_tokens=40,
                                       extra_body={"structured_outputs": {"regex": "[0-9]{2}-[a-c]{3}"}})
    assert re.fullmatch("[0-9]{2}-[a-c]{3}", r.choices[0].message.content)
    r = client.completions.create(model="chain", prompt="the", max_tokens=20, temperature=0,
                                  extra_body={"guided_choice": ["red", "green"], "thinking_token_budget": 0})
    assert r.choices[0].text in ("red", "green")
    chat = {"model": "chain", "messages": msgs, "max_tokens": 8}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
         'response_format: invalid JSON schema: Unsupported type "objec"'),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
        ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs: invalid regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
        ({"structured_outputs": {"choice": ["b"]}, "response_format": {"type": "json_object"}}, "only one output"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"thinking_token_budget": -1}, "thinking_token_budget"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "no tool named"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [WEATHER, WEATHER]}, "unique"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}]},
         "tools: tool 'f': its parameters are not a valid JSON schema"),
    ]
    for extra, needle in cases:
        r = http.post("/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert needle in r.json()["error"]["message"], (extra, r.text)
    _assert_alive(http)


def test_forced_tool_call_whole_streamed_and_answered(client):
    msgs = [{"role": "user", "content": QUESTION}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="chain", messages=msgs, tools=[WEATHER], tool_choice=named,
                                       temperature=0, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Oslo", "Lima") and 1 <= args["days"] <= 7
    _, content, finish, _, calls = _stream_chat(client, messages=msgs, tools=[WEATHER], tool_choice="required",
                                                temperature=0, max_tokens=200)
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == args
    # The tool's answer goes back; the conversation renders and the model replies.
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "4 C and rain"}]
    r = client.chat.completions.create(model="chain", messages=follow, tools=[WEATHER], temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice none: no tools declared, nothing parsed: the chain model's own reply.
    r = client.chat.completions.create(model="chain", messages=msgs, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=40)
    assert r.choices[0].message.content == ANSWER and not r.choices[0].message.tool_calls


def test_thinking_budget_closes_the_thinking(client):
    msgs = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="chain", messages=msgs, temperature=0, max_tokens=40,
                                       extra_body={"thinking_token_budget": 2})
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "the"  # <think>, "the", then the server's </think>
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    assert msg.content == ANSWER  # the chain goes on from </think>
    r = client.chat.completions.create(model="chain", messages=msgs, temperature=0, max_tokens=40,
                                       reasoning_effort="none")
    assert r.choices[0].message.model_extra.get("reasoning_content") is None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    reasoning, content, _, usage, _ = _stream_chat(client, messages=msgs, temperature=0, max_tokens=40,
                                                   extra_body={"thinking_token_budget": 2})
    assert (reasoning, content, usage.completion_tokens_details.reasoning_tokens) == ("the", ANSWER, 3)


def test_prefix_cache_serves_a_shared_system_prompt(client, http):
    """A long system prompt sent twice: the second request's prompt KV comes from the cache, its reply unchanged."""
    system = " ".join(["the of and it she is"] * 20)
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    before = _health(http)["prefix_cache"]
    first = client.chat.completions.create(model="chain", messages=msgs, temperature=0, max_tokens=12)
    second = client.chat.completions.create(model="chain", messages=msgs, temperature=0, max_tokens=12)
    after = _health(http)["prefix_cache"]
    assert after["hits"] - before["hits"] >= 1
    assert after["cached_tokens"] - before["cached_tokens"] >= 100
    assert first.choices[0].message == second.choices[0].message


# ---------------------------------------------------------------------------------------------- hostile clients


def _probe_cases(rng: random.Random) -> list[tuple[str, str, dict, bytes | None, object]]:
    """(name, method+path, headers, raw body or None, json body) for 200+ malformed requests of varied kinds."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    ok_c = {"model": "chain", "prompt": "the", "max_tokens": 2}
    ok_chat = {"model": "chain", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad_values = [None, True, -1, 0, 10**30, -(10**30), 1e308, -1e-308, "x", "", [], {}, [1], {"a": 1}, 2**64,
                  0.5, -0.5, 3.0]
    fields_c = ["max_tokens", "temperature", "top_p", "top_k", "n", "seed", "logprobs", "echo", "stream", "stop",
                "best_of", "logit_bias", "presence_penalty", "frequency_penalty", "prompt", "model", "ignore_eos",
                "stream_options", "suffix", "user"]
    cases = []
    for f in fields_c:  # wrong types and out-of-range numbers, field by field
        for v in rng.sample(bad_values, 5):
            cases.append((f"completions {f}={v!r:.20}", "POST /v1/completions", auth, None, {**ok_c, f: v}))
    for f in ["messages", "max_tokens", "max_completion_tokens", "top_logprobs", "logprobs", "temperature", "n"]:
        for v in rng.sample(bad_values, 4):
            cases.append((f"chat {f}={v!r:.20}", "POST /v1/chat/completions", auth, None, {**ok_chat, f: v}))
    raw = [
        b"", b"{", b"}", b"null", b"[]", b'"str"', b"123", b'{"model": "chain", "prompt": "the",}', b"\x00\x01",
        b'{"model": "chain", "prompt": "\xc3\x28"}', b"\xff" * 64, b'{"model": "chain", "prompt": "\\ud83d"}',
        b'{"model": "chain", "prompt": "the", "temperature": NaN}', b'{"model": "chain", "prompt": "the", "n": 1e400}',
        b'{"model": "chain", "prompt": "the", "seed": ' + b"1" * 4400 + b"}",
        b'{"model": "chain", "prompt": "the", "x": ' + b"{\"a\":" * 3000 + b"1" + b"}" * 3000 + b"}",
        b'{"model": "chain", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"model": "chain", "prompt": "the"}' + b" trailing", b'{"model": "chain" "prompt": "the"}',
        b"\xef\xbb\xbf" + json.dumps(ok_c).encode(),
    ]
    for i, body in enumerate(raw):
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
            cases.append((f"raw {i} {path}", f"POST {path}", auth, body, None))
    prompts = [[], [[]], [[1, 2], []], [-1], [10**9], [[1], "x"], [1.5], [None], "", " " * 0, [""], ["x"] * 33,
               [[1] * 5000], "the " * 5000]
    for p in prompts:
        cases.append((f"prompt {str(p)[:20]}", "POST /v1/completions", auth, None, {**ok_c, "prompt": p}))
    stops = [[""], ["a"] * 17, [5], "", [None], ["x" * 1000], {"a": 1}, [["a"]]]
    for st in stops:
        cases.append((f"stop {str(st)[:20]}", "POST /v1/completions", auth, None, {**ok_c, "stop": st}))
    for n, best_of in [(0, None), (-1, None), (5, None), (2, 1), (2, 3), (1, 0), (10**6, None)]:
        cases.append((f"n={n} best_of={best_of}", "POST /v1/completions", auth, None, {**ok_c, "n": n,
                                                                                      "best_of": best_of}))
    msgs = [[], [{}], [{"role": "user"}, 5], [{"role": "user", "content": [{"type": "image_url"}]}],
            [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": 1, "content": "x"}], "hi",
            [{"role": "user", "content": "x", "name": 5}]]
    for m in msgs:
        cases.append((f"messages {str(m)[:20]}", "POST /v1/chat/completions", auth, None, {**ok_chat,
                                                                                          "messages": m}))
    for h in [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer x" * 500},
              {"Authorization": f"bearer  {API_KEY}x"}, {"Authorization": f"Bearer {API_KEY[:-1]}"}]:
        for path in ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "POST /tokenize"):
            cases.append((f"auth {str(h)[:20]} {path}", path, h, None, ok_c))
    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "image/png",
               "application/json; charset=latin-1"]:
        cases.append((f"content-type {ct}", "POST /v1/completions", {**auth, "Content-Type": ct},
                      json.dumps(ok_c).encode(), None))
        cases.append((f"form body {ct}", "POST /v1/completions", {**auth, "Content-Type": ct}, b"a=1&b=2", None))
    cases.append(("oversize body", "POST /v1/completions", auth, b'{"prompt": "' + b"x" * 4_100_000 + b'"}', None))
    for path in ("GET /v1/completions", "PUT /v1/chat/completions", "DELETE /v1/models", "POST /v1/models",
                 "GET /v1/nope", "POST /detokenize", "GET /v1/models/%00", "GET /v1/models/" + "x" * 3000):
        cases.append((f"route {path[:30]}", path, auth, b"{}", None))
    for tokens in [[-1], ["a"], [1.5], None, [[1]], [10**20]]:
        cases.append((f"detokenize {tokens}", "POST /detokenize", auth, None, {"tokens": tokens}))
    return cases


def test_probe_of_malformed_requests_gets_no_5xx(http, server):
    """200+ malformed requests of varied kinds at concurrency 8 (bounded, loopback): every answer is a 4xx (or a
    200 for the few that are valid after all), never a 5xx, and the server answers normally afterwards."""
    cases = _probe_cases(random.Random(0))
    assert len(cases) >= 200

    def send(case):
        name, route, headers, raw, body = case
        method, path = route.split(" ", 1)
        kw = {"content": raw} if raw is not None else ({"json": body} if body is not None else {})
        with httpx.Client(base_url=server.url, timeout=60) as c:
            try:
                r = c.request(method, path, headers=headers, **kw)
            except httpx.HTTPError as e:  # a dropped connection would be a failure too
                return name, -1, str(e)
        return name, r.status_code, r.text[:200]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, cases))
    bad = [(n, code, text) for n, code, text in results if code >= 500 or code < 0]
    assert not bad, bad[:10]
    codes = {code for _, code, _ in results}
    assert {400, 401, 404, 413} <= codes, codes
    assert sum(code < 300 for _, code, _ in results) < len(results) // 2  # mostly refused, as they should be
    assert _health(http)["pending"] == 0
    _assert_alive(http)
    r = http.post("/v1/chat/completions", json={"model": "chain", "messages": [{"role": "user", "content": QUESTION}],
                                                "temperature": 0, "max_tokens": 40})
    assert r.json()["choices"][0]["message"]["content"] == ANSWER


# ---------------------------------------------------------------------------------------------- lm-eval


LM_EVAL_TASKS = """\
task: r1ray_chain_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
---
task: r1ray_chain_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["</think>"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_local_completions_runs_both_request_types(server, model_dir, tmp_path):
    """lm-evaluation-harness's ``local-completions`` against the app, as docs/serve.md shows it: a multiple-choice
    task (loglikelihood requests, batched 4 prompts per request) and a generation task (generate_until), both on
    local files, with the tokenizer from the model directory and the hub offline. The chain model makes the
    right answers certain, so the scores prove the requests were answered correctly, not merely answered."""
    from r1ray.model.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    context = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                      add_generation_prompt=True)
    wrong = "<think>she is 5</think>the of and it"
    docs = [{"context": context, "choices": [REPLY, wrong] if i % 2 == 0 else [wrong, REPLY], "label": i % 2,
             "target": f"<think>{REASONING}"} for i in range(4)]
    data = tmp_path / "chain.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for k, text in enumerate(LM_EVAL_TASKS.format(data=data).split("---\n")):
        (tasks / f"task{k}.yaml").write_text(text)
    out = tmp_path / "out"
    cmd = [
        str(Path(sys.executable).parent / "lm-eval"), "run", "--model", "local-completions",
        "--model_args", f"model=chain,base_url={server.url}/v1/completions,tokenizer={model_dir},"
                        "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1",
        "--batch_size", "4", "--tasks", "r1ray_chain_mc,r1ray_chain_gen", "--include_path", str(tasks),
        "--output_path", str(out),
    ]
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    [results_file] = list(out.rglob("results*.json"))
    results = json.loads(results_file.read_text())["results"]
    assert results["r1ray_chain_mc"]["acc,none"] == 1.0, results
    assert results["r1ray_chain_gen"]["exact_match,none"] == 1.0, results
