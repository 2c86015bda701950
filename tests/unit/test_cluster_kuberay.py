"""cluster/kuberay/*.yaml and cluster/Dockerfile: structure, required fields, images, resources, security, and
that every entrypoint, config path and import path they name exists in the repository and validates.

No Kubernetes here: the checks follow the KubeRay v1 CRD reference (ray.io/v1 RayCluster/RayJob/RayService)
and validate the r1ray parts (job configs, Serve args) with r1ray's own config classes.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

import r1ray

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "cluster" / "kuberay"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
IMAGE = re.compile(r"(?P<repo>[a-z0-9.\-]+(?::\d+)?/(?:[a-z0-9._\-]+/)*r1ray):(?P<version>[0-9][^-]*)-(?P<flavour>cpu|gpu)")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


@functools.cache
def _load() -> tuple[dict, ...]:
    out = []
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(KUBE.glob("*.yaml")):
        for d in yaml.load_all(path.read_text(), Loader=loader):
            if d:
                d["_file"] = path.name
                out.append(d)
    return tuple(out)


def docs() -> list[dict]:
    return copy.deepcopy(list(_load()))


def by_kind(kind: str) -> list[dict]:
    return [d for d in docs() if d["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the RayCluster's, the RayJob's rayClusterSpec, the RayService's rayClusterConfig."""
    out = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in by_kind("RayCluster")]
    out += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in by_kind("RayJob")]
    out += [(f"RayService {d['metadata']['name']}", d["spec"]["rayClusterConfig"]) for d in by_kind("RayService")]
    return out


def groups(spec: dict) -> list[tuple[str, dict, dict | None]]:
    """(name, pod template spec, worker group or None for the head)."""
    out = [("head", spec["headGroupSpec"]["template"]["spec"], None)]
    out += [(g["groupName"], g["template"]["spec"], g) for g in spec["workerGroupSpecs"]]
    return out


def dockerfile_ray_version() -> str:
    m = re.search(r"^ARG BASE=rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu$", DOCKERFILE.read_text(), re.M)
    assert m, "cluster/Dockerfile: ARG BASE=rayproject/ray:<version>-py<ver>-gpu"
    return m.group(1)


def test_the_three_resources_exist():
    kinds = {d["kind"] for d in docs()}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds
    for d in docs():
        if d["kind"].startswith("Ray"):
            assert d["apiVersion"] == "ray.io/v1", d["_file"]
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), d["_file"]


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_cluster_spec_structure_images_and_resources(where, spec):
    assert spec["rayVersion"] == dockerfile_ray_version(), f"{where}: rayVersion != the image's Ray"
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["authOptions"]["mode"] == "token", f"{where}: Ray token auth must be on"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: the head service must not be exposed"
    kinds = set()
    for name, pod, group in groups(spec):
        params = (group or head)["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{where}/{name}: rayStartParams values are strings"
        assert params.get("metrics-export-port") == "8080", f"{where}/{name}"
        (container,) = pod["containers"]
        m = IMAGE.fullmatch(container["image"])
        assert m, f"{where}/{name}: image {container['image']!r} is not <registry>/r1ray:<version>-<cpu|gpu>"
        assert m["version"] == r1ray.__version__, f"{where}/{name}: image tag {m['version']} != {r1ray.__version__}"
        res = container["resources"]
        for q in ("cpu", "memory"):
            assert QUANTITY.match(str(res["limits"][q])), f"{where}/{name}: bad {q} quantity"
            assert res["requests"][q] == res["limits"][q], f"{where}/{name}: Ray sizes itself from limits; keep equal"
        gpus = int(res["limits"].get("nvidia.com/gpu", 0))
        assert (gpus > 0) == (m["flavour"] == "gpu"), f"{where}/{name}: GPU image <=> GPU limit"
        assert "metrics" in {p["name"] for p in container["ports"]}, f"{where}/{name}: no metrics port"
        assert pod["serviceAccountName"] == "r1ray", f"{where}/{name}: S3 access comes from the service account"
        if group is None:
            assert gpus == 0 and params["num-cpus"] == "0", f"{where}: the head holds no GPU and no Ray work"
            continue
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where}/{name}"
        assert group["maxReplicas"] > group["minReplicas"], f"{where}/{name}: not autoscaling"
        if gpus:
            kinds.add("gpu")
            tol = pod.get("tolerations", [])
            assert any(t["key"] == "nvidia.com/gpu" for t in tol), f"{where}/{name}: GPU nodes are tainted"
            mounts = {v["mountPath"] for v in container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts, f"{where}/{name}: NCCL needs a larger /dev/shm"
        else:
            kinds.add("cpu")
    assert "gpu" in kinds, f"{where}: no GPU worker group"


def test_raycluster_has_autoscaling_cpu_and_gpu_groups():
    (rc,) = by_kind("RayCluster")
    flavours = {IMAGE.fullmatch(p["containers"][0]["image"])["flavour"] for _, p, g in groups(rc["spec"]) if g}
    assert flavours == {"cpu", "gpu"}
    assert all(g["minReplicas"] == 0 for g in rc["spec"]["workerGroupSpecs"]), "scale to zero when idle"


def _job_module(script: Path):
    spec = importlib.util.spec_from_file_location(f"_kuberay_{script.stem}", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rayjob_entrypoint_names_existing_files_and_a_valid_config():
    from r1ray.config import load_config

    jobs = {j["metadata"]["name"]: j for j in by_kind("RayJob")}
    assert set(jobs) == {"r1ray-pretrain", "r1ray-pipeline"}, sorted(jobs)
    pipeline = jobs["r1ray-pipeline"]["spec"]
    argv = shlex.split(pipeline["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"], argv[:2]
    module = _job_module(ROOT / argv[1])
    cfg = load_config(module.CONFIG, module.argv_with_stage_flags(argv[2:]))
    assert cfg.until_stage == "evaluate" and "serve" not in cfg.stages[: cfg.stages.index("evaluate") + 1]
    assert cfg.storage.root.startswith("s3://")
    spec = jobs["r1ray-pretrain"]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1] == "jobs/pretrain.py", argv[:2]
    script = ROOT / argv[1]
    assert script.exists(), f"{argv[1]} does not exist in the repo"
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert configs and configs[0].startswith("configs/pretrain/")
    for c in configs:
        assert (ROOT / c).exists(), f"RayJob names {c}, which is not in the repo"
    cfg = load_config(_job_module(script).CONFIG, argv[2:])  # the exact argv the cluster will run
    assert cfg.scaling.use_gpu and cfg.storage.root.startswith("s3://")
    storage = yaml.safe_load((ROOT / "cluster" / "storage.yaml").read_text())["storage"]["root"]
    assert cfg.storage.root == storage, "the RayJob writes under cluster/storage.yaml's root"
    # The cluster can hold the largest worker group the run asks for (one GPU per training worker).
    gpu_capacity = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.scaling.max_workers <= gpu_capacity, f"{cfg.scaling.max_workers} GPU workers > {gpu_capacity} GPUs"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert runtime_env["working_dir"] == workdir, "the entrypoint's relative paths resolve in the image checkout"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1, "retries"
    assert spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}


def test_rayservice_import_path_exists_and_args_are_a_valid_serve_config():
    from r1ray.serve.config import ServeConfig

    (svc,) = by_kind("RayService")
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    module, attr = app["import_path"].split(":")
    assert app["import_path"] == "r1ray.serve.app:build_app"
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.exists(), f"{path.relative_to(ROOT)} does not exist in the repo"
    functions = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert attr in functions, f"{module} has no top-level {attr}()"
    cfg = ServeConfig.model_validate(app["args"])
    storage = yaml.safe_load((ROOT / "cluster" / "storage.yaml").read_text())["storage"]["root"]
    assert cfg.storage.root == storage, "serve reads the runs the RayJob writes"
    (job,) = [j for j in by_kind("RayJob") if j["metadata"]["name"] == "r1ray-pretrain"]
    run_name = re.search(r"run_name=(\S+)", job["spec"]["entrypoint"]).group(1)
    assert cfg.run_name == run_name, "RayService serves the RayJob's run"
    if cfg.deployment.num_gpus:
        assert cfg.deployment.num_gpus <= 1 and cfg.engine.backend in ("vllm", "auto", "hf")
    # The API key the app reads comes from a Secret on every pod that can host a replica.
    if cfg.auth.api_key_env:
        for name, pod, _ in groups(svc["spec"]["rayClusterConfig"]):
            env = {e["name"]: e for e in pod["containers"][0].get("env", [])}
            assert "secretKeyRef" in env[cfg.auth.api_key_env]["valueFrom"], name


def test_nothing_is_exposed_outside_the_kubernetes_cluster():
    for d in docs():
        assert d["kind"] not in ("Ingress", "Gateway", "HTTPRoute"), d["_file"]
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["_file"]
    for where, spec in cluster_specs():
        for name, pod, _ in groups(spec):
            assert not pod.get("hostNetwork"), f"{where}/{name}"
            for p in pod["containers"][0]["ports"]:
                assert "hostPort" not in p, f"{where}/{name}"


def test_podmonitor_scrapes_the_metrics_port_of_every_ray_pod():
    (pm,) = by_kind("PodMonitor")
    sel = pm["spec"]["selector"]["matchLabels"]
    ports = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    assert ports == {"metrics"}
    for where, spec in cluster_specs():
        for name, _pod, group in groups(spec):
            tmpl = (group or spec["headGroupSpec"])["template"]
            assert sel.items() <= tmpl["metadata"]["labels"].items(), f"{where}/{name}: PodMonitor misses it"


def test_dockerfile_copies_what_the_manifests_run():
    text = DOCKERFILE.read_text()
    sources = [s for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M) for s in line.split()[:-1]]
    for s in sources:
        assert (ROOT / s).exists(), f"Dockerfile copies {s}, which is not in the repo"
    for needed in ("r1ray", "jobs", "configs", "deploy", "cluster", "pyproject.toml"):
        assert needed in sources, f"the image must contain {needed}"
    assert re.search(r'pip install --no-cache-dir -e "\.\[\$\{EXTRAS\}\]"', text)
    assert re.search(r"^ARG EXTRAS=gpu,s3$", text, re.M)
    (sa,) = by_kind("ServiceAccount")
    assert sa["metadata"]["name"] == "r1ray" and "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
