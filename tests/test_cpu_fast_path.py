"""The CPU fast path of the bench: a step's micro-batches as one batch, attention over only the key
blocks a query block can see, and an opt-in compiled model. Same math as the per-micro-batch loop and
the dense masked attention, checked here; the speed is measured by tools/bench_step_cost, not tested."""

import pytest
import torch
import torch.nn.functional as F
from variant_scripts import distinct_variants, load_script

# ---------------------------------------------------------------- attention over local key blocks


def documents(B, T, ends, seed):
    """[B, T] token ids with `ends` end-of-text tokens per row at random places (documents of any length)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50000, (B, T), generator=g)
    for row in tokens:
        row[torch.randperm(T, generator=g)[:ends]] = 50256
    return tokens


def dense_reference(baseline, q, k, v, docs, window, block):
    """Masked attention over all T keys (the reference): q, k, v [B, T, H, D] -> [B, T, H, D]."""
    mask = baseline.dense_attention_mask(docs, window, block)[:, None]  # [B, 1, T, T]
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                       scale=baseline.ATTN_SCALE)
    return y.transpose(1, 2)


@pytest.mark.parametrize("T, block, window, span, ends", [
    (256, 16, 1, 2, 3),     # the bench: short window
    (256, 16, 2, 2, 3),     # the bench: long window at its largest
    (192, 16, 3, 5, 12),    # span larger than the window: the window masks
    (100, 16, 2, 3, 4),     # T not a multiple of the block: a padded last block
    (37, 8, 6, 6, 9),       # short sequence, window beyond its start
    (64, 8, 8, 8, 0),       # one document, window over the whole sequence
    (64, 4, 3, 3, 40),      # documents shorter than a block
])
def test_local_attention_equals_dense_masked_attention(baseline, T, block, window, span, ends):
    B, H, D = 3, 2, 8
    docs = baseline.document_ids(documents(B, T, ends, seed=T + window + ends))
    g = torch.Generator().manual_seed(T * 7 + span)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    mask = baseline.local_attention_mask(docs, torch.tensor(window), block, span)
    local = baseline.local_attention(q, k, v, mask, baseline.ATTN_SCALE)
    torch.testing.assert_close(local, dense_reference(baseline, q, k, v, docs, window, block), atol=1e-6, rtol=1e-6)


def test_local_mask_is_the_dense_mask_cut_into_blocks(baseline):
    """Every (query, key) pair the local mask allows is allowed by the dense mask, and vice versa."""
    B, T, block, window, span = 2, 52, 8, 3, 4
    docs = baseline.document_ids(documents(B, T, 5, seed=1))
    local = baseline.local_attention_mask(docs, window, block, span)  # [B, nb, bs, S]
    dense = baseline.dense_attention_mask(docs, window, block)
    rebuilt = torch.zeros(B, T, T, dtype=torch.bool)
    nb = local.size(1)
    for i in range(nb):
        for a in range(block):
            for j in range(span * block):
                q, key = i * block + a, (i - span + 1) * block + j
                if q < T and local[:, i, a, j].any():
                    assert 0 <= key < T
                    rebuilt[:, q, key] = local[:, i, a, j]
    assert torch.equal(rebuilt, dense)


def test_local_attention_takes_the_window_as_a_tensor_or_an_int(baseline):
    docs = baseline.document_ids(documents(1, 64, 3, seed=2))
    assert torch.equal(baseline.local_attention_mask(docs, 2, 8, 4),
                       baseline.local_attention_mask(docs, torch.tensor(2), 8, 4))


# ---------------------------------------------------------------- one batch = the per-micro-batch loop


def train(module, data, fuse, steps, dtype=torch.float64):
    """`steps` bench-preset steps of a script in process, in fp64 -> (per-step losses, final weights).

    fp64, because in fp32 the two summation orders drift apart chaotically within a few steps (the loss
    by 2e-5 at step 3, the embedding rows Adam sees rarely by 0.2 after 20 steps), which would hide a
    real difference; in fp64 the losses agree to 1e-7 and the block matrices to 2e-6 (the Newton-Schulz
    iteration stays fp32), the rarely seen embedding rows to 5e-4."""
    extra = [f"--fuse_micro_batches={int(fuse)}", "--num_iterations=20"]
    args = module.parse_args(["--preset=bench", *data, *extra])
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = module.GPT(args)
    finally:
        torch.set_default_dtype(default)
    optimizers = module.build_optimizers(model, args, 0, 1)
    loader = module.TrainLoader(args.train_files, args.train_seq_len, args.micro_batches, 0, 1)
    device = torch.device("cpu")
    losses = [module.train_step(model, model, loader, optimizers, args, step, 1, device).item()
              for step in range(steps)]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_training(module, data, steps, rtol=1e-5, dtype=torch.float64, weights=True):
    loop_losses, loop_weights = train(module, data, False, steps, dtype)
    fused_losses, fused_weights = train(module, data, True, steps, dtype)
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(loop_losses), rtol=rtol, atol=0)
    if dtype != torch.float64 or not weights:
        return  # in fp32 the weights drift apart by rounding alone (see train)
    for name, w in loop_weights.items():
        if w.dtype != torch.float64:
            continue  # kept in fp32 by the variant (adamw, kron: the hidden matrices): rounding drifts them
        torch.testing.assert_close(fused_weights[name], w, rtol=1e-3, atol=2e-3, msg=name)


def test_baseline_trains_the_same_model_batched_and_looped(bench_data, baseline):
    assert_same_training(baseline, bench_data, steps=20)


FP32_ONLY = {"stiefel", "block_stiefel", "l1_stiefel", "symplectic"}
LOOP_ONLY = {"echo", "echo_exact", "echo_oracle"}  # their hooks read each micro-batch's own gradient


@pytest.mark.parametrize("variant", [v for v in distinct_variants() if v not in LOOP_ONLY])
def test_every_variant_trains_the_same_model_batched_and_looped(bench_data, variant):
    # 1e-4: an exact msign (svd) or a constraint step amplifies fp32 rounding in the directions of tiny
    # singular values (svd: 1.5e-5 at step 3); a wrong batching shows at 1e-2 and more
    # Their constraint steps mix the weights' dtype with fp32 products, so they run in fp32 (losses only).
    dtype = torch.float32 if variant in FP32_ONLY else torch.float64
    # svd's exact msign turns rounding in the embeddings' rarely seen rows into 2e-3 differences: losses only.
    # ngpt_polar_normuon_cwd: cautious decay's sign mask flips where an update entry rounds across zero, and on
    # unit-norm rows one flip moves a weight by lr x wd x 2 x 0.125 = 2.9e-3 (the losses agree to 1e-7).
    weights = variant not in ("svd", "ngpt_polar_normuon_cwd")
    assert_same_training(load_script(variant), bench_data, steps=4, rtol=1e-4, dtype=dtype, weights=weights)


@pytest.mark.parametrize("variant", sorted(LOOP_ONLY))
def test_variants_that_read_micro_batch_gradients_keep_the_loop(bench_data, variant):
    module = load_script(variant)
    assert module.parse_args(["--preset=bench", *bench_data]).fuse_micro_batches is False
    with pytest.raises(SystemExit, match="fuse_micro_batches"):
        args = module.parse_args(["--preset=bench", *bench_data, "--fuse_micro_batches=1"])
        module.build_optimizers(module.GPT(args), args, 0, 1)


def test_batched_validation_equals_one_sequence_at_a_time(bench_data, baseline):
    args = baseline.parse_args(["--preset=bench", *bench_data, "--val_tokens=4096"])
    torch.manual_seed(0)
    model = baseline.GPT(args)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.02)  # a head that is not zero, so that the loss depends on the input
    device = torch.device("cpu")
    fused = baseline.evaluate(model, args, 60, 0, 1, device)
    looped = baseline.evaluate(model, baseline.dataclasses.replace(args, fuse_micro_batches=False), 60, 0, 1, device)
    assert fused == pytest.approx(looped, rel=1e-6)


# ---------------------------------------------------------------- the compiled CPU model


def test_compiled_cpu_model_compiles_once_for_training_and_once_for_validation(baseline):
    """A growing window and the switch to validation and back must not recompile (dynamo's frame count,
    with a backend that only counts, so the test does not pay for code generation)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    args = baseline.parse_args(["--preset=bench", "--model_dim=16", "--num_heads=1"])
    model = baseline.GPT(args)
    counter = CompileCounter()
    forward = torch.compile(model, backend=counter, dynamic=False)
    tokens = torch.randint(0, 256, (3, 2, args.train_seq_len + 1))
    for step in (0, 40, 80, 129):  # window 1 -> 2 blocks
        window = baseline.window_tensor(step, args, torch.device("cpu"))
        forward(tokens[0, :, :-1], tokens[0, :, 1:], window).backward()
        with torch.no_grad():
            forward(tokens[1, :, :-1], tokens[1, :, 1:], window)
    assert counter.frame_count == 2, f"{counter.frame_count} graphs for one training and one validation shape"
