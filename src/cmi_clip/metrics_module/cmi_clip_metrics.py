# Copyright 2026 The cmi_clip Authors. Licensed under the Apache License, Version 2.0.
"""`evaluate` metric for zero-shot anomaly detection: image and pixel AUROC, AP, F1-max and AUPRO.

Load it by the path of this file; nothing is fetched from the Hub. `evaluate.load` of the folder does
not work, because `evaluate` looks for a script named after the folder.

    >>> import evaluate
    >>> from cmi_clip.metrics import EVALUATE_METRIC_PATH
    >>> metric = evaluate.load(str(EVALUATE_METRIC_PATH))  # doctest: +SKIP
    >>> metric.compute(predictions=scores, references=labels, anomaly_maps=maps, masks=masks)  # doctest: +SKIP

The values are those of `cmi_clip.metrics.compute_metrics`, which this module calls.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from cmi_clip.metrics import compute_metrics

_CITATION = """\
@article{bergmann2021mvtec,
  title={The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Batzner, Kilian and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  journal={International Journal of Computer Vision},
  volume={129},
  number={4},
  pages={1038--1059},
  year={2021}
}
"""

_DESCRIPTION = """\
Image-level AUROC, average precision and F1-max of image anomaly scores, and pixel-level AUROC,
average precision, F1-max and AUPRO (area under the per-region-overlap curve up to a false-positive
rate of 0.3, normalised) of anomaly maps against ground-truth masks. All values are exact, with every
distinct score as a threshold, and lie in [0, 1]; an undefined value (for example image AUROC when
every image is normal) is NaN.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): Image anomaly scores, one per image; higher means more anomalous.
    references (`list` of `int`): Image labels, 0 for normal and 1 for anomalous.
    anomaly_maps (`list` of 2-D float arrays): Anomaly maps of shape (H, W), one per image. Maps at
        another resolution than the masks are upsampled to the mask size (bilinear).
    masks (`list` of 2-D arrays): Ground-truth masks of shape (H', W'); values > 0 are anomalous.
    fpr_limit (`float`, *optional*, defaults to 0.3): Upper false-positive-rate bound of AUPRO.

Returns:
    image_auroc, image_ap, image_f1_max, pixel_auroc, pixel_ap, pixel_f1_max, pixel_aupro (`float`).

Examples:
    >>> import numpy as np
    >>> metric = evaluate.load("path/to/cmi_clip_metrics.py")  # doctest: +SKIP
    >>> masks = np.zeros((2, 8, 8), dtype=np.uint8)
    >>> masks[1, 2:5, 2:5] = 1
    >>> results = metric.compute(predictions=[0.1, 0.9], references=[0, 1], anomaly_maps=masks.astype(float), masks=masks)  # doctest: +SKIP
    >>> results["pixel_aupro"]  # doctest: +SKIP
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CmiClipMetrics(evaluate.Metric):
    """Anomaly detection metrics of `cmi_clip.metrics.compute_metrics` as an `evaluate` metric.

    NOTE: `evaluate` stores every added map as an Arrow list of floats, which is slow for thousands of
    full-resolution maps. For large evaluations call `cmi_clip.metrics.compute_metrics` directly.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float64"),
                    "references": datasets.Value("int64"),
                    "anomaly_maps": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "masks": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
                }
            ),
            reference_urls=["https://doi.org/10.1007/s11263-020-01400-4"],
        )

    def _compute(self, predictions, references, anomaly_maps, masks, fpr_limit: float = 0.3) -> dict[str, float]:
        maps = np.stack([np.asarray(anomaly_map, dtype=np.float32) for anomaly_map in anomaly_maps])
        mask_array = np.stack([np.asarray(mask) > 0 for mask in masks])
        return compute_metrics(np.asarray(predictions), np.asarray(references), maps, mask_array, fpr_limit=fpr_limit)
