"""Scrape Ray's Prometheus endpoint and prove the export path: every declared metric, and every series a
Grafana panel in dashboards/ queries, comes out with the labels the panels filter and group by.

One local Ray with the dashboard (it writes Prometheus' service-discovery file) and a known metrics-export
port serves the whole module. A background thread scrapes the endpoint every second and keeps every series
it has seen, so series of workers that have already exited still count (Prometheus would have scraped them
too). Export lags recording by ~5-10 s, so checks poll with a bounded timeout.

Each declared metric recorded through ``r1ray.observe.metrics.record`` from a task, an actor and the driver
comes out under ``MetricSpec.prometheus_series`` (tag values ``probe``). Real short runs of the stages, scraped
by a real Prometheus that then evaluates every panel's query, are tests/ray/test_prometheus.py.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from r1ray.observe.metrics import BY_NAME, SPECS
from tests.helpers import dashboards_generator, start_ray_with_metrics

ROOT = Path(__file__).resolve().parents[2]
PROBE = "probe"
EXPORT_TIMEOUT_S = 60

pytestmark = pytest.mark.slow


gen = dashboards_generator()


def panel_series() -> dict[str, set[str]]:
    """Every series any committed dashboard queries -> labels the queries need on it."""
    need: dict[str, set[str]] = defaultdict(set)
    for f in sorted((ROOT / "dashboards").glob("*.json")):
        board = json.loads(f.read_text())
        for _, expr in gen.queries(board):
            labels = gen.labels_in(expr)
            for s in gen.series_in(expr):
                need[s] |= labels.get(s, set())
    return dict(need)




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

    ctx, port, session_dir = start_ray_with_metrics()
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
