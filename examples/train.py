# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Train CMI-CLIP on one data set and evaluate it zero-shot on another, with 🤗 Accelerate.

Single process (CPU or one GPU):

    python examples/train.py --clip_model openai/clip-vit-large-patch14-336 --image_size 518 \
        --train_data /data/visa --eval_data /data/mvtec_ad --output_dir runs/visa_to_mvtec

Several GPUs, bf16:

    accelerate launch --multi_gpu --num_processes 4 --mixed_precision bf16 examples/train.py ...

Two CPU processes (gloo), for testing:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train.py ...

The options are defined once in `cmi_clip.training.build_train_argument_parser`, so this script and
`cmi-clip train` accept the same ones, and both run `cmi_clip.training.train`: seeding before the
model is built, `Accelerator.prepare`, `accumulate`/`backward`, `save_state`/`load_state`
checkpoints, `gather_for_metrics` evaluation and `end_training`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cmi_clip.training import build_train_argument_parser, config_from_args, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line into the training options."""
    parser = argparse.ArgumentParser(description="Train CMI-CLIP with cross-view learning and evaluate it zero-shot.")
    build_train_argument_parser(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run training and evaluation; return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The options object is kept apart from the parsed arguments, as in Accelerate's examples.
    config = config_from_args(args)
    results = train(config)
    if results["model_dir"]:
        logging.getLogger(__name__).info("Model saved to %s", results["model_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
