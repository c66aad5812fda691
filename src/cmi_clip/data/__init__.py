# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Data sets for anomaly detection: loaders for MVTec AD, VisA and image folders, and defect synthesis."""

from cmi_clip.data.loaders import (
    FEATURES,
    IMAGE_EXTENSIONS,
    LABEL_NAMES,
    load_dataset_auto,
    load_image_folder,
    load_mvtec_ad,
    load_visa,
    read_image,
    read_mask,
    to_rgb,
)
from cmi_clip.data.synthetic import (
    CATEGORY_SOURCES,
    DEFECT_KINDS,
    OnTheFlyDefectDataset,
    make_synthetic_dataset,
    sample_example,
    sample_normal_crop,
    synthesize_defect,
)

__all__ = [
    "CATEGORY_SOURCES",
    "DEFECT_KINDS",
    "FEATURES",
    "IMAGE_EXTENSIONS",
    "LABEL_NAMES",
    "OnTheFlyDefectDataset",
    "load_dataset_auto",
    "load_image_folder",
    "load_mvtec_ad",
    "load_visa",
    "make_synthetic_dataset",
    "read_image",
    "read_mask",
    "sample_example",
    "sample_normal_crop",
    "synthesize_defect",
    "to_rgb",
]
