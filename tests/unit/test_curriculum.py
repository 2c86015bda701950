"""Difficulty curricula: mixes per step, sampling as a pure function, the advance rule and its state."""

from __future__ import annotations

import pytest

from r1ray.config import ConfigError, load_config
from r1ray.train.stages.curriculum import Curriculum, CurriculumConfig


def test_stages_and_ramp_mixes():
    st = Curriculum(CurriculumConfig(kind="stages", stages=[(0, {1: 1.0}), (10, {1: 1, 2: 3})]))
    assert st.mix(0) == {1: 1.0} and st.mix(9) == {1: 1.0} and st.mix(10) == {1: 0.25, 2: 0.75}
    ramp = Curriculum(CurriculumConfig(kind="ramp", levels=[1, 2, 3], ramp_start=100, ramp_end=200))
    assert ramp.mix(0) == {1: 1.0} and ramp.mix(300) == {3: 1.0}
    assert ramp.mix(125) == pytest.approx({1: 0.5, 2: 0.5}) and ramp.mix(150) == {2: 1.0}


def test_levels_are_drawn_by_the_mix_and_are_a_pure_function():
    cur = Curriculum(CurriculumConfig(kind="fixed", levels=[1, 2], weights=[1, 3]), seed=5)
    draws = [cur.level_of(7, j) for j in range(4000)]
    assert 0.72 < draws.count(2) / 4000 < 0.78
    assert draws == [Curriculum(cur.cfg, seed=5).level_of(7, j) for j in range(4000)]
    assert draws != [Curriculum(cur.cfg, seed=6).level_of(7, j) for j in range(4000)]


def test_advance_moves_on_only_past_the_threshold_and_min_steps():
    cur = Curriculum(CurriculumConfig(kind="advance", levels=[1, 2, 3], threshold=0.8, min_steps=10,
                                      mix_previous=0.2))
    s = cur.initial_state()
    assert cur.mix(0, s) == {1: 1.0}
    assert cur.after_evaluation(5, {"accuracy_d1": 0.95}, s) == s  # too early
    assert cur.after_evaluation(10, {"accuracy_d1": 0.7}, s) == s  # not good enough
    s = cur.after_evaluation(10, {"accuracy_d1": 0.85}, s)
    assert s == {"index": 1, "since": 10} and cur.current_level(s) == 2
    assert cur.mix(11, s) == pytest.approx({1: 0.2, 2: 0.8})
    s = cur.after_evaluation(30, {"accuracy_d2": 0.9}, s)
    assert cur.mix(31, s) == pytest.approx({1: 0.1, 2: 0.1, 3: 0.8})
    assert cur.after_evaluation(99, {"accuracy_d3": 1.0}, s) == s  # the last level stays


def test_bad_schedules_name_the_field():
    with pytest.raises(ConfigError, match="stages: give"):
        load_config(CurriculumConfig, ["kind=stages", "stages=[[5, {1: 1.0}]]"])
    with pytest.raises(ConfigError, match="ramp_end=10 must be after ramp_start=20"):
        load_config(CurriculumConfig, ["kind=ramp", "ramp_start=20", "ramp_end=10"])
    with pytest.raises(ConfigError, match="weights: one non-negative weight per level"):
        load_config(CurriculumConfig, ["levels=[1, 2]", "weights=[1]"])


def test_grpo_prompts_follow_the_schedule_and_its_checkpointed_state():
    from r1ray.train.stages.grpo.stage import GRPOConfig, GRPOStage

    cfg = load_config(GRPOConfig, ["curriculum={kind: stages, stages: [[0, {1: 1.0}], [10, {3: 1.0}]]}"])
    stage = GRPOStage(cfg)
    stage._curriculum_setup()
    assert stage._problem_at(9, 4).difficulty == 1
    assert stage._problem_at(10, 4).difficulty == 3
    assert stage._problem(4, split="eval").difficulty == cfg.grpo.difficulty  # evaluation stays put
    adv = GRPOStage(load_config(GRPOConfig, ["curriculum={kind: advance, levels: [1, 2], metric: accuracy}"]))
    adv._curriculum_setup()
    adv.after_evaluation(20, {"accuracy": 0.95})
    assert adv.state_dict() == {"curriculum": {"index": 1, "since": 20}}
    resumed = GRPOStage(adv.cfg)
    resumed._curriculum_setup()
    resumed.load_state_dict(adv.state_dict())
    assert resumed._problem_at(21, 0).difficulty == 2
