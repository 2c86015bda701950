"""Near-dedup on a simulated two-node cluster decides exactly as the driver does.

The test runs this file as a script in a subprocess: it starts a two-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``: two raylets of one CPU each), runs the data stage on a labelled corpus of
near-duplicates twice (near-dedup on the driver, then as Ray tasks with ``dedup.cluster_above=0``) and
prints what the test compares. Its own process: the session's shared local Ray must not be its head.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main(work: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    import r1ray.data.dedup_cluster
    import r1ray.data.staging
    from r1ray.artifacts import read_manifest
    from r1ray.data.config import PrepareDataConfig
    from r1ray.data.pipeline import run
    from r1ray.data.synthetic import labelled_near_duplicates, score

    r1ray.data.staging.STAGE_ROWS = 20  # ~16 staged files: several map tasks and scoring ranges
    r1ray.data.dedup_cluster._SHUFFLE_BYTES_PER_ROUND = 24 * 500 * 5  # ~5 bands a round: several rounds
    lab = labelled_near_duplicates(250, seed=3)
    corpus = work / "corpus"
    corpus.mkdir(parents=True)
    with open(corpus / "docs.jsonl", "w") as f:
        for i, t in enumerate(lab.texts):
            f.write(json.dumps({"text": t, "id": str(i)}) + "\n")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2

        def stage(name: str, cluster_above: int) -> str:
            return run(PrepareDataConfig.model_validate({
                "run_name": name, "storage": {"root": str(work / "out")},
                # small read ranges: several read tasks, spread over both nodes
                "sources": [{"name": "syn", "path": str(corpus), "quality_filters": False, "id_field": "id"}],
                "read_chunk_bytes": 16384, "batch_size": 32,
                "tokenizer": {"vocab_size": 512, "sample_chars": 100_000},
                "dedup": {"cluster_above": cluster_above},
            }))

        driver, on_cluster = stage("driver", 10**9), stage("cluster", 0)

        def removed(uri: str) -> tuple[list, np.ndarray]:
            m = read_manifest(uri)
            t = pa.concat_tables([pq.read_table(f"{uri}/{f['path']}") for f in m["duplicates"]["files"]])
            mask = np.zeros(len(lab.texts), dtype=bool)
            mask[[int(i) for i in t["id"].to_pylist()]] = True
            return t.to_pylist(), mask

        rows_d, mask_d = removed(driver)
        rows_c, mask_c = removed(on_cluster)
        md, mc = read_manifest(driver), read_manifest(on_cluster)
        print(json.dumps({
            "same_duplicates": rows_d == rows_c, "same_splits": md["splits"] == mc["splits"],
            "same_counts": md["counts"] == mc["counts"], "removed": int(mask_d.sum()),
            "dedup_driver": md["dedup"], "dedup_cluster": mc["dedup"],
            "score": score(mask_c, lab.is_duplicate),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_cluster_near_dedup_equals_the_driver_on_two_nodes(tmp_path):
    out = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["dedup_driver"]["near_matched_on"] == "driver"
    assert res["dedup_cluster"]["near_matched_on"] == "cluster"
    assert res["dedup_cluster"]["cluster"]["nodes"] == 2  # tasks ran on both raylets
    stats = res["dedup_cluster"]["cluster"]
    assert stats["rounds"] >= 5 and stats["tasks"] >= stats["rounds"] * (4 + 4)  # 4 reduces, a map per staged file
    assert res["same_duplicates"] and res["same_splits"] and res["same_counts"]
    assert res["dedup_driver"]["candidates"] == res["dedup_cluster"]["candidates"] > 0
    assert res["removed"] > 100  # the corpus holds ~370 copies, most at Jaccard >= 0.8
    assert res["score"]["precision"] == 1.0 and res["score"]["recall"] >= 0.97


if __name__ == "__main__":
    main(Path(sys.argv[1]))
