"""The command-line shell every job shares: ``--help``, ``--print-config``, config errors, logging setup.

A job is ``main(ConfigClass, run)``: parse and validate the config before any compute, then call ``run``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from r1ray.config import ConfigError, R1Config, format_help, load_config, parse_args, to_yaml
from r1ray.observe.log import get_logger, setup_logging

C = TypeVar("C", bound=R1Config)


def main(cls: type[C], run: Callable[[C], Any], argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Parse ``argv`` into ``cls``, then ``run(cfg)``. Exit code 2 on a bad config, before any compute."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(sys.argv[0]).name
    try:
        _, _, flags = parse_args(argv)
        if "help" in flags:
            sys.stdout.write(format_help(cls, prog) + "\n")
            raise SystemExit(0)
        cfg = load_config(cls, argv)
    except ConfigError as e:
        sys.stderr.write(f"{prog}: {e}\n")
        raise SystemExit(2) from None
    if "print-config" in flags:
        sys.stdout.write(to_yaml(cfg))
        raise SystemExit(0)
    logging_cfg = getattr(cfg, "logging", None)
    setup_logging(getattr(logging_cfg, "level", "INFO"))
    get_logger("r1ray.cli").debug("resolved config:\n%s", to_yaml(cfg))
    return run(cfg)
