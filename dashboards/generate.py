"""Generate the Grafana dashboards in ``dashboards/*.json`` from the metric list in r1ray/observe/metrics.py.

    python dashboards/generate.py           # rewrite the JSON files
    python dashboards/generate.py --check   # exit 1 if a committed JSON differs from what this generates

Panels name metrics through ``m("r1ray_...")``, which looks the name up in ``r1ray.observe.metrics.BY_NAME``
(a typo raises here, not in Grafana), or through ``RAY_BUILTIN``, the explicit list of Ray's own series the
dashboards use. ``tests/unit/test_dashboards.py`` re-parses every PromQL expression of the committed JSON and
checks each series against those two lists; ``tests/ray/test_metrics_scrape.py`` proves each is exported.

The JSON is importable as is (Dashboards -> New -> Import): it declares a Prometheus data-source input and a
``datasource`` template variable, so it works with any Prometheus that scrapes Ray (see prometheus.yml).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from r1ray.observe.metrics import BY_NAME

HERE = Path(__file__).resolve().parent

# Ray's own series used by panels (name -> what it is). Each must be exported by a plain local Ray 2.60
# (the scrape test checks it); GPU-only series are deliberately absent because CI cannot prove them.
RAY_BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {
    "ray_node_cpu_utilization": ("CPU utilisation of each node, percent (reporter agent).", ("ip", "RayNodeType")),
    "ray_node_mem_used": ("Memory used on each node, bytes (reporter agent).", ("ip", "RayNodeType")),
    "ray_cluster_active_nodes": ("Alive nodes by node type (autoscaler monitor / GCS).", ("node_type",)),
}

DS = {"type": "prometheus", "uid": "${datasource}"}


def m(name: str, series: str = "") -> str:
    """The Prometheus series of a declared r1ray metric; ``series`` picks a histogram's bucket/sum/count."""
    spec = BY_NAME[name]  # KeyError on an undeclared name
    if spec.kind == "histogram":
        if series not in ("bucket", "sum", "count"):
            raise ValueError(f"{name} is a histogram: pick series='bucket', 'sum' or 'count'")
        return f"{spec.prometheus_name}_{series}"
    if series:
        raise ValueError(f"{name} is a {spec.kind}: it has no {series!r} series")
    return spec.prometheus_name


def ray(name: str) -> str:
    if name not in RAY_BUILTIN:
        raise KeyError(f"{name} is not in RAY_BUILTIN; add it there (and prove it is exported) first")
    return name


def quantile(q: float, name: str, by: str, sel: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({m(name, 'bucket')}{{{sel}}}[$__rate_interval])))"


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat
    description: str = ""
    width: int = 8
    height: int = 8
    extra_defaults: dict = field(default_factory=dict)


@dataclass
class Row:
    title: str
    panels: list[Panel]


@dataclass
class Board:
    uid: str
    title: str
    description: str
    variables: list[tuple[str, str, str]]  # (name, label, label_values(...) query)
    rows: list[Row]
    tags: tuple[str, ...] = ("r1ray",)


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-var"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "options": [],
        "regex": "",
        "skipUrlSync": False,
    }


def _panel(p: Panel, pid: int, x: int, y: int) -> dict:
    targets = [
        {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i), "range": True}
        for i, (expr, legend) in enumerate(p.exprs)
    ]
    defaults: dict = {"unit": p.unit, **p.extra_defaults}
    out: dict = {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
    }
    if p.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    return out


def render(board: Board) -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for row in board.rows:
        panels.append(
            {"id": pid, "type": "row", "title": row.title, "collapsed": False, "panels": [],
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
        )
        pid, y = pid + 1, y + 1
        x, row_h = 0, 0
        for p in row.panels:
            if x + p.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel(p, pid, x, y))
            pid, x, row_h = pid + 1, x + p.width, max(row_h, p.height)
        y += row_h
    datasource_var = {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        # Grafana's import dialog fills ${DS_PROMETHEUS} (declared in __inputs) with the chosen data source.
        "current": {"selected": False, "text": "Prometheus", "value": "${DS_PROMETHEUS}"},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }
    return {
        "__inputs": [
            {"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "Prometheus that scrapes Ray",
             "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
            {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
        ],
        "uid": board.uid,
        "title": board.title,
        "description": board.description,
        "tags": list(board.tags),
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [datasource_var] + [_variable(*v) for v in board.variables]},
        "panels": panels,
    }


# --------------------------------------------------------------------------------------------------
# The three dashboards
# --------------------------------------------------------------------------------------------------

_T = 'run=~"$run", stage=~"$stage"'
_BY_T = "run, stage"


def training() -> Board:
    def gauge(name: str) -> str:
        # Every worker may set the gauge; the run's value is the same on all of them, so take the max.
        return f"max by ({_BY_T}) ({m(name)}{{{_T}}})"

    leg = "{{run}} {{stage}}"
    return Board(
        uid="r1ray-training",
        title="r1ray / training",
        description="Pretrain, SFT, GRPO and distill runs (r1ray_train_* metrics; `stage` tells them apart).",
        variables=[
            ("run", "Run", f"label_values({m('r1ray_train_step')}, run)"),
            ("stage", "Stage", f"label_values({m('r1ray_train_step')}, stage)"),
        ],
        rows=[
            Row("Progress", [
                Panel("Step", [(gauge("r1ray_train_step"), leg)], kind="stat", width=6, height=5),
                Panel("Samples consumed", [(gauge("r1ray_train_samples_consumed"), leg)], kind="stat",
                      width=6, height=5, description="The global data cursor (exactly-once resume point)."),
                Panel("Workers", [(gauge("r1ray_train_workers"), leg)], kind="stat", width=6, height=5,
                      description="Training workers in the current group (elastic runs move between min and max)."),
                Panel("Restarts", [(f"sum by ({_BY_T}) ({m('r1ray_train_restarts')}{{{_T}}})", leg)],
                      kind="stat", width=6, height=5,
                      description="Worker-group restarts resumed from a checkpoint."),
            ]),
            Row("Optimisation", [
                Panel("Loss", [(gauge("r1ray_train_loss"), f"train {leg}"),
                               (gauge("r1ray_train_val_loss"), f"val {leg}")]),
                Panel("Learning rate", [(gauge("r1ray_train_lr"), leg)]),
                Panel("Gradient norm (before clipping)", [(gauge("r1ray_train_grad_norm"), leg)]),
                Panel("Non-finite steps skipped",
                      [(f"sum by ({_BY_T}) (increase({m('r1ray_train_nonfinite_steps')}{{{_T}}}[$__rate_interval]))",
                        leg)]),
            ]),
            Row("Throughput", [
                Panel("Tokens / s (all workers)", [(gauge("r1ray_train_tokens_per_second"), leg)], unit="short"),
                Panel("MFU", [(gauge("r1ray_train_mfu"), leg)], unit="percentunit",
                      description="Model FLOPs utilisation; reported on GPU workers only.",
                      extra_defaults={"min": 0, "max": 1}),
                Panel("Worker count", [(gauge("r1ray_train_workers"), leg)]),
            ]),
            Row("Checkpoints and memory", [
                Panel("Checkpoint save time",
                      [(quantile(0.5, "r1ray_train_checkpoint_save_seconds", _BY_T, _T), f"p50 {leg}"),
                       (quantile(0.95, "r1ray_train_checkpoint_save_seconds", _BY_T, _T), f"p95 {leg}"),
                       (f"sum by ({_BY_T}) (rate({m('r1ray_train_checkpoint_save_seconds', 'sum')}{{{_T}}}"
                        f"[$__rate_interval])) / sum by ({_BY_T}) (rate("
                        f"{m('r1ray_train_checkpoint_save_seconds', 'count')}{{{_T}}}[$__rate_interval]))",
                        f"mean {leg}")],
                      unit="s"),
                Panel("Worker memory",
                      [(f"max by ({_BY_T}, kind) ({m('r1ray_train_memory_bytes')}{{{_T}}})",
                        "{{kind}} " + leg)], unit="bytes"),
                Panel("Checkpoints saved",
                      [(f"sum by ({_BY_T}) ({m('r1ray_train_checkpoint_save_seconds', 'count')}{{{_T}}})", leg)],
                      kind="stat"),
            ]),
            _cluster_row(),
        ],
    )


_D = 'source=~"$source"'


def data() -> Board:
    def rate(name: str, by: str = "source", extra: str = "") -> str:
        sel = _D + (f", {extra}" if extra else "")
        return f"sum by ({by}) (rate({m(name)}{{{sel}}}[$__rate_interval]))"

    def total(name: str) -> str:
        return f"sum({m(name)}{{{_D}}})"

    return Board(
        uid="r1ray-data",
        title="r1ray / data",
        description="The data stage: read, clean, dedup, filter, PII, tokenize and pack (r1ray_data_* metrics).",
        variables=[("source", "Source", f"label_values({m('r1ray_data_docs_read')}, source)")],
        rows=[
            Row("Totals", [
                Panel("Read", [(total("r1ray_data_docs_read"), "read")], kind="stat", width=4, height=5),
                Panel("Kept", [(total("r1ray_data_docs_kept"), "kept")], kind="stat", width=4, height=5),
                Panel("Duplicates", [(total("r1ray_data_docs_duplicate"), "duplicate")], kind="stat",
                      width=4, height=5),
                Panel("Filtered", [(total("r1ray_data_docs_filtered"), "filtered")], kind="stat",
                      width=4, height=5),
                Panel("Rejected", [(total("r1ray_data_docs_rejected"), "rejected")], kind="stat",
                      width=4, height=5),
                Panel("Tokens written", [(f"sum({m('r1ray_data_tokens_written')})", "tokens")], kind="stat",
                      width=4, height=5),
            ]),
            Row("Rates", [
                Panel("Documents / s", [(rate("r1ray_data_docs_read"), "read {{source}}"),
                                        (rate("r1ray_data_docs_kept"), "kept {{source}}")], width=12),
                Panel("Dropped documents / s", [
                    (rate("r1ray_data_docs_duplicate"), "duplicate {{source}}"),
                    (rate("r1ray_data_docs_filtered"), "filtered {{source}}"),
                    (rate("r1ray_data_docs_rejected"), "rejected {{source}}"),
                ], width=12),
                Panel("Kept fraction",
                      [(f"{total('r1ray_data_docs_kept')} / {total('r1ray_data_docs_read')}", "kept / read")],
                      unit="percentunit", kind="stat", width=6),
                Panel("Tokens written / s",
                      [(f"sum by (split) (rate({m('r1ray_data_tokens_written')}[$__rate_interval]))", "{{split}}")],
                      width=6),
                Panel("PII spans replaced / s",
                      [(f"sum by (kind) (rate({m('r1ray_data_pii_replaced')}[$__rate_interval]))", "{{kind}}")],
                      width=12),
            ]),
            Row("Why documents were dropped", [
                Panel("Duplicates by kind", [(rate("r1ray_data_docs_duplicate", "kind"), "{{kind}}")]),
                Panel("Filtered by reason", [(rate("r1ray_data_docs_filtered", "reason"), "{{reason}}")]),
                Panel("Rejected by reason", [(rate("r1ray_data_docs_rejected", "reason"), "{{reason}}")]),
            ]),
            _cluster_row(),
        ],
    )


_S = 'model=~"$model", variant=~"$variant"'
_A = 'alias=~"$alias"'


def serving() -> Board:
    req = m("r1ray_serve_requests")
    routed = m("r1ray_serve_ab_routed")

    def by_variant(name: str) -> str:
        return f"sum by (variant) (rate({m(name)}{{{_S}}}[$__rate_interval]))"

    return Board(
        uid="r1ray-serving",
        title="r1ray / serving",
        description="The OpenAI-compatible Serve app (r1ray_serve_* metrics); an A/B app's variants and aliases "
                    "in the last rows (a one-model app is its own single variant).",
        variables=[("model", "Model", f"label_values({req}, model)"),
                   ("variant", "Variant", f"label_values({req}, variant)"),
                   ("alias", "Alias", f"label_values({routed}, alias)")],
        rows=[
            Row("Traffic", [
                Panel("Requests / s", [(f"sum by (route) (rate({req}{{{_S}}}[$__rate_interval]))", "{{route}}")],
                      unit="reqps"),
                Panel("Errors / s by status code",
                      [(f'sum by (status) (rate({req}{{{_S}, status!~"2.."}}[$__rate_interval]))', "{{status}}")],
                      unit="reqps"),
                Panel("Error ratio",
                      [(f'sum(rate({req}{{{_S}, status!~"2.."}}[$__rate_interval])) / '
                        f"sum(rate({req}{{{_S}}}[$__rate_interval]))", "errors / requests")],
                      unit="percentunit"),
            ]),
            Row("Latency", [
                Panel("Request latency p50 / p99",
                      [(quantile(0.5, "r1ray_serve_latency_seconds", "route", _S), "p50 {{route}}"),
                       (quantile(0.99, "r1ray_serve_latency_seconds", "route", _S), "p99 {{route}}")],
                      unit="s", width=12),
                Panel("Time to first token p50 / p99",
                      [(quantile(0.5, "r1ray_serve_ttft_seconds", "route", _S), "p50 {{route}}"),
                       (quantile(0.99, "r1ray_serve_ttft_seconds", "route", _S), "p99 {{route}}")],
                      unit="s", width=12),
            ]),
            Row("Generation", [
                Panel("Tokens / s",
                      [(f"sum by (model) (rate({m('r1ray_serve_tokens_generated')}{{{_S}}}[$__rate_interval]))",
                        "generated {{model}}"),
                       (f"max by (model) ({m('r1ray_serve_tokens_per_second')}{{{_S}}})", "last batch {{model}}")]),
                Panel("Queue depth", [(f"sum by (model) ({m('r1ray_serve_queue_depth')}{{{_S}}})", "{{model}}")]),
                Panel("Batch size p50 / mean",
                      [(quantile(0.5, "r1ray_serve_batch_size", "model", _S), "p50 {{model}}"),
                       (f"sum by (model) (rate({m('r1ray_serve_batch_size', 'sum')}{{{_S}}}[$__rate_interval])) / "
                        f"sum by (model) (rate({m('r1ray_serve_batch_size', 'count')}{{{_S}}}[$__rate_interval]))",
                        "mean {{model}}")]),
                Panel("Prompt KV reused",
                      [(f"max by (model) ({m('r1ray_serve_prefix_reused_ratio')}{{{_S}}})", "{{model}}")],
                      unit="percentunit",
                      description="Share of prompt tokens since the replica started whose KV came from the prefix "
                                  "cache or was shared by identical prompts of a batch (n > 1)."),
            ]),
            Row("A/B variants", [
                Panel("Requests / s by variant", [(by_variant("r1ray_serve_requests"), "{{variant}}")], unit="reqps",
                      width=6, description="Every route; 'unrouted': requests the A/B router refused before it "
                                           "picked a variant (401, 404 unknown model, malformed body)."),
                Panel("Error ratio by variant",
                      [(f'sum by (variant) (rate({req}{{{_S}, status!~"2.."}}[$__rate_interval])) / '
                        f"{by_variant('r1ray_serve_requests')}", "{{variant}}")],
                      unit="percentunit", width=6),
                Panel("Latency p50 / p99 by variant",
                      [(quantile(0.5, "r1ray_serve_latency_seconds", "variant", _S), "p50 {{variant}}"),
                       (quantile(0.99, "r1ray_serve_latency_seconds", "variant", _S), "p99 {{variant}}")],
                      unit="s", width=6),
                Panel("Tokens / s by variant", [(by_variant("r1ray_serve_tokens_generated"), "{{variant}}")],
                      width=6),
                Panel("Realised split by alias",
                      [(f"sum by (alias, variant) (rate({routed}{{{_A}}}[$__rate_interval])) / ignoring (variant) "
                        f"group_left sum by (alias) (rate({routed}{{{_A}}}[$__rate_interval]))",
                        "{{alias}} -> {{variant}}")],
                      unit="percentunit", width=12,
                      description="Share of the requests sent to each name (an alias, or a variant named directly) "
                                  "that each variant served; compare with the configured weights."),
                Panel("Sticky share of routed requests",
                      [(f'sum by (alias) (rate({routed}{{{_A}, sticky="true"}}[$__rate_interval])) / '
                        f"sum by (alias) (rate({routed}{{{_A}}}[$__rate_interval]))", "{{alias}}")],
                      unit="percentunit", width=12,
                      description="Requests whose variant a user id chose (X-User-Id header or the 'user' field)."),
            ]),
            _cluster_row(),
        ],
    )


def _cluster_row() -> Row:
    return Row("Cluster", [
        Panel("Alive nodes", [(f"sum by (node_type) ({ray('ray_cluster_active_nodes')})", "{{node_type}}")]),
        Panel("Node CPU", [(f"max by (ip, RayNodeType) ({ray('ray_node_cpu_utilization')})",
                                "{{RayNodeType}} {{ip}}")],
              unit="percent"),
        Panel("Node memory used", [(f"max by (ip, RayNodeType) ({ray('ray_node_mem_used')})",
                                        "{{RayNodeType}} {{ip}}")],
              unit="bytes"),
    ])


def grpo() -> Board:
    def gauge(name: str) -> str:
        return f"max by ({_BY_T}) ({m(name)}{{{_T}}})"

    leg = "{{run}}"
    rewards = ["accuracy", "format", "tag_count", "length", "language"]
    return Board(
        uid="r1ray-grpo",
        title="r1ray / GRPO",
        description="GRPO runs: rewards per function, group statistics, completions, the policy's drift and the "
                    "step's time split (r1ray_grpo_* metrics, recorded by rank 0 at every report).",
        variables=[
            ("run", "Run", f"label_values({m('r1ray_grpo_reward_mean')}, run)"),
            ("stage", "Stage", f"label_values({m('r1ray_grpo_reward_mean')}, stage)"),
        ],
        rows=[
            Row("Rewards", [
                Panel("Reward (weighted total)", [(gauge("r1ray_grpo_reward_mean"), f"mean {leg}"),
                                                  (gauge("r1ray_grpo_reward_std"), f"std {leg}")]),
                Panel("Reward per function", [(gauge(f"r1ray_grpo_reward_{r}"), f"{r} {leg}") for r in rewards],
                      description="Mean of each reward function over the step's rollouts (before weighting)."),
                Panel("Held-out accuracy", [(gauge("r1ray_grpo_accuracy"), leg)], unit="percentunit",
                      description="Greedy accuracy on the tasks' eval split, through the rollout engines.",
                      extra_defaults={"min": 0, "max": 1}),
            ]),
            Row("Groups", [
                Panel("Zero-variance groups", [(gauge("r1ray_grpo_frac_zero_variance_groups"), leg)],
                      unit="percentunit", description="Groups whose rewards all agree carry no gradient.",
                      extra_defaults={"min": 0, "max": 1}),
                Panel("Dropped groups (dynamic sampling)", [(gauge("r1ray_grpo_dropped_groups"), leg)]),
                Panel("Reward failures (timeouts, errors)", [(gauge("r1ray_grpo_reward_failures"), leg)]),
            ]),
            Row("Completions and policy", [
                Panel("Completion length", [(gauge("r1ray_grpo_completion_length_mean"), f"mean {leg}"),
                                            (gauge("r1ray_grpo_completion_length_max"), f"max {leg}")]),
                Panel("Clipped at max length", [(gauge("r1ray_grpo_completion_clipped_fraction"), leg)],
                      unit="percentunit", extra_defaults={"min": 0, "max": 1}),
                Panel("KL to the reference, entropy, clip fraction",
                      [(gauge("r1ray_grpo_kl"), f"kl {leg}"), (gauge("r1ray_grpo_entropy"), f"entropy {leg}"),
                       (gauge("r1ray_grpo_clip_fraction"), f"clip {leg}")],
                      description="KL only when grpo.beta > 0."),
            ]),
            Row("Time split", [
                Panel("Seconds per step", [(gauge(f"r1ray_grpo_{k}_seconds"), f"{k} {leg}")
                                           for k in ("generate", "score", "reward", "learn", "sync")], unit="s"),
                Panel("Rollout tokens / s", [(gauge("r1ray_grpo_rollout_tokens_per_second"), leg)]),
                Panel("Engines replaced", [(gauge("r1ray_grpo_engine_replacements"), leg)], kind="stat"),
            ]),
        ],
    )


BOARDS = {"training": training, "data": data, "serving": serving, "grpo": grpo}

# --------------------------------------------------------------------------------------------------
# Reading dashboards back: which series and labels each PromQL expression uses
# --------------------------------------------------------------------------------------------------

_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                 "unless", "offset", "inf", "nan"}
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"(?:[^\"\\]|\\.)*\"")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def series_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and strings removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range / subquery windows
    s = _GROUPING.sub(" ", s)  # by (...), without (...), on (...)
    names = set()
    for mt in _IDENT.finditer(s):
        word, rest = mt.group(0), s[mt.end():].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_WORDS or word.startswith("$"):
            continue
        if mt.start() and (s[mt.start() - 1] == "$" or s[mt.start() - 1].isdigit()):
            continue  # a Grafana variable ($__rate_interval) or a duration's unit (offset 5m)
        names.add(word)
    return names


def labels_in(expr: str) -> dict[str, set[str]]:
    """``{series: labels matched in its selectors}`` plus ``{"": labels of by/without/on clauses}``."""
    out: dict[str, set[str]] = {"": set()}
    for sel in _SELECTOR.finditer(expr):
        out.setdefault(sel.group(1), set()).update(mt.group(1) for mt in _MATCHER.finditer(sel.group(2)))
    for grp in _GROUPING.finditer(expr):
        out[""].update(x.strip() for x in grp.group(2).split(",") if x.strip())
    return out


def queries(board: dict) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of a rendered dashboard, template variables included."""
    out = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            mt = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*([a-zA-Z_]\w*)\s*\)", v["definition"])
            if not mt:
                raise ValueError(f"variable {v['name']}: cannot read {v['definition']!r}")
            out.append((f"variable ${v['name']}", f"max by ({mt.group(2)}) ({mt.group(1)})"))
    return out


def dump(board: dict) -> str:
    return json.dumps(board, indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, build in BOARDS.items():
        path = HERE / f"{name}.json"
        text = dump(render(build()))
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            sys.stdout.write(f"wrote {path}\n")
    if stale:
        sys.stderr.write(f"stale: {', '.join(stale)}; run python dashboards/generate.py\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
