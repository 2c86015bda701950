"""Readers of what the training stages write: the checkpoint layout, complete exports, the newest export
of a run, and local copies of object-store exports. Pure file logic (no Ray, no DeepSpeed), so evaluation,
compression and serving find models without importing the training stages.

A checkpoint is one directory in the run directory, ``<run_dir>/checkpoint_<step:08d>-<attempt>``::

    ds/                       DeepSpeed state of every rank (model, optimizer partitions)
    trainer_state.json        step, samples consumed, world size, ZeRO stage, non-finite count, ...
    hf/                       consolidated Hugging Face safetensors export + tokenizer + manifest.json
    r1ray_complete.json       written after Ray Train registered the checkpoint

The run's final model is ``<run_dir>/final`` (an artifact whose manifest, written last, lists every file
with its size, so a reader can tell a complete export from one cut off mid-copy).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow.fs as pafs

from r1ray.artifacts import MANIFEST, exists, filesystem, is_uri, join, read_bytes
from r1ray.observe.log import get_logger

log = get_logger(__name__)

TRAINER_STATE = "trainer_state.json"
COMPLETE = "r1ray_complete.json"
DS_TAG = "ds"
HF_DIR = "hf"
FINAL_DIR = "final"
_CKPT_RE = re.compile(r"^checkpoint_(\d{8})-[0-9a-f]+$")


def checkpoint_name(step: int, attempt: str) -> str:
    return f"checkpoint_{step:08d}-{attempt}"


def checkpoint_step(name: str) -> int | None:
    m = _CKPT_RE.match(name)
    return int(m.group(1)) if m else None


def export_is_complete(export_dir: str) -> bool:
    """True when ``export_dir`` has a manifest and every file it lists, at the listed size."""
    try:
        manifest = json.loads(read_bytes(join(export_dir, MANIFEST)))
    except (FileNotFoundError, ValueError, OSError):
        return False
    files = manifest.get("files")
    if not files:
        return False
    fs, path = filesystem(export_dir)
    for rel, size in files.items():
        info = fs.get_file_info(f"{path}/{rel}")
        if info.type != pafs.FileType.File or info.size != size:
            return False
    return True


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, uri) of every checkpoint directory in ``run_dir``, oldest first (complete or not)."""
    fs, path = filesystem(run_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    out = []
    for info in infos:
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        step = checkpoint_step(name)
        if info.type == pafs.FileType.Directory and step is not None:
            out.append((step, join(run_dir, name)))
    return sorted(out)


def newest_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint of ``run_dir`` that finished (registered and marked complete)."""
    for _, uri in reversed(list_checkpoints(run_dir)):
        if exists(join(uri, COMPLETE)) and exists(join(uri, TRAINER_STATE)):
            return uri
    return None


def newest_export(run_dir: str) -> str | None:
    """The model of a run: ``<run_dir>/final`` when complete, else the newest complete per-checkpoint HF
    export, else None."""
    final = join(run_dir, FINAL_DIR)
    if export_is_complete(final):
        return final
    for _, uri in reversed(list_checkpoints(run_dir)):
        if exists(join(uri, COMPLETE)) and export_is_complete(join(uri, HF_DIR)):
            return join(uri, HF_DIR)
    return None


def localize_model(model_path: str, cache_dir: str | Path | None = None) -> str:
    """A local directory holding ``model_path``: itself when local, else a copy of the object-store export
    under ``~/.cache/r1ray/models`` (reused once complete; weights stay safetensors)."""
    import hashlib
    import shutil

    if not is_uri(model_path):
        return model_path.removeprefix("file://")
    root = Path(cache_dir or Path.home() / ".cache" / "r1ray" / "models")
    local = root / hashlib.sha256(model_path.encode()).hexdigest()[:16]
    done = local / ".r1ray-complete"
    if done.exists():
        return str(local)
    fs, src = filesystem(model_path)
    tmp = local.with_name(local.name + f".tmp-{random.getrandbits(32):08x}")
    log.info("copying %s to %s", model_path, local)
    tmp.mkdir(parents=True)
    pafs.copy_files(src, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    if not (tmp / "config.json").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(f"{model_path} is not a Hugging Face model directory (no config.json)")
    (tmp / ".r1ray-complete").write_text(model_path)
    shutil.rmtree(local, ignore_errors=True)
    tmp.rename(local)
    return str(local)


def resolve_export(path_or_run_dir: str) -> str:
    """A Hugging Face model directory from either an export directory or a run directory (its newest
    export). Raises FileNotFoundError naming what was looked for."""
    if exists(join(path_or_run_dir, "config.json")):
        return path_or_run_dir
    found = newest_export(path_or_run_dir)
    if found is None:
        raise FileNotFoundError(
            f"{path_or_run_dir} is neither a Hugging Face model directory (no config.json) nor a run directory "
            "with a complete export (final/ or checkpoint_*/hf)")
    return found
