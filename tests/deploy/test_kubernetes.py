"""deploy/kubernetes: every kustomization renders (`kubectl kustomize`), every object validates strictly against
the Kubernetes 1.34 schemas (`kubernetes-validate`; the ServiceMonitor CRD against the fields we use), and the
objects agree with each other and with the app (probe paths, settings, labels, drain timing)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from kubernetes_validate.utils import validate

from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import live_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.34.0"
KUSTOMIZATIONS = ["base", "overlays/example"]

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


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_render_and_validate(kustomization: str) -> None:
    docs = render(kustomization)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert "ServiceMonitor" in kinds
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
