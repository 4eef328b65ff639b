"""Each optimizer swap's math, tested on the functions of the generated variant scripts (loaded by path)."""

import pytest
import torch
from variant_scripts import load_script, msign, planted

ORIGINAL_MUON = (3.4445, -4.7750, 2.0315)


@pytest.fixture(scope="module")
def scripts():
    # adamw against torch.optim.AdamW: tests/test_leaderboard_variants.py
    names = ["baseline", "polar", "ns_original", "svd", "cutoff", "polar_normuon", "polar_normuon_cwd"]
    return {name: load_script(name) for name in names}


def rel_err(O, ref):
    return float((O.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_polar_express_beats_tuned_ns5_on_ill_conditioned(scripts, shape):
    m, n = shape
    for lo in (1e-6, 1e-3):
        G, ref = planted(torch.logspace(torch.log10(torch.tensor(lo)), 0, min(m, n)), m, n, seed=1)
        polar = rel_err(scripts["polar"].orthogonalize(G.float()), ref)
        tuned = rel_err(scripts["baseline"].orthogonalize(G.float()), ref)
        assert polar < tuned, (lo, polar, tuned)


def test_ns_original_is_five_steps_of_the_original_quintic(scripts):
    G = torch.randn(3, 40, 70, generator=torch.Generator().manual_seed(2))
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = ORIGINAL_MUON
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(scripts["ns_original"].orthogonalize(G), X, rtol=1e-5, atol=1e-5)
    tall = scripts["ns_original"].orthogonalize(G.mT)  # tall input: transposed inside, same answer
    torch.testing.assert_close(tall, X.mT, rtol=1e-5, atol=1e-5)


def well_conditioned(*shape, seed):
    """A planted fp64 matrix (or stack) with singular values in [0.5, 2]: its U V^T is stable in fp32."""
    *batch, m, n = shape
    spectrum = torch.linspace(0.5, 2.0, min(m, n))
    if not batch:
        return planted(spectrum, m, n, seed=seed)[0]
    return torch.stack([planted(spectrum, m, n, seed=seed + i)[0] for i in range(batch[0])])


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 48), (4, 32, 32)])
def test_svd_is_exact_polar_factor(scripts, shape):
    G = well_conditioned(*shape, seed=3).float()
    O = scripts["svd"].orthogonalize(G)
    assert O.dtype == torch.float32 and O.shape == G.shape
    assert rel_err(O, msign(G)) < 1e-5
    k = min(shape[-2:])
    gram = O.mT @ O if shape[-2] >= shape[-1] else O @ O.mT
    torch.testing.assert_close(gram, torch.eye(k).expand_as(gram), atol=1e-5, rtol=0)


def test_svd_keeps_zero_momentum_zero(scripts):
    G = well_conditioned(4, 16, 16, seed=9).float()
    G[:3] = 0.0  # step 1: q, k, v get no gradient while o is zero-initialized
    O = scripts["svd"].orthogonalize(G)
    assert torch.equal(O[:3], torch.zeros(3, 16, 16))
    assert rel_err(O[3], msign(G[3])) < 1e-5


def unit_spectrum(kept: tuple[float, float], dropped: tuple[float, float], k: int) -> torch.Tensor:
    """k // 2 singular values log-spaced over each of two ranges, scaled to unit Frobenius norm (fp64)."""
    half = k // 2
    s = torch.cat([torch.logspace(*torch.tensor(kept).log10(), half, dtype=torch.float64),
                   torch.logspace(*torch.tensor(dropped).log10(), k - half, dtype=torch.float64)])
    return s / s.norm()


CUTOFF = 1e-3


def cutoff_spectra(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(near, wide): k unit-norm singular values, half above CUTOFF and half below.

    fp32 SVD resolves a singular value to ~1e-7 of the norm and a singular subspace to ~1e-7 / (its gap),
    so `near` keeps every value > 2.5x away from the cutoff (which values survive is then certain), and
    `wide` has a gap of > 40x on each side (which directions survive is then certain to fp32 precision).
    """
    near = unit_spectrum((1e-2, 1.0), (1e-6, 4e-4), k)
    wide = unit_spectrum((1e-1, 1.0), (1e-7, 1e-5), k)
    for sv, margin in ((near, 2.5), (wide, 40)):
        ratio = sv / CUTOFF
        assert bool(((ratio > margin) | (ratio < 1 / margin)).all()) and int((ratio > 1).sum()) == k // 2
    return near, wide


def test_cutoff_singular_values_are_zero_or_one(scripts):
    assert scripts["cutoff"].CUTOFF_THRESHOLD == CUTOFF
    near, wide = cutoff_spectra(48)
    for sv in (near, 7.0 * near):  # the threshold applies to G / ||G||_F, not to G
        G, _ = planted(sv, 48, 80, seed=4)
        O = scripts["cutoff"].orthogonalize(G.float())
        s = torch.linalg.svdvals(O.double())
        ones = (s - 1).abs() < 1e-5
        zeros = s.abs() < 1e-5
        assert bool((ones | zeros).all()), s
        # exactly the directions above CUTOFF of the Frobenius-normalized matrix survive
        assert int(ones.sum()) == int((sv / sv.norm() > CUTOFF).sum()) == 24
    # the survivors are those directions: O equals U_kept V_kept^T
    G, _ = planted(wide, 48, 80, seed=5)
    O = scripts["cutoff"].orthogonalize(G.float())
    U, S, Vh = torch.linalg.svd(G / G.norm(), full_matrices=False)
    keep = S > CUTOFF
    torch.testing.assert_close(O.double(), U[:, keep] @ Vh[keep], atol=1e-5, rtol=0)


def test_cutoff_handles_stacked_attention_weights(scripts):
    near, wide = cutoff_spectra(32)
    mats = [planted(wide if i % 2 else near, 32, 32, seed=10 + i)[0] for i in range(4)]
    scales = torch.tensor([1.0, 1e3, 1e-3, 7.0], dtype=torch.float64)
    stacked = torch.stack([s * M for s, M in zip(scales, mats, strict=True)]).float()  # [4, d, d] like qkvo_w
    O = scripts["cutoff"].orthogonalize(stacked)
    assert O.shape == (4, 32, 32)
    for i in range(4):  # each matrix is normalized and cut on its own: the scale does not matter
        s = torch.linalg.svdvals(O[i].double())
        assert int(((s - 1).abs() < 1e-5).sum()) == 16 and int((s.abs() < 1e-5).sum()) == 16
        if i % 2:  # with a wide gap the kept directions are resolved to fp32 precision
            alone = scripts["cutoff"].orthogonalize(mats[i].float())
            torch.testing.assert_close(O[i], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (4, 16, 16)])
def test_normuon_equalizes_neuron_rms_and_keeps_frobenius_norm(scripts, shape):
    mod = scripts["polar_normuon"]
    g = torch.Generator().manual_seed(5)
    O = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 3  # unequal rows
    v = torch.zeros_like(mod.neuron_mean_square(O))
    out = mod.normuon_normalize(O, v)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), O.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    neuron_dim = -1 if shape[-2] >= shape[-1] else -2
    rms = out.square().mean(dim=neuron_dim).sqrt()
    assert float((rms.amax(-1) / rms.amin(-1) - 1).abs().max()) < 1e-4  # equal per neuron, per matrix
    torch.testing.assert_close(v, (1 - mod.NORMUON_BETA2) * mod.neuron_mean_square(O))  # EMA updated in place
    # a second step mixes the old statistics in: the EMA, not the last update alone
    O2 = torch.randn(*shape, generator=g)
    v_before = v.clone()
    mod.normuon_normalize(O2, v)
    expected = mod.NORMUON_BETA2 * v_before + (1 - mod.NORMUON_BETA2) * mod.neuron_mean_square(O2)
    torch.testing.assert_close(v, expected)


def test_normuon_runs_inside_muon_after_polar(scripts):
    mod = scripts["polar_normuon"]
    g = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(24, 40, generator=g))
    p.grad = torch.randn(24, 40, generator=g)
    w0, grad = p.detach().clone(), p.grad.clone()
    opt = mod.Muon([dict(params=[p])], lr=0.1, momentum=0.9, weight_decay=0.0)
    opt.step()
    nesterov = 0.9 * (0.1 * grad) + 0.1 * grad  # buf = 0.1 g after one step, then m * buf + (1 - m) g
    v = torch.zeros(1, 40)
    expected = mod.normuon_normalize(mod.orthogonalize(nesterov).float(), v)
    torch.testing.assert_close(p.detach(), w0 - 0.1 * expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["neuron_second_moment"], v)


def test_cautious_decay_touches_only_agreeing_coordinates(scripts):
    mod = scripts["polar_normuon_cwd"]
    g = torch.Generator().manual_seed(7)
    w = torch.randn(30, 50, generator=g)
    u = torch.randn(30, 50, generator=g)
    u[0, :5] = 0.0  # zero update counts as agreeing (u * w >= 0)
    w0 = w.clone()
    mod.cautious_decay_(w, u, 0.1)
    agree = u * w0 >= 0
    assert 0 < int(agree.sum()) < agree.numel()
    assert torch.equal(w[~agree], w0[~agree])
    torch.testing.assert_close(w[agree], 0.9 * w0[agree])


def test_cautious_decay_inside_muon_is_tied_to_lr(scripts):
    mod = scripts["polar_normuon_cwd"]
    g = torch.Generator().manual_seed(8)
    p = torch.nn.Parameter(torch.randn(24, 40, generator=g))
    p.grad = torch.randn(24, 40, generator=g)
    w0 = p.detach().clone()
    opt = mod.Muon([dict(params=[p], wd_mul=2.0)], lr=0.05, momentum=0.0, weight_decay=0.3)
    opt.step()
    update = mod.normuon_normalize(mod.orthogonalize(p.grad.clone()).float(), torch.zeros(1, 40))
    decayed = torch.where(update * w0 >= 0, w0 * (1 - 0.05 * 0.3 * 2.0), w0)
    torch.testing.assert_close(p.detach(), decayed - 0.05 * update, rtol=1e-5, atol=1e-6)
