"""Pretraining: a causal LM on the packed shards of a data artifact, through the shared training loop.

``PretrainStage`` is what pretraining adds to ``r1ray.train.loop``: rows of the packed shards as samples,
next-token cross-entropy (with label smoothing) as the loss, and the validation split for evaluation.
``run(cfg)`` is the driver: resolve and validate the data, fit a ``TorchTrainer``, publish
``<run_dir>/final`` and return a small ``PretrainResult``.

    python jobs/pretrain.py                                   # the embedded default
    python jobs/pretrain.py --config configs/pretrain/debug.yaml
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from r1ray.observe.log import get_logger
from r1ray.train.config import PretrainConfig
from r1ray.train.loop import Stage, WorkerInfo

log = get_logger(__name__)


class PretrainStage(Stage):
    name = "pretrain"
    config_class = PretrainConfig

    def setup(self, worker: WorkerInfo) -> None:
        from r1ray.data.shards import DataArtifact
        from r1ray.model.tokenizer import load_tokenizer
        from r1ray.train.sampler import token_store

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

        return build_model(self.cfg.model, self.tokenizer, seed=self.cfg.seed)

    def num_train_samples(self) -> int:
        return len(self.train_rows)

    def make_batch(self, rows: np.ndarray, device: Any) -> dict[str, Any]:
        import torch

        ids = torch.from_numpy(np.asarray(self.train_rows[rows], dtype=np.int64)).to(device)
        return {"input_ids": ids, "n_tokens": ids.numel() - ids.shape[0]}

    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
        import torch.nn.functional as F

        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        targets = ids[:, 1:]
        s = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum",
            label_smoothing=self.cfg.train.label_smoothing,
        )
        return s, targets.numel()

    def eval_batches(self, worker: WorkerInfo, device: Any) -> Iterator[dict[str, Any]]:
        import torch

        if self.val_rows is None:
            return
        n = min(self.cfg.train.eval_samples, len(self.val_rows))
        mine = np.arange(worker.rank, n, worker.world_size)
        mb = self.cfg.train.micro_batch_size
        for i in range(0, len(mine), mb):
            ids = torch.from_numpy(np.asarray(self.val_rows[mine[i : i + mb]], dtype=np.int64)).to(device)
            yield {"input_ids": ids, "n_tokens": ids.numel() - ids.shape[0]}

    def export_inputs(self) -> list[str]:
        return [self.data.uri]

    def probe_input(self) -> list[int]:
        rows = self.val_rows if self.val_rows is not None else self.train_rows
        return [int(t) for t in rows[0][:16]]


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    """What a pretraining run produced (``run`` returns it; Tune wraps it per trial)."""

    run_dir: str
    export_path: str | None
    """``<run_dir>/final``: the HF model directory to evaluate or serve (None if the run stopped early)."""
    checkpoint: str | None
    """Newest checkpoint directory (DeepSpeed + trainer state + HF export)."""
    status: str
    """completed; preempted (SIGTERM/preemption: rerun the same run_name to continue); or stopped (at
    ``train.stop_after_steps``, a resumable segment)."""
    steps: int
    samples_consumed: int
    train_loss: float | None
    val_loss: float | None
    val_perplexity: float | None
    unigram_val_loss: float | None
    """Cross-entropy of a unigram model fitted on the training split, on the same validation tokens."""
    data: str
    restarts: int = 0
    nonfinite_steps: int = 0
    world_size: int = 0
    seconds: float = 0.0
    worker_result: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("worker_result")
        return d


def resolve_data(cfg: PretrainConfig) -> str:
    """The data artifact to train on: ``data.path``, or the data stage's default (prepared if missing)."""
    if cfg.data.path:
        return cfg.data.path
    try:
        from r1ray.data.pipeline import ensure_default
    except ImportError as e:
        raise RuntimeError(
            "data.path is unset and the data stage (r1ray.data.pipeline) is not available to prepare the "
            f"default corpus ({e}); set data.path to a data artifact written by jobs/data.py"
        ) from e
    return ensure_default(cfg.storage, cfg.ray)


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
    from r1ray.train.sampler import token_store

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


def run(
    cfg: PretrainConfig,
    *,
    callbacks: Sequence[Any] = (),
    run_name: str | None = None,
    storage_path: str | None = None,
) -> PretrainResult:
    """Train ``cfg`` to the end (or to a preemption) and return what it produced.

    ``callbacks`` are extra Ray Train callbacks (e.g. Tune's report callback); ``run_name`` and
    ``storage_path`` override the RunConfig's name and storage (default ``cfg.run_name`` and
    ``<storage.root>/runs``), so the run directory is ``<storage_path>/<run_name>``.
    """
    import time

    from r1ray.artifacts import join
    from r1ray.runtime import ray_session
    from r1ray.train.checkpoint import HF_DIR, publish_final
    from r1ray.train.launch import fit

    t0 = time.perf_counter()
    with ray_session(cfg.ray):
        data_uri = resolve_data(cfg)
        data = check_data(cfg, data_uri, with_ray_data=cfg.data.validate_with_ray_data)
        resolved = PretrainConfig.model_validate(
            {**cfg.model_dump(mode="json"), "data": {**cfg.data.model_dump(mode="json"), "path": data_uri}}
        )
        name = run_name or cfg.run_name
        storage = storage_path or cfg.storage.uri("runs")
        run_dir = join(storage, name)
        unigram = unigram_baseline(data, cfg.data.cache_dir)
        out = fit("r1ray.train.pretrain:PretrainStage", resolved, name=name, storage_path=storage,
                  callbacks=callbacks)

    export = None
    if out["status"] == "completed" and out.get("checkpoint") and cfg.checkpoint.export_hf:
        export = publish_final(
            run_dir, join(out["checkpoint"], HF_DIR), stage="pretrain", config=resolved, inputs=[data_uri],
            counts={"steps": out["step"], "samples_consumed": out["samples_consumed"]},
            metrics={"train_loss": out.get("train_loss"), "val_loss": out.get("val_loss"),
                     "unigram_val_loss": unigram},
        )
    val = out.get("val_loss")
    result = PretrainResult(
        run_dir=run_dir, export_path=export, checkpoint=out.get("checkpoint"), status=out["status"],
        steps=out["step"], samples_consumed=out["samples_consumed"], train_loss=out.get("train_loss"),
        val_loss=val, val_perplexity=math.exp(min(val, 50)) if val is not None else None,
        unigram_val_loss=unigram, data=data_uri, restarts=out.get("restarts", 0),
        nonfinite_steps=out.get("nonfinite_total", 0), world_size=out.get("world_size", 0),
        seconds=time.perf_counter() - t0, worker_result=out,
    )
    log.info("pretrain %s: %s after %d steps (%d samples); train loss %s, val loss %s (unigram %s); export %s",
             name, result.status, result.steps, result.samples_consumed, _fmt(result.train_loss),
             _fmt(result.val_loss), _fmt(unigram), export)
    return result


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary(result: PretrainResult) -> str:
    """The closing lines of a pretraining job: losses, the baseline, where the model went, what to run next."""
    lines = [
        f"pretrain {result.status}: {result.steps} steps, {result.samples_consumed} samples, "
        f"{result.world_size} worker(s), {result.seconds:.0f}s, {result.restarts} restart(s)",
        f"  train loss       {_fmt(result.train_loss)}",
        f"  validation loss  {_fmt(result.val_loss)} (perplexity {_fmt(result.val_perplexity)})",
    ]
    if result.unigram_val_loss is not None:
        lines.append(f"  unigram baseline {_fmt(result.unigram_val_loss)} (validation cross-entropy of token "
                     "frequencies)")
    lines.append(f"  run directory    {result.run_dir}")
    if result.export_path:
        lines.append(f"  HF export        {result.export_path}")
        lines.append(f"next: python jobs/serve.py model_path={result.export_path}")
    elif result.status in ("preempted", "stopped"):
        lines.append("next: rerun the same command (same run_name) to continue from the newest checkpoint")
    return "\n".join(lines)
