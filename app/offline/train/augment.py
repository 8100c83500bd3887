"""Augmentations that mimic shelf photos, in Pillow (torchvision is not usable beside this torch build):
random resized crop, flip, small rotation, perspective, colour jitter, blur. Deterministic given the rng."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def random_resized_crop(
    image: Image.Image, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.3, 1.0)
) -> Image.Image:
    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def _perspective_coeffs(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> list[float]:
    a = []
    b = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b.extend([u, v])
    coeffs = np.linalg.solve(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return [float(c) for c in coeffs]


def shelf_augment(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    out = random_resized_crop(image, size, rng)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        out = out.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, fillcolor=(124, 116, 104))
    if rng.random() < 0.3:
        d = size * 0.12
        corners = [(0.0, 0.0), (size, 0.0), (size, size), (0.0, size)]
        moved = [(x + float(rng.uniform(-d, d)), y + float(rng.uniform(-d, d))) for x, y in corners]
        out = out.transform(
            (size, size), Image.Transform.PERSPECTIVE, _perspective_coeffs(corners, moved), Image.Resampling.BILINEAR
        )
    if rng.random() < 0.8:
        out = ImageEnhance.Brightness(out).enhance(float(rng.uniform(0.7, 1.3)))
        out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.7, 1.3)))
        out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.7, 1.3)))
    if rng.random() < 0.2:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, 1.5))))
    return out
