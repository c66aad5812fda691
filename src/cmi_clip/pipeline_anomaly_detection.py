# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""The `anomaly-detection` pipeline: image in, anomaly score, label and anomaly map out.

```python
>>> from transformers import pipeline
>>> import cmi_clip  # registers the task
>>> detector = pipeline("anomaly-detection", model="path/to/cmi-clip-model", trust_remote_code=True)
>>> result = detector("bottle_001.png", category="bottle")
>>> result["score"], result["label"], result["anomaly_map"].size
```

This file is also copied into saved model folders (see `cmi_clip.hub.save_for_pipeline`), so that
`pipeline(model=folder, trust_remote_code=True)` works where `cmi_clip` is not installed. Because the
folder's config declares the pipeline under `custom_pipelines`, transformers 5.25 requires
`trust_remote_code=True` for such folders even where `cmi_clip` is imported. Plain CLIP checkpoints
need no such flag. The file imports only transformers, torch, numpy, Pillow, the standard library and,
relatively, the model files that are copied with it.
"""

from __future__ import annotations

import io
import os
import urllib.request
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers import Pipeline
from transformers.utils import logging

from .processing_cmi_clip import preprocess_images, to_rgb

logger = logging.get_logger(__name__)

TASK = "anomaly-detection"
# Category used when none is given; the model scores it with the generic prompts.
DEFAULT_CATEGORY = "object"
# Per-layer CMI maps (B, rows, columns) returned with `return_attentions=True`.
ATTENTION_KEYS = ("abnormality_attention", "normality_attention", "abnormality_cue", "normality_cue")
# The `custom_pipelines` entry that saved configs carry, so that transformers finds this class in the
# copied file when the task is not registered in the running interpreter.
CUSTOM_PIPELINE_ENTRY = {
    "impl": "pipeline_anomaly_detection.AnomalyDetectionPipeline",
    "pt": ["AutoModel"],
    "tf": [],
    "type": "image",
}


# ---------------------------------------------------------------------- image loading


def array_to_image(array: np.ndarray) -> Image.Image:
    """Convert a numpy image to a PIL image without losing bit depth.

    Accepted shapes are (H, W), (H, W, 1), (H, W, 3) and (H, W, 4). uint8 becomes "L", "RGB" or "RGBA".
    uint16 single-channel becomes "I;16" (scaled to 8 bits later by `to_rgb`), and uint16 colour images
    are scaled by 1/257 here. Float arrays are taken as values in [0, 1]. Boolean arrays become 0/255.

    Raises:
        ValueError: The shape or dtype is not one of the above.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        msg = f"Image array of shape {array.shape} is not supported. Pass (H, W), (H, W, 3) or (H, W, 4)."
        raise ValueError(msg)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype == np.uint16 and array.ndim == 2:
        # Little-endian uint16 arrays open as mode "I;16" in Pillow.
        return Image.fromarray(np.ascontiguousarray(array.astype("<u2")))
    if array.dtype == np.uint16:
        array = np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = np.rint(np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        msg = f"Image array of dtype {array.dtype} is not supported. Pass uint8, uint16, bool or float values in [0, 1]."
        raise ValueError(msg)
    return Image.fromarray(array)


def load_image(image: Any, timeout: float | None = None) -> Image.Image:
    """Open an image from a path, an http(s) URL, a PIL image or a numpy array, keeping its mode.

    The image is neither converted nor EXIF-transposed here; [`to_rgb`] does both.

    Raises:
        FileNotFoundError: A path does not exist.
        PIL.UnidentifiedImageError: The file is not in an image format that Pillow reads.
        OSError: The file is damaged, for example truncated.
        TypeError: The input is of another type.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return array_to_image(image)
    if isinstance(image, torch.Tensor):
        return array_to_image(image.detach().cpu().numpy())
    if isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
                data = response.read()
            stream: Any = io.BytesIO(data)
        elif os.path.isfile(source):
            stream = source
        else:
            msg = f"Image file {source!r} was not found. Pass an existing path, an http(s) URL, a PIL image or an array."
            raise FileNotFoundError(msg)
        try:
            opened = Image.open(stream)
            opened.load()
        except UnidentifiedImageError as error:
            msg = (
                f"Image file {source!r} could not be read because Pillow does not recognise its format ({error}). "
                "Pass a PNG, JPEG, BMP or TIFF image, or check that the file is not damaged."
            )
            raise UnidentifiedImageError(msg) from error
        except OSError as error:
            msg = f"Image file {source!r} could not be decoded ({error}), so it is probably damaged. Replace or re-export it."
            raise OSError(msg) from error
        return opened
    msg = f"Unsupported image input of type {type(image).__name__}. Pass a path, an http(s) URL, a PIL image or a numpy array."
    raise TypeError(msg)


# ---------------------------------------------------------------------- model loading


def wrap_clip_model(clip_model: Any) -> Any:
    """Build a training-free CMI-CLIP detector around a loaded `CLIPModel`.

    The CLIP checkpoint is read again from `clip_model.name_or_path` by `CMIClipModel.from_clip_pretrained`,
    which also loads its tokenizer and image processor.

    Raises:
        ValueError: The CLIP model has no checkpoint path to load the tokenizer from.
    """
    from .modeling_cmi_clip import CMIClipModel

    path = getattr(clip_model, "name_or_path", "") or getattr(clip_model.config, "_name_or_path", "")
    if not path:
        msg = (
            "A plain CLIPModel needs its checkpoint path (model.name_or_path) to load the tokenizer. "
            "Pass the checkpoint path or Hub id instead, or use CMIClipModel.from_clip_pretrained(path)."
        )
        raise ValueError(msg)
    logger.warning("%s is a plain CLIP checkpoint: running training-free CMI-CLIP (untrained adapters, CMI gates at zero).", path)
    return CMIClipModel.from_clip_pretrained(path, clip_kwargs={"dtype": clip_model.dtype})


def load_detector(model_or_path: Any, **kwargs: Any) -> Any:
    """Return a CMI-CLIP model in evaluation mode from a saved CMI-CLIP model or a plain CLIP checkpoint.

    Args:
        model_or_path: A `CMIClipModel`, a `CLIPModel`, or a folder / Hub id holding either. A CLIP
            checkpoint (config `model_type` "clip") is wrapped with `CMIClipModel.from_clip_pretrained`
            and runs training-free.
        **kwargs: Passed to `from_pretrained` / `from_clip_pretrained` (for example `revision`).

    Raises:
        ValueError: The checkpoint is neither a CMI-CLIP nor a CLIP model.
    """
    from transformers import PretrainedConfig

    from .modeling_cmi_clip import CMIClipModel

    if not isinstance(model_or_path, (str, os.PathLike)):
        model_type = getattr(model_or_path.config, "model_type", None)
        model = wrap_clip_model(model_or_path) if model_type == "clip" else model_or_path
        return model.eval()

    path = os.fspath(model_or_path)
    looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1 or os.sep != "/" and os.sep in path
    # "outputs/model" has the form of a Hub id, but when ./outputs exists it names a local folder.
    looks_local = looks_local or ("/" in path and os.path.isdir(path.split("/")[0]))
    if looks_local and not os.path.isdir(path):
        msg = f"Model folder {path} was not found. Pass a saved CMI-CLIP model folder, a CLIP checkpoint folder, or a Hub id."
        raise FileNotFoundError(msg)
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(model_or_path, **kwargs)
    except OSError as error:
        msg = (
            f"No model could be loaded from {path!r}: it is not a local folder (looked in {os.path.abspath(path)}) "
            f"and loading it as a Hub id failed ({error}). Check the path, or the network for Hub ids."
        )
        raise FileNotFoundError(msg) from error
    model_type = config_dict.get("model_type")
    if model_type == "clip":
        logger.warning("%s is a plain CLIP checkpoint: running training-free CMI-CLIP.", model_or_path)
        model = CMIClipModel.from_clip_pretrained(model_or_path, clip_kwargs=kwargs or None)
    elif model_type == CMIClipModel.config_class.model_type:
        model = CMIClipModel.from_pretrained(model_or_path, **kwargs)
    else:
        msg = (
            f"{model_or_path} holds a {model_type!r} model. Pass a CMI-CLIP model folder (model_type "
            f"'{CMIClipModel.config_class.model_type}') or a CLIP checkpoint (model_type 'clip')."
        )
        raise ValueError(msg)
    return model.eval()


# ---------------------------------------------------------------------- pipeline


class AnomalyDetectionPipeline(Pipeline):
    """Anomaly detection with a CMI-CLIP model: one score, label and anomaly map per image.

    Inputs are paths, http(s) URLs, PIL images or numpy arrays (H x W, H x W x 3, H x W x 4; uint8,
    uint16 or float in [0, 1]), one at a time or as a list. Dicts with an "image" and an optional
    "category" key, such as the rows of a `datasets.Dataset` (`list(dataset)`), also work. Every image is EXIF-transposed and converted to
    8-bit RGB by `to_rgb`, then resized as a whole to the model's input size.

    Call arguments:
        category (`str` or `list[str]`, *optional*): Product category of the images, or one per image.
            Defaults to "object" (the generic prompts).
        threshold (`float`, *optional*): Score at and above which an image is "anomalous" and a pixel is
            in `mask`. Defaults to the category's entry in `model.config.category_thresholds`, else
            `model.config.decision_threshold`.
        mask_threshold (`float`, *optional*): Pixel threshold for `mask` only. Defaults to `threshold`.
        return_branch_maps (`bool`, *optional*, defaults to `False`): Also return the abnormality and
            normality branch maps.
        return_attentions (`bool`, *optional*, defaults to `False`): Also return `attentions`, one dict
            per CMI layer with `layer` and the patch-grid arrays (rows, columns) `abnormality_attention`,
            `normality_attention`, `abnormality_cue` and `normality_cue`.
        batch_size (`int`, *optional*): Images per model forward for list inputs.
        timeout (`float`, *optional*): Seconds to wait when downloading an image from a URL.

    Returns:
        For each image, a dict with `score` (float in [0, 1]) and `label` ("anomalous" or "normal").
        `anomaly_map` is a PIL image of mode "F" with values in [0, 1], of the size of the upright
        input image. `mask` is a PIL image of mode "L" with values 0 or 255, of the same size. With
        `return_branch_maps=True` the dict also has `abnormality_map` and `normality_map` (mode "F").
        A single input returns a dict, and a list returns a list.
    """

    # The model carries its own tokenizer and image processor, so transformers loads none of them.
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(model.config, "model_type", None) == "clip":
            model = wrap_clip_model(model)
        if getattr(model, "image_processor", None) is None or getattr(model, "tokenizer", None) is None:
            msg = (
                "The model has no image processor or tokenizer. Load it with CMIClipModel.from_pretrained or "
                "from_clip_pretrained, which attach both."
            )
            raise ValueError(msg)
        model.eval()
        # Batching collates with the image processor: pixel values are concatenated, other keys listed.
        kwargs["image_processor"] = model.image_processor
        super().__init__(model, *args, **kwargs)

    def __call__(self, inputs: Any, category: str | list[str] | tuple[str, ...] | None = None, **kwargs: Any) -> Any:
        """Score one image or a list of images; see the class docstring for arguments and outputs."""
        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(category, (list, tuple)):
            if not isinstance(inputs, list) or len(inputs) != len(category):
                count = len(inputs) if isinstance(inputs, list) else 1
                msg = f"Got {len(category)} categories for {count} images. Pass one category per image or a single string."
                raise ValueError(msg)
            inputs = [{"image": image, "category": name} for image, name in zip(inputs, category)]
            category = None
        if category is not None:
            kwargs["category"] = category
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self,
        category: str | None = None,
        threshold: float | None = None,
        mask_threshold: float | None = None,
        return_branch_maps: bool | None = None,
        return_attentions: bool | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        if kwargs:
            msg = (
                f"Unknown arguments {sorted(kwargs)}. Use category, threshold, mask_threshold, return_branch_maps, "
                "return_attentions, batch_size or timeout."
            )
            raise TypeError(msg)
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = {}
        postprocess_params: dict[str, Any] = {}
        if category is not None:
            preprocess_params["category"] = category
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        for name, value in (("threshold", threshold), ("mask_threshold", mask_threshold)):
            if value is not None:
                value = float(value)
                if not 0.0 <= value <= 1.0:
                    msg = f"{name}={value} is outside [0, 1]; scores and maps are probabilities."
                    raise ValueError(msg)
                postprocess_params[name] = value
        if return_branch_maps is not None:
            postprocess_params["return_branch_maps"] = bool(return_branch_maps)
        if return_attentions is not None:
            forward_params["output_attentions"] = bool(return_attentions)
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs: Any, category: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Load one image and build its model inputs.

        Returns:
            `pixel_values` (1, 3, H, W), `category` (str) and `original_size` (1, 2) as (height, width)
            of the upright image.
        """
        if isinstance(inputs, dict):
            if "image" not in inputs:
                msg = f"A dict input needs an 'image' key (and optionally 'category'), got keys {sorted(inputs)}."
                raise ValueError(msg)
            category = inputs.get("category", category)
            inputs = inputs["image"]
        image = to_rgb(load_image(inputs, timeout=timeout))
        width, height = image.size
        return {
            "pixel_values": preprocess_images([image], self.model.image_processor),
            "category": category if category is not None else DEFAULT_CATEGORY,
            "original_size": torch.tensor([[height, width]]),
        }

    def get_inference_context(self) -> Any:
        """Run `_forward` under `torch.inference_mode`, which skips the view and version tracking of `no_grad`.

        Text embeddings cached by the model during a call are inference tensors. Training the same model
        afterwards still works, because they enter autograd only through `torch.stack`, which saves nothing.
        """
        return torch.inference_mode

    def _forward(self, model_inputs: dict[str, Any], output_attentions: bool = False) -> dict[str, Any]:
        categories = model_inputs["category"]
        outputs = self.model(
            pixel_values=model_inputs["pixel_values"], categories=categories, output_attentions=output_attentions
        )
        model_outputs = {
            "image_scores": outputs.image_scores,
            "anomaly_map": outputs.anomaly_map,
            "abnormality_map": outputs.abnormality_map,
            "normality_map": outputs.normality_map,
            "original_size": model_inputs["original_size"],
            "category": [categories] if isinstance(categories, str) else list(categories),
        }
        if output_attentions and outputs.attentions:
            # The base class splits batched outputs along the first axis of each tensor, so the per-layer
            # maps are stacked as (B, layers, rows, columns) under flat keys.
            batch = outputs.anomaly_map.shape[0]
            layers = [entry["layer"] for entry in outputs.attentions]
            model_outputs["attention_layers"] = torch.tensor(layers).expand(batch, -1)
            for key in ATTENTION_KEYS:
                model_outputs[key] = torch.stack([entry[key] for entry in outputs.attentions], dim=1)
        return model_outputs

    def postprocess(
        self,
        model_outputs: dict[str, Any],
        threshold: float | None = None,
        mask_threshold: float | None = None,
        return_branch_maps: bool = False,
    ) -> dict[str, Any]:
        if threshold is None:
            category = model_outputs.get("category")
            if isinstance(category, (list, tuple)):
                category = category[0]
            threshold = self.model.config.threshold_for(category)
        if mask_threshold is None:
            mask_threshold = threshold
        height, width = (int(side) for side in model_outputs["original_size"].reshape(-1, 2)[0])
        score = float(model_outputs["image_scores"].reshape(-1)[0])
        anomaly_map = self._resize_map(model_outputs["anomaly_map"], height, width)
        result = {
            "score": score,
            "label": "anomalous" if score >= threshold else "normal",
            "anomaly_map": Image.fromarray(anomaly_map),
            "mask": Image.fromarray(((anomaly_map >= mask_threshold) * 255).astype(np.uint8)),
        }
        if return_branch_maps:
            for name in ("abnormality_map", "normality_map"):
                result[name] = Image.fromarray(self._resize_map(model_outputs[name], height, width))
        if "attention_layers" in model_outputs:
            layers = model_outputs["attention_layers"].reshape(-1).tolist()
            maps = {}
            for key in ATTENTION_KEYS:
                values = model_outputs[key]
                maps[key] = values.reshape(len(layers), *values.shape[-2:]).float().numpy()
            result["attentions"] = []
            for position, layer in enumerate(layers):
                entry = {"layer": int(layer)}
                for key in ATTENTION_KEYS:
                    entry[key] = maps[key][position]
                result["attentions"].append(entry)
        return result

    @staticmethod
    def _resize_map(anomaly_map: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Bilinearly resize one map (1, h, w) or (h, w) to (height, width), as float32 in [0, 1]."""
        values = anomaly_map.reshape(1, 1, *anomaly_map.shape[-2:]).float()
        if tuple(values.shape[-2:]) != (height, width):
            values = F.interpolate(values, size=(height, width), mode="bilinear", align_corners=False)
        return values[0, 0].clamp(0.0, 1.0).numpy().astype(np.float32)


def save_pipeline_files(save_directory: str | os.PathLike) -> list[str]:
    """Make a saved CMI-CLIP folder usable with `pipeline(model=folder, trust_remote_code=True)`.

    Copies this file and the model files it imports into the folder and declares the pipeline in the
    folder's `config.json` under `custom_pipelines`. The folder must already hold a saved model
    (`model.save_pretrained(save_directory)`). The declaration is written to the file only, so the
    in-memory config of the model is unchanged.

    Returns:
        The paths of the copied code files.

    Raises:
        FileNotFoundError: The folder has no `config.json`.
    """
    import json

    from transformers.dynamic_module_utils import custom_object_save

    config_path = os.path.join(os.fspath(save_directory), "config.json")
    if not os.path.isfile(config_path):
        msg = f"{config_path} was not found. Save the model first with model.save_pretrained({os.fspath(save_directory)!r})."
        raise FileNotFoundError(msg)
    copied = [os.fspath(path) for path in custom_object_save(AnomalyDetectionPipeline, save_directory)]
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    if "auto_map" not in config:
        logger.warning("%s has no auto_map, so the model itself will not load with trust_remote_code.", config_path)
    config["custom_pipelines"] = {TASK: dict(CUSTOM_PIPELINE_ENTRY)}
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return copied


def register_pipeline() -> None:
    """Register [`AnomalyDetectionPipeline`] as the transformers task "anomaly-detection" (idempotent)."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    registered = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if registered is not None and registered.get("impl") is AnomalyDetectionPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=AnomalyDetectionPipeline, pt_model=AutoModel, type="image")


__all__ = [
    "AnomalyDetectionPipeline",
    "CUSTOM_PIPELINE_ENTRY",
    "TASK",
    "array_to_image",
    "load_detector",
    "load_image",
    "register_pipeline",
    "save_pipeline_files",
    "wrap_clip_model",
]
