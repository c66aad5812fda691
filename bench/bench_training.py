# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Measure CMI-CLIP training steps per second with the frozen CLIP backbone against a linear-probe baseline.

Two steps run on the same CLIP weights and the same batch (images, masks and labels):

- `cmi_clip`: one training step of `CMIClipModel` in training mode with the default frozen CLIP.
  It runs the forward with `masks` and `labels` (the cross-view learning loss), `loss.backward()`, and
  `AdamW.step()` plus `zero_grad()` on the trainable parameters (adapters, text adapters, CMI, fusion
  weight).
- `baseline`: the bare CLIP feature forward of `bench_inference.bare_clip_features` under
  `torch.no_grad()` (vision tower with `output_hidden_states=True`, then the post-layernorm and the
  visual projection of the class token and of the feature layers' patch tokens). Then one
  `nn.Linear(projection_dim, 1)` scores every patch token of every feature layer, the per-layer logits are
  averaged, and a binary cross-entropy against the masks max-pooled to the patch grid is minimised with
  `loss.backward()` and `AdamW.step()` plus `zero_grad()`. With a frozen backbone nothing else can
  receive gradients, so this is the least work a trained head on the same features can do.

The steps run interleaved after a warm-up round, and the table reports the median of the repeats.
The weights are random, with the shapes of the real checkpoints (see `bench_inference.MODEL_SPECS`).

Usage:
    python bench/bench_training.py --quick
    python bench/bench_training.py --models b16 --batch-size 8 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import (  # noqa: E402 (the sibling script is found through the path set above)
    CATEGORY,
    DTYPES,
    MODEL_SPECS,
    CallCounter,
    add_shared_options,
    autocast_context,
    bare_clip_features,
    load_model,
    run_and_print,
    set_model_names,
    time_rounds,
    warm_up,
)

STEPS = ("baseline", "cmi_clip")


def make_batch(batch_size: int, height: int, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Return random images, rectangular masks on every other image, and the matching labels."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, height, width, generator=generator)
    masks = torch.zeros(batch_size, height, width)
    for index in range(0, batch_size, 2):
        top, left = torch.randint(0, height // 2, (2,), generator=generator).tolist()
        masks[index, top : top + height // 4, left : left + width // 4] = 1.0
    labels = (masks.flatten(1).amax(1) > 0).float()
    return {"pixel_values": pixel_values.to(device), "masks": masks.to(device), "labels": labels.to(device)}


class LinearProbe(nn.Module):
    """Linear patch classifier shared by the feature layers, whose per-layer logits are averaged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(dim, 1)

    def forward(self, patch_tokens: list[torch.Tensor]) -> torch.Tensor:
        """Map patch tokens [(B, N, D)] to patch logits (B, N)."""
        return torch.stack([self.classifier(tokens)[..., 0] for tokens in patch_tokens]).mean(0)


def bench_training(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time both training steps for one model and return a row with the medians and the step peaks."""
    dtype = DTYPES[args.dtype]
    model = load_model(name, args.cache_dir, device).train()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    probe = LinearProbe(model.config.clip_config.projection_dim).to(device)
    probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    height, width = model.config.image_size
    patch_size = model.config.clip_config.vision_config.patch_size
    batch = make_batch(args.batch_size, height, width, device)
    patch_masks = F.max_pool2d(batch["masks"][:, None], patch_size)[:, 0].flatten(1)

    def baseline_step() -> None:
        with autocast_context(device, dtype):
            with torch.no_grad():
                _, patch_tokens = bare_clip_features(model, batch["pixel_values"])
            logits = probe(patch_tokens)
            loss = F.binary_cross_entropy_with_logits(logits.float(), patch_masks)
        loss.backward()
        probe_optimizer.step()
        probe_optimizer.zero_grad(set_to_none=True)

    def cmi_clip_step() -> None:
        with autocast_context(device, dtype):
            outputs = model(
                pixel_values=batch["pixel_values"], categories=CATEGORY, masks=batch["masks"], labels=batch["labels"]
            )
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = {"baseline": baseline_step, "cmi_clip": cmi_clip_step}
    peaks = warm_up({step: steps[step] for step in STEPS}, args.warmup, device, name)

    counter = CallCounter(model.clip.text_model)
    times = time_rounds({step: steps[step] for step in STEPS}, args.repeats, device, name)
    text_forwards = counter.count
    counter.remove()

    row = {
        "model": name,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "text_forwards": text_forwards,
        "trainable_parameters": sum(parameter.numel() for parameter in trainable),
        "probe_parameters": sum(parameter.numel() for parameter in probe.parameters()),
    }
    for step in STEPS:
        row[f"{step}_seconds"] = statistics.median(times[step])
        row[f"{step}_peak"] = peaks[step]
    del model, probe, optimizer, probe_optimizer, batch
    gc.collect()
    return row


def format_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Format the rows as one markdown table."""
    mebibyte = 2**20
    precision = args.dtype + (" (autocast)" if args.dtype != "fp32" else "")
    lines = [
        f"Device: {args.device}, precision: {precision}, warm-up rounds: {args.warmup}",
        "",
        "| Model | Batch | Repeats | Trainable params | Baseline steps/s | CMI-CLIP steps/s | CMI-CLIP/baseline "
        "| Baseline step peak MiB | CMI-CLIP step peak MiB | Text forwards in timed loop |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        baseline = 1.0 / row["baseline_seconds"]
        cmi_clip = 1.0 / row["cmi_clip_seconds"]
        lines.append(
            f"| {MODEL_SPECS[row['model']]['label']} | {row['batch_size']} | {row['repeats']} | {row['trainable_parameters']:,} "
            f"| {baseline:.3f} | {cmi_clip:.3f} | {cmi_clip / baseline:.3f} "
            f"| {row['baseline_peak'] / mebibyte:.0f} | {row['cmi_clip_peak'] / mebibyte:.0f} | {row['text_forwards']} |"
        )
    lines.append("")
    lines.append("Step peak: the maximum of the tensor bytes allocated during one step above those live before it (weights not included).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="b16", help=f"Comma-separated models from {sorted(MODEL_SPECS)} (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=8, help="Images per training step (default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds; the median is reported (default: %(default)s).")
    add_shared_options(parser)
    parser.add_argument("--quick", action="store_true", help="ViT-B/16, batch 2, 2 repeats: a smoke run.")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.repeats = "b16", 2, 2
    set_model_names(parser, args)
    if args.repeats < 1 or args.warmup < 1 or args.batch_size < 1:
        parser.error("--repeats, --warmup and --batch-size must be at least 1.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_print(args, lambda device: [bench_training(name, args, device) for name in args.model_names], format_results)


if __name__ == "__main__":
    sys.exit(main())
