"""Which failures of a Ray Train run are worth a retry: not a ddps error.

Ray Train's failure policy restarts the worker group after any worker error, up to ``max_failures`` times. A
ddps error (bad data, a missing or damaged file, a config the model cannot take, no GPU) is not a transient
fault: a restart fails the same way, three times over, each with its traceback. :class:`DDPSTorchTrainer` is
Ray's ``TorchTrainer`` whose controller gets :class:`NoRetryOnDDPSError` — the default policy for everything
else (a dead worker, a lost node, preemption), RAISE at once when any worker raised a ddps error.

Ray 2.60 takes a failure policy only through the controller's constructor arguments, which
``DataParallelTrainer._initialize_and_run_controller`` receives; this module is the one place that relies on
that (Ray is pinned in pyproject.toml).
"""
from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision, FailurePolicy
from ray.train.v2.api.exceptions import WorkerGroupError


class NoRetryOnDDPSError(FailurePolicy):
    """RAISE when a worker raised a ddps error; otherwise what ``inner`` (Ray's default policy) decides."""

    def __init__(self, inner: FailurePolicy):
        super().__init__(inner.failure_config)
        self.inner = inner

    def make_decision(self, training_failed_error) -> FailureDecision:
        from ddps.orchestration.ray_train import ddps_cause
        if isinstance(training_failed_error, WorkerGroupError) and any(
                ddps_cause(error) is not None for error in training_failed_error.worker_failures.values()):
            return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)


class DDPSTorchTrainer(TorchTrainer):
    """TorchTrainer whose failure policy does not retry ddps errors."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = NoRetryOnDDPSError(controller_init_kwargs["failure_policy"])
        return super()._initialize_and_run_controller(**controller_init_kwargs)
