"""Difficulty curricula: which task difficulty levels a training step draws from, as a pure function of the
step and of a small state saved in every checkpoint, so exactly-once resume holds across schedule changes.

Kinds (``CurriculumConfig.kind``):

- ``fixed``: always ``levels`` (weights ``weights``, default uniform): no curriculum.
- ``stages``: ``stages = [[0, {1: 1.0}], [100, {1: 0.5, 2: 0.5}], [300, {2: 1.0}]]``: from each start step on,
  that mix.
- ``ramp``: from ``ramp_start`` to ``ramp_end`` the mix moves linearly from the first level of ``levels`` to the
  last, through the ones between (at a quarter of the way through three levels: 50% level 1, 50% level 2).
- ``advance``: start at the first level; after an evaluation whose ``metric`` (``accuracy_d<level>`` of the
  current level by default) reaches ``threshold``, once ``min_steps`` steps were spent on the level, move to
  the next. The position is the state (``{"index": i, "since": step}``): evaluations happen at fixed steps and
  are deterministic, so a resumed run takes the same decisions, and the state in the checkpoint carries the
  decisions already taken.

Which level a sample gets: ``Curriculum.level_of(step, position, state)`` draws from the step's mix with an
RNG seeded by (seed, step, position in the step): independent of world size and micro-batching.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from r1ray.config import R1Config

__all__ = ["Curriculum", "CurriculumConfig"]


class CurriculumConfig(R1Config):
    """A schedule over the tasks' difficulty levels (see ``r1ray.train.stages.curriculum``)."""

    kind: Literal["fixed", "stages", "ramp", "advance"] = "fixed"
    """``fixed`` (no curriculum), ``stages`` (mixes from given steps on), ``ramp`` (linear from the first to the
    last level), ``advance`` (next level once held-out accuracy on the current one reaches ``threshold``)."""
    levels: list[int] = Field(default_factory=lambda: [1])
    """The difficulty levels, easiest first (``fixed``, ``ramp``, ``advance``)."""
    weights: list[float] | None = None
    """``fixed``: a weight per level (unset: uniform)."""
    stages: list[tuple[int, dict[int, float]]] = Field(default_factory=list)
    """``stages``: ``[start_step, {level: weight}]`` pairs, the first starting at step 0."""
    ramp_start: int = Field(default=0, ge=0)
    """``ramp``: the step the ramp starts at (all first level before)."""
    ramp_end: int = Field(default=1000, ge=1)
    """``ramp``: the step the ramp ends at (all last level after)."""
    threshold: float = 0.9
    """``advance``: the value of ``metric`` that moves the curriculum on."""
    metric: str = "accuracy_d{level}"
    """``advance``: the evaluation metric compared with ``threshold`` (``{level}`` is the current level)."""
    mode: Literal["max", "min"] = "max"
    """``advance``: move on when ``metric >= threshold`` (``max``, e.g. accuracy) or ``<=`` (``min``, a loss)."""
    min_steps: int = Field(default=0, ge=0)
    """``advance``: steps spent on a level before it can be left."""
    mix_previous: float = Field(default=0.0, ge=0, lt=1)
    """``advance``: share of each step drawn from the levels already passed (so they are not forgotten)."""

    @model_validator(mode="after")
    def _check(self) -> CurriculumConfig:
        problems = []
        if not self.levels or len(set(self.levels)) != len(self.levels):
            problems.append(f"levels: give distinct levels, easiest first, got {self.levels}")
        if self.kind == "fixed" and self.weights is not None and (
                len(self.weights) != len(self.levels) or any(w < 0 for w in self.weights) or not sum(self.weights)):
            problems.append(f"weights: one non-negative weight per level ({len(self.levels)}), not all 0")
        if self.kind == "stages":
            starts = [s for s, _ in self.stages]
            if not self.stages or starts[0] != 0 or starts != sorted(set(starts)):
                problems.append("stages: give [start_step, {level: weight}] pairs with increasing starts, the first at 0")
            for s, mix in self.stages:
                if not mix or any(w < 0 for w in mix.values()) or not sum(mix.values()):
                    problems.append(f"stages: the mix at step {s} needs positive weights, got {mix}")
        if self.kind == "ramp" and self.ramp_end <= self.ramp_start:
            problems.append(f"ramp_end={self.ramp_end} must be after ramp_start={self.ramp_start}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def all_levels(self) -> list[int]:
        if self.kind == "stages":
            return sorted({lv for _, mix in self.stages for lv in mix})
        return list(self.levels)


class Curriculum:
    """The schedule of a ``CurriculumConfig``; ``state`` is what ``Stage.state_dict`` saves."""

    def __init__(self, cfg: CurriculumConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed

    def initial_state(self) -> dict[str, Any]:
        return {"index": 0, "since": 0} if self.cfg.kind == "advance" else {}

    def mix(self, step: int, state: dict[str, Any] | None = None) -> dict[int, float]:
        """The normalised level mix of ``step``."""
        c = self.cfg
        if c.kind == "fixed":
            w = c.weights or [1.0] * len(c.levels)
            raw = dict(zip(c.levels, w, strict=True))
        elif c.kind == "stages":
            raw = next(dict(mix) for start, mix in reversed(c.stages) if step >= start)
        elif c.kind == "ramp":
            t = min(max((step - c.ramp_start) / (c.ramp_end - c.ramp_start), 0.0), 1.0)
            pos = t * (len(c.levels) - 1)
            lo = int(math.floor(pos))
            hi = min(lo + 1, len(c.levels) - 1)
            frac = pos - lo
            raw = {c.levels[lo]: 1.0 - frac}
            if hi != lo and frac > 0:
                raw[c.levels[hi]] = frac
        else:  # advance
            i = int((state or self.initial_state())["index"])
            raw = {c.levels[i]: 1.0 - (c.mix_previous if i else 0.0)}
            for prev in c.levels[:i]:
                raw[prev] = c.mix_previous / i
        total = sum(raw.values())
        return {lv: w / total for lv, w in sorted(raw.items()) if w > 0}

    def level_of(self, step: int, position: int, state: dict[str, Any] | None = None) -> int:
        """The level of sample ``position`` of step ``step``: a pure function of (seed, step, position, mix)."""
        mix = self.mix(step, state)
        levels = list(mix)
        if len(levels) == 1:
            return levels[0]
        u = np.random.default_rng([self.seed, 0xC0FFEE, step, position]).random()
        acc = 0.0
        for lv in levels:
            acc += mix[lv]
            if u < acc:
                return lv
        return levels[-1]

    def after_evaluation(self, step: int, metrics: dict[str, float], state: dict[str, Any]) -> dict[str, Any]:
        """The state after an evaluation at ``step`` (``advance`` moves on; the other kinds have none)."""
        c = self.cfg
        if c.kind != "advance":
            return state
        i, since = int(state.get("index", 0)), int(state.get("since", 0))
        if i >= len(c.levels) - 1 or step - since < c.min_steps:
            return state
        value = metrics.get(c.metric.format(level=c.levels[i]))
        if value is not None and (value >= c.threshold if c.mode == "max" else value <= c.threshold):
            return {"index": i + 1, "since": step}
        return state

    def current_level(self, state: dict[str, Any]) -> int | None:
        return self.cfg.levels[int(state.get("index", 0))] if self.cfg.kind == "advance" else None
