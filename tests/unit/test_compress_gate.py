"""The gate's decision at and past its limits, and the compression config's up-front refusals (every shipped
YAML validates)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from r1ray.compress.config import CompressConfig, GateConfig
from r1ray.compress.gate import Scores, decide
from r1ray.config import ConfigError, load_config

GATE = GateConfig(max_accuracy_drop_points=1.5, max_perplexity_increase_pct=5.0)
BASE = Scores(accuracy=0.80, perplexity=10.0)


def test_within_limits_passes_at_the_limit():
    v = decide(BASE, Scores(accuracy=0.785, perplexity=10.5), GATE)
    assert v.passed and v.reasons == []
    assert v.accuracy_drop_points == pytest.approx(1.5) and v.perplexity_increase_pct == pytest.approx(5.0)
    assert decide(BASE, Scores(accuracy=0.9, perplexity=9.0), GATE).passed  # better is fine


def test_each_limit_refuses_and_names_itself():
    v = decide(BASE, Scores(accuracy=0.78, perplexity=10.0), GATE)
    assert not v.passed and len(v.reasons) == 1 and "max_accuracy_drop_points" in v.reasons[0]
    v = decide(BASE, Scores(accuracy=0.80, perplexity=10.6), GATE)
    assert not v.passed and len(v.reasons) == 1 and "max_perplexity_increase_pct" in v.reasons[0]
    v = decide(BASE, Scores(accuracy=0.0, perplexity=400.0), GATE)  # a destroyed model fails both
    assert not v.passed and len(v.reasons) == 2


def test_non_finite_scores_refuse():
    v = decide(BASE, Scores(accuracy=0.8, perplexity=math.nan), GATE)
    assert not v.passed and any("not finite" in r for r in v.reasons)
    assert not decide(BASE, Scores(accuracy=0.8, perplexity=math.inf), GATE).passed


def test_config_refusals_name_the_field():
    with pytest.raises(ValueError, match="device=cuda"):
        CompressConfig(model="m", quantize={"method": "fp8"})
    with pytest.raises(ValueError, match="reference suite is off"):
        CompressConfig(model="m", gate={"accuracy_metric": "reference/exact_match"})
    with pytest.raises(ValueError, match="suite/metric"):
        CompressConfig(model="m", gate={"accuracy_metric": "accuracy"})
    with pytest.raises(ValueError, match="removes nothing"):
        CompressConfig(model="m", prune={"enabled": True})
    with pytest.raises(ValueError, match="nothing to do"):
        CompressConfig(model="m", quantize={"method": "none"}, gguf={"types": []})
    with pytest.raises(ValueError, match="needs prune.enabled"):
        CompressConfig(model="m", prune={"recovery": {"enabled": True}})


def test_library_run_refuses_unset_inputs(tmp_path):
    from r1ray.compress.run import run

    with pytest.raises(ValueError, match="model is unset"):
        run(CompressConfig())
    with pytest.raises(ValueError, match="eval.perplexity.files"):
        run(CompressConfig(model=str(tmp_path)))


@pytest.mark.parametrize("path", sorted(Path("configs/compress").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(CompressConfig, ["--config", str(path)])
    assert cfg.gate.max_accuracy_drop_points >= 0


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="quantize"):
        load_config(CompressConfig, ["quantize.methd=int8"])
