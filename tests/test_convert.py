# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Checks of the OpenAI/OpenCLIP checkpoint converter against OpenCLIP's own forward pass.

OpenCLIP builds small ViT CLIP models with random weights offline. Each is converted, and the transformers
model must reproduce OpenCLIP's image embeddings, text embeddings and per-layer vision hidden states.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from cmi_clip.cli import build_parser, main
from cmi_clip.convert import (
    clip_model_from_state_dict,
    convert_clip_checkpoint,
    infer_clip_config,
    is_torchscript_archive,
    read_open_clip_model_config,
)
from cmi_clip.prompt_bank import load_builtin_prompts, split_description

TOLERANCE = 1e-4
# OpenAI layout: one attention head per 64 channels, QuickGELU.
OPENAI_STYLE_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
# OpenCLIP layout with head counts that differ from width // 64, and exact GELU.
OPEN_CLIP_STYLE_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def _register_config(folder, name, config):
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(str(path))
    return path


def _random_open_clip_model(name, seed):
    """Build an OpenCLIP model and perturb every parameter, so zero biases and unit norms cannot hide a swap."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 0:
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    _register_config(folder, "cmi-test-openai-style", OPENAI_STYLE_CONFIG)
    _register_config(folder, "cmi-test-open-clip-style", OPEN_CLIP_STYLE_CONFIG)
    return folder


@pytest.fixture(scope="module")
def openai_style_model(config_dir):
    return _random_open_clip_model("cmi-test-openai-style", seed=0)


@pytest.fixture(scope="module")
def open_clip_style_model(config_dir):
    return _random_open_clip_model("cmi-test-open-clip-style", seed=1)


def _inputs(image_size=32, batch_size=2):
    generator = torch.Generator().manual_seed(123)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    texts = tokenizer(["a photo of a damaged bottle", "A photo of a normal printed circuit board"])
    return images, texts


def _open_clip_hidden_states(model, images):
    """Return OpenCLIP's vision hidden states: after ln_pre, then after each residual block."""
    visual = model.visual
    hidden = visual._embeds(images)
    states = [hidden]
    for block in visual.transformer.resblocks:
        hidden = block(hidden)
        states.append(hidden)
    return states


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _max_differences(open_clip_model, clip_model):
    """Return max abs differences of image embeddings, text embeddings and each vision hidden state."""
    images, texts = _inputs(clip_model.config.vision_config.image_size)
    with torch.no_grad():
        reference_image = open_clip_model.encode_image(images)
        reference_text = open_clip_model.encode_text(texts)
        reference_states = _open_clip_hidden_states(open_clip_model, images)
        image_embeds = _features(clip_model.get_image_features(pixel_values=images))
        text_embeds = _features(clip_model.get_text_features(input_ids=texts))
        states = clip_model.vision_model(pixel_values=images, output_hidden_states=True).hidden_states

    assert len(states) == len(reference_states)
    return {
        "image": (image_embeds - reference_image).abs().max().item(),
        "text": (text_embeds - reference_text).abs().max().item(),
        "layers": [(state - reference).abs().max().item() for state, reference in zip(states, reference_states)],
    }


def _assert_parity(open_clip_model, clip_model):
    differences = _max_differences(open_clip_model, clip_model)
    assert differences["image"] <= TOLERANCE, differences
    assert differences["text"] <= TOLERANCE, differences
    for layer, difference in enumerate(differences["layers"]):
        assert difference <= TOLERANCE, (layer, differences)
    torch.testing.assert_close(clip_model.logit_scale, open_clip_model.logit_scale, rtol=0, atol=0)


def _openai_state_dict(model):
    """Return the model's weights with the hyperparameter entries that OpenAI's archives carry."""
    state_dict = dict(model.state_dict())
    state_dict["input_resolution"] = torch.tensor(model.visual.image_size[0])
    state_dict["context_length"] = torch.tensor(model.context_length)
    state_dict["vocab_size"] = torch.tensor(model.vocab_size)
    return state_dict


def test_openai_state_dict_file_parity(openai_style_model, tmp_path):
    source = tmp_path / "openai_style.pt"
    torch.save(_openai_state_dict(openai_style_model), source)

    output_dir = convert_clip_checkpoint(source, tmp_path / "converted")
    clip_model = CLIPModel.from_pretrained(output_dir).eval()

    assert clip_model.config.vision_config.hidden_act == "quick_gelu"
    assert clip_model.config.text_config.hidden_act == "quick_gelu"
    assert clip_model.config.vision_config.num_attention_heads == 1
    assert clip_model.config.vision_config.image_size == 32
    assert clip_model.config.vision_config.patch_size == 8
    assert clip_model.config.projection_dim == 32
    assert (output_dir / "model.safetensors").is_file()
    _assert_parity(openai_style_model, clip_model)


def test_openai_torchscript_archive_parity(openai_style_model, tmp_path):
    scripted = torch.jit.script(openai_style_model)
    source = tmp_path / "openai_style_jit.pt"
    scripted.save(str(source))

    assert is_torchscript_archive(source)
    output_dir = convert_clip_checkpoint(source, tmp_path / "converted")
    clip_model = CLIPModel.from_pretrained(output_dir).eval()

    assert clip_model.config.vision_config.hidden_act == "quick_gelu"
    _assert_parity(openai_style_model, clip_model)


def test_plain_state_dict_not_torchscript(openai_style_model, tmp_path):
    source = tmp_path / "plain.pt"
    torch.save(openai_style_model.state_dict(), source)

    assert not is_torchscript_archive(source)


def test_open_clip_training_checkpoint_parity(open_clip_style_model, config_dir, tmp_path):
    weights = {f"module.{key}": value for key, value in open_clip_style_model.state_dict().items()}
    source = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": weights}, source)

    output_dir = convert_clip_checkpoint(
        source, tmp_path / "converted", model_name=config_dir / "cmi-test-open-clip-style.json"
    )
    clip_model = CLIPModel.from_pretrained(output_dir).eval()

    assert clip_model.config.vision_config.hidden_act == "gelu"
    assert clip_model.config.vision_config.num_attention_heads == 4
    assert clip_model.config.text_config.num_attention_heads == 4
    _assert_parity(open_clip_style_model, clip_model)


def test_open_clip_without_name_needs_heads(open_clip_style_model):
    # The text width 32 has no head count of width // 64, and no shipped architecture has these shapes.
    with pytest.raises(ValueError, match=r"--model-name"):
        clip_model_from_state_dict(open_clip_style_model.state_dict(), "open_clip")


def test_wrong_head_count_breaks_parity(open_clip_style_model, tmp_path):
    config = json.loads(json.dumps(OPEN_CLIP_STYLE_CONFIG))
    config["vision_cfg"]["head_width"] = 32
    config["text_cfg"]["heads"] = 2
    path = tmp_path / "two_heads.json"
    path.write_text(json.dumps(config), encoding="utf-8")

    clip_model = clip_model_from_state_dict(open_clip_style_model.state_dict(), "open_clip", model_name=path)
    differences = _max_differences(open_clip_style_model, clip_model)

    assert clip_model.config.vision_config.num_attention_heads == 2
    assert differences["image"] > 100 * TOLERANCE
    assert differences["text"] > 100 * TOLERANCE


def test_float16_weights_become_float32(openai_style_model):
    # OpenAI's TorchScript archives store float16 weights.
    state_dict = {key: value.half() for key, value in openai_style_model.state_dict().items()}

    clip_model = clip_model_from_state_dict(state_dict, "openai")
    patch_weight = clip_model.vision_model.embeddings.patch_embedding.weight

    assert patch_weight.dtype == torch.float32
    torch.testing.assert_close(patch_weight, state_dict["visual.conv1.weight"].float(), rtol=0, atol=0)


def test_custom_text_clip_keys(open_clip_style_model, config_dir):
    # OpenCLIP's CustomTextCLIP keeps the text tower under "text.", beside "visual." and "logit_scale".
    text_keys = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    state_dict = {
        (f"text.{key}" if key.startswith(text_keys) else key): value
        for key, value in open_clip_style_model.state_dict().items()
    }

    clip_model = clip_model_from_state_dict(
        state_dict, "open_clip", model_name=config_dir / "cmi-test-open-clip-style.json"
    )

    assert "text.token_embedding.weight" in state_dict
    _assert_parity(open_clip_style_model, clip_model)


def test_open_clip_folder_with_config(open_clip_style_model, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "hub_folder"
    folder.mkdir()
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    open_clip_config = {"model_cfg": OPEN_CLIP_STYLE_CONFIG, "preprocess_cfg": {"mean": mean, "std": std}}
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config), encoding="utf-8")
    save_file({key: value.contiguous() for key, value in open_clip_style_model.state_dict().items()},
              folder / "open_clip_model.safetensors")

    output_dir = convert_clip_checkpoint(folder, tmp_path / "converted", image_size=48)
    clip_model = CLIPModel.from_pretrained(output_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(output_dir)

    assert clip_model.config.vision_config.num_attention_heads == 4
    assert processor.size == {"height": 48, "width": 48}
    assert list(processor.image_mean) == mean
    assert list(processor.image_std) == std
    _assert_parity(open_clip_style_model, clip_model)


def test_processor_defaults_to_native_size(openai_style_model, tmp_path):
    source = tmp_path / "openai_style.pt"
    torch.save(_openai_state_dict(openai_style_model), source)

    output_dir = convert_clip_checkpoint(source, tmp_path / "converted")
    processor = CLIPImageProcessor.from_pretrained(output_dir)
    pixel_values = processor(images=torch.zeros(3, 64, 80, dtype=torch.uint8), return_tensors="pt").pixel_values

    assert processor.size == {"height": 32, "width": 32}
    assert processor.do_center_crop is False
    assert tuple(pixel_values.shape) == (1, 3, 32, 32)


def test_extra_key_is_named(openai_style_model):
    state_dict = dict(openai_style_model.state_dict())
    state_dict["visual.extra_adapter.weight"] = torch.zeros(4)

    with pytest.raises(ValueError, match=r"visual\.extra_adapter\.weight"):
        clip_model_from_state_dict(state_dict, "openai")


def test_unknown_block_key_is_named(openai_style_model):
    state_dict = dict(openai_style_model.state_dict())
    state_dict["transformer.resblocks.1.ls_1.gamma"] = torch.ones(64)

    with pytest.raises(ValueError, match=r"transformer\.resblocks\.1\.ls_1\.gamma"):
        clip_model_from_state_dict(state_dict, "openai")


def test_missing_key_is_named(openai_style_model):
    state_dict = dict(openai_style_model.state_dict())
    del state_dict["visual.ln_post.bias"]
    del state_dict["transformer.resblocks.1.attn.in_proj_weight"]

    with pytest.raises(ValueError, match=r"missing keys") as error:
        clip_model_from_state_dict(state_dict, "openai")
    assert "visual.ln_post.bias" in str(error.value)
    assert "transformer.resblocks.1.attn.in_proj_weight" in str(error.value)


def test_missing_architecture_key_is_named(openai_style_model):
    state_dict = dict(openai_style_model.state_dict())
    del state_dict["visual.proj"]

    with pytest.raises(ValueError, match=r"'visual\.proj'"):
        clip_model_from_state_dict(state_dict, "openai")


def test_wrong_shape_is_named(openai_style_model):
    state_dict = dict(openai_style_model.state_dict())
    state_dict["visual.transformer.resblocks.0.ln_2.weight"] = torch.ones(65)

    with pytest.raises(ValueError, match=r"vision_model\.encoder\.layers\.0\.layer_norm2\.weight"):
        clip_model_from_state_dict(state_dict, "openai")


def test_resnet_checkpoint_rejected(openai_style_model):
    state_dict = dict(openai_style_model.state_dict())
    state_dict["visual.layer1.0.conv1.weight"] = torch.zeros(1)

    with pytest.raises(ValueError, match="ResNet"):
        clip_model_from_state_dict(state_dict, "openai")


def _meta_state_dict_of(model_name):
    """Return meta tensors with the shapes of a shipped OpenCLIP architecture, without allocating weights."""
    with torch.device("meta"):
        model = open_clip.create_model(model_name, pretrained=None, device="meta")
    state_dict = dict(model.state_dict())
    # The logit scale is a value, not a shape, and a meta tensor has no value.
    del state_dict["logit_scale"]
    return state_dict


def test_vit_b16_shapes_are_ambiguous():
    state_dict = _meta_state_dict_of("ViT-B-16")

    with pytest.raises(ValueError, match="ViT-B-16-quickgelu"):
        infer_clip_config(state_dict, "open_clip")


def test_vit_b16_named_architecture():
    state_dict = _meta_state_dict_of("ViT-B-16")

    config = infer_clip_config(state_dict, "open_clip", read_open_clip_model_config("ViT-B-16"), "ViT-B-16")
    quick_config = infer_clip_config(
        state_dict, "open_clip", read_open_clip_model_config("ViT-B-16-quickgelu"), "ViT-B-16-quickgelu"
    )
    openai_config = infer_clip_config(state_dict, "openai")

    assert config.vision_config.hidden_act == "gelu"
    assert quick_config.vision_config.hidden_act == "quick_gelu"
    assert openai_config.vision_config.hidden_act == "quick_gelu"
    assert config.vision_config.num_attention_heads == 12
    assert config.text_config.num_attention_heads == 8
    assert config.vision_config.num_hidden_layers == 12
    assert config.vision_config.image_size == 224
    assert config.vision_config.patch_size == 16
    assert config.projection_dim == 512


def test_vit_h14_heads_from_config():
    # ViT-H-14 uses 80 channels per head: 1280 / 80 = 16 heads, where width // 64 would give 20.
    state_dict = _meta_state_dict_of("ViT-H-14")

    config = infer_clip_config(state_dict, "open_clip", read_open_clip_model_config("ViT-H-14"), "ViT-H-14")

    assert config.vision_config.num_attention_heads == 16
    assert config.text_config.num_attention_heads == 16


def test_mismatched_model_name_rejected():
    state_dict = _meta_state_dict_of("ViT-B-16")

    with pytest.raises(ValueError, match="vision layers 24"):
        infer_clip_config(state_dict, "open_clip", read_open_clip_model_config("ViT-L-14"), "ViT-L-14")


def test_unknown_model_name_rejected():
    with pytest.raises(ValueError, match="Unknown OpenCLIP architecture 'ViT-Q-99'"):
        read_open_clip_model_config("ViT-Q-99")


def test_unsupported_open_clip_options_rejected(tmp_path):
    config = json.loads(json.dumps(OPEN_CLIP_STYLE_CONFIG))
    config["vision_cfg"]["attentional_pool"] = True
    path = tmp_path / "pooled.json"
    path.write_text(json.dumps(config), encoding="utf-8")

    with pytest.raises(ValueError, match="attentional_pool"):
        clip_model_from_state_dict({}, "open_clip", model_name=path)


def test_tokenizer_matches_open_clip(openai_style_model, tmp_path):
    source = tmp_path / "openai_style.pt"
    torch.save(_openai_state_dict(openai_style_model), source)
    output_dir = convert_clip_checkpoint(source, tmp_path / "converted")
    tokenizer = CLIPTokenizer.from_pretrained(output_dir)
    reference = open_clip.get_tokenizer("ViT-B-16")
    end_of_text = tokenizer.eos_token_id

    texts = []
    for entry in load_builtin_prompts(["mvtec_ad", "visa"]).values():
        for role in ("abnormality", "normality"):
            texts.append(entry[role])
            texts.extend(split_description(entry[role]))
    # A context longer than any prompt, so OpenCLIP's tokenizer does not truncate.
    reference_ids = reference(texts, context_length=256)

    assert len(texts) > 2 * 27
    for text, row in zip(texts, reference_ids.tolist()):
        expected = row[: row.index(end_of_text) + 1]
        ids = tokenizer(text, truncation=False)["input_ids"]
        assert ids == expected, text


def test_cli_convert_clip(openai_style_model, tmp_path):
    source = tmp_path / "openai_style.pt"
    torch.save(openai_style_model.state_dict(), source)
    output_dir = tmp_path / "converted"

    exit_code = main(["convert-clip", str(source), str(output_dir), "--format", "openai", "--image-size", "64"])
    clip_model = CLIPModel.from_pretrained(output_dir).eval()

    assert exit_code == 0
    assert clip_model.config.vision_config.hidden_act == "quick_gelu"
    assert CLIPImageProcessor.from_pretrained(output_dir).size == {"height": 64, "width": 64}
    _assert_parity(openai_style_model, clip_model)


def test_cli_parser_options():
    parser = build_parser("convert-clip")
    args = parser.parse_args(["convert-clip", "in.pt", "out", "--model-name", "ViT-B-16", "--format", "open_clip"])

    assert args.source == "in.pt"
    assert args.output_dir == "out"
    assert args.model_name == "ViT-B-16"
    assert args.source_format == "open_clip"
    assert args.image_size is None
    assert callable(args.func)


def test_cmi_clip_loads_converted_folder(openai_style_model, tmp_path):
    from cmi_clip.modeling_cmi_clip import CMIClipModel

    source = tmp_path / "openai_style.pt"
    torch.save(_openai_state_dict(openai_style_model), source)
    output_dir = convert_clip_checkpoint(source, tmp_path / "converted")
    prompts = {"my_part": {"abnormality": "a photo of a scratched part", "normality": "a photo of a clean part"}}

    model = CMIClipModel.from_clip_pretrained(output_dir, prompts=prompts).eval()
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(1, 3, 32, 32), categories=["my_part"])

    torch.testing.assert_close(model.clip.visual_projection.weight, openai_style_model.visual.proj.t())
    assert model.config.clip_config.vision_config.hidden_act == "quick_gelu"
    assert model.prompt_bank.prompts_for("my_part").from_bank
    assert tuple(outputs.anomaly_map.shape) == (1, 32, 32)
    assert tuple(outputs.image_scores.shape) == (1,)
