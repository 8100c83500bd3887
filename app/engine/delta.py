"""Live catalogue changes on top of an immutable index version: per-category delta segments searched exactly, and
the SKUs whose base rows are hidden.

A `Delta` is an immutable snapshot; the follower (app/catalogue/follow.py) builds the next one and the engine's
reference is swapped in one assignment, so a search reads one consistent snapshot. Every SKU changed after the
version's sequence number is masked in the base shards and, unless deleted, held here whole (its current
category, metadata and every image's vector): replacing, moving and deleting a SKU are all the same operation.
Exact search over a segment is a matrix-vector product; compaction (`vps compact`) folds the delta into a new
version before it grows large.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def catalogue_image_url(sku: str, image_id: str) -> str:
    """Where the service serves an image added through the catalogue API (app/service/http/catalogue.py)."""
    return f"/v1/products/{sku}/images/{image_id}"


def catalogue_image_ref(sku: str, image_id: str) -> str:
    """The item table's `image` of such an image: it has no path under an images root."""
    return f"catalogue:{sku}/{image_id}"


@dataclass(frozen=True)
class DeltaImage:
    image_id: str
    vector: np.ndarray  # unit float32, the engine's model


@dataclass(frozen=True)
class DeltaProduct:
    sku: str
    category: str
    title: str
    attributes: dict[str, Any]
    images: tuple[DeltaImage, ...]


@dataclass(frozen=True)
class Segment:
    """One category's delta rows: `vectors[i]` is the image `items[i]`."""

    vectors: np.ndarray
    items: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Delta:
    base_seq: int  # the index version's catalogue sequence number
    seq: int = 0  # changes applied up to here (>= base_seq)
    synced_at: float = 0.0  # commit time of `seq` (unix seconds; 0: nothing applied)
    products: Mapping[str, DeltaProduct | None] = field(default_factory=dict)  # every changed SKU, None: deleted
    segments: Mapping[str, Segment] = field(default_factory=dict)
    changed_at: Mapping[str, int] = field(default_factory=dict)  # each held SKU's last change (sequence number)

    @classmethod
    def empty(cls, base_seq: int) -> Delta:
        return cls(base_seq=base_seq, seq=base_seq)

    @property
    def n_items(self) -> int:
        return sum(len(s.items) for s in self.segments.values())

    def carried_from(self, previous: Delta) -> Delta:
        """This (empty) delta of a new version, starting from a previous version's delta when that one has
        applied at least up to this version's sequence number: its products are whole current states, so laid
        over the new version they are right (or re-applied identically). Older: nothing to carry."""
        if previous.seq < self.base_seq or previous.base_seq > self.base_seq:
            return self  # older than this version, or from a newer one (a rollback): read again from the log
        # SKUs whose last change the version already holds are served from it: compaction empties the delta.
        newer = {sku: at for sku, at in previous.changed_at.items() if at > self.base_seq}
        products = {sku: previous.products[sku] for sku in newer if sku in previous.products}
        categories = {p.category for p in products.values() if p is not None}
        return Delta(self.base_seq, previous.seq, previous.synced_at, products, _segments(products, categories), newer)

    def masks(self, sku: str) -> bool:
        """Base rows of this SKU are hidden: it changed after the version was built."""
        return sku in self.products

    def applied(
        self,
        updates: Mapping[str, DeltaProduct | None],
        seq: int,
        synced_at: float,
        changed_at: Mapping[str, int] | None = None,
    ) -> Delta:
        """The next snapshot: `updates` (the current state of SKUs changed up to `seq`) replace what was held.
        Only the segments of categories a changed SKU left or joined are rebuilt."""
        if seq < self.seq:
            return self
        touched = {p.category for p in updates.values() if p is not None}
        touched |= {old.category for sku in updates if (old := self.products.get(sku)) is not None}
        products = {**self.products, **updates}
        segments = {c: s for c, s in self.segments.items() if c not in touched}
        if touched:
            segments.update(_segments(products, touched))
        at = {**self.changed_at, **(changed_at or dict.fromkeys(updates, seq))}
        return Delta(self.base_seq, seq, synced_at, products, segments, at)

    def search(
        self, category: str, query: np.ndarray, want: int, keep: Callable[[dict[str, Any]], bool] | None = None
    ) -> tuple[list[dict[str, Any]], np.ndarray]:
        """The category segment's best `want` images for one query (items, scores), exact; with `keep` (a
        filter), only the items it keeps."""
        seg = self.segments.get(category)
        if seg is None:
            return [], np.empty(0, dtype=np.float32)
        if keep is None:
            vectors, items = seg.vectors, seg.items
        else:
            kept = [i for i, item in enumerate(seg.items) if keep(item)]
            vectors, items = seg.vectors[kept], tuple(seg.items[i] for i in kept)
        scores = vectors @ query.reshape(-1)
        top = np.argpartition(-scores, want - 1)[:want] if len(scores) > want else np.arange(len(scores))
        return [items[i] for i in top], scores[top].astype(np.float32)


def _segments(products: Mapping[str, DeltaProduct | None], categories: set[str]) -> dict[str, Segment]:
    rows: dict[str, list[tuple[np.ndarray, dict[str, Any]]]] = {c: [] for c in categories}
    for p in products.values():
        if p is None or p.category not in rows:
            continue
        for img in p.images:
            item = {
                "sku": p.sku,
                "category": p.category,
                "title": p.title,
                "attributes": p.attributes,
                "image": catalogue_image_ref(p.sku, img.image_id),
                "image_url": catalogue_image_url(p.sku, img.image_id),
                "image_id": img.image_id,
            }
            rows[p.category].append((img.vector, item))
    return {
        c: Segment(np.ascontiguousarray(np.stack([v for v, _ in r]), dtype=np.float32), tuple(i for _, i in r))
        for c, r in rows.items()
        if r
    }
