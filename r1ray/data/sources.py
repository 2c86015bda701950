"""Sources: list the files of each configured corpus (driver) and read one file's documents (Ray tasks).

Every reader yields ``Record``s in file order; a malformed row or an unreadable/truncated file becomes a
record with a ``reason`` instead of text, so nothing crashes and nothing valid is lost: a truncated
``.gz`` yields every complete line before the damage, then one ``truncated_stream`` record.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import hashlib
import io
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from r1ray.artifacts import filesystem
from r1ray.data.config import SourceConfig

SNIPPET = 200
_ROWS_PER_BATCH = 256  # Parquet rows decoded at a time: bounds a task's memory on files of long documents
_STDLIB_SKIP = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__")


@dataclass(frozen=True)
class Record:
    pos: int
    """Line, row or sample index inside the file; -1 for a whole-file problem."""
    text: str | None
    reason: str | None = None
    """Why the record was rejected (None: a document)."""
    raw: str = ""
    """The first bytes of a rejected record, for the rejects/ dataset."""
    doc_id: str | None = None
    """The source's own id of the document (``SourceConfig.id_field``; other types as their ``str``)."""


@dataclass(frozen=True)
class FileTask:
    """One unit of reading work: one file, one line-aligned byte range of a big line-delimited file, or (for
    ``reasoning``) one range of sample indices."""

    source: int
    file: int
    path: str
    format: str
    size: int = 0
    """The whole file's size in bytes."""
    start: int = 0
    """``reasoning``: first sample index; a byte range: the line number of its first line in the file."""
    count: int = 0
    """``reasoning``: samples."""
    offset: int = 0
    """A byte range: its first byte (always the start of a line)."""
    length: int = -1
    """A byte range: its bytes (always whole lines); -1: the whole file."""
    sha256: str = ""
    """A byte range: the whole file's SHA-256, computed when the file was cut (the range at offset 0 reports
    it as the file's input hash)."""


class ReadStats:
    """Bytes and SHA-256 of what a reader consumed (the raw, compressed bytes)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.bytes = 0


class _HashingReader(io.RawIOBase):
    def __init__(self, f, stats: ReadStats):
        self._f, self._stats = f, stats

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self._stats.sha.update(data)
        self._stats.bytes += n
        return n


def _detect_format(path: str) -> str:
    p = path.lower()
    for ext in (".gz", ".zst", ".zstd"):
        if p.endswith(ext):
            p = p[: -len(ext)]
    if p.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith(".arrow"):
        return "hf_disk"
    return "text"


def _list_files(path: str) -> list[tuple[str, int]]:
    """(path, size) of the files at ``path``: a file, a folder (recursive) or a glob, sorted by path."""
    fs, p = filesystem(path)
    scheme = path.split("://", 1)[0] + "://" if "://" in path and not path.startswith("file://") else ""
    pattern = None
    if any(c in p for c in "*?["):
        cut = min(p.find(c) for c in "*?[" if c in p)
        base = p[:cut].rsplit("/", 1)[0] or "/"
        pattern, p = p, base
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [(scheme + p, info.size or 0)]
    out = []
    for fi in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if fi.type != pafs.FileType.File:
            continue
        name = fi.path.rsplit("/", 1)[-1]
        if name.startswith((".", "_")) and not name.endswith(".arrow"):
            continue
        if pattern is not None and not fnmatch.fnmatch(fi.path, pattern):
            continue
        out.append((scheme + fi.path, fi.size or 0))
    return sorted(out)


def _hf_disk_files(path: str) -> list[tuple[str, int]]:
    """The Arrow files of a ``save_to_disk`` dataset (or of every split of a DatasetDict), in order."""
    fs, p = filesystem(path)
    scheme = path.split("://", 1)[0] + "://" if "://" in path and not path.startswith("file://") else ""

    def one(d: str) -> list[tuple[str, int]] | None:
        try:
            with fs.open_input_stream(f"{d}/state.json") as f:
                state = json.loads(f.read())
        except (FileNotFoundError, OSError):
            return None
        files = [f"{d}/{x['filename']}" for x in state.get("_data_files", [])]
        return [(scheme + f, fs.get_file_info(f).size or 0) for f in files]

    direct = one(p)
    if direct is not None:
        return direct
    try:
        with fs.open_input_stream(f"{p}/dataset_dict.json") as f:
            splits = json.loads(f.read()).get("splits", [])
    except (FileNotFoundError, OSError):
        return [(f, s) for f, s in _list_files(path) if f.endswith(".arrow")]
    out = []
    for split in splits:
        out.extend(one(f"{p}/{split}") or [])
    return out


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _splittable(path: str, fmt: str, src: SourceConfig) -> bool:
    """Uncompressed line-delimited local files can be cut at line boundaries (compressed streams cannot be
    entered mid-way; a remote file would be downloaded twice: once to cut it, once to read it)."""
    if fmt not in ("jsonl", "text") or (fmt == "text" and src.text_unit != "line"):
        return False
    if path.lower().endswith((".gz", ".zst", ".zstd")):
        return False
    fs, _ = filesystem(path)
    return isinstance(fs, pafs.LocalFileSystem)


def line_ranges(path: str, chunk_bytes: int) -> tuple[list[tuple[int, int, int]], str, int]:
    """Cut a file into ``(offset, length, first line number)`` ranges of about ``chunk_bytes`` that end at
    line ends, in one streaming pass that also hashes the file; returns the ranges, the SHA-256 and the size."""
    sha, ranges = hashlib.sha256(), []
    start = start_line = lines = pos = 0  # the open range's first byte and line; newlines and bytes seen
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        while block := f.read(max(chunk_bytes, 1 << 20)):
            sha.update(block)
            i = 0  # newlines before block[i] are counted in ``lines``
            while (want := max(i, start + chunk_bytes - pos)) < len(block):
                j = block.find(b"\n", want)
                if j < 0:
                    break  # cut at the first newline of a later block
                lines += block.count(b"\n", i, j + 1)
                ranges.append((start, pos + j + 1 - start, start_line))
                start, start_line, i = pos + j + 1, lines, j + 1
            lines += block.count(b"\n", i)
            pos += len(block)
    if pos > start or not ranges:
        ranges.append((start, pos - start, start_line))
    return ranges, sha.hexdigest(), pos


def plan(sources: list[SourceConfig], reasoning_chunk: int = 2000,
         chunk_bytes: int | None = None) -> tuple[list[FileTask], list[str]]:
    """Every source's reading tasks, in source then file order, and a list of problems (missing paths).
    With ``chunk_bytes``, an uncompressed local jsonl or line-text file bigger than that becomes several tasks
    (line-aligned byte ranges, numbered by their line in the file), so one big file is read in parallel."""
    tasks: list[FileTask] = []
    problems: list[str] = []
    for si, src in enumerate(sources):
        fmt = src.format
        if fmt == "reasoning":
            for fi, start in enumerate(range(0, src.num_docs, reasoning_chunk)):
                tasks.append(FileTask(si, fi, f"reasoning:{start}", "reasoning", 0, start,
                                      min(reasoning_chunk, src.num_docs - start)))
            continue
        if fmt == "python_stdlib":
            root = Path(stdlib_dir())
            files = sorted(
                (str(f), f.stat().st_size) for f in root.rglob("*.py")
                if not any(part in _STDLIB_SKIP for part in f.relative_to(root).parts)
            )
            fmt = "text"
        elif fmt == "hf_disk":
            files = _hf_disk_files(src.path)
        else:
            files = _list_files(src.path)
            if fmt == "auto" and len(files) > 0 and any(f.endswith("state.json") for f, _ in files):
                files, fmt = _hf_disk_files(src.path), "hf_disk"
        if not files:
            problems.append(f"sources[{si}] ({src.name}): no files found at {src.path!r}")
            continue
        if src.max_bytes is not None:
            kept, total = [], 0
            for f, size in files:
                if total + size > src.max_bytes and kept:
                    break
                kept.append((f, size))
                total += size
            files = kept
        for fi, (f, size) in enumerate(files):
            ffmt = _detect_format(f) if fmt == "auto" else fmt
            if chunk_bytes is not None and size > chunk_bytes and _splittable(f, ffmt, src):
                ranges, sha, size = line_ranges(f, chunk_bytes)
                tasks.extend(FileTask(si, fi, f, ffmt, size, start=line, offset=off, length=n, sha256=sha)
                             for off, n, line in ranges)
            else:
                tasks.append(FileTask(si, fi, f, ffmt, size))
    return tasks, problems


# ---------------------------------------------------------------------------------------------------
# Readers (run inside Ray tasks)
# ---------------------------------------------------------------------------------------------------


class _RangeReader(io.RawIOBase):
    """``length`` bytes of a random-access file from ``offset``."""

    def __init__(self, f, offset: int, length: int):
        f.seek(offset)
        self._f, self._left = f, length

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(min(len(b), self._left))
        n = len(data)
        b[:n] = data
        self._left -= n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_stream(path: str, stats: ReadStats, offset: int = 0, length: int = -1):
    fs, p = filesystem(path)
    if length >= 0:  # a line-aligned range of an uncompressed file (hashed whole when it was cut)
        return io.BufferedReader(_RangeReader(fs.open_input_file(p), offset, length), buffer_size=1 << 20)
    raw = io.BufferedReader(_HashingReader(fs.open_input_stream(p, compression=None), stats), buffer_size=1 << 20)
    low = p.lower()
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if low.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)
    return raw


class _ZstdReader(io.RawIOBase):
    """Streaming zstd (multi-frame) that raises EOFError when the input ends inside a frame.

    ``zstandard``'s own stream reader just stops at a cut, which would silently lose the rest of the file.
    """

    def __init__(self, raw):
        import zstandard

        self._zstd, self._raw = zstandard, raw
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._pending:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                return 0
            while chunk:
                self._in_frame = True
                self._pending += self._d.decompress(chunk)
                if self._d.eof:
                    chunk = self._d.unused_data
                    self._d = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
                else:
                    chunk = b""
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _lines(f, max_line_bytes: int, first: int = 0) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the newline) or (line number, None) for a line over the limit; lines are
    numbered from ``first``."""
    n = first
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while True:  # skip the rest of the oversized line without holding it
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield n, None
        else:
            yield n, line.rstrip(b"\r\n")
        n += 1


def _id_str(v: object) -> str | None:
    return None if v is None else v if isinstance(v, str) else str(v)


def _json_record(pos: int, line: bytes, text_field: str, id_field: str | None = None) -> Record | None:
    if not line.strip():
        return None  # blank lines between records are not records
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError:
        return Record(pos, None, "invalid_utf8", line[:SNIPPET].decode("utf-8", "replace"))
    try:
        obj = json.loads(s)
    except json.JSONDecodeError:
        return Record(pos, None, "malformed_json", s[:SNIPPET])
    if not isinstance(obj, dict):
        return Record(pos, None, "not_an_object", s[:SNIPPET])
    if text_field not in obj or obj[text_field] is None:
        return Record(pos, None, "missing_text_field", s[:SNIPPET])
    text = obj[text_field]
    if not isinstance(text, str):
        return Record(pos, None, "non_string_text", s[:SNIPPET])
    return Record(pos, text, doc_id=_id_str(obj.get(id_field)) if id_field else None)


def read_records(task: FileTask, src: SourceConfig, max_line_bytes: int, seed: int,
                 stats: ReadStats) -> Iterator[Record]:
    """Every record of one file task, in order. Never raises for bad data: it yields rejects."""
    if task.format == "reasoning":
        from r1ray.tasks.arithmetic import generate_many

        for s in generate_many(seed, task.count, task.start, chat_fraction=src.chat_fraction):
            yield Record(s.index, s.text)
        return
    n_done = 0
    try:
        if task.format in ("jsonl", "text"):
            with _open_stream(task.path, stats, task.offset, task.length) as f:
                if task.format == "text" and src.text_unit == "file":
                    data = f.read()
                    try:
                        yield Record(0, data.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        yield Record(0, None, "invalid_utf8", f"{e}"[:SNIPPET])
                    n_done = 1
                    return
                first = task.start if task.length >= 0 else 0  # a range's lines are numbered in the file
                for pos, line in _lines(f, max_line_bytes, first):
                    n_done = pos + 1
                    if line is None:
                        yield Record(pos, None, "line_too_long", "")
                    elif task.format == "jsonl":
                        rec = _json_record(pos, line, src.text_field, src.id_field)
                        if rec is not None:
                            yield rec
                    elif line.strip():
                        try:
                            yield Record(pos, line.decode("utf-8"))
                        except UnicodeDecodeError:
                            yield Record(pos, None, "invalid_utf8", line[:SNIPPET].decode("utf-8", "replace"))
        elif task.format in ("parquet", "hf_disk"):
            fs, p = filesystem(task.path)
            # The raw bytes are hashed in one streaming pass (the manifest's input hash); the rows are then
            # read a row group (Parquet) or record batch (Arrow stream) at a time, so a big file never sits
            # whole in a task's memory.
            with fs.open_input_stream(p) as f:
                while chunk := f.read(1 << 20):
                    stats.sha.update(chunk)
                    stats.bytes += len(chunk)
            with contextlib.ExitStack() as stack:
                if task.format == "parquet":
                    import pyarrow.parquet as pq

                    pf = pq.ParquetFile(stack.enter_context(fs.open_input_file(p)))
                    names = pf.schema_arrow.names
                    cols = [src.text_field] + ([src.id_field] if src.id_field in names else [])
                    batches = pf.iter_batches(batch_size=_ROWS_PER_BATCH, columns=cols) \
                        if src.text_field in names else None
                else:
                    reader = pa.ipc.open_stream(stack.enter_context(fs.open_input_stream(p)))
                    names = reader.schema.names
                    batches = iter(reader) if src.text_field in names else None
                if batches is None:
                    yield Record(-1, None, "missing_text_column", f"columns: {names}"[:SNIPPET])
                    return
                pos = 0
                for batch in batches:
                    col = batch.column(batch.schema.get_field_index(src.text_field))
                    is_str = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
                    i_id = batch.schema.get_field_index(src.id_field) if src.id_field else -1
                    ids = batch.column(i_id).to_pylist() if i_id >= 0 else [None] * batch.num_rows
                    for v, doc_id in zip(col.to_pylist(), ids, strict=True):
                        if v is None:
                            yield Record(pos, None, "missing_text_field", "")
                        elif not is_str or not isinstance(v, str):
                            yield Record(pos, None, "non_string_text", repr(v)[:SNIPPET])
                        else:
                            yield Record(pos, v, doc_id=_id_str(doc_id))
                        pos += 1
                    n_done = pos
        else:
            yield Record(-1, None, f"unknown_format:{task.format}", "")
    except (EOFError, gzip.BadGzipFile) as e:
        yield Record(n_done, None, "truncated_stream", f"{type(e).__name__}: {e}"[:SNIPPET])
    except Exception as e:  # noqa: BLE001 - a damaged file must become a reject, never crash the run
        # Failing after some records (or inside a decompressor) means the stream was cut or corrupted;
        # failing before any record means the file could not be opened or parsed at all.
        damaged = n_done > 0 or "zstd" in type(e).__name__.lower() or "decompress" in str(e).lower()
        kind = "truncated_stream" if damaged else "unreadable_file"
        yield Record(n_done if n_done else -1, None, kind, f"{type(e).__name__}: {e}"[:SNIPPET])
