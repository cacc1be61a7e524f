"""Clip frames as one picture (frames_as=grid), for models that take one image per prompt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def grid_shape(count: int) -> tuple[int, int]:
    """Near-square, landscape-leaning (rows, cols): 3 -> 1x3, 4 -> 2x2, 6 -> 2x3, 8 -> 2x4."""
    if count < 1:
        raise ValueError(f"a grid needs at least one image, got {count}")
    rows = math.isqrt(count)
    return rows, math.ceil(count / rows)


def make_grid(images: Sequence[Image.Image], rows: int | None = None, cols: int | None = None) -> Image.Image:
    """One mosaic of `images` in row-major order, every cell the size of the first image.

    For models that accept one image per prompt: the frames of a clip become one picture.
    """
    from PIL import Image

    if not images:
        raise ValueError("make_grid needs at least one image")
    k = len(images)
    if rows is None and cols is None:
        rows, cols = grid_shape(k)
    elif rows is None:
        rows = math.ceil(k / cols)
    elif cols is None:
        cols = math.ceil(k / rows)
    if rows < 1 or cols < 1 or rows * cols < k:
        raise ValueError(f"a {rows}x{cols} grid cannot hold {k} images")
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        cell = im.convert("RGB")
        if cell.size != (w, h):
            cell = cell.resize((w, h), Image.Resampling.BICUBIC)
        grid.paste(cell, ((i % cols) * w, (i // cols) * h))
    return grid
