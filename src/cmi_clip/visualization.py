# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Pictures of anomaly maps: heat-map overlays and figure panels of the two branches and their fusion.

Figures are drawn on matplotlib `Figure` objects with the Agg canvas, so they need no display and do not
touch pyplot's state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .processing_cmi_clip import to_rgb

# Keys of one CMI layer's entry in `CMIClipOutput.attentions` drawn in the second panel row, with titles.
ATTENTION_PANELS = (
    ("abnormality_attention", "ABN attention"),
    ("normality_attention", "NOR attention"),
    ("abnormality_cue", "ABN cue"),
    ("normality_cue", "NOR cue"),
)


def _to_array(values: Any) -> np.ndarray:
    """Turn a PIL image, tensor or array into a 2-D float array; leading axes of size 1 are dropped."""
    if isinstance(values, Image.Image):
        if values.mode == "F":
            array = np.asarray(values, dtype=np.float32)
        else:
            array = np.asarray(values.convert("L"), dtype=np.float32) / 255.0
    elif isinstance(values, torch.Tensor):
        array = values.detach().float().cpu().numpy()
    else:
        array = np.asarray(values, dtype=np.float32)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.ndim != 2:
        msg = f"Expected a single 2-D map, got shape {array.shape}. Pass one image's map, for example outputs.anomaly_map[0]."
        raise ValueError(msg)
    return array.astype(np.float32)


def _to_rgb_image(image: Any) -> Image.Image:
    """Turn a PIL image, a path or an array into an upright 8-bit RGB image."""
    from .pipeline_anomaly_detection import load_image

    return to_rgb(load_image(image))


def _resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a float map to PIL `size` (width, height)."""
    if (values.shape[1], values.shape[0]) == tuple(size):
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def overlay_heatmap(image: Any, anomaly_map: Any, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """Blend a colour-mapped anomaly map over an image.

    Args:
        image: The image (PIL image, path or array); it is EXIF-transposed and converted to RGB.
        anomaly_map: Map with values in [0, 1]: a PIL image of mode "F" or "L", or a tensor or array of
            shape (H, W). It is resized bilinearly to the image size.
        alpha: Weight of the heat map, from 0 (image only) to 1 (heat map only).
        colormap: Name of a matplotlib colormap.

    Returns:
        An RGB image of the image's size.
    """
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        msg = f"alpha={alpha} is outside [0, 1]; 0 shows only the image and 1 only the heat map."
        raise ValueError(msg)
    base = _to_rgb_image(image)
    values = np.clip(np.nan_to_num(_resize_map(_to_array(anomaly_map), base.size)), 0.0, 1.0)
    heat = colormaps[colormap](values)[..., :3]
    blended = (1.0 - alpha) * (np.asarray(base, dtype=np.float32) / 255.0) + alpha * heat
    return Image.fromarray(np.rint(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8), mode="RGB")


def _attention_rows(attentions: Sequence[Mapping[str, Any]] | None, index: int) -> list[tuple[str, np.ndarray]]:
    """List the (title, map) panels of the CMI layers for image `index` of the batch."""
    panels = []
    for layer in attentions or ():
        for key, title in ATTENTION_PANELS:
            if key not in layer or layer[key] is None:
                continue
            values = layer[key]
            values = values[index] if getattr(values, "ndim", 0) == 3 else values
            panels.append((f"{title}, layer {layer.get('layer', '?')}", _to_array(values)))
    return panels


def save_panel(
    path: str | os.PathLike,
    image: Any,
    ground_truth: Any,
    abnormality_map: Any,
    normality_map: Any,
    anomaly_map: Any,
    attentions: Sequence[Mapping[str, Any]] | None = None,
    title: str | None = None,
    batch_index: int = 0,
    dpi: int = 100,
) -> str:
    """Save the panel of one image: image, ground truth, abnormality map, normality map and fused map.

    With `attentions` (`CMIClipOutput.attentions` from `output_attentions=True`), a second row shows,
    for each CMI layer, the abnormality and normality text-guided attention maps and the cues that each
    branch takes from the other.

    Args:
        path: Output PNG file; parent folders are created.
        image: The image (PIL image, path or array).
        ground_truth: Ground-truth mask (values > 0 are anomalous), or None for a blank panel.
        abnormality_map: Abnormality-branch map (H, W) in [0, 1].
        normality_map: Normality-branch map (H, W) in [0, 1].
        anomaly_map: Fused anomaly map (H, W) in [0, 1].
        attentions: Optional per-layer attention dicts; entries of shape (B, rows, columns) are indexed
            with `batch_index`.
        title: Optional figure title.
        batch_index: Which image of the batch the attention maps belong to.
        dpi: Resolution of the PNG, in dots per inch; each panel is 2.5 inches wide.

    Returns:
        The path of the written file, as a string.
    """
    # A bare Figure renders with the Agg canvas and leaves pyplot's global state alone.
    from matplotlib.figure import Figure

    base = _to_rgb_image(image)
    # Without a mask the tile shows a label, because an all-black tile would read as "no defect".
    truth = None if ground_truth is None else (_resize_map(_to_array(ground_truth), base.size) > 0).astype(np.float32)
    top = [("Image", None), ("Ground truth", truth)]
    top += [
        ("Abnormality map", _resize_map(_to_array(abnormality_map), base.size)),
        ("Normality map", _resize_map(_to_array(normality_map), base.size)),
        ("Fused map", _resize_map(_to_array(anomaly_map), base.size)),
    ]
    bottom = _attention_rows(attentions, batch_index)
    columns = max(len(top), len(bottom))
    rows = 2 if bottom else 1
    figure = Figure(figsize=(2.5 * columns, 2.6 * rows + (0.3 if title else 0.0)))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for column, (name, values) in enumerate(top):
        axis = axes[0, column]
        if name == "Ground truth" and values is None:
            axis.text(0.5, 0.5, "no ground truth", ha="center", va="center", fontsize=9, transform=axis.transAxes)
        elif values is None:
            axis.imshow(base)
        elif name == "Ground truth":
            axis.imshow(values, cmap="gray", vmin=0.0, vmax=1.0)
        else:
            axis.imshow(np.asarray(base))
            axis.imshow(values, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.5)
        axis.set_title(name, fontsize=9)
    for column, (name, values) in enumerate(bottom):
        axis = axes[1, column]
        # Attention maps sum to 1 over patches, so each is shown on its own colour scale.
        axis.imshow(values, cmap="viridis", interpolation="nearest")
        axis.set_title(name, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    return path


__all__ = ["ATTENTION_PANELS", "overlay_heatmap", "save_panel"]
