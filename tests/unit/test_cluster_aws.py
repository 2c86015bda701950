"""cluster/aws.yaml passes Ray's own cluster-config validation and keeps the security rules.

Without an AWS account, each check uses the closest offline authority: Ray's ``prepare_config`` +
``validate_config`` (the JSON schema shipped in ``ray/autoscaler/ray-schema.json``, exactly what
``ray up`` runs), botocore's EC2 service model for every ``node_config`` (the RunInstances request the
autoscaler sends), and the CloudFormation template read as data.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

import r1ray

ROOT = Path(__file__).resolve().parents[2]
AWS = ROOT / "cluster" / "aws.yaml"
PREREQS = ROOT / "cluster" / "aws-prereqs.yaml"
STORAGE = ROOT / "cluster" / "storage.yaml"
GPU_FAMILIES = ("g5", "g6", "p4d", "p4de", "p5", "p5e")
WORLD = {"0.0.0.0/0", "::/0"}


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.load(AWS.read_text(), Loader=_LOADER)


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config after Ray's own defaults merge, as `ray up` sees it before contacting AWS."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def test_rays_own_cluster_config_validation_accepts_it(prepared):
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    assert (Path(ray.autoscaler.__file__).parent / "ray-schema.json").exists()
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config


def test_rays_validation_rejects_a_broken_variant(raw):
    """The validation is real: a typo'd key or a head type that does not exist is refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu.g5.xlarge"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


def test_every_node_config_is_a_valid_ec2_run_instances_request(raw):
    """botocore's EC2 model (shipped with boto3) validates each node_config as RunInstances input."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    ec2 = botocore_session.get_session().get_service_model("ec2")
    shape = ec2.operation_model("RunInstances").input_shape
    instance_types = set(ec2.shape_for("InstanceType").enum)
    for name, nt in raw["available_node_types"].items():
        request = {**nt["node_config"], "MinCount": 1, "MaxCount": 1}
        report = ParamValidator().validate(request, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        assert nt["node_config"]["InstanceType"] in instance_types, name


def _family(instance_type: str) -> str:
    return instance_type.split(".")[0]


def test_head_is_on_demand_without_gpu_and_workers_are_spot_gpu_types(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"
    assert _family(head["node_config"]["InstanceType"]) not in GPU_FAMILIES
    assert head["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    families = {_family(w["node_config"]["InstanceType"]) for w in workers.values()}
    assert {"g5", "p4d", "p5"} <= families, families
    total_max = 0
    for name, w in workers.items():
        assert w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert 0 <= w["min_workers"] <= w["max_workers"], name
        total_max += w["max_workers"]
        is_gpu = _family(w["node_config"]["InstanceType"]) in GPU_FAMILIES
        assert (w["resources"].get("GPU", 0) > 0) == is_gpu, f"{name}: GPU resource does not match the type"
    assert raw["max_workers"] <= total_max and raw["max_workers"] >= max(w["max_workers"] for w in workers.values())


def test_gpu_counts_match_the_instance_types(raw):
    """The GPU resources the autoscaler plans with equal the hardware (AWS instance specs)."""
    gpus = {"g5.xlarge": 1, "g5.12xlarge": 4, "p4d.24xlarge": 8, "p5.48xlarge": 8}
    for name, nt in raw["available_node_types"].items():
        it = nt["node_config"]["InstanceType"]
        if it in gpus:
            assert nt["resources"]["GPU"] == gpus[it], name


def test_disks_are_sized_for_checkpoints(raw):
    for name, nt in raw["available_node_types"].items():
        (root,) = nt["node_config"]["BlockDeviceMappings"]
        ebs = root["Ebs"]
        assert ebs["VolumeType"] == "gp3" and ebs["DeleteOnTermination"] is True, name
        it = nt["node_config"]["InstanceType"]
        floor = 1000 if _family(it) in ("p4d", "p5") else 300 if _family(it) in GPU_FAMILIES else 200
        assert ebs["VolumeSize"] >= floor, f"{name}: {ebs['VolumeSize']} GB < {floor} GB"


def test_no_port_is_open_to_the_world(raw, prepared):
    from ray.autoscaler._private.aws.config import _create_default_ssh_inbound_rules

    # Ray's own security group opens SSH to the world; so every node type must bring its own group.
    assert any(r["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}] for r in _create_default_ssh_inbound_rules())
    sgs = {tuple(nt["node_config"].get("SecurityGroupIds", ())) for nt in raw["available_node_types"].values()}
    assert len(sgs) == 1 and all(sgs), "every node type needs the same explicit SecurityGroupIds"
    assert "security_group" not in raw["provider"], "extra IpPermissions would be added to Ray's world-open group"
    text = yaml.safe_dump(raw)  # values only: the comments may explain why 0.0.0.0/0 is avoided
    for cidr in WORLD:
        assert cidr not in text
    # The dashboard listens on the head's loopback only; nothing binds it to all interfaces.
    starts = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "0.0.0.0" not in starts
    assert "--ray-client-server-port" not in starts
    # No NetworkInterfaces with AssociatePublicIpAddress + custom groups, which would bypass the above.
    for nt in raw["available_node_types"].values():
        assert "NetworkInterfaces" not in nt["node_config"]
        assert nt["node_config"]["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only


def test_token_auth_is_on_everywhere(raw):
    for cmd in (raw["head_start_ray_commands"][-1], raw["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token" in cmd
    assert raw["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_installs_this_checkout_at_the_repo_version_with_gpu_extras_on_workers(raw, prepared):
    assert raw["file_mounts"]["/home/ray/r1ray"] == "."
    setup = "\n".join(raw["setup_commands"])
    assert 'pip install -q -e "/home/ray/r1ray[' in setup
    versions = set(re.findall(r"r1ray\.__version__ == '([^']+)'", setup))
    assert versions == {r1ray.__version__}, f"aws.yaml checks r1ray {versions}, the repo is {r1ray.__version__}"
    head = "\n".join(prepared["head_setup_commands"])
    assert "[gpu" not in head, "the head has no GPU: no vLLM/CUDA extras there"
    extras = _pyproject_extras()
    all_commands = setup
    for name, nt in prepared["available_node_types"].items():
        if name == prepared["head_node_type"]:
            continue
        # What Ray's autoscaler runs on this worker type: its own list if it has one, else the global one
        # (already merged with setup_commands by prepare_config); the same for the docker image.
        cmds = "\n".join(nt.get("worker_setup_commands", prepared["worker_setup_commands"]))
        image = {**prepared["docker"], **nt.get("docker", {})}["worker_image"]
        all_commands += "\n" + cmds
        assert set(re.findall(r"r1ray\.__version__ == '([^']+)'", cmds)) == {r1ray.__version__}, name
        gpu = nt["resources"].get("GPU", 0) > 0
        has_gpu_extra = bool(re.search(r'pip install -q -e "/home/ray/r1ray\[[^\]]*\bgpu\b', cmds))
        assert has_gpu_extra == gpu, f"{name}: GPU extras iff the node has GPUs"
        assert image.endswith("-gpu" if gpu else "-cpu"), f"{name}: {image}"
    for group in re.findall(r"r1ray\[([^\]]+)\]", all_commands):
        for extra in group.split(","):
            assert extra in extras, f"setup installs unknown extra {extra!r}; pyproject has {sorted(extras)}"


def _pyproject_extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_docker_images_run_a_ray_version_that_pyproject_allows(raw):
    import tomllib
    from packaging.specifiers import SpecifierSet

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if d.startswith("ray[")]
    spec = SpecifierSet(ray_dep.split("]", 1)[1])
    images = {raw["docker"][k] for k in ("image", "head_image", "worker_image")}
    images |= {nt["docker"]["worker_image"] for nt in raw["available_node_types"].values() if "docker" in nt}
    for image in images:
        m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|gpu)", image)
        assert m, image
        assert m.group(1) in spec, f"{image}: Ray {m.group(1)} outside {spec}"
    assert raw["docker"]["worker_image"].endswith("-gpu") and raw["docker"]["head_image"].endswith("-cpu")
    assert len({re.sub(r"-(cpu|gpu)$", "", i) for i in images}) == 1, "one Ray/Python version on every node"


def test_iam_instance_profiles_match_the_prerequisite_stack(raw):
    prereqs = yaml.safe_load(PREREQS.read_text())
    res = prereqs["Resources"]
    cluster = prereqs["Parameters"]["ClusterName"]["Default"]
    assert cluster == raw["cluster_name"]
    names = {
        res["HeadInstanceProfile"]["Properties"]["InstanceProfileName"]["Fn::Sub"].replace("${ClusterName}", cluster),
        res["WorkerInstanceProfile"]["Properties"]["InstanceProfileName"]["Fn::Sub"].replace("${ClusterName}", cluster),
    }
    for name, nt in raw["available_node_types"].items():
        assert nt["node_config"]["IamInstanceProfile"]["Name"] in names, name
    head = raw["available_node_types"][raw["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    assert head == f"{cluster}-head"


def test_prerequisite_stack_opens_ssh_to_one_cidr_and_nothing_else():
    t = yaml.safe_load(PREREQS.read_text())
    p = t["Parameters"]["SshCidr"]
    assert "Default" not in p, "the SSH CIDR must be chosen by the user"
    assert re.fullmatch(p["AllowedPattern"], "203.0.113.7/32")
    assert not re.fullmatch(p["AllowedPattern"], "203.0.113.7")
    rule = t["Rules"]["SshNotOpenToTheWorld"]["Assertions"][0]["Assert"]
    assert rule == {"Fn::Not": [{"Fn::Equals": [{"Ref": "SshCidr"}, "0.0.0.0/0"]}]}
    sg = t["Resources"]["ClusterSecurityGroup"]["Properties"]
    (ssh,) = sg["SecurityGroupIngress"]
    assert (ssh["FromPort"], ssh["ToPort"], ssh["IpProtocol"]) == (22, 22, "tcp")
    assert ssh["CidrIp"] == {"Ref": "SshCidr"} and "CidrIpv6" not in ssh
    ingress = [r for r in t["Resources"].values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"]
    assert len(ingress) == 1 and ingress[0]["Properties"]["SourceSecurityGroupId"] == {
        "Fn::GetAtt": ["ClusterSecurityGroup", "GroupId"]
    }
    cidrs = set(re.findall(r"[0-9a-f:.]+/\d+", yaml.safe_dump(t["Resources"])))
    assert not WORLD & cidrs, cidrs


def test_checkpoint_bucket_is_private_and_roles_reach_only_it():
    t = yaml.safe_load(PREREQS.read_text())
    res = t["Resources"]
    bucket = res["CheckpointBucket"]["Properties"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert bucket["BucketEncryption"]
    for role in ("HeadRole", "WorkerRole"):
        for policy in res[role]["Properties"]["Policies"]:
            for st in policy["PolicyDocument"]["Statement"]:
                actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
                if any(a.startswith("s3:") for a in actions):
                    assert "*" not in actions and st["Resource"] != "*", f"{role}: S3 access must name the bucket"
                    assert "CheckpointBucket" in str(st["Resource"])
                if "iam:PassRole" in actions:
                    assert st["Resource"] == {"Fn::GetAtt": ["WorkerRole", "Arn"]}
    worker_actions = {
        a for p in res["WorkerRole"]["Properties"]["Policies"] for st in p["PolicyDocument"]["Statement"]
        for a in st["Action"]
    }
    assert all(a.startswith("s3:") for a in worker_actions), "workers only need the bucket"


def test_storage_overlay_is_a_valid_s3_root_for_every_job():
    overlay = yaml.safe_load(STORAGE.read_text())
    assert set(overlay) == {"storage"} and overlay["storage"]["root"].startswith("s3://")
    from r1ray.config import StorageConfig

    StorageConfig.model_validate(overlay["storage"])
    # Each job that exists takes the overlay after its debug config (the way docs/cluster.md submits it).
    import importlib.util

    from r1ray.config import load_config

    checked = 0
    for job in sorted((ROOT / "jobs").glob("*.py")):
        debug = ROOT / "configs" / job.stem / "debug.yaml"
        if not debug.exists():
            continue
        spec = importlib.util.spec_from_file_location(f"_job_{job.stem}", job)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cfg = load_config(mod.CONFIG, ["--config", str(debug), "--config", str(STORAGE)])
        assert cfg.storage.root == overlay["storage"]["root"]
        checked += 1
    print(f"storage overlay validated against {checked} job config(s)")
