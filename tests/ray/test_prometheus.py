"""A real Prometheus scrapes a real run, and every panel of every dashboard in dashboards/ shows data.

Debian's ``prometheus`` binary (2.42 in bookworm) runs on loopback with a temp storage dir and the shipped
``dashboards/prometheus.yml`` (only the service-discovery path and a 1 s scrape interval changed): it finds
Ray's metrics endpoints through the file Ray's dashboard writes, as it would on a cluster. Real short runs
feed it: the data stage's debug config (plus a small source with a duplicate, a filtered document,
malformed rows and an e-mail address), a pretrain debug run of 8 steps with one non-finite step injected,
a 4-step GRPO run on its export, and an A/B Serve app (two variants of that run's export behind an alias) answering a few requests, streamed,
sticky, malformed and for an unknown model. Then each PromQL target of each panel (and each template
variable) of every ``dashboards/*.json`` is evaluated through Prometheus' HTTP API, as Grafana would:
``/api/v1/query_range`` over the test's time range with every variable at Grafana's "All" (``.*``) and
``$__rate_interval`` at 15 s, and ``/api/v1/label/<label>/values`` for the variables. Each must return a
finite value at some point. The panels a short CPU run cannot fill are listed with the reason, and the test
checks that they are indeed empty, so the list cannot go stale.

This replaces "the metric name appears in a scrape" (tests/ray/test_metrics_scrape.py keeps the probe of the
export path for every declared metric) with "the panel a user opens shows something".
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import dashboards_generator, free_port, start_ray_with_metrics

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "apt-get install -y --no-install-recommends prometheus"
RATE_INTERVAL = "15s"  # Grafana's $__rate_interval is 4x the scrape interval; Ray refreshes values every ~5-10 s
STEP_S = 2
EXPORT_TIMEOUT_S = 90

pytestmark = pytest.mark.slow

# (dashboard file, panel title) -> why a short CPU run leaves it empty. The test asserts they are empty.
NOT_FROM_A_SHORT_CPU_RUN = {
    ("training.json", "MFU"): "recorded only on GPU workers (needs the GPU's peak FLOP/s)",
    ("training.json", "Restarts"): "counted only when a worker group restarts from a checkpoint (a killed worker "
    "costs ~15-30 s more here; tests/ray/test_pretrain_faults.py kills workers and checks the restart count)",
}


gen = dashboards_generator()




def _get(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - our own loopback Prometheus
        return json.loads(r.read())


# --------------------------------------------------------------------------------------------------
# Ray with a known metrics port, and a real Prometheus scraping it through Ray's service-discovery file
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_metrics():
    import ray

    # Ray's workers export their metric values every metrics_report_interval_ms (10 s by default) and do not
    # flush when they exit: a debug run's last ~10 s of records (here its checkpoint saves) could be lost.
    # 1 s (Ray's floor) keeps every record of these short runs; docs/observability.md says so for users.
    _, port, session_dir = start_ray_with_metrics(_system_config={"metrics_report_interval_ms": 1000})
    yield {"port": port, "session_dir": session_dir, "t0": time.time()}
    ray.shutdown()


def prometheus_config(sd_file: str) -> dict:
    """dashboards/prometheus.yml with Ray's service-discovery file of this session and a 1 s scrape."""
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    cfg = yaml.safe_load((ROOT / "dashboards" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    [job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "ray"]
    [sd] = job["file_sd_configs"]
    assert sd["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    sd.update(files=[sd_file], refresh_interval="1s")
    return cfg


@pytest.fixture(scope="module")
def prometheus(ray_metrics, tmp_path_factory):
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(f"the prometheus binary is missing: install Debian's package ({INSTALL}); CI must too")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    print(version.splitlines()[0])
    tmp = tmp_path_factory.mktemp("prometheus")
    cfg_file = tmp / "prometheus.yml"
    sd_file = str(Path(ray_metrics["session_dir"]) / PROMETHEUS_SERVICE_DISCOVERY_FILE)
    cfg_file.write_text(yaml.safe_dump(prometheus_config(sd_file)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg_file}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", "--storage.tsdb.retention.time=1d"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited: {(tmp / 'prometheus.log').read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready within 60 s"
            time.sleep(0.5)
        # The export port of our Ray is discovered and scraped (up == 1).
        deadline = time.monotonic() + EXPORT_TIMEOUT_S
        up: list = []
        while time.monotonic() < deadline:
            up = _get(f"{url}/api/v1/query?query=" + urllib.parse.quote(
                f'up{{job="ray", instance=~".*:{ray_metrics["port"]}"}}'))["data"]["result"]
            if up and up[0]["value"][1] == "1":
                break
            time.sleep(1)
        assert up and up[0]["value"][1] == "1", f"Ray's export port never scraped: {up}"
        yield {"url": url, "proc": proc, "log": tmp / "prometheus.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


# --------------------------------------------------------------------------------------------------
# Real short runs
# --------------------------------------------------------------------------------------------------

WEB_DOCS = [
    "The committee met on Tuesday to review the annual budget and decided to fund three new projects in the "
    "northern district, which had waited for support since last spring. Write to alice.smith@example.com "
    "for the minutes of the meeting.",
    "Rivers carry sediment from the mountains to the sea, and over thousands of years this slow process builds "
    "wide fertile plains where farmers grow wheat, barley and many kinds of vegetables for the nearby towns.",
]


@pytest.fixture(scope="module")
def runs(ray_metrics, prometheus, tmp_path_factory):
    """Data stage, pretrain, then the A/B serve app with a few requests; returns the time range they span."""
    import httpx
    from ray import serve

    from r1ray.config import load_config
    from r1ray.data.config import PrepareDataConfig
    from r1ray.data.pipeline import run as run_data
    from r1ray.serve.config import ServeConfig
    from r1ray.serve.launch import deploy
    from r1ray.train.stages.pretrain import PretrainConfig
    from r1ray.train.stages.pretrain import run as run_pretrain

    t_start = time.time()
    tmp = tmp_path_factory.mktemp("runs")
    web = tmp / "web.jsonl"
    rows = [json.dumps({"text": WEB_DOCS[0]}), json.dumps({"text": WEB_DOCS[1]}), json.dumps({"text": WEB_DOCS[1]}),
            json.dumps({"text": "too short"}), "{not json", json.dumps({"body": "no text field"})]
    web.write_text("\n".join(rows) + "\n")
    d = yaml.safe_load((ROOT / "configs" / "prepare_data" / "debug.yaml").read_text())
    d["sources"].append({"name": "web", "path": str(web), "format": "jsonl"})
    d["storage"] = {"root": str(tmp / "out")}
    t0 = time.monotonic()
    uri = run_data(PrepareDataConfig.model_validate(d))
    print(f"data stage: {time.monotonic() - t0:.1f} s")

    cfg = load_config(PretrainConfig, [
        "--config", str(ROOT / "configs" / "pretrain" / "debug.yaml"),
        f"storage.root={tmp / 'out'}", f"data.path={uri}", "run_name=prom",
        "train.max_steps=8", "train.log_every=2", "train.eval_every=4", "checkpoint.every=2",
        "faults.nonfinite_at_steps=[3]", "data.validate_with_ray_data=false", "logging.wandb.mode=disabled",
    ])
    t0 = time.monotonic()
    pre = run_pretrain(cfg)
    print(f"pretrain: {time.monotonic() - t0:.1f} s")

    # a short GRPO run on that export fills grpo.json: beta > 0 (kl), dynamic sampling (dropped groups),
    # every reward function named (each exports reward_<fn>), an evaluation (accuracy)
    from r1ray.train.stages.grpo.stage import GRPOConfig
    from r1ray.train.stages.grpo.stage import run as run_grpo

    gcfg = load_config(GRPOConfig, [
        "--config", str(ROOT / "configs" / "grpo" / "debug.yaml"), f"storage.root={tmp / 'out'}",
        f"model.init_from={pre.export_path}", "run_name=prom-grpo", "train.max_steps=4", "train.log_every=2",
        "train.eval_every=4", "checkpoint.every=4", "grpo.beta=0.04", "grpo.dynamic_sampling=true",
        "grpo.group_size=4", "grpo.max_completion_tokens=16", "grpo.eval_problems=4", "logging.wandb.mode=disabled",
        "grpo.rewards={accuracy: 1.0, format: 0.2, tag_count: 0.1, length: 0.1, language: 0.1}",
    ])
    t0 = time.monotonic()
    run_grpo(gcfg)
    print(f"grpo: {time.monotonic() - t0:.1f} s")

    scfg = ServeConfig.model_validate({
        "variants": {"a": {"run_name": "prom", "weight": 3}, "b": {"run_name": "prom", "weight": 1}},
        "aliases": ["r1ray"], "train_if_missing": False, "storage": {"root": str(tmp / "out")},
        "http": {"port": free_port()}, "deployment": {"num_cpus": 0.5}, "auth": {"api_key_env": None},
        "engine": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01},
    })
    t0 = time.monotonic()
    info = deploy(scfg)
    print(f"serve: A/B app ready in {time.monotonic() - t0:.1f} s")
    try:
        with httpx.Client(base_url=info.url, timeout=60) as http:
            chat = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 8}
            # spread over ~20 s so that rate() windows see the counters move more than once
            for i in range(10):
                model = ("r1ray", "a", "b")[i % 3]
                headers = {"X-User-Id": f"user-{i}"} if i % 2 else {}
                assert http.post("/v1/chat/completions", json={**chat, "model": model},
                                 headers=headers).status_code == 200
                with http.stream("POST", "/v1/chat/completions", json={**chat, "model": model, "stream": True}) as r:
                    assert r.status_code == 200 and any(x.startswith("data:") for x in r.iter_lines())
                bad = http.post("/v1/chat/completions", json={"model": "b", "messages": "not a list"})
                assert bad.status_code == 400, bad.text
                assert http.post("/v1/chat/completions", json={**chat, "model": "nope"}).status_code == 404
                time.sleep(2)
        time.sleep(15)  # two of Ray's export periods plus scrapes, before the app goes away
    finally:
        serve.shutdown()
    return {"start": t_start - 30, "end": time.time() + 5}


# --------------------------------------------------------------------------------------------------
# Every panel of every dashboard, through Prometheus' HTTP API
# --------------------------------------------------------------------------------------------------


def board_files() -> list[Path]:
    files = sorted((ROOT / "dashboards").glob("*.json"))
    assert {"training.json", "data.json", "serving.json"} <= {f.name for f in files}
    return files


def grafana_substitute(expr: str, variables: set[str]) -> str:
    """What Grafana sends for ``expr`` with every template variable at "All" (allValue ``.*``)."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(variables, key=len, reverse=True):
        out = out.replace(f"${{{name}}}", ".*").replace(f"${name}", ".*")
    assert "$" not in out, f"a variable left in {out!r}"
    return out


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(v)) for series in result for _, v in series.get("values", []))


def query_range(prom: str, expr: str, start: float, end: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{STEP_S}s"})
    body = _get(f"{prom}/api/v1/query_range?{q}")
    assert body["status"] == "success", body
    return body["data"]["result"]


def evaluate(prom: str, t: dict) -> tuple[list[str], list[str], int]:
    """(problems, panels found empty as listed, queries evaluated)."""
    problems, expected_empty, n = [], [], 0
    for f in board_files():
        board = json.loads(f.read_text())
        variables = {v["name"] for v in board["templating"]["list"]}
        for v in board["templating"]["list"]:
            if v["type"] != "query":
                continue
            mt = re.fullmatch(r"label_values\(\s*(.+?)\s*,\s*([a-zA-Z_]\w*)\s*\)", v["definition"])
            q = urllib.parse.urlencode({"match[]": mt.group(1), "start": t["start"], "end": t["end"]})
            values = _get(f"{prom}/api/v1/label/{mt.group(2)}/values?{q}")["data"]
            n += 1
            if not values:
                problems.append(f"{f.name} / variable ${v['name']}: {v['definition']} has no values")
        for p in board["panels"]:
            if p["type"] == "row":
                continue
            listed = (f.name, p["title"]) in NOT_FROM_A_SHORT_CPU_RUN
            shown = False
            for target in p["targets"]:
                expr = grafana_substitute(target["expr"], variables)
                n += 1
                ok = has_data(query_range(prom, expr, t["start"], t["end"]))
                shown |= ok
                if not ok and not listed:
                    problems.append(f"{f.name} / {p['title']} [{target['refId']}]: no data for {expr}")
            if listed:
                if shown:
                    problems.append(f"{f.name} / {p['title']}: listed in NOT_FROM_A_SHORT_CPU_RUN but it shows "
                                    "data now; remove it from the list")
                else:
                    expected_empty.append(f"{f.name} / {p['title']}")
    return problems, expected_empty, n


def test_every_panel_of_every_dashboard_shows_data(prometheus, runs):
    prom = prometheus["url"]
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:  # the last values reach Prometheus up to one export period after the runs
        problems, empty, n = evaluate(prom, runs)
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(5)
    print(f"{n} panel queries and variables evaluated; empty as listed: {empty}")
    assert not problems, f"{len(problems)} of {n} queries show nothing:\n" + "\n".join(problems)
    assert sorted(empty) == sorted(f"{b} / {t}" for b, t in NOT_FROM_A_SHORT_CPU_RUN)
    assert prometheus["proc"].poll() is None


def test_real_runs_carry_their_labels(prometheus, runs):
    """A few label values only the real runs produce: the data stage's reject reasons and PII kind, the
    pretrain run's name and stage, and the A/B app's variants, alias split and router refusals."""
    prom = prometheus["url"]

    def labels(expr: str, label: str) -> set[str]:
        return {s["metric"].get(label) for s in query_range(prom, expr, runs["start"], runs["end"])}

    assert labels('sum by (reason) (ray_r1ray_data_docs_rejected_total{source="web"})', "reason") == {
        "malformed_json", "missing_text_field"}
    assert "email" in labels("sum by (kind) (ray_r1ray_data_pii_replaced_total)", "kind")
    assert labels('max by (run, stage) (ray_r1ray_train_loss{run="prom"})', "stage") == {"pretrain"}
    assert {"a", "b", "unrouted"} <= labels("sum by (variant) (ray_r1ray_serve_requests_total)", "variant")
    assert labels('sum by (variant) (ray_r1ray_serve_ab_routed_total{alias="r1ray"})', "variant") <= {"a", "b"}
    assert labels('sum by (status) (ray_r1ray_serve_requests_total{variant="unrouted"})', "status") == {"404"}
    assert labels('sum by (status) (ray_r1ray_serve_requests_total{variant="b"})', "status") >= {"200", "400"}
    assert "true" in labels("sum by (sticky) (ray_r1ray_serve_ab_routed_total)", "sticky")
