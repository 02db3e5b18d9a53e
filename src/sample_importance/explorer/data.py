"""Data assembly for the sample explorer: pure functions of arrays, no MLflow and no files.

Everything the page shows travels inside the HTML file as JSON plus binary blobs; each blob is
zlib-compressed and base64-encoded (the page inflates it with the browser's own
`DecompressionStream("deflate")`). Per-sample curves over epochs (beta per layer, NLL, p_true)
are the bulk of a full-size file (50,000 samples x 50 epochs x 6 curves = 15 M values), so they
are quantised on a logarithmic grid:

    code = round(ln(v) / LOG_STEP)   (int16; v = 0 gets ZERO_CODE)   ->   shown v' = exp(code * LOG_STEP)

which keeps every shown value within exp(LOG_STEP / 2) - 1 = MAX_RELATIVE_ERROR (0.995%, under 1%) of the
recorded float32 value, whatever its magnitude (beta spans many orders of magnitude, so a linear
grid per row could not). Each code is stored as its difference from a prediction (the previous
epoch, the previous layer, ...; see `encode_curves`), which is what makes them compress. Scores are
float32 (exact to float32 rounding), ids and labels integers.
"""
from __future__ import annotations

import base64
import io
import math
import zlib

import numpy as np

LOG_STEP = 0.0198  # natural-log grid of the curve encoding
MAX_RELATIVE_ERROR = math.exp(LOG_STEP / 2) - 1  # 0.00995: bound on |shown - recorded| / recorded
ZERO_CODE = -32768  # int16 code of an exact zero
CURVE_CHUNK = 1000  # samples per separately compressed chunk of curves (the page inflates one per sample shown)


def blob(array: np.ndarray) -> dict:
    """A little-endian numeric array as {dtype, shape, data}: zlib-compressed, base64 text."""
    array = np.ascontiguousarray(array)
    kinds = {np.dtype(np.float32): "float32", np.dtype(np.int32): "int32", np.dtype(np.int16): "int16",
             np.dtype(np.uint16): "uint16", np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8"}
    assert array.dtype in kinds, f"unsupported dtype {array.dtype}"
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    planes = array.dtype == np.float32  # float bytes stored plane by plane: sign/exponent bytes compress
    raw = little.reshape(-1).view(np.uint8).reshape(-1, 4).T.tobytes() if planes else little.tobytes()
    return {"dtype": kinds[array.dtype], "shape": list(array.shape), "byte_planes": bool(planes),
            "data": base64.b64encode(zlib.compress(raw, 9)).decode("ascii")}


def unblob(b: dict) -> np.ndarray:
    """The inverse of `blob` (what the page does in JavaScript)."""
    raw = zlib.decompress(base64.b64decode(b["data"]))
    if b.get("byte_planes"):
        raw = np.frombuffer(raw, np.uint8).reshape(4, -1).T.tobytes()
    return np.frombuffer(raw, dtype=np.dtype(b["dtype"]).newbyteorder("<")).reshape(b["shape"])


def log_codes(values: np.ndarray) -> np.ndarray:
    """Non-negative values -> int16 codes on the log grid (ZERO_CODE for 0). Shape kept."""
    v = np.asarray(values, dtype=np.float64)
    if np.any(~np.isfinite(v)) or np.any(v < 0):
        raise ValueError("curves to encode must be finite and non-negative")
    with np.errstate(divide="ignore"):
        codes = np.rint(np.log(v) / LOG_STEP)
    # float32's smallest subnormal is e^-103.3, its largest value e^88.7: codes stay within +-10,400.
    codes = np.where(v > 0, codes, ZERO_CODE)
    return codes.astype(np.int16)


def from_codes(codes: np.ndarray) -> np.ndarray:
    """int16 log-grid codes -> values (float64); the reference for the page's decoder."""
    codes = np.asarray(codes, dtype=np.int16)
    return np.where(codes == ZERO_CODE, 0.0, np.exp(codes.astype(np.float64) * LOG_STEP))


def _signed(u: np.ndarray) -> np.ndarray:
    """uint16 bit patterns (held in int64) -> the int16 values they stand for."""
    u = u & 0xFFFF
    return np.where(u >= 0x8000, u - 0x10000, u)


def _p_true_table(nll_codes: np.ndarray) -> tuple[int, np.ndarray]:
    """For every NLL code present: the log-grid code of exp(-NLL), the predicted p_true code. A table
    travels with the file so the page predicts exactly what Python predicted (no float rounding
    differences between numpy and JavaScript). Returns (smallest code, table int16)."""
    lo, hi = int(nll_codes.min()), int(nll_codes.max())
    k = np.arange(lo, hi + 1)
    nll = from_codes(k.astype(np.int16))
    return lo, np.clip(np.rint(-nll / LOG_STEP), -32767, 32767).astype(np.int16)


def encode_curves(curves: np.ndarray, chunk: int | None = None) -> dict:
    """(L + 2, n, E) curves of `run_curves` (beta of L layers, NLL, p_true; all >= 0) -> a blob.

    Every value becomes its int16 log-grid code; what is stored is each code minus a prediction
    from codes stored before it, so the residuals are small and deflate compresses them (about
    0.88 bytes of base64 text per value on Fashion-MNIST, against 2.7 for uncompressed uint16):
    beta of the last layer (Out): the previous epoch's code; each lower layer: the layer above at
    the same epoch plus the change of their difference since the previous epoch (a sample's layers
    move together, their ratio slowly); NLL: half the Out code (beta_Out grows as the squared output
    error, about NLL^2 for a fitted sample) plus the previous epoch's residual; p_true: the code of
    exp(-NLL) (the recorded p_true is exp(-NLL) up to float32 rounding), from a table stored
    alongside. Residuals are taken modulo 2^16 as int16, zigzag-mapped to uint16 (0, -1, 1, -2, ... -> 0, 1, 2,
    3, ...) and split into low and high byte planes.
    Samples are stored in chunks of `chunk` (each its own blob), so the page inflates only the chunk
    of the sample it shows. `decode_curves` inverts it exactly on the grid."""
    Q, n, E = curves.shape
    L = Q - 2
    assert L >= 1, "curves must hold at least one layer, the NLL and p_true"
    chunk = chunk or CURVE_CHUNK
    C = log_codes(curves).astype(np.int64)  # (Q, n, E)
    R = np.empty_like(C)
    R[L - 1] = np.diff(C[L - 1], axis=1, prepend=0)
    for q in range(L - 2, -1, -1):
        R[q] = np.diff(C[q] - C[q + 1], axis=1, prepend=0)
    R[L] = np.diff(C[L] - (C[L - 1] >> 1), axis=1, prepend=0)
    lo, table = _p_true_table(C[L])
    R[L + 1] = C[L + 1] - table[C[L] - lo]
    r = _signed(R)  # the residual modulo 2^16, as int16
    zigzag = np.where(r >= 0, 2 * r, -2 * r - 1)  # small magnitudes -> small codes (high byte 0)
    chunks = []
    for start in range(0, n, chunk):
        flat = zigzag[:, start:start + chunk].reshape(-1)  # (Q * m * E,) for the m samples of the chunk
        chunks.append(blob(np.stack([flat & 0xFF, flat >> 8]).astype(np.uint8)))  # (2, Q*m*E)
    return {"curve_shape": [Q, n, E], "chunk": chunk, "chunks": chunks, "p_table_start": lo, "p_table": blob(table)}


def decode_curves(b: dict) -> np.ndarray:
    """The inverse of `encode_curves` on the log grid: (L + 2, n, E) float64. The page's decoder
    (app.js, curveReader) does the same steps for one sample."""
    Q, n, E = b["curve_shape"]
    L = Q - 2
    u = np.concatenate([_unplanes(c, Q, E) for c in b["chunks"]], axis=1)  # (Q, n, E)
    R = np.where(u & 1, -((u + 1) >> 1), u >> 1)  # undo the zigzag
    C = np.empty_like(R)
    C[L - 1] = _signed(np.cumsum(R[L - 1], axis=1))
    for q in range(L - 2, -1, -1):
        C[q] = _signed(np.cumsum(R[q], axis=1) + C[q + 1])
    C[L] = _signed(np.cumsum(R[L], axis=1) + (C[L - 1] >> 1))
    table = unblob(b["p_table"]).astype(np.int64)
    C[L + 1] = _signed(R[L + 1] + table[C[L] - b["p_table_start"]])
    return from_codes(C.astype(np.int16))


def _unplanes(b: dict, Q: int, E: int) -> np.ndarray:
    planes = unblob(b).astype(np.int64)
    return (planes[0] | (planes[1] << 8)).reshape(Q, -1, E)


SIGNED_OFFSET = 6000  # float32's log-grid codes lie within +-5,300: sign * (code + offset) fits int16, 0 = zero


def encode_signed(curves: np.ndarray, chunk: int | None = None) -> dict:
    """(L, n, E) signed curves (the in-run contribution per layer) -> chunks of int16 codes, each
    sign(v) * (log-grid code of |v| + SIGNED_OFFSET), 0 for an exact zero: the same relative error
    bound as the other curves (MAX_RELATIVE_ERROR), the sign exact. `decode_signed` inverts it."""
    v = np.asarray(curves, dtype=np.float64)
    L, n, E = v.shape
    chunk = chunk or CURVE_CHUNK
    codes = log_codes(np.abs(v)).astype(np.int32)
    signed = np.where(v == 0, 0, np.sign(v) * (codes + SIGNED_OFFSET)).astype(np.int16)
    return {"shape": [L, n, E], "chunk": chunk, "offset": SIGNED_OFFSET,
            "chunks": [blob(np.ascontiguousarray(signed[:, start:start + chunk])) for start in range(0, n, chunk)]}


def decode_signed(b: dict) -> np.ndarray:
    """The inverse of `encode_signed` on the log grid: (L, n, E) float64 (what app.js does per sample)."""
    s = np.concatenate([unblob(c).astype(np.int64) for c in b["chunks"]], axis=1)
    return np.where(s == 0, 0.0, np.sign(s) * np.exp((np.abs(s) - b["offset"]) * LOG_STEP))


def ranks(values: np.ndarray, harder_is_larger: bool = True) -> np.ndarray:
    """1 = hardest: the rank of each sample by a score (larger is harder unless told otherwise), ties
    sharing the best (smallest) rank, as the page shows it. (n,) int32."""
    from scipy.stats import rankdata

    v = np.asarray(values, dtype=np.float64)
    return rankdata(-v if harder_is_larger else v, method="min").astype(np.int32)


def to_uint8_images(x: np.ndarray, image_shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Flat samples in [0, 1] (k, C*H*W) -> uint8 images (k, H, W) (grey) or (k, H, W, 3) (colour)."""
    c, h, w = image_shape
    imgs = np.clip(np.rint(np.asarray(x, dtype=np.float64) * 255), 0, 255).astype(np.uint8).reshape(len(x), c, h, w)
    return imgs[:, 0] if c == 1 else imgs.transpose(0, 2, 3, 1)


def sprite_sheets(images: np.ndarray, columns: int = 100, rows: int = 100, lossless: bool | None = None,
                  quality: int = 45) -> dict:
    """Images (k, H, W[, 3]) uint8 tiled into sprite sheets of columns x rows tiles, as data URLs the
    browser decodes itself. Lossless WebP when the pixels are small (<= 1 MB raw, e.g. digits);
    otherwise lossy AVIF at `quality` (WebP where Pillow lacks AVIF), which keeps 50,000 Fashion-MNIST
    images at about 6 MB: the image is for looking at, no number is read from it."""
    from PIL import Image, features

    k, h, w = images.shape[:3]
    if lossless is None:
        lossless = images.nbytes <= 1_000_000
    fmt = "WEBP" if lossless or not features.check("avif") else "AVIF"
    per_sheet = columns * rows
    sheets = []
    for start in range(0, k, per_sheet):
        chunk = images[start:start + per_sheet]
        used_rows = math.ceil(len(chunk) / columns)
        canvas = np.zeros((used_rows * h, columns * w) + images.shape[3:], dtype=np.uint8)
        for j, img in enumerate(chunk):
            r, c = divmod(j, columns)
            canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
        buf = io.BytesIO()
        if lossless:
            Image.fromarray(canvas).save(buf, format="WEBP", lossless=True)
        else:
            Image.fromarray(canvas).save(buf, format=fmt, quality=quality)
        sheets.append(f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return {"sheets": sheets, "columns": columns, "per_sheet": per_sheet, "height": h, "width": w,
            "encoding": "WebP lossless" if lossless else f"{fmt} quality {quality}"}


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_names(dataset: str, num_classes: int) -> list[str]:
    named = {"fashion-mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}.get(dataset)
    return list(named) if named and len(named) == num_classes else [str(c) for c in range(num_classes)]


def run_curves(importance: np.ndarray, loss: np.ndarray, p_true: np.ndarray) -> np.ndarray:
    """The curves of one run in the explorer's order: beta of each layer, then NLL, then p_true.
    importance (E, n, L), loss (E, n), p_true (E, n) -> (L + 2, n, E)."""
    imp = np.asarray(importance, dtype=np.float32)
    return np.concatenate([imp.transpose(2, 1, 0), np.asarray(loss, np.float32).T[None],
                           np.asarray(p_true, np.float32).T[None]])


def assemble(*, title: str, dataset: str, layer_names: list[str], sample_id: np.ndarray, label: np.ndarray,
             prediction: np.ndarray, scores: dict[str, np.ndarray], harder_is_larger: dict[str, bool],
             curves: np.ndarray, images: dict | None, num_classes: int, runs: list[dict],
             other_curves: list[dict] | None = None, flipped: np.ndarray | None = None,
             cluster: np.ndarray | None = None, cluster_summary: list[dict] | None = None,
             map_axes: tuple[str, str] = ("variability", "confidence"),
             contribution: np.ndarray | None = None, target: str = "") -> dict:
    """The explorer's whole payload (JSON-able). Shapes: n samples, E epochs, L layers.

    Args:
        sample_id, label, prediction: (n,) integers; prediction = class under the final parameters.
        scores: name -> (n,) float, stored as float32; the page ranks them as `ranks` does (1 = hardest).
        curves: (L + 2, n, E) from `run_curves` for the main run.
        images: `sprite_sheets` of the n samples, in sample order; None where the run's data cannot be
            rebuilt (a researcher's own, through track_run): the page shows sample ids instead.
        runs: [{"run_id", "role", "url" or None}] the MLflow runs the file came from.
        other_curves: [{"name", "layers", "curves": (L' + 2, n, E)}] the same samples in other runs (seeds).
        flipped: (n,) bool, the labels the run flipped (label noise); None when it flipped none.
        cluster: (n,) int, the cluster of each sample, -1 outside the clustered class; None without a cluster run.
        cluster_summary: one dict per cluster (cluster, size, difficulty, peak_epoch, ...), easiest first.
        contribution: (L, n, E) the in-run attribution per layer and epoch (a run that recorded it),
            `target` what its target loss is.
    """
    n = len(sample_id)
    Q, n_c, E = curves.shape
    assert n_c == n and Q == len(layer_names) + 2, "curves must be (L + 2, n, E)"
    assert all(len(v) == n for v in scores.values()), "every score needs one value per sample"
    for axis in map_axes:
        assert axis in scores, f"the data map's axis {axis} is not among the scores"
    others = []
    for o in other_curves or []:
        assert o["curves"].shape[1:] == (n, E), "other runs must hold the same samples and epochs"
        others.append({"name": o["name"], "layers": list(o["layers"]), "curves": encode_curves(o["curves"])})
    return {
        "title": title, "dataset": dataset, "n": n, "epochs": E, "layers": list(layer_names),
        "class_names": class_names(dataset, num_classes),
        "sample_id": blob(np.asarray(sample_id, np.int32)), "label": blob(np.asarray(label, np.int32)),
        "prediction": blob(np.asarray(prediction, np.int32)),
        "flipped": None if flipped is None else blob(np.asarray(flipped, np.uint8)),
        "cluster": None if cluster is None else blob(np.asarray(cluster, np.int32)),
        "cluster_summary": cluster_summary,
        "scores": [{"name": name, "harder_is_larger": bool(harder_is_larger.get(name, True)),
                    "values": blob(np.asarray(v, np.float32))}
                   for name, v in scores.items()],
        "map_axes": list(map_axes),
        "curves": encode_curves(curves), "curve_names": [f"beta_{l}" for l in layer_names] + ["nll", "p_true"],
        "log_step": LOG_STEP, "zero_code": ZERO_CODE, "max_relative_error": MAX_RELATIVE_ERROR,
        "other_runs": others, "images": images, "runs": runs,
        "contribution": None if contribution is None else encode_signed(contribution), "target": target,
    }
