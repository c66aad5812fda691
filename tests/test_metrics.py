# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Tests for the anomaly detection metrics, against hand-computed values, scikit-learn and a slow reference."""

from __future__ import annotations

import logging
import math

import evaluate
import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from cmi_clip.metrics import (
    EVALUATE_METRIC_PATH,
    METRIC_NAMES,
    aupro,
    compute_category_metrics,
    compute_metrics,
    f1_max,
    format_metrics_table,
    pixel_metrics,
    pro_curve,
)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Slow AUPRO: every distinct score is a threshold, and every region is measured in a loop."""
    masks = masks.astype(bool)
    regions = []
    for image_index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions.extend((image_index, labelled == region_id) for region_id in range(1, count + 1))
    normal = ~masks

    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        overlaps = [(predicted[image_index] & region).sum() / region.sum() for image_index, region in regions]
        pros.append(float(np.mean(overlaps)))

    area = 0.0
    for index in range(1, len(fprs)):
        if fprs[index] <= fpr_limit:
            area += (fprs[index] - fprs[index - 1]) * (pros[index] + pros[index - 1]) / 2
            continue
        fraction = (fpr_limit - fprs[index - 1]) / (fprs[index] - fprs[index - 1])
        pro_at_limit = pros[index - 1] + fraction * (pros[index] - pros[index - 1])
        area += (fpr_limit - fprs[index - 1]) * (pros[index - 1] + pro_at_limit) / 2
        break
    return area / fpr_limit


def reference_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """F1 at every distinct threshold, counted directly."""
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        true_positives = (predicted & labels).sum()
        denominator = predicted.sum() + labels.sum()
        best = max(best, 2 * true_positives / denominator)
    return best


def random_case(seed: int, num_images: int = 5, size: int = 12, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random maps (optionally quantised to `levels` values, which makes many ties) and blob masks."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((num_images, size, size)), sigma=(0, 1.5, 1.5)) > 0.55
    masks[0] = False
    maps = rng.random((num_images, size, size)) + 0.4 * masks
    if levels is not None:
        maps = np.floor(maps * levels) / levels
    return maps, masks


SQUARE_MASK = np.zeros((1, 8, 8), dtype=bool)
SQUARE_MASK[0, 2:5, 2:5] = True

TIE_TARGETS = np.array([[[1, 1, 1], [1, 1, 0]], [[1, 0, 0], [1, 0, 1]]])
TIE_SCORES = np.array([[[4, 9, 1], [5, 9, 4]], [[5, 7, 4], [4, 2, 2]]])


def test_aupro_mask_as_map_is_one():
    assert aupro(SQUARE_MASK.astype(float), SQUARE_MASK) == pytest.approx(1.0, abs=1e-12)


def test_aupro_inverted_map_is_zero():
    assert aupro(1.0 - SQUARE_MASK, SQUARE_MASK) == pytest.approx(0.0, abs=1e-12)


def test_constant_map_values():
    constant = np.full((1, 8, 8), 0.7)
    metrics = pixel_metrics(constant, SQUARE_MASK)
    assert metrics["pixel_aupro"] == pytest.approx(0.15, abs=1e-12)
    assert metrics["pixel_auroc"] == pytest.approx(0.5, abs=1e-12)
    assert metrics["pixel_ap"] == pytest.approx(9 / 64, abs=1e-12)
    assert not any(math.isnan(value) for value in metrics.values())


def test_tied_integer_scores_hand_values():
    metrics = pixel_metrics(TIE_SCORES, TIE_TARGETS)
    assert round(metrics["pixel_aupro"], 4) == 0.1742
    assert round(metrics["pixel_auroc"], 4) == 0.5781
    assert metrics["pixel_aupro"] == pytest.approx(reference_aupro(TIE_SCORES.astype(float), TIE_TARGETS), abs=1e-12)


def test_pro_regions_are_8_connected():
    # The diagonal pixel joins the pair into one region of three pixels. With 4-connectivity the
    # first threshold would give PRO (1/2 + 0) / 2 = 0.25 instead of 1/3.
    targets = np.array([[[1, 1, 0], [0, 0, 1]]])
    scores = np.array([[[0.9, 0.2, 0.1], [0.1, 0.1, 0.2]]])
    fpr, pro, thresholds = pro_curve(scores, targets)
    np.testing.assert_allclose(pro, [0.0, 1 / 3, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.2, 0.1])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 7])
def test_pixel_metrics_match_sklearn(seed, levels):
    maps, masks = random_case(seed, levels=levels)
    metrics = pixel_metrics(maps, masks)
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert metrics["pixel_f1_max"] == pytest.approx(reference_f1_max(masks.ravel(), maps.ravel()), abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 5])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(seed, levels, fpr_limit):
    maps, masks = random_case(seed, num_images=3, size=10, levels=levels)
    expected = reference_aupro(maps, masks, fpr_limit)
    value = aupro(maps, masks, fpr_limit=fpr_limit)
    assert value == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= value <= 1.0


def test_pro_curve_is_monotone_and_ends_at_one():
    maps, masks = random_case(3, levels=4)
    fpr, pro, thresholds = pro_curve(maps, masks)
    assert fpr[0] == 0.0
    assert pro[0] == 0.0
    assert fpr[-1] == pytest.approx(1.0)
    assert pro[-1] == pytest.approx(1.0)
    assert (np.diff(fpr) >= 0).all()
    assert (np.diff(pro) >= -1e-12).all()
    assert (np.diff(thresholds) < 0).all()


def test_aupro_never_above_one():
    rng = np.random.default_rng(0)
    for _ in range(20):
        masks = rng.random((2, 6, 6)) > 0.6
        maps = masks + rng.normal(0.0, 0.01, size=masks.shape)
        assert aupro(maps, masks) <= 1.0


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=40)
    scores = np.round(rng.random(40) + 0.3 * labels, 1)
    metrics = compute_metrics(scores, labels)
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert metrics["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert metrics["image_f1_max"] == pytest.approx(reference_f1_max(labels.astype(bool), scores), abs=1e-9)
    precision, recall, _ = precision_recall_curve(labels, scores)
    assert metrics["image_f1_max"] >= float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))) - 1e-12


def test_f1_max_without_positives_is_nan():
    assert math.isnan(f1_max([0, 0, 0], [0.1, 0.2, 0.3]))


def test_compute_metrics_keys_and_range():
    maps, masks = random_case(4)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    metrics = compute_metrics(scores, labels, maps, masks)
    assert set(metrics) == set(METRIC_NAMES)
    for name, value in metrics.items():
        assert 0.0 <= value <= 1.0, name


def test_torch_inputs_equal_numpy_inputs():
    maps, masks = random_case(5)
    labels = np.array([0, 1, 1, 1, 1])
    scores = np.linspace(0.0, 1.0, 5)
    expected = compute_metrics(scores, labels, maps.astype(np.float32), masks)
    actual = compute_metrics(torch.tensor(scores), torch.tensor(labels), torch.tensor(maps, dtype=torch.float32)[:, None], torch.tensor(masks))
    for name in METRIC_NAMES:
        assert actual[name] == pytest.approx(expected[name], abs=1e-12), name


def test_low_resolution_maps_are_upsampled():
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[1, 4:12, 4:12] = True
    low = np.zeros((2, 4, 4), dtype=np.float32)
    low[1, 1:3, 1:3] = 1.0
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(low)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0].numpy()
    assert pixel_metrics(low, masks) == pixel_metrics(upsampled, masks)
    assert pixel_metrics(low, masks)["pixel_auroc"] > 0.9


def test_only_normal_images_give_nan_with_warning(caplog):
    maps = np.random.default_rng(0).random((3, 8, 8))
    masks = np.zeros((3, 8, 8), dtype=bool)
    with caplog.at_level(logging.WARNING, logger="cmi_clip.metrics"):
        metrics = compute_metrics([0.1, 0.2, 0.3], [0, 0, 0], maps, masks, category="screw")
    assert all(math.isnan(metrics[name]) for name in METRIC_NAMES)
    assert "screw" in caplog.text
    assert "normal" in caplog.text


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        compute_metrics([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(3, 8, 8\)"):
        compute_metrics([0.1, 0.2], [0, 1], np.zeros((2, 8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(3,\)"):
        compute_metrics([0.1, 0.2, 0.3], [0, 1, 1], np.zeros((2, 8, 8)), np.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.zeros((1, 4, 4)), np.ones((1, 4, 4)), fpr_limit=0.0)


def test_category_metrics_mean_skips_nan():
    maps, masks = random_case(6)
    labels = np.array([0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.8, 0.4, 0.9, 0.7])
    normal_only = {"image_scores": [0.2, 0.3], "image_labels": [0, 0], "anomaly_maps": maps[:2] * 0, "masks": np.zeros((2, 12, 12))}
    results = compute_category_metrics({"bottle": (scores, labels, maps, masks), "empty": normal_only})
    assert list(results) == ["bottle", "empty", "mean"]
    assert math.isnan(results["empty"]["image_auroc"])
    assert results["mean"]["image_auroc"] == pytest.approx(results["bottle"]["image_auroc"])
    assert results["mean"]["num_categories"]["image_auroc"] == 1
    assert results["mean"]["total_categories"] == 2

    table = format_metrics_table(results)
    assert table.splitlines()[0].startswith("| Category | Image AUROC")
    assert f"{100 * results['bottle']['pixel_aupro']:.1f}" in table
    assert "| empty | n/a" in table
    assert "Image AUROC 1 of 2" in table


def test_category_metrics_from_records():
    maps, masks = random_case(7, num_images=4)
    records = [
        {"category": "tile" if index % 2 else "wood", "score": float(maps[index].max()), "label": int(masks[index].any()), "anomaly_map": maps[index], "mask": masks[index]}
        for index in range(4)
    ]
    results = compute_category_metrics(records)
    wood = compute_metrics([records[0]["score"], records[2]["score"]], [records[0]["label"], records[2]["label"]], maps[[0, 2]], masks[[0, 2]])
    assert list(results) == ["wood", "tile", "mean"]
    for name in METRIC_NAMES:
        assert results["wood"][name] == pytest.approx(wood[name], nan_ok=True)


def test_evaluate_module_matches_compute_metrics():
    metric = evaluate.load(str(EVALUATE_METRIC_PATH))
    maps, masks = random_case(8, num_images=4, size=8)
    scores = [0.2, 0.7, 0.4, 0.9]
    labels = [0, 1, 0, 1]
    for index in range(2):
        metric.add(predictions=scores[index], references=labels[index], anomaly_maps=maps[index], masks=masks[index])
    results = metric.compute(predictions=scores[2:], references=labels[2:], anomaly_maps=maps[2:], masks=masks[2:])
    expected = compute_metrics(scores, labels, maps.astype(np.float32), masks)
    assert set(results) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert results[name] == pytest.approx(expected[name], abs=1e-9), name


def test_format_table_skips_empty_columns():
    table = format_metrics_table({"tile": {"image_auroc": None, "pixel_aupro": 0.51234}, "wood": {"pixel_aupro": float("nan")}})
    lines = table.splitlines()
    assert lines[0] == "| Category | Pixel AUPRO |"
    assert lines[2] == "| tile | 51.2 |"
    assert lines[3] == "| wood | n/a |"
