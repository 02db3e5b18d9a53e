"""The artifact contract: what a training run writes to `dynamics/`, and the one way to read it back.

Files (n = training samples, indexed by sample_id; E = epochs; L = layers):
    importance.npy   float32 (E, n, L)  beta_{i,d}^t, the sample importance per layer (alpha = sum over L)
    loss.npy         float32 (E, n)     in-batch NLL of each sample (before its step's update)
    p_true.npy       float32 (E, n)     in-batch probability of the true label
    correct.npy      bool    (E, n)     in-batch correctness
    error_l2.npy     float32 (E, n)     in-batch ||softmax - onehot(label)||_2 (EL2N's summand)
    batch_order.npy  int64   (E, n)     sample ids in presentation order; consecutive batch_size chunks = batches
  with eval_train (schema 3; metadata "eval_train": true), every training sample after each epoch under the
  end-of-epoch parameters:
    eval_loss.npy    float32 (E, n)     NLL
    eval_p_true.npy  float32 (E, n)     probability of the true label
    eval_correct.npy bool    (E, n)     correctness
    eval_error_l2.npy float32 (E, n)    ||softmax - onehot(label)||_2
    eval_grad_norm.npy float32 (E, n)   ||grad of the sample's own loss|| (GraNd) at epoch early_epoch
                     (metadata "grand_epoch", 1-based); NaN at every other epoch
  with in-run attribution (metadata "contribution": true; "target" says what the target set V is):
    contribution.npy float32 (E, n, L)  c_{i,d}^t = <grad of L_V at the step's parameters, phi_{i,d}>, the
                     sample's first-order part of the change of the target loss over its step, per layer;
                     a `train` run (attribute_to) also stores metadata "target_split" (test, or train:
                     held out of training), "target_ids" (indices in that split) and "target_every"
    final_loss.npy   float32 (n,)       NLL under the final parameters
    final_prediction.npy int64 (n,)     the class under the final parameters; optional (a track_run run
                     whose final losses came with their logits: what the explorer shows without the model)
    label.npy        int64   (n,)       training labels
    sample_id.npy    int64   (n,)       0..n-1, the index in the dataset's training split
    param_projection.npy float32 (E+1, k) fixed random projection of the flattened parameters at init and
                     after each epoch (models.ParameterProjection), for comparing parameter trajectories
    init_state.pt    state dict of the initial parameters (with batch_order.npy, enough to replay the run)
    final_state.pt   state dict of the final parameters (what `influence` differentiates)
    metadata.json    schema version, run settings, layer names and sizes, phi convention, progress

The per-epoch arrays are memory-mapped `<name>.partial.npy` files filled one epoch at a time and
renamed to `<name>.npy` when the run completes; metadata.json is rewritten atomically after each
epoch with `epochs_completed` and a checksum of every row written, so a crashed run leaves its
finished epochs readable (`allow_partial=True`) and a damaged file is named, never silently read.
`complete` becomes true only after the last file is in place. Until then `checkpoint.pt` holds
what `train` needs to resume; it stays until the run's last metric, figure and model are logged, so
a kill at any instant of the finish is resumed (`DynamicsWriter(resume=True)` undoes a half-done or
done finish and the run finishes again). init_state.pt and final_state.pt carry a checksum in
metadata.json too, and every .pt file is read with `torch.load(weights_only=True)`: tensors and plain
values only, never code (a dynamics folder may come from a shared tracking store).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

SCHEMA_VERSION = 3  # 2: error_l2.npy and final_state.pt; 3: the end-of-epoch evaluation eval_*.npy
READABLE_SCHEMAS = (2, 3)  # a schema-2 run loads with its eval_* arrays None
DIRNAME = "dynamics"
METADATA = "metadata.json"
INIT_STATE = "init_state.pt"
FINAL_STATE = "final_state.pt"
CHECKPOINT = "checkpoint.pt"  # model, optimizer and progress after the last finished epoch (until logged)
FILE_CHECKSUMS = "file_checksums"  # metadata.json: checksum of each .pt file (init_state, final_state)
# file stem -> dtype
PER_EPOCH = {"importance": np.float32, "loss": np.float32, "p_true": np.float32, "correct": np.bool_,
             "error_l2": np.float32, "batch_order": np.int64}
# Written only when metadata["eval_train"] is true (the end-of-epoch evaluation, training.evaluate_train).
PER_EPOCH_EVAL = {"eval_loss": np.float32, "eval_p_true": np.float32, "eval_correct": np.bool_,
                  "eval_error_l2": np.float32, "eval_grad_norm": np.float32}


# Written only when metadata["contribution"] is true (in-run attribution to a target loss).
PER_EPOCH_CONTRIBUTION = {"contribution": np.float32}
LAYERED = ("importance", "contribution")  # per-epoch arrays with a column per layer: (E, n, L)


def per_epoch_arrays(metadata: dict) -> dict:
    """The per-epoch files a run has, by its metadata: no importance for track=outputs, the eval_*
    files with eval_train, contribution with in-run attribution."""
    arrays = {**PER_EPOCH, **(PER_EPOCH_EVAL if metadata.get("eval_train") else {}),
              **(PER_EPOCH_CONTRIBUTION if metadata.get("contribution") else {})}
    if metadata.get("track", "importance") == "outputs":
        del arrays["importance"]
    return arrays


PER_SAMPLE = {"final_loss": np.float32, "label": np.int64, "sample_id": np.int64}
OPTIONAL_PER_SAMPLE = {"final_prediction": np.int64}  # there where metadata.json has its checksum
PROJECTION = "param_projection"
METADATA_TYPES = {"n": int, "epochs": int, "epochs_completed": int, "projection_dim": int, "complete": bool,
                  "layer_names": list, "checksums": dict}  # checked before any is used
REQUIRED_METADATA = ("schema_version", "n", "epochs", "epochs_completed", "complete", "layer_names",
                     "projection_dim", "checksums")


class DynamicsError(UserError):
    """A dynamics folder is missing, incomplete or inconsistent; the message names the file."""


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:32]


def _file_digest(path: Path, full: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() if full else h.hexdigest()[:32]


@contextlib.contextmanager
def disk_errors(path: Path):
    """Turn an operating-system error while writing `path` into one sentence (a full disk, a
    read-only folder), instead of a traceback. PyTorch's own file writer (torch.save to a path,
    torch.export) reports a failed write as a RuntimeError without its errno: one while the disk
    holding `path` (or the temporary folder) is nearly full counts as a full disk."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DynamicsError(_no_space(path)) from None
        raise DynamicsError(f"Cannot write {path}: {exc.strerror or exc}; choose a writable location for the "
                            "tracking store's artifacts.") from None
    except RuntimeError:
        if _nearly_full(path) or _nearly_full(Path(tempfile.gettempdir())):
            raise DynamicsError(_no_space(path)) from None
        raise


def _no_space(path: Path) -> str:
    return (f"No space left on the device holding {path}: free some space, then run the same command again (an "
            "interrupted train run resumes from its last finished epoch).")


def _nearly_full(path: Path, margin: int = 64 << 20) -> bool:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < margin
    except OSError:
        return False


def required_bytes(n: int, epochs: int, layers: int, projection_dim: int = 32, per_epoch: dict | None = None) -> int:
    """Disk space the per-epoch arrays of a run take (`per_epoch`, default PER_EPOCH, and the
    parameter projection), for checking before anything is allocated."""
    per_sample_epoch = sum((layers if name in LAYERED else 1) * np.dtype(dt).itemsize
                           for name, dt in (per_epoch or PER_EPOCH).items())
    return int(epochs) * int(n) * per_sample_epoch + (int(epochs) + 1) * projection_dim * 4


def check_space(folder: Path, nbytes: int, what: str = "this run's dynamics") -> None:
    """Refuse, in one sentence, work whose files would not fit on the disk that holds `folder`."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes > free:
        raise DynamicsError(f"{what[:1].upper() + what[1:]} would need {_size(nbytes)} at {folder}, but only {_size(free)} is free there: "
                            "lower epochs, subset or the number of runs, or free space.")


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:,.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _preallocate(path: Path) -> None:
    """Reserve the whole file on disk now, so a full disk is a named error at the start rather than
    a crash (SIGBUS) in a memory-mapped write hours later."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return  # the file system cannot reserve space (some network file systems)
            raise


def _partial(folder: Path, name: str) -> Path:
    """Per-epoch arrays carry this name until the run is complete, then are renamed to <name>.npy."""
    return folder / f"{name}.partial.npy"


def save_atomic(obj, path: Path, checksum: bool = False) -> None:
    """torch.save to a temporary name, then rename: a reader never sees half a file, and a failed
    write (a full disk) leaves no temporary behind. `checksum`: the file ends with CHECKED_TRAILER
    and the SHA-256 of what precedes it, so it verifies itself (`load_tensors`) with no second file
    to keep in step (the resume checkpoint, rewritten every epoch)."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_errors(path):
            with open(tmp, "wb") as f:  # through a Python file: a full disk is an OSError with its errno
                torch.save(obj, f)
            if checksum:
                digest = _file_digest(tmp, full=True)
                with open(tmp, "ab") as f:
                    f.write(CHECKED_TRAILER + digest.encode())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


CHECKED_TRAILER = b"\nsample-importance-sha256:"  # then 64 hexadecimal digits, at the end of a checked file


def _read_nofollow(path: Path) -> bytes:
    """A file's bytes, refusing a symbolic link (a planted run's link to a file of the user's)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DynamicsError(f"{path} is a symbolic link, which is never followed: it was not written by "
                                "sample-importance; delete the run if you do not know where it came from.") from None
        raise DynamicsError(f"{path} cannot be read: {exc.strerror or exc}.") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _verified(path: Path, raw: bytes) -> bytes:
    """What precedes the checksum of a file written by `save_atomic(checksum=True)`; the file itself
    where it has no checksum (written before checksums, or cut short: it then fails to load)."""
    cut = raw.rfind(CHECKED_TRAILER)
    if cut < 0 or len(raw) - cut - len(CHECKED_TRAILER) != 64:
        return raw
    body = raw[:cut]
    if hashlib.sha256(body).hexdigest() != raw[cut + len(CHECKED_TRAILER):].decode("ascii", "replace"):
        raise DynamicsError(f"{path} is damaged: it does not match its checksum.")
    return body


def load_tensors(path: Path, expected_digest: str | None = None) -> dict:
    """A .pt file of tensors and plain values (`torch.load(weights_only=True)`: never unpickles code,
    never follows a symbolic link), checked against its checksum: the one recorded in metadata.json,
    or the one it carries itself. Raises DynamicsError naming the file."""
    import io
    import pickle

    import torch

    path = Path(path)
    if not path.is_file() and not path.is_symlink():
        raise DynamicsError(f"{path} is missing from the dynamics folder.")
    raw = _read_nofollow(path)
    if expected_digest is not None and hashlib.sha256(raw).hexdigest()[:32] != expected_digest:
        raise DynamicsError(f"{path} is damaged: it does not match the checksum in metadata.json; re-run the "
                            "training run.")
    try:
        return torch.load(io.BytesIO(_verified(path, raw)), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DynamicsError(f"{path} was not loaded: it is not a file of tensors and plain values written by "
                            f"sample-importance (damaged, from an older version, or planted; {first[:200]}).") from None


def load_checkpoint(folder: Path) -> dict:
    """The resume checkpoint of an unfinished run (tensors and plain values only), verified."""
    return load_tensors(Path(folder) / CHECKPOINT)


def save_checkpoint(state: dict, folder: Path) -> None:
    save_atomic(state, Path(folder) / CHECKPOINT, checksum=True)


def load_problem(path: Path) -> str | None:
    """Why the state file `path` (a resume checkpoint) cannot be loaded (damaged, truncated,
    planted), or None where it loads."""
    try:
        load_tensors(path)
    except DynamicsError as exc:
        return str(exc)
    return None


def discard_checkpoint(folder: Path) -> None:
    """Delete the checkpoint: only once everything of the run is logged (the last step of `train`)."""
    (Path(folder) / CHECKPOINT).unlink(missing_ok=True)


class DynamicsWriter:
    """Writes a run's dynamics epoch by epoch into `folder`; `resume=True` reopens an unfinished one.

    Per-epoch arrays are memory-mapped `<name>.partial.npy` files, renamed to `<name>.npy` by
    `finish`; every row written gets a checksum in metadata.json, which is rewritten atomically after
    each epoch, so a reader can tell a finished epoch from a damaged one."""

    def __init__(self, folder: str | Path, n: int, epochs: int, metadata: dict, projection_dim: int = 32,
                 resume: bool = False):
        self.folder = Path(folder)
        with disk_errors(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        self.n, self.epochs = n, epochs
        L = len(metadata["layer_names"])
        if resume:
            metadata = json.loads((self.folder / METADATA).read_text())
        self.per_epoch = per_epoch_arrays(metadata)
        shapes = {name: (epochs, n, L) if name in LAYERED else (epochs, n) for name in self.per_epoch}
        shapes[PROJECTION] = (epochs + 1, projection_dim)
        dtypes = {**self.per_epoch, PROJECTION: np.float32}
        if resume:
            self.metadata = metadata
            assert self.metadata["n"] == n and self.metadata["epochs"] == epochs
            self._reopen(list(shapes))
            mode = "r+"
        else:
            check_space(self.folder, required_bytes(n, epochs, L, projection_dim, self.per_epoch))
            self.metadata = {**metadata, "schema_version": SCHEMA_VERSION, "n": n, "epochs": epochs,
                             "projection_dim": projection_dim, "epochs_completed": 0, "complete": False,
                             "checksums": {name: {} for name in shapes}, FILE_CHECKSUMS: {}}
            mode = "w+"
        with disk_errors(self.folder):
            self.arrays = {name: np.lib.format.open_memmap(_partial(self.folder, name), mode=mode,
                                                           dtype=dtypes[name], shape=shapes[name]) for name in shapes}
            if mode == "w+":
                for name in shapes:
                    _preallocate(_partial(self.folder, name))
            _write_json_atomic(self.folder / METADATA, self.metadata)

    def _reopen(self, names: list[str]) -> None:
        """Undo a finish that was cut short or whose run was not fully logged: per-epoch files that
        were already renamed into place get their partial name back, and the run is incomplete again
        (the finish is then done anew, step by step, by whoever resumes)."""
        for name in names:
            done, partial = self.folder / f"{name}.npy", _partial(self.folder, name)
            if not partial.exists() and done.exists():
                os.replace(done, partial)
        if self.metadata.get("complete"):
            self.metadata["complete"] = False
            _write_json_atomic(self.folder / METADATA, self.metadata)

    def _store(self, name: str, row: int, values) -> None:
        array = self.arrays[name]
        with disk_errors(_partial(self.folder, name)):
            array[row] = values
            array.flush()
        self.metadata["checksums"][name][str(row)] = _digest(array[row])
        # The row is on disk: let its pages leave this process's memory (a 50-epoch run would
        # otherwise keep its whole dynamics resident through the memory map).
        with contextlib.suppress(AttributeError, ValueError, OSError):
            array._mmap.madvise(mmap.MADV_DONTNEED)

    def _save_state(self, state: dict, name: str) -> None:
        save_atomic(state, self.folder / name)
        self.metadata.setdefault(FILE_CHECKSUMS, {})[name] = _file_digest(self.folder / name)

    def write_initial(self, projection: np.ndarray, init_state: dict) -> None:
        """The starting point: projected initial parameters and the initial state dict."""
        self._store(PROJECTION, 0, projection)
        self._save_state(init_state, INIT_STATE)
        self._write_metadata()

    def _write_metadata(self) -> None:
        with disk_errors(self.folder / METADATA):
            _write_json_atomic(self.folder / METADATA, self.metadata)

    def truncate(self, epochs_completed: int) -> None:
        """Forget epochs after `epochs_completed` (resuming from a checkpoint written before them)."""
        for name in self.arrays:
            for row in list(self.metadata["checksums"][name]):
                limit = epochs_completed + (1 if name == PROJECTION else 0)
                if int(row) >= limit:
                    del self.metadata["checksums"][name][row]
        self.metadata["epochs_completed"] = epochs_completed
        self._write_metadata()

    def write_epoch(self, record, projection: np.ndarray) -> None:
        """Store one `training.EpochRecord` and the projected parameters after it; mark it completed."""
        epoch = record.epoch
        assert epoch == self.metadata["epochs_completed"], "epochs must be written in order"
        for name in self.per_epoch:
            values = getattr(record, name)
            assert values is not None, f"metadata says eval_train, but epoch {epoch} has no {name}"
            self._store(name, epoch, values)
        self._store(PROJECTION, epoch + 1, projection)
        self.metadata["epochs_completed"] = epoch + 1
        self._write_metadata()

    def finish(self, final_loss: np.ndarray, label: np.ndarray, sample_id: np.ndarray, final_state: dict,
               final_prediction: np.ndarray | None = None) -> None:
        """Write the final files and rename the per-epoch ones into place; `complete` last. Every step
        can be repeated (a resumed run whose finish was cut short does it again); the checkpoint is
        left for `discard_checkpoint` once the run is fully logged."""
        assert self.metadata["epochs_completed"] == self.epochs, "finish() before every epoch was written"
        self._save_state(final_state, FINAL_STATE)
        finals = [("final_loss", final_loss), ("label", label), ("sample_id", sample_id)]
        if final_prediction is not None:
            finals.append(("final_prediction", final_prediction))
        for name, arr in finals:
            arr = np.asarray(arr, dtype={**PER_SAMPLE, **OPTIONAL_PER_SAMPLE}[name])
            assert arr.shape == (self.n,), f"{name} must have shape ({self.n},), got {arr.shape}"
            tmp = self.folder / f"{name}.tmp.npy"
            with disk_errors(tmp):
                np.save(tmp, arr)
                os.replace(tmp, self.folder / f"{name}.npy")
            self.metadata["checksums"][name] = _digest(arr)
        self._write_metadata()  # the checksums of the final files, before they are relied on
        names = list(self.arrays)
        self.arrays = {}  # release the memory maps before renaming their files
        for name in names:
            os.replace(_partial(self.folder, name), self.folder / f"{name}.npy")
        self.metadata["complete"] = True
        self._write_metadata()


@dataclass
class Dynamics:
    """A run's dynamics; per-epoch arrays are memory-mapped and cover the completed epochs."""

    metadata: dict
    importance_values: np.ndarray | None  # (E, n, L) float32; None for a track=outputs run (see `importance`)
    loss: np.ndarray  # (E, n) float32
    p_true: np.ndarray  # (E, n) float32
    correct: np.ndarray  # (E, n) bool
    error_l2: np.ndarray  # (E, n) float32
    batch_order: np.ndarray  # (E, n) int64
    param_projection: np.ndarray  # (E+1, k) float32: projected parameters at init and after each epoch
    final_loss: np.ndarray | None  # (n,) float32; None for an incomplete run
    label: np.ndarray | None  # (n,) int64; None for an incomplete run
    sample_id: np.ndarray | None  # (n,) int64; None for an incomplete run
    folder: Path
    # The end-of-epoch evaluation (schema 3 with eval_train); None for older runs and eval_train=0.
    eval_loss: np.ndarray | None = None  # (E, n) float32
    eval_p_true: np.ndarray | None = None  # (E, n) float32
    eval_correct: np.ndarray | None = None  # (E, n) bool
    eval_error_l2: np.ndarray | None = None  # (E, n) float32
    eval_grad_norm: np.ndarray | None = None  # (E, n) float32, NaN except at grand_epoch
    final_prediction: np.ndarray | None = None  # (n,) int64, where the run recorded it (track_run with logits)
    contribution: np.ndarray | None = None  # (E, n, L) float32, with in-run attribution

    @property
    def has_eval(self) -> bool:
        """Whether the run evaluated every training sample after each epoch (schema 3, eval_train)."""
        return self.eval_p_true is not None

    @property
    def grand_epoch(self) -> int | None:
        """The 1-based epoch whose eval_grad_norm row holds GraNd's gradient norms, if the run has one."""
        epoch = self.metadata.get("grand_epoch")
        return epoch if self.has_eval and epoch is not None and epoch <= len(self.eval_grad_norm) else None

    @property
    def layer_names(self) -> list[str]:
        return list(self.metadata["layer_names"])

    @property
    def has_importance(self) -> bool:
        """Whether the run recorded sample importance (track=importance, the default)."""
        return self.importance_values is not None

    @property
    def importance(self) -> np.ndarray:
        """beta (E, n, L) float32; a run trained with track=outputs has none, and says so."""
        if self.importance_values is None:
            raise DynamicsError(f"Run {self.metadata.get('run_id', self.folder)} was trained with track=outputs and "
                                "recorded no sample importance: train it with track=importance (the default) for "
                                "this analysis.")
        return self.importance_values

    def state(self, name: str) -> dict:
        """A state dict of the run (INIT_STATE or FINAL_STATE), checked against its checksum (runs
        written before checksums of .pt files existed are read unchecked) and loaded as tensors only."""
        return load_tensors(self.folder / name, self.metadata.get(FILE_CHECKSUMS, {}).get(name))

    @property
    def alpha(self) -> np.ndarray:
        """alpha_i^t = sum over layers of beta (E, n)."""
        return self.importance.sum(axis=2, dtype=np.float64)

    @property
    def total_importance(self) -> np.ndarray:
        """tau_i = sum over epochs of alpha_i^t (n,)."""
        return self.alpha.sum(axis=0)


def load_dir(folder: str | Path, allow_partial: bool = False, verify: bool = True) -> Dynamics:
    """Read and validate a dynamics folder: shapes and dtypes against metadata.json and, with
    `verify`, every row's checksum. Raises DynamicsError naming the file that is wrong."""
    folder = Path(folder)
    meta_path = folder / METADATA
    if not meta_path.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise DynamicsError(f"{meta_path} is missing: the dynamics folder is damaged (its other files cannot be "
                                "validated without it); re-run the training run.")
        raise DynamicsError(f"{meta_path} is missing: this is not a dynamics folder written by `train`.")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DynamicsError(f"{meta_path} is damaged: not valid JSON ({exc}); re-run the training run.") from None
    missing = [key for key in REQUIRED_METADATA if key not in meta] if isinstance(meta, dict) else ["all keys"]
    if missing:
        raise DynamicsError(f"{meta_path} is damaged: it lacks {', '.join(missing)}; re-run the training run.")
    wrong = next((key for key, kind in METADATA_TYPES.items()
                  if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool))), None)
    if wrong is None and not (all(isinstance(n, str) for n in meta["layer_names"])
                              and 0 <= meta["epochs_completed"] <= meta["epochs"] and meta["n"] >= 0):
        wrong = "layer_names, n or epochs_completed"
    if wrong is not None:
        raise DynamicsError(f"{meta_path} is damaged: its {wrong} is not what this code writes; re-run the training run.")
    if meta.get("schema_version") not in READABLE_SCHEMAS:
        raise DynamicsError(f"{meta_path} has schema version {meta.get('schema_version')}, this code reads "
                            f"{', '.join(map(str, READABLE_SCHEMAS))}: re-run `train` or use a matching version of "
                            "sample-importance.")
    complete = bool(meta.get("complete"))
    if not complete and not allow_partial:
        raise DynamicsError(f"{folder} holds an unfinished run ({meta.get('epochs_completed')} of "
                            f"{meta.get('epochs')} epochs): resume or re-run it, or pass allow_partial=True.")
    n, E, L = meta["n"], meta["epochs"], len(meta["layer_names"])
    done = meta["epochs_completed"]
    path = (lambda name: folder / f"{name}.npy") if complete else (lambda name: _partial(folder, name))
    arrays = {"importance_values": None}  # stays None for a track=outputs run
    per_epoch = per_epoch_arrays(meta)
    for name, dtype in per_epoch.items():
        shape = (E, n, L) if name in LAYERED else (E, n)
        arrays["importance_values" if name == "importance" else name] = _load(path(name), dtype, shape)[:done]
    arrays[PROJECTION] = _load(path(PROJECTION), np.float32, (E + 1, meta["projection_dim"]))[:done + 1]
    for name, dtype in PER_SAMPLE.items():
        arrays[name] = _load(folder / f"{name}.npy", dtype, (n,)) if complete else None
    optional = [name for name in OPTIONAL_PER_SAMPLE if complete and name in meta["checksums"]]
    for name in optional:
        arrays[name] = _load(folder / f"{name}.npy", OPTIONAL_PER_SAMPLE[name], (n,))
    if verify:
        sums = meta["checksums"]
        for name in (*per_epoch, PROJECTION):
            rows = arrays["importance_values" if name == "importance" else name]
            for row in range(len(rows)):
                if not isinstance(sums.get(name), dict) or sums[name].get(str(row)) != _digest(rows[row]):
                    raise DynamicsError(f"{path(name)} is damaged: row {row} does not match the checksum in "
                                        f"metadata.json; re-run the training run.")
        for name in (*PER_SAMPLE, *optional):
            if complete and sums.get(name) != _digest(arrays[name]):
                raise DynamicsError(f"{folder / (name + '.npy')} is damaged: it does not match the checksum in "
                                    f"metadata.json; re-run the training run.")
    return Dynamics(metadata=meta, folder=folder, **arrays)


def _load(path: Path, dtype, shape: tuple) -> np.ndarray:
    if not path.is_file():
        raise DynamicsError(f"{path} is missing from the dynamics folder.")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, EOFError, OSError) as exc:
        raise DynamicsError(f"{path} is damaged: not a readable .npy file ({str(exc) or type(exc).__name__}); "
                            "re-run the training run.") from None
    if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
        raise DynamicsError(f"{path} is damaged: dtype {arr.dtype} and shape {arr.shape}, but metadata.json says "
                            f"{np.dtype(dtype)} {tuple(shape)}.")
    return arr


def check_matches(run_id: str, d: Dynamics, dataset: str, n: int) -> None:
    """Refuse a reference run trained on other samples than the run that uses it."""
    if d.metadata["dataset"] != dataset or d.metadata["n"] != n:
        raise DynamicsError(f"Reference run {run_id} was trained on {d.metadata['n']} samples of "
                            f"{d.metadata['dataset']}, not {n} of {dataset}: pass a reference run on the same data.")


def check_aligned(runs: dict[str, Dynamics]) -> None:
    """Refuse to compare runs whose samples differ (dataset, subset, sample ids or epochs)."""
    items = list(runs.items())
    first_id, first = items[0]
    for run_id, d in items[1:]:
        for key in ("dataset", "n", "epochs"):
            if d.metadata[key] != first.metadata[key]:
                raise DynamicsError(
                    f"Runs {first_id} and {run_id} cannot be compared: {key} is {first.metadata[key]!r} in one "
                    f"and {d.metadata[key]!r} in the other; pass runs trained on the same samples for as many epochs."
                )
        if first.sample_id is not None and d.sample_id is not None and not np.array_equal(first.sample_id, d.sample_id):
            raise DynamicsError(f"Runs {first_id} and {run_id} cannot be compared: their sample ids differ.")
