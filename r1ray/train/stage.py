"""The stage contract: what a training stage supplies to the one loop that pretrain, SFT, GRPO and
distillation share. This module is the documentation of how to add a stage.

The loop (``r1ray.train.core.loop``, private) owns *how* to train: the DeepSpeed engine, the exactly-once
sample cursor, gradient accumulation and loss normalisation, clipping, the learning-rate schedule,
non-finite skips, checkpoints (DeepSpeed state + trainer state + HF export), resume at another world size,
SIGTERM/preemption, fault injection and metrics (Ray Train, Prometheus, W&B). A stage owns *what* to
train: its data, its models, its loss, its metrics, its evaluation. Nothing a stage does can weaken the
loop's guarantees, because a stage never sees the cursor, the engine's step or the checkpoint.

Adding a stage
--------------
1. A config class composed from ``r1ray.train.core.config.TrainJobConfig`` (seed, run_name, train, checkpoint,
   optim, deepspeed, scaling, faults, ray, storage, logging) plus the stage's own fields.
2. A ``Stage`` subclass with ``name`` and ``config_class``, implementing the abstract methods below.
3. A ``run(cfg) -> TrainResult`` that calls ``r1ray.train.core.driver.run_stage(MyStage, cfg)``, and a function
   giving the text its job prints.
4. One entry in ``r1ray.train.registry`` (config, run, inputs and the field each fills, default run name, summary):
   Tune, the pipeline's wiring and the jobs' upstream preparation read it; ``jobs/<stage>.py`` is three lines
   (``run = job("<stage>")``); the pipeline's config gets a ``StageSpec`` field of the stage's name.

One optimizer step, as the loop runs it on every worker::

    rows   = this worker's share of global samples [step*B, (step+1)*B)    (exactly once, any world size)
    stage.prefetch(step + 1, next rows)                   # (before the last step) e.g. GRPO's async rollouts
    inputs = stage.step_inputs(step, rows, model)        # once per step: batches, rollouts, rewards ...
    for update in inputs.updates:                         # one or more optimizer updates per step
        for batch in update:                              # exactly `accumulation / update_slices()` each
            loss_sum = stage.loss(model, batch, metrics)  # sum of per-unit losses
            backward(loss_sum / global sum of stage.batch_weight(b) over every worker's update)
        optimizer update
        stage.after_update(model, step, u)                # e.g. GRPO's weight sync to the rollout engines
    every train.eval_every steps: stage.evaluate(model, worker) -> metrics

``batch_weight`` is the normaliser of the loss (tokens for a token-mean loss, sequences for a
sequence-mean one): the loop divides every micro-batch's ``loss_sum`` by the sum of the weights of the
whole update across all workers, so an update minimises the same objective whatever the world size or
accumulation (GRPO's normalisation variants are choices of ``loss_sum`` and ``batch_weight``).

Everything of a stage that must survive a restart goes through ``state_dict``/``load_state_dict`` (JSON,
stored in the checkpoint's trainer state); everything else must be a pure function of (config, step,
sample index) so that a resumed run is bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

__all__ = ["Metrics", "RunPlan", "Stage", "StepInputs", "WorkerInfo"]


@dataclass(frozen=True)
class WorkerInfo:
    """Where a stage runs: this worker's rank in the group, the group's size, its device."""

    rank: int
    world_size: int
    local_rank: int
    use_gpu: bool
    device: Any


class Metrics:
    """Metrics of one worker, reduced over workers by the loop (one collective per report).

    ``mean(name, value, weight)``: a weighted mean over micro-batches and workers; ``max``: the maximum;
    ``total``: a sum. Names become ``<name>`` in Ray Train reports and W&B, and feed the Prometheus
    metrics a stage declares in ``r1ray.observe.metrics``.
    """

    def __init__(self) -> None:
        self._mean: dict[str, list[float]] = {}
        self._max: dict[str, float] = {}
        self._total: dict[str, float] = {}

    def mean(self, name: str, value: float, weight: float = 1.0) -> None:
        acc = self._mean.setdefault(name, [0.0, 0.0])
        acc[0] += float(value) * float(weight)
        acc[1] += float(weight)

    def max(self, name: str, value: float) -> None:
        self._max[name] = max(self._max.get(name, -math.inf), float(value))

    def total(self, name: str, value: float) -> None:
        self._total[name] = self._total.get(name, 0.0) + float(value)

    def merge(self, other: Metrics) -> Metrics:
        for k, (s, w) in other._mean.items():
            acc = self._mean.setdefault(k, [0.0, 0.0])
            acc[0] += s
            acc[1] += w
        for k, v in other._max.items():
            self._max[k] = max(self._max.get(k, -math.inf), v)
        for k, v in other._total.items():
            self._total[k] = self._total.get(k, 0.0) + v
        return self

    def prefixed(self, prefix: str) -> Metrics:
        """A copy with every name prefixed (``val_`` for the loss metrics of an evaluation)."""
        out = Metrics()
        out._mean = {prefix + k: list(v) for k, v in self._mean.items()}
        out._max = {prefix + k: v for k, v in self._max.items()}
        out._total = {prefix + k: v for k, v in self._total.items()}
        return out

    def names(self) -> list[str]:
        return sorted({*self._mean, *self._max, *self._total})

    def reduce(self, allreduce_sum: Any, allreduce_max: Any, names: list[str]) -> dict[str, float]:
        """Values over every worker. ``names`` must be the same list on every worker (the loop agrees on it
        first); ``allreduce_*`` take and return a list of floats."""
        sums, maxes = [], []
        for n in names:
            s, w = self._mean.get(n, (0.0, 0.0))
            sums += [s, w, self._total.get(n, 0.0), 1.0 if n in self._total else 0.0]
            maxes.append(self._max.get(n, -math.inf))
        sums = allreduce_sum(sums) if sums else []
        maxes = allreduce_max(maxes) if maxes else []
        out: dict[str, float] = {}
        for i, n in enumerate(names):
            s, w, t, has_t = sums[4 * i : 4 * i + 4]
            if w > 0:
                out[n] = s / w
            elif has_t > 0:
                out[n] = t
            elif maxes[i] > -math.inf:
                out[n] = maxes[i]
        return out

    def local(self) -> dict[str, float]:
        """This worker's values alone (tests, single-process use)."""
        return self.reduce(lambda x: x, lambda x: x, self.names())


@dataclass
class StepInputs:
    """What one optimizer step trains on, on this worker.

    ``updates[u]`` is the list of micro-batches of optimizer update ``u``: exactly the loop's accumulation
    count (``train.global_batch_size / (train.micro_batch_size * world_size) / stage.update_slices()``) on every
    worker, so every
    worker runs the same number of forward/backward passes (ZeRO-3's collectives need it). A batch that
    must carry no gradient (e.g. GRPO groups dropped by dynamic sampling) is still run, with
    ``batch_weight`` 0 and a zero loss."""

    updates: list[list[dict[str, Any]]]
    metrics: Metrics = field(default_factory=Metrics)


@dataclass
class RunPlan:
    """What the driver resolved before any worker starts (``Stage.plan``)."""

    config: Any
    """The resolved config (inputs made explicit): what the workers get and the manifests record."""
    inputs: list[str] = field(default_factory=list)
    """Input artifacts (data artifacts, model exports) named in the export's manifest (lineage)."""
    baselines: dict[str, float] = field(default_factory=dict)
    """Reference numbers computed by the driver (e.g. pretraining's unigram validation loss)."""


class Stage(ABC):
    """A training stage: subclass, set ``name`` and ``config_class``, implement the abstract methods.

    Driver side (class methods, before any worker exists): ``plan`` and ``resources``.
    Worker side (one instance per worker): everything else, called in this order: ``setup``,
    ``build_model``, ``frozen_models``, ``num_samples``, then per step ``step_inputs``, ``loss`` (per
    micro-batch), ``after_update``, and now and then ``evaluate``.
    """

    name: ClassVar[str] = "stage"
    """Manifest stage and metric tag ("pretrain", "sft", "grpo", "distill")."""
    config_class: ClassVar[Any] = None
    """The stage's pydantic config class (the loop rebuilds the config from JSON on each worker)."""
    seq_len: int | None = None
    """Typical sequence length of a training sample, set in ``setup`` (the attention term of the FLOPs per
    token behind MFU); None: attention is not counted."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.tokenizer: Any = None
        """Saved with every HF export: set it in ``setup``."""
        self.frozen: dict[str, Any] = {}
        """``frozen_models()`` after the loop placed them on the device (ZeRO-3: partitioned); read-only."""
        self.worker: WorkerInfo | None = None

    # ------------------------------------------------------------------ driver side
    @classmethod
    def plan(cls, cfg: Any) -> RunPlan:
        """Resolve and check the inputs before any worker starts (a bad input fails here, in seconds,
        naming the field). Default: the config as it is, no inputs."""
        return RunPlan(config=cfg)

    @classmethod
    @contextmanager
    def resources(cls, cfg: Any, run_dir: str) -> Iterator[dict[str, Any]]:
        """Start what the workers need for the whole fit (e.g. GRPO's rollout engine pool) and yield what
        the workers need to find it (JSON: actor names, not handles); stop it on exit."""
        yield {}

    # ------------------------------------------------------------------ worker side: setup
    @abstractmethod
    def setup(self, worker: WorkerInfo, resources: dict[str, Any]) -> None:
        """Load the tokenizer and data (once per worker, before the models are built)."""

    @abstractmethod
    def build_model(self) -> Any:
        """The torch module to train (seeded from the config: every worker builds the same one)."""

    def frozen_models(self) -> dict[str, Any]:
        """Frozen models beside the trained one (a reference policy, a teacher): built here, placed by the
        loop on the device in the training precision (under ZeRO-3, partitioned by a DeepSpeed inference
        engine, so call them on every worker alike), available as ``self.frozen[name]``. Default: none."""
        return {}

    @abstractmethod
    def num_samples(self) -> int:
        """Samples of one epoch. The loop orders them by (seed, epoch, index) and hands each worker its
        share of each step's ``train.global_batch_size`` samples, exactly once across restarts."""

    def sample_difficulty(self) -> np.ndarray | None:
        """A score per sample (higher = harder) for ``train.curriculum_epochs`` (epochs ordered easy to hard);
        computed the same on every worker. Default: none (the stage cannot be ordered by difficulty)."""
        return None

    # ------------------------------------------------------------------ worker side: one step
    def make_batch(self, rows: np.ndarray, device: Any) -> dict[str, Any]:
        """One micro-batch from these sample rows (the default ``step_inputs`` calls it per micro-batch)."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_batch or step_inputs")

    def prefetch(self, step: int, rows: list[np.ndarray]) -> None:
        """The rows of step ``step`` (as ``step_inputs`` will get them), told to the stage just before
        ``step_inputs(step - 1, ...)``, for every step below ``train.max_steps``: a stage may start preparing
        them while step ``step - 1`` trains (GRPO's ``async_rollouts``). Work started here that a restart would
        lose belongs in ``state_dict``. Default: nothing."""
        return None

    def step_inputs(self, step: int, rows: list[np.ndarray], model: Any) -> StepInputs:
        """The inputs of optimizer step ``step`` on this worker. ``rows[j]`` are the sample rows of this
        worker's micro-batch ``j`` (``len(rows)`` is the accumulation count). Default: one update, one
        ``make_batch`` per micro-batch. Stages that generate (GRPO) or score do it here, once per step."""
        device = self.worker.device if self.worker else "cpu"
        return StepInputs(updates=[[self.make_batch(r, device) for r in rows]])

    def batch_weight(self, batch: dict[str, Any]) -> float:
        """The loss normaliser of ``batch``, known before the forward pass. Default: ``batch["n_tokens"]``."""
        return float(batch["n_tokens"])

    @abstractmethod
    def loss(self, model: Any, batch: dict[str, Any], metrics: Metrics) -> Any:
        """The *sum* of the per-unit losses of a micro-batch (a scalar tensor carrying the graph); record
        stage metrics (``metrics.mean("kl", ...)``) as a side effect."""

    def update_slices(self) -> int:
        """Into how many optimizer updates a step's micro-batches are cut (each update: this worker's step
        micro-batches / ``update_slices``; DeepSpeed's accumulation is set to that). Default 1: one update a step
        (GRPO's ``steps_per_generation`` cuts a rollout batch into several)."""
        return 1

    def after_update(self, model: Any, step: int, update: int) -> None:
        """Called on every worker after each optimizer update (collectives allowed: under ZeRO-3 gather
        parameters here). Default: nothing."""
        return None

    # ------------------------------------------------------------------ worker side: evaluation
    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """This worker's validation micro-batches for the default ``evaluate`` (the loop runs dummy
        passes on workers that have fewer, so ZeRO-3 never deadlocks). Default: none."""
        return iter(())

    def evaluate(self, model: Any, evaluator: Any) -> Metrics:
        """Evaluation metrics (reduced over workers by the loop). Default: ``val_loss`` and
        ``val_perplexity`` over ``eval_batches`` through ``loss``/``batch_weight``, plus the metrics ``loss``
        records, prefixed ``val_``. ``evaluator`` offers
        ``evaluator.loss_over(batches)`` (the collective-safe default) to stages that extend it."""
        return evaluator.loss_over(self.eval_batches())

    def after_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """Called on every worker with the evaluation's metrics reduced over all workers (the same values
        everywhere), e.g. a curriculum that advances on held-out accuracy. Default: nothing."""
        return None

    # ------------------------------------------------------------------ worker side: state and lineage
    def state_dict(self) -> dict[str, Any]:
        """Stage state to restore on resume (JSON-able; e.g. a curriculum's position). Called on every worker
        at each checkpoint (collectives allowed); worker 0's return value is saved, and every worker gets it
        back in ``load_state_dict``, at any world size. Default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output (called after ``setup`` when resuming)."""
        return None

    def export_inputs(self) -> list[str]:
        """Input artifacts named in the manifests of per-checkpoint exports."""
        return []
