"""The per-worker training loop every training stage shares (pretrain now; SFT, GRPO, distill next).

A stage says *what* to train (its data, how a batch becomes a loss, what to evaluate); this loop says
*how*: DeepSpeed engine setup, the exactly-once sample cursor, gradient accumulation, clipping, the
learning-rate schedule, non-finite skips, evaluation and checkpoint cadence, resume (also at another
data-parallel size), SIGTERM/preemption checkpoints, fault injection and metrics.

Loss normalisation: a stage returns the *sum* of its token losses and the token count; the loop divides
by the step's global token count (all workers, all micro-batches), so one optimizer step minimises the
mean token loss of its ``global_batch_size`` samples whatever the number of workers or micro-batches.

The Ray Train entry point is ``worker_main(payload)``; ``payload`` names the stage class
(``module:Class``) and carries the stage config as JSON.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import signal
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from r1ray.observe.log import get_logger, setup_logging

log = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class WorkerInfo:
    rank: int
    world_size: int
    local_rank: int
    use_gpu: bool
    device: Any


class Stage(ABC):
    """What a training stage supplies to the shared loop. ``cfg`` is the stage's typed config, which has
    ``seed``, ``run_name``, ``train``, ``checkpoint``, ``optim``, ``deepspeed``, ``scaling``, ``faults``,
    ``storage`` and ``logging``."""

    name: str = "stage"
    """Manifest stage and metric tag ("pretrain", "sft", ...)."""
    config_class: Any = None

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.tokenizer: Any = None

    @abstractmethod
    def setup(self, worker: WorkerInfo) -> None:
        """Load the tokenizer and data (called once per worker, before the model is built)."""

    @abstractmethod
    def build_model(self) -> Any:
        """The torch module to train (seeded; the loop wraps it in DeepSpeed)."""

    @abstractmethod
    def num_train_samples(self) -> int:
        """Rows of one epoch; the loop orders them by (seed, epoch, index)."""

    @abstractmethod
    def make_batch(self, rows: np.ndarray, device: Any) -> dict[str, Any]:
        """Tensors for these rows of the training split (one micro-batch)."""

    @abstractmethod
    def loss(self, model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
        """(sum of token losses, number of tokens) of a micro-batch; the sum carries the graph."""

    def batch_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens the loss of ``batch`` is averaged over (known before the forward pass)."""
        return int(batch["n_tokens"])

    @abstractmethod
    def eval_batches(self, worker: WorkerInfo, device: Any) -> Iterator[dict[str, Any]]:
        """This worker's share of the validation micro-batches."""

    def export_inputs(self) -> list[str]:
        """Input artifacts named in the manifests of exports."""
        return []

    def probe_input(self) -> list[int]:
        """A token sequence whose final logits the run returns (to check exports against the engine)."""
        return []


def import_string(path: str) -> Any:
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


def worker_main(payload: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's ``train_loop_per_worker``: build the stage from the payload and run the loop."""
    stage_cls = import_string(payload["stage"])
    cfg = stage_cls.config_class.model_validate(payload["config"])
    return Loop(stage_cls(cfg), cfg, payload).run()


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


def _fire_once(run_dir: str, name: str) -> bool:
    """True the first time ``name`` is asked for in this run (a marker file in the run directory)."""
    from pathlib import Path

    from r1ray.artifacts import filesystem

    _, path = filesystem(run_dir)
    marker = Path(path) / "faults" / name
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


class Loop:
    def __init__(self, stage: Stage, cfg: Any, payload: dict[str, Any]):
        self.stage, self.cfg, self.payload = stage, cfg, payload
        self.run_dir: str = payload["run_dir"]
        self.tags = {"run": cfg.run_name, "stage": stage.name}

    # ---- distributed helpers
    def _allreduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        if self.worker.use_gpu:
            t = t.to(self.worker.device)
        if dist.is_initialized() and self.worker.world_size > 1:
            dist.all_reduce(t)
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

    # ---- setup
    def _setup_worker(self) -> None:
        import ray.train
        import torch

        ctx = ray.train.get_context()
        rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        os.environ["R1RAY_RANK"] = str(rank)
        setup_logging(self.cfg.logging.level)
        use_gpu = self.cfg.scaling.use_gpu
        if use_gpu:
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
            threads = self.cfg.train.torch_threads or max(1, int(self.cfg.scaling.cpus_per_worker))
            torch.set_num_threads(threads)
        self.worker = WorkerInfo(rank, world, local_rank, use_gpu, device)

    def _resume_source(self):
        """(checkpoint, from_ray) to resume from: Ray Train's newest, else ``checkpoint.resume_from``."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            return ckpt, True
        if self.cfg.checkpoint.resume_from:
            from ray.train import Checkpoint

            return Checkpoint(self.cfg.checkpoint.resume_from), False
        return None, False

    def _optim_fingerprint(self) -> float:
        """Sum of |state| over every optimizer state tensor of every rank: equal before a save and after a
        load at any data-parallel size iff the optimizer state was carried over (not reset)."""
        import torch

        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        total = 0.0
        for state in inner.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    total += float(v.detach().double().abs().sum())
        total = self._allreduce([total])[0]
        if self.cfg.deepspeed.zero_stage == 0:
            total /= self.worker.world_size  # replicated, not partitioned
        return total

    # ---- the run
    def run(self) -> dict[str, Any]:
        import torch

        from r1ray.observe.metrics import record
        from r1ray.observe.wandb import WandbRun
        from r1ray.train.checkpoint import DS_TAG, convert_to_universal, read_trainer_state
        from r1ray.train.config import grad_accumulation
        from r1ray.train.deepspeed import build_engine, ds_config
        from r1ray.train.sampler import GlobalOrder

        cfg, tcfg = self.cfg, self.cfg.train
        self._setup_worker()
        w = self.worker
        self.stage.setup(w)
        self.gas = grad_accumulation(tcfg, w.world_size)
        self.order = GlobalOrder(self.stage.num_train_samples(), cfg.seed)

        ckpt, from_ray = self._resume_source()
        state: dict[str, Any] = {}
        ckpt_local = None
        load_universal = False
        if ckpt is not None:
            self._ckpt_ctx = ckpt.as_directory()
            ckpt_local = self._ckpt_ctx.__enter__()
            state = read_trainer_state(ckpt_local)
            load_universal = state["world_size"] != w.world_size and state["zero_stage"] > 0
            if state["zero_stage"] != cfg.deepspeed.zero_stage:
                raise ValueError(
                    f"checkpoint {ckpt_local} was saved with deepspeed.zero_stage={state['zero_stage']}; "
                    f"resume with the same stage (got {cfg.deepspeed.zero_stage})"
                )

        model = self.stage.build_model()
        config = ds_config(
            cfg.deepspeed, cfg.optim, micro_batch_size=tcfg.micro_batch_size, grad_accum=self.gas,
            world_size=w.world_size, use_gpu=w.use_gpu, load_universal=load_universal,
            hidden_size=getattr(getattr(model, "config", None), "hidden_size", None),
        )
        t0 = time.perf_counter()
        self.flops_per_token = train_flops_per_token(model, getattr(self.stage, "seq_len", 2048))
        self.engine = build_engine(model, cfg.deepspeed, cfg.optim, config)
        log.info("DeepSpeed ZeRO-%d engine on %d worker(s), accumulation %d, built in %.1fs",
                 cfg.deepspeed.zero_stage, w.world_size, self.gas, time.perf_counter() - t0)

        step, consumed, restarts, nonfinite_total = 0, 0, 0, 0
        resumed_fingerprint = None
        if ckpt_local is not None:
            load_dir, tag = ckpt_local, DS_TAG
            conv_dir = None
            if load_universal:
                import ray.util

                # one conversion per host, by local rank 0: Ray Train numbers local ranks per node IP
                host = ray.util.get_node_ip_address().replace(":", "_")
                conv_dir = os.path.join(tempfile.gettempdir(),
                                        f"r1ray-universal-{state['attempt']}-{state['step']}-{host}")
                if w.local_rank == 0 and not os.path.exists(os.path.join(conv_dir, "done")):
                    t1 = time.perf_counter()
                    convert_to_universal(ckpt_local, conv_dir)
                    open(os.path.join(conv_dir, "done"), "w").close()
                    log.info("converted a %d-worker checkpoint to universal in %.1fs",
                             state["world_size"], time.perf_counter() - t1)
                self._barrier()
                load_dir = conv_dir
            path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint at {load_dir}/{tag}")
            step, consumed = int(state["step"]), int(state["samples_consumed"])
            nonfinite_total = int(state.get("nonfinite_total", 0))
            restarts = int(state.get("restarts", 0)) + (1 if from_ray else 0)
            resumed_fingerprint = self._optim_fingerprint()
            log.info("resumed from %s at step %d, %d samples consumed (saved on %d worker(s), now %d)",
                     ckpt_local, step, consumed, state["world_size"], w.world_size)
            if consumed != step * tcfg.global_batch_size:
                raise ValueError(
                    f"checkpoint {ckpt_local}: samples_consumed={consumed} != step {step} x "
                    f"train.global_batch_size {tcfg.global_batch_size}; resume with the global batch size it "
                    f"was trained with ({consumed // max(step, 1)})"
                )
            self._ckpt_ctx.__exit__(None, None, None)
            if conv_dir:
                self._barrier()
                if w.local_rank == 0:
                    shutil.rmtree(conv_dir, ignore_errors=True)
        if from_ray and restarts:
            record("r1ray_train_restarts", 1, **self.tags)

        self.attempt = self._broadcast_str(uuid.uuid4().hex[:8])
        self.wandb = WandbRun(cfg.logging.wandb, name=cfg.run_name, run_dir=_local_or_tmp(self.run_dir),
                              config=cfg.model_dump(mode="json"), enabled=w.rank == 0)
        signals = _Signals(self.run_dir, check_file=w.rank == 0)
        record("r1ray_train_workers", w.world_size, **self.tags)

        stats = dict(step=step, consumed=consumed, restarts=restarts, nonfinite_total=nonfinite_total,
                     in_row=0, last_ckpt=state.get("checkpoint"), world_size=w.world_size,
                     resumed_fingerprint=resumed_fingerprint, saved_fingerprint=state.get("optim_fingerprint"))
        last: dict[str, Any] = {}
        val: dict[str, float] = {}
        history: list[list[Any]] = []  # [step, mean train loss since the previous report, val loss]
        window_t, window_tokens, window_losses = time.perf_counter(), 0, []
        saved_at = step if ckpt_local is not None else -1
        status = "completed"
        end = min(tcfg.max_steps, tcfg.stop_after_steps or tcfg.max_steps)
        try:
            while step < end:
                out = self._train_step(step, signals)
                step += 1
                consumed += tcfg.global_batch_size
                stats.update(step=step, consumed=consumed)
                window_tokens += out["tokens"]
                if out["nonfinite"]:
                    stats["nonfinite_total"] += 1
                    stats["in_row"] += 1
                    record("r1ray_train_nonfinite_steps", 1, **self.tags)
                    log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)",
                                step, stats["in_row"])
                    if stats["in_row"] >= tcfg.max_nonfinite_in_row:
                        status = "nonfinite"
                        msg = (f"{stats['in_row']} non-finite steps in a row, the last at step {step}; last good "
                               f"checkpoint: {stats['last_ckpt'] or 'none'} (lower optim.lr, raise "
                               f"train.max_nonfinite_in_row, or inspect the data of these steps)")
                        last = {"error": msg}
                        break
                else:
                    stats["in_row"] = 0
                    window_losses.append(out["loss"])
                    last = {"loss": out["loss"], "grad_norm": out["grad_norm"], "lr": out["lr"]}
                self._maybe_kill("kill_at_step", step)
                if cfg.faults.step_delay_s:
                    time.sleep(cfg.faults.step_delay_s)
                stop = out["stop"]
                if not stop and step % tcfg.log_every == 0:
                    stop = self._preempted()
                do_eval = step == end or (tcfg.eval_every and step % tcfg.eval_every == 0)
                if do_eval:
                    val = self._evaluate()
                do_ckpt = stop or step == end or (
                    cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
                if step % tcfg.log_every == 0 or do_ckpt or do_eval:
                    now = time.perf_counter()
                    # validation metrics only in the reports of the steps that evaluated (Tune's schedulers
                    # count evaluations by the reports that carry the metric)
                    metrics = self._metrics(stats, last, val if do_eval else {}, window_losses, window_tokens,
                                            now - window_t)
                    window_t, window_tokens, window_losses = now, 0, []
                    history.append([step, metrics.get("train_loss"), metrics.get("val_loss")])
                    if do_ckpt:
                        saved = self._save(stats, metrics)
                        saved_at = step
                        stats["last_ckpt"] = saved
                    else:
                        import ray.train

                        ray.train.report(metrics)
                if stop:
                    status = "preempted"
                    log.warning("SIGTERM/preemption: checkpointed at step %d and stopping", step)
                    break
            if status == "completed" and end < tcfg.max_steps:
                status = "stopped"  # at train.stop_after_steps: a segment, resumable
            if status in ("completed", "stopped") and saved_at != step:
                metrics = self._metrics(stats, last, val or self._evaluate(), window_losses, window_tokens,
                                        time.perf_counter() - window_t)
                stats["last_ckpt"] = self._save(stats, metrics)
        finally:
            signals.restore()
            self.wandb.finish()

        result = {
            "status": status, "step": stats["step"], "samples_consumed": stats["consumed"],
            "world_size": w.world_size, "restarts": stats["restarts"], "nonfinite_total": stats["nonfinite_total"],
            "train_loss": last.get("loss"), "val_loss": val.get("val_loss"), "checkpoint": stats["last_ckpt"],
            "resumed_fingerprint": stats["resumed_fingerprint"], "saved_fingerprint": stats["saved_fingerprint"],
            "final_fingerprint": self._optim_fingerprint(), "error": last.get("error"), "history": history,
        }
        probe = self.stage.probe_input()
        if probe and w.rank == 0 and self.cfg.deepspeed.zero_stage < 3:
            self.engine.module.eval()
            with torch.no_grad():
                ids = torch.tensor([probe], device=w.device)
                result["probe_logits"] = self.engine.module(input_ids=ids).logits[0, -1].float().cpu().tolist()
        return result

    # ---- one optimizer step
    def _train_step(self, step: int, signals: _Signals) -> dict[str, Any]:
        import torch

        from r1ray.train.deepspeed import set_lr
        from r1ray.train.optim import lr_at
        from r1ray.train.sampler import step_micro_batches

        cfg, tcfg, w, engine = self.cfg, self.cfg.train, self.worker, self.engine
        # RNG is a pure function of (seed, step, rank): exact after a resume on any number of workers
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + w.rank)
        micro = step_micro_batches(step, tcfg.global_batch_size, tcfg.micro_batch_size, w.rank, w.world_size)
        if cfg.faults.record_samples:
            self._record_samples(step, micro)
        batches = [self.stage.make_batch(self.order.rows(idx), w.device) for idx in micro]
        local_tokens = sum(self.stage.batch_tokens(b) for b in batches)
        global_tokens = self._allreduce([float(local_tokens)])[0]
        lr = lr_at(cfg.optim, step, tcfg.max_steps)
        set_lr(engine, lr)
        engine.train()
        inject_nan = (step + 1) in cfg.faults.nonfinite_at_steps
        loss_sum, nonfinite = 0.0, 0.0
        for i, batch in enumerate(batches):
            s, _ = self.stage.loss(engine, batch)
            if inject_nan:
                s = s * float("nan")
            value = float(s.detach())
            if not math.isfinite(value):
                nonfinite = 1.0
            loss_sum += value if math.isfinite(value) else 0.0
            engine.backward(s * (self.gas * w.world_size / global_tokens))
            if i < len(batches) - 1:
                engine.step()
        if (cfg.faults.sigterm_at_step == step + 1 and w.rank == 0 and self.payload.get("driver_pid")
                and _fire_once(self.run_dir, f"sigterm-{step + 1}")):
            # as a preemption would: SIGTERM to the job's driver, which asks the workers to stop
            os.kill(int(self.payload["driver_pid"]), signal.SIGTERM)
        stop_req = float(signals.requested(step + 1, cfg.train.log_every))
        loss_total, nonfinite_any, stop = self._allreduce([loss_sum, nonfinite, stop_req])
        if nonfinite_any and cfg.deepspeed.zero_stage == 0:
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
        else:
            engine.step()
        applied = engine.was_step_applied() or cfg.deepspeed.precision == "fp16"
        gn = engine.get_global_grad_norm()
        grad_norm = float(gn) if gn is not None and math.isfinite(float(gn)) else None  # None: not tracked
        return {
            "loss": loss_total / global_tokens, "tokens": int(global_tokens), "lr": lr, "grad_norm": grad_norm,
            "nonfinite": bool(nonfinite_any) or not applied, "stop": bool(stop),
        }

    # ---- evaluation
    def _evaluate(self) -> dict[str, float]:
        import torch

        self.engine.eval()
        total, count = 0.0, 0.0
        with torch.no_grad():
            for batch in self.stage.eval_batches(self.worker, self.worker.device):
                s, n = self.stage.loss(self.engine, batch)
                total += float(s)
                count += float(n)
        total, count = self._allreduce([total, count])
        self.engine.train()
        if count == 0:
            return {}
        loss = total / count
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    # ---- metrics
    def _metrics(self, stats: dict, last: dict, val: dict, losses: list, tokens: int, seconds: float) -> dict:
        from r1ray.observe.metrics import record

        tps = tokens / seconds if seconds > 0 else 0.0
        m: dict[str, Any] = {
            "step": stats["step"], "max_steps": self.cfg.train.max_steps,
            "samples_consumed": stats["consumed"], "workers": self.worker.world_size,
            "restarts": stats["restarts"], "nonfinite_steps": stats["nonfinite_total"],
            "tokens_per_second": tps, "time": time.time(),
        }
        if losses:
            m["train_loss"] = float(np.mean(losses))
        if "lr" in last:
            m["lr"] = last["lr"]
            if last.get("grad_norm") is not None:
                m["grad_norm"] = last["grad_norm"]
        m.update(val)
        rss = _rss_bytes()
        if self.worker.rank == 0:
            for name, key in (("r1ray_train_loss", "train_loss"), ("r1ray_train_val_loss", "val_loss"),
                              ("r1ray_train_lr", "lr"), ("r1ray_train_grad_norm", "grad_norm"),
                              ("r1ray_train_tokens_per_second", "tokens_per_second"),
                              ("r1ray_train_step", "step"), ("r1ray_train_samples_consumed", "samples_consumed")):
                if key in m and m[key] is not None and math.isfinite(float(m[key])):
                    record(name, float(m[key]), **self.tags)
            self.wandb.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=stats["step"])
        if rss:
            record("r1ray_train_memory_bytes", rss, kind="rss", **self.tags)
            m["rss_bytes"] = rss
        if self.worker.use_gpu:
            import torch

            record("r1ray_train_memory_bytes", torch.cuda.memory_allocated(), kind="cuda_allocated", **self.tags)
            peak = gpu_peak_flops(torch.cuda.get_device_name(), self.cfg.deepspeed.precision)
            if peak and self.flops_per_token:
                m["mfu"] = tps * self.flops_per_token / (peak * self.worker.world_size)
                if self.worker.rank == 0:
                    record("r1ray_train_mfu", m["mfu"], **self.tags)
        return m

    def _preempted(self) -> bool:
        import ray.train

        try:
            return ray.train.get_preemption_info() is not None
        except Exception:  # noqa: BLE001 - an API that may be missing in other Ray versions
            return False

    # ---- checkpoints
    def _save(self, stats: dict, metrics: dict) -> str:
        import ray.train
        from ray.train import Checkpoint

        from r1ray.artifacts import join
        from r1ray.observe.metrics import record
        from r1ray.train.checkpoint import (
            COMPLETE,
            DS_TAG,
            HF_DIR,
            TRAINER_STATE,
            checkpoint_name,
            export_hf,
            write_export_manifest,
            write_json,
        )

        cfg, w, step = self.cfg, self.worker, stats["step"]
        t0 = time.perf_counter()
        name = checkpoint_name(step, self.attempt)
        tmp = tempfile.mkdtemp(prefix=f"r1ray-{name}-r{w.rank}-")
        try:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)
            fingerprint = self._optim_fingerprint()
            if cfg.faults.kill_during_save_at_step == step and w.rank == cfg.faults.kill_rank:
                self._maybe_kill("kill_during_save_at_step", step)
            if cfg.checkpoint.export_hf:
                export_hf(self.engine, self.stage.tokenizer, os.path.join(tmp, HF_DIR),
                          zero_stage=cfg.deepspeed.zero_stage, is_rank0=w.rank == 0)
            if w.rank == 0:
                if cfg.checkpoint.export_hf:
                    write_export_manifest(
                        os.path.join(tmp, HF_DIR), stage=self.stage.name, config=cfg,
                        inputs=self.stage.export_inputs(), checkpoint_step=step,
                        counts={"step": step, "samples_consumed": stats["consumed"]},
                    )
                write_json(os.path.join(tmp, TRAINER_STATE), {
                    "step": step, "samples_consumed": stats["consumed"], "world_size": w.world_size,
                    "zero_stage": cfg.deepspeed.zero_stage, "global_batch_size": cfg.train.global_batch_size,
                    "seed": cfg.seed, "nonfinite_total": stats["nonfinite_total"], "restarts": stats["restarts"],
                    "attempt": self.attempt, "checkpoint": join(self.run_dir, name),
                    "optim_fingerprint": fingerprint,
                    "rng": "torch.manual_seed((seed * 1000003 + step) * 1009 + rank) before every step",
                    "lr_schedule": "r1ray.train.optim.lr_at(optim, step, train.max_steps)",
                    "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                })
            metrics = dict(metrics, checkpoint_save_seconds=time.perf_counter() - t0)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        uri = join(self.run_dir, name)
        if w.rank == 0:
            write_json(join(uri, COMPLETE), {"step": step, "samples_consumed": stats["consumed"]})
        seconds = time.perf_counter() - t0
        record("r1ray_train_checkpoint_save_seconds", seconds, **self.tags)
        log.info("checkpoint step %d -> %s (%.1fs)", step, uri, seconds)
        self._barrier()
        return uri

    # ---- faults
    def _maybe_kill(self, kind: str, step: int) -> None:
        f = self.cfg.faults
        target = getattr(f, kind)
        if target == step and self.worker.rank == f.kill_rank and _fire_once(self.run_dir, f"{kind}-{step}"):
            log.warning("fault injection: SIGKILL rank %d at step %d (%s)", self.worker.rank, step, kind)
            os.kill(os.getpid(), signal.SIGKILL)

    def _record_samples(self, step: int, micro: list[np.ndarray]) -> None:
        from pathlib import Path

        from r1ray.artifacts import filesystem

        _, path = filesystem(self.run_dir)
        d = Path(path) / "samples"
        d.mkdir(parents=True, exist_ok=True)
        idx = " ".join(str(int(i)) for m in micro for i in m)
        with open(d / f"{self.attempt if hasattr(self, 'attempt') else 'x'}-rank{self.worker.rank}.txt", "a") as fh:
            fh.write(f"{step + 1} {self.worker.world_size} {idx}\n")


# Dense peak FLOP/s per GPU (bf16/fp16 tensor cores; fp32 uses TF32 where the card has it), for MFU.
_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
    "A10": 125e12, "V100": 125e12, "T4": 65e12,
}


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """Peak dense FLOP/s of a known GPU (None for unknown cards: MFU is then not reported)."""
    for key, flops in _PEAK_FLOPS.items():
        if key in device_name:
            return flops if precision != "fp32" else flops / 2
    return None


def train_flops_per_token(model: Any, seq_len: int) -> float:
    """6 x parameters + attention (12 x layers x hidden x sequence), the PaLM appendix-B estimate."""
    n = sum(p.numel() for p in model.parameters())
    c = getattr(model, "config", None)
    attn = 0.0
    if c is not None and hasattr(c, "num_hidden_layers"):
        attn = 12.0 * c.num_hidden_layers * c.hidden_size * seq_len
    return 6.0 * n + attn


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0.0


def _local_or_tmp(run_dir: str) -> str:
    from r1ray.artifacts import is_uri

    return tempfile.gettempdir() if is_uri(run_dir) else run_dir
