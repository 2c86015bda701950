"""One logger tree under ``r1ray``, rank-aware: rank 0 logs at the configured level, other ranks only
warnings and errors (set ``R1RAY_LOG_ALL_RANKS=1`` to hear every rank). Nothing is configured at import;
jobs and training workers call ``setup_logging`` once.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s r1ray%(rank_tag)s %(name)s: %(message)s"
_HANDLER_NAME = "r1ray-stream"


def current_rank() -> int:
    """This process's global training rank, 0 outside training workers."""
    for var in ("RANK", "R1RAY_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = current_rank()
        record.rank_tag = f"[rank {rank}]" if "RANK" in os.environ else ""
        if rank != 0 and record.levelno < logging.WARNING and os.environ.get("R1RAY_LOG_ALL_RANKS") != "1":
            return False
        return True


def setup_logging(level: str | int = "INFO") -> logging.Logger:
    """Attach one stream handler to the ``r1ray`` logger (idempotent) and set its level."""
    root = logging.getLogger("r1ray")
    root.setLevel(level)
    if not any(getattr(h, "name", None) == _HANDLER_NAME for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.name = _HANDLER_NAME
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``r1ray`` tree (pass ``__name__``)."""
    return logging.getLogger(name if name.startswith("r1ray") else f"r1ray.{name}")
