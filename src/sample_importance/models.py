"""The paper's multilayer perceptron: `depth` hidden ReLU layers of `width` units and a linear output.

Layers are named L1..L{depth} and Out, as in the paper. `forward_tapped` also returns, for every
layer, its input and its pre-activation output: what the importance recorder needs.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 10, depth: int = 3, width: int = 512):
        super().__init__()
        sizes = [in_features] + [width] * depth + [num_classes]
        names = [f"L{k + 1}" for k in range(depth)] + ["Out"]
        self.layers = nn.ModuleDict({name: nn.Linear(a, b) for name, a, b in zip(names, sizes, sizes[1:])})

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


def build_model(in_features: int, num_classes: int, depth: int, width: int, seed: int) -> MLP:
    """An initialised MLP; the same seed gives the same initial parameters on every device."""
    model = MLP(in_features, num_classes, depth, width)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model


def parameter_counts(model: MLP) -> dict[str, int]:
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
