"""The reward sandbox's child process (``python -m r1ray.tasks.sandbox_child``): imports every verifier, then
scores ``(items, names, skip)`` batches sent by ``r1ray.tasks.sandbox.Sandbox``, with a heartbeat in shared
memory the parent watches to kill a reward call that overruns its timeout. Its own module so that the
parent side (``sandbox``) never imports the rewards that import it."""

from __future__ import annotations

import ctypes
import mmap
import signal
import sys
import time
from multiprocessing.connection import Connection

from r1ray.tasks.sandbox import _IDLE, _READY, _SEND_EVERY_S


def _child(sock_fd: int, hb_fd: int, memory_limit: int) -> None:
    """``(items, names, skip)`` in; lists of ``(pos, values)`` out every few ms, then None."""
    # Ctrl-C in a terminal signals the whole process group: the parent decides when this child ends (it
    # exits when the parent's end of the connection closes), without a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from r1ray.tasks import registry  # noqa: F401 - every built-in task, imported before we report ready
    from r1ray.tasks.mathcheck import warm_up
    from r1ray.tasks.rewards import run_reward

    warm_up()

    if memory_limit:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit if hard == resource.RLIM_INFINITY
                                                else min(memory_limit, hard), hard))
    hb = (ctypes.c_double * 3).from_buffer(mmap.mmap(hb_fd, 3 * 8))
    conn = Connection(sock_fd)
    try:
        conn.send(_READY)
    except OSError:  # the parent left while we were importing
        return
    while True:
        try:
            items, names, skip = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        done: list[tuple[int, list[float | None]]] = []
        sent = time.monotonic()
        for pos, completion, problem, ctx in items:
            values: list[float | None] = []
            for ri, name in enumerate(names):
                if (pos, ri) in skip:
                    values.append(None)
                    continue
                hb[0], hb[1], hb[2] = pos, ri, time.monotonic()
                values.append(run_reward(name, completion, problem, ctx))
                hb[2] = _IDLE
            done.append((pos, values))
            if time.monotonic() - sent > _SEND_EVERY_S:  # a message per few ms, not per sample
                conn.send(done)
                done, sent = [], time.monotonic()
        if done:
            conn.send(done)
        conn.send(None)


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
