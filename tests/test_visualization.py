"""Tests of heat-map overlays and figure panels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from cmi_clip.processing_cmi_clip import preprocess_images
from cmi_clip.visualization import overlay_heatmap, save_panel


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def outputs(tiny_model):
    image = random_rgb(40, 30)
    with torch.no_grad():
        result = tiny_model(preprocess_images([image], tiny_model.image_processor), categories="bottle", output_attentions=True)
    return image, result


def test_overlay_size_and_mode():
    image = random_rgb(50, 30)
    overlay = overlay_heatmap(image, np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16))
    assert overlay.mode == "RGB"
    assert overlay.size == (50, 30)
    assert np.asarray(overlay).std() > 0


def test_overlay_alpha_limits():
    image = random_rgb(20, 10, seed=1)
    zeros = np.zeros((10, 20), dtype=np.float32)
    assert np.array_equal(np.asarray(overlay_heatmap(image, zeros, alpha=0.0)), np.asarray(image))
    only_heat = np.asarray(overlay_heatmap(image, zeros, alpha=1.0))
    expected = np.rint(np.asarray(colormaps["jet"](0.0)[:3]) * 255).astype(np.uint8)
    assert np.all(only_heat == expected)


def test_overlay_accepts_pil_float_map():
    image = random_rgb(24, 24, seed=2)
    values = np.random.default_rng(3).random((24, 24)).astype(np.float32)
    from_pil = overlay_heatmap(image, Image.fromarray(values))
    from_array = overlay_heatmap(image, values)
    assert np.array_equal(np.asarray(from_pil), np.asarray(from_array))


def test_overlay_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(random_rgb(8, 8), np.zeros((8, 8)), alpha=2.0)


def test_panel_without_attentions(outputs, tmp_path):
    image, result = outputs
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:15, 10:20] = 255
    path = save_panel(
        tmp_path / "panel.png", image, mask, result.abnormality_map[0], result.normality_map[0], result.anomaly_map[0], dpi=40
    )
    picture = Image.open(path)
    assert picture.format == "PNG"
    # Five panels of 2.5 x 2.6 inches at 40 dots per inch.
    assert picture.size == (500, 104)
    assert np.asarray(picture.convert("L")).std() > 0


def test_panel_with_attention_row(outputs, tmp_path, tiny_model):
    image, result = outputs
    path = save_panel(
        tmp_path / "nested" / "panel.png",
        image,
        None,
        result.abnormality_map,
        result.normality_map,
        result.anomaly_map,
        attentions=result.attentions,
        title="bottle",
        dpi=40,
    )
    picture = Image.open(path)
    columns = 4 * len(tiny_model.config.cmi_layers)
    # Two rows of 2.6 inches plus 0.3 inches for the title.
    assert picture.size == (round(2.5 * columns * 40), round((2 * 2.6 + 0.3) * 40))
    pixels = np.asarray(picture.convert("RGB"))
    assert pixels.std() > 0
    lower_half = pixels[pixels.shape[0] // 2 :]
    assert lower_half.std() > 0
