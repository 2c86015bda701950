"""GRPO on a real local Ray: a real engine pool, real reward tasks (sandboxed), real Ray Train + DeepSpeed.

The policy is a tiny random Llama (debug preset) and the reward is ``tag_count`` (0.25 per reasoning tag
present once): learnable in a few steps from nothing, so the mean reward must rise. The fault test SIGKILLs
the learner after a step AND a rollout engine in the middle of another step's rollouts, and grows and shrinks
the rollout pool while the learner keeps going; the final export must equal the uninterrupted run's, byte
for byte.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from r1ray.config import load_config
from r1ray.testing.runs import grpo_rollouts
from r1ray.train.stages.grpo.stage import GRPOConfig
from tests.helpers import save_tiny_model

RAY_NUM_CPUS = 4  # 1 learner + 1 engine + reward tasks, with room to spare

BASE = [
    "train.max_steps=10", "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_every=0",
    "train.log_every=2", "checkpoint.every=2", "checkpoint.keep=2", "optim.lr=0.02", "optim.warmup_steps=0",
    "optim.schedule=constant", "deepspeed.zero_stage=2", "scaling.num_workers=1", "logging.wandb.mode=disabled",
    "grpo.group_size=8", "grpo.rewards={tag_count: 1.0}", "grpo.max_completion_tokens=24", "grpo.eval_problems=8",
    "grpo.temperature=1.0", "grpo.loss_type=dapo", "ray.include_dashboard=false",
    # one level for every prompt, evaluated alone (the default mixes levels 1-3 and evaluates 1 and 2 besides)
    "curriculum=null", "grpo.difficulty=1", "grpo.eval_difficulties=[]",
]


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    return save_tiny_model(tiny_tokenizer_dir, tmp_path_factory.mktemp("grpo") / "policy", max_positions=512, seed=3)


def make_cfg(model_dir: str, root: Path, *extra: str) -> GRPOConfig:
    return load_config(GRPOConfig, [*BASE, f"model.init_from={model_dir}", f"storage.root={root}", *extra])


def test_config_errors_name_the_field(model_dir, tmp_path):
    from r1ray.train.stages.grpo.stage import GRPOStage

    with pytest.raises(ValueError, match="grpo.tasks"):
        make_cfg(model_dir, tmp_path, "grpo.tasks={}")
    with pytest.raises(ValueError, match="grpo.tis_cap with grpo.top_p=0.9"):
        make_cfg(model_dir, tmp_path, "grpo.tis_cap=2.0", "grpo.top_p=0.9")
    with pytest.raises(ValueError, match="grpo.advantage_estimator='ppo': expected one of"):
        make_cfg(model_dir, tmp_path, "grpo.advantage_estimator=ppo")
    with pytest.raises(ValueError, match="model.init_from"):
        GRPOStage.plan(load_config(GRPOConfig, [*BASE, f"storage.root={tmp_path}"]))
    with pytest.raises(ValueError, match="unknown reward"):
        GRPOStage.plan(make_cfg(model_dir, tmp_path, "grpo.rewards={nope: 1.0}"))
    with pytest.raises(ValueError, match=r"grpo.steps_per_generation=3: each of the 1 worker\(s\) has 2 micro-batch"):
        make_cfg(model_dir, tmp_path, "grpo.steps_per_generation=3")


def test_step_inputs_drop_and_count_zero_variance_groups(ray_local, model_dir, tmp_path):
    """One step of the stage in this process against a real pool and real reward tasks: groups whose rewards
    all agree are counted, refilled from problems outside the cursor's range, and what stays zero-variance
    carries no weight; beta = 0 builds no reference model, beta > 0 builds one."""
    import numpy as np
    import torch

    from r1ray.model.tokenizer import load_tokenizer
    from r1ray.train.stage import Metrics, WorkerInfo
    from r1ray.train.stages.grpo.stage import GRPOStage

    cfg = make_cfg(model_dir, tmp_path, "grpo.dynamic_sampling=true", "grpo.max_refill_rounds=1",
                   "grpo.train_problems=1000", "grpo.max_completion_tokens=6", "grpo.group_size=4")
    assert GRPOStage(cfg).frozen_models() == {}
    ref_stage = GRPOStage(make_cfg(model_dir, tmp_path, "grpo.beta=0.1"))
    ref_stage.tokenizer = load_tokenizer(model_dir)
    assert list(ref_stage.frozen_models()) == ["ref"]

    with GRPOStage.resources(cfg, str(tmp_path / "run")) as res:
        stage = GRPOStage(cfg)
        stage.worker = WorkerInfo(0, 1, 0, False, torch.device("cpu"))
        stage.setup(stage.worker, res)
        model = stage.build_model()
        rows = [np.array([5, 17]), np.array([42, 99])]
        inputs = stage.step_inputs(0, rows, model)
        again = stage.step_inputs(0, rows, model)  # same step, same weights: the same rollouts
        stats = inputs.metrics.local()
        assert len(inputs.updates) == 1 and len(inputs.updates[0]) == 2
        for a, b in zip(inputs.updates[0], again.updates[0], strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["mask"], b["mask"])
        recs = [json.loads(x) for x in Path(tmp_path, "run", "grpo", "rollouts-rank0.jsonl").read_text().splitlines()]
        assert recs[0]["completion_hash"] == recs[1]["completion_hash"]
        # a random policy rarely writes a tag in 6 tokens: most groups of 4 are all-zero
        assert stats["frac_zero_variance_groups"] > 0
        dropped = stats.get("dropped_groups", 0.0)
        kept_groups = 0
        for b in inputs.updates[0]:
            per_group = b["mask"].reshape(-1, 4, b["mask"].shape[-1]).sum(dim=(1, 2))  # zero groups may be absent
            kept_groups += int((per_group > 0).sum())
            assert b["weight"] == float(b["mask"].sum())  # dapo: kept tokens
        assert kept_groups + dropped == 4
        assert stats["frac_zero_variance_groups"] * 4 >= dropped
        # the loss of a micro-batch whose groups were all dropped is exactly 0 but still backpropagates
        for b in inputs.updates[0]:
            loss = stage.loss(model, b, Metrics())
            if b["weight"] == 0:
                assert loss.item() == 0.0
            loss.backward()
        assert stage.pool.stats()["version"] == 0


ASYNC = ("grpo.async_rollouts=true", "train.max_steps=8", "grpo.tis_cap=2.0")
"""Async rollouts, with truncated importance sampling: the saved rollouts carry the engines' logprobs."""


@pytest.fixture(scope="module")
def sync_ref(ray_local, model_dir, tmp_path_factory):
    """The uninterrupted on-policy run the fault tests compare with (shared: one run for every test)."""
    from r1ray.train.stages.grpo.stage import run

    return run(make_cfg(model_dir, tmp_path_factory.mktemp("ref"), "run_name=ref"))


@pytest.fixture(scope="module")
def async_ref(ray_local, model_dir, tmp_path_factory):
    from r1ray.train.stages.grpo.stage import run

    return run(make_cfg(model_dir, tmp_path_factory.mktemp("aref"), "run_name=aref", *ASYNC))


def test_mean_reward_rises_and_learner_and_engine_sigkills_leave_the_export_bitwise_equal(
        ray_local, model_dir, tmp_path_factory, sync_ref):
    from r1ray.train.stages.grpo.stage import run

    ref = sync_ref
    assert ref.status == "completed" and ref.steps == 10 and ref.export_path
    steps = grpo_rollouts(ref.run_dir)
    early = sum(steps[s]["reward_mean"] for s in (1, 2)) / 2
    late = sum(steps[s]["reward_mean"] for s in (9, 10)) / 2
    assert late > early + 0.1, [steps[s]["reward_mean"] for s in sorted(steps)]
    assert "accuracy" in ref.metrics and "kl" not in steps[10]  # beta = 0: no reference, no KL

    # The faulted run also has its rollout pool grown to 2 engines after step 1 and shrunk back to 1 after
    # step 7, from another thread, while the learner keeps going.
    root = tmp_path_factory.mktemp("faulted")
    resizer = PoolResizer(root / "runs" / "faulted", "r1ray-grpo-faulted-", [(1, 2), (7, 1)])
    resizer.start()
    faulted = run(make_cfg(model_dir, root, "run_name=faulted", "faults.kill_at_step=3",
                           "grpo.kill_pool_controller_at_step=5", "grpo.kill_engine_at_step=6"))
    resizer.join(timeout=60)
    assert not resizer.errors, resizer.errors
    assert [(n, got) for n, got, _ in resizer.done] == [(2, 2), (1, 1)]
    assert all(at < 10 for _, _, at in resizer.done)  # resized during the run, at a step before the last
    assert faulted.status == "completed" and faulted.restarts == 1
    fsteps = grpo_rollouts(faulted.run_dir)
    assert fsteps[10]["engine_replacements"] >= 1
    assert fsteps[5]["pool_controller_restarts"] == 1  # the controller died mid-rollout and came back
    assert [fsteps[s]["completion_hash"] for s in range(1, 11)] == [steps[s]["completion_hash"] for s in range(1, 11)]
    a = Path(ref.export_path, "model.safetensors").read_bytes()
    b = Path(faulted.export_path, "model.safetensors").read_bytes()
    assert a == b


def test_async_rollouts_overlap_and_a_sigkill_or_a_new_worker_count_resume_them_exactly(
        ray_local, model_dir, tmp_path_factory, async_ref):
    """grpo.async_rollouts: step s's rollouts come from the weights of step s - 1 (generated while step s - 1
    learned); the rollouts in flight at a checkpoint are saved in it, so a run stopped after step 4 on one worker
    and resumed on two generates nothing for step 5 (it takes the saved rollouts: the same completions). Learner
    SIGKILLs in async mode: the chaos test below, against this module's uninterrupted async run."""
    from r1ray.train.stages.grpo.stage import run

    # with truncated importance sampling: the saved rollouts carry the engines' logprobs, which the resumes reuse
    extra = ASYNC
    ref = async_ref
    assert ref.status == "completed" and ref.steps == 8
    steps = grpo_rollouts(ref.run_dir)
    # record k is step k - 1's: generated by version k - 2 (step 0's by the initial weights)
    assert [steps[k]["rollout_version"] for k in range(1, 9)] == [0, 0, 1, 2, 3, 4, 5, 6]
    assert all("rollout_wait_seconds" in steps[k] for k in range(2, 9))
    early = sum(steps[s]["reward_mean"] for s in (1, 2)) / 2
    late = sum(steps[s]["reward_mean"] for s in (7, 8)) / 2
    assert late > early + 0.05, [steps[s]["reward_mean"] for s in sorted(steps)]

    # (a learner SIGKILLed mid-run resumes to the same completions and export: the chaos test below, async mode,
    # kills every kind of process at random moments, the learner included, and compares with this run)
    root = tmp_path_factory.mktemp("aworkers")
    first = run(make_cfg(model_dir, root, "run_name=aw", "train.stop_after_steps=4", "checkpoint.every=4", *extra))
    assert first.status == "stopped" and first.steps == 4
    state = json.loads(Path(first.checkpoint, "trainer_state.json").read_text())
    pending = state["stage_state"]["pending_rollouts"]
    assert pending["step"] == 4 and pending["version"] == 3 and len(pending["groups"]) == 8
    assert all(len(c["logprobs"]) == len(c["token_ids"]) for d in pending["groups"] for c in d["completions"])
    second = run(make_cfg(model_dir, root, "run_name=aw", "scaling.num_workers=2", "train.stop_after_steps=5",
                          "checkpoint.every=4", *extra))
    assert second.steps == 5 and second.world_size == 2
    wsteps = grpo_rollouts(second.run_dir)
    assert wsteps[5]["rollout_version"] == 3
    # the saved rollouts are the ones the uninterrupted run trained on at step 5 (its hash of every token) ...
    saved_tokens = [c["token_ids"] for d in pending["groups"] for c in d["completions"]]
    assert hashlib.sha256(json.dumps(saved_tokens).encode()).hexdigest()[:16] == steps[5]["completion_hash"]
    # ... and the 2-worker resume trained on them (rank 0's first group, as its record shows it)
    saved = {d["index"]: d["completions"] for d in pending["groups"]}
    sample = wsteps[5]["sample"]
    assert sample["completion"] == saved[sample["index"]][0]["text"]


class PoolResizer(threading.Thread):
    """Resizes the run's engine pool (found by its name prefix) to ``n`` once the run has logged ``step``."""

    def __init__(self, run_dir: Path, prefix: str, plan: list[tuple[int, int]]):
        super().__init__(daemon=True)
        self.run_dir, self.prefix, self.plan = run_dir, prefix, plan
        self.done: list[tuple[int, int, int]] = []  # (asked, size returned, last logged step at the time)
        self.errors: list[str] = []

    def last_step(self) -> int:
        f = self.run_dir / "grpo" / "rollouts-rank0.jsonl"
        lines = f.read_text().splitlines() if f.exists() else []
        return max((json.loads(line)["step"] for line in lines), default=0)

    def run(self) -> None:
        import ray

        from r1ray.infer.pool import NAMESPACE, EnginePool

        try:
            for step, n in self.plan:
                deadline = time.monotonic() + 300
                while self.last_step() < step:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"step {step} never logged")
                    time.sleep(0.2)
                names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["namespace"] == NAMESPACE and a["name"].startswith(self.prefix)]
                self.done.append((n, EnginePool.connect(names[0]).resize(n), self.last_step()))
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))


def test_mu2_with_reference_and_zero3_sync(ray_local, model_dir, tmp_path):
    """beta > 0, mu = 2 and steps_per_generation = 2 in this process: the step's two micro-batches become two
    updates of one (consecutive slices), passed over twice, old and reference logprobs attached, KL 0 against an
    identical reference; after an update on the first slice, the second slice's ratio has left 1 (where the clip
    acts). Then a real 2-worker ZeRO-3 run of that config through the loop and DeepSpeed (4 updates a step, each
    worker's accumulation one micro-batch), whose weight sync gathers the partitioned parameters on every rank
    once a step, after the last update (the engines get each step's weights)."""
    import numpy as np
    import torch

    from r1ray.train.stage import Metrics, WorkerInfo
    from r1ray.train.stages.grpo.stage import GRPOStage, run

    extra = ("grpo.beta=0.1", "grpo.mu=2", "grpo.steps_per_generation=2", "grpo.max_completion_tokens=8",
             "train.max_steps=2", "grpo.loss_type=grpo")
    cfg = make_cfg(model_dir, tmp_path, *extra)
    with GRPOStage.resources(cfg, str(tmp_path / "local")) as res:
        stage = GRPOStage(cfg)
        stage.worker = WorkerInfo(0, 1, 0, False, torch.device("cpu"))
        stage.setup(stage.worker, res)
        model = stage.build_model()
        stage.frozen = stage.frozen_models()
        inputs = stage.step_inputs(0, [np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])], model)
        assert stage.update_slices() == 2 and [len(u) for u in inputs.updates] == [1, 1, 1, 1]
        assert inputs.updates[0] is inputs.updates[2] and inputs.updates[0][0] is not inputs.updates[1][0]
        b, second = inputs.updates[0][0], inputs.updates[1][0]
        assert "old_logp" in b and "ref_logp" in b
        m = Metrics()
        loss = stage.loss(model, b, m)
        stats = m.local()
        assert stats["kl"] == pytest.approx(0.0, abs=1e-6) and stats["clip_fraction"] == 0.0
        assert stats["entropy"] > 0 and torch.isfinite(loss)
        # one real update on the first micro-batch (advantages set so it carries a gradient): the second update's
        # ratio against the old logprobs has left 1, which is where the clip can act
        b["advantages"] = torch.linspace(-1.0, 1.0, b["advantages"].numel())
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        stage.loss(model, b, Metrics()).backward()
        opt.step()
        m2 = Metrics()
        stage.loss(model, b, m2)
        assert m2.local()["ratio_abs_dev"] > 1e-3 and m2.local()["kl"] > 0
        m3 = Metrics()
        stage.loss(model, second, m3)  # the second slice, never trained on, against the policy that sampled it
        assert "old_logp" in second and m3.local()["ratio_abs_dev"] > 1e-3

    # truncated importance sampling at temperature 0.7: the engine's logprobs of what it sampled, at the
    # sampling temperature, equal the learner's to float rounding (same weights, same CPU numerics)
    cfg = make_cfg(model_dir, tmp_path, "grpo.tis_cap=2.0", "grpo.temperature=0.7", "grpo.max_completion_tokens=8")
    with GRPOStage.resources(cfg, str(tmp_path / "tis")) as res:
        stage = GRPOStage(cfg)
        stage.worker = WorkerInfo(0, 1, 0, False, torch.device("cpu"))
        stage.setup(stage.worker, res)
        model = stage.build_model()
        inputs = stage.step_inputs(0, [np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])], model)
        b = inputs.updates[0][0]
        m = Metrics()
        stage.loss(model, b, m)
        stats = m.local()
        assert b["sampling_logp"].shape == b["mask"].shape and (b["sampling_logp"] * b["mask"]).sum() < 0
        assert stats["engine_logp_abs_diff"] < 1e-4, stats
        assert stats["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4) and stats["tis_capped_fraction"] == 0.0

    # two learner workers: ZeRO-3 partitions really are partial, both ranks generate concurrently
    result = run(make_cfg(model_dir, tmp_path, *extra, "deepspeed.zero_stage=3", "run_name=zero3",
                          "scaling.num_workers=2", "train.micro_batch_size=2"))
    assert result.status == "completed" and result.steps == 2 and result.world_size == 2
    steps = grpo_rollouts(result.run_dir)
    assert [steps[s]["weights_version"] for s in (1, 2)] == [0, 1]


@pytest.mark.parametrize("loss_type,estimator", [("dapo", "grpo"), ("grpo", "rloo"), ("dr_grpo", "reinforce_pp")])
def test_one_update_is_the_same_whatever_the_micro_batch_split(ray_local, model_dir, tmp_path, loss_type, estimator):
    """The loop's update is (sum of the micro-batches' loss sums) / (sum of their weights), over every worker: the
    same step's 8 prompts as 2 micro-batches of 4, 4 of 2 or 8 of 1 (also how 2 or 4 workers would hold them) give
    the same gradient, for each normalisation and advantage estimator; and computing the zero-variance groups
    (``grpo.skip_zero_variance=false``) gives the same gradient as leaving them out of the forward (the default)."""
    import numpy as np
    import torch

    from r1ray.train.stage import Metrics, WorkerInfo
    from r1ray.train.stages.grpo.stage import GRPOStage

    cfg = make_cfg(model_dir, tmp_path, f"grpo.loss_type={loss_type}", f"grpo.advantage_estimator={estimator}",
                   "grpo.max_completion_tokens=8", "grpo.group_size=4")
    with GRPOStage.resources(cfg, str(tmp_path / "split")) as res:
        stage = GRPOStage(cfg)
        stage.worker = WorkerInfo(0, 1, 0, False, torch.device("cpu"))
        stage.setup(stage.worker, res)
        model = stage.build_model()
        collect = stage.rollouts._collect

        def varied(units, ref, t0, times):  # a reward of the completion that varies within a group (a random
            collect(units, ref, t0, times)  # policy rarely writes a tag in 8 tokens): distinct tokens, mod 3
            for unit in units:
                for grp in unit:  # every third problem's group is solved by all its completions: advantage 0
                    grp.rewards = [1.0 if grp.index % 3 == 0 else float(len(set(c.token_ids)) % 3)
                                   for c in grp.completions]

        stage.rollouts._collect = varied
        problems = np.arange(8)
        grads, rows = [], []
        computed = make_cfg(model_dir, tmp_path, f"grpo.loss_type={loss_type}", f"grpo.advantage_estimator={estimator}",
                            "grpo.max_completion_tokens=8", "grpo.group_size=4", "grpo.skip_zero_variance=false")
        for per, stage.cfg in ((4, cfg), (2, cfg), (1, cfg), (4, computed), (1, computed)):
            inputs = stage.step_inputs(0, [problems[i:i + per] for i in range(0, 8, per)], model)
            batches = inputs.updates[0]
            rows.append(sum(int(b["mask"].shape[0]) for b in batches))
            total = sum(stage.batch_weight(b) for b in batches)
            model.zero_grad()
            for b in batches:
                (stage.loss(model, b, Metrics()) / total).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
        assert grads[0].abs().sum() > 0  # the rewards differ within groups: there is a gradient to compare
        for g in grads[1:]:
            torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)
        # problems 0, 3 and 6 (at least) were left out of the forward (a micro-batch of zero-variance groups
        # only keeps one, so 4 of 2 compute at least as many as 2 of 4); computed, every group is there
        assert rows[0] <= rows[1] <= 5 * 4 and rows[2:] == [8 * 4] * 3, rows


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_random_sigkills_of_learners_engines_and_controllers_change_nothing(
        ray_local, model_dir, tmp_path_factory, sync_ref, async_ref, mode):
    """Chaos: while a run goes, SIGKILL random processes (a learner rank, a rollout engine, the engine pool's
    controller, Ray Train's controller; 10 per run, from the first completed step on) at random moments, from
    outside the run, by PID.
    The run completes with the uninterrupted run's
    completions at every step (every sample trained once, on the same rollouts) and a byte-identical export, and
    leaves no engine or controller process behind."""
    import time

    from r1ray.testing.chaos import Chaos, leftovers, seconds_to_next_step
    from r1ray.train.stages.grpo.stage import run

    ref, extra = (sync_ref, ()) if mode == "sync" else (async_ref, ASYNC)
    root = tmp_path_factory.mktemp(f"chaos-{mode}")
    records = root / "runs" / f"chaos-{mode}" / "grpo" / "rollouts-rank0.jsonl"

    def progress() -> str:
        lines = records.read_text().splitlines() if records.exists() else []
        return f"after step {json.loads(lines[-1])['step']}" if lines else "before step 1"

    t0 = time.time()
    with Chaos(kinds=("learner", "engine", "pool_controller", "train_controller"), kills=10, gap_s=(1.0, 4.0), first_after_s=0.5,
               seed=11 if mode == "sync" else 12, progress=progress, wait_until=records.exists) as chaos:
        out = run(make_cfg(model_dir, root, f"run_name=chaos-{mode}", "train.max_failures=20", *extra))
    steps = grpo_rollouts(out.run_dir)
    times = [(s, r["time"]) for s, r in sorted(steps.items())]
    print(f"\nchaos ({mode}, {time.time() - t0:.0f} s, {out.restarts} restarts):\n  " + "\n  ".join(chaos.report(times)))
    assert len(chaos.done) >= 8, (chaos.done, chaos.skipped)  # the kills landed while the run went on
    # the first kill is the learner's (cover_kinds, in the order of kinds), so the run went on in a new attempt of
    # the worker group (from its newest checkpoint, or from the start when the kill came before the first one:
    # then ``restarts``, which counts resumes from a checkpoint, stays 0)
    attempts = {json.loads(line)["attempt"] for line in records.read_text().splitlines()}
    assert chaos.done[0].victim == "learner" and len(attempts) >= 2, (chaos.done, attempts)
    # Ray Train's controller was among the victims: fit started a new one, which resumed the run
    assert "train_controller" in {k.victim for k in chaos.done}, chaos.done
    assert out.status == "completed"
    ref_steps = grpo_rollouts(ref.run_dir)
    assert [steps[s]["completion_hash"] for s in sorted(ref_steps)] == \
        [ref_steps[s]["completion_hash"] for s in sorted(ref_steps)]
    assert Path(ref.export_path, "model.safetensors").read_bytes() == \
        Path(out.export_path, "model.safetensors").read_bytes()
    assert sum(len(v) for v in seconds_to_next_step(chaos.done, times).values()) >= 1
    # the pool is stopped when the run ends, and the last Ray Train controller ends once fit's SIGINT handler (which
    # held its handle) is put back: their processes exit shortly after
    deadline = time.time() + 30
    while leftovers(("engine", "pool_controller", "train_controller")) and time.time() < deadline:
        time.sleep(0.5)
    assert not leftovers(("engine", "pool_controller", "train_controller"))
