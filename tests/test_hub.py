"""Tests of self-contained model folders, model cards and the Hub upload helper (no network)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from helpers import run_fresh_interpreter

import cmi_clip.hub as hub
from cmi_clip.hub import build_model_card, push_to_hub, save_for_pipeline, write_model_card
from cmi_clip.pipeline_anomaly_detection import CUSTOM_PIPELINE_ENTRY
from cmi_clip.processing_cmi_clip import preprocess_images

CODE_FILES = {
    "pipeline_anomaly_detection.py",
    "modeling_cmi_clip.py",
    "configuration_cmi_clip.py",
    "processing_cmi_clip.py",
    "prompt_bank.py",
    "losses.py",
}
METRICS = {
    "bottle": {"image_auroc": 0.91, "pixel_auroc": 0.81, "pixel_aupro": 0.61},
    "cable": {"image_auroc": 0.71, "pixel_auroc": 0.67, "pixel_aupro": 0.41},
}


@pytest.fixture(scope="module")
def saved_folder(tiny_model, tmp_path_factory):
    return save_for_pipeline(tiny_model, tmp_path_factory.mktemp("hub") / "model")


def test_folder_contents(saved_folder):
    names = {path.name for path in saved_folder.iterdir()}
    assert CODE_FILES <= names
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["custom_pipelines"] == {"anomaly-detection": CUSTOM_PIPELINE_ENTRY}
    assert config["auto_map"]["AutoModel"] == "modeling_cmi_clip.CMIClipModel"


def test_copied_pipeline_imports_only_copied_files(saved_folder):
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    relative = set(get_relative_imports(saved_folder / "pipeline_anomaly_detection.py"))
    assert {f"{name}.py" for name in relative} <= CODE_FILES
    third_party = set(get_imports(saved_folder / "pipeline_anomaly_detection.py")) - set(sys.stdlib_module_names)
    assert third_party <= {"transformers", "torch", "numpy", "PIL"}


def test_in_memory_config_unchanged(tiny_model, saved_folder):
    assert not hasattr(tiny_model.config, "custom_pipelines") or not tiny_model.config.custom_pipelines


def test_model_card_metadata(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_model.config, "clip_name_or_path", "openai/clip-vit-base-patch16")
    monkeypatch.setattr(tiny_model.config, "category_thresholds", {"screw": 0.61234, "bottle": 0.7})
    write_model_card(
        tiny_model,
        tmp_path,
        metrics=METRICS,
        training_data={"name": "VisA", "id": "someone/visa", "description": "all 12 categories"},
        eval_data={"name": "MVTec AD", "type": "mvtec_ad", "split": "test"},
        repo_id="someone/cmi-clip-test",
    )
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-segmentation"
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == "openai/clip-vit-base-patch16"
    assert data["datasets"] == ["someone/visa"]
    assert "anomaly-detection" in data["tags"]

    results = data["model-index"][0]["results"]
    assert data["model-index"][0]["name"] == "cmi-clip-test"
    by_config = {result["dataset"].get("config"): result for result in results}
    assert set(by_config) == {"bottle", "cable", None}
    bottle = {metric["type"]: metric["value"] for metric in by_config["bottle"]["metrics"]}
    assert bottle == {"image_auroc": 0.91, "pixel_auroc": 0.81, "pixel_aupro": 0.61}
    mean = {metric["type"]: metric["value"] for metric in by_config[None]["metrics"]}
    assert mean["image_auroc"] == pytest.approx(0.81)
    assert by_config["bottle"]["task"]["type"] == "anomaly-detection"
    assert by_config["bottle"]["dataset"]["type"] == "mvtec_ad"
    assert by_config["bottle"]["dataset"]["split"] == "test"

    text = card.text
    assert "## Limitations" in text
    assert "## Training data" in text
    assert "VisA" in text
    assert "openai/clip-vit-base-patch16" in text
    assert 'pipeline("anomaly-detection", model="someone/cmi-clip-test", trust_remote_code=True)' in text
    assert "| bottle | 91.0 |" in text
    assert "replace the decision threshold for these categories):** bottle 0.7000, screw 0.6123" in text
    assert "cmi-clip calibrate --model FOLDER --category NAME good_parts/" in text


def test_model_card_local_clip_path(tiny_model):
    card = build_model_card(tiny_model)
    data = card.data.to_dict()
    # A local folder is no Hub repository, so it is left out of base_model and named in the text only.
    assert os.path.isdir(tiny_model.config.clip_name_or_path)
    assert "base_model" not in data
    assert "model-index" not in data
    assert tiny_model.config.clip_name_or_path in card.text
    assert "No evaluation results" in card.text
    assert "replace the decision threshold for these categories):** none" in card.text


class RecordingHfApi:
    """Stand-in for `HfApi` that records calls and the uploaded files instead of contacting the Hub."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, **kwargs):
        RecordingHfApi.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(path.name for path in Path(kwargs["folder_path"]).iterdir())
        RecordingHfApi.calls.append(("upload_folder", {**kwargs, "files": files}))
        return "commit-info"


def test_push_to_hub_uploads_saved_folder(tiny_model, tmp_path, monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingHfApi)
    result = push_to_hub(tiny_model, "someone/cmi-clip-test", local_dir=tmp_path / "upload", metrics=METRICS, private=True)
    assert result == "commit-info"
    assert [name for name, _ in RecordingHfApi.calls] == ["create_repo", "upload_folder"]
    assert RecordingHfApi.calls[0][1] == {"repo_id": "someone/cmi-clip-test", "private": True, "exist_ok": True}
    upload = RecordingHfApi.calls[1][1]
    assert upload["repo_id"] == "someone/cmi-clip-test"
    assert Path(upload["folder_path"]) == tmp_path / "upload"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(upload["files"])
    assert CODE_FILES <= set(upload["files"])


FRESH_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["cmi_clip"] = None  # the package cannot be imported
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModel, pipeline

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    pixel_values = torch.load(sys.argv[2])
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, categories=["bottle"])
    detector = pipeline("anomaly-detection", model=folder, trust_remote_code=True, device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    result = detector(image, category="bottle")
    print("REPORT" + json.dumps({
        "model_module": type(model).__module__,
        "has_tokenizer": model.tokenizer is not None,
        "scores": outputs.image_scores.tolist(),
        "map_sum": float(outputs.anomaly_map.sum()),
        "pipeline_class": type(detector).__name__,
        "pipeline_score": result["score"],
    }))
    """
)


def test_saved_folder_loads_without_package(tiny_model, saved_folder, tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    pixel_values = preprocess_images([image], tiny_model.image_processor)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = tiny_model(pixel_values=pixel_values, categories=["bottle"])
    report = run_fresh_interpreter(FRESH_INTERPRETER_SCRIPT, [str(saved_folder), str(tmp_path / "pixels.pt")], tmp_path / "modules")
    assert report["model_module"].startswith("transformers_modules.")
    assert report["has_tokenizer"]
    assert report["scores"] == pytest.approx(expected.image_scores.tolist(), abs=1e-6)
    assert report["map_sum"] == pytest.approx(float(expected.anomaly_map.sum()), rel=1e-5)
    assert report["pipeline_class"] == "AnomalyDetectionPipeline"
    assert report["pipeline_score"] == pytest.approx(float(expected.image_scores[0]), abs=1e-6)
