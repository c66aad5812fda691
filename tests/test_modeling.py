"""Tests of CMIClipConfig and CMIClipModel on tiny random CLIPs (no network)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, CLIPModel

from cmi_clip import CMIClipConfig, CMIClipModel
from cmi_clip.clip_utils import save_random_clip, tiny_clip_config
from cmi_clip.modeling_cmi_clip import interpolate_position_embeddings
from cmi_clip.processing_cmi_clip import preprocess_images

CATEGORIES = ["bottle", "cable"]


def random_pixels(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def run_model(model: CMIClipModel, pixel_values: torch.Tensor, categories=CATEGORIES, **kwargs):
    with torch.no_grad():
        return model(pixel_values, categories=categories, **kwargs)


# ---------------------------------------------------------------- outputs


def test_output_shapes_and_ranges(tiny_model):
    outputs = run_model(tiny_model, random_pixels())
    for name in ("anomaly_map", "abnormality_map", "normality_map"):
        value = getattr(outputs, name)
        assert value.shape == (2, 32, 32), name
        assert torch.isfinite(value).all(), name
        assert value.min() >= 0, name
        assert value.max() <= 1, name
    for name in ("image_scores", "abnormality_scores", "normality_scores"):
        value = getattr(outputs, name)
        assert value.shape == (2,), name
        assert ((value >= 0) & (value <= 1)).all(), name
    assert outputs.loss is None
    assert outputs.attentions is None


def test_black_image_gives_finite_maps(tiny_model):
    black = torch.full((1, 3, 32, 32), -1.79)
    outputs = run_model(tiny_model, black, categories=["bottle"])
    assert torch.isfinite(outputs.anomaly_map).all()
    assert torch.isfinite(outputs.image_scores).all()
    assert outputs.anomaly_map.min() >= 0
    assert outputs.anomaly_map.max() <= 1


def test_mixed_categories_match_single_runs(tiny_model):
    pixels = random_pixels()
    mixed = run_model(tiny_model, pixels, categories=["bottle", "cable"])
    bottle = run_model(tiny_model, pixels[:1], categories=["bottle"])
    cable = run_model(tiny_model, pixels[1:], categories=["cable"])
    torch.testing.assert_close(mixed.anomaly_map[0], bottle.anomaly_map[0])
    torch.testing.assert_close(mixed.anomaly_map[1], cable.anomaly_map[0])
    assert not torch.equal(mixed.abnormality_scores, run_model(tiny_model, pixels, categories="bottle").abnormality_scores)


def test_unknown_category_warns_with_name(tiny_model, caplog):
    with caplog.at_level(logging.WARNING):
        outputs = run_model(tiny_model, random_pixels(1), categories=["Flux Capacitor"])
    assert torch.isfinite(outputs.anomaly_map).all()
    assert any("flux_capacitor" in record.getMessage() for record in caplog.records)


def test_category_count_mismatch_raises(tiny_model):
    with pytest.raises(ValueError, match="3 categories for 2 images"):
        run_model(tiny_model, random_pixels(), categories=["a", "b", "c"])


def test_output_attentions_shapes(tiny_model):
    outputs = run_model(tiny_model, random_pixels(), output_attentions=True)
    assert len(outputs.attentions) == len(tiny_model.config.cmi_layers)
    grid = tiny_model.config.patch_grid
    for layer in outputs.attentions:
        assert layer["abnormality_attention"].shape == (2, *grid)
        assert layer["normality_cue"].shape == (2, *grid)
        assert layer["abnormality_cross_attention"].shape == (2, grid[0] * grid[1], grid[0] * grid[1])
        torch.testing.assert_close(layer["abnormality_attention"].flatten(1).sum(1), torch.ones(2))
        torch.testing.assert_close(layer["normality_cross_attention"].sum(-1), torch.ones(2, grid[0] * grid[1]))


def test_tuple_output_when_return_dict_false(tiny_model):
    outputs = run_model(tiny_model, random_pixels(), return_dict=False)
    assert isinstance(outputs, tuple)
    torch.testing.assert_close(outputs[0], run_model(tiny_model, random_pixels()).anomaly_map)


# ---------------------------------------------------------------- training-free behaviour


def test_untrained_branch_scores_equal_clip_probabilities(tiny_clip_dir, tiny_model):
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = random_pixels()
    outputs = run_model(tiny_model, pixels, categories="bottle")
    bank = tiny_model.prompt_bank.prompts_for("bottle").sentences
    for role_pair, scores in (
        (("normal_anchor", "abnormality"), outputs.abnormality_scores),
        (("normality", "abnormal_anchor"), outputs.normality_scores),
    ):
        texts = [bank[role_pair[0]][0], bank[role_pair[1]][0]]
        tokens = tiny_model.prompt_bank.tokenize(texts)
        with torch.no_grad():
            logits = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels).logits_per_image
        torch.testing.assert_close(scores, logits.softmax(-1)[:, 1], atol=1e-6, rtol=1e-5)


def test_cmi_at_init_equals_no_cmi(tiny_model):
    config = CMIClipConfig(**{**tiny_model.config.to_dict(), "use_cmi": False})
    without_cmi = CMIClipModel(config, clip_model=tiny_model.clip)
    state = {key: value for key, value in tiny_model.state_dict().items() if not key.startswith("cmi.")}
    without_cmi.load_state_dict(state, strict=True)
    without_cmi.set_tokenizer(tiny_model.tokenizer)
    without_cmi.eval()
    assert len(without_cmi.cmi) == 0
    pixels = random_pixels()
    assert torch.equal(run_model(tiny_model, pixels).anomaly_map, run_model(without_cmi, pixels).anomaly_map)
    assert torch.equal(run_model(tiny_model, pixels).image_scores, run_model(without_cmi, pixels).image_scores)


def test_trained_cmi_gate_changes_output(tiny_model):
    model = CMIClipModel(tiny_model.config, clip_model=tiny_model.clip)
    model.load_state_dict(tiny_model.state_dict())
    model.set_tokenizer(tiny_model.tokenizer)
    model.eval()
    pixels = random_pixels()
    before = run_model(model, pixels).anomaly_map
    with torch.no_grad():
        for module in model.cmi.values():
            module.abnormality_from_normality.gate.fill_(1.0)
            module.abnormality_from_normality.out_proj.weight.normal_()
    assert not torch.equal(before, run_model(model, pixels).anomaly_map)


def test_only_heads_require_gradients(tiny_model):
    trainable = {name for name, parameter in tiny_model.named_parameters() if parameter.requires_grad}
    assert trainable
    prefixes = ("abnormality_adapters.", "normality_adapters.", "abnormality_text_adapter.", "normality_text_adapter.", "cmi.")
    assert all(name.startswith(prefixes) for name in trainable), sorted(trainable)
    assert not any(parameter.requires_grad for parameter in tiny_model.clip.parameters())


def test_learned_fusion_weight_is_trainable(tiny_clip_dir):
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir, learn_fusion_weight=True, fusion_weight=0.3)
    assert model.fusion_logit.requires_grad
    assert float(model.fusion_weight.detach()) == pytest.approx(0.3, abs=1e-6)


def test_unfrozen_clip_trains_too(tiny_clip_dir):
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir, freeze_clip=False)
    assert all(parameter.requires_grad for parameter in model.clip.parameters())


def test_loss_backpropagates(tiny_clip_dir):
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir).train()
    masks = torch.zeros(2, 32, 32)
    masks[0, 8:16, 8:16] = 1
    outputs = model(random_pixels(), categories=CATEGORIES, masks=masks, labels=torch.tensor([1.0, 0.0]))
    assert outputs.loss.ndim == 0
    assert torch.isfinite(outputs.loss)
    assert {"fused_focal", "abnormality_dice", "normality_focal", "cross_view", "image_bce"} <= set(outputs.loss_terms)
    outputs.loss.backward()
    grad = model.abnormality_adapters[0].up.weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0


def test_no_cvl_trains_fused_output_alone(tiny_clip_dir):
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir, use_cvl=False).train()
    masks = torch.zeros(2, 32, 32)
    outputs = model(random_pixels(), categories=CATEGORIES, masks=masks)
    assert set(outputs.loss_terms) == {"fused_focal", "fused_dice", "image_bce"}


def test_vv_attention_changes_maps_not_global_scores(tiny_clip_dir, tiny_model):
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir, use_vv_attention=True, vv_attention_layers=2).eval()
    model.load_state_dict(tiny_model.state_dict())
    pixels = random_pixels()
    plain, vv = run_model(tiny_model, pixels), run_model(model, pixels)
    assert not torch.equal(plain.anomaly_map, vv.anomaly_map)
    torch.testing.assert_close(plain.abnormality_scores, vv.abnormality_scores)


# ---------------------------------------------------------------- input sizes and position embeddings


def test_large_input_grid_token_count():
    vit_l_positions = torch.randn(1 + 24 * 24, 8)
    assert interpolate_position_embeddings(vit_l_positions, (37, 37)).shape == (1370, 8)
    assert interpolate_position_embeddings(vit_l_positions, (24, 36)).shape == (1 + 24 * 36, 8)


def test_native_grid_is_identity():
    positions = torch.randn(1 + 8 * 8, 8)
    assert interpolate_position_embeddings(positions, (8, 8)) is positions


def test_vit_l14_336_tower_on_518_and_336x504(tmp_path):
    config = tiny_clip_config(image_size=336, patch_size=14, hidden_size=16, num_layers=2, num_heads=2, projection_dim=16, text_hidden_size=16)
    clip_dir = save_random_clip(tmp_path / "clip", config)
    model = CMIClipModel.from_clip_pretrained(clip_dir, image_size=518).eval()
    with torch.no_grad():
        embedding, tokens, grid = model.vision_features(torch.randn(1, 3, 518, 518))
        assert grid == (37, 37)
        assert tokens[0].shape[1] + 1 == 1370
        _, tokens, grid = model.vision_features(torch.randn(1, 3, 336, 504))
        assert grid == (24, 36)
        assert tokens[0].shape[1] == 24 * 36


def test_native_size_matches_clip_vision_model(tiny_model):
    pixels = random_pixels()
    with torch.no_grad():
        embedding, tokens, _ = tiny_model.vision_features(pixels)
        reference = tiny_model.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        clip_embedding = tiny_model.clip.visual_projection(reference.pooler_output)
    assert torch.equal(embedding, clip_embedding)
    vision = tiny_model.clip.vision_model
    for position, layer in enumerate(tiny_model.config.feature_layers):
        expected = tiny_model.clip.visual_projection(vision.post_layernorm(reference.hidden_states[layer][:, 1:]))
        assert torch.equal(tokens[position], expected)


def test_other_input_size_than_checkpoint(tiny_clip_dir):
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir, image_size=48).eval()
    outputs = run_model(model, random_pixels(size=48))
    assert outputs.anomaly_map.shape == (2, 48, 48)
    assert torch.isfinite(outputs.anomaly_map).all()


def test_input_not_multiple_of_patch_raises(tiny_model):
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        run_model(tiny_model, torch.randn(1, 3, 30, 30), categories=["bottle"])


def test_invalid_config_values_raise():
    clip = tiny_clip_config().to_dict()
    with pytest.raises(ValueError, match="feature_layers contains 9"):
        CMIClipConfig(clip_config=clip, feature_layers=[1, 9])
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        CMIClipConfig(clip_config=clip, image_size=30)
    with pytest.raises(ValueError, match="cmi_layers contains 5"):
        CMIClipConfig(clip_config=clip, cmi_layers=[5])


def test_default_feature_layers_evenly_spaced():
    config = CMIClipConfig(clip_config=tiny_clip_config(num_layers=24).to_dict())
    assert config.feature_layers == [6, 12, 18, 24]
    assert config.cmi_layers == [1, 2]


# ---------------------------------------------------------------- save, load and remote code


def test_save_and_load_round_trip(tmp_path, tiny_model):
    pixels = random_pixels()
    expected = run_model(tiny_model, pixels)
    tiny_model.save_pretrained(tmp_path / "model")
    files = set(os.listdir(tmp_path / "model"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= files
    assert {"modeling_cmi_clip.py", "configuration_cmi_clip.py", "prompt_bank.py"} <= files
    for loader in (CMIClipModel.from_pretrained, AutoModel.from_pretrained):
        loaded = loader(tmp_path / "model").eval()
        assert isinstance(loaded, CMIClipModel)
        outputs = run_model(loaded, pixels)
        assert torch.equal(outputs.anomaly_map, expected.anomaly_map)
        assert torch.equal(outputs.image_scores, expected.image_scores)
    assert AutoConfig.from_pretrained(tmp_path / "model").model_type == "cmi_clip"


def test_saved_config_contains_prompts_and_auto_map(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_cmi_clip.CMIClipConfig", "AutoModel": "modeling_cmi_clip.CMIClipModel"}
    assert "bottle" in config["prompts"]
    assert "candle" in config["prompts"]


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["cmi_clip"] = None  # the package must not be importable here
    import torch
    from transformers import AutoModel
    source, target, pixels_path, expected_path = sys.argv[1:5]
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        outputs = model(torch.load(pixels_path), categories=["bottle", "cable"])
    expected = torch.load(expected_path)
    assert torch.equal(outputs.anomaly_map, expected["anomaly_map"]), "anomaly maps differ"
    assert torch.equal(outputs.image_scores, expected["image_scores"]), "image scores differ"
    model.save_pretrained(target)
    print("ok")
    """
)


def run_fresh_process(tmp_path, source, target, extra_env=None):
    env = {**os.environ, **(extra_env or {})}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(source), str(target), str(tmp_path / "pixels.pt"), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_remote_code_round_trip_in_fresh_processes(tmp_path, tiny_model):
    pixels = random_pixels()
    expected = run_model(tiny_model, pixels)
    torch.save(pixels, tmp_path / "pixels.pt")
    torch.save({"anomaly_map": expected.anomaly_map, "image_scores": expected.image_scores}, tmp_path / "expected.pt")
    tiny_model.save_pretrained(tmp_path / "A")

    run_fresh_process(tmp_path, tmp_path / "A", tmp_path / "B")
    files = set(os.listdir(tmp_path / "B"))
    assert {"modeling_cmi_clip.py", "configuration_cmi_clip.py", "prompt_bank.py", "losses.py", "processing_cmi_clip.py"} <= files
    auto_map = json.loads((tmp_path / "B" / "config.json").read_text())["auto_map"]
    assert all("--" not in reference for reference in auto_map.values()), auto_map

    run_fresh_process(tmp_path, tmp_path / "B", tmp_path / "C", {"HF_HUB_OFFLINE": "1"})


# ---------------------------------------------------------------- text embeddings cache


def count_text_forwards(model: CMIClipModel):
    calls = []
    original = model.clip.text_model.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.clip.text_model.forward = counting_forward
    return calls, original


def test_text_embeddings_cached_per_category(tiny_clip_dir):
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir).eval()
    calls, original = count_text_forwards(model)
    try:
        run_model(model, random_pixels(), categories=["bottle", "bottle"])
        run_model(model, random_pixels(), categories=["bottle", "bottle"])
        assert len(calls) == 1
        run_model(model, random_pixels(), categories=["bottle", "cable"])
        assert len(calls) == 2
        model.set_prompts({"bottle": {"abnormality": "a photo of a cracked bottle.", "normality": "a photo of a clean bottle."}})
        run_model(model, random_pixels(), categories=["bottle", "cable"])
        assert len(calls) == 4
        with torch.no_grad():
            model.clip.text_projection.weight.mul_(1.5)
        run_model(model, random_pixels(), categories=["bottle", "bottle"])
        assert len(calls) == 5
    finally:
        model.clip.text_model.forward = original


# ---------------------------------------------------------------- real photos


def test_tiny_model_on_real_photos(tiny_model):
    from skimage import data

    photos = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]
    pixels = preprocess_images(photos, tiny_model.image_processor)
    assert pixels.shape == (2, 3, 32, 32)
    outputs = run_model(tiny_model, pixels, categories=["astronaut", "coffee"])
    assert outputs.anomaly_map.shape == (2, 32, 32)
    assert np.isfinite(outputs.anomaly_map.numpy()).all()


def test_bfloat16_clip_gives_bfloat16_heads(tiny_clip_dir):
    model = CMIClipModel.from_clip_pretrained(tiny_clip_dir, clip_kwargs={"dtype": torch.bfloat16}).eval()
    assert model.abnormality_adapters[0].up.weight.dtype == torch.bfloat16
    outputs = run_model(model, random_pixels())
    assert outputs.anomaly_map.dtype == torch.bfloat16
    assert torch.isfinite(outputs.anomaly_map.float()).all()
