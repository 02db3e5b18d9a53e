"""The model registry: every architecture a run can train, one entry each, and the researcher's own.

`mlp`: the paper's `depth` hidden ReLU layers of `width` units and a linear output (layers L1..L{depth},
Out), Glorot-uniform weights and zero biases (paper section 3.1). `cnn`: two 3x3 convolutions (16 and
32 channels, padding 1), each followed by ReLU and 2x2 max-pooling, then a linear classifier (C1, C2,
Out). Both keep their weighted layers in `self.layers` and take flat samples (B, C*H*W).

Lee et al.'s architectures (`resnet20`, `vgg16`, `mobilenet`) take `norm` (group: GroupNorm, exact and
cheap for per-sample importance; batch: BatchNorm, as published) and `channels` (the first stage's
width; 0 = as published), work on every image shape of the datasets (1 or 3 channels, 8 to 32
pixels), and are initialised as their reference implementations do. Their importance is recorded per
stage (the first component of a layer's module path: stem, stage1, ..., head).

A researcher's model: `model=package.module:factory` imports `factory(image_shape, num_classes)`,
which returns an nn.Module taking images (B, C, H, W); its initialisation is drawn under the run's
seed. Adding a model to the registry is one `@register_model` function in this file.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LayeredModel(nn.Module):
    """What both models share: weighted layers in `self.layers` (in order)."""

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



class MLP(LayeredModel):
    def __init__(self, in_features: int, num_classes: int = 10, depth: int = 3, width: int = 512):
        super().__init__()
        sizes = [in_features] + [width] * depth + [num_classes]
        names = [f"L{k + 1}" for k in range(depth)] + ["Out"]
        self.layers = nn.ModuleDict({name: nn.Linear(a, b) for name, a, b in zip(names, sizes, sizes[1:])})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of flat samples (B, in)."""
        h = x
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers.values()):
            z = layer(h)
            h = torch.relu(z) if k < last else z
        return h


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of flat samples (B, C*H*W), seen as images (B, C, H, W)."""
        h = x.reshape(len(x), *self.image_shape)
        for name, layer in self.layers.items():
            if name == "Out":
                h = h.flatten(1)
            z = layer(h)
            h = z if name == "Out" else F.max_pool2d(torch.relu(z), 2)
        return h


def _norm(kind: str, channels: int) -> nn.Module:
    """GroupNorm (gcd(channels, 8) groups: per-sample exact and cheap) or BatchNorm, as chosen."""
    return nn.GroupNorm(math.gcd(channels, 8), channels) if kind == "group" else nn.BatchNorm2d(channels)


def _conv_init_fan_out(model: nn.Module) -> None:
    """torchvision's rule for VGG and MobileNet: Kaiming-normal (fan_out, ReLU) convolutions, zero
    biases, unit norm scales, N(0, 0.01) linear weights."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class _ImageNet(nn.Module):
    """What the convolutional registry models share: flat samples in, stages, average pool, `head`.
    Importance is recorded per stage (the first component of each layer's module path)."""

    importance_groups = 1

    def __init__(self, image_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = tuple(image_shape)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Every child but the head, in the order they were added; ReLU after the stem."""
        for name, child in self.named_children():
            if name != "head":
                x = child(x)
                x = torch.relu(x) if name == "stem" else x
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.reshape(len(x), *self.image_shape))  # (B, C', H', W')
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))  # (B, classes)


class _BasicBlock(nn.Module):
    """He et al.'s basic block; the CIFAR shortcut of option A (identity, subsampled, zero-padded channels)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.extra:
            short = F.pad(short, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return torch.relu(out + short)


class CifarResNet(_ImageNet):
    """He et al. 2016 (section 4.2): a 3x3 stem, three stages of `blocks` basic blocks (c, 2c, 4c
    channels, c = 16; ResNet-20 has 3 per stage, 6n + 2 layers in all), global average pooling, a
    linear head; Kaiming-normal weights as the reference CIFAR implementation
    (akamaster/pytorch_resnet_cifar10) draws them."""

    def __init__(self, image_shape, num_classes: int, blocks: int = 3, norm: str = "group", channels: int = 16):
        super().__init__(image_shape)
        c = channels
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(image_shape[0], c, 3, 1, 1, bias=False))
        self.stem.add_module("norm", _norm(norm, c))
        widths, cin = (c, 2 * c, 4 * c), c
        for k, cout in enumerate(widths):
            stage = [_BasicBlock(cin if j == 0 else cout, cout, 2 if (k and j == 0) else 1, norm) for j in range(blocks)]
            self.add_module(f"stage{k + 1}", nn.Sequential(*stage))
            cin = cout
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)


class VGG16(_ImageNet):
    """Simonyan & Zisserman's configuration D with normalisation after every convolution, as the
    CIFAR VGG-16 (c, c, M, 2c, 2c, M, 4c x3, M, 8c x3, M, 8c x3, M; c = 64) with one linear head.
    A 2x2 max-pool is left out once the feature map is 1 pixel (8- and 28-pixel images)."""

    def __init__(self, image_shape, num_classes: int, norm: str = "group", channels: int = 64):
        super().__init__(image_shape)
        c = channels
        plan = [(c, c), (2 * c, 2 * c), (4 * c,) * 3, (8 * c,) * 3, (8 * c,) * 3]
        cin, h, w = image_shape
        for k, widths in enumerate(plan):
            block = nn.Sequential()
            for cout in widths:
                block.append(nn.Conv2d(cin, cout, 3, padding=1))
                block.append(_norm(norm, cout))
                block.append(nn.ReLU())
                cin = cout
            if min(h, w) >= 2:
                block.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            self.add_module(f"block{k + 1}", block)
        self.head = nn.Linear(cin, num_classes)
        _conv_init_fan_out(self)


class _Separable(nn.Module):
    """A depthwise 3x3 convolution and a pointwise 1x1 convolution, each normalised and rectified."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.dw_norm = _norm(norm, cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.pw_norm = _norm(norm, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pw_norm(self.pw(torch.relu(self.dw_norm(self.dw(x))))))


class MobileNet(_ImageNet):
    """Howard et al. 2017's MobileNet (v1) for 32x32 inputs: a stride-1 3x3 stem of c channels (c = 32)
    and 13 depthwise-separable blocks (64, 128/2, 128, 256/2, 256, 512/2, 512 x5, 1024/2, 1024, scaled
    by c / 32), grouped into stages by resolution; torchvision's MobileNet initialisation."""

    PLAN = [[(64, 1)], [(128, 2), (128, 1)], [(256, 2), (256, 1)], [(512, 2)] + [(512, 1)] * 5, [(1024, 2), (1024, 1)]]

    def __init__(self, image_shape, num_classes: int, norm: str = "group", channels: int = 32):
        super().__init__(image_shape)
        scale = channels / 32
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(image_shape[0], channels, 3, 1, 1, bias=False))
        self.stem.add_module("norm", _norm(norm, channels))
        cin = channels
        for k, stage in enumerate(self.PLAN):
            blocks = []
            for width, stride in stage:
                cout = max(1, round(width * scale))
                blocks.append(_Separable(cin, cout, stride, norm))
                cin = cout
            self.add_module(f"stage{k + 1}", nn.Sequential(*blocks))
        self.head = nn.Linear(cin, num_classes)
        _conv_init_fan_out(self)


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture: how to build it, and what the options mean for it."""

    name: str
    build: Callable  # (image_shape (C, H, W), num_classes, options: TrainConfig) -> nn.Module (initialised)
    help: str
    norm: bool = False  # takes norm=group|batch and channels


REGISTRY: dict[str, ModelEntry] = {}
NORMS = ("group", "batch")


def register_model(name: str, help: str, norm: bool = False):
    """Decorator: register `build(image_shape, num_classes, options) -> nn.Module` as model `name`."""
    def add(build: Callable) -> Callable:
        REGISTRY[name] = ModelEntry(name, build, help, norm)
        return build
    return add


def is_factory(name: str) -> bool:
    """Whether `name` names a researcher's factory (package.module:function) rather than a registry entry."""
    return ":" in name


class ToImages:
    """Forward pre-hook giving a researcher's model images (B, C, H, W) for the flat samples the
    loop passes (a class, not a lambda, so a logged model can be pickled)."""

    def __init__(self, image_shape: tuple[int, ...]):
        self.image_shape = tuple(image_shape)

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        if x.dim() == 2:
            x = x.reshape(len(x), *self.image_shape)
        return (x, *args[1:])


def import_factory(spec: str) -> Callable:
    """The factory `package.module:function` names; ConfigError in one sentence when it cannot be imported."""
    import importlib

    from .errors import ConfigError

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model={spec!r}: write a factory as package.module:function.")
    store = _tracking_store_folder(module_name)
    if store is not None:
        raise ConfigError(f"model={spec!r}: {module_name} lies inside a tracking store's run folder ({store}); "
                          "code from a tracking store is never imported: put your factory in a module of your own.")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:  # as `python -m` would: also from the directory the command runs in
            if os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while the module runs
        raise ConfigError(f"model={spec!r}: cannot import {module_name} ({type(exc).__name__}: {exc}); check that "
                          "it is importable from this directory or installed.") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model={spec!r}: {module_name} has no function {attr!r}.")
    return factory


def _tracking_store_folder(module_name: str) -> Path | None:
    """The run folder of a tracking store that `module_name` would be imported from, found without
    importing anything, or None. A run's artifacts (`<store>/<experiment>/<run id>/artifacts/...`)
    are written by whoever can write to the store; a dotted name reaches them only through folders
    without `__init__.py` (namespace packages: a store never holds one above its artifacts), so
    the walk follows those folders on sys.path and the working directory and stops at the first
    regular package or module."""
    parts = module_name.split(".")
    roots = [Path(p or ".") for p in sys.path] + [Path.cwd()]
    for root in roots:
        folder = root
        for part in parts:
            folder = folder / part
            if not folder.is_dir():
                break  # a module, or nothing here
            if _is_run_folder(folder):
                return folder
            if (folder / "__init__.py").exists():
                break  # a regular package: its own code decides where the rest comes from
    return None


def _is_run_folder(folder: Path) -> bool:
    """Whether `folder` is an MLflow run's artifact folder or lies in one: `<run id>/artifacts` (a
    run id is 32 hexadecimal digits), or a file store's run folder (`meta.yaml` beside it)."""
    for f in (folder, *folder.parents):
        if f.name == "artifacts" and len(f.parent.name) == 32 and all(c in "0123456789abcdef" for c in f.parent.name):
            return True
    return (folder / "meta.yaml").is_file()


def model_of_run(cfg, data, named_model: str = "") -> nn.Module:
    """The initialised model of a finished run's configuration (`config.trained_config`), after
    `check_named`."""
    check_named(cfg, named_model)
    return model_for(cfg, data)


def check_named(cfg, named_model: str) -> None:
    """A run's files are data that anyone who can write to the tracking store may have written, so
    the code they name is never imported: a researcher's factory is rebuilt only when the caller
    names the same factory (`named_model`: the user's own model=... or argument)."""
    from .errors import ConfigError

    if is_factory(cfg.model) and cfg.model != named_model:
        raise ConfigError(f"The run was trained with the researcher's model {cfg.model!r}, and code named by a run's "
                          "files is never imported (anyone who can write to the tracking store can write them): if "
                          f"that factory is yours, name it yourself with model={cfg.model}.")


def _user_model(spec: str, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    from .errors import ConfigError

    try:
        model = import_factory(spec)(tuple(image_shape), num_classes)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"model={spec!r}: the factory failed for image_shape={tuple(image_shape)}, "
                          f"num_classes={num_classes} ({type(exc).__name__}: {exc}).") from None
    if not isinstance(model, nn.Module) or not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model={spec!r}: the factory must return an nn.Module with trainable parameters, got "
                          f"{type(model).__name__}.")
    training = model.training
    model.eval()  # a probe must not move BatchNorm's running statistics
    with torch.no_grad():
        probe = torch.zeros(2, *image_shape)
        try:
            out = model(probe)
        except Exception as exc:
            raise ConfigError(f"model={spec!r}: the model fails on images of shape (B, {', '.join(map(str, image_shape))}) "
                              f"({type(exc).__name__}: {exc}).") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        raise ConfigError(f"model={spec!r}: the model must return logits (B, {num_classes}) for images (B, "
                          f"{', '.join(map(str, image_shape))}), got {getattr(out, 'shape', type(out).__name__)}.")
    model.train(training)
    model.register_forward_pre_hook(ToImages(image_shape))
    return model


def build_model(in_features: int, num_classes: int, depth: int, width: int, seed: int, kind: str = "mlp",
                image_shape: tuple[int, ...] | None = None, options=None) -> nn.Module:
    """An initialised model; the same seed gives the same initial parameters on every device.
    `kind`: a registry name or package.module:factory; mlp uses depth and width, the convolutional
    models image_shape and `options` (a TrainConfig: norm, channels)."""
    shape = tuple(image_shape) if image_shape is not None else (1, 1, in_features)
    opts = SimpleNamespace(depth=depth, width=width, seed=seed, norm=getattr(options, "norm", "group"),
                           channels=getattr(options, "channels", 0))
    with torch.random.fork_rng(devices=[]):  # default initialisers draw from the global generator
        torch.manual_seed(seed)
        if is_factory(kind):
            return _user_model(kind, shape, num_classes)
        return REGISTRY[kind].build(shape, num_classes, opts)


def model_for(cfg, data) -> nn.Module:
    """The initialised model a training configuration (TrainConfig) asks for on `data` (Dataset)."""
    return build_model(data.x_train.shape[1], data.num_classes, cfg.depth, cfg.width, cfg.seed, cfg.model,
                       data.image_shape, cfg)


def importance_groups(model: nn.Module):
    """How the recorder sums its layers into the importance columns of `dynamics/` (ImportanceRecorder's
    `groups`): the paper's layers for mlp and cnn, the stages of registry models, a factory model's own
    `importance_groups` attribute if it has one, else every parameterised module alone."""
    if isinstance(model, LayeredModel):
        return {f"layers.{name}": name for name in model.layer_names}
    return getattr(model, "importance_groups", None)


def importance_columns(model: nn.Module) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """The importance columns of `model` (names in order), {module: column}, and parameters per column."""
    from .importance import ImportanceRecorder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a factory model's fallback layers: the training recorder warns
        with ImportanceRecorder(model, batchnorm="exact", groups=importance_groups(model)) as rec:
            grouping = rec.grouping
            counts = dict.fromkeys(rec.group_names, 0)
            for layer, column in grouping.items():
                counts[column] += sum(p.numel() for p in rec.layer_parameters(layer))
            return rec.group_names, grouping, counts


def expected_parameters(cfg, data) -> int:
    """Parameter count of the model `cfg` asks for (the MLP's computed without building it)."""
    if cfg.model != "mlp":  # built (a convolutional network is small next to its activations) and counted
        return sum(p.numel() for p in model_for(cfg, data).parameters())
    sizes = [data.x_train.shape[1]] + [cfg.width] * cfg.depth + [data.num_classes]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def check_model_size(cfg, data) -> None:
    """Refuse, before anything is allocated, a model whose parameters, gradients and activations
    cannot fit in this machine's memory."""
    from .errors import ConfigError

    count = expected_parameters(cfg, data)
    need = count * 4 * 4 + cfg.batch_size * cfg.width * max(cfg.depth, 1) * 4 * 4  # params, grads, update, momentum; activations
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > memory:
        raise ConfigError(f"model={cfg.model} with depth={cfg.depth} and width={cfg.width} has {count:,} parameters and "
                          f"needs about {need / 1e9:,.1f} GB to train, more than this machine's {memory / 1e9:,.1f} GB of "
                          "memory: choose a smaller width or depth.")


@register_model("mlp", "depth x width ReLU layers, Glorot-uniform (the paper's network; depth=0: logistic regression)")
def _mlp(image_shape, num_classes, o) -> nn.Module:
    model = MLP(math.prod(image_shape), num_classes, o.depth, o.width)
    model.reset_parameters(torch.Generator().manual_seed(o.seed))
    return model


@register_model("cnn", "two 3x3 conv + 2x2 max-pool layers of 16 and 32 channels, then linear; Glorot-uniform")
def _cnn(image_shape, num_classes, o) -> nn.Module:
    model = CNN(tuple(image_shape), num_classes)
    model.reset_parameters(torch.Generator().manual_seed(o.seed))
    return model


@register_model("resnet20", "He et al.'s CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels", norm=True)
def _resnet20(image_shape, num_classes, o) -> nn.Module:
    return CifarResNet(image_shape, num_classes, blocks=3, norm=o.norm, channels=o.channels or 16)


@register_model("vgg16", "the CIFAR VGG-16 with a norm after each of its 13 convolutions, one linear head", norm=True)
def _vgg16(image_shape, num_classes, o) -> nn.Module:
    return VGG16(image_shape, num_classes, o.norm, o.channels or 64)


@register_model("mobilenet", "MobileNet (v1) for 32x32 inputs: 13 depthwise-separable blocks", norm=True)
def _mobilenet(image_shape, num_classes, o) -> nn.Module:
    return MobileNet(image_shape, num_classes, o.norm, o.channels or 32)


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
