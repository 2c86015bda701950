"""Chaos for r1ray runs: SIGKILL random processes of a running stage at random moments, from outside it.

``Chaos`` is a thread beside a run (a test, ``benchmarks/chaos.py``). It finds its victims the way an operator
would, by process, not through r1ray's own hooks: Ray names each actor's process after its class
(``ray::RayTrainWorker``, ``ray::_EngineActor``, ``ray::_PoolController`` in ``/proc/<pid>/cmdline``), so a
victim kind is a process-title prefix. At each moment (a random gap after the last kill) it picks a kind at
random among those with a live process, one of its processes at random, and sends SIGKILL. Each kill is
recorded with its victim, pid, time, and the run's progress then (``progress()``: the last completed step and the
phase, when the caller can say), so a report can give the seconds from each kill to the next completed step.

What a caller checks afterwards (the harness only kills): the run's result equals the uninterrupted run's byte
for byte, every sample was trained exactly once, and nothing is left behind (``leftovers``).

Linux only (``/proc``). Nothing here imports a stage: it is the outside of the run.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

VICTIMS: dict[str, str] = {
    "learner": "ray::RayTrainWorker",  # a Ray Train worker: a learner rank (DeepSpeed engine, data cursor)
    "engine": "ray::_EngineActor",  # a rollout / inference engine of an engine pool
    "pool_controller": "ray::_PoolController",  # the engine pool's controller (owns the engines)
    "train_controller": "ray::TrainController",  # Ray Train's controller (owns the learner workers)
    "reward": "ray::_score_task",  # a Ray task scoring a unit's completions (while it runs)
    "sandbox": "python -m r1ray.tasks.sandbox_child",  # a reward sandbox child (r1ray.tasks.sandbox)
}
"""Victim kinds -> the process-title prefix Ray gives their processes (for the sandbox child: its command after
the interpreter's path)."""

RUN_SCOPED = ("learner", "engine", "pool_controller", "train_controller")
"""Kinds a finished run must not leave behind. Reward workers and their sandbox children belong to Ray's pool of
idle worker processes, which outlives a run by design."""


def processes(prefix: str) -> list[int]:
    """PIDs of live processes whose command line starts with ``prefix`` (Ray's process titles), or whose command
    after the interpreter's path does (``python -m ...``)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[-1].split()[0]
        except OSError:  # gone meanwhile
            continue
        argv0, _, rest = cmd.partition(" ")
        if (cmd.startswith(prefix) or (os.path.basename(argv0).startswith("python") and ("python " + rest)
                                       .startswith(prefix))) and state not in (b"Z", b"X"):
            out.append(int(entry))
    return sorted(out)


@dataclass
class Kill:
    victim: str
    pid: int
    at: float
    """``time.time()`` of the SIGKILL."""
    progress: str = ""
    """The run's progress at that moment (``progress()``), e.g. ``step 4, generate``."""


@dataclass
class Chaos:
    """Kill ``kills`` random victims among ``kinds``, one every ``gap_s`` (uniform random) seconds, starting after
    ``first_after_s``; ``seed`` fixes the choices (not the moments the run reaches, which vary)."""

    kinds: Sequence[str] = ("learner", "engine", "pool_controller")
    kills: int = 5
    gap_s: tuple[float, float] = (3.0, 12.0)
    first_after_s: float = 5.0
    seed: int = 0
    progress: Callable[[], str] | None = None
    wait_until: Callable[[], bool] | None = None
    """Hold the first kill until this is true (e.g. the first step completed), then ``first_after_s`` more."""
    cover_kinds: bool = True
    """The first kills go to the kinds not killed yet, in the order of ``kinds`` (skipping those with no live
    process at that moment), so the first kind is always hit; then kinds at random. The process and every moment
    stay random."""
    done: list[Kill] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in VICTIMS]
        if unknown:
            raise ValueError(f"unknown victim kind(s) {unknown}; known: {sorted(VICTIMS)}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="r1ray-chaos", daemon=True)

    def __enter__(self) -> Chaos:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        while self.wait_until is not None and not self.wait_until():
            if self._stop.wait(0.1):
                return
        if self._stop.wait(self.first_after_s):
            return
        while len(self.done) < self.kills and not self._stop.is_set():
            alive = {k: processes(VICTIMS[k]) for k in self.kinds}
            kinds = [k for k in self.kinds if alive[k]]
            if not kinds:  # between attempts (everything restarting), or the run is over
                self.skipped.append(f"{time.time():.1f}: no live victim")
                if self._stop.wait(0.5):
                    return
                continue
            fresh = [k for k in kinds if k not in {d.victim for d in self.done}]
            # a kind not killed yet goes first, in the order of ``kinds`` (when it is alive); then any, at random
            kind = fresh[0] if self.cover_kinds and fresh else rng.choice(kinds)
            pid = rng.choice(alive[kind])
            progress = ""
            if self.progress is not None:
                try:
                    progress = self.progress()
                except Exception as e:  # noqa: BLE001 - a report detail; the kill goes on
                    progress = f"unknown ({type(e).__name__})"
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended between the scan and the kill: pick again
                continue
            self.done.append(Kill(kind, pid, time.time(), progress))
            if self._stop.wait(rng.uniform(*self.gap_s)):
                return

    def report(self, step_times: Sequence[tuple[int, float]] = ()) -> list[str]:
        """One line per kill: victim, pid, progress, and seconds until the next completed step (``step_times``:
        ``(step, time.time() when it completed)``)."""
        lines = []
        for k in self.done:
            after = [(t - k.at, s) for s, t in step_times if t > k.at]
            nxt = f"step {min(after)[1]} completed {min(after)[0]:.1f} s later" if after else "no later step"
            lines.append(f"{k.victim:15s} pid {k.pid:7d}  at {k.progress or '?':24s} {nxt}")
        return lines


def seconds_to_next_step(kills: Sequence[Kill], step_times: Sequence[tuple[int, float]]) -> dict[str, list[float]]:
    """Per victim kind: the seconds from each kill to the next completed step (kills with no later step left
    out)."""
    out: dict[str, list[float]] = {}
    for k in kills:
        later = [t - k.at for _, t in step_times if t > k.at]
        if later:
            out.setdefault(k.victim, []).append(min(later))
    return out


def leftovers(kinds: Sequence[str] = RUN_SCOPED) -> dict[str, list[int]]:
    """Processes of ``kinds`` still alive (after a run and its cleanup there should be none)."""
    return {k: pids for k in kinds if (pids := processes(VICTIMS[k]))}
