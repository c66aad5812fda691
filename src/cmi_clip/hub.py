# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Sharing CMI-CLIP models: self-contained folders, model cards, and uploads to the Hugging Face Hub.

A folder written by [`save_for_pipeline`] contains the weights, the config, the tokenizer, the image
processor, the model code and the `anomaly-detection` pipeline code, so that

```python
pipeline("anomaly-detection", model=folder_or_repo_id, trust_remote_code=True)
```

works where `cmi_clip` is not installed. [`push_to_hub`] writes that folder plus a model card
(README.md with `model-index` metadata) and uploads it with `HfApi.upload_folder`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .metrics import METRIC_TITLES
from .pipeline_anomaly_detection import TASK, save_pipeline_files

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "model_card_template.md"
# The Hub has no "anomaly-detection" pipeline tag; the pixel maps make image segmentation the closest one.
DEFAULT_PIPELINE_TAG = "image-segmentation"
DEFAULT_TAGS = ("anomaly-detection", "zero-shot-anomaly-detection", "industrial-inspection", "clip", "cmi-clip")
MEAN_ROW = "mean"


def save_for_pipeline(model: Any, save_directory: str | os.PathLike) -> Path:
    """Save a CMI-CLIP model into a folder that loads with `trust_remote_code=True` alone.

    Writes the weights, config, tokenizer, image processor and model code (`model.save_pretrained`),
    then copies the pipeline code and declares it in `config.json` (`custom_pipelines`).

    Returns:
        The folder.
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(save_directory)
    copied = save_pipeline_files(save_directory)
    logger.info("Saved %s with the %s pipeline code (%s)", save_directory, TASK, ", ".join(Path(path).name for path in copied))
    return save_directory


def _split_metrics(metrics: Mapping[str, Any] | None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Split metrics into per-category rows and the row of means over categories.

    `metrics` is either `{category: {metric: value}}` (as returned by `evaluate_model`, optionally with a
    "mean" row) or a flat `{metric: value}`, which is taken as the mean row.
    """
    if not metrics:
        return {}, {}
    if all(isinstance(value, Mapping) for value in metrics.values()):
        rows = {str(name): dict(values) for name, values in metrics.items() if name != MEAN_ROW}
        if MEAN_ROW in metrics:
            mean = dict(metrics[MEAN_ROW])
        else:
            mean = {}
            for key in METRIC_TITLES:
                values = [row[key] for row in rows.values() if isinstance(row.get(key), (int, float))]
                if values:
                    mean[key] = sum(values) / len(values)
        return rows, mean
    return {}, dict(metrics)


def _data_description(data: str | Mapping[str, Any] | None, default: str) -> str:
    if data is None:
        return default
    if isinstance(data, str):
        return data
    parts = [str(data.get("name", "")).strip()]
    if data.get("split"):
        parts.append(f"(split: {data['split']})")
    if data.get("description"):
        parts.append(f"- {data['description']}")
    return " ".join(part for part in parts if part)


def _eval_results(
    rows: dict[str, dict[str, float]], mean: dict[str, float], eval_data: str | Mapping[str, Any] | None
) -> list[EvalResult]:
    """Build `model-index` entries: one result per category (dataset config) and one for the means."""
    if isinstance(eval_data, Mapping):
        dataset_name = str(eval_data.get("name", "evaluation data"))
        dataset_type = str(eval_data.get("id") or eval_data.get("type") or dataset_name.lower().replace(" ", "_"))
        dataset_split = eval_data.get("split", "test")
    else:
        dataset_name = eval_data or "evaluation data"
        dataset_type = dataset_name.lower().replace(" ", "_")
        dataset_split = "test"
    results = []
    for config_name, values in [*rows.items(), (None, mean)]:
        for key, display_name in METRIC_TITLES.items():
            value = values.get(key)
            if not isinstance(value, (int, float)):
                continue
            results.append(
                EvalResult(
                    task_type=TASK,
                    task_name="Zero-shot anomaly detection",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=config_name,
                    dataset_split=dataset_split,
                    metric_type=key,
                    metric_name=display_name if config_name is None else f"{display_name} ({config_name})",
                    metric_value=round(float(value), 4),
                )
            )
    return results


def _metrics_table(rows: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    """Render the metrics as a Markdown table in percent, with `cmi_clip.metrics.format_metrics_table`."""
    from .metrics import format_metrics_table

    if not rows and not mean:
        return "No evaluation results were recorded for this model."
    table_rows = {**rows, MEAN_ROW: mean} if mean else rows
    return "Values in percent.\n\n" + format_metrics_table(table_rows)


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_model_card(
    model: Any,
    metrics: Mapping[str, Any] | None = None,
    training_data: str | Mapping[str, Any] | None = None,
    eval_data: str | Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    pipeline_tag: str = DEFAULT_PIPELINE_TAG,
    model_name: str | None = None,
    threshold_calibrated: bool = False,
) -> ModelCard:
    """Fill the model-card template for a CMI-CLIP model.

    Args:
        model: The CMI-CLIP model (its config supplies the architecture details and base checkpoint).
        metrics: `{category: {metric: value}}` from `evaluate_model` (a "mean" row is added when missing),
            or a flat `{metric: value}` of means. Values are fractions in [0, 1].
        training_data: Free text, or a dict with `name`, optional `id` (Hub data set id, listed under
            `datasets` in the metadata) and `description`.
        eval_data: Free text, or a dict with `name`, optional `id`/`type`, `split` and `description`.
        repo_id: Hub repository id shown in the usage example.
        license: License identifier for the metadata.
        pipeline_tag: Hub pipeline tag.
        model_name: Title of the card and name of the `model-index` entry; defaults to the repo name.
        threshold_calibrated: Whether `config.decision_threshold` was calibrated on validation data.

    Returns:
        The rendered `huggingface_hub.ModelCard`.
    """
    config = model.config
    rows, mean = _split_metrics(metrics)
    name = model_name or (repo_id.split("/")[-1] if repo_id else "cmi-clip-anomaly-detection")
    clip_checkpoint = config.clip_name_or_path or "unknown"
    # `base_model` must name a Hub repository; a local folder is only mentioned in the text.
    base_model = clip_checkpoint if config.clip_name_or_path and not os.path.isdir(config.clip_name_or_path) else None
    datasets = [training_data["id"]] if isinstance(training_data, Mapping) and training_data.get("id") else None
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        base_model=base_model,
        datasets=datasets,
        tags=list(DEFAULT_TAGS),
        model_name=name,
        eval_results=_eval_results(rows, mean, eval_data) or None,
    )
    cmi_description = (
        f"at feature-layer positions {list(config.cmi_layers)}, {config.cmi_num_heads} heads" if config.use_cmi else "off"
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=name,
        model_summary="Zero-shot industrial anomaly detection and localization with CLIP (CMI-CLIP).",
        repo_id=repo_id or "path/to/this/folder",
        clip_checkpoint=clip_checkpoint,
        image_size=f"{config.image_size[0]} x {config.image_size[1]}",
        feature_layers=list(config.feature_layers),
        cmi_description=cmi_description,
        cvl_description="on" if config.use_cvl else "off",
        fusion_weight=config.fusion_weight if not config.learn_fusion_weight else "learned",
        decision_threshold=config.decision_threshold,
        category_thresholds=", ".join(f"{name} {value:.4f}" for name, value in sorted(config.category_thresholds.items())) or "none",
        threshold_origin="calibrated on validation data" if threshold_calibrated else "not calibrated (the default 0.5 or a value set by hand)",
        prompt_sets=", ".join(config.prompt_sets) or "none",
        transformers_version=_package_version("transformers"),
        cmi_clip_version=_package_version("cmi_clip"),
        training_data=_data_description(training_data, "Not recorded. Without training, the model runs training-free on the CLIP weights."),
        eval_data=_data_description(eval_data, "Not recorded."),
        metrics_table=_metrics_table(rows, mean),
    )


def write_model_card(
    model: Any,
    folder: str | os.PathLike,
    metrics: Mapping[str, Any] | None = None,
    training_data: str | Mapping[str, Any] | None = None,
    eval_data: str | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> ModelCard:
    """Write the model card of `model` to `folder/README.md` and return it.

    Arguments are those of [`build_model_card`].
    """
    card = build_model_card(model, metrics=metrics, training_data=training_data, eval_data=eval_data, **kwargs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card.save(folder / "README.md")
    return card


def push_to_hub(
    model: Any,
    repo_id: str,
    local_dir: str | os.PathLike | None = None,
    metrics: Mapping[str, Any] | None = None,
    training_data: str | Mapping[str, Any] | None = None,
    eval_data: str | Mapping[str, Any] | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload CMI-CLIP anomaly detection model",
    card_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Save a model with its pipeline code and model card, and upload the folder to the Hub.

    Args:
        model: The CMI-CLIP model.
        repo_id: Hub repository, "user/name"; it is created when missing.
        local_dir: Folder to write before uploading; a temporary folder when None.
        metrics, training_data, eval_data: For the model card, see [`build_model_card`].
        private: Visibility of a newly created repository.
        token: Hub token; defaults to the stored login.
        revision: Branch to upload to.
        commit_message: Message of the Hub commit.
        card_kwargs: Further arguments of [`build_model_card`].

    Returns:
        The `CommitInfo` of `HfApi.upload_folder`.
    """
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(local_dir) if local_dir is not None else Path(temporary)
        save_for_pipeline(model, folder)
        write_model_card(
            model, folder, metrics=metrics, training_data=training_data, eval_data=eval_data, repo_id=repo_id, **dict(card_kwargs or {})
        )
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        logger.info("Uploading %s to %s", folder, repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision)


__all__ = ["build_model_card", "push_to_hub", "save_for_pipeline", "write_model_card"]
