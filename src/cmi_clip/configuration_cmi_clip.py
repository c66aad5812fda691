# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the CMI-CLIP anomaly detector."""

from __future__ import annotations

from typing import Any

from transformers import CLIPConfig, PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

DEFAULT_PROMPT_SETS = ("mvtec_ad", "visa")


class CMIClipConfig(PretrainedConfig):
    r"""
    Configuration of a [`CMIClipModel`]: a CLIP model plus the options of the two-branch
    (abnormality and normality) anomaly detector with Cross-view Mutual Interaction (CMI).

    Args:
        clip_config (`dict` or [`CLIPConfig`], *optional*):
            Configuration of the wrapped CLIP model. Defaults to `CLIPConfig()` (ViT-B/32 sizes).
        feature_layers (`list[int]`, *optional*):
            1-based indices of the vision encoder layers whose patch tokens are scored. Defaults to four
            evenly spaced layers ending at the last one (6/12/18/24 for a 24-layer ViT-L/14).
        image_size (`int` or `tuple[int, int]`, *optional*):
            Input size (height, width) in pixels. Both sides must be multiples of the patch size. Defaults
            to the CLIP checkpoint's own size; other sizes interpolate the position embeddings.
        adapter_hidden_size (`int`, *optional*, defaults to 128):
            Width of the residual bottleneck adapter applied per feature layer and per branch. The
            adapter's output projection starts at zero, so an untrained adapter is the identity.
        use_cmi (`bool`, *optional*, defaults to `True`):
            Whether the Cross-view Mutual Interaction module runs. `False` is the no-CMI ablation.
        cmi_layers (`list[int]`, *optional*):
            Positions in `feature_layers` (0-based) where CMI exchanges attention between the branches.
            Defaults to the middle layers (positions 1 and 2 of four).
        cmi_num_heads (`int`, *optional*, defaults to 4):
            Number of heads of the CMI cross-attention. Must divide the CLIP projection dimension.
        cmi_temperature (`float`, *optional*, defaults to 0.07):
            Temperature of the text-guided attention map softmax(cos(patch, text) / temperature).
        fusion_weight (`float`, *optional*, defaults to 0.5):
            Weight of the abnormality map in the fused map; the normality map gets `1 - fusion_weight`.
        learn_fusion_weight (`bool`, *optional*, defaults to `False`):
            Whether the fusion weight is a trainable parameter (initialised at `fusion_weight`).
        gaussian_sigma (`float`, *optional*, defaults to 4.0):
            Standard deviation, in pixels of the input size, of the Gaussian that smooths the maps in
            evaluation mode. 0 disables smoothing.
        image_score_top_k (`int`, *optional*, defaults to 100):
            Number of highest map pixels whose mean is the map part of the image score.
        image_score_map_weight (`float`, *optional*, defaults to 0.5):
            Weight of the map top-k mean in the image score; the global (class token) image-text
            score gets `1 - image_score_map_weight`.
        prompt_sets (`list[str]`, *optional*, defaults to `["mvtec_ad", "visa"]`):
            Built-in prompt banks to load when `prompts` is not given.
        prompts (`dict[str, dict[str, str]]` or `str`, *optional*):
            Category name -> {"abnormality": str, "normality": str}, optionally under a top-level
            `"categories"` key, or the path of such a JSON file. Defaults to the union of
            `prompt_sets`. Stored in full so that a saved model scores the same without the package data.
        fallback_abnormality_template (`str`, *optional*):
            Abnormality prompt for a category missing from `prompts`; `{}` is replaced by the category.
        fallback_normality_template (`str`, *optional*):
            Normality prompt for a category missing from `prompts`.
        normal_anchor_template (`str`, *optional*):
            Generic normal text that the abnormality branch scores against.
        abnormal_anchor_template (`str`, *optional*):
            Generic abnormal text that the normality branch scores against.
        split_long_prompts (`bool`, *optional*, defaults to `True`):
            Whether a prompt longer than CLIP's text context is split into one sentence per defect type
            whose embeddings are averaged. With `False` such a prompt raises an error.
        use_text_adapter (`bool`, *optional*, defaults to `True`):
            Whether each branch has a trainable residual adapter (zero-initialised) on its text embeddings.
        use_vv_attention (`bool`, *optional*, defaults to `False`):
            Whether the last `vv_attention_layers` vision layers add a value-value self-attention path
            whose tokens replace the ordinary ones for feature extraction (sharper training-free maps).
        vv_attention_layers (`int`, *optional*, defaults to 4):
            Number of final vision layers with the value-value path when `use_vv_attention` is on.
        use_cvl (`bool`, *optional*, defaults to `True`):
            Whether the training loss supervises both branch maps, their agreement and the text separation
            (cross-view learning). `False` supervises the fused map and the image score alone.
        loss_weights (`dict[str, float]`, *optional*):
            Weights of the loss terms by name (see `cmi_clip.losses.LossWeights`); missing names keep
            their defaults.
        freeze_clip (`bool`, *optional*, defaults to `True`):
            Whether the CLIP weights are frozen. `False` trains them with the heads.
        decision_threshold (`float`, *optional*, defaults to 0.5):
            Image score at or above which an image is labelled anomalous; also the pixel threshold of
            the binary mask. Training calibrates it on evaluation data.
        category_thresholds (`dict[str, float]`, *optional*):
            Image-score thresholds of single categories, which replace `decision_threshold` for images of
            that category. `cmi-clip calibrate` sets one from normal images of the product.
        clip_name_or_path (`str`, *optional*):
            Where the CLIP weights came from, recorded for model cards.

    Example:

    ```python
    >>> from transformers import CLIPConfig
    >>> from cmi_clip import CMIClipConfig, CMIClipModel

    >>> config = CMIClipConfig(clip_config=CLIPConfig().to_dict(), image_size=224)
    >>> model = CMIClipModel(config)
    ```
    """

    model_type = "cmi_clip"
    sub_configs = {"clip_config": CLIPConfig}

    def __init__(
        self,
        clip_config: dict[str, Any] | CLIPConfig | None = None,
        feature_layers: list[int] | None = None,
        image_size: int | list[int] | tuple[int, int] | None = None,
        adapter_hidden_size: int = 128,
        use_cmi: bool = True,
        cmi_layers: list[int] | None = None,
        cmi_num_heads: int = 4,
        cmi_temperature: float = 0.07,
        fusion_weight: float = 0.5,
        learn_fusion_weight: bool = False,
        gaussian_sigma: float = 4.0,
        image_score_top_k: int = 100,
        image_score_map_weight: float = 0.5,
        prompt_sets: list[str] | None = None,
        prompts: dict[str, Any] | str | None = None,
        fallback_abnormality_template: str = "a photo of a damaged {}.",
        fallback_normality_template: str = "a photo of a flawless {}.",
        normal_anchor_template: str = "a photo of a normal {}.",
        abnormal_anchor_template: str = "a photo of an abnormal {}.",
        split_long_prompts: bool = True,
        use_text_adapter: bool = True,
        use_vv_attention: bool = False,
        vv_attention_layers: int = 4,
        use_cvl: bool = True,
        loss_weights: dict[str, float] | None = None,
        freeze_clip: bool = True,
        decision_threshold: float = 0.5,
        category_thresholds: dict[str, float] | None = None,
        clip_name_or_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        if clip_config is None:
            clip_config = CLIPConfig()
        elif isinstance(clip_config, dict):
            clip_config = CLIPConfig(**clip_config)
        elif not isinstance(clip_config, CLIPConfig):
            msg = f"clip_config must be a dict or a CLIPConfig, got {type(clip_config).__name__}."
            raise TypeError(msg)
        self.clip_config = clip_config
        vision = clip_config.vision_config
        num_layers = vision.num_hidden_layers

        if feature_layers is None:
            count = min(4, num_layers)
            feature_layers = [round(num_layers * (i + 1) / count) for i in range(count)]
        feature_layers = [int(layer) for layer in feature_layers]
        for layer in feature_layers:
            if not 1 <= layer <= num_layers:
                msg = (
                    f"feature_layers contains {layer}, but the vision encoder has layers 1..{num_layers}. "
                    "Pass 1-based layer indices within that range."
                )
                raise ValueError(msg)
        self.feature_layers = feature_layers

        if image_size is None:
            image_size = vision.image_size
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        image_size = [int(side) for side in image_size]
        if len(image_size) != 2 or any(side % vision.patch_size for side in image_size):
            msg = (
                f"image_size={image_size} is invalid: expected (height, width) with both sides multiples of "
                f"the patch size {vision.patch_size}, for example {vision.patch_size * (vision.image_size // vision.patch_size)}."
            )
            raise ValueError(msg)
        self.image_size = image_size

        if cmi_layers is None:
            cmi_layers = list(range(1, len(feature_layers) - 1)) if len(feature_layers) > 2 else [0]
        for position in cmi_layers:
            if not 0 <= position < len(feature_layers):
                msg = (
                    f"cmi_layers contains {position}, but feature_layers has {len(feature_layers)} entries. "
                    "cmi_layers are 0-based positions in feature_layers."
                )
                raise ValueError(msg)
        self.cmi_layers = [int(position) for position in cmi_layers]
        if clip_config.projection_dim % cmi_num_heads:
            msg = f"cmi_num_heads={cmi_num_heads} must divide the CLIP projection_dim {clip_config.projection_dim}."
            raise ValueError(msg)
        if not 0.0 <= fusion_weight <= 1.0:
            msg = f"fusion_weight={fusion_weight} must be in [0, 1]."
            raise ValueError(msg)
        if image_score_top_k < 1:
            msg = f"image_score_top_k={image_score_top_k} must be at least 1."
            raise ValueError(msg)

        self.adapter_hidden_size = adapter_hidden_size
        self.use_cmi = use_cmi
        self.cmi_num_heads = cmi_num_heads
        self.cmi_temperature = cmi_temperature
        self.fusion_weight = fusion_weight
        self.learn_fusion_weight = learn_fusion_weight
        self.gaussian_sigma = gaussian_sigma
        self.image_score_top_k = image_score_top_k
        self.image_score_map_weight = image_score_map_weight
        self.prompt_sets = list(prompt_sets) if prompt_sets is not None else list(DEFAULT_PROMPT_SETS)
        from .prompt_bank import load_builtin_prompts, load_prompts, normalize_category

        self.prompts = load_builtin_prompts(self.prompt_sets) if prompts is None else load_prompts(prompts)
        self.fallback_abnormality_template = fallback_abnormality_template
        self.fallback_normality_template = fallback_normality_template
        self.normal_anchor_template = normal_anchor_template
        self.abnormal_anchor_template = abnormal_anchor_template
        self.split_long_prompts = split_long_prompts
        self.use_text_adapter = use_text_adapter
        self.use_vv_attention = use_vv_attention
        self.vv_attention_layers = vv_attention_layers
        self.use_cvl = use_cvl
        self.loss_weights = dict(loss_weights) if loss_weights else {}
        self.freeze_clip = freeze_clip
        self.decision_threshold = decision_threshold
        self.category_thresholds = {normalize_category(name): float(value) for name, value in (category_thresholds or {}).items()}
        self.clip_name_or_path = clip_name_or_path
        custom_pipelines = kwargs.pop("custom_pipelines", None)
        super().__init__(**kwargs)
        # transformers sends every task named in `custom_pipelines` down the remote-code path. Where
        # this package has registered the task itself, the declaration is dropped from memory, so
        # `pipeline("anomaly-detection", model=folder)` works without `trust_remote_code`. Saving
        # writes it again (`pipeline_anomaly_detection.save_pipeline_files`).
        if custom_pipelines:
            from transformers.pipelines import PIPELINE_REGISTRY

            if any(task not in PIPELINE_REGISTRY.supported_tasks for task in custom_pipelines):
                self.custom_pipelines = custom_pipelines

    def threshold_for(self, category: str | None) -> float:
        """Return the image-score threshold of `category`: its entry in `category_thresholds`, else `decision_threshold`."""
        from .prompt_bank import normalize_category

        if category is not None:
            key = normalize_category(category)
            if key in self.category_thresholds:
                return self.category_thresholds[key]
        return float(self.decision_threshold)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the configured input size."""
        patch = self.clip_config.vision_config.patch_size
        return self.image_size[0] // patch, self.image_size[1] // patch


__all__ = ["CMIClipConfig"]
