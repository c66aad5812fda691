# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Tests for defect synthesis on scikit-image photographs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cmi_clip.cli import main as cli_main
from cmi_clip.data.synthetic import (
    CATEGORY_SOURCES,
    DEFECT_KINDS,
    OBJECT_CATEGORIES,
    TEXTURE_CATEGORIES,
    OnTheFlyDefectDataset,
    load_source_photo,
    make_synthetic_dataset,
    perlin_noise,
    sample_example,
    sample_normal_crop,
    synthesize_defect,
)


def test_categories_cover_textures_and_objects():
    assert len(CATEGORY_SOURCES) >= 8
    assert len(TEXTURE_CATEGORIES) >= 4
    assert len(OBJECT_CATEGORIES) >= 4
    assert set(TEXTURE_CATEGORIES).isdisjoint(OBJECT_CATEGORIES)
    assert DEFECT_KINDS == ("cutpaste", "scratch", "perlin", "stain", "hole")


@pytest.mark.parametrize("category", sorted(CATEGORY_SOURCES))
def test_source_photo_loads_offline(category):
    photo = load_source_photo(category)
    assert photo.ndim == 3
    assert photo.shape[2] == 3
    assert photo.dtype == np.uint8
    assert min(photo.shape[:2]) >= 256
    assert photo.std() > 5.0
    assert load_source_photo(category) is photo


def test_normal_crop_shape_and_determinism():
    first = sample_normal_crop("coffee", 48, np.random.default_rng(3))
    second = sample_normal_crop("coffee", 48, np.random.default_rng(3))
    other = sample_normal_crop("coffee", 48, np.random.default_rng(4))
    assert first.shape == (48, 48, 3)
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_unknown_category_and_kind_raise():
    with pytest.raises(ValueError, match="not_a_category"):
        sample_normal_crop("not_a_category", 32, np.random.default_rng(0))
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="crack"):
        synthesize_defect(image, "crack", np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        synthesize_defect(image.astype(np.float32), "hole", np.random.default_rng(0))


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("category", ["brick", "retina", "astronaut_face"])
def test_defect_mask_is_exactly_changed_pixels(category, kind):
    for seed in range(4):
        rng = np.random.default_rng(seed)
        image = sample_normal_crop(category, 64, rng)
        original = image.copy()
        defective, mask = synthesize_defect(image, kind, rng, category=category)
        assert defective.shape == image.shape
        assert defective.dtype == np.uint8
        assert mask.shape == (64, 64)
        assert mask.dtype == bool
        assert mask.any()
        assert not mask.all()
        np.testing.assert_array_equal(mask, (defective != original).any(axis=-1))
        np.testing.assert_array_equal(image, original)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_on_flat_and_saturated_images(kind):
    # A flat white image is where blends most often round back to the original value.
    for value in (0, 255):
        image = np.full((40, 56, 3), value, dtype=np.uint8)
        defective, mask = synthesize_defect(image, kind, np.random.default_rng(1))
        assert mask.shape == (40, 56)
        assert mask.any()
        np.testing.assert_array_equal(mask, (defective != image).any(axis=-1))


def test_perlin_noise_is_bounded_and_smooth():
    noise = perlin_noise((64, 96), (4, 6), np.random.default_rng(0))
    assert noise.shape == (64, 96)
    assert np.abs(noise).max() <= np.sqrt(0.5) + 1e-6
    assert noise.std() > 0.05
    # One pixel is 1/16 of a lattice cell, so neighbouring values differ by far less than the range.
    assert np.abs(np.diff(noise, axis=0)).max() < 0.2
    assert np.abs(np.diff(noise, axis=1)).max() < 0.2


def test_sample_example_labels_and_masks():
    rng = np.random.default_rng(0)
    normal = sample_example("gravel", 32, rng, anomaly_probability=0.0)
    assert normal["label"] == 0
    assert normal["defect_type"] == "good"
    assert normal["category"] == "gravel"
    assert normal["image"].shape == (32, 32, 3)
    assert not normal["mask"].any()

    anomalous = sample_example("gravel", 32, rng, anomaly_probability=1.0, defect_kinds=["hole"])
    assert anomalous["label"] == 1
    assert anomalous["defect_type"] == "hole"
    assert anomalous["mask"].any()

    with pytest.raises(ValueError, match="anomaly_probability"):
        sample_example("gravel", 32, rng, anomaly_probability=1.5)
    with pytest.raises(ValueError, match="dent"):
        sample_example("gravel", 32, rng, defect_kinds=["dent"])


def test_on_the_fly_dataset_determinism():
    dataset = OnTheFlyDefectDataset(["brick", "coins"], size=32, length=6, seed=5, anomaly_probability=0.5)
    again = OnTheFlyDefectDataset(["brick", "coins"], size=32, length=6, seed=5, anomaly_probability=0.5)
    assert len(dataset) == 6
    assert [dataset[i]["category"] for i in range(4)] == ["brick", "coins", "brick", "coins"]
    for index in range(6):
        np.testing.assert_array_equal(dataset[index]["image"], again[index]["image"])
        np.testing.assert_array_equal(dataset[index]["mask"], again[index]["mask"])
    assert not np.array_equal(dataset[0]["image"], dataset[2]["image"])

    first_epoch = dataset[0]["image"]
    dataset.set_epoch(1)
    assert not np.array_equal(dataset[0]["image"], first_epoch)
    dataset.set_epoch(0)
    np.testing.assert_array_equal(dataset[0]["image"], first_epoch)

    with pytest.raises(IndexError):
        dataset[6]


def test_on_the_fly_dataset_kinds_transform():
    dataset = OnTheFlyDefectDataset(
        ["brick", "coffee"],
        size=32,
        length=8,
        anomaly_probability=1.0,
        defect_kinds={"brick": ["scratch"], "coffee": ["stain", "hole"]},
        transform=lambda example: (example["defect_type"], int(example["mask"].sum())),
    )
    items = [dataset[i] for i in range(8)]
    assert {kind for kind, _ in items[0::2]} == {"scratch"}
    assert {kind for kind, _ in items[1::2]} <= {"stain", "hole"}
    assert all(area > 0 for _, area in items)


def test_make_synthetic_dataset_layout_and_determinism(tmp_path):
    kwargs = {"categories": ["brick", "coffee"], "image_size": 32, "num_train": 2, "num_test_good": 1, "num_test_defect_per_kind": 2, "seed": 3}
    kinds = {"brick": ["scratch", "perlin"], "coffee": ["hole"]}
    first = make_synthetic_dataset(tmp_path / "a", defect_kinds=kinds, **kwargs)
    second = make_synthetic_dataset(tmp_path / "b", defect_kinds=kinds, **kwargs)

    files = sorted(path.relative_to(first).as_posix() for path in first.rglob("*.png"))
    assert files == sorted(
        [f"brick/train/good/00{i}.png" for i in range(2)]
        + ["brick/test/good/000.png"]
        + [f"brick/test/{kind}/00{i}.png" for kind in ("scratch", "perlin") for i in range(2)]
        + [f"brick/ground_truth/{kind}/00{i}_mask.png" for kind in ("scratch", "perlin") for i in range(2)]
        + [f"coffee/train/good/00{i}.png" for i in range(2)]
        + ["coffee/test/good/000.png"]
        + [f"coffee/test/hole/00{i}.png" for i in range(2)]
        + [f"coffee/ground_truth/hole/00{i}_mask.png" for i in range(2)]
    )
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    mask = np.asarray(Image.open(first / "brick/ground_truth/scratch/000_mask.png"))
    assert mask.shape == (32, 32)
    assert set(np.unique(mask)) == {0, 255}
    image = Image.open(first / "coffee/test/hole/001.png")
    assert image.mode == "RGB"
    assert image.size == (32, 32)


def test_make_synthetic_dataset_other_seed_differs(tmp_path):
    kwargs = {"categories": ["grass"], "image_size": 24, "num_train": 1, "num_test_good": 0, "num_test_defect_per_kind": 0}
    first = make_synthetic_dataset(tmp_path / "a", seed=0, **kwargs)
    second = make_synthetic_dataset(tmp_path / "b", seed=1, **kwargs)
    name = "grass/train/good/000.png"
    assert (first / name).read_bytes() != (second / name).read_bytes()


def test_make_demo_data_command(tmp_path):
    out = tmp_path / "demo"
    code = cli_main(
        [
            "make-demo-data",
            str(out),
            "--categories",
            "moon,rocket",
            "--defect-kinds",
            "cutpaste",
            "--image-size",
            "24",
            "--num-train",
            "1",
            "--num-test-good",
            "1",
            "--num-test-defect-per-kind",
            "1",
            "--seed",
            "2",
        ]
    )
    assert code == 0
    assert sorted(path.name for path in out.iterdir()) == ["moon", "rocket"]
    assert (out / "rocket/test/cutpaste/000.png").is_file()
    assert (out / "rocket/ground_truth/cutpaste/000_mask.png").is_file()
    assert Image.open(out / "moon/train/good/000.png").size == (24, 24)


def test_make_demo_data_rejects_unknown_category(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["make-demo-data", str(tmp_path), "--categories", "brick,bottle"])
    assert "bottle" in capsys.readouterr().err
