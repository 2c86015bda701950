"""Search-space grammar and its validation against a stage's config class, before any trial runs."""

from __future__ import annotations

import pytest

from r1ray.config import ConfigError, DeepSpeedConfig, OptimConfig, R1Config
from r1ray.tune.space import parse_domain, parse_space


class Stage(R1Config):
    """A stage for the tests."""

    optim: OptimConfig = OptimConfig()
    """Optimizer."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed."""
    steps: int = 10
    """Steps."""


def test_parses_every_kind_without_eval():
    assert parse_domain("a", "loguniform(1e-4, 3e-3)").args == (1e-4, 3e-3)
    assert parse_domain("a", "uniform(0, 1)").kind == "uniform"
    assert parse_domain("a", "quniform(0, 1, 0.1)").args == (0, 1, 0.1)
    assert parse_domain("a", "randint(1, 5)").values_to_check == [1, 4]
    assert parse_domain("a", "choice([1, 'x'])").values_to_check == [1, "x"]
    assert parse_domain("a", "grid([0, 10])").kind == "grid"
    with pytest.raises(ValueError, match="must be literals"):
        parse_domain("a", "choice([__import__('os').system('true')])")


@pytest.mark.parametrize(
    "text, message",
    [
        ("logunifrom(1e-4, 1e-3)", "unknown distribution 'logunifrom'; did you mean 'loguniform'"),
        ("loguniform(0, 1)", "loguniform needs low > 0"),
        ("uniform(2, 1)", "needs low < high"),
        ("choice([])", "non-empty list"),
        ("choice(1, 2)", "takes 1 argument"),
        ("1e-3", "not a distribution call"),
        ("randint(1.5, 3)", "must be integers"),
    ],
)
def test_bad_expressions_name_the_path(text, message):
    with pytest.raises(ValueError, match="space.optim.lr") as e:
        parse_domain("optim.lr", text)
    assert message in str(e.value)


def test_unknown_path_suggests_closest():
    with pytest.raises(ConfigError) as e:
        parse_space({"optim.lrr": "loguniform(1e-4, 1e-3)"}, Stage)
    assert "space.optim.lrr: no such field in Stage; did you mean 'optim.lr'?" in str(e.value)


def test_values_validated_as_the_field():
    with pytest.raises(ConfigError) as e:
        parse_space(
            {
                "deepspeed.zero_stage": "choice([1, 4])",  # 4 is not a ZeRO stage
                "optim.lr": "uniform(-1, 1)",  # lr must be > 0
                "optim.name": "choice(['adamw', 'lion'])",  # fine
            },
            Stage,
        )
    problems = e.value.problems
    assert len(problems) == 2
    assert any(p.startswith("space.deepspeed.zero_stage: value 4") for p in problems)
    assert any(p.startswith("space.optim.lr: value -1") for p in problems)


def test_cross_field_rules_apply_with_base():
    # offload_params needs ZeRO-3: a base that sets ZeRO-2 makes the choice True invalid.
    with pytest.raises(ConfigError, match="offload_params needs zero_stage=3"):
        parse_space({"deepspeed.offload_params": "choice([False, True])"}, Stage, base={"deepspeed": {"zero_stage": 2}})
    assert parse_space({"deepspeed.offload_params": "choice([False, True])"}, Stage, base={"deepspeed": {"zero_stage": 3}})


def test_to_tune_domains():
    from ray import tune

    doms = parse_space({"optim.lr": "loguniform(1e-4, 1e-3)", "steps": "grid([5, 10])"}, Stage)
    lr, steps = (d.to_tune() for d in doms)
    assert isinstance(lr, tune.search.sample.Float)
    assert steps == {"grid_search": [5, 10]}


def test_tune_job_without_dashboard_fails_at_load_naming_the_field(monkeypatch):
    """A study needs the State API (Ray Train frees stopped trials' workers through it): an embedded Ray
    without the dashboard is rejected before any compute; joining a cluster is checked at study start."""
    from r1ray.config import load_config
    from r1ray.tune.config import TuneConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError) as e:
        load_config(TuneConfig, [], values={"ray.include_dashboard": False})
    assert "ray.include_dashboard: must be true for a tune study" in str(e.value)
    assert load_config(TuneConfig, [], values={"ray.include_dashboard": False, "ray.address": "10.0.0.1:6379"})
    assert load_config(TuneConfig, []).ray.include_dashboard


@pytest.mark.parametrize("algorithm", ["random", "optuna"])
def test_search_algorithms_enforce_the_trial_concurrency(algorithm):
    """Tune ignores TuneConfig.max_concurrent_trials for a searcher passed in, so each must carry it."""
    from r1ray.config import load_config
    from r1ray.tune.config import TuneConfig
    from r1ray.tune.study import _searcher

    if algorithm == "optuna":
        pytest.importorskip("optuna")
    cfg = load_config(TuneConfig, [], values={"search.algorithm": algorithm})
    assert _searcher(cfg, [], 2).max_concurrent == 2


def test_trials_at_once_count_grpo_engines_and_reward_tasks(monkeypatch):
    """A GRPO trial holds its rollout engines and reward tasks besides its learner: Tune must not start more
    trials than the cluster fits, or their engine placement groups wait forever."""
    import ray

    from r1ray.train.stages.grpo.stage import GRPOConfig
    from r1ray.train.stages.pretrain import PretrainConfig
    from r1ray.tune.config import TuneConfig
    from r1ray.tune.study import _max_concurrent

    tune = TuneConfig()
    for cpus, pretrain, grpo in ((3.0, 2, 1), (8.0, 7, 3), (12.0, 11, 4)):
        monkeypatch.setattr(ray, "cluster_resources", lambda c=cpus: {"CPU": c})
        assert _max_concurrent(tune, PretrainConfig.model_validate({"scaling": {"num_workers": 1}})) == pretrain
        assert _max_concurrent(tune, GRPOConfig()) == grpo  # 1 learner + 1 engine + 0.25 for rewards each
    two_engines = GRPOConfig.model_validate({"grpo": {"num_engines": 2}})
    assert _max_concurrent(tune, two_engines) == int(11 // 3.25)
