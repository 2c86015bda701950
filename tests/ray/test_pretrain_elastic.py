"""Elastic training on a simulated 3-node cluster (``ray.cluster_utils.Cluster``): 2 -> 1 -> 2 workers, and a
preemption notice.

Two nodes each offer one ``trainer`` slot. Mid-run one node gets a preemption notice (a drain with a deadline,
what a spot reclaim or the autoscaler sends): the workers save a just-in-time checkpoint between two regular
ones and go on training. The node is then removed (its worker dies): Ray Train's elastic group restarts with
ONE worker from that checkpoint or a later one (DeepSpeed's universal conversion reshards the ZeRO-2 optimizer
state). The node is then added back and the group grows to TWO workers again. The run completes with every
sample trained exactly once across the three world sizes.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from r1ray.config import load_config
from r1ray.train.stages.pretrain import PretrainConfig

pytestmark = pytest.mark.slow


def _records(run_dir: Path) -> dict[str, list[tuple[int, int, list[int]]]]:
    out: dict[str, list[tuple[int, int, list[int]]]] = {}
    for f in (run_dir / "samples").glob("*.txt"):
        attempt = f.name.split("-")[0]
        for line in f.read_text().splitlines():
            step, world, *idx = (int(x) for x in line.split())
            out.setdefault(attempt, []).append((step, world, idx))
    return out


def _worlds_seen(run_dir: Path) -> list[int]:
    """World size of each attempt, in the order the attempts started."""
    return [recs[0][1] for recs in _attempts(run_dir)]


def _attempts(run_dir: Path) -> list[list[tuple[int, int, list[int]]]]:
    """Each attempt's records, attempts ordered by their first step (then by when their files last changed)."""
    if not (run_dir / "samples").exists():
        return []
    recs = _records(run_dir)
    mtime = {a: max(f.stat().st_mtime for f in (run_dir / "samples").glob(f"{a}-*.txt")) for a in recs}
    return [recs[a] for a in sorted(recs, key=lambda a: (min(s for s, _, _ in recs[a]), mtime[a]))]


def _jit_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints saved for a preemption notice (``preemption_checkpoint`` in their
    trainer state) rather than on the ``checkpoint.every`` cadence."""
    steps = []
    for done in run_dir.glob("checkpoint_0*/r1ray_complete.json"):
        try:
            state = json.loads((done.parent / "trainer_state.json").read_text())
        except FileNotFoundError:  # an older checkpoint Ray Train is removing (checkpoint.keep=2)
            continue
        if state["metrics"].get("preemption_checkpoint"):
            steps.append(state["step"])
    return sorted(steps)


def _drain(address: str, node_id: str, seconds: int) -> None:
    """A preemption notice for ``node_id``, as Ray's autoscaler sends one (``ray drain-node`` does the same)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    ok, why = ray._raylet.GcsClient(address=address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot reclaim (test)",
        int(time.time() * 1000) + seconds * 1000)
    assert ok, why


def _wait(pred, timeout: float, what: str) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(1.0)


def test_two_to_one_to_two_workers(tiny_tokenizer_dir, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from r1ray.data.synthetic_shards import write_data_artifact
    from r1ray.train.stages.pretrain import run

    data = write_data_artifact(tmp_path / "data", tiny_tokenizer_dir, seq_len=32)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    ray.init(address=cluster.address, logging_level="WARNING")
    # 56 steps: before the preemption notice the 1-worker group ran steps 5-17 before the group grew back (23 to
    # spare at 40 steps); the notice, its checkpoint and the 5 s wait now take ~10 steps more before the node goes,
    # and at 40 steps one local run in seven failed, 12 s sooner than a pass: most likely it ended on 1 worker
    max_steps = 56
    cfg = load_config(PretrainConfig, [
        f"data.path={data}", f"storage.root={tmp_path}", f"data.cache_dir={tmp_path}/cache", "run_name=elastic",
        "model.preset=debug", f"train.max_steps={max_steps}", "train.global_batch_size=16",
        "train.micro_batch_size=4", "train.eval_every=0", "train.log_every=1", "checkpoint.every=4",
        "checkpoint.keep=2", "deepspeed.zero_stage=2", "scaling.num_workers=[1,2]",
        "scaling.resources_per_worker={trainer: 1}", "train.elastic_resize_interval_s=5",
        "faults.record_samples=true", "faults.step_delay_s=0.5", "train.max_failures=5",
        "logging.wandb.mode=disabled", "data.validate_with_ray_data=false",
    ])
    run_dir = Path(cfg.run_dir)
    box: dict = {}

    def target():
        try:
            box["result"] = run(cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    try:
        th.start()
        # 1. two workers train and checkpoint
        # (two checkpoints: Ray Train may resume one checkpoint back after a resize, see STACK.md)
        _wait(lambda: len(list(run_dir.glob("checkpoint_0*/r1ray_complete.json"))) >= 2
              and _worlds_seen(run_dir)[:1] == [2], 600, "two checkpoints from 2 workers")
        # 2. a preemption notice: a just-in-time checkpoint off the every-4 cadence, and training goes on
        _drain(cluster.address, nodes[1].node_id, seconds=60)
        _wait(lambda: _jit_checkpoints(run_dir), 120, "a checkpoint for the preemption notice")
        jit = _jit_checkpoints(run_dir)[0]
        time.sleep(5)  # Ray Train registers a report at its next health check (2 s): past it, the checkpoint is known
        # 3. the node goes: the group restarts with one worker
        cluster.remove_node(nodes[1])
        _wait(lambda: any(len({s for s, w, _ in a if w == 1}) >= 3 for a in _attempts(run_dir)), 600,
              "three steps on 1 worker")
        # 4. capacity returns: the group grows back to two workers
        cluster.add_node(num_cpus=1, resources={"trainer": 1})
        th.join(timeout=900)
        assert not th.is_alive(), "the run did not finish"
        if "error" in box:
            raise box["error"]
        r = box["result"]
        assert r.status == "completed" and r.steps == max_steps and r.samples_consumed == max_steps * 16
        worlds = _worlds_seen(run_dir)
        assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds
        # the 1-worker and the final 2-worker groups resumed from checkpoints (not from scratch)
        starts = [(min(s for s, _, _ in a), a[0][1]) for a in _attempts(run_dir)]
        assert any(w == 1 and s > 1 for s, w in starts) and starts[-1][0] > 1, starts
        # the notice's checkpoint (off the every-4 cadence, or on it when the notice came at such a step) was
        # not lost: the 1-worker group started past it
        assert any(w == 1 and s > jit for s, w in starts), (jit, starts)
        # exactly once: each step's samples from the newest attempt that ran it
        per_step: dict[int, list[int]] = {}
        for recs in _attempts(run_dir):
            seen: dict[int, list[int]] = {}
            for step, _, idx in recs:
                seen.setdefault(step, []).extend(idx)
            per_step.update(seen)
        assert sorted(per_step) == list(range(1, max_steps + 1))
        assert sorted(i for v in per_step.values() for i in v) == list(range(max_steps * 16))
    finally:
        ray.shutdown()
        cluster.shutdown()
