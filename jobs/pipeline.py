"""One config from corpus to served reasoning model: data -> pretrain -> SFT -> GRPO -> (distil) -> evaluate ->
(compress) -> serve, each stage on the artifact of the one before, unchanged stages skipped.

    python jobs/pipeline.py                                        # the embedded default, left serving
    python jobs/pipeline.py --config configs/pipeline/debug.yaml   # CI-sized, returns after deploying
    python jobs/pipeline.py --from sft --until evaluate            # a slice (earlier artifacts reused)
    ray job submit -- python jobs/pipeline.py --config configs/pipeline/default.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from r1ray.cli import main
from r1ray.pipeline.config import PipelineConfig

CONFIG = PipelineConfig
DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "default.yaml"


def argv_with_stage_flags(argv: list[str]) -> list[str]:
    """``--from STAGE`` / ``--until STAGE`` are ``from_stage=STAGE`` / ``until_stage=STAGE``; with no
    ``--config`` the embedded default config is used."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--from", "--until") and i + 1 < len(argv):
            out.append(f"{a[2:]}_stage={argv[i + 1]}")
            i += 2
            continue
        if a.startswith(("--from=", "--until=")):
            flag, value = a[2:].split("=", 1)
            out.append(f"{flag}_stage={value}")
        else:
            out.append(a)
        i += 1
    if not any(a == "--config" or a == "-c" or a.startswith("--config=") for a in out) and DEFAULT.exists():
        out = ["--config", str(DEFAULT), *out]
    return out


def run(cfg: PipelineConfig):
    from r1ray.pipeline.run import PipelineFailed, serve_forever, summary
    from r1ray.pipeline.run import run as run_pipeline

    def on_served(result) -> None:
        print(summary(result), flush=True)
        serve_forever(cfg)

    try:
        result = run_pipeline(cfg, on_served=on_served)
    except PipelineFailed as e:
        print(f"pipeline {cfg.run_name}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if not result.serve_url:
        print(summary(result))
    return result


if __name__ == "__main__":
    main(CONFIG, run, argv_with_stage_flags(sys.argv[1:]))
