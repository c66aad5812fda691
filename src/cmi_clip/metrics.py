# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Image- and pixel-level metrics of anomaly detection: AUROC, AP, F1-max and AUPRO.

All values are fractions in `[0, 1]`; only `format_metrics_table` converts them to percent.

- Image-level metrics (`image_auroc`, `image_ap`, `image_f1_max`) call scikit-learn directly.
- Pixel-level metrics pool every pixel of every image. They are exact, with every distinct score as a
  threshold, and equal scikit-learn's `roc_auc_score` and `average_precision_score`, but they sort
  the normal pixels once with `np.sort` and count with `np.searchsorted`. scikit-learn 1.9 runs a
  stable argsort of all pixels once for AUROC and again for AP (see docs/benchmarks.md for times).
- AUPRO (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021) is the area under the
  per-region-overlap (PRO) versus false-positive-rate curve up to `fpr_limit`, divided by `fpr_limit`.
  Ground-truth regions are the 8-connected components of each image's mask. The curve uses every
  distinct score as a threshold, and the value at the limit is interpolated linearly.

Degenerate input is reported, not hidden: a metric that is undefined (no anomalous images, or no
anomalous pixels) is NaN with a warning, and means over categories skip NaN and count what they cover.

Example:
    >>> import numpy as np
    >>> masks = np.zeros((2, 8, 8), dtype=bool)
    >>> masks[1, 2:5, 2:5] = True
    >>> metrics = compute_metrics([0.1, 0.9], [0, 1], masks.astype(float), masks)
    >>> metrics["image_auroc"], metrics["pixel_aupro"]
    (1.0, 1.0)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

logger = logging.getLogger(__name__)

__all__ = [
    "EVALUATE_METRIC_PATH",
    "IMAGE_METRICS",
    "METRIC_NAMES",
    "METRIC_TITLES",
    "PIXEL_METRICS",
    "aupro",
    "compute_category_metrics",
    "compute_metrics",
    "f1_max",
    "format_metrics_table",
    "pixel_metrics",
    "pro_curve",
]

IMAGE_METRICS: tuple[str, ...] = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS: tuple[str, ...] = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
METRIC_NAMES: tuple[str, ...] = IMAGE_METRICS + PIXEL_METRICS

# Script of the `evaluate` metric that wraps `compute_metrics`: `evaluate.load(str(EVALUATE_METRIC_PATH))`.
EVALUATE_METRIC_PATH = Path(__file__).parent / "metrics_module" / "cmi_clip_metrics.py"

# 8-connectivity inside each image and no connection between images of an (N, H, W) stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True

# Maps are upsampled in chunks of this many images to bound the memory of float32 copies.
_UPSAMPLE_CHUNK = 64


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype in (torch.bfloat16, torch.float16):
            values = values.float()
        return values.numpy()
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], torch.Tensor):
        return np.stack([_to_numpy(value) for value in values])
    return np.asarray(values)


def _describe(category: str | None) -> str:
    return f"category {category!r}" if category is not None else "the given data"


def _prepare_image_inputs(image_scores: Any, image_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = _to_numpy(image_scores).astype(np.float64).reshape(-1)
    labels = _to_numpy(image_labels).reshape(-1)
    if scores.shape != labels.shape:
        msg = f"image_scores and image_labels must have the same length, got shapes {scores.shape} and {labels.shape}."
        raise ValueError(msg)
    if not np.isin(labels, (0, 1)).all():
        msg = f"image_labels must contain only 0 (normal) and 1 (anomalous), got values {np.unique(labels)[:10].tolist()}."
        raise ValueError(msg)
    if np.isnan(scores).any():
        msg = "image_scores contains NaN; check the model output before computing metrics."
        raise ValueError(msg)
    return scores, labels.astype(bool)


def _squeeze_channel(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        msg = f"{name} must have shape (N, H, W) or (N, 1, H, W), got {array.shape}."
        raise ValueError(msg)
    return array


def _upsample_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize `(N, h, w)` maps to `(N, *size)` with bilinear interpolation (`align_corners=False`)."""
    out = np.empty((maps.shape[0], *size), dtype=np.float32)
    for start in range(0, maps.shape[0], _UPSAMPLE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(maps[start : start + _UPSAMPLE_CHUNK], dtype=np.float32))
        resized = torch.nn.functional.interpolate(chunk[:, None], size=size, mode="bilinear", align_corners=False)
        out[start : start + _UPSAMPLE_CHUNK] = resized[:, 0].numpy()
    return out


def _prepare_pixel_inputs(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return `(maps, masks)` with equal shapes `(N, H, W)`; maps are upsampled to the mask size if needed."""
    maps = _squeeze_channel(_to_numpy(anomaly_maps), "anomaly_maps")
    masks = _squeeze_channel(_to_numpy(masks), "masks")
    if maps.shape[0] != masks.shape[0]:
        msg = f"anomaly_maps and masks must contain the same number of images, got shapes {maps.shape} and {masks.shape}."
        raise ValueError(msg)
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    if np.isnan(maps).any():
        msg = "anomaly_maps contains NaN; check the model output before computing metrics."
        raise ValueError(msg)
    if masks.dtype != bool:
        masks = masks > 0
    if maps.shape[1:] != masks.shape[1:]:
        # Masks keep their resolution: interpolating a mask would invent fractional labels.
        logger.info("Upsampling anomaly maps from %s to the mask size %s (bilinear).", maps.shape[1:], masks.shape[1:])
        maps = _upsample_maps(maps, masks.shape[1:])
    return maps, masks


# ----------------------------------------------------------------------------------------------
# Image-level metrics
# ----------------------------------------------------------------------------------------------


def f1_max(labels: Any, scores: Any) -> float:
    """Compute the maximum F1 score over all distinct thresholds.

    Args:
        labels: Binary labels, shape `(N,)`.
        scores: Scores, shape `(N,)`; higher means more anomalous.

    Returns:
        max over thresholds of `2 * precision * recall / (precision + recall)`, with F1 = 0 where
        precision and recall are both 0. NaN if `labels` has no positive.
    """
    labels = _to_numpy(labels).reshape(-1).astype(bool)
    scores = _to_numpy(scores).reshape(-1)
    if not labels.any():
        return math.nan
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


def _image_metrics(scores: np.ndarray, labels: np.ndarray, category: str | None) -> dict[str, float]:
    if labels.all() or not labels.any():
        present = "anomalous" if labels.any() else "normal"
        logger.warning("Image AUROC, AP and F1-max are undefined for %s: all %d images are %s. They are set to NaN.", _describe(category), labels.size, present)
        return dict.fromkeys(IMAGE_METRICS, math.nan)
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "image_ap": float(average_precision_score(labels, scores)),
        "image_f1_max": f1_max(labels, scores),
    }


# ----------------------------------------------------------------------------------------------
# Pixel-level metrics
# ----------------------------------------------------------------------------------------------


class _SortedPixels:
    """Normal and anomalous pixel scores, sorted ascending, with the per-region PRO weights.

    Attributes:
        negatives: Scores of normal pixels (mask 0), sorted ascending, shape `(num_negatives,)`.
        positives: Scores of anomalous pixels (mask 1), sorted ascending, shape `(num_positives,)`.
        pro_weights: Weight of each entry of `positives`, `1 / (num_regions * size of its region)`,
            so that the weights of the detected pixels sum to the PRO. Shape `(num_positives,)`.
        num_regions: Number of 8-connected ground-truth regions over all images.
        positive_values: Distinct positive scores, ascending, shape `(D,)`.
        positive_counts: Number of positives equal to each of `positive_values`, shape `(D,)`.
        negatives_below: Number of negatives `<` each of `positive_values`, shape `(D,)`.
        negatives_at_or_below: Number of negatives `<=` each of `positive_values`, shape `(D,)`.
    """

    def __init__(self, maps: np.ndarray, masks: np.ndarray) -> None:
        self.negatives = maps[~masks]
        self.negatives.sort()

        # Region ids in raster order match the order of `maps[masks]`, so weights align with scores.
        regions, self.num_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
        region_ids = regions[masks]
        del regions
        positives = maps[masks]
        order = np.argsort(positives)
        self.positives = positives[order]
        sizes = np.bincount(region_ids, minlength=self.num_regions + 1).astype(np.float64)
        self.pro_weights = 1.0 / (max(self.num_regions, 1) * sizes[region_ids[order]])

        # Counts at each distinct positive score; the sorted keys let searchsorted reuse its bounds.
        starts = np.flatnonzero(np.concatenate(([True], self.positives[1:] != self.positives[:-1])))
        self.positive_values = self.positives[starts]
        self.positive_counts = np.diff(np.append(starts, self.positives.size)).astype(np.int64)
        self.negatives_below = np.searchsorted(self.negatives, self.positive_values, side="left").astype(np.int64)
        self.negatives_at_or_below = np.searchsorted(self.negatives, self.positive_values, side="right").astype(np.int64)

    def counts_from_top(self) -> tuple[np.ndarray, np.ndarray]:
        """Return `(tp, fp)` at each distinct positive score from the highest down (int64, shape `(D,)`).

        `tp` and `fp` count the positives and negatives with a score >= that value.
        """
        true_positives = np.cumsum(self.positive_counts[::-1])
        false_positives = self.negatives.size - self.negatives_below[::-1]
        return true_positives, false_positives


def _auroc_from_sorted(pixels: _SortedPixels) -> float:
    """AUROC as the Mann-Whitney statistic: P(positive > negative) + 0.5 * P(positive == negative)."""
    # Twice the statistic is an exact integer sum; a single division keeps the result within 1e-15.
    doubled = int(np.dot(pixels.positive_counts, pixels.negatives_below + pixels.negatives_at_or_below))
    return doubled / (2.0 * pixels.positives.size * pixels.negatives.size)


def _ap_and_f1_from_sorted(pixels: _SortedPixels) -> tuple[float, float]:
    """Average precision (step-wise, as scikit-learn) and F1-max from the counts at each positive score.

    Recall changes only at thresholds equal to a positive score, and between two of them F1 can only
    fall (more false positives, same true positives), so those thresholds are all that AP and F1-max need.
    """
    true_positives, false_positives = pixels.counts_from_top()
    num_positives = pixels.positives.size
    precision = true_positives / (true_positives + false_positives)
    recall_steps = pixels.positive_counts[::-1] / num_positives
    average_precision = float(np.sum(recall_steps * precision))
    f1 = 2.0 * true_positives / (true_positives + false_positives + num_positives)
    return average_precision, float(f1.max())


def _aupro_from_sorted(pixels: _SortedPixels, fpr_limit: float) -> float:
    """Integrate the PRO-FPR curve with every distinct score as a threshold up to `fpr_limit`.

    FPR changes only at negative scores, and PRO only at positive scores. Going down from one distinct
    negative value to the next, v, the curve first rises vertically (positives only, no area) and then
    moves along one segment from `(FPR before v, PRO of positives > v)` to `(FPR(v), PRO of positives >= v)`.
    Summing the trapezoids of those segments equals the trapezoid rule over all distinct thresholds.
    """
    negatives = pixels.negatives
    num_negatives = negatives.size

    # Only thresholds down to the first one past the limit matter: the `needed`-th highest negative
    # score is the highest threshold whose FPR exceeds `fpr_limit`, and every higher one stays within it.
    needed = min(num_negatives, math.floor(fpr_limit * num_negatives) + 1)
    first = int(np.searchsorted(negatives, negatives[num_negatives - needed], side="left"))
    top = negatives[first:]

    # Distinct negative values (ascending) and the FPR at each, then reversed to run from the highest down.
    starts = np.flatnonzero(np.concatenate(([True], top[1:] != top[:-1])))
    values = top[starts]
    fpr = ((top.size - starts) / num_negatives)[::-1]
    fpr_before = np.append(0.0, fpr[:-1])

    # PRO at each value v: positive p counts towards "> v" for the values below searchsorted(values, p,
    # "left") and towards ">= v" for those below the "right" position, so binned weights and suffix sums
    # give both PROs without searching every value.
    num_values = values.size
    strict_bins = np.bincount(np.searchsorted(values, pixels.positives, side="left"), weights=pixels.pro_weights, minlength=num_values + 1)
    inclusive_bins = np.bincount(np.searchsorted(values, pixels.positives, side="right"), weights=pixels.pro_weights, minlength=num_values + 1)
    pro_strict = np.cumsum(strict_bins[::-1])[:-1]
    pro_inclusive = np.cumsum(inclusive_bins[::-1])[:-1]

    # Whole segments up to the limit, then the part of the segment that crosses it, interpolated.
    inside = fpr <= fpr_limit
    area = float(np.sum((fpr[inside] - fpr_before[inside]) * (pro_strict[inside] + pro_inclusive[inside]) / 2.0))
    crossing = np.flatnonzero(~inside)
    if crossing.size:
        index = crossing[0]
        start, end = fpr_before[index], fpr[index]
        pro_at_limit = pro_strict[index] + (pro_inclusive[index] - pro_strict[index]) * (fpr_limit - start) / (end - start)
        area += (fpr_limit - start) * (pro_strict[index] + pro_at_limit) / 2.0
    return float(min(1.0, area / fpr_limit))


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        msg = f"fpr_limit must be in (0, 1], got {fpr_limit}; 0.3 is the usual value."
        raise ValueError(msg)


def pixel_metrics(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3, category: str | None = None) -> dict[str, float]:
    """Compute pixel AUROC, AP, F1-max and AUPRO over all pixels of all images.

    Args:
        anomaly_maps: Anomaly maps, shape `(N, H, W)` or `(N, 1, H, W)`, numpy or torch. Maps at
            another resolution than the masks are upsampled to the mask size (bilinear).
        masks: Ground-truth masks, shape `(N, H', W')` or `(N, 1, H', W')`; values > 0 are anomalous.
        fpr_limit: Upper FPR bound of the AUPRO integral.
        category: Name used in warnings.

    Returns:
        A dict with `pixel_auroc`, `pixel_ap`, `pixel_f1_max` and `pixel_aupro`. All are NaN, with a
        warning, when the masks contain no anomalous pixel or no normal pixel.

    Raises:
        ValueError: If shapes disagree, maps contain NaN, or `fpr_limit` is outside `(0, 1]`.
    """
    _check_fpr_limit(fpr_limit)
    maps, masks = _prepare_pixel_inputs(anomaly_maps, masks)
    num_positives = int(masks.sum())
    if num_positives == 0 or num_positives == masks.size:
        present = "normal" if num_positives == 0 else "anomalous"
        logger.warning("Pixel metrics are undefined for %s: all %d pixels are %s. They are set to NaN.", _describe(category), masks.size, present)
        return dict.fromkeys(PIXEL_METRICS, math.nan)
    pixels = _SortedPixels(maps, masks)
    average_precision, best_f1 = _ap_and_f1_from_sorted(pixels)
    return {
        "pixel_auroc": _auroc_from_sorted(pixels),
        "pixel_ap": average_precision,
        "pixel_f1_max": best_f1,
        "pixel_aupro": _aupro_from_sorted(pixels, fpr_limit),
    }


def aupro(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Compute the normalised area under the PRO curve up to `fpr_limit`.

    Args:
        anomaly_maps: Anomaly maps, shape `(N, H, W)` or `(N, 1, H, W)`; upsampled to the mask size if
            their resolution differs.
        masks: Ground-truth masks, shape `(N, H', W')`; values > 0 are anomalous.
        fpr_limit: Upper FPR bound of the integral, in `(0, 1]`.

    Returns:
        The area divided by `fpr_limit`, in `[0, 1]`. NaN with a warning if the masks have no
        anomalous pixel or no normal pixel.

    Example:
        >>> mask = np.zeros((1, 8, 8))
        >>> mask[0, 2:5, 2:5] = 1
        >>> round(aupro(np.full((1, 8, 8), 0.5), mask), 6)
        0.15
    """
    _check_fpr_limit(fpr_limit)
    maps, masks = _prepare_pixel_inputs(anomaly_maps, masks)
    num_positives = int(masks.sum())
    if num_positives == 0 or num_positives == masks.size:
        logger.warning("AUPRO is undefined when the masks contain no anomalous or no normal pixel (%d of %d anomalous); returning NaN.", num_positives, masks.size)
        return math.nan
    return _aupro_from_sorted(_SortedPixels(maps, masks), fpr_limit)


def pro_curve(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the full PRO curve with every distinct score as a threshold.

    Args:
        anomaly_maps: Anomaly maps, shape `(N, H, W)`; upsampled to the mask size if needed.
        masks: Ground-truth masks, shape `(N, H', W')`, with at least one anomalous and one normal pixel.

    Returns:
        `(fpr, pro, thresholds)`, each of shape `(T + 1,)`: the curve starts at `(0, 0)` with threshold
        `+inf` and then lists every distinct score from the highest down.
    """
    maps, masks = _prepare_pixel_inputs(anomaly_maps, masks)
    if not masks.any() or masks.all():
        msg = "pro_curve needs masks with at least one anomalous and one normal pixel."
        raise ValueError(msg)
    pixels = _SortedPixels(maps, masks)
    thresholds = np.unique(np.concatenate([pixels.negatives, pixels.positives]))[::-1]
    fpr = (pixels.negatives.size - np.searchsorted(pixels.negatives, thresholds, side="left")) / pixels.negatives.size
    pro_suffix = np.append(np.cumsum(pixels.pro_weights[::-1])[::-1], 0.0)
    pro = pro_suffix[np.searchsorted(pixels.positives, thresholds, side="left")]
    return np.append(0.0, fpr), np.append(0.0, pro), np.append(np.inf, thresholds)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def compute_metrics(
    image_scores: Any,
    image_labels: Any,
    anomaly_maps: Any | None = None,
    masks: Any | None = None,
    fpr_limit: float = 0.3,
    category: str | None = None,
) -> dict[str, float]:
    """Compute image- and pixel-level metrics of one category (or of any pooled set of images).

    Args:
        image_scores: Image anomaly scores, shape `(N,)`; higher means more anomalous.
        image_labels: Image labels, shape `(N,)`, 0 for normal and 1 for anomalous.
        anomaly_maps: Anomaly maps, shape `(N, H, W)` or `(N, 1, H, W)`, or None to skip pixel
            metrics. Maps at another resolution than the masks are upsampled to the mask size.
        masks: Ground-truth masks, shape `(N, H', W')` or `(N, 1, H', W')`; values > 0 are anomalous.
        fpr_limit: Upper FPR bound of AUPRO.
        category: Name used in warnings about undefined metrics.

    Returns:
        A dict with `image_auroc`, `image_ap`, `image_f1_max`, `pixel_auroc`, `pixel_ap`,
        `pixel_f1_max` and `pixel_aupro`, each a float in `[0, 1]` or NaN where undefined. Pixel
        metrics are NaN (without a warning) when `anomaly_maps` or `masks` is None.

    Raises:
        ValueError: If shapes disagree (the message shows both), labels are not 0/1, or inputs hold NaN.
    """
    scores, labels = _prepare_image_inputs(image_scores, image_labels)
    metrics = _image_metrics(scores, labels, category)
    if anomaly_maps is None or masks is None:
        metrics.update(dict.fromkeys(PIXEL_METRICS, math.nan))
        return metrics

    maps, masks = _prepare_pixel_inputs(anomaly_maps, masks)
    if maps.shape[0] != scores.shape[0]:
        msg = f"anomaly_maps and image_scores must describe the same images, got shapes {maps.shape} and {scores.shape}."
        raise ValueError(msg)
    metrics.update(pixel_metrics(maps, masks, fpr_limit=fpr_limit, category=category))
    return metrics


_RECORD_KEYS = ("image_scores", "image_labels", "anomaly_maps", "masks")


def _group_records(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Group per-image records (`category`, `score`, `label`, optional `anomaly_map` and `mask`) by category."""
    grouped: dict[str, dict[str, list[Any]]] = {}
    for index, record in enumerate(records):
        missing = [key for key in ("category", "score", "label") if key not in record]
        if missing:
            msg = f"Record {index} is missing keys {missing}; each record needs category, score, label and optionally anomaly_map and mask."
            raise ValueError(msg)
        group = grouped.setdefault(str(record["category"]), {"image_scores": [], "image_labels": [], "anomaly_maps": [], "masks": []})
        group["image_scores"].append(float(_to_numpy(record["score"])))
        group["image_labels"].append(int(_to_numpy(record["label"])))
        if record.get("anomaly_map") is not None and record.get("mask") is not None:
            group["anomaly_maps"].append(_squeeze_channel(_to_numpy(record["anomaly_map"]), "anomaly_map")[0])
            group["masks"].append(_squeeze_channel(_to_numpy(record["mask"]), "mask")[0])
    result: dict[str, dict[str, Any]] = {}
    for category, group in grouped.items():
        has_maps = len(group["anomaly_maps"]) == len(group["image_scores"])
        result[category] = {
            "image_scores": np.asarray(group["image_scores"]),
            "image_labels": np.asarray(group["image_labels"]),
            "anomaly_maps": np.stack(group["anomaly_maps"]) if has_maps else None,
            "masks": np.stack(group["masks"]) if has_maps else None,
        }
    return result


def compute_category_metrics(
    data: Mapping[str, Mapping[str, Any] | Sequence[Any]] | Iterable[Mapping[str, Any]],
    fpr_limit: float = 0.3,
) -> dict[str, dict[str, Any]]:
    """Compute the metrics of each category and their mean.

    Args:
        data: One of
            - a mapping from category to a dict with `image_scores`, `image_labels` and optionally
              `anomaly_maps` and `masks` (the arguments of `compute_metrics`);
            - a mapping from category to a tuple `(image_scores, image_labels[, anomaly_maps, masks])`;
            - an iterable of per-image records, dicts with `category`, `score`, `label` and
              optionally `anomaly_map` `(H, W)` and `mask` `(H', W')`.
        fpr_limit: Upper FPR bound of AUPRO.

    Returns:
        `{category: metrics}` for each category in input order, plus `"mean"`. The mean entry contains
        the mean of each metric over the categories where it is defined, `"num_categories"` (metric
        name to the number of categories that its mean covers) and `"total_categories"`.

    Raises:
        ValueError: If a category is named `"mean"` or its inputs are invalid.
    """
    if isinstance(data, Mapping):
        grouped = dict(data)
    else:
        grouped = _group_records(data)
    if "mean" in grouped:
        msg = "A category named 'mean' collides with the mean row; rename that category."
        raise ValueError(msg)

    per_category: dict[str, dict[str, Any]] = {}
    for category, inputs in grouped.items():
        if isinstance(inputs, Mapping):
            arguments = {key: inputs.get(key) for key in _RECORD_KEYS}
        else:
            arguments = dict(zip(_RECORD_KEYS, inputs))
        per_category[category] = compute_metrics(**arguments, fpr_limit=fpr_limit, category=category)

    mean: dict[str, Any] = {}
    covered: dict[str, int] = {}
    for name in METRIC_NAMES:
        values = [metrics[name] for metrics in per_category.values() if not math.isnan(metrics[name])]
        covered[name] = len(values)
        mean[name] = float(np.mean(values)) if values else math.nan
    mean["num_categories"] = covered
    mean["total_categories"] = len(per_category)
    per_category["mean"] = mean
    return per_category


# Display names of the metrics in tables and model cards.
METRIC_TITLES: dict[str, str] = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "image_f1_max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC",
    "pixel_ap": "Pixel AP",
    "pixel_f1_max": "Pixel F1-max",
    "pixel_aupro": "Pixel AUPRO",
}


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def format_metrics_table(per_category: Mapping[str, Mapping[str, Any]]) -> str:
    """Format per-category metrics as a markdown table in percent with one decimal.

    Args:
        per_category: Output of `compute_category_metrics`, or any mapping from a row name to metrics.
            Columns that are NaN (or None, or missing) in every row are left out, and such cells read `n/a`.

    Returns:
        The markdown table. When the `"mean"` row skips undefined values, a line below the table
        states how many categories each affected mean covers.
    """
    columns = [name for name in METRIC_NAMES if any(not math.isnan(_as_float(row.get(name))) for row in per_category.values())]
    lines = ["| Category | " + " | ".join(METRIC_TITLES[name] for name in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for category, row in per_category.items():
        cells = []
        for name in columns:
            value = _as_float(row.get(name))
            cells.append("n/a" if math.isnan(value) else f"{100.0 * value:.1f}")
        label = f"**{category}**" if category == "mean" else category
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    mean = per_category.get("mean")
    if mean is not None and "num_categories" in mean:
        total = mean.get("total_categories", len(per_category) - 1)
        partial = [f"{METRIC_TITLES[name]} {mean['num_categories'][name]} of {total}" for name in columns if mean["num_categories"].get(name, total) < total]
        if partial:
            lines.append("")
            lines.append("The mean covers only the categories where a metric is defined: " + ", ".join(partial) + ".")
    return "\n".join(lines)
