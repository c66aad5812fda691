"""Train one variant of the offline demo's main run and measure its held-out pixel AUROC on two test sets.

The demo (`cmi-clip demo`) trains a small random-weight CLIP on auxiliary categories and tests it on
target categories it never saw. This script trains the demo's main run with a changed architecture,
input size, schedule or training categories, and evaluates the model on:

- `demo`: the demo's own test set (seed + 1000, 10 normal and 6 defective images per defect kind and
  category), so the default arguments reproduce the demo report's table;
- `large`: an independent, larger test set of the same categories (seed 7777, 20 normal and 12 defective
  images per defect kind and category), which is less noisy.

Passing the target categories as `--auxiliary` trains on the test categories themselves. That run is
not zero-shot and shows what the same model and budget reach in-distribution.

Example:

    python bench/bench_demo_transfer.py --name baseline
    python bench/bench_demo_transfer.py --name in_distribution --auxiliary gravel,immunohistochemistry,coffee

Each run appends one JSON line to `--results` and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cmi_clip import demo
from cmi_clip.clip_utils import save_random_clip, tiny_clip_config
from cmi_clip.data import load_mvtec_ad
from cmi_clip.data.synthetic import make_synthetic_dataset
from cmi_clip.evaluation import add_mean_row, evaluate_model

# Seed of the larger test set. It is fixed, so runs with different --seed values are compared on the same images.
LARGE_TEST_SEED = 7777


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="Name of the run, used for its output folder and results line.")
    parser.add_argument("--hidden-size", type=int, default=64, help="Width of the vision tower (default: %(default)s, as the demo).")
    parser.add_argument("--layers", type=int, default=4, help="Vision layers (default: %(default)s).")
    parser.add_argument("--heads", type=int, default=4, help="Attention heads (default: %(default)s).")
    parser.add_argument("--patch-size", type=int, default=4, help="Patch side in pixels (default: %(default)s).")
    parser.add_argument("--image-size", type=int, default=64, help="Input side in pixels (default: %(default)s).")
    parser.add_argument("--steps", type=int, default=demo.DemoConfig.steps, help="Optimizer steps (default: %(default)s).")
    parser.add_argument("--learning-rate", type=float, default=demo.DemoConfig.learning_rate, help="Peak learning rate (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Seed, as the demo's --seed (default: %(default)s).")
    parser.add_argument("--auxiliary", default=None, help="Comma-separated training categories (default: the demo's).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s, as each demo run).")
    parser.add_argument("--output", type=Path, default=Path("/tmp/cmi_clip_demo_transfer"), help="Work folder (default: %(default)s).")
    parser.add_argument("--results", type=Path, default=None, help="JSON-lines file to append to (default: OUTPUT/results.jsonl).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run_dir = args.output / args.name
    config = demo.DemoConfig(
        output_dir=str(run_dir), steps=args.steps, learning_rate=args.learning_rate, seed=args.seed, image_size=args.image_size, jobs=1, threads=args.threads
    )
    if args.auxiliary:
        config.auxiliary_categories = tuple(name.strip() for name in args.auxiliary.split(",") if name.strip())
    clip_config = tiny_clip_config(
        image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.hidden_size, num_layers=args.layers,
        num_heads=args.heads, projection_dim=64, text_hidden_size=32, text_layers=1,
    )
    clip_path = str(save_random_clip(run_dir / "clip", clip_config, seed=args.seed))

    test_sets = {}
    for name, seed, num_good, num_defect in (("demo", args.seed + 1000, config.num_test_good, config.num_test_defect_per_kind), ("large", LARGE_TEST_SEED, 20, 12)):
        data_dir = make_synthetic_dataset(
            args.output / f"data_{name}_{seed}_{args.image_size}", categories=list(config.target_categories), image_size=max(args.image_size, 64),
            num_train=0, num_test_good=num_good, num_test_defect_per_kind=num_defect, seed=seed,
        )
        test_sets[name] = load_mvtec_ad(data_dir, categories=list(config.target_categories), split="test")

    started = time.perf_counter()
    run = demo.train_run(config, "variant", clip_path, args.steps, test_sets["demo"])
    seconds = time.perf_counter() - started
    large, _ = evaluate_model(run["model"].eval(), test_sets["large"], batch_size=32, show_progress=False)
    large = add_mean_row(large)

    line = {
        "name": args.name,
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "train_seconds": round(seconds),
        "pixel_auroc_demo": {category: round(row["pixel_auroc"], 4) for category, row in run["category_metrics"].items()},
        "pixel_auroc_large": {category: round(row["pixel_auroc"], 4) for category, row in large.items()},
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
    }
    results = args.results or args.output / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
