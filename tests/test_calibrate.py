"""Tests of per-category decision thresholds: the threshold rule, the config, the pipeline and `cmi-clip calibrate`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cmi_clip import CMIClipConfig, CMIClipModel
from cmi_clip.calibrate import calibrate_category_threshold, write_category_threshold
from cmi_clip.cli import main
from cmi_clip.evaluation import normal_score_threshold
from cmi_clip.pipeline_anomaly_detection import AnomalyDetectionPipeline


def save_random_images(folder, count, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- threshold rule


@pytest.mark.parametrize(("rate", "flagged"), [(0.0, 0), (0.25, 1), (0.5, 2), (0.74, 2)])
def test_normal_threshold_flags_allowed_share(rate, flagged):
    scores = [0.2, 0.9, 0.5, 0.7]
    threshold = normal_score_threshold(scores, rate)
    assert sum(score >= threshold for score in scores) == flagged


def test_normal_threshold_sits_just_above_score():
    threshold = normal_score_threshold([0.2, 0.9, 0.5, 0.7])
    assert threshold > 0.9
    assert threshold == np.nextafter(0.9, 1.0)


def test_normal_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="No normal image scores"):
        normal_score_threshold([])
    with pytest.raises(ValueError, match="false_positive_rate=1.0 is invalid"):
        normal_score_threshold([0.5], 1.0)


# ---------------------------------------------------------------- config and pipeline


def test_config_category_thresholds_normalised(tmp_path):
    config = CMIClipConfig(category_thresholds={"Metal-Nut": 0.8}, decision_threshold=0.4)
    assert config.category_thresholds == {"metal_nut": 0.8}
    assert config.threshold_for("metal nut") == 0.8
    assert config.threshold_for("bottle") == 0.4
    assert config.threshold_for(None) == 0.4
    config.save_pretrained(tmp_path)
    reloaded = CMIClipConfig.from_pretrained(tmp_path)
    assert reloaded.category_thresholds == {"metal_nut": 0.8}


def test_pipeline_label_uses_category_threshold(tiny_model):
    detector = AnomalyDetectionPipeline(model=tiny_model)
    image = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    score = detector(image, category="bottle")["score"]
    thresholds = tiny_model.config.category_thresholds
    saved_decision = tiny_model.config.decision_threshold
    try:
        tiny_model.config.decision_threshold = 0.0
        thresholds["bottle"] = float(np.nextafter(score, 1.0))
        assert detector(image, category="bottle")["label"] == "normal"
        assert detector(image, category="carpet")["label"] == "anomalous"
        both = detector([image, image], category=["bottle", "carpet"], batch_size=2)
        assert [result["label"] for result in both] == ["normal", "anomalous"]
        assert detector(image, category="bottle", threshold=0.0)["label"] == "anomalous"
    finally:
        thresholds.clear()
        tiny_model.config.decision_threshold = saved_decision


def test_calibrate_function_labels_inputs_normal(tiny_clip_dir, tmp_path):
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir).eval()
    detector = AnomalyDetectionPipeline(model=model)
    images = [Image.open(path) for path in sorted(save_random_images(tmp_path / "good", 4, seed=1).iterdir())]
    threshold, scores = calibrate_category_threshold(detector, images, "Screw")
    assert len(scores) == 4
    assert model.config.category_thresholds == {"screw": threshold}
    assert all(result["label"] == "normal" for result in detector(images, category="screw"))


def test_write_threshold_keeps_other_entries(model_dir):
    write_category_threshold(model_dir, "bottle", 0.7)
    write_category_threshold(model_dir, "Metal Nut", 0.6)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["category_thresholds"] == {"bottle": 0.7, "metal_nut": 0.6}
    assert list(model_dir.glob("*.tmp")) == []
    assert CMIClipModel.from_pretrained(model_dir).config.threshold_for("metal_nut") == 0.6


# ---------------------------------------------------------------- command line


def test_calibrate_cli_stores_threshold(model_dir, tmp_path, capsys):
    good = save_random_images(tmp_path / "good", 5, seed=2)
    (good / "broken.png").write_bytes(b"not an image")
    code = main(["--log-level", "WARNING", "calibrate", "--model", str(model_dir), "--category", "bottle", str(good), "--batch-size", "2"])
    assert code == 0
    output = capsys.readouterr().out
    assert "Scored 5 normal images of 'bottle'" in output
    assert f"skipped {good / 'broken.png'}: unreadable" in output
    assert "0 of these images score at or above it" in output
    stored = json.loads((model_dir / "config.json").read_text())["category_thresholds"]
    assert list(stored) == ["bottle"]

    predictions = tmp_path / "predictions"
    assert main(["--log-level", "WARNING", "predict", "--model", str(model_dir), "--category", "bottle", str(good), "--output", str(predictions)]) == 0
    with open(predictions / "predictions.csv", newline="") as handle:
        labels = [row["label"] for row in csv.DictReader(handle)]
    assert labels == ["normal"] * 5


def test_calibrate_cli_dry_run_keeps_config(model_dir, tmp_path, capsys):
    good = save_random_images(tmp_path / "good", 2, seed=3)
    before = (model_dir / "config.json").read_text()
    assert main(["--log-level", "WARNING", "calibrate", "--model", str(model_dir), "--category", "bottle", str(good), "--dry-run"]) == 0
    assert "Dry run" in capsys.readouterr().out
    assert (model_dir / "config.json").read_text() == before


def test_calibrate_cli_rejects_bad_options(model_dir, tmp_path, capsys):
    good = save_random_images(tmp_path / "good", 1, seed=4)
    assert main(["calibrate", "--model", str(model_dir), "--category", "bottle", str(good), "--false-positive-rate", "1.5"]) == 2
    assert "--false-positive-rate 1.5 is invalid" in capsys.readouterr().err
    missing = tmp_path / "no_model"
    assert main(["calibrate", "--model", str(missing), "--category", "bottle", str(good)]) == 2
    assert f"{missing} is not a local model folder" in capsys.readouterr().err


def test_calibrate_cli_without_readable_images(model_dir, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not an image")
    assert main(["--log-level", "ERROR", "calibrate", "--model", str(model_dir), "--category", "bottle", str(folder)]) == 1
    assert "no threshold was set" in capsys.readouterr().out
    assert json.loads((model_dir / "config.json").read_text()).get("category_thresholds", {}) == {}
