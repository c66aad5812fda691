# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Image and mask preprocessing for CMI-CLIP: whole-image resize (no crop) and CLIP normalisation.

Anomaly maps must cover the whole image, so images are resized to the model's input size without the
center crop that CLIP's classification preprocessing uses. Any PIL mode is accepted: images are
EXIF-transposed and converted to 8-bit RGB (16-bit values are scaled by 1/257, not clipped).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy of a PIL image of any mode, upright according to its EXIF orientation.

    16-bit and 32-bit integer images are scaled to 8 bits, so a 16-bit value v becomes round(v / 257).
    Float images are taken as [0, 1]. Transparent images lose their alpha channel: the colour channels
    are kept as stored, not composited on a background.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) <= 65535 else 65535.0 * 257.0 / 255.0
        gray = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def build_image_processor(config: Any, loaded: Any = None) -> Any:
    """Build the CLIP image processor of a model: the checkpoint's mean and std, the configured size, no crop."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    mean = list(getattr(loaded, "image_mean", None) or CLIP_IMAGE_MEAN)
    std = list(getattr(loaded, "image_std", None) or CLIP_IMAGE_STD)
    height, width = config.image_size
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"height": int(height), "width": int(width)},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


def image_size_of(processor: Any) -> tuple[int, int]:
    """Return the (height, width) an image processor resizes to."""
    size = processor.size
    if not isinstance(size, dict):
        size = dict(size.items()) if hasattr(size, "items") else vars(size)
    return int(size["height"]), int(size["width"])


def preprocess_images(images: list[Image.Image], processor: Any) -> torch.Tensor:
    """Turn PIL images into a normalised batch (B, 3, H, W) at the processor's size.

    Every image goes through [`to_rgb`], then a bicubic resize of the whole image and CLIP normalisation.
    """
    height, width = image_size_of(processor)
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1)
    batch = []
    for image in images:
        resized = to_rgb(image).resize((width, height), Image.Resampling.BICUBIC)
        array = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        batch.append((array - mean) / std)
    return torch.stack(batch)


def preprocess_masks(masks: list[Image.Image | np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Turn masks into a binary batch (B, H, W) at `size` with nearest-neighbour resizing (values > 0 are anomalous)."""
    height, width = size
    batch = []
    for mask in masks:
        array = np.asarray(mask)
        if array.ndim == 3:
            array = array.max(axis=-1)
        binary = Image.fromarray(((array > 0) * 255).astype(np.uint8), mode="L")
        resized = binary.resize((width, height), Image.Resampling.NEAREST)
        batch.append(torch.from_numpy(np.asarray(resized) > 0))
    return torch.stack(batch).float()


__all__ = ["build_image_processor", "image_size_of", "preprocess_images", "preprocess_masks", "to_rgb"]
