"""The geometry variants keep their weights on their manifolds: sphere, stiefel, l1_stiefel, oblique,
block_stiefel, sl, symplectic.

Each variant's functions are loaded from its generated script. The constraint tests drive the variant's
own Muon for 100 steps on random gradients at the CPU preset's shapes (model_dim 64: the attention
stack [4, 64, 64] with o zero, the MLP in [256, 64], the MLP out [64, 256] zero), so they also check that
the zero-initialised matrices stay off the manifold and move. The full shapes get 100 steps of the
geometry alone, driven by Gaussian directions, where a step is cheap: sphere and oblique at
1024 x 4096 (row and column norms), sl at 1024 x 1024 (it applies to square matrices only; an fp64
slogdet and inverse), symplectic at 1024 x 1024 (square only; one Newton-Schulz call and one solve a
step), block_stiefel on the attention stack [4, 1024, 1024] (16 heads: 64 blocks of 64 x 1024), and
stiefel on the MLP in [4096, 1024] for 2 steps of one dual-ascent iteration each (one Newton-Schulz
call at 1024 x 4096 costs about 4 s on one CPU thread, and a default stiefel step takes up to 20
msigns; the constraint does not depend on the iterations). l1_stiefel, stiefel plus a soft threshold
before the same retraction, is checked at the CPU preset's shapes.
"""

import dataclasses
import math

import pytest
import torch
from conftest import ROOT, run_training
from variant_scripts import load_script

from kit.runs.logs import parse_log

DIM = 64  # the CPU preset's model_dim
STEPS = 100


@pytest.fixture(scope="module")
def scripts():
    return {}


def script(scripts, name):
    if name not in scripts:
        scripts[name] = load_script(name)
    return scripts[name]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def preset_params(seed=0):
    """The Muon matrices of one block at the CPU preset's shapes, initialised as the model does."""
    g = torch.Generator().manual_seed(seed)
    bound = math.sqrt(3) * 0.5 / math.sqrt(DIM)
    qkvo = (torch.rand(4, DIM, DIM, generator=g) * 2 - 1) * bound
    qkvo[3] = 0.0
    fc = (torch.rand(4 * DIM, DIM, generator=g) * 2 - 1) * bound
    proj = torch.zeros(DIM, 4 * DIM)
    return [torch.nn.Parameter(t) for t in (qkvo, fc, proj)]


def settings(mod, prefix, **overrides):
    """The variant's Hyperparameters fields named prefix*, as Muon group keys (defaults, then overrides)."""
    values = {k: v for k, v in dataclasses.asdict(mod.Hyperparameters()).items() if k.startswith(prefix)}
    return {**values, **overrides}


def run_muon(mod, params, group_keys, steps=STEPS, lr=0.05, seed=1, after_step=None):
    """`steps` steps of the variant's Muon on Gaussian gradients, one group per matrix."""
    muon = mod.Muon([dict(params=[p], **group_keys) for p in params], lr=lr, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        muon.step()
        if after_step is not None:
            after_step(step, muon)
    return muon


def matrices(params):
    """The 2D matrices of the parameters (the attention stack split in q, k, v, o)."""
    return [m for p in params for m in (p.data.unbind(0) if p.ndim == 3 else [p.data])]


def gram_error(W, scale):
    """max |G / scale^2 - I| for the Gram matrix of W's shorter side."""
    G = W.double() @ W.double().mT if W.size(-2) <= W.size(-1) else W.double().mT @ W.double()
    return float((G / scale**2 - torch.eye(G.size(-1), dtype=torch.float64)).abs().max())


# ----------------------------------------------------------------------------------------------------------
# sphere


@pytest.mark.parametrize("zero_rows", ["enter", "free"])
def test_sphere_rows_keep_their_radius(scripts, zero_rows):
    mod = script(scripts, "sphere")
    params = preset_params()
    initial = [p.detach().norm(dim=-1, keepdim=True).clone() for p in params]
    muon = run_muon(mod, params, settings(mod, "sphere_", sphere_zero_rows=zero_rows))
    for p, r0 in zip(params, initial, strict=True):
        radius = muon.state[p]["row_radius"]
        assert torch.equal(radius, r0 if zero_rows == "free" else torch.where(r0 > 0, r0, 0.5))
        on_sphere = radius > 0
        rel = (p.detach().norm(dim=-1, keepdim=True) / radius - 1)[on_sphere].abs().max() if on_sphere.any() else 0
        assert rel < 1e-4, (p.shape, float(rel))
    # o and the MLP out start at zero: they entered their spheres, or the baseline's step moved them
    assert float(initial[0][3].max()) == 0 and float(initial[2].max()) == 0
    assert float(params[0].detach()[3].norm()) > 0.1 and float(params[2].detach().norm()) > 0.1


def test_sphere_zero_rows_enter_at_the_steepest_descent_point(scripts):
    mod = script(scripts, "sphere")
    g = torch.Generator().manual_seed(19)
    W = torch.zeros(8, 16)
    W[:4] = torch.randn(4, 16, generator=g)
    U = torch.randn(8, 16, generator=g)
    U[7] = 0.0  # no update yet: the row waits at zero
    mod.sphere_step_(W, U, 0.05, 1.0, {}, "geodesic", "norm", 1, "enter")
    torch.testing.assert_close(W[4:7], -mod.SPHERE_ENTRY_RADIUS * U[4:7] / U[4:7].norm(dim=-1, keepdim=True))
    assert float(W[7].abs().max()) == 0


@pytest.mark.parametrize("every", [7, 3])
def test_sphere_lazy_projection_renormalizes_at_its_steps(scripts, every):
    mod = script(scripts, "sphere")
    params = preset_params(seed=2)
    drift = []

    def check(step, muon):
        for p in params[:2]:
            radius = muon.state[p]["row_radius"]
            rel = (p.detach().norm(dim=-1, keepdim=True) / radius - 1)[radius > 0].abs().max().item()
            if step % every == 0:
                assert rel < 1e-4, (step, p.shape, rel)
            elif step > 1:
                drift.append(rel)

    run_muon(mod, params, settings(mod, "sphere_", sphere_step="project", sphere_every=every), steps=30,
             after_step=check)
    assert max(drift) > 1e-4  # between projections the plain step does leave the sphere


def test_sphere_tangent_projection(scripts):
    mod = script(scripts, "sphere")
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 48, generator=g, dtype=torch.float64)
    radius = W.norm(dim=-1, keepdim=True)
    U = torch.randn(32, 48, generator=g, dtype=torch.float64)
    T = mod.row_tangent(W, U, radius)
    torch.testing.assert_close(mod.row_tangent(W, T, radius), T, rtol=0, atol=1e-12)  # idempotent
    assert float((T * W).sum(-1).abs().max()) < 1e-12  # orthogonal to the normal (the row itself)
    normal = U - T  # what it removes lies along each row
    assert float((normal - (normal * W).sum(-1, keepdim=True) / radius**2 * W).abs().max()) < 1e-12


def test_sphere_geodesic_stays_on_the_sphere_without_retraction(scripts):
    mod = script(scripts, "sphere")
    g = torch.Generator().manual_seed(4)
    W = torch.randn(DIM, 4 * DIM, generator=g, dtype=torch.float64)
    radius = W.norm(dim=-1, keepdim=True)
    for _ in range(STEPS):
        T = mod.row_tangent(W, torch.randn(W.shape, generator=g, dtype=torch.float64), radius)
        W = mod.sphere_geodesic(W, T, 0.05 * T.norm(dim=-1, keepdim=True) / radius, radius)
    assert float((W.norm(dim=-1, keepdim=True) / radius - 1).abs().max()) < 1e-6
    # the angle is what it says: one step of angle theta moves each row by the chord 2 r sin(theta / 2)
    T = mod.row_tangent(W, torch.randn(W.shape, generator=g, dtype=torch.float64), radius)
    theta = torch.full_like(radius, 0.3)
    chord = (mod.sphere_geodesic(W, T, theta, radius) - W).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(chord, 2 * radius * math.sin(0.15), rtol=1e-10, atol=0)


def test_sphere_geodesic_in_fp32_optimizer_without_retraction(scripts):
    """The optimizer's own geodesic (fp32, sphere_every=0) drifts by rounding only."""
    mod = script(scripts, "sphere")
    params = preset_params(seed=5)
    muon = run_muon(mod, params, settings(mod, "sphere_", sphere_every=0))
    for p in params[:2]:
        radius = muon.state[p]["row_radius"]
        rel = (p.detach().norm(dim=-1, keepdim=True) / radius - 1)[radius > 0].abs().max().item()
        assert rel < 2e-5, rel


def test_sphere_at_the_full_shape(scripts):
    mod = script(scripts, "sphere")
    g = torch.Generator().manual_seed(6)
    W = torch.zeros(1024, 4096)
    W[:512] = torch.randn(512, 4096, generator=g) * 0.01  # half the rows start at zero
    state = {}
    for _ in range(STEPS):
        U = torch.randn(W.shape, generator=g) * 0.01
        mod.sphere_step_(W, U, 0.05, 0.99, state, "geodesic", "norm", 1, "free")
    assert float((W[:512].norm(dim=-1) / state["row_radius"][:512, 0] - 1).abs().max()) < 1e-4
    assert float(state["row_radius"][512:].abs().max()) == 0.0 and float(W[512:].norm()) > 0


# ----------------------------------------------------------------------------------------------------------
# stiefel


def on_stiefel(mod, params, start):
    """Every matrix of params has all its singular values equal to the RMS singular value it had in start."""
    for W, W0 in zip(params, start, strict=True):
        for M, M0 in zip(matrices([W.detach()]), matrices([W0.detach()]), strict=True):
            err = gram_error(M, float(mod.stiefel_scale(M0)))
            assert err < 1e-4, (tuple(M.shape), err)


def unit_stiefel(mod, W):
    """The point X with orthonormal columns (rows if wide) nearest W."""
    return mod.stiefel_project(W) / mod.stiefel_scale(W)[..., None, None]


def test_stiefel_weights_keep_equal_singular_values(scripts):
    mod = script(scripts, "stiefel")
    params = preset_params()
    start = [params[0].detach()[:3].clone(), params[1].detach().clone()]
    with torch.no_grad():
        for p in params:
            p.copy_(mod.stiefel_project(p))
    assert float(params[0].detach()[3].norm()) == 0 and float(params[2].detach().norm()) == 0  # zero stays zero
    on_stiefel(mod, [params[0].detach()[:3], params[1]], start)
    run_muon(mod, params, settings(mod, "stiefel_"))
    on_stiefel(mod, [params[0].detach()[:3], params[1]], start)
    # o and the MLP out start at zero: off the manifold, moved by the baseline's step
    assert float(params[0].detach()[3].norm()) > 0.1 and float(params[2].detach().norm()) > 0.1


def test_stiefel_at_the_full_shape(scripts):
    """The MLP in of GPT-2 Medium, [4096, 1024]: 2 steps with one dual-ascent iteration each (the constraint
    does not depend on the iterations: the last O is projected onto the tangent space whatever the gap)."""
    mod = script(scripts, "stiefel")
    g = torch.Generator().manual_seed(21)
    W = mod.stiefel_project(torch.randn(4096, 1024, generator=g))
    keys = settings(mod, "stiefel_", stiefel_dual_iters=1)
    start, state = W.clone(), {}
    for _ in range(2):
        mod.stiefel_step_(W, torch.randn(W.shape, generator=g), 0.05, 1.0, state, keys)
    assert gram_error(W, float(mod.stiefel_scale(start))) < 1e-4
    assert float((W - start).norm()) > 0.1


def test_stiefel_build_optimizers_projects_the_model(scripts):
    mod = script(scripts, "stiefel")
    args = mod.parse_args(["--preset=cpu"])
    model = mod.GPT(args)
    block = model.blocks[0]
    start = [block.attn.qkvo_w.detach()[:3].clone(), block.mlp.fc_w.detach().clone()]
    muon, _ = mod.build_optimizers(model, args, 0, 1)
    on_stiefel(mod, [block.attn.qkvo_w.detach()[:3], block.mlp.fc_w], start)
    assert float(block.attn.qkvo_w.detach()[3].norm()) == 0 and float(block.mlp.proj_w.detach().norm()) == 0
    assert muon.param_groups[0]["stiefel_dual_iters"] == args.stiefel_dual_iters


@pytest.mark.parametrize("shape", [(4 * DIM, DIM), (DIM, 4 * DIM), (DIM, DIM)])
def test_stiefel_tangent_projection(scripts, shape):
    """The projection the dual-ascent step ends with: idempotent, and what it removes is normal (X S, S sym)."""
    mod = script(scripts, "stiefel")
    g = torch.Generator().manual_seed(7)
    Xt, _ = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=g, dtype=torch.float64))
    A = torch.randn(Xt.shape, generator=g, dtype=torch.float64)
    T = mod.stiefel_tangent(Xt, A)
    torch.testing.assert_close(mod.stiefel_tangent(Xt, T), T, rtol=0, atol=1e-12)  # idempotent
    assert float((Xt.mT @ T + T.mT @ Xt).abs().max()) < 1e-12  # tangent
    S = torch.randn(Xt.size(-1), Xt.size(-1), generator=g, dtype=torch.float64)
    assert abs(float((T * (Xt @ (S + S.mT))).sum())) < 1e-10  # orthogonal to the normal space


@pytest.mark.parametrize("shape", [(4 * DIM, DIM), (DIM, 4 * DIM), (DIM, DIM), (3, DIM, DIM)])
def test_stiefel_dual_ascent_step_is_tangent_with_spectral_norm_lr(scripts, shape):
    mod = script(scripts, "stiefel")
    g = torch.Generator().manual_seed(8)
    X = unit_stiefel(mod, torch.randn(shape, generator=g))
    G = torch.randn(shape, generator=g)
    lr = 0.07
    A, iters, rms = mod.stiefel_tangent_step(X, G, lr)
    Xd, Ad = X.double(), A.double()
    decrease = float((G.double() * Ad).sum())
    assert decrease < 0  # a descent direction
    if shape[-2] < shape[-1]:
        Xd, Ad = Xd.mT, Ad.mT
    assert float((Xd.mT @ Ad + Ad.mT @ Xd).abs().max()) < 1e-5 * lr
    spectral = torch.linalg.matrix_norm(Ad, ord=2)
    assert float((spectral / lr - 1).abs().max()) < 1e-3
    if shape[-2] == shape[-1]:  # square: the first multiplier is exact; the optimum is -lr X msign(skew(X^T G))
        assert iters == 1
        K = Xd.mT @ G.double()
        U, _, Vh = torch.linalg.svd(0.5 * (K - K.mT))
        best = float((G.double() * (-lr * Xd @ U @ Vh)).sum())
        assert best * (1 + 1e-5) <= decrease < best * (1 - 1e-3)  # within 0.1% of the optimum


def test_stiefel_dual_ascent_converges_and_beats_plain_projection(scripts):
    """On a Gaussian gradient the dual ascent reaches its tolerance, and its step decreases the loss more
    than the Muon step projected onto the tangent space (the ascent's starting point for square X)."""
    mod = script(scripts, "stiefel")
    g = torch.Generator().manual_seed(9)
    X = unit_stiefel(mod, torch.randn(4 * DIM, DIM, generator=g))
    G = torch.randn(4 * DIM, DIM, generator=g)
    A, iters, rms = mod.stiefel_tangent_step(X, G, 0.1, iters=100, tol=1e-4)
    assert rms <= 1e-4 and iters < 100
    O = mod.msign_fp32(G)
    P = O - X @ mod.symmetric(X.mT @ O)
    P = -0.1 * P / torch.linalg.matrix_norm(P, ord=2)
    assert float((G * A).sum()) < float((G * P).sum()) - 1e-3 * float(G.norm())


def test_stiefel_retraction_lands_on_the_manifold(scripts):
    mod = script(scripts, "stiefel")
    g = torch.Generator().manual_seed(10)
    X = unit_stiefel(mod, torch.randn(4 * DIM, DIM, generator=g))
    A, _, _ = mod.stiefel_tangent_step(X, torch.randn(X.shape, generator=g), 0.3)
    assert gram_error(mod.stiefel_retract(X + A), 1.0) < 1e-5
    assert gram_error(X + A, 1.0) > 1e-3  # the step alone leaves it


# ----------------------------------------------------------------------------------------------------------
# l1_stiefel (stiefel + l1)


def test_soft_threshold_is_the_l1_prox(scripts):
    mod = script(scripts, "l1_stiefel")
    y = torch.tensor([-3.0, -0.5, 0.0, 0.2, 1.0, 2.0])
    assert torch.equal(mod.soft_threshold(y, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 1.0]))
    # the prox minimizes 0.5 |z - y|^2 + tau |z|_1: no nearby point does better
    g = torch.Generator().manual_seed(17)
    y = torch.randn(200, generator=g, dtype=torch.float64)
    z = mod.soft_threshold(y, 0.3)

    def objective(v):
        return 0.5 * (v - y).square().sum(-1) + 0.3 * v.abs().sum(-1)

    others = z + 1e-3 * torch.randn(50, 200, generator=g, dtype=torch.float64)
    assert float(objective(z)) < float(objective(others).min())


def test_l1_stiefel_stays_on_the_manifold_and_sparsifies(scripts):
    mod = script(scripts, "l1_stiefel")
    l1 = {}
    for strength in (0.0, 1.0):
        params = preset_params()
        start = [params[0].detach()[:3].clone(), params[1].detach().clone()]
        with torch.no_grad():
            for p in params:
                p.copy_(mod.stiefel_project(p))
        run_muon(mod, params, settings(mod, "stiefel_", l1_strength=strength))
        on_stiefel(mod, [params[0].detach()[:3], params[1]], start)
        l1[strength] = float(params[1].detach().abs().sum())
    assert l1[1.0] < 0.98 * l1[0.0], l1  # the penalty lowers the L1 norm at the same spectrum


# ----------------------------------------------------------------------------------------------------------
# oblique


def test_oblique_columns_keep_their_norms(scripts):
    mod = script(scripts, "oblique")
    params = preset_params()
    initial = [p.detach().norm(dim=-2, keepdim=True).clone() for p in params]
    start = [p.detach().clone() for p in params]
    muon = run_muon(mod, params, {})
    for p, c0 in zip(params[:2], initial[:2], strict=True):
        radius = muon.state[p]["column_radius"]
        assert torch.equal(radius, c0)
        rel = (p.detach().norm(dim=-2, keepdim=True) / radius - 1)[radius > 0].abs().max().item()
        assert rel < 1e-4, (p.shape, rel)
    assert all(float((p.detach() - p0).norm()) > 0.1 for p, p0 in zip(params, start, strict=True))  # all moved
    # o and the MLP out start at zero: off the manifold, moved by the baseline's step
    assert float(params[0].detach()[3].norm()) > 0.1 and float(params[2].detach().norm()) > 0.1


def test_oblique_tangent_projection(scripts):
    mod = script(scripts, "oblique")
    g = torch.Generator().manual_seed(11)
    W = torch.randn(48, 32, generator=g, dtype=torch.float64)
    radius = W.norm(dim=-2, keepdim=True)
    U = torch.randn(48, 32, generator=g, dtype=torch.float64)
    T = mod.column_tangent(W, U, radius)
    torch.testing.assert_close(mod.column_tangent(W, T, radius), T, rtol=0, atol=1e-12)  # idempotent
    assert float((T * W).sum(-2).abs().max()) < 1e-12  # orthogonal to each column
    normal = U - T
    assert float((normal - (normal * W).sum(-2, keepdim=True) / radius**2 * W).abs().max()) < 1e-12


def test_oblique_at_the_full_shape(scripts):
    mod = script(scripts, "oblique")
    g = torch.Generator().manual_seed(12)
    W = torch.randn(1024, 4096, generator=g) * 0.01
    W[:, :1024] = 0.0  # a quarter of the columns start at zero
    state = {}
    for _ in range(STEPS):
        mod.oblique_step_(W, torch.randn(W.shape, generator=g) * 0.01, 0.05, 0.99, state)
    radius = state["column_radius"]
    assert float((W[:, 1024:].norm(dim=0) / radius[0, 1024:] - 1).abs().max()) < 1e-4
    assert float(radius[0, :1024].abs().max()) == 0.0 and float(W[:, :1024].norm()) > 0


# ----------------------------------------------------------------------------------------------------------
# sl


def test_sl_keeps_log_abs_det(scripts):
    mod = script(scripts, "sl")
    params = preset_params()
    ld0 = torch.linalg.slogdet(params[0].detach()[:3].double()).logabsdet
    fc0 = params[1].detach().clone()
    muon = run_muon(mod, params, {})
    ld = torch.linalg.slogdet(params[0].detach()[:3].double()).logabsdet
    assert float(((ld - ld0) / ld0).abs().max()) < 1e-4, (ld, ld0)
    assert torch.equal(muon.state[params[0]]["log_abs_det"][:3], ld0)
    assert float((params[0].detach()[:3] - preset_params()[0].detach()[:3]).norm()) > 0.1  # it moved
    # attention out (zero, det 0) is off the manifold; the MLP matrices are not square: baseline steps
    assert float(params[0].detach()[3].norm()) > 0.1 and float(params[2].detach().norm()) > 0.1
    assert "log_abs_det" not in muon.state[params[1]] and float((params[1].detach() - fc0).norm()) > 0.1


def test_sl_tangent_projection(scripts):
    mod = script(scripts, "sl")
    g = torch.Generator().manual_seed(13)
    W = torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    U = torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    T = mod.sl_tangent(W, U)
    torch.testing.assert_close(mod.sl_tangent(W, T), T, rtol=0, atol=1e-10)  # idempotent
    trace = torch.linalg.solve(W, T).diagonal(dim1=-2, dim2=-1).sum(-1)  # tr(W^-1 T) = 0: tangent
    assert float(trace.abs().max()) < 1e-10
    normal = U - T  # what it removes is along W^-T
    inv_t = torch.linalg.inv(W).mT
    coef = (normal * inv_t).sum((-2, -1), keepdim=True) / inv_t.square().sum((-2, -1), keepdim=True)
    torch.testing.assert_close(normal, coef * inv_t, rtol=0, atol=1e-10)


def test_sl_at_the_full_square_shape(scripts):
    mod = script(scripts, "sl")
    g = torch.Generator().manual_seed(14)
    bound = math.sqrt(3) * 0.5 / math.sqrt(1024)
    W = (torch.rand(2, 1024, 1024, generator=g) * 2 - 1) * bound
    W[1] = 0.0
    ld0 = torch.linalg.slogdet(W[0].double()).logabsdet
    state = {}
    for _ in range(STEPS):
        mod.sl_step_(W, torch.randn(W.shape, generator=g) / 32, 0.05, 0.99, state)
    ld = torch.linalg.slogdet(W[0].double()).logabsdet
    assert abs(float((ld - ld0) / ld0)) < 1e-4 and float(W[1].norm()) > 0


# ----------------------------------------------------------------------------------------------------------
# symplectic


def symplectic_defect(X):
    """||X^T J X - J||_F / ||J||_F in fp64, per matrix."""
    X = X.double()
    n = X.size(-1) // 2
    J = torch.zeros(X.size(-1), X.size(-1), dtype=torch.float64)
    J[:n, n:], J[n:, :n] = torch.eye(n), -torch.eye(n)
    return (X.mT @ J @ X - J).norm(dim=(-2, -1)) / J.norm()


def test_symplectic_start_is_orthogonal_and_symplectic(scripts):
    mod = script(scripts, "symplectic")
    W = mod.orthosymplectic_start(preset_params()[0].detach())
    X = W[:3].double() / mod.SYMPLECTIC_SCALE
    assert float(symplectic_defect(X).max()) < 1e-6
    torch.testing.assert_close(X.mT @ X, torch.eye(DIM, dtype=torch.float64).expand(3, -1, -1), rtol=0, atol=1e-6)
    assert float(W[3].norm()) == 0  # the attention out stays zero
    assert torch.equal(W, mod.orthosymplectic_start(preset_params()[0].detach()))  # the same on every process
    assert not torch.equal(W[0], W[1])


def test_symplectic_keeps_the_form(scripts):
    """The group is not compact: steps spread X's singular values (here to about 5 and 1/5 in 100 steps;
    500 and 1/500 before the step was bounded by 1/||X||_2), and fp32 rounding of X^T J X grows with
    ||X||_2^2. So the defect is checked against that scale at every step, and plainly (1e-4 relative) while
    ||X||_2 <= 10."""
    mod = script(scripts, "symplectic")
    for polish in (1, 0):  # without the correction the Cayley steps alone still hold it to fp32 rounding
        params = preset_params()
        with torch.no_grad():
            params[0].copy_(mod.orthosymplectic_start(params[0]))
        start, fc0 = params[0].detach().clone(), params[1].detach().clone()
        seen = []

        def after_step(step, muon, params=params, seen=seen):
            X = params[0].detach()[:3] / mod.SYMPLECTIC_SCALE
            seen.append((float(symplectic_defect(X).max()), float(torch.linalg.matrix_norm(X.double(), 2).max())))

        muon = run_muon(mod, params, {"symplectic_polish": polish}, after_step=after_step)
        assert all(d < 1e-6 * norm**2 for d, norm in seen), (polish, seen)
        plain = [d for d, norm in seen if norm <= 10]
        assert len(plain) >= 20 and max(plain) < 1e-4, (polish, plain)
        assert float((params[0].detach()[:3] - start[:3]).norm()) > 0.1  # it moved
        # attention out (zero) is off the manifold; the MLP matrices are not square: baseline steps
        assert muon.state[params[0]]["on_manifold"].tolist() == [True, True, True, False]
        assert float(params[0].detach()[3].norm()) > 0.1 and float(params[2].detach().norm()) > 0.1
        assert "on_manifold" not in muon.state[params[1]] and float((params[1].detach() - fc0).norm()) > 0.1


def test_symplectic_tangent_projection_and_step(scripts):
    mod = script(scripts, "symplectic")
    g = torch.Generator().manual_seed(19)
    n = 40
    J = mod.j_times(torch.eye(n, dtype=torch.float64))
    M = torch.randn(3, n, n, generator=g, dtype=torch.float64)
    H = mod.hamiltonian_part(M)
    torch.testing.assert_close(mod.hamiltonian_part(H), H, rtol=0, atol=1e-12)  # idempotent
    assert float((H.mT @ J + J @ H).abs().max()) < 1e-12  # Hamiltonian: the algebra of the group
    S = torch.randn(3, n, n, generator=g, dtype=torch.float64)
    assert float(((M - H) * (J @ (S + S.mT))).sum((-2, -1)).abs().max()) < 1e-10  # the rest is normal to it
    # at an orthogonal symplectic X the tangent space is X Ham and X P(X^T G) is G's Euclidean projection
    X = mod.orthosymplectic_start(torch.randn(n, n, generator=g, dtype=torch.float64)) / mod.SYMPLECTIC_SCALE
    T = X @ mod.hamiltonian_part(X.mT @ M[0])
    assert float(((M[0] - T) * (X @ J @ (S[0] + S[0].mT))).sum().abs()) < 1e-10
    # the Cayley transform of a Hamiltonian matrix is symplectic; J msign(S) = msign(J S) for symmetric S
    assert float(symplectic_defect(mod.cayley(0.3 * H)).max()) < 1e-12
    sym = S + S.mT
    U, _, Vh = torch.linalg.svd(J @ sym)
    Us, _, Vhs = torch.linalg.svd(sym)
    torch.testing.assert_close(J @ (Us @ Vhs), U @ Vh, rtol=0, atol=1e-10)


def test_symplectic_at_the_full_square_shape(scripts):
    mod = script(scripts, "symplectic")
    g = torch.Generator().manual_seed(20)
    bound = math.sqrt(3) * 0.5 / math.sqrt(1024)
    W = mod.orthosymplectic_start((torch.rand(2, 1024, 1024, generator=g) * 2 - 1) * bound)
    W[1] = 0.0
    state = {}
    for _ in range(STEPS):
        mod.symplectic_step_(W, torch.randn(W.shape, generator=g) / 32, 0.05, 0.99, state)
    assert float(symplectic_defect(W[0] / mod.SYMPLECTIC_SCALE)) < 1e-4 and float(W[1].norm()) > 0


def test_symplectic_build_optimizers_starts_on_the_manifold(scripts):
    mod = script(scripts, "symplectic")
    args = mod.parse_args(["--preset=cpu", "--symplectic_polish=-1"])
    with pytest.raises(SystemExit, match="symplectic_polish"):
        mod.build_optimizers(mod.GPT(args), args, 0, 1)
    args = mod.parse_args(["--preset=cpu"])
    model = mod.GPT(args)
    mod.build_optimizers(model, args, 0, 1)
    qkvo = model.blocks[0].attn.qkvo_w.detach()
    assert float(symplectic_defect(qkvo[:3] / mod.SYMPLECTIC_SCALE).max()) < 1e-5 and float(qkvo[3].norm()) == 0


# ----------------------------------------------------------------------------------------------------------
# block_stiefel

HEADS = 2  # the CPU preset's num_heads


def test_block_stiefel_head_blocks_round_trip(scripts):
    mod = script(scripts, "block_stiefel")
    W = torch.randn(3, DIM, DIM, generator=torch.Generator().manual_seed(15))
    B = mod.head_blocks(W, HEADS)
    hd = DIM // HEADS
    assert B.shape == (3, HEADS, hd, DIM)
    torch.testing.assert_close(B[1, 1], W[1, hd:])  # head 1 of k: its output rows
    assert torch.equal(B.flatten(-3, -2), W)


def test_block_stiefel_head_blocks_stay_on_the_manifold(scripts):
    mod = script(scripts, "block_stiefel")
    params = preset_params()
    with torch.no_grad():
        params[0].copy_(mod.head_block_project(params[0], HEADS))
    fc0 = params[1].detach().clone()
    assert float(params[0].detach()[3].norm()) == 0
    run_muon(mod, params, {"heads": HEADS})
    blocks = mod.head_blocks(params[0].detach(), HEADS)
    for block in blocks[:3].flatten(0, 1):
        err = gram_error(block, mod.HEAD_BLOCK_SCALE)
        assert err < 1e-4, err
    # the whole matrices are not orthogonal (only their head blocks are)
    assert gram_error(params[0].detach()[0], mod.HEAD_BLOCK_SCALE) > 1e-2
    assert float(params[0].detach()[3].norm()) > 0.1 and float((params[1].detach() - fc0).norm()) > 0.1


def test_block_stiefel_at_the_full_shape(scripts):
    """GPT-2 Medium's q, k, v [3, 1024, 1024] with 16 heads of 64: 100 steps keep every head block on its
    manifold (the updates: Gaussian directions of Muon's size, spectral norm about 2)."""
    mod = script(scripts, "block_stiefel")
    g = torch.Generator().manual_seed(22)
    W = torch.randn(4, 1024, 1024, generator=g) * 0.02
    W[3] = 0.0  # the attention out starts at zero, off the manifold, as in the model
    W = mod.head_block_project(W, 16)[:3]
    start = W.clone()
    for _ in range(STEPS):
        mod.head_block_step_(W, torch.randn(W.shape, generator=g) / 32, 0.05, 16)
    errors = [gram_error(block, mod.HEAD_BLOCK_SCALE) for block in mod.head_blocks(W, 16).flatten(0, 1)]
    assert len(errors) == 48 and max(errors) < 1e-4, max(errors)
    assert float((W - start).norm()) > 0.1


def test_block_stiefel_tangent_projection(scripts):
    mod = script(scripts, "block_stiefel")
    g = torch.Generator().manual_seed(16)
    Q, _ = torch.linalg.qr(torch.randn(2, DIM, DIM // HEADS, generator=g, dtype=torch.float64))
    X = Q.mT  # wide, orthonormal rows
    A = torch.randn(X.shape, generator=g, dtype=torch.float64)
    T = mod.wide_stiefel_tangent(X, A)
    torch.testing.assert_close(mod.wide_stiefel_tangent(X, T), T, rtol=0, atol=1e-12)  # idempotent
    assert float((T @ X.mT + X @ T.mT).abs().max()) < 1e-12  # tangent
    S = torch.randn(2, DIM // HEADS, DIM // HEADS, generator=g, dtype=torch.float64)
    assert float((T * ((S + S.mT) @ X)).sum((-2, -1)).abs().max()) < 1e-10  # orthogonal to the normal space


def test_block_stiefel_build_optimizers_projects_the_heads(scripts):
    mod = script(scripts, "block_stiefel")
    args = mod.parse_args(["--preset=cpu"])
    model = mod.GPT(args)
    mod.build_optimizers(model, args, 0, 1)
    blocks = mod.head_blocks(model.blocks[0].attn.qkvo_w.detach(), args.num_heads)
    for block in blocks[:3].flatten(0, 1):
        assert gram_error(block, mod.HEAD_BLOCK_SCALE) < 1e-5
    assert float(blocks[3].norm()) == 0


# ----------------------------------------------------------------------------------------------------------
# every step goes downhill: against the update it is given (a sign error would still keep the constraint)


def first_order_change(step, W, U):
    """<U, W_after - W_before> for one in-place step of W along the update (or gradient) U."""
    before = W.clone()
    step(W, U)
    return float((U.double() * (W.double() - before.double())).sum())


def test_every_geometry_step_goes_downhill(scripts):
    g = torch.Generator().manual_seed(18)
    W, U = preset_params()[1].detach().clone(), torch.randn(4 * DIM, DIM, generator=g)
    sphere = script(scripts, "sphere")
    for kind in ("geodesic", "project"):
        def sphere_step(w, u, kind=kind):
            sphere.sphere_step_(w, u, 0.05, 1.0, {}, kind, "norm", 1, "enter")

        assert first_order_change(sphere_step, W.clone(), U) < 0, kind
    oblique = script(scripts, "oblique")
    assert first_order_change(lambda w, u: oblique.oblique_step_(w, u, 0.05, 1.0, {}), W.clone(), U) < 0
    stiefel = script(scripts, "stiefel")
    X = stiefel.stiefel_project(W)
    keys = settings(stiefel, "stiefel_")
    assert first_order_change(lambda w, u: stiefel.stiefel_step_(w, u, 0.05, 1.0, {}, keys), X.clone(), U) < 0
    sl = script(scripts, "sl")
    Q = preset_params()[0].detach()[:3].clone()
    V = torch.randn(Q.shape, generator=g)
    assert first_order_change(lambda w, u: sl.sl_step_(w, u, 0.05, 1.0, {}), Q.clone(), V) < 0
    block = script(scripts, "block_stiefel")
    S = block.head_block_project(preset_params()[0].detach(), HEADS)[:3]
    V = torch.randn(S.shape, generator=g)
    assert first_order_change(lambda w, u: block.head_block_step_(w, u, 0.05, HEADS), S.clone(), V) < 0
    symplectic = script(scripts, "symplectic")
    P = symplectic.orthosymplectic_start(preset_params()[0].detach())[:3].clone()
    V = torch.randn(P.shape, generator=g)
    assert first_order_change(lambda w, u: symplectic.symplectic_step_(w, u, 0.05, 1.0, {}), P, V) < 0


# ----------------------------------------------------------------------------------------------------------
# each variant: short CPU-preset runs end finite, and 2 processes equal 1 process accumulating 2 micro-batches

GEOMETRY_VARIANTS = ["sphere", "stiefel", "l1_stiefel", "oblique", "block_stiefel", "sl", "symplectic"]
RUN_STEPS = 4

# Runs every variant's main() in one launch (one torch import and, under torchrun, one process group for
# all of them): process start-up is most of a short run's cost.
@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory, tiny_data):
    """{nproc: {variant: [(step, val_loss)]}} for RUN_STEPS steps on 2 micro-batches, 1 and 2 processes.
    One launch per variant and process count: each run gets its own process group, as a user's does."""
    tmp = tmp_path_factory.mktemp("geometry_runs")
    out = {}
    for nproc in (1, 2):
        out[nproc] = {}
        for v in GEOMETRY_VARIANTS:
            script = ROOT / "speedruns" / f"train_gpt_medium_{v}.py"
            _, log, _ = run_training(script, tmp / f"p{nproc}", tiny_data, "--micro_batches=2",
                                     f"--num_iterations={RUN_STEPS}", f"--val_loss_every={RUN_STEPS // 2}",
                                     "--fuse_micro_batches=0", nproc=nproc, run_id=v)  # the same sums as 2 processes
            run = parse_log(log).runs[0]
            assert run.finished and run.steps == RUN_STEPS, v
            out[nproc][v] = [(x.step, x.val_loss) for x in run.validations]
    return out


@pytest.mark.parametrize("variant", GEOMETRY_VARIANTS)
def test_short_run_is_finite_and_learns(variant_runs, variant):
    curve = variant_runs[1][variant]
    assert [s for s, _ in curve] == [0, RUN_STEPS // 2, RUN_STEPS]
    assert all(math.isfinite(v) for _, v in curve)
    assert curve[-1][1] < curve[0][1] - 0.05


@pytest.mark.parametrize("variant", GEOMETRY_VARIANTS)
def test_two_processes_equal_one_accumulating(variant_runs, variant):
    for (s1, l1), (s2, l2) in zip(variant_runs[1][variant], variant_runs[2][variant], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=2e-4)
