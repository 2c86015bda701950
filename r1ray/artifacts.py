"""Artifact directories and their ``manifest.json``: the lineage every stage writes and reads.

An artifact directory (local path or object-store URI) is complete when its ``manifest.json`` exists:
the manifest is always written last, and published atomically (write to a temporary name, then rename,
on local disks; a single-object PUT, which is atomic, on object stores). A manifest records the stage,
the r1ray version, the resolved config, the SHA-256 of each input artifact's manifest, counts and
timestamps. From a served model one walks ``inputs`` back to the shards and the corpus files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from r1ray import __version__
from r1ray.observe.log import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact that is missing, incomplete, or not of the expected stage."""


def is_uri(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it (local paths become absolute)."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception:  # noqa: BLE001 - schemes pyarrow lacks (memory://, gcs via gcsfs, ...) go through fsspec
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts if p)])


def jsonl_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every non-blank line of a local jsonl file, ``where`` being ``<path>:<line>``; a line
    that is not JSON is a ValueError naming it."""
    p = Path(path)
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{p}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e})") from None


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, fixed separators, UTF-8: the same content always gives the same bytes and hash."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, default=str) + "\n").encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(uri: str, chunk: int = 1 << 20) -> str:
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Publish ``data`` at ``uri`` so readers see the old content or the new, never a partial file."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    else:
        with fs.open_output_stream(path) as f:  # one PUT: atomic on object stores
            f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def manifest_sha256(artifact: str) -> str:
    """SHA-256 of an artifact's manifest bytes: the identity its consumers record."""
    try:
        return sha256_bytes(read_bytes(join(artifact, MANIFEST)))
    except FileNotFoundError:
        raise ArtifactError(f"{artifact} is not a complete artifact: {MANIFEST} is missing") from None


def write_manifest(
    artifact: str,
    *,
    stage: str,
    config: Any,
    inputs: Iterable[str] = (),
    counts: Mapping[str, Any] | None = None,
    started_at: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``<artifact>/manifest.json`` last, atomically. ``config`` is a pydantic model or a dict."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    manifest: dict[str, Any] = {
        "stage": stage,
        "r1ray_version": __version__,
        "config": config,
        "inputs": [
            {"uri": str(u), "stage": read_manifest(str(u)).get("stage"), "manifest_sha256": manifest_sha256(str(u))}
            for u in inputs
        ],
        "counts": dict(counts or {}),
        "started_at": started_at,
        "finished_at": now(),
        **extra,
    }
    write_bytes_atomic(join(artifact, MANIFEST), canonical_json(manifest))
    return manifest


def read_manifest(artifact: str, *, stage: str | None = None) -> dict[str, Any]:
    """Load a complete artifact's manifest; ``stage`` checks it is the kind expected."""
    try:
        manifest = json.loads(read_bytes(join(artifact, MANIFEST)))
    except FileNotFoundError:
        raise ArtifactError(
            f"{artifact} is not a complete artifact: {MANIFEST} is missing (the stage that writes it did not finish)"
        ) from None
    if stage is not None and manifest.get("stage") != stage:
        raise ArtifactError(f"{artifact} holds a {manifest.get('stage')!r} artifact, expected {stage!r}")
    return manifest


def is_complete(artifact: str) -> bool:
    return exists(join(artifact, MANIFEST))


def lineage(artifact: str, *, strict: bool = False) -> list[dict[str, Any]]:
    """The chain from ``artifact`` back through its inputs (depth-first), each with its stage, uri and
    manifest hash; an artifact reached through several consumers is listed once (each link still checked).

    Every input is checked against the hash its consumer recorded: an input that was replaced since
    (rerun with ``overwrite: true``) or deleted is marked ``status: "replaced"`` or ``"missing"`` (with the
    recorded and current hashes and the consumer), so a broken chain is reported, never silently walked.
    ``strict=True`` raises ArtifactError on the first broken link instead."""
    out, seen, listed = [], set(), set()
    stack: list[tuple[str, str | None, str | None]] = [(artifact, None, None)]  # uri, recorded sha, consumer
    while stack:
        uri, recorded, consumer = stack.pop()
        if (uri, consumer) in seen:
            continue
        seen.add((uri, consumer))
        entry: dict[str, Any] = {"uri": uri, "status": "ok"}
        try:
            m = read_manifest(uri)
            current = manifest_sha256(uri)
        except ArtifactError:
            m, current = None, None
        if m is None:
            entry.update(status="missing", stage=None, manifest_sha256=None)
        else:
            entry.update(stage=m.get("stage"), manifest_sha256=current)
            if recorded is not None and recorded != current:
                entry["status"] = "replaced"
        if consumer is not None:
            entry.update(consumer=consumer, recorded_sha256=recorded)
        if entry["status"] != "ok":
            what = "was deleted" if entry["status"] == "missing" else "was replaced after it was consumed"
            msg = (f"lineage of {artifact} is broken: {uri} (input of {consumer}) {what} (recorded manifest "
                   f"sha256 {recorded}, now {current})")
            if strict:
                raise ArtifactError(msg)
            log.warning(msg)
        if entry["status"] == "ok" and uri in listed:
            continue  # an artifact two stages read (e.g. the corpus: pretraining's data and SFT's replay) once
        listed.add(uri)
        out.append(entry)
        if m is not None:
            stack.extend((i["uri"], i.get("manifest_sha256"), uri) for i in reversed(m.get("inputs", [])))
    return out


def local_path(uri: str) -> Path:
    """A local artifact path as a Path; object-store URIs raise (download them first)."""
    if is_uri(uri):
        raise ArtifactError(f"{uri} is not a local path")
    return Path(filesystem(uri)[1])
