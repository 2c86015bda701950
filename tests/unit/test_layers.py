"""The layer order of r1ray, enforced on every import (module level, function level, ``"module:attr"``
strings and ``importlib.import_module("...")`` calls), plus no import cycles between files.

    base (config, cli, runtime, artifacts, observe, testing) <- model <- infer <- tasks <- data <- train <- eval
    <- compress <- tune <- serve <- pipeline <- jobs

and inside train: stage.py (the contract) <- core/ (the loop machinery) <- stages/ <- registry.py.

A module may import its own layer and earlier ones. Exclusions: serve imports only base, model and infer;
model, infer and tasks import no later layer (already implied by the order). A failure names the file, the
line and the offending import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ORDER = ["base", "model", "infer", "tasks", "data", "train", "eval", "compress", "tune", "serve", "pipeline", "jobs"]
BASE_MODULES = {"r1ray", "r1ray.config", "r1ray.cli", "r1ray.runtime", "r1ray.artifacts", "r1ray.observe"}
ONLY = {"serve": {"base", "model", "infer", "serve"}}
"""Layers that may import only these (besides the order)."""
_STRING_REF = re.compile(r"^(r1ray(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?::[A-Za-z_][A-Za-z0-9_.]*)?$")


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name (None: not r1ray's)."""
    if module.startswith("jobs"):
        return "jobs"
    parts = module.split(".")
    if parts[0] != "r1ray":
        return None
    if len(parts) == 1 or ".".join(parts[:2]) in BASE_MODULES:
        return "base"
    return parts[1] if parts[1] in ORDER else "base"


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, how) for every r1ray import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    out: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((node.lineno, a.name, "import"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this package
                base = me.split(".")[: len(me.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod, "from-import"))
            for a in node.names:  # `from r1ray.train.stages import sft` imports r1ray.train.stages.sft
                if (REPO / Path(*mod.split("."), f"{a.name}.py")).exists():
                    out.append((node.lineno, f"{mod}.{a.name}", "from-import"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _STRING_REF.match(node.value.strip())
            if m:
                out.append((node.lineno, m.group(1), "string"))
    return [(ln, mod, how) for ln, mod, how in out if mod.split(".")[0] == "r1ray"]


def source_files() -> list[Path]:
    return sorted([*REPO.glob("r1ray/**/*.py"), *REPO.glob("jobs/*.py")])


def test_every_import_respects_the_layer_order():
    problems = []
    for path in source_files():
        mine = layer_of(module_name(path))
        for line, mod, how in imports_of(path):
            theirs = layer_of(mod)
            if theirs is None or mine is None:
                continue
            rel = path.relative_to(REPO)
            if ORDER.index(theirs) > ORDER.index(mine):
                problems.append(f"{rel}:{line}: {how} of {mod} ({theirs}) from the {mine} layer")
            elif mine in ONLY and theirs not in ONLY[mine]:
                problems.append(f"{rel}:{line}: {how} of {mod} ({theirs}): {mine} may import only {sorted(ONLY[mine])}")
    assert not problems, "layer violations:\n" + "\n".join(problems)


TRAIN_ROOMS = ["r1ray.train.stage", "r1ray.train.core", "r1ray.train.stages", "r1ray.train.registry"]
"""Inside train/, bottom to top: the stage contract, the loop machinery, the stages, the registry of stages."""


def _train_room(module: str) -> int | None:
    return next((i for i, room in enumerate(TRAIN_ROOMS) if module == room or module.startswith(room + ".")), None)


def test_train_machinery_sits_below_the_stages():
    """core/ (the loop, checkpoints, faults ...) knows no stage; the stages know no registry; the contract
    (train/stage.py) imports neither; strings and function-level imports count too."""
    problems = []
    for path in sorted(REPO.glob("r1ray/train/**/*.py")):
        mine = _train_room(module_name(path))
        if mine is None:
            continue
        for line, mod, how in imports_of(path):
            theirs = _train_room(mod)
            if theirs is not None and theirs > mine:
                problems.append(f"{path.relative_to(REPO)}:{line}: {how} of {mod} ({TRAIN_ROOMS[theirs]}) from "
                                f"{TRAIN_ROOMS[mine]}")
    assert not problems, "train/ layering:\n" + "\n".join(problems)


def test_no_import_cycles_between_files():
    files = {module_name(p): p for p in source_files()}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, p in files.items():
        for _, mod, how in imports_of(p):
            if how == "string":
                continue  # a string is resolved lazily, never at import time
            target = mod
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != m and not (m.startswith(target + ".") and files[target].name == "__init__.py"):
                graph[m].add(target)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles between files: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_catches_a_violation(tmp_path):
    """The parser sees function-level imports and "module:attr" strings (a checker that cannot fail proves
    nothing)."""
    p = REPO / "r1ray" / "model" / "_layer_probe_tmp.py"
    p.write_text('def f():\n    from r1ray.train.core.loop import Loop\n    return "r1ray.serve.app:build_app"\n')
    try:
        found = imports_of(p)
    finally:
        p.unlink()
    assert (2, "r1ray.train.core.loop", "from-import") in found
    assert (3, "r1ray.serve.app", "string") in found
    assert layer_of("r1ray.train.core.loop") == "train" and layer_of("r1ray.observe.metrics") == "base"
