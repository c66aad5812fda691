# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""Data sets for anomaly detection: loaders for MVTec AD, VisA and image folders, and defect synthesis."""
