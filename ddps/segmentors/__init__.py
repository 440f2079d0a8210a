"""Base segmentors (stage 0 of DDPS): smp models seen as (logits, features) at 1/4 resolution."""
from ddps.segmentors.base import (ARCHITECTURES, BACKBONES, BaseSegmentor, SegmentorOutput, SegmentorSpec,
                                  apply_state, check_state, create_base, load_state)

__all__ = ["ARCHITECTURES", "BACKBONES", "BaseSegmentor", "SegmentorOutput", "SegmentorSpec", "apply_state",
           "check_state", "create_base", "load_state"]
