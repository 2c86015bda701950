"""Scrape Ray's Prometheus endpoint and prove that every series a Grafana panel in dashboards/ queries is
exported, with the labels the panel filters and groups by.

One local Ray with the dashboard (it writes Prometheus' service-discovery file) and a known metrics-export
port serves the whole module. A background thread scrapes the endpoint every second and keeps every series
it has seen, so series of workers that have already exited still count (Prometheus would have scraped them
too). Export lags recording by ~5-10 s, so checks poll with a bounded timeout.

1. The export path: each declared metric recorded through ``r1ray.observe.metrics.record`` from a task, an
   actor and the driver comes out under ``MetricSpec.prometheus_series`` (tag values ``probe``).
2. Real short runs of the stages (data, pretrain, serve debug configs) export the series their dashboard
   panels query (tag values other than ``probe``).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from r1ray.observe.metrics import BY_NAME, SPECS

ROOT = Path(__file__).resolve().parents[2]
PROBE = "probe"
EXPORT_TIMEOUT_S = 60

pytestmark = pytest.mark.slow


def _generator():
    name = "r1ray_dashboards_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "dashboards" / "generate.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


gen = _generator()


def panel_series() -> dict[str, set[str]]:
    """Every series any committed dashboard queries -> labels the queries need on it."""
    need: dict[str, set[str]] = defaultdict(set)
    for f in ("training.json", "data.json", "serving.json"):
        board = json.loads((ROOT / "dashboards" / f).read_text())
        for _, expr in gen.queries(board):
            labels = gen.labels_in(expr)
            for s in gen.series_in(expr):
                need[s] |= labels.get(s, set())
    return dict(need)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, list[dict[str, str]]]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[sample.name].append(dict(sample.labels))
    return out


class Scraper:
    """Scrapes ``url`` every ``period`` seconds in a thread; ``seen`` keeps every series and label set."""

    def __init__(self, url: str, period: float = 1.0):
        self.url, self.period = url, period
        self.seen: dict[str, list[dict[str, str]]] = defaultdict(list)
        self._keys: set[tuple] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.scrape_once()
            self._stop.wait(self.period)

    def scrape_once(self):
        try:
            got = scrape(self.url)
        except OSError:
            self.errors += 1
            return
        with self._lock:
            for name, label_sets in got.items():
                for labels in label_sets:
                    key = (name, tuple(sorted((k, v) for k, v in labels.items() if k != "le")))
                    if key not in self._keys:
                        self._keys.add(key)
                        self.seen[name].append(labels)

    def series(self, name: str, probe: bool | None = None) -> list[dict[str, str]]:
        """Label sets seen for ``name``; ``probe`` True/False keeps only synthetic/real samples."""
        with self._lock:
            rows = list(self.seen.get(name, []))
        if probe is None:
            return rows
        return [r for r in rows if (PROBE in r.values()) == probe]

    def wait_for(self, names, *, probe: bool | None, timeout: float = EXPORT_TIMEOUT_S) -> set[str]:
        """Wait until every name has a sample (of the given kind); returns the names still missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = {n for n in names if not self.series(n, probe)}
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.5)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=15)


@pytest.fixture(scope="module")
def ray_metrics():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for attempt in (1, 2):
        port = _free_port()
        try:
            ctx = ray.init(
                address="local",
                num_cpus=3,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                dashboard_port=_free_port(),
                _metrics_export_port=port,
                logging_level="WARNING",
                configure_logging=False,
            )
            break
        except Exception as e:  # noqa: BLE001 - Ray's own "node timed out during startup" is a bare Exception
            # On an overloaded machine the dashboard agent can miss the raylet's 30 s start-up window.
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            print(f"ray.init failed ({e}); retrying once")
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
    yield {"port": port, "session_dir": session_dir, "scraper": scraper, "ctx": ctx}
    scraper.stop()
    ray.shutdown()


def test_service_discovery_file_lists_the_metrics_endpoint(ray_metrics):
    """dashboards/prometheus.yml points Prometheus at Ray's file-SD list: it must name our export port."""
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    path = Path(ray_metrics["session_dir"]) / PROMETHEUS_SERVICE_DISCOVERY_FILE
    port = ray_metrics["port"]
    deadline = time.monotonic() + 40  # rewritten every ~5 s as nodes come and go
    groups, ours = [], []
    while not ours and time.monotonic() < deadline:
        time.sleep(0.5)
        if path.exists():
            groups = json.loads(path.read_text())  # written atomically (os.replace)
            ours = [t for g in groups for t in g["targets"] if t.endswith(f":{port}")]
    assert ours, f"export port {port} never listed in {path}: {groups}"
    assert groups[0]["labels"] == {"job": "ray"}
    # What Prometheus would do: scrape the discovered target.
    got = scrape(f"http://{ours[0]}/metrics")
    assert "ray_node_cpu_utilization" in got


def _probe_tags(spec) -> dict[str, str]:
    return {t: PROBE for t in spec.tags}


def record_every_metric() -> int:
    """Record each declared metric once with ``probe`` tags (run inside tasks/actors: imports inside)."""
    from r1ray.observe.metrics import SPECS, record

    for spec in SPECS:
        record(spec.name, 0.3 if spec.kind == "histogram" else 2.0, **{t: "probe" for t in spec.tags})
    return len(SPECS)


def test_every_declared_metric_is_exported_from_task_actor_and_driver(ray_metrics):
    import ray

    from r1ray.observe.metrics import record

    scraper: Scraper = ray_metrics["scraper"]

    # By value, so that workers need not import this test module.
    in_task = ray.remote(num_cpus=0)(record_every_metric)

    @ray.remote(num_cpus=0)
    class InActor:
        def go(self):
            return record_every_metric()

    actor = InActor.remote()
    assert ray.get([in_task.remote(), actor.go.remote()]) == [len(SPECS)] * 2
    record("r1ray_train_restarts", 1, **_probe_tags(BY_NAME["r1ray_train_restarts"]))  # the driver
    wanted = {s for spec in SPECS for s in spec.prometheus_series}
    t0 = time.monotonic()
    missing = scraper.wait_for(wanted, probe=True)
    lag = time.monotonic() - t0
    assert not missing, f"not exported after {EXPORT_TIMEOUT_S} s: {sorted(missing)}"
    print(f"all {len(wanted)} series of {len(SPECS)} metrics exported {lag:.1f} s after recording")
    # Values and labels come through as recorded: one task + one actor each added 2 to every counter.
    for spec in SPECS:
        rows = scraper.series(spec.prometheus_series[0], probe=True)
        assert all(set(spec.tags) <= set(r) for r in rows), (spec.name, rows)
    got = scrape(scraper.url)
    workers = {r["WorkerId"] for r in got["ray_r1ray_train_restarts_total"] if r.get("run") == PROBE}
    assert len(workers) == 3, "task, actor and driver each export their own series"
    ray.kill(actor)


def test_every_panel_series_is_exported(ray_metrics):
    """Every series of every panel (after the previous test recorded the declared ones) and Ray's
    built-ins the panels use, with every label the panels filter or group by."""
    scraper: Scraper = ray_metrics["scraper"]
    need = panel_series()
    missing = scraper.wait_for(need, probe=None)
    assert not missing, f"panel series never exported: {sorted(missing)}"
    problems = []
    for series, labels in need.items():
        rows = scraper.series(series)
        if not any(labels <= set(r) for r in rows):
            problems.append(f"{series}: no sample carries {sorted(labels)}; seen {sorted(set().union(*rows))}")
    assert not problems, "\n".join(problems)
    for name, (_, labels) in gen.RAY_BUILTIN.items():
        assert any(set(labels) <= set(r) for r in scraper.series(name)), name


# --------------------------------------------------------------------------------------------------
# Real short runs of each stage (debug configs), scraped while they run
# --------------------------------------------------------------------------------------------------

# Panel metrics a short CPU run cannot produce, and why; the export test above proves their path instead.
NOT_FROM_A_SHORT_CPU_RUN = {
    "r1ray_train_mfu": "recorded only on GPU workers (needs the GPU's peak FLOP/s)",
    "r1ray_train_restarts": "counted only when a worker group restarts from a checkpoint (a killed worker costs "
    "~15-30 s more here; tests/ray/test_pretrain.py kills workers and checks the restart count)",
}


def panel_metrics(board_file: str) -> set[str]:
    """Declared metrics (not series) a dashboard queries."""
    owner = {series: spec.name for spec in SPECS for series in spec.prometheus_series}
    board = json.loads((ROOT / "dashboards" / board_file).read_text())
    return {owner[s] for _, e in gen.queries(board) for s in gen.series_in(e) if s in owner}


def missing_from_real_run(scraper: Scraper, board_file: str, where: dict[str, str]) -> tuple[set[str], set[str]]:
    """(the metrics ``board_file`` charts, those of them with no non-probe sample whose labels include
    ``where`` after waiting up to EXPORT_TIMEOUT_S)."""
    wanted = panel_metrics(board_file) - set(NOT_FROM_A_SHORT_CPU_RUN)
    need = panel_series()

    def ok(metric: str) -> bool:
        spec = BY_NAME[metric]
        for series in spec.prometheus_series:
            if series not in need:
                continue
            rows = [r for r in scraper.series(series, probe=False) if where.items() <= r.items()]
            if not any(need[series] <= set(r) for r in rows):
                return False
        return True

    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    missing = {m for m in wanted if not ok(m)}
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        missing = {m for m in missing if not ok(m)}
    return wanted, missing


WEB_DOCS = [
    "The committee met on Tuesday to review the annual budget and decided to fund three new projects in the "
    "northern district, which had waited for support since last spring. Write to alice.smith@example.com "
    "for the minutes of the meeting.",
    "Rivers carry sediment from the mountains to the sea, and over thousands of years this slow process builds "
    "wide fertile plains where farmers grow wheat, barley and many kinds of vegetables for the nearby towns.",
]


@pytest.fixture(scope="module")
def data_artifact(ray_metrics, tmp_path_factory):
    """The data stage's debug config plus a small web source with a duplicate, a short document (filtered),
    malformed rows (rejected) and an e-mail address (PII), so every data panel has something to show."""
    import yaml

    from r1ray.data.config import PrepareDataConfig
    from r1ray.data.pipeline import run

    tmp = tmp_path_factory.mktemp("scrape")
    web = tmp / "web.jsonl"
    rows = [json.dumps({"text": WEB_DOCS[0]}), json.dumps({"text": WEB_DOCS[1]}), json.dumps({"text": WEB_DOCS[1]}),
            json.dumps({"text": "too short"}), "{not json", json.dumps({"body": "no text field"})]
    web.write_text("\n".join(rows) + "\n")
    d = yaml.safe_load((ROOT / "configs" / "prepare_data" / "debug.yaml").read_text())
    d["sources"].append({"name": "web", "path": str(web), "format": "jsonl"})
    d["storage"] = {"root": str(tmp / "out")}
    t0 = time.monotonic()
    uri = run(PrepareDataConfig.model_validate(d))
    print(f"data stage: {time.monotonic() - t0:.1f} s")
    return {"uri": uri, "root": str(tmp / "out")}


def test_data_stage_exports_its_panels(ray_metrics, data_artifact):
    scraper: Scraper = ray_metrics["scraper"]
    charted, missing = missing_from_real_run(scraper, "data.json", {})
    assert charted and not missing, f"data.json: the real run never exported {sorted(missing)}"
    web = {r["reason"] for r in scraper.series("ray_r1ray_data_docs_rejected_total", probe=False)
           if r.get("source") == "web"}
    assert web == {"malformed_json", "missing_text_field"}, web
    assert any(r.get("source") == "web" for r in scraper.series("ray_r1ray_data_docs_duplicate_total", probe=False))
    assert any(r.get("kind") == "email" for r in scraper.series("ray_r1ray_data_pii_replaced_total", probe=False))


@pytest.fixture(scope="module")
def pretrain_run(ray_metrics, data_artifact):
    """The pretrain debug config on the artifact above, shortened, with one non-finite step injected."""
    from r1ray.config import load_config
    from r1ray.train.config import PretrainConfig
    from r1ray.train.pretrain import run

    cfg = load_config(PretrainConfig, [
        "--config", str(ROOT / "configs" / "pretrain" / "debug.yaml"),
        f"storage.root={data_artifact['root']}", f"data.path={data_artifact['uri']}", "run_name=scrape",
        "train.max_steps=8", "train.log_every=2", "train.eval_every=4", "checkpoint.every=4",
        "faults.nonfinite_at_steps=[3]", "data.validate_with_ray_data=false", "logging.wandb.mode=disabled",
    ])
    t0 = time.monotonic()
    result = run(cfg)
    print(f"pretrain: {time.monotonic() - t0:.1f} s")
    return result


def test_pretrain_exports_its_panels(ray_metrics, pretrain_run):
    charted, missing = missing_from_real_run(ray_metrics["scraper"], "training.json",
                                             {"run": "scrape", "stage": "pretrain"})
    # every metric the training dashboard charts (less the GPU/restart ones a short CPU run cannot show)
    # has a sample labelled run=scrape, stage=pretrain from the real run
    assert {"r1ray_train_loss", "r1ray_train_tokens_per_second"} <= charted, charted
    assert not missing, f"training.json: the real run never exported {sorted(missing)}"


def test_serve_exports_its_panels(ray_metrics, pretrain_run, data_artifact):
    import httpx
    from ray import serve

    from r1ray.serve.config import ServeConfig
    from r1ray.serve.launch import deploy

    cfg = ServeConfig.model_validate({
        "run_name": "scrape", "train_if_missing": False, "model_name": "scrape",
        "storage": {"root": data_artifact["root"]}, "http": {"port": _free_port()},
        "deployment": {"num_cpus": 1}, "auth": {"api_key_env": None},
        "engine": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01},
    })
    t0 = time.monotonic()
    info = deploy(cfg)
    print(f"serve: ready in {time.monotonic() - t0:.1f} s")
    try:
        with httpx.Client(base_url=info.url, timeout=60) as http:
            body = {"model": "scrape", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 8}
            for _ in range(3):
                assert http.post("/v1/chat/completions", json=body).status_code == 200
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                assert any(line.startswith("data:") for line in r.iter_lines())
            bad = http.post("/v1/chat/completions", json={"model": "scrape", "messages": "not a list"})
            assert 400 <= bad.status_code < 500, bad.text
            charted, missing = missing_from_real_run(ray_metrics["scraper"], "serving.json", {"model": "scrape"})
            assert charted and not missing, f"serving.json: the real run never exported {sorted(missing)}"
            errors = {r["status"] for r in ray_metrics["scraper"].series("ray_r1ray_serve_requests_total", probe=False)}
            assert "200" in errors and str(bad.status_code) in errors, errors
    finally:
        serve.shutdown()
