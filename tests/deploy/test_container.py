"""The container, without a Docker engine: hadolint on the Dockerfile, and the Dockerfile's own install and
index-baking steps run here (the same scripts its RUN lines call), then the image's command served with the
image's environment and probed with the image's HEALTHCHECK command."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.service.config import SHIPPED_MODEL_DIR
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _stage(instructions: list[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    """One build stage's instructions: from its `FROM ... AS name` to the next FROM."""
    starts = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"] + [len(instructions)]
    for begin, end in itertools.pairwise(starts):
        if instructions[begin][1].lower().endswith(f" as {name}"):
            return instructions[begin:end]
    raise AssertionError(f"no stage {name!r} in the Dockerfile")


def _context(dest: Path) -> Path:
    """The build context as .dockerignore leaves it (allow-list)."""
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!") and not line.startswith("!*")
    ]
    for rel in allowed:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.container
def test_dockerfile_steps_install_bake_and_serve(tmp_path: Path) -> None:
    instructions = _instructions()
    runs = [json.loads(rest) for kw, rest in instructions if kw == "RUN" and rest.startswith("[")]
    scripts = [r for r in runs if r[0] == "sh"]
    assert [Path(r[1]).name for r in scripts] == ["install-app.sh", "build-demo-index.sh"]
    # The image that ships is the last stage, `runtime`; other stages (ray-build) have their own ENV.
    runtime = _stage(instructions, "runtime")
    assert instructions[-len(runtime) :] == runtime, "runtime must be the Dockerfile's last (default) stage"
    env_line = next(rest for kw, rest in runtime if kw == "ENV")
    image_env = dict(re.findall(r"(\w+)=(\S+)", env_line))
    healthcheck = json.loads(next(rest for kw, rest in runtime if kw == "HEALTHCHECK").split("CMD", 1)[1])
    command = json.loads(next(rest for kw, rest in runtime if kw == "CMD"))
    entrypoint = json.loads(next(rest for kw, rest in runtime if kw == "ENTRYPOINT"))

    # Map the image's paths (/opt/vps, /src, /srv/...) into tmp_path and run the same scripts.
    context = _context(tmp_path / "src")
    prefix, index_dir = tmp_path / "opt-vps", tmp_path / "srv" / "index_data"
    paths = {"/opt/vps": str(prefix), "/src": str(context), "/srv/index_data": str(index_dir)}
    for argv in scripts:
        argv = [paths.get(a, a) for a in argv]
        subprocess.run(argv, cwd=context, check=True, timeout=1200)
    site = next(prefix.glob("lib/python*/site-packages"))
    assert not (site / "torch").exists(), "torch must stay out of the serving install"

    port = free_port()
    env = {
        "PATH": f"{prefix / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONDONTWRITEBYTECODE": image_env["PYTHONDONTWRITEBYTECODE"],
        "VPS_MODEL_DIR": str(context / "models" / Path(image_env["VPS_MODEL_DIR"]).name),
        "VPS_INDEX_DIR": str(index_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "tmp" / "vps-metrics"),
    }
    argv = [*entrypoint, *command[:-4], "--host", "127.0.0.1", "--port", str(port)]
    assert command[-4:] == ["--host", "0.0.0.0", "--port", "8000"]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        probe = [str(prefix / "bin" / "python"), *healthcheck[1:]]
        probe[-1] = probe[-1].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while subprocess.run(probe, capture_output=True, check=False).returncode != 0:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the HEALTHCHECK command never passed"
            time.sleep(0.5)
        query = context / "examples" / "grocery" / "images"
        photo = next(query.glob("val/**/*.jpg"))
        r = httpx.post(f"http://127.0.0.1:{port}/search?k=3", files={"image": photo.read_bytes()}, timeout=30)
        assert r.status_code == 200 and r.json()["results"], r.text
        assert r.json()["model"]["name"] == SHIPPED_MODEL_DIR.name
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.access(index_dir / "CURRENT", os.R_OK)
