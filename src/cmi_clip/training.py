# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Training of the CMI-CLIP heads with cross-view learning (CVL), through 🤗 Accelerate.

The zero-shot protocol trains on an auxiliary data set and evaluates on another that shares no
category with it (train on VisA, test on MVTec AD, and the reverse). [`train`] runs that protocol.
It builds or takes a model, loads the two data sets and trains the parameters that require
gradients with AdamW, checkpointing with `Accelerator.save_state`. It then evaluates with
`cmi_clip.evaluation.evaluate_model`, calibrates `config.decision_threshold` on the evaluation data
and saves the model with `save_pretrained`.

The same code runs from Python (`train(TrainConfig(...))`), from `cmi-clip train` and from
`accelerate launch examples/train.py`; the command-line options are defined once, in
[`build_train_argument_parser`].

Sample stream and resuming:
    The training sampler draws a permutation from a generator seeded with `seed + epoch`, and a data
    set with `set_epoch` (such as `OnTheFlyDefectDataset`) gets the epoch too. A checkpoint stores
    the epoch, the number of batches this process consumed in it and the number of optimizer steps.
    `resume_from_checkpoint` restores the model, optimizer, scheduler and random states, skips the
    consumed batches of the resumed epoch only (`Accelerator.skip_first_batches`), and continues. On
    CPU a resumed run ends with the same weights, bit for bit, as an uninterrupted run with the same
    seed and options.

Gradient accumulation:
    With `gradient_accumulation_steps=k`, the optimizer steps after every k batches and on the last
    batch of each epoch: Accelerate's `accumulate` syncs at the end of the data loader
    (`GradientAccumulationPlugin(sync_with_dataloader=True)`, its default). An epoch of n batches
    therefore makes ceil(n / k) optimizer steps, and its last window may hold fewer than k batches.
    `Accelerator.backward` divides every loss by k, so the gradient of a shorter last window is
    scaled by (batches in the window) / k rather than averaged over its own batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import logging

from .losses import LossWeights, cross_view_loss
from .processing_cmi_clip import image_size_of, preprocess_images, preprocess_masks

logger = logging.get_logger(__name__)

CHECKPOINTS_DIR_NAME = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TEMPORARY_CHECKPOINT_PREFIX = ".tmp-step_"
TRAINING_STATE_NAME = "training_state.json"
METRICS_FILE_NAME = "metrics.json"
MODEL_DIR_NAME = "model"
TRACKER_PROJECT_NAME = "cmi_clip_train"

# TrainConfig field -> LossWeights field, for the loss-weight options.
LOSS_WEIGHT_FIELDS = {
    "focal_weight": "focal",
    "dice_weight": "dice",
    "image_weight": "image",
    "cross_view_weight": "cross_view",
    "separation_weight": "separation",
    "separation_margin": "separation_margin",
    "focal_gamma": "focal_gamma",
    "focal_alpha": "focal_alpha",
}


@dataclass
class TrainConfig:
    """Options of [`train`], in the manner of `transformers.TrainingArguments`.

    Attributes:
        clip_model: CLIP checkpoint (Hub id or local folder) to build the model from when `train` gets
            no model.
        train_data: Root of the training data set (MVTec AD, VisA or image-folder layout).
        eval_data: Root of the evaluation data set.
        data_format: Layout of both roots (`"mvtec"` or `"mvtec_ad"`, `"visa"`, `"folder"`, `"hub"`); None detects it per root.
        train_split: Split of `train_data` to train on. The zero-shot protocol trains on the test split,
            because it contains the defective images with masks.
        eval_split: Split of `eval_data` to evaluate on.
        train_categories: Categories of the training data to use; None uses all.
        eval_categories: Categories of the evaluation data to use; None uses all.
        image_size: Input side in pixels when building the model; None keeps the CLIP checkpoint's size.
        num_epochs: Number of passes over the training data.
        max_steps: Total number of optimizer steps; overrides `num_epochs` when set.
        batch_size: Training batch size per process.
        eval_batch_size: Evaluation batch size per process; None uses `batch_size`.
        learning_rate: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        lr_scheduler_type: Schedule name for `transformers.get_scheduler` (`"cosine"`, `"linear"`, `"constant"`, ...).
        warmup_steps: Number of warm-up optimizer steps of the schedule.
        max_grad_norm: Gradient-norm clipping threshold; 0 disables clipping.
        gradient_accumulation_steps: Batches per optimizer step (see the module documentation for the
            last window of an epoch).
        checkpointing_steps: Save a checkpoint every this many optimizer steps; None saves only at the
            end of each epoch and of training.
        checkpoints_total_limit: Number of most recent checkpoints to keep; None keeps all.
        resume_from_checkpoint: Checkpoint folder to resume from, or `"latest"` for the highest complete
            step under `output_dir/checkpoints` (a fresh start when there is none).
        seed: Seed of model initialisation, sampling order and every random state.
        output_dir: Folder for checkpoints, logs, `metrics.json` and the saved model.
        no_cmi: Build the model without Cross-view Mutual Interaction (ablation).
        no_cvl: Train the fused map and the image score only, without cross-view learning (ablation).
        freeze_clip: True freezes the CLIP weights, False trains them too; None keeps the model's setting
            (frozen for a model built here).
        eval_every_epoch: Evaluate at the end of every epoch as well as at the end of training.
        focal_weight: Weight of the focal terms. None keeps the model's configured value, for this and
            every loss option below.
        dice_weight: Weight of the dice terms.
        image_weight: Weight of the image-score binary cross-entropy.
        cross_view_weight: Weight of the agreement term between the two branch maps.
        separation_weight: Weight of the abnormality/normality text separation term.
        separation_margin: Cosine similarity above which the separation term is non-zero.
        focal_gamma: Focusing exponent of the focal loss.
        focal_alpha: Weight of the anomalous class in the focal loss.
        prompts: JSON file of category prompts added to the model's prompts.
        report_to: `"tensorboard"` logs through Accelerate's TensorBoard tracker; `"none"` logs nothing.
        logging_steps: Log the training loss every this many optimizer steps.
        dataloader_num_workers: Worker processes of each data loader.
        calibrate_threshold: Store the image-score threshold that maximises image F1 on the evaluation
            data in `config.decision_threshold`.
        save_model: Save the trained model with `save_pretrained` to `output_dir/model`.
    """

    clip_model: str | None = None
    train_data: str | None = None
    eval_data: str | None = None
    data_format: str | None = None
    train_split: str = "test"
    eval_split: str = "test"
    train_categories: list[str] | None = None
    eval_categories: list[str] | None = None
    image_size: int | None = None
    num_epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 8
    eval_batch_size: int | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    seed: int = 42
    output_dir: str = "outputs/cmi_clip"
    no_cmi: bool = False
    no_cvl: bool = False
    freeze_clip: bool | None = None
    eval_every_epoch: bool = False
    focal_weight: float | None = None
    dice_weight: float | None = None
    image_weight: float | None = None
    cross_view_weight: float | None = None
    separation_weight: float | None = None
    separation_margin: float | None = None
    focal_gamma: float | None = None
    focal_alpha: float | None = None
    prompts: str | None = None
    report_to: str = "none"
    logging_steps: int = 10
    dataloader_num_workers: int = 0
    calibrate_threshold: bool = True
    save_model: bool = True

    def __post_init__(self) -> None:
        positive = {"num_epochs": self.num_epochs, "batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps, "logging_steps": self.logging_steps}
        for name in ("max_steps", "eval_batch_size", "checkpointing_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if int(value) < 1:
                msg = f"{name}={value} is invalid; it must be a positive integer."
                raise ValueError(msg)
        if self.report_to not in ("none", "tensorboard"):
            msg = f"report_to={self.report_to!r} is invalid; use 'tensorboard' or 'none'."
            raise ValueError(msg)
        for name in ("train_categories", "eval_categories"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, split_names(value))

    def loss_weight_overrides(self) -> dict[str, float]:
        """Return the loss weights set in this config, keyed by [`LossWeights`] field."""
        return {target: getattr(self, name) for name, target in LOSS_WEIGHT_FIELDS.items() if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class EpochSeededRandomSampler(torch.utils.data.Sampler[int]):
    """Random permutation of `range(num_samples)` drawn from a generator seeded with `seed + epoch`.

    Every process draws the same permutation for the same epoch, and a resumed run draws the same
    one as the interrupted run. The generator lives only inside `__iter__`, so Accelerate does not
    replace or re-synchronise it.

    Args:
        num_samples: Size of the data set.
        seed: Base seed.
        shuffle: False yields the indices in order.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration yields."""
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            yield from range(self.num_samples)
            return
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_samples


def _to_pil(image: Any) -> Image.Image:
    """Return a PIL image from a PIL image, an (H, W) or (H, W, C) array or a (C, H, W) uint8 tensor."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        msg = f"Image arrays must be uint8 (H, W) or (H, W, 3); got dtype {array.dtype} and shape {array.shape}. Convert them to uint8 or PIL images."
        raise TypeError(msg)
    return Image.fromarray(array)


class CMIClipCollator:
    """Turn data set items into a model batch.

    Items are dicts with `image` (PIL image or uint8 array), `mask` (PIL image, array or None for an
    all-normal image), `label` (0 normal, 1 anomalous; derived from the mask when missing) and
    `category` (str).

    Args:
        image_processor: The model's image processor (`model.image_processor`).

    Returns (from `__call__`):
        A dict with `pixel_values` (B, 3, H, W) float32, `masks` (B, H, W) float 0/1 at the input size,
        `labels` (B,) long and `categories` (list of B str).
    """

    def __init__(self, image_processor: Any) -> None:
        if image_processor is None:
            msg = "The model has no image processor. Load it with CMIClipModel.from_pretrained/from_clip_pretrained or set model.image_processor."
            raise ValueError(msg)
        self.image_processor = image_processor
        self.size = image_size_of(image_processor)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        images, masks, labels, categories = [], [], [], []
        for item in items:
            for key in ("image", "category"):
                if key not in item:
                    msg = f"Data set item has no {key!r} key (keys: {sorted(item)}). Items need image, mask, label and category."
                    raise KeyError(msg)
            image = _to_pil(item["image"])
            images.append(image)
            mask = item.get("mask")
            mask = np.zeros((image.height, image.width), dtype=bool) if mask is None else np.asarray(mask)
            masks.append(mask)
            label = item.get("label")
            labels.append(int(mask.any()) if label is None else int(label))
            categories.append(str(item["category"]))
        return {
            "pixel_values": preprocess_images(images, self.image_processor),
            "masks": preprocess_masks(masks, self.size),
            "labels": torch.tensor(labels, dtype=torch.long),
            "categories": categories,
        }


def split_names(value: str | Sequence[str] | None) -> list[str] | None:
    """Split a comma-separated string of names into a list; lists pass through and None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return list(value)


def _load_root(root: str, data_format: str | None, categories: list[str] | None, split: str) -> Any:
    from .data import load_dataset_auto

    dataset = load_dataset_auto(root, data_format=data_format, categories=categories, split=split)
    logger.info("Loaded %d images of split %r from %s", len(dataset), split, root)
    return dataset


def _select_categories(dataset: Any, categories: list[str] | None, role: str) -> Any:
    """Keep the given categories of a `datasets.Dataset`; other data sets must be filtered by the caller."""
    if categories is None:
        return dataset
    import datasets

    if isinstance(dataset, datasets.Dataset):
        selected = set(categories)
        return dataset.filter(lambda category: category in selected, input_columns="category")
    msg = f"{role}_categories is set but the {role} data set is a {type(dataset).__name__}; only roots and datasets.Dataset objects can be filtered by category. Filter the data set yourself or drop the option."
    raise ValueError(msg)


def _dataset_categories(dataset: Any) -> list[str] | None:
    """Return the categories of a data set when they can be read without loading images."""
    import datasets

    if isinstance(dataset, datasets.Dataset) and "category" in dataset.column_names:
        return sorted(set(dataset["category"]))
    categories = getattr(dataset, "categories", None)
    if isinstance(categories, (list, tuple)):
        return sorted(set(map(str, categories)))
    return None


def resolve_datasets(config: TrainConfig, train_dataset: Any = None, eval_dataset: Any = None) -> tuple[Any, Any]:
    """Return the training and evaluation data sets from the given objects or from the config's roots.

    Raises:
        ValueError: When neither a training data set nor `config.train_data` is given.
    """
    if train_dataset is None:
        if config.train_data is None:
            msg = "No training data: pass train_dataset= or set TrainConfig.train_data (--train_data) to a data set root."
            raise ValueError(msg)
        train_dataset = _load_root(config.train_data, config.data_format, config.train_categories, config.train_split)
    else:
        train_dataset = _select_categories(train_dataset, config.train_categories, "train")
    if eval_dataset is None and config.eval_data is not None:
        eval_dataset = _load_root(config.eval_data, config.data_format, config.eval_categories, config.eval_split)
    elif eval_dataset is not None:
        eval_dataset = _select_categories(eval_dataset, config.eval_categories, "eval")
    if len(train_dataset) == 0:
        msg = "The training data set is empty; check --train_data, --train_split and --train_categories."
        raise ValueError(msg)

    train_categories = _dataset_categories(train_dataset)
    eval_categories = _dataset_categories(eval_dataset) if eval_dataset is not None else None
    if train_categories and eval_categories:
        shared = sorted(set(train_categories) & set(eval_categories))
        if shared:
            logger.warning("Training and evaluation data share the categories %s, so the evaluation is not zero-shot.", shared)
    return train_dataset, eval_dataset


# ----------------------------------------------------------------------------------------------
# Model, accelerator and checkpoints
# ----------------------------------------------------------------------------------------------


def build_model(config: TrainConfig) -> Any:
    """Build an untrained [`CMIClipModel`] around `config.clip_model` with the config's model options."""
    from .modeling_cmi_clip import CMIClipModel

    if config.clip_model is None:
        msg = "No model: pass model= or set TrainConfig.clip_model (--clip_model) to a CLIP Hub id or local folder."
        raise ValueError(msg)
    model_kwargs: dict[str, Any] = {"use_cmi": not config.no_cmi, "use_cvl": not config.no_cvl}
    if config.image_size is not None:
        model_kwargs["image_size"] = config.image_size
    if config.freeze_clip is not None:
        model_kwargs["freeze_clip"] = config.freeze_clip
    return CMIClipModel.from_clip_pretrained(config.clip_model, **model_kwargs)


def configure_model(model: Any, config: TrainConfig) -> None:
    """Apply the config's training options (ablations, freezing, loss weights, prompts) to a model in place."""
    if config.no_cmi and model.config.use_cmi:
        msg = "no_cmi=True but the given model was built with CMI. Build it with use_cmi=False, or let train() build it from clip_model."
        raise ValueError(msg)
    if config.no_cvl:
        model.config.use_cvl = False
    if config.freeze_clip is not None:
        model.config.freeze_clip = config.freeze_clip
        model.clip.requires_grad_(not config.freeze_clip)
    overrides = config.loss_weight_overrides()
    if overrides:
        merged = LossWeights.from_dict({**model.config.loss_weights, **overrides})
        model.config.loss_weights = merged.to_dict()
    if config.prompts is not None:
        model.set_prompts(config.prompts)


def build_accelerator(config: TrainConfig) -> Any:
    """Create the `Accelerator`: gradient accumulation, trackers and project folder from the config.

    Mixed precision, the device and the number of processes come from `accelerate launch` (or its
    environment variables), not from the config.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    log_with = None
    if config.report_to == "tensorboard":
        if is_tensorboard_available():
            log_with = "tensorboard"
        else:
            logger.warning("report_to='tensorboard' but tensorboard is not installed; install it with `pip install tensorboard`. Logging is off.")
    project = ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs"))
    return Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps, log_with=log_with, project_config=project)


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Return the complete checkpoints `step_N` in a folder, sorted by step.

    A folder counts as complete when it contains the training-state file. Temporary folders of
    unfinished saves (`.tmp-step_N`) are ignored.
    """
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / TRAINING_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """Return the checkpoint folder to resume from: a path, or `"latest"` for the highest complete step.

    Returns None for `"latest"` when no checkpoint exists yet, so a first run starts fresh.

    Raises:
        FileNotFoundError: When a given path is not a complete checkpoint.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(Path(output_dir) / CHECKPOINTS_DIR_NAME)
        if not checkpoints:
            logger.info("No checkpoint under %s; starting from scratch.", Path(output_dir) / CHECKPOINTS_DIR_NAME)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_NAME).is_file():
        msg = f"resume_from_checkpoint={resume_from_checkpoint} is not a complete checkpoint (no {TRAINING_STATE_NAME}). Pass a checkpoints/step_N folder or 'latest'."
        raise FileNotFoundError(msg)
    return path


def save_checkpoint(accelerator: Any, output_dir: str | os.PathLike, state: dict[str, Any], total_limit: int | None = None) -> Path:
    """Save the accelerator state and the sample-stream state atomically as `checkpoints/step_N`.

    Everything is written into `checkpoints/.tmp-step_N` first, the training-state JSON last, and the
    folder is then renamed with `os.replace`, so an interrupted save never becomes the latest
    checkpoint. A `step_N` left by an earlier run with the same step is replaced.

    Args:
        accelerator: The accelerator whose prepared objects are saved.
        output_dir: Training output folder.
        state: Sample-stream state: `epoch`, `step_in_epoch`, `global_step` and the histories.
        total_limit: Number of most recent checkpoints to keep; None keeps all.

    Returns:
        The final checkpoint folder.
    """
    checkpoints_dir = Path(output_dir) / CHECKPOINTS_DIR_NAME
    step = int(state["global_step"])
    temporary = checkpoints_dir / f"{TEMPORARY_CHECKPOINT_PREFIX}{step}"
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(temporary / TRAINING_STATE_NAME, "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit is not None:
            for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    logger.info("Saved checkpoint %s", final)
    return final


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(model: Any, eval_dataset: Any, config: TrainConfig, accelerator: Any) -> dict[str, Any]:
    """Score `eval_dataset` with `cmi_clip.evaluation.evaluate_model` and summarise it.

    Every process scores a shard and the results are gathered with `gather_for_metrics`, so every
    process returns the same numbers.

    Returns:
        A dict with `metrics` (the mean over categories of each metric), `category_metrics`
        (`{category: metrics}` plus the `"mean"` row), `threshold` (the image-score threshold with
        the best F1 over all images), `records` (one dict per image with its `category`, `label` and
        `score`, from `evaluate_model`) and `num_images`.
    """
    from .evaluation import calibrate_threshold, evaluate_model

    per_category, records = evaluate_model(
        accelerator.unwrap_model(model),
        eval_dataset,
        batch_size=config.eval_batch_size or config.batch_size,
        accelerator=accelerator,
        num_workers=config.dataloader_num_workers,
        show_progress=accelerator.is_local_main_process,
    )
    mean = {}
    for name in dict.fromkeys(key for metrics in per_category.values() for key in metrics):
        values = [float(metrics[name]) for metrics in per_category.values() if name in metrics and not math.isnan(float(metrics[name]))]
        if values and name not in ("num_images", "num_anomalous", "image_f1_threshold"):
            mean[name] = float(np.mean(values))
    return {
        "metrics": mean,
        "category_metrics": {**per_category, "mean": mean},
        "threshold": calibrate_threshold(records) if records else None,
        "records": records,
        "num_images": len(records),
    }


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Flatten the options for TensorBoard's hparams, which accept only numbers, strings and booleans."""
    values = {}
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        values[key] = "none" if value is None else value
    return values


def _read_training_state(checkpoint: Path) -> dict[str, Any]:
    with open(checkpoint / TRAINING_STATE_NAME, encoding="utf-8") as handle:
        return json.load(handle)


def _format_table(category_metrics: dict[str, Any]) -> str:
    from .metrics import format_metrics_table

    return format_metrics_table(category_metrics)


class _TrainingRun:
    """The prepared objects of one training run, its sample-stream position and its histories.

    `state` contains `epoch` and `step_in_epoch` (the position to resume from), `global_step` (optimizer
    steps so far), `loss_history` and `eval_history`. It is what a checkpoint's training-state JSON stores.
    """

    def __init__(self, config: TrainConfig, model: Any, train_dataset: Any, eval_dataset: Any, accelerator: Any) -> None:
        from transformers import get_scheduler

        self.config = config
        self.accelerator = accelerator
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.output_dir = Path(config.output_dir)

        self.sampler = EpochSeededRandomSampler(len(train_dataset), config.seed)
        train_loader = torch.utils.data.DataLoader(
            train_dataset,
            batch_size=config.batch_size,
            sampler=self.sampler,
            collate_fn=CMIClipCollator(model.image_processor),
            num_workers=config.dataloader_num_workers,
        )
        self.parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        if not self.parameters:
            msg = "The model has no trainable parameters (requires_grad); check freeze_clip and the model's heads."
            raise ValueError(msg)
        optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        model.train()
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.unwrapped = accelerator.unwrap_model(self.model)

        # The schedule length needs the per-process number of batches, known after `prepare`.
        self.batches_per_epoch = len(self.train_loader)
        updates_per_epoch = math.ceil(self.batches_per_epoch / config.gradient_accumulation_steps)
        self.total_steps = config.max_steps if config.max_steps is not None else config.num_epochs * updates_per_epoch
        self.num_epochs = math.ceil(self.total_steps / updates_per_epoch)
        # A prepared scheduler steps once per process for every optimizer step, so its lengths are scaled.
        scheduler = get_scheduler(
            config.lr_scheduler_type,
            optimizer=self.optimizer,
            num_warmup_steps=config.warmup_steps * accelerator.num_processes,
            num_training_steps=self.total_steps * accelerator.num_processes,
        )
        self.scheduler = accelerator.prepare(scheduler)

        self.state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_history": [], "eval_history": []}
        self.last_checkpoint: Path | None = None
        self.last_saved_step = -1
        self.progress = None

    def restore(self, checkpoint: Path) -> None:
        """Load a checkpoint's accelerator state and sample-stream position."""
        self.accelerator.load_state(str(checkpoint))
        saved = _read_training_state(checkpoint)
        current = {
            "num_processes": self.accelerator.num_processes,
            "batch_size": self.config.batch_size,
            "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
        }
        for key, value in current.items():
            if saved.get(key, value) != value:
                logger.warning(
                    "Checkpoint %s was written with %s=%s but this run uses %s, so the resumed sample stream differs from the interrupted run's.",
                    checkpoint, key, saved[key], value,
                )
        self.state.update({key: saved[key] for key in self.state if key in saved})
        self.last_checkpoint = checkpoint
        self.last_saved_step = self.state["global_step"]
        logger.info(
            "Resumed from %s at epoch %d, batch %d, step %d",
            checkpoint, self.state["epoch"], self.state["step_in_epoch"], self.state["global_step"],
        )

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """Checkpoint the run at a position; a position at the end of an epoch is stored as the next epoch's start."""
        if step_in_epoch >= self.batches_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        position = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.state["global_step"],
            "num_processes": self.accelerator.num_processes,
            "batch_size": self.config.batch_size,
            "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
            "loss_history": self.state["loss_history"],
            "eval_history": self.state["eval_history"],
        }
        self.last_checkpoint = save_checkpoint(self.accelerator, self.output_dir, position, self.config.checkpoints_total_limit)
        self.last_saved_step = self.state["global_step"]

    def run(self) -> None:
        """Train from the current position to `total_steps`, checkpointing and evaluating as configured."""
        self.progress = tqdm(
            total=self.total_steps, initial=self.state["global_step"], desc="Training", disable=not self.accelerator.is_local_main_process
        )
        for epoch in range(self.state["epoch"], self.num_epochs):
            if self.state["global_step"] >= self.total_steps:
                break
            step_in_epoch = self.run_epoch(epoch)
            if self.eval_dataset is not None and self.config.eval_every_epoch:
                self.evaluate_epoch(epoch)
            if self.last_saved_step != self.state["global_step"]:
                self.save(epoch, step_in_epoch)
        self.progress.close()

    def run_epoch(self, epoch: int) -> int:
        """Train one epoch (the rest of it when resuming) and return the number of batches consumed in it."""
        # Both the sampler (through the loader) and an epoch-aware data set get the epoch.
        self.train_loader.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(epoch)
        skip = self.state["step_in_epoch"] if epoch == self.state["epoch"] else 0
        loader = self.train_loader
        if skip:
            loader = self.accelerator.skip_first_batches(self.train_loader, skip)
            loader.set_epoch(epoch)

        step_in_epoch = skip
        window_losses: list[torch.Tensor] = []
        window_terms: dict[str, list[torch.Tensor]] = {}
        for batch in loader:
            with self.accelerator.accumulate(self.model):
                outputs = self.model(
                    pixel_values=batch["pixel_values"], categories=batch["categories"], masks=batch["masks"], labels=batch["labels"]
                )
                self.accelerator.backward(outputs.loss)
                if self.accelerator.sync_gradients and self.config.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
                learning_rate = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            step_in_epoch += 1
            window_losses.append(outputs.loss.detach())
            for name, value in (outputs.loss_terms or {}).items():
                window_terms.setdefault(name, []).append(value.detach())
            if not self.accelerator.sync_gradients:
                continue

            self.state["global_step"] += 1
            self.record_step(epoch, learning_rate, window_losses, window_terms)
            window_losses, window_terms = [], {}
            if self.config.checkpointing_steps and self.state["global_step"] % self.config.checkpointing_steps == 0:
                self.save(epoch, step_in_epoch)
            if self.state["global_step"] >= self.total_steps:
                break
        return step_in_epoch

    def record_step(self, epoch: int, learning_rate: float, losses: list[torch.Tensor], terms: dict[str, list[torch.Tensor]]) -> None:
        """Average an accumulation window's loss and terms over batches and processes, and log them."""
        accelerator = self.accelerator
        loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        term_values = {name: accelerator.reduce(torch.stack(values).mean(), reduction="mean").item() for name, values in terms.items()}
        step = self.state["global_step"]
        self.state["loss_history"].append({"step": step, "epoch": epoch, "loss": loss, "learning_rate": learning_rate, **term_values})
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
        if step % self.config.logging_steps == 0 or step == self.total_steps:
            logged = {"train/loss": loss, "train/learning_rate": learning_rate, "train/epoch": epoch}
            logged.update({f"train/{name}": value for name, value in term_values.items()})
            accelerator.log(logged, step=step)

    def evaluate_epoch(self, epoch: int) -> None:
        """Evaluate after an epoch, log `eval/*` and keep the metrics in `eval_history`."""
        result = evaluate(self.model, self.eval_dataset, self.config, self.accelerator)
        self.state["eval_history"].append({"epoch": epoch, "step": self.state["global_step"], **result["metrics"]})
        self.accelerator.log({f"eval/{name}": value for name, value in result["metrics"].items()}, step=self.state["global_step"])
        if self.accelerator.is_main_process:
            logger.info("Evaluation after epoch %d:\n%s", epoch, _format_table(result["category_metrics"]))

    def finish(self) -> dict[str, Any]:
        """Run the final evaluation, calibrate the threshold, write `metrics.json`, save the model, and return the results."""
        accelerator = self.accelerator
        results: dict[str, Any] = {
            "metrics": {},
            "category_metrics": {},
            "eval_records": [],
            "decision_threshold": None,
            "global_step": self.state["global_step"],
            "epochs_completed": len({record["epoch"] for record in self.state["loss_history"]}),
            "loss_history": self.state["loss_history"],
            "eval_history": self.state["eval_history"],
            "output_dir": str(self.output_dir),
            "model_dir": None,
            "metrics_file": None,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint is not None else None,
        }
        if self.eval_dataset is not None:
            final = evaluate(self.model, self.eval_dataset, self.config, accelerator)
            results["metrics"], results["category_metrics"] = final["metrics"], final["category_metrics"]
            results["eval_records"] = final["records"]
            accelerator.log({f"eval/{name}": value for name, value in final["metrics"].items()}, step=self.state["global_step"])
            if self.config.calibrate_threshold and final["threshold"] is not None:
                self.unwrapped.config.decision_threshold = final["threshold"]
            results["decision_threshold"] = float(self.unwrapped.config.decision_threshold)
            metrics_file = self.output_dir / METRICS_FILE_NAME
            if accelerator.is_main_process:
                print(_format_table(final["category_metrics"]))
                payload = {key: results[key] for key in ("metrics", "category_metrics", "decision_threshold", "global_step", "eval_history")}
                payload["num_eval_images"] = final["num_images"]
                payload["config"] = self.config.to_dict()
                with open(metrics_file, "w", encoding="utf-8") as handle:
                    json.dump(payload, handle, indent=2)
            results["metrics_file"] = str(metrics_file)

        if self.config.save_model:
            model_dir = self.output_dir / MODEL_DIR_NAME
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self.unwrapped.save_pretrained(model_dir)
                logger.info("Saved the trained model to %s", model_dir)
            accelerator.wait_for_everyone()
            results["model_dir"] = str(model_dir)
        return results


def train(
    config: TrainConfig,
    model: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    accelerator: Any = None,
) -> dict[str, Any]:
    """Train a CMI-CLIP model with cross-view learning, evaluate it, and save it.

    Args:
        config: Training options.
        model: A [`CMIClipModel`] to train; None builds one from `config.clip_model` (after seeding).
        train_dataset: Map-style torch data set or `datasets.Dataset` whose items have `image`, `mask`,
            `label` and `category`; None loads `config.train_data`.
        eval_dataset: Same kind of data set for evaluation; None loads `config.eval_data`, and without
            either no evaluation runs.
        accelerator: An `Accelerator` to use; None creates one from the config. One created here is
            ended (`end_training`) before returning, a given one is left open.

    Returns:
        A dict with `metrics` (the mean over categories of the final evaluation, empty without
        evaluation data), `category_metrics`, `eval_records` (the final evaluation's per-image
        `category`, `label` and `score`), `decision_threshold`, `global_step`,
        `epochs_completed`, `loss_history` (one dict per optimizer step with `step`, `epoch`, `loss`,
        `learning_rate` and each loss term), `eval_history` (per-epoch evaluations with
        `eval_every_epoch`), `output_dir`, `model_dir`, `metrics_file` and `last_checkpoint` (paths
        as str, or None when not written).
    """
    from accelerate.utils import set_seed

    owns_accelerator = accelerator is None
    if owns_accelerator:
        accelerator = build_accelerator(config)
    elif accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        msg = (
            f"The given accelerator accumulates {accelerator.gradient_accumulation_steps} batches but "
            f"config.gradient_accumulation_steps={config.gradient_accumulation_steps}. Make them equal."
        )
        raise ValueError(msg)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)

    # Seed before the model is built: the adapters and CMI layers are initialised from the global
    # random state, so every process and every resumed run starts from the same weights.
    set_seed(config.seed)
    if model is None:
        model = build_model(config)
    configure_model(model, config)
    train_dataset, eval_dataset = resolve_datasets(config, train_dataset, eval_dataset)

    run = _TrainingRun(config, model, train_dataset, eval_dataset, accelerator)
    accelerator.init_trackers(TRACKER_PROJECT_NAME, config=_tracker_config(config))
    checkpoint = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if checkpoint is not None:
        run.restore(checkpoint)
    logger.info(
        "Training on %d images: %d epochs, %d optimizer steps, %d batches of %d per process and epoch, %d processes",
        len(train_dataset), run.num_epochs, run.total_steps, run.batches_per_epoch, config.batch_size, accelerator.num_processes,
    )
    run.run()
    results = run.finish()
    if owns_accelerator:
        accelerator.end_training()
    return results


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_train_argument_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options to `parser` (shared by `cmi-clip train` and `examples/train.py`).

    Every option with an underscore is also accepted with hyphens (`--clip_model` or `--clip-model`),
    the spelling of the other `cmi-clip` subcommands.

    Mixed precision, the device and the number of processes are set by `accelerate launch`
    (`--mixed_precision bf16`, `--cpu`, `--num_processes N`), not here.
    """
    defaults = TrainConfig()
    model = parser.add_argument_group("model")
    model.add_argument("--clip_model", "--clip-model", default=None, help="CLIP checkpoint to start from: Hub id (openai/clip-vit-large-patch14-336) or local folder.")
    model.add_argument("--image_size", "--image-size", type=int, default=None, help="Input side in pixels (518 is common); default: the CLIP checkpoint's size.")
    model.add_argument("--no_cmi", "--no-cmi", action="store_true", help="Build the model without Cross-view Mutual Interaction (ablation).")
    model.add_argument("--no_cvl", "--no-cvl", action="store_true", help="Supervise the fused map and image score only, without cross-view learning (ablation).")
    freeze = model.add_mutually_exclusive_group()
    freeze.add_argument("--freeze_clip", "--freeze-clip", dest="freeze_clip", action="store_true", default=None, help="Keep the CLIP weights frozen (the default).")
    freeze.add_argument("--train_clip", "--train-clip", dest="freeze_clip", action="store_false", help="Train the CLIP weights together with the heads.")
    model.add_argument("--prompts", default=None, help="JSON file of category prompts to add to the built-in ones.")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data", "--train-data", default=None, help="Root of the training data set (for example VisA).")
    data.add_argument("--eval_data", "--eval-data", default=None, help="Root of the zero-shot evaluation data set (for example MVTec AD).")
    data.add_argument(
        "--data_format",
        "--data-format",
        default=None,
        choices=["mvtec", "mvtec_ad", "visa", "folder", "hub"],
        help="Layout of both roots (mvtec and mvtec_ad are the same layout); default: detected per root.",
    )
    data.add_argument("--train_split", "--train-split", default=defaults.train_split, help="Split of the training data to train on (default: %(default)s).")
    data.add_argument("--eval_split", "--eval-split", default=defaults.eval_split, help="Split of the evaluation data (default: %(default)s).")
    data.add_argument("--train_categories", "--train-categories", type=split_names, default=None, help="Comma-separated training categories; default: all.")
    data.add_argument("--eval_categories", "--eval-categories", type=split_names, default=None, help="Comma-separated evaluation categories; default: all.")
    data.add_argument("--dataloader_num_workers", "--dataloader-num-workers", type=int, default=defaults.dataloader_num_workers, help="Data loader worker processes (default: %(default)s).")

    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--num_epochs", "--num-epochs", type=int, default=defaults.num_epochs, help="Passes over the training data (default: %(default)s).")
    optimization.add_argument("--max_steps", "--max-steps", type=int, default=None, help="Total optimizer steps; overrides --num_epochs.")
    optimization.add_argument("--batch_size", "--batch-size", type=int, default=defaults.batch_size, help="Training batch size per process (default: %(default)s).")
    optimization.add_argument("--eval_batch_size", "--eval-batch-size", type=int, default=None, help="Evaluation batch size per process; default: --batch_size.")
    optimization.add_argument("--learning_rate", "--learning-rate", type=float, default=defaults.learning_rate, help="Peak AdamW learning rate (default: %(default)s).")
    optimization.add_argument("--weight_decay", "--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay (default: %(default)s).")
    optimization.add_argument("--lr_scheduler_type", "--lr-scheduler-type", default=defaults.lr_scheduler_type, help="Learning-rate schedule of transformers.get_scheduler (default: %(default)s).")
    optimization.add_argument("--warmup_steps", "--warmup-steps", type=int, default=defaults.warmup_steps, help="Warm-up optimizer steps (default: %(default)s).")
    optimization.add_argument("--max_grad_norm", "--max-grad-norm", type=float, default=defaults.max_grad_norm, help="Gradient-norm clipping threshold, 0 to disable (default: %(default)s).")
    optimization.add_argument("--gradient_accumulation_steps", "--gradient-accumulation-steps", type=int, default=defaults.gradient_accumulation_steps, help="Batches per optimizer step; the last batch of an epoch always steps (default: %(default)s).")
    optimization.add_argument("--seed", type=int, default=defaults.seed, help="Seed of initialisation, sampling order and random states (default: %(default)s).")

    loss = parser.add_argument_group("loss weights (default: the model's configured values)")
    loss.add_argument("--focal_weight", "--focal-weight", type=float, default=None, help="Weight of the focal terms.")
    loss.add_argument("--dice_weight", "--dice-weight", type=float, default=None, help="Weight of the dice terms.")
    loss.add_argument("--image_weight", "--image-weight", type=float, default=None, help="Weight of the image-score binary cross-entropy.")
    loss.add_argument("--cross_view_weight", "--cross-view-weight", type=float, default=None, help="Weight of the agreement term between the branch maps.")
    loss.add_argument("--separation_weight", "--separation-weight", type=float, default=None, help="Weight of the abnormality/normality text separation term.")
    loss.add_argument("--separation_margin", "--separation-margin", type=float, default=None, help="Cosine similarity above which the separation term is non-zero.")
    loss.add_argument("--focal_gamma", "--focal-gamma", type=float, default=None, help="Focusing exponent of the focal loss.")
    loss.add_argument("--focal_alpha", "--focal-alpha", type=float, default=None, help="Weight of the anomalous class in the focal loss.")

    output = parser.add_argument_group("checkpoints, evaluation and logging")
    output.add_argument("--output_dir", "--output-dir", default=defaults.output_dir, help="Folder for checkpoints, logs, metrics.json and the model (default: %(default)s).")
    output.add_argument("--checkpointing_steps", "--checkpointing-steps", type=int, default=None, help="Save a checkpoint every N optimizer steps; checkpoints are also saved at each epoch end.")
    output.add_argument("--checkpoints_total_limit", "--checkpoints-total-limit", type=int, default=None, help="Number of most recent checkpoints to keep; default: all.")
    output.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", default=None, help="Checkpoint folder to resume from, or 'latest' for the newest complete one in output_dir/checkpoints.")
    output.add_argument("--eval_every_epoch", "--eval-every-epoch", action="store_true", help="Evaluate after every epoch as well as at the end.")
    output.add_argument("--no_calibrate_threshold", "--no-calibrate-threshold", dest="calibrate_threshold", action="store_false", help="Keep config.decision_threshold instead of the image-F1-maximising threshold of the evaluation data.")
    output.add_argument("--no_save_model", "--no-save-model", dest="save_model", action="store_false", help="Do not save the trained model to output_dir/model.")
    output.add_argument("--report_to", "--report-to", default=defaults.report_to, choices=["tensorboard", "none"], help="Experiment tracker (default: %(default)s).")
    output.add_argument("--logging_steps", "--logging-steps", type=int, default=defaults.logging_steps, help="Log the training loss every N optimizer steps (default: %(default)s).")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a [`TrainConfig`] from parsed arguments, ignoring arguments that are not options of it."""
    names = {item.name for item in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in vars(args).items() if key in names})


def run_train(args: argparse.Namespace) -> int:
    """Run training from parsed command-line arguments and return the exit code."""
    results = train(config_from_args(args))
    if results["model_dir"]:
        logger.info("Model saved to %s", results["model_dir"])
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `train` subcommand to the `cmi-clip` command line."""
    parser = subparsers.add_parser(
        "train",
        help="Train the CMI heads on one data set and evaluate zero-shot on another.",
        description="Train with cross-view learning on one data set and evaluate zero-shot on another. "
        "For several processes or mixed precision, run examples/train.py with `accelerate launch`.",
    )
    build_train_argument_parser(parser)
    parser.set_defaults(func=run_train)
    return parser


__all__ = [
    "CMIClipCollator",
    "EpochSeededRandomSampler",
    "LossWeights",
    "TrainConfig",
    "add_parser",
    "build_train_argument_parser",
    "config_from_args",
    "cross_view_loss",
    "evaluate",
    "list_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
]
