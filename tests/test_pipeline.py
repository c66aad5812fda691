"""Tests of the anomaly-detection pipeline on a tiny random CLIP (no network)."""

from __future__ import annotations

import json
import logging
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, pipeline

from helpers import run_fresh_interpreter

from cmi_clip import CMIClipModel
from cmi_clip.hub import save_for_pipeline
from cmi_clip.pipeline_anomaly_detection import (
    AnomalyDetectionPipeline,
    array_to_image,
    load_detector,
    register_pipeline,
)
from cmi_clip.processing_cmi_clip import to_rgb

RESULT_KEYS = {"score", "label", "anomaly_map", "mask"}


@pytest.fixture(scope="module")
def detector(tiny_model):
    return AnomalyDetectionPipeline(model=tiny_model, device="cpu")


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def map_array(result: dict, key: str = "anomaly_map") -> np.ndarray:
    return np.asarray(result[key], dtype=np.float32)


# ---------------------------------------------------------------- outputs


def test_single_image_output(detector):
    result = detector(random_rgb(48, 40), category="bottle")
    assert set(result) == RESULT_KEYS
    assert isinstance(result["score"], float)
    assert 0.0 <= result["score"] <= 1.0
    assert result["label"] in ("anomalous", "normal")
    assert result["anomaly_map"].mode == "F"
    assert result["anomaly_map"].size == (48, 40)
    values = map_array(result)
    assert values.min() >= 0.0
    assert values.max() <= 1.0
    assert result["mask"].mode == "L"
    assert result["mask"].size == (48, 40)
    assert set(np.unique(np.asarray(result["mask"]))) <= {0, 255}


def test_list_input_returns_list(detector):
    results = detector([random_rgb(40, 40, seed=1), random_rgb(40, 40, seed=2)], category="bottle")
    assert isinstance(results, list)
    assert len(results) == 2
    assert all(set(result) == RESULT_KEYS for result in results)


def test_default_label_uses_config_threshold(detector, tiny_model):
    result = detector(random_rgb(40, 40, seed=3), category="bottle")
    expected = "anomalous" if result["score"] >= tiny_model.config.decision_threshold else "normal"
    assert result["label"] == expected


# ---------------------------------------------------------------- image modes


def test_grayscale_batch_matches_rgb(detector, tmp_path):
    gray_path = tmp_path / "gray.png"
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (36, 44), dtype=np.uint8), mode="L").save(gray_path)
    color = random_rgb(44, 36, seed=5)
    mixed = detector([str(gray_path), color], category="bottle", batch_size=2)
    converted = detector([Image.open(gray_path).convert("RGB"), color], category="bottle", batch_size=2)
    assert Image.open(gray_path).mode == "L"
    assert mixed[0]["score"] == converted[0]["score"]
    assert np.array_equal(map_array(mixed[0]), map_array(converted[0]))
    assert mixed[1]["score"] == converted[1]["score"]


def test_rgba_png_matches_rgb_png(detector, tmp_path):
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    with_alpha = detector(str(tmp_path / "rgba.png"), category="bottle")
    without_alpha = detector(str(tmp_path / "rgb.png"), category="bottle")
    assert Image.open(tmp_path / "rgba.png").mode == "RGBA"
    assert with_alpha["score"] == without_alpha["score"]
    assert np.array_equal(map_array(with_alpha), map_array(without_alpha))


def test_16bit_ramp_scales_to_8bit(detector, tmp_path):
    ramp16 = np.tile(np.arange(256, dtype=np.uint16) * 257, (8, 1))
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp16).save(path)
    assert Image.open(path).mode.startswith("I")

    rgb = np.asarray(to_rgb(Image.open(path)))
    assert rgb.dtype == np.uint8
    assert rgb.shape == (8, 256, 3)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], np.tile(np.arange(256, dtype=np.uint8), (8, 1)))

    # Through the pipeline, the 16-bit file gives the same model input as the 8-bit ramp, not a white image.
    ramp8 = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (8, 1)), mode="L")
    inputs16 = detector.preprocess(str(path))["pixel_values"]
    inputs8 = detector.preprocess(ramp8)["pixel_values"]
    assert torch.equal(inputs16, inputs8)
    white = detector.preprocess(Image.new("RGB", (256, 8), (255, 255, 255)))["pixel_values"]
    assert not torch.equal(inputs16, white)


def test_16bit_array_matches_png(detector, tmp_path):
    ramp16 = np.tile(np.arange(256, dtype=np.uint16) * 257, (8, 1))
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    from_array = detector.preprocess(ramp16)["pixel_values"]
    from_file = detector.preprocess(str(tmp_path / "ramp16.png"))["pixel_values"]
    assert torch.equal(from_array, from_file)


def test_exif_rotated_jpeg_map_is_upright(detector, tmp_path):
    stored = np.full((480, 640, 3), 40, dtype=np.uint8)
    stored[50:150, 400:500] = 255  # bright square, top right of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    result = detector(str(path), category="bottle")
    assert result["anomaly_map"].size == (480, 640)
    assert result["mask"].size == (480, 640)

    # In the 32 x 32 model input, the square lies at rows 20-25 and columns 22-28 of the upright image.
    pixel_values = detector.preprocess(str(path))["pixel_values"][0].mean(0)
    assert pixel_values[21:24, 23:27].mean() > pixel_values.mean() + 1.0
    assert pixel_values[2:7, 24:30].mean() < pixel_values.mean()

    # The map equals the one of the image rotated by hand, so it is aligned with the displayed image.
    decoded = Image.open(path)
    decoded.load()
    # Rebuilt from the pixels, so that it carries no EXIF orientation of its own.
    upright = Image.fromarray(np.asarray(decoded.transpose(Image.Transpose.ROTATE_270)))
    # Turning 90 degrees clockwise sends stored (row, column) to (column, 479 - row).
    assert upright.size == (480, 640)
    assert np.asarray(upright)[410:490, 340:420].mean() > 200
    by_hand = detector(upright, category="bottle")
    assert result["score"] == by_hand["score"]
    assert np.array_equal(map_array(result), map_array(by_hand))


def test_uniform_grey_is_finite(detector):
    result = detector(Image.new("RGB", (64, 48), (128, 128, 128)), category="bottle")
    assert np.isfinite(result["score"])
    values = map_array(result)
    assert not np.isnan(values).any()
    assert np.isfinite(values).all()


def test_maps_keep_each_input_size(detector):
    results = detector([random_rgb(900, 600, seed=7), random_rgb(1024, 1024, seed=8)], category="bottle", batch_size=2)
    assert results[0]["anomaly_map"].size == (900, 600)
    assert results[0]["mask"].size == (900, 600)
    assert map_array(results[0]).shape == (600, 900)
    assert results[1]["anomaly_map"].size == (1024, 1024)


@pytest.mark.parametrize(
    ("array", "mode"),
    [
        (np.zeros((10, 12), dtype=np.uint8), "L"),
        (np.zeros((10, 12, 1), dtype=np.uint8), "L"),
        (np.zeros((10, 12, 3), dtype=np.uint8), "RGB"),
        (np.zeros((10, 12, 4), dtype=np.uint8), "RGBA"),
        (np.zeros((10, 12), dtype=np.uint16), "I;16"),
        (np.zeros((10, 12, 3), dtype=np.float32), "RGB"),
    ],
)
def test_array_to_image_modes(array, mode):
    image = array_to_image(array)
    assert image.mode == mode
    assert image.size == (12, 10)


def test_float_array_matches_uint8(detector):
    values = np.random.default_rng(9).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    as_float = detector.preprocess(values.astype(np.float64) / 255.0)["pixel_values"]
    as_uint8 = detector.preprocess(values)["pixel_values"]
    assert torch.equal(as_float, as_uint8)


def test_invalid_array_shape_rejected():
    with pytest.raises(ValueError, match="shape"):
        array_to_image(np.zeros((4, 5, 2), dtype=np.uint8))


def test_missing_file_rejected(detector, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        detector(str(tmp_path / "missing.png"))


def test_text_file_as_png_rejected(detector, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(OSError, match="does not recognise its format") as raised:
        detector(str(fake))
    assert str(fake) in str(raised.value)
    assert "Pass a PNG, JPEG, BMP or TIFF image" in str(raised.value)


def test_truncated_png_rejected(detector, tmp_path):
    whole = tmp_path / "whole.png"
    random_rgb(64, 64, seed=3).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:300])
    with pytest.raises(OSError, match="could not be decoded") as raised:
        detector(str(truncated))
    assert "probably damaged" in str(raised.value)


# ---------------------------------------------------------------- call arguments


def test_category_list_matches_single_calls(detector):
    images = [random_rgb(40, 40, seed=10), random_rgb(40, 40, seed=11)]
    together = detector(images, category=["bottle", "carpet"], batch_size=2)
    first = detector(images[0], category="bottle")
    second = detector(images[1], category="carpet")
    assert together[0]["score"] == pytest.approx(first["score"], abs=1e-6)
    assert together[1]["score"] == pytest.approx(second["score"], abs=1e-6)
    same_image = detector([images[0], images[0]], category=["bottle", "carpet"])
    assert same_image[0]["score"] != same_image[1]["score"]


def test_dict_rows_carry_category(detector):
    images = [random_rgb(40, 40, seed=12), random_rgb(40, 40, seed=13)]
    rows = [{"image": images[0], "category": "bottle"}, {"image": images[1], "category": "carpet"}]
    from_rows = detector(rows, batch_size=2)
    from_list = detector(images, category=["bottle", "carpet"], batch_size=2)
    assert [result["score"] for result in from_rows] == [result["score"] for result in from_list]
    with pytest.raises(ValueError, match="'image' key"):
        detector({"picture": images[0]})


def test_category_list_length_mismatch(detector):
    with pytest.raises(ValueError, match="2 categories for 3 images"):
        detector([random_rgb(32, 32)] * 3, category=["bottle", "carpet"])


def test_threshold_overrides_config(detector):
    image = random_rgb(40, 40, seed=12)
    low = detector(image, category="bottle", threshold=0.0)
    assert low["label"] == "anomalous"
    assert np.all(np.asarray(low["mask"]) == 255)
    high = detector(image, category="bottle", threshold=1.0)
    assert high["score"] < 1.0
    assert high["label"] == "normal"
    assert np.all(np.asarray(high["mask"]) == 0)
    middle = float(np.median(map_array(low)))
    split = detector(image, category="bottle", threshold=middle)
    assert np.array_equal(np.asarray(split["mask"]) == 255, map_array(low) >= middle)


def test_threshold_out_of_range(detector):
    with pytest.raises(ValueError, match="outside"):
        detector(random_rgb(32, 32), threshold=1.5)


def test_batch_size_gives_same_results(detector):
    images = [random_rgb(40, 30 + 4 * index, seed=20 + index) for index in range(4)]
    one_by_one = detector(images, category="bottle", batch_size=1)
    batched = detector(images, category="bottle", batch_size=3)
    for single, batch in zip(one_by_one, batched):
        assert batch["score"] == pytest.approx(single["score"], abs=1e-6)
        assert batch["anomaly_map"].size == single["anomaly_map"].size
        assert np.allclose(map_array(batch), map_array(single), atol=1e-5)


def test_return_branch_maps(detector):
    image = random_rgb(50, 30, seed=30)
    plain = detector(image, category="bottle")
    assert "abnormality_map" not in plain
    result = detector(image, category="bottle", return_branch_maps=True)
    for key in ("abnormality_map", "normality_map"):
        assert result[key].mode == "F"
        assert result[key].size == (50, 30)
    assert not np.array_equal(map_array(result, "abnormality_map"), map_array(result, "normality_map"))


def test_return_attentions(detector, tiny_model):
    results = detector([random_rgb(40, 40, seed=31)] * 2, category="bottle", batch_size=2, return_attentions=True)
    rows, columns = tiny_model.config.patch_grid
    expected_layers = [tiny_model.config.feature_layers[position] for position in tiny_model.config.cmi_layers]
    for result in results:
        assert [entry["layer"] for entry in result["attentions"]] == expected_layers
        for entry in result["attentions"]:
            assert entry["abnormality_attention"].shape == (rows, columns)
            assert entry["normality_cue"].shape == (rows, columns)
            assert entry["abnormality_attention"].sum() == pytest.approx(1.0, abs=1e-4)


def test_unknown_argument_rejected(detector):
    with pytest.raises(TypeError, match="Unknown arguments"):
        detector(random_rgb(32, 32), categroy="bottle")


def test_text_embeddings_cached_across_calls(detector, tiny_model, monkeypatch):
    text_model = tiny_model.clip.text_model
    calls = []
    original = text_model.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(text_model, "forward", counting_forward)
    image = random_rgb(32, 32, seed=40)
    detector(image, category="zipper")
    after_first = len(calls)
    detector(image, category="zipper")
    detector([image, image], category="zipper", batch_size=2)
    assert after_first >= 1
    assert len(calls) == after_first


# ---------------------------------------------------------------- loading and registration


def test_register_pipeline_is_idempotent():
    from transformers.pipelines import PIPELINE_REGISTRY

    register_pipeline()
    register_pipeline()
    entry = PIPELINE_REGISTRY.supported_tasks["anomaly-detection"]
    assert entry["impl"] is AnomalyDetectionPipeline
    assert entry["type"] == "image"


def test_plain_clip_runs_training_free(tiny_clip_dir, caplog):
    register_pipeline()
    caplog.set_level(logging.INFO, logger="cmi_clip.pipeline_anomaly_detection")
    detector = pipeline("anomaly-detection", model=str(tiny_clip_dir), device="cpu")
    assert isinstance(detector, AnomalyDetectionPipeline)
    assert detector.model.config.model_type == "cmi_clip"
    assert "training-free" in caplog.text
    result = detector(random_rgb(40, 40, seed=50), category="bottle")
    assert np.isfinite(result["score"])


def test_load_detector_kinds(tiny_clip_dir, tmp_path):
    from_clip = load_detector(str(tiny_clip_dir))
    assert isinstance(from_clip, CMIClipModel)
    assert not from_clip.training
    from_clip.save_pretrained(tmp_path / "saved")
    reloaded = load_detector(tmp_path / "saved")
    assert isinstance(reloaded, CMIClipModel)
    assert reloaded.tokenizer is not None
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert'"):
        load_detector(tmp_path / "bert")


FRESH_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["cmi_clip"] = None  # the package cannot be imported
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    folder = sys.argv[1]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    report = {}
    for name, kwargs in (("with_task", {"task": "anomaly-detection"}), ("without_task", {})):
        detector = pipeline(model=folder, trust_remote_code=True, device="cpu", **kwargs)
        result = detector(image, category="bottle")
        report[name] = {
            "class": type(detector).__name__,
            "module": type(detector).__module__,
            "score": result["score"],
            "size": list(result["anomaly_map"].size),
        }
    try:
        pipeline("anomaly-detection", model=folder, device="cpu")
        report["error"] = None
    except Exception as error:
        report["error"] = f"{type(error).__name__}: {error}"
    print("REPORT" + json.dumps(report))
    """
)


def test_saved_folder_without_package(tiny_model, tmp_path):
    folder = save_for_pipeline(tiny_model, tmp_path / "model")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    expected = AnomalyDetectionPipeline(model=tiny_model, device="cpu")(image, category="bottle")["score"]
    report = run_fresh_interpreter(FRESH_INTERPRETER_SCRIPT, [str(folder)], tmp_path / "modules")
    for name in ("with_task", "without_task"):
        assert report[name]["class"] == "AnomalyDetectionPipeline"
        assert report[name]["module"].startswith("transformers_modules.")
        assert report[name]["size"] == [48, 40]
        assert report[name]["score"] == pytest.approx(expected, abs=1e-6)
    # Without trust_remote_code, transformers 5.25 rejects the custom code before it looks up the task name:
    # AutoConfig raises a ValueError whose message requests `trust_remote_code=True`.
    assert report["error"].startswith("ValueError")
    assert "trust_remote_code=True" in report["error"]
    assert "Unknown task" not in report["error"]


def test_saved_folder_works_without_trust_remote_code(tmp_path, tiny_model):
    from transformers import pipeline

    tiny_model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "anomaly-detection" in saved["custom_pipelines"]
    assert (tmp_path / "model" / "pipeline_anomaly_detection.py").is_file()
    image = Image.fromarray(np.full((40, 50, 3), 128, dtype=np.uint8))
    for source in (str(tmp_path / "model"), CMIClipModel.from_pretrained(tmp_path / "model")):
        detector = pipeline("anomaly-detection", model=source)
        assert isinstance(detector, AnomalyDetectionPipeline)
        result = detector(image, category="bottle")
        assert result["anomaly_map"].size == (50, 40)
