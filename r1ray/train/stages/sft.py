"""Supervised fine-tuning (the R1 cold start): chat conversations, loss on assistant tokens only, through the
shared training loop.

``SFTStage`` is what SFT adds to the loop (``r1ray.train.stage``): a fixed, seeded list of conversations as
samples (so the loop's exactly-once cursor, SIGKILL recovery, elastic resume and HF exports apply unchanged),
the tokenizer's chat template with an assistant-only target mask (``r1ray.train.stages.sft_data``), a cross-entropy
summed over assistant tokens and normalised by their count (``batch_weight``), and two evaluations every
``train.eval_every`` steps: ``val_loss`` on held-out conversations and greedy exact-match ``accuracy`` (and
``accuracy_d<level>`` per difficulty) on held-out task problems, by generation. ``run(cfg)`` is
``r1ray.train.core.driver.run_stage`` with this stage.

    python jobs/sft.py                                     # the embedded default (see docs/sft.md)
    python jobs/sft.py --config configs/sft/debug.yaml model.init_from=outputs/runs/default/final
    python jobs/sft.py data.path=chats.jsonl model.init_from=<any HF model directory>

Data: ``data.path`` (a jsonl of ``{"messages": [...]}``) or, when unset, problems of ``data.tasks`` with their
worked R1-format solutions (``<think>...</think><answer>...</answer>``), drawn from the tasks' train split;
validation and accuracy use the tasks' eval split, disjoint from train by each problem's hash.

Generation under the loop is collective-safe: every worker decodes its share of the problems in the same
number of ``generate`` calls (ZeRO-3: a worker without problems left decodes a dummy prompt, and
``synced_gpus`` keeps every worker stepping until all are done, because each ZeRO-3 forward gathers
parameters from all of them). The accuracy before training is measured the same way on the driver in
``plan`` (``eval.before``) and reported as ``accuracy_before`` / ``accuracy_before_d<level>``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from r1ray.config import OptimConfig, R1Config
from r1ray.observe.log import get_logger
from r1ray.tasks.base import MAX_COMPLETION_TOKENS
from r1ray.train.core.config import CheckpointConfig, TrainJobConfig, TrainLoopConfig
from r1ray.train.core.driver import TrainResult, run_stage, summary  # noqa: F401 - summary: the job's closing text
from r1ray.train.core.inputs import lineage_inputs, local_start, start_config, start_problems
from r1ray.train.stage import Metrics, RunPlan, Stage, StepInputs, WorkerInfo
from r1ray.train.stages.curriculum import Curriculum, CurriculumConfig

log = get_logger(__name__)

__all__ = ["ReplayConfig", "SFTConfig", "SFTDataConfig", "SFTEvalConfig", "SFTStage", "greedy_accuracy", "run"]


class ReplayConfig(R1Config):
    """Replay: packed rows of a pretraining corpus among the conversations, trained on every token (plain next-token
    loss), so fine-tuning on a narrow task does not erase what pretraining taught (catastrophic forgetting)."""

    fraction: float = Field(default=0.0, ge=0, lt=1)
    """Share of the training samples that are corpus rows (0: no replay). The rows are a seeded choice of the
    corpus's train split, added to the sample list (``fraction / (1 - fraction)`` rows per conversation), so the
    exactly-once order and resume cover them like any sample."""
    data: str | None = None
    """The data artifact whose train split is replayed (its tokenizer must be the model's). Unset with a positive
    fraction: the pipeline and ``python jobs/sft.py`` fill it with the corpus the model was pretrained on."""
    rows: int = Field(default=1, ge=1)
    """Consecutive corpus rows joined into one replay sample: 2 replays 512-token windows of a corpus packed in
    256-token rows (the packer cuts rows in order from one token stream: a window is contiguous text, but at the
    few joins between packing blocks). Longer than pretraining's rows, it trains the positions a long worked
    solution reaches and that pretraining never did (a short long-context extension, docs/reasoning.md)."""


class SFTDataConfig(R1Config):
    """What to fine-tune on: a jsonl of chat conversations, or worked solutions generated from tasks."""

    path: str | None = None
    """A jsonl file, one ``{"messages": [{"role", "content", optional "reasoning_content"}, ...]}`` per line.
    Unset: conversations generated from ``tasks`` (prompt + worked R1-format solution)."""
    eval_path: str | None = None
    """With ``path``: a jsonl of held-out conversations for ``val_loss``. Unset: ``train.eval_samples``
    conversations of ``path`` (a seeded choice) are held out from training instead."""
    tasks: dict[str, float] = {"arithmetic": 1.0}
    """Task mix (registry name -> weight, ``r1ray.tasks.registry``) of the generated data and of the held-out
    problems."""
    task_options: dict[str, dict[str, Any]] = {}
    """Constructor options per task (e.g. ``{"gsm8k": {"path": "train.jsonl"}}``)."""
    difficulty: int | dict[int, float] = {1: 0.5, 2: 0.5}
    """Difficulty level of the generated problems, or a mix ``{level: weight}`` (each level gets its share of
    ``train_examples``); every task of the mix must have these levels. Default: levels 1 and 2 (the cold start;
    level 3 is left to GRPO)."""
    train_examples: int = Field(default=20_000, ge=1)
    """Generated training conversations (one epoch; the loop cycles through them in a seeded order)."""
    max_length: int = Field(default=512, ge=8)
    """Longest conversation in tokens; longer ones are cut (counted in the ``truncated_samples`` metric)."""
    layout: Literal["pad", "pack"] = "pad"
    """``pad``: one row per conversation, right-padded to the longest of the micro-batch; ``pack``: the
    micro-batch's conversations in one row, attention and positions kept inside each (a block-diagonal mask built
    from restarting position ids). On the default (``mini`` preset, worked solutions of ~200 tokens, 4 per
    micro-batch, 2 workers) padding measured 0.32 s a step against packing's 0.42 (8 per micro-batch: 0.37 and
    0.50): a packed row's attention is quadratic in its length and the mask it needs is dense (docs/sft.md)."""

    replay: ReplayConfig = ReplayConfig()
    """Pretraining text mixed into the fine-tuning samples, so the model keeps its language (forgetting)."""

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values()):
            raise ValueError(f"needs at least one task with a positive weight and no negative weight, got {v}")
        return v

    @field_validator("difficulty")
    @classmethod
    def _check_difficulty(cls, v: int | dict[int, float]) -> int | dict[int, float]:
        if isinstance(v, dict) and (not v or any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values())):
            raise ValueError(f"a difficulty mix needs positive weights, e.g. {{1: 0.7, 2: 0.3}}, got {v}")
        return v

    @property
    def levels(self) -> dict[int, float]:
        """The difficulty mix as ``{level: weight}`` (weight > 0)."""
        mix = {self.difficulty: 1.0} if isinstance(self.difficulty, int) else self.difficulty
        return {int(k): float(w) for k, w in sorted(mix.items()) if w > 0}


class SFTEvalConfig(R1Config):
    """Held-out accuracy by greedy generation (exact match under each task's verifier)."""

    problems_per_difficulty: int = Field(default=100, ge=0)
    """Held-out problems per difficulty level at each evaluation; 0 turns the generation evaluation off."""
    difficulties: list[int] | None = None
    """Levels to evaluate (each reported as ``accuracy_d<level>``). Unset: every level that all the evaluated
    tasks have (arithmetic: 1, 2, 3), whatever levels the training data holds."""
    tasks: dict[str, float] | None = None
    """Task mix of the held-out problems. Unset: ``data.tasks`` when the data is generated from tasks; none
    (no accuracy) when the data is ``data.path``."""
    max_new_tokens: int = Field(default=MAX_COMPLETION_TOKENS, ge=1)
    """Longest completion generated; a completion cut here usually scores 0."""
    batch_size: int = Field(default=64, ge=1)
    """Prompts per ``generate`` call on each worker."""
    before: bool = True
    """Also evaluate the initial model (``model.init_from``) on the driver before training: reported as
    ``accuracy_before`` and ``accuracy_before_d<level>``."""


class SFTConfig(TrainJobConfig):
    """Fine-tune a causal LM on chat conversations (assistant tokens only) with Ray Train + DeepSpeed: the same
    exactly-once data order, fault tolerance and Hugging Face exports as pretraining."""

    run_name: str = "sft"
    """Run directory ``<storage.root>/runs/<run_name>``; rerunning the same name resumes it (SFT's default run is
    ``sft``, apart from pretraining's ``default``)."""
    eval: SFTEvalConfig = SFTEvalConfig()
    """Generation-based evaluation."""
    curriculum: CurriculumConfig | None = None
    """A difficulty schedule over generated task data (``r1ray.train.stages.curriculum``: stages, a ramp, or advance
    when held-out accuracy on a level passes a threshold): the level of each sample is a pure function of the
    step, its index and the schedule's state, which every checkpoint keeps. Unset: ``data.difficulty`` for
    every sample."""
    data: SFTDataConfig = SFTDataConfig(replay=ReplayConfig(fraction=0.2, rows=2))
    """Training and validation conversations (SFT's default: levels 1 and 2 of arithmetic, 20% of the samples
    replayed corpus windows of two rows: 512 tokens of a corpus pretrained in 256-token rows, docs/reasoning.md)."""
    train: TrainLoopConfig = TrainLoopConfig(max_steps=600, global_batch_size=16, micro_batch_size=4,
                                             eval_every=300, eval_samples=64, log_every=50)
    """The training loop (SFT's defaults, the recipe of docs/reasoning.md: a cold start of 600 steps of 16 samples,
    held-out evaluation every 300 steps on 64 validation conversations)."""
    checkpoint: CheckpointConfig = CheckpointConfig(every=300)
    """Checkpoints and exports (SFT's default: every 300 steps)."""
    optim: OptimConfig = OptimConfig(lr=2e-3, warmup_steps=30, weight_decay=0.0)
    """Optimizer and schedule (SFT's defaults suit the small presets: lr 2e-3, 30 warmup steps, no weight decay (0.1
    and 1.0 learned slower, docs/sft.md); use ~1e-5..2e-5 for models of a billion parameters)."""

    @model_validator(mode="after")
    def _check_sft(self) -> SFTConfig:
        problems = []
        if self.data.eval_path and not self.data.path:
            problems.append("data.eval_path is set without data.path: held-out conversations of a jsonl need the "
                            "jsonl (generated data takes its validation from the tasks' eval split)")
        if self.curriculum is not None and self.data.path:
            problems.append("curriculum needs generated task data: unset data.path (a jsonl has no difficulty "
                            "levels) or unset curriculum")
        if self.data.path is None and self.data.train_examples < self.train.global_batch_size:
            problems.append(f"data.train_examples={self.data.train_examples} < train.global_batch_size="
                            f"{self.train.global_batch_size}: one step would repeat examples")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def eval_tasks(self) -> dict[str, float]:
        """The task mix of the accuracy evaluation ({} when there is none)."""
        if self.eval.problems_per_difficulty == 0:
            return {}
        if self.eval.tasks is not None:
            return {k: w for k, w in self.eval.tasks.items() if w > 0}
        return {} if self.data.path else {k: w for k, w in self.data.tasks.items() if w > 0}

    @property
    def eval_levels(self) -> list[int]:
        """``eval.difficulties``, or every level that all the evaluated tasks have."""
        if self.eval.difficulties:
            return list(self.eval.difficulties)
        from r1ray.tasks.registry import get_task

        common: set[int] | None = None
        for name in self.eval_tasks:
            levels = set(get_task(name, **self.data.task_options.get(name, {})).difficulties)
            common = levels if common is None else common & levels
        return sorted(common or ())


# --------------------------------------------------------------------------------------------------
# Data lists (pure functions of the config: every worker and every restart builds the same ones)
# --------------------------------------------------------------------------------------------------


def task_problems(cfg: SFTConfig, n: int, split: str, mix: dict[str, float] | None = None,
                  levels: dict[int, float] | None = None) -> list[Any]:
    """``n`` problems of the task mix, shared over the difficulty levels by weight (level by level)."""
    from r1ray.tasks.registry import sample_problems_by_level

    return sample_problems_by_level(mix or cfg.data.tasks, levels or cfg.data.levels, n, seed=cfg.seed, split=split,
                                    options=cfg.data.task_options)


def eval_problems(cfg: SFTConfig) -> dict[int, list[Any]]:
    """The held-out accuracy problems per difficulty level (the tasks' eval split)."""
    from r1ray.tasks.registry import sample_problems

    mix = cfg.eval_tasks
    if not mix:
        return {}
    return {level: sample_problems(mix, cfg.eval.problems_per_difficulty, seed=cfg.seed, split="eval",
                                   difficulty=level, options=cfg.data.task_options)
            for level in cfg.eval_levels}


def conversations(cfg: SFTConfig) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    """(train conversations, held-out validation conversations)."""
    from r1ray.train.stages.sft_data import load_jsonl, task_conversation

    n_val = cfg.train.eval_samples
    if cfg.data.path is None:
        train = [task_conversation(p) for p in task_problems(cfg, cfg.data.train_examples, "train")]
        val = [task_conversation(p) for p in task_problems(cfg, n_val, "eval")]
        return train, val
    rows = load_jsonl(cfg.data.path)
    if cfg.data.eval_path:
        return rows, load_jsonl(cfg.data.eval_path)
    if len(rows) <= n_val:
        raise ValueError(f"data.path holds {len(rows)} conversations, not more than the {n_val} held out for "
                         "validation (train.eval_samples); lower train.eval_samples or set data.eval_path")
    held = set(np.random.default_rng([cfg.seed, 7]).choice(len(rows), n_val, replace=False).tolist())
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def replay_count(cfg: SFTConfig, n_conversations: int) -> int:
    """Corpus rows replayed beside ``n_conversations`` conversations (``data.replay.fraction`` of all samples)."""
    f = cfg.data.replay.fraction
    return int(round(f / (1 - f) * n_conversations)) if f > 0 else 0


def replay_rows(cfg: SFTConfig, n_conversations: int) -> tuple[Any, np.ndarray]:
    """(the corpus's train rows, the window index of each replay sample: rows ``[w * k, (w + 1) * k)`` for
    ``data.replay.rows`` k): a seeded permutation of the windows, repeated when more samples than windows are
    asked for. A pure function of the config, like the conversations."""
    n = replay_count(cfg, n_conversations)
    if n == 0:
        return None, np.zeros(0, dtype=np.int64)
    from r1ray.data.shards import DataArtifact
    from r1ray.train.core.sampler import token_store

    rows = token_store(DataArtifact.load(cfg.data.replay.data), "train")
    k = cfg.data.replay.rows
    windows = len(rows) // k
    if windows == 0:
        raise ValueError(f"data.replay.rows={k} is more than the {len(rows)} rows of {cfg.data.replay.data}")
    rng = np.random.default_rng([cfg.seed, 11])
    order = np.concatenate([rng.permutation(windows) for _ in range(-(-n // windows))])[:n]
    return rows, order.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Greedy accuracy (workers and driver)
# --------------------------------------------------------------------------------------------------


def _stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: EOS and the template's end-of-turn token when it has one."""
    ids = [tokenizer.eos_token_id]
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.append(tid)
    return sorted({i for i in ids if i is not None})


def greedy_accuracy(model: Any, tokenizer: Any, problems: dict[int, list[Any]], *, max_new_tokens: int,
                    batch_size: int, device: Any = "cpu", rank: int = 0, world_size: int = 1,
                    synced: bool = False) -> Metrics:
    """Greedy exact-match accuracy of ``model`` (a transformers causal LM; a DeepSpeed engine is unwrapped) on
    this worker's share (``problems[level][rank::world_size]``) of the held-out problems: ``accuracy`` and
    ``accuracy_d<level>`` as weighted means, verified by each task's verifier in the reward sandbox
    (``r1ray.tasks.rewards.score``: time-boxed, never raising; failures in ``eval_verify_failures``).

    Every worker makes the same number of ``generate`` calls; ``synced`` (ZeRO-3) keeps them stepping together
    until all are done and gives a worker with no problems left a dummy prompt."""
    import torch
    from transformers import GenerationConfig

    from r1ray.tasks.accuracy import score_problems
    from r1ray.train.core.losses import unwrap

    m = Metrics()
    items = [(level, p) for level in sorted(problems) for p in problems[level]]
    if not items:
        return m
    lm = unwrap(model)
    stop = _stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad,
                           bos_token_id=tokenizer.bos_token_id)
    mine = items[rank::world_size]
    calls = math.ceil(math.ceil(len(items) / world_size) / batch_size)  # the same on every worker
    prompts = {}
    completions: list[str] = []
    with torch.no_grad():
        for c in range(calls):
            chunk = mine[c * batch_size : (c + 1) * batch_size]
            if not chunk and not synced:
                break
            batch = chunk or items[:1]  # ZeRO-3: a dummy prompt keeps this worker in the collectives
            ids = []
            for _, p in batch:
                key = id(p)
                if key not in prompts:
                    prompts[key] = tokenizer.apply_chat_template(p.messages(), tokenize=True,
                                                                 add_generation_prompt=True, return_dict=False)
                ids.append(list(prompts[key]))
            width = max(len(x) for x in ids)
            inp = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for r, x in enumerate(ids):  # left padding: every prompt ends where generation starts
                inp[r, width - len(x):] = torch.tensor(x)
                mask[r, width - len(x):] = 1
            out = lm.generate(input_ids=inp.to(device), attention_mask=mask.to(device), generation_config=gen,
                              synced_gpus=synced)
            if not chunk:
                continue
            for row in out[:, width:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                completions.append(tokenizer.decode(row[:cut], skip_special_tokens=False))
    scores, failures = score_problems(completions, [p for _, p in mine])
    for (level, _), value in zip(mine, scores, strict=True):
        m.mean("accuracy", value)
        m.mean(f"accuracy_d{level}", value)
    m.total("eval_verify_failures", float(failures))
    return m


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


class SFTStage(Stage):
    """Conversations as samples (one per sample index), assistant-token cross-entropy (sum; normalised by the
    number of assistant target tokens), held-out ``val_loss`` and greedy ``accuracy`` by generation."""

    name = "sft"
    config_class = SFTConfig

    # ---- driver side
    @classmethod
    def plan(cls, cfg: SFTConfig) -> RunPlan:

        problems = plan_problems(cfg)
        if problems:
            raise ValueError("the SFT config cannot run:\n  - " + "\n  - ".join(problems))
        train, val = conversations(cfg)  # reads and checks every jsonl row here, before any worker starts
        if len(train) < cfg.train.global_batch_size:
            raise ValueError(f"{len(train)} training conversations, fewer than train.global_batch_size="
                             f"{cfg.train.global_batch_size}")
        log.info("SFT on %d conversations (%d held out for validation) from %s", len(train), len(val),
                 cfg.data.path or f"tasks {cfg.data.tasks} at difficulty {cfg.data.levels}")
        baselines: dict[str, float] = {}
        if cfg.eval.before and cfg.eval_tasks:
            baselines = accuracy_before(cfg)
        inputs = lineage_inputs(cfg.model.init_from)
        if replay_count(cfg, len(train)):
            inputs.append(cfg.data.replay.data)
            log.info("replaying %d rows of %s among the %d conversations (data.replay.fraction=%s)",
                     replay_count(cfg, len(train)), cfg.data.replay.data, len(train), cfg.data.replay.fraction)
        return RunPlan(config=cfg, inputs=inputs, baselines=baselines)

    # ---- worker side
    def tokenizer_source(self) -> str:
        """The model directory whose tokenizer (and chat template) renders the conversations."""
        return self.cfg.model.init_from

    def setup(self, worker: WorkerInfo, resources: dict[str, Any]) -> None:
        from r1ray.model.tokenizer import load_tokenizer

        cfg: SFTConfig = self.cfg
        self.tokenizer = load_tokenizer(local_start(self.tokenizer_source()))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.train, self.val = conversations(cfg)
        self.replay_rows, self.replay_order = replay_rows(cfg, len(self.train))
        self.problems = eval_problems(cfg)
        self.curriculum = Curriculum(cfg.curriculum, cfg.seed) if cfg.curriculum is not None else None
        self.curriculum_state = self.curriculum.initial_state() if self.curriculum else {}

    def build_model(self) -> Any:
        from r1ray.model import build_model

        return build_model(self.cfg.model, self.tokenizer, seed=self.cfg.seed, precision=self.cfg.deepspeed.precision)

    def num_samples(self) -> int:
        return len(self.train) + len(self.replay_order)

    def _replay(self, row: int) -> Any:
        """Sample ``row`` past the conversations: a corpus row, every token a target."""
        from r1ray.train.stages.sft_data import Example

        k, w = self.cfg.data.replay.rows, int(self.replay_order[row - len(self.train)])
        ids = np.concatenate([np.asarray(self.replay_rows[w * k + i], dtype=np.int64) for i in range(k)])
        return Example(ids=ids, target=np.ones(len(ids), dtype=bool))

    def _batch(self, convs: Sequence[Any], device: Any) -> dict[str, Any]:
        """A micro-batch of conversations (message lists) and replayed corpus rows (``Example``s)."""
        import torch

        from r1ray.train.stages.sft_data import Example, collate, tokenize_conversation

        examples = [c if isinstance(c, Example) else tokenize_conversation(self.tokenizer, c, self.cfg.data.max_length)
                    for c in convs]
        batch = collate(examples, self.cfg.data.layout, self.pad_id)
        for k in ("input_ids", "attention_mask", "position_ids", "targets"):
            if k in batch:
                batch[k] = torch.from_numpy(batch[k]).to(device)
        return batch

    def make_batch(self, rows: np.ndarray, device: Any) -> dict[str, Any]:
        if self.curriculum is not None:
            return self._batch([self._curriculum_conversation(0, int(r)) for r in rows], device)
        return self._batch([self.train[int(r)] if r < len(self.train) else self._replay(int(r)) for r in rows], device)

    def step_inputs(self, step: int, rows: list[np.ndarray], model: Any) -> StepInputs:
        """With a curriculum, each sample's conversation is drawn at its step's difficulty: (step, sample row,
        schedule state) decide it, so a resumed run, on any number of workers, trains on the same ones."""
        if self.curriculum is None:
            return super().step_inputs(step, rows, model)
        m = Metrics()
        updates = []
        for r in rows:
            convs = []
            for row in r:
                if row >= len(self.train):
                    convs.append(self._replay(int(row)))
                    continue
                level = self.curriculum.level_of(step, int(row), self.curriculum_state)
                m.mean("curriculum_level", float(level))
                convs.append(self._curriculum_conversation(step, int(row), level))
            updates.append(self._batch(convs, self.worker.device))
        return StepInputs(updates=[updates], metrics=m)

    def _curriculum_conversation(self, step: int, row: int, level: int | None = None) -> list[dict[str, Any]]:
        from r1ray.tasks.registry import sample_problems
        from r1ray.train.stages.sft_data import task_conversation

        cfg = self.cfg
        if row >= len(self.train):
            return self._replay(row)
        level = self.curriculum.level_of(step, row, self.curriculum_state) if level is None else level
        (problem,) = sample_problems(cfg.data.tasks, 1, seed=cfg.seed, split="train", difficulty=level, start=row,
                                     options=cfg.data.task_options)
        return task_conversation(problem)

    def after_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if self.curriculum is not None:
            before = self.curriculum_state
            self.curriculum_state = self.curriculum.after_evaluation(step, metrics, before)
            if self.curriculum_state != before and self.worker.rank == 0:
                log.info("curriculum: level %s from step %d", self.curriculum.current_level(self.curriculum_state),
                         step)

    def state_dict(self) -> dict[str, Any]:
        return {"curriculum": self.curriculum_state} if self.curriculum is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.curriculum is not None and "curriculum" in state:
            self.curriculum_state = dict(state["curriculum"])

    def batch_weight(self, batch: dict[str, Any]) -> float:
        return float(batch["n_targets"])

    def loss(self, model: Any, batch: dict[str, Any], metrics: Metrics) -> Any:
        from r1ray.train.core.losses import causal_lm_loss
        from r1ray.train.stages.sft_data import IGNORE

        if batch["n_truncated"]:
            metrics.total("truncated_samples", batch["n_truncated"])
        return causal_lm_loss(model, batch["input_ids"], batch["targets"], attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"), label_smoothing=self.cfg.train.label_smoothing,
                              ignore_index=IGNORE, reduction="sum")

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """This worker's share of the held-out conversations, in micro-batches."""
        w = self.worker
        mine = self.val[w.rank :: w.world_size]
        mb = self.cfg.train.micro_batch_size
        for i in range(0, len(mine), mb):
            yield self._batch(mine[i : i + mb], w.device)

    def evaluate(self, model: Any, evaluator: Any) -> Metrics:
        m = evaluator.loss_over(self.eval_batches())
        if self.problems:
            w = self.worker
            m.merge(greedy_accuracy(model, self.tokenizer, self.problems, max_new_tokens=self.cfg.eval.max_new_tokens,
                                    batch_size=self.cfg.eval.batch_size, device=w.device, rank=w.rank,
                                    world_size=w.world_size, synced=self.cfg.deepspeed.zero_stage == 3))
        return m

    def export_inputs(self) -> list[str]:
        return lineage_inputs(self.cfg.model.init_from) + ([self.cfg.data.replay.data] if len(self.replay_order) else [])


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def plan_problems(cfg: SFTConfig) -> list[str]:
    """Every reason ``cfg`` cannot run, found before any worker starts (each names its field)."""

    from r1ray.tasks.registry import get_task

    problems = start_problems(
        cfg.model.init_from, "model.init_from",
        unset="set it to a Hugging Face model directory or an r1ray export (e.g. outputs/runs/default/final), or "
              "run python jobs/sft.py, which fills it with the default pretraining export (trained first when "
              "missing)",
        tokenizer_why="SFT renders conversations with the model's own tokenizer and chat template")
    if not cfg.model.init_from:
        return problems
    if not problems:
        positions = start_config(cfg.model.init_from).get("max_position_embeddings")
        if positions and cfg.data.max_length > positions:
            problems.append(f"data.max_length={cfg.data.max_length} > the model's max_position_embeddings "
                            f"{positions}")
    problems += replay_problems(cfg)
    train_levels = cfg.curriculum.all_levels if cfg.curriculum is not None else list(cfg.data.levels)
    mixes = {"data.tasks": (cfg.data.tasks, train_levels)} if cfg.data.path is None else {}
    if cfg.eval_tasks:
        try:
            levels = cfg.eval_levels
        except ValueError as e:  # an unknown task (data.tasks' own are named below)
            levels = []
            if cfg.eval.tasks is not None:
                problems.append(f"eval.tasks: {e}")
        else:
            if not levels:
                problems.append("eval: the evaluated tasks share no difficulty level; set eval.difficulties")
            mixes["eval.tasks" if cfg.eval.tasks is not None else "data.tasks (evaluation)"] = (cfg.eval_tasks,
                                                                                                 levels)
    for field_name, (mix, levels) in mixes.items():
        for name in mix:
            try:
                task = get_task(name, **cfg.data.task_options.get(name, {}))
            except ValueError as e:
                problems.append(f"{field_name}: {e}")
                continue
            missing = [lv for lv in levels if lv not in task.difficulties]
            if missing:
                problems.append(f"{field_name}: task {name!r} has no difficulty level {missing} (it has "
                                f"{list(task.difficulties)}); change data.difficulty / eval.difficulties")
    return problems


def replay_problems(cfg: SFTConfig) -> list[str]:
    """Why ``data.replay`` cannot run (its data is unset, not a data artifact, or tokenized differently)."""
    r = cfg.data.replay
    if r.fraction == 0:
        return []
    if not r.data:
        return [f"data.replay.fraction={r.fraction} needs data.replay.data: a data artifact (the corpus the model was "
                "pretrained on, e.g. outputs/data/default); python jobs/sft.py and the pipeline fill it themselves"]
    from r1ray.artifacts import is_complete

    if not is_complete(r.data):
        return [f"data.replay.data={r.data!r} is not a complete data artifact (no manifest.json)"]
    from pathlib import Path

    from r1ray.data.shards import DataArtifact
    from r1ray.model.tokenizer import load_tokenizer

    data = DataArtifact.load(r.data)
    if not data.rows("train"):
        return [f"data.replay.data={r.data!r} has no train rows"]
    start = local_start(cfg.model.init_from)
    if (Path(start) / "tokenizer_config.json").is_file() and \
            load_tokenizer(data.tokenizer_dir).get_vocab() != load_tokenizer(start).get_vocab():
        return [f"data.replay.data={r.data!r} is tokenized with another tokenizer than model.init_from="
                f"{cfg.model.init_from!r}: replay the corpus the model was pretrained on"]
    return []


def accuracy_before(cfg: SFTConfig) -> dict[str, float]:
    """Greedy accuracy of the initial model on the held-out problems, on the driver (``accuracy_before*``)."""
    import time

    from r1ray.model import build_model
    from r1ray.model.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(local_start(cfg.model.init_from))
    model = build_model(cfg.model, tokenizer, precision=cfg.deepspeed.precision).eval()
    m = greedy_accuracy(model, tokenizer, eval_problems(cfg), max_new_tokens=cfg.eval.max_new_tokens,
                        batch_size=cfg.eval.batch_size).local()
    out = {f"{k.replace('accuracy', 'accuracy_before', 1)}": v for k, v in m.items() if k.startswith("accuracy")}
    log.info("accuracy before SFT (%s, %d problems per level): %s (%.0fs)", cfg.model.init_from,
             cfg.eval.problems_per_difficulty, ", ".join(f"{k} {v:.3f}" for k, v in sorted(out.items())),
             time.perf_counter() - t0)
    return out


def accuracy_table(result: TrainResult) -> list[str]:
    """Before/after accuracy per difficulty level, as lines for the job's summary."""
    m = result.metrics
    levels = sorted(int(k.rsplit("_d", 1)[1]) for k in m if k.startswith("accuracy_d"))
    if not levels:
        return []
    lines = ["  held-out greedy accuracy (exact match)", "    level   before   after"]
    for key, label in [*((f"_d{lv}", f"d{lv}") for lv in levels), ("", "all")]:
        before = m.get(f"accuracy_before{key}")
        after = m.get(f"accuracy{key}")
        lines.append(f"    {label:<6} {_pct(before):>7} {_pct(after):>7}")
    return lines


def job_summary(result: TrainResult) -> str:
    """What ``jobs/sft.py`` prints: the run's summary with the before/after accuracy table."""
    return summary(result, accuracy_table(result))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def run(cfg: SFTConfig, *, callbacks: Sequence[Any] = (), run_name: str | None = None,
        storage_path: str | None = None) -> TrainResult:
    """Fine-tune ``cfg`` to the end (or to a preemption): ``r1ray.train.core.driver.run_stage`` with this stage."""
    return run_stage(SFTStage, cfg, callbacks=callbacks, run_name=run_name, storage_path=storage_path)
