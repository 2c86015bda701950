"""Preflight: the optimizer rules, and machines simulated by their environment (PATH, CUDA_HOME,
TORCH_CUDA_ARCH_LIST, DeepSpeed's prebuilt-op record): the default GPU path needs nothing compiled; an op that
must be compiled fails at once with the cause and the fix named; ``9.0a`` is reproduced against the installed
DeepSpeed and sanitised."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from r1ray.config import DeepSpeedConfig, OptimConfig
from r1ray.train.core import preflight as pf
from r1ray.train.core.preflight import (
    SetupError,
    apply_cuda_arch_workaround,
    check_op,
    choose_optimizer,
    preflight,
    raise_on_problems,
    sanitize_cuda_arch_list,
)


@pytest.mark.parametrize("name, offload, gpu, choice, ops", [
    ("adamw", False, True, "torch_fused_adamw", ()),
    ("adamw", False, False, "torch_fused_adamw", ()),
    ("adamw", True, True, "deepspeed_cpu_adam", ("cpu_adam",)),
    ("adamw", True, False, "deepspeed_cpu_adam", ("cpu_adam",)),
    ("lion", False, True, "r1ray_lion", ()),
    ("lion", True, True, "deepspeed_cpu_lion", ("cpu_lion",)),
])
def test_optimizer_rules(name, offload, gpu, choice, ops):
    ds = DeepSpeedConfig(zero_stage=2, offload_optimizer=offload)
    c = choose_optimizer(ds, OptimConfig(name=name, lr=3e-4), use_gpu=gpu)
    assert (c.name, c.ops) == (choice, ops)
    if c.section is not None:
        assert c.section["params"]["lr"] == 3e-4
        assert c.section["params"].get("torch_adam", False) == (choice.startswith("torch"))
        assert c.section["params"].get("fused", False) == (choice == "torch_fused_adamw")
    else:
        assert choice == "r1ray_lion"


def _bare_path(tmp_path: Path, *tools: str) -> str:
    """A PATH holding only fake executables named ``tools``."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for t in tools:
        f = d / t
        f.write_text("#!/bin/sh\nexit 0\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return str(d)


def _fake_nvcc(home: Path, script: str) -> str:
    (home / "bin").mkdir(parents=True, exist_ok=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n" + script + "\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(home)


@pytest.fixture
def nothing_prebuilt(monkeypatch, tmp_path):
    monkeypatch.setattr(pf, "installed_ops", lambda: ({}, None))
    monkeypatch.setattr(pf, "DEFAULT_CUDA_HOME", str(tmp_path / "no-cuda"))


def test_default_gpu_run_needs_no_toolkit_and_ignores_a_bad_arch_list(nothing_prebuilt, tmp_path):
    """The issue's H200 machine: TORCH_CUDA_ARCH_LIST=9.0a, no CUDA toolkit, no compiler: nothing to build."""
    env = {"PATH": _bare_path(tmp_path), "TORCH_CUDA_ARCH_LIST": "9.0a"}
    assert preflight(DeepSpeedConfig(zero_stage=2, precision="bf16"), OptimConfig(), use_gpu=True, env=env) == []
    assert preflight(DeepSpeedConfig(zero_stage=3), OptimConfig(name="lion"), use_gpu=True, env=env) == []


def test_offload_without_a_compiler_fails_naming_cause_and_fix(nothing_prebuilt, tmp_path):
    env = {"PATH": _bare_path(tmp_path)}
    problems = preflight(DeepSpeedConfig(zero_stage=2, offload_optimizer=True), OptimConfig(), use_gpu=True, env=env)
    assert len(problems) == 2
    ninja, cxx = problems
    assert "cpu_adam" in ninja and "ninja is not on PATH" in ninja and "pip install ninja" in ninja
    assert "DS_BUILD_CPU_ADAM=1" in ninja
    assert "C++ compiler 'c++'" in cxx and "CXX" in cxx and "g++" in cxx
    with pytest.raises(SetupError, match="training cannot start:\n  - .*ninja.*\n  - .*C\\+\\+ compiler"):
        raise_on_problems(problems)


def test_offload_with_a_toolchain_or_prebuilt_op_passes(monkeypatch, nothing_prebuilt, tmp_path):
    ds, optim = DeepSpeedConfig(zero_stage=2, offload_optimizer=True), OptimConfig(name="lion")
    assert preflight(ds, optim, use_gpu=True, env={"PATH": _bare_path(tmp_path, "ninja", "c++")}) == []
    # CXX names the compiler to look for
    env = {"PATH": _bare_path(tmp_path, "ninja", "clang++"), "CXX": "clang++"}
    assert preflight(ds, optim, use_gpu=True, env=env) == []
    # prebuilt for this accelerator: no toolchain needed; prebuilt for another one does not count
    monkeypatch.setattr(pf, "installed_ops", lambda: ({"cpu_lion": 1}, "cuda"))
    assert preflight(ds, optim, use_gpu=True, env={"PATH": str(tmp_path / "empty")}) == []
    assert len(preflight(ds, optim, use_gpu=False, env={"PATH": str(tmp_path / "empty")})) == 2


def test_cuda_op_without_nvcc_fails_naming_cause_and_fix(nothing_prebuilt, tmp_path):
    env = {"PATH": _bare_path(tmp_path, "ninja", "c++")}
    [problem] = check_op("fused_adam", accelerator="cuda", env=env)
    assert "no CUDA toolkit was found (CUDA_HOME, CUDA_PATH, nvcc on PATH" in problem
    assert "install the CUDA toolkit" in problem and "set CUDA_HOME" in problem
    assert "deepspeed.offload_optimizer=false uses torch's fused AdamW" in problem
    # CUDA_HOME without nvcc
    [problem] = check_op("fused_adam", accelerator="cuda", env=dict(env, CUDA_HOME=str(tmp_path)))
    assert f"CUDA_HOME={tmp_path} has no bin/nvcc" in problem


def test_nvcc_is_run_not_just_found(nothing_prebuilt, tmp_path):
    env = {"PATH": _bare_path(tmp_path, "ninja", "c++")}
    ok = _fake_nvcc(tmp_path / "cuda-ok", 'echo "Cuda compilation tools, release 13.0, V13.0.88"')
    assert check_op("fused_adam", accelerator="cuda", env=dict(env, CUDA_HOME=ok)) == []
    # an nvcc wrapper script whose toolkit is missing (images ship such wrappers, e.g. /usr/local/bin/nvcc)
    broken = _fake_nvcc(tmp_path / "cuda-broken", "exec /nonexistent/cuda-13.0/bin/nvcc \"$@\"")
    [problem] = check_op("fused_adam", accelerator="cuda", env=dict(env, CUDA_HOME=broken))
    assert "bin/nvcc -V failed" in problem
    # found through PATH like torch does: <dir>/bin/nvcc -> CUDA home <dir>
    on_path = _fake_nvcc(tmp_path / "cuda-path", 'echo "release 12.8"')
    assert check_op("fused_adam", accelerator="cuda",
                    env={"PATH": env["PATH"] + os.pathsep + on_path + "/bin"}) == []


def test_unparseable_arch_list_is_a_problem_for_cuda_ops(nothing_prebuilt, tmp_path):
    home = _fake_nvcc(tmp_path / "cuda", 'echo "release 13.0"')
    env = {"PATH": _bare_path(tmp_path, "ninja", "c++"), "CUDA_HOME": home}
    assert check_op("fused_adam", accelerator="cuda", env=dict(env, TORCH_CUDA_ARCH_LIST="9.0a")) == []
    [problem] = check_op("fused_adam", accelerator="cuda", env=dict(env, TORCH_CUDA_ARCH_LIST="sm_90"))
    assert "TORCH_CUDA_ARCH_LIST='sm_90'" in problem and "TORCH_CUDA_ARCH_LIST=9.0" in problem


@pytest.mark.parametrize("value, expected", [
    ("9.0", "9.0"),
    ("9.0a", "9.0"),
    ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
    ("9.0a 10.0a", "9.0;10.0"),
    ("9.0;9.0a", "9.0"),
    ("Hopper", "9.0+PTX"),
    (" 8.6 ; 8.9 ", "8.6;8.9"),
])
def test_sanitize_arch_list(value, expected):
    new, changes = sanitize_cuda_arch_list(value)
    assert new == expected
    assert bool(changes) == (value.replace(" ", "").replace(";", "") != expected.replace(";", ""))


def test_sanitize_refuses_what_it_cannot_map():
    with pytest.raises(SetupError, match=r"TORCH_CUDA_ARCH_LIST='compute_90'.*fix: set TORCH_CUDA_ARCH_LIST"):
        sanitize_cuda_arch_list("compute_90")


def test_deepspeed_itself_fails_on_9_0a_and_builds_with_the_sanitised_list(monkeypatch):
    """The bug, reproduced in the installed DeepSpeed's op builder (its JIT arch parsing), and the fix."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")  # compute_capability_args rewrites it: restored after
    b = FusedAdamBuilder()
    b.jit_mode, b._jit_arch_list = True, "9.0a"
    with pytest.raises(ValueError, match="invalid literal for int"):
        b.compute_capability_args()
    b._jit_arch_list = sanitize_cuda_arch_list("9.0a")[0]
    assert b.compute_capability_args() == []  # JIT mode: torch makes the -gencode flags from the env
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"


def test_apply_workaround_rewrites_env_and_logs(caplog):
    env = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    with caplog.at_level(logging.WARNING, logger="r1ray.train.core.preflight"):
        assert apply_cuda_arch_workaround(env) == "9.0"
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert "9.0a -> 9.0" in caplog.text and "TORCH_CUDA_ARCH_LIST" in caplog.text
    assert apply_cuda_arch_workaround(env) is None  # already fine
    assert apply_cuda_arch_workaround({}) is None


def test_installed_ops_reads_deepspeeds_record_without_importing_it():
    ops, accel = pf.installed_ops()
    assert isinstance(ops, dict)
    assert accel in (None, "cpu", "cuda")


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="unknown DeepSpeed op 'flash'"):
        check_op("flash", accelerator="cuda", env={})
