"""A/B serving live on a local Ray: one application with two variants (``a`` at 90, ``b`` at 10) behind the
router, alias ``r1ray``. Requests naming a variant reach it; the alias splits by weight (400 requests at
concurrency 8, realised share within a binomial bound); a user id keeps a client on one variant (the exact
variant the hash picks); a redeploy with new weights (in place) and a changed variant (replaced) drops none of
the requests in flight. One app for the module: the cold start is the slow part.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import free_port, save_tiny_model

RAY_NUM_CPUS = 3  # two variants of 0.5 CPU, a surge replica during the redeploy, the router, the proxy
ALIAS = "r1ray"
WEIGHTS = {"a": 90, "b": 10}




@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_tiny_model(tiny_tokenizer_dir, tmp_path_factory.mktemp("ab") / "debug-llama", max_positions=1024)


def ab_config(model_dir: str, port: int, weights: dict[str, float], b_engine: dict | None = None):
    from r1ray.serve.config import ServeConfig

    return ServeConfig.model_validate({
        "variants": {"a": {"model_path": model_dir, "weight": weights["a"]},
                     "b": {"model_path": model_dir, "weight": weights["b"], "engine": b_engine or {}}},
        "aliases": [ALIAS], "http": {"port": port}, "auth": {"api_key_env": None},
        "deployment": {"num_cpus": 0.5, "graceful_shutdown_timeout_s": 60},
        "engine": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005, "device": "cpu", "dtype": "float32"},
    })


@pytest.fixture(scope="module")
def app(ray_local, model_dir):
    from ray import serve

    from r1ray.serve.launch import deploy

    cfg = ab_config(model_dir, free_port(), WEIGHTS)
    t0 = time.monotonic()
    info = deploy(cfg)
    print(f"A/B app ready in {time.monotonic() - t0:.1f} s")
    assert info.model_name == ALIAS and "a=" in info.model_path and "(90%)" in info.model_path
    yield {"cfg": cfg, "info": info}
    serve.shutdown()


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(base_url=app["info"].url, timeout=120) as c:
        yield c


def complete(http, model: str | None = ALIAS, user: str | None = None, header: bool = True, **kw) -> httpx.Response:
    body = {"prompt": "the", "max_tokens": 1, "temperature": 0, **kw}
    if model is not None:
        body["model"] = model
    headers = {}
    if user is not None:
        if header:
            headers["X-User-Id"] = user
        else:
            body["user"] = user
    return http.post("/v1/completions", json=body, headers=headers)


def test_models_health_and_routing_by_name(app, http):
    import openai

    client = openai.OpenAI(base_url=app["info"].url + "/v1", api_key="unused", max_retries=0, timeout=60)
    cards = {c.id: c for c in client.models.list().data}
    assert set(cards) == {"a", "b", ALIAS}
    assert cards[ALIAS].model_extra["split"] == {"a": 0.9, "b": 0.1}
    assert cards["a"].model_extra["max_model_len"] == 1024
    health = http.get("/health").json()
    assert health["status"] == "ok" and set(health["variants"]) == {"a", "b"} and health["weights"] == WEIGHTS
    # a variant's name reaches that variant, through the official client too
    for name in ("a", "b"):
        for _ in range(3):
            assert client.completions.create(model=name, prompt="the", max_tokens=2).model == name
    # no model: a completion needs one (the variant's own 400), /tokenize goes to the first alias
    nomodel = complete(http, model=None)
    assert nomodel.status_code == 400 and "model" in nomodel.json()["error"]["message"]
    assert http.post("/tokenize", json={"prompt": "the a"}).json()["count"] >= 2
    # streamed chat through the router ends with [DONE]
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["model"] == "b"
    # the variants' own validation, byte for byte; the router's 404 names what is served
    bad = complete(http, model="b", temperature=9)
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    missing = complete(http, model="c")
    assert missing.status_code == 404 and "'a', 'b', 'r1ray'" in missing.json()["error"]["message"]
    assert http.post("/v1/completions", content=b"{not json").status_code == 400
    assert http.get("/tokenizer_info", params={"model": "b"}).json()["model_max_length"] == 1024
    assert http.post("/tokenize", json={"model": ALIAS, "prompt": "the a"}).json()["count"] >= 2
    assert complete(http, model="a").status_code == 200  # still serving


def test_alias_splits_by_weight(http):
    """400 unsticky requests at concurrency 8: b's share is Binomial(400, 0.1) / 400, sd 1.5 points; the
    tolerance is 4 sd (6 points: a correct router fails it with probability ~6e-5, a 80/20 or 95/5 one almost
    always), and no request fails."""
    n = 400
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: complete(http), range(n)))
    assert Counter(r.status_code for r in answers) == {200: n}
    served = Counter(r.json()["model"] for r in answers)
    share_b = served["b"] / n
    sd = math.sqrt(0.1 * 0.9 / n)
    print(f"realised split over {n}: {dict(served)} (b {share_b:.3f}, expected 0.100 +- {4 * sd:.3f})")
    assert abs(share_b - 0.1) <= 4 * sd, served


def test_user_id_is_sticky_and_follows_the_hash(http):
    from r1ray.serve.ab import pick, unit_hash

    users = [f"user-{i}" for i in range(40)]
    seen: dict[str, set[str]] = {u: set() for u in users}
    with ThreadPoolExecutor(8) as pool:
        for u, r in pool.map(lambda a: (a[0], complete(http, user=a[0], header=a[1])),
                             [(u, k % 2 == 0) for u in users for k in range(3)]):  # header, then body field
            assert r.status_code == 200
            seen[u].add(r.json()["model"])
    assert all(len(v) == 1 for v in seen.values()), seen
    assert {u: v.pop() for u, v in seen.items()} == {u: pick(WEIGHTS, unit_hash(ALIAS, u)) for u in users}
    assert {pick(WEIGHTS, unit_hash(ALIAS, u)) for u in users} == {"a", "b"}  # the users cover both variants


def test_redeploy_with_new_weights_drops_no_request_in_flight(app, http, model_dir):
    """Clients keep sending (streamed and whole, to the alias and to b) while ``serve.run`` redeploys the app
    with weights 50/50 and a changed engine for b: the router and b are replaced (each new replica starts,
    b's loads its model, while the old one serves; then the old one drains), a keeps its replica and model.
    Every request succeeds and every stream ends with [DONE]. (A change of the weights alone only
    reconfigures the running router: tests/unit/test_serve_config.py checks the versions that decide it.)"""
    from ray import serve

    from r1ray.serve.app import build_app

    before = http.get("/health").json()["variants"]
    stop = threading.Event()
    results: list[tuple[str, int, bool, float, float]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        i = 0
        with httpx.Client(base_url=app["info"].url, timeout=120) as c:
            while not stop.is_set() and i < 2000:  # bounded
                i += 1
                model = "b" if k % 2 else ALIAS
                t0 = time.monotonic()
                if i % 2:
                    body = {"model": model, "prompt": "the", "max_tokens": 48, "ignore_eos": True, "stream": True}
                    with c.stream("POST", "/v1/completions", json=body) as r:
                        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
                    ok = r.status_code == 200 and lines[-1:] == ["data: [DONE]"]
                else:
                    r = c.post("/v1/completions", json={"model": model, "prompt": "the", "max_tokens": 16,
                                                        "ignore_eos": True})
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
                with lock:
                    results.append((model, r.status_code, ok, t0, time.monotonic()))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(6)]
    for t in threads:
        t.start()
    time.sleep(2)
    new = {"a": 50, "b": 50}
    t_start = time.monotonic()
    cfg = ab_config(model_dir, app["cfg"].http.port, new, b_engine={"max_batch_size": 4})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    t_end = time.monotonic()
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    after = http.get("/health").json()
    print(f"redeploy took {t_end - t_start:.1f} s; {len(results)} requests, "
          f"{sum(1 for r in results if r[3] < t_end and r[4] > t_start)} of them in flight during it")
    failed = [r for r in results if not r[2]]
    assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"
    spanning_b = [r for r in results if r[0] == "b" and r[3] < t_end and r[4] > t_start]
    assert len(spanning_b) >= 2, "no request to b was in flight during the redeploy"
    assert after["weights"] == new
    assert after["variants"]["a"]["replica"] == before["a"]["replica"], "an unchanged variant was restarted"
    assert after["variants"]["b"]["replica"] != before["b"]["replica"], "the changed variant was not replaced"
    from r1ray.serve.ab import pick, unit_hash

    for u in ("user-1", "user-2", "user-3", "user-4", "user-5"):
        assert complete(http, user=u).json()["model"] == pick(new, unit_hash(ALIAS, u))
