# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Tests of the training loop: sample stream, resuming, accumulation, checkpoints, evaluation, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

from cmi_clip import CMIClipModel
from cmi_clip.cli import build_parser
from cmi_clip.processing_cmi_clip import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from cmi_clip.training import (
    CHECKPOINTS_DIR_NAME,
    METRICS_FILE_NAME,
    TRAINING_STATE_NAME,
    CMIClipCollator,
    EpochSeededRandomSampler,
    LossWeights,
    TrainConfig,
    config_from_args,
    cross_view_loss,
    list_checkpoints,
    resolve_checkpoint,
    train,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Channel 0 of item i is filled with i * INDEX_STEP, so a batch's indices can be read back from pixel_values.
INDEX_STEP = 20


class IndexedDataset(torch.utils.data.Dataset):
    """Tiny 32 px items whose red channel encodes the item index; odd items carry a square defect."""

    def __init__(self, length: int = 10, size: int = 32) -> None:
        self.length = length
        self.size = size
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(index)
        image = rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        image[..., 0] = index * INDEX_STEP
        mask = np.zeros((self.size, self.size), dtype=bool)
        label = index % 2
        if label:
            mask[8:16, 8:16] = True
            image[8:16, 8:16, 1:] = 255
        return {"image": image, "mask": mask, "label": label, "category": "bottle" if index < self.length // 2 else "cable"}


def decode_indices(pixel_values: torch.Tensor) -> list[int]:
    """Read the item indices back from the red channel of a normalised batch."""
    red = pixel_values[:, 0].mean(dim=(1, 2)) * CLIP_IMAGE_STD[0] + CLIP_IMAGE_MEAN[0]
    return [round(float(value) * 255 / INDEX_STEP) for value in red]


class BatchRecorder:
    """Forward pre-hook that records each training batch's indices and can raise at a given call."""

    def __init__(self, fail_at_call: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_at_call = fail_at_call

    def __call__(self, module, args, kwargs):
        if self.fail_at_call is not None and len(self.batches) + 1 == self.fail_at_call:
            raise RuntimeError("simulated crash")
        self.batches.append(decode_indices(kwargs["pixel_values"]))


def build_model(clip_dir: Path, seed: int, recorder: BatchRecorder | None = None) -> CMIClipModel:
    torch.manual_seed(seed)
    model = CMIClipModel.from_clip_pretrained(clip_dir)
    if recorder is not None:
        model.register_forward_pre_hook(recorder, with_kwargs=True)
    return model


def tiny_config(output_dir: Path, **overrides) -> TrainConfig:
    options = {"output_dir": str(output_dir), "batch_size": 2, "num_epochs": 3, "seed": 7, "save_model": False, "learning_rate": 1e-2}
    options.update(overrides)
    return TrainConfig(**options)


def state_dict_of(model: CMIClipModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    different = [name for name in left if not torch.equal(left[name], right[name])]
    assert different == []


pytestmark = pytest.mark.usefixtures("single_thread")


def test_reexports_losses():
    from cmi_clip import losses

    assert LossWeights is losses.LossWeights
    assert cross_view_loss is losses.cross_view_loss


def test_sampler_reseeds_per_epoch():
    sampler = EpochSeededRandomSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10))
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    generator = torch.Generator()
    generator.manual_seed(3 + 1)
    assert second == torch.randperm(10, generator=generator).tolist()


def test_collator_batch_shapes(tiny_model):
    collator = CMIClipCollator(tiny_model.image_processor)
    mask = np.zeros((40, 50), dtype=bool)
    mask[:10, :10] = True
    items = [
        {"image": Image.new("RGB", (50, 40), "gray"), "mask": None, "label": 0, "category": "bottle"},
        {"image": np.zeros((40, 50, 3), dtype=np.uint8), "mask": Image.fromarray(mask), "category": "cable"},
    ]
    batch = collator(items)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["masks"].shape == (2, 32, 32)
    assert batch["masks"][0].sum() == 0
    assert batch["masks"][1].sum() > 0
    assert batch["labels"].tolist() == [0, 1]
    assert batch["categories"] == ["bottle", "cable"]


def test_collator_rejects_missing_category(tiny_model):
    collator = CMIClipCollator(tiny_model.image_processor)
    with pytest.raises(KeyError, match="category"):
        collator([{"image": np.zeros((8, 8, 3), dtype=np.uint8), "mask": None, "label": 0}])


def test_resume_replays_sample_stream(tiny_clip_dir, tmp_path):
    """10 items, batch 2, 3 epochs: a run that crashes before step 8 and resumes trains on the same 15 batches."""
    full_recorder = BatchRecorder()
    full_model = build_model(tiny_clip_dir, seed=7, recorder=full_recorder)
    full_data = IndexedDataset()
    full = train(tiny_config(tmp_path / "full", warmup_steps=2), model=full_model, train_dataset=full_data)
    assert len(full_recorder.batches) == 15
    assert full["global_step"] == 15

    output_dir = tmp_path / "resumed"
    config = tiny_config(output_dir, warmup_steps=2, checkpointing_steps=7, resume_from_checkpoint="latest")
    crash_recorder = BatchRecorder(fail_at_call=8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, model=build_model(tiny_clip_dir, seed=7, recorder=crash_recorder), train_dataset=IndexedDataset())
    latest = resolve_checkpoint("latest", output_dir)
    assert latest.name == "step_7"
    saved_state = json.loads((latest / TRAINING_STATE_NAME).read_text())
    assert (saved_state["epoch"], saved_state["step_in_epoch"], saved_state["global_step"]) == (1, 2, 7)

    resume_recorder = BatchRecorder()
    resume_model = build_model(tiny_clip_dir, seed=7, recorder=resume_recorder)
    resume_data = IndexedDataset()
    resumed = train(config, model=resume_model, train_dataset=resume_data)

    assert crash_recorder.batches + resume_recorder.batches == full_recorder.batches
    assert len(resume_recorder.batches) == 8
    assert resume_data.epochs[0] == 1
    assert resumed["global_step"] == 15
    assert [record["loss"] for record in resumed["loss_history"]] == [record["loss"] for record in full["loss_history"]]
    assert_same_weights(state_dict_of(resume_model), state_dict_of(full_model))


def test_same_seed_same_weights(tiny_clip_dir, tmp_path):
    """Two runs that build the model from the CLIP folder with the same seed end bit-identical."""
    weights = []
    for name in ("first", "second"):
        config = tiny_config(tmp_path / name, clip_model=str(tiny_clip_dir), max_steps=3, save_model=True)
        result = train(config, train_dataset=IndexedDataset())
        weights.append(state_dict_of(CMIClipModel.from_pretrained(result["model_dir"])))
    assert_same_weights(weights[0], weights[1])
    untrained = build_model(tiny_clip_dir, seed=0)
    assert not torch.equal(weights[0]["abnormality_adapters.0.up.weight"], untrained.state_dict()["abnormality_adapters.0.up.weight"])


def test_accumulation_steps_on_last_partial_window(tiny_clip_dir, tmp_path):
    """5 batches per epoch with 2 batches per step make 3 optimizer steps per epoch; the last has one batch."""
    step_count = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: step_count.append(1))
    recorder = BatchRecorder()
    try:
        config = tiny_config(tmp_path, num_epochs=2, gradient_accumulation_steps=2)
        result = train(config, model=build_model(tiny_clip_dir, seed=7, recorder=recorder), train_dataset=IndexedDataset())
    finally:
        handle.remove()
    assert len(recorder.batches) == 10
    assert len(step_count) == 6
    assert result["global_step"] == 6
    assert [record["epoch"] for record in result["loss_history"]] == [0, 0, 0, 1, 1, 1]


def test_max_steps_stops_training(tiny_clip_dir, tmp_path):
    recorder = BatchRecorder()
    result = train(tiny_config(tmp_path, max_steps=4), model=build_model(tiny_clip_dir, seed=7, recorder=recorder), train_dataset=IndexedDataset())
    assert result["global_step"] == 4
    assert len(recorder.batches) == 4
    assert Path(result["last_checkpoint"]).name == "step_4"


def test_no_cvl_drops_branch_terms(tiny_clip_dir, tmp_path):
    model = build_model(tiny_clip_dir, seed=7)
    result = train(tiny_config(tmp_path, max_steps=1, no_cvl=True, dice_weight=0.5), model=model, train_dataset=IndexedDataset())
    terms = result["loss_history"][0]
    assert "fused_focal" in terms
    assert "abnormality_focal" not in terms
    assert "cross_view" not in terms
    assert model.config.use_cvl is False
    assert model.config.loss_weights["dice"] == 0.5


def test_no_cmi_rejects_model_with_cmi(tiny_clip_dir, tmp_path):
    with pytest.raises(ValueError, match="use_cmi=False"):
        train(tiny_config(tmp_path, no_cmi=True), model=build_model(tiny_clip_dir, seed=7), train_dataset=IndexedDataset())


def test_latest_skips_incomplete_checkpoints(tmp_path):
    checkpoints = tmp_path / CHECKPOINTS_DIR_NAME
    for name, complete in (("step_3", True), ("step_12", True), ("step_20", False), (".tmp-step_30", True)):
        (checkpoints / name).mkdir(parents=True)
        if complete:
            (checkpoints / name / TRAINING_STATE_NAME).write_text("{}")
    assert [path.name for path in list_checkpoints(checkpoints)] == ["step_3", "step_12"]
    assert resolve_checkpoint("latest", tmp_path).name == "step_12"
    assert resolve_checkpoint("latest", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(str(checkpoints / "step_20"), tmp_path)


def test_checkpoint_rename_is_atomic(tiny_clip_dir, tmp_path, monkeypatch):
    """A save that fails before the rename leaves only a temporary folder, never a new latest."""
    train(tiny_config(tmp_path, max_steps=2, checkpointing_steps=1), model=build_model(tiny_clip_dir, seed=7), train_dataset=IndexedDataset())
    assert resolve_checkpoint("latest", tmp_path).name == "step_2"

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    config = tiny_config(tmp_path, max_steps=3, checkpointing_steps=1, resume_from_checkpoint="latest")
    with pytest.raises(OSError, match="disk full"):
        train(config, model=build_model(tiny_clip_dir, seed=7), train_dataset=IndexedDataset())
    assert (tmp_path / CHECKPOINTS_DIR_NAME / ".tmp-step_3").is_dir()
    assert resolve_checkpoint("latest", tmp_path).name == "step_2"


def test_eval_writes_metrics_and_model(tiny_clip_dir, tmp_path):
    config = tiny_config(tmp_path, max_steps=2, save_model=True, eval_batch_size=4)
    eval_data = IndexedDataset(length=6)
    result = train(config, model=build_model(tiny_clip_dir, seed=7), train_dataset=IndexedDataset(), eval_dataset=eval_data)

    assert set(result["category_metrics"]) == {"bottle", "cable", "mean"}
    assert 0.0 <= result["metrics"]["pixel_auroc"] <= 1.0
    assert len(result["eval_records"]) == 6
    assert {record["category"] for record in result["eval_records"]} == {"bottle", "cable"}
    saved = json.loads(Path(result["metrics_file"]).read_text())
    assert saved["num_eval_images"] == 6
    assert saved["decision_threshold"] == result["decision_threshold"]
    loaded = CMIClipModel.from_pretrained(result["model_dir"])
    assert loaded.config.decision_threshold == pytest.approx(result["decision_threshold"])
    assert loaded.image_processor is not None


def test_cli_and_example_share_options():
    argv = ["train", "--clip_model", "clip", "--train_data", "a", "--eval_data", "b", "--train_categories", "pcb1, candle",
            "--train_clip", "--no_cvl", "--focal_weight", "2", "--gradient_accumulation_steps", "3", "--resume_from_checkpoint", "latest"]
    args = build_parser("train").parse_args(argv)
    config = config_from_args(args)
    assert config.train_categories == ["pcb1", "candle"]
    assert config.freeze_clip is False
    assert config.no_cvl is True
    assert config.loss_weight_overrides() == {"focal": 2.0}
    assert config.gradient_accumulation_steps == 3
    assert config.resume_from_checkpoint == "latest"
    assert args.func.__name__ == "run_train"
    assert config_from_args(build_parser("train").parse_args(["train"])).freeze_clip is None

    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import train as example
    finally:
        sys.path.pop(0)
    example_args = example.parse_args(argv[1:])
    assert config_from_args(example_args) == config


def test_train_options_accept_hyphens():
    underscores = ["train", "--clip_model", "clip", "--train_data", "a", "--data_format", "mvtec_ad", "--max_steps", "3",
                   "--train_clip", "--no_calibrate_threshold", "--focal_alpha", "0.5"]
    hyphens = ["train", "--clip-model", "clip", "--train-data", "a", "--data-format", "mvtec_ad", "--max-steps", "3",
               "--train-clip", "--no-calibrate-threshold", "--focal-alpha", "0.5"]
    parser = build_parser("train")
    expected = config_from_args(parser.parse_args(underscores))
    assert config_from_args(parser.parse_args(hyphens)) == expected
    assert expected.max_steps == 3
    assert expected.calibrate_threshold is False


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(report_to="wandb")


def test_two_process_launch(tiny_clip_dir, tmp_path):
    """`accelerate launch` with two CPU processes (gloo) trains and gathers every evaluation image once."""
    from cmi_clip.data.synthetic import make_synthetic_dataset

    train_root = make_synthetic_dataset(tmp_path / "train", ["brick"], image_size=32, num_train=0, num_test_good=2, num_test_defect_per_kind=1, defect_kinds=["scratch", "stain"])
    eval_root = make_synthetic_dataset(tmp_path / "eval", ["coins"], image_size=32, num_train=0, num_test_good=2, num_test_defect_per_kind=1, defect_kinds=["hole"], seed=1)
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
        str(REPO_ROOT / "examples" / "train.py"),
        "--clip_model", str(tiny_clip_dir), "--train_data", str(train_root), "--eval_data", str(eval_root),
        "--batch_size", "1", "--max_steps", "2", "--output_dir", str(output_dir),
    ]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((output_dir / METRICS_FILE_NAME).read_text())
    assert metrics["config"]["batch_size"] == 1
    state = json.loads((output_dir / CHECKPOINTS_DIR_NAME / "step_2" / TRAINING_STATE_NAME).read_text())
    assert state["num_processes"] == 2
    assert metrics["num_eval_images"] == 3
    assert metrics["category_metrics"]["coins"]["num_images"] == 3
    assert (output_dir / "model" / "config.json").is_file()



def test_cli_trains_from_roots(tiny_clip_dir, tmp_path):
    """`cmi-clip train` loads MVTec-layout roots, logs to TensorBoard and saves a loadable model."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cmi_clip.cli import main
    from cmi_clip.data.synthetic import make_synthetic_dataset

    train_root = make_synthetic_dataset(tmp_path / "train", ["brick"], image_size=32, num_train=0, num_test_good=2, num_test_defect_per_kind=1, defect_kinds=["scratch"])
    eval_root = make_synthetic_dataset(tmp_path / "eval", ["coins"], image_size=32, num_train=0, num_test_good=1, num_test_defect_per_kind=1, defect_kinds=["hole"], seed=1)
    output_dir = tmp_path / "run"
    argv = ["train", "--clip_model", str(tiny_clip_dir), "--train_data", str(train_root), "--eval_data", str(eval_root),
            "--batch_size", "2", "--max_steps", "2", "--output_dir", str(output_dir), "--report_to", "tensorboard", "--logging_steps", "1",
            "--data_format", "mvtec_ad"]
    assert main(argv) == 0

    event_files = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert event_files
    scalar_tags = set()
    for event_file in event_files:
        events = EventAccumulator(str(event_file))
        events.Reload()
        scalar_tags.update(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/fused_focal", "train/cross_view", "eval/pixel_auroc"} <= scalar_tags
    metrics = json.loads((output_dir / METRICS_FILE_NAME).read_text())
    assert metrics["num_eval_images"] == 2
    assert list(metrics["category_metrics"]) == ["coins", "mean"]
    loaded = CMIClipModel.from_pretrained(output_dir / "model")
    assert loaded.config.decision_threshold == pytest.approx(metrics["decision_threshold"])
