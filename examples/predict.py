# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Score images with the `anomaly-detection` pipeline and save heat-map overlays.

    python examples/predict.py --model path/to/cmi-clip-model --category bottle bottle_001.png bottle_002.png

`--model` may also be a plain CLIP checkpoint (such as openai/clip-vit-base-patch16), which runs
training-free. For folders of images, CSV/JSON output and figure panels, use `cmi-clip predict`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import pipeline

from cmi_clip.pipeline_anomaly_detection import register_pipeline
from cmi_clip.visualization import overlay_heatmap


def main(argv: list[str] | None = None) -> int:
    """Score the images given on the command line; return the exit code."""
    parser = argparse.ArgumentParser(description="Score images with a CMI-CLIP model and save heat-map overlays.")
    parser.add_argument("images", nargs="+", help="Image files.")
    parser.add_argument("--model", required=True, help="Saved CMI-CLIP model or CLIP checkpoint: a folder or a Hub id.")
    parser.add_argument("--category", default=None, help="Product category of the images, such as 'bottle'. Default: 'object'.")
    parser.add_argument("--threshold", type=float, default=None, help="Image score in [0, 1] at and above which an image is anomalous.")
    parser.add_argument("--output", default="overlays", help="Folder for the overlay PNGs. Default: overlays.")
    args = parser.parse_args(argv)

    # Registers the task for plain CLIP checkpoints; `import cmi_clip` does the same, and a second call does nothing.
    register_pipeline()
    # Saved CMI-CLIP folders ship the pipeline code and declare it in config.json, which transformers
    # runs only with trust_remote_code=True.
    detector = pipeline("anomaly-detection", model=args.model, trust_remote_code=True)
    options = {"category": args.category}
    if args.threshold is not None:
        options["threshold"] = args.threshold
    results = detector(list(args.images), **options)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for index, (path, result) in enumerate(zip(args.images, results)):
        # The index keeps files of the same name from different folders apart.
        overlay_path = output / f"{index:04d}_{Path(path).stem}_overlay.png"
        overlay_heatmap(path, result["anomaly_map"]).save(overlay_path)
        print(f"{path}: score {result['score']:.4f} ({result['label']}), overlay {overlay_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
