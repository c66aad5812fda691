# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Conversion of OpenAI and OpenCLIP ViT checkpoints into transformers `CLIPModel` folders.

Two source formats are read:

- **OpenAI**: the TorchScript archives that OpenAI released (`ViT-B-16.pt`, `ViT-L-14-336px.pt`, ...) or a
  plain state dict with the same key names. OpenAI's ViTs use QuickGELU and one attention head per 64
  channels.
- **OpenCLIP**: a state dict of `open_clip.model.CLIP` or `CustomTextCLIP` in a `.pt`, `.bin` or
  `.safetensors` file. Training checkpoints with the weights under `"state_dict"` and `"module."` prefixes
  are accepted. So is a folder with `open_clip_config.json` and `open_clip_model.safetensors` or
  `open_clip_pytorch_model.bin`, as OpenCLIP publishes them. The activation and the head counts cannot be
  read from the weights, so they come from OpenCLIP's model configuration (`model_name`).

The architecture (widths, depths, patch size, image size, context length, vocabulary size, embedding size) is
read from the tensor shapes. Every source key is mapped to a transformers key with strict checking: an
unknown, missing or mis-shaped key is an error that lists the keys. `open_clip` itself is never imported, so
converting needs neither open_clip nor torchvision. Its model configurations are read as JSON files.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import CLIPConfig, CLIPModel
from transformers.utils import logging

from .clip_utils import build_clip_tokenizer, clip_image_processor_config

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers < 5
    from transformers.modeling_utils import no_init_weights

logger = logging.get_logger(__name__)

SOURCE_FORMATS = ("auto", "openai", "open_clip")
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_TOKEN_ID = 49406
CLIP_EOS_TOKEN_ID = 49407
# Keys of OpenAI's TorchScript archives that hold hyperparameters or derived buffers instead of weights.
_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_DERIVED_KEYS = ("attn_mask",)
# Weight files of an OpenCLIP folder as published on the Hugging Face Hub, in order of preference.
_OPEN_CLIP_FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_OPEN_CLIP_FOLDER_CONFIG = "open_clip_config.json"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# OpenCLIP tower options that transformers' CLIPModel cannot express, with the value that it can express.
_UNSUPPORTED_VISION_OPTIONS = {
    "timm_model_name": None,
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "pos_embed_type": "learnable",
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_UNSUPPORTED_TEXT_OPTIONS = {
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "proj_bias": False,
    "proj_type": "linear",
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_UNSUPPORTED_MODEL_OPTIONS = {"multimodal_cfg": None, "init_logit_bias": None}

# Per-block renames from OpenAI/OpenCLIP names to transformers names. Attention input projections are split.
_BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_LEVEL_RENAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# Projection matrices are stored as (width, embed_dim) and applied as `x @ proj`, so nn.Linear needs the transpose.
_TRANSPOSED_RENAMES = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_PATTERN = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------------------


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Return whether `path` is a TorchScript archive (a zip with a `code/` folder) and not a `torch.save` file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("constants.pkl") or "/code/" in name for name in names)


def _unwrap_state_dict(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """Return the weights of a checkpoint: the dict itself or its `state_dict`, without wrapper prefixes."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        msg = f"{source} does not contain a state dict (got {type(checkpoint).__name__}). Pass a CLIP checkpoint."
        raise ValueError(msg)
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            msg = f"{source} is not a state dict of tensors: the entry {key!r} is a {type(value).__name__}."
            raise ValueError(msg)
        # DistributedDataParallel adds "module.", torch.compile adds "_orig_mod.".
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state_dict[key] = value
    return state_dict


def _find_open_clip_folder_weights(folder: Path) -> Path:
    for name in _OPEN_CLIP_FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    msg = f"No OpenCLIP weights found in {folder}: expected one of {list(_OPEN_CLIP_FOLDER_WEIGHTS)}."
    raise FileNotFoundError(msg)


def load_clip_checkpoint(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Read the state dict of a CLIP checkpoint without running code from it.

    Args:
        source: A TorchScript archive, a `torch.save` file, a `.safetensors` file, or an OpenCLIP folder with
            `open_clip_config.json`.

    Returns:
        The state dict (wrapper prefixes removed) and whether the source was a TorchScript archive.
    """
    path = Path(source)
    if path.is_dir():
        path = _find_open_clip_folder_weights(path)
    if not path.is_file():
        msg = f"Checkpoint {path} not found. Pass the path of a CLIP checkpoint file or OpenCLIP folder."
        raise FileNotFoundError(msg)

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap_state_dict(load_file(path), str(path)), False
    if is_torchscript_archive(path):
        # NOTE: torch.jit.load deserialises the archive's TorchScript code into a module, but that code runs only
        # when a method of the module is called. Only state_dict() is called here, which reads the stored tensors.
        module = torch.jit.load(str(path), map_location="cpu")
        return _unwrap_state_dict(module.state_dict(), str(path)), True
    # weights_only=True unpickles tensors and plain containers only, so no code from the file runs.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return _unwrap_state_dict(checkpoint, str(path)), False


def _open_clip_config_dir() -> Path | None:
    # find_spec locates the package without running open_clip/__init__.py, which imports torchvision.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "model_configs"
        if candidate.is_dir():
            return candidate
    return None


def read_open_clip_model_config(model_name: str | os.PathLike) -> dict[str, Any]:
    """Read an OpenCLIP model configuration (`embed_dim`, `vision_cfg`, `text_cfg`, ...).

    Args:
        model_name: An OpenCLIP architecture name shipped in `open_clip/model_configs/` (`ViT-B-16`,
            `ViT-L-14-quickgelu`, ...), the path of such a JSON file, or the path of an `open_clip_config.json`
            (whose `model_cfg` entry is used).
    """
    path = Path(model_name)
    if not path.is_file():
        config_dir = _open_clip_config_dir()
        if config_dir is None:
            msg = (
                f"Cannot look up the OpenCLIP architecture {str(model_name)!r}: open_clip_torch is not installed. "
                "Install it with `pip install cmi_clip[convert]`, or pass the path of the model's JSON config."
            )
            raise FileNotFoundError(msg)
        path = config_dir / f"{model_name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in config_dir.glob("*.json"))
            msg = f"Unknown OpenCLIP architecture {str(model_name)!r}. Known names: {known}."
            raise ValueError(msg)
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if "model_cfg" in config:
        config = config["model_cfg"]
    if not isinstance(config, dict) or "vision_cfg" not in config or "text_cfg" not in config:
        msg = f"{path} is not an OpenCLIP model config: it needs the entries 'vision_cfg' and 'text_cfg'."
        raise ValueError(msg)
    return config


def _open_clip_preprocess_config(source: Path) -> dict[str, Any]:
    """Return the `preprocess_cfg` of an OpenCLIP folder (mean, std), or an empty dict."""
    config_path = source / _OPEN_CLIP_FOLDER_CONFIG if source.is_dir() else None
    if config_path is None or not config_path.is_file():
        return {}
    with open(config_path, encoding="utf-8") as handle:
        return json.load(handle).get("preprocess_cfg", {}) or {}


# --------------------------------------------------------------------------------------------------------------
# Architecture inference
# --------------------------------------------------------------------------------------------------------------


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        msg = f"The checkpoint has no key {key!r}, which every ViT CLIP checkpoint contains. Missing keys: [{key!r}]."
        raise ValueError(msg)
    return state_dict[key]


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    indices = {int(match.group(1)) for key in state_dict if (match := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _check_supported_structure(state_dict: Mapping[str, torch.Tensor]) -> None:
    if any(key.startswith("visual.layer1.") for key in state_dict):
        msg = "The checkpoint is a ResNet CLIP (keys 'visual.layer1.*'), but transformers' CLIPModel is ViT only."
        raise ValueError(msg)
    if any(key.startswith("visual.trunk.") for key in state_dict):
        msg = "The checkpoint has a timm vision tower (keys 'visual.trunk.*'), which transformers' CLIPModel cannot hold."
        raise ValueError(msg)


def _normalize_text_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move OpenCLIP `CustomTextCLIP` keys (`text.*`) to the top level, where `CLIP` keeps its text tower."""
    if "token_embedding.weight" in state_dict or "text.token_embedding.weight" not in state_dict:
        return state_dict
    return {key.removeprefix("text."): value for key, value in state_dict.items()}


def _check_open_clip_options(model_config: Mapping[str, Any], name: str) -> None:
    """Raise if an OpenCLIP model config uses a feature that transformers' CLIPModel does not have."""
    vision_cfg = model_config.get("vision_cfg", {})
    text_cfg = model_config.get("text_cfg", {})
    found: list[str] = []
    for section, options, supported in (
        ("", model_config, _UNSUPPORTED_MODEL_OPTIONS),
        ("vision_cfg.", vision_cfg, _UNSUPPORTED_VISION_OPTIONS),
        ("text_cfg.", text_cfg, _UNSUPPORTED_TEXT_OPTIONS),
    ):
        for option, value in supported.items():
            if option in options and options[option] != value:
                found.append(f"{section}{option}={options[option]!r}")
    if not isinstance(vision_cfg.get("layers", 12), int):
        found.append(f"vision_cfg.layers={vision_cfg['layers']!r} (a ResNet)")
    text_pool = text_cfg.get("pool_type", "argmax")
    # "eos" pooling at CLIP's end-of-text id picks the same token as "argmax", because that id is the largest.
    if text_pool != "argmax" and not (text_pool == "eos" and text_cfg.get("eos_id") == CLIP_EOS_TOKEN_ID):
        found.append(f"text_cfg.pool_type={text_pool!r}")
    if found:
        msg = (
            f"The OpenCLIP architecture {name!r} uses options that transformers' CLIPModel does not support: "
            f"{', '.join(found)}. Only plain ViT CLIP models convert."
        )
        raise ValueError(msg)


def _open_clip_activation(model_config: Mapping[str, Any], tower: str) -> str:
    if model_config.get("quick_gelu", False):
        return "quick_gelu"
    act_kwargs = model_config.get(tower, {}).get("act_kwargs") or {}
    return "gelu_pytorch_tanh" if act_kwargs.get("approximate") == "tanh" else "gelu"


def _layer_norm_eps(model_config: Mapping[str, Any], tower: str) -> float:
    norm_kwargs = model_config.get(tower, {}).get("norm_kwargs") or {}
    return float(norm_kwargs.get("eps", 1e-5))


def _architecture_settings(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Return what the weights cannot tell: head counts, activations and layer-norm epsilons."""
    vision_cfg = model_config["vision_cfg"]
    text_cfg = model_config["text_cfg"]
    return {
        "vision_heads": int(vision_cfg.get("width", 768)) // int(vision_cfg.get("head_width", 64)),
        "text_heads": int(text_cfg.get("heads", 8)),
        "vision_act": _open_clip_activation(model_config, "vision_cfg"),
        "text_act": _open_clip_activation(model_config, "text_cfg"),
        "vision_eps": _layer_norm_eps(model_config, "vision_cfg"),
        "text_eps": _layer_norm_eps(model_config, "text_cfg"),
    }


class ShapeSummary(NamedTuple):
    """Architecture sizes that a ViT CLIP state dict shows in its tensor shapes."""

    embed_dim: int
    vision_width: int
    vision_layers: int
    patch_size: int
    image_size: int
    vision_mlp_size: int
    text_width: int
    text_layers: int
    context_length: int
    vocab_size: int
    text_mlp_size: int


def _shape_signature(model_config: Mapping[str, Any]) -> tuple | None:
    """Return the sizes that an OpenCLIP config produces, in `ShapeSummary` order, or None for non-ViT configs."""
    vision_cfg = model_config.get("vision_cfg", {})
    text_cfg = model_config.get("text_cfg", {})
    if vision_cfg.get("timm_model_name") or text_cfg.get("hf_model_name"):
        return None
    layers = vision_cfg.get("layers", 12)
    image_size = vision_cfg.get("image_size", 224)
    if not isinstance(layers, int) or not isinstance(image_size, int):
        return None
    vision_width = int(vision_cfg.get("width", 768))
    text_width = int(text_cfg.get("width", 512))
    return (
        int(model_config.get("embed_dim", 512)),
        vision_width,
        layers,
        int(vision_cfg.get("patch_size", 16)),
        image_size,
        int(vision_width * float(vision_cfg.get("mlp_ratio", 4.0))),
        text_width,
        int(text_cfg.get("layers", 12)),
        int(text_cfg.get("context_length", 77)),
        int(text_cfg.get("vocab_size", CLIP_VOCAB_SIZE)),
        int(text_width * float(text_cfg.get("mlp_ratio", 4.0))),
    )


def _check_signature(model_config: Mapping[str, Any], shapes: ShapeSummary, name: str) -> None:
    """Raise if the OpenCLIP architecture `name` has other tensor shapes than the checkpoint."""
    config_signature = _shape_signature(model_config)
    if config_signature is None or config_signature == tuple(shapes):
        return
    differences = [
        f"{field.replace('_', ' ')} {expected} (checkpoint: {actual})"
        for field, expected, actual in zip(shapes._fields, config_signature, shapes)
        if expected != actual
    ]
    msg = (
        f"The OpenCLIP architecture {name!r} does not match the checkpoint: {', '.join(differences)}. "
        "Pass the model name that the checkpoint was trained with."
    )
    raise ValueError(msg)


def _match_shipped_configs(signature: tuple) -> dict[str, dict[str, Any]]:
    """Return the OpenCLIP architectures shipped with open_clip whose tensor shapes equal `signature`."""
    config_dir = _open_clip_config_dir()
    if config_dir is None:
        return {}
    matches = {}
    for path in sorted(config_dir.glob("*.json")):
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        if _shape_signature(config) == signature:
            matches[path.stem] = config
    return matches


def _infer_open_clip_settings(signature: tuple, defaults: dict[str, Any]) -> dict[str, Any]:
    """Pick head counts and activations for an OpenCLIP state dict given without a model name.

    The architectures shipped with open_clip that have the same tensor shapes decide. If they disagree (for
    example `ViT-B-16` and `ViT-B-16-quickgelu`), the caller must name the architecture.
    """
    matches = _match_shipped_configs(signature)
    candidates = {}
    for name, config in matches.items():
        try:
            _check_open_clip_options(config, name)
        except ValueError:
            continue
        candidates[name] = _architecture_settings(config)
    distinct = {tuple(sorted(settings.items())) for settings in candidates.values()}
    if len(distinct) > 1:
        msg = (
            f"The OpenCLIP state dict fits several architectures that differ in activation or head count: "
            f"{sorted(candidates)}. Pass the architecture with model_name (--model-name), for example "
            f"{sorted(candidates)[0]!r}."
        )
        raise ValueError(msg)
    if distinct:
        logger.info("Using the settings of the OpenCLIP architecture(s) %s.", sorted(candidates))
        return next(iter(candidates.values()))
    logger.warning(
        "No OpenCLIP architecture shipped with open_clip has these tensor shapes, so GELU and one attention head "
        "per 64 channels are assumed. Pass model_name (--model-name) with the model's JSON config to be sure."
    )
    return defaults


def read_shapes(state_dict: Mapping[str, torch.Tensor]) -> ShapeSummary:
    """Read the architecture sizes of an OpenAI/OpenCLIP ViT state dict from its tensor shapes.

    Raises:
        ValueError: If a tensor needed for a size is missing, or the shapes are inconsistent.
    """
    _check_supported_structure(state_dict)
    patch_weight = _require(state_dict, "visual.conv1.weight")
    vision_positions = _require(state_dict, "visual.positional_embedding")
    visual_proj = _require(state_dict, "visual.proj")
    token_embedding = _require(state_dict, "token_embedding.weight")
    text_positions = _require(state_dict, "positional_embedding")
    text_proj = _require(state_dict, "text_projection")
    vision_fc = _require(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight")
    text_fc = _require(state_dict, "transformer.resblocks.0.mlp.c_fc.weight")

    # The position embedding has one row for the class token and one per patch of a square grid.
    grid = round((vision_positions.shape[0] - 1) ** 0.5)
    if grid * grid + 1 != vision_positions.shape[0]:
        msg = (
            f"visual.positional_embedding has {vision_positions.shape[0]} rows, which is not 1 + a square number "
            "of patches. Only square patch grids convert."
        )
        raise ValueError(msg)
    embed_dim = int(visual_proj.shape[1])
    if text_proj.ndim != 2 or text_proj.shape[1] != embed_dim:
        msg = f"text_projection has shape {tuple(text_proj.shape)}, but visual.proj projects to {embed_dim} dims."
        raise ValueError(msg)
    if patch_weight.shape[1] != 3:
        msg = f"visual.conv1.weight has shape {tuple(patch_weight.shape)}: CLIP's patch embedding takes 3 channels."
        raise ValueError(msg)
    patch_size = int(patch_weight.shape[-1])
    return ShapeSummary(
        embed_dim=embed_dim,
        vision_width=int(patch_weight.shape[0]),
        vision_layers=_count_blocks(state_dict, "visual."),
        patch_size=patch_size,
        image_size=grid * patch_size,
        vision_mlp_size=int(vision_fc.shape[0]),
        text_width=int(token_embedding.shape[1]),
        text_layers=_count_blocks(state_dict, ""),
        context_length=int(text_positions.shape[0]),
        vocab_size=int(token_embedding.shape[0]),
        text_mlp_size=int(text_fc.shape[0]),
    )


def _choose_settings(
    shapes: ShapeSummary,
    source_format: str,
    model_config: Mapping[str, Any] | None,
    model_name: str | None,
) -> dict[str, Any]:
    """Return head counts, activations and layer-norm epsilons for the inferred architecture."""
    defaults = {
        "vision_heads": shapes.vision_width // 64,
        "text_heads": shapes.text_width // 64,
        "vision_act": "quick_gelu" if source_format == "openai" else "gelu",
        "text_act": "quick_gelu" if source_format == "openai" else "gelu",
        "vision_eps": 1e-5,
        "text_eps": 1e-5,
    }
    if model_config is not None:
        _check_signature(model_config, shapes, model_name or "given")
        settings = _architecture_settings(model_config)
        if source_format == "openai":
            settings["vision_act"] = settings["text_act"] = "quick_gelu"
    elif source_format == "open_clip":
        settings = _infer_open_clip_settings(tuple(shapes), defaults)
    else:
        settings = defaults

    for tower, width in (("vision", shapes.vision_width), ("text", shapes.text_width)):
        heads = settings[f"{tower}_heads"]
        if heads < 1 or width % heads:
            msg = (
                f"The {tower} width {width} does not split into {heads} attention heads. Pass model_name "
                "(--model-name) with the OpenCLIP architecture or its JSON config, which sets the head counts."
            )
            raise ValueError(msg)
    return settings


def infer_clip_config(
    state_dict: Mapping[str, torch.Tensor],
    source_format: str,
    model_config: Mapping[str, Any] | None = None,
    model_name: str | None = None,
) -> CLIPConfig:
    """Build the transformers `CLIPConfig` of an OpenAI or OpenCLIP ViT state dict from its tensor shapes.

    Args:
        state_dict: OpenAI/OpenCLIP key names, wrapper prefixes removed.
        source_format: `"openai"` (QuickGELU, heads = width // 64) or `"open_clip"`.
        model_config: The OpenCLIP model config. It sets head counts, activations and layer-norm epsilons.
            Without it, OpenCLIP settings come from the shipped architectures with the same shapes.
        model_name: Name of the architecture, used in messages.

    Raises:
        ValueError: If a tensor needed to infer the architecture is missing or has an inconsistent shape, or if
            the architecture cannot be converted.
    """
    if model_config is not None:
        _check_open_clip_options(model_config, model_name or "given")
    shapes = read_shapes(state_dict)
    if shapes.vocab_size != CLIP_VOCAB_SIZE:
        msg = (
            f"The text tower has a vocabulary of {shapes.vocab_size} tokens, but the converter writes CLIP's BPE "
            f"tokenizer of {CLIP_VOCAB_SIZE} tokens. Models with another tokenizer cannot be converted."
        )
        raise ValueError(msg)
    settings = _choose_settings(shapes, source_format, model_config, model_name)

    vision_config = {
        "hidden_size": shapes.vision_width,
        "intermediate_size": shapes.vision_mlp_size,
        "num_hidden_layers": shapes.vision_layers,
        "num_attention_heads": settings["vision_heads"],
        "num_channels": 3,
        "image_size": shapes.image_size,
        "patch_size": shapes.patch_size,
        "hidden_act": settings["vision_act"],
        "layer_norm_eps": settings["vision_eps"],
        "projection_dim": shapes.embed_dim,
    }
    text_config = {
        "vocab_size": shapes.vocab_size,
        "hidden_size": shapes.text_width,
        "intermediate_size": shapes.text_mlp_size,
        "num_hidden_layers": shapes.text_layers,
        "num_attention_heads": settings["text_heads"],
        "max_position_embeddings": shapes.context_length,
        "hidden_act": settings["text_act"],
        "layer_norm_eps": settings["text_eps"],
        "projection_dim": shapes.embed_dim,
        "bos_token_id": CLIP_BOS_TOKEN_ID,
        "eos_token_id": CLIP_EOS_TOKEN_ID,
        "pad_token_id": CLIP_EOS_TOKEN_ID,
    }
    logit_scale = float(state_dict["logit_scale"]) if "logit_scale" in state_dict else 2.6592
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=shapes.embed_dim,
        logit_scale_init_value=logit_scale,
    )


# --------------------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------------------


def _check_metadata(state_dict: Mapping[str, torch.Tensor], config: CLIPConfig) -> None:
    """Compare the hyperparameters stored in OpenAI archives with the inferred configuration."""
    expected = {
        "input_resolution": config.vision_config.image_size,
        "context_length": config.text_config.max_position_embeddings,
        "vocab_size": config.text_config.vocab_size,
    }
    for key, value in expected.items():
        if key in state_dict and int(state_dict[key]) != value:
            msg = f"The checkpoint stores {key}={int(state_dict[key])}, but its weights imply {value}."
            raise ValueError(msg)


def _source_key_for(target_key: str) -> str:
    """Return the OpenAI/OpenCLIP key that provides a transformers key, for error messages."""
    for source_key, renamed in {**_TOP_LEVEL_RENAMES, **_TRANSPOSED_RENAMES}.items():
        if renamed == target_key:
            return source_key
    match = re.match(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$", target_key)
    if match is None:
        return target_key
    prefix = ("visual." if match.group(1) == "vision_model" else "") + f"transformer.resblocks.{match.group(2)}."
    name = match.group(3)
    attention = re.match(r"^self_attn\.[qkv]_proj\.(weight|bias)$", name)
    if attention:
        return f"{prefix}attn.in_proj_{attention.group(1)}"
    for source_name, renamed in _BLOCK_RENAMES.items():
        if renamed == name:
            return prefix + source_name
    return target_key


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """Map an OpenAI/OpenCLIP ViT state dict to transformers' `CLIPModel` keys, checking every key and shape.

    Attention input projections `in_proj_weight` (3 * width, width) are split into `q_proj`, `k_proj` and
    `v_proj`. The projections `visual.proj` and `text_projection` (width, embed_dim) are transposed. Floating
    tensors are returned as float32 (OpenAI's archives store float16). Returned tensors may be views of the
    source tensors, so copy them (as `load_state_dict` does) before changing either.

    Raises:
        ValueError: Listing the source keys that have no transformers counterpart, the transformers keys that the
            checkpoint does not provide, and the tensors whose shapes differ.
    """
    _check_metadata(state_dict, config)
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.float()
        if key in _METADATA_KEYS or key in _DERIVED_KEYS:
            continue
        if key in _TOP_LEVEL_RENAMES:
            converted[_TOP_LEVEL_RENAMES[key]] = tensor
            continue
        if key in _TRANSPOSED_RENAMES:
            converted[_TRANSPOSED_RENAMES[key]] = tensor.t() if tensor.ndim == 2 else tensor
            continue
        match = _BLOCK_PATTERN.match(key)
        if match is None:
            unknown.append(key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{match.group(2)}."
        name = match.group(3)
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            suffix = "weight" if name.endswith("weight") else "bias"
            if tensor.shape[0] % 3:
                msg = f"{key} has shape {tuple(tensor.shape)}: its first dimension must be 3 * width (q, k, v)."
                raise ValueError(msg)
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"{prefix}self_attn.{part}.{suffix}"] = chunk
        elif name in _BLOCK_RENAMES:
            converted[prefix + _BLOCK_RENAMES[name]] = tensor
        else:
            unknown.append(key)

    # The meta device gives the expected keys and shapes without allocating or initialising weights.
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in CLIPModel(config).state_dict().items()}
    missing = sorted({_source_key_for(key) for key in set(expected) - set(converted)})
    extra = sorted(set(converted) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(converted[key].shape)}, expected {expected[key]}"
        for key in sorted(set(expected) & set(converted))
        if tuple(converted[key].shape) != expected[key]
    ]
    problems = []
    if unknown:
        problems.append(f"unknown keys in the checkpoint: {sorted(unknown)}")
    if extra:
        problems.append(f"keys beyond the inferred architecture: {extra}")
    if missing:
        problems.append(f"missing keys: {missing}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        msg = "The checkpoint does not match a ViT CLIP model: " + "; ".join(problems) + "."
        raise ValueError(msg)
    return converted


def clip_model_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    source_format: str = "openai",
    model_name: str | os.PathLike | None = None,
) -> CLIPModel:
    """Build a transformers `CLIPModel` from an OpenAI or OpenCLIP ViT state dict, in memory.

    Args:
        state_dict: OpenAI or OpenCLIP key names; `module.` prefixes and CustomTextCLIP `text.` prefixes are
            accepted.
        source_format: `"openai"` or `"open_clip"`.
        model_name: OpenCLIP architecture name or config path (see [`read_open_clip_model_config`]).
    """
    if source_format not in ("openai", "open_clip"):
        msg = f"source_format={source_format!r} is invalid here. Use 'openai' or 'open_clip'."
        raise ValueError(msg)
    state_dict = _normalize_text_prefix(_unwrap_state_dict(state_dict, "the state dict"))
    model_config = read_open_clip_model_config(model_name) if model_name is not None else None
    config = infer_clip_config(state_dict, source_format, model_config, str(model_name) if model_name else None)
    converted = convert_state_dict(state_dict, config)
    # Random initialisation is skipped because the strict load below overwrites every parameter. Every key and
    # shape was checked above, so the load cannot drop or invent a weight.
    with no_init_weights():
        model = CLIPModel(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _resolve_format(source_format: str | None, state_dict: Mapping[str, torch.Tensor], torchscript: bool) -> str:
    source_format = source_format or "auto"
    if source_format not in SOURCE_FORMATS:
        msg = f"source_format={source_format!r} is invalid. Use one of {list(SOURCE_FORMATS)}."
        raise ValueError(msg)
    if source_format != "auto":
        return source_format
    # OpenAI's archives are TorchScript and store their hyperparameters next to the weights. OpenCLIP's do neither.
    if torchscript or any(key in state_dict for key in _METADATA_KEYS):
        return "openai"
    return "open_clip"


def convert_clip_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_name: str | os.PathLike | None = None,
    image_size: int | None = None,
    source_format: str | None = None,
) -> Path:
    """Convert an OpenAI or OpenCLIP ViT checkpoint into a folder that `CLIPModel.from_pretrained` loads.

    The folder contains the model (`model.safetensors`, `config.json`), CLIP's tokenizer and a
    `preprocessor_config.json` that resizes whole images to `image_size` with CLIP's normalisation (or the mean
    and std of an OpenCLIP folder's `preprocess_cfg`).

    Args:
        source: TorchScript archive, `torch.save` state dict or checkpoint, `.safetensors` file, or OpenCLIP
            folder with `open_clip_config.json`.
        output_dir: Folder to write. It is created if needed.
        model_name: OpenCLIP architecture name (`ViT-B-16`, `ViT-L-14-quickgelu`, ...) or the path of its JSON
            config. It sets head counts and the activation, which the weights do not show. An OpenCLIP folder's
            `open_clip_config.json` is used when this is None.
        image_size: Input size of the written image-processor config, in pixels. Defaults to the checkpoint's
            native size. The model keeps its native position embeddings.
        source_format: `"openai"`, `"open_clip"`, or `"auto"`/None: TorchScript archives and state dicts with
            OpenAI's stored hyperparameters are OpenAI, everything else OpenCLIP.

    Returns:
        The output folder.
    """
    source_path = Path(source)
    state_dict, torchscript = load_clip_checkpoint(source_path)
    state_dict = _normalize_text_prefix(state_dict)
    resolved_format = _resolve_format(source_format, state_dict, torchscript)
    if model_name is None and source_path.is_dir() and (source_path / _OPEN_CLIP_FOLDER_CONFIG).is_file():
        model_name = source_path / _OPEN_CLIP_FOLDER_CONFIG
    logger.info("Converting %s (%s format, architecture %s).", source_path, resolved_format, model_name or "inferred")

    model = clip_model_from_state_dict(state_dict, resolved_format, model_name)
    config = model.config
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer = build_clip_tokenizer(model_max_length=config.text_config.max_position_embeddings)
    tokenizer.save_pretrained(output_dir)

    processor_config = clip_image_processor_config(image_size or config.vision_config.image_size)
    preprocess_cfg = _open_clip_preprocess_config(source_path)
    for source_key, target_key in (("mean", "image_mean"), ("std", "image_std")):
        if preprocess_cfg.get(source_key) is not None:
            processor_config[target_key] = [float(value) for value in preprocess_cfg[source_key]]
    with open(output_dir / "preprocessor_config.json", "w", encoding="utf-8") as handle:
        json.dump(processor_config, handle, indent=2)

    vision = config.vision_config
    logger.info(
        "Wrote a CLIP ViT (patch %d, image %d, %d vision layers of width %d, %s) to %s.",
        vision.patch_size,
        vision.image_size,
        vision.num_hidden_layers,
        vision.hidden_size,
        vision.hidden_act,
        output_dir,
    )
    return output_dir


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `convert-clip` subcommand to the `cmi-clip` command line."""
    parser = subparsers.add_parser(
        "convert-clip",
        help="Convert an OpenAI or OpenCLIP checkpoint into a transformers CLIP folder.",
        description=(
            "Convert an OpenAI CLIP TorchScript archive (e.g. ViT-L-14-336px.pt), an OpenCLIP state dict or an "
            "OpenCLIP folder into a folder that CLIPModel.from_pretrained and CMIClipModel.from_clip_pretrained load."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", help="Checkpoint file (.pt, .bin, .safetensors) or OpenCLIP folder.")
    parser.add_argument("output_dir", metavar="OUT", help="Output folder for the transformers model, tokenizer and processor config.")
    parser.add_argument(
        "--model-name",
        default=None,
        help=(
            "OpenCLIP architecture name (e.g. ViT-B-16, ViT-L-14-quickgelu) or path of its JSON config. Sets the "
            "attention head counts and the activation, which the weights do not show. Required for OpenCLIP "
            "state dicts whose shapes fit several architectures."
        ),
    )
    parser.add_argument(
        "--format",
        dest="source_format",
        choices=list(SOURCE_FORMATS),
        default="auto",
        help=(
            "Source key layout and activation: openai (QuickGELU), open_clip, or auto (TorchScript archives and "
            "state dicts with OpenAI's stored hyperparameters are openai, others open_clip). Default: auto."
        ),
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="Input size in pixels written to preprocessor_config.json. Default: the checkpoint's native size.",
    )
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    output_dir = convert_clip_checkpoint(
        args.source,
        args.output_dir,
        model_name=args.model_name,
        image_size=args.image_size,
        source_format=args.source_format,
    )
    print(output_dir)
    return 0


__all__ = [
    "SOURCE_FORMATS",
    "add_parser",
    "clip_model_from_state_dict",
    "convert_clip_checkpoint",
    "convert_state_dict",
    "ShapeSummary",
    "infer_clip_config",
    "is_torchscript_archive",
    "load_clip_checkpoint",
    "read_open_clip_model_config",
    "read_shapes",
]
