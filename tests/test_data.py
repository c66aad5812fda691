# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Tests for the MVTec AD, VisA and image-folder loaders and the image and mask readers."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from cmi_clip.data import (
    FEATURES,
    LABEL_NAMES,
    load_dataset_auto,
    load_image_folder,
    load_mvtec_ad,
    load_visa,
    read_image,
    read_mask,
    to_rgb,
)
from cmi_clip.data import loaders


def save_rgb(path: Path, size: tuple[int, int] = (16, 12), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def save_mask(path: Path, size: tuple[int, int] = (16, 12), box: tuple[int, int, int, int] = (2, 2, 6, 5), value: int = 255, mode: str = "L") -> Path:
    """Save a mask of `size` (width, height) with `value` inside `box` (left, top, right, bottom)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    left, top, right, bottom = box
    array[top:bottom, left:right] = value
    image = Image.fromarray(array, mode="L")
    if mode != "L":
        image = image.convert(mode)
    image.save(path)
    return path


def make_mvtec(root: Path, category: str = "bottle") -> Path:
    base = root / category
    save_rgb(base / "train/good/000.png")
    save_rgb(base / "test/good/000.png")
    save_rgb(base / "test/broken/000.png")
    save_rgb(base / "test/broken/001.png")
    save_mask(base / "ground_truth/broken/000_mask.png")
    save_mask(base / "ground_truth/broken/001_mask.png", box=(0, 0, 1, 1))
    return root


def mask_array(row: dict) -> np.ndarray:
    return np.asarray(row["mask"])


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def test_mask_value_236_gives_100_pixels(tmp_path):
    path = save_mask(tmp_path / "mask.png", size=(64, 64), box=(20, 30, 30, 40), value=236)
    mask = np.asarray(read_mask(path))
    assert mask.shape == (64, 64)
    assert int((mask > 0).sum()) == 100
    assert set(np.unique(mask).tolist()) == {0, 255}


def test_visa_class_id_mask_gives_50_pixels(tmp_path):
    array = np.zeros((32, 32), dtype=np.uint8)
    array[2:7, 2:7] = 1
    array[20:25, 10:15] = 2
    Image.fromarray(array, mode="L").save(tmp_path / "mask.png")
    mask = np.asarray(read_mask(tmp_path / "mask.png"))
    assert int((mask == 255).sum()) == 50
    assert int((mask == 0).sum()) == 32 * 32 - 50


def test_mask_0_1_values_become_255(tmp_path):
    path = save_mask(tmp_path / "mask.png", value=1)
    mask = np.asarray(read_mask(path))
    assert mask.max() == 255
    assert int((mask == 255).sum()) == 12


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "1"])
def test_mask_in_other_modes_is_one_channel(tmp_path, mode):
    path = save_mask(tmp_path / "mask.png", mode=mode)
    mask = read_mask(path)
    assert mask.mode == "L"
    assert np.asarray(mask).shape == (12, 16)
    assert int((np.asarray(mask) == 255).sum()) == 12


def test_sixteen_bit_mask_is_binarised(tmp_path):
    array = np.zeros((8, 8), dtype=np.uint16)
    array[1:3, 1:4] = 1000
    Image.fromarray(array).save(tmp_path / "mask.png")
    assert int((np.asarray(read_mask(tmp_path / "mask.png")) == 255).sum()) == 6


def test_mask_size_mismatch_names_both_files(tmp_path):
    image = save_rgb(tmp_path / "image.png", size=(16, 12))
    mask = save_mask(tmp_path / "mask.png", size=(8, 6))
    with pytest.raises(ValueError, match=r"mask\.png has size 8x6.*image\.png has size 16x12"):
        read_mask(mask, size=(16, 12), image_path=image)


def test_gray_image_to_rgb(tmp_path):
    Image.fromarray(np.full((4, 5), 77, dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.mode == "RGB"
    assert image.size == (5, 4)
    assert np.asarray(image).tolist() == np.full((4, 5, 3), 77).tolist()


def test_sixteen_bit_image_is_scaled_not_clipped(tmp_path):
    array = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    image = np.asarray(read_image(tmp_path / "deep.png"))
    assert image[0, :, 0].tolist() == [0, 0, 1, 156, 255]
    assert (image[..., 0] == image[..., 2]).all()


def test_rgba_image_drops_alpha(tmp_path):
    Image.new("RGBA", (3, 2), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    image = read_image(tmp_path / "alpha.png")
    assert image.mode == "RGB"
    assert np.asarray(image)[0, 0].tolist() == [10, 20, 30]


def test_palette_image_uses_palette_colours(tmp_path):
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette_image.save(tmp_path / "palette.png")
    assert np.asarray(read_image(tmp_path / "palette.png"))[0, 0].tolist() == [200, 100, 50]


def test_exif_rotated_jpeg_is_transposed(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white, right half black
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    image = np.asarray(read_image(tmp_path / "rotated.jpg"))
    assert image.shape == (40, 20, 3)
    # After a clockwise turn the white left half is on top.
    assert image[:20].mean() > 200
    assert image[20:].mean() < 50


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("1", 1, 255), ("LA", 90, 90), ("CMYK", 0, 255), ("F", 0.5, 128), ("F", 200.0, 200), ("I", 40000, 156), ("I", 120, 120), ("I;16", 65535, 255)],
)
def test_to_rgb_modes(mode, value, expected):
    image = Image.new(mode, (3, 2), value if mode != "LA" else (value, 10))
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert np.asarray(converted)[0, 0, 0] == expected


def test_to_rgb_rejects_out_of_range_float():
    with pytest.raises(ValueError, match="Rescale"):
        to_rgb(Image.new("F", (2, 2), 300.0))


# ----------------------------------------------------------------------------------------------
# MVTec AD layout
# ----------------------------------------------------------------------------------------------


def test_mvtec_features_labels_and_masks(tmp_path):
    dataset = load_mvtec_ad(make_mvtec(tmp_path), split="test")
    assert dataset.features == FEATURES
    assert dataset.features["label"].names == LABEL_NAMES
    assert dataset["defect_type"] == ["broken", "broken", "good"]
    assert dataset["label"] == [1, 1, 0]
    assert dataset["category"] == ["bottle"] * 3

    rows = list(dataset)
    assert rows[0]["image"].mode == "RGB"
    assert int((mask_array(rows[0]) == 255).sum()) == 12
    assert int((mask_array(rows[1]) == 255).sum()) == 1
    good_mask = mask_array(rows[2])
    assert good_mask.shape == (12, 16)
    assert not good_mask.any()
    assert Path(rows[2]["image_path"]).name == "000.png"


def test_mvtec_train_split(tmp_path):
    dataset = load_mvtec_ad(make_mvtec(tmp_path), split="train")
    assert len(dataset) == 1
    assert dataset["label"] == [0]


def test_labels_come_from_layout_not_folder_order(tmp_path):
    root = make_mvtec(tmp_path)
    save_rgb(root / "bottle/test/aaa_crack/000.png")
    save_mask(root / "bottle/ground_truth/aaa_crack/000_mask.png")
    dataset = load_mvtec_ad(root)
    labels = dict(zip(dataset["defect_type"], dataset["label"]))
    assert labels == {"aaa_crack": 1, "broken": 1, "good": 0}


def test_missing_defect_mask_names_file(tmp_path):
    root = make_mvtec(tmp_path)
    save_rgb(root / "bottle/test/broken/002.png")
    with pytest.raises(FileNotFoundError, match=r"002\.png"):
        load_mvtec_ad(root)


def test_mask_size_mismatch_in_layout(tmp_path):
    root = make_mvtec(tmp_path)
    save_mask(root / "bottle/ground_truth/broken/001_mask.png", size=(8, 8))
    with pytest.raises(ValueError, match=r"001_mask\.png has size 8x8.*001\.png has size 16x12"):
        load_mvtec_ad(root)


def test_corrupt_image_is_skipped_and_counted(tmp_path, caplog):
    root = make_mvtec(tmp_path)
    (root / "bottle/test/good/001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    truncated = (root / "bottle/test/good/000.png").read_bytes()
    (root / "bottle/test/good/002.png").write_bytes(truncated[: len(truncated) // 2])
    with caplog.at_level(logging.WARNING, logger="cmi_clip.data.loaders"):
        dataset = load_mvtec_ad(root)
    assert len(dataset) == 3
    assert "001.png" in caplog.text
    assert "002.png" in caplog.text
    assert "Skipped 2 unreadable files" in caplog.text


def test_missing_root_and_category_list_what_exists(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mvtec_ad(tmp_path / "nowhere")
    root = make_mvtec(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\['carpet'\].*\['bottle'\]"):
        load_mvtec_ad(root, categories=["carpet"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="readme.txt"):
        load_mvtec_ad(tmp_path / "empty")


def test_messy_files_decode_through_dataset(tmp_path):
    root = make_mvtec(tmp_path)
    deep = np.full((12, 16), 40000, dtype=np.uint16)
    Image.fromarray(deep).save(root / "bottle/test/good/001.png")
    Image.new("RGBA", (16, 12), (1, 2, 3, 4)).save(root / "bottle/test/good/002.png")
    Image.new("L", (16, 12), 9).save(root / "bottle/test/good/003.png")
    save_mask(root / "bottle/ground_truth/broken/000_mask.png", value=1, mode="RGB")
    dataset = load_mvtec_ad(root)
    rows = {Path(row["image_path"]).name + row["defect_type"]: row for row in dataset}
    assert np.asarray(rows["001.pnggood"]["image"])[0, 0].tolist() == [156, 156, 156]
    assert np.asarray(rows["002.pnggood"]["image"])[0, 0].tolist() == [1, 2, 3]
    assert np.asarray(rows["003.pnggood"]["image"])[0, 0].tolist() == [9, 9, 9]
    broken_mask = mask_array(rows["000.pngbroken"])
    assert broken_mask.ndim == 2
    assert int((broken_mask == 255).sum()) == 12


def test_exif_rotated_image_in_layout(tmp_path):
    root = make_mvtec(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (12, 16), (200, 10, 10)).save(root / "bottle/test/broken/002.jpg", exif=exif.tobytes())
    save_mask(root / "bottle/ground_truth/broken/002_mask.png", size=(16, 12))
    dataset = load_mvtec_ad(root)
    row = next(row for row in dataset if row["image_path"].endswith("002.jpg"))
    assert row["image"].size == (16, 12)
    assert row["mask"].size == (16, 12)


# ----------------------------------------------------------------------------------------------
# VisA layout
# ----------------------------------------------------------------------------------------------


def make_visa(root: Path, extra_rows: str = "") -> Path:
    for name in ("000", "001", "002"):
        save_rgb(root / f"candle/Data/Images/Normal/{name}.JPG")
    save_rgb(root / "candle/Data/Images/Anomaly/100.JPG")
    save_mask(root / "candle/Data/Masks/Anomaly/100.png", value=1)
    save_rgb(root / "pcb1/Data/Images/Normal/000.JPG")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/000.JPG,\n"
        "candle,train,normal,candle/Data/Images/Normal/001.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/002.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/100.JPG,candle/Data/Masks/Anomaly/100.png\n"
        "pcb1,test,normal,pcb1/Data/Images/Normal/000.JPG,\n" + extra_rows
    )
    return root


def test_visa_splits_and_labels(tmp_path):
    root = make_visa(tmp_path)
    test = load_visa(root, split="test")
    assert test["category"] == ["candle", "candle", "pcb1"]
    assert test["label"] == [0, 1, 0]
    assert test["defect_type"] == ["good", "anomaly", "good"]
    assert int((mask_array(test[1]) == 255).sum()) == 12
    assert not mask_array(test[0]).any()

    train = load_visa(root, categories=["candle"], split="train")
    assert len(train) == 2
    assert train["label"] == [0, 0]


def test_visa_missing_file_names_row(tmp_path):
    root = make_visa(tmp_path, "candle,test,anomaly,candle/Data/Images/Anomaly/404.JPG,candle/Data/Masks/Anomaly/404.png\n")
    with pytest.raises(FileNotFoundError, match=r"line 7 .*404\.JPG"):
        load_visa(root)


def test_visa_bad_label_names_row(tmp_path):
    root = make_visa(tmp_path, "candle,test,broken,candle/Data/Images/Normal/000.JPG,\n")
    with pytest.raises(ValueError, match=r"'broken'.*line 7"):
        load_visa(root)


# ----------------------------------------------------------------------------------------------
# Image folders and detection
# ----------------------------------------------------------------------------------------------


def test_image_folder_with_and_without_masks(tmp_path):
    save_rgb(tmp_path / "widget/good/a.png")
    save_rgb(tmp_path / "widget/dent/b.png")
    dataset = load_image_folder(tmp_path, category="widget")
    assert dataset["label"] == [1, 0]
    assert dataset["category"] == ["widget", "widget"]
    assert dataset[0]["mask"] is None

    save_mask(tmp_path / "widget/ground_truth/dent/b_mask.png")
    dataset = load_image_folder(tmp_path / "widget")
    assert int((mask_array(dataset[0]) == 255).sum()) == 12


def test_image_folder_mask_name_variants(tmp_path):
    save_rgb(tmp_path / "good/a.png")
    save_rgb(tmp_path / "dent/b.png")
    save_rgb(tmp_path / "dent/c.jpg")
    save_mask(tmp_path / "ground_truth/dent/b.PNG")
    save_mask(tmp_path / "ground_truth/dent/c_mask.png", box=(0, 0, 2, 2))
    dataset = load_image_folder(tmp_path)
    areas = {Path(row["image_path"]).name: int((mask_array(row) == 255).sum()) for row in dataset}
    assert areas == {"a.png": 0, "b.png": 12, "c.jpg": 4}


def test_image_folder_requires_masks_once_ground_truth_exists(tmp_path):
    save_rgb(tmp_path / "good/a.png")
    save_rgb(tmp_path / "dent/b.png")
    save_rgb(tmp_path / "dent/c.png")
    save_mask(tmp_path / "ground_truth/dent/b_mask.png")
    with pytest.raises(FileNotFoundError, match=r"c\.png"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("layout", ["mvtec", "mvtec_category", "visa", "folder", "folder_of_categories"])
def test_load_dataset_auto_detects_layout(tmp_path, layout):
    if layout in ("mvtec", "mvtec_category"):
        make_mvtec(tmp_path)
        path, expected = (tmp_path if layout == "mvtec" else tmp_path / "bottle"), 3
    elif layout == "visa":
        make_visa(tmp_path)
        path, expected = tmp_path, 3
    elif layout == "folder":
        save_rgb(tmp_path / "good/a.png")
        path, expected = tmp_path, 1
    else:
        save_rgb(tmp_path / "tile/good/a.png")
        save_rgb(tmp_path / "wood/good/a.png")
        path, expected = tmp_path, 2
    dataset = load_dataset_auto(path)
    assert len(dataset) == expected
    assert dataset.features["label"].names == LABEL_NAMES


@pytest.mark.parametrize("data_format", ["mvtec", "mvtec_ad"])
def test_load_dataset_auto_mvtec_spellings(tmp_path, data_format):
    make_mvtec(tmp_path)
    dataset = load_dataset_auto(tmp_path, data_format=data_format)
    assert len(dataset) == 3


def test_load_dataset_auto_invalid_format(tmp_path):
    make_mvtec(tmp_path)
    with pytest.raises(ValueError, match=r"Invalid data_format 'mvtec-ad'; expected one of \['mvtec', 'visa', 'folder', 'hub', 'mvtec_ad'\]"):
        load_dataset_auto(tmp_path, data_format="mvtec-ad")


def test_load_dataset_auto_unknown_layout(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ValueError, match="stuff/"):
        load_dataset_auto(tmp_path)


def test_load_dataset_auto_hub_unreachable(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"'someone/mvtec_ad'.*local folder"):
        load_dataset_auto("someone/mvtec_ad")


def test_load_dataset_auto_hub_filters_categories(monkeypatch):
    hub_dataset = datasets.Dataset.from_dict({"category": ["a", "b", "a"], "label": [0, 1, 1]})
    monkeypatch.setattr(loaders.datasets, "load_dataset", lambda dataset_id, split: hub_dataset)
    dataset = load_dataset_auto("someone/data", categories=["a"])
    assert dataset["label"] == [0, 1]
