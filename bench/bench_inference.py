# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Measure the inference throughput and peak memory of CMI-CLIP against the bare CLIP vision forward.

Three modes run on the same CLIP weights:

- `bare`: the floor. `CLIPVisionModel`-style forward of `clip.vision_model` with
  `output_hidden_states=True`, then the post-layernorm and visual projection of the class token and of
  the patch tokens of the feature layers (the layers `CMIClipModel` reads).
- `model`: `CMIClipModel.forward` on a ready batch (B, 3, H, W), after a warm-up call that caches the
  category's text embeddings.
- `pipeline`: the `anomaly-detection` pipeline end to end: decode PNG bytes, preprocess, forward and
  postprocess to PIL maps of the original image size.

The weights are random, with the shapes of the real checkpoints: ViT-B/16 at 224 px, ViT-L/14-336 at
336 px, and the same ViT-L/14 at 518 px with interpolated position embeddings. Speed does not depend
on the values of the weights. The modes run interleaved (bare, model, pipeline, bare, ...) after a
warm-up round, and the tables report the median of the repeats.

Peak memory is the bytes of the weights plus the call peak: the maximum of the tensor bytes allocated
during one call above those allocated before it. On CUDA the call peak comes from
`torch.cuda.max_memory_allocated`. On CPU it comes from the allocation events of `torch.profiler`
(`profile_memory=True`): the running sum of tensor allocations and frees, in time order. Both count
tensors that torch allocates, not Python objects or PIL buffers. The bare peak is reported with the
vision weights only (the floor) and with all CLIP weights, because a CLIP-based detector also keeps
the text tower in memory. The targets use the latter. The model and the pipeline count all CMI-CLIP
weights.

On a shared CPU, pass `--threads 1` (or the number of idle cores): extra threads make every small
operator wait for descheduled threads, which slows the CMI-CLIP heads far more than CLIP.

Usage:
    python bench/bench_inference.py --quick
    python bench/bench_inference.py --models b16 --batch-sizes 1,8 --repeats 5 --threads 1
    python bench/bench_inference.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import CLIPConfig
from transformers import pipeline as hf_pipeline

from cmi_clip import CMIClipModel
from cmi_clip.clip_utils import save_random_clip
from cmi_clip.pipeline_anomaly_detection import register_pipeline

# Vision and text dimensions of OpenAI's checkpoints. `image_size` is the input size of the CMI-CLIP model.
MODEL_SPECS: dict[str, dict[str, Any]] = {
    "b16": {
        "clip": "ViT-B/16",
        "label": "ViT-B/16 @ 224",
        "image_size": 224,
        "vision": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 16, "image_size": 224},
        "text": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8},
        "projection_dim": 512,
    },
    "l14-336": {
        "clip": "ViT-L/14-336",
        "label": "ViT-L/14-336 @ 336",
        "image_size": 336,
        "vision": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "image_size": 336},
        "text": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
        "projection_dim": 768,
    },
}
# The ViT-L/14-336 weights at 518 px input, with interpolated position embeddings.
MODEL_SPECS["l14-518"] = {**MODEL_SPECS["l14-336"], "label": "ViT-L/14 @ 518", "image_size": 518}

MODES = ("bare", "model", "pipeline")
CATEGORY = "bottle"
# Targets: throughput relative to the bare forward (at least) and peak memory relative to it (at most).
MODEL_SPEED_TARGET = 0.85
PIPELINE_SPEED_TARGET = 0.75
MEMORY_TARGET = 1.2
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_clip_config(spec: dict[str, Any]) -> CLIPConfig:
    """Return a `CLIPConfig` with the real dimensions of `spec` and CLIP's vocabulary and context."""
    vision = {**spec["vision"], "intermediate_size": 4 * spec["vision"]["hidden_size"], "projection_dim": spec["projection_dim"]}
    text = {
        **spec["text"],
        "intermediate_size": 4 * spec["text"]["hidden_size"],
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "projection_dim": spec["projection_dim"],
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])


def random_clip_dir(name: str, cache_dir: Path) -> Path:
    """Save (once) and return a random-weight CLIP folder with the shapes of `MODEL_SPECS[name]`."""
    spec = MODEL_SPECS[name]
    folder = cache_dir / spec["clip"].replace("/", "-")
    if not (folder / "config.json").is_file():
        print(f"Saving a random {spec['clip']} to {folder} ...", flush=True)
        save_random_clip(folder, build_clip_config(spec))
    return folder


def load_model(name: str, cache_dir: Path, device: torch.device) -> CMIClipModel:
    """Build an evaluation-mode `CMIClipModel` for `name` on `device`."""
    folder = random_clip_dir(name, cache_dir)
    image_size = MODEL_SPECS[name]["image_size"]
    model = CMIClipModel.from_clip_pretrained(folder, image_size=image_size)
    return model.to(device).eval()


def bare_clip_features(model: CMIClipModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the bare CLIP vision forward and project the class token and the feature layers' patch tokens.

    Returns:
        The projected class token (B, D) and one projected patch-token tensor (B, N, D) per feature layer.
    """
    clip = model.clip
    vision = clip.vision_model
    native = vision.config.image_size
    outputs = vision(
        pixel_values=pixel_values,
        output_hidden_states=True,
        interpolate_pos_encoding=tuple(pixel_values.shape[-2:]) != (native, native),
    )
    image_embedding = clip.visual_projection(outputs.pooler_output)
    # hidden_states[0] is the embedding output, so hidden_states[layer] is the output of that 1-based layer.
    patch_tokens = [
        clip.visual_projection(vision.post_layernorm(outputs.hidden_states[layer][:, 1:])) for layer in model.config.feature_layers
    ]
    return image_embedding, patch_tokens


def encode_png(image: Image.Image) -> bytes:
    """Return the PNG bytes of `image`."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def coffee_photo(size: int) -> Image.Image:
    """Return a natural RGB photograph (scikit-image's coffee cup) resized to `size` x `size`."""
    from skimage import data

    return Image.fromarray(data.coffee()).resize((size, size), Image.Resampling.BICUBIC)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Return `torch.autocast` for `dtype`, or a no-op context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def warm_up(functions: dict[str, Callable[[], Any]], rounds: int, device: torch.device, label: str) -> dict[str, int]:
    """Run every function `rounds` times untimed, in order, and return the peak bytes of each call in the last round.

    Only the last warm-up round measures memory, so the profiler never runs in a timed call.
    """
    peaks: dict[str, int] = {}
    for round_index in range(rounds):
        for name, function in functions.items():
            if round_index == rounds - 1:
                peaks[name] = peak_call_bytes(function, device)
            else:
                function()
        print(f"  {label}: warm-up round {round_index + 1}/{rounds} done", flush=True)
    return peaks


def time_rounds(functions: dict[str, Callable[[], Any]], repeats: int, device: torch.device, label: str) -> dict[str, list[float]]:
    """Time every function once per round, in order, for `repeats` rounds, and print each round's times."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(repeats):
        for name, function in functions.items():
            times[name].append(time_call(function, device))
        summary = ", ".join(f"{name} {values[-1]:.3f} s" for name, values in times.items())
        print(f"  {label}: repeat {round_index + 1}/{repeats}: {summary}", flush=True)
    return times


def time_call(function: Callable[[], Any], device: torch.device) -> float:
    """Return the wall-clock seconds of one call, with the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def peak_call_bytes(function: Callable[[], Any], device: torch.device) -> int:
    """Return the maximum tensor bytes allocated during one call of `function`, above those live before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    # Each allocation event carries the bytes allocated (positive) or freed (negative), and the running
    # sum in time order starts at zero with the profiler. NOTE: the event tree is a private torch API (torch 2.14).
    changes: list[tuple[int, int]] = []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            changes.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running, peak = 0, 0
    for _, change in sorted(changes):
        running += change
        peak = max(peak, running)
    return peak


def parameter_bytes(modules: list[torch.nn.Module]) -> int:
    """Return the bytes of the parameters and buffers of `modules`."""
    tensors = [tensor for module in modules for tensor in (*module.parameters(), *module.buffers())]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class CallCounter:
    """Count forward calls of a module through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def bench_model(name: str, batch_sizes: list[int], args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Measure the three modes of one model at each batch size and return one row per batch size."""
    dtype = DTYPES[args.dtype]
    model = load_model(name, args.cache_dir, device)
    register_pipeline()
    detector = hf_pipeline("anomaly-detection", model=model, device=device)
    png = encode_png(coffee_photo(args.original_size))
    height, width = model.config.image_size
    # Weights: the bare forward reads the vision tower and the visual projection, a bare CLIP model
    # also contains the text tower, and CMI-CLIP adds adapters and CMI to that.
    weights = {
        "vision": parameter_bytes([model.clip.vision_model, model.clip.visual_projection]),
        "clip": parameter_bytes([model.clip]),
        "cmi_clip": parameter_bytes([model]),
    }
    # Encode the category once, so no call below includes the text forward.
    with torch.inference_mode():
        model.encode_category(CATEGORY)

    rows = []
    for batch_size in batch_sizes:
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(batch_size, 3, height, width, generator=generator).to(device)
        images_bytes = [png] * batch_size

        def run_bare() -> Any:
            with torch.inference_mode(), autocast_context(device, dtype):
                return bare_clip_features(model, pixel_values)

        def run_model() -> Any:
            with torch.inference_mode(), autocast_context(device, dtype):
                return model(pixel_values=pixel_values, categories=CATEGORY)

        def run_pipeline() -> Any:
            images = [Image.open(io.BytesIO(data)) for data in images_bytes]
            with autocast_context(device, dtype):
                if batch_size == 1:
                    results = [detector(images[0], category=CATEGORY)]
                else:
                    results = detector(images, category=CATEGORY, batch_size=batch_size)
            if len(results) != batch_size or results[0]["anomaly_map"].size != (args.original_size, args.original_size):
                msg = f"The pipeline returned {len(results)} results for {batch_size} images or maps of the wrong size."
                raise RuntimeError(msg)
            return results

        functions = dict(zip(MODES, (run_bare, run_model, run_pipeline)))
        repeats = args.repeats
        label = f"{name} batch {batch_size}"
        peaks = warm_up(functions, args.warmup, device, label)
        counter = CallCounter(model.clip.text_model)
        times = time_rounds(functions, repeats, device, label)
        text_forwards = counter.count
        counter.remove()

        row = {"model": name, "batch_size": batch_size, "repeats": repeats, "text_forwards": text_forwards, **weights}
        for mode in MODES:
            median = statistics.median(times[mode])
            row[f"{mode}_seconds"] = median
            row[f"{mode}_images_per_second"] = batch_size / median
            row[f"{mode}_activations"] = peaks[mode]
        rows.append(row)
        del pixel_values
        gc.collect()

    del detector, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def machine_description(device: torch.device, threads: int) -> list[str]:
    """Return lines naming the CPU, the accelerator, the software and the load average."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), platform.processor())
    except OSError:
        cpu = platform.processor() or "unknown"
    lines = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores; torch threads: {threads}",
        f"Python {platform.python_version()}, torch {torch.__version__}",
    ]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return lines


def memory_totals(row: dict[str, Any]) -> dict[str, int]:
    """Return the peak bytes (weights plus the call's peak allocations) of each mode.

    `bare_vision` counts the vision weights only (the floor) and `bare_clip` all CLIP weights, because a
    CLIP-based zero-shot detector keeps both towers in memory. The model and the pipeline count all
    CMI-CLIP weights.
    """
    return {
        "bare_vision": row["vision"] + row["bare_activations"],
        "bare_clip": row["clip"] + row["bare_activations"],
        "model": row["cmi_clip"] + row["model_activations"],
        "pipeline": row["cmi_clip"] + row["pipeline_activations"],
    }


def model_label(row: dict[str, Any]) -> str:
    return MODEL_SPECS[row["model"]]["label"]


def format_results(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Format the rows as a throughput table, a memory table and one line per target."""
    mebibyte = 2**20
    precision = args.dtype + (" (autocast)" if args.dtype != "fp32" else "")
    lines = [
        f"Device: {args.device}, precision: {precision}, warm-up rounds: {args.warmup}, "
        f"pipeline input: one {args.original_size} x {args.original_size} PNG per image, decoded from bytes",
        "",
        "| Model | Batch | Repeats | Bare img/s | Model img/s | Pipeline img/s | Model/bare | Pipeline/bare | Text forwards in timed loop |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        bare = row["bare_images_per_second"]
        lines.append(
            f"| {model_label(row)} | {row['batch_size']} | {row['repeats']} "
            f"| {bare:#.3g} | {row['model_images_per_second']:#.3g} | {row['pipeline_images_per_second']:#.3g} "
            f"| {row['model_images_per_second'] / bare:.3f} | {row['pipeline_images_per_second'] / bare:.3f} | {row['text_forwards']} |"
        )
    lines += [
        "",
        "| Model | Batch | Vision weights MiB | CLIP weights MiB | CMI-CLIP weights MiB | Bare call peak MiB | Model call peak MiB "
        "| Pipeline call peak MiB | Model/bare (CLIP) | Pipeline/bare (CLIP) | Model/bare (vision only) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        totals = memory_totals(row)
        lines.append(
            f"| {model_label(row)} | {row['batch_size']} | {row['vision'] / mebibyte:.0f} | {row['clip'] / mebibyte:.0f} "
            f"| {row['cmi_clip'] / mebibyte:.0f} | {row['bare_activations'] / mebibyte:.0f} | {row['model_activations'] / mebibyte:.0f} "
            f"| {row['pipeline_activations'] / mebibyte:.0f} | {totals['model'] / totals['bare_clip']:.3f} "
            f"| {totals['pipeline'] / totals['bare_clip']:.3f} | {totals['model'] / totals['bare_vision']:.3f} |"
        )
    lines.append("")
    for row in rows:
        label = f"{model_label(row)}, batch {row['batch_size']}"
        bare = row["bare_images_per_second"]
        totals = memory_totals(row)
        checks = [
            ("model throughput", row["model_images_per_second"] / bare, ">=", MODEL_SPEED_TARGET),
            ("pipeline throughput", row["pipeline_images_per_second"] / bare, ">=", PIPELINE_SPEED_TARGET),
            ("model peak memory (bare = CLIP weights + bare call peak)", totals["model"] / totals["bare_clip"], "<=", MEMORY_TARGET),
            ("pipeline peak memory (same bare)", totals["pipeline"] / totals["bare_clip"], "<=", MEMORY_TARGET),
        ]
        for what, ratio, operator, target in checks:
            met = ratio >= target if operator == ">=" else ratio <= target
            lines.append(f"- {label}: {what} {ratio:.3f}x of bare, target {operator} {target}x: {'met' if met else 'NOT met'}")
        lines.append(
            f"- {label}: text encoder forwards during the timed loop: {row['text_forwards']} (target 0): "
            f"{'met' if row['text_forwards'] == 0 else 'NOT met'}"
        )
    return "\n".join(lines)


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that every model benchmark takes: warm-up rounds, threads, device, dtype and cache folder."""
    parser.add_argument(
        "--warmup", type=int, default=1, help="Untimed rounds before the timed ones; the last one measures memory (default: %(default)s)."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the number of CPU cores).")
    parser.add_argument("--device", default="cpu", help="torch device, such as cpu or cuda (default: %(default)s).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp32, or bf16/fp16 autocast (default: %(default)s).")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("CMI_CLIP_BENCH_CACHE", "/tmp/cmi_clip_bench")),
        help="Folder for the random-weight CLIP checkpoints (default: %(default)s).",
    )


def set_model_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Split `args.models` into `args.model_names`, exiting with a usage error on an unknown model."""
    args.model_names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.model_names if name not in MODEL_SPECS]
    if unknown:
        parser.error(f"Unknown models {unknown}; choose from {sorted(MODEL_SPECS)}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="b16,l14-336,l14-518", help=f"Comma-separated models from {sorted(MODEL_SPECS)}.")
    parser.add_argument("--batch-sizes", default="1,8", help="Comma-separated batch sizes (default: %(default)s).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds per batch size; the median is reported (default: %(default)s).")
    add_shared_options(parser)
    parser.add_argument("--original-size", type=int, default=900, help="Side in pixels of the PNG fed to the pipeline (default: %(default)s).")
    parser.add_argument("--quick", action="store_true", help="ViT-B/16 only, batch 1, 2 repeats: a smoke run of a minute or so.")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.repeats = "b16", "1", 2
    set_model_names(parser, args)
    args.batch_size_list = [int(value) for value in args.batch_sizes.split(",")]
    if args.repeats < 1 or args.warmup < 1 or any(size < 1 for size in args.batch_size_list):
        parser.error("--repeats, --warmup and every batch size must be at least 1.")
    return args


def prepare_run(args: argparse.Namespace) -> torch.device | None:
    """Set the torch threads and create the cache folder; return the device, or None when it is unavailable."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda was requested, but torch sees no CUDA device. Run on a GPU machine or use --device cpu.", file=sys.stderr)
        return None
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    return device


def run_and_print(args: argparse.Namespace, measure: Callable[[torch.device], list[Any]], format_rows: Callable[..., str]) -> int:
    """Prepare the run, call `measure(device)` for the result rows, and print the command, machine, load and results.

    Returns the exit code: 0, or 2 when the requested device is unavailable.
    """
    device = prepare_run(args)
    if device is None:
        return 2
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = measure(device)
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()

    print()
    print("Command: python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    for line in machine_description(device, threads):
        print(line)
    print(
        f"Load average (1, 5, 15 min) before: {load_before[0]:.2f}, {load_before[1]:.2f}, {load_before[2]:.2f}; "
        f"after: {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f}; total time {elapsed:.0f} s"
    )
    print()
    print(format_rows(rows, args))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def measure(device: torch.device) -> list[dict[str, Any]]:
        rows = []
        for name in args.model_names:
            rows.extend(bench_model(name, args.batch_size_list, args, device))
        return rows

    return run_and_print(args, measure, format_results)


if __name__ == "__main__":
    sys.exit(main())
