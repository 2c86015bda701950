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
