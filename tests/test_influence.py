"""Influence functions against slow, obviously-correct references on tiny networks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_dataset
from sample_importance.analysis import influence as inf
from sample_importance.config import TrainConfig
from sample_importance.models import build_model
from sample_importance.training import shuffled_orders

WD = 1e-2


def setup(depth=1, width=5, n=30, seed=0, chunk=7):
    data = tiny_dataset(n=n, d=6, classes=3, m=8, seed=seed)
    model = build_model(6, 3, depth, width, seed).double()
    flat = inf.Flat(model)
    x = torch.as_tensor(data.x_train, dtype=torch.float64)
    y = torch.as_tensor(data.y_train)
    obj = inf.Objective(flat, x, y, WD, chunk=chunk)  # chunks of 7: the sums over chunks are exercised
    theta = flat.of_model()
    return data, model, flat, obj, theta


def explicit_objective(flat, x, y, theta):
    """J(theta) written out plainly: the mean loss plus wd/2 ||theta||^2."""
    return F.cross_entropy(flat.logits(theta, x), y) + 0.5 * WD * theta.square().sum()


def explicit_hessian(flat, x, y, theta):
    return torch.autograd.functional.hessian(lambda th: explicit_objective(flat, x, y, th), theta)


def test_hvp_and_hessian_match_explicit_hessian():
    _, _, flat, obj, theta = setup()
    H = explicit_hessian(flat, obj.x, obj.y, theta)
    v = torch.randn(flat.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(obj.hvp(theta, v), H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(obj.hvp_at(theta)(v), H @ v, rtol=1e-10, atol=1e-12)  # the reused linearisation
    torch.testing.assert_close(obj.hvp_at(theta, cache_samples=1)(v), H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(obj.hessian(theta, columns=16), H, rtol=1e-10, atol=1e-12)
    blocks = flat.blocks(["L1", "Out"])
    assert blocks["L1"] == slice(0, 6 * 5 + 5) and blocks["Out"].stop == flat.size
    b = blocks["Out"]
    torch.testing.assert_close(obj.hessian(theta, b), H[b, b], rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(explicit_objective(flat, obj.x, obj.y, theta.requires_grad_()), theta)[0]
    torch.testing.assert_close(obj.gradient(theta.detach()), g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block", [None, "L1"])
def test_cg_and_lissa_agree_with_direct(block):
    _, _, flat, obj, theta = setup(chunk=100)
    sl = None if block is None else flat.blocks(["L1", "Out"])[block]
    size = flat.size if sl is None else sl.stop - sl.start
    b = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    damping = 0.5  # the Hessian at the initialisation has eigenvalues down to -0.39
    H = explicit_hessian(flat, obj.x, obj.y, theta)
    H = H if sl is None else H[sl, sl]
    assert torch.linalg.eigvalsh(H)[0] + damping > 0.05
    exact = torch.linalg.solve(H + damping * torch.eye(size, dtype=torch.float64), b)
    direct = inf.solve("direct", obj, theta, b, damping, sl)
    cgs = inf.solve("cg", obj, theta, b, damping, sl, cg_tol=1e-12)
    lissa = inf.solve("lissa", obj, theta, b, damping, sl, lissa_depth=800)
    torch.testing.assert_close(direct.x, exact, rtol=1e-9, atol=1e-10)
    for sol, tol in ((cgs, 1e-8), (lissa, 1e-6)):
        err = float((sol.x - exact).norm() / exact.norm())
        assert err < tol, err
        assert sol.residual < tol
    assert cgs.info["cg_exit"] == 0


def test_bad_solver_and_damping_are_refused():
    _, _, flat, obj, theta = setup()
    b = torch.ones(flat.size, dtype=torch.float64)
    with pytest.raises(inf.InfluenceError, match="Unknown solver"):
        inf.solve("newton", obj, theta, b, 0.1)
    with pytest.raises(inf.InfluenceError, match="damping must be >= 0"):
        inf.solve("cg", obj, theta, b, -1e-3)
    with pytest.raises(inf.InfluenceError, match="max_direct"):
        inf.solve("direct", obj, theta, b, 0.1, max_direct=10)
    with pytest.raises(inf.InfluenceError, match="LiSSA series diverged"):  # H + 0.01 I is indefinite here
        inf.solve("lissa", obj, theta, b, 0.01, lissa_depth=3000)


def test_default_damping_on_logistic_regression_is_the_derivative_of_the_reminimised_objective():
    """With weight decay, logistic regression's H is positive definite: auto damping is none, and the
    fixed-point influence is dT/dv_i itself -- a central difference of T at the re-minimised J."""
    data, _, flat, obj, theta = setup(depth=0)

    def newton(theta, w):
        """Minimise the plainly written J with sample weights w by Newton steps (explicit Hessian)."""
        def J(th):
            losses = F.cross_entropy(flat.logits(th, obj.x), obj.y, reduction="none")
            return (w * losses).mean() + 0.5 * WD * th.square().sum()
        for _ in range(8):  # from near the minimum: quadratic convergence
            g = torch.func.grad(J)(theta)
            theta = theta - torch.linalg.solve(torch.autograd.functional.hessian(J, theta), g)
        assert float(torch.func.grad(J)(theta).norm()) < 1e-13
        return theta

    theta = newton(inf.polish(obj, theta, steps=200)[0], torch.ones(obj.n, dtype=torch.float64))
    spec = inf.auto_damping(obj, theta)
    exact_min = float(torch.linalg.eigvalsh(explicit_hessian(flat, obj.x, obj.y, theta))[0])
    assert spec.damping == 0.0 and exact_min >= WD * (1 - 1e-9)  # softmax: one flat direction per input, where H = wd
    assert abs(spec.min_eigenvalue - exact_min) <= 1e-2 * exact_min
    target = inf.make_target("test_loss", flat, torch.as_tensor(data.x_test, dtype=torch.float64),
                             torch.as_tensor(data.y_test))
    b = torch.func.grad(target.fn)(theta)
    sol = inf.solve("cg", obj, theta, b, spec.damping, cg_tol=1e-12)
    assert sol.converged
    influence = inf.fixed_point_influence(obj, theta, sol.x)
    eps = 1e-3
    for i in (0, 11, 29):
        values = []
        for v in (1 + eps, 1 - eps):
            w = torch.ones(obj.n, dtype=torch.float64)
            w[i] = v
            values.append(float(target.fn(newton(theta, w))))
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(float(influence[i]) - fd) <= 1e-4 * abs(fd), (i, float(influence[i]), fd)


def test_default_damping_on_an_indefinite_hessian_makes_it_positive_definite():
    _, _, flat, obj, theta = setup(depth=2, width=6)  # at the initialisation H is indefinite
    H = explicit_hessian(flat, obj.x, obj.y, theta)
    exact = torch.linalg.eigvalsh(H)
    assert exact[0] < -0.01
    spec = inf.auto_damping(obj, theta)
    assert abs(spec.min_eigenvalue - float(exact[0])) <= 0.02 * abs(float(exact[0]))
    assert spec.damping > -float(exact[0])  # H + lambda I is positive definite ...
    assert spec.damping <= (1 + inf.AUTO_MARGIN) * 1.05 * -float(exact[0])  # ... with no more than the margin
    assert float(torch.linalg.eigvalsh(H + spec.damping * torch.eye(flat.size, dtype=torch.float64))[0]) > 0
    b = torch.randn(flat.size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert inf.solve("cg", obj, theta, b, spec.damping, cg_tol=1e-10).converged
    stopped = inf.solve("cg", obj, theta, b, spec.damping, cg_tol=1e-10, cg_maxiter=2)
    assert not stopped.converged and stopped.residual > 1e-10


def test_sample_dot_products_match_per_sample_gradients():
    _, _, flat, obj, theta = setup(depth=2)
    s = torch.randn(flat.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rows = []
    for i in range(obj.n):  # one sample at a time, plain autograd
        th = theta.clone().requires_grad_()
        loss = F.cross_entropy(flat.logits(th, obj.x[i:i + 1]), obj.y[i:i + 1])
        rows.append(torch.autograd.grad(loss, th)[0])
    G = torch.stack(rows)
    torch.testing.assert_close(obj.sample_dots(theta, s), G @ s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(inf.fixed_point_influence(obj, theta, s), -(G @ s) / obj.n, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(obj.sample_grads(theta, torch.arange(obj.n)), G, rtol=1e-10, atol=1e-12)
    damping = 1.0  # positive definite at this initialisation
    A = explicit_hessian(flat, obj.x, obj.y, theta) + damping * torch.eye(flat.size, dtype=torch.float64)
    expected = -torch.einsum("ip,ip->i", G, torch.linalg.solve(A, G.T).T) / obj.n
    torch.testing.assert_close(inf.self_influence(obj, theta, damping, chunk=4), expected, rtol=1e-8, atol=1e-12)


def test_polish_reduces_the_gradient():
    _, _, flat, obj, theta = setup(depth=0)
    polished, before, after = inf.polish(obj, theta, steps=200)
    assert after < 1e-6 * before
    # Checked independently: the plainly written objective is lower and stationary at the polished point.
    th = polished.clone().requires_grad_()
    value = explicit_objective(flat, obj.x, obj.y, th)
    assert float(value) < float(explicit_objective(flat, obj.x, obj.y, theta))
    assert float(torch.autograd.grad(value, th)[0].norm()) < 1e-6 * before


def replay_fit(data, cfg, init_state, order, weight=None):
    """The counterfactual retraining `influence` validates with: the training loop, in float64."""
    from sample_importance.stages.influence import retrained_parameters as replay

    return replay(cfg, data, init_state, order, weight)


def test_unrolled_influence_matches_finite_differences_of_replayed_training():
    data, model, flat, obj, theta0 = setup(depth=1, width=5, n=30)
    cfg = TrainConfig(depth=1, width=5, lr=0.3, batch_size=8, epochs=3, weight_decay=WD, seed=0, device="cpu")
    order = shuffled_orders(data.n_train, cfg.epochs, cfg.seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    xt = torch.as_tensor(data.x_test, dtype=torch.float64)
    yt = torch.as_tensor(data.y_test)
    target = inf.make_target("test_loss", flat, xt, yt)
    prob = inf.make_target("class_prob", flat, xt, yt, target_class=1)
    both, final = inf.unrolled_influence(flat, theta0, obj.x, obj.y, order, cfg.batch_size, cfg.lr, WD,
                                         [target.fn, prob.fn])
    unrolled = both[0]
    # The functional replay is the training loop's trajectory.
    torch.testing.assert_close(final, replay_fit(data, cfg, init, order), rtol=1e-12, atol=1e-13)
    eps = 1e-4
    for i in (0, 7, 29):
        w = np.ones(data.n_train)
        w[i] = 1 + eps
        up = float(target.fn(replay_fit(data, cfg, init, order, w)))
        w[i] = 1 - eps
        down = float(target.fn(replay_fit(data, cfg, init, order, w)))
        fd = (up - down) / (2 * eps)
        assert abs(float(unrolled[i]) - fd) <= 1e-3 * abs(fd), (i, float(unrolled[i]), fd)
    # The second target, differentiated in the same pass, against the same finite differences.
    w = np.ones(data.n_train)
    w[7] = 1 + eps
    up = float(prob.fn(replay_fit(data, cfg, init, order, w)))
    w[7] = 1 - eps
    fd = (up - float(prob.fn(replay_fit(data, cfg, init, order, w)))) / (2 * eps)
    assert abs(float(both[1, 7]) - fd) <= 1e-3 * abs(fd), (float(both[1, 7]), fd)
    with pytest.raises(inf.InfluenceError, match="max_memory_gb"):
        inf.unrolled_influence(flat, theta0, obj.x, obj.y, order, cfg.batch_size, cfg.lr, WD, [target.fn],
                               max_bytes=1000)
