"""The Kubernetes deployment (deploy/k8s): both overlays render offline, every built-in object
validates against the Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail),
the custom resources carry what their operators need, and the manifests keep the hub's rules:
probes, resources and a locked-down security context on every container, no secret values, only
environment variables the hub reads, commands and endpoints that exist.

Rendering needs no network and no cluster: `render` below is a small Kustomize for the subset
deploy/k8s uses (resources as files and folders, namespace, images, strategic-merge patches
matched by kind and name). Where a `kubectl` with Kustomize is installed, its rendering is
compared with ours, so the two cannot drift apart unnoticed.
"""
from __future__ import annotations

import copy
import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import psycopg
import pytest
import yaml

from interop import policies, sites
from interop.cli import build_parser
from interop.config import ENVIRONMENT, Settings
from interop.runtime.supervisor import gunicorn_args
from interop.store import metrics

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.30"  # the oldest minor version the deployment supports

BUILTIN = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1", "autoscaling/v2"}
# Custom resources: the operator's API and what each object must carry (dotted paths)
CUSTOM = {
    ("postgresql.cnpg.io/v1", "Cluster"): ["spec.instances", "spec.storage.size", "spec.bootstrap.initdb.database"],
    ("postgresql.cnpg.io/v1", "ScheduledBackup"): ["spec.schedule", "spec.cluster.name"],
    ("keda.sh/v1alpha1", "ScaledObject"): ["spec.scaleTargetRef.name", "spec.triggers"],
    ("keda.sh/v1alpha1", "TriggerAuthentication"): ["spec.secretTargetRef"],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["spec.selector.matchLabels", "spec.endpoints"],
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
HUB_IMAGE = "registry.example.org/interop/interop-hub"

# ---------------------------------------------------------------- a Kustomize for this subset --

# Strategic merge: lists of these fields are merged item by item on this key (as the Kubernetes
# API's patchMergeKey says); other lists are replaced; maps are merged.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name",
              "tolerations": None}
KNOWN_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


def _merge(base: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise NotImplementedError(f"patch directives are not supported here: {sorted(patch)}")
        out = dict(base)
        for key, value in patch.items():
            out[key] = _merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return out
    key = MERGE_KEYS.get(field or "")
    if isinstance(base, list) and isinstance(patch, list) and key:
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
            if at is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[at] = _merge(merged[at], item)
        return merged
    return copy.deepcopy(patch)


def _image_name(image: str) -> tuple[str, str]:
    """(name, tag) of an image reference: registry/path:tag."""
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon + 1:]) if colon > slash else (image, "")


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    if isinstance(node, dict):
        for field in ("containers", "initContainers"):
            for container in node.get(field) or []:
                name, tag = _image_name(container["image"])
                for rule in images:
                    if rule["name"] == name:
                        container["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}".rstrip(":")
        for value in node.values():
            _set_images(value, images)
    elif isinstance(node, list):
        for value in node:
            _set_images(value, images)


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize folder` builds (for the subset of Kustomize used here)."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(spec) - KNOWN_FIELDS
    assert not unknown, f"{folder}: kustomization fields this renderer does not implement: {unknown}"
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    for patch in spec.get("patches", []):
        assert set(patch) == {"path"}, f"{folder}: only patches by file are implemented: {patch}"
        for doc in yaml.safe_load_all((folder / patch["path"]).read_text(encoding="utf-8")):
            matches = [i for i, obj in enumerate(objects) if _key(obj) == _key(doc)]
            assert len(matches) == 1, f"{folder / patch['path']}: patch target {_key(doc)} not found once"
            objects[matches[0]] = _merge(objects[matches[0]], doc)
    if spec.get("namespace"):
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = spec["namespace"]
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    _set_images(objects, spec.get("images", []))
    return objects


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


# ------------------------------------------------------------------------------------ helpers --

def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(owner, pod spec) of every Deployment and Job."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]["spec"]


def hub_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(owner, pod spec, container) of every container running the hub's image."""
    for owner, pod in pod_templates(objects):
        for container in pod.get("initContainers", []) + pod["containers"]:
            if _image_name(container["image"])[0] == HUB_IMAGE:
                yield owner, pod, container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def deployment(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = by_kind(objects, "Deployment")
    assert name in found, f"no Deployment {name}"
    return found[name]


def container_of(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The (first) container of Deployment `name`."""
    first: dict[str, Any] = deployment(objects, name)["spec"]["template"]["spec"]["containers"][0]
    return first


def scaling_query(overlay_name: str) -> str:
    scaled = by_kind(render(K8S / "overlays" / overlay_name), "ScaledObject")["interop-worker"]
    return str(scaled["spec"]["triggers"][0]["metadata"]["query"])


# -------------------------------------------------------------------------------------- tests --

def test_both_overlays_render_the_whole_hub(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = overlay
    keys = [(_key(o)) for o in objects]
    assert len(keys) == len(set(keys)), f"{name}: duplicate objects"
    for deploy in ("interop-api", "interop-worker", "interop-deliver", "interop-mllp", "interop-dicom-scp", "triton"):
        deployment(objects, deploy)
    commands = {d: container_of(objects, d)["command"]
                for d in ("interop-worker", "interop-deliver", "interop-mllp", "interop-dicom-scp")}
    assert commands == {"interop-worker": ["interop", "worker"], "interop-deliver": ["interop", "deliver"],
                        "interop-mllp": ["interop", "mllp"], "interop-dicom-scp": ["interop", "dicom-scp"]}
    assert by_kind(objects, "Job")["interop-migrate"]["spec"]["template"]["spec"]["containers"][0]["command"] \
        == ["interop", "migrate"]
    services = by_kind(objects, "Service")
    assert {p["port"] for p in services["interop-mllp"]["spec"]["ports"]} == {2575}
    assert {p["port"] for p in services["interop-dicom-scp"]["spec"]["ports"]} == {11112}
    for kind in ("Cluster", "ScheduledBackup", "ScaledObject", "TriggerAuthentication", "HorizontalPodAutoscaler",
                 "ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget", "PersistentVolumeClaim"):
        assert by_kind(objects, kind), f"{name}: no {kind}"
    assert all(o["metadata"].get("namespace") == "interop" for o in objects if o["kind"] not in CLUSTER_SCOPED)


def test_the_renderer_agrees_with_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays were rendered by this file's renderer only")
    version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"Kustomize Version: v(\d+)", version)
    if found is None or int(found.group(1)) < 5:  # Debian's kubectl 1.20 carries Kustomize 2, without `patches`
        pytest.skip(f"this kubectl's Kustomize is older than v5 ({version.strip()!r}): not compared")
    for name in OVERLAYS:
        out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / name)], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        theirs = {_key(o): o for o in yaml.safe_load_all(out) if o}
        ours = {_key(o): o for o in render(K8S / "overlays" / name)}
        assert sorted(theirs) == sorted(ours), name
        for key, obj in ours.items():
            assert obj == theirs[key], f"{name}: {key} renders differently"


def test_builtin_objects_validate_against_the_kubernetes_schemas(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = overlay
    checked = 0
    for obj in objects:
        if obj["apiVersion"] in BUILTIN:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {_key(obj)}: {exc.message} at {list(exc.path)}")
            checked += 1
        else:
            assert (obj["apiVersion"], obj["kind"]) in CUSTOM, f"{name}: unexpected API {obj['apiVersion']} {obj['kind']}"
    assert checked >= 30


def test_the_schema_check_catches_a_mistake() -> None:
    api = deployment(render(K8S / "overlays" / "cpu"), "interop-api")
    broken = copy.deepcopy(api)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_custom_resources_carry_what_their_operators_need(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _name, objects = overlay
    for obj in objects:
        for path in CUSTOM.get((obj["apiVersion"], obj["kind"]), []):
            assert dig(obj, path) not in (None, "", [], {}), f"{_key(obj)}: {path} is missing"
    (cluster_name, cluster), = by_kind(objects, "Cluster").items()
    assert cluster["spec"]["instances"] == 3
    backup = by_kind(objects, "ScheduledBackup")["interop-db-daily"]
    assert backup["spec"]["cluster"]["name"] == cluster_name
    assert len(backup["spec"]["schedule"].split()) == 6  # CloudNativePG's cron has seconds
    store = cluster["spec"]["backup"]["barmanObjectStore"]
    assert {ref["name"] for ref in store["s3Credentials"].values()} == {"interop-backup-s3"}

    scaled = by_kind(objects, "ScaledObject")["interop-worker"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "interop-worker"
    deployment(objects, "interop-worker")
    trigger, = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    assert all(isinstance(v, str) for v in trigger["metadata"].values())  # the CRD: a map of strings
    assert float(trigger["metadata"]["targetQueryValue"]) > 0
    auth = by_kind(objects, "TriggerAuthentication")[trigger["authenticationRef"]["name"]]
    refs = auth["spec"]["secretTargetRef"]
    assert [(r["parameter"], r["name"], r["key"]) for r in refs] == [("connection", f"{cluster_name}-app", "uri")]
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]


def test_the_worker_scales_on_the_analysis_pool_of_the_queue() -> None:
    """The query's kinds are mappings/queue.yaml's analysis pool; its statuses are the job table's."""
    query = scaling_query("cpu")
    kinds = re.search(r"kind IN \(([^)]*)\)", query)
    assert kinds is not None
    pool = policies.load(ROOT / "mappings", 8).pool("analysis")
    assert tuple(sorted(re.findall(r"'([^']+)'", kinds.group(1)))) == pool
    check = re.findall(r"CHECK \(status IN \(([^)]*)\)\)", "".join(
        p.read_text(encoding="utf-8") for p in sorted((ROOT / "interop" / "store" / "migrations").glob("*.sql"))))
    job_checks = [c for c in check if "'queued'" in c]  # other tables' statuses (bulk exports...) are not the job's
    statuses = set(re.findall(r"'([a-z]+)'", job_checks[-1]))
    assert set(re.findall(r"status = '([a-z]+)'", query)) == {"queued", "running"} <= statuses


def test_the_scaling_query_counts_due_analysis_jobs(db_url: str) -> None:
    query = scaling_query("gpu")
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = [("analyse-study", "queued", "now()"), ("process-hl7", "running", "now()"),
                ("find-study", "queued", "now() + interval '1 hour'"),  # waiting for its images: not due
                ("analyse-study", "done", "now()"), ("deliver-hl7", "queued", "now()")]  # delivery pool
        for kind, status, run_after in rows:
            conn.execute(f"INSERT INTO job (kind, status, run_after) VALUES (%s, %s, {run_after})", (kind, status))
        row = conn.execute(query).fetchone()
    assert row is not None and row[0] == 2


def test_the_gpu_overlay_puts_triton_on_a_gpu() -> None:
    gpu = deployment(render(K8S / "overlays" / "gpu"), "triton")["spec"]["template"]["spec"]
    triton, = gpu["containers"]
    assert int(triton["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert _image_name(triton["image"])[1].startswith("24.08-py3")
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"] >= 600
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    volumes = {v["name"]: v for v in gpu["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "triton-models"
    cpu = render(K8S / "overlays" / "cpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu)
    base = render(K8S / "base")
    image = container_of(base, "triton")["image"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", image)
    dockerfile = (ROOT / "deploy" / "triton" / "Dockerfile").read_text(encoding="utf-8")
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in dockerfile
    assert "ARG TRITON_TAG=" + image.split(":")[1] in dockerfile


def test_every_container_has_probes_resources_and_no_privileges(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, objects = overlay
    for owner, pod in pod_templates(objects):
        assert pod.get("automountServiceAccountToken") is False, _key(owner)
        assert pod["securityContext"]["runAsNonRoot"] is True, _key(owner)
        assert pod["securityContext"]["runAsUser"] > 0, _key(owner)
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", _key(owner)
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}: {_key(owner)} {container['name']}"
            if owner["kind"] == "Deployment":  # a Job runs to completion: nothing to route to or restart
                assert container.get("livenessProbe") and container.get("readinessProbe"), where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert context["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if container["image"].startswith(HUB_IMAGE) and owner["kind"] == "Deployment":
                assert {"/tmp", "/var/lib/interop"} <= mounts, where  # writable places on a read-only root


def test_probes_use_ports_and_endpoints_that_exist(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _name, objects = overlay
    routes = {rule.rule for rule in _app().url_map.iter_rules()}
    for owner, pod in pod_templates(objects):
        for container in pod["containers"]:
            ports = {p["name"] for p in container.get("ports", [])} | {p["containerPort"] for p in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                spec = container.get(probe)
                if not spec:
                    continue
                check = spec.get("httpGet") or spec.get("tcpSocket")
                if check:
                    assert check["port"] in ports, f"{_key(owner)} {probe}: port {check['port']}"
                if spec.get("httpGet") and container["image"].startswith(HUB_IMAGE):
                    assert spec["httpGet"]["path"].partition("?")[0] in routes, f"{_key(owner)} {probe}: no such endpoint"
                if spec.get("exec"):
                    assert spec["exec"]["command"][:2] == ["python", "-c"]
    api = container_of(objects, "interop-api")
    assert (api["livenessProbe"]["httpGet"]["path"], api["readinessProbe"]["httpGet"]["path"]) == \
        ("/healthz", "/readyz?exclude=triton")  # an API pod stays in service while Triton is away
    for name, port in (("interop-mllp", 2575), ("interop-dicom-scp", 11112)):
        container = container_of(objects, name)
        assert container["ports"][0]["containerPort"] == port
        assert container["readinessProbe"]["tcpSocket"]["port"] == container["ports"][0]["name"]


def _app() -> Any:
    from interop.app import create_app

    return create_app(Settings(mappings_dir=ROOT / "mappings", sites_file=ROOT / "mappings" / "sites.yaml"))


def test_the_api_runs_gunicorn_as_interop_serve_does() -> None:
    objects = render(K8S / "overlays" / "cpu")
    container = container_of(objects, "interop-api")
    env = by_kind(objects, "ConfigMap")["interop-hub-env"]["data"]
    args = [re.sub(r"\$\((\w+)\)", lambda m: str(env[m.group(1)]), a) for a in container["args"]]
    settings = Settings.from_env(env)
    assert [*container["command"], *args] == ["python", *gunicorn_args(settings)[1:]]
    assert "/metrics" in {rule.rule for rule in _app().url_map.iter_rules()}


def test_the_commands_are_interop_commands(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _name, objects = overlay
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = set(sub.choices or ())
    for owner, _pod, container in hub_containers(objects):
        if container["command"][0] == "interop":
            assert container["command"][1] in commands, _key(owner)


def test_every_env_var_is_a_setting_the_hub_reads(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _name, objects = overlay
    settings = {name for name, *_ in ENVIRONMENT}
    # variables the sites file names for a site's secrets (read through Settings.secret)
    named = set(re.findall(r"_env:\s*([A-Z][A-Z0-9_]*)", _sites_text(objects)))
    maps = by_kind(objects, "ConfigMap")
    seen: set[str] = set()
    for owner, _pod, container in hub_containers(objects):
        names = [e["name"] for e in container.get("env", [])]
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                names += list(maps[source["configMapRef"]["name"]]["data"])
        unknown = set(names) - settings - named
        assert not unknown, f"{_key(owner)}: {sorted(unknown)} are not settings of the hub (interop --help)"
        for arg in container.get("args", []) + container.get("command", []):
            assert set(re.findall(r"\$\((\w+)\)", arg)) <= set(names), f"{_key(owner)}: {arg}"
        seen |= set(names)
    assert {"DATABASE_URL", "TRITON_URL", "DICOMWEB_URL", "INTEROP_PSEUDONYM_KEY", "INTEROP_SITES"} <= seen
    # and the values parse as the hub parses them
    env = {k: v for k, v in maps["interop-hub-env"]["data"].items()}
    parsed = Settings.from_env({**env, "DATABASE_URL": "postgresql://x@y/z"})
    assert parsed.triton_url == "triton:8000" and parsed.http_port == 8080 and parsed.mllp_port == 2575


def _sites_text(objects: list[dict[str, Any]]) -> str:
    return str(by_kind(objects, "ConfigMap")["interop-sites"]["data"]["sites.yaml"])


def test_the_sites_file_loads_and_is_mounted_where_the_hub_reads_it(overlay: tuple[str, list[dict[str, Any]]],
                                                                    tmp_path: Path) -> None:
    _name, objects = overlay
    path = tmp_path / "sites.yaml"
    path.write_text(_sites_text(objects), encoding="utf-8")
    assert sites.load(path)
    where = Path(by_kind(objects, "ConfigMap")["interop-hub-env"]["data"]["INTEROP_SITES"])
    for owner, pod, container in hub_containers(objects):
        if owner["kind"] != "Deployment":
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(where.parent))
        assert "subPath" not in mount, "a subPath mount never sees the ConfigMap change"
        assert volumes[mount["name"]]["configMap"]["name"] == "interop-sites"


def test_no_secret_values_only_references(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _name, objects = overlay
    assert not by_kind(objects, "Secret")
    text = yaml.safe_dump(objects)
    assert "-----BEGIN" not in text
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "a URL with a password"
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$", re.I)
    for owner, _pod, container in hub_containers(objects):
        for var in container.get("env", []):
            if secretish.search(var["name"]):
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], f"{_key(owner)}: {var['name']}"
    for name, cm in by_kind(objects, "ConfigMap").items():
        assert not [k for k in cm.get("data", {}) if secretish.search(k)], name
    # every Secret the manifests name is one docs/DEPLOYMENT.md tells the operator about
    names = _secret_names(objects)
    names |= {r["name"] for ta in by_kind(objects, "TriggerAuthentication").values() for r in ta["spec"]["secretTargetRef"]}
    docs = (ROOT / "docs" / "DEPLOYMENT.md").read_text(encoding="utf-8")
    assert names >= {"interop-db-app", "interop-hub", "interop-backup-s3", "interop-metrics-oauth"}
    for secret in names:
        assert f"`{secret}`" in docs, f"docs/DEPLOYMENT.md does not say how to create the Secret {secret}"


def _secret_names(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef") and isinstance(value, dict):
                found.add(value["name"])
            elif key in ("s3Credentials",):
                found |= {ref["name"] for ref in value.values()}
            elif key in ("clientId",) and isinstance(value, dict) and "secret" in value:
                found.add(value["secret"]["name"])
            elif key == "clientSecret" and isinstance(value, dict):
                found.add(value["name"])
            found |= _secret_names(value)
    elif isinstance(node, list):
        for value in node:
            found |= _secret_names(value)
    return found


def test_only_the_hubs_pods_reach_triton_and_postgresql(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _name, objects = overlay
    policies_ = by_kind(objects, "NetworkPolicy")
    deny = policies_["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and "ingress" not in deny
    hub = {"app.kubernetes.io/name": "interop-hub"}
    for target, allowed_ports in (({"app.kubernetes.io/name": "triton"}, {8000, 8001}),
                                  ({"cnpg.io/cluster": "interop-db"}, {5432, 8000})):
        rules = [r for p in policies_.values() if selects(p["spec"]["podSelector"].get("matchLabels", {}), target)
                 and p["spec"]["podSelector"] for r in p["spec"].get("ingress", [])]
        assert rules
        for rule in rules:
            assert rule.get("from"), "a rule open to every source"
            for peer in rule["from"]:
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                # in this namespace: the hub's pods, or the database's own instances; beyond it: a named namespace
                assert labels in (hub, target) or "namespaceSelector" in peer, peer
                if "namespaceSelector" in peer:
                    assert peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] in ("cnpg-system", "keda")
            assert {p["port"] for p in rule["ports"]} <= allowed_ports
    # the pods that need them carry the label the policies allow
    for name in ("interop-api", "interop-worker", "interop-deliver", "interop-mllp", "interop-dicom-scp"):
        assert selects(hub, deployment(objects, name)["spec"]["template"]["metadata"]["labels"])
    assert not selects(hub, deployment(objects, "triton")["spec"]["template"]["metadata"]["labels"])


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _name, objects = overlay
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(objects, "HorizontalPodAutoscaler").values()}
    targets |= {s["spec"]["scaleTargetRef"]["name"] for s in by_kind(objects, "ScaledObject").values()}
    assert targets == {"interop-api", "interop-worker"}
    for name in targets:
        assert "replicas" not in deployment(objects, name)["spec"], name
    budgets = by_kind(objects, "PodDisruptionBudget")
    for name, obj in by_kind(objects, "Deployment").items():
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert any(selects(b["spec"]["selector"]["matchLabels"], labels) for b in budgets.values()), f"{name}: no PDB"


def test_prometheus_scrapes_the_metrics_with_a_hub_metrics_token(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    from interop.access import RULES

    _name, objects = overlay
    monitor = by_kind(objects, "ServiceMonitor")["interop-api"]
    service = by_kind(objects, "Service")["interop-api"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    endpoint, = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert RULES["health.metrics"].hub_scope in endpoint["oauth2"]["scopes"]
    env = by_kind(objects, "ConfigMap")["interop-hub-env"]["data"]
    assert endpoint["oauth2"]["tokenUrl"].startswith(env["INTEROP_TRUSTED_ISSUER"])


def test_the_liveness_exec_probe_sees_the_process(overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Run the probe against a stand-in process (its /proc in place of PID 1's) and a heartbeat
    file fresh or 700 s old."""
    _name, objects = overlay
    for name, command in (("interop-worker", "worker"), ("interop-deliver", "deliver")):
        probe = container_of(objects, name)["livenessProbe"]["exec"]["command"]
        env = {e["name"]: e["value"] for e in container_of(objects, name)["env"] if "value" in e}
        heartbeat = tmp_path / f"{command}-heartbeat"
        heartbeat.touch()
        probe_env = {**os.environ, "INTEROP_HEARTBEAT_FILE": str(heartbeat)}
        assert env["INTEROP_HEARTBEAT_FILE"].startswith("/tmp/")  # the container's writable emptyDir
        for argv, age, expected in (([command], 0, 0), (["something-else"], 0, 1), ([command], 700, 1)):
            os.utime(heartbeat, (time.time() - age, time.time() - age))  # a loop that stopped turning
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv])
            try:
                code = probe[2].replace("/proc/1/", f"/proc/{child.pid}/")
                assert subprocess.run([sys.executable, "-c", code], env=probe_env, timeout=30,
                                      capture_output=True).returncode == expected, (name, argv, age)
            finally:
                os.kill(child.pid, signal.SIGTERM)
                child.wait(timeout=10)


def test_the_readiness_exec_probe_asks_what_readyz_asks(db_url: str) -> None:
    objects = render(K8S / "overlays" / "cpu")
    probe = container_of(objects, "interop-worker")["readinessProbe"]["exec"]["command"]
    statement = re.search(r"execute\('([^']+)'\)", probe[2])
    assert statement is not None and statement.group(1) in inspect.getsource(metrics.check)
    env = {**os.environ, "DATABASE_URL": db_url}
    assert subprocess.run([sys.executable, "-c", probe[2]], env=env, timeout=30).returncode == 0
    env["DATABASE_URL"] = db_url.rsplit("/", 1)[0] + "/no_such_database"
    assert subprocess.run([sys.executable, "-c", probe[2]], env=env, timeout=30, capture_output=True).returncode != 0
