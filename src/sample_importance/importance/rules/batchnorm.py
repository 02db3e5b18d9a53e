"""BatchNorm in evaluation mode (running statistics: a per-sample affine map); whether one couples
the samples of a batch (`batch_norm_couples`: training mode, which the recorder routes elsewhere).
"""
from __future__ import annotations


import torch
from torch import nn

from .base import Call, register_rule
from .norm import _channel_affine, _running_statistics, _squared


def batch_norm_couples(module: nn.Module) -> bool:
    """Whether a BatchNorm normalises with the statistics of the batch (training mode, or no
    running statistics): then every sample's loss depends on every other sample."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or not module.track_running_stats or module.running_mean is None)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm_grads(module: nn.modules.batchnorm._BatchNorm, call: Call) -> dict[str, torch.Tensor]:
    """Evaluation mode only (running statistics: a per-sample affine map); the recorder routes
    training-mode BatchNorm to its batched-VJP path or refuses it."""
    assert not batch_norm_couples(module)
    return _channel_affine(module, call.g, call.x, *_running_statistics(module))


batch_norm_grads.rule.sq_norms = _squared(batch_norm_grads)
