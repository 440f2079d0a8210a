"""Config layering: dataclass defaults <- named preset <- experiment YAML's presets.<name> <- --set key=value.

The result is a frozen :class:`Config`; :func:`to_flat` turns it into the one flat dict that goes to Tune,
MLflow and the checkpoint. Unknown sections or keys, wrong types and out-of-range values raise a one-line
ConfigError naming the key and the valid choices.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ddps.config.presets import PRESETS
from ddps.config.schema import SECTIONS, Config
from ddps.errors import ConfigError, choices, reason


def _field_types(section: str) -> dict[str, Any]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def known_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _field_types(s)]


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check (and lightly coerce) one value against its field type."""
    def bad():
        return ConfigError(f"{key}={value!r} has the wrong type: expected {getattr(kind, '__name__', kind)}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '2e-3' (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise bad()
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} is not a finite number")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad()
    if typing.get_origin(kind) is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)):
            inner = typing.get_args(kind)[0]
            return tuple(_coerce(key, v, inner) for v in value)
        raise bad()
    raise AssertionError(f"unsupported field type {kind} for {key}")


def _split_key(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {key!r}; choose from: {choices(SECTIONS)}")
    if name not in _field_types(section):
        raise ConfigError(f"unknown config key {key!r}; valid keys of {section}: "
                          f"{', '.join(_field_types(section))}")
    return section, name


def flatten_nested(tree: Mapping, where: str) -> dict[str, Any]:
    """{section: {key: value}} (as in YAML) -> {"section.key": value}."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where} must be a mapping of sections, got {type(tree).__name__}")
    flat = {}
    for section, keys in tree.items():
        if not isinstance(keys, Mapping):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys, got {keys!r}")
        for name, value in keys.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """['section.key=value', ...] -> flat dict; values are parsed as YAML scalars or lists."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form section.key=value")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: cannot parse the value {text!r}") from None
    return out


EXPERIMENT_KEYS = ("name", "title", "include", "presets", "axes", "rows", "columns", "require")


def read_experiment_file(path: str | Path) -> dict[str, Any]:
    """An experiment YAML as a mapping; a missing, unreadable or non-mapping file, or one with a key no
    experiment file has (a misspelt ``presets:`` would drop every override), is a one-line ConfigError."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"experiment file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"experiment file {path} cannot be read: {reason(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"experiment file {path} is not valid YAML: {reason(e)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"experiment file {path} must hold a mapping")
    unknown = [k for k in doc if k not in EXPERIMENT_KEYS]
    if unknown:
        raise ConfigError(f"experiment file {path}: unknown key {unknown[0]!r}; an experiment file holds "
                          f"{', '.join(EXPERIMENT_KEYS)}")
    if not isinstance(doc.get("presets") or {}, dict):
        raise ConfigError(f"experiment file {path}: presets must map preset names to overrides, "
                          f"e.g. presets: {{cpu: {{train: {{lr: 0.001}}}}}}")
    return doc


def read_experiment(path: str | Path, preset: str, _seen: tuple = ()) -> dict[str, Any]:
    """The flat overrides of an experiment YAML's presets.<preset> (empty when it has none), after those of
    the file it names as ``include:`` (a path relative to it: what several experiment files share)."""
    path = Path(path)
    doc = read_experiment_file(path)
    flat: dict[str, Any] = {}
    if doc.get("include"):
        included = path.parent / str(doc["include"])
        if included.resolve() in _seen:
            raise ConfigError(f"{path}: include {doc['include']!r} includes itself")
        flat.update(read_experiment(included, preset, _seen + (path.resolve(),)))
    presets = doc.get("presets") or {}
    flat.update(flatten_nested(presets.get(preset) or {}, f"{path}: presets.{preset}"))
    return flat


def resolve(preset: str = "cpu", experiment: str | Path | None = None,
            overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """Resolve the layered config; ``overrides`` is a flat dict or a list of 'key=value' strings."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from: {choices(PRESETS)}")
    layers = [PRESETS[preset]]
    if experiment is not None:
        layers.append(read_experiment(experiment, preset))
    layers.append(dict(overrides) if isinstance(overrides, Mapping) else parse_set(overrides))
    flat: dict[str, Any] = {}
    for layer in layers:
        flat.update(layer)
    flat.pop("preset", None)
    return from_flat({"preset": preset, **flat})


def from_flat(flat: Mapping[str, Any]) -> Config:
    """A flat dict (possibly partial) -> Config, checking every key, type and range."""
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    for key, value in flat.items():
        if key == "preset":
            continue
        section, name = _split_key(key)
        values[section][name] = _coerce(key, value, _field_types(section)[name])
    sections = {s: SECTIONS[s](**kv) for s, kv in values.items()}
    return Config(preset=str(flat.get("preset", "cpu")), **sections)


def to_flat(cfg: Config) -> dict[str, Any]:
    """Config -> {"preset": ..., "section.key": value, ...}; tuples become lists."""
    flat: dict[str, Any] = {"preset": cfg.preset}
    for section in SECTIONS:
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            flat[f"{section}.{name}"] = list(value) if isinstance(value, tuple) else value
    return flat


# keys that change how a run is watched or scheduled on the machine, not what it computes
NOT_HASHED = frozenset({"train_base.log_every", "train_base.eval_every", "train_base.threads",
                        "train.log_every", "train.eval_every", "train.threads"})

# keys added after stores existed: hashed only when set to another value than this, so that the checkpoints
# and MLflow runs made before them keep their hashes (and are reused, not recomputed)
LATER_DEFAULTS = {"train_base.precision": "fp32", "train.precision": "fp32", "train.num_workers": 0,
                  "eval.precision": "fp32", "eval.split": "val",
                  # not a watching key as train.eval_every: the checkpoint's history of held-out checks (the
                  # curve a study reads) differs, so a stage trained without it is not reused for it
                  "train.check_reliance": False}


def content_hash(cfg: Config, sections: Iterable[str], inputs: Iterable[str] = (), exclude: Iterable[str] = ()) -> str:
    """sha256 of the canonical JSON of the given sections (less NOT_HASHED, ``exclude`` and LATER_DEFAULTS at
    their default) plus the hashes of a step's inputs."""
    flat = to_flat(cfg)
    skip = NOT_HASHED | set(exclude)
    chosen = {k: v for k, v in flat.items() if k.split(".")[0] in set(sections) and k not in skip
              and not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}
    payload = json.dumps({"config": chosen, "inputs": list(inputs)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
