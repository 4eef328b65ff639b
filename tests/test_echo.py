"""The echo variants: replica statistics, the SVD-free shrinkage, the momentum noise factor, the kappa
fit, and CPU-preset runs (kappa = 0 is the baseline; 2 processes = 1 process with 2-way accumulation)."""

import math
import re
import sys

import pytest
import torch
from conftest import BASELINE, ROOT, load_script, run_training

from kit.benchmarks import fit_echo_kappa
from kit.runs.logs import parse_log

ECHO = ROOT / "speedruns" / "train_gpt_medium_echo.py"
KINDS = ("q", "k", "v", "o", "mlp_in", "mlp_out")


@pytest.fixture(scope="module")
def echo():
    return load_script(ECHO)


def planted(s, m, n, seed=0, dtype=torch.float64):
    """U diag(s) V^T with random orthonormal U [m, k], V [n, k], k = len(s) -> (M, U, V), in dtype."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return ((U * s) @ V.T).to(dtype), U, V


def reference_shrink(M, tau2):
    """U diag(s^2 / (s^2 + tau^2)) V^T and msign(M) = U V^T over the nonzero s, from torch's SVD (fp64)."""
    U, s, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    keep = s > s.max() * 1e-12
    U, s, Vh = U[:, keep], s[keep], Vh[keep]
    return (U * (s**2 / (s**2 + tau2))) @ Vh, U @ Vh


SHAPES = {  # (m, n, singular values): square, wide, tall, rank-deficient (25 of 40 nonzero)
    "square": (40, 40, torch.linspace(1.0, 0.05, 40)),
    "wide": (30, 70, torch.linspace(1.0, 0.05, 30)),
    "tall": (70, 30, torch.linspace(1.0, 0.05, 30)),
    "rank_deficient": (40, 40, torch.linspace(1.0, 0.1, 25)),
}


@pytest.mark.parametrize("case", SHAPES)
def test_svd_free_shrinkage_equals_the_svd_one(echo, case):
    m, n, s = SHAPES[case]
    M, _, _ = planted(s.double(), m, n, seed=1)
    tau2 = torch.tensor(0.04, dtype=torch.float64)
    expected, msign = reference_shrink(M, float(tau2))
    got, smax2 = echo.echo_shrink(M, msign, tau2)
    assert (got - expected).abs().max() < 1e-10
    assert 0.9 < smax2.item() <= 1 + 1e-9  # power iteration (a diagnostic) approaches s_max^2 from below
    got32, _ = echo.echo_shrink(M.float(), msign.float(), tau2.float())
    assert ((got32.double() - expected).norm() / expected.norm()) < 1e-4
    assert (got - msign).norm() > 0.1  # the shrinkage did something


def test_stacked_matrices_get_their_own_tau2(echo):
    Ms = torch.stack([planted(torch.linspace(1.0, 0.1, 20).double(), 20, 50, seed=k)[0] for k in range(3)])
    tau2 = torch.tensor([0.0, 0.01, 0.3], dtype=torch.float64)
    msigns = torch.stack([reference_shrink(M, 0.0)[1] for M in Ms])
    got, _ = echo.echo_shrink(Ms, msigns, tau2)
    for k in range(3):
        assert (got[k] - reference_shrink(Ms[k], float(tau2[k]))[0]).abs().max() < 1e-10


class PlantedNoise:
    """Stands in for ReplicaStats: a fixed noise variance per matrix of each parameter."""

    def __init__(self, sigma2):
        self.sigma2 = sigma2

    def noise_variance(self, p):
        return self.sigma2[p].clone()


def test_the_solve_batched_over_a_groups_parameters_equals_one_at_a_time(echo):
    """Muon.update takes all of a process's same-shape parameters and shrinks them in one solve: the same
    steps, zeta and tau^2 ratios as shrinking each parameter alone."""
    shapes = [(4, 24, 24), (4, 24, 24), (4, 24, 24)]
    runs = []
    for together in (True, False):
        params = [torch.nn.Parameter(torch.randn(sh, generator=torch.Generator().manual_seed(i)) * 0.1)
                  for i, sh in enumerate(shapes)]
        muon = echo.Muon([dict(params=params, wd_mul=1.0)], lr=0.05, momentum=0.95, weight_decay=0.01,
                         rank=0, world_size=1)
        muon.echo_kappa, muon.echo_ema = 2.0, 0.9
        muon.replica_stats = PlantedNoise({p: torch.full((4,), 10.0**-k) for k, p in enumerate(params)})
        grads = torch.Generator().manual_seed(4)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            if together:
                muon.step()
            else:
                for p in params:
                    muon.update([p], muon.param_groups[0])
        runs.append((params, muon))
    (batched, mb), (alone, ma) = runs
    for p, q in zip(batched, alone, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)
        for key in ("echo_zeta", "echo_tau2_ratio"):
            torch.testing.assert_close(mb.state[p][key], ma.state[q][key], rtol=1e-5, atol=0)
    zeta = torch.stack([mb.state[p]["echo_zeta"] for p in batched])
    assert float(zeta[2].min()) > float(zeta[0].max()) + 0.05  # each parameter got its own tau^2


def test_zero_tau2_gives_msign_and_zero_matrix_stays_zero(echo):
    M, _, _ = planted(torch.linspace(1.0, 0.1, 20), 20, 30, dtype=torch.float32)
    O = echo.orthogonalize(M)
    got, _ = echo.echo_shrink(M, O, torch.tensor(0.0))
    assert torch.equal(got, O)
    zero = torch.zeros(20, 30)
    got, _ = echo.echo_shrink(zero, echo.orthogonalize(zero), torch.tensor(0.5))
    assert torch.equal(got, zero)


def test_pure_noise_directions_go_to_zero(echo):
    """Ten strong directions and twenty far below tau: the update keeps the first and drops the rest."""
    s = torch.cat([torch.ones(10), torch.full((20,), 1e-3)]).double()
    M, U, V = planted(s, 30, 60, seed=2)
    _, msign = reference_shrink(M, 0.0)
    got, _ = echo.echo_shrink(M.float(), msign.float(), torch.tensor(1e-2))
    h = torch.linalg.vecdot(U.T, (got.double() @ V).T)  # <u_i, update v_i>
    assert torch.all(h[:10] > 0.98) and torch.all(h[10:].abs() < 1e-3)


def test_replica_noise_variance_of_a_planted_signal(echo):
    """R = 8 replicas G + N_r of a 1024x1024 signal, N_r iid with variance 0.04: sigma^2 of the mean
    gradient is 0.04 / 8, within 2%, through the hooks, as backward() delivers micro-batch gradients."""
    m = n = 1024
    R, var = 8, 0.04
    g = torch.Generator().manual_seed(3)
    signal, _, _ = planted(torch.linspace(30.0, 1.0, 64).double(), m, n, seed=3, dtype=torch.float32)
    p = torch.nn.Parameter(torch.zeros(m, n))
    stats = echo.ReplicaStats([p], R)
    for _ in range(R):
        replica = signal + torch.randn(m, n, generator=g) * math.sqrt(var)
        ((p * replica).sum() / R).backward()
    stats.finish_step(world_size=1)
    assert stats.noise_variance(p).item() == pytest.approx(var / R, rel=0.02)
    assert stats.sums[p].item() == 0  # the next step starts from zero


def test_momentum_noise_factor_on_a_synthetic_stream(echo):
    """2000 steps of iid noise through Muon's own momentum and Nesterov blend: Var u / sigma^2 = c(0.95)."""
    b, sigma, steps, burn_in = 0.95, 0.5, 2000, 200
    g = torch.Generator().manual_seed(4)
    buf = torch.zeros(4096, dtype=torch.float64)
    total, count = 0.0, 0
    for t in range(steps):
        grad = 1.0 + sigma * torch.randn(4096, generator=g, dtype=torch.float64)  # a constant signal + noise
        buf.lerp_(grad, 1 - b)
        u = grad.lerp(buf, b)
        if t >= burn_in:
            total += float((u - 1.0).square().sum())
            count += u.numel()
    measured = total / count / sigma**2
    assert echo.momentum_noise_factor(b) == pytest.approx(measured, rel=0.05)
    assert echo.momentum_noise_factor(0.95) == pytest.approx(0.0304, abs=5e-4)


def test_kappa_fit_recovers_a_planted_law():
    s = torch.logspace(1, -1, 200, dtype=torch.float64)
    edge2 = 4.0
    oracle = s**2 / (s**2 + 0.6 * edge2)
    assert fit_echo_kappa.fit_kappa(s, oracle, edge2) == pytest.approx(0.6, rel=0.01)
    assert fit_echo_kappa.fit_kappa(s, oracle, edge2, "cosine") == pytest.approx(0.6, rel=0.05)


def test_kappa_fit_of_planted_cases_is_finite_and_grows_when_the_signal_fades():
    kappas = [fit_echo_kappa.fit_kappa(*fit_echo_kappa.planted_case(64, 128, 1.0, snr, seed=0)) for snr in (20, 3)]
    assert all(0.001 < k < 100 for k in kappas) and kappas[1] > kappas[0]


def test_kappa_needs_two_micro_batches(echo):
    args = echo.parse_args(["--preset=cpu", "--micro_batches=1"])
    model = echo.GPT(args)
    with pytest.raises(SystemExit, match="micro_batches"):
        echo.build_optimizers(model, args, 0, 1)
    echo.build_optimizers(model, echo.parse_args(["--preset=cpu", "--micro_batches=1", "--echo_kappa=0"]), 0, 1)


def val_lines(log):
    return re.findall(r"^step:\d+/\d+ val_loss:\S+", log.read_text(), flags=re.M)


def echo_lines(log):
    return [line for line in log.read_text().splitlines() if line.startswith("echo step:")]


def test_kappa_zero_reproduces_the_baseline_exactly(tmp_path, tiny_data):
    common = ["--micro_batches=2", "--num_iterations=4", "--val_loss_every=2", "--fuse_micro_batches=0"]  # echo's loop
    _, base, _ = run_training(BASELINE, tmp_path / "base", tiny_data, *common)
    _, zero, _ = run_training(ECHO, tmp_path / "zero", tiny_data, *common, "--echo_kappa=0")
    assert len(val_lines(base)) == 3 and val_lines(zero) == val_lines(base)
    assert echo_lines(zero) == []


@pytest.fixture(scope="module")
def echo_runs(tmp_path_factory, tiny_data):
    """The same 4 steps on 2 micro-batches: one process accumulating, and two processes under torchrun."""
    common = ["--micro_batches=2", "--num_iterations=4", "--val_loss_every=2", "--checkpoint_every=4"]
    out = {}
    for nproc in (1, 2):
        tmp = tmp_path_factory.mktemp(f"echo{nproc}")
        _, log, ckpt = run_training(ECHO, tmp, tiny_data, *common, nproc=nproc, run_id=f"p{nproc}")
        out[nproc] = (log, ckpt)
    return out


def test_two_processes_equal_one_with_accumulation(echo, echo_runs):
    states = {n: echo.load_checkpoint(ckpt / "step_000004.pt")["optimizer"]["muon"]
              for n, (_, ckpt) in echo_runs.items()}
    assert sorted(states[1]) == sorted(states[2]) and len(states[1]) == 47
    for name, state in states[1].items():
        other = states[2][name]
        assert torch.all(state["noise_ema"] >= 0)
        torch.testing.assert_close(other["noise_ema"], state["noise_ema"], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(other["momentum_buffer"], state["momentum_buffer"], atol=2e-5, rtol=1e-3)
    assert any(float(s["noise_ema"].max()) > 0 for s in states[1].values())
    lines = {n: echo_lines(log) for n, (log, _) in echo_runs.items()}
    assert len(lines[1]) == 2 * len(KINDS) and [x.split()[:3] for x in lines[1]] == [x.split()[:3] for x in lines[2]]
    curves = {n: [v.val_loss for v in parse_log(log).runs[0].validations] for n, (log, _) in echo_runs.items()}
    assert curves[1] == pytest.approx(curves[2], abs=2e-4)


def test_cpu_preset_run_ends_finite_and_its_log_parses(tmp_path, tiny_data):
    _, log, _ = run_training(ECHO, tmp_path, tiny_data, "--num_iterations=12", "--val_loss_every=6")
    parsed = parse_log(log)
    run = parsed.runs[0]
    assert len(parsed.runs) == 1 and run.finished and run.steps == 12
    vals = [v.val_loss for v in run.validations]
    assert all(math.isfinite(v) for v in vals) and vals[-1] < vals[0] - 0.3
    lines = echo_lines(log)
    assert [line.split()[2] for line in lines] == [f"kind:{k}" for k in KINDS] * 2
    for line in lines:
        fields = dict(token.split(":", 1) for token in line.split()[1:])
        assert 0 < float(fields["zeta"]) <= 1.0001 and 0 < float(fields["tau2/smax2"]) < 1


# ------------------------------------------------------------------------------------------------
# echo_exact

ECHO_EXACT = ROOT / "speedruns" / "train_gpt_medium_echo_exact.py"
SMALL = ["--model_dim=32", "--num_heads=1"]  # echo_exact runs R + 1 SVDs and R assignments per matrix


@pytest.fixture(scope="module")
def exact():
    return load_script(ECHO_EXACT)


def planted_replicas(m, n, s, sigma, replicas, seed):
    """R replicas U diag(s) V^T + N(0, sigma^2) noise, fp64 -> [R, m, n]."""
    g = torch.Generator().manual_seed(seed)
    signal, _, _ = planted(s.double(), m, n, seed=seed)
    return signal + sigma * torch.randn(replicas, m, n, generator=g, dtype=torch.float64)


def overlap_cost(replicas):
    """|U^T U_r| |V^T V_r| of the mean's directions against replica 0's: the matrix echo_exact assigns."""
    U, _, Vh = torch.linalg.svd(replicas.mean(0), full_matrices=False)
    Ur, _, Vhr = torch.linalg.svd(replicas[0], full_matrices=False)
    return (U.T @ Ur).abs() * (Vh @ Vhr.T).abs()


@pytest.mark.parametrize("seed", range(4))
def test_assignment_equals_scipys(exact, seed):
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(seed)
    k = 30
    edge = math.sqrt(40) + math.sqrt(60)
    free = torch.rand(k, k, generator=g, dtype=torch.float64)
    assert list(exact.hungarian(-free.numpy())) == list(linear_sum_assignment(free.numpy(), maximize=True)[1])
    costs = [free / k,  # rows and columns sum to at most 1, as overlaps do; no sure pairs: all Hungarian
             overlap_cost(planted_replicas(40, 60, 8 * 0.85 ** torch.arange(40.0) * edge, 1.0, 4, seed))]
    for cost in costs:
        want = linear_sum_assignment(cost.numpy(), maximize=True)[1]
        got = exact.assign_directions(cost).numpy()
        assert list(got) == list(want)
    assert (costs[1] > exact.SURE_MATCH).sum() >= 5  # the planted case also takes the sure-pair path


def test_assignment_without_scipy_uses_the_numpy_solver(exact, monkeypatch):
    """A script must run where scipy is not installed: assign_directions then falls back to hungarian,
    with the same optimum."""
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(7)
    cost = torch.rand(24, 24, generator=g, dtype=torch.float64) / 24
    want = linear_sum_assignment(cost.numpy(), maximize=True)[1]
    calls, numpy_solver = [], exact.hungarian
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # `from scipy.optimize import ...` fails
    monkeypatch.setattr(exact, "hungarian", lambda c: calls.append(c) or numpy_solver(c))
    got = exact.assign_directions(cost).numpy()
    assert calls, "the numpy solver was not used"
    assert list(got) == list(want)


def test_exact_echo_equals_analysis(exact):
    """The same 8 replicas through analysis_lib's tree and through echo_exact: the same zeta (1e-5)."""

    sys.path.insert(0, str(ROOT))
    from analysis_lib import tree

    m, n = 48, 80
    edge = math.sqrt(m) + math.sqrt(n)
    g = planted_replicas(m, n, torch.linspace(4.0, 1.0, 12) * edge, 1.0, 8, seed=5)
    res, _ = tree.run(["echo"], {"replicas": g.clone()})
    U, s, V, zeta = exact.replica_echo(g)
    want = torch.as_tensor(res["echo"], dtype=torch.float64)
    assert zeta.shape == want.shape == (m,)
    assert (zeta - want).abs().max() < 1e-5
    assert zeta[:12].min() > 0.5 and zeta[20:].max() < zeta[:12].min()  # signal echoes, noise does not
    torch.testing.assert_close(s, torch.linalg.svdvals(g.mean(0)))


def test_exact_echo_batched_equals_one_matrix_at_a_time(exact):
    """exact_echo passes a whole stack [J, R, m, n] to replica_echo at once: each matrix must get the estimate
    it gets alone (the assignment solved per matrix and replica, signs and pivots per matrix), for a stack
    that mixes sure pairs and Hungarian rows, and assign_directions on a batch of costs equals each cost's."""
    m, n, R = 24, 40, 6
    edge = math.sqrt(m) + math.sqrt(n)
    stack = torch.stack([planted_replicas(m, n, torch.linspace(a, 1.0, 6) * edge, 1.0, R, seed=10 + j)
                         for j, a in enumerate((6.0, 3.0, 1.5))])  # strong, middling and weak signal
    U, s, V, zeta = exact.replica_echo(stack)
    assert zeta.shape == (3, m) and U.shape == (3, m, m) and V.shape == (3, n, m)
    for j in range(3):
        Uj, sj, Vj, zj = exact.replica_echo(stack[j])
        torch.testing.assert_close(zeta[j], zj, atol=1e-9, rtol=0)
        torch.testing.assert_close(s[j], sj)
    assert zeta[0, :6].min() > zeta[2, :6].max()  # the estimate differs between the matrices: not one copied
    costs = torch.stack([overlap_cost(stack[j]) for j in range(3)])
    want = torch.stack([exact.assign_directions(c) for c in costs])
    assert torch.equal(exact.assign_directions(costs), want)
    assert (costs > exact.SURE_MATCH).any() and not (costs.amax(-1) > exact.SURE_MATCH).all()


def test_exact_echo_goes_to_one_as_the_noise_vanishes(exact):
    m, n = 30, 50
    s = torch.linspace(4.0, 1.0, 10) * (math.sqrt(m) + math.sqrt(n))
    top = []
    for sigma in (1.0, 0.1, 1e-4):
        _, _, _, zeta = exact.replica_echo(planted_replicas(m, n, s, sigma, 5, seed=6))
        top.append(float(zeta[:10].min()))
    assert top[0] < top[1] < top[2] and top[2] > 1 - 1e-6


def test_exact_needs_three_micro_batches(exact):
    args = exact.parse_args(["--preset=cpu", "--micro_batches=2", *SMALL])
    with pytest.raises(SystemExit, match="echo_exact needs at least 3"):
        exact.build_optimizers(exact.GPT(args), args, 0, 1)


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory, tiny_data):
    """4 steps on 4 micro-batches of a 32-wide model: one process accumulating, and two processes."""
    common = ["--micro_batches=4", "--num_iterations=4", "--val_loss_every=2", "--checkpoint_every=4", *SMALL]
    out = {}
    for nproc in (1, 2):
        tmp = tmp_path_factory.mktemp(f"exact{nproc}")
        _, log, ckpt = run_training(ECHO_EXACT, tmp, tiny_data, *common, nproc=nproc, run_id=f"p{nproc}")
        out[nproc] = (log, ckpt)
    return out


def test_exact_two_processes_equal_one_and_the_log_parses(exact, exact_runs):
    states = {n: exact.load_checkpoint(ckpt / "step_000004.pt")["optimizer"]["muon"]
              for n, (_, ckpt) in exact_runs.items()}
    for name, state in states[1].items():
        assert state["replica_momentum"].shape[0] == 4
        torch.testing.assert_close(states[2][name]["replica_momentum"], state["replica_momentum"],
                                   atol=2e-5, rtol=1e-3)
        torch.testing.assert_close(states[2][name]["replica_momentum"].mean(0), state["momentum_buffer"],
                                   atol=2e-5, rtol=1e-3)  # the streams average to the baseline's momentum
    for log, _ in exact_runs.values():
        run = parse_log(log).runs[0]
        assert run.finished and run.steps == 4 and all(math.isfinite(v.val_loss) for v in run.validations)
        assert [line.split()[2] for line in echo_lines(log)] == [f"kind:{k}" for k in KINDS] * 2
    curves = {n: [v.val_loss for v in parse_log(log).runs[0].validations] for n, (log, _) in exact_runs.items()}
    assert curves[1] == pytest.approx(curves[2], abs=2e-4) and curves[1][-1] < curves[1][0]
