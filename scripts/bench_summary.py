"""The headline figures in one command (`make bench`): re-measure them, write <out>/summary.json and summary.md, and
print each beside the last committed one, flagging changes beyond the run-to-run noise.

    python scripts/bench_summary.py --out docs/bench   # make bench: full sizes, ~10 min here + a first run's builds
    python scripts/bench_summary.py --quick            # tiny sizes, about a minute: checks the machinery
    python scripts/bench_summary.py --build-only       # the cached 1M indexes ahead (30+ min here), no measurement

Parts, each an existing script run as a subprocess (its JSON goes under --work, never over docs/bench), or one of
its functions:
1. search at 1M vectors (bench_search.py): the service's path (routed, memory-mapped faiss HNSW shards) on the
   powerlaw data, recall@10, single-query p50/p99, 2-thread QPS and its ratio to the exact scan's;
2. the service (bench_service.py, default configuration): HTTP and in-process throughput and their ratio at
   concurrency 1 and 4, in interleaved rounds;
3. start-up (bench_startup.py): `vps serve` to ready with a 1M-vector index, warm and cold page cache, first start
   and restart, and what the 1M index adds to the demo index's start measured beside it;
4. embed latency (compare_models.embed_latency): the shipped model, batch 1, one intra-op thread.

Noise: each figure carries its own estimate from this run: the standard deviation across the script's rounds or
repeats (search timings: --repeats; service: rounds; start-up: repeated starts; embed: medians of consecutive
blocks of calls), for recall@10 its standard error over the queries, propagated for ratios and differences. A
change is flagged when |this run - last| > MULTIPLE x sqrt(noise_this^2 + noise_last^2).
The baseline is <out>/summary.json as committed at HEAD (`git show`), else the file on disk before this run; a
baseline of the other mode (--quick against full) is not compared. Cached indexes live under --work
(default .bench-cache/, gitignored): a first run builds them (or --build-only, ahead), and that time is reported
apart from the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.service.config import SHIPPED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# The shipped default. The committed baseline (docs/bench/summary.json) was measured with grocery-lite0-ms512, the
# default before issue 20's resize: the next run compares the new default against it and flags the change.
MODEL = f"models/{SHIPPED_MODEL_DIR.name}"
MULTIPLE = 3.0  # a change is flagged beyond this many combined standard deviations

# Sizes per mode. Full: the figures of docs/benchmarks.md at the sizes there, timings shortened to fit ~15 min.
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "search": {"n": 1_000_000, "categories": 100, "queries": 1000, "exact_queries": 50, "repeats": 3},
        "service": {"seconds": 16, "rounds": 4},
        "startup": {"items": 1_000_000, "categories": 100, "repeats": 3},
        "embed": {"rounds": 500, "blocks": 5},
    },
    "quick": {
        "search": {"n": 10_000, "categories": 10, "queries": 200, "exact_queries": 20, "repeats": 2},
        "service": {"seconds": 2, "rounds": 2},
        "startup": {
            "items": 10_000,
            "categories": 10,
            "repeats": 2,
            "scenarios": ["warm, restart", "cold, first start"],
        },
        "embed": {"rounds": 50, "blocks": 5},
    },
}
EF, PROBE_MASS = 128, 0.9  # the search setting reported (M16/efC80 build: recall@10 0.968 at p99 1.50 ms)
KINDS = {  # figure kinds, in the order summary.md shows them
    "side by side": "measured side by side in this run: the figures to trust on a shared machine",
    "machine-independent": "does not depend on the machine's speed",
    "absolute": "absolute time or throughput on this machine: moves with its load",
}


@dataclass
class Figure:
    key: str
    label: str
    value: float
    noise: float | None  # one standard deviation, same unit; None: no estimate (a single round)
    unit: str
    better: str  # "higher" or "lower"
    kind: str  # a key of KINDS
    command: str
    noise_from: str


# --- noise ---------------------------------------------------------------------------------------------------------
def spread(values: list[float]) -> float | None:
    """Sample standard deviation; None for fewer than 2 values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def combined(*noises: float | None) -> float | None:
    """Root sum of squares; None when any is unknown."""
    if any(n is None for n in noises):
        return None
    return math.sqrt(sum(n * n for n in noises if n is not None))


def ratio_noise(ratio: float, a: float, sa: float | None, b: float, sb: float | None) -> float | None:
    """Standard deviation of a / b from theirs (first-order propagation, independent errors)."""
    rel = combined(None if sa is None else sa / a, None if sb is None else sb / b)
    return None if rel is None else abs(ratio) * rel


def block_medians(values: list[float], blocks: int) -> list[float]:
    size = max(1, len(values) // blocks)
    return [median(values[i : i + size]) for i in range(0, size * blocks, size) if values[i : i + size]]


# --- comparison and markdown ---------------------------------------------------------------------------------------
def compare(new: dict[str, Any], old: dict[str, Any] | None, multiple: float = MULTIPLE) -> dict[str, Any]:
    """This run's figure against the last one: the change, the threshold (multiple x combined noise) and a flag:
    "" within the noise, "better"/"worse" beyond it, "new" without a last figure, "no noise estimate" when either
    lacks one. "(command differs)" is added when the figure was produced by another command."""
    if old is None:
        return {"old": None, "old_noise": None, "change": None, "relative": None, "threshold": None, "flag": "new"}
    change = new["value"] - old["value"]
    relative = change / abs(old["value"]) if old["value"] else None
    noise = combined(new["noise"], old["noise"])
    threshold = None if noise is None else multiple * noise
    if threshold is None:
        flag = "no noise estimate"
    elif abs(change) > threshold:
        flag = "better" if (change > 0) == (new["better"] == "higher") else "worse"
    else:
        flag = ""
    if old.get("command") != new["command"]:
        flag = f"{flag} (command differs)".strip()
    return {
        "old": old["value"],
        "old_noise": old["noise"],
        "change": change,
        "relative": relative,
        "threshold": threshold,
        "flag": flag,
    }


def fmt(value: float | None) -> str:
    """Three significant figures (whole numbers from 100 on, thousands separated)."""
    if value is None:
        return ""
    size = abs(value)
    if size == 0:
        return "0"
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    return f"{value:.{2 - math.floor(math.log10(size))}f}"


def fmt_noise(noise: float) -> str:
    """Two significant figures (whole numbers from 10 on)."""
    if noise == 0 or noise >= 10:
        return f"{noise:,.0f}"
    return f"{noise:.{1 - math.floor(math.log10(noise))}f}"


def with_noise(value: float | None, noise: float | None, unit: str) -> str:
    if value is None:
        return "-"
    text = fmt(value) + (f" ± {fmt_noise(noise)}" if noise is not None else "")
    return f"{text} {unit}".strip()


def change_text(cmp: dict[str, Any], unit: str) -> str:
    if cmp["change"] is None:
        return "-"
    text = f"{'+' if cmp['change'] >= 0 else '-'}{fmt(abs(cmp['change']))}"
    if cmp["relative"] is not None:
        text += f" ({cmp['relative'] * 100:+.1f} %)"
    return text


def flag_text(flag: str) -> str:
    head = flag.split(" (")[0]
    return flag.replace(head, f"**{head}**", 1) if head in ("better", "worse") else flag


def table(figures: list[dict[str, Any]], comparisons: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| figure | this run | last committed | change | flag |", "|---|---|---|---|---|"]
    for f in figures:
        c = comparisons[f["key"]]
        lines.append(
            f"| {f['label']} | {with_noise(f['value'], f['noise'], f['unit'])} "
            f"| {with_noise(c['old'], c['old_noise'], f['unit'])} | {change_text(c, f['unit'])} "
            f"| {flag_text(c['flag'])} |"
        )
    return lines


def markdown(summary: dict[str, Any], multiple: float = MULTIPLE) -> str:
    """summary.md: the run, the rule, one table per kind of figure, how each noise is estimated, the commands."""
    m, run = summary["machine"], summary["run"]
    figures, comparisons = summary["figures"], summary["comparison"]
    lines = [
        "# Headline benchmarks (`make bench`)",
        "",
        f"`{run['command']}` ({summary['mode']} mode), {run['started']}: {m['cpu_model']}, {m['cpus']} CPUs, "
        f"{m['memory_gib']} GiB, load average {m['load_average_at_start']} at the start; Python {m['python']}; "
        f"commit {run['commit']}. Wall time {run['wall_s'] / 60:.1f} min, of which {run['build_s'] / 60:.1f} min "
        "building cached indexes (not part of any figure).",
        "",
        f"Last committed: {summary['baseline']}.",
        *[f"\n**Warning**: {w}" for w in summary.get("warnings", [])],
        "",
        f"**Rule**: a change is flagged (better / worse) when |this run - last committed| > {multiple:g} x "
        "sqrt(noise_this² + noise_last²), each noise being that figure's own run-to-run standard deviation "
        "(± below) estimated from this run; otherwise the change is within the noise and the flag is empty.",
    ]
    for kind, text in KINDS.items():
        rows = [f for f in figures if f["kind"] == kind]
        if rows:
            lines += ["", f"## {kind[0].upper()}{kind[1:]} ({text})", "", *table(rows, comparisons)]
    lines += ["", "## Noise", "", *noise_lines(figures)]
    lines += ["", "## Commands", ""]
    lines += [f"- `{c}`" for c in dict.fromkeys(f["command"] for f in figures)]
    return "\n".join(lines) + "\n"


def noise_lines(figures: list[dict[str, Any]]) -> list[str]:
    """How each figure's noise was estimated: one line per part and estimate, naming the figures it covers."""
    groups: dict[tuple[str, str], list[str]] = {}
    for f in figures:
        what = groups.setdefault((f["key"].split(".")[0], f["noise_from"]), [])
        name = f["label"].rsplit(": ", 1)[-1]
        if name not in what:
            what.append(name)
    return [f"- {part} ({', '.join(names)}): {how}" for (part, how), names in groups.items()]


def load_baseline(out: Path) -> tuple[dict[str, Any] | None, str]:
    """The summary.json committed at HEAD, else the one on disk (read before this run overwrites it)."""
    path = out.resolve() / "summary.json"
    try:
        rel = path.relative_to(ROOT).as_posix()
        shown = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True, check=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return json.loads(shown.stdout), f"{rel} at HEAD ({head.stdout.strip()})"
    except (ValueError, subprocess.CalledProcessError, OSError):
        pass
    if path.is_file():
        return json.loads(path.read_text()), f"{path} on disk before this run (not committed)"
    return None, "none (first run)"


def comparisons_against(
    figures: list[dict[str, Any]], baseline: dict[str, Any] | None, mode: str
) -> dict[str, dict[str, Any]]:
    old = {} if baseline is None or baseline.get("mode") != mode else {f["key"]: f for f in baseline["figures"]}
    return {f["key"]: compare(f, old.get(f["key"])) for f in figures}


# --- the parts -----------------------------------------------------------------------------------------------------
class Runner:
    """Runs the parts' scripts with their output in <work>/logs, and remembers how long each took."""

    def __init__(self, work: Path, mode: str) -> None:
        self.work, self.mode = work, mode
        self.raw = work / f"raw-{mode}"
        self.logs = work / "logs"
        self.raw.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.steps: dict[str, dict[str, float]] = {}
        self.warnings: list[str] = []

    def script(self, part: str, script: str, args: list[str], read: bool = True) -> tuple[dict[str, Any], str]:
        """Run scripts/<script> with `args` (paths relative to the repository); returns its JSON (unless not
        `read`) and the command."""
        command = shlex.join(["python", f"scripts/{script}", *args])
        log = self.logs / f"{self.mode}-{part}.log"
        print(f"  {command}\n  (output: {log})", flush=True)
        t0 = time.perf_counter()
        with log.open("w") as out:
            done = subprocess.run(
                [sys.executable, str(SCRIPTS / script), *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        self.steps[part] = {"wall_s": round(time.perf_counter() - t0, 1), "build_s": 0.0}
        if done.returncode != 0:
            tail = log.read_text().splitlines()[-30:]
            raise SystemExit(f"{command} exited {done.returncode}; last lines of {log}:\n" + "\n".join(tail))
        failed = log.read_text().count("Exception in thread")
        if failed:  # e.g. bench_service's client threads stop at a 503: the figures then miss their requests
            self.warnings.append(f"{part}: {failed} thread(s) of {script} died (see {self.rel(log)}): doubtful figures")
            print(f"  WARNING: {self.warnings[-1]}", flush=True)
        if not read:
            return {}, command
        stem = script.removesuffix(".py")
        return json.loads((self.raw / f"{stem}.json").read_text()), command

    def rel(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(ROOT).as_posix()
        except ValueError:
            return str(path)


def search_args(run: Runner, size: dict[str, Any]) -> list[str]:
    return [
        *("--n", str(size["n"]), "--categories", str(size["categories"]), "--data", "powerlaw"),
        *("--skip", "hnswlib", "global", "ivf", "--ef", str(EF), "--probe-mass", str(PROBE_MASS)),
        *("--queries", str(size["queries"]), "--qps-queries", str(size["queries"])),
        *("--exact-queries", str(size["exact_queries"]), "--repeats", str(size["repeats"])),
        *("--work", run.rel(run.work / "search"), "--out", run.rel(run.raw)),
    ]


def startup_args(run: Runner, size: dict[str, Any]) -> list[str]:
    return [
        *("--items", str(size["items"]), "--categories", str(size["categories"]), "--repeats", str(size["repeats"])),
        *("--model", MODEL, "--work", run.rel(run.work / "startup"), "--out", run.rel(run.raw)),
        *(["--scenarios", *size["scenarios"]] if "scenarios" in size else []),
        *("--verify", "background"),  # the service's default (VPS_VERIFY_SHARDS)
    ]


def build_caches(run: Runner, sizes: dict[str, Any], wanted: list[str]) -> None:
    """Build (and cache) the large indexes ahead, measuring nothing: what a first run would otherwise spend."""
    for part, script, args in (
        ("search", "bench_search.py", search_args(run, sizes["search"])),
        ("startup", "bench_startup.py", startup_args(run, sizes["startup"])),
    ):
        if part in wanted:
            print(f"building the cached index of {part}", flush=True)
            run.script(part, script, [*args, "--build-only"], read=False)
            print(f"  {run.steps[part]['wall_s']:.0f} s", flush=True)


def part_search(run: Runner, size: dict[str, Any]) -> list[Figure]:
    work = run.work / "search"
    before = set(work.glob("*/build.json"))
    data, command = run.script("search", "bench_search.py", search_args(run, size))
    built = set(work.glob("*/build.json")) - before  # cached_build's markers: new ones were built by this run
    run.steps["search"]["build_s"] = sum(json.loads(m.read_text())["build_s"] for m in built)
    rows = {r["method"]: r for r in data["results"][0]["settings"]}
    routed, exact = rows["routed-faiss-hnsw-mmap"], rows["exact"]
    what = f"search {size['n'] / 1e6:g}M powerlaw vectors (routed HNSW mmap, M16/efC80, ef {EF})"
    repeats = f"standard deviation of {size['repeats']} repeats over the same {size['queries']} queries"

    def timing(key: str, label: str, unit: str, better: str) -> Figure:
        values = routed.get("repeats", {}).get(key, [routed[key]])
        noise = spread(values)
        return Figure(
            f"search.{key}", f"{what}: {label}", routed[key], noise, unit, better, "absolute", command, repeats
        )

    qps, exact_qps = routed["qps_2_threads"], exact["qps_2_threads"]
    qps_noise = spread(routed.get("repeats", {}).get("qps_2_threads", []))
    exact_noise = spread(exact.get("repeats", {}).get("qps_2_threads", []))
    return [
        Figure(
            key="search.recall@10",
            label=f"{what}: recall@10",
            value=routed["recall@10"],
            noise=routed.get("recall_se"),
            unit="",
            better="higher",
            kind="machine-independent",
            command=command,
            noise_from=f"standard error over the {size['queries']} queries (the search is deterministic)",
        ),
        timing("p50_ms", "p50 one thread", "ms", "lower"),
        timing("p99_ms", "p99 one thread", "ms", "lower"),
        timing("qps_2_threads", "QPS 2 threads", "/s", "higher"),
        Figure(
            key="search.qps_x_exact",
            label=f"{what}: QPS / the exact scan's QPS",
            value=qps / exact_qps,
            noise=ratio_noise(qps / exact_qps, qps, qps_noise, exact_qps, exact_noise),
            unit="x",
            better="higher",
            kind="side by side",
            command=command,
            noise_from=f"the two QPS' repeat spreads, propagated (exact scan: {size['exact_queries']} queries)",
        ),
    ]


def part_service(run: Runner, size: dict[str, Any]) -> list[Figure]:
    args = [
        *("--seconds", str(size["seconds"]), "--rounds", str(size["rounds"]), "--concurrency", "1", "4"),
        *("--only", "shipped model, intra 1, pool 3", "--per-round"),
        *("--work", run.rel(run.work / "service"), "--out", run.rel(run.raw)),
    ]
    data, command = run.script("service", "bench_service.py", args)
    cfg = data["results"][0]
    rounds = f"standard deviation of {size['rounds']} interleaved rounds of {size['seconds'] / size['rounds']:g} s"
    figures = []
    for ip, ht in zip(cfg["in_process"], cfg["http"], strict=True):
        c = ip["concurrency"]
        what = f"service ({Path(MODEL).name}, default config), concurrency {c}"
        common = {"better": "higher", "command": command}
        figures += [
            Figure(
                key=f"service.c{c}.ratio",
                label=f"{what}: HTTP / in-process throughput",
                value=ht["ratio_to_in_process"],
                noise=spread(ht["ratio_rounds"]),
                unit="x",
                kind="side by side",
                noise_from=f"{rounds}, of each round's ratio (the figure: their median)",
                **common,
            ),
            *(
                Figure(
                    key=f"service.c{c}.{side}_per_s",
                    label=f"{what}: {name}",
                    value=row["per_s"],
                    noise=spread(row["per_s_rounds"]),
                    unit="/s",
                    kind="absolute",
                    noise_from=rounds,
                    **common,
                )
                for side, row, name in (("http", ht, "HTTP requests/s"), ("in_process", ip, "in-process searches/s"))
            ),
        ]
    return figures


def part_startup(run: Runner, size: dict[str, Any]) -> list[Figure]:
    data, command = run.script("startup", "bench_startup.py", startup_args(run, size))
    build_s = float(data["synthetic_build_s"])
    run.steps["startup"]["build_s"] = build_s if build_s > 1 else 0.0  # a cached index: just its CURRENT read
    demo, big = (data["indexes"][name]["runs"] for name in data["indexes"])
    what = f"start-up to ready, {size['items'] / 1e6:g}M-vector index"
    starts = f"standard deviation of {size['repeats']} starts"
    figures = []
    for scenario in big:  # the scenarios measured, in the script's order
        key = scenario.split(" · ")[0].replace(", ", "-").replace(" start", "")  # "cold, first start · background"
        big_walls = [r["wall_to_ready_s"] for r in big[scenario]["all"]]
        demo_walls = [r["wall_to_ready_s"] for r in demo[scenario]["all"]]
        wall = big[scenario]["median"]["wall_to_ready_s"]
        common = {"unit": "s", "better": "lower", "command": command}
        figures += [
            Figure(
                key=f"startup.{key}.wall_s",
                label=f"{what}, {scenario}: wall to ready",
                value=wall,
                noise=spread(big_walls),
                kind="absolute",
                noise_from=f"{starts} (the figure: their median)",
                **common,
            ),
            Figure(
                key=f"startup.{key}.added_s",
                label=f"{what}, {scenario}: added to the demo index's start",
                value=round(wall - demo[scenario]["median"]["wall_to_ready_s"], 3),
                noise=combined(spread(big_walls), spread(demo_walls)),
                kind="side by side",
                noise_from=f"{starts} of each index, combined",
                **common,
            ),
        ]
    return figures


def part_embed(run: Runner, size: dict[str, Any], dataset: Path) -> list[Figure]:
    sys.path.insert(0, str(SCRIPTS))
    from compare_models import embed_latency

    from app.offline.datasets.grocery import split_rows

    command = (
        f"scripts/compare_models.py embed_latency([{MODEL}], {dataset.name} val, rounds={size['rounds']}) "
        "(batch 1, 1 intra-op thread)"
    )
    print(f"  {command}", flush=True)
    t0 = time.perf_counter()
    times = embed_latency([Path(MODEL)], dataset, split_rows(dataset, "val"), size["rounds"])[Path(MODEL)]
    run.steps["embed"] = {"wall_s": round(time.perf_counter() - t0, 1), "build_s": 0.0}
    blocks = size["blocks"]
    return [
        Figure(
            key="embed.p50_ms",
            label=f"embed {Path(MODEL).name}, batch 1, one thread: p50",
            value=round(median(times), 3),
            noise=spread(block_medians(times, blocks)),
            unit="ms",
            better="lower",
            kind="absolute",
            command=command,
            noise_from=f"standard deviation of the medians of {blocks} blocks of {len(times) // blocks} calls in a row",
        ),
    ]


# --- the run -------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cpus": os.cpu_count(),
        "memory_gib": round(pages / 2**30, 1),
        "load_average_at_start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
    }


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def print_figures(figures: list[Figure], comparisons: dict[str, dict[str, Any]]) -> None:
    for f in figures:
        c = comparisons[f.key]
        flag = f"  <- {c['flag'].upper()}" if c["flag"] and c["flag"] != "new" else ""
        print(
            f"    {f.label}: {with_noise(f.value, f.noise, f.unit)}"
            f"  (last: {with_noise(c['old'], c['old_noise'], f.unit)}; change {change_text(c, f.unit)}){flag}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (about a minute): tests the machinery")
    ap.add_argument("--out", type=Path, default=None, help="summary.json/.md here (docs/bench; --quick: <work>/quick)")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench-cache", help="cached indexes, raw results, logs")
    ap.add_argument(
        "--dataset",
        type=Path,
        default=Path(os.environ.get("VPS_DATASET_DIR") or "../shared/datasets/grocery-store"),
        help="the grocery dataset (its val photos time the embedding); default $VPS_DATASET_DIR",
    )
    ap.add_argument(
        "--parts",
        nargs="+",
        choices=["embed", "service", "startup", "search"],
        default=None,
        help="only these parts (default: all); summary.json then holds only their figures",
    )
    ap.add_argument(
        "--build-only",
        action="store_true",
        help="build the cached indexes of search and start-up ahead (a first full run's 30+ min), measure nothing",
    )
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    out = args.out or (args.work / "quick" if args.quick else ROOT / "docs" / "bench")
    wanted = args.parts or ["embed", "service", "startup", "search"]
    if "startup" in wanted and not (ROOT / "index_data" / "CURRENT").exists():
        raise SystemExit("no demo index in index_data/ (bench_startup.py starts it beside the large one): `make bench`")
    if "embed" in wanted and not (args.dataset / "val.txt").is_file():
        raise SystemExit(f"{args.dataset} holds no grocery dataset (val.txt): set VPS_DATASET_DIR or --dataset")
    if args.build_only:
        build_caches(Runner(args.work, mode), SIZES[mode], wanted)
        return
    baseline, source = load_baseline(out)
    if baseline is not None and baseline.get("mode") != mode:
        source += f": its mode is {baseline.get('mode')}, this run's {mode}, so nothing is compared"
    print(f"bench_summary ({mode}): baseline {source}", flush=True)
    started, t0 = datetime.now(UTC), time.perf_counter()
    info = machine()
    run, sizes = Runner(args.work, mode), SIZES[mode]
    parts = {
        "embed": lambda: part_embed(run, sizes["embed"], args.dataset),
        "service": lambda: part_service(run, sizes["service"]),
        "startup": lambda: part_startup(run, sizes["startup"]),
        "search": lambda: part_search(run, sizes["search"]),
    }
    figures: list[Figure] = []
    for i, (name, part) in enumerate(parts.items(), 1):
        if name not in wanted:
            continue
        print(f"[{i}/{len(parts)}] {name}", flush=True)
        new = part()
        step = run.steps[name]
        print(f"  {step['wall_s']:.0f} s (of which building cached indexes {step['build_s']:.0f} s)", flush=True)
        print_figures(new, comparisons_against([asdict(f) for f in new], baseline, mode))
        figures += new
    rows = [asdict(f) for f in figures]
    summary = {
        "mode": mode,
        "rule": {"multiple": MULTIPLE, "text": "flagged when |new - old| > multiple x sqrt(noise_new^2 + noise_old^2)"},
        "machine": info,
        "run": {
            "command": shlex.join(["python", "scripts/bench_summary.py", *sys.argv[1:]]),
            "started": started.strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(),
            "wall_s": round(time.perf_counter() - t0, 1),
            "build_s": round(sum(s["build_s"] for s in run.steps.values()), 1),
            "steps": run.steps,
        },
        "baseline": source,
        "warnings": run.warnings,
        "figures": rows,
        "comparison": comparisons_against(rows, baseline, mode),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out / 'summary.json'} and summary.md", flush=True)


if __name__ == "__main__":
    main()
