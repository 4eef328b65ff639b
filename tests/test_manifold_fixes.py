"""Issue 22, items 5-8 and 10: the manifold variants test their constraint, at the baseline's step length.

Planted data throughout: matrices with known scales and spectra (an init rescaled per matrix, a symplectic
matrix with singular values 50 .. 1/50, gradients whose heads share four input directions) and the CPU
preset's model (16 blocks, d = 64, 2 heads; o and the MLP out start at zero) stepped on Gaussian gradients.
- stiefel, l1_stiefel: each matrix keeps its own initial RMS singular value (not one fixed by its shape).
- block_stiefel: q, k, v move as far as the baseline's Muon step moves them; o takes the baseline's update.
- symplectic: a step moves W by at most lr in spectral norm, however far X is from orthogonal.
- sl: the sign of det is not kept (the header's corrected claim); |det| is.
- --manifold_qkv=0: q, k and v take the baseline's update (to fp32 rounding) in every variant that constrains
  them.
"""

import math

import pytest
import torch
from variant_scripts import load_script

LR = 0.05
MANIFOLD_VARIANTS = ["sphere", "oblique", "stiefel", "l1_stiefel", "block_stiefel", "sl", "symplectic"]
SCRIPTS = {}


def script(name):
    if name not in SCRIPTS:
        SCRIPTS[name] = load_script(name)
    return SCRIPTS[name]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spectral(M):
    return float(torch.linalg.matrix_norm(M.double(), ord=2))


def muon_params(model):
    """The Muon matrices of a model, by name (the attention stacks [q, k, v, o], the MLP in and out)."""
    return {n: p for n, p in model.named_parameters() if n.endswith(("qkvo_w", "fc_w", "proj_w"))}


def gaussian_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)


def built_model(module, *flags, seed=0, plant=None):
    """The CPU preset's model and its Muon, seeded as training seeds them; plant(params) edits the init first."""
    args = module.parse_args(["--preset=cpu", *flags])
    torch.manual_seed(seed)
    model = module.GPT(args)
    if plant is not None:
        with torch.no_grad():
            plant(muon_params(model))
    muon, _ = module.build_optimizers(model, args, 0, 1)
    return model, muon


# ----------------------------------------------------------------------------------------------------------
# item 5: stiefel keeps each matrix's own scale

SCALES = {"q": 3.0, "k": 0.2, "v": 1.0, "mlp_in": 0.3}  # the init multiplied by these in every block


def plant_scales(params):
    for name, p in params.items():
        if name.endswith("qkvo_w"):
            p[:3] *= torch.tensor([SCALES["q"], SCALES["k"], SCALES["v"]]).view(3, 1, 1)
        elif name.endswith("fc_w"):
            p *= SCALES["mlp_in"]


def rms_singular_values(params):
    """{(name, i): RMS singular value} for every non-zero matrix i of each parameter."""
    out = {}
    for name, p in params.items():
        for i, M in enumerate(p.detach().reshape(-1, *p.shape[-2:])):
            if float(M.norm()) > 0:
                out[name, i] = float(M.norm() / min(M.shape) ** 0.5)
    return out


@pytest.mark.parametrize("variant", ["stiefel", "l1_stiefel"])
def test_stiefel_keeps_each_matrix_at_its_initial_scale(variant):
    """Old code: every q, k, v at singular value 0.5 and every MLP in at 1.0 after the first step, whatever
    its init (here q at 1.5, k at 0.1, the MLP in at 0.3)."""
    module = script(variant)
    planted = {}

    def plant(params):
        plant_scales(params)
        planted.update(rms_singular_values(params))

    model, muon = built_model(module, plant=plant)
    params = muon_params(model)
    assert len(planted) == 15 * 3 + 16  # q, k, v of the 15 attention blocks and the 16 MLP ins
    assert planted["blocks.0.attn.qkvo_w", 0] > 1.2  # q planted at ~1.5
    for step in range(1, 4):
        gaussian_grads(params, seed=step)
        muon.step()
        for name, p in params.items():
            for i, M in enumerate(p.detach().reshape(-1, *p.shape[-2:])):
                s = torch.linalg.svdvals(M.double())
                if (name, i) not in planted:  # o and the MLP out: off the manifold, moved by the baseline's step
                    assert not muon.state[p]["on_manifold"][i] and float(s.max()) > 0.01, (name, i)
                    continue
                target = planted[name, i]
                assert float((s / target - 1).abs().max()) < 1e-4, (variant, step, name, i, target, s.min(), s.max())
    scales = torch.cat([muon.state[p]["stiefel_scale"] for p in params.values()])
    assert float(scales.max()) > 1.2 and float(scales[scales > 0].min()) < 0.15  # q at ~1.5, k at ~0.1


def test_stiefel_projection_keeps_the_frobenius_norm():
    module = script("stiefel")
    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 96, 32, generator=g) * torch.tensor([0.01, 1.0, 7.0]).view(3, 1, 1)
    P = module.stiefel_project(W)
    torch.testing.assert_close(P.norm(dim=(-2, -1)), W.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    s = torch.linalg.svdvals(P.double())
    assert float((s / s[..., :1] - 1).abs().max()) < 1e-5  # equal singular values
    assert float(module.stiefel_project(torch.zeros(5, 4)).abs().max()) == 0  # zero stays zero


# ----------------------------------------------------------------------------------------------------------
# item 6: block_stiefel moves q, k, v by the baseline's step length, and o by the baseline's update


def shared_input_gradient(d, seed, rank=4):
    """A gradient of the attention stack [4, d, d] whose rows (every head's) lie near one rank-4 input
    space, as real gradients do (every head reads the same inputs): per-head msigns then line up."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(d, rank, generator=g)
    return torch.randn(4, d, rank, generator=g) @ inputs.T + 0.01 * torch.randn(4, d, d, generator=g)


def one_muon_step(module, W, G, **group):
    p = torch.nn.Parameter(W.clone())
    muon = module.Muon([dict(params=[p], **group)], lr=LR, momentum=0.9, weight_decay=0.1)
    p.grad = G.clone()
    muon.step()
    return p.detach() - W


@pytest.mark.parametrize(("d", "heads"), [(64, 2), (256, 8)])
def test_block_stiefel_steps_as_far_as_the_baseline(d, heads):
    """Old code: q, k, v moved 2.6x as far as the baseline in spectral norm at d = 256 with 8 heads (1.1x at
    d = 64 with 2), o by a per-head step that was not the baseline's."""
    block, baseline = script("block_stiefel"), load_script("baseline")
    g = torch.Generator().manual_seed(2)
    W = (torch.rand(4, d, d, generator=g) * 2 - 1) * math.sqrt(3) * 0.5 / math.sqrt(d)
    W[3] = 0.01 * torch.randn(d, d, generator=g)  # o, as after its first steps
    W = block.head_block_project(W, heads)
    G = shared_input_gradient(d, seed=3)
    step = one_muon_step(block, W, G, heads=heads)
    reference = one_muon_step(baseline, W, G)
    for i in range(3):
        ratio = spectral(step[i]) / spectral(reference[i])
        assert 0.75 < ratio < 1.02, (i, ratio)  # the baseline's step less its normal part
        assert float(step[i].norm()) <= float(reference[i].norm()) * (1 + 1e-4)
    torch.testing.assert_close(step[3], reference[3], rtol=0, atol=1e-7)  # o: the baseline's update
    blocks = block.head_blocks(W[:3] + step[:3], heads)
    gram = blocks @ blocks.mT / block.HEAD_BLOCK_SCALE**2
    assert float((gram - torch.eye(d // heads)).abs().max()) < 1e-4  # still on the manifold


# ----------------------------------------------------------------------------------------------------------
# item 7: symplectic moves W by at most lr in spectral norm


def planted_symplectic(module, n, spread, seed):
    """Q1 diag(L, 1/L) Q2, L log-spaced from 1 to spread, Q1, Q2 orthogonal and symplectic (fp64)."""
    g = torch.Generator().manual_seed(seed)
    Q1, Q2 = (module.orthosymplectic_start(torch.randn(n, n, generator=g, dtype=torch.float64))
              / module.SYMPLECTIC_SCALE for _ in range(2))
    L = torch.logspace(0, math.log10(spread), n // 2, dtype=torch.float64)
    return Q1 @ torch.diag(torch.cat([L, 1 / L])) @ Q2


def symplectic_defect(X):
    """||X^T J X - J||_F / ||J||_F in fp64."""
    X = X.double()
    n = X.size(-1) // 2
    J = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    J[:n, n:], J[n:, :n] = torch.eye(n), -torch.eye(n)
    return float((X.mT @ J @ X - J).norm() / J.norm())


@pytest.mark.parametrize("spread", [1.0, 50.0])
def test_symplectic_step_moves_the_weights_by_at_most_lr(spread):
    """Old code: 49 lr at spread 50 (the step was lr ||X||_2)."""
    module = script("symplectic")
    X = planted_symplectic(module, 64, spread, seed=4)
    assert spectral(X) == pytest.approx(spread, rel=1e-6)
    W = (module.SYMPLECTIC_SCALE * X).float()
    G = torch.randn(W.shape, generator=torch.Generator().manual_seed(5))
    before = W.clone()
    module.symplectic_step_(W, G, LR, 1.0, {})
    # the step's direction J msign(S) has the spectral norm of the Newton-Schulz msign (about 1, as Muon's)
    Xf = before / module.SYMPLECTIC_SCALE
    S = -module.j_times(module.hamiltonian_part(Xf.mT @ G))
    direction = spectral(module.symmetric(module.orthogonalize(S).float()))
    moved = spectral(W - before)
    assert 0.5 * LR < moved <= LR * direction * (1 + 1e-4), (moved / LR, direction)
    assert symplectic_defect(W / module.SYMPLECTIC_SCALE) < 1e-6 * spread**2


def test_symplectic_steps_stay_bounded_over_100_steps():
    """Old code: steps of up to 494 lr here (||X||_2 near 500 by step 100, as the singular values spread)."""
    module = script("symplectic")
    g = torch.Generator().manual_seed(6)
    bound = math.sqrt(3) * 0.5 / math.sqrt(64)
    W = module.orthosymplectic_start((torch.rand(3, 64, 64, generator=g) * 2 - 1) * bound)
    p = torch.nn.Parameter(W)
    muon = module.Muon([dict(params=[p], symplectic_polish=1)], lr=LR, momentum=0.9, weight_decay=0.01)
    steps = []
    for _ in range(100):
        before = p.detach().clone()
        p.grad = torch.randn(p.shape, generator=g)
        muon.step()
        steps.append(max(spectral(M) for M in p.detach() - before) / LR)
    X = p.detach() / module.SYMPLECTIC_SCALE
    assert max(steps) < 1.15 and min(steps) > 0.5, (min(steps), max(steps))
    assert max(spectral(M) for M in X) < 10
    assert max(symplectic_defect(M) for M in X) < 1e-4


@pytest.mark.parametrize(("n", "spread"), [(64, 1.0), (64, 3.0), (64, 500.0), (256, 1.0), (256, 20.0)])
def test_spectral_norm_bound_is_an_upper_bound_tight_at_orthogonal(n, spread):
    module = script("symplectic")
    X = planted_symplectic(module, n, spread, seed=7)
    exact = spectral(X)
    estimate = float(module.spectral_norm_bound(X.float()))
    assert exact * (1 - 1e-5) <= estimate <= exact * n ** (1 / 128)  # 6 squarings: p = 64, at most n^(1/2p)
    if spread == 1.0:
        assert estimate == pytest.approx(1.0, abs=1e-5)
    # any matrix, symplectic or not: still an upper bound
    M = torch.randn(n, n, generator=torch.Generator().manual_seed(8), dtype=torch.float64) / n**0.5
    assert float(module.spectral_norm_bound(M)) >= spectral(M)


# ----------------------------------------------------------------------------------------------------------
# item 8: sl keeps |det|, not its sign (the corrected header; the method is unchanged)


def test_sl_keeps_abs_det_but_its_sign_flips():
    """A documentation test: it passes on the code before issue 22 too (only the header changed). The
    smallest singular value of a random square init (here 1e-3 .. 2e-2 of the largest) is smaller than a
    step of Muon's size, so det's sign flips while |det| is held."""
    module = script("sl")
    g = torch.Generator().manual_seed(9)
    bound = math.sqrt(3) * 0.5 / math.sqrt(64)
    p = torch.nn.Parameter((torch.rand(3, 64, 64, generator=g) * 2 - 1) * bound)
    start = torch.linalg.slogdet(p.detach().double())
    muon = module.Muon([dict(params=[p])], lr=LR, momentum=0.9, weight_decay=0.0)
    signs = [start.sign]
    for _ in range(30):
        p.grad = torch.randn(p.shape, generator=g)
        muon.step()
        now = torch.linalg.slogdet(p.detach().double())
        assert float(((now.logabsdet - start.logabsdet) / start.logabsdet).abs().max()) < 1e-4
        signs.append(now.sign)
    flips = int((torch.stack(signs[1:]) != torch.stack(signs[:-1])).sum())
    assert flips > 10, flips  # of 90 matrix steps


# ----------------------------------------------------------------------------------------------------------
# item 10: --manifold_qkv=0 leaves q, k, v to the baseline's step


CONSTRAINS_ONLY_QKV = {"block_stiefel", "sl", "symplectic"}  # with q, k, v free these are the baseline


@pytest.mark.parametrize("variant", MANIFOLD_VARIANTS)
def test_manifold_qkv_0_gives_q_k_v_the_baselines_update(variant):
    """Old code: no --manifold_qkv setting (refused as unknown)."""
    module, baseline = script(variant), load_script("baseline")
    base_model, base_muon = built_model(baseline)
    free_model, free_muon = built_model(module, "--manifold_qkv=0")
    held_model, held_muon = built_model(module)
    base, free, held = muon_params(base_model), muon_params(free_model), muon_params(held_model)
    for name in base:
        if name.endswith("qkvo_w"):  # not projected at the start either
            assert torch.equal(free[name].detach(), base[name].detach()), name
    for step in (1, 2):
        for params, muon in ((base, base_muon), (free, free_muon), (held, held_muon)):
            gaussian_grads(params, seed=10 + step)
            muon.step()
    moved_elsewhere = False
    for name, p in base.items():
        if name.endswith("qkvo_w"):
            torch.testing.assert_close(free[name].detach()[:3], p.detach()[:3], rtol=0, atol=1e-7, msg=name)
            assert not torch.allclose(held[name].detach()[:3], p.detach()[:3], atol=1e-4), name  # constrained
        if variant in CONSTRAINS_ONLY_QKV:
            torch.testing.assert_close(free[name].detach(), p.detach(), rtol=0, atol=1e-7, msg=name)
        else:
            moved_elsewhere |= not torch.allclose(free[name].detach(), p.detach(), atol=1e-4)
    assert moved_elsewhere or variant in CONSTRAINS_ONLY_QKV  # the constraint still acts on the other matrices


@pytest.mark.parametrize("variant", MANIFOLD_VARIANTS)
def test_manifold_qkv_is_0_or_1(variant):
    module = script(variant)
    args = module.parse_args(["--preset=cpu", "--manifold_qkv=2"])
    with pytest.raises(SystemExit, match="manifold_qkv"):
        module.build_optimizers(module.GPT(args), args, 0, 1)
