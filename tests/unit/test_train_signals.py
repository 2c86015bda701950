"""SIGTERM to a training driver becomes a stop request at once, even while its main thread is blocked in C."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_sigterm_while_blocked_writes_stop_and_the_driver_survives(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, subprocess, sys, threading
        from r1ray.train.core.launch import _stop_on_sigterm
        d = {str(tmp_path)!r}
        signal.signal(signal.SIGTERM, lambda s, f: sys.exit(15))  # what Ray's driver installs
        seen = []
        with _stop_on_sigterm(d):
            threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
            threading.Timer(1.5, lambda: seen.append(os.path.exists(d + "/STOP"))).start()
            subprocess.run(["sleep", "2.5"])  # the main thread is blocked in C, as in trainer.fit()
        print("stop written while blocked:", seen == [True])
        print("cleared:", not os.path.exists(d + "/STOP"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr
    assert "stop written while blocked: True" in out.stdout
    assert "cleared: True" in out.stdout
