"""Frozen configuration of each stage; every field has a default and a one-line meaning.

Validation that needs only the config lives here (`TrainConfig.check`); checks that need the
data (batch size vs. training-set size, subset vs. dataset size) live in `data.py`/`training.py`
where the data is known. Every check raises `ConfigError` with one sentence a user can act on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .analysis import ordering as ordering_methods
from .data import DATASETS
from .errors import ConfigError
DEVICES = ("auto", "cpu", "cuda")
TRACKS = ("importance", "outputs")
ATTRIBUTION_TARGETS = ("none", "test", "holdout")  # attribute_to: the target set V of in-run attribution
ATTRIBUTION_DETAILS = ("target_size", "target_every")  # what attribute_to=none leaves unused
NOT_RESULT = ("data_dir", "device", "parallel_models")  # how a result is computed, not what it is
def fingerprint_of(key: dict) -> str:
    """The one fingerprint function: a short hash of a JSON-able key (how finished runs are found)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(fields: dict) -> str:
    """Hash of the fields that determine a result (those in NOT_RESULT and later options at their
    defaults left out)."""
    idle = ATTRIBUTION_DETAILS if fields.get("attribute_to", "none") == "none" else ()  # no target: no size or schedule
    return fingerprint_of({k: v for k, v in fields.items() if k not in NOT_RESULT and k not in idle
                           and LATER_DEFAULTS.get(k, object()) != v})  # LATER_DEFAULTS: from the fields, below
DEFAULT_DATA_DIR = str(Path.home() / ".cache" / "sample-importance")
MAX_SEED = 2 ** 63 - 1  # seeds are 64-bit integers for torch's and numpy's generators
SEED_RANGE = "an integer between 0 and 2**63 - 1"
MAX_RUNS = 1000  # training runs one stage may ask for (seeds x methods x architectures)


SEEDS_HELP = "seeds (seed, seed+1, ...) trained when train_run_ids is empty"  # every stage that trains several


def opt(default, help: str, *, choices: tuple | None = None, ge=None, gt=None, le=None, lt=None,
        bounds: str | None = None, later: bool = False, per_model: bool = False):
    """A configuration field: its default, its one line of help (what the command line and the
    MLproject show) and the values it accepts (`choices`, or bounds ge/gt/le/lt), written once,
    beside the field; `check_fields` turns them into the one-sentence errors (`bounds`: how the
    error names the range, where words say it better than the numbers).

    A training option also says `later` (added after runs existed: at its default it is left out of
    the fingerprint, so the runs made before keep theirs; every new option says so) and `per_model`
    (models trained together in one loop may differ in it; the others they share)."""
    limits = {k: v for k, v in {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "bounds": bounds}.items()
              if v is not None}
    flags = {k: True for k, v in (("later", later), ("per_model", per_model)) if v}
    return dataclasses.field(default=default, metadata={"help": help, **limits, **flags})


def block(cls: type, help: str):
    """A field holding a block of options (a frozen `Options` dataclass): one parameter on the
    command line and in the MLproject, written as key=value pairs (`parse_block`)."""
    return dataclasses.field(default=cls(), metadata={"help": help, "block": cls})


def _bounds(m: dict) -> str:
    """'at least 1', 'positive', 'in [0, 1)' ... from a field's bounds."""
    low = ("ge", m["ge"]) if "ge" in m else ("gt", m["gt"]) if "gt" in m else None
    high = ("le", m["le"]) if "le" in m else ("lt", m["lt"]) if "lt" in m else None
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    if low:
        return f"at least {low[1]}" if low[0] == "ge" else "positive" if low[1] == 0 else f"greater than {low[1]}"
    return f"at most {high[1]}" if high[0] == "le" else f"below {high[1]}"


def _within(value, m: dict) -> bool:
    return (value >= m.get("ge", value) and value <= m.get("le", value)
            and ("gt" not in m or value > m["gt"]) and ("lt" not in m or value < m["lt"]))


def check_fields(options) -> None:
    """The one checker of field metadata: every number finite, every choice known, every bound kept
    (blocks checked with their own `check`); ConfigError in one sentence otherwise."""
    for f in dataclasses.fields(options):
        value, m = getattr(options, f.name), f.metadata
        if "block" in m:
            value.check()
            continue
        if isinstance(value, float) and not math.isfinite(value):  # nan and inf pass every comparison
            raise ConfigError(f"{f.name} must be a finite number, got {value}.")
        if "choices" in m and value not in m["choices"]:
            choices = ", ".join(map(str, m["choices"]))
            raise ConfigError(f"Unknown {f.name} {value!r}: choose one of {choices}." if isinstance(value, str)
                              else f"{f.name} must be one of {choices}, got {value}.")
        if not _within(value, m):
            raise ConfigError(f"{f.name} must be {m.get('bounds') or _bounds(m)}, got {value}.")


def _typed(kind: type, raw: str, name: str):
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}.") from None


def parse_block(cls: type, text: str, name: str):
    """Options of `cls` from `text`, written as key=value pairs separated by spaces (shell quoting for
    values with spaces), e.g. "epochs=10 lr=0.05"; fields left out keep their defaults."""
    kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}
    try:
        parts = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{name} cannot be read ({exc}): write it as key=value pairs separated by spaces.") from None
    values = {}
    for part in parts:
        key, sep, raw = part.partition("=")
        if not sep or key not in kinds:
            raise ConfigError(f"{name}: {part!r} is not one of its options as key=value; its options are "
                              f"{', '.join(kinds)}.")
        values[key] = _typed(kinds[key], raw, key)
    return cls(**values)


def block_text(options) -> str:
    """The inverse of parse_block: the fields that differ from their defaults, as key=value pairs."""
    return " ".join(shlex.quote(f"{f.name}={getattr(options, f.name)}") for f in dataclasses.fields(options)
                    if getattr(options, f.name) != f.default)


@dataclass(frozen=True)
class Options:
    """Base of every configuration: fields made with `opt` (and `block`), checked by `check_fields`.
    A block may be given as its key=value text."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "block" in f.metadata and isinstance(getattr(self, f.name), str):
                object.__setattr__(self, f.name, parse_block(f.metadata["block"], getattr(self, f.name), f.name))

    def check(self):
        """Raise ConfigError for a value no data can make valid; return self."""
        check_fields(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def params(self) -> dict:
        """The MLproject parameters of this configuration (a block as its key=value text)."""
        return {f.name: block_text(v) if "block" in f.metadata else v
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    def flat(self, skip: tuple = ()) -> dict:
        """Every option by name, the blocks' options in place of the blocks (those in `skip` left out)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                value = getattr(self, f.name)
                out.update(value.flat() if "block" in f.metadata else {f.name: value})
        return out

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """One line of help per field, for the command line and the docs (a block's with its options)."""
        def text(f) -> str:
            if "block" not in f.metadata:
                return f.metadata["help"]
            inner = dataclasses.fields(f.metadata["block"])
            return (f.metadata["help"] + ", as key=value pairs (empty = the defaults): "
                    + "; ".join(f"{d.name}={d.default!r} ({d.metadata['help']})" for d in inner))
        return {f.name: text(f) for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class TrainConfig(Options):
    dataset: str = opt("digits", " | ".join(f"{name} ({text})" for name, text in DATASETS.items()), choices=tuple(DATASETS))
    data_dir: str = opt(DEFAULT_DATA_DIR, 'folder where torchvision datasets are read (and downloaded to)', per_model=True)
    subset: int = opt(0, 'keep the first n training samples; 0 = all', ge=0)
    model: str = opt("mlp", "mlp (depth x width ReLU layers) | cnn (two 3x3 conv + 2x2 max-pool layers of 16 and 32 channels, then linear) | resnet20 | vgg16 | mobilenet (Lee et al.'s architectures) | package.module:factory (your own: factory(image_shape, num_classes) -> nn.Module)", later=True)
    depth: int = opt(3, 'hidden layers; 0 = logistic regression', ge=0)
    width: int = opt(512, 'units per hidden layer', ge=1)
    lr: float = opt(0.1, 'SGD step size (paper: 0.1)', gt=0, per_model=True)
    batch_size: int = opt(100, 'samples per SGD step (paper: 100)', ge=1, bounds="a positive integer")
    epochs: int = opt(50, 'passes over the training set (paper: 50)', ge=1)
    weight_decay: float = opt(1e-5, 'L2 coefficient added to the gradient as weight_decay * theta', ge=0, per_model=True)
    seed: int = opt(0, 'fixes the initialisation and the per-epoch shuffle', ge=0, le=MAX_SEED, bounds=SEED_RANGE, per_model=True)
    label_noise: float = opt(0.0, 'fraction of training labels flipped to another class, drawn with seed (label-noise experiment)', ge=0, lt=1, later=True, per_model=True)
    device: str = opt("auto", 'auto (CUDA if available) | cpu | cuda', choices=DEVICES)
    parallel_models: int = opt(0, 'models a multi-run stage (stability, learnability, ordering, sweep seeds) trains in one loop: 0 = auto (all; batched on a GPU), 1 = each alone, k = k at once, batched (MLPs)', ge=0, per_model=True)
    eval_train: int = opt(1, '1 = after every epoch, evaluate every training sample under the end-of-epoch parameters (loss, p_true, correct, EL2N; what learnability, cartography and EL2N use); 0 = off', choices=(0, 1), per_model=True)
    early_epoch: int = opt(2, '1-based epoch after which per-sample gradient norms are recorded at the end-of-epoch parameters (GraNd), and at which EL2N and GraNd are read (Paul et al.: early in training)', ge=1, per_model=True)
    norm: str = opt("group", 'resnet20, vgg16, mobilenet: group (GroupNorm: exact and cheap per-sample importance) | batch (BatchNorm, as published; needs batchnorm=exact or track=outputs)', later=True)
    channels: int = opt(0, 'resnet20, vgg16, mobilenet: channels of the first stage (later stages scale with it); 0 = as published (16, 64, 32)', ge=0, later=True)
    track: str = opt("importance", 'importance (per-sample importance and every other statistic) | outputs (per-sample loss, p_true, correctness, EL2N only: what learnability needs, at the cost of plain training)', choices=TRACKS, later=True)
    batchnorm: str = opt("refuse", 'BatchNorm in training mode with track=importance: refuse | exact (exact per-sample gradients by batched vector-Jacobian products, several times slower)', later=True, per_model=True)
    momentum: float = opt(0.0, "SGD momentum (the paper: 0; Lee et al.'s models are trained with 0.9); importance is then the step's exact phi_i", ge=0, lt=1, later=True, per_model=True)
    nesterov: int = opt(0, '1 = Nesterov momentum (needs momentum > 0)', choices=(0, 1), later=True, per_model=True)
    attribute_to: str = opt("none", "in-run attribution (dynamics/contribution.npy): none | test (the first target_size test samples) | holdout (the last target_size training samples, held out of training)", choices=ATTRIBUTION_TARGETS, later=True)
    target_size: int = opt(1000, 'samples in the target set of attribute_to (test: at most the test split)', ge=1, later=True)
    target_every: int = opt(1, 'recompute the target gradient every this many steps (1 = every step: exact first order; k > 1: the steps between use the last one)', ge=1, later=True)

    def check(self) -> "TrainConfig":
        """Raise ConfigError for a value no data can make valid; return self."""
        super().check()  # every field's range
        self._check_model()
        if self.nesterov and not self.momentum:
            raise ConfigError("nesterov=1 needs momentum > 0: set a momentum or nesterov=0.")
        if self.attribute_to != "none" and self.track != "importance":
            raise ConfigError("attribute_to needs track=importance (the contribution is read from the same step as "
                              "importance): set track=importance or attribute_to=none.")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("device=cuda was requested but no CUDA device is available: use device=auto or cpu.")
        return self

    def _check_model(self) -> None:
        from .importance.recorder import BATCHNORM_CHOICES
        from .models import NORMS, REGISTRY, import_factory, is_factory

        if is_factory(self.model):
            import_factory(self.model)
        elif self.model not in REGISTRY:
            raise ConfigError(f"Unknown model {self.model!r}: choose one of {', '.join(REGISTRY)}, or name your own "
                              "factory as package.module:function.")
        normed = is_factory(self.model) or REGISTRY[self.model].norm
        if self.norm not in NORMS:
            raise ConfigError(f"Unknown norm {self.norm!r}: choose {' or '.join(NORMS)}.")
        if not normed and (self.norm != "group" or self.channels):
            raise ConfigError(f"norm and channels apply to {', '.join(n for n, e in REGISTRY.items() if e.norm)}, not "
                              f"model={self.model}: leave them at their defaults.")
        if self.batchnorm not in BATCHNORM_CHOICES:
            raise ConfigError(f"Unknown batchnorm {self.batchnorm!r}: choose {' or '.join(BATCHNORM_CHOICES)}.")
        if self.norm == "batch" and self.track == "importance" and self.batchnorm == "refuse":
            raise ConfigError("norm=batch couples the samples of a batch, so per-sample importance needs "
                              "batchnorm=exact (exact, several times slower); or use norm=group, or track=outputs "
                              "(learnability's statistics at the cost of plain training).")

    def train_config(self) -> "TrainConfig":
        """The training fields alone (for configs of later stages, which extend this one)."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def fingerprint(self) -> str:
        """Hash of everything that determines the trained result (not where data is read from or
        which device runs it, or with how many others), used to find an existing run with the same
        configuration."""
        return _fingerprint(self.to_dict())


# Options added after runs existed: at these values a configuration keeps its older fingerprint.
LATER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.metadata.get("later")}
# What models trained together in one loop share: every training option but the per-model ones.
SHARED_IN_LOOP = tuple(f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("per_model"))

ORDERINGS = ordering_methods.METHODS


@dataclass(frozen=True)
class TrainRunConfig(TrainConfig):
    """The `train` entry point: training plus the presentation order (paper section 3.6)."""

    ordering: str = opt("shuffle", 'shuffle | rand | nlo | rnlo | nlm | sio | rsio | sim (paper section 3.6)', choices=ORDERINGS)
    reference_run_id: str = opt("", 'train run whose final NLL and total importance order the batches')
    resume_run_id: str = opt("", 'continue this interrupted train run; empty = resume one with the same configuration if any')

    def check(self) -> "TrainRunConfig":
        super().check()
        if self.ordering in ordering_methods.NEEDS_REFERENCE and not self.reference_run_id:
            raise ConfigError(f"ordering={self.ordering} sorts samples by a reference run's scores: pass "
                              "reference_run_id (the id of a finished train run on the same data).")
        return self

    def fingerprint(self) -> str:
        # The default order adds nothing, so a plain shuffled run has the fingerprint of its TrainConfig.
        if self.ordering == "shuffle" and not self.reference_run_id:
            return self.train_config().fingerprint()
        return _fingerprint({k: v for k, v in self.to_dict().items() if k != "resume_run_id"})


def _ids(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def trained_config(metadata: dict, **overrides) -> TrainConfig:
    """The TrainConfig a run was trained with (its metadata.json `config`), each field checked for
    its type (a run's files are input like any other: a tracking store can hold anything), with
    `overrides` (where this machine reads data, which device). Raises DynamicsError in one sentence.

    It names the run's model, which may be a researcher's factory: rebuild it with
    `models.model_of_run`, which imports a factory only when the user named it."""
    from .dynamics import DynamicsError

    run = metadata.get("run_id", "?") if isinstance(metadata, dict) else "?"
    config = metadata.get("config") if isinstance(metadata, dict) else None
    if not isinstance(config, dict):
        raise DynamicsError(f"Run {run}: its metadata.json has no training configuration (config): re-run the "
                            "training run.")
    fields = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    for key, value in config.items():
        want = fields.get(key)
        if want is None or isinstance(value, bool) or not (isinstance(value, want) or want is float and type(value) is int):
            what = "is not a training option" if want is None else \
                f"is {type(value).__name__}, not {want.__name__}"
            raise DynamicsError(f"Run {run}: its metadata.json is damaged: config.{str(key)[:60]!r} {what}; re-run "
                                "the training run.")
    return TrainConfig(**{**config, **overrides})


def check_seed(seed: int, name: str = "seed") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{name} must be {SEED_RANGE}, got {seed}.")


def check_run_count(count: int, what: str) -> None:
    """Refuse a stage that would ask for more training runs than anyone means to (a typo such as
    num_seeds=100000 would otherwise spend hours in store queries before training anything)."""
    if count > MAX_RUNS:
        raise ConfigError(f"{what} asks for {count:,} training runs, more than the limit of {MAX_RUNS:,}: "
                          "lower the count, or split the study into several calls.")


def check_items(items: list[str], known, what: str, where: str = "", more: str = "", pattern: str = "") -> None:
    """A comma-separated list: at least one item, each a known one (or starting with `pattern`)."""
    unknown = [item for item in items if item not in known and not (pattern and item.startswith(pattern))]
    if unknown or not items:
        raise ConfigError(f"Unknown {what} {', '.join(unknown) or '(none given)'}{where}: choose from "
                          f"{', '.join(known)}{more}.")


def check_unique(items: list, name: str) -> None:
    repeated = sorted({str(v) for v in items if items.count(v) > 1})
    if repeated:
        raise ConfigError(f"{name} repeats {', '.join(repeated)}: give each only once.")


@dataclass(frozen=True)
class SharedRunsConfig(Options):
    """A multi-run stage whose runs several workers may share (`workers.share`): how, not what, so
    outside every fingerprint."""

    storage: str = opt("", 'share the runs among workers: an Optuna storage every worker of the same command names (a journal .log path on one machine, a database URL across machines); empty = this process trains them all')
    heartbeat: int = opt(60, 'seconds between a worker\'s heartbeats on database storages; a claim whose worker is silent for twice that is taken over', ge=1)


SHARED_RUNS_FIELDS = tuple(f.name for f in dataclasses.fields(SharedRunsConfig))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class RunsConfig(Options):
    """A stage that reads train runs: the ones named in train_run_ids, or those its training
    configuration (`train_config()`) finds or trains."""

    train_run_ids: str = opt("", 'comma-separated train run ids to analyse; empty = find or train runs of the training configuration')
    SINGLE_RUN: ClassVar[bool] = False  # the stage reads one train run

    def run_ids(self) -> list[str]:
        return _ids(self.train_run_ids)

    def check(self):
        super().check()
        check_unique(self.run_ids(), "train_run_ids")
        if self.SINGLE_RUN and len(self.run_ids()) > 1:
            raise ConfigError(f"{self.stage_name()} reads one train run: pass a single id in train_run_ids.")
        return self

    @classmethod
    def stage_name(cls) -> str:
        return cls.__name__.removesuffix("Config").lower()

    def fingerprint(self) -> str:
        """Identifies the stage's result: its own options and either the runs it reads or the
        fingerprint of the training configuration they are found by."""
        own = {k: v for k, v in self.flat(skip=("train", "train_run_ids", *SHARED_RUNS_FIELDS)).items()
               if k not in TRAIN_FIELDS}
        return fingerprint_of({"class": type(self).__name__, **own,
                               "runs": self.run_ids() or self.train_config().fingerprint()})


@dataclass(frozen=True)
class AnalysisConfig(RunsConfig):
    """An analysis: its own options and the runs it reads, named by id or by one training
    configuration (the `train` block: what the `train` entry point would be given)."""

    train: TrainConfig = block(TrainConfig, 'the training configuration, with the train entry point\'s parameters (e.g. "epochs=10 lr=0.05"): the run found or trained when train_run_ids is empty; its data_dir and device apply either way')

    def train_config(self) -> TrainConfig:
        return self.train


@dataclass(frozen=True)
class TrainingRunsConfig(RunsConfig, TrainConfig):
    """A stage that trains several runs (seeds, architectures, subsets) or reads the given ones: the
    training options in full, as the `train` entry point takes them."""


@dataclass(frozen=True)
class StabilityConfig(SharedRunsConfig, TrainingRunsConfig):
    num_seeds: int = opt(3, SEEDS_HELP)
    every: int = opt(5, 'compare importance every this many epochs (paper: 5)', ge=1)

    def check(self) -> "StabilityConfig":
        super().check()
        if not self.run_ids() and self.num_seeds < 2:
            raise ConfigError(f"num_seeds must be at least 2 to compare initialisations, got {self.num_seeds}.")
        check_run_count(self.num_seeds, f"num_seeds={self.num_seeds}")
        if self.run_ids() and len(self.run_ids()) < 2:
            raise ConfigError("stability needs at least two train_run_ids (comma-separated) to compare.")
        return self


@dataclass(frozen=True)
class DecomposeConfig(AnalysisConfig):
    SINGLE_RUN: ClassVar[bool] = True


@dataclass(frozen=True)
class NllConfig(AnalysisConfig):
    SINGLE_RUN: ClassVar[bool] = True


CLUSTER_HELP = {"label": "class whose samples are clustered (paper: 5 on MNIST)",
                "num_clusters": "k of k-means (paper: 20 on MNIST, 30 on CIFAR-10); at least 3 (easy, middle, hard)"}


@dataclass(frozen=True)
class ClusterConfig(AnalysisConfig):
    SINGLE_RUN: ClassVar[bool] = True
    label: int = opt(5, CLUSTER_HELP["label"], ge=0, le=9, bounds="a class between 0 and 9")
    num_clusters: int = opt(20, CLUSTER_HELP["num_clusters"], ge=3)
    feature_scale: str = opt("log", 'log | raw: cluster log10(beta) profiles or raw beta', choices=("log", "raw"))


@dataclass(frozen=True)
class StudyConfig(TrainConfig):
    """`main`: the whole study on one dataset."""

    num_seeds: int = opt(3, "stability: " + SEEDS_HELP, ge=2)
    every: int = opt(5, "stability: compare importance every this many epochs (paper: 5)", ge=1)
    label: int = opt(5, "cluster: " + CLUSTER_HELP["label"], ge=0, le=9, bounds="a class between 0 and 9")
    num_clusters: int = opt(20, "cluster: " + CLUSTER_HELP["num_clusters"], ge=3)


@dataclass(frozen=True)
class OrderingConfig(SharedRunsConfig, TrainConfig):
    """`ordering`: every batch construction of paper section 3.6, over several initialisations."""

    reference_run_id: str = opt("", 'train run whose final NLL and total importance order the batches')
    methods: str = opt(",".join(ORDERINGS), 'comma-separated batch constructions: shuffle, rand, nlo, rnlo, nlm, sio, rsio, sim')
    num_seeds: int = opt(5, SEEDS_HELP, ge=1)

    def method_list(self) -> list[str]:
        return _ids(self.methods)

    def check(self) -> "OrderingConfig":
        super().check()
        check_items(self.method_list(), ORDERINGS, "ordering method(s)")
        check_unique(self.method_list(), "methods")
        check_run_count(self.num_seeds * len(self.method_list()), f"{len(self.method_list())} methods x num_seeds={self.num_seeds}")
        return self

    def fingerprint(self) -> str:
        return fingerprint_of({"class": "OrderingConfig", "train": self.train_config().fingerprint(),
                               "reference": self.reference_run_id, "methods": self.method_list(),
                               "num_seeds": self.num_seeds})


SWEEP_METRICS = {"final_test_error": "test_error", "final_test_loss": "test_loss", "final_train_loss": "train_loss"}


@dataclass(frozen=True)
class SweepConfig(TrainConfig):
    """`sweep`: Optuna search over the learning rate, each trial repeated over seeds."""

    n_trials: int = opt(10, 'trials this invocation (worker) adds to the study; 0 = as many as fit in timeout (which must then be set)', ge=0)
    timeout: float = opt(0.0, 'stop starting trials after this many seconds; 0 = no limit', ge=0)
    lr_min: float = opt(0.01, 'lower bound of the log-uniform learning-rate range', gt=0)
    lr_max: float = opt(0.5, 'upper bound of the log-uniform learning-rate range', gt=0)
    seeds: str = opt("2", 'seeds per trial: a count n (seed..seed+n-1) or a comma-separated list')
    metric: str = opt("final_test_error", 'minimised: final_test_error | final_test_loss | final_train_loss', choices=tuple(SWEEP_METRICS))
    study_name: str = opt("", 'Optuna study name; empty = sweep-<dataset>')
    storage: str = opt("", 'Optuna storage: empty = optuna-journal.log beside the tracking store (mlflow.db); a journal .log path (relative: from there); or a database URL')
    sampler_seed: int = opt(0, 'seed of the TPE sampler', ge=0, le=MAX_SEED, bounds=SEED_RANGE)
    pruner: str = opt("median", 'median | none', choices=("median", "none"))
    reference_lr: float = opt(0.1, "learning rate each trial's importance ranking is compared with (paper: 0.1)")
    heartbeat: int = opt(60, 'seconds between trial heartbeats on database storages; stale trials fail after twice that', ge=1)

    def seed_list(self) -> list[int]:
        parts = _ids(self.seeds)
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"seeds must be a count or a comma-separated list of integers, got {self.seeds!r}.") from None
        if len(values) == 1:
            if values[0] < 1:
                raise ConfigError(f"seeds must be at least 1, got {values[0]}.")
            check_run_count(values[0], f"seeds={values[0]}")
            values = list(range(self.seed, self.seed + values[0]))
        check_unique(values, "seeds")
        for v in values:
            check_seed(v, "every seed in seeds")
        return values

    def name(self) -> str:
        return self.study_name or f"sweep-{self.dataset}"

    def check(self) -> "SweepConfig":
        super().check()
        if self.lr_min >= self.lr_max:
            raise ConfigError(f"lr_min ({self.lr_min}) must be smaller than lr_max ({self.lr_max}).")
        if self.n_trials == 0 and self.timeout == 0:
            raise ConfigError("n_trials=0 with no timeout would run trials without end: give a number of trials, "
                              "or a timeout in seconds (n_trials=0 then means: until the timeout).")
        check_run_count(self.n_trials, f"n_trials={self.n_trials}")
        self.seed_list()
        return self


def check_early_epoch(train: TrainConfig) -> None:
    """EL2N and GraNd are read at early_epoch, which must lie within the training."""
    if not train.early_epoch <= train.epochs:
        raise ConfigError(f"early_epoch must be between 1 and epochs={train.epochs}, got {train.early_epoch}.")


@dataclass(frozen=True)
class ScoresConfig(AnalysisConfig):
    """`scores`: every per-sample difficulty score of a train run, side by side (with several
    train_run_ids, the first is scored and EL2N and GraNd are averaged over all, as Paul et al. do)."""

    def check(self) -> "ScoresConfig":
        super().check()
        check_early_epoch(self.train)
        return self


@dataclass(frozen=True)
class PruneConfig(TrainingRunsConfig):
    """`prune`: train on the fraction of samples each score keeps; test error against the fraction."""

    keep_fractions: str = opt("0.1,0.3,0.5,0.7,0.9", 'prune: comma-separated fractions of the training set kept')
    prune_scores: str = opt("total_importance,el2n,grand,forgetting,final_nll,variability", 'prune: comma-separated scores that choose the kept samples (columns of scores.csv)')
    num_seeds: int = opt(1, SEEDS_HELP, ge=1)

    def fraction_list(self) -> list[float]:
        return parse_floats(self.keep_fractions, "keep_fractions")

    def score_list(self) -> list[str]:
        return _ids(self.prune_scores)

    def check(self) -> "PruneConfig":
        super().check()
        check_early_epoch(self)
        if not self.fraction_list() or any(not 0 < f <= 1 for f in self.fraction_list()):
            raise ConfigError(f"keep_fractions must be fractions in (0, 1], got {self.keep_fractions!r}.")
        from .analysis.scores import HARDER_IS_LARGER

        check_items(self.score_list(), HARDER_IS_LARGER, "score(s)", " in prune_scores", " or importance_<layer>",
                    pattern="importance_")
        check_run_count(self.num_seeds * len(self.fraction_list()) * len(self.score_list()),
                        "keep_fractions x prune_scores x num_seeds")
        return self


def parse_architecture(spec: str) -> dict:
    """'mlp:3x512' -> mlp with depth 3, width 512; 'logreg' -> mlp depth 0; 'cnn'; 'resnet20',
    'vgg16', 'mobilenet' with ':group' or ':batch' (default group) and ':<channels>' (e.g.
    'resnet20:group:8'); a BatchNorm model is trained with track=outputs (the statistics learnability
    reads, at the cost of plain training)."""
    from .models import REGISTRY

    spec = spec.strip()
    name, *rest = spec.split(":")
    if spec == "mlp":
        return {"model": "mlp"}  # the configured depth and width
    if spec in ("cnn", "logreg") or (name == "mlp" and len(rest) == 1):
        if spec == "cnn":
            return {"model": "cnn"}
        if spec == "logreg":
            return {"model": "mlp", "depth": 0}
        try:
            depth, width = (int(v) for v in rest[0].split("x"))
        except ValueError:
            pass
        else:
            if depth >= 0 and width >= 1:
                return {"model": "mlp", "depth": depth, "width": width}
    elif name in REGISTRY and REGISTRY[name].norm and len(rest) <= 2:
        norm = rest[0] if rest else "group"
        channels = rest[1] if len(rest) > 1 else "0"
        if norm in ("group", "batch") and channels.isdigit():
            return {"model": name, "norm": norm, "channels": int(channels),
                    **({"track": "outputs"} if norm == "batch" else {})}
    normed = "|".join(n for n, e in REGISTRY.items() if e.norm)
    raise ConfigError(f"Unknown architecture {spec!r}: write mlp:<depth>x<width> (e.g. mlp:3x512), logreg, cnn, or "
                      f"{normed} with :group or :batch and optionally :<channels> (e.g. resnet20:group).")


def architecture_name(model: str, depth: int, width: int, norm: str = "group", channels: int = 0) -> str:
    """The inverse of parse_architecture, from a run's settings."""
    if model == "cnn" or ":" in model:  # the CNN, or a researcher's factory
        return model
    if model == "mlp":
        return "logreg" if depth == 0 else f"mlp:{depth}x{width}"
    return f"{model}:{norm}" + (f":{channels}" if channels else "")


def architecture_of(config: dict) -> str:
    """The architecture name of a run, from its config (metadata["config"]); a track_run run's is its
    model's class name."""
    if "depth" not in config:
        return str(config.get("model", "custom"))
    return architecture_name(config.get("model", "mlp"), config["depth"], config["width"], config.get("norm", "group"),
                             config.get("channels", 0))


@dataclass(frozen=True)
class LearnabilityConfig(SharedRunsConfig, TrainingRunsConfig):
    """`learnability`: sample-wise learnability across architectures (Lee et al. 2019)."""

    architectures: str = opt("mlp:3x512,mlp:1x128,logreg,cnn", 'comma-separated architectures: mlp:<depth>x<width> | logreg | cnn | resnet20, vgg16 or mobilenet with :group or :batch and optionally :<channels> (BatchNorm models train with track=outputs)')
    num_seeds: int = opt(3, SEEDS_HELP, ge=1)

    def architecture_list(self) -> list[dict]:
        return [parse_architecture(a) for a in _ids(self.architectures)]

    def check(self) -> "LearnabilityConfig":
        super().check()
        archs = self.architecture_list()
        twice = next((a for k, a in enumerate(_ids(self.architectures)) if archs[k] in archs[:k]), None)
        if not self.run_ids() and twice is not None:
            raise ConfigError(f"architectures names {twice} twice: give each architecture once.")
        if not self.run_ids() and len(archs) < 2:
            raise ConfigError("learnability compares architectures: give at least two in architectures.")
        check_run_count(self.num_seeds * len(self.architecture_list()), "architectures x num_seeds")
        return self


@dataclass(frozen=True)
class ExploreConfig(AnalysisConfig):
    """`explore`: one self-contained explorer.html of a train run (more ids: their curves beside it)."""

    cluster_run_id: str = opt("", 'cluster run whose clusters are shown; empty = the newest cluster run of the first train run')
    tracking_url: str = opt("", 'MLflow UI address for run links; empty = MLFLOW_TRACKING_URI when it is http(s)')


INFLUENCE_MODES = ("influence", "validate", "breakdown")


def parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(p) for p in _ids(text)]
    except ValueError:
        raise ConfigError(f"{name} must be a comma-separated list of numbers, got {text!r}.") from None


@dataclass(frozen=True)
class TargetSetOptions(Options):
    """`influence`'s target set: which test samples the targets are measured on."""

    test_ids: str = opt("", 'comma-separated test-sample indices of the target set; empty = draw num_test')
    num_test: int = opt(100, 'test samples drawn (with seed) when test_ids is empty', ge=1)
    test_class: int = opt(-1, 'draw the target set from this class only; -1 = any class', ge=-1)
    target_class: int = opt(0, 'class c of the class_prob target (sum of predicted p(c) over the set)', ge=0)

    def test_id_list(self) -> list[int]:
        try:
            values = [int(p) for p in _ids(self.test_ids)]
        except ValueError:
            raise ConfigError(f"test_ids must be comma-separated integers, got {self.test_ids!r}.") from None
        if any(i < 0 for i in values):
            raise ConfigError("test_ids must be indices into the test set (0 or more).")
        return values

    def check(self) -> "TargetSetOptions":
        super().check()
        self.test_id_list()
        return self


@dataclass(frozen=True)
class HessianOptions(Options):
    """`influence`'s inverse-Hessian solve at the trained parameters."""

    solver: str = opt("cg", 'direct (explicit Hessian) | cg (scipy) | lissa')
    damping: str = opt("auto", 'lambda added to the Hessian, (H + lambda I)^-1: auto = none where H is positive definite, else just enough to make it so (from its smallest eigenvalue); or a number >= 0, used as given')
    max_direct: int = opt(5000, 'largest parameter count the direct solver accepts', ge=1)
    cg_tol: float = opt(1e-6, 'relative residual at which cg stops', gt=0)
    cg_maxiter: int = opt(500, 'cg iterations at most', ge=1)
    lissa_depth: int = opt(1000, 'terms of the LiSSA series', ge=1)
    lissa_scale: float = opt(0.0, 'LiSSA scale, above the top eigenvalue; 0 = estimated by power iteration', ge=0)
    lissa_batch: int = opt(0, 'samples per LiSSA Hessian estimate; 0 = all (deterministic)', ge=0)
    polish_steps: int = opt(0, 'full-batch L-BFGS iterations towards a fixed point before the influence', ge=0)

    def damping_value(self) -> float | None:
        """The damping as given, or None for auto (chosen from the Hessian's smallest eigenvalue)."""
        if self.damping.strip().lower() == "auto":
            return None
        try:
            value = float(self.damping)
        except ValueError:
            value = float("nan")
        if not value >= 0:
            raise ConfigError(f"damping must be auto or a number >= 0 (the lambda of H + lambda I), got "
                              f"{self.damping!r}.")
        return value

    def check(self) -> "HessianOptions":
        super().check()
        from .analysis.influence import SOLVERS

        if self.solver not in SOLVERS:
            raise ConfigError(f"Unknown solver {self.solver!r}: choose {', '.join(SOLVERS)}.")
        self.damping_value()
        return self


@dataclass(frozen=True)
class VariantsOptions(Options):
    """The influences `influence` gives beside the fixed point's."""

    per_layer: int = opt(1, "1 = also influence with the Hessian restricted to each layer's block", choices=(0, 1))
    unrolled: int = opt(-1, 'exact influence through the SGD trajectory: 1 = yes, 0 = no, -1 = when it fits max_memory_gb', choices=(-1, 0, 1))
    max_memory_gb: float = opt(4.0, 'memory the unrolled influence may use', gt=0)


@dataclass(frozen=True)
class ValidationOptions(Options):
    """`influence`'s modes validate and breakdown: retraining that checks the predictions."""

    num_validate: int = opt(10, 'validate/breakdown: this many most influential samples and as many random ones', ge=1)
    small_change: float = opt(1e-6, 'validate: weight change 1 -> 1 - small_change replayed in float64', gt=0, lt=1)
    loo_steps: int = opt(500, 'validate: L-BFGS iterations of each warm-started leave-one-out retraining', ge=1)
    breakdown_lrs: str = opt("0.01,0.1", 'breakdown: comma-separated learning rates')
    breakdown_epochs: str = opt("5,30", 'breakdown: comma-separated training lengths in epochs')
    breakdown_changes: str = opt("1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1", 'breakdown: comma-separated weight changes (1 = removal)')

    def check(self) -> "ValidationOptions":
        super().check()
        if any(not 0 < c <= 1 for c in parse_floats(self.breakdown_changes, "breakdown_changes")):
            raise ConfigError("breakdown_changes must lie in (0, 1] (1 = removal).")
        if any(v <= 0 for v in parse_floats(self.breakdown_lrs, "breakdown_lrs")):
            raise ConfigError("breakdown_lrs must be positive.")
        if any(v < 1 or v != int(v) for v in parse_floats(self.breakdown_epochs, "breakdown_epochs")):
            raise ConfigError("breakdown_epochs must be positive integers.")
        return self


@dataclass(frozen=True)
class InfluenceConfig(AnalysisConfig):
    """`influence`: the effect of each training sample's weight on targets of the trained model
    (paper section 4), fixed-point and unrolled, optionally validated against retraining. Its
    options come in blocks of key=value pairs (target_set, hessian, variants, validation)."""

    SINGLE_RUN: ClassVar[bool] = True
    mode: str = opt("influence", 'influence | validate (also retrain to check the predictions) | breakdown (linear response vs change, lr, epochs)', choices=INFLUENCE_MODES)
    targets: str = opt("test_loss,class_prob", 'comma-separated targets T: test_loss | class_prob | self')
    target_set: TargetSetOptions = block(TargetSetOptions, "the test samples targets are measured on")
    hessian: HessianOptions = block(HessianOptions, "the inverse-Hessian solve")
    variants: VariantsOptions = block(VariantsOptions, "influences beside the fixed point's")
    validation: ValidationOptions = block(ValidationOptions, "retraining of modes validate and breakdown")

    def target_list(self) -> list[str]:
        return _ids(self.targets)

    def check(self) -> "InfluenceConfig":
        super().check()
        from .analysis.influence import TARGETS

        check_items(self.target_list(), TARGETS, "target(s)")
        if self.mode == "validate" and "self" in self.target_list() and len(self.target_list()) == 1:
            raise ConfigError("validate compares the change of a test target: add test_loss or class_prob to targets.")
        return self
