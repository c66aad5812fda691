# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""The `cmi-clip calibrate` subcommand: set a product's decision threshold from its normal images.

A zero-shot model's image scores sit at different levels for different products, so one threshold
rarely suits them all. A few images of good parts of the new product are enough to set its own
threshold: the lowest score that labels at most `--false-positive-rate` of them anomalous. The value
is stored in `config.category_thresholds` of the model folder, and the pipeline and `cmi-clip predict`
use it for that category.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def score_images(detector: Any, images: Sequence[Any], category: str, batch_size: int = 8) -> list[float]:
    """Return the image scores of `images` from an `AnomalyDetectionPipeline`."""
    results = detector(list(images), category=category, batch_size=batch_size)
    return [float(result["score"]) for result in results]


def calibrate_category_threshold(
    detector: Any, images: Sequence[Any], category: str, false_positive_rate: float = 0.0, batch_size: int = 8
) -> tuple[float, list[float]]:
    """Score normal images of one category and store their threshold in the model's config.

    Args:
        detector: An `AnomalyDetectionPipeline`.
        images: Normal images of the category, in any input form the pipeline takes.
        category: Product category of the images.
        false_positive_rate: Allowed fraction of the images labelled anomalous, in [0, 1).
        batch_size: Images per model forward pass.

    Returns:
        `(threshold, scores)`. The threshold is also written to
        `detector.model.config.category_thresholds`, so `save_pretrained` keeps it.
    """
    from .evaluation import normal_score_threshold
    from .prompt_bank import normalize_category

    if not images:
        msg = f"No normal images of {category!r} were given. Pass at least one to set its threshold."
        raise ValueError(msg)
    scores = score_images(detector, images, category, batch_size)
    threshold = normal_score_threshold(scores, false_positive_rate)
    detector.model.config.category_thresholds[normalize_category(category)] = threshold
    return threshold, scores


def write_category_threshold(model_dir: str | Path, category: str, threshold: float) -> Path:
    """Set one entry of `category_thresholds` in a saved model's `config.json`, replacing the file atomically."""
    from .prompt_bank import normalize_category

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        msg = f"{config_path} was not found. Pass a local model folder written by save_pretrained (for example demo_output/model)."
        raise FileNotFoundError(msg)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    thresholds = config.get("category_thresholds") or {}
    thresholds[normalize_category(category)] = threshold
    config["category_thresholds"] = thresholds
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=config_path.parent, suffix=".tmp", delete=False) as handle:
        handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(handle.name, config_path)
    return config_path


def run_calibrate(args: argparse.Namespace) -> int:
    """Score the normal images named by `args`, then print their threshold and store it.

    Returns 0, or 1 when no image could be scored.
    """
    from .evaluation import normal_score_threshold
    from .pipeline_anomaly_detection import AnomalyDetectionPipeline, load_detector
    from .predict import collect_images, iter_batches, load_readable

    if args.batch_size < 1:
        msg = f"--batch-size {args.batch_size} is invalid; pass a positive number of images per forward pass."
        raise ValueError(msg)
    if not 0.0 <= args.false_positive_rate < 1.0:
        msg = f"--false-positive-rate {args.false_positive_rate} is invalid; pass a fraction in [0, 1), such as 0.01."
        raise ValueError(msg)
    if not args.dry_run and not (Path(args.model) / "config.json").is_file():
        msg = (
            f"{args.model} is not a local model folder with a config.json, so the threshold cannot be stored. "
            "Save the model to a folder first, or pass --dry-run to only print the threshold."
        )
        raise FileNotFoundError(msg)

    images, skipped = collect_images(args.inputs)
    detector = AnomalyDetectionPipeline(model=load_detector(args.model), device=args.device)
    scores: list[float] = []
    progress = tqdm(total=len(images), desc="calibrate", unit="image")
    for batch in iter_batches(images, args.batch_size):
        readable = [image for _, _, image in load_readable(batch, skipped)]
        if readable:
            scores.extend(score_images(detector, readable, args.category, args.batch_size))
        progress.update(len(batch))
    progress.close()
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}")
    if not scores:
        print(f"No normal image of {args.category!r} could be scored, so no threshold was set.")
        return 1

    previous = detector.model.config.threshold_for(args.category)
    threshold = normal_score_threshold(scores, args.false_positive_rate)
    flagged = sum(score >= threshold for score in scores)
    print(
        f"Scored {len(scores)} normal images of {args.category!r}: min {min(scores):.4f}, "
        f"median {float(np.median(scores)):.4f}, max {max(scores):.4f}."
    )
    print(f"Threshold for {args.category!r}: {threshold:.6f} (was {previous:.6f}); {flagged} of these images score at or above it.")
    if args.dry_run:
        print("Dry run: the model folder was not changed.")
    else:
        print(f"Stored in {write_category_threshold(args.model, args.category, threshold)}.")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `calibrate` subcommand."""
    parser = subparsers.add_parser(
        "calibrate",
        help="Set a product's decision threshold from images of its good parts.",
        description=(
            "Score normal images of one product category (files and folders, searched recursively) and store the "
            "lowest image score that labels at most --false-positive-rate of them anomalous in the model folder's "
            "config.json (category_thresholds). The pipeline and cmi-clip predict then use it for that category. "
            "Unreadable files are listed and skipped."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="Images or folders of normal (defect-free) images of the product.")
    parser.add_argument("--model", required=True, help="Local folder of a saved CMI-CLIP model, whose config.json is updated.")
    parser.add_argument("--category", required=True, help="Product category of the images, such as 'bottle' (selects the prompts).")
    parser.add_argument(
        "--false-positive-rate",
        type=float,
        default=0.0,
        help="Fraction of the given normal images allowed at or above the threshold, in [0, 1). Default: 0 (all labelled normal).",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Images per model forward pass. Default: 8.")
    parser.add_argument("--dry-run", action="store_true", help="Print the threshold without changing the model folder.")
    parser.add_argument("--device", default=None, help="Torch device, such as 'cpu' or 'cuda:0'. Default: the first GPU if any, else the CPU.")
    parser.set_defaults(func=run_calibrate)
    return parser


__all__ = ["add_parser", "calibrate_category_threshold", "run_calibrate", "score_images", "write_category_threshold"]
