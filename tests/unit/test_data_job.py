"""The data job's printed next step is a command that the pretraining job's config accepts as is."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from r1ray.config import load_config
from r1ray.train.stages.pretrain import PretrainConfig
from tests.helpers import load_job

REPO = Path(__file__).resolve().parents[2]




@pytest.mark.parametrize("uri", ["/tmp/out/data/debug", "s3://bucket/r1ray/data/my corpus", "outputs/data/a=b"])
def test_next_command_loads_as_a_pretrain_config(uri):
    cmd = shlex.split(load_job("prepare_data").next_command(uri))
    assert cmd[:2] == ["python", "jobs/pretrain.py"] and (REPO / cmd[1]).is_file()
    cfg = load_config(PretrainConfig, cmd[2:])
    assert cfg.data.path == uri


def test_the_old_next_command_was_rejected():
    # What the job printed before: `data=<uri>` is not a field path; the config must refuse it.
    with pytest.raises(Exception, match="data"):
        load_config(PretrainConfig, ["data=/tmp/out/data/debug"])
