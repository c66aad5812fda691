# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""The `cmi-clip` command line.

Each subcommand lives in the module that implements it: that module defines `add_parser(subparsers)`,
which adds the subcommand and sets `func` to a callable taking the parsed arguments and returning an
exit code. Modules are imported only when their subcommand runs, so `cmi-clip --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand name -> (module that implements it, one-line description).
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cmi_clip.demo", "Run the offline end-to-end demo: synthetic data, training, zero-shot evaluation, report."),
    "train": ("cmi_clip.training", "Train the CMI heads on one data set and evaluate zero-shot on another."),
    "evaluate": ("cmi_clip.evaluation", "Score a data set and print the per-category metric table."),
    "predict": ("cmi_clip.predict", "Score images or folders and write scores, labels and overlays."),
    "calibrate": ("cmi_clip.calibrate", "Set a product's decision threshold from images of its good parts."),
    "make-demo-data": ("cmi_clip.data.synthetic", "Write an MVTec-layout data set of real photos with synthesized defects."),
    "convert-clip": ("cmi_clip.convert", "Convert an OpenAI or OpenCLIP checkpoint into a transformers CLIP folder."),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; with `command`, only that subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="cmi-clip",
        description="Zero-shot industrial anomaly detection and localization with CLIP (CMI-CLIP).",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Logging verbosity.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, description) in COMMANDS.items():
        if command == name:
            module = importlib.import_module(module_name)
            module.add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=description, description=description)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `cmi-clip` command line and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if arg in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    # transformers logs every loaded config at INFO, so it stays at WARNING unless DEBUG is requested.
    level = getattr(logging, args.log_level)
    hf_logging.set_verbosity(level if level == logging.DEBUG else max(level, logging.WARNING))
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        # Invalid values and missing files are the user's to fix: one line, no traceback.
        print(f"cmi-clip {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
