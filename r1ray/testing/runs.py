"""What a run leaves in its run directory, read from outside it (tests, benchmarks): no stage imports."""

from __future__ import annotations

import json
from pathlib import Path


def grpo_rollouts(run_dir: str | Path) -> dict[int, dict]:
    """step -> rank 0's rollout record of that step (``<run_dir>/grpo/rollouts-rank0.jsonl``); a step run again
    after a restart keeps its newest record."""
    out: dict[int, dict] = {}
    for line in Path(run_dir, "grpo", "rollouts-rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out
