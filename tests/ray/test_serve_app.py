"""The OpenAI-compatible Serve app, live on a local Ray: the official ``openai`` client, malformed requests,
admission control (429), client disconnects, and greedy parity with the engine called in-process.

One Serve app for the whole module (cold start is the slow part). The served model is a tiny Llama whose
greedy reply to QUESTION is REPLY exactly (embedding rows wired into a token chain; attention stays random),
so ``reasoning_content`` can be checked end to end without training.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

RAY_NUM_CPUS = 3
API_KEY = "sk-test-r1ray"
QUESTION = "What is 2 + 3?"
REASONING, ANSWER = "the of and it", "she is 5"
REPLY = f"<think>{REASONING}</think>{ANSWER}"


def _free_port(start: int = 18000) -> int:
    for port in range(start, start + 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 18000-19000")


def build_chain_model(tokenizer_dir, out_dir) -> str:
    """A random tiny Llama whose greedy continuation of the chat prompt for QUESTION is REPLY + <|im_end|>."""
    import torch

    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.model.build import ModelConfig, build_model, save_model

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

    port = _free_port()
    cfg = ServeConfig.model_validate({
        "model_path": model_dir, "model_name": "chain", "http": {"port": port},
        "auth": {"api_key": API_KEY}, "deployment": {"num_cpus": 1},
        "engine": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}, "limits": {"max_queue": 6, "max_n": 4},
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
    assert r.usage.completion_tokens == 10  # <think>, 4 words, </think>, 3 words, <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10


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
    assert usage is not None and usage.completion_tokens == 10


def test_greedy_http_equals_engine_in_process(client, model_dir):
    from r1ray.infer import SamplingParams
    from r1ray.infer.hf import HFEngine

    prompts = ["a to in", "was he they", "1 + 2 =", "we you at by that for on with as"]
    eng = HFEngine.from_dir(model_dir, torch_threads=1)
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
    assert len(content) == 10 and all(len(t.top_logprobs) == 3 for t in content)
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
    ("n too large", {"model": "chain", "prompt": "hi", "n": 100}, None, 400, "n: at most 4"),
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
        ({"model": "chain", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "stop"),
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
