"""The data stage end to end on real local Ray: a corpus holding every kind of bad input, every format.

Counts must reconcile per source (read = kept + duplicates + filtered + rejected), every bad row must be
in rejects/ with its source, position and reason, and the same input and seed give byte-identical shards.
"""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from r1ray.artifacts import read_manifest
from r1ray.data.config import PrepareDataConfig
from r1ray.data.shards import SHARD_SCHEMA, DataArtifact

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
).split()


def prose(seed: int, n_words: int = 120) -> str:
    r = random.Random(seed)
    sents = []
    while sum(len(s.split()) for s in sents) < n_words:
        k = r.randint(8, 16)
        sents.append(" ".join(r.choice(WORDS) for _ in range(k)).capitalize() + ".")
    return " ".join(sents)


def build_corpus(root) -> tuple[dict, list[str]]:
    """Every source kind, with bad rows of every kind; returns (sources config, eval files)."""
    root.mkdir(parents=True, exist_ok=True)
    doc_a = prose(1, 300)
    near_a = doc_a.replace(doc_a.split()[150], "zebra", 1)
    giant = "\n".join(prose(100 + i, 60) for i in range(30))  # ~11k chars -> split at max_chars=5000
    leaked = prose(7, 150)
    lines = [
        json.dumps({"text": doc_a, "id": "doc-a"}).encode(),        # 0 kept
        b'{"text": "broken',                                         # 1 malformed_json
        b'{"text": "\xff\xfe bad bytes"}',                           # 2 invalid_utf8
        json.dumps({"content": prose(2)}).encode(),                 # 3 missing_text_field
        json.dumps({"text": 123}).encode(),                          # 4 non_string_text
        json.dumps({"text": " \n\t "}).encode(),                     # 5 empty_document
        json.dumps({"text": doc_a.upper(), "id": "doc-a-upper"}).encode(),  # 6 duplicate_exact (case-insensitive)
        json.dumps({"text": near_a, "id": 7}).encode(),              # 7 duplicate_near (a numeric id)
        json.dumps({"text": "Too short."}).encode(),                 # 8 filtered too_few_words
        json.dumps({"text": giant}).encode(),                        # 9 split into 3 pieces, all kept
        json.dumps({"text": prose(3) + " Write to jane@example.com now."}).encode(),  # 10 kept, PII
        b"[1, 2, 3]",                                                # 11 not_an_object
        json.dumps({"text": "x " * 20_000}).encode(),                # 12 line_too_long (> max_line_bytes)
        b"",                                                         # 13 blank: not a record
        json.dumps({"text": leaked}).encode(),                       # 14 decontaminated
        json.dumps({"text": prose(4), "id": 5}).encode(),           # 15 kept
    ]
    (root / "web").mkdir(exist_ok=True)
    (root / "web" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # gz with its trailer cut off: every line decompresses, then the stream ends early.
    gz = gzip.compress(b"\n".join(json.dumps({"text": prose(200 + i)}).encode() for i in range(10)) + b"\n")
    (root / "web" / "b.jsonl.gz").write_bytes(gz[:-8])
    zst = zstandard.ZstdCompressor().compress(
        b"\n".join(json.dumps({"text": prose(300 + i)}).encode() for i in range(5)) + b"\n")
    (root / "web" / "c.jsonl.zst").write_bytes(zst)
    # plain text, one document per file, one of them not UTF-8
    (root / "books").mkdir(exist_ok=True)
    (root / "books" / "one.txt").write_text(prose(400, 200))
    (root / "books" / "two.txt").write_text(prose(401, 200))
    (root / "books" / "three.txt").write_bytes(b"caf\xe9 latin-1 bytes " * 20)
    # parquet: a good file (one null), a file whose text column is not strings, a file that is not parquet
    (root / "pq").mkdir(exist_ok=True)
    pq.write_table(pa.table({"body": [prose(500), None, prose(501)]}), root / "pq" / "good.parquet")
    pq.write_table(pa.table({"body": [1, 2]}), root / "pq" / "ints.parquet")
    (root / "pq" / "zz_corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    # a Hugging Face `save_to_disk` folder (Arrow IPC stream + state.json), made without `datasets`
    hf = root / "hf"
    hf.mkdir(exist_ok=True)
    table = pa.table({"text": [prose(600 + i) for i in range(3)], "label": [0, 1, 0]})
    with pa.OSFile(str(hf / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (hf / "dataset_info.json").write_text("{}")
    (root / "eval.jsonl").write_text(json.dumps({"question": " ".join(leaked.split()[40:60])}) + "\n")
    sources = [
        {"name": "web", "path": str(root / "web"), "format": "jsonl", "id_field": "id"},
        {"name": "books", "path": str(root / "books" / "*.txt"), "format": "text"},
        {"name": "pq", "path": str(root / "pq"), "format": "parquet", "text_field": "body"},
        {"name": "hf", "path": str(hf), "format": "hf_disk"},
    ]
    return sources, [str(root / "eval.jsonl")]


EXPECTED = {
    # read = kept + duplicate_exact + duplicate_near + filtered + rejected, per source
    "web": {"read": 15 + 2 + 10 + 1 + 5, "kept": 1 + 3 + 1 + 1 + 10 + 5, "duplicate_exact": 1, "duplicate_near": 1,
            "filtered": {"too_few_words": 1, "decontaminated": 1},
            "rejected": {"malformed_json": 1, "invalid_utf8": 1, "missing_text_field": 1, "non_string_text": 1,
                         "empty_document": 1, "not_an_object": 1, "line_too_long": 1, "truncated_stream": 1}},
    "books": {"read": 3, "kept": 2, "duplicate_exact": 0, "duplicate_near": 0, "filtered": {},
              "rejected": {"invalid_utf8": 1}},
    "pq": {"read": 3 + 2 + 1, "kept": 2, "duplicate_exact": 0, "duplicate_near": 0, "filtered": {},
           "rejected": {"missing_text_field": 1, "non_string_text": 2, "unreadable_file": 1}},
    "hf": {"read": 3, "kept": 3, "duplicate_exact": 0, "duplicate_near": 0, "filtered": {}, "rejected": {}},
}


def _cfg(tmp_path, sources, evals, name, **over) -> PrepareDataConfig:
    data = {
        "run_name": name, "sources": sources, "storage": {"root": str(tmp_path / "out")},
        "clean": {"max_chars": 5000, "max_line_bytes": 20_000, "quality": {"min_words": 5}},
        "decontam": {"eval_files": evals, "ngram": 13},
        "tokenizer": {"vocab_size": 512, "sample_chars": 200_000},
        "pack": {"seq_len": 32, "validation_fraction": 0.2, "test_fraction": 0.15, "max_shard_bytes": 4096},
        "batch_size": 4, "ray": {"include_dashboard": False},
        **over,
    }
    return PrepareDataConfig.model_validate(data)


@pytest.fixture(scope="module")
def corrupted(ray_local, tmp_path_factory):
    from r1ray.data.pipeline import run

    tmp = tmp_path_factory.mktemp("corpus")
    sources, evals = build_corpus(tmp / "raw")
    uri = run(_cfg(tmp, sources, evals, "corrupted"))
    return tmp, sources, evals, uri


def test_counts_reconcile_per_source_with_exact_values(corrupted):
    _, _, _, uri = corrupted
    m = read_manifest(uri, stage="data")
    per = m["counts"]["per_source"]
    for name, want in EXPECTED.items():
        got = per[name]
        assert {k: got[k] for k in want} == want, name
        assert got["read"] == got["kept"] + got["duplicate_exact"] + got["duplicate_near"] + \
            sum(got["filtered"].values()) + sum(got["rejected"].values())
    assert per["web"]["documents_split"] == 1
    assert per["web"]["pii"] == {"email": 1}
    c = m["counts"]
    assert c["read"] == sum(v["read"] for v in EXPECTED.values())
    assert c["train_rows"] > 0 and c["validation_rows"] > 0 and c["test_rows"] > 0
    assert c["kept_validation"] > 0 and c["kept_test"] > 0
    # input hashes: every file read is listed with its SHA-256
    web_files = m["sources"][0]["files"]
    assert [f["path"].rsplit("/", 1)[1] for f in web_files] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in web_files)


def test_rejects_dataset_has_source_position_reason(corrupted):
    _, _, _, uri = corrupted
    m = read_manifest(uri)
    table = pa.concat_tables([pq.read_table(f"{uri}/{f['path']}") for f in m["rejects"]["files"]])
    rows = sorted(zip(table["source"].to_pylist(), table["position"].to_pylist(), table["reason"].to_pylist(),
                      strict=True))
    web = [(p, r) for s, p, r in rows if s == "web"]
    assert (1, "malformed_json") in web and (2, "invalid_utf8") in web and (12, "line_too_long") in web
    assert (10, "truncated_stream") in web  # b.jsonl.gz: all 10 lines read, then the cut
    assert ("pq", -1, "unreadable_file") in rows
    assert len(rows) == sum(sum(v["rejected"].values()) for v in EXPECTED.values())
    paths = table["path"].to_pylist()
    assert any(p.endswith("zz_corrupt.parquet") for p in paths)


def test_duplicates_dataset_lists_every_removed_document_once_with_what_it_duplicates(corrupted):
    _, _, _, uri = corrupted
    m = read_manifest(uri)
    table = pa.concat_tables([pq.read_table(f"{uri}/{f['path']}") for f in m["duplicates"]["files"]])
    rows = table.to_pylist()
    per = m["counts"]["per_source"]
    assert len(rows) == m["duplicates"]["rows"] == m["counts"]["duplicate_exact"] + m["counts"]["duplicate_near"]
    removed = [(r["source"], r["path"], r["position"], r["part"]) for r in rows]
    assert len(set(removed)) == len(removed)  # each removed document exactly once
    for name, c in per.items():
        mine = [r for r in rows if r["source"] == name]
        assert sum(r["kind"] == "exact" for r in mine) == c["duplicate_exact"]
        assert sum(r["kind"] == "near" for r in mine) == c["duplicate_near"]
        # kept + removed = read - quarantined (filtered and rejected)
        assert c["kept"] + len(mine) == c["read"] - sum(c["filtered"].values()) - sum(c["rejected"].values())
    by_pos = {(r["path"].rsplit("/", 1)[1], r["position"]): r for r in rows}
    exact, near = by_pos[("a.jsonl", 6)], by_pos[("a.jsonl", 7)]
    assert exact["kind"] == "exact" and exact["id"] == "doc-a-upper"
    assert (exact["kept_source"], exact["kept_path"].rsplit("/", 1)[1], exact["kept_position"], exact["kept_id"]) == \
        ("web", "a.jsonl", 0, "doc-a")
    assert exact["similarity_estimated"] == exact["similarity_verified"] == 1.0
    assert near["kind"] == "near" and near["id"] == "7" and near["kept_position"] == 0 and near["kept_id"] == "doc-a"
    assert near["matched_position"] == 0  # it matched the kept document itself
    # One word of 300 replaced: at most 5 of ~296 shingles differ.
    assert 0.96 <= near["similarity_verified"] < 1.0
    assert abs(near["similarity_estimated"] - near["similarity_verified"]) < 0.1
    assert m["dedup"]["verified_pairs"] >= 1


def test_artifact_follows_the_shard_contract(corrupted):
    _, _, _, uri = corrupted
    from r1ray.model.tokenizer import load_tokenizer

    art = DataArtifact.load(uri)
    assert art.seq_len == 32
    tok = load_tokenizer(art.tokenizer_dir)
    assert tok.convert_tokens_to_ids("<think>") != tok.unk_token_id and len(tok.tokenize("<answer>")) == 1
    total = 0
    for split in ("train", "validation", "test"):
        for info, shard_uri in zip(art.splits[split], art.shard_uris(split), strict=True):
            t = pq.read_table(shard_uri)
            assert t.schema.equals(SHARD_SCHEMA)
            ids = np.array(t["input_ids"].to_pylist())
            assert ids.shape == (info.rows, 32)
            total += info.rows
        assert len(art.splits["train"]) >= 2  # max_shard_bytes bounds the shard size
    assert total == art.rows("train") + art.rows("validation") + art.rows("test") and art.rows("test") > 0
    # PII never reaches the shards; the placeholder does
    text = "".join(tok.decode(pq.read_table(u)["input_ids"].to_pylist()[i]) for s in ("train", "validation", "test")
                   for u in art.shard_uris(s) for i in range(pq.read_table(u).num_rows))
    assert "jane@example.com" not in text and "<EMAIL>" in text
    assert "zebra" not in text  # the near-duplicate was dropped
    assert text.count(DOC_A_START) == 1


DOC_A_START = " ".join(prose(1, 300).split()[:6])


def test_same_input_and_seed_give_byte_identical_shards(corrupted, tmp_path):
    from r1ray.data.pipeline import run

    tmp, sources, evals, uri = corrupted
    again = run(_cfg(tmp, sources, evals, "corrupted-again"))
    a, b = read_manifest(uri), read_manifest(again)
    assert a["splits"] == b["splits"]  # paths, rows and sha256 of every shard
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    other = run(_cfg(tmp, sources, evals, "corrupted-seed1", seed=1))
    assert read_manifest(other)["splits"] != a["splits"]  # the seed moves the split


def test_a_file_read_in_line_ranges_gives_the_same_artifact(corrupted):
    """a.jsonl (~60 KB, bad rows, duplicates, a giant row) cut into ~4 KB ranges read by parallel tasks: the
    same shards, counts, input hashes, rejects and duplicates (positions are lines of the file) as read whole."""
    from r1ray.data.pipeline import run
    from r1ray.data.sources import plan

    tmp, sources, evals, uri = corrupted
    cfg = _cfg(tmp, sources, evals, "corrupted-ranges", read_chunk_bytes=4096)
    tasks, _ = plan(cfg.sources, chunk_bytes=cfg.read_chunk_bytes)
    assert sum(t.path.endswith("a.jsonl") for t in tasks) >= 4
    ranged = run(cfg)
    a, b = read_manifest(uri), read_manifest(ranged)
    assert a["splits"] == b["splits"] and a["counts"] == b["counts"] and a["sources"] == b["sources"]

    def rows(u, part):
        m = read_manifest(u)
        t = pa.concat_tables([pq.read_table(f"{u}/{f['path']}") for f in m[part]["files"]])
        return sorted(map(str, t.to_pylist()))

    assert rows(uri, "rejects") == rows(ranged, "rejects")
    assert rows(uri, "duplicates") == rows(ranged, "duplicates")


def test_near_dedup_on_the_cluster_decides_as_the_driver_does(corrupted):
    """dedup.cluster_above=0: band keys shuffled and pairs scored in Ray tasks; the same artifact (shards,
    counts, duplicates with their similarities) as matching on the driver."""
    from r1ray.data.pipeline import run

    tmp, sources, evals, uri = corrupted
    on_cluster = run(_cfg(tmp, sources, evals, "corrupted-cluster", dedup={"cluster_above": 0}))
    a, b = read_manifest(uri), read_manifest(on_cluster)
    assert a["dedup"]["near_matched_on"] == "driver" and b["dedup"]["near_matched_on"] == "cluster"
    assert b["dedup"]["cluster"]["tasks"] > 3 and a["counts"]["duplicate_near"] >= 1
    assert a["splits"] == b["splits"] and a["counts"] == b["counts"]
    for key in ("candidates", "verified_pairs"):
        assert a["dedup"][key] == b["dedup"][key]

    def rows(u):
        m = read_manifest(u)
        return pa.concat_tables([pq.read_table(f"{u}/{f['path']}") for f in m["duplicates"]["files"]]).to_pylist()

    assert rows(uri) == rows(on_cluster)


def test_mixing_weights_reach_their_token_share(ray_local, tmp_path, tiny_tokenizer_dir):
    from r1ray.data.pipeline import run

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "a.jsonl").write_text("\n".join(json.dumps({"text": prose(1000 + i, 100)}) for i in range(300)))
    (tmp_path / "b" / "b.jsonl").write_text("\n".join(json.dumps({"text": prose(5000 + i, 100)}) for i in range(100)))
    sources = [{"name": "a", "path": str(tmp_path / "a"), "weight": 0.3},
               {"name": "b", "path": str(tmp_path / "b"), "weight": 0.7}]
    cfg = _cfg(tmp_path, sources, [], "mixed", tokenizer={"path": str(tiny_tokenizer_dir)}, batch_size=64)
    m = read_manifest(run(cfg))
    share = m["mixing"]["realized_train_share"]
    print("mixing:", m["mixing"])
    assert share["b"] == pytest.approx(0.7, abs=0.04) and share["a"] == pytest.approx(0.3, abs=0.04)
    per = m["counts"]["per_source"]
    assert per["b"]["repeats"] > 0  # b (25% of the natural tokens) is upsampled
    assert per["a"]["filtered"].get("mixing", 0) > 0  # a is downsampled
    for name in ("a", "b"):
        p = per[name]
        assert p["read"] == p["kept"] + p["duplicate_exact"] + p["duplicate_near"] + sum(p["filtered"].values())
    assert m["tokenizer"]["trained"] is False and m["tokenizer"]["loaded_from"] == str(tiny_tokenizer_dir)


def test_missing_source_path_fails_clearly_before_work(ray_local, tmp_path):
    from r1ray.data.pipeline import run

    cfg = _cfg(tmp_path, [{"name": "gone", "path": str(tmp_path / "nope.jsonl")}], [], "missing")
    with pytest.raises(ValueError, match=r"sources\[0\] \(gone\): no files found"):
        run(cfg)


def test_c4_rules_and_language_filter_apply_to_the_sources_that_ask(ray_local, tmp_path, tiny_tokenizer_dir):
    from r1ray.data.pipeline import run
    from r1ray.model.tokenizer import load_tokenizer

    page = "\n".join([prose(900 + i, 20) for i in range(4)] + ["Please enable JavaScript to view this page."])
    code_page = prose(950) + " function f() { return 1; }"
    for name in ("web", "plain"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.jsonl").write_text(
            "\n".join(json.dumps({"text": t}) for t in (page, code_page)) + "\n")
    (tmp_path / "multi").mkdir()
    french = ("Le comité s'est réuni mardi pour examiner la proposition de nouvelle bibliothèque. Plusieurs "
              "membres ont exprimé des inquiétudes au sujet du budget, tandis que d'autres ont défendu le projet.")
    (tmp_path / "multi" / "a.jsonl").write_text(json.dumps({"text": prose(960, 60)}) + "\n" +
                                                json.dumps({"text": french}) + "\n")
    sources = [{"name": "web", "path": str(tmp_path / "web"), "c4_rules": True},
               {"name": "plain", "path": str(tmp_path / "plain")},
               {"name": "multi", "path": str(tmp_path / "multi"), "languages": ["en"]}]
    cfg = _cfg(tmp_path, sources, [], "c4", tokenizer={"path": str(tiny_tokenizer_dir)},
               dedup={"exact": False, "near": False})
    uri = run(cfg)
    per = read_manifest(uri)["counts"]["per_source"]
    assert per["web"]["filtered"] == {"c4_curly_bracket": 1} and per["web"]["changed"].get("c4_lines") == 1
    assert per["plain"]["filtered"] == {} and "c4_lines" not in per["plain"]["changed"]
    assert per["multi"]["filtered"] == {"language": 1} and per["multi"]["kept"] == 1
    art = DataArtifact.load(uri)
    tok = load_tokenizer(art.tokenizer_dir)
    text = "".join(tok.decode(r) for s in ("train", "validation", "test") for u in art.shard_uris(s)
                   for r in pq.read_table(u)["input_ids"].to_pylist())
    assert text.count("JavaScript") == 1 and text.count("return 1") == 1  # only the plain source's copies
    assert "comité" not in text
