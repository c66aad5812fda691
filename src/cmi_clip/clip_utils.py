# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Offline CLIP building blocks: the real CLIP tokenizer from its BPE file, and random-weight CLIP folders.

No weights or vocabularies are downloaded here. CLIP's byte-pair-encoding vocabulary
(`bpe_simple_vocab_16e6.txt.gz`, 49,408 tokens) ships inside the `open_clip_torch` package, and
[`build_clip_tokenizer`] turns it into a transformers `CLIPTokenizer` that gives the same ids as the
tokenizers published with OpenAI's checkpoints.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# Merges used by CLIP: the file holds more lines than the 49,152 - 256 - 2 merges of the released vocabulary.
NUM_CLIP_MERGES = 49152 - 256 - 2
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def find_bpe_file() -> Path:
    """Locate CLIP's BPE vocabulary inside an installed `open_clip_torch`, without importing it."""
    env_path = os.environ.get("CMI_CLIP_BPE_FILE")
    if env_path:
        path = Path(env_path)
        if not path.is_file():
            msg = f"CMI_CLIP_BPE_FILE={env_path} does not exist. Point it at {BPE_FILE_NAME} or unset it."
            raise FileNotFoundError(msg)
        return path
    # find_spec reads the package location without running open_clip/__init__.py, which imports torchvision.
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    msg = (
        f"CLIP's BPE vocabulary ({BPE_FILE_NAME}) was not found. Install it with `pip install open_clip_torch` "
        "(or `pip install cmi_clip[convert]`), or set CMI_CLIP_BPE_FILE to the file's path."
    )
    raise FileNotFoundError(msg)


def _bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, as byte-level BPE does.

    Printable bytes map to themselves and come first, in byte order, then the other bytes map to
    characters from U+0100 on. CLIP's vocabulary ids follow this order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def build_clip_tokenizer(bpe_file: str | os.PathLike | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """Build the CLIP tokenizer (vocabulary of 49,408 tokens) from CLIP's BPE merges file.

    Args:
        bpe_file: Path to `bpe_simple_vocab_16e6.txt.gz`. Defaults to the copy inside `open_clip_torch`.
        model_max_length: Text context length, start and end tokens included.
    """
    path = Path(bpe_file) if bpe_file is not None else find_bpe_file()
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # The first line is a version header, then one merge ("a b") per line.
    merges = [tuple(line.split()) for line in lines[1 : NUM_CLIP_MERGES + 1]]
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tokenizer


def tiny_clip_config(
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 32,
    num_layers: int = 4,
    num_heads: int = 4,
    projection_dim: int = 32,
    text_hidden_size: int = 32,
    text_layers: int = 2,
    **kwargs: Any,
) -> CLIPConfig:
    """Return a small CLIP configuration with CLIP's real vocabulary size and text context."""
    vision = {
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 4,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "projection_dim": projection_dim,
    }
    text = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "hidden_size": text_hidden_size,
        "intermediate_size": text_hidden_size * 4,
        "num_hidden_layers": text_layers,
        "num_attention_heads": num_heads,
        "projection_dim": projection_dim,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim, **kwargs)


def clip_image_processor_config(image_size: int | tuple[int, int]) -> dict[str, Any]:
    """Return a CLIP image-processor configuration that resizes the whole image, without a center crop."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"height": int(height), "width": int(width)},
        "resample": 3,
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_IMAGE_MEAN),
        "image_std": list(CLIP_IMAGE_STD),
        "do_convert_rgb": True,
    }


def save_random_clip(
    output_dir: str | os.PathLike,
    config: CLIPConfig | None = None,
    seed: int = 0,
    bpe_file: str | os.PathLike | None = None,
) -> Path:
    """Save a CLIP model with random weights, the real tokenizer and an image-processor config to a folder.

    The folder loads with `CLIPModel.from_pretrained` and `CMIClipModel.from_clip_pretrained`.
    """
    import json

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else tiny_clip_config()
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(output_dir)
    tokenizer = build_clip_tokenizer(bpe_file, model_max_length=config.text_config.max_position_embeddings)
    tokenizer.save_pretrained(output_dir)
    processor_config = clip_image_processor_config(config.vision_config.image_size)
    with open(output_dir / "preprocessor_config.json", "w", encoding="utf-8") as handle:
        json.dump(processor_config, handle, indent=2)
    logger.info("Saved a random-weight CLIP model to %s", output_dir)
    return output_dir


__all__ = [
    "build_clip_tokenizer",
    "clip_image_processor_config",
    "find_bpe_file",
    "save_random_clip",
    "tiny_clip_config",
]
