"""cluster/: every manifest validates against the schemas of the versions rsflow targets, offline.

- Kubernetes kinds (CronJob, PersistentVolumeClaim, ...): kubernetes-validate's strict JSON schemas of
  Kubernetes ``K8S_VERSION`` (shipped in the PyPI package, no network).
- KubeRay kinds (RayCluster, RayJob, RayCronJob): ``tests/data/kuberay/ray.io_v1.schema.yaml``, the
  KubeRay CRDs' openAPIV3Schema transcribed from the kuberay repository (its header says from which
  commit and what differs), with the embedded core types resolved against the same Kubernetes schemas.
- The ``ray up`` config: Ray's own ``ray-schema.json`` through ``ray.autoscaler``'s ``prepare_config`` and
  ``validate_config``, the functions ``ray up`` runs before it talks to the cloud.

Negative cases prove that the validators validate (a misspelled field or a wrong type is rejected), and
the remaining tests hold the files to what rsflow needs: one image, the pinned Ray, the CPU/GPU split,
bounded retries, credentials only from Secrets, and a Dockerfile that agrees with pyproject.toml.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"
RAY_UP = CLUSTER / "ray-up.yaml"

#: The KubeRay operator the manifests target (cluster/README.md installs this chart version).
KUBERAY_VERSION = "1.7.1"
#: KubeRay ray.io/v1 schema (see its header for the source commit and the v1.6 line it comes from).
KUBERAY_SCHEMA = ROOT / "tests" / "data" / "kuberay" / "ray.io_v1.schema.yaml"
#: Kubernetes version of the core schemas (also the k8s.io/api line KubeRay's CRDs embed).
K8S_VERSION = "1.34"
#: The one image every node, submitter and schedule runs (cluster/Dockerfile builds it).
PROJECT_IMAGE = "ghcr.io/your-org/rsflow:0.1.0"
#: Ray's custom resources that name a node's kind (cluster/raycluster.yaml, cluster/ray-up.yaml).
CPU_NODE_RESOURCE = "rsflow_cpu_node"
GPU_NODE_RESOURCE = "rsflow_gpu_node"
#: flash-attn (the `gpu` extra) builds for CUDA 12.0 and above (its README's requirements).
FLASH_ATTN_MIN_CUDA = Version("12.0")
TORCH_WHEEL_CUDAS = {"2.11": {Version("12.6"), Version("12.8"), Version("13.0")},
                     "2.12": {Version("12.6"), Version("13.0"), Version("13.2")},
                     "2.13": {Version("12.6"), Version("13.0"), Version("13.2")}}
"""CUDA versions of the wheels PyTorch publishes per release (2.12 dropped 12.8: pytorch/pytorch#178665,
pytorch/FBGEMM#5976; 13.2 is experimental)."""
#: Python versions the official rayproject/ray images are published for (Ray's CI image matrix).
RAY_IMAGE_PYTHONS = {"3.10", "3.11", "3.12"}
#: Environment variable names that hold secrets: never a literal value in a manifest.
SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|KEY_ID|API_KEY|CREDENTIAL|PRIVATE", re.IGNORECASE
)


# ---------------------------------------------------------------------------------------------------
# loading


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_pin() -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == "ray":
            (spec,) = req.specifier
            assert spec.operator == "==", f"ray must be pinned exactly, got {dep!r}"
            return spec.version
    raise AssertionError("pyproject.toml has no ray dependency")


def _cluster_yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _documents() -> list[tuple[Path, int, dict[str, Any]]]:
    docs = []
    for path in _cluster_yaml_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((path, i, doc))
    return docs


def _k8s_documents() -> list[tuple[Path, int, dict[str, Any]]]:
    return [(p, i, d) for p, i, d in _documents() if "apiVersion" in d]


def _doc_id(entry: tuple[Path, int, dict[str, Any]]) -> str:
    path, i, doc = entry
    return f"{path.relative_to(CLUSTER)}#{i}:{doc.get('kind', 'ray-up')}"


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, _, d in _k8s_documents() if d["kind"] == kind]


def _load(name: str) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    return doc


def _pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template of a manifest, named by where it sits."""
    kind, spec = doc["kind"], doc["spec"]
    if kind == "RayCronJob":
        spec = spec["jobTemplate"]
    if kind in ("RayJob", "RayCronJob"):
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]
        spec = spec.get("rayClusterSpec") or {}
    if kind in ("RayCluster", "RayJob", "RayCronJob") and spec:
        yield "head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]
    if kind == "CronJob":
        yield "job", spec["jobTemplate"]["spec"]["template"]


def _containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in _pod_templates(doc):
        pod = template.get("spec", {})
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            yield f"{doc['metadata']['name']}/{where}/{c['name']}", c


# ---------------------------------------------------------------------------------------------------
# validators


def _k8s_schema_dir() -> Path:
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return Path(str(root / f"v{K8S_VERSION}.0-local-strict"))


@cache
def _kuberay_registry() -> tuple[dict[str, Any], Registry]:
    schema = yaml.safe_load(KUBERAY_SCHEMA.read_text())
    k8s_defs = json.loads((_k8s_schema_dir() / "_definitions.json").read_text())
    registry = Registry().with_resources(
        [(schema["$id"], Resource.from_contents(schema)), (k8s_defs["$id"], Resource.from_contents(k8s_defs))]
    )
    return schema, registry


def _where(error: jsonschema.ValidationError) -> str:
    return f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"


def _kuberay_errors(doc: dict[str, Any]) -> list[str]:
    schema, registry = _kuberay_registry()
    kind = doc.get("kind")
    if kind not in schema["$defs"]:
        return [f"no KubeRay schema for kind {kind!r}"]
    validator = jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)
    return [_where(e) for e in validator.iter_errors(doc)]


def _k8s_errors(doc: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [_where(e)]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Why ``doc`` is not a valid object of its kind (empty when it is)."""
    if str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return _kuberay_errors(doc)
    return _k8s_errors(doc)


def ray_up_errors(config: dict[str, Any]) -> list[str]:
    """What ``ray up`` would refuse in ``config`` before it contacts the cloud (empty when nothing)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError, RuntimeError, KeyError) as e:
        return [getattr(e, "message", None) or str(e)]
    return []


# ---------------------------------------------------------------------------------------------------
# every YAML under cluster/ is validated


def test_every_yaml_under_cluster_is_a_manifest_or_the_ray_up_config() -> None:
    kinds = []
    for path, i, doc in _documents():
        assert isinstance(doc, dict), f"{path}#{i} is not a mapping"
        if "apiVersion" in doc:
            kinds.append(doc["kind"])
        else:
            assert path == RAY_UP, f"{path}#{i}: neither a Kubernetes object nor the ray up config"
    for kind in ("RayCluster", "RayJob", "RayCronJob", "CronJob"):
        assert kind in kinds, f"no {kind} under cluster/"
    assert kinds.count("RayJob") >= 2, "expected the region and the finetune RayJobs"


@pytest.mark.parametrize("entry", _k8s_documents(), ids=_doc_id)
def test_manifest_validates_against_its_schema(entry: tuple[Path, int, dict[str, Any]]) -> None:
    path, i, doc = entry
    assert schema_errors(doc) == [], f"{path.relative_to(ROOT)}#{i}"


def test_ray_up_config_validates_with_rays_own_schema() -> None:
    config = yaml.safe_load(RAY_UP.read_text())
    assert ray_up_errors(config) == []


# ---------------------------------------------------------------------------------------------------
# the validators reject what they should (a validator that accepts anything proves nothing)


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with the dotted ``path`` (list indices as numbers) set to ``value``."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for key in parents:
        node = node[key]
    node[last] = value
    return doc


def _rename(doc: dict[str, Any], path: str, new_key: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for key in parents:
        node = node[key]
    node[new_key] = node.pop(last)
    return doc


def _drop(doc: dict[str, Any], path: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for key in parents:
        node = node[key]
    del node[last]
    return doc


#: (file, edit, dotted path, new key or value, a word the error must contain). Edits: "rename" a key
#: (a misspelled field), "set" a value (a wrong type or value), "drop" a required field.
NEGATIVE_CASES: list[tuple[str, str, str, Any, str]] = [
    # RayCluster: KubeRay's own fields
    ("raycluster.yaml", "rename", "spec.workerGroupSpecs.1.maxReplicas", "maxReplica", "maxReplica"),
    ("raycluster.yaml", "set", "spec.workerGroupSpecs.1.maxReplicas", "eight", "eight"),
    ("raycluster.yaml", "rename", "spec.enableInTreeAutoscaling", "enableInTreeAutoScaling", "AutoScaling"),
    ("raycluster.yaml", "set", "spec.autoscalerOptions.upscalingMode", "Fast", "Fast"),
    ("raycluster.yaml", "drop", "spec.workerGroupSpecs.0.groupName", None, "groupName"),
    ("raycluster.yaml", "set", "spec.headGroupSpec.rayStartParams.num-cpus", 0, "not of type 'string'"),
    # RayCluster: core types inside it (pod template, container), checked by the Kubernetes schema
    ("raycluster.yaml", "rename", "spec.workerGroupSpecs.1.template.spec.containers.0.image", "imag", "imag"),
    ("raycluster.yaml", "set", "spec.workerGroupSpecs.1.template.spec.containers.0.resources.limits", ["1"],
     "not of type 'object'"),
    ("raycluster.yaml", "rename",
     "spec.headGroupSpec.template.spec.containers.0.env.0.valueFrom.secretKeyRef", "secretRef", "secretRef"),
    # RayJob
    ("rayjob-region.yaml", "rename", "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish", "Finish'"),
    ("rayjob-region.yaml", "set", "spec.backoffLimit", "1", "'1'"),
    ("rayjob-region.yaml", "set", "spec.deletionStrategy", {"onSuccess": {"policy": "DeleteCluster"}},
     "deletionStrategy"),
    ("rayjob-region.yaml", "set", "spec.deletionStrategy",
     {"deletionRules": [{"condition": {"ttlSeconds": 5}, "policy": "DeleteCluster"}]}, "condition"),
    ("rayjob-finetune.yaml", "set", "spec.rayClusterSpec.workerGroupSpecs.0.replicas", 4.5, "4.5"),
    # RayCronJob (the monitoring schedule)
    ("monitor-raycronjob.yaml", "drop", "spec.schedule", None, "schedule"),
    ("monitor-raycronjob.yaml", "rename", "spec.jobTemplate.entrypoint", "entryPoint", "entryPoint"),
    # core Kubernetes kinds, through kubernetes-validate
    ("monitor-cronjob.yaml", "rename", "spec.concurrencyPolicy", "concurrencyPolicyy", "concurrencyPolicyy"),
    ("monitor-cronjob.yaml", "set", "spec.jobTemplate.spec.backoffLimit", "zero", "zero"),
    ("shared-pvc.yaml", "set", "spec.accessModes", "ReadWriteMany", "ReadWriteMany"),
]
_EDITS = {"rename": _rename, "set": _set, "drop": lambda doc, path, _: _drop(doc, path)}


@pytest.mark.parametrize(
    ("name", "edit", "path", "arg", "mentions"),
    NEGATIVE_CASES,
    ids=[f"{n.removesuffix('.yaml')}-{e}-{p.rsplit('.', 1)[-1]}" for n, e, p, _, _ in NEGATIVE_CASES],
)
def test_a_broken_manifest_is_rejected(name: str, edit: str, path: str, arg: Any, mentions: str) -> None:
    doc = _load(name)
    assert schema_errors(doc) == []
    errors = schema_errors(_EDITS[edit](doc, path, arg))
    assert errors, f"{name}: the validator accepted a broken manifest"
    assert any(mentions in e for e in errors), errors


@pytest.mark.parametrize(
    ("mutate", "mentions"),
    [
        (lambda c: _rename(c, "available_node_types", "available_node_type"), "available_node_type"),
        (lambda c: _set(c, "max_workers", "ten"), "ten"),
        (lambda c: _set(c, "available_node_types.gpu_worker.resources.GPU", 0.5), "0.5"),
        (lambda c: _rename(c, "available_node_types.cpu_worker.min_workers", "min_worker"), "min_worker"),
        (lambda c: _set(c, "head_node_type", "gpu"), "head_node_type"),
        (lambda c: _set(c, "docker.pull_before_run", "yes"), "yes"),
    ],
    ids=["misspelled-key", "max-workers-type", "fractional-gpu", "node-type-key", "unknown-head-type",
         "docker-type"],
)
def test_a_broken_ray_up_config_is_rejected(mutate: Any, mentions: str) -> None:
    config = yaml.safe_load(RAY_UP.read_text())
    errors = ray_up_errors(mutate(config))
    assert errors and any(mentions in e for e in errors), errors


# ---------------------------------------------------------------------------------------------------
# what rsflow needs of the manifests


def test_one_image_and_the_pinned_ray_everywhere() -> None:
    ray = _ray_pin()
    images = {where: c["image"] for _, _, doc in _k8s_documents() for where, c in _containers(doc)}
    assert images and set(images.values()) == {PROJECT_IMAGE}, images
    assert yaml.safe_load(RAY_UP.read_text())["docker"]["image"] == PROJECT_IMAGE
    for kind in ("RayCluster", "RayJob"):
        for doc in _by_kind(kind):
            spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
            assert spec["rayVersion"] == ray, doc["metadata"]["name"]


def test_kuberay_version_is_pinned_in_the_manifests_and_the_readme() -> None:
    for name in ("raycluster.yaml", "rayjob-region.yaml", "rayjob-finetune.yaml"):
        assert f"KubeRay operator v{KUBERAY_VERSION}" in (CLUSTER / name).read_text(), name
    readme = (CLUSTER / "README.md").read_text()
    assert f"--version {KUBERAY_VERSION}" in readme
    assert "12cb11e48d1a375a19b771ec53c3b0023d189d4e" in KUBERAY_SCHEMA.read_text()


def _group(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == name]
    return group


def _container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]


def _custom_resources(group: dict[str, Any]) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-region.yaml"])
def test_cpu_and_gpu_groups_place_reads_and_model_actors(name: str) -> None:
    doc = _load(name)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head runs drivers only"

    cpu, gpu = _group(spec, "cpu"), _group(spec, "gpu")
    for group in (cpu, gpu):
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    assert gpu["minReplicas"] >= 1, "the region job sizes its model actors from the GPUs present at start"

    cpu_res = _container(cpu["template"])["resources"]
    assert "nvidia.com/gpu" not in cpu_res.get("requests", {}) | cpu_res.get("limits", {})
    gpu_res = _container(gpu["template"])["resources"]
    assert int(gpu_res["requests"]["nvidia.com/gpu"]) == int(gpu_res["limits"]["nvidia.com/gpu"]) >= 1

    assert set(_custom_resources(cpu)) == {CPU_NODE_RESOURCE}
    assert set(_custom_resources(gpu)) == {GPU_NODE_RESOURCE}
    assert _custom_resources(cpu)[CPU_NODE_RESOURCE] == _custom_resources(gpu)[GPU_NODE_RESOURCE] == 1000


_GFD_MEMORY = "nvidia.com/gpu.memory"
_GKE_ACCELERATOR = "cloud.google.com/gke-accelerator"
_GKE_GPU_GB = {"nvidia-tesla-t4": 16, "nvidia-tesla-v100": 16, "nvidia-l4": 24, "nvidia-tesla-a100": 40,
               "nvidia-a100-80gb": 80, "nvidia-h100-80gb": 80, "nvidia-h100-mega-80gb": 80, "nvidia-h200-141gb": 141}


def _gpu_floor_gb(template: dict[str, Any]) -> tuple[float, float]:
    """The least GPU memory (GB) a node must have for ``template``'s pod, by the required node affinity's
    two terms: (NVIDIA GPU feature discovery's MiB label, GKE's accelerator label). Every term must
    bound the GPU: a term without one would admit any node."""
    terms = template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    floors: dict[str, float] = {}
    for term in terms:
        (expr,) = term["matchExpressions"]
        if expr["key"] == _GFD_MEMORY:
            assert expr["operator"] == "Gt"
            floors[_GFD_MEMORY] = int(expr["values"][0]) / 1024
        else:
            assert expr["key"] == _GKE_ACCELERATOR and expr["operator"] == "In", expr
            floors[_GKE_ACCELERATOR] = min(_GKE_GPU_GB[v] for v in expr["values"])
    assert set(floors) == {_GFD_MEMORY, _GKE_ACCELERATOR}, floors
    return floors[_GFD_MEMORY], floors[_GKE_ACCELERATOR]


@pytest.mark.parametrize(("name", "group", "least_gb"), [
    ("raycluster.yaml", "gpu", 21.0), ("rayjob-region.yaml", "gpu", 21.0), ("rayjob-finetune.yaml", "gpu", 38.0)])
def test_gpu_pods_ask_for_a_gpu_large_enough_for_a_7b_llava(name: str, group: str, least_gb: float) -> None:
    """Model pods land on a GPU that holds a 7B LLaVA in bf16 with room for a batch (an A10G or L4 reports
    about 22.5 GiB), finetuning pods on one of 40 GB (GeoChat's A100s): without a GPU type a 16 GB T4 was
    as good a match as an H100."""
    doc = _load(name)
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    gfd_gb, gke_gb = _gpu_floor_gb(_group(spec, group)["template"])
    assert least_gb <= gfd_gb < least_gb + 2 and gke_gb >= least_gb, (gfd_gb, gke_gb)
    if least_gb < 38:
        assert _GKE_GPU_GB["nvidia-l4"] >= gke_gb, "a 24 GB L4 is enough for inference"


def test_the_region_rayjob_runs_the_same_split_as_the_raycluster() -> None:
    cluster = _load("raycluster.yaml")["spec"]
    job = _load("rayjob-region.yaml")["spec"]["rayClusterSpec"]
    assert job["headGroupSpec"]["rayStartParams"] == cluster["headGroupSpec"]["rayStartParams"]
    for name in ("cpu", "gpu"):
        a, b = _group(cluster, name), _group(job, name)
        assert a["rayStartParams"] == b["rayStartParams"], name
        assert _container(a["template"])["resources"] == _container(b["template"])["resources"], name
        assert a["template"]["spec"].get("tolerations") == b["template"]["spec"].get("tolerations"), name
        assert a["template"]["spec"].get("affinity") == b["template"]["spec"].get("affinity"), name
        assert a["maxReplicas"] == b["maxReplicas"], name


def test_ray_up_has_the_same_split() -> None:
    config = yaml.safe_load(RAY_UP.read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    cpu_types = [t for t in types.values() if CPU_NODE_RESOURCE in t["resources"]]
    gpu_types = [t for t in types.values() if GPU_NODE_RESOURCE in t["resources"]]
    assert len(cpu_types) == len(gpu_types) == 1
    assert "GPU" not in cpu_types[0]["resources"] and gpu_types[0]["resources"]["GPU"] >= 1
    assert gpu_types[0]["min_workers"] >= 1
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())


def _runtime_env(rayjob: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])


@pytest.mark.parametrize(
    ("name", "script"),
    [("rayjob-region.yaml", "jobs/caption_region.py"), ("rayjob-finetune.yaml", "training/finetune.py")],
)
def test_rayjobs_ship_code_tear_down_and_bound_retries(name: str, script: str) -> None:
    job = _load(name)
    spec = job["spec"]
    assert shlex.split(spec["entrypoint"])[:2] == ["python", script]
    assert (ROOT / script).is_file()
    env = _runtime_env(job)
    assert env["working_dir"] == "/opt/rsflow", "the repository as the image holds it (cluster/Dockerfile)"
    assert 'COPY --chown=ray:users jobs /opt/rsflow/jobs' in DOCKERFILE.read_text()
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert 0 <= spec["backoffLimit"] <= 3 and 0 <= spec["submitterConfig"]["backoffLimit"] <= 3


def test_finetune_rayjob_matches_its_recipe() -> None:
    job = _load("rayjob-finetune.yaml")
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[2:6] == ["--stage", "instruct", "--config", "training/configs/geochat.yaml"]
    recipe = yaml.safe_load((ROOT / "training/configs/geochat.yaml").read_text())
    overrides = dict(a.split("=", 1) for a in args[6:])
    assert set(overrides) <= set(recipe), "every override is a key of the recipe"
    assert overrides["output"].startswith("/mnt/shared/"), "Ray Train storage must be shared by all nodes"
    spec = job["spec"]["rayClusterSpec"]
    (gpu,) = spec["workerGroupSpecs"]
    assert recipe["use_gpu"] is True
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == recipe["workers"]
    resources = _container(gpu["template"])["resources"]["limits"]
    assert int(resources["nvidia.com/gpu"]) == 1 and int(resources["cpu"]) >= recipe["cpus_per_worker"]
    for _, template in _pod_templates(job):
        mounts = {m["mountPath"] for m in _container(template).get("volumeMounts", [])}
        assert "/mnt/shared" in mounts


def test_monitor_schedules_target_the_raycluster() -> None:
    (cluster,) = _by_kind("RayCluster")
    name = cluster["metadata"]["name"]
    (cron,) = _by_kind("CronJob")
    (submit,) = [c for _, c in _containers(cron)]
    env = {e["name"]: e.get("value") for e in submit.get("env", [])}
    assert env["RAY_ADDRESS"].startswith(f"http://{name}-head-svc:8265")
    (raycron,) = _by_kind("RayCronJob")
    assert raycron["spec"]["jobTemplate"]["clusterSelector"] == {"ray.io/cluster": name}


# ---------------------------------------------------------------------------------------------------
# no credentials anywhere


def _env_entries(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, c in _containers(doc):
        for e in c.get("env", []):
            yield where, e
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    if doc["kind"] in ("RayJob", "RayCronJob"):
        spec = spec.get("rayClusterSpec", {})
    for e in spec.get("autoscalerOptions", {}).get("env", []):
        yield "autoscaler", e


@pytest.mark.parametrize("entry", _k8s_documents(), ids=_doc_id)
def test_credentials_come_from_kubernetes_secrets(entry: tuple[Path, int, dict[str, Any]]) -> None:
    _, _, doc = entry
    for where, e in _env_entries(doc):
        if SECRET_NAME.search(e["name"]):
            assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']}"
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    if "runtimeEnvYAML" in spec:  # the dashboard and `ray job list` show runtime environments
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        leaked = [k for k in runtime_env.get("env_vars", {}) if SECRET_NAME.search(k)]
        assert not leaked, f"secrets in runtimeEnvYAML: {leaked}"


CREDENTIAL_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                                  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(aws_secret_access_key|secret_access_key)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", re.IGNORECASE),
    re.compile(r"(ghp|gho|github_pat|hf)_[A-Za-z0-9_]{20,}"),          # GitHub / Hugging Face tokens
    re.compile(r"xox[abpr]-[A-Za-z0-9-]{10,}"),                        # Slack
]


def test_no_credentials_in_any_cluster_file() -> None:
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            assert not pattern.search(text), f"{path.relative_to(ROOT)} matches {pattern.pattern}"
    for instruction, args in _dockerfile():
        if instruction in ("ENV", "ARG"):
            names = [kv.split("=", 1)[0] for kv in shlex.split(args)]
            assert not [n for n in names if SECRET_NAME.search(n)], f"{instruction} {args}"


# ---------------------------------------------------------------------------------------------------
# the image definition


def _dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of cluster/Dockerfile, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        instruction, _, args = full.partition(" ")
        steps.append((instruction.upper(), args.strip()))
    return steps


def _dockerfile_args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _dockerfile() if i == "ARG" and "=" in a)


def test_dockerfile_agrees_with_pyproject() -> None:
    project = _pyproject()["project"]
    (base,) = [a for i, a in _dockerfile() if i == "FROM"]
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py3(?P<minor>\d+)-cu(?P<cu>\d+)", base)
    assert m, f"FROM {base}: expected the official Ray GPU image, rayproject/ray:X.Y.Z-pyNNN-cuNNN"

    assert m["ray"] == _ray_pin(), "the image's Ray must be the version rsflow pins"

    python = f"3.{m['minor']}"
    assert Version(python) in SpecifierSet(project["requires-python"]), python
    assert python in RAY_IMAGE_PYTHONS, python

    cuda = Version(f"{m['cu'][:2]}.{m['cu'][2:]}")
    assert cuda >= FLASH_ATTN_MIN_CUDA, f"flash-attn (the gpu extra) needs CUDA >= {FLASH_ATTN_MIN_CUDA}"
    args = _dockerfile_args()
    wheel = re.search(r"/whl/cu(\d\d)(\d)/?$", args["TORCH_INDEX_URL"])
    assert wheel, args["TORCH_INDEX_URL"]
    wheel_cuda = Version(f"{wheel[1]}.{wheel[2]}")
    torch_minor = ".".join(args["TORCH_VERSION"].split(".")[:2])
    # the CUDA builds PyTorch publishes per release (download.pytorch.org): 2.12 and 2.13 have no cu128
    assert wheel_cuda in TORCH_WHEEL_CUDAS[torch_minor], f"no torch {args['TORCH_VERSION']} wheels for CUDA {wheel_cuda}"
    # flash-attn builds with the image's nvcc against torch: same major version, toolkit not older
    assert wheel_cuda.major == cuda.major and wheel_cuda <= cuda, (wheel_cuda, cuda)
    assert any(
        Version(args["TORCH_VERSION"]) in Requirement(d).specifier
        for d in project["dependencies"] if Requirement(d).name == "torch"
    )

    (flash_attn,) = [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    runs = " ".join(a for i, a in _dockerfile() if i == "RUN")
    assert f'"{flash_attn}"' in runs, f"the Dockerfile must install {flash_attn} as the gpu extra pins it"
    installs = re.findall(r'pip install "(/opt/rsflow\[[^\]]*\])"', runs)
    assert installs and "gpu" in installs[0].split("[")[1].rstrip("]").split(","), installs


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in _dockerfile():
        if instruction == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(args))
    return env


def test_dockerfile_sets_gdal_for_cloud_optimised_reads() -> None:
    from rsflow.read import GDAL_REMOTE_OPTIONS

    env = _dockerfile_env()
    for key, value in GDAL_REMOTE_OPTIONS.items():
        assert env.get(key) == value, f"{key}: Dockerfile {env.get(key)!r}, rsflow.read {value!r}"
    # the cluster reads what a local run reads: this one made an asset URL without .tif/.jp2 "missing"
    assert "CPL_VSIL_CURL_ALLOWED_EXTENSIONS" not in env


def test_dockerfile_gives_cluster_nodes_the_ray_settings_of_a_local_ray() -> None:
    """A node started from the image (``ray start`` reads ``RAY_<setting>`` from its environment) runs
    with the settings rsflow gives a local Ray it starts itself."""
    from rsflow.pipeline import LOCAL_RAY_SYSTEM_CONFIG

    env = _dockerfile_env()
    for key, value in LOCAL_RAY_SYSTEM_CONFIG.items():
        assert env.get(f"RAY_{key}") == str(value), f"RAY_{key}: Dockerfile {env.get(f'RAY_{key}')!r}, rsflow {value!r}"


def _container_builder() -> tuple[list[str] | None, str]:
    """A working builder command, or None and why not."""
    for tool in ("docker", "podman", "buildah"):
        exe = shutil.which(tool)
        if not exe:
            continue
        probe = [exe, "info"] if tool != "buildah" else [exe, "version"]
        try:
            ok = subprocess.run(probe, check=False, capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            build = [exe, "bud"] if tool == "buildah" else [exe, "build"]
            return build, tool
        return None, f"{tool} is on PATH but does not answer `{' '.join(probe[1:])}` (no daemon?)"
    return None, "no container builder (docker, podman, buildah) on PATH"


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_image_builds() -> None:
    build, why = _container_builder()
    if build is None:
        pytest.skip(f"image not built: {why}")
    cmd = [*build, "-f", str(DOCKERFILE), "-t", "rsflow-test:ci"]
    if build[0].endswith(("podman", "buildah")):
        cmd += ["--ignorefile", str(CLUSTER / "Dockerfile.dockerignore")]
    result = subprocess.run([*cmd, str(ROOT)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------
# what the KubeRay operator checks in Go (its CRD schema does not carry these rules), and what the
# entrypoints and pods need at run time


def _rayjob_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in _by_kind("RayJob"):
        yield doc["metadata"]["name"], doc["spec"]
    for doc in _by_kind("RayCronJob"):
        yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]


@pytest.mark.parametrize(("name", "spec"), list(_rayjob_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_rayjob_specs_pass_the_operators_own_validation(name: str, spec: dict[str, Any]) -> None:
    """KubeRay's ValidateRayJobSpec (ray-operator/controllers/ray/utils/validation.go): a TTL needs
    shutdownAfterJobFinishes ("a RayJob with shutdownAfterJobFinishes set to false cannot have
    TTLSecondsAfterFinished"), a job on an existing cluster (clusterSelector) creates none and cannot shut
    it down, and a deadline is positive. The RayCronJob broke the first rule: applied, never run."""
    if spec.get("ttlSecondsAfterFinished", 0) > 0:
        assert spec.get("shutdownAfterJobFinishes") is True, f"{name}: a TTL without shutdownAfterJobFinishes"
    if "clusterSelector" in spec:
        assert "rayClusterSpec" not in spec and not spec.get("shutdownAfterJobFinishes"), name
    else:
        assert "rayClusterSpec" in spec, name
    assert spec.get("activeDeadlineSeconds", 1) > 0


def _entrypoints() -> list[tuple[str, list[str]]]:
    out = [(d["metadata"]["name"], shlex.split(d["spec"]["entrypoint"])) for d in _by_kind("RayJob")]
    out += [(d["metadata"]["name"], shlex.split(d["spec"]["jobTemplate"]["entrypoint"])) for d in _by_kind("RayCronJob")]
    return out


@pytest.mark.parametrize(("name", "argv"), _entrypoints(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_entrypoint_parses_with_the_real_command_line(name: str, argv: list[str]) -> None:
    """Each job's flags go through the parser of the script it runs (a flag renamed in the code would
    otherwise only fail on the cluster)."""
    import importlib.util

    assert argv[0] == "python"
    script = argv[1].removeprefix("/opt/rsflow/")
    rest = argv[2:]
    if script == "jobs/caption_region.py":
        from rsflow.cli import _join_negative_values, build_parser

        args = build_parser().parse_args(_join_negative_values(["region", *rest]))  # as main() does
        assert args.output and "://" in args.output, "a job's output must outlive its cluster"
    elif script == "jobs/monitor_aoi.py":
        from rsflow.cli import build_parser

        args = build_parser().parse_args(["monitor", "run", *rest])
        assert (ROOT / args.config.removeprefix("/opt/rsflow/")).is_file()
    else:
        spec = importlib.util.spec_from_file_location("finetune_cli", ROOT / script)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        args = module.build_parser().parse_args(rest)
        assert (ROOT / args.config).is_file()


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-region.yaml"])
def test_model_pods_and_the_driver_reach_checkpoints_and_the_hub(name: str) -> None:
    """Local checkpoints and adapters (a converted GeoChat, a finetuning run's export) are read by the
    driver (head) and every model actor (gpu): both mount the shared volume; both get the optional
    hub token, and the Hugging Face cache is on the volume, not in each pod's container layer."""
    templates = dict(_pod_templates(_load(name)))
    for kind in ("head", "gpu"):
        container = _container(templates[kind])
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in templates[kind]["spec"].get("volumes", [])}
        assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == "rsflow-shared", kind
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True, kind
        assert env["HF_HOME"]["value"].startswith("/mnt/shared/"), kind
    monitor = yaml.safe_load((ROOT / "monitors" / "port.yaml").read_text())
    assert monitor["model"]["model"].startswith("/mnt/shared/"), "the example monitor's model is on the volume"


def test_ray_up_names_an_ami_and_a_head_profile_that_can_launch_workers() -> None:
    """Ray's default AMI carries CUDA 11.2 (the image needs a driver for CUDA 12.8), and the head's
    default profile cannot pass the workers' role: both are set, the AMI as a placeholder that fails
    loudly until replaced."""
    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    for name, node in config["available_node_types"].items():
        assert node["node_config"]["ImageId"].startswith("ami-"), name
    assert config["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]["Name"] == "rsflow-ray-head"
    readme = (CLUSTER / "README.md").read_text()
    assert "iam:PassRole" in readme and "R570" in readme


def test_the_monitor_cronjob_stops_its_ray_job_when_the_pod_is_killed(tmp_path: Path) -> None:
    """`ray job submit` does not stop the job when it is killed: at the CronJob's activeDeadlineSeconds
    the Ray job ran on, renewing the monitor's lock, unseen by concurrencyPolicy. The pod's command runs
    with a stand-in `ray` on PATH and gets TERM: it asks Ray to stop the job it submitted."""
    import signal
    import time

    (cron,) = _by_kind("CronJob")
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    log = tmp_path / "calls.log"
    fake = tmp_path / "ray"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$2" = submit ] && exec sleep 30\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["/bin/sh", "-c", container["args"][0]], env=env)
    deadline = time.monotonic() + 10
    while not (log.is_file() and "submit" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    submit, stop = log.read_text().splitlines()
    job_id = submit.split("--submission-id ")[1].split()[0]
    assert job_id.startswith("rsflow-monitor-port-") and stop == f"job stop --no-wait {job_id}"
