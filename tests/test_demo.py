"""Tests of the offline demo on a very short schedule (the full demo is the README's first command)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmi_clip.demo import AUXILIARY_CATEGORIES, TARGET_CATEGORIES, DemoConfig, demo_prompts, run_demo


def test_demo_split_shares_no_category():
    assert not set(AUXILIARY_CATEGORIES) & set(TARGET_CATEGORIES)
    with pytest.raises(ValueError, match="must not overlap"):
        DemoConfig(auxiliary_categories=("brick", "gravel"), target_categories=("gravel",))


def test_demo_prompts_name_kind_or_category():
    by_kind = demo_prompts(["gravel", "coffee"], use_kind=True)
    assert "anomalous texture" in by_kind["gravel"]["abnormality"]
    assert "anomalous object" in by_kind["coffee"]["abnormality"]
    by_name = demo_prompts(["astronaut_face"], use_kind=False)
    assert "anomalous astronaut face" in by_name["astronaut_face"]["abnormality"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"jobs": 0}, "jobs=0 is invalid"),
        ({"threads": 0}, "threads=0 is invalid"),
        ({"num_workers": -1}, "num_workers=-1 is invalid"),
        ({"image_size": 8}, "image_size=8 is invalid"),
        ({"image_size": 66}, "image_size=66 is invalid"),
        ({"steps": -5}, "steps=-5 is invalid"),
    ],
)
def test_demo_config_rejects_invalid_values(options, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**options)


def test_demo_cli_rejects_zero_threads(tmp_path, capsys):
    from cmi_clip.cli import main

    output_dir = tmp_path / "demo"
    assert main(["demo", "--output", str(output_dir), "--threads", "0"]) == 2
    assert "threads=0 is invalid" in capsys.readouterr().err
    assert not output_dir.exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_short_demo_writes_report_and_model(tmp_path, single_thread, jobs):
    config = DemoConfig(
        output_dir=str(tmp_path / "demo"),
        image_size=32,
        steps=4,
        ablation_steps=2,
        batch_size=4,
        auxiliary_categories=("brick", "coins"),
        target_categories=("gravel",),
        num_test_good=2,
        num_test_defect_per_kind=1,
        num_calibration_good=3,
        num_panels=2,
        num_workers=0,
        jobs=jobs,
        threads=1,
    )
    report = run_demo(config)
    text = report.read_text()
    assert "random weights" in text
    assert "| full (4 steps) |" in text
    for row in ("| full (2 steps) |", "| no CMI (2 steps) |", "| no CVL (2 steps) |", "| untrained |"):
        assert row in text
    assert "gravel" in text
    # Ablation runs in worker processes log to their own files instead of the console.
    logs = sorted(path.parent.name for path in (tmp_path / "demo" / "runs").glob("*/train.log"))
    assert logs == (["ablation_full", "ablation_no_cmi", "ablation_no_cvl"] if jobs > 1 else [])
    panels = sorted((tmp_path / "demo" / "panels").glob("*.png"))
    assert len(panels) == 2
    assert all(f"panels/{path.name}" in text for path in panels)

    summary = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert set(summary["ablations"]) == {"full (4 steps)", "full (2 steps)", "no CMI (2 steps)", "no CVL (2 steps)", "untrained"}
    assert 0.0 <= summary["main"]["category_metrics"]["gravel"]["pixel_auroc"] <= 1.0

    # The target category gets its own threshold from 3 normal calibration images, stored in the saved model.
    assert "## Decision thresholds" in text
    [threshold_row] = summary["thresholds"]
    assert threshold_row["category"] == "gravel"
    assert threshold_row["num_calibration"] == 3
    assert threshold_row["num_normal"] == 2
    model_config = json.loads((tmp_path / "demo" / "model" / "config.json").read_text())
    assert model_config["category_thresholds"] == {"gravel": threshold_row["own_threshold"]}
    assert f"| gravel | {threshold_row['pooled_threshold']:.4f} | {threshold_row['own_threshold']:.4f} |" in text

    from transformers import pipeline

    detector = pipeline("anomaly-detection", model=str(tmp_path / "demo" / "model"))
    result = detector(Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)), category="gravel")
    assert result["anomaly_map"].size == (40, 40)
    assert result["label"] in {"normal", "anomalous"}


def test_whitened_patch_embedding_decorrelates_patches(tiny_clip_dir):
    from cmi_clip import CMIClipModel
    from cmi_clip.demo import whiten_patch_embedding

    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir, freeze_clip=False)
    before = model.clip.vision_model.embeddings.patch_embedding.weight.detach().clone()
    whiten_patch_embedding(model, ["brick", "coins"], seed=0, crops_per_category=10, scale=1.0)
    weight = model.clip.vision_model.embeddings.patch_embedding.weight.detach()
    assert not torch.equal(weight, before)
    count = min(weight.shape[0], weight[0].numel())
    filters = weight[:count].reshape(count, -1)
    # Whitened filters are orthogonal, with norms 1 / sqrt(eigenvalue + 0.01), largest eigenvalue first.
    gram = filters @ filters.T
    off_diagonal = gram - torch.diag(torch.diagonal(gram))
    assert off_diagonal.abs().max() < 1e-3 * torch.diagonal(gram).max()
    norms = filters.norm(dim=1)
    assert torch.all(norms[:-1] <= norms[1:] + 1e-5)
