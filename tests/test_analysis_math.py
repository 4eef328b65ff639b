"""analysis_lib math and property tree on planted data whose answers are known."""

import math
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis_lib import spectral as sp  # noqa: E402
from analysis_lib import tree  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices on a shared CPU: a second thread only spins (20x slower SVDs)
    yield
    torch.set_num_threads(threads)


def orthonormal(rows, cols, gen):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def planted_matrix(s, m, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(s, dtype=torch.float64)
    u, v = orthonormal(m, len(s), gen), orthonormal(n, len(s), gen)
    return u, v, u @ torch.diag(s) @ v.T


def planted_replicas(m, n, s, sigma, replicas, seed):
    """Low-rank signal U diag(s) V^T plus iid N(0, sigma^2) noise per replica. -> (U, V, G [R, m, n] fp32)."""
    u, v, signal = planted_matrix(s, m, n, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    noise = sigma * torch.randn(replicas, m, n, generator=gen, dtype=torch.float64)
    return u.float(), v.float(), (signal + noise).float()


# ------------------------------------------------------------------------------ scalar properties


def test_scalar_properties_on_planted_singular_values():
    s_true = [4.0, 2.0, 1.0, 0.5]
    _, _, a = planted_matrix(s_true, 7, 4)
    s = sp.svd(a.float())[1]
    assert s.shape == (4,)
    energy = sum(x * x for x in s_true)
    p = np.array(s_true) / sum(s_true)
    q = np.array(s_true) ** 2 / energy
    assert sp.spectral_norm(s) == pytest.approx(4.0, rel=1e-5)
    assert sp.frobenius_norm(s) == pytest.approx(math.sqrt(energy), rel=1e-5)
    assert sp.stable_rank(s) == pytest.approx(energy / 16, rel=1e-5)
    assert sp.effective_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    assert sp.spectral_entropy(s) == pytest.approx(-(q * np.log(q)).sum() / math.log(4), rel=1e-5)
    assert sp.condition_number(s) == pytest.approx(8.0, rel=1e-4)
    assert sp.top_k_energy(s, 2) == pytest.approx(20 / energy, rel=1e-5)


def test_scalar_properties_at_their_extremes():
    flat = torch.ones(6)  # an orthogonal matrix
    assert sp.stable_rank(flat) == pytest.approx(6)
    assert sp.effective_rank(flat) == pytest.approx(6)
    assert sp.spectral_entropy(flat) == pytest.approx(1.0)
    assert sp.condition_number(flat) == pytest.approx(1.0)
    rank_one = torch.tensor([3.0, 0.0, 0.0])
    assert sp.stable_rank(rank_one) == pytest.approx(1.0)
    assert sp.effective_rank(rank_one) == pytest.approx(1.0)
    assert sp.spectral_entropy(rank_one) == pytest.approx(0.0)
    assert sp.condition_number(rank_one) == math.inf
    zero = torch.zeros(4)
    assert math.isnan(sp.stable_rank(zero)) and math.isnan(sp.condition_number(zero))


def test_powerlaw_alpha_recovers_a_planted_pareto_tail():
    rng = np.random.default_rng(3)
    alpha, xmin = 2.5, 4.0
    tail = xmin * (1 - rng.random(1500)) ** (-1 / (alpha - 1))
    bulk = rng.uniform(0.05, 0.8 * xmin, 500)
    s = torch.from_numpy(np.sqrt(np.concatenate([tail, bulk])))
    got, got_xmin, ks = sp.powerlaw_alpha(s)
    assert got == pytest.approx(alpha, rel=0.05)
    assert xmin * 0.8 <= got_xmin <= xmin * 2
    assert 0 <= ks < 0.05
    assert all(math.isnan(x) for x in sp.powerlaw_alpha(torch.zeros(50)))


# ------------------------------------------------------------------------------ replicas and echo


def test_noise_variance_and_plateau_on_planted_noise():
    m, n, sigma, r = 64, 96, 0.3, 8
    s = [40.0, 25.0, 10.0]
    _, _, g = planted_replicas(m, n, s, sigma, r, seed=1)
    energies = sp.replica_energies(g, g.mean(0))
    assert sp.noise_variance(energies, g.shape) == pytest.approx(sigma**2, rel=0.05)
    signal = sum(x * x for x in s)
    assert sp.plateau_rho(energies) == pytest.approx(signal / (signal + m * n * sigma**2), abs=0.03)
    same = torch.stack([g[0]] * 4)
    flat = sp.replica_energies(same, g[0])
    assert sp.noise_variance(flat, same.shape) == pytest.approx(0.0, abs=1e-12)
    assert sp.plateau_rho(flat) == pytest.approx(1.0)
    assert math.isnan(sp.plateau_rho(sp.replica_energies(torch.zeros(3, 2, 2), torch.zeros(2, 2))))


def same_numbers(a, b):
    """Equal up to a few units in the last place: the same computation in other memory may take another
    code path in some BLAS/LAPACK builds (alignment), which changes rounding, never the result."""
    if not b.is_floating_point():  # assignments, signs: exactly equal
        return torch.equal(a, b)
    eps = torch.finfo(b.dtype).eps
    return a.shape == b.shape and torch.allclose(a, b, rtol=64 * eps, atol=64 * eps * float(b.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(30, 30), (20, 50), (50, 20)])
def test_svd_agrees_with_torch_and_overwrites_only_when_asked(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    keep = x.clone()
    u, s, v = sp.svd(x)
    assert torch.equal(x, keep)  # overwrite=False leaves the input alone
    k = min(shape)
    assert u.shape == (shape[0], k) and s.shape == (k,) and v.shape == (shape[1], k)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(s, torch.linalg.svdvals(keep), rtol=tol, atol=tol)
    assert torch.all(s[:-1] >= s[1:])
    assert torch.allclose((u * s) @ v.mT, keep, atol=tol * 10)
    eye = torch.eye(k, dtype=dtype)
    assert torch.allclose(u.mT @ u, eye, atol=tol) and torch.allclose(v.mT @ v, eye, atol=tol)
    u2, s2, v2 = sp.svd(x, overwrite=True)  # same LAPACK call on the same numbers: the same factors
    assert same_numbers(s2, s) and same_numbers(u2, u) and same_numbers(v2, v)
    k_long = torch.full((k, max(shape)), math.nan, dtype=dtype)
    u3, s3, v3 = sp.svd(keep.clone(), overwrite=True, long_into=k_long)  # longer side straight into a buffer
    assert same_numbers(s3, s) and same_numbers(u3, u) and same_numbers(v3, v)
    assert torch.equal(k_long, (v3 if shape[0] <= shape[1] else u3).mT)
    tu, ts, tv = sp.torch_svd(keep[None])  # batches take torch's path
    assert torch.allclose(ts[0], s, rtol=tol, atol=tol)
    assert torch.allclose((tu[0] * ts[0]) @ tv[0].mT, keep, atol=tol * 10)


def test_svd_rejects_non_finite_input():
    x = torch.randn(6, 4)
    x[2, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        sp.svd(x)


def test_assignment_recovers_permutation_and_signs_exactly():
    gen = torch.Generator().manual_seed(5)
    m, n, k = 20, 12, 12
    u, v = orthonormal(m, k, gen), orthonormal(n, k, gen)
    perm = torch.randperm(k, generator=gen)
    sign = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0).double()
    ur, vr = u[:, perm] * sign, v[:, perm] * sign
    cost = ((u.T @ ur).abs() * (v.T @ vr).abs()).numpy()
    got = sp.assign_directions(cost)
    assert torch.equal(perm[torch.from_numpy(got)], torch.arange(k))


def test_assignment_matches_scipy_on_noisy_overlaps():
    from scipy.optimize import linear_sum_assignment
    gen = torch.Generator().manual_seed(6)
    ref = sp.svd(torch.randn(60, 40, generator=gen, dtype=torch.float64))
    for noise in (0.05, 0.5, 3.0):  # from nearly the same directions (all sure) to unrelated ones
        g = ref[0] @ torch.diag(ref[1]) @ ref[2].T + noise * torch.randn(60, 40, generator=gen, dtype=torch.float64)
        other = sp.svd(g)
        cost = ((ref[0].T @ other[0]).abs() * (ref[2].T @ other[2]).abs()).numpy()
        rows, cols = linear_sum_assignment(cost, maximize=True)
        got = sp.assign_directions(cost.copy())  # it overwrites its argument
        assert sorted(got) == list(range(40))
        assert cost[np.arange(40), got].sum() == pytest.approx(cost[rows, cols].sum(), rel=1e-12)


def test_alignment_undoes_the_reordering_of_replica_svds():
    # Replica r = U diag(s_r) V^T with s_r a permutation of s: its SVD lists the directions in another
    # order, with arbitrary signs; alignment must bring back U, V and report s_r in the reference order.
    gen = torch.Generator().manual_seed(7)
    m, n, k, r = 16, 10, 10, 4
    u, v = orthonormal(m, k, gen), orthonormal(n, k, gen)
    s = torch.linspace(10, 1, k, dtype=torch.float64)
    perms = [torch.randperm(k, generator=gen) for _ in range(r)]
    reps = torch.stack([u @ torch.diag(s[p]) @ v.T for p in perms])
    al = sp.align_replicas(u, v, reps)
    for i, p in enumerate(perms):
        assert torch.allclose(al["u"][i], u, atol=1e-10) and torch.allclose(al["v"][i], v, atol=1e-10)
        assert torch.allclose(al["s"][i], s[p], atol=1e-10)
        assert torch.equal(torch.sort(s[p], descending=True).indices[al["perm"][i]], torch.arange(k))
    assert torch.allclose(al["cos_u"], torch.ones(r, k, dtype=torch.float64))
    assert torch.allclose(al["cos_v"], torch.ones(r, k, dtype=torch.float64))


def test_echo_estimator_is_exact_on_noiseless_reverb_matrices():
    # Z_ab = z_a z_b off the diagonal (what the reverb entries estimate): every pivot must read its own
    # z_a, equal or not. The former estimator read equal echoes c as c sqrt((R - 2) / R).
    r = 6
    z_equal = torch.full((r,), 0.7, dtype=torch.float64)
    z_mixed = torch.tensor([0.95, 0.9, 0.6, 0.3, 0.1, 0.02], dtype=torch.float64)
    z = torch.stack([torch.outer(z_equal, z_equal), torch.outer(z_mixed, z_mixed), torch.zeros_like(z_equal).diag()])
    z.diagonal(dim1=1, dim2=2).zero_()
    got = sp.echo_per_pivot(z)
    assert torch.allclose(got[0], z_equal, rtol=1e-12)
    assert torch.allclose(got[1], z_mixed, rtol=1e-12)
    assert torch.equal(got[2], torch.zeros(r, dtype=torch.float64))  # no evidence: 0
    assert torch.allclose(sp.echo_estimate(z[:2]), torch.tensor([0.7, (0.6 + 0.3) / 2], dtype=torch.float64))
    # Three replicas are the fewest that separate the echoes; fp32 matches too.
    three = torch.outer(z_mixed[:3], z_mixed[:3]).float()
    three.fill_diagonal_(0)
    assert torch.allclose(sp.echo_per_pivot(three[None])[0], z_mixed[:3].float(), rtol=1e-5)
    with pytest.raises(ValueError, match="at least 3 replicas"):
        sp.echo_per_pivot(torch.zeros(1, 2, 2))


@pytest.mark.parametrize("replicas", [5, 20])  # the pair loop and the batched-matmul path
def test_reverb_matrix_entries(replicas):
    gen = torch.Generator().manual_seed(8)
    u, v = torch.randn(replicas, 9, 6, generator=gen), torch.randn(replicas, 7, 6, generator=gen)
    z = sp.reverb_matrix(u, v, chunk=4)
    for i, a, b in ((0, 1, 2), (5, 3, 0), (2, 4, 4)):
        want = 0.0 if a == b else float((u[a, :, i] @ u[b, :, i]) * (v[a, :, i] @ v[b, :, i]))
        assert float(z[i, a, b]) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert torch.allclose(z, z.mT)


def echo_errors(m, n, replicas, seed, sigma=1.0):
    """m x n with 12 planted directions between 1x and 4x the noise edge plus N(0, sigma^2) noise
    (sigma: a float, or one per replica). The truth is what the estimator converges to: the echo of
    replica r, <u_i, u_hat_i^r> <v_i, v_hat_i^r>, with its directions aligned as analysed.
    -> (mean error of the echo, its RMSE, per-pivot errors [k, R], the tree's results)."""
    k = 12
    edge = math.sqrt(m) + math.sqrt(n)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
    u, v, g = planted_replicas(m, n, torch.linspace(4.0, 1.0, k) * edge, sigma, replicas, seed)
    res, _ = tree.run(["echo", "echo_pivots", "sv_median", "tau2", "kappa", "sigma2"], {"replicas": g})
    um, _, vm = sp.svd(g.mean(0))
    al = sp.align_replicas(um, vm, g)
    true = torch.einsum("mk,rmk->rk", u, al["u"][:, :, :k]) * torch.einsum("nk,rnk->rk", v, al["v"][:, :, :k])
    error = res["echo"][:k] - sp.median_over(true, 0)
    return float(error.mean()), float((error**2).mean().sqrt()), res["echo_pivots"][:k] - true.T, res


@pytest.mark.parametrize("shape", [(128, 256), (256, 1024)])
def test_echo_is_unbiased_at_few_replicas(shape):
    # The former estimator: bias -0.124 at R = 8 (the factor sqrt(6/8)), RMSE 0.124.
    for seed in (11, 12):
        bias, rmse, _, _ = echo_errors(*shape, 8, seed)
        print(f"echo at R=8, {shape}, seed {seed}: bias {bias:+.4f}, RMSE {rmse:.4f}")
        assert abs(bias) <= 0.01 and rmse <= 0.02


def test_echo_error_shrinks_with_replicas():
    rmse = {r: echo_errors(128, 256, r, seed=13)[1] for r in (8, 64)}
    print("echo RMSE by R:", {r: round(e, 4) for r, e in rmse.items()})
    assert rmse[64] <= 0.005 and rmse[8] > 2 * rmse[64]


def test_echo_of_replicas_with_unequal_noise():
    # Replica noise from 0.4 to 2: the echoes differ between replicas. Each pivot must read its own
    # (0.010-0.013 RMS; the former estimator rescaled by sqrt(R / (R - 2)), exact for equal echoes
    # only, reads 0.036-0.037 here).
    for seed in (14, 15):
        _, _, pivots, _ = echo_errors(128, 256, 8, seed, sigma=torch.linspace(0.4, 2.0, 8))
        bias, rmse = float(pivots.mean()), float((pivots**2).mean().sqrt())
        print(f"per-pivot echo, unequal noise, seed {seed}: bias {bias:+.4f}, RMSE {rmse:.4f}")
        assert abs(bias) <= 0.01 and rmse <= 0.02


def test_kappa_does_not_depend_on_the_number_of_replicas():
    # With the former estimator kappa was ~1.05 at R = 8 and ~0.5 at R = 64 on this planted noise.
    kappas = {}
    for r in (8, 64):
        runs = [echo_errors(128, 256, r, seed)[3] for seed in (16, 17)]
        for res in runs:
            assert res["sigma2"] == pytest.approx(1.0, rel=0.05)
        kappas[r] = sum(res["kappa"] for res in runs) / len(runs)
    print("kappa by R:", {r: round(k, 3) for r, k in kappas.items()})
    assert 0.2 < kappas[64] < 0.8
    assert kappas[8] == pytest.approx(kappas[64], rel=0.10)


def test_tau2_fit_recovers_the_law():
    rng = np.random.default_rng(2)
    tau2 = 850.0
    s = np.sort(rng.uniform(10, 200, 300))[::-1]
    zeta = sp.echo_law(s, tau2) + rng.normal(0, 0.01, s.size)
    assert sp.fit_tau2(s, zeta) == pytest.approx(tau2, rel=0.02)
    # Directions below s_min are left out of the fit, whatever their echo.
    spoiled = np.where(s < 40, 0.0, zeta)
    assert sp.fit_tau2(s, spoiled, s_min=40) == pytest.approx(tau2, rel=0.02)
    assert math.isnan(sp.fit_tau2(s, zeta, s_min=1e9))


# ------------------------------------------------------------------------------ subspaces, orthogonalization


def test_subspace_alignment_of_known_angles():
    gen = torch.Generator().manual_seed(0)
    q = orthonormal(10, 4, gen)
    assert sp.subspace_alignment(q, q, 4) == pytest.approx(1.0)
    assert sp.subspace_alignment(q[:, :2], q[:, 2:], 2) == pytest.approx(0.0, abs=1e-12)
    tilted = (q[:, :2] + q[:, 2:]) / math.sqrt(2)  # 45 degrees from span(q[:, :2])
    assert sp.subspace_alignment(q[:, :2], tilted, 2) == pytest.approx(math.sqrt(0.5))


def scalar_iteration(s, coeffs, scale):
    x = np.asarray(s, dtype=np.float64) / scale
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_orthogonalizers_act_on_singular_values_only(shape):
    s = np.array([3.0, 1.0, 0.3, 0.05, 0.01])
    u, v, a = planted_matrix(s, *shape, seed=4)
    frob = float(np.sqrt((s**2).sum()))
    for fn, coeffs, scale in ((sp.ns5_tuned, sp.NS5_TUNED, frob + 1e-7),
                              (sp.polar_express, sp.POLAR_EXPRESS, frob * sp.POLAR_EXPRESS_SAFETY + 1e-6)):
        expect = u @ torch.diag(torch.from_numpy(scalar_iteration(s, coeffs, scale))) @ v.T
        assert torch.allclose(fn(a), expect, atol=1e-9)
    # The tree takes both methods' errors from the singular values; they match the matrix iterations.
    full = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sv = torch.linalg.svdvals(full)
    for fn, key in ((sp.ns5_tuned, "ns5"), (sp.polar_express, "pe")):
        p = sp.method_singular_values(sv, key)
        out = fn(full)
        assert sp.orthogonality_error_of_values(p) == pytest.approx(sp.orthogonality_error(out), rel=1e-9)
        polar = sp.polar_from_svd(*sp.svd(full)[::2])
        assert sp.polar_distance_of_values(p) == pytest.approx(sp.polar_distance(out, polar), rel=1e-9)
    uf, _, vf = sp.svd(torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    polar = sp.polar_from_svd(uf, vf)
    assert sp.orthogonality_error(polar) == pytest.approx(0.0, abs=1e-12)
    assert sp.polar_distance(2 * polar, polar) == pytest.approx(1.0)
    q = orthonormal(shape[0], min(shape), torch.Generator().manual_seed(1))
    assert sp.orthogonality_error(2 * q) == pytest.approx(3.0)  # ||4I - I||_F / sqrt(k)


# ------------------------------------------------------------------------------ the tree and its runner


def test_runner_computes_only_what_is_asked():
    calls = []
    w = torch.randn(6, 4)
    res, seconds = tree.run(["stable_rank_w"], {"weight": w, "momentum": None,
                                                "replicas": lambda: calls.append(1)})
    assert not calls
    assert set(seconds) == {"svd_w", "sv_w", "stable_rank_w"}
    assert set(res) == {"stable_rank_w"}
    assert res["stable_rank_w"] == pytest.approx(sp.stable_rank(torch.linalg.svdvals(w)), rel=1e-6)


def test_runner_frees_the_replica_stack_after_its_last_consumer():
    gen = torch.Generator().manual_seed(0)
    stack = [torch.randn(4, 6, 5, generator=gen)]
    ref = weakref.ref(stack[0])
    alive_at = {}

    def loader():
        return stack.pop()

    def on_node(name):
        alive_at[name] = ref() is not None

    res, seconds = tree.run(tree.default_properties(), {"weight": torch.randn(6, 5, generator=gen),
                                                         "momentum": torch.randn(6, 5, generator=gen),
                                                         "replicas": loader}, on_node)
    assert alive_at["aligned"] and not alive_at["svd_w"]
    assert set(res) == set(tree.default_properties())
    assert all(name in seconds for name in tree.BY_NAME if tree.BY_NAME[name].default)


def test_runner_frees_the_aligned_vectors_before_the_weight_svds(monkeypatch):
    """The aligned replica vectors (one or two replica stacks) must be gone before the weights and the
    momentum are decomposed: the peak memory of the tree depends on it."""
    refs = []
    real = sp.align_replicas

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        refs.extend([weakref.ref(out["u"]), weakref.ref(out["v"])])
        return out

    monkeypatch.setattr(sp, "align_replicas", recording)
    gen = torch.Generator().manual_seed(1)
    alive_at = {}
    tree.run(tree.default_properties(), {"weight": torch.randn(6, 5, generator=gen),
                                         "momentum": torch.randn(6, 5, generator=gen),
                                         "replicas": lambda: torch.randn(4, 6, 5, generator=gen)},
             lambda name: alive_at.setdefault(name, [r() is not None for r in refs]))
    assert alive_at["reverb"] == [True, True]
    assert alive_at["svd_w"] == [False, False] and alive_at["svd_m"] == [False, False]


def test_runner_skips_what_an_absent_root_feeds():
    res, _ = tree.run(tree.default_properties(), {"weight": torch.randn(5, 5), "momentum": None, "replicas": None})
    assert math.isfinite(res["alpha_w"]) or math.isnan(res["alpha_w"])
    assert math.isfinite(res["stable_rank_w"])
    for name in ("sigma2", "tau2", "kappa", "orth_err_ns5", "stable_rank_m", "subspace_align_wm"):
        assert math.isnan(res[name])
    assert "echo" not in res


def test_declared_tree_is_topological_and_listed():
    seen = set(tree.ROOTS)
    for node in tree.NODES:
        assert set(node.inputs) <= seen, node.name
        seen.add(node.name)
    listing = tree.describe()
    for node in tree.NODES:
        assert node.name in listing
    with pytest.raises(SystemExit, match="unknown properties nope"):
        tree.resolve_request("echo,nope")


@pytest.mark.parametrize("shape", [(48, 48), (32, 80), (80, 32)])
def test_alignment_in_the_replica_stacks_memory_gives_the_same_result(shape):
    """reuse_stack writes the aligned vectors over the replicas; the result must not change, and the
    tree must leave a replica stack it was handed as a value untouched (it only reuses loaded ones)."""
    m, n = shape
    g = torch.Generator().manual_seed(m * n)
    reps = torch.randn(6, m, n, generator=g) + 0.3 * torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)
    u, _, v = sp.svd(reps.mean(0))
    fresh = sp.align_replicas(u, v, reps.clone())
    reused = sp.align_replicas(u, v, reps.clone(), reuse_stack=True)
    for key in fresh:
        assert same_numbers(reused[key], fresh[key]), key
    given = reps.clone()
    by_value, _ = tree.run(["echo", "sigma2"], {"weight": reps[0], "momentum": reps[1], "replicas": given})
    loaded, _ = tree.run(["echo", "sigma2"], {"weight": reps[0], "momentum": reps[1], "replicas": lambda: reps.clone()})
    assert torch.equal(given, reps)
    assert np.allclose(np.asarray(by_value["echo"]), np.asarray(loaded["echo"]), rtol=1e-5, atol=1e-6)
    assert by_value["sigma2"] == pytest.approx(loaded["sigma2"], rel=1e-5)


def test_alignment_in_parallel_threads_equals_one_thread():
    """Replicas decomposed one per thread give the same bits as one after another, and torch's thread
    count is left as it was."""
    g = torch.Generator().manual_seed(3)
    reps = torch.randn(5, 40, 56, generator=g) + 0.5 * torch.randn(40, 3, generator=g) @ torch.randn(3, 56, generator=g)
    u, _, v = sp.svd(reps.mean(0))
    serial = sp.align_replicas(u, v, reps.clone(), reuse_stack=True)
    torch.set_num_threads(3)  # the autouse fixture restores the original count afterwards
    parallel = sp.align_replicas(u, v, reps.clone(), reuse_stack=True)
    assert torch.get_num_threads() == 3
    for key in serial:
        assert torch.equal(serial[key], parallel[key]), key


@pytest.mark.parametrize("shape", [(36, 36), (24, 60), (60, 24)])
def test_batched_alignment_path_agrees_with_the_lapack_path(shape):
    """The GPU path (torch's batched SVD in groups of 8, then the same matching), run on the CPU: the
    same alignment as the per-replica LAPACK path, up to rounding, in place or not."""
    m, n = shape
    g = torch.Generator().manual_seed(m + 2 * n)
    u_true, v_true = orthonormal(m, 4, g).float(), orthonormal(n, 4, g).float()
    signal = u_true @ torch.diag(torch.tensor([40.0, 30.0, 20.0, 12.0])) @ v_true.T
    reps = signal + torch.randn(11, m, n, generator=g)  # 11: a full group of 8 and a partial one
    u, _, v = sp.svd(reps.mean(0))
    lapack = sp.align_replicas(u, v, reps.clone(), reuse_stack=True)
    for reuse in (False, True):
        batched = sp.align_replicas(u, v, reps.clone(), reuse_stack=reuse, batched=True)
        assert torch.equal(batched["perm"][:, :4], lapack["perm"][:, :4])
        for key in ("s", "cos_u", "cos_v"):
            assert torch.allclose(batched[key][:, :4], lapack[key][:, :4], atol=1e-4), key
        assert torch.allclose(batched["u"][:, :, :4], lapack["u"][:, :, :4], atol=1e-3)
        assert torch.allclose(batched["v"][:, :, :4], lapack["v"][:, :, :4], atol=1e-3)
        z_batched, z_lapack = sp.reverb_matrix(batched["u"], batched["v"]), sp.reverb_matrix(lapack["u"], lapack["v"])
        assert torch.allclose(z_batched[:4], z_lapack[:4], atol=1e-3)


def test_momentum_kept_with_merged_leading_dims_is_read_in_the_parameters_shape():
    """PSGD Kron (kron variant) keeps the [4, d, d] attention stack's momentum as [4d, d]."""
    from analysis_lib.checkpoints import MatrixRef, momentum_of

    d = 6
    weights = torch.zeros(4, d, d)
    buffer = torch.arange(4 * d * d, dtype=torch.float32).view(4, d, d)
    ckpt = {"model": {"blocks.0.attn.qkvo_w": weights},
            "optimizer": {"muon": {"blocks.0.attn.qkvo_w": {"momentum_buffer": buffer.reshape(4 * d, d)}}}}
    for index in range(4):
        ref = MatrixRef("blocks.0.attn.qkvo_w", index, "qkvo"[index], 0, d, d)
        assert torch.equal(momentum_of(ckpt, ref), buffer[index])
    ckpt["optimizer"]["muon"]["blocks.0.attn.qkvo_w"]["momentum_buffer"] = torch.zeros(4 * d, d + 1)
    assert momentum_of(ckpt, MatrixRef("blocks.0.attn.qkvo_w", 0, "q", 0, d, d)) is None


def test_momentum_of_an_adamw_matrix_is_its_first_moment():
    """The adamw variant keeps no Muon buffer: its matrices' momentum is Adam's exp_avg (not exp_avg_sq)."""
    from analysis_lib.checkpoints import MatrixRef, momentum_of

    ref = MatrixRef("blocks.0.mlp.fc_w", None, "mlp_in", 0, 8, 4)
    first, second = torch.randn(8, 4), torch.rand(8, 4)
    ckpt = {"model": {ref.param: torch.zeros(8, 4)},
            "optimizer": {"muon": {ref.param: {"exp_avg": first, "exp_avg_sq": second, "step": torch.tensor(3.0)}}}}
    assert torch.equal(momentum_of(ckpt, ref), first)
    buffer = torch.randn(8, 4)
    ckpt["optimizer"]["muon"][ref.param]["momentum_buffer"] = buffer  # a Muon buffer wins where both exist
    assert torch.equal(momentum_of(ckpt, ref), buffer)
    assert momentum_of({"model": ckpt["model"], "optimizer": {"muon": {}, "adam": {}}}, ref) is None
