"""The evaluation record: what evaluating a base or a refiner on a split gives, typed.

One record serves every consumer: ``ddps eval`` prints it (a table row, or ``--json``), the pipeline and the
sweep's cells log it to MLflow (orchestration only logs it), and the held-out checks during training keep
its summary. Scores are percentages, as MMSegmentation prints them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ddps import names


@dataclass(frozen=True)
class Scores:
    """One prediction's scores over a split (SegMetrics): mIoU, aAcc, mBIoU and per-class IoU / BIoU."""
    mIoU: float
    aAcc: float
    mBIoU: float
    IoU: tuple[float, ...]
    BIoU: tuple[float, ...]

    @classmethod
    def from_metrics(cls, metrics: dict) -> "Scores":
        """From SegMetrics.compute()."""
        return cls(float(metrics["mIoU"]), float(metrics["aAcc"]), float(metrics["mBIoU"]),
                   tuple(map(float, metrics["IoU"])), tuple(map(float, metrics["BIoU"])))

    def to_json(self) -> dict:
        return {names.MIOU: self.mIoU, names.MBIOU: self.mBIoU, names.AACC: self.aAcc, "IoU": list(self.IoU)}


@dataclass(frozen=True)
class Reliance:
    """The mask-reliance diagnostic: last-step mIoU when the denoiser is fed (a) its own trajectory, (b) the
    ground truth re-noised at ``oracle_t`` (one call), (c) a fresh random mask at every step."""
    own: float
    oracle: float
    random: float
    oracle_t: int

    def to_json(self) -> dict:
        return {"own": self.own, "oracle": self.oracle, "random": self.random, "oracle_t": self.oracle_t}


@dataclass(frozen=True)
class Example:
    """One fixed image's refinement: the image (H, W, 3) uint8, its label (H, W), and class probabilities
    (K, H, W) of the base and after every step — what the strips and the probabilities file show."""
    index: int
    image: np.ndarray
    label: np.ndarray
    base_probs: np.ndarray
    step_probs: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Evaluation:
    """A refiner (or a UNet head) evaluated on a split: the base's own prediction, every refinement step
    (``times``: the t of each denoiser call), and what was asked for besides."""
    images: int
    base: Scores
    steps: tuple[Scores, ...]
    times: tuple[int, ...]
    reliance: Reliance | None = None
    multiscale: dict[str, Scores] | None = None   # {'base': ..., 'last': ...}: multi-scale + flip
    examples: tuple[Example, ...] = ()
    class_names: tuple[str, ...] = ()
    params: dict[str, int] = field(default_factory=dict)  # {'base': n, 'denoiser': n}

    @property
    def last(self) -> Scores:
        return self.steps[-1]

    def summary(self) -> dict:
        """The scores a table cell needs, in the stored spelling (MLflow tag ``ddps.summary``)."""
        out = {names.BASE_MIOU: self.base.mIoU, names.BASE_MBIOU: self.base.mBIoU,
               names.STEP1_MIOU: self.steps[0].mIoU, names.STEP1_MBIOU: self.steps[0].mBIoU,
               names.LAST_MIOU: self.last.mIoU, names.LAST_MBIOU: self.last.mBIoU, names.STEPS: len(self.steps)}
        if self.multiscale:
            out[names.BASE_MS_MIOU] = self.multiscale["base"].mIoU
            out[names.LAST_MS_MIOU] = self.multiscale["last"].mIoU
        if self.reliance:
            out.update({names.RELIANCE + k: v for k, v in self.reliance.to_json().items()})
        return out

    def checks(self) -> dict:
        """What a held-out check during training reports and keeps (names.CHECK_KEYS); with the reliance
        diagnostic also its three last-step mIoUs and the multi-step gain (names.CHECK_RELIANCE_KEYS)."""
        summary = self.summary()
        out = {k: summary[k] for k in names.CHECK_KEYS}
        if self.reliance:
            r = self.reliance
            out.update({names.RELIANCE_OWN: r.own, names.RELIANCE_ORACLE: r.oracle, names.RELIANCE_RANDOM: r.random,
                        names.MULTISTEP_GAIN: self.last.mIoU - self.steps[0].mIoU})
        return out

    def history(self) -> list[tuple[int, dict[str, float]]]:
        """The run's MLflow metrics by step: (0, the base's) then (k, step k's), each with the per-class IoU;
        the multi-scale scores at 0 and K; at 0 also the #P(M) and the reliance diagnostic."""
        out = []
        for k, scores in enumerate((self.base, *self.steps)):
            metrics = {names.MIOU: scores.mIoU, names.MBIOU: scores.mBIoU, names.AACC: scores.aAcc}
            metrics.update({names.CLASS_IOU + n: v for n, v in zip(self.class_names, scores.IoU)})
            if self.multiscale and k in (0, len(self.steps)):  # the base at 0, the last step at K
                ms = self.multiscale["base" if k == 0 else "last"]
                metrics.update({names.MS_MIOU: ms.mIoU, names.MS_MBIOU: ms.mBIoU})
            out.append((k, metrics))
        if self.params:  # the tables' #P(M)
            out[0][1].update({names.PARAMS_BASE: self.params["base"] / 1e6,
                              names.PARAMS_DENOISER: self.params["denoiser"] / 1e6})
        if self.reliance:
            r = self.reliance
            out[0][1].update({names.RELIANCE_OWN: r.own, names.RELIANCE_ORACLE: r.oracle,
                              names.RELIANCE_RANDOM: r.random})
        return out

    def to_json(self) -> dict:
        """``ddps eval --json``: {'kind', 'images', 'base', 'steps': [{'t', scores}], 'reliance'?, 'multiscale'?}."""
        out = {"kind": "refiner", "images": self.images, "base": self.base.to_json(),
               "steps": [{"t": t, **s.to_json()} for t, s in zip(self.times, self.steps)]}
        if self.reliance:
            out["reliance"] = self.reliance.to_json()
        if self.multiscale:
            out["multiscale"] = {k: v.to_json() for k, v in self.multiscale.items()}
        return out

