"""Pretraining: a causal LM on the packed shards of a data artifact, through the shared training loop.

``PretrainStage`` is what pretraining adds to the shared loop (``r1ray.train.stage``): rows of the packed
shards as samples, next-token cross-entropy (with label smoothing) as the loss, the validation split for
evaluation, and (driver side) a Ray Data scan of every shard plus a unigram baseline before any worker
starts. ``run(cfg)`` is ``r1ray.train.core.driver.run_stage`` with this stage.

    python jobs/pretrain.py                                   # the embedded default
    python jobs/pretrain.py --config configs/pretrain/debug.yaml
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from r1ray.config import R1Config
from r1ray.observe.log import get_logger
from r1ray.train.core.config import CheckpointConfig, OptimConfig, TrainJobConfig, TrainLoopConfig
from r1ray.train.core.driver import TrainResult, run_stage, summary  # noqa: F401 - summary: the job's closing text
from r1ray.train.stage import Metrics, RunPlan, Stage, WorkerInfo

log = get_logger(__name__)


class PretrainDataConfig(R1Config):
    """Which packed shards to train on."""

    path: str | None = None
    """A data artifact (``<root>/data/<name>``, written by jobs/prepare_data.py). Unset: the data stage's default
    artifact ``<storage.root>/data/default``, prepared first if it is missing."""
    validate_with_ray_data: bool = True
    """Before training, scan every shard with Ray Data: row counts must match the manifest and every row
    must hold exactly ``seq_len`` token ids in the vocabulary."""
    cache_dir: str | None = None
    """Node-local directory of the token cache (a memory-mapped copy of the shards for O(1) random
    access). Unset: ``$R1RAY_CACHE`` or ``~/.cache/r1ray``."""



class PretrainConfig(TrainJobConfig):
    """Pretrain a causal LM on packed shards with Ray Train + DeepSpeed: elastic, fault tolerant, with
    exactly-once data order and Hugging Face exports of every checkpoint."""

    data: PretrainDataConfig = PretrainDataConfig()
    """Training data."""
    train: TrainLoopConfig = TrainLoopConfig(max_steps=2800, global_batch_size=16, micro_batch_size=8,
                                             eval_every=1400, eval_samples=128, log_every=50)
    """The training loop (pretraining's defaults: 2800 steps of 16 rows, about two passes over the default corpus;
    measured: after 1400 the model worked 0% of the corpus's three- and four-operation stories, after 2800 30%,
    docs/reasoning.md)."""
    checkpoint: CheckpointConfig = CheckpointConfig(every=1400)
    """Checkpoints and exports (pretraining's default: every 1400 steps)."""
    optim: OptimConfig = OptimConfig(lr=3e-3, warmup_steps=30)
    """Optimizer and learning-rate schedule (pretraining's defaults: lr 3e-3, 30 warmup steps, which suit the
    small presets; use ~6e-4 for 125m and ~3e-4 for 1b)."""


class PretrainStage(Stage):
    """Next-token prediction on rows of packed shards: the default ``step_inputs`` (one ``make_batch`` per
    micro-batch), a token-mean loss, validation loss on the validation split."""

    name = "pretrain"
    config_class = PretrainConfig

    # ---- driver side
    @classmethod
    def plan(cls, cfg: PretrainConfig) -> RunPlan:
        if not cfg.data.path:
            raise ValueError(
                "data.path is unset: set it to a data artifact (python jobs/prepare_data.py writes one), or run "
                "python jobs/pretrain.py, which prepares the default corpus first")
        data = check_data(cfg, cfg.data.path, with_ray_data=cfg.data.validate_with_ray_data)
        unigram = unigram_baseline(data, cfg.data.cache_dir)
        return RunPlan(config=cfg, inputs=[cfg.data.path],
                       baselines={"unigram_val_loss": unigram} if unigram is not None else {})

    # ---- worker side
    def setup(self, worker: WorkerInfo, resources: dict[str, Any]) -> None:
        from r1ray.data.shards import DataArtifact
        from r1ray.model.tokenizer import load_tokenizer
        from r1ray.train.core.sampler import token_store

        cfg: PretrainConfig = self.cfg
        self.data = DataArtifact.load(cfg.data.path)
        self.tokenizer = load_tokenizer(self.data.tokenizer_dir)
        self.seq_len = self.data.seq_len
        self.train_rows = token_store(self.data, "train", cfg.data.cache_dir)
        self.val_rows = (
            token_store(self.data, "validation", cfg.data.cache_dir) if self.data.rows("validation") else None
        )

    def build_model(self) -> Any:
        from r1ray.model import build_model

        return build_model(self.cfg.model, self.tokenizer, seed=self.cfg.seed, precision=self.cfg.deepspeed.precision)

    def num_samples(self) -> int:
        return len(self.train_rows)

    def sample_difficulty(self) -> np.ndarray:
        """Mean unigram surprisal of each training row (``train.curriculum_epochs``: rows of common tokens first)."""
        from r1ray.train.core.sampler import unigram_surprisal

        return unigram_surprisal(self.train_rows, len(self.tokenizer))

    def make_batch(self, rows: np.ndarray, device: Any) -> dict[str, Any]:
        return self._batch(self.train_rows[rows], device)

    @staticmethod
    def _batch(rows: Any, device: Any) -> dict[str, Any]:
        import torch

        ids = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device)
        return {"input_ids": ids, "n_tokens": ids.numel() - ids.shape[0]}

    def loss(self, model: Any, batch: dict[str, Any], metrics: Metrics) -> Any:
        from r1ray.train.core.losses import causal_lm_loss

        # chunked: the fp32 logits of the whole micro-batch are never materialised (r1ray.train.core.losses)
        ids = batch["input_ids"]
        return causal_lm_loss(model, ids[:, :-1], ids[:, 1:], label_smoothing=self.cfg.train.label_smoothing,
                              reduction="sum")

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """This worker's share of the first ``train.eval_samples`` validation rows (the loop evens out the
        batch counts across workers under ZeRO-3)."""
        if self.val_rows is None:
            return
        w = self.worker
        n = min(self.cfg.train.eval_samples, len(self.val_rows))
        mine = np.arange(w.rank, n, w.world_size)
        mb = self.cfg.train.micro_batch_size
        for i in range(0, len(mine), mb):
            yield self._batch(self.val_rows[mine[i : i + mb]], w.device)

    def export_inputs(self) -> list[str]:
        return [self.data.uri]


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def check_data(cfg: PretrainConfig, data_uri: str, *, with_ray_data: bool) -> Any:
    """Load the artifact's manifest and (optionally) scan every shard with Ray Data before any worker starts."""
    from r1ray.data.shards import DataArtifact
    from r1ray.model.tokenizer import load_tokenizer

    data = DataArtifact.load(data_uri)
    problems = []
    if data.rows("train") < cfg.train.global_batch_size:
        problems.append(f"the train split of {data_uri} has {data.rows('train')} rows, fewer than "
                        f"train.global_batch_size={cfg.train.global_batch_size}")
    if data.seq_len > cfg.model.max_position_embeddings:
        problems.append(f"seq_len {data.seq_len} > model.max_position_embeddings {cfg.model.max_position_embeddings}")
    vocab = len(load_tokenizer(data.tokenizer_dir))
    if with_ray_data:
        stats = scan_shards(data, vocab)
        for split, s in stats.items():
            if s["rows"] != data.rows(split):
                problems.append(f"{split}: manifest lists {data.rows(split)} rows, the shards hold {s['rows']}")
            if s["bad_length"]:
                problems.append(f"{split}: {s['bad_length']} rows are not exactly seq_len={data.seq_len} ids")
            if s["rows"] and (s["min_id"] < 0 or s["max_id"] >= vocab):
                problems.append(f"{split}: token ids span [{s['min_id']}, {s['max_id']}], outside the vocabulary "
                                f"of {vocab}")
    if problems:
        raise ValueError(f"data artifact {data_uri} cannot be trained on:\n  - " + "\n  - ".join(problems))
    return data


def scan_shards(data: Any, vocab: int) -> dict[str, dict[str, int]]:
    """Row count, wrong-length rows and the id range of each split: one Ray Data pass over every shard."""
    import ray.data

    split_of = {}
    for split in data.splits:
        for uri in data.shard_uris(split):
            split_of[_norm(uri)] = split
    out = {split: {"rows": 0, "bad_length": 0, "min_id": 0, "max_id": 0} for split in data.splits}
    if not split_of:
        return out
    seq_len = data.seq_len

    def check(batch, seq_len=seq_len):
        import pyarrow as pa
        import pyarrow.compute as pc

        col, paths = batch.column("input_ids"), batch.column("path")
        rows = pa.table({"path": paths, "bad": pc.cast(pc.not_equal(pc.list_value_length(col), seq_len), pa.int64())})
        per_rows = rows.group_by("path").aggregate([("bad", "count"), ("bad", "sum")])
        flat = pa.table({"path": pc.take(paths, pc.list_parent_indices(col)), "id": pc.list_flatten(col)})
        per_ids = flat.group_by("path").aggregate([("id", "min"), ("id", "max")])
        joined = per_rows.join(per_ids, "path", join_type="left outer")
        return pa.table({
            "path": joined.column("path"), "rows": joined.column("bad_count"),
            "bad_length": joined.column("bad_sum"),
            "min_id": pc.fill_null(joined.column("id_min"), 0), "max_id": pc.fill_null(joined.column("id_max"), 0),
        })

    parts = ray.data.read_parquet(list(split_of), columns=["input_ids"], include_paths=True).map_batches(
        check, batch_format="pyarrow", batch_size=None
    ).take_all()
    seen: dict[str, bool] = {}
    for p in parts:
        if not p["rows"]:
            continue
        split = split_of[_norm(p["path"])]
        s = out[split]
        s["min_id"] = p["min_id"] if not seen.get(split) else min(s["min_id"], p["min_id"])
        s["max_id"] = p["max_id"] if not seen.get(split) else max(s["max_id"], p["max_id"])
        seen[split] = True
        s["rows"] += p["rows"]
        s["bad_length"] += p["bad_length"]
    return out


def _norm(uri: str) -> str:
    from r1ray.artifacts import filesystem

    return filesystem(uri)[1].rstrip("/")


def unigram_baseline(data: Any, cache_dir: str | None = None, max_tokens: int = 20_000_000) -> float | None:
    """Validation cross-entropy (nats/token) of add-one-smoothed unigram frequencies of the train split,
    on the same shifted targets the model's validation loss uses."""
    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.train.core.sampler import token_store

    if not data.rows("validation"):
        return None
    vocab = len(load_tokenizer(data.tokenizer_dir))
    train = token_store(data, "train", cache_dir)
    val = token_store(data, "validation", cache_dir)
    rows = max(1, max_tokens // data.seq_len)
    counts = np.bincount(np.asarray(train[:rows]).ravel(), minlength=vocab).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab))
    targets = np.asarray(val[:rows, 1:]).ravel()
    return float(-logp[targets].mean())


PretrainResult = TrainResult
"""What a pretraining run produced (``TrainResult``: ``val_loss``, ``unigram_val_loss``, ``export_path``...)."""


def run(cfg: PretrainConfig, *, callbacks: Sequence[Any] = (), run_name: str | None = None,
        storage_path: str | None = None) -> TrainResult:
    """Train ``cfg`` to the end (or to a preemption): ``r1ray.train.core.driver.run_stage`` with this stage."""
    return run_stage(PretrainStage, cfg, callbacks=callbacks, run_name=run_name, storage_path=storage_path)
