# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Defect synthesis on real photographs that ship inside scikit-image.

The demo, the tests and offline training need anomaly data that works without downloads. They use real
photographs from `skimage.data` and paint defects on them. Only the files bundled in the scikit-image
wheel are used, never the ones that `skimage.data` downloads through `pooch`.

- a *category* is one photograph, or one region of it (`CATEGORY_SOURCES`); a sample is a square crop
  at a random position and scale, resized to the requested size;
- a *defect* is one of `DEFECT_KINDS`: a pasted patch (`"cutpaste"`), thin curved lines
  (`"scratch"`), Perlin-noise blobs filled with another texture (`"perlin"`), a colour stain
  (`"stain"`) or a dark hole with a soft edge (`"hole"`).

Every defect returns the mask of exactly the pixels it changed: `mask == (defective != image).any(-1)`
holds for every output. Pixels inside the painted region that the blend would leave unchanged (equal
colours, or a blend weight that rounds away) are moved by one grey level, so the mask has no holes.

Example:
    >>> import numpy as np
    >>> from cmi_clip.data.synthetic import sample_normal_crop, synthesize_defect
    >>> rng = np.random.default_rng(0)
    >>> image = sample_normal_crop("brick", 256, rng)
    >>> defective, mask = synthesize_defect(image, "scratch", rng)
    >>> bool(mask.any()), defective.shape
    (True, (256, 256, 3))
"""

from __future__ import annotations

import argparse
import functools
import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORY_SOURCES",
    "DEFECT_KINDS",
    "OBJECT_CATEGORIES",
    "TEXTURE_CATEGORIES",
    "CategorySource",
    "OnTheFlyDefectDataset",
    "add_parser",
    "load_source_photo",
    "make_synthetic_dataset",
    "perlin_noise",
    "sample_example",
    "sample_normal_crop",
    "synthesize_defect",
]


@dataclass(frozen=True)
class CategorySource:
    """Source photograph, region and crop scales of one category.

    Attributes:
        photo: Name of the loader function in `skimage.data` (a bundled photograph).
        region: Part of the photograph that crops are taken from, as fractions
            `(top, bottom, left, right)` of its height and width.
        scale: Range `(min, max)` of the crop side as a fraction of the region's shorter side.
        kind: `"texture"` (crops anywhere in a uniform surface) or `"object"` (crops of one object
            that keep most of it in view).
    """

    photo: str
    region: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0)
    scale: tuple[float, float] = (0.4, 0.8)
    kind: str = "texture"


# Only photographs bundled in the scikit-image wheel are listed (checked with scikit-image 0.26).
# `skimage.data` fetches the others (eagle, kidney, lily, skin, ...) with pooch, which needs network access.
CATEGORY_SOURCES: dict[str, CategorySource] = {
    "brick": CategorySource("brick"),
    "gravel": CategorySource("gravel"),
    "grass": CategorySource("grass"),
    "moon": CategorySource("moon"),
    "immunohistochemistry": CategorySource("immunohistochemistry"),
    "hubble_deep_field": CategorySource("hubble_deep_field"),
    "retina": CategorySource("retina", region=(0.1, 0.9, 0.1, 0.9), scale=(0.45, 0.8)),
    "coins": CategorySource("coins", scale=(0.6, 0.95), kind="object"),
    "coffee": CategorySource("coffee", region=(0.0, 1.0, 0.1, 0.82), scale=(0.85, 1.0), kind="object"),
    "rocket": CategorySource("rocket", region=(0.0, 1.0, 0.3, 0.7), scale=(0.85, 1.0), kind="object"),
    "chelsea": CategorySource("chelsea", region=(0.0, 1.0, 0.15, 0.85), scale=(0.85, 1.0), kind="object"),
    "astronaut_face": CategorySource("astronaut", region=(0.0, 0.42, 0.25, 0.65), scale=(0.85, 1.0), kind="object"),
    "camera": CategorySource("camera", region=(0.0, 1.0, 0.1, 0.9), scale=(0.85, 1.0), kind="object"),
}

TEXTURE_CATEGORIES: tuple[str, ...] = tuple(name for name, source in CATEGORY_SOURCES.items() if source.kind == "texture")
OBJECT_CATEGORIES: tuple[str, ...] = tuple(name for name, source in CATEGORY_SOURCES.items() if source.kind == "object")

DEFECT_KINDS: tuple[str, ...] = ("cutpaste", "scratch", "perlin", "stain", "hole")

# Blend weights below this value are treated as untouched, so the soft edge of a stain or hole ends
# where the mask ends.
_MIN_ALPHA = 0.1


# ----------------------------------------------------------------------------------------------
# Photographs and crops
# ----------------------------------------------------------------------------------------------


def _check_category(category: str) -> CategorySource:
    if category not in CATEGORY_SOURCES:
        msg = f"Unknown synthetic category {category!r}; expected one of {sorted(CATEGORY_SOURCES)}."
        raise ValueError(msg)
    return CATEGORY_SOURCES[category]


@functools.lru_cache(maxsize=None)
def _load_photo_cached(photo: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, photo)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)
    image.setflags(write=False)
    return image


def load_source_photo(category: str) -> np.ndarray:
    """Load the scikit-image photograph of a category (cached, read-only).

    Args:
        category: A key of `CATEGORY_SOURCES`.

    Returns:
        The whole photograph, shape `(H, W, 3)`, uint8 RGB. Grey photographs are repeated into three
        channels. The array is shared between calls and not writable; copy it before changing it.

    Raises:
        ValueError: If the category is unknown.
    """
    return _load_photo_cached(_check_category(category).photo)


@functools.lru_cache(maxsize=None)
def _load_photo_pil(photo: str) -> Image.Image:
    return Image.fromarray(_load_photo_cached(photo))


def _crop_box(source: CategorySource, height: int, width: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draw a square crop box `(left, top, right, bottom)` in pixels inside the category's region."""
    top, bottom, left, right = source.region
    region_top, region_left = top * height, left * width
    region_height, region_width = (bottom - top) * height, (right - left) * width
    side = rng.uniform(*source.scale) * min(region_height, region_width)
    row = region_top + rng.uniform(0.0, region_height - side)
    col = region_left + rng.uniform(0.0, region_width - side)
    return (col, row, col + side, row + side)


def sample_normal_crop(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Cut a random square crop of the category's photograph and resize it.

    Args:
        category: A key of `CATEGORY_SOURCES`.
        size: Side of the returned image in pixels.
        rng: Source of the crop position and scale.

    Returns:
        The crop, shape `(size, size, 3)`, uint8 RGB.

    Raises:
        ValueError: If the category is unknown or `size` is not positive.
    """
    source = _check_category(category)
    if size <= 0:
        msg = f"size must be a positive number of pixels, got {size}."
        raise ValueError(msg)
    photo = _load_photo_pil(source.photo)
    box = _crop_box(source, photo.height, photo.width, rng)
    # PIL resamples straight from the box with an antialiasing filter, so no intermediate copy is made.
    crop = photo.resize((size, size), resample=Image.Resampling.BILINEAR, box=box)
    return np.asarray(crop, dtype=np.uint8).copy()


def _foreign_crop(category: str | None, size: int, rng: np.random.Generator) -> np.ndarray:
    """Crop of a randomly chosen photograph other than `category`'s, used as a defect texture."""
    own_photo = CATEGORY_SOURCES[category].photo if category in CATEGORY_SOURCES else None
    others = [name for name, source in CATEGORY_SOURCES.items() if source.photo != own_photo]
    return sample_normal_crop(others[int(rng.integers(len(others)))], size, rng)


# ----------------------------------------------------------------------------------------------
# Noise and shapes
# ----------------------------------------------------------------------------------------------


def perlin_noise(shape: tuple[int, int], resolution: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Compute 2-D Perlin (gradient) noise.

    Random unit gradients sit on a `(resolution[0] + 1) x (resolution[1] + 1)` lattice that spans the
    image. Each pixel takes the dot products of its offsets to the four surrounding lattice points with
    their gradients and interpolates them with the quintic fade `6t^5 - 15t^4 + 10t^3`.

    Args:
        shape: Output `(H, W)` in pixels.
        resolution: Number of lattice cells along each axis; more cells give smaller blobs.
        rng: Source of the gradients.

    Returns:
        Noise of shape `(H, W)`, float64 (computed in float32), within `[-0.71, 0.71]`, continuous and
        zero at the lattice points.
    """
    height, width = shape
    cells_y, cells_x = max(1, int(resolution[0])), max(1, int(resolution[1]))
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(cells_y + 1, cells_x + 1))
    gradient_x, gradient_y = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    # Lattice coordinates of every pixel centre, split into cell index and offset inside the cell.
    y = (np.arange(height) + 0.5) * (cells_y / height)
    x = (np.arange(width) + 0.5) * (cells_x / width)
    y0, x0 = np.floor(y).astype(np.intp), np.floor(x).astype(np.intp)
    dy = (y - y0).astype(np.float32)[:, None]
    dx = (x - x0).astype(np.float32)[None, :]

    def corner(offset_y: int, offset_x: int) -> np.ndarray:
        rows, cols = y0 + offset_y, x0 + offset_x
        return gradient_y[rows][:, cols] * (dy - offset_y) + gradient_x[rows][:, cols] * (dx - offset_x)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)

    fade_y, fade_x = fade(dy), fade(dx)
    corner_00, corner_01, corner_10, corner_11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = corner_00 + fade_x * (corner_01 - corner_00)
    bottom = corner_10 + fade_x * (corner_11 - corner_10)
    return (top + fade_y * (bottom - top)).astype(np.float64)


def _fractal_noise(shape: tuple[int, int], base_resolution: int, octaves: int, rng: np.random.Generator) -> np.ndarray:
    """Sum `octaves` Perlin layers, each with twice the lattice cells and half the amplitude."""
    noise = np.zeros(shape)
    amplitude = 1.0
    for octave in range(octaves):
        cells = base_resolution * 2**octave
        noise += amplitude * perlin_noise(shape, (cells, cells), rng)
        amplitude *= 0.5
    return noise


def _blob_mask(shape: tuple[int, int], rng: np.random.Generator, min_fraction: float, max_fraction: float) -> np.ndarray:
    """Irregular blob (an ellipse with a noisy rim) covering about `[min_fraction, max_fraction]` of the image."""
    height, width = shape
    area = rng.uniform(min_fraction, max_fraction) * height * width
    aspect = rng.uniform(0.5, 2.0)
    radius_y = np.sqrt(area / np.pi * aspect)
    radius_x = np.sqrt(area / np.pi / aspect)
    margin = max(radius_y, radius_x)
    center_y = rng.uniform(min(margin, height / 2), max(height - margin, height / 2))
    center_x = rng.uniform(min(margin, width / 2), max(width - margin, width / 2))
    angle = rng.uniform(0.0, np.pi)

    rows = (np.arange(height) - center_y).astype(np.float32)[:, None]
    cols = (np.arange(width) - center_x).astype(np.float32)[None, :]
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    along = (rows * cos + cols * sin) * np.float32(1.0 / radius_y)
    across = (cols * cos - rows * sin) * np.float32(1.0 / radius_x)
    rim = 1.0 + 0.35 * _fractal_noise((height, width), 4, 2, rng)
    mask = along * along + across * across < rim * rim
    if not mask.any():
        mask[int(np.clip(center_y, 0, height - 1)), int(np.clip(center_x, 0, width - 1))] = True
    return mask


def _finish(image: np.ndarray, blended: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Write `blended` into `region` and make the changed pixels equal to `region` exactly.

    Args:
        image: Original image `(H, W, 3)` uint8.
        blended: Defective values `(H, W, 3)`, any float or int dtype. Only pixels in `region` are used.
        region: Painted pixels `(H, W)` bool.

    Returns:
        `(defective, mask)`: uint8 `(H, W, 3)` and bool `(H, W)` with `mask == region`.
    """
    defective = image.copy()
    values = np.clip(np.rint(blended[region]), 0, 255).astype(np.uint8)
    defective[region] = values

    # A painted pixel whose colour came out identical to the original moves by one grey level, up
    # from 0..254 and down from 255, so that the mask is exactly the set of changed pixels.
    unchanged = region & ~(defective != image).any(axis=-1)
    if unchanged.any():
        original = image[unchanged].astype(np.int16)
        nudged = np.where(original < 255, original + 1, original - 1)
        defective[unchanged] = nudged.astype(np.uint8)
    return defective, region.copy()


def _soft_region(hard: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Blur a hard shape into blend weights `alpha` and return `(alpha, region)`, with `alpha == 0` outside `region`."""
    alpha = ndimage.gaussian_filter(hard.astype(np.float64), sigma) if sigma > 0 else hard.astype(np.float64)
    alpha = np.clip(alpha / max(alpha.max(), 1e-12), 0.0, 1.0)
    region = alpha >= _MIN_ALPHA
    alpha = np.where(region, alpha, 0.0)
    return alpha, region


# ----------------------------------------------------------------------------------------------
# Defect kinds
# ----------------------------------------------------------------------------------------------


def _cutpaste(image: np.ndarray, rng: np.random.Generator, category: str | None) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    patch_height = max(2, int(rng.uniform(0.08, 0.25) * height))
    patch_width = max(2, int(rng.uniform(0.08, 0.25) * width))

    # Half the patches come from elsewhere in the same image, half from another photograph.
    if rng.random() < 0.5:
        donor = image
    else:
        donor = _foreign_crop(category, max(height, width), rng)[:height, :width]
    source_row = int(rng.integers(0, height - patch_height + 1))
    source_col = int(rng.integers(0, width - patch_width + 1))
    patch = donor[source_row : source_row + patch_height, source_col : source_col + patch_width].astype(np.float64)

    # Colour jitter: per-channel gain and a brightness offset, as in CutPaste augmentation.
    patch = patch * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-25.0, 25.0)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]

    row = int(rng.integers(0, height - patch_height + 1))
    col = int(rng.integers(0, width - patch_width + 1))
    region = np.zeros((height, width), dtype=bool)
    blended = np.zeros(image.shape, dtype=np.float64)
    if rng.random() < 0.5:
        # Elliptical patch: keep only the pixels inside the inscribed ellipse.
        rows, cols = np.ogrid[0:patch_height, 0:patch_width]
        ellipse = ((rows + 0.5 - patch_height / 2) / (patch_height / 2)) ** 2 + ((cols + 0.5 - patch_width / 2) / (patch_width / 2)) ** 2 <= 1.0
    else:
        ellipse = np.ones((patch_height, patch_width), dtype=bool)
    region[row : row + patch_height, col : col + patch_width] = ellipse
    blended[row : row + patch_height, col : col + patch_width] = patch
    return _finish(image, blended, region)


def _scratch(image: np.ndarray, rng: np.random.Generator, category: str | None) -> tuple[np.ndarray, np.ndarray]:
    del category
    height, width = image.shape[:2]
    region = np.zeros((height, width), dtype=bool)
    blended = image.astype(np.float64)
    for _ in range(int(rng.integers(1, 4))):
        # Quadratic Bezier curve through three random control points, sampled every half pixel.
        points = rng.uniform(0.1, 0.9, size=(3, 2)) * (height, width)
        length = np.linalg.norm(points[1] - points[0]) + np.linalg.norm(points[2] - points[1])
        t = np.linspace(0.0, 1.0, max(2, int(2 * length)))[:, None]
        curve = (1 - t) ** 2 * points[0] + 2 * (1 - t) * t * points[1] + t**2 * points[2]
        line = np.zeros((height, width), dtype=bool)
        rows = np.clip(np.rint(curve[:, 0]).astype(int), 0, height - 1)
        cols = np.clip(np.rint(curve[:, 1]).astype(int), 0, width - 1)
        line[rows, cols] = True
        thickness = int(rng.integers(0, 2))
        if thickness:
            line = ndimage.binary_dilation(line, iterations=thickness)

        # Scratches are bright (exposed metal) or dark (groove), at a shade that varies along the line.
        shade = 235.0 if rng.random() < 0.5 else 25.0
        strength = rng.uniform(0.6, 0.95)
        blended[line] = (1 - strength) * blended[line] + strength * (shade + rng.normal(0.0, 8.0, size=(int(line.sum()), 1)))
        region |= line
    return _finish(image, blended, region)


def _perlin(image: np.ndarray, rng: np.random.Generator, category: str | None) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    size = max(height, width)
    region = np.zeros((height, width), dtype=bool)

    # Threshold Perlin noise into blobs. A draw that covers too little or too much is redrawn, and after
    # eight draws the top 3 % of the noise is kept, so the region is never empty.
    for _ in range(8):
        cells = int(2 ** rng.integers(1, 4))
        noise = _fractal_noise((height, width), cells, 2, rng)
        region = noise > 0.35
        if 0.005 <= region.mean() <= 0.3:
            break
    else:
        region = noise >= np.quantile(noise, 0.97)

    texture = _foreign_crop(category, size, rng)[:height, :width].astype(np.float64)
    opacity = rng.uniform(0.5, 1.0)
    blended = (1 - opacity) * image.astype(np.float64) + opacity * texture
    return _finish(image, blended, region)


def _stain(image: np.ndarray, rng: np.random.Generator, category: str | None) -> tuple[np.ndarray, np.ndarray]:
    del category
    hard = _blob_mask(image.shape[:2], rng, 0.004, 0.04)
    alpha, region = _soft_region(hard, sigma=rng.uniform(1.0, 3.0))

    # Tint towards a rusty, oily or saturated colour; the stain keeps the texture underneath visible.
    color = rng.choice(np.array([[150, 75, 20], [200, 170, 40], [60, 40, 20], [170, 30, 30], [40, 90, 160]], dtype=np.float64))
    color = color + rng.normal(0.0, 15.0, size=3)
    opacity = rng.uniform(0.55, 0.9)
    luminance = image.astype(np.float64).mean(axis=-1, keepdims=True) / 255.0
    tinted = color * (0.5 + luminance)
    weight = (opacity * alpha)[..., None]
    blended = (1 - weight) * image + weight * tinted
    return _finish(image, blended, region)


def _hole(image: np.ndarray, rng: np.random.Generator, category: str | None) -> tuple[np.ndarray, np.ndarray]:
    del category
    height = image.shape[0]
    hard = _blob_mask(image.shape[:2], rng, 0.002, 0.02)
    alpha, region = _soft_region(hard, sigma=rng.uniform(0.7, 2.0))

    # Near-black interior with a slight shading gradient, blended in through the soft edge.
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    darkness = rng.uniform(5.0, 30.0) + 20.0 * rows
    blended = (1 - alpha[..., None]) * image + alpha[..., None] * darkness
    return _finish(image, blended, region)


_DEFECT_FUNCTIONS: dict[str, Callable[[np.ndarray, np.random.Generator, str | None], tuple[np.ndarray, np.ndarray]]] = {
    "cutpaste": _cutpaste,
    "scratch": _scratch,
    "perlin": _perlin,
    "stain": _stain,
    "hole": _hole,
}


def synthesize_defect(image: np.ndarray, kind: str, rng: np.random.Generator, category: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of the given kind on an image.

    Args:
        image: Normal image, shape `(H, W, 3)`, uint8 RGB, at least 8 pixels on each side. It is not
            modified.
        kind: One of `DEFECT_KINDS`.
        rng: Source of the defect's position, shape and colour.
        category: Category of `image`, if known; `"cutpaste"` and `"perlin"` then take foreign textures
            from other photographs only.

    Returns:
        `(defective, mask)`: the defective image `(H, W, 3)` uint8 and the mask `(H, W)` bool, where
        `mask` is exactly the set of pixels that differ from `image` and has at least one positive.

    Raises:
        ValueError: If `kind` is unknown or the image is not `(H, W, 3)` uint8.
    """
    if kind not in _DEFECT_FUNCTIONS:
        msg = f"Unknown defect kind {kind!r}; expected one of {DEFECT_KINDS}."
        raise ValueError(msg)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 8:
        msg = f"image must be an (H, W, 3) uint8 array with H, W >= 8, got shape {image.shape} and dtype {image.dtype}."
        raise ValueError(msg)
    return _DEFECT_FUNCTIONS[kind](image, rng, category)


# ----------------------------------------------------------------------------------------------
# Samples and data sets
# ----------------------------------------------------------------------------------------------


def _resolve_kinds(defect_kinds: Sequence[str] | Mapping[str, Sequence[str]] | None, category: str) -> tuple[str, ...]:
    """Defect kinds for one category from None (all), a sequence, or a per-category mapping."""
    if defect_kinds is None:
        kinds: Sequence[str] = DEFECT_KINDS
    elif isinstance(defect_kinds, Mapping):
        kinds = defect_kinds.get(category, DEFECT_KINDS)
    elif isinstance(defect_kinds, str):
        kinds = (defect_kinds,)
    else:
        kinds = defect_kinds
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in DEFECT_KINDS]
    if not kinds or unknown:
        msg = f"Invalid defect kinds {kinds!r} for category {category!r}; choose a non-empty subset of {DEFECT_KINDS}."
        raise ValueError(msg)
    return kinds


def sample_example(
    category: str,
    size: int,
    rng: np.random.Generator,
    anomaly_probability: float = 0.5,
    defect_kinds: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Draw one normal or defective example of a category.

    Args:
        category: A key of `CATEGORY_SOURCES`.
        size: Side of the image in pixels.
        rng: Source of every random choice.
        anomaly_probability: Probability that the example gets a defect.
        defect_kinds: Kinds to choose from uniformly: None for all of `DEFECT_KINDS`, a sequence, or a
            mapping from category to a sequence (categories missing from it use all kinds).

    Returns:
        A dict with `image` (`(size, size, 3)` uint8), `mask` (`(size, size)` bool, all False for
        normal examples), `label` (0 normal, 1 anomalous), `category` and `defect_type` (`"good"` or
        the defect kind).
    """
    if not 0.0 <= anomaly_probability <= 1.0:
        msg = f"anomaly_probability must be in [0, 1], got {anomaly_probability}."
        raise ValueError(msg)
    kinds = _resolve_kinds(defect_kinds, category)
    image = sample_normal_crop(category, size, rng)
    if rng.random() < anomaly_probability:
        kind = kinds[int(rng.integers(len(kinds)))]
        image, mask = synthesize_defect(image, kind, rng, category=category)
        return {"image": image, "mask": mask, "label": 1, "category": category, "defect_type": kind}
    return {"image": image, "mask": np.zeros((size, size), dtype=bool), "label": 0, "category": category, "defect_type": "good"}


class OnTheFlyDefectDataset(torch.utils.data.Dataset):
    """Map-style data set that draws a fresh crop and defect for every index.

    Item `i` has category `categories[i % len(categories)]` and is drawn from a generator seeded with
    `(seed, epoch, i)`, so it is the same in every process and every run for the same epoch (workers
    and distributed ranks agree) and new after `set_epoch`.

    Args:
        categories: Categories to draw from, keys of `CATEGORY_SOURCES`.
        size: Side of each image in pixels.
        length: Number of items per epoch.
        seed: Base seed.
        anomaly_probability: Probability that an item gets a defect.
        defect_kinds: None for all kinds, a sequence of kinds, or a mapping from category to kinds.
        transform: Optional callable applied to the example dict before it is returned.

    Example:
        >>> dataset = OnTheFlyDefectDataset(["brick", "coffee"], size=64, length=4, seed=1)
        >>> sorted(dataset[0])
        ['category', 'defect_type', 'image', 'label', 'mask']
    """

    def __init__(
        self,
        categories: Sequence[str],
        size: int,
        length: int,
        seed: int = 0,
        anomaly_probability: float = 0.5,
        defect_kinds: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        if isinstance(categories, str):
            categories = [categories]
        self.categories = list(categories)
        if not self.categories:
            msg = f"categories must not be empty; choose from {sorted(CATEGORY_SOURCES)}."
            raise ValueError(msg)
        for category in self.categories:
            _check_category(category)
            _resolve_kinds(defect_kinds, category)
        if length < 0:
            msg = f"length must be a non-negative number of items, got {length}."
            raise ValueError(msg)
        self.size = int(size)
        self.length = int(length)
        self.seed = int(seed)
        self.anomaly_probability = float(anomaly_probability)
        self.defect_kinds = defect_kinds
        self.transform = transform
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples the next `__getitem__` calls draw.

        NOTE: DataLoader workers started with `persistent_workers=True` keep their own copy of the data
        set and do not see this call; without persistent workers each epoch starts new workers with a copy.
        """
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not -self.length <= index < self.length:
            msg = f"index {index} is out of range for a data set of length {self.length}."
            raise IndexError(msg)
        index %= self.length
        rng = np.random.default_rng([self.seed, self.epoch, index])
        category = self.categories[index % len(self.categories)]
        example = sample_example(category, self.size, rng, self.anomaly_probability, self.defect_kinds)
        return self.transform(example) if self.transform is not None else example


def _stable_seed(*parts: int | str) -> np.random.Generator:
    """Generator seeded from integers and strings; strings enter through CRC-32, which is stable across runs."""
    entropy = [zlib.crc32(part.encode("utf-8")) if isinstance(part, str) else int(part) for part in parts]
    return np.random.default_rng(entropy)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def make_synthetic_dataset(
    out_dir: str | Path,
    categories: Sequence[str] | None = None,
    image_size: int = 256,
    num_train: int = 20,
    num_test_good: int = 8,
    num_test_defect_per_kind: int = 4,
    defect_kinds: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
) -> Path:
    """Write an MVTec AD-style data set of synthetic examples.

    The layout is `<category>/train/good/NNN.png`, `<category>/test/good/NNN.png`,
    `<category>/test/<defect>/NNN.png` and `<category>/ground_truth/<defect>/NNN_mask.png` (0 and
    255). Each image is drawn from a generator seeded with `(seed, category, split, defect, index)`,
    so the files are identical for the same arguments, and adding a category does not change others.

    Args:
        out_dir: Folder to write into; it is created if missing.
        categories: Categories to write; None writes all of `CATEGORY_SOURCES`.
        image_size: Side of each image in pixels.
        num_train: Normal training images per category.
        num_test_good: Normal test images per category.
        num_test_defect_per_kind: Defective test images per category and defect kind.
        defect_kinds: None for all kinds, a sequence, or a mapping from category to kinds.
        seed: Base seed.

    Returns:
        The output folder.
    """
    out_dir = Path(out_dir)
    categories = list(CATEGORY_SOURCES) if categories is None else list(categories)
    for category in categories:
        _check_category(category)
    counts = {"num_train": num_train, "num_test_good": num_test_good, "num_test_defect_per_kind": num_test_defect_per_kind}
    for name, value in counts.items():
        if value < 0:
            msg = f"{name} must be a non-negative number of images, got {value}."
            raise ValueError(msg)

    total = sum(num_train + num_test_good + num_test_defect_per_kind * len(_resolve_kinds(defect_kinds, category)) for category in categories)
    with tqdm(total=total, desc="Writing synthetic images", unit="image") as progress:
        for category in categories:
            kinds = _resolve_kinds(defect_kinds, category)
            for split, count in (("train", num_train), ("test", num_test_good)):
                folder = out_dir / category / split / "good"
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(count):
                    rng = _stable_seed(seed, category, split, "good", index)
                    _save_png(sample_normal_crop(category, image_size, rng), folder / f"{index:03d}.png")
                    progress.update()
            for kind in kinds:
                image_folder = out_dir / category / "test" / kind
                mask_folder = out_dir / category / "ground_truth" / kind
                image_folder.mkdir(parents=True, exist_ok=True)
                mask_folder.mkdir(parents=True, exist_ok=True)
                for index in range(num_test_defect_per_kind):
                    rng = _stable_seed(seed, category, "test", kind, index)
                    image = sample_normal_crop(category, image_size, rng)
                    defective, mask = synthesize_defect(image, kind, rng, category=category)
                    _save_png(defective, image_folder / f"{index:03d}.png")
                    _save_png(mask.astype(np.uint8) * 255, mask_folder / f"{index:03d}_mask.png")
                    progress.update()
    logger.info("Wrote %d synthetic images of %d categories to %s", total, len(categories), out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _name_list_parser(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """Build an argparse type that splits a comma-separated list and rejects names outside `choices`."""

    def parse(value: str) -> list[str]:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if not names or unknown:
            msg = f"invalid {what} {unknown or value!r}; choose from {', '.join(choices)}"
            raise argparse.ArgumentTypeError(msg)
        return names

    return parse


def _run_make_demo_data(args: argparse.Namespace) -> int:
    out = make_synthetic_dataset(
        args.out,
        categories=args.categories,
        image_size=args.image_size,
        num_train=args.num_train,
        num_test_good=args.num_test_good,
        num_test_defect_per_kind=args.num_test_defect_per_kind,
        defect_kinds=args.defect_kinds,
        seed=args.seed,
    )
    logger.info("Synthetic data set ready at %s", out)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `make-demo-data` subcommand to a `cmi-clip` subparser collection."""
    description = "Write an MVTec-layout data set of real scikit-image photos with synthesized defects and exact masks."
    parser = subparsers.add_parser("make-demo-data", help=description, description=description)
    parser.add_argument("out", metavar="OUT", type=Path, help="Output folder; created if missing, existing files are overwritten.")
    parser.add_argument(
        "--categories",
        type=_name_list_parser(tuple(CATEGORY_SOURCES), "categories"),
        default=None,
        help=f"Comma-separated categories to write (default: all): {','.join(CATEGORY_SOURCES)}.",
    )
    parser.add_argument(
        "--defect-kinds",
        type=_name_list_parser(DEFECT_KINDS, "defect kinds"),
        default=None,
        help=f"Comma-separated defect kinds for the test split (default: all): {','.join(DEFECT_KINDS)}.",
    )
    parser.add_argument("--image-size", type=int, default=256, help="Side of each square image, in pixels (default: 256).")
    parser.add_argument("--num-train", type=int, default=20, help="Normal training images per category (default: 20).")
    parser.add_argument("--num-test-good", type=int, default=8, help="Normal test images per category (default: 8).")
    parser.add_argument(
        "--num-test-defect-per-kind",
        type=int,
        default=4,
        help="Defective test images per category and defect kind (default: 4).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Random seed; the same seed writes identical files (default: 0).")
    parser.set_defaults(func=lambda args: _run_make_demo_data(args))
    return parser
