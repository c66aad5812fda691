# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Evaluate a CMI-CLIP model per category and optionally save it with a calibrated decision threshold.

    python examples/evaluate.py --model runs/visa_to_mvtec/final --data /data/mvtec_ad
    python examples/evaluate.py --model runs/visa_to_mvtec/final --data /data/visa_val \
        --save-calibrated runs/visa_to_mvtec/calibrated

With `--save-calibrated`, the image-score threshold with the best F1 over all scored images becomes
`config.decision_threshold`, which the pipeline uses to label images. Calibrate on data that is not
the test set. `cmi-clip evaluate` writes the same table to files.
"""

from __future__ import annotations

import argparse
import sys

from cmi_clip.data import load_dataset_auto
from cmi_clip.evaluation import add_mean_row, calibrate_threshold, evaluate_model
from cmi_clip.hub import save_for_pipeline
from cmi_clip.metrics import format_metrics_table
from cmi_clip.pipeline_anomaly_detection import load_detector


def main(argv: list[str] | None = None) -> int:
    """Evaluate the model and print the metric table; return the exit code."""
    parser = argparse.ArgumentParser(description="Evaluate a CMI-CLIP model per category.")
    parser.add_argument("--model", required=True, help="Saved CMI-CLIP model or CLIP checkpoint: a folder or a Hub id.")
    parser.add_argument("--data", required=True, help="Root folder of an MVTec AD, VisA or image-folder data set.")
    parser.add_argument("--categories", nargs="+", default=None, help="Categories to evaluate. Default: all.")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per model forward pass. Default: 8.")
    parser.add_argument("--pixel-size", type=int, default=None, help="Side in pixels at which pixel metrics are computed. Default: the model's input size.")
    parser.add_argument("--save-calibrated", default=None, help="Folder to save the model to, with decision_threshold set to the best-F1 threshold.")
    args = parser.parse_args(argv)

    dataset = load_dataset_auto(args.data, categories=args.categories)
    model = load_detector(args.model)
    per_category, records = evaluate_model(model, dataset, batch_size=args.batch_size, pixel_metric_size=args.pixel_size)
    print(format_metrics_table(add_mean_row(per_category)))
    threshold = calibrate_threshold(records)
    print(f"\nImage-score threshold with the best F1 over {len(records)} images: {threshold:.4f}")

    if args.save_calibrated:
        model.config.decision_threshold = threshold
        save_for_pipeline(model, args.save_calibrated)
        print(f"Saved the model with decision_threshold={threshold:.4f} to {args.save_calibrated}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
