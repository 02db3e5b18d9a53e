"""Factories a test names as model=tests.fixtures:<name> (the researcher's own model)."""
from __future__ import annotations

from torch import nn


def tiny_model(image_shape, num_classes):
    """A small convolutional network written as a researcher would: nested modules, images in."""
    c, h, w = image_shape
    return nn.Sequential(
        nn.Conv2d(c, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * h * w, num_classes),
    )


def not_a_model(image_shape, num_classes):
    return "a string"


def wrong_output(image_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(image_shape[0] * image_shape[1] * image_shape[2], num_classes + 1))
