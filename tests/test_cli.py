"""Tests of the `predict` and `evaluate` subcommands and of evaluate_model (tiny random CLIP, no network)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmi_clip.cli import main
from cmi_clip.data.synthetic import OnTheFlyDefectDataset, make_synthetic_dataset
from cmi_clip.evaluation import add_mean_row, calibrate_threshold, evaluate_model, optimal_f1_threshold
from cmi_clip.predict import collect_images

METRIC_KEYS = {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"}


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)).save(root / "sub" / "a.jpg")
    (root / "broken.png").write_bytes(b"this is not an image")
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


@pytest.fixture(scope="module")
def saved_model_dir(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_model") / "model"
    tiny_model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- predict


def test_collect_images(image_tree, tmp_path):
    images, skipped = collect_images([image_tree, tmp_path / "missing.png"])
    relative = sorted(str(entry[1]) for entry in images)
    assert relative == ["a.png", "broken.png", "sub/a.jpg"]
    assert skipped == [(str(tmp_path / "missing.png"), "not found")]


def test_predict_csv_and_overlays(image_tree, tiny_clip_dir, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(
        ["--log-level", "WARNING", "predict", "--model", str(tiny_clip_dir), str(image_tree), str(tmp_path / "missing.png"),
         "--category", "bottle", "--output", str(output), "--batch-size", "2"]
    )
    assert code == 0
    with open(output / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [str(image_tree / "a.png"), str(image_tree / "sub" / "a.jpg")]
    assert all(row["category"] == "bottle" for row in rows)
    assert all(row["label"] in ("anomalous", "normal") for row in rows)
    assert all(0.0 <= float(row["score"]) <= 1.0 for row in rows)
    assert Image.open(output / rows[0]["overlay"]).size == (40, 30)
    assert Image.open(output / rows[1]["overlay"]).size == (20, 24)
    assert rows[1]["overlay"] == "overlays/sub__a.png"

    printed = capsys.readouterr().out
    anomalous = sum(row["label"] == "anomalous" for row in rows)
    assert f"Scored 2 images: {anomalous} anomalous" in printed
    assert "Skipped 2." in printed
    assert f"skipped {image_tree / 'broken.png'}: unreadable" in printed
    assert "missing.png: not found" in printed


def test_predict_json_threshold_and_panels(image_tree, saved_model_dir, tmp_path):
    output = tmp_path / "out"
    code = main(
        ["--log-level", "WARNING", "predict", "--model", str(saved_model_dir), str(image_tree / "a.png"),
         "--output", str(output), "--format", "json", "--threshold", "0", "--panels"]
    )
    assert code == 0
    rows = json.loads((output / "predictions.json").read_text())
    assert len(rows) == 1
    assert rows[0]["label"] == "anomalous"
    assert rows[0]["category"] == "object"
    panel = Image.open(output / "panels" / "a.png")
    assert panel.format == "PNG"
    assert np.asarray(panel.convert("L")).std() > 0


def test_predict_nothing_readable(tiny_clip_dir, tmp_path, capsys):
    code = main(["--log-level", "WARNING", "predict", "--model", str(tiny_clip_dir), str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert code == 1
    assert "Scored 0 images" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "phrases"),
    [
        ("predict", ["[0, 1]", "Images per model forward pass", "csv", "--panels"]),
        ("evaluate", ["in percent", "Side in pixels", "Images per model forward pass", "mvtec"]),
    ],
)
def test_help_states_units(command, phrases, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in phrases:
        assert phrase in text


# ---------------------------------------------------------------- evaluate


def test_optimal_f1_threshold_known_case():
    threshold, f1 = optimal_f1_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    # At 0.35 the images 0.35, 0.4 and 0.8 are anomalous: precision 2/3, recall 1.
    assert threshold == pytest.approx(0.35)
    assert f1 == pytest.approx(0.8)


def test_optimal_f1_threshold_without_anomalies():
    threshold, f1 = optimal_f1_threshold([0.2, 0.6], [0, 0])
    assert threshold > 0.6
    assert f1 == 0.0


def test_evaluate_model_records_and_metrics(tiny_model):
    dataset = OnTheFlyDefectDataset(["brick", "grass"], size=32, length=12, seed=3, anomaly_probability=0.5)
    per_category, records = evaluate_model(tiny_model, dataset, batch_size=4, show_progress=False)
    assert list(per_category) == ["brick", "grass"]
    for category, metrics in per_category.items():
        assert METRIC_KEYS <= set(metrics)
        labels = [dataset[index]["label"] for index in range(len(dataset)) if dataset[index]["category"] == category]
        assert metrics["num_images"] == len(labels)
        assert metrics["num_anomalous"] == sum(labels)
        scores = [record["score"] for record in records if record["category"] == category]
        labels_seen = [record["label"] for record in records if record["category"] == category]
        assert metrics["image_f1_threshold"] == pytest.approx(optimal_f1_threshold(scores, labels_seen)[0])
    assert [record["index"] for record in records] == list(range(len(dataset)))
    assert all(record["category"] == dataset[record["index"]]["category"] for record in records)
    assert calibrate_threshold(records) == pytest.approx(
        optimal_f1_threshold([r["score"] for r in records], [r["label"] for r in records])[0]
    )
    table = add_mean_row(per_category)
    assert table["mean"]["image_auroc"] == pytest.approx(
        np.mean([metrics["image_auroc"] for metrics in per_category.values() if not math.isnan(metrics["image_auroc"])])
    )


def test_evaluate_model_category_filter_and_errors(tiny_model):
    dataset = OnTheFlyDefectDataset(["brick", "grass"], size=32, length=6, seed=4)
    per_category, records = evaluate_model(tiny_model, dataset, batch_size=8, categories=["grass"], show_progress=False)
    assert list(per_category) == ["grass"]
    assert {record["category"] for record in records} == {"grass"}
    with pytest.raises(ValueError, match="not in the data set"):
        evaluate_model(tiny_model, dataset, categories=["carpet"], show_progress=False)


def test_evaluate_model_with_accelerator_matches(tiny_model):
    from accelerate import Accelerator

    dataset = OnTheFlyDefectDataset(["brick"], size=32, length=5, seed=5)
    plain, plain_records = evaluate_model(tiny_model, dataset, batch_size=2, show_progress=False)
    accelerated, accelerated_records = evaluate_model(tiny_model, dataset, batch_size=2, accelerator=Accelerator(cpu=True), show_progress=False)
    assert [record["score"] for record in accelerated_records] == pytest.approx([record["score"] for record in plain_records], abs=1e-6)
    assert accelerated["brick"]["pixel_auroc"] == pytest.approx(plain["brick"]["pixel_auroc"], abs=1e-6)


def test_evaluate_command(saved_model_dir, tmp_path, capsys):
    data_root = make_synthetic_dataset(
        tmp_path / "data", categories=["brick"], image_size=32, num_train=1, num_test_good=2, num_test_defect_per_kind=1,
        defect_kinds=["scratch", "stain"], seed=0,
    )
    output = tmp_path / "eval"
    code = main(
        ["--log-level", "WARNING", "evaluate", "--model", str(saved_model_dir), "--data", str(data_root),
         "--data-format", "mvtec", "--output", str(output), "--batch-size", "2", "--pixel-size", "16"]
    )
    assert code == 0
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["num_images"] == 4
    assert set(summary["metrics"]) == {"brick", "mean"}
    assert METRIC_KEYS <= set(summary["metrics"]["brick"])
    assert 0.0 <= summary["optimal_f1_threshold"] <= 1.0
    table = (output / "metrics.md").read_text()
    assert table.startswith("| Category |")
    assert "| brick |" in table
    assert "| **mean** |" in table
    assert table.strip() in capsys.readouterr().out
    scores = [json.loads(line) for line in (output / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4
    assert sum(record["label"] for record in scores) == 2
    assert all(Path(record["image_path"]).is_file() for record in scores)


def test_invalid_value_is_one_line_error(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("cmi-clip demo: error: steps=0 is invalid")
    assert "Traceback" not in error


def test_missing_model_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "no_model"
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--model", str(missing), str(image), "--output", str(tmp_path / "out")]) == 2
    assert f"Model folder {missing} was not found" in capsys.readouterr().err


def test_missing_relative_model_folder_skips_hub(tmp_path, capsys, monkeypatch):
    """`outputs/model` has the form of a Hub id, but with ./outputs present it is a local folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    assert main(["predict", "--model", "outputs/model", "image.png", "--output", "out"]) == 2
    assert "Model folder outputs/model was not found" in capsys.readouterr().err
