"""The driver side every training stage shares: build and fit the ``TorchTrainer`` and show progress.

``fit(stage, cfg, name=..., storage_path=...)`` runs ``r1ray.train.core.loop.worker_main`` on the workers with
Ray Train's failure handling (restarts from the newest checkpoint), checkpoint retention and elastic
scaling, and returns rank 0's result dict. A run directory that already holds checkpoints of the same
name is resumed by Ray Train itself. Ray Train's controller (an actor with no restarts of its own) killed
mid-run: the workers it owned go with it, and ``fit`` starts a new trainer on the same run directory, which
resumes from the newest checkpoint exactly as a rerun of the command would (counted against
``train.max_failures``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)


class TrainingFailed(RuntimeError):
    """The training run failed (after Ray Train's restarts); the message names the cause."""


def _progress_callback(level: str):
    from ray.train.v2.api.callback import UserCallback

    class ProgressCallback(UserCallback):
        """Logs step / max_steps, loss and an ETA after each report (runs in Ray Train's controller,
        whose output Ray forwards to the driver)."""

        def __init__(self) -> None:
            self._first: tuple[float, int] | None = None

        def after_report(self, run_context, metrics, checkpoint) -> None:  # noqa: ARG002
            from r1ray.observe.log import setup_logging

            setup_logging(level)
            if not metrics:
                return
            m = metrics[0]
            step, total = int(m.get("step", 0)), int(m.get("max_steps", 0))
            now = time.time()
            if self._first is None or step < self._first[1]:
                self._first = (now, step)
            t0, s0 = self._first
            eta = "?"
            if step > s0 and total:
                secs = (now - t0) / (step - s0) * (total - step)
                eta = f"{int(secs // 60)}m{int(secs % 60):02d}s"
            parts = [f"step {step}/{total}", f"workers {m.get('workers')}"]
            for key in ("train_loss", "val_loss", "lr", "tokens_per_second"):
                if m.get(key) is not None:
                    parts.append(f"{key} {m[key]:.4g}")
            parts.append(f"ETA {eta}")
            if checkpoint is not None:
                parts.append(f"checkpoint {checkpoint.path}")
            log.info(" | ".join(parts))

    return ProgressCallback()


def fit(stage: str, cfg: Any, *, name: str, storage_path: str, callbacks: Sequence[Any] = (),
        resources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit ``stage`` (``module:StageClass``) with config ``cfg``; returns rank 0's result dict.

    ``resources`` (JSON) reaches every worker's ``Stage.setup`` (e.g. the name of a rollout engine pool)."""
    import ray.exceptions
    import ray.train
    from ray.train.torch import TorchTrainer

    from r1ray.artifacts import join
    from r1ray.train.core.loop import NonFiniteLossError

    sc = cfg.scaling
    worker_resources = {"CPU": sc.cpus_per_worker, **sc.resources_per_worker}
    if sc.use_gpu:
        worker_resources["GPU"] = 1
    scaling = ray.train.ScalingConfig(
        num_workers=sc.num_workers if isinstance(sc.num_workers, int) else tuple(sc.num_workers),
        use_gpu=sc.use_gpu, resources_per_worker=worker_resources,
        elastic_resize_monitor_interval_s=cfg.train.elastic_resize_interval_s,
    )
    run_config = ray.train.RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        callbacks=[_progress_callback(cfg.logging.level), *callbacks],
    )
    run_dir = join(storage_path, name)
    payload = {"stage": stage, "config": cfg.model_dump(mode="json"), "run_dir": run_dir,
               "driver_pid": os.getpid(), "resources": resources or {}}
    log.info("training %s: %s workers, run directory %s", name, sc.num_workers, run_dir)
    controller_deaths = 0
    while True:
        trainer = TorchTrainer(
            _worker_main, train_loop_config=payload,
            scaling_config=scaling, run_config=run_config,
        )
        with _stop_on_sigterm(run_dir), _keep_sigint_handler():
            try:
                result = trainer.fit()
                break
            except ray.exceptions.ActorDiedError as e:  # Ray Train's controller (fit's only direct actor) died
                controller_deaths += 1
                if 0 <= cfg.train.max_failures < controller_deaths:
                    raise TrainingFailed(f"training run {name}: Ray Train's controller died {controller_deaths} "
                                         f"time(s), more than train.max_failures={cfg.train.max_failures}: {e}") from e
                released = _release_placement_groups_of(getattr(e, "actor_id", None))
                log.warning("training %s: Ray Train's controller died (%s); released its %d placement group(s) and "
                            "starting a new one on %s, which resumes from the newest checkpoint (%d of "
                            "train.max_failures=%d)", name, str(e).splitlines()[0][:200], released, run_dir,
                            controller_deaths, cfg.train.max_failures)
    if result.error is not None:
        raise TrainingFailed(f"training run {name} failed: {result.error}") from result.error
    out = result.return_value
    if not isinstance(out, dict):
        raise TrainingFailed(f"training run {name} returned no result (got {out!r})")
    if out.get("status") == "nonfinite":
        raise NonFiniteLossError(out["error"])
    if out.get("status") == "setup_error":
        from r1ray.train.core.preflight import SetupError

        raise SetupError(f"training run {name} cannot start: {out['error']}")
    return out


def _release_placement_groups_of(actor_id: str | None) -> int:
    """Remove the placement groups the dead actor ``actor_id`` (hex) created: a killed Ray Train controller's worker
    group. Ray Train's own cleaner (a detached actor) notices the death only through the State API, which needs the
    dashboard; with ``ray.include_dashboard=false`` the group would hold its CPUs for the rest of the job, and the
    next controller's reward tasks would wait for them forever. Reads the GCS placement-group table (Ray-internal
    protobuf, the only place that names a group's creator); a failure is logged, never raised."""
    if not actor_id:
        log.warning("Ray Train's controller died without an actor id: its placement group is left to Ray Train's "
                    "cleaner")
        return 0
    try:
        import ray
        from ray._private.state import state as global_state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        removed = 0
        for raw in global_state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if pg.creator_actor_id.hex() == actor_id and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
        return removed
    except Exception as e:  # noqa: BLE001 - a Ray release that changed its internals: say so, go on
        log.warning("could not release the dead controller's placement groups (%s: %s); they hold their resources "
                    "until Ray Train's cleaner or the job ends", type(e).__name__, e)
        return 0


@contextmanager
def _keep_sigint_handler() -> Iterator[None]:
    """Put the driver's SIGINT handler back after ``fit``. Ray Train's ``fit`` (main thread) installs a handler that
    closes over its controller's actor handle and never removes it: the handle then outlives the run, and so does
    the finished controller process, until the driver exits or the next ``fit`` replaces the handler (the chaos
    benchmark found one alive 30 s after its run returned). Restoring the handler drops the handle, and Ray ends
    the controller; Ctrl-C during ``fit`` still aborts the run gracefully, as Ray intends."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler installed outside Python, which we cannot put back
            signal.signal(signal.SIGINT, previous)


@contextmanager
def _stop_on_sigterm(run_dir: str) -> Iterator[None]:
    """While training: SIGTERM to this driver writes ``<run_dir>/STOP``, and the workers checkpoint and stop
    at the next step boundary (the run returns with status ``preempted``). A stale request is cleared first.

    ``trainer.fit()`` blocks the main thread in C, where Python signal handlers do not run; so the signal is
    also delivered through ``signal.set_wakeup_fd`` to a watcher thread, which writes the request at once.
    """
    import select
    import socket
    import threading

    from r1ray.artifacts import exists, filesystem, join, write_bytes_atomic
    from r1ray.train.core.loop import STOP_FILE

    stop = join(run_dir, STOP_FILE)

    def clear() -> None:
        if exists(stop):
            fs, path = filesystem(stop)
            fs.delete_file(path)

    requested = threading.Event()

    def request() -> None:
        if not requested.is_set():
            requested.set()
            log.warning("SIGTERM: asking the workers to checkpoint and stop (%s)", stop)
            write_bytes_atomic(stop, b"SIGTERM\n")

    clear()
    if threading.current_thread() is not threading.main_thread():  # e.g. inside a Tune trial: no handler
        yield
        return
    rsock, wsock = socket.socketpair()
    wsock.setblocking(False)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            ready, _, _ = select.select([rsock], [], [], 0.5)
            if ready and signal.SIGTERM in rsock.recv(256):
                request()

    old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: request())
    old_fd = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="r1ray-sigterm", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(timeout=2)
        signal.set_wakeup_fd(old_fd)
        # a SIGTERM whose Python-level handler has not run yet is a stop request we already served: swallow
        # it rather than hand it to the previous handler (Ray's driver handler exits the process)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        time.sleep(0.05)  # pending Python-level handlers run here
        signal.signal(signal.SIGTERM, old_handler)
        rsock.close()
        wsock.close()
        clear()


def _worker_main(payload: dict[str, Any]) -> dict[str, Any]:
    from r1ray.train.core.loop import worker_main

    return worker_main(payload)
