"""Frozen configuration of each stage; every field has a default and a one-line meaning.

Validation that needs only the config lives here (`TrainConfig.check`); checks that need the
data (batch size vs. training-set size, subset vs. dataset size) live in `data.py`/`training.py`
where the data is known. Every check raises `ConfigError` with one sentence a user can act on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DATA_DIR = str(Path.home() / ".cache" / "sample-importance")


class ConfigError(UserError, ValueError):
    """A parameter a user chose is invalid; the message says what to do."""


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "digits"  # digits | fashion-mnist | mnist | cifar10
    data_dir: str = DEFAULT_DATA_DIR  # where torchvision datasets are read (and downloaded to)
    subset: int = 0  # keep the first n training samples; 0 = all
    depth: int = 3  # hidden layers; 0 = logistic regression
    width: int = 512  # units per hidden layer
    lr: float = 0.1  # SGD step size eta (paper: 0.1)
    batch_size: int = 100  # samples per SGD step (paper: 100)
    epochs: int = 50  # passes over the training set (paper: 50)
    weight_decay: float = 1e-5  # L2 coefficient: the update adds weight_decay * theta to the gradient
    seed: int = 0  # fixes the initialisation and the per-epoch shuffle
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda

    def check(self) -> "TrainConfig":
        """Raise ConfigError for a value no data can make valid; return self."""
        if self.dataset not in DATASETS:
            raise ConfigError(f"Unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}.")
        if self.device not in DEVICES:
            raise ConfigError(f"Unknown device {self.device!r}: choose one of {', '.join(DEVICES)}.")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size}.")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}.")
        if self.subset < 0:
            raise ConfigError(f"subset must be 0 (all samples) or a positive count, got {self.subset}.")
        if self.depth < 0 or self.width < 1:
            raise ConfigError(f"depth must be >= 0 and width >= 1, got depth={self.depth}, width={self.width}.")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that determines the trained result (not where data is read from or
        which device runs it), used to find an existing run with the same configuration."""
        d = self.to_dict()
        d.pop("data_dir")
        d.pop("device")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """The comment of each field, for command-line help."""
        return dict(_FIELD_HELP)


# Help texts mirror the comments above; kept as data so the entry points can show them.
_FIELD_HELP = {
    "dataset": "digits | fashion-mnist | mnist | cifar10",
    "data_dir": "folder where torchvision datasets are read (and downloaded to)",
    "subset": "keep the first n training samples; 0 = all",
    "depth": "hidden layers; 0 = logistic regression",
    "width": "units per hidden layer",
    "lr": "SGD step size (paper: 0.1)",
    "batch_size": "samples per SGD step (paper: 100)",
    "epochs": "passes over the training set (paper: 50)",
    "weight_decay": "L2 coefficient added to the gradient as weight_decay * theta",
    "seed": "fixes the initialisation and the per-epoch shuffle",
    "device": "auto (CUDA if available) | cpu | cuda",
}
assert set(_FIELD_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
