"""Parts of the CUDA path rehearsed on the CPU: what can run without a GPU runs here, in CI.

FlexAttention has no backward pass on the CPU, but its forward compiles there: the compiled no-grad
forward with the BlockMask built inside the graph (as on the GPU) is checked against the CPU path, and so
is the compiled Newton-Schulz iteration's one graph per matrix shape."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend


def small_model(baseline):
    args = baseline.parse_args(["--preset=bench", "--model_dim=32", "--num_heads=2", "--vocab_size=50257"])
    torch.manual_seed(0)
    model = baseline.GPT(args)
    with torch.no_grad():  # the zero-initialized head and outputs would hide the attention
        model.lm_head.weight.normal_(0, 0.05)
        for block in model.blocks:
            block.mlp.proj_w.normal_(0, 0.05)
            if block.attn is not None:
                block.attn.qkvo_w[3].normal_(0, 0.05)
    return args, model


def test_compiled_flex_forward_equals_the_cpu_path_without_recompiling(baseline):
    """The GPU's forward (BlockMask built in the graph from a window tensor, compiled FlexAttention) on one
    sequence, compiled by inductor on the CPU: the same loss as the block-local CPU attention, for two
    window sizes, from one graph."""
    torch._dynamo.reset()
    args, model = small_model(baseline)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50000, (1, args.train_seq_len + 1), generator=g)
    tokens[0, torch.randperm(args.train_seq_len, generator=g)[:6]] = baseline.EOT_TOKEN  # documents
    counter = CompileCounterWithBackend("inductor")
    flex_forward = torch.compile(lambda x, y, w: model.loss(x, y, model.flex_masks(x, w)), backend=counter,
                                 dynamic=False)
    with torch.no_grad():
        for window in (1, 2):
            local = model(tokens[:, :-1], tokens[:, 1:], torch.tensor(window))
            flex = flex_forward(tokens[:, :-1], tokens[:, 1:], torch.tensor(window))
            assert flex.item() == pytest.approx(local.item(), abs=1e-5)
    assert counter.frame_count == 1


def test_compiled_newton_schulz_compiles_once_per_matrix_shape(baseline):
    """dynamic=False, as in main(): the three shapes of the Muon groups give three graphs, and calling them
    again (in any order) compiles nothing more (with shapes marked dynamic it recompiled three times)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(baseline.orthogonalize, backend=counter, dynamic=False)
    shapes = [(4, 64, 64), (256, 64), (64, 256)]
    for _ in range(3):
        for shape in shapes:
            compiled(torch.randn(shape))
    assert counter.frame_count == len(shapes)
