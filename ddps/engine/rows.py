"""The one-row result table that ``ddps eval`` prints (the paper's Table 1 layout)."""
from __future__ import annotations

ARCH_NAMES = {"segformer": "SegFormer", "mmseg-segformer": "SegFormer (MMSeg)", "deeplabv3plus": "DeepLabV3+"}
HEADER = "| Method | Backbone | #P(M) | mIoU (ss/ms) | mBIoU |\n|---|---|---|---|---|"


def backbone_name(backbone: str) -> str:
    if backbone.startswith("mit_"):
        return "MiT-" + backbone[4:].upper()
    return {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet-18", "resnet50": "ResNet-50",
            "resnet101": "ResNet-101"}.get(backbone, backbone)


def result_row(arch: str, backbone: str, params: int, miou_ss: float, miou_ms: float | None, mbiou: float) -> str:
    ms = "-" if miou_ms is None else f"{miou_ms:.2f}"
    return (f"| {ARCH_NAMES.get(arch, arch)} | {backbone_name(backbone)} | {params / 1e6:.2f} | "
            f"{miou_ss:.2f} / {ms} | {mbiou:.2f} |")
