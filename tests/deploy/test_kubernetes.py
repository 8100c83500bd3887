"""deploy/kubernetes: every kustomization renders (`kubectl kustomize`), every object validates strictly against
the Kubernetes 1.34 schemas (`kubernetes-validate`; the ServiceMonitor CRD against the fields we use), and the
objects agree with each other and with the app (probe paths, settings, labels, drain timing); the catalogue
database comes from one Secret that is never committed, serving pods never write the index, and the compaction
CronJob writes it with the build Job's security context and arguments `vps` accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import typer.main
import yaml
from kubernetes_validate.utils import validate

from app.cli import cli
from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import live_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.34.0"
KUSTOMIZATIONS = ["base", "overlays/example"]
IMAGE_INDEX_DIR = "/srv/index_data"  # the Dockerfile's VPS_INDEX_DIR: the index baked into the image
CATALOGUE_SECRET = {"name": "vps-catalogue-db", "key": "url"}

# The part of the prometheus-operator ServiceMonitor CRD (monitoring.coreos.com/v1) these manifests use.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        }
    },
}


def render(kustomization: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/kubernetes; install it")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)} objects"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every workload's pod spec, by `Kind/name`."""
    specs = {}
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            specs[f"{d['kind']}/{d['metadata']['name']}"] = d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":
            specs[f"CronJob/{d['metadata']['name']}"] = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def vps_argv(container: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The `vps` subcommand a container runs and its options as the CLI parses them (an unknown option, a bad
    value or a missing required one fails here, not in the cluster)."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[0] == "vps", argv
    command = typer.main.get_command(cli).commands[argv[1]]  # type: ignore[attr-defined]
    return argv[1], command.make_context(argv[1], argv[2:]).params


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_render_and_validate(kustomization: str) -> None:
    docs = render(kustomization)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert "ServiceMonitor" in kinds
    if kustomization == "overlays/example":
        assert {"Job", "CronJob", "PersistentVolumeClaim"} <= kinds
    # No Secret is rendered: the catalogue database URL (with its password) and the admin token are created in the
    # cluster by hand (docs/deploy.md), never committed; kustomize generators would render them here.
    assert "Secret" not in kinds
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
        else:
            validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_agree_with_each_other_and_the_app(kustomization: str, faiss_index: Path, tiny_model: Path) -> None:
    docs = render(kustomization)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]

    def selects(selector: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    # Probes and the scrape hit endpoints a ready app answers with 200, on the named port.
    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0)
    with live_server(create_app(settings)) as base:

        def answers(path: str) -> bool:
            return httpx.get(f"{base}{path}").status_code == 200

        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert answers(container[probe]["httpGet"]["path"]) and container[probe]["httpGet"]["port"] == "http"
        scrape_paths = [e["path"] for e in one(docs, "ServiceMonitor")["spec"]["endpoints"]]
        assert all(answers(path) for path in scrape_paths)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"  # a refused reload must not restart pods
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"

    # Resources and hardening.
    assert set(container["resources"]) == {"requests", "limits"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/tmp" in mounts  # noqa: S108 - the one writable path under a read-only root

    # Settings: every key is a real setting and the values pass validation.
    config = one(docs, "ConfigMap")["data"]
    fields = {f"VPS_{name.upper()}" for name in Settings.model_fields} | {"VPS_WORKERS"}
    assert set(config) <= fields, set(config) - fields
    settings = Settings(**{k[4:].lower(): v for k, v in config.items() if k != "VPS_WORKERS"})
    assert int(config["VPS_WORKERS"]) >= 1

    # Draining fits in the grace period: preStop sleep + drain + the server's 30 s for requests in flight.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop + settings.drain_s + 30 < grace

    service = one(docs, "Service")
    assert selects(service["spec"]["selector"])
    ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    monitor = one(docs, "ServiceMonitor")["spec"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["selector"]["matchLabels"].items())
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}

    if kustomization == "overlays/example":
        # The index volume: read-only in the pods, written by the build Job, and where VPS_INDEX_DIR points.
        index_dir = config["VPS_INDEX_DIR"]
        assert mounts[index_dir]["readOnly"] is True
        assert float(config["VPS_INDEX_WATCH_S"]) > 0
        job = one(docs, "Job")["spec"]["template"]["spec"]
        build = job["containers"][0]
        assert f"--out={index_dir}" in build["args"]
        job_mounts = {m["mountPath"]: m for m in build["volumeMounts"]}
        assert not job_mounts[index_dir].get("readOnly", False)
        claim = {v["name"]: v for v in job["volumes"]}[job_mounts[index_dir]["name"]]
        pod_claim = {v["name"]: v for v in pod["spec"]["volumes"]}[mounts[index_dir]["name"]]
        assert claim["persistentVolumeClaim"]["claimName"] == pod_claim["persistentVolumeClaim"]["claimName"]
        assert all(d["metadata"].get("namespace") == "shop-search" for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_workload_reads_the_catalogue_database_from_one_secret(kustomization: str) -> None:
    """The pods, the build Job (it imports into the database) and the compaction all use the same database: a
    workload without it would fall back to a SQLite file of its own. Never a literal value."""
    docs = render(kustomization)
    required = kustomization != "base"  # base: the index is in the image, live writes are optional
    workloads = pod_specs(docs)
    for name, pod in workloads.items():
        for container in containers(pod):
            argv = [*container.get("command", []), *container.get("args", [])]
            reads_database = container["name"] == "vps" or argv[:2] in (["vps", "build-index"], ["vps", "compact"])
            env = env_of(container)
            if not reads_database:
                assert "VPS_CATALOGUE_URL" not in env, f"{name}/{container['name']}"
                continue
            url = env["VPS_CATALOGUE_URL"]
            assert "value" not in url, f"{name}/{container['name']}: a literal database URL"
            ref = url["valueFrom"]["secretKeyRef"]
            assert {"name": ref["name"], "key": ref["key"]} == CATALOGUE_SECRET, f"{name}/{container['name']}"
            assert ref["optional"] is (not required), f"{name}/{container['name']}: optional={ref['optional']}"
    assert len(workloads) == (1 if kustomization == "base" else 3), sorted(workloads)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_serving_pods_never_write_the_index(kustomization: str) -> None:
    """The index directory is read-only for every serving pod (in the image under a read-only root, or a volume
    mounted and claimed read-only); so the pods never compact (VPS_COMPACT_ABOVE=0) and the only writable path
    is /tmp."""
    docs = render(kustomization)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    config = one(docs, "ConfigMap")["data"]
    assert int(config["VPS_COMPACT_ABOVE"]) == 0
    assert 0 < float(config["VPS_SYNC_S"]) <= 2
    index_dir = config.get("VPS_INDEX_DIR", IMAGE_INDEX_DIR)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in containers(pod):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        for mount in container.get("volumeMounts", []):
            if mount["mountPath"] == "/tmp":  # noqa: S108 - the metrics files, an emptyDir
                assert "emptyDir" in volumes[mount["name"]]
                continue
            assert mount.get("readOnly") is True, f"{container['name']} mounts {mount['mountPath']} writable"
            claim = volumes[mount["name"]].get("persistentVolumeClaim")
            if claim is not None:
                assert claim.get("readOnly") is True, f"{mount['name']}: the claim is not read-only"
        writable = [m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")]
        assert not any(index_dir == w or index_dir.startswith(w.rstrip("/") + "/") for w in writable), writable
    if kustomization == "base":
        assert not any(m["mountPath"] == index_dir for c in containers(pod) for m in c.get("volumeMounts", []))


def test_the_compaction_cronjob_writes_the_index_volume_like_the_build_job() -> None:
    docs = render("overlays/example")
    config = one(docs, "ConfigMap")["data"]
    index_dir = config["VPS_INDEX_DIR"]
    serving = one(docs, "Deployment")["spec"]["template"]["spec"]
    serving_claim = next(
        v["persistentVolumeClaim"]["claimName"]
        for v in serving["volumes"]
        for m in serving["containers"][0]["volumeMounts"]
        if m["name"] == v["name"] and m["mountPath"] == index_dir
    )
    build = one(docs, "Job")
    assert build["metadata"]["name"] == "vps-index-build"
    build_pod = build["spec"]["template"]["spec"]
    cron = one(docs, "CronJob")
    assert cron["metadata"]["name"] == "vps-compact"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # one compaction at a time
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] <= 1 and job["activeDeadlineSeconds"] > 0

    # Compact first, prune only after it succeeded: compaction is the init container, pruning the main one.
    [compact] = pod["initContainers"]
    [prune] = pod["containers"]
    name, params = vps_argv(compact)
    assert name == "compact" and str(params["out"]) == index_dir
    build_args = dict(a.removeprefix("--").split("=", 1) for a in build_pod["containers"][0]["args"])
    assert build_args["out"] == index_dir
    assert str(params["model"]) == build_args["model"]  # the model the build Job indexes with
    name, params = vps_argv(prune)
    assert name == "prune" and str(params["out"]) == index_dir and params["keep"] >= 1

    # The same security as the build Job, the same image as the pods; the index volume writable, the same claim.
    image = serving["containers"][0]["image"]
    assert pod["securityContext"] == build_pod["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    for container in (compact, prune):
        assert container["securityContext"] == build_pod["containers"][0]["securityContext"], container["name"]
        assert container["image"] == image == build_pod["containers"][0]["image"]
        assert set(container["resources"]) == {"requests", "limits"}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert not mounts[index_dir].get("readOnly", False), container["name"]
        claim = {v["name"]: v for v in pod["volumes"]}[mounts[index_dir]["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] == serving_claim and not claim.get("readOnly", False)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_pod_passes_the_restricted_pod_security_standard(kustomization: str) -> None:
    """The overlay's namespace enforces `restricted`: a Job or an init container that misses one field would not
    be admitted there."""
    for name, pod in pod_specs(render(kustomization)).items():
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in containers(pod):
            csc = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], where
            assert csc["readOnlyRootFilesystem"] is True and not csc.get("privileged", False), where
