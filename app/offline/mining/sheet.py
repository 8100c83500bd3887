"""The labelling queue as one self-contained HTML page (thumbnails inlined as data: URIs, no script, no network):
each queued photo beside the catalogue images it was nearest to, with the suggested SKU and why it was queued."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image

from app.errors import ServiceError
from app.offline.datasets.images import PhotoProblem, decode_photo, read_photo
from app.offline.mining.mine import Candidate

# A page opened from disk: nothing but its own inline styles and inlined images may load.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
THUMB = 160
NEAREST = 4

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5rem;color:#1b1f24}
h1{font-size:1.3rem}
.case{display:flex;gap:1rem;align-items:flex-start;border-top:1px solid #d0d7de;padding:.8rem 0}
.case img{width:160px;height:160px;object-fit:cover;border-radius:4px;background:#eee}
.near{display:flex;gap:.5rem}
.near figure{margin:0;width:160px}
figcaption{font-size:12px;color:#57606a;overflow-wrap:anywhere}
.why{min-width:16rem}
.reason{font-weight:600}
"""


def thumbnail(data: bytes) -> str | None:
    """A JPEG data URI of the photo, THUMB pixels on its longer side; None when it cannot be decoded."""
    try:
        image = decode_photo(data, THUMB)
    except ServiceError:
        return None
    image.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def contact_sheet(
    queue: list[Candidate], rows: list[dict[str, Any]], photos: dict[str, bytes], catalogue_root: Path | None
) -> str:
    parts = [
        "<!doctype html><html lang=en><meta charset=utf-8>",
        f'<meta http-equiv=Content-Security-Policy content="{_CSP}">',
        f"<title>Labelling queue ({len(queue)} photos)</title><style>{_STYLE}</style>",
        f"<h1>Labelling queue: {len(queue)} photos, best first</h1>",
        "<p>Fill in the <code>sku</code> column of queue.csv for each photo, then <code>vps label import</code>.</p>",
    ]
    for c, row in zip(queue, rows, strict=True):
        src = thumbnail(photos[c.photo])
        img = f'<img alt="query photo" src="{src}">' if src else "<div>(not viewable)</div>"
        signals = ", ".join(f"{k} {v:.2f}" for k, v in c.signals.items())
        why = (
            f"<div class=why><div class=reason>{html.escape(row['reason'])} ({row['priority']})</div>"
            f"<div>{html.escape(c.photo)}</div>"
            f"<div>suggested: <b>{html.escape(str(row['suggested_sku']))}</b> "
            f"({html.escape(str(row['top_score']))}), next {html.escape(str(row['second_sku']))} "
            f"({html.escape(str(row['second_score']))})</div>"
            f"<div>router: {html.escape(str(row['router_category']))} "
            f"({html.escape(str(row['router_probability']))}); nearest images: "
            f"{html.escape(str(row['neighbour_category']))}</div><div>{html.escape(signals)}</div></div>"
        )
        near = []
        for hit in c.outcome.results[:NEAREST]:
            thumb = _catalogue_thumb(catalogue_root, hit.item.get("image"))
            pic = f'<img alt="catalogue image" src="{thumb}">' if thumb else "<div>(no image)</div>"
            caption = f"{hit.item['sku']} · {hit.score:.3f}"
            near.append(f"<figure>{pic}<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append(f"<section class=case>{img}{why}<div class=near>{''.join(near)}</div></section>")
    return "\n".join(parts) + "\n</html>\n"


def _catalogue_thumb(root: Path | None, image: object) -> str | None:
    if root is None or not isinstance(image, str) or not image:
        return None
    try:
        return thumbnail(read_photo(root.resolve(), image))
    except PhotoProblem:
        return None
