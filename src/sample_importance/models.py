"""The models: the paper's multilayer perceptron and a small convolutional network.

MLP: `depth` hidden ReLU layers of `width` units and a linear output; layers L1..L{depth}, Out, as in
the paper. CNN: two 3x3 convolutions (16 and 32 channels, padding 1), each followed by ReLU and 2x2
max-pooling, then a linear classifier; layers C1, C2, Out. Both keep their weighted layers in
`self.layers` (in order) and have `forward_tapped`, which also returns every layer's input and
pre-activation output: what the importance recorder needs. Both take flat samples (B, C*H*W).
"""
from __future__ import annotations

import abc
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LayeredModel(nn.Module, abc.ABC):
    """What both models share: weighted layers in `self.layers` (in order), `forward_tapped`."""

    layers: nn.ModuleDict

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers.keys())

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Glorot-uniform weights and zero biases (paper section 3.1), drawn from `generator`."""
        with torch.no_grad():
            for layer in self.layers.values():
                nn.init.xavier_uniform_(layer.weight, generator=generator)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tapped(x)[0]

    @abc.abstractmethod
    def forward_tapped(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits (B, classes) and, per layer in order, its (input, pre-activation output)."""


class MLP(LayeredModel):
    def __init__(self, in_features: int, num_classes: int = 10, depth: int = 3, width: int = 512):
        super().__init__()
        sizes = [in_features] + [width] * depth + [num_classes]
        names = [f"L{k + 1}" for k in range(depth)] + ["Out"]
        self.layers = nn.ModuleDict({name: nn.Linear(a, b) for name, a, b in zip(names, sizes, sizes[1:])})

    def forward_tapped(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits (B, classes) and, per layer, (input a (B, in), pre-activation z (B, out))."""
        taps = []
        h = x
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers.values()):
            z = layer(h)
            taps.append((h, z))
            h = torch.relu(z) if k < last else z
        return h, taps


class CNN(LayeredModel):
    def __init__(self, image_shape: tuple[int, int, int], num_classes: int = 10, channels: tuple[int, ...] = (16, 32)):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, w = self.image_shape
        layers = {}
        for k, out in enumerate(channels):
            layers[f"C{k + 1}"] = nn.Conv2d(c, out, kernel_size=3, padding=1)
            c, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"images of shape {image_shape} are too small for {len(channels)} poolings")
        layers["Out"] = nn.Linear(c * h * w, num_classes)
        self.layers = nn.ModuleDict(layers)

    def forward_tapped(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits (B, classes) and, per layer, (input, pre-activation): (B, C, H, W) for convolutions."""
        taps = []
        h = x.reshape(len(x), *self.image_shape)
        for name, layer in self.layers.items():
            if name == "Out":
                h = h.flatten(1)
            z = layer(h)
            taps.append((h, z))
            h = z if name == "Out" else F.max_pool2d(torch.relu(z), 2)
        return h, taps


def build_model(in_features: int, num_classes: int, depth: int, width: int, seed: int, kind: str = "mlp",
                image_shape: tuple[int, ...] | None = None) -> nn.Module:
    """An initialised model (Glorot-uniform weights, zero biases); the same seed gives the same
    initial parameters on every device. `kind` = mlp (depth, width) or cnn (image_shape)."""
    if kind == "cnn":
        model = CNN(tuple(image_shape), num_classes)
    else:
        model = MLP(in_features, num_classes, depth, width)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def model_for(cfg, data) -> nn.Module:
    """The initialised model a training configuration (TrainConfig) asks for on `data` (Dataset)."""
    return build_model(data.x_train.shape[1], data.num_classes, cfg.depth, cfg.width, cfg.seed, cfg.model,
                       data.image_shape)


def expected_parameters(cfg, data) -> int:
    """Parameter count of the model `cfg` asks for, computed without building it."""
    if cfg.model == "cnn":  # a small network of fixed widths: built (uninitialised) and counted
        return sum(p.numel() for p in CNN(tuple(data.image_shape), data.num_classes).parameters())
    sizes = [data.x_train.shape[1]] + [cfg.width] * cfg.depth + [data.num_classes]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def check_model_size(cfg, data) -> None:
    """Refuse, before anything is allocated, a model whose parameters, gradients and activations
    cannot fit in this machine's memory."""
    from .config import ConfigError

    count = expected_parameters(cfg, data)
    need = count * 4 * 3 + cfg.batch_size * cfg.width * max(cfg.depth, 1) * 4 * 4  # params, grads, update; activations
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > memory:
        raise ConfigError(f"model={cfg.model} with depth={cfg.depth} and width={cfg.width} has {count:,} parameters and "
                          f"needs about {need / 1e9:,.1f} GB to train, more than this machine's {memory / 1e9:,.1f} GB of "
                          "memory: choose a smaller width or depth.")


def parameter_counts(model: LayeredModel) -> dict[str, int]:
    """Number of parameters (weights and bias) of each named layer."""
    return {name: sum(p.numel() for p in layer.parameters()) for name, layer in model.layers.items()}


class ParameterProjection:
    """A fixed Gaussian random projection of the flattened parameters to `k` dimensions.

    Parameter trajectories (paper fig. 8) are compared through it without storing checkpoints: the
    same seed and architecture give the same projection in every run, so trajectories of different
    runs live in one space (Johnson-Lindenstrauss: distances are kept up to a small factor)."""

    def __init__(self, model: nn.Module, k: int = 32, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        # (numel, k) per parameter tensor, in the order of model.parameters(); N(0, 1/k) entries.
        self.blocks = [torch.randn(p.numel(), k, generator=gen) / k ** 0.5 for p in model.parameters()]
        self.k = k

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> np.ndarray:
        out = torch.zeros(self.k, dtype=torch.float64)
        for p, block in zip(model.parameters(), self.blocks):
            out += (p.detach().reshape(-1).cpu().float() @ block).double()
        return out.float().numpy()  # (k,)
