"""The per-worker training loop every stage shares (private: stages talk to it through
``r1ray.train.stage.Stage``; read that module to add a stage).

The loop owns *how* to train: the DeepSpeed engine (and the placement of a stage's frozen models),
the exactly-once cursor, accumulation and loss normalisation, clipping, the learning-rate schedule,
non-finite skips, evaluation and checkpoint cadence, resume (also at another data-parallel size),
SIGTERM/preemption checkpoints, fault injection and metrics. ``Loop.run`` is a sequence of named phases:
``_setup_worker`` -> ``checkpoints.open`` -> ``_build_engine`` -> ``checkpoints.load`` -> ``_train``
(``_train_step`` and ``_after_step`` per step) -> ``_finish``. Checkpoint I/O is the ``CheckpointManager`` of
``r1ray.train.core.checkpoint``; fault injection and drill instruments are ``r1ray.train.core.faults``.

Loss normalisation: a stage returns the *sum* of its per-unit losses and declares each micro-batch's
weight (``batch_weight``) up front; the loop divides by the update's global weight (all workers, all
micro-batches), so one optimizer update minimises the same objective whatever the number of workers.

The Ray Train entry point is ``worker_main(payload)``; ``payload`` names the stage class
(``module:Class``) and carries the stage config as JSON and the driver's resources.
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from r1ray.observe.log import get_logger, setup_logging
from r1ray.seeds import step_seed
from r1ray.train.core.checkpoint import CheckpointManager, RunState
from r1ray.train.core.faults import FaultHooks
from r1ray.train.core.flops import gpu_peak_flops, train_flops_per_token
from r1ray.train.core.preflight import SetupError
from r1ray.train.stage import Metrics, Stage, StepInputs, WorkerInfo

log = get_logger(__name__)

__all__ = ["Loop", "NonFiniteLossError", "STOP_FILE", "worker_main"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


def import_string(path: str) -> Any:
    """``"module:attr"`` -> the attribute (stage classes travel to the workers by name)."""
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


def worker_main(payload: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's ``train_loop_per_worker``: build the stage from the payload and run the loop.

    A ``SetupError`` (a deterministic setup problem on this worker's machine, e.g. a DeepSpeed op that
    cannot be built) is returned as status ``setup_error`` instead of raised: Ray Train's FailureConfig
    would retry it like a fault, for minutes, before the cause showed."""
    stage_cls = import_string(payload["stage"])
    cfg = stage_cls.config_class.model_validate(payload["config"])
    try:
        return Loop(stage_cls(cfg), cfg, payload).run()
    except SetupError as e:
        log.error("setup error: %s", e)
        return {"status": "setup_error", "error": str(e)}


# --------------------------------------------------------------------------------------------------


STOP_FILE = "STOP"
"""``<run_dir>/STOP``: a stop request. The driver writes it when it receives SIGTERM (a preemption notice, a
cancelled job); rank 0 looks for it after every step and every worker checkpoints and stops."""


class _Signals:
    """Stop requests reaching a worker: SIGTERM to the worker process itself (when the loop runs in the main
    thread; Ray Train V2 runs it in a thread, where Python cannot take signals), or the run's STOP file."""

    def __init__(self, run_dir: str, check_file: bool) -> None:
        from r1ray.artifacts import is_uri, join

        self.term = False
        self._old = None
        self._stop_file = join(run_dir, STOP_FILE)
        self._local = not is_uri(run_dir)
        self._check_file = check_file
        try:
            self._old = signal.signal(signal.SIGTERM, self._on_term)
        except ValueError:  # not the main thread
            self._old = None

    def _on_term(self, signum, frame) -> None:  # noqa: ARG002
        self.term = True

    def requested(self, step: int, every: int) -> bool:
        if self.term:
            return True
        if self._check_file and (self._local or step % every == 0):
            from r1ray.artifacts import exists

            self.term = exists(self._stop_file)
        return self.term

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


_NO_NOTICES: tuple[str, ...] = ("this Ray has no preemption notices",)
"""``Loop._notice_handled`` once the installed Ray turned out to lack ``ray.train.get_preemption_info``."""

_REPORT_GAP_S = 1.25 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))
"""Least time between two metrics-only ``ray.train.report`` calls. Ray Train V2 hands a worker's reports to
its controller through a queue of size 1 that the controller drains once per health check (every 2 s): a
second report inside that window blocks the training thread until the next poll. Reporting every
``log_every`` steps of a fast model stalled training for most of each window (the loop ran at ~0.6x a bare
PyTorch loop). Metrics-only reports closer than this are skipped (Prometheus, W&B and the run's history
still get every ``log_every`` window); reports with a checkpoint or an evaluation are never skipped."""


@dataclass
class _Window:
    """Numbers since the previous report."""

    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    train_seconds: float = 0.0  # time inside training steps only (throughput, MFU)
    losses: list[float] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)


class Evaluator:
    """Collective-safe evaluation helpers the loop hands to ``Stage.evaluate``."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    def loss_over(self, batches: Any) -> Metrics:
        """``val_loss``/``val_perplexity`` over this worker's ``batches`` (weighted by ``batch_weight``).
        Workers with fewer batches run dummy passes (weight 0) under ZeRO-3, whose forward is a collective."""
        import torch

        loop, stage = self.loop, self.loop.stage
        batches = list(batches)
        n = len(batches)
        if loop.cfg.deepspeed.zero_stage == 3:
            n = int(loop._allreduce([float(n)], op="max")[0])
        total, weight = 0.0, 0.0
        stage_metrics = Metrics()
        with torch.no_grad():
            for i in range(n):
                real = i < len(batches)
                batch = batches[i] if real else loop._dummy_batch(batches)
                s = stage.loss(loop.engine, batch, stage_metrics if real else Metrics())
                if real:
                    total += float(s)
                    weight += stage.batch_weight(batch)
        m = stage_metrics.prefixed("val_")  # a stage's own loss metrics, measured on validation
        m.total("val_loss_sum", total)
        m.total("val_weight", weight)
        return m


class Loop:
    def __init__(self, stage: Stage, cfg: Any, payload: dict[str, Any]):
        self.stage, self.cfg, self.payload = stage, cfg, payload
        self.run_dir: str = payload["run_dir"]
        self.tags = {"run": cfg.run_name, "stage": stage.name}
        self.checkpoints = CheckpointManager(self)
        self._last_batch: dict[str, Any] | None = None
        self._reported_at = -math.inf
        self._notice_handled: tuple[str, ...] | None = None  # the drained nodes of the last poll (answered), or _NO_NOTICES

    # ---- distributed helpers
    def _allreduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if self.worker.use_gpu:
            t = t.to(self.worker.device)
        if dist.is_initialized() and self.worker.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def _barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and self.worker.world_size > 1:
            dist.barrier()

    def _broadcast_str(self, value: str) -> str:
        import torch.distributed as dist

        obj = [value]
        if dist.is_initialized() and self.worker.world_size > 1:
            dist.broadcast_object_list(obj, src=0)
        return obj[0]

    def _union_names(self, names: list[str]) -> list[str]:
        """The sorted union of every worker's metric names (so every worker reduces the same list)."""
        import torch.distributed as dist

        if not (dist.is_initialized() and self.worker.world_size > 1):
            return sorted(names)
        gathered: list[Any] = [None] * self.worker.world_size
        dist.all_gather_object(gathered, sorted(names))
        return sorted({n for g in gathered for n in g})

    def _reduce_metrics(self, m: Metrics) -> dict[str, float]:
        names = self._union_names(m.names())
        return m.reduce(self._allreduce, lambda v: self._allreduce(v, op="max"), names)

    # ---- phase: worker setup
    def _setup_worker(self) -> None:
        import ray.train
        import torch

        ctx = ray.train.get_context()
        rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        os.environ["R1RAY_RANK"] = str(rank)
        setup_logging(self.cfg.logging.level)
        if self.cfg.logging.level != "DEBUG":
            _quiet_report_lines()
        use_gpu = self.cfg.scaling.use_gpu
        if use_gpu:
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
            threads = self.cfg.train.torch_threads or max(1, int(self.cfg.scaling.cpus_per_worker))
            torch.set_num_threads(threads)
        self.worker = WorkerInfo(rank, world, local_rank, use_gpu, device)
        self.stage.worker = self.worker
        self.faults = FaultHooks(self.cfg.faults, self.run_dir, rank, world, self.payload.get("driver_pid"))

    # ---- phase: models and the DeepSpeed engine
    def _build_engine(self, load_universal: bool) -> None:
        from r1ray.train.core.config import grad_accumulation
        from r1ray.train.core.deepspeed import build_engine, ds_config

        cfg, w = self.cfg, self.worker
        model = self.stage.build_model()
        per_step, slices = grad_accumulation(cfg.train, w.world_size), self.stage.update_slices()
        if per_step % slices:
            raise ValueError(f"{type(self.stage).__name__}: each of {w.world_size} worker(s) has {per_step} "
                             f"micro-batch(es) a step, which do not split into {slices} optimizer updates "
                             "(grpo.steps_per_generation); choose a worker count or batch sizes that divide")
        self.gas = per_step // slices
        """Micro-batches of one optimizer update on this worker (DeepSpeed's gradient accumulation)."""
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        config = ds_config(cfg.deepspeed, cfg.optim, micro_batch_size=cfg.train.micro_batch_size,
                           grad_accum=self.gas, world_size=w.world_size, use_gpu=w.use_gpu,
                           load_universal=load_universal, hidden_size=hidden)
        t0 = time.perf_counter()
        self.flops_per_token = train_flops_per_token(model, self.stage.seq_len or 0)
        self.engine = build_engine(model, cfg.deepspeed, cfg.optim, config)
        if cfg.deepspeed.zero_stage > 0:
            force_overflow_check(self.engine)
        self.stage.frozen = {name: self._place_frozen(m, config) for name, m in self.stage.frozen_models().items()}
        log.info("DeepSpeed ZeRO-%d engine on %d worker(s), accumulation %d, %d frozen model(s), built in %.1fs",
                 cfg.deepspeed.zero_stage, w.world_size, self.gas, len(self.stage.frozen),
                 time.perf_counter() - t0)

    def _place_frozen(self, model: Any, train_config: dict[str, Any]) -> Any:
        """A frozen model on the device in the training precision; under ZeRO-3 partitioned like the trained
        one (a DeepSpeed engine without optimizer: every worker must call it alike)."""
        import torch

        model.eval().requires_grad_(False)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.deepspeed.precision, torch.float32)
        if self.cfg.deepspeed.zero_stage == 3:
            import deepspeed

            conf = {k: v for k, v in train_config.items() if k not in ("optimizer", "checkpoint")}
            conf["zero_optimization"] = {**train_config["zero_optimization"], "stage": 3}
            conf["zero_optimization"].pop("offload_optimizer", None)
            engine, *_ = deepspeed.initialize(model=model, config=conf)
            engine.eval()
            return engine
        return model.to(device=self.worker.device, dtype=dtype)

    # ---- the run
    def run(self) -> dict[str, Any]:
        from r1ray.observe.metrics import record
        from r1ray.observe.wandb import WandbRun
        from r1ray.train.core.sampler import GlobalOrder

        cfg = self.cfg
        self._setup_worker()
        w = self.worker
        self.stage.setup(w, self.payload.get("resources") or {})
        difficulty = self.stage.sample_difficulty() if cfg.train.curriculum_epochs else None
        if cfg.train.curriculum_epochs and difficulty is None:
            raise ValueError(f"train.curriculum_epochs: the {self.stage.name} stage has no difficulty score per "
                             "sample; set it to 0 (SFT and GRPO order task difficulty with their curriculum block)")
        self.order = GlobalOrder(self.stage.num_samples(), cfg.seed, difficulty, cfg.train.curriculum_epochs,
                                 cfg.train.curriculum_buckets)
        local, state, from_ray = self.checkpoints.open()
        universal = bool(local) and state["world_size"] != w.world_size and state["zero_stage"] > 0
        self._build_engine(load_universal=universal)
        rs = self.checkpoints.load(local, state, from_ray, universal) if local else RunState()
        self.attempt = self._broadcast_str(uuid.uuid4().hex[:8])
        self.wandb = WandbRun(cfg.logging.wandb, name=cfg.run_name, run_dir=_local_or_tmp(self.run_dir),
                              config=cfg.model_dump(mode="json"), enabled=w.rank == 0)
        record("r1ray_train_workers", w.world_size, **self.tags)
        signals = _Signals(self.run_dir, check_file=w.rank == 0)
        try:
            self._train(rs, signals)
        finally:
            signals.restore()
            self.wandb.finish()
        return self._finish(rs)

    # ---- phase: the step loop
    def _train(self, rs: RunState, signals: _Signals) -> None:
        tcfg = self.cfg.train
        end = min(tcfg.max_steps, tcfg.stop_after_steps or tcfg.max_steps)
        win = _Window()
        while rs.step < end:
            t0 = time.perf_counter()
            out = self._train_step(rs.step, signals, win.metrics)
            win.train_seconds += time.perf_counter() - t0
            rs.step += 1
            rs.consumed += tcfg.global_batch_size
            win.tokens += out["tokens"]
            if not self._after_step(rs, out, win):
                break  # too many non-finite steps in a row
            self.faults.maybe_kill("kill_at_step", rs.step)
            if self.cfg.faults.step_delay_s:
                time.sleep(self.cfg.faults.step_delay_s)
            stop = out["stop"]
            notice = rs.step % tcfg.log_every == 0 and self._new_preemption_notice(rs.step)
            do_eval = rs.step == end or bool(tcfg.eval_every and rs.step % tcfg.eval_every == 0)
            if do_eval:
                rs.val = self._evaluate()
                self.stage.after_evaluation(rs.step, rs.val)
            do_ckpt = stop or notice or rs.step == end or bool(self.cfg.checkpoint.every
                                                               and rs.step % self.cfg.checkpoint.every == 0)
            if rs.step % tcfg.log_every == 0 or do_ckpt or do_eval:
                # validation metrics only in the reports of the steps that evaluated (Tune's schedulers count
                # evaluations by the reports that carry the metric)
                metrics = self._metrics(rs, rs.val if do_eval else {}, win)
                if notice:
                    metrics["preemption_checkpoint"] = 1.0  # in trainer_state.json: this save answered a notice
                win = _Window()
                rs.history.append([rs.step, metrics.get("train_loss"), metrics.get("val_loss")])
                rs.reports.append({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))
                                   and k not in ("time", "max_steps")})
                if do_ckpt:
                    rs.last_ckpt, rs.saved_at = self.checkpoints.save(rs, metrics), rs.step
                    self._reported_at = time.monotonic()
                elif do_eval or time.monotonic() - self._reported_at >= _REPORT_GAP_S:
                    import ray.train

                    ray.train.report(metrics)
                    self._reported_at = time.monotonic()
            if stop:
                rs.status = "preempted"
                log.warning("stop request (SIGTERM or the STOP file): checkpointed at step %d and stopping", rs.step)
                break
        if rs.status == "completed" and end < tcfg.max_steps:
            rs.status = "stopped"  # at train.stop_after_steps: a segment, resumable
        if rs.status in ("completed", "stopped") and rs.saved_at != rs.step:
            rs.val = rs.val or self._evaluate()
            rs.last_ckpt, rs.saved_at = self.checkpoints.save(rs, self._metrics(rs, rs.val, win)), rs.step

    def _after_step(self, rs: RunState, out: dict[str, Any], win: _Window) -> bool:
        """Book-keeping of one finished step; False ends the run (too many non-finite steps in a row)."""
        from r1ray.observe.metrics import record

        if not out["nonfinite"]:
            rs.in_row = 0
            if out["loss"] is None:  # every update of the step carried no gradient (all weights 0)
                return True
            win.losses.append(out["loss"])
            rs.last = {"loss": out["loss"], "grad_norm": out["grad_norm"], "lr": out["lr"]}
            return True
        rs.nonfinite_total += 1
        rs.in_row += 1
        record("r1ray_train_nonfinite_steps", 1, **self.tags)
        log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)", rs.step, rs.in_row)
        if rs.in_row < self.cfg.train.max_nonfinite_in_row:
            return True
        rs.status = "nonfinite"
        rs.error = (f"{rs.in_row} non-finite steps in a row, the last at step {rs.step}; last good checkpoint: "
                    f"{rs.last_ckpt or 'none'} (lower optim.lr, raise train.max_nonfinite_in_row, or inspect "
                    "the data of these steps)")
        return False

    # ---- phase: the result
    def _finish(self, rs: RunState) -> dict[str, Any]:
        return {
            "status": rs.status, "step": rs.step, "samples_consumed": rs.consumed,
            "world_size": self.worker.world_size, "restarts": rs.restarts, "nonfinite_total": rs.nonfinite_total,
            "train_loss": rs.last.get("loss"), "metrics": {k: v for k, v in rs.val.items()},
            "val_loss": rs.val.get("val_loss"), "checkpoint": rs.last_ckpt,
            "resumed_fingerprint": rs.resumed_fingerprint, "saved_fingerprint": rs.saved_fingerprint,
            "final_fingerprint": self.checkpoints.optim_fingerprint(), "error": rs.error, "history": rs.history,
            "reports": rs.reports,
            "param_checksum": self._param_checksum(),
        }

    def _param_checksum(self) -> float | None:
        """Sum of every trained parameter (float64) on rank 0 (ZeRO < 3): a test compares it with the export."""
        if self.worker.rank != 0 or self.cfg.deepspeed.zero_stage == 3:
            return None
        return float(sum(p.detach().double().sum() for p in self.engine.module.parameters()))

    # ---- one optimizer step
    def _train_step(self, step: int, signals: _Signals, window_metrics: Metrics) -> dict[str, Any]:
        import torch

        from r1ray.train.core.deepspeed import set_lr
        from r1ray.train.core.optim import lr_at
        from r1ray.train.core.sampler import step_micro_batches

        cfg, tcfg, w, engine = self.cfg, self.cfg.train, self.worker, self.engine
        # RNG is a pure function of (seed, step, rank): exact after a resume on any number of workers
        torch.manual_seed(step_seed(cfg.seed, step, w.rank))
        micro = step_micro_batches(step, tcfg.global_batch_size, tcfg.micro_batch_size, w.rank, w.world_size)
        self.faults.record_samples(step, getattr(self, "attempt", "x"), micro)
        lr = lr_at(cfg.optim, step, tcfg.max_steps)
        set_lr(engine, lr)
        engine.train()
        if step + 1 < tcfg.max_steps:
            following = step_micro_batches(step + 1, tcfg.global_batch_size, tcfg.micro_batch_size, w.rank,
                                           w.world_size)
            self.stage.prefetch(step + 1, [self.order.rows(idx) for idx in following])
        inputs = self.stage.step_inputs(step, [self.order.rows(idx) for idx in micro], engine)
        self._check_inputs(inputs)
        window_metrics.merge(inputs.metrics)
        local = [sum(self.stage.batch_weight(b) for b in update) for update in inputs.updates]
        local.append(float(sum(int(b.get("n_tokens", 0)) for update in inputs.updates for b in update)))
        *weights, tokens = self._allreduce(local)
        inject_nan = self.faults.nonfinite(step)
        losses, nonfinite_any, grad_norm = [], False, None
        for u, (update, weight) in enumerate(zip(inputs.updates, weights, strict=True)):
            if weight <= 0:
                window_metrics.total("skipped_updates", 1.0)
                continue  # nothing carries gradient on any worker: no optimizer update at all
            loss_sum, nonfinite = 0.0, 0.0
            for i, batch in enumerate(update):
                s = self.stage.loss(engine, batch, window_metrics)
                if inject_nan:
                    s = s * float("nan")
                value = float(s.detach())
                if math.isfinite(value):
                    loss_sum += value
                else:
                    nonfinite = 1.0
                engine.backward(s * (self.gas * w.world_size / weight))
                if i < len(update) - 1:
                    engine.step()
            self._last_batch = update[-1]
            loss_total, bad = self._allreduce([loss_sum, nonfinite])
            applied = self._optimizer_step(bool(bad))
            if applied:
                losses.append(loss_total / weight)
                gn = engine.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None and math.isfinite(float(gn)) else None
            else:
                nonfinite_any = True
            self.stage.after_update(engine, step, u)
        self.faults.maybe_sigterm_driver(step)
        stop = self._allreduce([float(signals.requested(step + 1, tcfg.log_every))])[0]
        return {
            "loss": float(np.mean(losses)) if losses else None, "tokens": int(tokens), "lr": lr,
            "grad_norm": grad_norm, "nonfinite": nonfinite_any, "stop": bool(stop),
        }

    def _check_inputs(self, inputs: StepInputs) -> None:
        if not inputs.updates:
            raise ValueError(f"{type(self.stage).__name__}.step_inputs returned no update")
        for u, update in enumerate(inputs.updates):
            if len(update) != self.gas:
                raise ValueError(
                    f"{type(self.stage).__name__}.step_inputs: update {u} has {len(update)} micro-batches; the "
                    f"loop needs exactly the accumulation count {self.gas} (train.global_batch_size / "
                    f"(train.micro_batch_size x {self.worker.world_size} workers) / {self.stage.update_slices()} "
                    "update slices) on every worker")

    def _optimizer_step(self, nonfinite: bool) -> bool:
        """The update's optimizer step; with a non-finite loss on any worker, a true skip. Returns whether
        the step was applied."""
        engine = self.engine
        if nonfinite and self.cfg.deepspeed.zero_stage == 0:
            # ZeRO-0 has no overflow check: dropping the gradients makes torch's optimizer skip every
            # parameter (no moment update, no weight decay) - a true skip. DeepSpeed's fp32 clipping
            # cannot take a model without gradients, so it is off for this one call.
            for p in engine.module.parameters():
                p.grad = None
            clip, engine._config.gradient_clipping = engine._config.gradient_clipping, 0.0
            try:
                engine.step()
            finally:
                engine._config.gradient_clipping = clip
            return False
        engine.step()
        applied = engine.was_step_applied() or self.cfg.deepspeed.precision == "fp16"
        if nonfinite and applied:
            # ZeRO >= 1 skips through DeepSpeed's overflow check, which force_overflow_check turned on; a
            # DeepSpeed release that applies the step anyway has corrupted the weights: say so, loudly.
            raise RuntimeError(
                "a non-finite loss reached an optimizer step that DeepSpeed applied (its overflow check did "
                "not skip it); this DeepSpeed release cannot skip non-finite steps at ZeRO-"
                f"{self.cfg.deepspeed.zero_stage}: use deepspeed.zero_stage=0 or another DeepSpeed version")
        return applied and not nonfinite

    def _dummy_batch(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch for a collective-only forward pass (never counted)."""
        if batches:
            return batches[0]
        if self._last_batch is not None:
            return self._last_batch
        from r1ray.train.core.sampler import step_micro_batches

        idx = step_micro_batches(0, self.cfg.train.global_batch_size, self.cfg.train.micro_batch_size, 0, 1)[0]
        return self.stage.make_batch(self.order.rows(idx), self.worker.device)

    # ---- evaluation
    def _evaluate(self) -> dict[str, float]:
        self.engine.eval()
        try:
            m = self._reduce_metrics(self.stage.evaluate(self.engine, Evaluator(self)))
        finally:
            self.engine.train()
        total, weight = m.pop("val_loss_sum", None), m.pop("val_weight", None)
        if total is not None and weight:
            m["val_loss"] = total / weight
            m["val_perplexity"] = math.exp(min(m["val_loss"], 50.0))
        return m

    # ---- metrics
    def _metrics(self, rs: RunState, val: dict[str, float], win: _Window) -> dict[str, Any]:
        from r1ray.observe.metrics import record, stage_metric_name

        seconds = time.perf_counter() - win.t0
        tps = win.tokens / win.train_seconds if win.train_seconds > 0 else 0.0
        m: dict[str, Any] = {
            "step": rs.step, "max_steps": self.cfg.train.max_steps, "samples_consumed": rs.consumed,
            "workers": self.worker.world_size, "restarts": rs.restarts, "nonfinite_steps": rs.nonfinite_total,
            "tokens_per_second": tps, "tokens_per_second_wall": win.tokens / seconds if seconds > 0 else 0.0,
            "step_seconds": win.train_seconds / max(1, len(win.losses)),
            "report_window_seconds": seconds, "time": time.time(),
        }
        if win.losses:
            m["train_loss"] = float(np.mean(win.losses))
        if "lr" in rs.last:
            m["lr"] = rs.last["lr"]
            if rs.last.get("grad_norm") is not None:
                m["grad_norm"] = rs.last["grad_norm"]
        stage_values = self._reduce_metrics(win.metrics)
        m.update(stage_values)
        m.update(val)
        rss = _rss_bytes()
        if self.worker.rank == 0:
            for name, key in (("r1ray_train_loss", "train_loss"), ("r1ray_train_val_loss", "val_loss"),
                              ("r1ray_train_lr", "lr"), ("r1ray_train_grad_norm", "grad_norm"),
                              ("r1ray_train_tokens_per_second", "tokens_per_second"),
                              ("r1ray_train_step", "step"), ("r1ray_train_samples_consumed", "samples_consumed")):
                if key in m and m[key] is not None and math.isfinite(float(m[key])):
                    record(name, float(m[key]), **self.tags)
            for key, value in {**stage_values, **val}.items():
                name = stage_metric_name(self.stage.name, key)
                if name and math.isfinite(value):
                    record(name, value, **self.tags)
            self.wandb.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=rs.step)
        if rss:
            record("r1ray_train_memory_bytes", rss, kind="rss", **self.tags)
            m["rss_bytes"] = rss
        if self.worker.use_gpu:
            import torch

            record("r1ray_train_memory_bytes", torch.cuda.memory_allocated(), kind="cuda_allocated", **self.tags)
            m["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
            peak = gpu_peak_flops(torch.cuda.get_device_name(), self.cfg.deepspeed.precision)
            if peak and self.flops_per_token:
                m["mfu"] = tps * self.flops_per_token / (peak * self.worker.world_size)
                if self.worker.rank == 0:
                    record("r1ray_train_mfu", m["mfu"], **self.tags)
        return m

    def _new_preemption_notice(self, step: int) -> bool:
        """True once per drain notice (Ray Train's ``get_preemption_info``: a node of this group is being drained,
        e.g. a spot instance about to be reclaimed): the step then saves a just-in-time checkpoint and training
        goes on, as Ray recommends. When the node goes, Ray Train restarts the group (on the nodes left, or on
        a replacement) from that checkpoint, counted against Ray's ``max_preemption_failures`` (unlimited), not
        ``train.max_failures``: the notice costs the steps after it, not the steps since the last interval.
        Every rank calls it at the same steps (it is a collective), and every rank gets the same answer."""
        import ray.train

        if self._notice_handled is _NO_NOTICES:
            return False
        if not hasattr(ray.train, "get_preemption_info"):  # an older Ray: say so once, then never poll
            self._notice_handled = _NO_NOTICES
            log.warning("Ray %s has no ray.train.get_preemption_info: a drained node costs up to one checkpoint "
                        "interval (checkpoint.every)", ray.__version__)
            return False
        info = ray.train.get_preemption_info()
        key = None if info is None else tuple(sorted(info.preempted_node_to_ranks))
        answered, self._notice_handled = self._notice_handled, key  # a drain that ends and comes back is new
        if key is None or key == answered:
            return False
        when = (f", deadline in {info.deadline_ms / 1000 - time.time():.0f} s" if info.deadline_ms else "")
        log.warning("preemption notice at step %d (node(s) %s draining%s): saving a just-in-time checkpoint; "
                    "training goes on until the node goes", step, ", ".join(n[:8] for n in key), when)
        return True

def _quiet_report_lines() -> None:
    """Keep Ray Train's per-report INFO line ("Reporting training result N: TrainingReport(...)", one per
    worker per report) off the console, where it drowns r1ray's progress lines; it still goes to Ray Train's
    worker log files (``<ray session dir>/logs/train/ray-train-app-worker-*.log``)."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    name = train_context.__file__  # Ray names that logger after its file

    class _DropReports(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.name != name or record.levelno >= logging.WARNING

    for handler in logging.getLogger().handlers:
        if type(handler).__name__ != "SessionFileHandler" and not any(
                type(f).__name__ == "_DropReports" for f in handler.filters):
            handler.addFilter(_DropReports())


def force_overflow_check(engine: Any) -> None:
    """Make DeepSpeed's ZeRO-1/2 optimizer check gradients for inf/NaN at every step, whatever the precision.

    DeepSpeed >= 0.17.1 checks only in fp16 (and bf16 when asked), so an fp32 ZeRO-1/2 step with NaN
    gradients would be applied. The loop knows when a loss was non-finite and verifies after the step that
    DeepSpeed skipped it (``Loop._optimizer_step``); this attribute is what makes the skip happen on the
    releases that have it (older releases always checked). ZeRO-3 skips on an invalid gradient norm."""
    opt = getattr(engine, "optimizer", None)
    if opt is not None and hasattr(opt, "check_grad_overflow"):
        opt.check_grad_overflow = True


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0.0


def _local_or_tmp(run_dir: str) -> str:
    from r1ray.artifacts import is_uri

    return tempfile.gettempdir() if is_uri(run_dir) else run_dir
