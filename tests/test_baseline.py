"""Unit tests of the baseline script: settings, data, attention, structure, Muon."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F


def cpu_args(baseline, *extra):
    return baseline.parse_args(["--preset=cpu", *extra])


# ---------------------------------------------------------------- settings


def test_overrides_apply_after_the_preset(baseline):
    args = cpu_args(baseline, "--num_iterations=7", "--muon_lr=0.05", "--compile=false")
    assert (args.num_iterations, args.muon_lr, args.compile, args.model_dim) == (7, 0.05, False, 64)
    assert baseline.parse_args([]).model_dim == 1024


@pytest.mark.parametrize("argv, message", [
    (["--muon_rl=0.1"], "did you mean --muon_lr"),
    (["--num_iterations=ten"], "not a valid int"),
    (["--preset=gpu"], "unknown preset"),
    (["num_iterations=3"], "--key=value"),
])
def test_bad_settings_get_one_line_errors(baseline, argv, message):
    with pytest.raises(SystemExit) as e:
        baseline.parse_args(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_cadence(baseline):
    assert baseline.checkpoint_steps("10:100,100", 300) == {10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300}
    assert baseline.checkpoint_steps("", 300) == set()
    assert baseline.checkpoint_steps("2", 5) == {2, 4}
    with pytest.raises(SystemExit, match="checkpoint_every"):
        baseline.checkpoint_steps("x:3", 10)


def test_world_size_that_cannot_keep_the_batch_is_refused(baseline, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="cannot share 8 micro-batches"):
        baseline.setup_distributed(baseline.parse_args([]))


# ---------------------------------------------------------------- data


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def test_shard_reader_round_trip_and_rejections(baseline, tmp_path):
    tokens = np.arange(1000) % 50257
    write_shard(tmp_path / "a.bin", tokens)
    assert baseline.read_shard(tmp_path / "a.bin").tolist() == tokens.tolist()
    bad = tmp_path / "bad.bin"
    bad.write_bytes((tmp_path / "a.bin").read_bytes()[:-2])
    with pytest.raises(SystemExit, match="bad.bin holds .* bytes.*prepare_tiny_data"):
        baseline.read_shard(bad)
    bad.write_bytes(b"\0" * 2048)
    with pytest.raises(SystemExit, match="bad magic"):
        baseline.read_shard(bad)
    with pytest.raises(SystemExit, match="no files match"):
        baseline.find_files(str(tmp_path / "none_*.bin"))


def test_loader_splits_the_same_global_batch_over_processes(baseline, tmp_path):
    write_shard(tmp_path / "t_000.bin", np.arange(5000) % 1000)
    pattern = str(tmp_path / "t_*.bin")
    single = baseline.TrainLoader(pattern, 16, 4, rank=0, world_size=1)
    ranks = [baseline.TrainLoader(pattern, 16, 4, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        inputs, targets = single.next_step()
        split = [r.next_step() for r in ranks]
        assert inputs.shape == (4, 16)
        assert torch.equal(inputs, torch.cat([s[0] for s in split]))
        assert torch.equal(targets, torch.cat([s[1] for s in split]))
        assert torch.equal(targets[:, :-1], inputs[:, 1:])  # targets are the inputs shifted by one


# ---------------------------------------------------------------- attention


def random_documents(T, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50000, (T,), generator=g)
    tokens[torch.randperm(T, generator=g)[:5]] = 50256
    return tokens


@pytest.mark.parametrize("window", [1, 2, 5, 64])
def test_cpu_attention_equals_flex_attention(baseline, window):
    T, H, D, block = 192, 2, 16, 16
    docs = baseline.document_ids(random_documents(T, window))
    g = torch.Generator().manual_seed(100 + window)
    q, k, v = (torch.randn(1, T, H, D, generator=g) for _ in range(3))
    mask = baseline.dense_attention_mask(docs, window, block)
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                           scale=baseline.ATTN_SCALE).transpose(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = baseline.attend(q, k, v, baseline.flex_block_mask(docs, window, block))
    span = min(window, T // block)
    local = baseline.attend(q, k, v, baseline.local_attention_mask(docs[None], window, block, span))
    torch.testing.assert_close(dense, flex, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, local, atol=1e-5, rtol=1e-5)


def test_dense_mask_is_document_causal_with_a_block_window(baseline):
    tokens = torch.tensor([1, 2, 3, 50256, 4, 5, 6, 7])  # document 0: 0-2, document 1: 3-7
    mask = baseline.dense_attention_mask(baseline.document_ids(tokens), 2, 2)
    allowed = {(q, k) for q in range(8) for k in range(8) if mask[q, k]}
    expected = {(q, k) for q in range(8) for k in range(q + 1)
                if (q < 3) == (k < 3) and q // 2 - k // 2 < 2}
    assert allowed == expected
    assert (6, 3) not in allowed and (6, 4) in allowed  # block 1 is out of the 2-block window of block 3


def test_window_schedule_follows_the_cubic(baseline):
    args = baseline.parse_args([])
    T = args.num_iterations
    # next multiple of 128 >= 3456 * (4x^3 - 6x^2 + 3x), in blocks: x=1/4 -> 1512 tokens, x=1/2 -> 1728, x=1 -> 3456
    assert [baseline.window_blocks(s, args) for s in (0, T // 4, T // 2, T)] == [1, 12, 14, 27]
    blocks = [baseline.window_blocks(s, args) for s in range(0, T + 1, 10)]
    assert blocks == sorted(blocks)


# ---------------------------------------------------------------- model structure


@pytest.fixture(scope="module")
def model(baseline):
    torch.manual_seed(0)
    return baseline.GPT(cpu_args(baseline))


def test_block_7_has_no_attention_and_92_hidden_matrices(baseline, model):
    assert [i for i, b in enumerate(model.blocks) if b.attn is None] == [7]
    matrices = sum(4 if b.attn is not None else 0 for b in model.blocks) + 2 * len(model.blocks)
    assert matrices == 92
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.7.attn.qkvo_w" not in names and "blocks.6.attn.qkvo_w" in names


def test_zero_and_uniform_inits(model):
    dim = model.args.model_dim
    bound = math.sqrt(3) * 0.5 / math.sqrt(dim)
    for b in model.blocks:
        assert b.mlp.proj_w.abs().max() == 0
        assert b.mlp.fc_w.abs().max() <= bound and b.mlp.fc_w.std() > bound / 3
        if b.attn is not None:
            assert b.attn.qkvo_w[3].abs().max() == 0
            assert b.attn.qkvo_w[:3].abs().max() <= bound
    assert model.lm_head.weight.abs().max() == 0
    assert model.lm_head.weight.shape[0] % 128 == 0 and model.lm_head.weight.shape[0] >= 50257


def test_fresh_model_predicts_uniformly(baseline, model):
    tokens = random_documents(65, 1)
    loss = model(tokens[:-1], tokens[1:], 2)
    assert abs(loss.item() - math.log(model.lm_head.weight.shape[0])) < 1e-4


def test_value_embeddings_reach_layers_0_2_and_13_15_in_unet_order(baseline, model):
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[2]))
             for i, b in enumerate(model.blocks)]
    tokens = random_documents(33, 2)
    with torch.no_grad():
        model(tokens[:-1], tokens[1:], 2)
    for h in hooks:
        h.remove()
    with_ve = {i for i, ve in seen.items() if ve is not None}
    assert with_ve == {0, 1, 2, 13, 14, 15}
    with torch.no_grad():
        tables = [ve(tokens[:-1]) for ve in model.value_embeds]
    for layer, table in [(0, 0), (1, 1), (2, 2), (13, 0), (14, 1), (15, 2)]:
        assert torch.equal(seen[layer], tables[table][None])  # the model runs [B, T]: one sequence here


def test_unet_skips_and_x0_mixing_carry_gradient(baseline, model):
    torch.manual_seed(3)
    m = baseline.GPT(model.args)
    with torch.no_grad():  # leave the zero init so that gradients reach every scalar
        for b in m.blocks:
            b.mlp.proj_w.normal_(0, 0.02)
            if b.attn is not None:
                b.attn.qkvo_w[3].normal_(0, 0.02)
        m.lm_head.weight.normal_(0, 0.02)
    tokens = random_documents(33, 4)
    m(tokens[:-1], tokens[1:], 2).backward()
    _, _, skip_weights = m.scalar_views()
    start = skip_weights.storage_offset()  # a view into the one scalar vector
    skip_grad = m.scalars.grad[start : start + len(skip_weights)]
    assert set(torch.nonzero(skip_grad).flatten().tolist()) == {9, 10, 11}
    assert (m.scalars.grad[:32].view(16, 2)[:, 1] != 0).all()  # every block mixes in x0


# ---------------------------------------------------------------- Muon


def test_newton_schulz_maps_singular_values_into_the_tuned_band(baseline):
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 256), (256, 64), (3, 96, 160)]:
        out = baseline.orthogonalize(torch.randn(*shape, generator=g))
        s = torch.linalg.svdvals(out)
        assert out.shape == shape
        assert s.min() > 0.6 and s.max() < 1.2, (shape, s.min(), s.max())
    # on an ill-conditioned matrix every direction above 5% of the top one lands in the band too
    U, _ = torch.linalg.qr(torch.randn(128, 128, generator=g))
    V, _ = torch.linalg.qr(torch.randn(128, 128, generator=g))
    S = torch.logspace(-3, 0, 128)
    s_out = (U.T @ baseline.orthogonalize(U @ torch.diag(S) @ V.T) @ V).diagonal()
    assert ((s_out[S > 0.05] > 0.6) & (s_out[S > 0.05] < 1.2)).all()


@pytest.mark.parametrize("shape, wd_mul", [((8, 4), 1.0), ((4, 8), 2.0)])
def test_muon_step_scaling_and_decoupled_weight_decay(baseline, shape, wd_mul):
    g = torch.Generator().manual_seed(1)
    w0, grad = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    p = torch.nn.Parameter(w0.clone())
    p.grad = grad.clone()
    lr, wd, m = 0.1, 0.3, 0.9
    muon = baseline.Muon([dict(params=[p], wd_mul=wd_mul)], lr=lr, momentum=m, weight_decay=wd)
    muon.step()
    nesterov = m * (1 - m) * grad + (1 - m) * grad
    scale = math.sqrt(max(1, shape[0] / shape[1]))
    expected = w0 * (1 - lr * wd * wd_mul) - lr * scale * baseline.orthogonalize(nesterov)
    torch.testing.assert_close(p.data, expected)
    torch.testing.assert_close(muon.state[p]["momentum_buffer"], (1 - m) * grad)


def test_bf16_master_weights_keep_the_lost_mantissa(baseline):
    p = torch.nn.Parameter(torch.randn(16, 8).bfloat16())
    state = {}
    master = baseline.fp32_master(p, state).clone()
    master += 1e-4  # far below bf16 resolution at these magnitudes
    baseline.store_master(p, state, master)
    assert torch.equal(baseline.fp32_master(p, state), master)
