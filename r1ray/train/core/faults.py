"""Fault injection and drill instruments of the training loop, in one place: what ``faults.*`` asks for (a
SIGKILL of one rank at a step or in the middle of a checkpoint save, a SIGTERM to the job's driver as a
preemption would send, every sample index recorded for exactly-once checks). Each fault fires once per run: a
marker file under ``<run_dir>/faults/`` remembers it across the restart it causes. Stages with faults of their
own (GRPO's engine and pool-controller kills) use ``fire_once`` too.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["FaultHooks", "fire_once"]


def _local(run_dir: str) -> Path:
    from r1ray.artifacts import filesystem

    return Path(filesystem(run_dir)[1])


def fire_once(run_dir: str, name: str) -> bool:
    """True the first time ``name`` is asked for in this run (a marker file in the run directory)."""
    marker = _local(run_dir) / "faults" / name
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


class FaultHooks:
    """The ``faults`` block of a training config, for one worker."""

    def __init__(self, faults: Any, run_dir: str, rank: int, world_size: int, driver_pid: int | None) -> None:
        self.cfg, self.run_dir, self.rank, self.world_size, self.driver_pid = faults, run_dir, rank, world_size, driver_pid

    def maybe_kill(self, kind: str, step: int) -> None:
        """SIGKILL this worker if ``faults.<kind>`` names ``step`` and this is ``faults.kill_rank`` (once)."""
        target = getattr(self.cfg, kind)
        if target == step and self.rank == self.cfg.kill_rank and fire_once(self.run_dir, f"{kind}-{step}"):
            log.warning("fault injection: SIGKILL rank %d at step %d (%s)", self.rank, step, kind)
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_sigterm_driver(self, step: int) -> None:
        """Before step ``faults.sigterm_at_step``: SIGTERM to the job's driver, which asks the workers to stop."""
        if (self.cfg.sigterm_at_step == step + 1 and self.rank == 0 and self.driver_pid
                and fire_once(self.run_dir, f"sigterm-{step + 1}")):
            os.kill(int(self.driver_pid), signal.SIGTERM)

    def nonfinite(self, step: int) -> bool:
        """Whether step ``step`` (0-based) gets an injected non-finite loss."""
        return (step + 1) in self.cfg.nonfinite_at_steps

    def record_samples(self, step: int, attempt: str, micro: list[Any]) -> None:
        """With ``faults.record_samples``: append this step's sample indices to ``<run_dir>/samples/``."""
        if not self.cfg.record_samples:
            return
        d = _local(self.run_dir) / "samples"
        d.mkdir(parents=True, exist_ok=True)
        idx = " ".join(str(int(i)) for m in micro for i in m)
        with open(d / f"{attempt}-rank{self.rank}.txt", "a") as fh:
            fh.write(f"{step + 1} {self.world_size} {idx}\n")
