"""The Grafana dashboards and the Prometheus config in dashboards/: importable, current, and every series a
panel queries is declared in r1ray/observe/metrics.py (or is a Ray built-in listed in generate.RAY_BUILTIN),
with only the labels that metric carries. ``tests/ray/test_metrics_scrape.py`` proves they are exported."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from r1ray.observe.metrics import SPECS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
BOARD_FILES = ("training.json", "data.json", "serving.json", "grpo.json")
# Labels Ray puts on every series, and the ones Prometheus adds when it scrapes.
RAY_LABELS = {"SessionName", "Version", "Component", "NodeAddress", "WorkerId", "instance", "job"}


def load_generator():
    name = "r1ray_dashboards_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DASHBOARDS / "generate.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


gen = load_generator()


def series_owner() -> dict[str, tuple[str, set[str]]]:
    """Prometheus series name -> (metric it belongs to, labels it may carry)."""
    out = {}
    for s in SPECS:
        extra = {"le"} if s.kind == "histogram" else set()
        for series in s.prometheus_series:
            out[series] = (s.name, set(s.tags) | extra)
    for name, (_, labels) in gen.RAY_BUILTIN.items():
        out[name] = (name, set(labels))
    return out


@pytest.fixture(scope="module")
def boards() -> dict[str, dict]:
    return {f: json.loads((DASHBOARDS / f).read_text()) for f in BOARD_FILES}


def test_committed_json_is_what_the_generator_writes():
    for name, build in gen.BOARDS.items():
        committed = (DASHBOARDS / f"{name}.json").read_text()
        assert committed == gen.dump(gen.render(build())), (
            f"dashboards/{name}.json is stale: run python dashboards/generate.py"
        )


def test_promql_reader_on_known_expressions():
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(ray_r1ray_serve_latency_seconds_bucket'
        '{model=~"$model", status!~"2.."}[$__rate_interval]))) / on (route) group_left sum(up) offset 5m'
    )
    assert gen.series_in(expr) == {"ray_r1ray_serve_latency_seconds_bucket", "up"}
    labels = gen.labels_in(expr)
    assert labels["ray_r1ray_serve_latency_seconds_bucket"] == {"model", "status"}
    assert labels[""] == {"le", "route"}
    assert gen.series_in("sum(a_total) / sum(b)") == {"a_total", "b"}
    assert gen.series_in('count(x{a="}"}) and bool 1') == {"x"}


def test_every_queried_series_is_declared_with_its_labels(boards):
    owners = series_owner()
    problems = []
    n = 0
    for fname, board in boards.items():
        for title, expr in gen.queries(board):
            used = gen.series_in(expr)
            assert used, f"{fname} / {title}: no series in {expr!r}"
            labels = gen.labels_in(expr)
            allowed_in_expr = set(RAY_LABELS)
            for series in used:
                n += 1
                if series not in owners:
                    problems.append(f"{fname} / {title}: {series} is neither declared in metrics.py nor in RAY_BUILTIN")
                    continue
                metric, tags = owners[series]
                allowed_in_expr |= tags
                bad = labels.get(series, set()) - tags - RAY_LABELS
                if bad:
                    problems.append(f"{fname} / {title}: {series} has no label(s) {sorted(bad)} (tags: {sorted(tags)})")
            bad = labels[""] - allowed_in_expr
            if bad:
                problems.append(f"{fname} / {title}: grouping by unknown label(s) {sorted(bad)}")
    assert not problems, "\n".join(problems)
    assert n > 60


def test_issue_panels_are_present(boards):
    """Issue #7 item 3: what each dashboard must show, as metrics it queries."""
    def metrics_of(board):
        owners = series_owner()
        return {owners[s][0] for _, e in gen.queries(board) for s in gen.series_in(e)}

    need = {
        "training.json": {"r1ray_train_loss", "r1ray_train_lr", "r1ray_train_grad_norm",
                          "r1ray_train_tokens_per_second", "r1ray_train_mfu",
                          "r1ray_train_checkpoint_save_seconds", "r1ray_train_restarts", "r1ray_train_workers"},
        "data.json": {"r1ray_data_docs_read", "r1ray_data_docs_kept", "r1ray_data_docs_duplicate",
                      "r1ray_data_docs_filtered", "r1ray_data_docs_rejected"},
        "serving.json": {"r1ray_serve_requests", "r1ray_serve_latency_seconds", "r1ray_serve_ttft_seconds",
                         "r1ray_serve_tokens_generated", "r1ray_serve_queue_depth", "r1ray_serve_batch_size",
                         "r1ray_serve_ab_routed"},
        # issue #13 item 5: every GRPO metric has a panel
        "grpo.json": {s.name for s in SPECS if s.name.startswith("r1ray_grpo_")},
    }
    for fname, metrics in need.items():
        missing = metrics - metrics_of(boards[fname])
        assert not missing, f"{fname} lacks panels for {sorted(missing)}"
    # p50 and p99 latency, and errors broken down by status code
    serving = [e for _, e in gen.queries(boards["serving.json"])]
    assert any("histogram_quantile(0.5," in e and "latency" in e for e in serving)
    assert any("histogram_quantile(0.99," in e and "latency" in e for e in serving)
    assert any("sum by (status)" in e and 'status!~"2.."' in e for e in serving)
    # Issue #16: per-variant requests, errors, latency and tokens, and the realised split of each alias
    by_variant = [e for e in serving if "by (variant)" in e or "by (le, variant)" in e]
    for metric in ("requests_total", "latency_seconds_bucket", "tokens_generated_total"):
        assert any(metric in e for e in by_variant), metric
    assert any('status!~"2.."' in e for e in by_variant)
    assert any("by (alias, variant)" in e and "ab_routed" in e for e in serving)


def test_dashboards_are_importable_grafana_json(boards):
    uids = set()
    for fname, b in boards.items():
        assert b["uid"] not in uids and len(b["uid"]) <= 40
        uids.add(b["uid"])
        assert b["schemaVersion"] >= 36 and b["title"].startswith("r1ray / ")
        variables = {v["name"]: v for v in b["templating"]["list"]}
        ds = variables["datasource"]
        assert ds["type"] == "datasource" and ds["query"] == "prometheus"
        assert any(i["type"] == "datasource" and i["pluginId"] == "prometheus" for i in b["__inputs"])
        ids = [p["id"] for p in b["panels"]]
        assert len(ids) == len(set(ids)), f"{fname}: duplicate panel ids"
        cells: set[tuple[int, int]] = set()
        for p in b["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, f"{fname} / {p['title']}: off the grid"
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not (mine & cells), f"{fname} / {p['title']}: overlaps another panel"
            cells |= mine
            if p["type"] == "row":
                continue
            assert p["type"] in ("timeseries", "stat")
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            refs = [t["refId"] for t in p["targets"]]
            assert p["targets"] and len(refs) == len(set(refs))
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}" and t["expr"].count("(") == t["expr"].count(")")
            # every $variable a panel uses is defined (Grafana's built-ins start with __)
            for t in p["targets"]:
                for var in set(__import__("re").findall(r"\$(\w+)", t["expr"])):
                    assert var.startswith("__") or var in variables, f"{fname} / {p['title']}: ${var} undefined"


def test_generator_rejects_undeclared_metric_names():
    with pytest.raises(KeyError):
        gen.m("r1ray_train_loss_typo")
    with pytest.raises(KeyError, match="RAY_BUILTIN"):
        gen.ray("ray_node_gpus_utilization")
    with pytest.raises(ValueError, match="histogram"):
        gen.m("r1ray_serve_latency_seconds")


def test_prometheus_config_uses_rays_service_discovery_file():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    cfg = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    files = [f for sd in jobs["ray"]["file_sd_configs"] for f in sd["files"]]
    assert files == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    ds = yaml.safe_load((DASHBOARDS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
