# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Publish a CMI-CLIP model on the Hugging Face Hub with its pipeline code and a model card.

    huggingface-cli login
    python examples/push_to_hub.py --model runs/visa_to_mvtec/final --repo-id you/cmi-clip-vitl14-visa \
        --metrics evaluation/metrics.json --training-data "VisA, all 12 categories" --eval-data "MVTec AD"

`--metrics` reads the metrics.json that `cmi-clip evaluate` writes. With `--dry-run`, the folder and the
model card are written to `--local-dir` and nothing is uploaded; the folder then loads with
`pipeline("anomaly-detection", model=LOCAL_DIR, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import json
import sys

from cmi_clip.hub import push_to_hub, save_for_pipeline, write_model_card
from cmi_clip.pipeline_anomaly_detection import load_detector


def read_metrics(path: str | None) -> dict | None:
    """Read per-category metrics from an evaluate metrics.json, or from a plain {category: metrics} file."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    metrics = content.get("metrics", content)
    # Undefined metrics are stored as null; the card leaves them out.
    return {name: {key: value for key, value in row.items() if isinstance(value, (int, float))} for name, row in metrics.items()}


def main(argv: list[str] | None = None) -> int:
    """Save the model folder with a model card and upload it; return the exit code."""
    parser = argparse.ArgumentParser(description="Publish a CMI-CLIP model on the Hugging Face Hub.")
    parser.add_argument("--model", required=True, help="Saved CMI-CLIP model folder (or a CLIP checkpoint, published training-free).")
    parser.add_argument("--repo-id", required=True, help="Hub repository, 'user/name'. Created when missing.")
    parser.add_argument("--metrics", default=None, help="metrics.json written by `cmi-clip evaluate`.")
    parser.add_argument("--training-data", default=None, help="Description of the training data for the model card.")
    parser.add_argument("--eval-data", default=None, help="Name of the evaluation data set for the model card, such as 'MVTec AD'.")
    parser.add_argument("--local-dir", default=None, help="Folder to write before uploading. Default: a temporary folder.")
    parser.add_argument(
        "--threshold-calibrated", action="store_true", help="State in the card that decision_threshold was calibrated on validation data."
    )
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--dry-run", action="store_true", help="Write the folder and card to --local-dir only; upload nothing.")
    args = parser.parse_args(argv)

    model = load_detector(args.model)
    metrics = read_metrics(args.metrics)
    card_kwargs = {"threshold_calibrated": args.threshold_calibrated}
    if args.dry_run:
        if args.local_dir is None:
            parser.error("--dry-run needs --local-dir to write the folder to.")
        save_for_pipeline(model, args.local_dir)
        write_model_card(
            model,
            args.local_dir,
            metrics=metrics,
            training_data=args.training_data,
            eval_data=args.eval_data,
            repo_id=args.repo_id,
            **card_kwargs,
        )
        print(f"Wrote {args.local_dir}; nothing was uploaded.")
        return 0
    commit = push_to_hub(
        model,
        args.repo_id,
        local_dir=args.local_dir,
        metrics=metrics,
        training_data=args.training_data,
        eval_data=args.eval_data,
        private=args.private,
        card_kwargs=card_kwargs,
    )
    print(f"Uploaded to https://huggingface.co/{args.repo_id} ({getattr(commit, 'commit_url', commit)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
