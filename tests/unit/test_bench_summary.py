"""scripts/bench_summary.py (`make bench`): the comparison with the last committed figures, the flagging rule and
summary.md, on fixed numbers (no benchmark runs, no timing)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_summary.py"


@pytest.fixture(scope="module")
def bs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_summary", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_summary"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def figure(key: str = "search.p99_ms", value: float = 1.5, noise: float | None = 0.1, **kw: Any) -> dict[str, Any]:
    return {
        "key": key,
        "label": kw.get("label", "search 1M: p99 one thread"),
        "value": value,
        "noise": noise,
        "unit": kw.get("unit", "ms"),
        "better": kw.get("better", "lower"),
        "kind": kw.get("kind", "absolute"),
        "command": kw.get("command", "python scripts/bench_search.py --n 1000000"),
        "noise_from": kw.get("noise_from", "standard deviation of 3 repeats"),
    }


# --- the rule ------------------------------------------------------------------------------------------------------
def test_a_change_within_the_combined_noise_is_not_flagged(bs: ModuleType) -> None:
    # threshold 3 x sqrt(0.1^2 + 0.1^2) = 0.424
    cmp = bs.compare(figure(value=1.9), figure(value=1.5))
    assert cmp["threshold"] == pytest.approx(3 * math.sqrt(0.02))
    assert cmp["change"] == pytest.approx(0.4) and cmp["relative"] == pytest.approx(0.4 / 1.5)
    assert cmp["flag"] == ""


def test_a_change_beyond_it_is_flagged_worse_or_better_by_the_figures_direction(bs: ModuleType) -> None:
    assert bs.compare(figure(value=2.0), figure(value=1.5))["flag"] == "worse"  # latency up
    assert bs.compare(figure(value=1.0), figure(value=1.5))["flag"] == "better"
    qps = {"key": "search.qps", "better": "higher", "unit": "/s"}  # threshold 3 x sqrt(10^2 + 20^2) = 67
    assert bs.compare(figure(value=900, noise=10, **qps), figure(value=1000, noise=20, **qps))["flag"] == "worse"
    assert bs.compare(figure(value=1100, noise=10, **qps), figure(value=1000, noise=20, **qps))["flag"] == "better"
    assert bs.compare(figure(value=1050, noise=10, **qps), figure(value=1000, noise=20, **qps))["flag"] == ""


def test_the_multiple_is_the_rules(bs: ModuleType) -> None:
    new, old = figure(value=1.75, noise=0.1), figure(value=1.5, noise=0.0)
    assert bs.compare(new, old, multiple=3)["flag"] == ""  # 0.25 < 3 x 0.1
    assert bs.compare(new, old, multiple=2)["flag"] == "worse"
    assert bs.MULTIPLE == 3


def test_no_last_figure_no_noise_and_another_command(bs: ModuleType) -> None:
    assert bs.compare(figure(), None) == {
        "old": None,
        "old_noise": None,
        "change": None,
        "relative": None,
        "threshold": None,
        "flag": "new",
    }
    assert bs.compare(figure(noise=None), figure())["flag"] == "no noise estimate"
    other = figure(value=3.0, command="python scripts/bench_search.py --n 100000")
    assert bs.compare(figure(), other)["flag"] == "better (command differs)"
    assert bs.compare(figure(), figure(command="other"))["flag"] == "(command differs)"


def test_zero_noise_on_both_sides_flags_any_change(bs: ModuleType) -> None:
    assert bs.compare(figure(value=0.97, noise=0.0), figure(value=0.97, noise=0.0))["flag"] == ""
    recall = {"better": "higher", "unit": ""}
    assert bs.compare(figure(value=0.96, noise=0.0, **recall), figure(value=0.97, noise=0.0, **recall))["flag"] == (
        "worse"
    )


def test_a_baseline_of_the_other_mode_is_not_compared(bs: ModuleType) -> None:
    new = [figure(value=9.0)]
    full = {"mode": "full", "figures": [figure(value=1.5)]}
    assert bs.comparisons_against(new, full, "quick")["search.p99_ms"]["flag"] == "new"
    assert bs.comparisons_against(new, full, "full")["search.p99_ms"]["flag"] == "worse"
    assert bs.comparisons_against(new, None, "full")["search.p99_ms"]["flag"] == "new"
    # a figure the baseline does not have is new; one it has that this run lacks is not shown
    more = [figure(value=1.5), figure(key="embed.p50_ms", value=12.0)]
    assert bs.comparisons_against(more, full, "full")["embed.p50_ms"]["flag"] == "new"


# --- noise estimates -----------------------------------------------------------------------------------------------
def test_noise_helpers(bs: ModuleType) -> None:
    assert bs.spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert bs.spread([5.0]) is None and bs.spread([]) is None
    assert bs.combined(3.0, 4.0) == pytest.approx(5.0)
    assert bs.combined(3.0, None) is None
    # a / b = 2 with 10 % and 5 % relative noise: 2 x sqrt(0.01 + 0.0025)
    assert bs.ratio_noise(2.0, 100.0, 10.0, 50.0, 2.5) == pytest.approx(2 * math.sqrt(0.0125))
    assert bs.ratio_noise(2.0, 100.0, None, 50.0, 2.5) is None
    assert bs.median([3.0, 1.0, 2.0]) == 2.0 and bs.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert bs.block_medians([1, 2, 3, 10, 11, 12, 20, 21, 22, 99], 3) == [2, 11, 21]  # the remainder is left out


def test_numbers_are_formatted_to_three_significant_figures(bs: ModuleType) -> None:
    values = (1788.4, 279.26, 14.614, 1.5, 0.9, 0.968, 0.00123, 0.0, -0.5)
    assert [bs.fmt(v) for v in values] == ["1,788", "279", "14.6", "1.50", "0.900", "0.968", "0.00123", "0", "-0.500"]
    assert [bs.fmt_noise(n) for n in (870.4, 22.2, 8.44, 0.1, 0.0025, 0.0)] == [
        "870",
        "22",
        "8.4",
        "0.10",
        "0.0025",
        "0",
    ]
    assert bs.with_noise(0.968, 0.0025, "") == "0.968 ± 0.0025"
    assert bs.with_noise(1.39, 0.1, "ms") == "1.39 ± 0.10 ms"
    assert bs.with_noise(1.39, None, "ms") == "1.39 ms"
    assert bs.with_noise(None, None, "ms") == "-"


# --- summary.md ----------------------------------------------------------------------------------------------------
def summary(bs: ModuleType) -> dict[str, Any]:
    figures = [
        figure(
            "service.c4.ratio",
            0.9,
            0.02,
            label="service c4: HTTP / in-process",
            unit="x",
            better="higher",
            kind="side by side",
            command="python scripts/bench_service.py",
            noise_from="4 rounds",
        ),
        figure(
            "search.recall@10",
            0.968,
            0.0025,
            label="search 1M: recall@10",
            unit="",
            better="higher",
            kind="machine-independent",
            noise_from="standard error over the queries",
        ),
        figure("search.p99_ms", 2.0, 0.1),
        figure("embed.p50_ms", 12.0, None, label="embed: p50", command="embed_latency"),
    ]
    baseline = {
        "mode": "full",
        "figures": [
            figure("service.c4.ratio", 1.0, 0.03, command="python scripts/bench_service.py"),
            figure("search.recall@10", 0.968, 0.0025),
            figure("search.p99_ms", 1.5, 0.1),
        ],
    }
    return {
        "mode": "full",
        "machine": {
            "cpu_model": "AMD EPYC",
            "cpus": 2,
            "memory_gib": 23.5,
            "load_average_at_start": "0.10 / 0.20 / 0.30",
            "python": "3.11.7",
        },
        "run": {
            "command": "python scripts/bench_summary.py --out docs/bench",
            "started": "2026-12-01 18:00 UTC",
            "commit": "abc1234",
            "wall_s": 840.0,
            "build_s": 120.0,
        },
        "baseline": "docs/bench/summary.json at HEAD (abc1234)",
        "figures": figures,
        "comparison": bs.comparisons_against(figures, baseline, "full"),
    }


def test_summary_md_has_one_table_per_kind_with_the_comparison(bs: ModuleType) -> None:
    md = bs.markdown(summary(bs))
    lines = md.splitlines()
    assert lines[0] == "# Headline benchmarks (`make bench`)"
    assert "AMD EPYC, 2 CPUs" in md and "Wall time 14.0 min, of which 2.0 min building cached indexes" in md
    assert "Last committed: docs/bench/summary.json at HEAD (abc1234)." in md
    assert "> 3 x sqrt(noise_this² + noise_last²)" in md
    headers = [line for line in lines if line.startswith("## ")]
    assert headers[:3] == [
        f"## Side by side ({bs.KINDS['side by side']})",
        f"## Machine-independent ({bs.KINDS['machine-independent']})",
        f"## Absolute ({bs.KINDS['absolute']})",
    ]
    assert lines.count("| figure | this run | last committed | change | flag |") == 3
    # 0.9 against 1.0: 0.1 is within 3 x sqrt(0.02^2 + 0.03^2) = 0.108
    assert "| service c4: HTTP / in-process | 0.900 ± 0.020 x | 1.00 ± 0.030 x | -0.100 (-10.0 %) |  |" in lines
    assert "| search 1M: recall@10 | 0.968 ± 0.0025 | 0.968 ± 0.0025 | +0 (+0.0 %) |  |" in lines
    assert "| search 1M: p99 one thread | 2.00 ± 0.10 ms | 1.50 ± 0.10 ms | +0.500 (+33.3 %) | **worse** |" in lines
    assert "| embed: p50 | 12.0 ms | - | - | new |" in lines


def test_summary_md_lists_how_each_noise_is_estimated_and_the_commands(bs: ModuleType) -> None:
    md = bs.markdown(summary(bs))
    noise = md.split("## Noise\n\n")[1].split("\n\n")[0].splitlines()
    assert noise == [
        "- service (HTTP / in-process): 4 rounds",
        "- search (recall@10): standard error over the queries",
        "- search (p99 one thread): standard deviation of 3 repeats",
        "- embed (p50): standard deviation of 3 repeats",
    ]
    commands = md.split("## Commands\n\n")[1].splitlines()
    assert commands == [
        "- `python scripts/bench_service.py`",
        "- `python scripts/bench_search.py --n 1000000`",
        "- `embed_latency`",
    ]


def test_a_negative_figure_changes_relative_to_its_size(bs: ModuleType) -> None:
    added = {"key": "startup.warm-restart.added_s", "unit": "s"}
    cmp = bs.compare(figure(value=-0.3, **added), figure(value=-0.5, **added))
    assert cmp["change"] == pytest.approx(0.2) and cmp["relative"] == pytest.approx(0.4)
    assert bs.change_text(cmp, "s") == "+0.200 (+40.0 %)"


def test_warnings_show_under_the_header(bs: ModuleType) -> None:
    s = {**summary(bs), "warnings": ["service: 4 thread(s) of bench_service.py died"]}
    md = bs.markdown(s)
    assert "\n\n**Warning**: service: 4 thread(s) of bench_service.py died\n" in md
    assert md.index("**Warning**") < md.index("**Rule**")
    assert "**Warning**" not in bs.markdown(summary(bs))


def test_the_command_column_flags_a_changed_setup(bs: ModuleType) -> None:
    s = summary(bs)
    s["comparison"] = bs.comparisons_against(
        s["figures"], {"mode": "full", "figures": [figure(value=1.0, noise=0.1, command="older")]}, "full"
    )
    assert "| **worse** (command differs) |" in bs.markdown(s)


# --- the baseline --------------------------------------------------------------------------------------------------
def test_the_baseline_outside_git_is_the_file_on_disk(bs: ModuleType, tmp_path: Path) -> None:
    assert bs.load_baseline(tmp_path) == (None, "none (first run)")
    (tmp_path / "summary.json").write_text(json.dumps({"mode": "full", "figures": [figure()]}))
    baseline, source = bs.load_baseline(tmp_path)
    assert baseline == {"mode": "full", "figures": [figure()]}
    assert "on disk before this run" in source
