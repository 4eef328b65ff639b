"""nGPT (speedruns/train_gpt_medium_ngpt.py): every normalized vector stays on its sphere, the geodesic step, lazy
projection, the forward against a direct formula, a short CPU-preset run, and analysis.py on its checkpoint.

The sphere tests drive the script's own train_step (real loader, real optimizers) on a 16-block model shrunk to
d = 32; the geodesic tests use planted vectors in fp64; the forward test writes the 2-block toy's formula out
here, independently of the script's modules, and silences blocks 2-15 of the script's model (their alphas and
the U-net skip weights at zero make them the identity).
"""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_training
from variant_scripts import load_script, script_path

from core.shards import write_shard

VOCAB = 256
TOY = ["--vocab_size=256", "--model_dim=32", "--num_heads=2", "--train_seq_len=32", "--val_seq_len=32",
       "--micro_batches=2", "--val_tokens=64", "--attn_block_size=8", "--max_window=32", "--num_iterations=8",
       "--muon_momentum_warmup_steps=2"]
TOL = 1e-5


@pytest.fixture(scope="module")
def ngpt():
    return load_script("ngpt")


@pytest.fixture(scope="module")
def stacked():
    """nGPT on the speedrun's Muon stack: polar express, NorMuon, cautious weight decay."""
    return load_script("ngpt_polar_normuon_cwd")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared CPU: a second thread only waits
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ngpt_shards")
    rng = np.random.default_rng(0)
    write_shard(folder / "train_000.bin", rng.integers(0, VOCAB, 20_000))
    write_shard(folder / "val_000.bin", rng.integers(0, VOCAB, 4_000))
    return folder


def build(ngpt, shards, *extra):
    """(args, model, optimizers, loader) of the shrunk CPU preset."""
    args = ngpt.parse_args(["--preset=cpu", f"--train_files={shards}/train_*.bin", f"--val_files={shards}/val_*.bin",
                            *TOY, *extra])
    torch.manual_seed(0)
    model = ngpt.GPT(args)
    optimizers = ngpt.build_optimizers(model, args, 0, 1)
    loader = ngpt.TrainLoader(args.train_files, args.train_seq_len, args.micro_batches, 0, 1, args.vocab_size)
    return args, model, optimizers, loader


def off_sphere(model, ngpt, matrices):
    """Largest |length - 1| over the unit vectors of the block matrices (matrices=True) or of the embeddings and
    the head (matrices=False)."""
    block_params = {p for b in model.blocks for p in b.parameters()}
    worst = 0.0
    for p, index, axis in ngpt.sphere_parts(model):
        if (p in block_params) == matrices:
            worst = max(worst, (p.detach()[index].norm(dim=axis) - 1).abs().max().item())
    return worst


def test_sphere_parts_cover_every_matrix_along_the_embedding_dimension(ngpt, shards):
    args, model, _, _ = build(ngpt, shards)
    parts = ngpt.sphere_parts(model)
    attn = [b.attn for b in model.blocks if b.attn is not None]
    assert len(parts) == 5 + 2 * len(attn) + 2 * len(model.blocks) and len(attn) == 15
    for p, index, axis in parts:
        assert p.detach()[index].shape[axis] == args.model_dim  # the vectors live in the embedding space
    assert off_sphere(model, ngpt, True) < TOL and off_sphere(model, ngpt, False) < TOL  # on the spheres at init


@pytest.mark.parametrize("script,optimizer,step_kind", [
    ("ngpt", "muon", "project"), ("ngpt", "muon", "geodesic"), ("ngpt", "adam", "project"),
    ("ngpt", "adam", "geodesic"), ("stacked", "muon", "project"), ("stacked", "muon", "geodesic")])
def test_every_normalized_vector_is_unit_after_each_step(request, shards, script, optimizer, step_kind):
    ngpt = request.getfixturevalue(script)
    args, model, optimizers, loader = build(ngpt, shards, f"--ngpt_optimizer={optimizer}",
                                            f"--sphere_step={step_kind}")
    assert isinstance(optimizers[0], ngpt.MatrixAdam if optimizer == "adam" else ngpt.Muon)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(5):
        ngpt.train_step(model, model, loader, optimizers, args, step, 1, torch.device("cpu"))
        assert off_sphere(model, ngpt, True) < TOL, step
        assert off_sphere(model, ngpt, False) < TOL, step
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    if script == "stacked":  # the stack's own Muon did the steps
        assert {"neuron_second_moment", "momentum_buffer"} <= set(optimizers[0].state[model.blocks[0].mlp.fc_w])
    assert {"blocks.0.attn.qkvo_w", "blocks.3.mlp.fc_w", "blocks.15.mlp.proj_w", "lm_head.weight", "embed.weight",
            "blocks.2.alpha_mlp", "blocks.0.attn.s_qk", "s_z"} <= moved


def test_lazy_projection_drifts_and_snaps_back_on_schedule(ngpt, shards):
    args, model, optimizers, loader = build(ngpt, shards, "--sphere_every=3", "--num_iterations=12")
    for step in range(7):
        ngpt.train_step(model, model, loader, optimizers, args, step, 1, torch.device("cpu"))
        drift = off_sphere(model, ngpt, True)
        if (step + 1) % 3 == 0:
            assert drift < TOL, (step, drift)  # snapped back after steps 3 and 6
        else:
            assert drift > 1e-3, (step, drift)  # the Muon steps moved them off
        assert off_sphere(model, ngpt, False) < TOL  # embeddings and head: every step


def unit_rows(shape, seed, axis=-1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=axis)


@pytest.mark.parametrize("axis", [-1, -2])
def test_geodesic_stays_on_the_sphere_and_is_the_projection_to_first_order(ngpt, axis):
    W = unit_rows((12, 20), 0, axis)
    U = torch.randn(12, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gaps = []
    for lr in (1e-1, 1e-2, 1e-3, 1e-4):
        D = -lr * U
        geodesic = ngpt.geodesic_step(W, D, axis, "norm", lr)
        assert (geodesic.norm(dim=axis) - 1).abs().max() < 1e-14  # exactly on the sphere
        projected = F.normalize(W + D, dim=axis)
        gaps.append((geodesic - projected).norm().item())
        # The arc is as long as the tangent step: the angle from W is |T|
        T = D - (D * W).sum(axis, keepdim=True) * W
        angle = torch.acos((geodesic * W).sum(axis).clamp(-1, 1))
        assert torch.allclose(angle, T.norm(dim=axis), rtol=1e-6, atol=1e-12)
    # The gap shrinks as lr^2: first-order agreement
    for big, small in zip(gaps, gaps[1:], strict=False):
        assert 80 < big / small < 125, gaps
    assert gaps[-1] < 1e-6


def test_geodesic_angle_lr_turns_each_vector_by_lr_and_keeps_any_radius(ngpt):
    W = 1.7 * unit_rows((6, 9), 2)  # drifted rows (lazy projection): the step keeps their length
    D = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    D[0] = 0.5 * W[0]  # no tangent part: stays
    new = ngpt.geodesic_step(W, D, -1, "lr", 0.3)
    assert torch.allclose(new.norm(dim=-1), torch.full((6,), 1.7, dtype=torch.float64), rtol=1e-14)
    cos = (new * W).sum(-1) / 1.7**2
    assert torch.equal(new[0], W[0])
    assert torch.allclose(torch.acos(cos[1:]), torch.full((5,), 0.3, dtype=torch.float64), atol=1e-12)
    # it turns toward the tangent part of D
    T = D - (D * W).sum(-1, keepdim=True) / 1.7**2 * W
    assert ((new - W) * T).sum(-1)[1:].min() > 0


def test_on_the_sphere_plain_decay_only_lengthens_the_step_and_the_geodesic_drops_it(ngpt):
    W, lr, c = unit_rows((5, 8), 4), 0.05, 0.02  # c = lr x wd
    U = torch.randn(5, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    decayed = (1 - c) * W - lr * U  # Muon's step with its decoupled decay
    assert torch.allclose(F.normalize(decayed, dim=-1), F.normalize(W - lr / (1 - c) * U, dim=-1), atol=1e-15)
    for angle in ("norm", "lr"):
        assert torch.allclose(ngpt.geodesic_step(W, decayed - W, -1, angle, lr),
                              ngpt.geodesic_step(W, -lr * U, -1, angle, lr), atol=1e-15)


def rope(x):
    """The record's rotary embedding, written out: [T, H, D], the first D/4 frequencies (1/1024)^(j/(D/4 - 1)),
    the next D/4 zero, each pairing dim j with dim j + D/2."""
    T, _, D = x.shape
    quarter = D // 4
    freqs = torch.cat([(1 / 1024) ** (torch.arange(quarter, dtype=torch.float64) / (quarter - 1)),
                       torch.zeros(quarter, dtype=torch.float64)])
    theta = torch.arange(T, dtype=torch.float64)[:, None, None] * freqs
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * theta.cos() + x2 * theta.sin(), x2 * theta.cos() - x1 * theta.sin()], dim=-1)


def toy_loss(model, args, tokens, targets, window_blocks, eot):
    """nGPT's formulas for blocks 0 and 1 then the head, from the model's weights, in fp64."""
    d, H = args.model_dim, args.num_heads
    D, T, L = d // H, len(tokens), args.num_layers
    sqrt_d = math.sqrt(d)

    def norm(x):
        return x / x.norm(dim=-1, keepdim=True)

    w = {n: p.detach().double() for n, p in model.named_parameters()}
    mix, lambdas = w["scalars"][: 2 * L].view(L, 2), w["scalars"][2 * L : 4 * L].view(L, 2)
    h0 = w["embed.weight"][tokens]
    docs = (tokens == eot).cumsum(0)
    pos = torch.arange(T)
    h = h0
    for i, window in ((0, window_blocks), (1, max(1, window_blocks // 2))):  # block 0: long window, 1: short
        h = norm(mix[i, 0] * h + mix[i, 1] * h0)
        Wq, Wk, Wv, Wo = w[f"blocks.{i}.attn.qkvo_w"]
        s_qk = w[f"blocks.{i}.attn.s_qk"] * sqrt_d  # stored at 1/sqrt(d), init 1
        q = norm(rope((h @ Wq.T).view(T, H, D))) * s_qk
        k = norm(rope((h @ Wk.T).view(T, H, D))) * s_qk
        ve = w[f"value_embeds.{i}.weight"][tokens].view(T, H, D)  # tables 0 and 1 serve blocks 0 and 1
        v = lambdas[i, 0] * (h @ Wv.T).view(T, H, D) + lambdas[i, 1] * ve
        seen = ((pos[None] <= pos[:, None]) & (docs[:, None] == docs[None])
                & (pos[:, None] // args.attn_block_size - pos[None] // args.attn_block_size < window))
        scores = torch.einsum("thd,shd->hts", q, k) * math.sqrt(D)
        attn = torch.softmax(scores.masked_fill(~seen, -math.inf), dim=-1)
        y = torch.einsum("hts,shd->thd", attn, v).reshape(T, d) @ Wo.T
        alpha_a = w[f"blocks.{i}.alpha_attn"] * sqrt_d * args.ngpt_alpha_init
        h = norm(h + alpha_a * (norm(y) - h))
        u = (h @ w[f"blocks.{i}.mlp.fc_w"].T) * w[f"blocks.{i}.mlp.s_u"] * sqrt_d
        m = torch.relu(u).square() @ w[f"blocks.{i}.mlp.proj_w"].T
        alpha_m = w[f"blocks.{i}.alpha_mlp"] * sqrt_d * args.ngpt_alpha_init
        h = norm(h + alpha_m * (norm(m) - h))
    z = (h @ w["lm_head.weight"].T) * w["s_z"] * sqrt_d * args.ngpt_logit_scale
    z = 15 * z / torch.sqrt(z.square() + 225)
    return F.cross_entropy(z, targets)


def test_forward_matches_the_formula_on_a_two_block_toy(ngpt, shards):
    eot = ngpt.EOT_TOKEN
    args = ngpt.parse_args(["--preset=cpu", *TOY, "--vocab_size=50257", "--attn_block_size=4",
                            "--ngpt_alpha_init=0.2", "--ngpt_logit_scale=4"])
    torch.manual_seed(0)
    model = ngpt.GPT(args)
    g = torch.Generator().manual_seed(5)

    def rand(t, low, high):
        return low + (high - low) * torch.rand(t.shape, generator=g)

    scale = args.model_dim**-0.5
    with torch.no_grad():  # every learned scale away from its init, so that each one is checked
        for i, block in enumerate(model.blocks):
            live = i < 2
            block.alpha_attn.copy_(rand(block.alpha_attn, 0.2, 2.0) * scale * live)
            block.alpha_mlp.copy_(rand(block.alpha_mlp, 0.2, 2.0) * scale * live)
            block.mlp.s_u.copy_(rand(block.mlp.s_u, 0.5, 1.5))
            if block.attn is not None:
                block.attn.s_qk.copy_(rand(block.attn.s_qk, 0.5, 2.0) * scale)
        mix, lambdas, skips = model.scalar_views()
        mix[:2].copy_(torch.tensor([[1.3, 0.4], [0.7, -0.3]]))
        lambdas[:2].copy_(rand(lambdas[:2], 0.2, 1.0))
        skips.zero_()  # blocks 9-11 add nothing: blocks 2-15 are the identity
        model.s_z.copy_(rand(model.s_z, 0.5, 2.0) * scale)
    tokens = torch.randint(0, 300, (33,), generator=g)
    tokens[[9, 20]] = eot  # three documents
    inputs, targets = tokens[:-1], tokens[1:]
    window = 3  # blocks of 4 tokens: long window 3 blocks, short 1
    with torch.no_grad():
        got = model(inputs, targets, window).item()
    want = toy_loss(model, args, inputs, targets, window, eot).item()
    assert got == pytest.approx(want, rel=1e-5)
    # the toy is not trivial: the window and the documents both change the loss
    assert want != pytest.approx(toy_loss(model, args, inputs, targets, 8, eot).item(), rel=1e-4)
    assert want != pytest.approx(toy_loss(model, args, inputs, targets, window, -1).item(), rel=1e-4)


def test_bad_ngpt_settings_are_one_line_errors(ngpt):
    for arg, words in (("--sphere_step=retract", "must be project or geodesic"),
                       ("--sphere_angle=deg", "must be norm or lr"), ("--sphere_every=0", "must be 1 or more"),
                       ("--ngpt_optimizer=sgd", "must be muon or adam"), ("--ngpt_alpha_init=0", "must be positive")):
        with pytest.raises(SystemExit, match=re.escape(words)):
            ngpt.parse_args(["--preset=cpu", arg])


def test_cpu_preset_run_finishes_and_lowers_the_loss(tmp_path, tiny_data):
    from kit.runs.logs import parse_log

    _, log, _ = run_training(script_path("ngpt"), tmp_path, tiny_data, "--num_iterations=20", "--val_loss_every=10",
                                "--micro_batches=2")
    run = parse_log(log).runs[0]
    losses = [v.val_loss for v in run.validations]
    assert run.finished and [v.step for v in run.validations] == [0, 10, 20]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses


def test_analysis_finds_and_names_an_ngpt_checkpoints_matrices(ngpt, shards, tmp_path):
    import csv
    import sys

    sys.path.insert(0, str(ROOT))
    import analysis

    ngpt.main(["--preset=cpu", f"--train_files={shards}/train_*.bin", f"--val_files={shards}/val_*.bin", *TOY,
               "--num_iterations=2", "--checkpoint_every=2", "--val_loss_every=0", f"--log_dir={tmp_path}/logs",
               f"--checkpoint_dir={tmp_path}/ckpt", "--run_id=ngpt_tiny"])
    ckpt = tmp_path / "ckpt" / "ngpt_tiny" / "step_000002.pt"
    analysis.main([str(ckpt), "--replicas=3", "--out", str(tmp_path / "out"), "--skip_plots",
                   "--properties=spectral_norm_w,frobenius_norm_w,echo"])
    with open(tmp_path / "out" / "ngpt_tiny" / "step_000002.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 92  # 15 attention blocks x 4 + 16 x 2 MLP, as in the baseline
    kinds = {kind: [r for r in rows if r["kind"] == kind] for kind in ("q", "k", "v", "o", "mlp_in", "mlp_out")}
    assert [len(v) for v in kinds.values()] == [15, 15, 15, 15, 16, 16]
    assert not any(r["layer"] == "7" and r["kind"] in "qkvo" for r in rows)
    # The analysed weights are the checkpoint's unit vectors: ||W||_F^2 = the number of vectors (32 rows of q, 32
    # columns of o, 128 rows of the MLP in, 128 columns of the MLP out)
    for kind, vectors in (("q", 32), ("o", 32), ("mlp_in", 128), ("mlp_out", 128)):
        for r in kinds[kind]:
            assert float(r["frobenius_norm_w"]) ** 2 == pytest.approx(vectors, rel=1e-4), (kind, r["layer"])
