"""deploy/prometheus/alerts.yml and the Grafana dashboard, without promtool or Grafana: rules are well formed and
each has a runbook in docs/deploy.md, the catalogue alerts' thresholds agree with the settings they watch, and the
dashboard's panels are laid out without overlap, on the provisioned data source, with a panel for every catalogue
metric the service exports. (tests/http/test_observability.py checks that every metric and label they query is
exported by a running app.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from app.service.config import Settings
from app.service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/vps.json"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
RUNBOOK = ROOT / "docs/deploy.md"
_THRESHOLD = re.compile(r"^(?P<query>.+?)\s*>\s*(?P<value>[0-9.e]+)$", re.S)


def rules() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] not in found, f"{rule['alert']}: defined twice"
            found[rule["alert"]] = rule
    return found


def panels() -> list[dict[str, Any]]:
    return list(json.loads(DASHBOARD.read_text())["panels"])


def test_every_alert_is_well_formed_and_has_a_runbook() -> None:
    runbook = RUNBOOK.read_text()
    for name, rule in rules().items():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, f"{name}: {set(rule)}"
        assert re.fullmatch(r"Vps[A-Z]\w+", name), name
        assert "for" not in rule or re.fullmatch(r"[0-9]+[smh]", rule["for"]), f"{name}: for {rule.get('for')}"
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["expr"].count("(") == rule["expr"].count(")"), f"{name}: unbalanced parentheses"
        assert f"`{name}`" in runbook or f"**`{name}`**" in runbook, f"{name}: no runbook in docs/deploy.md"


def _threshold(rule: dict[str, Any]) -> tuple[str, float]:
    m = _THRESHOLD.match(rule["expr"].strip())
    assert m, f"{rule['alert']}: not `query > threshold`: {rule['expr']!r}"
    return m["query"], float(m["value"])


def test_catalogue_alerts_watch_the_lag_and_the_delta_above_what_the_settings_allow() -> None:
    fields = Settings.model_fields
    lag = rules()["VpsCatalogueSyncLagging"]
    query, threshold = _threshold(lag)
    assert query == "vps_catalogue_sync_lag_seconds" and lag["for"] == "5m"  # per pod: which one lags
    max_sync_s = next(m.le for m in fields["sync_s"].metadata if hasattr(m, "le"))
    assert threshold == 10 and threshold >= 5 * max_sync_s  # a few missed polls are not an alert

    delta = rules()["VpsCatalogueDeltaLarge"]
    query, threshold = _threshold(delta)
    assert query == "max(vps_catalogue_delta_items)" and delta["for"] == "30m"
    # Above where a service compacts by itself: in normal operation the delta never gets there.
    assert threshold == 50_000 and threshold > fields["compact_above"].default


def test_dashboard_panels_are_laid_out_on_the_provisioned_data_source() -> None:
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    seen: set[tuple[int, int]] = set()
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels():
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & seen, f"{p['title']} overlaps another panel"
        seen |= cells
        assert p["datasource"]["uid"] == uid and {t["datasource"]["uid"] for t in p["targets"]} == {uid}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["fieldConfig"]["defaults"]["unit"] and p["description"], p["title"]


def test_every_catalogue_metric_has_a_panel_described_in_the_runbook() -> None:
    exported = {
        sample.name
        for family in Metrics().registry.collect()
        for sample in family.samples
        if sample.name.startswith("vps_catalogue_") and not sample.name.endswith("_created")
    }
    assert {"vps_catalogue_sync_lag_seconds", "vps_catalogue_compactions_total"} <= exported, exported
    exprs = " ".join(t["expr"] for p in panels() for t in p["targets"])
    missing = {name for name in exported if not re.search(rf"\b{name}\b", exprs)}
    assert not missing, f"no dashboard panel queries {sorted(missing)}"
    runbook = RUNBOOK.read_text()
    for p in panels():
        if "catalogue" in p["title"].lower():
            assert f"| {p['title']} |" in runbook, f"{p['title']}: not in docs/deploy.md's panel tables"
