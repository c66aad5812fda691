# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Evaluation of a CMI-CLIP model on an anomaly-detection data set, per category.

[`evaluate_model`] scores every image of a data set: a `datasets.Dataset` with the columns image, mask,
label and category, or any indexable sequence of such dicts. It computes the image- and pixel-level
metrics of each category with `cmi_clip.metrics.compute_metrics` and returns them with one record per
image. It runs on one process or, given an `accelerate.Accelerator`, on several: each process scores a
shard and `gather_for_metrics` collects the results on every process.

The `cmi-clip evaluate` subcommand wraps it and writes the metric table as Markdown and JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_curve
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .pipeline_anomaly_detection import load_image
from .processing_cmi_clip import image_size_of, preprocess_images, preprocess_masks, to_rgb

logger = logging.getLogger(__name__)


def optimal_f1_threshold(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[float, float]:
    """Find the score threshold that maximises the F1 score of the anomalous class.

    Args:
        scores: Image anomaly scores (N,).
        labels: Image labels (N,), 1 for anomalous.

    Returns:
        `(threshold, f1)`: images with `score >= threshold` are anomalous at the best F1. With no
        anomalous image, the threshold is just above the maximum score and F1 is 0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if labels.sum() == 0:
        return float(np.nextafter(scores.max(initial=0.0), np.inf)), 0.0
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last precision/recall pair has no threshold (recall 0), so it is left out.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def normal_score_threshold(scores: Sequence[float] | np.ndarray, false_positive_rate: float = 0.0) -> float:
    """Find the lowest image-score threshold that labels at most `false_positive_rate` of normal images anomalous.

    Args:
        scores: Image anomaly scores of normal images (N,), at least one.
        false_positive_rate: Allowed fraction of the normal images at or above the threshold, in [0, 1).
            0 puts the threshold just above the highest score, so every given image is labelled normal.

    Returns:
        The threshold. With N images, `floor(false_positive_rate * N)` of them score at or above it.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        msg = "No normal image scores were given. Pass at least one score to set a threshold."
        raise ValueError(msg)
    if not 0.0 <= false_positive_rate < 1.0:
        msg = f"false_positive_rate={false_positive_rate} is invalid; it must be in [0, 1)."
        raise ValueError(msg)
    allowed = math.floor(false_positive_rate * scores.size)
    return float(np.nextafter(scores[allowed], np.inf))


def _column(dataset: Any, name: str) -> list[Any]:
    """Read one column of a `datasets.Dataset`, or the field of every item of another sequence."""
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None:
        return list(dataset[name]) if name in column_names else [None] * len(dataset)
    # NOTE: other sequences are read item by item, which decodes (or synthesizes) every image once more.
    return [dataset[index].get(name) for index in range(len(dataset))]


class _EvaluationCollator:
    """Turn data-set items into model inputs: pixel values, masks at the metric size, labels and indices."""

    def __init__(self, image_processor: Any, metric_size: tuple[int, int]) -> None:
        self.image_processor = image_processor
        self.metric_size = metric_size

    def __call__(self, items: list[tuple[int, dict[str, Any]]]) -> dict[str, torch.Tensor]:
        images, masks, labels, indices = [], [], [], []
        for index, item in items:
            image = to_rgb(load_image(item["image"]))
            images.append(image)
            mask = item.get("mask")
            if mask is None:
                mask = np.zeros((image.height, image.width), dtype=np.uint8)
            elif isinstance(mask, (str, Path)):
                mask = load_image(mask)
            masks.append(mask)
            labels.append(int(item["label"]))
            indices.append(index)
        return {
            "pixel_values": preprocess_images(images, self.image_processor),
            "masks": preprocess_masks(masks, self.metric_size),
            "labels": torch.tensor(labels, dtype=torch.long),
            "indices": torch.tensor(indices, dtype=torch.long),
        }


class _IndexedSubset(Dataset):
    """The items of a data set at `indices`, each paired with its index in the full data set."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Any]:
        index = self.indices[position]
        return index, self.dataset[index]


def evaluate_model(
    model: Any,
    dataset: Any,
    batch_size: int = 8,
    categories: Sequence[str] | None = None,
    accelerator: Any = None,
    pixel_metric_size: int | tuple[int, int] | None = None,
    num_workers: int = 0,
    show_progress: bool = True,
    fpr_limit: float = 0.3,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Score a data set with a CMI-CLIP model and compute the metrics of each category.

    Args:
        model: A `CMIClipModel` with its `image_processor` and tokenizer attached.
        dataset: A `datasets.Dataset` with columns image, mask (None for normal images), label (1 for
            anomalous), category and optionally image_path. Any indexable sequence of such dicts also
            works, with images and masks as PIL images, numpy arrays or paths.
        batch_size: Images per forward pass (per process).
        categories: Categories to evaluate; defaults to all in the data set, in order of appearance.
        accelerator: Optional `accelerate.Accelerator`. Each process then scores a shard and the results
            are gathered with `gather_for_metrics`, so every process returns the full results.
        pixel_metric_size: (height, width), or one int for a square, at which maps and masks are compared
            for the pixel metrics. Defaults to the model's input size. Smaller sizes use less memory.
        num_workers: DataLoader worker processes for image decoding.
        show_progress: Whether to show a tqdm bar per category (on the main process only).
        fpr_limit: Upper false-positive-rate bound of AUPRO.

    Returns:
        `(per_category_metrics, records)`. `per_category_metrics[category]` holds the metrics of
        `cmi_clip.metrics.compute_metrics` (image_auroc, image_ap, image_f1_max, pixel_auroc, pixel_ap,
        pixel_f1_max, pixel_aupro) plus `image_f1_threshold`, the image-score threshold at the best F1,
        and `num_images`/`num_anomalous`. `records` has one dict per scored image, in data-set order, with
        index, category, label, score and image_path (None where the data set has none).
        Use [`calibrate_threshold`] on the records for one threshold over all categories.
    """
    from .metrics import compute_metrics

    if batch_size < 1:
        msg = f"batch_size={batch_size} is invalid; pass a positive number of images per forward pass."
        raise ValueError(msg)
    if isinstance(pixel_metric_size, int):
        pixel_metric_size = (pixel_metric_size, pixel_metric_size)
    metric_size = tuple(pixel_metric_size) if pixel_metric_size is not None else image_size_of(model.image_processor)

    all_categories = [str(category) for category in _column(dataset, "category")]
    image_paths = _column(dataset, "image_path")
    wanted = list(dict.fromkeys(all_categories)) if categories is None else list(categories)
    missing = [category for category in wanted if category not in all_categories]
    if missing:
        msg = f"Categories {missing} are not in the data set. Choose from {sorted(set(all_categories))}."
        raise ValueError(msg)

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    is_main = accelerator is None or accelerator.is_main_process
    was_training = model.training
    model.eval()
    collator = _EvaluationCollator(model.image_processor, metric_size)

    per_category: dict[str, dict[str, float]] = {}
    records: list[dict[str, Any]] = []
    try:
        for category in wanted:
            indices = [index for index, name in enumerate(all_categories) if name == category]
            loader = DataLoader(
                _IndexedSubset(dataset, indices),
                batch_size=batch_size,
                shuffle=False,
                num_workers=num_workers,
                collate_fn=collator,
            )
            if accelerator is not None:
                loader = accelerator.prepare_data_loader(loader, device_placement=True)
            scores, labels, maps, masks, order = _score_category(
                model, loader, category, device, metric_size, accelerator, show_progress and is_main
            )
            metrics = dict(compute_metrics(scores, labels, maps, masks, fpr_limit=fpr_limit, category=category))
            threshold, _ = optimal_f1_threshold(scores, labels)
            metrics["image_f1_threshold"] = threshold
            metrics["num_images"] = int(len(scores))
            metrics["num_anomalous"] = int(labels.sum())
            per_category[category] = metrics
            for index, label, score in zip(order.tolist(), labels.tolist(), scores.tolist()):
                path = image_paths[index]
                records.append(
                    {"index": index, "category": category, "label": int(label), "score": float(score), "image_path": path}
                )
            logger.info("Evaluated %s: %d images, %s", category, len(scores), _short_summary(metrics))
    finally:
        model.train(was_training)
    records.sort(key=lambda record: record["index"])
    return per_category, records


def _score_category(
    model: Any,
    loader: DataLoader,
    category: str,
    device: torch.device,
    metric_size: tuple[int, int],
    accelerator: Any,
    show_progress: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the model over one category's loader; return scores, labels, maps, masks and data-set indices."""
    scores, labels, maps, masks, indices = [], [], [], [], []
    for batch in tqdm(loader, desc=f"evaluate {category}", disable=not show_progress, leave=False):
        pixel_values = batch["pixel_values"].to(device)
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, categories=[category] * pixel_values.shape[0])
        anomaly_map = outputs.anomaly_map.float()
        if tuple(anomaly_map.shape[-2:]) != tuple(metric_size):
            anomaly_map = F.interpolate(anomaly_map[:, None], size=metric_size, mode="bilinear", align_corners=False)[:, 0]
        batch_scores = outputs.image_scores.float()
        gathered = (
            batch_scores,
            batch["labels"].to(device),
            anomaly_map,
            batch["masks"].to(device=device, dtype=torch.uint8),
            batch["indices"].to(device),
        )
        if accelerator is not None:
            gathered = accelerator.gather_for_metrics(gathered)
        for store, tensor in zip((scores, labels, maps, masks, indices), gathered):
            store.append(tensor.cpu())
    return (
        torch.cat(scores).numpy(),
        torch.cat(labels).numpy(),
        torch.cat(maps).numpy(),
        torch.cat(masks).numpy(),
        torch.cat(indices).numpy(),
    )


def _short_summary(metrics: dict[str, float]) -> str:
    keys = ("image_auroc", "pixel_auroc", "pixel_aupro")
    return ", ".join(f"{key}={metrics[key]:.4f}" for key in keys if isinstance(metrics.get(key), float))


def calibrate_threshold(records: Sequence[dict[str, Any]]) -> float:
    """Return the image-score threshold with the best F1 over all records (for `config.decision_threshold`)."""
    scores = [record["score"] for record in records]
    labels = [record["label"] for record in records]
    threshold, _ = optimal_f1_threshold(scores, labels)
    return threshold


def add_mean_row(per_category: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return the metrics with a "mean" row: each metric averaged over the categories where it is defined.

    The row also contains `num_categories` (metric -> number of categories its mean covers) and
    `total_categories`, which `cmi_clip.metrics.format_metrics_table` reports.
    """
    from .metrics import METRIC_NAMES

    if "mean" in per_category:
        msg = "A category named 'mean' collides with the mean row; rename that category."
        raise ValueError(msg)
    mean: dict[str, Any] = {}
    covered: dict[str, int] = {}
    for name in METRIC_NAMES:
        values = [float(row[name]) for row in per_category.values() if name in row and not math.isnan(float(row[name]))]
        covered[name] = len(values)
        mean[name] = float(np.mean(values)) if values else math.nan
    mean["num_categories"] = covered
    mean["total_categories"] = len(per_category)
    return {**per_category, "mean": mean}


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model on a data set and write the metric table; return the exit code."""
    from .data import load_dataset_auto
    from .metrics import format_metrics_table
    from .pipeline_anomaly_detection import load_detector

    data_format = None if args.data_format == "auto" else args.data_format
    # Names may come space- or comma-separated, as `train` and `make-demo-data` take them.
    categories = [name for value in args.categories or [] for name in value.split(",") if name] or None
    dataset = load_dataset_auto(args.data, data_format=data_format, categories=categories, split=args.split)
    if len(dataset) == 0:
        logger.error("No images were found in %s (format %s, split %s).", args.data, args.data_format, args.split)
        return 1
    model = load_detector(args.model)
    if args.device is not None:
        model.to(args.device)
    elif torch.cuda.is_available():
        model.to("cuda")
    per_category, records = evaluate_model(
        model, dataset, batch_size=args.batch_size, pixel_metric_size=args.pixel_size, num_workers=args.num_workers
    )
    table_rows = add_mean_row(per_category)
    table = format_metrics_table(table_rows)
    threshold = calibrate_threshold(records)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.md").write_text(table + "\n", encoding="utf-8")
    summary = {
        "model": str(args.model),
        "data": str(args.data),
        "split": args.split,
        "num_images": len(records),
        "optimal_f1_threshold": threshold,
        "metrics": table_rows,
    }
    # NaN (undefined metrics) is written as null to keep the file valid JSON.
    (output / "metrics.json").write_text(json.dumps(_nan_to_none(summary), indent=2) + "\n", encoding="utf-8")
    with open(output / "scores.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    print(table)
    print(f"\nImage-score threshold with the best F1 over all {len(records)} images: {threshold:.4f}")
    print(f"Wrote {output / 'metrics.md'}, {output / 'metrics.json'} and {output / 'scores.jsonl'}.")
    return 0


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `evaluate` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="Score a data set and print the per-category metric table.",
        description=(
            "Score every image of a data set with a CMI-CLIP model (or a plain CLIP checkpoint, run training-free) and "
            "report image AUROC/AP/F1-max and pixel AUROC/AP/F1-max/AUPRO per category and their mean. Writes "
            "metrics.md (the table, in percent), metrics.json (fractions in [0, 1], plus the image-score threshold "
            "with the best F1) and scores.jsonl (one line per image) to OUTPUT."
        ),
    )
    parser.add_argument("--model", required=True, help="Saved CMI-CLIP model or CLIP checkpoint: a folder or a Hub id.")
    parser.add_argument("--data", required=True, help="Root folder of the data set.")
    parser.add_argument(
        "--data-format",
        choices=["auto", "mvtec", "mvtec_ad", "visa", "folder"],
        default="auto",
        help=(
            "Layout of the data set: MVTec AD (mvtec or mvtec_ad), VisA, or a generic folder tree. "
            "Default: auto (detected from the layout)."
        ),
    )
    parser.add_argument(
        "--categories", nargs="+", default=None, metavar="NAME", help="Categories to evaluate, space- or comma-separated. Default: all."
    )
    parser.add_argument("--split", default="test", help="Data-set split to score. Default: test.")
    parser.add_argument("--output", default="evaluation", help="Output folder for metrics.md, metrics.json and scores.jsonl. Default: evaluation.")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per model forward pass. Default: 8.")
    parser.add_argument(
        "--pixel-size",
        type=int,
        default=None,
        help="Side in pixels of the square at which maps and masks are compared for the pixel metrics. Default: the model's input size.",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes for image decoding. Default: 0.")
    parser.add_argument("--device", default=None, help="Torch device, such as 'cpu' or 'cuda:0'. Default: the first GPU if any, else the CPU.")
    parser.set_defaults(func=run_evaluate)
    return parser


__all__ = [
    "add_mean_row",
    "add_parser",
    "calibrate_threshold",
    "evaluate_model",
    "normal_score_threshold",
    "optimal_f1_threshold",
    "run_evaluate",
]
