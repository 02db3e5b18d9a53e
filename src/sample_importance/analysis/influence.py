"""Influence of each training sample on a trained model (Gao & Jojic section 4; Koh & Liang 2017).

Sample weights v_i enter the training objective that SGD optimises as
    J(theta, v) = (1/n) sum_i v_i L_i(theta) + (weight_decay / 2) ||theta||^2,
the same objective whose minibatch gradient `training.fit` steps along (v = 1 in ordinary training).

Fixed-point influence (eq. 4/5): at a minimum theta*, d theta*/d v_i = -(H + lambda I)^-1 g_i / n, with
H the Hessian of J, g_i = grad L_i(theta*) and lambda the damping; for a target T,
    I_i = dT/dv_i = -(1/n) g_i^T s,   s = (H + lambda I)^-1 grad T(theta*).
Only lambda = 0 gives dT/dv_i itself; `auto_damping` uses none where H is positive definite and
otherwise just enough to make H + lambda I so (from H's smallest eigenvalue, by Lanczos iteration).
Every solve is judged by its recomputed residual (`Solve.converged`); all of this is float64.
One inverse-Hessian-vector product per target; g_i^T s for all samples at once is the directional
derivative of every per-sample loss along s (one forward-mode pass; for a linear layer it equals
delta_i^T S a_i), so per-sample gradients are never materialised.

Unrolled influence (beyond the paper): the exact derivative of T(theta^T) with respect to v_i through
the recorded SGD trajectory theta^{t+1} = theta^t - eta [(1/B) sum_{i in B_t} v_i g_i(theta^t) + wd theta^t],
by reverse-mode differentiation of the replayed run, recomputing segments from stored checkpoints.

Everything works on one flat float64 parameter vector; `Flat` maps it to the model's parameters.
Removing sample i is v_i: 1 -> 0, so the linear prediction of the change of T is -I_i.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, cg, eigsh
from scipy.stats import pearsonr, spearmanr
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap

from ..errors import UserError

SOLVERS = ("direct", "cg", "lissa")
TARGETS = ("test_loss", "class_prob", "self")


class InfluenceError(UserError):
    """An influence computation cannot be done as asked; the message says what to change."""


class Flat:
    """The parameters of `model` as one flat vector, and back (a dict for `functional_call`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        named = list(model.named_parameters())
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.size = sum(self.sizes)

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[k].reshape(-1) for k in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: t.view(shape) for k, t, shape in zip(self.names, theta.split(self.sizes), self.shapes)}

    def of_model(self, dtype=torch.float64) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).to(dtype)

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.unflatten(theta), (x,))

    def blocks(self, layer_names: list[str]) -> dict[str, slice]:
        """The slice of the flat vector holding each layer's parameters ("layers.<name>.*")."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            layer = name.split(".")[1]
            s = out.get(layer)
            out[layer] = slice(s.start if s else start, start + size)
            start += size
        return {name: out[name] for name in layer_names}


class Objective:
    """J(theta, v) of the module docstring on training data (x, y), evaluated in chunks."""

    def __init__(self, flat: Flat, x: torch.Tensor, y: torch.Tensor, weight_decay: float, chunk: int = 2048):
        self.flat, self.x, self.y, self.wd, self.chunk = flat, x, y, weight_decay, chunk
        self.n = len(y)

    def _chunks(self, weight: torch.Tensor | None = None):
        for s in range(0, self.n, self.chunk):
            w = None if weight is None else weight[s:s + self.chunk]
            yield self.x[s:s + self.chunk], self.y[s:s + self.chunk], w

    def sample_losses(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.flat.logits(theta, x), y, reduction="none")

    def _part(self, theta, x, y, w):
        """This chunk's share of J without the weight decay: (1/n) sum_i v_i L_i."""
        losses = self.sample_losses(theta, x, y)
        return (losses if w is None else losses * w).sum() / self.n

    def value_and_gradient(self, theta: torch.Tensor, weight: torch.Tensor | None = None
                           ) -> tuple[float, torch.Tensor]:
        """J and its gradient from one pass over the data."""
        g = self.wd * theta.detach().clone()
        total = 0.5 * self.wd * float(theta.square().sum())
        for x, y, w in self._chunks(weight):
            gc, vc = grad_and_value(self._part)(theta, x, y, w)
            g += gc
            total += float(vc)
        return total, g

    def gradient(self, theta: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.value_and_gradient(theta, weight)[1]

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H v by forward-over-reverse differentiation (torch.func.jvp of torch.func.grad)."""
        out = self.wd * v.clone()
        for x, y, _ in self._chunks():
            out += jvp(lambda th: grad(self._part)(th, x, y, None), (theta,), (v,))[1]
        return out

    def hvp_at(self, theta: torch.Tensor, cache_samples: int = 20000) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> H v at a fixed theta, for solvers that take many products at one point. The gradient of
        each chunk is linearised once (torch.func.vjp of grad: H is symmetric, so the vector-Jacobian
        product of the gradient is H v) and the saved graphs are reused, which skips recomputing the
        forward pass and the gradient per product: 0.038 s instead of 0.061 s per product (float64,
        one thread, 300 digits samples, 3x512 network). The graphs hold the activations of every
        chunk, so above `cache_samples` samples this falls back to `hvp`."""
        if self.n > cache_samples:
            return lambda v: self.hvp(theta, v)
        pullbacks = [vjp(lambda th, x=x, y=y: grad(self._part)(th, x, y, None), theta)[1]
                     for x, y, _ in self._chunks()]

        def product(v: torch.Tensor) -> torch.Tensor:
            out = self.wd * v.clone()
            for pullback in pullbacks:
                out += pullback(v)[0]
            return out
        return product

    def hessian(self, theta: torch.Tensor, block: slice | None = None, columns: int = 256) -> torch.Tensor:
        """The explicit Hessian (or its diagonal `block`), a batch of Hessian-vector products at a time."""
        idx = torch.arange(self.flat.size)[block] if block is not None else torch.arange(self.flat.size)
        cols = []
        for s in range(0, len(idx), columns):
            basis = torch.zeros(len(idx[s:s + columns]), self.flat.size, dtype=theta.dtype, device=theta.device)
            basis[torch.arange(len(basis)), idx[s:s + columns]] = 1.0
            cols.append(vmap(lambda v: self.hvp(theta, v))(basis)[:, idx])
        return torch.cat(cols)  # symmetric: rows = columns

    def sample_dots(self, theta: torch.Tensor, s: torch.Tensor, x: torch.Tensor | None = None,
                    y: torch.Tensor | None = None) -> torch.Tensor:
        """g_i^T s for every sample (default: the training samples): the directional derivative of
        each per-sample loss along s, one forward-mode pass per chunk, no per-sample gradients."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        out = []
        for a in range(0, len(y), self.chunk):
            xb, yb = x[a:a + self.chunk], y[a:a + self.chunk]
            out.append(jvp(lambda th: self.sample_losses(th, xb, yb), (theta,), (s,))[1])
        return torch.cat(out)

    def sample_grads(self, theta: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Explicit per-sample gradients (m, P) of the given samples (torch.func.vmap of grad)."""
        def one(x, y):
            return grad(lambda th: self.sample_losses(th, x[None], y[None])[0])(theta)
        return torch.cat([vmap(one)(self.x[ids[a:a + 256]], self.y[ids[a:a + 256]]) for a in range(0, len(ids), 256)])


# ---------------------------------------------------------------- targets
@dataclass
class Target:
    """T(theta): a scalar function of the parameters, with a name and a description."""

    name: str
    description: str
    fn: Callable[[torch.Tensor], torch.Tensor] | None  # None for self-influence (one target per sample)


def make_target(kind: str, flat: Flat, x: torch.Tensor, y: torch.Tensor, target_class: int = 0) -> Target:
    """test_loss: mean NLL over the test set (x, y); class_prob: sum over the set of the predicted
    probability of `target_class` (the paper's example after eq. 5); self: each sample's own loss."""
    if kind == "test_loss":
        return Target(kind, f"mean NLL of {len(y)} test samples",
                      lambda th: F.cross_entropy(flat.logits(th, x), y))
    if kind == "class_prob":
        return Target(kind, f"sum over {len(y)} test samples of p(class {target_class})",
                      lambda th: torch.softmax(flat.logits(th, x), 1)[:, target_class].sum())
    if kind == "self":
        return Target(kind, "each training sample's own loss (self-influence)", None)
    raise InfluenceError(f"Unknown target {kind!r}: choose from {', '.join(TARGETS)}.")


# ---------------------------------------------------------------- solvers
AUTO_MARGIN = 0.1  # auto damping: (1 + AUTO_MARGIN) times the most negative eigenvalue's bound
EIGSH_TOL = 1e-2  # relative accuracy of the smallest eigenvalue (scipy eigsh / ARPACK `tol`)


@dataclass
class Spectrum:
    """The smallest eigenvalue of H (with weight decay) and the damping chosen from it."""

    min_eigenvalue: float  # Ritz value theta of Lanczos (an upper bound of the smallest eigenvalue)
    residual: float  # ||H u - theta u|| for the unit Ritz vector u: an eigenvalue lies within it of theta
    damping: float  # 0 where H is certainly positive definite, else (1 + AUTO_MARGIN) (residual - theta)
    matvecs: int
    seconds: float


def smallest_eigenvalue(objective: Objective, theta: torch.Tensor, tol: float = EIGSH_TOL, seed: int = 0,
                        maxiter: int | None = None) -> tuple[float, float, int]:
    """The smallest (algebraic) eigenvalue of the Hessian H of J at theta, by Lanczos iteration
    (scipy.sparse.linalg.eigsh, which='SA') on a LinearOperator over Hessian-vector products; the
    start vector is seeded so the result is reproducible. Returns (theta_min, ||H u - theta_min u||,
    Hessian-vector products used)."""
    size = objective.flat.size
    count = [0]
    hvp = objective.hvp_at(theta)

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return hvp(torch.as_tensor(np.ravel(v), dtype=theta.dtype, device=theta.device)).cpu().numpy()

    op = LinearOperator((size, size), dtype=np.float64, matvec=matvec)
    v0 = np.random.default_rng([seed, 19]).standard_normal(size)
    if size < 3:  # ARPACK needs k < size - 1: so small a Hessian is cheaper to write out
        values, vectors = np.linalg.eigh(objective.hessian(theta).cpu().numpy())
        value, u = values[0], vectors[:, 0]
    else:
        # 40 Lanczos vectors (scipy's default for k=1 is 20): on the default influence model the
        # smallest eigenvalue then converges within the first cycle -- 41 products instead of 121
        # (measured on the shared CPU); the basis costs 40 parameter vectors of memory.
        values, vectors = eigsh(op, k=1, which="SA", tol=tol, v0=v0, maxiter=maxiter, ncv=min(size - 1, 40))
        value, u = values[0], vectors[:, 0] / np.linalg.norm(vectors[:, 0])
    residual = float(np.linalg.norm(matvec(u) - value * u))
    return float(value), residual, count[0]


def auto_damping(objective: Objective, theta: torch.Tensor, tol: float = EIGSH_TOL, seed: int = 0) -> Spectrum:
    """The default damping: none where H (which includes the weight decay) is positive definite, else
    the smallest damping that makes H + lambda I so, with a margin.

    Lanczos gives a Ritz value theta_min >= lambda_min and a residual r with an eigenvalue in
    [theta_min - r, theta_min + r]; converged to the extreme end, lambda_min >= theta_min - r. So H is
    certainly positive definite when theta_min - r > 0 (damping 0: the influence is the derivative
    dT/dv_i itself), and otherwise lambda = (1 + AUTO_MARGIN) (r - theta_min) > -lambda_min; the margin
    keeps the smallest eigenvalue of H + lambda I at about AUTO_MARGIN |lambda_min|, which bounds the
    condition number conjugate gradients sees."""
    start = time.perf_counter()
    value, residual, matvecs = smallest_eigenvalue(objective, theta, tol, seed)
    lower = value - residual
    damping = 0.0 if lower > 0 else (1 + AUTO_MARGIN) * -lower
    return Spectrum(value, residual, damping, matvecs, time.perf_counter() - start)


@dataclass
class Solve:
    """x = (A)^-1 b and how it was obtained."""

    x: torch.Tensor
    residual: float  # ||A x - b|| / ||b||, recomputed with a fresh product
    matvecs: int
    seconds: float
    info: dict = field(default_factory=dict)
    tol: float = 0.0  # the relative residual the solve had to reach

    @property
    def converged(self) -> bool:
        """Whether the recomputed residual is within the tolerance: otherwise x is not a solution."""
        return bool(np.isfinite(self.residual) and self.residual <= self.tol)


def solve(solver: str, objective: Objective, theta: torch.Tensor, b: torch.Tensor, damping: float,
          block: slice | None = None, *, max_direct: int = 5000, cg_tol: float = 1e-8, cg_maxiter: int = 1000,
          lissa_depth: int = 2000, lissa_scale: float = 0.0, lissa_batch: int = 0, seed: int = 0) -> Solve:
    """Solve (H + damping I) x = b, with H the Hessian of `objective` at theta (or its diagonal
    `block`, with b restricted to it). Every solver's result is judged by the same test: the relative
    residual, recomputed with a fresh product, must be at most `cg_tol` (`Solve.converged`).

    direct: the explicit matrix, refused above `max_direct` parameters; cg: scipy's conjugate
    gradients on a LinearOperator over Hessian-vector products; lissa: the stochastic Neumann series
    of Agarwal et al. (2017), x_j = b + (I - (H_batch + damping I)/scale) x_{j-1}, x = x_depth / scale,
    with `scale` above the largest eigenvalue (estimated by power iteration when 0) and Hessians of
    `lissa_batch` random samples (0 = all samples, a deterministic series)."""
    if solver not in SOLVERS:
        raise InfluenceError(f"Unknown solver {solver!r}: choose direct, cg or lissa.")
    if not damping >= 0:
        raise InfluenceError(f"damping must be >= 0, got {damping}.")
    start = time.perf_counter()
    size = b.numel()
    full = torch.zeros(objective.flat.size, dtype=theta.dtype, device=theta.device)
    count = [0]
    at_theta = objective.hvp_at(theta) if solver in ("cg", "lissa") and not lissa_batch else None

    def matvec(v: torch.Tensor, obj: Objective = objective) -> torch.Tensor:
        count[0] += 1
        hvp = at_theta if at_theta is not None and obj is objective else (lambda u: obj.hvp(theta, u))
        if block is None:
            return hvp(v) + damping * v
        pad = full.clone()
        pad[block] = v
        return hvp(pad)[block] + damping * v

    info = {}
    if solver == "direct":
        if size > max_direct:
            raise InfluenceError(f"solver=direct builds the explicit {size} x {size} Hessian, more than max_direct="
                                 f"{max_direct} parameters: use solver=cg or lissa, or raise max_direct.")
        A = objective.hessian(theta, block) + damping * torch.eye(size, dtype=theta.dtype, device=theta.device)
        count[0] += size
        x = torch.linalg.solve(A, b)
        info["min_eigenvalue"] = float(torch.linalg.eigvalsh(A)[0])
    elif solver == "cg":
        op = LinearOperator((size, size), dtype=np.float64, matvec=lambda v: matvec(
            torch.as_tensor(np.ravel(v), dtype=theta.dtype, device=theta.device)).cpu().numpy())
        sol, code = cg(op, b.cpu().numpy(), rtol=cg_tol, atol=0.0, maxiter=cg_maxiter)
        info["cg_exit"] = int(code)  # 0 = converged; > 0 = not converged after that many iterations
        x = torch.as_tensor(sol, dtype=theta.dtype, device=theta.device)
    else:
        gen = torch.Generator().manual_seed(seed)
        scale = lissa_scale
        if scale <= 0:  # power iteration for the largest eigenvalue of H + damping I
            v = torch.randn(size, generator=gen, dtype=theta.dtype).to(theta.device)
            for _ in range(30):
                v = matvec(v / v.norm())
            scale = 1.2 * float(v.norm())
            info["estimated_top_eigenvalue"] = scale / 1.2
        info["scale"] = scale
        x = b.clone()
        for _ in range(lissa_depth):
            if lissa_batch:
                ids = torch.randperm(objective.n, generator=gen)[:lissa_batch].to(objective.x.device)
                sub = Objective(objective.flat, objective.x[ids], objective.y[ids], objective.wd, objective.chunk)
                hx = matvec(x, sub)
            else:
                hx = matvec(x)
            x = b + x - hx / scale
            if not torch.isfinite(x).all() or x.norm() > 1e12 * b.norm():
                raise InfluenceError("The LiSSA series diverged (H + damping I has a negative eigenvalue or scale is "
                                     "too small): raise damping, or use solver=cg or direct.")
        x = x / scale
    seconds = time.perf_counter() - start
    residual = float((matvec(x) - b).norm() / b.norm().clamp_min(1e-300))
    return Solve(x, residual, count[0], seconds, info, cg_tol)


# ---------------------------------------------------------------- fixed-point influence
def fixed_point_influence(objective: Objective, theta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """I_i = dT/dv_i = -(1/n) g_i^T s for every training sample, with s = (H + lambda I)^-1 grad T."""
    return -objective.sample_dots(theta, s) / objective.n


def self_influence(objective: Objective, theta: torch.Tensor, damping: float, max_direct: int = 5000,
                   chunk: int = 256) -> torch.Tensor:
    """dL_i/dv_i = -(1/n) g_i^T (H + lambda I)^-1 g_i for every training sample: one solve per sample,
    done with one Cholesky factorisation of the explicit damped Hessian."""
    P = objective.flat.size
    if P > max_direct:
        raise InfluenceError(f"Self-influence needs one solve per sample, done with the explicit {P} x {P} "
                             f"Hessian, more than max_direct={max_direct} parameters: drop `self` from targets "
                             "or raise max_direct.")
    A = objective.hessian(theta) + damping * torch.eye(P, dtype=theta.dtype, device=theta.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info):
        raise InfluenceError("The damped Hessian is not positive definite, so self-influence is undefined: raise "
                             "damping (or leave it at auto).")
    out = []
    for a in range(0, objective.n, chunk):
        G = objective.sample_grads(theta, torch.arange(a, min(a + chunk, objective.n), device=theta.device))
        out.append(-(G * torch.cholesky_solve(G.T, L).T).sum(1) / objective.n)
    return torch.cat(out)


def polish(objective: Objective, theta: torch.Tensor, steps: int, weight: torch.Tensor | None = None,
           tol: float = 1e-10) -> tuple[torch.Tensor, float, float]:
    """Full-batch L-BFGS (torch.optim.LBFGS, strong Wolfe line search) on J for up to `steps`
    iterations: theta moves towards a stationary point. Returns (theta, ||grad J|| before, after)."""
    before = float(objective.gradient(theta, weight).norm())
    param = theta.detach().clone().requires_grad_(True)
    if steps > 0:
        opt = torch.optim.LBFGS([param], lr=1.0, max_iter=steps, max_eval=int(steps * 1.5) + 10,
                                tolerance_grad=tol, tolerance_change=1e-15, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure():
            value, param.grad = objective.value_and_gradient(param.detach(), weight)
            return torch.tensor(value, dtype=torch.float64)

        opt.step(closure)
    theta = param.detach()
    return theta, before, float(objective.gradient(theta, weight).norm())


# ---------------------------------------------------------------- unrolled influence
def sgd_update(flat: Flat, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lr: float,
               weight_decay: float) -> torch.Tensor:
    """One step of `training.fit` as a function: theta - lr ((1/B) sum_i w_i grad L_i + wd theta)."""
    def batch_loss(th):
        return (F.cross_entropy(flat.logits(th, x), y, reduction="none") * w).mean()
    return theta - lr * (grad(batch_loss)(theta) + weight_decay * theta)


def unrolled_memory_bytes(num_params: int, steps: int, itemsize: int = 8, targets: int = 1) -> int:
    """Parameter vectors held at once: one checkpoint per segment, one segment's states, and the
    adjoint (and its step's intermediates) of every target."""
    seg = math.ceil(math.sqrt(steps))
    return (math.ceil(steps / seg) + seg + 4 * targets) * num_params * itemsize


def unrolled_influence(flat: Flat, theta0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, order: np.ndarray,
                       batch_size: int, lr: float, weight_decay: float,
                       targets: list[Callable[[torch.Tensor], torch.Tensor]], weight: torch.Tensor | None = None,
                       max_bytes: float = 4e9, progress: Callable[[str], None] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """dT(theta^T)/dv_i, for every target T and every training sample, through the whole SGD
    trajectory that starts at theta0 and presents the samples in `order` (epochs, n), batches of
    `batch_size`. All targets share one forward pass and one backward pass (the vector-Jacobian
    products are vmapped over the targets' adjoints).

    Reverse mode: lambda^T = grad T(theta^T); for each step t backwards, dT/dv_i += lambda^{t+1 T}
    d theta^{t+1}/d v_i (samples of batch t) and lambda^t = (d theta^{t+1}/d theta^t)^T lambda^{t+1}
    (= (I - lr (H_t + wd I)) lambda^{t+1}), both from one vector-Jacobian product of the step.
    States are recomputed segment by segment from sqrt(T) stored checkpoints, so memory is
    O(sqrt(T) P). Returns (influence (targets, n), theta^T)."""
    n = len(y)
    w_all = torch.ones(n, dtype=theta0.dtype, device=theta0.device) if weight is None else weight
    order = np.array(order)  # a writable copy (the recorded order may be a read-only memory map)
    batches = [torch.as_tensor(order[e, s:s + batch_size], device=theta0.device)
               for e in range(order.shape[0]) for s in range(0, n, batch_size)]
    T = len(batches)
    need = unrolled_memory_bytes(flat.size, T, theta0.element_size(), len(targets))
    if need > max_bytes:
        raise InfluenceError(f"The unrolled influence of this run ({T} steps, {flat.size} parameters) needs about "
                             f"{need / 1e9:.1f} GB, more than max_memory_gb={max_bytes / 1e9:g}: use a smaller run "
                             "(subset, epochs, width), raise max_memory_gb, or set unrolled=0.")
    seg = math.ceil(math.sqrt(T))

    def step(theta, t):
        ids = batches[t]
        return sgd_update(flat, theta, x[ids], y[ids], w_all[ids], lr, weight_decay)

    checkpoints = []  # theta at the start of every segment
    theta = theta0.detach()
    for t in range(T):
        if t % seg == 0:
            checkpoints.append(theta)
        theta = step(theta, t).detach()
    final = theta
    lam = torch.stack([grad(target)(final) for target in targets])  # (targets, P)
    influence = torch.zeros(len(targets), n, dtype=theta0.dtype, device=theta0.device)
    for k in range(len(checkpoints) - 1, -1, -1):
        first, last = k * seg, min((k + 1) * seg, T)
        states = [checkpoints[k]]
        for t in range(first, last - 1):
            states.append(step(states[-1], t).detach())
        for t in range(last - 1, first - 1, -1):
            ids = batches[t]
            _, pullback = vjp(lambda th, w: sgd_update(flat, th, x[ids], y[ids], w, lr, weight_decay),
                              states[t - first], w_all[ids])
            lam, dw = vmap(pullback)(lam)
            influence.index_add_(1, ids, dw)
        if progress is not None and k % max(1, len(checkpoints) // 10) == 0:
            progress(f"unrolled influence: {T - first} of {T} steps differentiated")
    return influence, final


# ---------------------------------------------------------------- comparisons
def agreement(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman and sign agreement of predicted against actual changes."""
    predicted, actual = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    ok = len(predicted) > 2 and np.std(predicted) > 0 and np.std(actual) > 0
    return {"pearson": float(pearsonr(predicted, actual).statistic) if ok else float("nan"),
            "spearman": float(spearmanr(predicted, actual).statistic) if ok else float("nan"),
            "sign_agreement": float(np.mean(np.sign(predicted) == np.sign(actual))),
            "n": int(len(predicted))}
