"""Markdown table of `vps train` runs' per-epoch validation figures, side by side.

python scripts/training_table.py /work/runs/ms /work/runs/proxy_anchor > docs/training_runs.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    runs = [Path(p) for p in sys.argv[1:]]
    histories = {r.name: json.loads((r / "history.json").read_text()) for r in runs}
    lines = [
        "| run | loss | epoch | train s | recall@1 | recall@5 | studio recall@1 | studio recall@5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, h in histories.items():
        for rec in h["history"]:
            lines.append(
                f"| {name} | {h['config']['loss']} | {rec['epoch']} | {rec['train_s']} | {rec.get('recall@1', '')} | "
                f"{rec.get('recall@5', '')} | {rec.get('studio_recall@1', '')} | {rec.get('studio_recall@5', '')} |"
            )
    lines.append("")
    for name, h in histories.items():
        best = h["best"]
        lines.append(
            f"- best of {name}: epoch {best['epoch']}, recall@1 {best['recall@1']}, recall@5 {best['recall@5']}"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
