"""Search spaces written in YAML over dotted config paths, parsed without ``eval``.

    space:
      optim.lr: loguniform(1e-4, 3e-3)
      optim.warmup_steps: choice([0, 10, 50])
      model.preset: grid(["debug", "tiny"])

Distributions: ``uniform(low, high)``, ``loguniform(low, high)``, ``quniform(low, high, q)``,
``randint(low, high)`` (high exclusive), ``choice([...])`` and ``grid([...])`` (every value, crossed
with the other grid axes). Every path is checked against the stage's config class, and every value a
distribution can produce (its choices, or its bounds) is validated as that field before any trial runs.
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from typing import Any

from r1ray.config import ConfigError, R1Config, leaf_paths, load_config, suggest_path

KINDS = {
    "uniform": 2,
    "loguniform": 2,
    "quniform": 3,
    "randint": 2,
    "choice": 1,
    "grid": 1,
}


@dataclass(frozen=True)
class Domain:
    path: str
    kind: str
    args: tuple[Any, ...]

    @property
    def values_to_check(self) -> list[Any]:
        """Values whose validity stands for the whole domain: every choice, or both bounds."""
        if self.kind in ("choice", "grid"):
            return list(self.args[0])
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def to_tune(self) -> Any:
        from ray import tune

        a = self.args
        if self.kind == "uniform":
            return tune.uniform(a[0], a[1])
        if self.kind == "loguniform":
            return tune.loguniform(a[0], a[1])
        if self.kind == "quniform":
            return tune.quniform(a[0], a[1], a[2])
        if self.kind == "randint":
            return tune.randint(a[0], a[1])
        if self.kind == "choice":
            return tune.choice(list(a[0]))
        return tune.grid_search(list(a[0]))

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(repr(x) for x in self.args)})"


def parse_domain(path: str, text: str) -> Domain:
    """Parse one ``kind(args)`` expression; raises ValueError naming the path and the problem."""
    try:
        node = ast.parse(str(text).strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"space.{path}: cannot parse {text!r}; write e.g. loguniform(1e-4, 3e-3)") from None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.keywords:
        raise ValueError(f"space.{path}: {text!r} is not a distribution call like choice([1, 2])")
    kind = node.func.id
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"space.{path}: unknown distribution {kind!r}{hint} (valid: {', '.join(KINDS)})")
    try:
        args = tuple(ast.literal_eval(a) for a in node.args)
    except ValueError:
        raise ValueError(f"space.{path}: arguments of {kind} must be literals, got {text!r}") from None
    if len(args) != KINDS[kind]:
        raise ValueError(f"space.{path}: {kind} takes {KINDS[kind]} argument(s), got {len(args)}")
    if kind in ("choice", "grid"):
        if not isinstance(args[0], (list, tuple)) or not args[0]:
            raise ValueError(f"space.{path}: {kind} needs a non-empty list, got {args[0]!r}")
    else:
        lo, hi = args[0], args[1]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in args):
            raise ValueError(f"space.{path}: {kind} bounds must be numbers, got {args!r}")
        if not lo < hi:
            raise ValueError(f"space.{path}: {kind} needs low < high, got {lo} >= {hi}")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"space.{path}: loguniform needs low > 0, got {lo}")
        if kind == "randint" and not (isinstance(lo, int) and isinstance(hi, int)):
            raise ValueError(f"space.{path}: randint bounds must be integers, got {args!r}")
    return Domain(path=path, kind=kind, args=args)


def parse_space(space: dict[str, Any], stage_cls: type[R1Config], base: dict | None = None,
                base_files: list[str] | None = None) -> list[Domain]:
    """Parse and validate a whole space against ``stage_cls``; raises ConfigError listing every problem."""
    problems: list[str] = []
    domains: list[Domain] = []
    valid = set(leaf_paths(stage_cls))
    argv = [a for f in (base_files or []) for a in ("--config", f)]
    for path, text in space.items():
        if path not in valid:
            close = suggest_path(stage_cls, path)
            hint = f"; did you mean {close!r}?" if close else ""
            problems.append(f"space.{path}: no such field in {stage_cls.__name__}{hint}")
            continue
        try:
            dom = parse_domain(path, text)
        except ValueError as e:
            problems.append(str(e))
            continue
        for value in dom.values_to_check:
            try:
                load_config(stage_cls, argv, base=base, values={path: value})
            except ConfigError as e:
                mine = [p for p in e.problems if p.startswith(path)] or e.problems
                problems.append(f"space.{path}: value {value!r} of {dom} is invalid: {'; '.join(mine)}")
        domains.append(dom)
    if not space:
        problems.append("space: empty; give at least one dotted path, e.g. optim.lr: loguniform(1e-4, 3e-3)")
    if problems:
        raise ConfigError(problems, "search space")
    return domains
