"""The bench's regime (bench v2): the official integrated weight decay, seeded and paired data order,
and a learning-rate multiplier per matrix kind."""

import pytest
import torch


def integrated_decay(module, args):
    """sum over the run's steps of lr_t x muon_wd (attention; the MLP's is twice that)."""
    return sum(module.lr_multiplier(step, args) for step in range(args.num_iterations)) * args.muon_lr * args.muon_wd


def test_bench_preset_decays_as_much_as_record_8(baseline):
    official = integrated_decay(baseline, baseline.parse_args([]))
    bench = integrated_decay(baseline, baseline.parse_args(["--preset=bench"]))
    assert official == pytest.approx(0.97, abs=0.01)  # record 8: lr 0.025, wd 0.01, 5960 steps, 70% cooldown
    assert bench == pytest.approx(official, rel=0.01)


def loader(baseline, bench_data, seed, rank=0, world_size=1):
    args = baseline.parse_args(["--preset=bench", *bench_data])
    return baseline.TrainLoader(args.train_files, args.train_seq_len, args.micro_batches, rank, world_size, seed=seed)


def test_seeded_order_is_the_same_for_one_seed_and_differs_between_seeds(baseline, bench_data):
    a, b, other = loader(baseline, bench_data, 3), loader(baseline, bench_data, 3), loader(baseline, bench_data, 4)
    steps = [(a.next_step(), b.next_step(), other.next_step()) for _ in range(5)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y, _ in steps)
    assert not all(torch.equal(x[0], z[0]) for x, _, z in steps)


def test_seeded_order_reads_each_slot_once_per_pass_and_keeps_targets_shifted(baseline, bench_data):
    shuffled = loader(baseline, bench_data, 0)
    seen = []
    for _ in range(20):
        inputs, targets = shuffled.next_step()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        seen += shuffled.order[shuffled.used - shuffled.micro_batches : shuffled.used].tolist()
    assert len(seen) == len(set(seen)) == 20 * shuffled.micro_batches
    starts = {int(i) * shuffled.seq_len for i in seen}
    first_row = inputs[0]
    assert any(torch.equal(first_row, shuffled.tokens[s : s + shuffled.seq_len].long()) for s in starts)


def test_unseeded_order_is_the_stream_and_processes_share_one_global_batch(baseline, bench_data):
    stream = loader(baseline, bench_data, None)
    inputs, _ = stream.next_step()
    T = stream.seq_len
    assert torch.equal(inputs.flatten(), stream.tokens[: inputs.numel()].long())
    for seed in (None, 7):
        whole = loader(baseline, bench_data, seed)
        halves = [loader(baseline, bench_data, seed, rank, 2) for rank in range(2)]
        for _ in range(3):
            together = torch.cat([h.next_step()[0] for h in halves])
            assert torch.equal(whole.next_step()[0], together), T


def test_lr_multiplier_scales_the_step_of_one_kind_and_not_the_decay(baseline):
    args = baseline.parse_args(["--preset=bench", "--muon_lr_mult=q=0,mlp_out=3"])
    torch.manual_seed(0)
    model = baseline.GPT(args)
    for p in model.parameters():  # zero-initialized matrices would make the MLP-out check trivial
        torch.nn.init.normal_(p, std=0.02) if p.dim() >= 2 else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    muon, _ = baseline.build_optimizers(model, args, 0, 1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    muon.step()
    decay = 1 - args.muon_lr * args.muon_wd
    qkvo = model.blocks[0].attn.qkvo_w.detach()
    torch.testing.assert_close(qkvo[0], before["blocks.0.attn.qkvo_w"][0] * decay)  # q: decay only
    assert not torch.allclose(qkvo[1], before["blocks.0.attn.qkvo_w"][1] * decay)  # k: a full step
    reference = baseline.build_optimizers(baseline.GPT(args), args, 0, 1)[0]
    assert reference.param_groups[2]["lr_mul"].item() == 3.0
    mlp_decay = 1 - args.muon_lr * args.muon_wd * 2
    out_step = model.blocks[0].mlp.proj_w.detach() - before["blocks.0.mlp.proj_w"] * mlp_decay
    in_step = model.blocks[0].mlp.fc_w.detach() - before["blocks.0.mlp.fc_w"] * mlp_decay
    # an orthogonalized step has spectral norm ~ lr x shape scale; MLP-out's is 3 times MLP-in's scale
    ratio = torch.linalg.matrix_norm(out_step, ord=2) / torch.linalg.matrix_norm(in_step, ord=2)
    assert ratio == pytest.approx(3.0 / 2.0, rel=0.1)  # MLP-in [4d, d] takes sqrt(4) = 2 for its shape


@pytest.mark.parametrize("spec", ["x=2", "q=", "q=abc", "q"])
def test_bad_lr_multiplier_is_refused(baseline, spec):
    with pytest.raises(SystemExit, match="muon_lr_mult"):
        baseline.lr_multipliers(spec)


def kind_slices(model):
    """{kind: [matrices of the model of that kind]} (views into the parameters)."""
    attn = [b.attn.qkvo_w for b in model.blocks if b.attn is not None]
    kinds = {k: [w[i] for w in attn] for i, k in enumerate(("q", "k", "v", "o"))}
    kinds["mlp_in"] = [b.mlp.fc_w for b in model.blocks]
    kinds["mlp_out"] = [b.mlp.proj_w for b in model.blocks]
    return kinds


def one_step_displacement(module, mult):
    args = module.parse_args(["--preset=bench", f"--muon_lr_mult={mult}", "--muon_wd=0"])
    torch.manual_seed(0)
    model = module.GPT(args)
    muon, _ = module.build_optimizers(model, args, 0, 1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step is measured: in the first, zero-initialized matrices may jump
        before = {k: [w.detach().clone() for w in ws] for k, ws in kind_slices(model).items()}  # onto manifolds
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        muon.step()
    return {k: sum((w.detach() - b).norm().item() for w, b in zip(ws, before[k], strict=True))
            for k, ws in kind_slices(model).items()}


def test_every_variant_with_groups_honours_the_lr_multiplier():
    """The bench tunes a variant's `groups` through --muon_lr_mult: doubling their multiplier must move
    those matrices further and leave the others' step as it was."""
    import tomllib

    from variant_scripts import ROOT, load_script

    manifest = tomllib.loads((ROOT / "patches" / "variants.toml").read_text())
    grouped = {v: t["groups"] for v, t in manifest.items() if "groups" in t}
    assert grouped, "no variant declares groups"
    for variant, groups in grouped.items():
        module = load_script(variant)
        plain = one_step_displacement(module, "")
        doubled = one_step_displacement(module, ",".join(f"{k}=2" for k in groups))
        for kind in plain:
            if kind in groups:
                assert doubled[kind] > 1.3 * plain[kind], (variant, kind, plain[kind], doubled[kind])
            else:
                assert doubled[kind] == pytest.approx(plain[kind], rel=1e-5), (variant, kind)
