"""deploy/kubernetes/overlays/ray-build: the KubeRay RayJob renders and validates against RAYJOB_SCHEMA, each pod
template validates strictly as a Kubernetes 1.34 PodTemplate, and it agrees with the build Job and the CLI: the
entrypoint is a `vps build-index --engine ray` the CLI accepts, the head writes the build Job's index claim, every
node reads the images at the same path, the database comes from the one Secret, every pod passes the restricted
standard, and the image target it names exists.

RAYJOB_SCHEMA is not the RayJob CRD's schema (ray.io/v1): it is a hand-written subset, only the fields this
overlay uses, written alongside it rather than generated from the CRD. It checks that the overlay sticks to those
fields with those types; it cannot tell whether the real CRD of a given KubeRay release accepts them, and the
RayJob has never been applied to a real cluster with the operator."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import typer.main
from kubernetes_validate.utils import validate

from app.cli import EngineName, cli
from tests.deploy.test_kubernetes import CATALOGUE_SECRET, KUBERNETES_VERSION, ROOT, env_of, one, render

# Hand-written, not the CRD's schema: the part of RayJob's spec the overlay uses. spec, rayClusterSpec and the
# group specs are closed (additionalProperties: false), so a field not listed here fails; pod templates are
# checked below as PodTemplates. Never checked against a KubeRay operator or a real cluster (docs/scaling.md,
# "0. Build on Ray").
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_GROUP = {"rayStartParams": _STRINGS, "template": {"type": "object"}}
RAYJOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "rayClusterSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "headGroupSpec": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["template"],
                            "properties": _GROUP,
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["groupName", "template"],
                                "properties": {
                                    **_GROUP,
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def entrypoint(job: dict[str, Any]) -> dict[str, str]:
    """The entrypoint's `vps build-index` options, each checked to be one the CLI has (its paths exist only in
    the cluster, so click cannot parse them here)."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["vps", "build-index"], argv
    command = typer.main.get_command(cli).commands["build-index"]  # type: ignore[attr-defined]
    known = {opt: p for p in command.params for opt in p.opts}
    params: dict[str, str] = {}
    for arg in argv[2:]:
        opt, _, value = arg.partition("=")
        assert opt in known and value, arg
        params[known[opt].name] = value
    return params


def rayjob() -> dict[str, Any]:
    docs = render("overlays/ray-build")
    assert [d["kind"] for d in docs] == ["RayJob"]
    return docs[0]


def pods(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = job["spec"]["rayClusterSpec"]
    out = {"head": spec["headGroupSpec"]["template"]}
    out |= {f"worker/{g['groupName']}": g["template"] for g in spec["workerGroupSpecs"]}
    return out


def test_the_rayjob_renders_and_validates() -> None:
    job = rayjob()
    jsonschema.validate(job, RAYJOB_SCHEMA)
    for name, template in pods(job).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name.replace("/", "-")}}
        validate({**wrapped, "template": template}, KUBERNETES_VERSION, strict=True)


def test_the_entrypoint_is_a_ray_build_the_cli_accepts_writing_the_build_jobs_volume() -> None:
    job = rayjob()
    params = entrypoint(job)
    assert params["engine"] == EngineName.ray.value and params["ray_address"] == "auto"  # the RayJob's own cluster
    assert int(params["ray_workers"]) >= 1 and int(params["ray_threads"]) >= 1
    head = pods(job)["head"]["spec"]
    [container] = head["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    out = mounts[params["out"]]
    assert not out.get("readOnly", False)
    build_job = one(render("overlays/example"), "Job")["spec"]["template"]["spec"]
    build_claims = {
        v["persistentVolumeClaim"]["claimName"] for v in build_job["volumes"] if "persistentVolumeClaim" in v
    }
    assert volumes[out["name"]]["persistentVolumeClaim"]["claimName"] in build_claims
    # Images are read where the actors run: the same read-only catalogue claim at the same path on every pod.
    root = params["images_root"]
    for name, template in pods(job).items():
        pod = template["spec"]
        [c] = pod["containers"]
        mount = {m["mountPath"]: m for m in c["volumeMounts"]}[root]
        claim = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["persistentVolumeClaim"]
        assert mount["readOnly"] is True and claim["readOnly"] is True, name
        assert claim["claimName"] == "vps-catalogue", name
        if name != "head":
            assert params["out"] not in {m["mountPath"] for m in c["volumeMounts"]}, name  # shards come back


def test_the_head_reads_the_catalogue_database_from_the_one_secret() -> None:
    [container] = pods(rayjob())["head"]["spec"]["containers"]
    ref = env_of(container)["VPS_CATALOGUE_URL"]["valueFrom"]["secretKeyRef"]
    assert {"name": ref["name"], "key": ref["key"]} == CATALOGUE_SECRET and ref["optional"] is False


def test_worker_cpus_fit_the_actors_the_entrypoint_asks_for() -> None:
    job = rayjob()
    params = entrypoint(job)
    threads, workers = int(params["ray_threads"]), int(params["ray_workers"])
    cpus = 0
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        [c] = group["template"]["spec"]["containers"]
        per_pod = int(group["rayStartParams"]["num-cpus"])
        assert per_pod == int(c["resources"]["limits"]["cpu"]), group["groupName"]  # Ray schedules what it gets
        assert per_pod % threads == 0, group["groupName"]
        cpus += per_pod * group["replicas"]
    assert cpus >= workers * threads, "actors that could never be scheduled"


def test_every_ray_pod_passes_the_restricted_pod_security_standard() -> None:
    for name, template in pods(rayjob()).items():
        pod = template["spec"]
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for c in pod["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], name
            assert csc["readOnlyRootFilesystem"] is True, name


def test_the_image_is_the_dockerfiles_ray_build_target_with_the_model_it_names() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stage = re.search(r"^FROM \S+ AS ray-build\n(.*?)(?=^FROM )", dockerfile, re.S | re.M)
    assert stage, "no ray-build stage in the Dockerfile"
    job = rayjob()
    model = shlex.split(job["spec"]["entrypoint"])
    model_dir = next(a.split("=", 1)[1] for a in model if a.startswith("--model="))
    assert re.search(rf"^COPY \S+ {re.escape(model_dir)}$", stage.group(1), re.M), model_dir
    assert "[ray]" in stage.group(1)
    ray_version = job["spec"]["rayClusterSpec"]["rayVersion"]
    assert f"rayproject/ray:{ray_version}-" in stage.group(0)
    for template in pods(job).values():
        assert template["spec"]["containers"][0]["image"].split("/")[-1].startswith("vps-ray-build:")
    assert Path(ROOT / model_dir.removeprefix("/srv/")).is_dir()
