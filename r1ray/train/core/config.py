"""Typed configs of the training stages (import-light: pydantic only, so a typo fails in well under 2 s).

``TrainLoopConfig``, ``CheckpointConfig`` and ``FaultConfig`` are shared by every training stage;
``TrainJobConfig`` composes them with the shared sub-configs of ``r1ray.config`` and the model config of
``r1ray.model``, and each stage's config (``r1ray.train.stages.*``) extends it with its data and its section.

Batch sizes: ``global_batch_size`` samples make one optimizer step, whatever the number of workers;
each worker runs ``micro_batch_size`` samples per forward/backward, and the gradient accumulation is
derived as ``global_batch_size / (micro_batch_size * world_size)``. So an elastic run that resumes on
another number of workers keeps the same optimisation (same samples per step, same learning-rate
schedule); the config is rejected up front if that division is not exact for every world size in
``scaling.num_workers``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from r1ray.config import (
    DeepSpeedConfig,
    JobConfig,
    OptimConfig,
    R1Config,
    ScalingConfig,
)
from r1ray.model.build import ModelConfig


class TrainLoopConfig(R1Config):
    """The shared per-worker training loop: steps, batches, evaluation cadence, failure handling."""

    max_steps: int = Field(default=200, ge=1)
    """Optimizer steps to train for (the run ends after this many; a resumed run continues to it)."""
    stop_after_steps: int | None = Field(default=None, ge=1)
    """End this run after this optimizer step, with a checkpoint there, while the learning-rate schedule
    still spans ``max_steps`` (a segment: PBT, a time-boxed job; resume it with ``checkpoint.resume_from``
    or the same run_name). Unset: run to ``max_steps``."""
    global_batch_size: int = Field(default=16, ge=1)
    """Samples per optimizer step across all workers (constant when the worker count changes)."""
    curriculum_epochs: int = Field(default=0, ge=0)
    """Epochs ordered from easy to hard by the stage's difficulty score of each sample (pretraining: the mean
    unigram surprisal of its tokens), in ``curriculum_buckets`` shuffled runs; later epochs are shuffled. 0: every
    epoch shuffled. SFT and GRPO schedule task difficulty with their ``curriculum`` block instead."""
    curriculum_buckets: int = Field(default=16, ge=1)
    """Runs of equal size the difficulty order is cut into (each shuffled): 1 = one shuffle, no order."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Samples per forward/backward on one worker; gradient accumulation = global / (micro x workers)."""
    eval_every: int = Field(default=50, ge=0)
    """Evaluate on the validation split every this many steps (and at the end); 0: only at the end."""
    eval_samples: int = Field(default=256, ge=1)
    """Validation samples per evaluation (the first ones of the validation split, capped at its size)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    """Label smoothing of the cross-entropy loss."""
    max_nonfinite_in_row: int = Field(default=5, ge=1)
    """A step with a non-finite loss or gradient is skipped and counted; this many in a row stops the run
    with an error naming the step and the last good checkpoint."""
    log_every: int = Field(default=10, ge=1)
    """Report metrics (Ray Train, Prometheus, W&B, driver progress) every this many steps."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Intra-op threads of each CPU worker. Unset: the worker's reserved CPUs (``scaling.cpus_per_worker``)."""
    max_failures: int = Field(default=3, ge=-1)
    """Worker-group restarts Ray Train makes from the newest checkpoint before giving up (-1: unlimited)."""
    elastic_resize_interval_s: float = Field(default=60.0, ge=0)
    """Elastic runs: how often a healthy, smaller-than-max group checks whether it can grow back."""


class CheckpointConfig(R1Config):
    """Checkpoints: DeepSpeed state + trainer state + a Hugging Face safetensors export, each one atomic."""

    every: int = Field(default=50, ge=0)
    """Checkpoint every this many optimizer steps (and always at the end); 0: only at the end."""
    keep: int = Field(default=3, ge=1)
    """Checkpoints kept in the run directory (oldest deleted first)."""
    resume_from: str | None = None
    """An explicit checkpoint directory to start from. A run restarted under the same ``run_name`` resumes
    from its own newest checkpoint by itself, which takes precedence over this."""
    export_hf: bool = True
    """Write a consolidated Hugging Face safetensors export (with the tokenizer) into every checkpoint."""


class FaultConfig(R1Config):
    """Fault injection for tests and drills (each fires once per run, on its first attempt only)."""

    kill_at_step: int | None = Field(default=None, ge=1)
    """SIGKILL one worker after this optimizer step (before any checkpoint of that step)."""
    kill_rank: int = Field(default=0, ge=0)
    """Which worker rank ``kill_at_step`` and ``kill_during_save_at_step`` kill."""
    kill_during_save_at_step: int | None = Field(default=None, ge=1)
    """SIGKILL one worker in the middle of writing the checkpoint of this step."""
    sigterm_at_step: int | None = Field(default=None, ge=1)
    """Send SIGTERM to the job's driver after this step, as a preemption or a cancelled job would (same
    machine only): the workers checkpoint and stop."""
    nonfinite_at_steps: list[int] = Field(default_factory=list)
    """Make the loss NaN on these optimizer steps (to exercise the non-finite skip)."""
    step_delay_s: float = Field(default=0.0, ge=0)
    """Sleep this long after every step (gives a drill time to kill or add nodes mid-run)."""
    record_samples: bool = False
    """Append every sample index each worker trains on to ``<run_dir>/samples/`` (exactly-once checks)."""


class TrainJobConfig(JobConfig):
    """Base of every training stage's config (pretrain, sft, grpo, distill): the shared loop's blocks. A stage
    config adds its data, its model and its own section, and may redeclare a block to change its defaults."""

    seed: int = 0
    """Seed of the model init, the data order (a pure function of seed, epoch and sample index) and RNG."""
    run_name: str = "default"
    """Run directory ``<storage.root>/runs/<run_name>``; rerunning the same name resumes it."""
    model: ModelConfig = ModelConfig()
    """The network."""
    train: TrainLoopConfig = TrainLoopConfig()
    """The training loop."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoints and exports."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed engine."""
    scaling: ScalingConfig = ScalingConfig()
    """Training workers."""
    faults: FaultConfig = FaultConfig()
    """Fault injection (tests and drills)."""

    @model_validator(mode="after")
    def _check_train(self) -> TrainJobConfig:
        problems = batch_size_problems(self.train, self.scaling)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def run_dir(self) -> str:
        return self.storage.uri("runs", self.run_name)

    def resources_beside_workers(self) -> dict[str, float]:
        """CPUs and GPUs a run holds for its whole length besides its worker group (GRPO: its rollout engines
        and reward tasks); Ray Tune sizes the trials it runs at once with it."""
        return {}


def batch_size_problems(train: TrainLoopConfig, scaling: ScalingConfig) -> list[str]:
    """Every world size in [min, max] workers must split ``global_batch_size`` into whole micro-batches."""
    bad = [
        w for w in range(scaling.min_workers, scaling.max_workers + 1)
        if train.global_batch_size % (train.micro_batch_size * w) != 0
    ]
    if not bad:
        return []
    sizes = range(scaling.min_workers, scaling.max_workers + 1)
    lcm = 1
    for w in sizes:
        lcm = lcm * w // _gcd(lcm, w)
    step = train.micro_batch_size * lcm
    fix = ((train.global_batch_size + step - 1) // step) * step
    return [
        f"train.global_batch_size={train.global_batch_size} is not a multiple of train.micro_batch_size="
        f"{train.micro_batch_size} x workers for workers={bad} (scaling.num_workers={scaling.num_workers}); "
        f"set train.global_batch_size to a multiple of {step} (e.g. {fix}) or change train.micro_batch_size"
    ]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def grad_accumulation(train: TrainLoopConfig, world_size: int) -> int:
    """Micro-batches each worker accumulates per optimizer step at ``world_size`` workers."""
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} does not split over {world_size} workers x "
            f"train.micro_batch_size={train.micro_batch_size}"
        )
    return train.global_batch_size // per_step
