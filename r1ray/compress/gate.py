"""The quality gate: evaluate the base and the compressed model with the evaluation job on the same items, and
decide whether the compressed one may be published.

``evaluate_pair`` runs ``r1ray.eval.run.run`` with ``model`` = the base and ``compare`` = the compressed model
(one evaluation artifact, ``<storage.root>/eval/compress-<run_name>``, with the paired bootstrap intervals);
``decide`` applies ``GateConfig``: accuracy may fall by at most ``max_accuracy_drop_points`` (100 x share) and
perplexity rise by at most ``max_perplexity_increase_pct``. A metric that is not finite on the compressed
model fails the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from r1ray.compress.config import CompressConfig, GateConfig
from r1ray.observe.log import get_logger

log = get_logger(__name__)

__all__ = ["BASE", "COMPRESSED", "GateResult", "Scores", "decide", "evaluate_pair"]

BASE, COMPRESSED = "base", "compressed"
"""Labels of the two models in the evaluation table."""


@dataclass
class Scores:
    accuracy: float
    """Share in [0, 1] of the gate's accuracy metric."""
    perplexity: float


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    """Why it failed (empty when it passed)."""
    base: Scores
    compressed: Scores
    accuracy_drop_points: float
    perplexity_increase_pct: float
    eval_artifact: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def decide(base: Scores, compressed: Scores, gate: GateConfig, *, metric: str | None = None) -> GateResult:
    """Pass or refuse ``compressed`` against ``base`` under ``gate``'s limits (every failed limit is listed)."""
    metric = metric or gate.accuracy_metric
    drop = 100.0 * (base.accuracy - compressed.accuracy)
    rise = 100.0 * (compressed.perplexity / base.perplexity - 1.0) if base.perplexity > 0 else math.inf
    reasons = []
    eps = 1e-9  # a value exactly at a limit passes, whatever the float rounding of the subtraction
    if not (math.isfinite(compressed.accuracy) and math.isfinite(compressed.perplexity)):
        reasons.append(f"the compressed model's scores are not finite (accuracy {compressed.accuracy}, "
                       f"perplexity {compressed.perplexity})")
    if drop > gate.max_accuracy_drop_points + eps:
        reasons.append(f"{metric} fell {drop:.2f} points ({100 * base.accuracy:.2f} -> "
                       f"{100 * compressed.accuracy:.2f}), more than gate.max_accuracy_drop_points="
                       f"{gate.max_accuracy_drop_points:g}")
    if not rise <= gate.max_perplexity_increase_pct + eps:
        reasons.append(f"perplexity rose {rise:.2f}% ({base.perplexity:.4g} -> {compressed.perplexity:.4g}), more "
                       f"than gate.max_perplexity_increase_pct={gate.max_perplexity_increase_pct:g}")
    return GateResult(not reasons, reasons, base, compressed, drop, rise)


def evaluate_pair(base_dir: str, compressed_dir: str, cfg: CompressConfig) -> tuple[Scores, Scores, Any]:
    """Evaluate both models with the evaluation job on the same items: (base scores, compressed scores, the
    ``EvalResult``)."""
    from r1ray.eval.config import EvaluateConfig, ModelSpec
    from r1ray.eval.run import run as evaluate

    ec = cfg.eval
    ecfg = EvaluateConfig(
        seed=cfg.seed, ray=cfg.ray, storage=cfg.storage, logging=cfg.logging, run_name=f"compress-{cfg.run_name}",
        model=ModelSpec(path=base_dir, name=BASE), compare=ModelSpec(path=compressed_dir, name=COMPRESSED),
        engine=ec.engine, perplexity=ec.perplexity, tasks=ec.tasks, reference=ec.reference,
    )
    result = evaluate(ecfg)
    suite, metric = cfg.gate.accuracy_metric.split("/")

    def scores(label: str) -> Scores:
        try:
            acc = result.value(metric, model=label, suite=suite)
        except KeyError:
            have = sorted({f"{r['suite']}/{r['metric']}" for r in result.rows})
            raise ValueError(f"gate.accuracy_metric={cfg.gate.accuracy_metric!r} is not in the evaluation table; "
                             f"it has {have}") from None
        return Scores(accuracy=acc, perplexity=result.value("perplexity", model=label, suite="perplexity"))

    return scores(BASE), scores(COMPRESSED), result
