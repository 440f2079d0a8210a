"""Datasets: the embedded fashion-scenes benchmark, ADE20K, Cityscapes and a generic folder layout."""
from ddps.data.datasets import DATASETS, SegmentationDataset, build_dataset, selection_split

__all__ = ["DATASETS", "SegmentationDataset", "build_dataset", "selection_split"]
