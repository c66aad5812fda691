# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Losses of cross-view learning (CVL).

Both views are supervised. Each branch map and the fused map get a focal and a dice loss against the
ground-truth mask, and the image score gets a binary cross-entropy. A cross-view term makes the two
branch maps agree, and a separation term keeps each category's abnormality and normality text
embeddings apart.
With `use_cvl=False` only the fused map and the image score are supervised (the single-view ablation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

EPSILON = 1e-6


@dataclass
class LossWeights:
    """Weight of each loss term; a weight of 0 removes the term."""

    focal: float = 1.0
    dice: float = 1.0
    image: float = 1.0
    cross_view: float = 0.5
    separation: float = 0.1
    separation_margin: float = 0.5
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25

    @classmethod
    def from_dict(cls, values: dict[str, float] | None) -> LossWeights:
        """Build weights from a dict, rejecting unknown keys."""
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            msg = f"Unknown loss weights {sorted(unknown)}; valid keys are {sorted(cls.__dataclass_fields__)}."
            raise ValueError(msg)
        return cls(**values)

    def to_dict(self) -> dict[str, float]:
        """Return the weights as a plain dict."""
        return asdict(self)


def binary_focal_loss(probabilities: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Focal loss of anomaly probabilities against binary targets, averaged over pixels.

    Args:
        probabilities: Anomaly probabilities in [0, 1], any shape.
        targets: Binary targets of the same shape.
        gamma: Focusing exponent; 0 gives the (alpha-weighted) binary cross-entropy.
        alpha: Weight of the anomalous class; the normal class gets `1 - alpha`.
    """
    probabilities = probabilities.clamp(EPSILON, 1.0 - EPSILON)
    targets = targets.to(probabilities.dtype)
    p_true = probabilities * targets + (1.0 - probabilities) * (1.0 - targets)
    alpha_true = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    return (-alpha_true * (1.0 - p_true).pow(gamma) * p_true.log()).mean()


def soft_dice_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss on both classes (anomalous and normal) per image, averaged.

    Scoring the normal class too keeps the loss defined on images without any anomalous pixel.

    Args:
        probabilities: Anomaly probabilities of shape (B, H, W).
        targets: Binary masks of shape (B, H, W).
    """
    targets = targets.to(probabilities.dtype)
    probabilities = probabilities.flatten(1)
    targets = targets.flatten(1)
    losses = []
    for predicted, truth in ((probabilities, targets), (1.0 - probabilities, 1.0 - targets)):
        intersection = (predicted * truth).sum(1)
        total = predicted.sum(1) + truth.sum(1)
        losses.append(1.0 - (2.0 * intersection + 1.0) / (total + 1.0))
    return torch.stack(losses).mean()


def map_loss(probabilities: torch.Tensor, masks: torch.Tensor, weights: LossWeights) -> dict[str, torch.Tensor]:
    """Focal and dice terms of one map against the masks."""
    return {
        "focal": binary_focal_loss(probabilities, masks, weights.focal_gamma, weights.focal_alpha),
        "dice": soft_dice_loss(probabilities, masks),
    }


def cross_view_loss(
    anomaly_map: torch.Tensor,
    abnormality_map: torch.Tensor,
    normality_map: torch.Tensor,
    image_scores: torch.Tensor,
    masks: torch.Tensor | None,
    labels: torch.Tensor | None,
    abnormality_text: torch.Tensor | None = None,
    normality_text: torch.Tensor | None = None,
    weights: LossWeights | None = None,
    use_cvl: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Compute the training loss and its weighted terms.

    Args:
        anomaly_map: Fused anomaly probabilities (B, H, W).
        abnormality_map: Abnormality-branch probabilities (B, H, W).
        normality_map: Normality-branch probabilities (B, H, W).
        image_scores: Image anomaly scores in [0, 1] of shape (B,).
        masks: Ground-truth masks (B, H, W), or `None` to train the image score alone.
        labels: Image labels (B,), 1 for anomalous. Derived from `masks` when `None`.
        abnormality_text: Abnormality text embeddings (C, D) of the batch's categories (separation term).
        normality_text: Normality text embeddings (C, D), paired with `abnormality_text`.
        weights: Weights of the terms. Defaults to [`LossWeights`]().
        use_cvl: Whether both branch maps, their agreement and the text separation are supervised.

    Returns:
        The total loss and a dict of the weighted terms (each a scalar tensor) for logging.
    """
    weights = weights or LossWeights()
    if labels is None and masks is None:
        msg = "cross_view_loss needs masks or labels; got neither."
        raise ValueError(msg)
    if labels is None:
        labels = (masks.flatten(1).amax(1) > 0).to(image_scores.dtype)
    terms: dict[str, torch.Tensor] = {}

    if masks is not None:
        if masks.shape != anomaly_map.shape:
            msg = f"masks have shape {tuple(masks.shape)} but the maps have {tuple(anomaly_map.shape)}; resize the masks to the input size."
            raise ValueError(msg)
        masks = (masks > 0).to(anomaly_map.dtype)
        views = {"fused": anomaly_map}
        if use_cvl:
            views.update(abnormality=abnormality_map, normality=normality_map)
        for view, probabilities in views.items():
            for name, value in map_loss(probabilities, masks, weights).items():
                terms[f"{view}_{name}"] = getattr(weights, name) * value
        if use_cvl and weights.cross_view:
            terms["cross_view"] = weights.cross_view * (abnormality_map - normality_map).pow(2).mean()

    if weights.image:
        scores = image_scores.clamp(EPSILON, 1.0 - EPSILON)
        terms["image_bce"] = weights.image * F.binary_cross_entropy(scores, labels.to(scores.dtype))

    if use_cvl and weights.separation and abnormality_text is not None and normality_text is not None:
        similarity = F.cosine_similarity(abnormality_text, normality_text, dim=-1)
        terms["separation"] = weights.separation * F.relu(similarity - weights.separation_margin).mean()

    total = torch.stack(list(terms.values())).sum()
    return total, terms


__all__ = ["LossWeights", "binary_focal_loss", "cross_view_loss", "map_loss", "soft_dice_loss"]
