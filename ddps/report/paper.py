"""Published numbers shown beside ours when a table's runs used the ``paper`` preset.

Only what a primary source states: the official repository's README (OpenGVLab/DDPS, commit 989e14ed,
"Semantic segmentation performance on ADE20K / Cityscapes") lists the +DDPS rows of Tables 1 and 2 —
#P(M), mIoU single / multi-scale, mBIoU. The base segmentors' rows and the ablation tables (3a–8) are not
in any source we could read, so they are not transcribed (no number here is typed from memory).
"""
from __future__ import annotations

SOURCE = "OpenGVLab/DDPS README (commit 989e14ed), +DDPS rows"
HEADER = ["Method", "Backbone", "#P(M)", "mIoU (ss/ms)", "mBIoU"]


def _rows(numbers: dict[str, tuple]) -> list[list[str]]:
    return [["+ DDPS (published)", name, f"{p:.1f}", f"{ss:.2f} / {ms:.2f}", f"{b:.2f}"]
            for name, (p, ss, ms, b) in numbers.items()]


# backbone label (experiments/table1.yaml, table2.yaml) -> (#P(M), mIoU ss, mIoU ms, mBIoU)
ADE20K = {
    "DeepLabV3+ MobileNetV2": (27.9, 38.07, 39.07, 23.47), "SegFormer MiT-B0": (15.1, 41.67, 41.95, 26.77),
    "DeepLabV3+ ResNet-50": (54.2, 45.26, 46.01, 30.39), "SegFormer MiT-B2": (65.5, 49.73, 49.96, 33.95),
    "DeepLabV3+ ResNet-101": (104.3, 46.32, 46.99, 31.82), "SegFormer MiT-B5": (122.8, 51.11, 51.71, 35.66),
}
CITYSCAPES = {
    "DeepLabV3+ MobileNetV2": (27.9, 78.11, 79.73, 61.14), "SegFormer MiT-B0": (15.1, 78.19, 79.62, 64.07),
    "DeepLabV3+ ResNet-50": (54.2, 81.39, 82.27, 65.76), "SegFormer MiT-B2": (65.5, 81.77, 82.22, 67.75),
    "DeepLabV3+ ResNet-101": (104.3, 81.68, 82.51, 65.96), "SegFormer MiT-B5": (122.8, 82.42, 82.94, 66.45),
}

PUBLISHED = {"table1": {"source": SOURCE, "header": HEADER, "rows": _rows(ADE20K)},
             "table2": {"source": SOURCE, "header": HEADER, "rows": _rows(CITYSCAPES)}}
