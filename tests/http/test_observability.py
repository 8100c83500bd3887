"""docker-compose.yml, Prometheus and Grafana files hang together, and every metric (and label) the dashboard and
the alert rules query is exported by a running app; route labels stay bounded, and 404s are logged with their
path."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import httpx
import pytest
import yaml

from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import encode, live_server, product_image

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/vps.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
_METRIC = re.compile(r"\b(vps_[a-z_]+)(\{[^}]*\})?")
_LABEL = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_EXACT = re.compile(r'([a-z_]+)\s*=\s*"([^"]*)"')


def queries() -> list[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        exprs += [rule["expr"] for rule in group["rules"]]
    return exprs


def test_compose_wires_the_service_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"vps", "index", "postgres", "prometheus", "grafana"}
    vps = services["vps"]
    assert vps["read_only"] is True and vps["tmpfs"] == ["/tmp"] and vps["cap_drop"] == ["ALL"]  # noqa: S108
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            host, _container, _ = volume.split(":")
            assert (ROOT / host).exists(), f"{name} mounts {host}, which is not in the repository"
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted
    target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == "vps:" + vps["ports"][0].split(":")[1]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/vps.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert any(v.split(":")[1] == dash_dir for v in services["grafana"]["volumes"])
    source = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert {p["datasource"]["uid"] for p in panels} == {uid}
    titles = " ".join(p["title"].lower() for p in panels)
    for needed in ("request rate", "error rate", "p99", "stage", "in flight", "rejections", "router", "shards",
                   "index items", "build info", "shadow miss rate", "shadow samples", "top score",
                   "no-match"):  # fmt: skip
        assert needed in titles, needed


def test_every_queried_metric_and_label_is_exported(faiss_index: Path, tiny_model: Path) -> None:
    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0)
    with live_server(create_app(settings)) as base:
        # Traffic of every kind the panels show: searches, a bad request, a not-found.
        for sku in ("red-apple", "green-apple"):
            assert httpx.post(f"{base}/search", content=encode(product_image(sku, 9))).status_code == 200
        assert httpx.post(f"{base}/search", content=b"not an image").status_code == 415
        text = httpx.get(f"{base}/metrics").text
    samples: dict[str, set[str]] = {}
    values: dict[str, set[tuple[str, str]]] = {}  # label values, for exact-match selectors
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, labels = line.partition("{")
            name = name.split(" ")[0]
            samples.setdefault(name, set()).update(re.findall(r'([a-z_]+)="', labels))
            values.setdefault(name, set()).update(re.findall(r'([a-z_]+)="([^"]*)"', labels))

    checked = 0
    for expr in queries():
        metrics = _METRIC.findall(expr)
        for metric, selector in metrics:
            assert metric in samples, f"{metric} (queried by {expr!r}) is not exported"
            unknown = set(_LABEL.findall(selector)) - samples[metric]
            assert not unknown, f"{metric}: selector labels {unknown} are not exported"
            # A misspelt value (outcome="top1_miss") would match nothing, silently: bounded label values are
            # exported from the start, so every exact match must find one.
            absent = set(_EXACT.findall(selector)) - values[metric]
            assert not absent, f"{metric}: selector values {absent} are not exported"
            checked += 1
        exported = set().union(*(samples[m] for m, _ in metrics))
        by_labels = {x.strip() for group in _BY.findall(expr) for x in group.split(",") if x.strip()}
        assert by_labels <= exported, f"{expr!r} groups by {by_labels - exported}, which no metric in it has"
    assert checked >= 20


def test_docs_and_schema_have_their_own_route_label(faiss_index: Path, tiny_model: Path) -> None:
    """FastAPI's own pages are plain routes that leave no route in the scope: they were counted as "unmatched",
    with the 404s."""
    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0)
    with live_server(create_app(settings)) as base:
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(f"{base}{path}").status_code == 200
        assert httpx.get(f"{base}/no-such-route").status_code == 404
        assert httpx.get(f"{base}/docs/no-such-page").status_code == 404
        text = httpx.get(f"{base}/metrics").text
    assert 'vps_requests_total{route="/docs",status="200"} 1.0' in text
    assert 'vps_requests_total{route="/openapi.json",status="200"} 1.0' in text
    assert 'vps_request_duration_seconds_count{route="/docs"} 1.0' in text
    assert 'vps_requests_total{route="unmatched",status="404"} 2.0' in text  # path labels stay bounded


def test_a_404_is_logged_with_its_path(
    faiss_index: Path, tiny_model: Path, catalogue: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, catalogue_images_dir=catalogue.parent
    )
    with caplog.at_level(logging.INFO, logger="app.access"), live_server(create_app(settings)) as base:
        assert httpx.get(f"{base}/favicon.png").status_code == 404
        assert httpx.get(f"{base}/v1/catalogue-images/20000101T000000Z-00000000/0").status_code == 404
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/{'x' * 5000}").status_code == 404
    logged = [(r.route, r.status, getattr(r, "path", None)) for r in caplog.records if r.name == "app.access"]
    assert ("unmatched", 404, "/favicon.png") in logged
    assert ("/v1/catalogue-images/{version}/{row}", 404, "/v1/catalogue-images/20000101T000000Z-00000000/0") in logged
    assert ("unmatched", 404, "/" + "x" * 255) in logged  # bounded: 256 characters
    assert ("/healthz", 200, None) in logged  # matched and found: the template says it all
