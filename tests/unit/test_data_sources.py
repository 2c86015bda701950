"""Source readers: every format, and bad input turned into reject records (never an exception)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import zstandard

from r1ray.data.config import SourceConfig
from r1ray.data.sources import ReadStats, plan, read_records


def _read(src: SourceConfig, max_line_bytes: int = 1 << 20):
    tasks, problems = plan([src])
    assert not problems
    out = []
    for t in tasks:
        out.extend((t.path.rsplit("/", 1)[-1], r.pos, r.text, r.reason) for r in
                   read_records(t, src, max_line_bytes, 0, ReadStats()))
    return out


def test_truncated_zstd_keeps_what_was_read_then_rejects(tmp_path):
    import random

    r = random.Random(0)
    body = b"\n".join(json.dumps({"text": f"doc {i} " + " ".join(str(r.random()) for _ in range(40))}).encode()
                      for i in range(2000)) + b"\n"
    data = zstandard.ZstdCompressor().compress(body)
    (tmp_path / "a.jsonl.zst").write_bytes(data[: len(data) // 2])
    recs = _read(SourceConfig(name="z", path=str(tmp_path), format="jsonl"))
    good = [r for r in recs if r[3] is None]
    assert recs[-1][3] == "truncated_stream"
    assert [r[1] for r in good] == list(range(len(good))) and 0 < len(good) < 2000
    assert all(r[2].startswith(f"doc {r[1]} ") for r in good)


def test_gzip_lines_and_text_units(tmp_path):
    (tmp_path / "x.txt.gz").write_bytes(gzip.compress(b"first line\n\nsecond line\n\xff\xfe\nlast"))
    recs = _read(SourceConfig(name="t", path=str(tmp_path / "*.gz"), format="text", text_unit="line"))
    assert [(p, t, r) for _, p, t, r in recs] == [
        (0, "first line", None), (2, "second line", None), (3, None, "invalid_utf8"), (4, "last", None)]


def test_hf_dataset_dict_reads_every_split(tmp_path):
    for split, texts in (("train", ["a", "b"]), ("test", ["c"])):
        d = tmp_path / "ds" / split
        d.mkdir(parents=True)
        table = pa.table({"content": texts})
        with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)
        (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    recs = _read(SourceConfig(name="h", path=str(tmp_path / "ds"), format="hf_disk", text_field="content"))
    assert [r[2] for r in recs] == ["a", "b", "c"]
    missing = _read(SourceConfig(name="h", path=str(tmp_path / "ds"), format="hf_disk", text_field="text"))
    assert [r[3] for r in missing] == ["missing_text_column", "missing_text_column"]


def test_plan_orders_files_caps_bytes_and_names_missing_paths(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.jsonl"):
        (tmp_path / name).write_text(json.dumps({"text": "x" * 100}) + "\n")
    tasks, problems = plan([SourceConfig(name="s", path=str(tmp_path), max_bytes=250)])
    assert [t.path.rsplit("/", 1)[-1] for t in tasks] == ["a.jsonl", "b.jsonl"] and not problems
    assert all(t.format == "jsonl" for t in tasks)
    _, problems = plan([SourceConfig(name="gone", path=str(tmp_path / "nothing"))])
    assert problems == [f"sources[0] (gone): no files found at {str(tmp_path / 'nothing')!r}"]
    tasks, _ = plan([SourceConfig(name="r", format="reasoning", num_docs=4500)])
    assert [(t.start, t.count) for t in tasks] == [(0, 2000), (2000, 2000), (4000, 500)]
    tasks, _ = plan([SourceConfig(name="py", format="python_stdlib", max_bytes=100_000)])
    assert tasks and all(t.path.endswith(".py") and "/test/" not in t.path for t in tasks)


def test_input_hash_is_of_the_raw_bytes(tmp_path):
    import hashlib

    raw = gzip.compress(b'{"text": "hello"}\n')
    (tmp_path / "h.jsonl.gz").write_bytes(raw)
    src = SourceConfig(name="s", path=str(tmp_path))
    (task,), _ = plan([src])
    stats = ReadStats()
    assert [r.text for r in read_records(task, src, 1 << 20, 0, stats)] == ["hello"]
    assert stats.sha.hexdigest() == hashlib.sha256(raw).hexdigest() and stats.bytes == len(raw)


def test_id_field_is_read_from_jsonl_and_parquet_rows(tmp_path):
    import pyarrow.parquet as pq
    import pytest

    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"text": "one", "id": "x-1"}, {"text": "two", "id": 2}, {"text": "three"}]) + "\n")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"body": ["a", "b"], "uid": [10, 11]}), tmp_path / "p" / "a.parquet")

    def ids(src):
        tasks, _ = plan([src])
        return [(r.text, r.doc_id) for t in tasks for r in read_records(t, src, 1 << 20, 0, ReadStats())]

    assert ids(SourceConfig(name="j", path=str(tmp_path / "j"), format="jsonl", id_field="id")) == \
        [("one", "x-1"), ("two", "2"), ("three", None)]
    assert ids(SourceConfig(name="p", path=str(tmp_path / "p"), format="parquet", text_field="body",
                            id_field="uid")) == [("a", "10"), ("b", "11")]
    assert ids(SourceConfig(name="j", path=str(tmp_path / "j"), format="jsonl"))[0] == ("one", None)
    with pytest.raises(ValueError, match="id_field is for jsonl, parquet and hf_disk"):
        SourceConfig(name="t", path=str(tmp_path), format="text", id_field="id")


def test_parquet_is_read_a_row_group_at_a_time(tmp_path):
    """All rows in order across row groups, and the task never holds the file: peak Python memory while
    reading stays far below the file's size (reading it whole would hold every byte at once)."""
    import os
    import tracemalloc

    import pyarrow.parquet as pq

    rows = [os.urandom(2000).hex() for _ in range(1500)]  # 6 MB of incompressible-ish text
    pq.write_table(pa.table({"text": rows, "id": list(range(1500))}), tmp_path / "big.parquet", row_group_size=100)
    size = (tmp_path / "big.parquet").stat().st_size
    src = SourceConfig(name="p", path=str(tmp_path), format="parquet", id_field="id")
    (task,), _ = plan([src])
    stats = ReadStats()
    tracemalloc.start()
    n = 0
    for r in read_records(task, src, 1 << 20, 0, stats):
        assert (r.pos, r.text, r.doc_id) == (n, rows[n], str(n))
        n += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 1500 and stats.bytes == size
    assert peak < size / 2, (peak, size)


def test_a_big_file_cut_into_line_ranges_reads_exactly_like_the_whole_file(tmp_path):
    """Every record once, numbered by its line in the file, whatever the cut; the file hashed whole."""
    import hashlib
    import random

    from r1ray.data.sources import line_ranges

    r = random.Random(1)
    lines = []
    for i in range(3000):
        kind = r.random()
        if kind < 0.02:
            lines.append(b"")  # blank lines are not records but count as lines
        elif kind < 0.04:
            lines.append(b"{not json")
        elif kind < 0.05:
            lines.append(json.dumps({"text": "x" * 5000}).encode())  # longer than the tiniest cut
        else:
            lines.append(json.dumps({"text": f"doc {i} " + "w " * r.randrange(1, 60), "id": i}).encode())
    body = b"\n".join(lines)  # no newline after the last line
    f = tmp_path / "big.jsonl"
    f.write_bytes(body)
    src = SourceConfig(name="j", path=str(f), format="jsonl", id_field="id")
    whole = [(r.pos, r.text, r.reason, r.doc_id) for r in
             read_records(plan([src])[0][0], src, 1 << 20, 0, ReadStats())]
    assert len(whole) == 3000 - lines.count(b"")
    for chunk in (64, 1000, 4096, 50_000, len(body) // 2):
        ranges, sha, size = line_ranges(str(f), chunk)
        assert sha == hashlib.sha256(body).hexdigest() and size == len(body)
        assert [o for o, _, _ in ranges] == sorted({o for o, _, _ in ranges})
        assert sum(n for _, n, _ in ranges) == len(body) and ranges[0][0] == 0
        assert all(o == 0 or body[o - 1:o] == b"\n" for o, _, _ in ranges)  # every cut is at a line end
        assert all(body[:o].count(b"\n") == line for o, _, line in ranges)
        tasks, _ = plan([src], chunk_bytes=chunk)
        assert len(tasks) == len(ranges) > 1 and all(t.sha256 == sha for t in tasks)
        got = [(r.pos, r.text, r.reason, r.doc_id) for t in tasks
               for r in read_records(t, src, 1 << 20, 0, ReadStats())]
        assert got == whole, chunk
    # Compressed and whole-file-text sources are never cut.
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(body))
    assert len(plan([SourceConfig(name="g", path=str(tmp_path / "c.jsonl.gz"))], chunk_bytes=64)[0]) == 1
    assert len(plan([SourceConfig(name="t", path=str(f), format="text")], chunk_bytes=64)[0]) == 1
