"""The CI recipe on the default corpus: the data stage's debug recipe (a slice of the default corpus), then
``configs/pretrain/debug.yaml`` through the job's own ``run``: the loss falls, the validation loss clearly
beats the unigram baseline on the same data, and the summary names the export and the serve command."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1ray.config import load_config
from tests.helpers import load_job

REPO = Path(__file__).resolve().parents[2]
RAY_NUM_CPUS = 3

pytestmark = pytest.mark.slow




def test_debug_recipe_on_the_default_corpus(ray_local, tmp_path, capsys):
    from r1ray.data.pipeline import run as prepare

    data_job, job = load_job("prepare_data"), load_job("pretrain")
    data = prepare(load_config(data_job.CONFIG, ["--config", str(REPO / "configs/prepare_data/debug.yaml"),
                                                 f"storage.root={tmp_path}"]))
    cfg = load_config(job.CONFIG, ["--config", str(REPO / "configs/pretrain/debug.yaml"), f"data.path={data}",
                                   f"storage.root={tmp_path}", f"data.cache_dir={tmp_path}/cache",
                                   "logging.wandb.mode=disabled"])
    r = job.run(cfg)
    out = capsys.readouterr().out
    history = r.worker_result["history"]
    assert history[0][1] > history[-1][1] + 1.0  # the training loss falls by more than a nat
    assert r.val_loss < r.unigram_val_loss - 0.5, (r.val_loss, r.unigram_val_loss)
    assert r.export_path == str(tmp_path / "runs" / "debug" / "final")
    assert f"python jobs/serve.py model_path={r.export_path}" in out
    assert "unigram baseline" in out
