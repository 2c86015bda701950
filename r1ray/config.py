"""Typed configs: a strict pydantic base, the sub-configs every job composes, and the loader.

A job's config is one pydantic model built from small shared parts. Values come, later winning, from
the field defaults, then each ``--config file.yaml`` in order, then dotted overrides on the command line::

    python jobs/pretrain.py --config configs/pretrain/debug.yaml optim.lr=3e-4 scaling.num_workers=[1,2]

Each field is documented once, by the docstring under it; that text is what ``--help`` prints.
Errors name the field path, the value and what is allowed, suggest the closest key for a typo, and list
every problem at once.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "R1Config",
    "RayConfig",
    "ScalingConfig",
    "StorageConfig",
    "OptimConfig",
    "DeepSpeedConfig",
    "WandbConfig",
    "LoggingConfig",
    "JobConfig",
    "load_config",
    "format_help",
    "to_yaml",
]

C = TypeVar("C", bound="R1Config")


class ConfigError(ValueError):
    """A config that cannot run. ``problems`` lists every problem found, one line each."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")


class R1Config(BaseModel):
    """Base of every r1ray config: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
        protected_namespaces=(),
    )


# --------------------------------------------------------------------------------------------------
# Shared sub-configs
# --------------------------------------------------------------------------------------------------


class RayConfig(R1Config):
    """Where Ray runs."""

    address: str | None = None
    """Ray cluster to join (e.g. ``ray://head:10001`` or ``auto``). Unset: ``RAY_ADDRESS`` if set (it is under
    ``ray job submit``), otherwise an embedded local Ray is started for this process."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs of the embedded local Ray. Unset: the machine's cores plus one, so Ray Data keeps a CPU
    while training workers hold the others (on 2 cores, workers holding every CPU deadlock the reader)."""
    object_store_memory: int | None = Field(default=None, ge=78_643_200)
    """Bytes of the embedded Ray's object store. Unset: Ray's default (30% of RAM)."""
    include_dashboard: bool = True
    """Start the Ray dashboard with the embedded Ray (127.0.0.1:8265). Ray Train's controller queries it."""


class ScalingConfig(R1Config):
    """How many training workers, and what each holds."""

    num_workers: int | tuple[int, int] = 2
    """Training workers: ``N`` for a fixed group, or ``[min, max]`` for an elastic group that shrinks when
    workers are lost and grows back (up to max) when capacity returns."""
    use_gpu: bool = False
    """One GPU per worker, NCCL between them. False: CPU workers over gloo."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """Logical CPUs each training worker reserves."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra custom Ray resources each worker reserves (e.g. ``{"trainer": 1}``)."""

    @field_validator("num_workers")
    @classmethod
    def _check_workers(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"must be >= 1, got {v}")
        else:
            lo, hi = v
            if lo < 1 or hi < lo:
                raise ValueError(f"[min, max] needs 1 <= min <= max, got [{lo}, {hi}]")
        return v

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


class StorageConfig(R1Config):
    """Where artifacts live: a local path or an object-store URI (``s3://``, ``gs://``)."""

    root: str = "outputs"
    """Root of every artifact this job reads and writes; relative local paths resolve against the current
    directory. On a cluster use shared storage (an object-store URI or a shared filesystem)."""

    @field_validator("root")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty path or URI")
        return v

    def uri(self, *parts: str) -> str:
        """Join ``parts`` under the root; local roots become absolute paths."""
        base = self.root if "://" in self.root else str(Path(self.root).expanduser().resolve())
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


class OptimConfig(R1Config):
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "lion"] = "adamw"
    """Optimizer: ``adamw`` (decoupled weight decay) or ``lion`` (sign momentum; use ~3-10x smaller lr)."""
    lr: float = Field(default=1e-3, gt=0)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Momentum coefficients (beta1, beta2)."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay; never applied to norms and biases."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    schedule: Literal["cosine", "cosine_restarts", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(default=20, ge=0)
    """Linear warmup from 0 to ``lr`` over this many optimizer steps."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Floor of the decaying schedules, as a fraction of ``lr``."""
    restart_period: int = Field(default=100, ge=1)
    """Steps per cycle of ``cosine_restarts``."""

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


class DeepSpeedConfig(R1Config):
    """DeepSpeed engine settings; the ds_config dict is generated from these, never hand-written."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain DDP, 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state (and the step) on CPU (ZeRO >= 1). Builds DeepSpeedCPUAdam."""
    offload_params: bool = False
    """Keep parameters on CPU between uses (ZeRO-3 only)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. bf16 on GPUs; fp32 on CPUs without bf16 hardware (bf16 is ~8x slower there)."""

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"offload_params needs zero_stage=3 (got zero_stage={self.zero_stage}); set zero_stage=3 "
                "or offload_params=false"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1; set zero_stage=1 or offload_optimizer=false")
        return self


class WandbConfig(R1Config):
    """Weights & Biases logging. Never required: a run goes on without it and says so."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """``auto``: online when WANDB_API_KEY is set, else offline (files under the run directory)."""
    project: str = "r1ray"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team); unset uses the key's default."""


class LoggingConfig(R1Config):
    """Logs and experiment tracking."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of r1ray's loggers."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases."""


class JobConfig(R1Config):
    """Base of every job's config: the blocks every job shares (seed, where Ray runs, where artifacts live,
    logging). A job adds its own fields and may redeclare ``seed`` to document what it seeds."""

    seed: int = 0
    """Seed of every random choice the job makes (each job documents what it seeds)."""
    run_name: str = "default"
    """Name of this run: where its output goes under ``storage.root`` (each job says where)."""
    ray: RayConfig = RayConfig()
    """Where Ray runs."""
    storage: StorageConfig = StorageConfig()
    """Where artifacts live."""
    logging: LoggingConfig = LoggingConfig()
    """Logs and W&B."""

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, v: str) -> str:
        if not v.strip() or "/" in v or v in (".", ".."):
            raise ValueError(f"must be a plain directory name (non-empty, no '/'), got {v!r}")
        return v


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _deep_merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _submodel(annotation: Any) -> type[R1Config] | None:
    """The R1Config class inside an annotation (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, R1Config):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            sub = _submodel(arg)
            if sub is not None:
                return sub
    return None


def _model_at(cls: type[R1Config], path: Sequence[str | int]) -> type[R1Config] | None:
    model: type[R1Config] | None = cls
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _submodel(model.model_fields[part].annotation)
    return model


def dotted_values(cls: type[R1Config], nested: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``nested`` (``{"train": {"max_steps": 40}}``, or already dotted keys) as dotted paths to values, descending
    through config sections only: a value whose path is a section is set field by field (the section's other
    fields keep their defaults), a value of a dict-typed field (``grpo.rewards``) replaces it whole."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        path = (*prefix, *str(key).split("."))
        if isinstance(value, dict) and value and _model_at(cls, path) is not None:
            out.update(dotted_values(cls, value, path))
        else:
            out[".".join(path)] = value
    return out


def _all_paths(cls: type[R1Config], prefix: str = "") -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        sub = _submodel(field.annotation)
        if sub is not None:
            out.extend(_all_paths(sub, path + "."))
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(cls: type[R1Config], err: dict) -> str:
    loc = [p for p in err["loc"]]
    path = ".".join(str(p) for p in loc) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        parent = _model_at(cls, loc[:-1])
        valid = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + [close[0]])}'?" if close else ""
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"{path}: unknown key{hint} (valid keys at {where}: {', '.join(valid)})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "missing":
        return f"{path}: required field is missing"
    return f"{path}: {msg} (got {_short(err.get('input'))})"


def _coerce_override(raw: str, annotation: Any = None) -> Any:
    """Override values are YAML scalars/flows: ``3e-4``, ``true``, ``[1, 2]``, ``{a: 1}``, ``null``.

    A field typed ``str`` keeps the raw text (so ``run_name=007`` stays ``"007"``).
    """
    args = set(typing.get_args(annotation)) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else {annotation}
    if str in args and args <= {str, type(None)}:
        return None if (type(None) in args and raw in ("null", "~", "None")) else raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_args(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]], set[str]]:
    """Split argv into (yaml files, dotted overrides, flags). Unknown ``--flags`` raise ConfigError."""
    files: list[str] = []
    overrides: list[tuple[str, str]] = []
    flags: set[str] = set()
    problems: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            flags.add("help")
        elif a == "--print-config":
            flags.add("print-config")
        elif a == "--config" or a == "-c":
            if i + 1 >= len(args):
                problems.append("--config needs a YAML file path")
            else:
                files.append(args[i + 1])
                i += 1
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        elif "=" in a:
            key, value = a.split("=", 1)
            overrides.append((key.lstrip("-"), value))
        else:
            problems.append(
                f"unrecognised argument {a!r}: use --config FILE.yaml, dotted overrides like optim.lr=3e-4, "
                "--print-config or --help"
            )
        i += 1
    if problems:
        raise ConfigError(problems, "command line")
    return files, overrides, flags


def get_dotted(obj: Any, path: str) -> Any:
    """The value at dotted ``path`` of a config (or a dict): ``get_dotted(cfg, "model.init_from")``."""
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part)
    return obj


def set_dotted(data: dict, path: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 1e-3)`` sets ``d["optim"]["lr"]``, creating sections as needed."""
    parts = path.split(".")
    node = data
    for j, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError([f"{path}: {'.'.join(parts[: j + 1])} is not a section"])
        node = nxt
    node[parts[-1]] = value


def leaf_paths(cls: type[R1Config]) -> list[str]:
    """Every dotted path of ``cls`` that holds a value (not a section)."""
    return [p for p in _all_paths(cls) if _model_at(cls, p.split(".")) is None]


def suggest_path(cls: type[R1Config], path: str) -> str | None:
    close = difflib.get_close_matches(path, leaf_paths(cls), n=1, cutoff=0.6)
    return close[0] if close else None


def section_defaults(cls: type[R1Config]) -> dict:
    """The values a config class sets in its sections' defaults (``optim: OptimConfig = OptimConfig(lr=3e-3)``),
    as a nested mapping. Loading starts from it, so a YAML key or override inside such a section changes that key
    only: without it, ``optim.warmup_steps=3`` would rebuild ``optim`` from OptimConfig's own defaults and lose
    the job's lr."""
    out: dict = {}
    for name, field in cls.model_fields.items():
        default = field.default
        if isinstance(default, R1Config):
            sub = _deep_merge(section_defaults(type(default)), default.model_dump(mode="json", exclude_unset=True))
            if sub:
                out[name] = sub
    return out


def load_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    base: dict | None = None,
    values: dict[str, Any] | None = None,
) -> C:
    """Build ``cls`` from defaults, ``--config`` YAML files (later wins) and dotted ``a.b=value`` overrides.

    ``base`` is a nested mapping applied first; ``values`` maps dotted paths to typed values applied last
    (how Tune sets a trial's sampled hyperparameters).

    Raises ConfigError listing every problem. ``--help``/``--print-config`` are handled by ``r1ray.cli``;
    here they are ignored so the resolved config can still be built.
    """
    files, overrides, _ = parse_args([] if argv is None else argv)
    data: dict = _deep_merge(section_defaults(cls), copy.deepcopy(base or {}))
    problems: list[str] = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            problems.append(f"--config {f}: file not found")
            continue
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            problems.append(f"--config {f}: not valid YAML: {e}")
            continue
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            problems.append(f"--config {f}: the top level must be a mapping of fields, got {type(loaded).__name__}")
            continue
        data = _deep_merge(data, loaded)
    for key, raw in overrides:
        parts = key.split(".")
        if not all(parts):
            problems.append(f"override {key}={raw}: malformed key")
            continue
        parent = _model_at(cls, parts[:-1])
        field = parent.model_fields.get(parts[-1]) if parent is not None else None
        try:
            set_dotted(data, key, _coerce_override(raw, field.annotation if field is not None else None))
        except ConfigError as e:
            problems.append(f"override {key}={raw}: {e.problems[0].split(': ', 1)[1]}")
    for key, value in (values or {}).items():
        try:
            set_dotted(data, key, value)
        except ConfigError as e:
            problems.extend(e.problems)
    try:
        cfg = cls.model_validate(data)
    except ValidationError as e:
        problems.extend(_describe(cls, err) for err in e.errors())
        cfg = None
    if problems:
        raise ConfigError(problems, f"{cls.__name__}")
    assert cfg is not None
    return cfg


# --------------------------------------------------------------------------------------------------
# Help and printing
# --------------------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def format_help(cls: type[R1Config], prog: str = "job") -> str:
    """Every field, dotted, with its type, default and doc (the docstring beside the field)."""
    lines = [
        f"usage: {prog} [--config FILE.yaml ...] [key.path=value ...] [--print-config] [--help]",
        "",
        (cls.__doc__ or "").strip(),
        "",
        "Fields (override any with dotted.path=value; YAML files given with --config are merged in order):",
    ]

    def walk(model: type[R1Config], prefix: str, depth: int) -> None:
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            sub = _submodel(field.annotation)
            doc = " ".join((field.description or "").split())
            if sub is not None:
                lines.append(f"{'  ' * depth}{path}:  {doc}")
                walk(sub, path + ".", depth + 1)
                continue
            default = field.get_default(call_default_factory=True)
            lines.append(f"{'  ' * depth}{path} ({_type_name(field.annotation)}) = {default!r}")
            if doc:
                lines.append(f"{'  ' * depth}    {doc}")

    walk(cls, "", 1)
    return "\n".join(lines)


def to_yaml(cfg: R1Config) -> str:
    """The resolved config as YAML that ``--config`` accepts back unchanged."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
