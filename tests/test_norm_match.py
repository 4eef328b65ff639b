"""norm_matched (issue 22 item 11): the baseline's Muon step, then the norms a manifold variant pins rescaled back.

Planted data: the bench preset's model (16 blocks, d = 64, 2 heads; o and the MLP out start at zero) built in
fp64, its Muon matrices stepped on Gaussian gradients by the variant's Muon and, from the same weights and the
same momentum, by the baseline's. On the named matrices every pinned norm (row, column, matrix or head block)
equals its pinned value and the weights are the baseline's step rescaled unit by unit; every other matrix is
the baseline's step bit for bit. --norm_match=none trains the baseline's model bit for bit (fp32, bench data).
"""

import tomllib

import pytest
import torch
from variant_scripts import ROOT, load_script

KINDS = ("q", "k", "v", "o", "mlp_in", "mlp_out")
DIMS = {"rows": (-1,), "cols": (-2,), "frobenius": (-2, -1), "heads": (-2, -1)}


@pytest.fixture(scope="module")
def norm_matched():
    return load_script("norm_matched")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def manifest():
    return tomllib.loads((ROOT / "patches" / "variants.toml").read_text())


def fp64_model(module, args, dtype=torch.float64):
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return module.GPT(args)
    finally:
        torch.set_default_dtype(default)


def kind_matrices(model):
    """{kind: [the model's matrices of that kind]} (views into the parameters)."""
    attn = [b.attn.qkvo_w for b in model.blocks if b.attn is not None]
    kinds = {k: [w[i] for w in attn] for i, k in enumerate(("q", "k", "v", "o"))}
    kinds["mlp_in"] = [b.mlp.fc_w for b in model.blocks]
    kinds["mlp_out"] = [b.mlp.proj_w for b in model.blocks]
    return kinds


def unit_norms(W, norm, heads):
    """The norms norm_match pins, of one matrix [m, n] (keepdim; heads: [heads, 1, 1]; det: |det W|^(1/n),
    the geometric mean of the singular values, from the SVD in fp64)."""
    if norm == "det":
        return torch.linalg.svdvals(W.double()).log().mean().exp().to(W.dtype).view(1, 1)
    return (W.unflatten(0, (heads, -1)) if norm == "heads" else W).norm(dim=DIMS[norm], keepdim=True)


def rescaled(W, pinned, norm, heads):
    """W with each unit rescaled to the norm pinned (the reference, written out)."""
    units = W.unflatten(0, (heads, -1)) if norm == "heads" else W
    return (units * pinned / unit_norms(W, norm, heads)).reshape(W.shape)


def gaussian_grads(model, g, zero=()):
    for name, p in model.named_parameters():
        p.grad = torch.zeros_like(p) if any(z in name for z in zero) else torch.randn(p.shape, generator=g,
                                                                                     dtype=p.dtype)


@pytest.mark.parametrize("norm, kinds", [
    ("rows", "q,v,o,mlp_out"),           # sphere's norm, with the two zero-initialized kinds
    ("cols", "k,o,mlp_in"),              # oblique's
    ("frobenius", "v,mlp_in,mlp_out"),   # the Stiefel family's
    ("heads", "q,k"),                    # block_stiefel's
    ("det", "q,k,o"),                    # sl's (norm_match_det), o pinned at its first non-zero |det|
])
def test_pinned_norms_hold_and_the_rest_is_the_baselines_step(baseline, norm_matched, norm, kinds):
    if norm == "det":
        norm_matched = load_script("norm_matched_sl")
    args = norm_matched.parse_args(["--preset=bench", f"--norm_match={norm}", f"--norm_match_kinds={kinds}"])
    heads, named = args.num_heads, kinds.split(",")
    model = fp64_model(norm_matched, args)
    reference = fp64_model(baseline, baseline.parse_args(["--preset=bench"]))
    muon, _ = norm_matched.build_optimizers(model, args, 0, 1)
    reference_muon, _ = baseline.build_optimizers(reference, reference.args, 0, 1)
    initial = {k: [unit_norms(W.detach(), norm, heads) for W in Ws] for k, Ws in kind_matrices(model).items()}
    g = torch.Generator().manual_seed(1)
    first_nonzero = {}
    for step in range(3):
        with torch.no_grad():  # the baseline steps from the variant's weights (its momentum is the same)
            for p, q in zip(reference.parameters(), model.parameters(), strict=True):
                p.copy_(q)
        gaussian_grads(model, g)
        for p, q in zip(reference.parameters(), model.parameters(), strict=True):
            p.grad = q.grad.clone()
        muon.step()
        reference_muon.step()
        stepped, ours = kind_matrices(reference), kind_matrices(model)
        for kind in KINDS:
            for i, (W, B) in enumerate(zip(ours[kind], stepped[kind], strict=True)):
                W, B = W.detach(), B.detach()
                if kind not in named:
                    assert torch.equal(W, B), (norm, kind, step)
                    continue
                pinned = initial[kind][i]
                if kind in ("o", "mlp_out"):  # zero at init: pinned at the norms of the first non-zero value
                    assert float(pinned.max()) == 0
                    pinned = first_nonzero.setdefault((kind, i), unit_norms(B, norm, heads))
                    assert float(pinned.min()) > 0
                norms = unit_norms(W, norm, heads)
                assert float((norms - pinned).abs().max()) < 1e-6 * float(pinned.max()), (norm, kind, step)
                torch.testing.assert_close(W, rescaled(B, pinned, norm, heads), rtol=1e-10, atol=1e-12)
                if step == 0 and kind in ("o", "mlp_out"):
                    assert torch.equal(W, B)  # its first non-zero value is the baseline's first step
                else:
                    assert not torch.equal(W, B)


def test_a_unit_that_starts_at_zero_is_pinned_at_its_first_nonzero_norm(norm_matched):
    """Rows that are still zero wait unpinned; each is pinned at its first non-zero norm (or at the entry radius)
    and held there."""
    g = torch.Generator().manual_seed(2)
    W = torch.zeros(2, 6, 10, dtype=torch.float64)
    W[0] = torch.randn(6, 10, generator=g, dtype=torch.float64)  # a matrix that starts non-zero
    selected = torch.tensor([True, True])
    pinned = norm_matched.pin_norms(W, "rows", 1, selected)
    initial = W[0].norm(dim=-1, keepdim=True)
    assert torch.equal(pinned[0], initial) and float(pinned[1].abs().max()) == 0
    for entry in (0.0, 0.5):
        state, X = pinned.clone(), W.clone()
        X[1, :4] = torch.randn(4, 10, generator=g, dtype=torch.float64)  # rows 0-3 of the zero matrix move
        first = X[1].norm(dim=-1, keepdim=True).clone()
        state = norm_matched.norm_match_(X, state, "rows", 1, entry)
        expected = first[:4] if entry == 0 else torch.full((4, 1), entry, dtype=torch.float64)
        assert torch.equal(state[1, :4], expected)
        assert float(state[1, 4:].abs().max()) == 0  # still zero: not pinned yet
        X += 0.3 * torch.randn(X.shape, generator=g, dtype=torch.float64)  # a later step; rows 4-5 now move
        later = X[1, 4:].norm(dim=-1, keepdim=True).clone()
        state = norm_matched.norm_match_(X, state, "rows", 1, entry)
        norms = X.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(norms[0], initial, rtol=1e-12, atol=0)
        torch.testing.assert_close(norms[1, :4], expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(norms[1, 4:], later if entry == 0 else torch.full((2, 1), entry,
                                                                                    dtype=torch.float64))


def test_a_matrix_that_stays_zero_a_step_is_pinned_when_it_moves(norm_matched):
    """The MLP out has no gradient at step 1: it stays zero, then is pinned at the norms of its first non-zero
    value (step 2) and keeps them."""
    args = norm_matched.parse_args(["--preset=bench", "--norm_match=frobenius", "--norm_match_kinds=mlp_out"])
    model = fp64_model(norm_matched, args)
    muon, _ = norm_matched.build_optimizers(model, args, 0, 1)
    g = torch.Generator().manual_seed(3)
    gaussian_grads(model, g, zero=("proj_w",))
    muon.step()
    outs = kind_matrices(model)["mlp_out"]
    assert all(float(W.detach().abs().max()) == 0 for W in outs)
    gaussian_grads(model, g)
    muon.step()
    first = [W.detach().norm() for W in outs]
    assert min(float(f) for f in first) > 0
    for _ in range(2):
        gaussian_grads(model, g)
        muon.step()
    for W, f in zip(outs, first, strict=True):
        assert abs(float(W.detach().norm() - f)) < 1e-6 * float(f)


def step_model(module, argv, steps=3, seed=4, dtype=torch.float64):
    """`steps` Muon steps of the bench-preset model on Gaussian gradients -> the model."""
    args = module.parse_args(["--preset=bench", *argv])
    model = fp64_model(module, args, dtype)
    muon, _ = module.build_optimizers(model, args, 0, 1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        gaussian_grads(model, g)
        muon.step()
    return model


def entry_settings(name):
    return [f"--{k}={v}" for k, v in manifest()[name].get("settings", {}).items()]


@pytest.mark.parametrize("zero_rows", ["free", "enter"])
def test_sphere_control_is_sphere_projected_without_decay(norm_matched, zero_rows):
    """The control's settings and sphere's --sphere_step=project --sphere_every=1 take the same steps where
    sphere has no decay: same norms, same direction; with the zero rows free (sphere's default: o and MLP out
    keep the baseline's step) and entering at 0.5 (sphere_enter, against norm_matched_sphere_enter)."""
    sphere = load_script("sphere")
    assert sphere.Hyperparameters().sphere_zero_rows == "free"  # norm_matched_sphere leaves o and MLP out free
    control = "norm_matched_sphere" if zero_rows == "free" else "norm_matched_sphere_enter"
    ours = step_model(norm_matched, [*entry_settings(control), "--muon_wd=0"])
    theirs = step_model(sphere, ["--sphere_step=project", "--sphere_every=1", "--muon_wd=0",
                                 f"--sphere_zero_rows={zero_rows}"])
    for kind, Ws in kind_matrices(ours).items():
        for W, S in zip(Ws, kind_matrices(theirs)[kind], strict=True):
            torch.testing.assert_close(W.detach(), S.detach(), rtol=1e-6, atol=1e-6, msg=kind)
    o_norms = kind_matrices(ours)["o"][0].detach().norm(dim=-1)
    if zero_rows == "enter":
        torch.testing.assert_close(o_norms, torch.full_like(o_norms, sphere.SPHERE_ENTRY_RADIUS))
    else:  # three baseline steps of lr 0.05 (bench preset) from zero: not on a sphere of radius 0.5
        assert float((o_norms - sphere.SPHERE_ENTRY_RADIUS).abs().min()) > 1e-3


@pytest.mark.parametrize("variant, norm, free_qkv", [
    ("sphere", "rows", False), ("oblique", "cols", False), ("stiefel", "frobenius", False),
    ("l1_stiefel", "frobenius", False), ("sphere", "rows", True), ("oblique", "cols", True),
    ("stiefel", "frobenius", True), ("sl", "det", False),
])
def test_the_control_pins_the_norms_its_variant_holds(norm_matched, variant, norm, free_qkv):
    """The variant and its control, from the same init and on the same gradients (fp32, as the Stiefel steps
    run), hold the same norms on the same matrices; with the variant's q, k, v free (--manifold_qkv=0, the
    <variant>_qkv_free entries) their control entry (norm_matched_<variant>_qkv_free) leaves q, k, v out of its
    kinds. block_stiefel is not here: it projects each head block to 0.5 U V^T, the init's head-block norm in
    expectation only."""
    name = f"norm_matched_{variant}" + ("_qkv_free" if free_qkv else "")
    control, module = entry_settings(name), load_script(name)
    kinds = module.parse_args(control).norm_match_kinds.split(",")
    assert free_qkv == ("q" not in kinds), (name, kinds)
    settings = entry_settings(f"{variant}_qkv_free") if free_qkv else ["--manifold_qkv=1"]  # the entry's own
    theirs = kind_matrices(step_model(load_script(variant), settings, steps=2, dtype=torch.float32))
    ours = kind_matrices(step_model(module, control, steps=2, dtype=torch.float32))
    for kind in KINDS:
        for W, V in zip(ours[kind], theirs[kind], strict=True):
            ours_norms, their_norms = unit_norms(W.detach(), norm, 1), unit_norms(V.detach(), norm, 1)
            if kind in kinds:
                torch.testing.assert_close(ours_norms, their_norms, rtol=1e-5, atol=1e-6, msg=(variant, kind))
            else:  # free in both: the baseline's step and decay
                assert float(their_norms.min()) > 0
                torch.testing.assert_close(W.detach(), V.detach(), rtol=1e-5, atol=1e-6, msg=(variant, kind))


def test_none_trains_the_baselines_model_bit_for_bit(baseline, norm_matched, bench_data):
    def train(module, extra):
        args = module.parse_args(["--preset=bench", *bench_data, *extra])
        torch.manual_seed(args.seed)
        model = module.GPT(args)
        optimizers = module.build_optimizers(model, args, 0, 1)
        loader = module.TrainLoader(args.train_files, args.train_seq_len, args.micro_batches, 0, 1)
        losses = [module.train_step(model, model, loader, optimizers, args, step, 1, torch.device("cpu")).item()
                  for step in range(3)]
        return losses, model.state_dict()

    base_losses, base_weights = train(baseline, [])
    for extra in ([], ["--norm_match=none", "--norm_match_kinds=q,k,v,o,mlp_in,mlp_out", "--norm_match_entry=0.5"]):
        losses, weights = train(norm_matched, extra)
        assert losses == base_losses
        assert all(torch.equal(w, base_weights[k]) for k, w in weights.items())


def test_det_pins_the_geometric_mean_of_the_singular_values_by_one_uniform_rescale():
    """Planted: matrices of known singular values (a product of random orthogonal factors and a diagonal), one
    of them singular and one zero. The det norm is the geometric mean of the singular values; norm_match_
    rescales each matrix by one factor to its pinned value; a zero matrix waits unpinned, a singular one is
    left as it is (its mean is 0: no factor reaches a pinned value from it)."""
    module = load_script("norm_matched_sl")
    g = torch.Generator().manual_seed(0)
    n = 6
    sigmas = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.25, 0.125], [1.0] * 6, [2.0, 1, 1, 1, 1, 0.0]], dtype=torch.float64)
    ortho = [torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0] for _ in range(6)]
    W = torch.stack([ortho[2 * i] @ torch.diag(s) @ ortho[2 * i + 1] for i, s in enumerate(sigmas)] +
                    [torch.zeros(n, n, dtype=torch.float64)])
    W[2] = ortho[4] @ torch.diag(sigmas[2])  # exactly singular: its last column is exactly zero
    norms = module.unit_norms(module.norm_units(W, "det", 1), "det").flatten()
    expected = [float(torch.tensor([3.0, 2, 1, 0.5, 0.25, 0.125], dtype=torch.float64).log().mean().exp()), 1.0, 0, 0]
    torch.testing.assert_close(norms, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    pinned = module.pin_norms(W, "det", 1, torch.tensor([True, True, True, True]))
    moved = W * torch.tensor([1.7, 0.3, 2.0, 1.0], dtype=torch.float64).view(4, 1, 1)
    moved[3] = ortho[0]  # the zero matrix becomes non-zero: pinned at its first non-zero value, |det| = 1
    before = moved.clone()
    pinned = module.norm_match_(moved, pinned, "det", 1, 0.0)
    torch.testing.assert_close(moved[:2], W[:2], rtol=1e-10, atol=1e-12)  # each back by one factor
    torch.testing.assert_close(moved[2:], before[2:])  # singular: unchanged; just entered: as it came
    torch.testing.assert_close(pinned.flatten(), torch.tensor([expected[0], 1.0, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("argv, setting", [
    (["--norm_match=diag"], "--norm_match="),
    (["--norm_match=Rows"], "--norm_match="),
    (["--norm_match_kinds=q,x"], "--norm_match_kinds="),
    (["--norm_match=cols", "--norm_match_kinds="], "--norm_match_kinds="),
    (["--norm_match=heads", "--norm_match_kinds=q,mlp_in"], "--norm_match_kinds="),
    (["--norm_match=det"], "--norm_match="),  # det is norm_match_det's (norm_matched_sl), not norm_matched's
    (["--norm_match_entry=-0.5"], "--norm_match_entry="),
    (["--norm_match_entry=big"], "--norm_match_entry="),
])
def test_bad_settings_are_one_line_errors(norm_matched, argv, setting):
    with pytest.raises(SystemExit) as err:
        norm_matched.parse_args(["--preset=bench", *argv])
    message = str(err.value)
    assert message.startswith("error: ") and setting in message and "\n" not in message


CONTROLS = {  # the control of each manifold variant: the norm it pins, on which matrices, at which entry radius
    "sphere": ("rows", {"q", "k", "v", "mlp_in"}, 0.0),
    "sphere_enter": ("rows", {"q", "k", "v", "o", "mlp_in", "mlp_out"}, 0.5),
    "oblique": ("cols", {"q", "k", "v", "mlp_in"}, 0.0),
    "stiefel": ("frobenius", {"q", "k", "v", "mlp_in"}, 0.0),
    "l1_stiefel": ("frobenius", {"q", "k", "v", "mlp_in"}, 0.0),
    "block_stiefel": ("heads", {"q", "k", "v"}, 0.0),
    "sl": ("det", {"q", "k", "v"}, 0.0),
    # issue 22 item 10: the same variants with q, k, v left free (--manifold_qkv=0): the MLP in alone
    "sphere_qkv_free": ("rows", {"mlp_in"}, 0.0),
    "oblique_qkv_free": ("cols", {"mlp_in"}, 0.0),
    "stiefel_qkv_free": ("frobenius", {"mlp_in"}, 0.0),
}


def test_each_manifold_variant_has_its_control_in_the_manifest(norm_matched):
    table = manifest()
    assert table["norm_matched"]["patches"] == ["norm_match"] and "settings" not in table["norm_matched"]
    for variant, (norm, kinds, entry) in CONTROLS.items():
        control = table[f"norm_matched_{variant}"]
        assert control["patches"] == ["norm_match"] + (["norm_match_det"] if norm == "det" else [])
        assert control["lr"] == "muon_lr" and table[variant]["control"] == f"norm_matched_{variant}", variant
        assert control.get("groups") == table[variant].get("groups"), variant
        module = load_script(f"norm_matched_{variant}")
        args = module.parse_args(["--preset=bench", *entry_settings(f"norm_matched_{variant}")])
        assert (args.norm_match, set(module.norm_match_kinds(args.norm_match_kinds, args.norm_match)),
                args.norm_match_entry) == (norm, kinds, entry), variant
    assert "norm_matched_symplectic" not in table  # it pins no norm
    for variant in ("sphere_qkv_free", "oblique_qkv_free", "stiefel_qkv_free"):
        assert table[variant]["settings"] == {"manifold_qkv": 0}, variant


def displacement(module, argv):
    """How far each kind moves in the second of two Muon steps (the first may pin zero-initialized rows)."""
    args = module.parse_args(["--preset=bench", "--muon_wd=0", *argv])
    model = fp64_model(module, args)
    muon, _ = module.build_optimizers(model, args, 0, 1)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        before = {k: [W.detach().clone() for W in Ws] for k, Ws in kind_matrices(model).items()}
        gaussian_grads(model, g)
        muon.step()
    return {k: sum(float((W.detach() - b).norm()) for W, b in zip(Ws, before[k], strict=True))
            for k, Ws in kind_matrices(model).items()}


@pytest.mark.parametrize("variant", ["sphere", "oblique"])
def test_the_group_multiplier_reaches_the_pinned_step(norm_matched, variant):
    """With its entry's settings, doubling the groups' --muon_lr_mult moves them further and the rest as before."""
    name = f"norm_matched_{variant}"
    groups = manifest()[name]["groups"]
    plain = displacement(norm_matched, entry_settings(name))
    mult = "--muon_lr_mult=" + ",".join(f"{k}=2" for k in groups)
    doubled = displacement(norm_matched, [*entry_settings(name), mult])
    for kind in KINDS:
        if kind in groups:
            assert doubled[kind] > 1.3 * plain[kind], (variant, kind, plain[kind], doubled[kind])
        else:
            assert doubled[kind] == pytest.approx(plain[kind], rel=1e-9), (variant, kind)
