"""The tune job's config (import-light: pydantic only, so a typo fails in well under 2 s)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from r1ray.config import JobConfig, R1Config


class SearchConfig(R1Config):
    """How trials' hyperparameters are chosen."""

    algorithm: Literal["random", "grid", "optuna"] = "random"
    """``random`` samples each domain; ``grid`` needs only grid()/choice() domains and tries every
    combination; ``optuna`` uses Optuna's TPE (needs ``pip install optuna``)."""
    num_samples: int | None = Field(default=None, ge=1)
    """Trials to run; with ``grid``, repetitions of the whole grid. Unset: 1 with ``grid`` (each
    combination once), 6 otherwise."""
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    """Trials running at once. Unset: as many as the cluster fits, each trial needing its largest worker
    group (``scaling.num_workers`` max x ``cpus_per_worker``, and GPUs), with one CPU left for Ray Data and
    the trials' drivers."""
    metric: str = "val_loss"
    """Metric the search and the scheduler optimise (as reported by the training stage)."""
    mode: Literal["min", "max"] = "min"
    """Whether ``metric`` should be minimised or maximised."""


class SchedulerConfig(R1Config):
    """Early stopping (ASHA) or population-based training (PBT)."""

    name: Literal["fifo", "asha", "pbt"] = "asha"
    """``fifo`` runs every trial to the end; ``asha`` stops the worse trials at each rung; ``pbt``
    periodically copies the best trials' checkpoints into the worst and perturbs their hyperparameters."""
    grace_period: int = Field(default=1, ge=1)
    """ASHA: evaluations every trial gets before it can be stopped."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """ASHA: 1/reduction_factor of the trials go on at each rung."""
    perturbation_interval: int = Field(default=20, ge=1)
    """PBT: optimizer steps between exploit/explore decisions (each is a checkpointed segment)."""
    quantile_fraction: float = Field(default=0.5, gt=0, le=0.5)
    """PBT: the bottom fraction of trials that copy from the top fraction (at least one trial each way once
    two or more trials have reported)."""
    synch: bool = True
    """PBT: decide exploits only once every running trial has reached the same perturbation point, so each
    decision compares all trials at equal steps and the same study makes the same decisions whatever the
    report timing (a trial that arrives first is paused, freeing its workers, until the others catch up).
    False: Tune's asynchronous PBT, which compares a trial with whatever the others last reported, so a
    trial that reports first sees no population and does not exploit: decisions depend on timing."""


class TuneConfig(JobConfig):
    """Search the hyperparameters of a training stage with Ray Tune; each trial is one full training run."""

    run_name: str = "tune-default"
    """Study name: results live under ``<storage.root>/tune/<run_name>``; rerunning the same name resumes the
    study and skips finished trials."""
    stage: str = "pretrain"
    """Training stage to tune (its config class validates ``base`` and ``space``)."""
    stage_config: list[str] = Field(default_factory=list)
    """YAML files of the stage's config that every trial starts from (e.g. configs/pretrain/debug.yaml)."""
    base: dict[str, Any] = Field(
        default_factory=lambda: {
            "train.max_steps": 60,
            "train.eval_every": 15,
            "train.eval_samples": 64,
            "train.log_every": 15,
            "checkpoint.every": 30,
            "checkpoint.keep": 1,
            "scaling.num_workers": 1,
            "deepspeed.zero_stage": 1,
        }
    )
    """Dotted overrides applied to every trial's stage config before the sampled values. The default sizes
    trials for a few-minute study on 2 CPUs (one worker each, 60 steps, an evaluation every 15)."""
    space: dict[str, str] = Field(
        default_factory=lambda: {
            "optim.lr": "loguniform(3e-4, 3e-2)",
            "optim.warmup_steps": "choice([0, 10])",
        }
    )
    """Search space: dotted stage-config path -> distribution (uniform, loguniform, quniform, randint,
    choice, grid)."""
    search: SearchConfig = SearchConfig()
    """Search algorithm."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Trial scheduler."""
    trial_max_failures: int = Field(default=1, ge=0)
    """Retries of a crashed trial (from its last checkpoint) before it is marked failed; the study goes on."""
    trial_cpus: float = Field(default=0.01, gt=0)
    """CPUs the trial's driver holds (its training workers reserve their own)."""
    seed: int = 0
    """Seed of the search algorithm; each trial's training seed comes from the stage config."""

    @model_validator(mode="after")
    def _check_space(self) -> TuneConfig:
        from r1ray.config import set_dotted
        from r1ray.train.registry import get_stage
        from r1ray.tune.space import parse_space

        stage = get_stage(self.stage)  # raises naming the valid stages
        base: dict = {}
        for k, v in self.base.items():
            set_dotted(base, k, v)
        parse_space(self.space, stage.config_class(), base=base, base_files=self.stage_config)
        if not self.ray.include_dashboard and not (self.ray.address or os.environ.get("RAY_ADDRESS")):
            raise ValueError(
                "ray.include_dashboard: must be true for a tune study. Ray Train (2.60) frees the workers of a "
                "trial that ASHA/PBT stops, or that crashes, through the dashboard's State API; without it "
                "their placement group keeps its CPUs and later trials never start."
            )
        if self.search.algorithm == "grid":
            bad = [p for p, t in self.space.items() if not t.strip().startswith(("grid(", "choice("))]
            if bad:
                raise ValueError(f"search.algorithm=grid needs grid()/choice() domains only; not: {', '.join(bad)}")
        return self
