"""ServeConfig validation, deployment options, the Serve config file, and build_app (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from r1ray.config import ConfigError, load_config, to_yaml
from r1ray.serve.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("overrides,needle", [
    (["engine.backend=vllm"], "engine.backend=vllm needs a GPU per replica: set deployment.num_gpus=1"),
    (["engine.device=cuda"], "deployment.num_gpus > 0"),
    (["limits.max_queue=4", "engine.max_batch_size=8"], "limits.max_queue (4) < engine.max_batch_size (8)"),
    (["deployment.autoscaling={min_replicas: 3, max_replicas: 2}"], "raise max_replicas"),
    (["http.route_prefix=api"], "must start with '/'"),
    (["http.port=70000"], "http.port"),
])
def test_bad_configs_name_the_field_and_fix(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ServeConfig, overrides)
    assert needle in str(e.value)


def test_api_key_is_never_printed(monkeypatch):
    cfg = load_config(ServeConfig, ["auth.api_key=sk-secret-123"])
    assert cfg.auth.resolve() == "sk-secret-123"
    assert "sk-secret-123" not in repr(cfg) and "sk-secret-123" not in to_yaml(cfg)
    monkeypatch.setenv("MY_KEY", "from-env")
    assert load_config(ServeConfig, ["auth.api_key_env=MY_KEY"]).auth.resolve() == "from-env"
    monkeypatch.delenv("R1RAY_API_KEY", raising=False)
    assert ServeConfig().auth.resolve() is None  # auth off by default


def test_deployment_options_follow_the_config():
    from r1ray.serve.app import deployment_options

    fixed = deployment_options(load_config(ServeConfig, ["deployment.num_replicas=3", "deployment.num_cpus=2"]))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    # Serve's own cap sits above r1ray's queue bound, so a full replica answers 429 (not Serve's 503).
    assert fixed["max_ongoing_requests"] > ServeConfig().limits.max_queue
    # The drain time on SIGTERM / scale-down is the config's, not Serve's default.
    assert fixed["graceful_shutdown_timeout_s"] == ServeConfig().deployment.graceful_shutdown_timeout_s
    assert deployment_options(load_config(ServeConfig, ["deployment.graceful_shutdown_timeout_s=7"]))[
        "graceful_shutdown_timeout_s"] == 7.0
    auto = deployment_options(load_config(ServeConfig, [
        "deployment.autoscaling={min_replicas: 1, max_replicas: 4, target_ongoing_requests: 12}",
        "deployment.resources={serve: 1}",
    ]))
    assert "num_replicas" not in auto
    a = auto["autoscaling_config"]
    assert (a["min_replicas"], a["max_replicas"], a["target_ongoing_requests"]) == (1, 4, 12.0)
    assert auto["ray_actor_options"]["resources"] == {"serve": 1.0}


def test_build_app_checks_the_model_path(tmp_path):
    from ray.serve import Application

    from r1ray.serve.app import build_app

    with pytest.raises(FileNotFoundError, match="model_path=.*not a Hugging Face model directory"):
        build_app({"model_path": str(tmp_path)})
    (tmp_path / "config.json").write_text("{}")
    app = build_app({"model_path": str(tmp_path), "auth": {"api_key": "k"}})
    assert isinstance(app, Application)
    # The exact path `serve run`/`serve deploy`/RayService take with `import_path` + `args`.
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    app = call_user_app_builder_with_args_if_necessary(build_app, {"model_path": str(tmp_path)})
    assert isinstance(app, Application)


def test_serve_config_file_is_valid_for_serve_and_r1ray():
    """deploy/serve_config.yaml: Ray's own schema accepts it, and its args are a valid ServeConfig."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(raw)
    [app] = schema.applications
    assert app.import_path == "r1ray.serve.app:build_app"
    ServeConfig.model_validate(app.args)
    import importlib

    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_curl_example_is_ready_to_paste():
    from r1ray.serve.launch import curl_example

    text = curl_example("http://127.0.0.1:8000", "my-model", "R1RAY_API_KEY", auth=True)
    assert text.startswith("curl http://127.0.0.1:8000/v1/chat/completions")
    assert '"model": "my-model"' in text and 'Bearer $R1RAY_API_KEY' in text
    assert "Authorization" not in curl_example("http://h:1", "m", "K", auth=False)


# ---------------------------------------------------------------------------------------------- A/B


def _ab(tmp_path, **extra) -> dict:
    (tmp_path / "config.json").write_text("{}")
    return {"variants": {"a": {"model_path": str(tmp_path), "weight": 90},
                         "b": {"model_path": str(tmp_path), "weight": 10, "engine": {"max_batch_size": 4},
                               "deployment": {"num_replicas": 2}}},
            "aliases": ["r1ray"], **extra}


@pytest.mark.parametrize("bad,needle", [
    ({"model_path": "/m", "variants": {"a": {"model_path": "/n"}}}, "model_path: leave it unset with variants"),
    ({"variants": {"a": {}}}, "variants.a: set model_path (an export directory) or run_name"),
    ({"variants": {"a b": {"model_path": "/m"}}}, "variants.a b: 'a b' is not a valid model id"),
    ({"variants": {"a": {"model_path": "/m", "engine": {"max_batch_size": 999}}}},
     "variants.a: limits.max_queue (64) < engine.max_batch_size (999)"),
    ({"variants": {"a": {"model_path": "/m", "engine": {"bakend": "hf"}}}}, "variants.a: engine.bakend: Extra"),
    ({"variants": {"a": {"model_path": "/m", "engine": {"backend": "vllm"}}}}, "set deployment.num_gpus=1"),
    ({"variants": {"a": {"model_path": "/m", "weight": 0}}, "aliases": ["r"]}, "every weight is 0"),
    ({"variants": {"a": {"model_path": "/m"}}, "aliases": ["a"]}, "aliases: ['a'] already name variants"),
    ({"variants": {"a": {"model_path": "/m", "weight": -1}}}, "weight"),
    ({"aliases": ["x", "x"]}, "each alias once"),
])
def test_bad_ab_configs_name_the_field(bad, needle):
    with pytest.raises(ValueError) as e:
        ServeConfig.model_validate(bad)
    assert needle in str(e.value)


def test_variant_config_merges_overrides(tmp_path):
    cfg = ServeConfig.model_validate(_ab(tmp_path, engine={"max_batch_size": 8}, deployment={"num_cpus": 2}))
    assert cfg.split() == {"a": 0.9, "b": 0.1}
    a, b = cfg.variant_config("a"), cfg.variant_config("b")
    assert (a.model_name, a.engine.max_batch_size, a.deployment.num_replicas) == ("a", 8, 1)
    assert (b.model_name, b.engine.max_batch_size, b.deployment.num_replicas, b.deployment.num_cpus) == ("b", 4, 2, 2)
    assert not b.variants and b.aliases == ["r1ray"]  # a variant answers to the alias the router sends it


def test_pick_and_unit_hash():
    from r1ray.serve.ab import check_weights, pick, unit_hash

    assert pick({"a": 9, "b": 1}, 0.0) == "a" and pick({"a": 9, "b": 1}, 0.89) == "a"
    assert pick({"a": 9, "b": 1}, 0.9) == "b" and pick({"a": 9, "b": 1}, 0.999) == "b"
    assert pick({"a": 0, "b": 1, "c": 1}, 0.4) == "b"
    users = [f"u{i}" for i in range(4000)]
    us = [unit_hash("r1ray", u) for u in users]
    assert us == [unit_hash("r1ray", u) for u in users] and all(0 <= u < 1 for u in us)  # stable
    assert abs(sum(u < 0.1 for u in us) / len(us) - 0.1) < 0.02  # uniform enough to split users by weight
    assert unit_hash("other", "u1") != unit_hash("r1ray", "u1")  # aliases split independently
    # 90/10 -> 80/20 moves only the users in [0.8, 0.9) from a to b, none from b to a
    old = {u: pick({"a": 90, "b": 10}, x) for u, x in zip(users, us, strict=True)}
    new = {u: pick({"a": 80, "b": 20}, x) for u, x in zip(users, us, strict=True)}
    moved = {u for u in users if old[u] != new[u]}
    assert all(old[u] == "a" and new[u] == "b" for u in moved) and 0.07 < len(moved) / len(users) < 0.13
    with pytest.raises(ValueError, match="each variant"):
        check_weights({"a": 1}, ["a", "b"])
    with pytest.raises(ValueError, match=">= 0"):
        check_weights({"a": 1, "b": -2}, ["a", "b"])
    assert check_weights({"b": 0, "a": 3}, ["a", "b"]) == {"a": 3.0, "b": 0.0}


def test_build_ab_app_versions_keep_unchanged_deployments(tmp_path):
    """serve.run replaces a deployment whose version changed: a weight change must leave every version as it
    is (the router gets the weights as user_config and is reconfigured in place), a variant's config change
    must change that variant's version only (and the router's, which holds the config)."""
    from ray.serve._private.build_app import build_app as serve_build

    from r1ray.serve.app import build_app

    def deployments(cfg: dict) -> dict:
        built = serve_build(build_app(cfg), name="r1ray")
        return {d.name: d for d in built.deployments}

    base = _ab(tmp_path)
    d0 = deployments(base)
    assert set(d0) == {"ABRouter", "OpenAIServer-a", "OpenAIServer-b"}
    assert built_ingress(base) == "ABRouter"
    assert d0["ABRouter"]._deployment_config.user_config == {"weights": {"a": 90.0, "b": 10.0}}
    assert d0["OpenAIServer-b"]._deployment_config.num_replicas == 2
    for d in d0.values():
        assert d.version and d._deployment_config.max_surge_percent == 100
    reweighted = {**base, "variants": {"a": {**base["variants"]["a"], "weight": 50},
                                       "b": {**base["variants"]["b"], "weight": 50}}}
    d1 = deployments(reweighted)
    assert {n: d.version for n, d in d1.items()} == {n: d.version for n, d in d0.items()}
    assert d1["ABRouter"]._deployment_config.user_config == {"weights": {"a": 50.0, "b": 50.0}}
    changed = {**base, "variants": {"a": base["variants"]["a"],
                                    "b": {**base["variants"]["b"], "engine": {"max_batch_size": 2}}}}
    d2 = deployments(changed)
    assert d2["OpenAIServer-a"].version == d0["OpenAIServer-a"].version
    assert d2["OpenAIServer-b"].version != d0["OpenAIServer-b"].version


def built_ingress(cfg: dict) -> str:
    from ray.serve._private.build_app import build_app as serve_build

    from r1ray.serve.app import build_app

    return serve_build(build_app(cfg), name="r1ray").ingress_deployment_name
