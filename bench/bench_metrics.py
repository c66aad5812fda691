# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Time the exact AUPRO of `cmi_clip.metrics` against a 200-threshold sweep.

The sweep is the approach common in research code for zero-shot anomaly detection: for each of 200
evenly spaced thresholds, binarise every map, label the connected components of every ground-truth
mask, and measure each region's overlap. It then keeps the points with FPR <= 0.3, rescales their
FPR to [0, 1] and integrates with the trapezoid rule. It is written here from that description as
the baseline.

The data are random: 1,725 maps of 256 x 256 pixels by default, the size of the MVTec AD test set.
About half of the images get blob-like masks, and each map is smoothed noise plus a blurred copy of
its mask.

Usage:
    python bench/bench_metrics.py                   # full size, several minutes for the sweep
    python bench/bench_metrics.py --num-images 100  # quick run
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, roc_auc_score
from tqdm.auto import tqdm

from cmi_clip.metrics import aupro, pixel_metrics


def make_data(num_images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Build `(maps, masks)` of shape `(num_images, size, size)`: float32 maps and bool blob masks."""
    rng = np.random.default_rng(seed)
    maps = np.empty((num_images, size, size), dtype=np.float32)
    masks = np.zeros((num_images, size, size), dtype=bool)
    for index in tqdm(range(num_images), desc="Generating maps", unit="map"):
        if rng.random() < 0.5:
            # Thresholded smooth noise gives a few irregular blobs covering a few percent of the image.
            blobs = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=size / 24)
            masks[index] = blobs > np.quantile(blobs, rng.uniform(0.93, 0.995))
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=2.0)
        signal = ndimage.gaussian_filter(masks[index].astype(np.float32), sigma=3.0)
        maps[index] = noise / noise.std() * 0.5 + 2.0 * signal
    return maps, masks


def sweep_aupro(maps: np.ndarray, masks: np.ndarray, num_thresholds: int = 200, fpr_limit: float = 0.3) -> float:
    """Threshold sweep with connected components per image and threshold (the research-code baseline)."""
    normal = ~masks
    num_normal = normal.sum()
    thresholds = np.linspace(maps.min(), maps.max(), num_thresholds, endpoint=False)
    fprs, pros = [], []
    for threshold in tqdm(thresholds, desc="Sweep", unit="threshold", leave=False):
        binary = maps > threshold
        overlaps = []
        for predicted, mask in zip(binary, masks):
            for region in measure.regionprops(measure.label(mask, connectivity=2)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(predicted[rows, cols].sum() / region.area)
        fprs.append(np.logical_and(binary, normal).sum() / num_normal)
        pros.append(np.mean(overlaps))
    fprs, pros = np.asarray(fprs), np.asarray(pros)
    keep = fprs <= fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    return float(auc(fprs / fprs.max(), pros))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=1725, help="Number of maps (default: 1725, the MVTec AD test set).")
    parser.add_argument("--size", type=int, default=256, help="Side of each map in pixels (default: 256).")
    parser.add_argument("--num-thresholds", type=int, default=200, help="Thresholds of the baseline sweep (default: 200).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed of the data (default: 0).")
    parser.add_argument("--sklearn", action="store_true", help="Also time scikit-learn's pixel AUROC and AP on the same pixels.")
    args = parser.parse_args()

    maps, masks = make_data(args.num_images, args.size, args.seed)
    anomalous_images = int(masks.reshape(len(masks), -1).any(axis=1).sum())
    print(f"{args.num_images} maps of {args.size}x{args.size}, {anomalous_images} with defects, {masks.mean():.2%} anomalous pixels")

    # Warm both methods up on a few maps so one-time import and allocation costs are not timed.
    aupro(maps[:16], masks[:16])
    sweep_aupro(maps[:16], masks[:16], num_thresholds=20)

    start = time.perf_counter()
    exact = aupro(maps, masks)
    exact_seconds = time.perf_counter() - start

    start = time.perf_counter()
    metrics = pixel_metrics(maps, masks)
    all_pixel_seconds = time.perf_counter() - start

    start = time.perf_counter()
    swept = sweep_aupro(maps, masks, args.num_thresholds)
    sweep_seconds = time.perf_counter() - start

    print()
    print("| Method | Time (s) | AUPRO | Speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| {args.num_thresholds}-threshold sweep, connected components per image and threshold | {sweep_seconds:.1f} | {swept:.6f} | 1.0x |")
    print(f"| `cmi_clip.metrics.aupro`, exact, every distinct score | {exact_seconds:.1f} | {exact:.6f} | {sweep_seconds / exact_seconds:.0f}x |")
    print(f"| `cmi_clip.metrics.pixel_metrics` (AUROC, AP, F1-max and AUPRO together) | {all_pixel_seconds:.1f} | {metrics['pixel_aupro']:.6f} | {sweep_seconds / all_pixel_seconds:.0f}x |")

    if args.sklearn:
        start = time.perf_counter()
        reference_auroc = roc_auc_score(masks.ravel(), maps.ravel())
        reference_ap = average_precision_score(masks.ravel(), maps.ravel())
        sklearn_seconds = time.perf_counter() - start
        print()
        print("| Pixel AUROC and AP | Time (s) | AUROC | AP |")
        print("|---|---:|---:|---:|")
        print(f"| scikit-learn `roc_auc_score` + `average_precision_score` | {sklearn_seconds:.1f} | {reference_auroc:.9f} | {reference_ap:.9f} |")
        print(f"| `cmi_clip.metrics.pixel_metrics` (all four pixel metrics) | {all_pixel_seconds:.1f} | {metrics['pixel_auroc']:.9f} | {metrics['pixel_ap']:.9f} |")

    print()
    print(f"Python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")


if __name__ == "__main__":
    main()
