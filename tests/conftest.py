"""Shared fixtures: a tiny CLIP with random weights and the real tokenizer, saved to a temporary folder."""

from __future__ import annotations

import pytest
import torch

from cmi_clip import CMIClipModel
from cmi_clip.clip_utils import save_random_clip, tiny_clip_config


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory):
    """Folder of a tiny CLIP (32 px input, patch 4, 4 vision layers) with random weights."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    return save_random_clip(folder, tiny_clip_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_clip_dir) -> CMIClipModel:
    """Untrained CMI-CLIP model around the tiny CLIP, in evaluation mode."""
    torch.manual_seed(0)
    return CMIClipModel.from_clip_pretrained(tiny_clip_dir).eval()


@pytest.fixture
def single_thread():
    """Run on one intra-op thread: tiny models are many times slower with threads competing for 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
