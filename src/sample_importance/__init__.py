"""sample-importance: per-sample, per-layer importance of training samples (Gao & Jojic), tracked with MLflow."""
from __future__ import annotations

__version__ = "0.1.0"

from .importance import ImportanceRecorder  # noqa: E402


def load_dynamics(run_id: str, allow_partial: bool = False):
    """The validated `dynamics/` artifacts of a `train` run (see `sample_importance.dynamics`)."""
    from .mlflow_io import load_dynamics as _load

    return _load(run_id, allow_partial=allow_partial)


def track_run(model, **kwargs):
    """A researcher's own loop as a tracked MLflow run writing `dynamics/` (see `tracked_run.track_run`)."""
    from .tracked_run import track_run as _track

    return _track(model, **kwargs)
