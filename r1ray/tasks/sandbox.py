"""A child process that runs reward functions on hostile completions, killed and replaced on a timeout.

Why a process: a thread cannot be stopped, and ``signal.setitimer``/``alarm`` (math-verify's own timeout) works
only in the main thread (Ray runs tasks in other threads too) and cannot interrupt one long C call
(``10**(10**10)`` inside sympy, a regex scan). Killing a process always works.

How it stays cheap: the child (``python -m r1ray.tasks.sandbox_child``) is persistent and imports everything a
verifier needs (sympy, math-verify) *before* it reports ready, so an import is never charged to a sample. A
batch goes over a socket in one message and the child sends results back every few milliseconds. Progress is a
heartbeat in shared memory (an mmap of an unlinked temporary file): ``(sample, reward, start time)``, written by the child around each
call; the parent wakes every few milliseconds only while it waits, and kills the child once the running call
is older than ``timeout_s``. That call scores None (the caller counts it), and a new child resumes at the next
call. The child also runs under an address-space limit (``RLIMIT_AS``), so a runaway allocation ends in a
``MemoryError`` (a failure) instead of swapping the machine.

Why a fresh interpreter rather than multiprocessing's fork/forkserver/spawn: fork is unsafe in a threaded
parent (a Ray worker), and forkserver/spawn re-run the parent's main script in the child, which breaks any
script without an ``if __name__ == "__main__"`` guard. A fresh interpreter takes ~1-3 s to import sympy, so a
warm spare child waits beside the working one: a kill costs the timeout and nothing more.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from r1ray.observe.log import get_logger

__all__ = ["DEFAULT_MEMORY_LIMIT", "START_TIMEOUT_S", "Sandbox", "default_sandbox"]

log = get_logger(__name__)

DEFAULT_MEMORY_LIMIT = 4 << 30
"""Address-space limit of the child (bytes): far above what verifying one completion needs."""
START_TIMEOUT_S = 120.0
"""How long a new child may take to import its verifiers (a loaded 2-core machine takes a few seconds)."""
STALL_S = 60.0
"""A child silent this long outside any reward call (e.g. stuck unpickling a huge batch) is replaced."""
DEATH_RETRIES = 1
"""How often a call (or the gap before a sample) whose child died is run again in a fresh child before the call is
blamed: a child killed from outside (an operator, the OOM killer, a chaos test) changes no score; one that a
completion crashes every time scores None after ``1 + DEATH_RETRIES`` children."""

_IDLE = 0.0
_SEND_EVERY_S = 0.005
_READY = "ready"


class _Child:
    """One ``python -m r1ray.tasks.sandbox_child`` process, its socket and its heartbeat."""

    def __init__(self, memory_limit: int | None):
        with tempfile.TemporaryFile() as f:  # unlinked at once; a memfd would be Linux-only
            self.hb_fd = os.dup(f.fileno())
        os.ftruncate(self.hb_fd, 3 * 8)
        self.hb = (ctypes.c_double * 3).from_buffer(mmap.mmap(self.hb_fd, 3 * 8))
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the r1ray package
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        args = [sys.executable, "-m", "r1ray.tasks.sandbox_child", str(theirs.fileno()), str(self.hb_fd),
                str(memory_limit or 0)]
        self.proc = subprocess.Popen(args, pass_fds=(theirs.fileno(), self.hb_fd), env=env,
                                     stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        msg = None
        try:
            if self.conn.poll(START_TIMEOUT_S):
                msg = self.conn.recv()
        except (EOFError, OSError):
            pass
        if msg != _READY:
            self.kill()
            raise RuntimeError(f"reward sandbox: the child did not start within {START_TIMEOUT_S:g}s (exit code "
                               f"{self.proc.returncode}); its stderr has the error")
        self.ready = True

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.conn.close()
        os.close(self.hb_fd)  # the map itself goes with its last reference


class Sandbox:
    """A persistent child process; ``run`` is thread-safe (callers take turns).

    Once the first child is ready, a spare is started beside it (idle, ~75 MB RSS with sympy loaded), so a kill
    costs the timeout and no start-up: the spare takes over and a new spare starts in the background."""

    def __init__(self, *, memory_limit: int | None = DEFAULT_MEMORY_LIMIT):
        self.memory_limit = memory_limit
        self.restarts = 0
        """How many children were killed (timeouts and crashes) over this sandbox's life."""
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._spare: _Child | None = None

    def _ensure(self) -> _Child:
        if self._child is not None and not self._child.alive():
            self._replace()
        if self._child is None:
            self._child, self._spare = self._spare or _Child(self.memory_limit), None
        self._child.wait_ready()
        if self._spare is None:  # started only now, so the two imports don't compete for the CPUs
            self._spare = _Child(self.memory_limit)
        return self._child

    def _replace(self) -> None:
        """Kill the current child; the spare (started now if there was none) takes over at the next call."""
        self._child.kill()
        self.restarts += 1
        self._child, self._spare = self._spare, None  # _ensure starts the next spare once this one is ready

    def close(self) -> None:
        with self._lock:
            for c in (self._child, self._spare):
                if c is not None:
                    c.kill()
            self._child = self._spare = None

    def __del__(self):
        for c in (getattr(self, "_child", None), getattr(self, "_spare", None)):
            if c is not None:
                try:
                    c.proc.kill()
                except Exception:  # noqa: BLE001 - interpreter shutdown: nothing to report to
                    pass

    def run(
        self, items: Sequence[tuple[Any, Any, Any]], names: Sequence[str], timeout_s: float
    ) -> list[list[float | None]]:
        """Values of every reward in ``names`` on every ``(completion, problem, ctx)`` item; None where a call
        raised, returned a non-number or ran past ``timeout_s`` (then the child is killed and replaced)."""
        if not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        n, names = len(items), list(names)
        out: list[list[float | None] | None] = [None] * n
        skip: set[tuple[int, int]] = set()
        self._deaths: dict[tuple[int, int], int] = {}  # (sample, reward or -1 between calls) -> children lost
        poll = min(0.01, timeout_s / 10)
        with self._lock:
            pos = 0
            while pos < n:
                child = self._ensure()
                try:
                    child.conn.send(([(i, *items[i]) for i in range(pos, n)], names, skip))
                except (OSError, EOFError):  # it died between batches: replace it and resend
                    self._replace()
                    continue
                pos = self._collect(child, out, pos, n, names, skip, timeout_s, poll)
        return out  # type: ignore[return-value]

    def _collect(self, child: _Child, out, pos, n, names, skip, timeout_s, poll) -> int:
        """Read results until the batch ends (returns n) or the child is replaced (returns where to resume)."""
        hb, last = child.hb, time.monotonic()
        while True:
            msg: Any = ...
            try:
                if child.conn.poll(poll):
                    msg = child.conn.recv()
            except (EOFError, OSError):
                child.proc.wait(5)  # it died (a crash, or the kernel's OOM killer): blame the running call
            if msg is None:
                return n
            if msg is not ...:
                for i, values in msg:
                    out[i], pos = values, i + 1
                last = time.monotonic()
                continue
            dead = not child.alive()
            started = hb[2]
            if started != _IDLE and (dead or time.monotonic() - started > timeout_s):
                i, ri = int(hb[0]), int(hb[1])
                if hb[2] != started:  # it moved on while we looked
                    continue
                if dead and self._retry_after_death((i, ri), f"during reward {names[ri]!r} on sample {i}"):
                    return pos
                log.warning("reward %r on sample %d %s; replacing the sandbox process", names[ri], i,
                            "crashed it" if dead else f"ran past {timeout_s:g}s")
                skip.add((i, ri))
                self._replace()
                return pos  # results after pos were not sent yet: they are recomputed (a few ms of work)
            if dead and started == _IDLE and self._retry_after_death((pos, -1), f"before sample {pos}"):
                return pos
            if dead or time.monotonic() - last > max(STALL_S, timeout_s):
                log.warning("reward sandbox %s at sample %d; failing that sample and replacing the process",
                            "died" if dead else "stalled", pos)
                skip.update((pos, ri) for ri in range(len(names)))
                self._replace()
                return pos


    def _retry_after_death(self, key: tuple[int, int], where: str) -> bool:
        """The child died ``where``: replace it and run that part again, unless it already died there
        ``DEATH_RETRIES`` times (then the caller blames the call)."""
        if self._deaths.get(key, 0) >= DEATH_RETRIES:
            return False
        self._deaths[key] = self._deaths.get(key, 0) + 1
        log.warning("the reward sandbox process died %s (killed from outside, or the call crashed it); running it "
                    "again in a fresh process", where)
        self._replace()
        return True


_default: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox() -> Sandbox:
    """This process's shared sandbox, created at first use (its child starts at the first ``run``)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Sandbox()
        return _default
