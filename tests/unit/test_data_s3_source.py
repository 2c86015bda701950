"""An object-store source read through a real S3-compatible HTTP server on loopback (moto's server).

The data stage lists and reads ``s3://`` paths with pyarrow's S3 filesystem, exactly as on a cluster:
only the endpoint differs (``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1ray.data.config import SourceConfig
from r1ray.data.sources import ReadStats, plan, read_records

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    for k, v in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="corpus")
    return client


def test_jsonl_gz_and_parquet_sources_on_s3(s3_env):
    jsonl = gzip.compress(b"\n".join(json.dumps({"text": f"doc {i}", "id": f"k{i}"}).encode() for i in range(5)))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"body": ["p0", None, "p2"]}), sink)
    parquet = sink.getvalue().to_pybytes()
    s3_env.put_object(Bucket="corpus", Key="web/a.jsonl.gz", Body=jsonl)
    s3_env.put_object(Bucket="corpus", Key="web/b.jsonl.gz", Body=jsonl[: len(jsonl) // 2])  # cut in transit
    s3_env.put_object(Bucket="corpus", Key="tables/t.parquet", Body=parquet)

    web = SourceConfig(name="web", path="s3://corpus/web/*.jsonl.gz", format="jsonl", id_field="id")
    tables = SourceConfig(name="tables", path="s3://corpus/tables", format="parquet", text_field="body")
    tasks, problems = plan([web, tables])
    assert not problems
    assert [(t.source, t.path) for t in tasks] == [
        (0, "s3://corpus/web/a.jsonl.gz"), (0, "s3://corpus/web/b.jsonl.gz"), (1, "s3://corpus/tables/t.parquet")]
    assert [t.size for t in tasks] == [len(jsonl), len(jsonl) // 2, len(parquet)]

    got = []
    for t in tasks:
        stats = ReadStats()
        got.append([(r.pos, r.text, r.reason, r.doc_id) for r in
                    read_records(t, (web, tables)[t.source], 1 << 20, 0, stats)])
        body = {0: jsonl, 1: jsonl[: len(jsonl) // 2], 2: parquet}[tasks.index(t)]
        assert stats.sha.hexdigest() == hashlib.sha256(body).hexdigest() and stats.bytes == len(body)
    assert got[0] == [(i, f"doc {i}", None, f"k{i}") for i in range(5)]
    assert got[1][-1][2] == "truncated_stream"  # a cut object is a reject, like a cut local file
    assert got[2] == [(0, "p0", None, None), (1, None, "missing_text_field", None), (2, "p2", None, None)]


def test_missing_s3_prefix_is_a_problem_not_a_crash(s3_env):
    _, problems = plan([SourceConfig(name="gone", path="s3://corpus/nothing-here/", format="jsonl")])
    assert problems == ["sources[0] (gone): no files found at 's3://corpus/nothing-here/'"]
