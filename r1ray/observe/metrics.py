"""Every Prometheus metric r1ray exports, declared once.

Metrics go through Ray's metrics API (``ray.util.metrics``), so they are scraped from each node's
metrics-export port together with Ray's own. Ray prefixes custom metric names with ``ray_`` in
Prometheus: ``r1ray_train_loss`` is queried as ``ray_r1ray_train_loss``. Dashboards in ``dashboards/``
use only the names declared here (``prometheus_name``) and Ray's built-in ones; a test checks it.

Record with ``record(name, value, **tags)``; outside a Ray process it does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from r1ray.observe.log import get_logger

log = get_logger(__name__)

# Latency buckets in seconds, for request latency and time to first token.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_SAVE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def prometheus_name(self) -> str:
        """The series name as Prometheus stores it (Ray adds ``ray_``; counters gain ``_total``).

        Measured on Ray 2.60 (OpenTelemetry recorder) by scraping ``_metrics_export_port``: a counter
        ``x`` is exported as ``ray_x_total``, a gauge as ``ray_x``, a histogram as ``ray_x_bucket``
        (with ``le``), ``ray_x_sum`` and ``ray_x_count``; values show up ~5-10 s after recording.
        """
        base = f"ray_{self.name}"
        return base + "_total" if self.kind == "counter" else base

    @property
    def prometheus_series(self) -> tuple[str, ...]:
        """Every series name this metric exports (a histogram's ``_bucket``/``_sum``/``_count``)."""
        if self.kind == "histogram":
            return tuple(f"{self.prometheus_name}_{s}" for s in ("bucket", "sum", "count"))
        return (self.prometheus_name,)


_TRAIN_TAGS = ("run", "stage")
# `variant`: the A/B variant that served the request (its name is also its model id); a one-model app is its
# own single variant, named after the model. Requests the A/B router refuses before picking one carry
# model=variant="unrouted".
_SERVE_TAGS = ("model", "variant")


def _train_gauges(*rows: tuple[str, str]) -> tuple[MetricSpec, ...]:
    """Gauges of the training stages (tags ``run`` and ``stage``), one per (name, description) row."""
    return tuple(MetricSpec(name, "gauge", description, _TRAIN_TAGS) for name, description in rows)


SPECS: tuple[MetricSpec, ...] = (
    # ---- data stage (emitted by Ray Data tasks; `source` is the source tag)
    MetricSpec("r1ray_data_docs_read", "counter", "Documents read from a source.", ("source",)),
    MetricSpec("r1ray_data_docs_kept", "counter", "Documents that reached the packed shards.", ("source",)),
    MetricSpec("r1ray_data_docs_duplicate", "counter", "Documents dropped as duplicates.", ("source", "kind")),
    MetricSpec("r1ray_data_docs_filtered", "counter", "Documents dropped by a quality filter.", ("source", "reason")),
    MetricSpec("r1ray_data_docs_rejected", "counter", "Malformed rows or files sent to rejects/.", ("source", "reason")),
    MetricSpec("r1ray_data_pii_replaced", "counter", "PII spans replaced by typed placeholders.", ("kind",)),
    MetricSpec("r1ray_data_tokens_written", "counter", "Tokens written to packed shards.", ("split",)),
    # ---- training stages (pretrain, sft, grpo, distill share these; `stage` tells them apart)
    *_train_gauges(
        ("r1ray_train_loss", "Training loss of the last optimizer step."),
        ("r1ray_train_val_loss", "Validation loss of the last evaluation."),
        ("r1ray_train_lr", "Learning rate of the last optimizer step."),
        ("r1ray_train_grad_norm", "Global gradient norm before clipping."),
        ("r1ray_train_tokens_per_second", "Training tokens per second, all workers."),
        ("r1ray_train_mfu", "Model FLOPs utilisation (GPU only), 0-1."),
        ("r1ray_train_step", "Optimizer steps completed."),
        ("r1ray_train_samples_consumed", "Global samples consumed (the data cursor)."),
        ("r1ray_train_workers", "Training workers in the current group."),
    ),
    MetricSpec("r1ray_train_restarts", "counter", "Worker-group restarts resumed from a checkpoint.", _TRAIN_TAGS),
    MetricSpec("r1ray_train_nonfinite_steps", "counter", "Steps skipped for a non-finite loss or gradient.", _TRAIN_TAGS),
    MetricSpec("r1ray_train_memory_bytes", "gauge", "Worker memory: kind=rss or cuda_allocated.", (*_TRAIN_TAGS, "kind")),
    MetricSpec(
        "r1ray_train_checkpoint_save_seconds", "histogram", "Checkpoint save time.", _TRAIN_TAGS, _SAVE_BUCKETS
    ),
    *_train_gauges(
        # ---- SFT (r1ray.train.stages.sft: the stage's own metrics, recorded by the loop under these names)
        ("r1ray_sft_accuracy", "Held-out greedy exact-match accuracy of the last evaluation, 0-1."),
        ("r1ray_sft_eval_verify_failures", "Verifier calls that raised or timed out in the last evaluation."),
        # ---- GRPO (r1ray.train.stages.grpo.stage: the stage's own metrics, recorded by the loop under these names)
        ("r1ray_grpo_reward_mean", "Mean total (weighted) reward of the rollouts."),
        ("r1ray_grpo_reward_std", "Std of the total reward over the rollouts."),
        ("r1ray_grpo_reward_accuracy", "Mean accuracy reward of the rollouts."),
        ("r1ray_grpo_reward_format", "Mean format reward of the rollouts."),
        ("r1ray_grpo_reward_tag_count", "Mean tag_count reward of the rollouts."),
        ("r1ray_grpo_reward_length", "Mean overlong (length) reward of the rollouts."),
        ("r1ray_grpo_reward_language", "Mean language-consistency reward."),
        ("r1ray_grpo_reward_failures", "Reward calls that raised or timed out, per report."),
        ("r1ray_grpo_frac_zero_variance_groups", "Share of groups whose rewards all agree."),
        ("r1ray_grpo_dropped_groups", "Groups dropped by dynamic sampling, per report."),
        ("r1ray_grpo_completion_length_mean", "Mean completion length (tokens)."),
        ("r1ray_grpo_completion_length_max", "Longest completion (tokens)."),
        ("r1ray_grpo_completion_clipped_fraction", "Share of completions cut at the maximum length."),
        ("r1ray_grpo_kl", "Mean k3 KL to the reference policy per token (beta > 0)."),
        ("r1ray_grpo_entropy", "Mean policy entropy per completion token (nats)."),
        ("r1ray_grpo_clip_fraction", "Share of completion tokens where the ratio clip is active."),
        ("r1ray_grpo_rollout_tokens_per_second", "Completion tokens generated per second."),
        ("r1ray_grpo_generate_seconds", "Seconds per step generating rollouts."),
        ("r1ray_grpo_score_seconds", "Seconds per step waiting for rewards."),
        ("r1ray_grpo_reward_seconds", "Seconds per step the reward tasks computed."),
        ("r1ray_grpo_learn_seconds", "Seconds per step in forward/backward/optimizer."),
        ("r1ray_grpo_sync_seconds", "Seconds per weight sync to the rollout engines."),
        ("r1ray_grpo_engine_replacements", "Rollout engines replaced so far (pool total)."),
        ("r1ray_grpo_accuracy", "Held-out greedy accuracy of the last evaluation."),
    ),
    # ---- serving
    MetricSpec("r1ray_serve_requests", "counter", "HTTP requests by route and status code.", (*_SERVE_TAGS, "route", "status")),
    MetricSpec(
        "r1ray_serve_latency_seconds", "histogram", "End-to-end request latency.", (*_SERVE_TAGS, "route"), _LATENCY_BUCKETS
    ),
    MetricSpec("r1ray_serve_ttft_seconds", "histogram", "Time to first token.", (*_SERVE_TAGS, "route"), _LATENCY_BUCKETS),
    MetricSpec("r1ray_serve_tokens_generated", "counter", "Completion tokens generated.", _SERVE_TAGS),
    MetricSpec("r1ray_serve_tokens_per_second", "gauge", "Generation throughput of the last batch.", _SERVE_TAGS),
    MetricSpec("r1ray_serve_batch_size", "histogram", "Requests per generation batch.", _SERVE_TAGS, _BATCH_BUCKETS),
    MetricSpec("r1ray_serve_queue_depth", "gauge", "Requests waiting for a batch slot.", _SERVE_TAGS),
    MetricSpec("r1ray_serve_prefix_reused_ratio", "gauge", "Share of prompt tokens whose KV was not computed again "
               "since the replica started: taken from the prefix cache or shared by identical prompts of a batch.",
               _SERVE_TAGS),
    MetricSpec("r1ray_serve_prefix_cache_hits", "counter", "Prompts that found a cached prefix.", _SERVE_TAGS),
    MetricSpec("r1ray_serve_prefix_cache_bytes", "gauge", "Memory held by the prefix cache.", _SERVE_TAGS),
    MetricSpec("r1ray_serve_ab_routed", "counter", "Requests the A/B router sent to a variant, by the model id the "
               "client named (an alias, or the variant itself) and whether a user id made the choice sticky.",
               ("alias", "variant", "sticky")),
)

BY_NAME: dict[str, MetricSpec] = {s.name: s for s in SPECS}
_instances: dict[str, Any] = {}


def _instance(spec: MetricSpec) -> Any | None:
    import ray

    if not ray.is_initialized():
        return None
    inst = _instances.get(spec.name)
    if inst is None:
        from ray.util import metrics as rm

        if spec.kind == "counter":
            inst = rm.Counter(spec.name, description=spec.description, tag_keys=spec.tags)
        elif spec.kind == "gauge":
            inst = rm.Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
        else:
            inst = rm.Histogram(
                spec.name, description=spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags
            )
        _instances[spec.name] = inst
    return inst


def record(name: str, value: float, **tags: str) -> None:
    """Counter: add ``value``; gauge: set it; histogram: observe it. Unknown names raise KeyError."""
    spec = BY_NAME.get(name)
    if spec is None:
        raise KeyError(f"unknown metric {name!r}; declare it in r1ray/observe/metrics.py")
    inst = _instance(spec)
    if inst is None:
        return
    tags = {k: str(v) for k, v in tags.items()}
    missing = set(spec.tags) - set(tags)
    if missing:
        raise ValueError(f"metric {name} needs tags {sorted(missing)}")
    if spec.kind == "counter":
        if value > 0:
            inst.inc(value, tags=tags)
    elif spec.kind == "gauge":
        inst.set(value, tags=tags)
    else:
        inst.observe(value, tags=tags)


def stage_metric_name(stage: str, key: str) -> str | None:
    """The declared Prometheus metric of a training stage's own metric ``key`` (``grpo`` + ``reward_mean``
    -> ``r1ray_grpo_reward_mean``), or None when the stage declares none for it (then it goes to Ray Train
    reports and W&B only)."""
    name = f"r1ray_{stage}_{key}"
    return name if name in BY_NAME and BY_NAME[name].tags == _TRAIN_TAGS else None
