"""The console shows r1ray's progress, not Ray Train's per-report line (which still reaches Ray's log files)."""

from __future__ import annotations

import logging


def test_ray_trains_report_lines_are_kept_off_the_console_only():
    from ray.train.v2._internal.execution import context as train_context

    from r1ray.train.core.loop import _quiet_report_lines

    class Capture(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    class SessionFileHandler(Capture):  # Ray Train's file handler's class name: left alone
        pass

    console, files = Capture(), SessionFileHandler()
    root = logging.getLogger()
    root.addHandler(console)
    root.addHandler(files)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        _quiet_report_lines()
        _quiet_report_lines()  # idempotent: one filter per handler
        ray_logger = logging.getLogger(train_context.__file__)
        ray_logger.info("Reporting training result 3: TrainingReport(...)")
        ray_logger.warning("a warning still shows")
        logging.getLogger("r1ray.train.core.launch").info("step 3/80 | train_loss 4.2")
    finally:
        root.removeHandler(console)
        root.removeHandler(files)
        root.setLevel(old)
    assert console.lines == ["a warning still shows", "step 3/80 | train_loss 4.2"]
    assert "Reporting training result 3: TrainingReport(...)" in files.lines
    assert sum(type(f).__name__ == "_DropReports" for f in console.filters) == 1
