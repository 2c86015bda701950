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
import subprocess
import sys
import uuid
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
