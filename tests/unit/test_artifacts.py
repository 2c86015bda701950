"""Artifact manifests: atomic publish, round trip, stable hashes, lineage, object-store URIs."""

from __future__ import annotations

import json
import os
import threading

import pytest

from r1ray import __version__
from r1ray.artifacts import (
    ArtifactError,
    canonical_json,
    is_complete,
    lineage,
    manifest_sha256,
    read_manifest,
    write_bytes_atomic,
    write_manifest,
)
from r1ray.config import OptimConfig


def test_round_trip_with_pydantic_config(tmp_path):
    art = str(tmp_path / "a")
    m = write_manifest(art, stage="data", config=OptimConfig(lr=0.01), counts={"read": 10, "kept": 7})
    back = read_manifest(art, stage="data")
    assert back == json.loads(json.dumps(m))
    assert back["r1ray_version"] == __version__
    assert back["config"]["lr"] == 0.01 and back["counts"] == {"read": 10, "kept": 7}
    assert back["finished_at"].endswith("+00:00")


def test_canonical_json_is_stable():
    a = {"b": 1, "a": {"y": [1, 2], "x": "é"}}
    b = {"a": {"x": "é", "y": [1, 2]}, "b": 1}
    assert canonical_json(a) == canonical_json(b)


def test_hash_stable_and_inputs_recorded(tmp_path):
    src = str(tmp_path / "src")
    write_manifest(src, stage="data", config={"k": 1})
    h1 = manifest_sha256(src)
    assert h1 == manifest_sha256(src)  # reading twice gives the same identity
    dst = str(tmp_path / "dst")
    m = write_manifest(dst, stage="pretrain", config={}, inputs=[src])
    assert m["inputs"] == [{"uri": src, "stage": "data", "manifest_sha256": h1}]
    assert [x["stage"] for x in lineage(dst)] == ["pretrain", "data"]
    assert [x["status"] for x in lineage(dst)] == ["ok", "ok"]
    # Changing the input artifact changes the identity its consumer recorded, and lineage reports it.
    write_manifest(src, stage="data", config={"k": 2})
    assert manifest_sha256(src) != h1
    chain = lineage(dst)
    assert chain[1]["status"] == "replaced" and chain[1]["recorded_sha256"] == h1
    assert chain[1]["manifest_sha256"] == manifest_sha256(src) and chain[1]["consumer"] == dst
    with pytest.raises(ArtifactError, match="was replaced after it was consumed"):
        lineage(dst, strict=True)
    # a deleted input is reported as missing
    (tmp_path / "src" / "manifest.json").unlink()
    assert lineage(dst)[1]["status"] == "missing"
    with pytest.raises(ArtifactError, match="was deleted"):
        lineage(dst, strict=True)


def test_lineage_lists_an_artifact_read_twice_once(tmp_path):
    """SFT reads the pretraining export and, for replay, the corpus pretraining read: the corpus is listed once;
    replaced after SFT read it, its second link is reported."""
    data, pre, sft = str(tmp_path / "data"), str(tmp_path / "pre"), str(tmp_path / "sft")
    write_manifest(data, stage="data", config={})
    write_manifest(pre, stage="pretrain", config={}, inputs=[data])
    write_manifest(sft, stage="sft", config={}, inputs=[pre, data])
    assert [(x["stage"], x["status"]) for x in lineage(sft)] == [("sft", "ok"), ("pretrain", "ok"), ("data", "ok")]
    write_manifest(data, stage="data", config={"k": 2})
    assert [x["status"] for x in lineage(sft)] == ["ok", "ok", "replaced", "replaced"]


def test_incomplete_artifact_and_wrong_stage(tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    (d / "shard.parquet").write_bytes(b"x")
    assert not is_complete(str(d))
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_manifest(str(d))
    write_manifest(str(d), stage="data", config={})
    with pytest.raises(ArtifactError, match="expected 'serve'"):
        read_manifest(str(d), stage="serve")
    with pytest.raises(ArtifactError):
        write_manifest(str(tmp_path / "x"), stage="s", config={}, inputs=[str(tmp_path / "nope")])


def test_atomic_publish_readers_never_see_partial(tmp_path):
    """A reader polling while a writer republishes large manifests only ever sees whole JSON documents."""
    target = str(tmp_path / "m.json")
    write_bytes_atomic(target, canonical_json({"v": 0, "pad": "x" * 200_000}))
    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            with open(target, "rb") as f:
                data = f.read()
            try:
                json.loads(data)
            except ValueError:
                bad.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(1, 60):
        write_bytes_atomic(target, canonical_json({"v": i, "pad": "x" * 200_000}))
    stop.set()
    t.join()
    assert bad == []
    assert json.loads(open(target).read())["v"] == 59
    assert [f for f in os.listdir(tmp_path) if ".tmp-" in f] == []  # no temp files left behind


def test_object_store_uri_through_fsspec():
    """Non-local URIs go through pyarrow/fsspec filesystems (memory:// stands in for s3:// here)."""
    art = "memory://r1ray-test/artifact"
    write_manifest(art, stage="data", config={"a": 1}, counts={"n": 3})
    assert is_complete(art)
    assert read_manifest(art)["counts"] == {"n": 3}
    assert len(manifest_sha256(art)) == 64
