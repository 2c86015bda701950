"""Checkpoints of the training stages: layout, HF export, resume helpers, and finding the newest export.

A checkpoint is one directory in the run directory, ``<run_dir>/checkpoint_<step:08d>-<attempt>``::

    ds/                       DeepSpeed state of every rank (model, optimizer partitions)
    trainer_state.json        step, samples consumed, world size, ZeRO stage, non-finite count, ...
    hf/                       consolidated Hugging Face safetensors export + tokenizer + manifest.json
    r1ray_complete.json       written after Ray Train registered the checkpoint (see below)

Each rank writes its part to a local temporary directory and hands it to ``ray.train.report``; Ray Train
merges the ranks' files into the run's storage and registers the checkpoint only once every rank has
reported, so a kill mid-save leaves at most an unregistered, ignored directory: the newest registered
checkpoint always loads. ``r1ray_complete.json`` is then written by rank 0 so that readers outside Ray
Train (``newest_export``, serving) can tell a finished checkpoint from one cut off mid-upload.

The run's final model is published at ``<run_dir>/final`` (an artifact of stage "pretrain", "sft", ...
whose manifest, written last, names its input artifacts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from r1ray.artifacts import (
    MANIFEST,
    canonical_json,
    filesystem,
    join,
    read_bytes,
    write_bytes_atomic,
    write_manifest,
)
from r1ray.model.export import (  # noqa: F401 - the layout and readers live in r1ray.model.export
    COMPLETE,
    DS_TAG,
    FINAL_DIR,
    HF_DIR,
    TRAINER_STATE,
    checkpoint_name,
    checkpoint_step,
    export_is_complete,
    list_checkpoints,
    newest_checkpoint,
    newest_export,
)
from r1ray.observe.log import get_logger

log = get_logger(__name__)

def read_trainer_state(ckpt_dir: str) -> dict[str, Any]:
    try:
        return json.loads(read_bytes(join(ckpt_dir, TRAINER_STATE)))
    except FileNotFoundError:
        raise ValueError(
            f"{ckpt_dir} is not an r1ray training checkpoint: {TRAINER_STATE} is missing"
        ) from None


def write_json(path: str, obj: Any) -> None:
    write_bytes_atomic(path, canonical_json(obj))


# --------------------------------------------------------------------------------------------------
# HF export
# --------------------------------------------------------------------------------------------------


def export_hf(engine: Any, tokenizer: Any, out_dir: str, *, zero_stage: int, is_rank0: bool) -> None:
    """Consolidated safetensors + tokenizer at ``out_dir`` (rank 0 writes; ZeRO-3 gathers on all ranks)."""
    from pathlib import Path

    state_dict = None
    if zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    if not is_rank0:
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    module = engine.module
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    module.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)


def write_export_manifest(out_dir: str, *, stage: str, config: Any, inputs: list[str], **extra: Any) -> None:
    """The export's manifest (written last), listing every file with its size so readers can verify it."""
    fs, path = filesystem(out_dir)
    files = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File and not info.path.endswith(MANIFEST):
            files[info.path[len(path) + 1 :]] = info.size
    write_manifest(out_dir, stage=stage, config=config, inputs=inputs, files=files, **extra)


def publish_final(run_dir: str, export_dir: str, *, stage: str, config: Any, inputs: list[str],
                  **extra: Any) -> str:
    """Copy a checkpoint's HF export to ``<run_dir>/final`` and publish it atomically (manifest last;
    on local disks the whole directory is swapped in with a rename)."""
    fs, src = filesystem(export_dir)
    final = join(run_dir, FINAL_DIR)
    if isinstance(fs, pafs.LocalFileSystem):
        import os
        import shutil

        _, final_path = filesystem(final)
        tmp = f"{final_path}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MANIFEST))
        write_export_manifest(tmp, stage=stage, config=config, inputs=inputs, **extra)
        old = None
        if os.path.exists(final_path):
            old = f"{final_path}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final_path, old)
        os.replace(tmp, final_path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    else:
        dst_fs, dst = filesystem(final)
        if dst_fs.get_file_info(join(dst, MANIFEST)).type != pafs.FileType.NotFound:
            dst_fs.delete_file(join(dst, MANIFEST))  # unpublish before overwriting
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=dst_fs)
        if dst_fs.get_file_info(join(dst, MANIFEST)).type != pafs.FileType.NotFound:
            dst_fs.delete_file(join(dst, MANIFEST))
        write_export_manifest(final, stage=stage, config=config, inputs=inputs, **extra)
    return final


# --------------------------------------------------------------------------------------------------
# Resume across data-parallel sizes
# --------------------------------------------------------------------------------------------------


def convert_to_universal(ckpt_dir: str, out_dir: str) -> str:
    """DeepSpeed's universal checkpoint of ``<ckpt_dir>/ds`` at ``<out_dir>/ds`` (loadable at any DP size)."""
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", join(ckpt_dir, DS_TAG), "--output_folder", join(out_dir, DS_TAG),
        "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"converting {ckpt_dir} to a universal checkpoint failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-3000:]}"
        )
    return out_dir


@dataclass
class RunState:
    """What the loop tracks across steps (and writes into each checkpoint's trainer state)."""

    step: int = 0
    consumed: int = 0
    restarts: int = 0
    nonfinite_total: int = 0
    in_row: int = 0
    last_ckpt: str | None = None
    saved_at: int = -1
    status: str = "completed"
    error: str | None = None
    last: dict[str, Any] = field(default_factory=dict)  # loss, grad_norm, lr of the newest good step
    val: dict[str, float] = field(default_factory=dict)  # newest evaluation
    history: list[list[Any]] = field(default_factory=list)  # [step, mean train loss since last report, val loss]
    reports: list[dict[str, float]] = field(default_factory=list)  # every report's scalar metrics (report cards)
    resumed_fingerprint: float | None = None
    saved_fingerprint: float | None = None
    stage_state: dict[str, Any] = field(default_factory=dict)



class CheckpointManager:
    """A worker's checkpoint I/O for the loop: find the checkpoint to resume from (Ray Train's registered one,
    or r1ray's newer complete marker), restore the DeepSpeed and trainer state (converting to a universal
    checkpoint when the world size changed), save one (DeepSpeed state, trainer state, HF export, completion
    marker once every rank's files are stored). It reads the loop's engine, stage, worker and collectives."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    def open(self) -> tuple[str | None, dict[str, Any], bool]:
        """(local checkpoint dir or None, its trainer state, whether Ray Train restarted us)."""
        import ray.train
        from ray.train import Checkpoint

        loop = self.loop
        ckpt, from_ray = ray.train.get_checkpoint(), True
        # Ray Train registers a reported checkpoint only when its controller next polls the workers (every
        # 2 s): a worker killed within that window restarts from the checkpoint before, losing an interval.
        # r1ray's own marker (written once every rank's files are stored) closes that gap.
        newest = newest_checkpoint(loop.run_dir)
        if newest is not None and (ckpt is None or (checkpoint_step(newest.rstrip("/").rsplit("/", 1)[-1]) or 0)
                                   > (checkpoint_step(ckpt.path.rstrip("/").rsplit("/", 1)[-1]) or 0)):
            log.info("resuming from %s, newer than Ray Train's registered checkpoint", newest)
            ckpt = Checkpoint(newest)
        if ckpt is None and loop.cfg.checkpoint.resume_from:
            ckpt, from_ray = Checkpoint(loop.cfg.checkpoint.resume_from), False
        if ckpt is None:
            return None, {}, False

        self._ckpt_ctx = ckpt.as_directory()
        local = self._ckpt_ctx.__enter__()
        state = read_trainer_state(local)
        if state["zero_stage"] != loop.cfg.deepspeed.zero_stage:
            raise ValueError(
                f"checkpoint {local} was saved with deepspeed.zero_stage={state['zero_stage']}; resume with "
                f"the same stage (got {loop.cfg.deepspeed.zero_stage})")
        if state["global_batch_size"] != loop.cfg.train.global_batch_size:
            raise ValueError(
                f"checkpoint {local} was trained with train.global_batch_size={state['global_batch_size']}; "
                f"resume with it (got {loop.cfg.train.global_batch_size}): the sample cursor counts in it")
        return local, state, from_ray

    def load(self, local: str, state: dict[str, Any], from_ray: bool, universal: bool) -> RunState:
        from r1ray.observe.metrics import record

        loop = self.loop
        w = loop.worker
        load_dir, conv_dir = local, None
        if universal:
            import ray.util

            # one conversion per host, by local rank 0: Ray Train numbers local ranks per node IP
            host = ray.util.get_node_ip_address().replace(":", "_")
            conv_dir = os.path.join(tempfile.gettempdir(),
                                    f"r1ray-universal-{state['attempt']}-{state['step']}-{host}")
            if w.local_rank == 0 and not os.path.exists(os.path.join(conv_dir, "done")):
                t1 = time.perf_counter()
                convert_to_universal(local, conv_dir)
                open(os.path.join(conv_dir, "done"), "w").close()
                log.info("converted a %d-worker checkpoint to universal in %.1fs", state["world_size"],
                         time.perf_counter() - t1)
            loop._barrier()
            load_dir = conv_dir
        path, _ = loop.engine.load_checkpoint(load_dir, tag=DS_TAG, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {load_dir}/{DS_TAG}")
        rs = RunState(step=int(state["step"]), consumed=int(state["samples_consumed"]),
                      nonfinite_total=int(state.get("nonfinite_total", 0)),
                      restarts=int(state.get("restarts", 0)) + (1 if from_ray else 0),
                      last_ckpt=state.get("checkpoint"), saved_at=int(state["step"]),
                      saved_fingerprint=state.get("optim_fingerprint"),
                      stage_state=state.get("stage_state") or {})
        rs.resumed_fingerprint = self.optim_fingerprint()
        loop.stage.load_state_dict(rs.stage_state)
        log.info("resumed from %s at step %d, %d samples consumed (saved on %d worker(s), now %d)",
                 local, rs.step, rs.consumed, state["world_size"], w.world_size)
        if rs.consumed != rs.step * loop.cfg.train.global_batch_size:
            raise ValueError(f"checkpoint {local}: samples_consumed={rs.consumed} != step {rs.step} x "
                             f"train.global_batch_size {loop.cfg.train.global_batch_size}")
        self._ckpt_ctx.__exit__(None, None, None)
        if conv_dir:
            loop._barrier()
            if w.local_rank == 0:
                shutil.rmtree(conv_dir, ignore_errors=True)
        if from_ray and rs.restarts:
            record("r1ray_train_restarts", 1, **loop.tags)
        return rs

    def optim_fingerprint(self) -> float:
        """Sum of |state| over every optimizer state tensor of every rank: equal before a save and after a
        load at any data-parallel size iff the optimizer state was carried over (not reset)."""
        import torch

        loop = self.loop
        opt = loop.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        total = 0.0
        for state in inner.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    total += float(v.detach().double().abs().sum())
        total = loop._allreduce([total])[0]
        if loop.cfg.deepspeed.zero_stage == 0:
            total /= loop.worker.world_size  # replicated, not partitioned
        return total

    def save(self, rs: RunState, metrics: dict) -> str:
        import ray.train
        from ray.train import Checkpoint

        from r1ray.artifacts import join
        from r1ray.observe.metrics import record

        loop = self.loop
        cfg, w, step = loop.cfg, loop.worker, rs.step
        t0 = time.perf_counter()
        name = checkpoint_name(step, loop.attempt)
        tmp = tempfile.mkdtemp(prefix=f"r1ray-{name}-r{w.rank}-")
        try:
            loop.engine.save_checkpoint(tmp, tag=DS_TAG)
            fingerprint = self.optim_fingerprint()
            if cfg.faults.kill_during_save_at_step == step and w.rank == cfg.faults.kill_rank:
                loop.faults.maybe_kill("kill_during_save_at_step", step)
            if cfg.checkpoint.export_hf:
                export_hf(loop.engine, loop.stage.tokenizer, os.path.join(tmp, HF_DIR),
                          zero_stage=cfg.deepspeed.zero_stage, is_rank0=w.rank == 0)
            stage_state = loop.stage.state_dict()  # every rank: a stage may gather its workers' state
            if w.rank == 0:
                if cfg.checkpoint.export_hf:
                    write_export_manifest(
                        os.path.join(tmp, HF_DIR), stage=loop.stage.name, config=cfg,
                        inputs=loop.stage.export_inputs(), checkpoint_step=step,
                        counts={"step": step, "samples_consumed": rs.consumed},
                    )
                write_json(os.path.join(tmp, TRAINER_STATE), {
                    "step": step, "samples_consumed": rs.consumed, "world_size": w.world_size,
                    "zero_stage": cfg.deepspeed.zero_stage, "global_batch_size": cfg.train.global_batch_size,
                    "seed": cfg.seed, "nonfinite_total": rs.nonfinite_total, "restarts": rs.restarts,
                    "attempt": loop.attempt, "checkpoint": join(loop.run_dir, name),
                    "optim_fingerprint": fingerprint, "stage": loop.stage.name,
                    "stage_state": stage_state,
                    "rng": "torch.manual_seed((seed * 1000003 + step) * 1009 + rank) before every step",
                    "lr_schedule": "r1ray.train.core.optim.lr_at(optim, step, train.max_steps)",
                    "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                })
            metrics = dict(metrics, checkpoint_save_seconds=time.perf_counter() - t0)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        uri = join(loop.run_dir, name)
        # every rank's files are in the run's storage once every rank is past its report (each uploads its
        # part before returning): only then is the checkpoint marked complete
        loop._barrier()
        if w.rank == 0:
            write_json(join(uri, COMPLETE), {"step": step, "samples_consumed": rs.consumed})
        seconds = time.perf_counter() - t0
        record("r1ray_train_checkpoint_save_seconds", seconds, **loop.tags)
        log.info("checkpoint step %d -> %s (%.1fs)", step, uri, seconds)
        loop._barrier()
        return uri
