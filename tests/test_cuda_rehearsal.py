"""Parts of the CUDA path rehearsed on the CPU: what can run without a GPU runs here, in CI.

FlexAttention has no backward pass on the CPU, but its forward compiles there: the compiled no-grad
forward with the BlockMask built inside the graph (as on the GPU) is checked against the CPU path, and so
is the compiled Newton-Schulz iteration's one graph per matrix shape."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BASELINE, ROOT
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


def test_compiled_muon_update_compiles_once_per_matrix_shape_over_the_schedule(baseline, monkeypatch):
    """main() on the CUDA path compiles muon_matrix_step_, a matrix's whole Muon update, as one function
    (dynamic=False): four Muon steps of the bench model, with the schedule's lr and momentum new at every step and
    fp32 and bf16 (mantissa) weights, compile one graph per matrix shape and give the eager steps' weights."""
    def train(step_fn, bf16):
        args = baseline.parse_args(["--preset=bench"])
        torch.manual_seed(0)
        model = baseline.GPT(args)
        if bf16:
            for group in baseline.muon_param_groups(model, ""):
                for p in group["params"]:
                    p.data = p.data.bfloat16()
        monkeypatch.setattr(baseline, "muon_matrix_step_", step_fn)
        muon, _ = baseline.build_optimizers(model, args, 0, 1)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            for group in muon.param_groups:
                group["lr"] = group["initial_lr"] * (1 - 0.2 * step)
                group["momentum"] = 0.85 + 0.03 * step
                for p in group["params"]:
                    p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            muon.step()
        return muon
    eager_step = baseline.muon_matrix_step_
    for bf16 in (False, True):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = train(baseline.numbers_as_tensors(torch.compile(eager_step, backend=counter, dynamic=False)), bf16)
        eager = train(eager_step, bf16)
        shapes = {tuple(p.shape) for group in compiled.param_groups for p in group["params"]}
        assert counter.frame_count == len(shapes) == 3, (counter.frame_count, shapes)
        for group, eager_group in zip(compiled.param_groups, eager.param_groups, strict=True):
            for p, q in zip(group["params"], eager_group["params"], strict=True):
                assert p.dtype == (torch.bfloat16 if bf16 else torch.float32)
                # the fp32 master weights (a bf16 weight's 16 bits may round the other way where the tensors'
                # 1 - m and decay, in fp32, differ from the numbers' in fp64 by an ulp)
                torch.testing.assert_close(baseline.fp32_master(p, compiled.state[p]),
                                           baseline.fp32_master(q, eager.state[q]), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(compiled.state[p]["momentum_buffer"], eager.state[q]["momentum_buffer"])


def test_two_process_cuda_step_equals_one_fp32_process(baseline, bench_data, tmp_path):
    """The CUDA path's step logic (--rehearse_cuda=1: bf16 weights with their mantissa, bf16 head, one sequence per
    forward, compiled model and Newton-Schulz, the warm-up undone, gradients reduced while Adam steps, in-place async
    all-gathers) under torchrun with 2 gloo processes, against the 1-process fp32 loop: the same run within bf16's
    rounding, compiled without graph breaks (train and validation forward, 3 Newton-Schulz shapes)."""
    common = [*bench_data, "--preset=bench", "--num_iterations=4", "--val_loss_every=0", "--val_tokens=2048",
              "--checkpoint_every=4", f"--log_dir={tmp_path / 'logs'}", f"--checkpoint_dir={tmp_path / 'ckpt'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rehearsal = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(Path(__file__).parent / "rehearse_cuda_step.py"), str(BASELINE), *common, "--run_id=cuda",
         "--rehearse_cuda=1", "--compile=1", "--warmup_steps=2"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert rehearsal.returncode == 0, rehearsal.stdout[-2000:] + rehearsal.stderr[-3000:]
    decoder = json.JSONDecoder()  # each JSON object read where it starts (robust to another rank's text around it)
    counts = [decoder.raw_decode(rehearsal.stdout, m.end())[0]
              for m in re.finditer("rehearsal: ", rehearsal.stdout)]
    assert len(counts) == 2 and all(c["frames"] == 5 and c["graph_breaks"] == 0 for c in counts), counts
    # the model's training and validation graphs; Muon's whole matrix update (Newton-Schulz inlined), one per shape
    frames = {"GPT": 2, "orthogonalize": 0, "muon_matrix_step_": 3}
    assert all(c["frames_by_function"] == frames for c in counts), counts
    reference = subprocess.run(
        [sys.executable, str(BASELINE), *common, "--run_id=fp32", "--fuse_micro_batches=0"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    def final(run_id):
        ckpt = baseline.load_checkpoint(tmp_path / "ckpt" / run_id / "step_000004.pt")
        return ckpt, {k: v.float() for k, v in ckpt["model"].items()}

    (cuda, cuda_w), (fp32, fp32_w) = final("cuda"), final("fp32")
    assert cuda["world_size"] == 2 and cuda_w["blocks.0.attn.qkvo_w"].dtype == torch.float32
    assert cuda["model"]["blocks.0.attn.qkvo_w"].dtype == torch.bfloat16  # stored as the GPU keeps it
    assert cuda["model"]["lm_head.weight"].dtype == torch.float32
    assert cuda["val_loss"] == pytest.approx(fp32["val_loss"], abs=0.01)  # measured: 3.0611 against 3.0641
    # Weights differ by up to 15% (the zero-initialized MLP-out matrices; 1 and 2 rehearsal processes differ as
    # much while their losses agree to 2e-5): Newton-Schulz gives a gradient's weakest directions, where bf16's
    # rounding decides, as much weight as its strongest. A matrix left out of the gathers would stay at its init.
    for name, w in fp32_w.items():
        assert (cuda_w[name] - w).norm() <= 0.25 * w.norm() + 1e-6, name
    mantissa = cuda["optimizer"]["muon"]["blocks.0.attn.qkvo_w"]["mantissa"]
    assert mantissa.dtype == torch.int16 and mantissa.any()  # the bits a bf16 weight drops are kept


def test_validation_logits_in_chunks_give_the_same_loss(baseline, monkeypatch):
    """Validation (no grad) computes the head in chunks of LOGIT_CHUNK_TOKENS tokens: the same mean loss as all at
    once, to 1e-6; training (grad on) keeps one piece."""
    args, model = small_model(baseline)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 50000, (3, args.train_seq_len + 1), generator=g)
    window = torch.tensor(2)
    with torch.no_grad():
        whole = model(tokens[:, :-1], tokens[:, 1:], window)
        monkeypatch.setattr(baseline, "LOGIT_CHUNK_TOKENS", 100)  # 768 tokens: 8 chunks, the last one short
        calls = []
        original = baseline.GPT.head_loss
        monkeypatch.setattr(baseline.GPT, "head_loss", lambda self, *a: calls.append(len(a[0])) or original(self, *a))
        chunked = model(tokens[:, :-1], tokens[:, 1:], window)
    assert calls == [100] * 7 + [68]
    assert chunked.item() == pytest.approx(whole.item(), abs=1e-6)
    calls.clear()
    model(tokens[:, :-1], tokens[:, 1:], window)
    assert calls == [768]


def test_main_sets_expandable_segments_before_cuda_starts(baseline, monkeypatch):
    """Record #8's allocator setting is in the environment before anything can touch CUDA (here main() stops at
    its first check, a bad argument); a setting the user made is kept."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with pytest.raises(SystemExit):
        baseline.main(["bad-argument"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    with pytest.raises(SystemExit):
        baseline.main(["bad-argument"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"


def test_rehearse_cuda_is_refused_on_a_gpu(baseline):
    with pytest.raises(SystemExit, match="rehearse_cuda"):
        baseline.parse_args(["--rehearse_cuda=1", "--device=cuda"])
