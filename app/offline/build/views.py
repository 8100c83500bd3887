"""Catalogue-side augmentation: extra vectors for a SKU from augmented views of its few images.

A new product usually arrives with one clean studio shot, and a shelf photo of it differs by crop, angle, light
and blur. Views made with the training augmentations (app/offline/train/augment.py, Pillow only) and stored as
more vectors of the same SKU let a shelf query meet one of them (docs/training.md measures it)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from app.offline.train.augment import shelf_augment


def catalogue_views(image: Image.Image, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """n augmented views of `image`, square, at its shorter side (the embedder resizes and crops them as usual)."""
    side = min(image.size)
    return [shelf_augment(image, side, rng) for _ in range(n)]
