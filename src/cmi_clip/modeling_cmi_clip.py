# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""CMI-CLIP: zero-shot anomaly detection with an abnormality and a normality branch on a frozen CLIP.

The vision encoder's patch tokens from several layers are projected into CLIP's joint space and scored
by two branches. The abnormality branch compares each patch with the category's defect description
against a generic normal anchor text. The normality branch compares each patch with the category's
normal-appearance description against a generic abnormal anchor text. At the middle feature layers,
Cross-view Mutual Interaction (CMI) lets each branch cross-attend to the other branch's tokens, biased
towards the patches the other branch attends to and it does not. The two branch maps are fused into
the anomaly map, and the image score mixes the global image-text score with the map's top-k mean.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_cmi_clip import CMIClipConfig
from .losses import LossWeights, cross_view_loss
from .prompt_bank import ROLES, PromptBank, load_prompts, normalize_category

logger = logging.get_logger(__name__)

ABNORMALITY, NORMALITY, NORMAL_ANCHOR, ABNORMAL_ANCHOR = range(len(ROLES))


@dataclass
class CMIClipOutput(ModelOutput):
    """
    Output of [`CMIClipModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Cross-view learning loss, returned when `masks` or `labels` are given.
        anomaly_map (`torch.FloatTensor` of shape `(batch_size, height, width)`):
            Fused anomaly probability per pixel of the input size, in [0, 1].
        image_scores (`torch.FloatTensor` of shape `(batch_size,)`):
            Image anomaly score in [0, 1].
        abnormality_map (`torch.FloatTensor` of shape `(batch_size, height, width)`):
            Anomaly probability of the abnormality branch.
        normality_map (`torch.FloatTensor` of shape `(batch_size, height, width)`):
            Anomaly probability of the normality branch.
        abnormality_scores (`torch.FloatTensor` of shape `(batch_size,)`):
            Global (class token) image-text anomaly probability of the abnormality branch.
        normality_scores (`torch.FloatTensor` of shape `(batch_size,)`):
            Global image-text anomaly probability of the normality branch.
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*):
            Weighted terms of `loss`, for logging.
        attentions (`tuple[dict[str, torch.FloatTensor]]`, *optional*):
            One dict per CMI layer when `output_attentions=True`, with `layer` (1-based vision layer), the
            text-guided attention maps `abnormality_attention` and `normality_attention` (B, rows, columns),
            the cues `abnormality_cue` and `normality_cue` (what the other branch attends to and this one
            does not, same shape), and the head-averaged cross-attention weights
            `abnormality_cross_attention` and `normality_cross_attention` (B, patches, patches).
    """

    loss: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    image_scores: torch.FloatTensor | None = None
    abnormality_map: torch.FloatTensor | None = None
    normality_map: torch.FloatTensor | None = None
    abnormality_scores: torch.FloatTensor | None = None
    normality_scores: torch.FloatTensor | None = None
    loss_terms: dict[str, torch.FloatTensor] | None = None
    attentions: tuple[dict[str, torch.FloatTensor], ...] | None = None


class CMIClipAdapter(nn.Module):
    """Residual bottleneck adapter `x + up(gelu(down(x)))`; `up` starts at zero, so it starts as the identity."""

    def __init__(self, dim: int, hidden_size: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden_size)
        self.up = nn.Linear(hidden_size, dim)
        # Read by `_init_weights`, which initialises each Linear on its own.
        self.up.zero_init = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.up(F.gelu(self.down(hidden_states)))


def text_guided_attention(tokens: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax over patches of cos(patch, text) / temperature.

    Args:
        tokens: Patch tokens (B, N, D).
        text: One text embedding per image (B, D).
        temperature: Softmax temperature.

    Returns:
        Attention over the N patches (B, N), summing to 1.
    """
    similarity = torch.einsum("bnd,bd->bn", F.normalize(tokens, dim=-1), F.normalize(text, dim=-1))
    return (similarity / temperature).softmax(dim=-1)


class CMIClipCrossViewAttention(nn.Module):
    """One direction of CMI: a branch (queries) cross-attends to the other branch (keys and values).

    The attention logits get `log(cue + eps)` added per key, where the cue is what the other branch
    attends to and this branch does not. The result is added through a gate that starts at zero.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm_query = nn.LayerNorm(dim)
        self.norm_key = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def _heads(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        return hidden_states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, own: torch.Tensor, other: torch.Tensor, cue: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Update `own` (B, N, D) from `other` (B, N, D) with the per-key cue (B, N)."""
        query = self._heads(self.q_proj(self.norm_query(own)))
        other_normed = self.norm_key(other)
        key = self._heads(self.k_proj(other_normed))
        value = self._heads(self.v_proj(other_normed))
        bias = torch.log(cue + 1e-6).to(query.dtype)[:, None, :, None]
        scale = self.head_dim**-0.5
        # The bias depends on the key only, so it rides in one extra query/key channel: query 1 and key
        # bias / scale add exactly `bias` to every logit. Without a mask, SDPA can use its fused kernels.
        ones = torch.ones_like(query[..., :1])
        query_biased = torch.cat([query, ones], dim=-1)
        key_biased = torch.cat([key, (bias / scale).expand(-1, self.num_heads, -1, -1)], dim=-1)
        value_padded = torch.cat([value, torch.zeros_like(value[..., :1])], dim=-1)
        attended = F.scaled_dot_product_attention(query_biased, key_biased, value_padded, scale=scale)[..., :-1]
        weights = None
        if output_attentions:
            logits = (query @ key.transpose(-1, -2)) * scale + bias.transpose(-1, -2)
            weights = logits.softmax(dim=-1).mean(dim=1)
        attended = attended.transpose(1, 2).reshape(own.shape)
        return own + self.gate * self.out_proj(attended), weights


class CMIClipMutualInteraction(nn.Module):
    """Cross-view Mutual Interaction at one feature layer: both directions, ABN <- NOR and NOR <- ABN."""

    def __init__(self, dim: int, num_heads: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.abnormality_from_normality = CMIClipCrossViewAttention(dim, num_heads)
        self.normality_from_abnormality = CMIClipCrossViewAttention(dim, num_heads)

    @staticmethod
    def cue(attention_other: torch.Tensor, attention_own: torch.Tensor) -> torch.Tensor:
        """Compute what the other branch attends to and this one does not: `A_o * (1 - A_b / max A_b)`."""
        peak = attention_own.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(attention_own.dtype).tiny)
        return attention_other * (1.0 - attention_own / peak)

    def forward(
        self,
        abnormality_tokens: torch.Tensor,
        normality_tokens: torch.Tensor,
        abnormality_text: torch.Tensor,
        normality_text: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """Exchange information between the branches' tokens (B, N, D); texts are (B, D)."""
        attention_abnormality = text_guided_attention(abnormality_tokens, abnormality_text, self.temperature)
        attention_normality = text_guided_attention(normality_tokens, normality_text, self.temperature)
        cue_abnormality = self.cue(attention_normality, attention_abnormality)
        cue_normality = self.cue(attention_abnormality, attention_normality)
        new_abnormality, cross_abnormality = self.abnormality_from_normality(
            abnormality_tokens, normality_tokens, cue_abnormality, output_attentions
        )
        new_normality, cross_normality = self.normality_from_abnormality(
            normality_tokens, abnormality_tokens, cue_normality, output_attentions
        )
        details = None
        if output_attentions:
            details = {
                "abnormality_attention": attention_abnormality,
                "normality_attention": attention_normality,
                "abnormality_cue": cue_abnormality,
                "normality_cue": cue_normality,
                "abnormality_cross_attention": cross_abnormality,
                "normality_cross_attention": cross_normality,
            }
        return new_abnormality, new_normality, details


def gaussian_kernel1d(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel truncated at 4 sigma (scipy's default)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur maps (B, H, W) with a separable Gaussian and reflected borders, all maps in one call."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, maps.dtype, maps.device)
    radius = kernel.numel() // 2
    batch, height, width = maps.shape
    images = maps[:, None]
    pad_rows = min(radius, height - 1)
    pad_cols = min(radius, width - 1)
    # Reflect padding needs a border smaller than the side, so a wider kernel is padded further by replication.
    images = F.pad(images, (pad_cols, pad_cols, pad_rows, pad_rows), mode="reflect") if pad_rows and pad_cols else images
    images = F.pad(images, (radius - pad_cols, radius - pad_cols, radius - pad_rows, radius - pad_rows), mode="replicate")
    images = F.conv2d(images, kernel.view(1, 1, 1, -1))
    images = F.conv2d(images, kernel.view(1, 1, -1, 1))
    return images[:, 0].reshape(batch, height, width)


def interpolate_position_embeddings(position_embedding: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize CLIP's position embeddings (1 + n*n, D) to a patch grid (rows, columns).

    The target grid comes from the input size, not from a scale factor, so every size maps to the
    right number of tokens. The native grid returns the embeddings unchanged.
    """
    class_position, patch_position = position_embedding[:1], position_embedding[1:]
    side = math.isqrt(patch_position.shape[0])
    if side * side != patch_position.shape[0]:
        msg = f"Position embeddings of {patch_position.shape[0]} patches do not form a square grid."
        raise ValueError(msg)
    if tuple(grid) == (side, side):
        return position_embedding
    dim = patch_position.shape[-1]
    patch_position = patch_position.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(patch_position.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    resized = resized.to(position_embedding.dtype).permute(0, 2, 3, 1).reshape(-1, dim)
    return torch.cat([class_position, resized], dim=0)


class CMIClipPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for CMI-CLIP models."""

    config_class = CMIClipConfig
    config: CMIClipConfig
    base_model_prefix = "cmi_clip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    _no_split_modules = ["CLIPEncoderLayer", "CLIPTextEmbeddings", "CLIPVisionEmbeddings"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the heads so that the untrained model equals training-free CLIP scoring."""
        # transformers visits modules one by one, children first, and skips a module without parameters
        # of its own when the model is custom code. Each rule below therefore matches the module that
        # owns the parameters it sets.
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):
                nn.init.zeros_(module.weight)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, CMIClipCrossViewAttention):
            nn.init.zeros_(module.gate)
        elif isinstance(module, CMIClipModel) and module.fusion_logit is not None:
            weight = min(max(self.config.fusion_weight, 1e-4), 1 - 1e-4)
            nn.init.constant_(module.fusion_logit, math.log(weight / (1 - weight)))


class CMIClipModel(CMIClipPreTrainedModel):
    """CLIP with an abnormality and a normality branch, Cross-view Mutual Interaction and map fusion.

    Example:

    ```python
    >>> from cmi_clip import CMIClipModel
    >>> model = CMIClipModel.from_clip_pretrained("openai/clip-vit-large-patch14-336", image_size=518)
    >>> outputs = model(pixel_values=pixel_values, categories=["bottle"])
    >>> outputs.anomaly_map.shape, outputs.image_scores
    ```
    """

    def __init__(self, config: CMIClipConfig, clip_model: CLIPModel | None = None) -> None:
        super().__init__(config)
        self.clip = clip_model if clip_model is not None else CLIPModel(config.clip_config)
        dim = config.clip_config.projection_dim
        num_layers = len(config.feature_layers)
        self.abnormality_adapters = nn.ModuleList(CMIClipAdapter(dim, config.adapter_hidden_size) for _ in range(num_layers))
        self.normality_adapters = nn.ModuleList(CMIClipAdapter(dim, config.adapter_hidden_size) for _ in range(num_layers))
        if config.use_text_adapter:
            self.abnormality_text_adapter = CMIClipAdapter(dim, config.adapter_hidden_size)
            self.normality_text_adapter = CMIClipAdapter(dim, config.adapter_hidden_size)
        else:
            self.abnormality_text_adapter = None
            self.normality_text_adapter = None
        self.cmi = nn.ModuleDict()
        if config.use_cmi:
            for position in config.cmi_layers:
                self.cmi[str(position)] = CMIClipMutualInteraction(dim, config.cmi_num_heads, config.cmi_temperature)
        self.fusion_logit = nn.Parameter(torch.zeros(())) if config.learn_fusion_weight else None
        self.tokenizer = None
        self.image_processor = None
        self.prompt_bank: PromptBank | None = None
        self._text_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self.post_init()
        self.clip.requires_grad_(not config.freeze_clip)

    # ------------------------------------------------------------------ construction and I/O

    @classmethod
    def from_clip_pretrained(
        cls,
        clip_name_or_path: str | os.PathLike,
        tokenizer: Any = None,
        clip_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> CMIClipModel:
        """Build an untrained CMI-CLIP model around a CLIP checkpoint (Hub id or local folder).

        Args:
            clip_name_or_path: CLIP checkpoint loadable by `CLIPModel.from_pretrained`.
            tokenizer: Tokenizer to use; defaults to the checkpoint's own (`AutoTokenizer`).
            clip_kwargs: Extra keyword arguments for `CLIPModel.from_pretrained` (`revision`, `dtype`, ...).
            **config_kwargs: [`CMIClipConfig`] options, such as `image_size=518` or `freeze_clip=False`.
                `prompts` may also be a path to a JSON file.
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        clip_kwargs = dict(clip_kwargs or {})
        clip = CLIPModel.from_pretrained(clip_name_or_path, **clip_kwargs)
        config = CMIClipConfig(
            clip_config=clip.config.to_dict(), clip_name_or_path=str(clip_name_or_path), **config_kwargs
        )
        model = cls(config, clip_model=clip)
        # The heads are built in float32; a CLIP loaded in another dtype (`clip_kwargs={"dtype": ...}`) sets theirs.
        model.to(dtype=clip.dtype)
        loader_kwargs = {key: clip_kwargs[key] for key in ("revision", "cache_dir", "token", "local_files_only") if key in clip_kwargs}
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(clip_name_or_path, **loader_kwargs)
        model.set_tokenizer(tokenizer)
        model.image_processor = _load_image_processor(clip_name_or_path, config, loader_kwargs, AutoImageProcessor)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any, **kwargs: Any) -> CMIClipModel:
        """Load a saved CMI-CLIP model with its tokenizer and image processor."""
        from transformers import AutoImageProcessor, AutoTokenizer

        loader_kwargs = {
            key: kwargs[key]
            for key in ("revision", "cache_dir", "token", "local_files_only", "subfolder", "trust_remote_code")
            if key in kwargs
        }
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        try:
            model.set_tokenizer(AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **loader_kwargs))
        except (OSError, ValueError) as error:
            logger.warning(
                "No tokenizer could be loaded from %s (%s). Call model.set_tokenizer(...) before scoring images.",
                pretrained_model_name_or_path,
                error,
            )
        model.image_processor = _load_image_processor(pretrained_model_name_or_path, model.config, loader_kwargs, AutoImageProcessor)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save weights, config, code files (model and pipeline), tokenizer and image processor into one folder."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        from .pipeline_anomaly_detection import save_pipeline_files

        save_pipeline_files(save_directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(save_directory)

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use `tokenizer` for the prompts, and forget cached text embeddings."""
        self.tokenizer = tokenizer
        self.prompt_bank = PromptBank(self.config, tokenizer)
        self._text_cache.clear()

    def set_prompts(self, prompts: dict[str, Any] | str | os.PathLike, replace: bool = False) -> None:
        """Add (or with `replace=True`, replace all) category prompts, from a dict or a JSON file."""
        loaded = load_prompts(prompts)
        self.config.prompts = loaded if replace else {**self.config.prompts, **loaded}
        self._text_cache.clear()
        if self.prompt_bank is not None:
            self.prompt_bank.clear()

    # ------------------------------------------------------------------ text side

    def _text_fingerprint(self) -> tuple:
        parameters = [*self.clip.text_model.parameters(), self.clip.text_projection.weight]
        return tuple((id(parameter), parameter._version) for parameter in parameters)

    def encode_category(self, category: str) -> torch.Tensor:
        """Return the normalised text embeddings (4, D) of a category: abnormality, normality, normal anchor, abnormal anchor.

        Embeddings are cached per category until the prompts or the text weights change. While the text
        encoder is being trained (it requires gradients and grad mode is on), nothing is cached.
        """
        if self.prompt_bank is None:
            msg = "The model has no tokenizer. Load it with from_pretrained/from_clip_pretrained or call model.set_tokenizer(tokenizer)."
            raise RuntimeError(msg)
        prompts = self.prompt_bank.prompts_for(category)
        key = normalize_category(category)
        texts_key = tuple(tuple(prompts.sentences[role]) for role in ROLES)
        trainable = torch.is_grad_enabled() and self.clip.text_projection.weight.requires_grad
        fingerprint = (texts_key, self._text_fingerprint())
        cached = self._text_cache.get(key)
        if not trainable and cached is not None and cached[0] == fingerprint:
            return cached[1]

        sentences = [sentence for role in ROLES for sentence in prompts.sentences[role]]
        tokens = self.prompt_bank.tokenize(sentences)
        device = self.clip.text_projection.weight.device
        with torch.set_grad_enabled(trainable):
            text_outputs = self.clip.text_model(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
            features = F.normalize(self.clip.text_projection(text_outputs.pooler_output), dim=-1)
            embeddings = []
            start = 0
            for role in ROLES:
                count = len(prompts.sentences[role])
                embeddings.append(F.normalize(features[start : start + count].mean(0), dim=-1))
                start += count
            embeddings = torch.stack(embeddings)
        if not trainable:
            self._text_cache[key] = (fingerprint, embeddings)
        return embeddings

    def text_embeddings(self, categories: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Embeddings (B, 4, D) of each image's category, after the text adapters, and the unique categories' index."""
        unique = list(dict.fromkeys(normalize_category(category) for category in categories))
        table = torch.stack([self.encode_category(category) for category in unique])
        index = torch.tensor([unique.index(normalize_category(category)) for category in categories], device=table.device)
        if self.abnormality_text_adapter is not None:
            abnormal_side = F.normalize(self.abnormality_text_adapter(table[:, [ABNORMALITY, NORMAL_ANCHOR]]), dim=-1)
            normal_side = F.normalize(self.normality_text_adapter(table[:, [NORMALITY, ABNORMAL_ANCHOR]]), dim=-1)
            table = torch.stack([abnormal_side[:, 0], normal_side[:, 0], abnormal_side[:, 1], normal_side[:, 1]], dim=1)
        return table[index], table, unique

    # ------------------------------------------------------------------ vision side

    def vision_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        """Run the CLIP vision tower once.

        Returns:
            The projected class-token embedding (B, D), the projected patch tokens of each feature layer
            [(B, N, D)], and the patch grid (rows, columns).
        """
        vision = self.clip.vision_model
        embeddings = vision.embeddings
        patch_size = embeddings.patch_size
        height, width = pixel_values.shape[-2:]
        if height % patch_size or width % patch_size:
            msg = (
                f"Input size {height}x{width} is not a multiple of the patch size {patch_size}. "
                "Resize the images (the image processor does) or pick an image_size that is a multiple of it."
            )
            raise ValueError(msg)
        grid = (height // patch_size, width // patch_size)
        dtype = embeddings.patch_embedding.weight.dtype
        patches = embeddings.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        class_token = embeddings.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        positions = interpolate_position_embeddings(embeddings.position_embedding.weight, grid)
        hidden = vision.pre_layrnorm(torch.cat([class_token, patches], dim=1) + positions)

        wanted = set(self.config.feature_layers)
        layers = vision.encoder.layers
        vv_start = len(layers) - self.config.vv_attention_layers if self.config.use_vv_attention else len(layers)
        vv_hidden = None
        collected: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(layers, start=1):
            if index > vv_start:
                vv_hidden = value_value_attention_step(layer, hidden if vv_hidden is None else vv_hidden, hidden)
            hidden = layer(hidden, None)
            if index in wanted:
                collected[index] = vv_hidden if vv_hidden is not None else hidden

        image_embedding = self.clip.visual_projection(vision.post_layernorm(hidden[:, 0]))
        patch_tokens = [
            self.clip.visual_projection(vision.post_layernorm(collected[layer][:, 1:])) for layer in self.config.feature_layers
        ]
        return image_embedding, patch_tokens, grid

    # ------------------------------------------------------------------ forward

    @property
    def fusion_weight(self) -> torch.Tensor | float:
        """Weight of the abnormality map in the fused map."""
        return torch.sigmoid(self.fusion_logit) if self.fusion_logit is not None else self.config.fusion_weight

    def forward(
        self,
        pixel_values: torch.Tensor,
        categories: list[str] | str | None = None,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        return_dict: bool = True,
        loss_weights: LossWeights | dict[str, float] | None = None,
    ) -> CMIClipOutput | tuple:
        """Score images for anomalies.

        Args:
            pixel_values: Normalised images (B, 3, H, W); H and W multiples of the patch size.
            categories: One category name per image (a single string applies to all). `None` uses the
                generic prompts of the category "object".
            masks: Ground-truth masks (B, H, W) for the training loss.
            labels: Image labels (B,), 1 for anomalous, for the training loss.
            output_attentions: Whether to return the CMI attention maps.
            return_dict: Whether to return a [`CMIClipOutput`] instead of a tuple.
            loss_weights: Weights of the loss terms (defaults to [`LossWeights`]()).

        In training mode the maps are not smoothed; in evaluation mode they are blurred with
        `config.gaussian_sigma`.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            msg = f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}."
            raise ValueError(msg)
        batch = pixel_values.shape[0]
        if categories is None:
            categories = ["object"] * batch
        elif isinstance(categories, str):
            categories = [categories] * batch
        if len(categories) != batch:
            msg = f"Got {len(categories)} categories for {batch} images; pass one category per image or a single string."
            raise ValueError(msg)

        # 1. Text: one embedding per prompt role for each image's category.
        text, category_table, _ = self.text_embeddings(list(categories))
        logit_scale = self.clip.logit_scale.exp().clamp(max=100.0)

        # 2. Vision: class token and multi-layer patch tokens from one CLIP forward.
        image_embedding, patch_tokens, grid = self.vision_features(pixel_values)
        image_embedding = F.normalize(image_embedding, dim=-1)

        # 3. Per-branch adapters, CMI at the middle layers, and per-layer patch probabilities.
        abnormality_pair = text[:, [NORMAL_ANCHOR, ABNORMALITY]]
        normality_pair = text[:, [NORMALITY, ABNORMAL_ANCHOR]]
        abnormality_maps, normality_maps, attentions = [], [], []
        for position, tokens in enumerate(patch_tokens):
            abnormality_tokens = self.abnormality_adapters[position](tokens)
            normality_tokens = self.normality_adapters[position](tokens)
            if str(position) in self.cmi:
                abnormality_tokens, normality_tokens, details = self.cmi[str(position)](
                    abnormality_tokens, normality_tokens, text[:, ABNORMALITY], text[:, NORMALITY], output_attentions
                )
                if details is not None:
                    rows, columns = grid
                    for name in ("abnormality_attention", "normality_attention", "abnormality_cue", "normality_cue"):
                        details[name] = details[name].reshape(batch, rows, columns)
                    attentions.append({"layer": self.config.feature_layers[position], **details})
            abnormality_maps.append(patch_probabilities(abnormality_tokens, abnormality_pair, logit_scale))
            normality_maps.append(patch_probabilities(normality_tokens, normality_pair, logit_scale))

        # 4. Branch maps at the input size, fusion, and smoothing in evaluation mode.
        size = pixel_values.shape[-2:]
        branch_maps = torch.stack([torch.stack(abnormality_maps).mean(0), torch.stack(normality_maps).mean(0)], dim=1)
        branch_maps = F.interpolate(branch_maps.reshape(batch, 2, *grid), size=size, mode="bilinear", align_corners=False)
        weight = self.fusion_weight
        fused = weight * branch_maps[:, 0] + (1 - weight) * branch_maps[:, 1]
        all_maps = torch.cat([fused[:, None], branch_maps], dim=1)
        if not self.training and self.config.gaussian_sigma > 0:
            all_maps = gaussian_blur(all_maps.reshape(batch * 3, *size), self.config.gaussian_sigma).reshape(batch, 3, *size)
        anomaly_map, abnormality_map, normality_map = all_maps.clamp(0.0, 1.0).unbind(dim=1)

        # 5. Image scores: global image-text probabilities mixed with the top-k mean of the fused map.
        abnormality_scores = global_probability(image_embedding, abnormality_pair, logit_scale)
        normality_scores = global_probability(image_embedding, normality_pair, logit_scale)
        global_scores = weight * abnormality_scores + (1 - weight) * normality_scores
        top_k = min(self.config.image_score_top_k, anomaly_map[0].numel())
        map_scores = anomaly_map.flatten(1).topk(top_k, dim=1).values.mean(1)
        map_weight = self.config.image_score_map_weight
        image_scores = (1 - map_weight) * global_scores + map_weight * map_scores

        # 6. Cross-view learning loss when supervision is given.
        loss, loss_terms = None, None
        if masks is not None or labels is not None:
            if masks is not None:
                masks = _resize_masks(masks, size)
            if not isinstance(loss_weights, LossWeights):
                loss_weights = LossWeights.from_dict(loss_weights or self.config.loss_weights)
            loss, loss_terms = cross_view_loss(
                anomaly_map,
                abnormality_map,
                normality_map,
                image_scores,
                masks,
                labels,
                abnormality_text=category_table[:, ABNORMALITY],
                normality_text=category_table[:, NORMALITY],
                weights=loss_weights,
                use_cvl=self.config.use_cvl,
            )

        output = CMIClipOutput(
            loss=loss,
            anomaly_map=anomaly_map,
            image_scores=image_scores,
            abnormality_map=abnormality_map,
            normality_map=normality_map,
            abnormality_scores=abnormality_scores,
            normality_scores=normality_scores,
            loss_terms=loss_terms,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


def patch_probabilities(tokens: torch.Tensor, text_pair: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Anomaly probability of each patch from a (normal, abnormal) text pair.

    Args:
        tokens: Patch tokens (B, N, D).
        text_pair: Normalised texts (B, 2, D): index 0 means normal, index 1 means anomalous.
        logit_scale: CLIP's logit scale (temperature inverse).

    Returns:
        Probabilities (B, N).
    """
    logits = logit_scale * torch.einsum("bnd,bkd->bnk", F.normalize(tokens, dim=-1), text_pair)
    return logits.softmax(dim=-1)[..., 1]


def global_probability(image_embedding: torch.Tensor, text_pair: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's softmax probability of the anomalous text of a (normal, abnormal) pair for each image (B,)."""
    logits = logit_scale * torch.einsum("bd,bkd->bk", image_embedding, text_pair)
    return logits.softmax(dim=-1)[:, 1]


def value_value_attention_step(layer: nn.Module, vv_hidden: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Run one value-value self-attention step of a CLIP encoder layer, for sharper training-free maps.

    Attention weights come from the similarity of the value vectors with themselves instead of queries
    and keys, and no MLP follows, as in training-free CLIP localisation methods (ClearCLIP, SCLIP).
    """
    attention = layer.self_attn
    batch, length, dim = hidden.shape
    normed = layer.layer_norm1(hidden)
    values = attention.v_proj(normed).view(batch, length, attention.num_heads, attention.head_dim).transpose(1, 2)
    attended = F.scaled_dot_product_attention(values, values, values)
    attended = attended.transpose(1, 2).reshape(batch, length, dim)
    return vv_hidden + attention.out_proj(attended)


def _resize_masks(masks: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bring masks (B, H, W) to the input size with nearest-neighbour resizing, so they stay binary."""
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        msg = f"masks must have shape (batch, height, width), got {tuple(masks.shape)}."
        raise ValueError(msg)
    masks = (masks > 0).float()
    if masks.shape[-2:] != size:
        masks = F.interpolate(masks[:, None], size=tuple(size), mode="nearest")[:, 0]
    return masks


def _load_image_processor(path: Any, config: CMIClipConfig, loader_kwargs: dict[str, Any], auto_class: Any) -> Any:
    """Load the image processor saved with a checkpoint, resized to the configured input size."""
    from .processing_cmi_clip import build_image_processor

    try:
        processor = auto_class.from_pretrained(path, **loader_kwargs)
    except (OSError, ValueError):
        processor = None
    return build_image_processor(config, processor)


__all__ = ["CMIClipModel", "CMIClipOutput", "CMIClipPreTrainedModel"]
