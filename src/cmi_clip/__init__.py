# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""cmi_clip: zero-shot industrial anomaly detection and localization with CLIP.

Importing the package registers `CMIClipConfig` and `CMIClipModel` with transformers' `AutoConfig`
and `AutoModel`, and the `AnomalyDetectionPipeline` as the pipeline task "anomaly-detection".
"""

from transformers import AutoConfig, AutoModel

from .configuration_cmi_clip import CMIClipConfig
from .modeling_cmi_clip import CMIClipModel, CMIClipOutput, CMIClipPreTrainedModel
from .pipeline_anomaly_detection import AnomalyDetectionPipeline, register_pipeline
from .prompt_bank import PromptBank, load_prompts

__version__ = "0.1.0"

AutoConfig.register(CMIClipConfig.model_type, CMIClipConfig, exist_ok=True)
AutoModel.register(CMIClipConfig, CMIClipModel, exist_ok=True)
# Saved configs get an `auto_map`, and save_pretrained copies the code files, so a saved folder loads
# with `trust_remote_code=True` where this package is not installed.
CMIClipConfig.register_for_auto_class()
CMIClipModel.register_for_auto_class("AutoModel")
register_pipeline()

__all__ = [
    "AnomalyDetectionPipeline",
    "CMIClipConfig",
    "CMIClipModel",
    "CMIClipOutput",
    "CMIClipPreTrainedModel",
    "PromptBank",
    "load_prompts",
    "register_pipeline",
]
