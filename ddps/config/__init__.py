"""Configuration: typed sections, presets, layering, the flat dict and content hashes."""
from ddps.config.load import content_hash, from_flat, known_keys, parse_set, resolve, to_flat
from ddps.config.presets import PRESETS
from ddps.config.schema import (SECTIONS, BaseConfig, Config, DataConfig, DenoiserConfig, DiffusionConfig,
                               EvalConfig, InferConfig, TrainBaseConfig, TrainConfig)

__all__ = ["PRESETS", "SECTIONS", "BaseConfig", "Config", "DataConfig", "DenoiserConfig", "DiffusionConfig",
           "EvalConfig", "InferConfig", "TrainBaseConfig", "TrainConfig",
           "content_hash", "from_flat", "known_keys", "parse_set", "resolve", "to_flat"]
