"""Checks that run before any training worker starts: which optimizer DeepSpeed will build, whether that needs
a DeepSpeed op compiled at first use, and whether this machine can compile it.

A failure here is a ``SetupError``: deterministic (the same config on the same machine fails the same way),
so the driver raises it before Ray Train starts and ``FailureConfig`` never retries it (on the first GPU run a
bad ``TORCH_CUDA_ARCH_LIST`` cost three retries and two minutes before the real error showed).

The optimizer rules (``choose_optimizer``), for DeepSpeed 0.19.8:

| optim.name | offload_optimizer | device | optimizer                          | DeepSpeed op built |
|------------|-------------------|--------|------------------------------------|--------------------|
| adamw      | no                | any    | torch.optim.AdamW(fused=True)      | none               |
| adamw      | yes               | any    | DeepSpeedCPUAdam                   | cpu_adam (C++)     |
| lion       | no                | any    | r1ray.train.core.optim.Lion (torch)     | none               |
| lion       | yes               | any    | DeepSpeedCPULion                   | cpu_lion (C++)     |

DeepSpeed takes torch's AdamW through ``optimizer.params.torch_adam: true`` and passes the remaining params to
its constructor, ``fused`` included (deepspeed/runtime/engine.py, ``get_optimizer_configuration``): torch's
fused kernel ships compiled (CUDA and CPU), so the default paths build nothing. On CPU the fused kernel is
3-6x faster than torch's default single-tensor loop (125M fp32 parameters on 2 cores: 80 ms against 256 ms
for 50 tensors and 470 ms for ZeRO's one flat partition; ``benchmarks/train_step.py`` shows the effect on a
step) and, being elementwise, as deterministic. In 0.19.8 the CPU-side optimizers
(CPUAdam, CPULion) are C++ ops on every accelerator (cuda_accelerator.py maps them to the CPU builders): they
need a C++ compiler and ninja, not nvcc. CUDA ops (``fused_adam``, ``fused_lion``) are only built when a
DeepSpeed config asks for DeepSpeed's own GPU optimizer; they need nvcc and a ``TORCH_CUDA_ARCH_LIST`` that
DeepSpeed can parse (it reads ``9.0a`` as int('0a') and fails; ``sanitize_cuda_arch_list`` maps it to 9.0).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1ray.observe.log import get_logger

log = get_logger(__name__)


class SetupError(Exception):
    """A deterministic configuration or machine-setup error, found before training starts; the message names
    the cause and the fix. The driver raises it before Ray Train starts, so it is never retried."""


OP_KIND = {"cpu_adam": "cpu", "cpu_lion": "cpu", "fused_adam": "cuda", "fused_lion": "cuda"}
"""DeepSpeed ops an optimizer may build, by toolchain: ``cpu`` (C++ compiler + ninja), ``cuda`` (+ nvcc)."""


@dataclass(frozen=True)
class OptimizerChoice:
    """What DeepSpeed will run as the optimizer, and what it builds for it."""

    name: str
    """torch_fused_adamw, deepspeed_cpu_adam, r1ray_lion or deepspeed_cpu_lion."""
    section: dict[str, Any] | None
    """DeepSpeed's ``optimizer`` config section; None when r1ray passes its own optimizer object."""
    ops: tuple[str, ...] = field(default_factory=tuple)
    """DeepSpeed ops compiled at first use unless prebuilt (keys of ``OP_KIND``)."""
    reason: str = ""


def choose_optimizer(ds: Any, optim: Any, *, use_gpu: bool) -> OptimizerChoice:
    """The optimizer for ``optim`` (OptimConfig) and ``ds`` (DeepSpeedConfig): one that needs no compile
    step unless a DeepSpeed op is the only way (optimizer offload). See the module doc's table."""
    if optim.name == "adamw":
        params: dict[str, Any] = {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
        }
        if ds.offload_optimizer:
            return OptimizerChoice("deepspeed_cpu_adam", {"type": "AdamW", "params": params}, ("cpu_adam",),
                                   "optimizer offload steps on the CPU: DeepSpeedCPUAdam (a C++ op)")
        params.update(torch_adam=True, fused=True)
        return OptimizerChoice("torch_fused_adamw", {"type": "AdamW", "params": params}, (),
                               "torch's fused AdamW kernel (CUDA and CPU): no DeepSpeed op to compile")
    if optim.name == "lion":
        if ds.offload_optimizer:
            return OptimizerChoice(
                "deepspeed_cpu_lion",
                {"type": "Lion", "params": {"lr": optim.lr, "betas": list(optim.betas),
                                            "weight_decay": optim.weight_decay}},
                ("cpu_lion",), "optimizer offload steps on the CPU: DeepSpeedCPULion (a C++ op)")
        return OptimizerChoice("r1ray_lion", None, (), "r1ray's Lion (plain torch), passed to DeepSpeed")
    raise SetupError(f"optim.name={optim.name!r} is not supported; choose adamw or lion")


def ops_for_config(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The DeepSpeed ops ``deepspeed.initialize(config=config)`` will build for its optimizer (what DeepSpeed
    0.19.8's ``_configure_basic_optimizer`` does for this dict; nothing for a client optimizer)."""
    opt = config.get("optimizer")
    if not opt:
        return ()
    kind, params = str(opt.get("type", "")).lower(), opt.get("params", {})
    offload = bool((config.get("zero_optimization") or {}).get("offload_optimizer"))
    if kind in ("adam", "adamw"):
        if params.get("torch_adam"):
            return ()
        return ("cpu_adam",) if offload else ("fused_adam",)
    if kind == "lion":
        return ("cpu_lion",) if offload else ("fused_lion",)
    return ()


def preflight(deepspeed_cfg: Any, optim_cfg: Any, *, use_gpu: bool, env: Mapping[str, str] | None = None,
              which: Callable[..., str | None] = shutil.which) -> list[str]:
    """Every problem that would stop the optimizer from being built on this machine (empty: none). Each
    names the cause and the fix. ``env`` and ``which`` default to this process's (tests pass their own)."""
    env = os.environ if env is None else env
    choice = choose_optimizer(deepspeed_cfg, optim_cfg, use_gpu=use_gpu)
    problems: list[str] = []
    for op in choice.ops:
        problems += check_op(op, accelerator="cuda" if use_gpu else "cpu", env=env, which=which,
                             why=choice.reason)
    return problems


def raise_on_problems(problems: Sequence[str], what: str = "training cannot start") -> None:
    """Raise one ``SetupError`` listing every problem (none: return)."""
    if problems:
        raise SetupError(f"{what}:\n  - " + "\n  - ".join(problems))


def check_op(op: str, *, accelerator: str, env: Mapping[str, str] | None = None,
             which: Callable[..., str | None] = shutil.which, why: str = "") -> list[str]:
    """Problems building DeepSpeed op ``op`` on an ``accelerator`` ("cuda"/"cpu") machine: none if DeepSpeed
    was installed with it prebuilt for that accelerator; else the toolchain its JIT build needs."""
    env = os.environ if env is None else env
    if op not in OP_KIND:
        raise ValueError(f"unknown DeepSpeed op {op!r}; known: {sorted(OP_KIND)}")
    installed, built_for = installed_ops()
    if installed.get(op) and built_for == accelerator:
        return []
    what = f"DeepSpeed op '{op}' ({why or 'needed by the optimizer'}) is not prebuilt and must be compiled"
    path = env.get("PATH", "")
    problems = []
    if not which("ninja", path=path):
        problems.append(f"{what}, but ninja is not on PATH; fix: `pip install ninja` into this environment and put "
                        "its bin directory on PATH, or reinstall DeepSpeed with the op prebuilt "
                        f"(DS_BUILD_{op.upper()}=1 pip install --no-build-isolation deepspeed)")
    cxx = env.get("CXX", "c++")
    if not which(cxx, path=path):
        problems.append(f"{what}, but the C++ compiler {cxx!r} (CXX, default c++) is not on PATH; fix: install one "
                        "(e.g. apt-get install g++) or set CXX")
    if OP_KIND[op] == "cuda":
        home = cuda_home(env, which)
        trouble = nvcc_problem(home)
        if trouble:
            problems.append(f"{what} with nvcc, but {trouble}; fix: install the CUDA toolkit matching torch's CUDA "
                            "and set CUDA_HOME, or choose an optimizer that needs no op (optim.name=adamw with "
                            "deepspeed.offload_optimizer=false uses torch's fused AdamW)")
        arch = env.get("TORCH_CUDA_ARCH_LIST")
        if arch:
            try:
                sanitize_cuda_arch_list(arch)
            except SetupError as e:
                problems.append(str(e))
    return problems


def installed_ops() -> tuple[dict[str, Any], str | None]:
    """DeepSpeed's record of the ops it was installed with, and the accelerator they were built for, read
    from ``deepspeed/git_version_info_installed.py`` without importing DeepSpeed (its import probes devices)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        raise SetupError("DeepSpeed is not installed; fix: pip install deepspeed (r1ray's training dependency)")
    f = Path(list(spec.submodule_search_locations)[0]) / "git_version_info_installed.py"
    if not f.is_file():
        return {}, None
    values: dict[str, Any] = {}
    for node in ast.parse(f.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return dict(values.get("installed_ops") or {}), values.get("accelerator_name")


DEFAULT_CUDA_HOME = "/usr/local/cuda"
"""torch.utils.cpp_extension's last guess for the CUDA toolkit."""


def cuda_home(env: Mapping[str, str], which: Callable[..., str | None] = shutil.which) -> str | None:
    """The CUDA toolkit torch's extension builder would use: CUDA_HOME, CUDA_PATH, nvcc's parent on PATH,
    then ``DEFAULT_CUDA_HOME`` (torch.utils.cpp_extension's order)."""
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        return home
    nvcc = which("nvcc", path=env.get("PATH", ""))
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return DEFAULT_CUDA_HOME if Path(DEFAULT_CUDA_HOME).is_dir() else None


def nvcc_problem(home: str | None) -> str | None:
    """Why ``<home>/bin/nvcc -V`` (what DeepSpeed runs first) would fail, or None when it works. Runs it: an
    image may hold an nvcc wrapper script whose target toolkit is missing."""
    if not home:
        return "no CUDA toolkit was found (CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda)"
    nvcc = Path(home, "bin", "nvcc")
    if not nvcc.is_file():
        return f"CUDA_HOME={home} has no bin/nvcc"
    try:
        out = subprocess.run([str(nvcc), "-V"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc} -V could not run ({e})"
    if out.returncode != 0 or "release" not in out.stdout:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
        return f"{nvcc} -V failed ({tail[0]})"
    return None


_ARCH_OK = re.compile(r"^\d+\.\d+(\+PTX)?$")
_ARCH_SUFFIX = re.compile(r"^(\d+\.\d+)[a-z]+(\+PTX)?$")
# torch accepts these names in TORCH_CUDA_ARCH_LIST (torch.utils.cpp_extension); DeepSpeed does not
_NAMED_ARCHS = {"kepler": "3.5+PTX", "maxwell": "5.0;5.2+PTX", "pascal": "6.0;6.1+PTX", "volta": "7.0+PTX",
                "turing": "7.5+PTX", "ampere": "8.0;8.6+PTX", "ada": "8.9+PTX", "hopper": "9.0+PTX"}


def sanitize_cuda_arch_list(value: str) -> tuple[str, list[str]]:
    """A ``TORCH_CUDA_ARCH_LIST`` DeepSpeed's op builder can parse, and the changes made.

    DeepSpeed 0.19.8 (``compute_capability_args``) parses each entry as ``major.minor[+PTX]`` with int():
    ``9.0a`` (Hopper's arch-specific target) fails with "invalid literal for int() with base 10: '0a'".
    The suffix only enables features of one chip (wgmma and TMA on sm_90a) that DeepSpeed's kernels do not
    use, so ``9.0a`` -> ``9.0`` builds the same code. torch's named archs (Hopper, Ampere, ...) map to their
    numbers. Anything else raises ``SetupError`` naming the variable and the fix."""
    out: list[str] = []
    changes: list[str] = []
    for entry in [e for e in re.split(r"[;\s]+", value.strip()) if e]:
        if _ARCH_OK.match(entry):
            out.append(entry)
            continue
        m = _ARCH_SUFFIX.match(entry)
        if m:
            new = m.group(1) + (m.group(2) or "")
        elif entry.lower() in _NAMED_ARCHS:
            new = _NAMED_ARCHS[entry.lower()]
        else:
            raise SetupError(
                f"TORCH_CUDA_ARCH_LIST={value!r}: DeepSpeed cannot parse the entry {entry!r} (it expects "
                "major.minor[+PTX], e.g. 9.0 or 8.0;8.6+PTX); fix: set TORCH_CUDA_ARCH_LIST to such a list, "
                "e.g. TORCH_CUDA_ARCH_LIST=9.0 for H100/H200, or unset it to build for the visible GPUs")
        out.extend(new.split(";"))
        changes.append(f"{entry} -> {new}")
    deduped = list(dict.fromkeys(out))
    return ";".join(deduped), changes


def apply_cuda_arch_workaround(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Rewrite ``TORCH_CUDA_ARCH_LIST`` in ``environ`` (default: this process) into a form DeepSpeed parses,
    logging what changed; returns the new value, or None when nothing changed. Call it just before a DeepSpeed
    CUDA op is built (the workers of a run that builds one); it raises ``SetupError`` for an unusable list."""
    environ = os.environ if environ is None else environ
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    new, changes = sanitize_cuda_arch_list(value)
    if not changes:
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = new
    log.warning("TORCH_CUDA_ARCH_LIST=%r has entries DeepSpeed's op builder cannot parse (%s): building its ops "
                "with TORCH_CUDA_ARCH_LIST=%r (set it to that yourself to silence this)", value,
                ", ".join(changes), new)
    return new
