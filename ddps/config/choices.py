"""The names a config may choose from, kept free of heavy imports so configs are checked at once.

The registries that build these (ddps.segmentors.ARCHITECTURES, ddps.data.DATASETS) are tested to match.
"""

DATASET_NAMES = ("fashion-scenes", "ade20k", "cityscapes", "folder")
BACKBONES = {
    "segformer": ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"),
    "deeplabv3plus": ("mobilenet_v2", "resnet50", "resnet101"),
}
