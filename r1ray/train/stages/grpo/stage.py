"""GRPO: group-relative policy optimisation with verifiable rewards, the learner on Ray Train + DeepSpeed and
the rollouts in a pool of engine actors (``r1ray.infer.pool``), through the shared training loop.

One optimizer step on each learner worker (``GRPOStage.step_inputs``, then the loop)::

    prompts   this worker's share of the step's ``train.global_batch_size`` problems (the exactly-once cursor)
    rollouts  G completions each from the pool; one unit per micro-batch, so they are a pure function of
              (weights, problems, seeds), the seed of sample k of problem i at step s being f(seed, s, i, k)
    rewards   ``score_remote`` Ray tasks (sandboxed, time-boxed verifiers, off the learner)
    groups    advantages per group; zero-variance groups counted, and with dynamic sampling dropped and
              refilled from problems outside the cursor's range keyed by (step, slot), up to a limit
    logprobs  old (policy at rollout time; only needed for mu > 1) and reference (beta > 0) per micro-batch
    updates   mu optimizer updates over the same micro-batches (exactly the accumulation count each)
    sync      after the last update rank 0 gathers the weights (ZeRO-3: every rank gathers), puts them in the
              object store once, and every engine loads them in place, tagged with the step

A learner restarted from a checkpoint pushes its weights before its first rollout, so the engines always
generate with the policy the cursor's step expects; a dead engine is replaced by the pool and its unit
regenerated identically. Both keep a run bitwise reproducible on CPU.

    python jobs/grpo.py                                 # the embedded default (SFT export first if missing)
    python jobs/grpo.py --config configs/grpo/debug.yaml
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from r1ray.config import OptimConfig, R1Config, ScalingConfig
from r1ray.observe.log import get_logger
from r1ray.tasks.base import MAX_COMPLETION_TOKENS
from r1ray.train.core.config import CheckpointConfig, TrainJobConfig, TrainLoopConfig
from r1ray.train.core.driver import TrainResult, run_stage, summary  # noqa: F401 - summary: the job's closing text
from r1ray.train.core.faults import fire_once
from r1ray.train.core.inputs import lineage_inputs, local_start, start_problems
from r1ray.train.stage import Metrics, RunPlan, Stage, StepInputs, WorkerInfo
from r1ray.train.stages.curriculum import Curriculum, CurriculumConfig
from r1ray.train.stages.grpo.rollouts import Group, Rollouts, new_times, sampling_seed

log = get_logger(__name__)

__all__ = ["GRPOConfig", "GRPOSection", "GRPOStage", "epoch_problems", "finite_task_rows", "run", "sampling_seed"]


class GRPOSection(R1Config):
    """GRPO's own settings: the task mix, rewards, sampling, the objective and the rollout engines."""

    group_size: int = Field(default=8, ge=2)
    """G: completions per prompt (one group). ``train.global_batch_size`` is prompts per step, so a step trains
    on ``global_batch_size x G`` completions; ``train.micro_batch_size`` prompts (x G) make one micro-batch."""
    tasks: dict[str, float] = Field(default_factory=lambda: {"arithmetic": 1.0})
    """Task mix ``{registry name: weight}`` (``r1ray.tasks.registry``; ``rg:<name>`` for reasoning-gym)."""
    difficulty: int | dict[str, int] = 3
    """Difficulty level, for every task or per task name: the level of ``accuracy`` at each evaluation, and of
    every prompt when ``curriculum`` is unset (the default curriculum mixes in levels 1 and 2)."""
    task_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Constructor options per task (e.g. ``{"gsm8k": {"path": "..."}}``)."""
    train_problems: int | None = Field(default=None, ge=1)
    """Problems in one epoch of the cursor (problem indices ``[0, train_problems)`` of the train split). None: 100,000
    for generated tasks; with a finite task in the mix (``gsm8k``: your file), the most that keeps every row of it
    exactly once per epoch, refills included (``epoch_problems``). A value above that is refused before any
    compute."""
    eval_problems: int = Field(default=100, ge=1)
    """Held-out (eval split) problems of each evaluation: greedy ``accuracy``, and ``eval_reward`` (the weighted
    ``rewards`` on the same completions)."""
    eval_difficulties: list[int] = Field(default_factory=lambda: [1, 2])
    """More levels to evaluate at each evaluation, ``eval_problems`` held-out problems each, for every task of the
    mix: ``accuracy_d<level>`` and ``eval_length_d<level>`` (mean greedy completion tokens), so a run shows what
    training on one level does to the others. ``accuracy`` stays the training level's."""
    rewards: dict[str, float] = Field(default_factory=lambda: {"accuracy": 1.0, "format": 0.2})
    """Reward weights ``{name: weight}`` (``r1ray.tasks.rewards``); a sample's reward is the weighted sum.
    ``length`` is DAPO's soft overlong penalty, measured in tokens against ``max_completion_tokens``."""
    reward_timeout_s: float = Field(default=2.0, gt=0)
    """Per-sample, per-reward time limit; a call past it scores 0 and is counted in ``reward_failures``."""
    prefill_think: bool = False
    """End every prompt with ``<think>\\n`` (and score completions as if it preceded them)."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature of the rollouts (the policy's logprobs are taken at the same temperature)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts."""
    max_completion_tokens: int = Field(default=MAX_COMPLETION_TOKENS, ge=1)
    """Longest completion; longer ones stop there (``finish_reason == "length"``)."""
    clip_eps_low: float = Field(default=0.2, gt=0, lt=1)
    """Lower clip of the ratio: ``1 - clip_eps_low``."""
    clip_eps_high: float = Field(default=0.28, gt=0)
    """Upper clip of the ratio: ``1 + clip_eps_high`` (DAPO's clip-higher; set 0.2 for the original GRPO)."""
    beta: float = Field(default=0.0, ge=0)
    """KL coefficient to the frozen reference (k3 estimator). 0: no reference model is built at all."""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    """Normalisation: ``grpo`` per-sequence mean; ``dapo`` token mean over the update; ``dr_grpo`` token sum
    over a constant ``max_completion_tokens`` (see ``r1ray.train.stages.grpo.loss``)."""
    scale_rewards: bool = True
    """Divide advantages by the group's reward std (off: Dr. GRPO's unbiased advantages; ``grpo`` and ``rloo``)."""
    advantage_estimator: str = "grpo"
    """``r1ray.train.stages.grpo.loss.ADVANTAGES``: ``grpo`` (group mean baseline), ``rloo`` (leave-one-out baseline),
    ``reinforce_pp`` (group mean removed, normalised over the whole step: REINFORCE++'s baseline variant);
    ``register_advantage`` adds one."""
    policy_loss: str = "clip"
    """``r1ray.train.stages.grpo.loss.POLICY_LOSSES``: ``clip`` (PPO's per-token clipped surrogate) or ``gspo`` (one
    ratio per sequence); ``register_policy_loss`` adds one."""
    tis_cap: float | None = Field(default=None, gt=0)
    """Truncated importance sampling: the engines return each sampled token's logprob (at the sampling
    temperature) and every token's loss is weighted by ``min(pi_learner / pi_engine, tis_cap)`` (TRL's and
    verl's correction for rollouts that are off-policy: ``async_rollouts``, or engine numerics that differ from
    the learner's, e.g. vLLM in bf16). None: off (on one CPU the engine's numerics are the learner's)."""
    mu: int = Field(default=1, ge=1)
    """Passes over each rollout batch (TRL's ``num_iterations``): the step's updates run ``mu`` times over the
    same micro-batches; ratios move off 1 after the first update, which is where the clip acts."""
    steps_per_generation: int = Field(default=1, ge=1)
    """Optimizer updates each rollout batch is split into (TRL's ``steps_per_generation``): update ``u`` trains
    on the ``u``-th of ``steps_per_generation`` consecutive slices of the step's micro-batches (the same prompts on
    any worker count), so from the second slice on the policy has moved off the one that generated the rollouts,
    the ratio leaves 1 and the clip acts. With ``mu`` the slices repeat: ``mu x steps_per_generation`` updates a
    step, the weights pushed to the engines after the last. Each worker's micro-batches of a step
    (``train.global_batch_size / (train.micro_batch_size x workers)``) must split evenly."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose rewards all agree and refill their slots with other problems
    (outside the cursor's range, keyed by step and slot) until the batch is full or ``max_refill_rounds`` is
    reached; slots still empty carry no gradient."""
    max_refill_rounds: int = Field(default=8, ge=0)
    """The cap of dynamic sampling: rounds of refills, each regenerating only the slots still empty, until the
    batch is full; a step that ends with empty slots is counted in ``refill_cap_hits`` (and its empty slots in
    ``dropped_groups``)."""
    skip_zero_variance: bool = True
    """Leave groups whose rewards all agree (advantage 0 for every completion) out of the learner's forward and
    backward. Their loss is exactly 0, and the normaliser still counts their tokens, so the update is the one that
    computes them, to float rounding (tests/ray/test_grpo.py); only the learner's time changes: on the default
    run half to three quarters of the groups are solved by every completion. Applies when ``beta == 0`` (the KL
    term has a gradient on every token). The step's ``entropy`` and ``clip_fraction`` are then over the groups
    computed."""
    overlong_filter: bool = False
    """Mask the loss of completions cut at ``max_completion_tokens`` (DAPO's overlong filtering)."""
    overlong_buffer: int | None = Field(default=None, ge=1)
    """Tokens before the maximum where the ``length`` reward starts to fall (default: 20% of the maximum)."""
    async_rollouts: bool = False
    """One step off-policy (verl's one-step-off-policy recipe, PipelineRL): the engines generate step s + 1's
    rollouts while the learner trains on step s's, so generation and learning overlap instead of taking turns.
    Step s's rollouts (s >= 1) then come from the policy after s - 1 updates, not s; the ratio's "old" policy is
    the learner's own at the step (at mu = 1 the ratio is 1); ``tis_cap`` corrects the one-step lag by importance
    sampling.
    Still exactly reproducible: the rollouts in flight are saved in each checkpoint, and a run resumed on any
    number of workers equals an uninterrupted one. Refills (``dynamic_sampling``) are generated on-policy."""
    share_prompt: bool = True
    """Learner layout: each group's prompt runs once, its completions as branches behind a block mask
    (``r1ray.train.stages.grpo.pack``), instead of one padded row per completion. Same logprobs (to float rounding),
    fewer positions when prompts are long next to completions; a micro-batch whose row would pass
    ``share_prompt_max_row`` positions uses the padded layout (attention is quadratic in the row)."""
    share_prompt_max_row: int = Field(default=2048, ge=2)
    """Longest shared row (prompt + every completion of a group) before a micro-batch falls back to padding."""
    logprob_chunk_tokens: int | None = Field(default=None, ge=1)
    """Tokens per chunk of the chunked logprob/entropy head (``r1ray.train.core.losses``); None: by vocabulary."""
    num_engines: int = Field(default=1, ge=1)
    """Rollout engine actors (each in its own placement group, apart from the learner's)."""
    cpus_per_engine: float = Field(default=1.0, gt=0)
    """Logical CPUs per engine (and its torch threads on CPU, unless ``engine_torch_threads``)."""
    engine_torch_threads: int | None = Field(default=None, ge=1)
    """Torch threads of each engine on CPU (default: ``cpus_per_engine``). The learner and the engines take
    turns (generate, then learn), so on a small machine each may use every core while the other waits:
    ``train.torch_threads`` and this set to the core count (docs/grpo.md measures it)."""
    gpus_per_engine: float = Field(default=0.0, ge=0)
    """GPUs per engine (a GPU cluster: 1 with the vLLM backend)."""
    engine_backend: Literal["hf", "vllm", "auto"] = "hf"
    """Rollout engine: ``hf`` (continuous batching, CPU or GPU), ``vllm`` (GPU), ``auto`` (vLLM when it imports)."""
    log_rollouts: bool = True
    """Append each step's rollout statistics and one sample completion to
    ``<run_dir>/grpo/rollouts-rank<r>.jsonl`` (local run directories)."""
    kill_engine_at_step: int | None = Field(default=None, ge=1)
    """Fault injection: SIGKILL one rollout engine while it generates this step's rollouts (once per run)."""
    kill_pool_controller_at_step: int | None = Field(default=None, ge=1)
    """Fault injection: SIGKILL the engine pool's controller while this step's rollouts are in flight (once per
    run): Ray restarts it, its engines start again, the learner pushes its weights again and the rollouts are
    generated again (the same completions)."""


class GRPOConfig(TrainJobConfig):
    """GRPO with verifiable rewards: a policy initialised from an SFT export (``model.init_from``), rollouts
    from a pool of engine actors, a DeepSpeed learner; fault tolerant and bitwise reproducible on CPU."""

    run_name: str = "grpo"
    """Run directory ``<storage.root>/runs/<run_name>``; rerunning the same name resumes it."""
    train: TrainLoopConfig = TrainLoopConfig(max_steps=80, global_batch_size=8, micro_batch_size=8, eval_every=40,
                                             log_every=5)
    """The training loop: ``global_batch_size`` is prompts per step (x ``grpo.group_size`` completions),
    ``micro_batch_size`` prompts per micro-batch (one rollout unit). Default: 80 steps of 8 prompts (~6 s a step
    on 2 CPUs with ``grpo.skip_zero_variance``: about the time 50 steps took without it)."""
    checkpoint: CheckpointConfig = CheckpointConfig(every=40)
    """Checkpoints and exports (GRPO's default: every 40 steps)."""
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=5, weight_decay=0.0, schedule="constant")
    """Optimizer (RL fine-tuning: a constant learning rate, no weight decay). 1e-4 on the default model: 4e-4
    collapsed (level 3 53% -> 14%), 2e-4 ended 49-57% in two runs of 50 steps that differed only by float rounding,
    1e-4 reached 63% in 80 steps (docs/reasoning.md). For models of a billion parameters start near 1e-6."""
    scaling: ScalingConfig = ScalingConfig(num_workers=1)
    """Learner workers (the rollout engines hold their own CPUs: ``grpo.num_engines x grpo.cpus_per_engine``)."""
    grpo: GRPOSection = GRPOSection()
    """GRPO."""
    curriculum: CurriculumConfig | None = CurriculumConfig(kind="fixed", levels=[1, 2, 3], weights=[0.2, 0.3, 0.5])
    """A difficulty schedule for the training prompts (``r1ray.train.stages.curriculum``): each prompt's level is a pure
    function of the step, its problem index and the schedule's state (saved in every checkpoint). GRPO's
    evaluation reports ``accuracy`` at ``grpo.difficulty``: an ``advance`` schedule reads it with
    ``metric: accuracy``. Unset (``curriculum=null``): ``grpo.difficulty`` for every prompt. Default: a fixed mix,
    half of the prompts level 3 (the level no SFT trace showed) and the rest levels 1 and 2, which keeps what SFT
    taught (on level 3 alone the default model's level-1 accuracy fell from 97% to 77% in 50 steps while level 3
    rose; docs/reasoning.md)."""

    def resources_beside_workers(self) -> dict[str, float]:
        from r1ray.tasks.remote import NUM_CPUS as reward_task_cpus

        g = self.grpo
        return {"CPU": g.num_engines * g.cpus_per_engine + reward_task_cpus, "GPU": g.num_engines * g.gpus_per_engine}

    @model_validator(mode="after")
    def _check_grpo(self) -> GRPOConfig:
        problems = []
        if not self.grpo.tasks or not any(w > 0 for w in self.grpo.tasks.values()):
            problems.append("grpo.tasks: give at least one task with a positive weight, e.g. {arithmetic: 1.0}")
        if not self.grpo.rewards:
            problems.append("grpo.rewards: give at least one reward, e.g. {accuracy: 1.0}")
        from r1ray.train.stages.grpo.loss import ADVANTAGES, POLICY_LOSSES

        if self.grpo.advantage_estimator not in ADVANTAGES:
            problems.append(f"grpo.advantage_estimator={self.grpo.advantage_estimator!r}: expected one of "
                            f"{sorted(ADVANTAGES)}")
        if self.grpo.policy_loss not in POLICY_LOSSES:
            problems.append(f"grpo.policy_loss={self.grpo.policy_loss!r}: expected one of {sorted(POLICY_LOSSES)}")
        if self.grpo.tis_cap is not None and self.grpo.top_p < 1:
            problems.append(f"grpo.tis_cap with grpo.top_p={self.grpo.top_p}: the engines' logprobs do not reflect "
                            "nucleus truncation, so the importance weights would be wrong; sample with top_p 1")
        if self.grpo.tis_cap is not None and self.grpo.tis_cap < 1:
            problems.append(f"grpo.tis_cap={self.grpo.tis_cap}: a cap below 1 would down-weight on-policy tokens "
                            "(TRL and verl use 2)")
        if self.grpo.overlong_buffer is not None and self.grpo.overlong_buffer > self.grpo.max_completion_tokens:
            problems.append(f"grpo.overlong_buffer={self.grpo.overlong_buffer} exceeds grpo.max_completion_tokens="
                            f"{self.grpo.max_completion_tokens}")
        for workers in sorted({self.scaling.min_workers, self.scaling.max_workers}):
            per_worker, rest = divmod(self.train.global_batch_size, self.train.micro_batch_size * workers)
            if not rest and per_worker % self.grpo.steps_per_generation:
                problems.append(f"grpo.steps_per_generation={self.grpo.steps_per_generation}: each of the {workers} "
                                f"worker(s) has {per_worker} micro-batch(es) a step (train.global_batch_size="
                                f"{self.train.global_batch_size} / train.micro_batch_size="
                                f"{self.train.micro_batch_size}), which do not split into that many updates")
                break
        if problems:
            raise ValueError("; ".join(problems))
        return self


GENERATED_EPOCH = 100_000
"""``grpo.train_problems`` when every task of the mix is generated (no finite train split)."""


def finite_task_rows(g: GRPOSection) -> dict[str, int]:
    """Train-split rows of each finite task of ``g``'s mix (a task with ``size``, e.g. ``gsm8k`` on a file)."""
    from r1ray.tasks.registry import get_task

    out = {}
    for name, weight in g.tasks.items():
        if weight > 0:
            size = getattr(get_task(name, **g.task_options.get(name, {})), "size", None)
            if callable(size):
                out[name] = int(size("train"))
    return out


def epoch_problems(g: GRPOSection) -> int:
    """Problem indices in one epoch of the cursor. A finite task's problem ``k`` is its row ``k % rows``, and a
    dynamic-sampling refill of cursor position ``p`` takes index ``T + (p % T) * max_refill_rounds + round``
    (``rollouts.refill_index``), so the cursor's ``T`` indices and the refills' ``T * max_refill_rounds`` are
    distinct rows when ``T * (1 + max_refill_rounds) <= rows``: that is the default with a finite task, and a
    larger ``grpo.train_problems`` is refused (it would train on a row twice in an epoch)."""
    finite = finite_task_rows(g)
    per = 1 + (g.max_refill_rounds if g.dynamic_sampling else 0)
    if not finite:
        return g.train_problems or GENERATED_EPOCH
    name = min(finite, key=lambda k: finite[k])
    rows = finite[name]
    cap = rows // per
    why = (f"task {name} has {rows} train rows" + (f" and dynamic sampling takes up to grpo.max_refill_rounds="
                                                    f"{g.max_refill_rounds} refill rows per cursor problem"
                                                    if per > 1 else ""))
    if cap < 1:
        raise ValueError(f"grpo.train_problems: {why}, too few for one problem an epoch; give the task more rows or "
                         "lower grpo.max_refill_rounds")
    if g.train_problems is not None and g.train_problems > cap:
        raise ValueError(f"grpo.train_problems={g.train_problems}: {why}, so an epoch of more than {cap} problems "
                         f"would train on a row twice; set grpo.train_problems<={cap} or leave it unset")
    return g.train_problems or cap


class GRPOStage(Stage):
    """GRPO on the shared loop (see the module doc)."""

    name = "grpo"
    config_class = GRPOConfig

    # ------------------------------------------------------------------ driver side
    @classmethod
    def plan(cls, cfg: GRPOConfig) -> RunPlan:
        from r1ray.tasks.registry import get_task
        from r1ray.tasks.rewards import get_reward

        problems = start_problems(
            cfg.model.init_from, "model.init_from",
            unset="set it to an SFT export (python jobs/sft.py writes one) or any Hugging Face model directory, or "
                  "run python jobs/grpo.py, which prepares the default SFT run first")
        tasks_ok = True
        for name in cfg.grpo.tasks:
            try:
                get_task(name, **cfg.grpo.task_options.get(name, {}))
            except ValueError as e:
                problems.append(f"grpo.tasks: {e}")
                tasks_ok = False
        if tasks_ok:
            try:
                epoch_problems(cfg.grpo)
            except ValueError as e:
                problems.append(str(e))
        for name in cfg.grpo.rewards:
            try:
                get_reward(name)
            except ValueError as e:
                problems.append(f"grpo.rewards: {e}")
        if problems:
            raise ValueError("GRPO config cannot run:\n  - " + "\n  - ".join(problems))
        return RunPlan(config=cfg, inputs=lineage_inputs(cfg.model.init_from))

    @classmethod
    @contextmanager
    def resources(cls, cfg: GRPOConfig, run_dir: str) -> Iterator[dict[str, Any]]:
        """The rollout engine pool for the whole fit (started from ``model.init_from``; the learner pushes its
        own weights before its first rollout anyway)."""
        from r1ray.infer.pool import EnginePool

        g = cfg.grpo
        name = f"r1ray-grpo-{cfg.run_name}-{uuid.uuid4().hex[:8]}"
        pool = EnginePool.start(name, cfg.model.init_from, n=g.num_engines, cpus_per_engine=g.cpus_per_engine,
                                gpus_per_engine=g.gpus_per_engine, backend=g.engine_backend,
                                torch_threads=g.engine_torch_threads,
                                dtype="float32" if cfg.deepspeed.precision == "fp32" and not g.gpus_per_engine
                                else "auto", seed=cfg.seed)
        try:
            yield {"pool": name, "run_dir": run_dir}
        finally:
            pool.stop()

    # ------------------------------------------------------------------ worker side: setup
    def setup(self, worker: WorkerInfo, resources: dict[str, Any]) -> None:
        from r1ray.infer.pool import EnginePool
        from r1ray.model.tokenizer import load_tokenizer

        cfg: GRPOConfig = self.cfg
        self.tokenizer = load_tokenizer(local_start(cfg.model.init_from))
        self.pool = EnginePool.connect(resources["pool"])
        self.run_dir = resources.get("run_dir")
        self.seq_len = 0
        self._version: int | None = None  # the weights version the pool holds, as this attempt pushed it
        self._t_learn = 0.0
        self._metrics_sink: Metrics | None = None
        self._eval_problems: list[Any] | None = None
        self._eval_levels: dict[int, list[Any]] = {}
        self._curriculum_setup()
        self._attempt = uuid.uuid4().hex[:8]
        self.epoch = epoch_problems(cfg.grpo)  # builds the mix's tasks (a gsm8k file is read): once per worker
        self.rollouts = Rollouts(cfg, self.pool, self.tokenizer, worker, self._problem_at, epoch=self.epoch)

    def build_model(self) -> Any:
        from r1ray.model import build_model

        return build_model(self.cfg.model, self.tokenizer, seed=self.cfg.seed, precision=self.cfg.deepspeed.precision)

    def frozen_models(self) -> dict[str, Any]:
        """The reference policy (the initial weights) when ``grpo.beta > 0``; none at ``beta == 0``."""
        if self.cfg.grpo.beta <= 0:
            return {}
        from r1ray.model import build_model

        return {"ref": build_model(self.cfg.model, self.tokenizer, seed=self.cfg.seed,
                                   precision=self.cfg.deepspeed.precision)}

    def num_samples(self) -> int:
        return self.epoch

    # ------------------------------------------------------------------ problems and prompts
    def _problem_at(self, step: int, index: int) -> Any:
        """Training problem ``index`` at ``step``'s difficulty (the curriculum's level for it)."""
        return self._problem(index, step=step)

    def _problem(self, index: int, split: str = "train", step: int = 0) -> Any:
        from r1ray.tasks.registry import sample_problems

        g = self.cfg.grpo
        difficulty = g.difficulty
        curriculum = getattr(self, "curriculum", None)
        if curriculum is not None and split == "train":
            difficulty = curriculum.level_of(step, int(index), self.curriculum_state)
        return sample_problems(g.tasks, 1, seed=self.cfg.seed, split=split, difficulty=difficulty, start=int(index),
                               options=g.task_options)[0]

    # ------------------------------------------------------------------ curriculum (stage state)
    def _curriculum_setup(self) -> None:
        self.curriculum = Curriculum(self.cfg.curriculum, self.cfg.seed) if self.cfg.curriculum else None
        self.curriculum_state = self.curriculum.initial_state() if self.curriculum else {}

    def after_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if self.curriculum is not None:
            self.curriculum_state = self.curriculum.after_evaluation(step, metrics, self.curriculum_state)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"curriculum": self.curriculum_state} if self.curriculum is not None else {}
        if self.cfg.grpo.async_rollouts:
            state["pending_rollouts"] = self.rollouts.pending_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.curriculum is not None and "curriculum" in state:
            self.curriculum_state = dict(state["curriculum"])
        if self.cfg.grpo.async_rollouts:
            self.rollouts.load_pending(state.get("pending_rollouts"))

    def prefetch(self, step: int, rows: list[np.ndarray]) -> None:
        self.rollouts.prefetch(step, rows)

    # ------------------------------------------------------------------ one step
    def step_inputs(self, step: int, rows: list[np.ndarray], model: Any) -> StepInputs:
        """One GRPO step, top to bottom: generate -> score -> (refill) -> advantages -> old/ref logprobs; the loop
        then runs the ``mu x steps_per_generation`` updates and ``after_update`` syncs the engines."""
        from r1ray.train.core.sampler import step_micro_batches

        cfg, g, w = self.cfg, self.cfg.grpo, self.worker
        m, times = Metrics(), new_times()
        if self.curriculum is not None:
            for r in rows:
                for index in r:
                    m.mean("curriculum_level", float(self.curriculum.level_of(step, int(index), self.curriculum_state)))
        if self._version is None:  # first step of this attempt: the engines get exactly our weights
            self._sync(model, version=step, metrics=m)
        self._inject_faults(step)
        # generate and score (or collect what the previous step started)
        micro = self.rollouts.take(step, rows, self._version, times, m)
        zero_first = [grp.zero_variance for unit in micro for grp in unit]
        dropped = refilled = 0
        if g.dynamic_sampling:
            positions = step_micro_batches(step, cfg.train.global_batch_size, cfg.train.micro_batch_size, w.rank,
                                           w.world_size)
            dropped, refilled = self.rollouts.refill(step, micro, positions, self._version, times)
            m.total("refill_cap_hits", float(dropped > 0))
        if g.async_rollouts:
            self.rollouts.launch_following(step, self._version)  # generated while this step learns
        # advantages, then the old and reference logprobs of every micro-batch
        step_rewards = self._all_rewards(micro) if g.advantage_estimator == "reinforce_pp" else None
        batches = [self._batch(unit, drop_zero=g.dynamic_sampling, step_rewards=step_rewards) for unit in micro]
        self._logprobs(model, batches)
        self._step_metrics(step, m, micro, zero_first, dropped, refilled, times)
        self._t_learn = time.perf_counter()
        n = len(batches) // g.steps_per_generation
        slices = [batches[i * n:(i + 1) * n] for i in range(g.steps_per_generation)]
        return StepInputs(updates=slices * g.mu, metrics=m)

    def update_slices(self) -> int:
        return self.cfg.grpo.steps_per_generation

    def _inject_faults(self, step: int) -> None:
        """``grpo.kill_engine_at_step`` / ``kill_pool_controller_at_step``: a SIGKILL once units are in flight."""
        g, w = self.cfg.grpo, self.worker
        if (g.kill_engine_at_step == step + 1 and w.rank == 0 and self.run_dir
                and fire_once(self.run_dir, f"kill-engine-{step + 1}")):
            import ray

            self.rollouts.kill_mid_rollout(ray.get(self.pool.actors()[0].pid.remote()), "rollout engine")
        if (g.kill_pool_controller_at_step == step + 1 and w.rank == 0 and self.run_dir
                and fire_once(self.run_dir, f"kill-pool-controller-{step + 1}")):
            self.rollouts.kill_mid_rollout(self.pool.controller_pid(), "the engine pool controller")

    def _all_rewards(self, micro: list[list[Group]]) -> Any:
        """Every group's rewards of the step, from every worker (rank by rank): the batch an estimator that
        normalises over the step sees, on any worker count."""
        import torch
        import torch.distributed as dist

        mine = [grp.rewards for unit in micro for grp in unit]
        if dist.is_initialized() and self.worker.world_size > 1:
            parts: list[Any] = [None] * self.worker.world_size
            dist.all_gather_object(parts, mine)
            mine = [r for part in parts for r in part]
        return torch.tensor(mine, dtype=torch.float64)

    def _batch(self, unit: list[Group], *, drop_zero: bool, step_rewards: Any = None) -> dict[str, Any]:
        """One micro-batch: the forward's input in the shared-prompt or padded layout (``group_pack``), the index
        back to a [completions, completion tokens] grid, the loss mask on that grid, and the advantages."""
        import torch

        from r1ray.train.stages.grpo.loss import group_advantages, loss_weight
        from r1ray.train.stages.grpo.pack import padded_batch, shared_batch, shared_row_length

        g = self.cfg.grpo
        adv, zero = group_advantages(torch.tensor([grp.rewards for grp in unit], dtype=torch.float64),
                                     scale=g.scale_rewards, estimator=g.advantage_estimator,
                                     batch=step_rewards)
        keep, advs, lengths = [], [], []
        for gi, grp in enumerate(unit):
            for k, c in enumerate(grp.completions):
                ok = not (drop_zero and bool(zero[gi])) and c.finish_reason != "error" and len(c.token_ids) > 0
                if g.overlong_filter and c.finish_reason == "length":
                    ok = False
                keep.append(ok)
                advs.append(float(adv[gi, k]))
                lengths.append(len(c.token_ids))
        # the normaliser counts every group of the unit, computed or not (below)
        full = torch.zeros(len(keep), max(lengths, default=0) or 1, dtype=torch.float32)
        for row, (ok, n) in enumerate(zip(keep, lengths, strict=True)):
            full[row, :n] = float(ok)
        weight = loss_weight(full, g.loss_type)
        if g.skip_zero_variance and g.beta == 0 and bool(zero.any()):
            # an advantage-0 group adds exactly 0 to the loss's sum (no KL term): leave it out of the forward and
            # backward (one group stays when all are zero, so the micro-batch still backpropagates)
            starts = np.cumsum([0] + [len(grp.completions) for grp in unit])
            sel = [gi for gi in range(len(unit)) if not bool(zero[gi])] or [0]
            rows = [(gi, r) for gi in sel for r in range(starts[gi], starts[gi + 1])]
            unit = [unit[gi] for gi in sel]
            keep = [keep[r] and not bool(zero[gi]) for gi, r in rows]
            advs = [advs[r] for _, r in rows]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        groups = [(grp.prompt_ids, [list(c.token_ids) for c in grp.completions]) for grp in unit]
        if g.share_prompt and max(shared_row_length(p, cs) for p, cs in groups) <= g.share_prompt_max_row:
            fwd = shared_batch(groups, pad)
        else:
            fwd = padded_batch([(p, c) for p, cs in groups for c in cs], pad)
        mask = fwd["valid"] * torch.tensor(keep, dtype=torch.float32).unsqueeze(1)
        self.seq_len = max(self.seq_len, int(fwd["input_ids"].shape[1]))
        dev = self.worker.device if self.worker else "cpu"
        out = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in fwd.items() if k != "valid"}
        out.update(mask=mask.to(dev), advantages=torch.tensor(advs, dtype=torch.float32, device=dev),
                   weight=weight)
        if g.tis_cap is not None:  # the engines' sampling logprobs on the same [completions, tokens] grid
            samp = torch.zeros(mask.shape, dtype=torch.float32)
            for row, c in enumerate(c for grp in unit for c in grp.completions):
                lps = [e.logprob for e in c.logprobs[:samp.shape[1]]]
                if len(lps) != len(c.token_ids) or any(v is None for v in lps):
                    raise RuntimeError(f"grpo.tis_cap: the engine returned {len(lps)} sampling logprobs for a "
                                       f"completion of {len(c.token_ids)} tokens")
                samp[row, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
            out["sampling_logp"] = samp.to(dev)
        return out

    def _forward_logprobs(self, model: Any, batch: dict[str, Any], *, with_entropy: bool = False):
        """Per-token logprobs of the completions (and their entropies), [completions, completion tokens]."""
        from r1ray.train.core.losses import causal_lm_apply, entropy, token_logprobs, unwrap
        from r1ray.train.stages.grpo.pack import attention_mask_for

        g = self.cfg.grpo
        ent: list[Any] = []

        def head(h, w):
            if with_entropy:
                import torch

                with torch.no_grad():
                    ent.append(entropy(h.detach(), w.detach(), g.logprob_chunk_tokens, temperature=g.temperature))
            return token_logprobs(h, w, batch["targets"], g.logprob_chunk_tokens, temperature=g.temperature)

        m = unwrap(model)
        attn = attention_mask_for(m, batch["attention_mask"], next(m.parameters()).dtype)
        logp = causal_lm_apply(model, head, batch["input_ids"], attn, batch["position_ids"])
        idx = batch["gather"]
        return logp.reshape(-1)[idx], (ent[0].reshape(-1)[idx] if ent else None)

    def _logprobs(self, model: Any, batches: list[dict[str, Any]]) -> None:
        """Old logprobs (the policy at rollout time; with one update a step the ratio is exactly 1, so the loss uses
        the detached current logprobs and this forward is skipped) and reference logprobs (beta > 0)."""
        import torch

        g = self.cfg.grpo
        with torch.no_grad():
            for b in batches:
                if g.mu * g.steps_per_generation > 1:
                    b["old_logp"] = self._forward_logprobs(model, b)[0].detach()
                if g.beta > 0:
                    b["ref_logp"] = self._forward_logprobs(self.frozen["ref"], b)[0].detach()

    def batch_weight(self, batch: dict[str, Any]) -> float:
        return float(batch["weight"])

    def loss(self, model: Any, batch: dict[str, Any], metrics: Metrics) -> Any:
        from r1ray.train.stages.grpo.loss import per_token_loss, reduce_loss

        g = self.cfg.grpo
        self._metrics_sink = metrics
        logp, ent = self._forward_logprobs(model, batch, with_entropy=True)
        old = batch.get("old_logp")
        old = logp.detach() if old is None else old
        mask = batch["mask"]
        is_w = None
        if "sampling_logp" in batch:
            from r1ray.train.stages.grpo.loss import importance_weights

            is_w = importance_weights(old, batch["sampling_logp"], g.tis_cap)
        per_token, stats = per_token_loss(
            logp, old, batch["advantages"], eps_low=g.clip_eps_low, eps_high=g.clip_eps_high, beta=g.beta,
            ref_logp=batch.get("ref_logp"), policy_loss=g.policy_loss, mask=mask, is_weights=is_w)
        n = float(mask.sum())
        if n > 0:
            if is_w is not None:
                metrics.mean("tis_weight_mean", float((is_w * mask).sum()) / n, n)
                metrics.mean("tis_capped_fraction", float(((is_w >= g.tis_cap) * mask).sum()) / n, n)
                diff = (old - batch["sampling_logp"]).abs()
                metrics.mean("engine_logp_abs_diff", float((diff * mask).sum()) / n, n)
            if g.mu * g.steps_per_generation > 1:
                metrics.mean("ratio_abs_dev", float(((stats["ratio"] - 1).abs() * mask).sum()) / n, n)
            metrics.mean("clip_fraction", float((stats["clipped"] * mask).sum()) / n, n)
            metrics.mean("entropy", float((ent * mask).sum()) / n, n)
            if "kl" in stats:
                metrics.mean("kl", float((stats["kl"] * mask).sum()) / n, n)
        return reduce_loss(per_token, mask, g.loss_type, max_tokens=g.max_completion_tokens)

    # ------------------------------------------------------------------ weight sync
    def after_update(self, model: Any, step: int, update: int) -> None:
        if update != self.cfg.grpo.mu * self.cfg.grpo.steps_per_generation - 1:
            return  # the engines need the policy of the next rollout only
        learn = time.perf_counter() - self._t_learn
        sink = self._metrics_sink if self._metrics_sink is not None else Metrics()
        sink.mean("learn_seconds", learn)
        self._sync(model, version=step + 1, metrics=sink)

    def _sync(self, model: Any, *, version: int, metrics: Metrics) -> None:
        """Rank 0 pushes the full weights to every engine (under ZeRO-3 every rank gathers them with it);
        every rank waits for it, so no rank's next rollout can run on the old policy."""
        import torch.distributed as dist

        from r1ray.train.core.losses import unwrap

        w = self.worker
        module = unwrap(model)
        seconds = 0.0
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if w.rank == 0:
                    seconds = self.pool.update_weights(module.state_dict(), version)
        elif w.rank == 0:
            seconds = self.pool.update_weights(module.state_dict(), version)
        if dist.is_initialized() and w.world_size > 1:
            dist.barrier()
        if w.rank == 0:
            metrics.mean("sync_seconds", seconds)
        self._version = version

    # ------------------------------------------------------------------ metrics
    def _step_metrics(self, step: int, m: Metrics, micro: list[list[Group]], zero_first: list[bool], dropped: int,
                      refilled: int, times: dict[str, float]) -> None:
        groups = [grp for unit in micro for grp in unit]
        rewards = np.array([r for grp in groups for r in grp.rewards], dtype=np.float64)
        lengths = [len(c.token_ids) for grp in groups for c in grp.completions]
        clipped = [c.finish_reason == "length" for grp in groups for c in grp.completions]
        n = len(rewards)
        m.mean("reward_mean", float(rewards.mean()), n)
        m.mean("reward_std", float(rewards.std()), n)
        for name in self.cfg.grpo.rewards:
            vals = [v for grp in groups for v in grp.per_reward.get(name, [])]
            if vals:
                m.mean(f"reward_{name}", float(np.mean(vals)), len(vals))
        m.mean("frac_zero_variance_groups", float(np.mean(zero_first)), len(zero_first))
        m.total("dropped_groups", float(dropped))
        m.total("refilled_groups", float(refilled))
        m.total("reward_failures", float(sum(grp.failures for grp in groups)))
        m.mean("completion_length_mean", float(np.mean(lengths)), n)
        m.max("completion_length_max", float(max(lengths)))
        m.mean("completion_clipped_fraction", float(np.mean(clipped)), n)
        if times["generate"] > 0:
            m.mean("rollout_tokens_per_second", times["gen_tokens"] / times["generate"])
        m.mean("generate_seconds", times["generate"])
        m.mean("score_seconds", times["score"])
        m.mean("reward_seconds", float(sum(grp.reward_seconds for grp in groups)))
        stats = self.pool.stats()
        m.max("engine_replacements", float(stats["replacements"]))
        if self.cfg.grpo.log_rollouts and self.run_dir and "://" not in self.run_dir:
            first = groups[0]
            line = {"step": step + 1, "rank": self.worker.rank, "attempt": self._attempt, "time": time.time(),
                    **m.local(),
                    "weights_version": self._version, "rollout_version": self.rollouts.version,
                    "engine_replacements": stats["replacements"],
                    "pool_controller_restarts": self.pool.controller_restarts,
                    "sample": {"index": first.index, "question": first.problem.question,
                               "completion": first.completions[0].text, "reward": first.rewards[0]},
                    "completion_hash": hashlib.sha256(json.dumps(
                        [c.token_ids for grp in groups for c in grp.completions]).encode()).hexdigest()[:16]}
            d = os.path.join(self.run_dir, "grpo")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"rollouts-rank{self.worker.rank}.jsonl"), "a") as fh:
                fh.write(json.dumps(line) + "\n")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: Any, evaluator: Any) -> Metrics:
        """Held-out greedy accuracy through the pool (which holds the current weights: evaluation follows the
        step's sync). Rank 0 alone generates and scores; no learner forward, so nothing collective here."""
        import ray

        from r1ray.infer.types import SamplingParams
        from r1ray.tasks.registry import sample_problems
        from r1ray.tasks.remote import score_remote

        m = Metrics()
        if self.worker.rank != 0:
            return m
        g = self.cfg.grpo
        if self._eval_problems is None:
            self._eval_problems = sample_problems(g.tasks, g.eval_problems, seed=self.cfg.seed, split="eval",
                                                  difficulty=g.difficulty, options=g.task_options)
            self._eval_levels = {level: sample_problems(g.tasks, g.eval_problems, seed=self.cfg.seed, split="eval",
                                                        difficulty=level, options=g.task_options)
                                 for level in g.eval_difficulties}
        sets = [("", self._eval_problems)] + [(f"_d{lv}", ps) for lv, ps in self._eval_levels.items()]
        probs = [p for _, ps in sets for p in ps]
        params = SamplingParams(max_tokens=g.max_completion_tokens, temperature=0.0)
        outs = self.pool.generate([self.rollouts.prompt_ids(p) for p in probs], params, version=self._version)
        # Accuracy, and the run's own weighted reward on the same greedy completions (``eval_reward``: what the
        # policy is optimised for, a Tune metric when accuracy stays flat, as on a tiny model).
        weights = {**g.rewards, "accuracy": g.rewards.get("accuracy", 0.0)}
        res = ray.get(score_remote([o.text for o in outs], probs, weights, **self.rollouts.score_options(outs)))
        at = 0
        for suffix, ps in sets:
            acc = res.per_reward["accuracy"][at:at + len(ps)]
            m.mean(f"accuracy{suffix}", float(np.mean(acc)), len(ps))
            if suffix:
                m.mean(f"eval_length{suffix}", float(np.mean([len(o.token_ids) for o in outs[at:at + len(ps)]])),
                       len(ps))
            else:
                m.mean("eval_reward", float(np.mean(res.total[:len(ps)])), len(ps))
            at += len(ps)
        return m

    def export_inputs(self) -> list[str]:
        return lineage_inputs(self.cfg.model.init_from)


def run(cfg: GRPOConfig, *, callbacks: Sequence[Any] = (), run_name: str | None = None,
        storage_path: str | None = None) -> TrainResult:
    """Train ``cfg`` to the end (or to a preemption): ``r1ray.train.core.driver.run_stage`` with ``GRPOStage``."""
    return run_stage(GRPOStage, cfg, callbacks=callbacks, run_name=run_name, storage_path=storage_path)
