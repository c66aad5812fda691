# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""The `cmi-clip predict` subcommand: score image files and folders.

Writes a table (CSV or JSON) of path, category, score and label, a heat-map overlay per image, and with
`--panels` the panel of image, branch maps, fused map and CMI attention maps. Files that cannot be read
are listed and skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Expand files and folders (searched recursively) into image files.

    Returns:
        `(images, skipped)`. `images` pairs each file with its path relative to the input it came from,
        which names the outputs, sorted within each folder. `skipped` pairs each missing input with the
        reason.
    """
    images: list[tuple[Path, Path]] = []
    skipped: list[tuple[str, str]] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                skipped.append((str(path), f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder"))
            images.extend((file, file.relative_to(path)) for file in found)
        elif path.is_file():
            images.append((path, Path(path.name)))
        else:
            skipped.append((str(path), "not found"))
    return images, skipped


def iter_batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Yield consecutive slices of `items` with `size` elements, the last one possibly shorter."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_readable(batch: Sequence[tuple[Path, Path]], skipped: list[tuple[str, str]]) -> list[tuple[Path, Path, Image.Image]]:
    """Open the `(path, relative)` pairs of `batch` as RGB images. Unreadable files are logged and appended to `skipped`."""
    from .pipeline_anomaly_detection import load_image
    from .processing_cmi_clip import to_rgb

    loaded = []
    for path, relative in batch:
        try:
            loaded.append((path, relative, to_rgb(load_image(path))))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            skipped.append((str(path), f"unreadable: {error}"))
            logger.warning("Skipping %s: %s", path, error)
    return loaded


def _output_name(relative: Path, used: set[str]) -> str:
    """Return a unique flat PNG name for an input, built from its relative path ("a/b.jpg" -> "a__b.png")."""
    stem = "__".join(relative.with_suffix("").parts)
    name, counter = f"{stem}.png", 1
    while name in used:
        name = f"{stem}_{counter}.png"
        counter += 1
    used.add(name)
    return name


def _write_table(path: Path, rows: list[dict[str, Any]], table_format: str) -> None:
    if table_format == "json":
        path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "category", "score", "label", "overlay"])
        writer.writeheader()
        writer.writerows(rows)


def run_predict(args: argparse.Namespace) -> int:
    """Score the images named by `args` and write the outputs; return 0, or 1 when no image was scored."""
    from .pipeline_anomaly_detection import DEFAULT_CATEGORY, AnomalyDetectionPipeline, load_detector
    from .visualization import overlay_heatmap, save_panel

    if args.batch_size < 1:
        logger.error("--batch-size %d is invalid; pass a positive number of images per forward pass.", args.batch_size)
        return 2
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        logger.error("--threshold %s is outside [0, 1]; scores are probabilities.", args.threshold)
        return 2
    images, skipped = collect_images(args.inputs)
    model = load_detector(args.model)
    output = Path(args.output)
    overlay_dir = output / "overlays"
    panel_dir = output / "panels"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    if args.panels:
        panel_dir.mkdir(parents=True, exist_ok=True)

    detector = AnomalyDetectionPipeline(model=model, device=args.device)
    call_kwargs: dict[str, Any] = {"category": args.category, "batch_size": args.batch_size}
    if args.threshold is not None:
        call_kwargs["threshold"] = args.threshold
    if args.panels:
        call_kwargs.update(return_branch_maps=True, return_attentions=True)

    rows: list[dict[str, Any]] = []
    used_names: set[str] = set()
    progress = tqdm(total=len(images), desc="predict", unit="image")
    for batch in iter_batches(images, args.batch_size):
        loaded = load_readable(batch, skipped)
        if loaded:
            results = detector([image for _, _, image in loaded], **call_kwargs)
            for (path, relative, image), result in zip(loaded, results):
                name = _output_name(relative, used_names)
                overlay_heatmap(image, result["anomaly_map"]).save(overlay_dir / name)
                if args.panels:
                    save_panel(
                        panel_dir / name,
                        image,
                        None,
                        result["abnormality_map"],
                        result["normality_map"],
                        result["anomaly_map"],
                        attentions=result.get("attentions"),
                        title=f"{relative} - score {result['score']:.3f} ({result['label']})",
                    )
                rows.append(
                    {
                        "path": str(path),
                        "category": args.category or DEFAULT_CATEGORY,
                        "score": round(result["score"], 6),
                        "label": result["label"],
                        "overlay": str(Path("overlays") / name),
                    }
                )
        progress.update(len(batch))
    progress.close()

    table_path = output / f"predictions.{args.format}"
    _write_table(table_path, rows, args.format)
    anomalous = sum(row["label"] == "anomalous" for row in rows)
    print(f"Scored {len(rows)} images: {anomalous} anomalous, {len(rows) - anomalous} normal. Skipped {len(skipped)}.")
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}")
    print(f"Wrote {table_path} and overlays to {overlay_dir}" + (f", panels to {panel_dir}" if args.panels else "") + ".")
    return 0 if rows else 1


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `predict` subcommand."""
    parser = subparsers.add_parser(
        "predict",
        help="Score images or folders and write scores, labels and overlays.",
        description=(
            "Score image files and folders (searched recursively) with a CMI-CLIP model or a plain CLIP checkpoint "
            "(run training-free). Writes predictions.csv or predictions.json (path, category, score, label), a heat-map "
            "overlay PNG per image under OUTPUT/overlays, and with --panels the branch-map panels under OUTPUT/panels. "
            "Unreadable files are listed and skipped."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="Image files or folders of images.")
    parser.add_argument("--model", required=True, help="Saved CMI-CLIP model or CLIP checkpoint: a folder or a Hub id.")
    parser.add_argument(
        "--category", default=None, help="Product category of all images, such as 'bottle' (selects the prompts). Default: 'object'."
    )
    parser.add_argument("--output", default="predictions", help="Output folder for the table, overlays and panels. Default: predictions.")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=(
            "Image score in [0, 1] at and above which an image is labelled anomalous. Default: the model's threshold "
            "for --category (set by cmi-clip calibrate), else its decision_threshold."
        ),
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Images per model forward pass. Default: 8.")
    parser.add_argument("--format", choices=["csv", "json"], default="csv", help="Format of the predictions table. Default: csv.")
    parser.add_argument(
        "--panels", action="store_true", help="Also write a panel per image: image, branch maps, fused map and CMI attention maps."
    )
    parser.add_argument("--device", default=None, help="Torch device, such as 'cpu' or 'cuda:0'. Default: the first GPU if any, else the CPU.")
    parser.set_defaults(func=run_predict)
    return parser


__all__ = ["add_parser", "collect_images", "iter_batches", "load_readable", "run_predict"]
