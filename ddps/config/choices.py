"""The names a config may choose from, kept free of heavy imports so configs are checked at once.

The registries that build these (ddps.segmentors.ARCHITECTURES, ddps.data.DATASETS) are tested to match.
"""

DATASET_NAMES = ("fashion-scenes", "ade20k", "cityscapes", "folder")
BACKBONES = {
    "segformer": ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"),
    "deeplabv3plus": ("mobilenet_v2", "resnet18", "resnet50", "resnet101"),
    "mmseg-segformer": ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"),  # MMSeg's layout
}


def check_base_names(arch: str, backbone: str) -> None:
    """Raise a one-line ConfigError unless ``arch`` and its ``backbone`` are known."""
    from ddps.errors import ConfigError, choices
    if arch not in BACKBONES:
        raise ConfigError(f"unknown base architecture {arch!r}; choose from: {choices(BACKBONES)}")
    if backbone not in BACKBONES[arch]:
        raise ConfigError(f"unknown backbone {backbone!r} for {arch}; choose from: {', '.join(BACKBONES[arch])}")
