"""The NanoGPT-Medium optimizer leaderboard's optimizers: `adamw` (its AdamW) and `kron` (PSGD Kron, kron-torch)."""

import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch
from variant_scripts import ROOT, committed_variants, load_script, script_path

sys.path.insert(0, str(ROOT / "tools"))
from core.shards import write_shard  # noqa: E402

SMALL = ["--preset=cpu", "--model_dim=32", "--num_heads=1", "--vocab_size=128", "--micro_batches=1"]


@pytest.fixture(scope="module")
def scripts():
    return {v: load_script(v) for v in ("adamw", "kron")}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hidden_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


class _OneBatch:
    accum = 1

    def next_step(self):
        return torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)


def pull_toward_targets(model, hidden, seed=1):
    """Make the model's forward a loss that pulls every hidden matrix toward a random target."""
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=g) for p in hidden]

    def forward(inputs, target_seq, window):
        return sum(((p - t) ** 2).sum() for p, t in zip(hidden, targets, strict=True))

    return forward, targets


# --- the manifest ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, lr_field, lr", [("adamw", "adamw_lr", 0.0015), ("kron", "kron_lr", 0.0005)])
def test_variant_sits_in_the_manifest(variant, lr_field, lr, scripts):
    tables = tomllib.loads((ROOT / "patches" / "variants.toml").read_text())
    assert variant in committed_variants()
    assert tables[variant]["patches"] == [variant]
    assert tables[variant]["lr"] == lr_field  # the field tools/bench tunes
    assert script_path(variant).exists() and (ROOT / "patches" / f"{variant}.patch").exists()
    assert getattr(scripts[variant].Hyperparameters(), lr_field) == lr


def test_only_the_kron_variant_mentions_kron_torch():
    for variant in ["baseline", *committed_variants()]:
        uses = "kron_torch" in script_path(variant).read_text()
        assert uses == (variant == "kron"), variant


# --- adamw ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_iterations, warmup", [(9500, 500), (5960, 314), (200, 11), (150, 8), (16, 1)])
def test_adamw_warmup_is_the_leaderboards_share_of_the_run(scripts, num_iterations, warmup):
    mod = scripts["adamw"]
    args = mod.parse_args(["--preset=cpu", f"--num_iterations={num_iterations}"])
    assert [mod.lr_multiplier(s, args) for s in (0, warmup // 2)] == [0.0, (warmup // 2) / warmup]
    assert mod.lr_multiplier(warmup - 1, args) < 1.0 == mod.lr_multiplier(warmup, args)


def test_adamw_without_warmup_on_a_tiny_run(scripts):
    mod = scripts["adamw"]
    args = mod.parse_args(["--preset=cpu", "--num_iterations=6"])  # 500/9500 x 6 rounds to 0 steps
    assert mod.lr_multiplier(0, args) == 1.0


def test_adamw_matches_torch_adamw_with_the_leaderboards_settings(scripts):
    mod = scripts["adamw"]
    args = mod.parse_args(SMALL)  # 200 steps: an 11-step warm-up
    torch.manual_seed(0)
    model = mod.GPT(args)
    muon, adam = mod.build_optimizers(model, args, 0, 1)
    hidden = hidden_params(muon)
    assert len(hidden) == 15 + 16 + 16  # q/k/v/o stacks (no attention in block 7), MLP in, MLP out
    initial = [p.detach().clone() for p in hidden]
    reference_params = [p.detach().clone().requires_grad_() for p in hidden]
    reference = torch.optim.AdamW(reference_params, lr=0.0015, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.125)
    forward, targets = pull_toward_targets(model, hidden)
    for step in range(4):
        mod.train_step(forward, model, _OneBatch(), (muon, adam), args, step, 1, torch.device("cpu"))
        warm = step / 11  # linear from 0 at step 0, on every learning rate
        assert muon.param_groups[0]["lr"] == pytest.approx(0.0015 * warm)
        assert adam.param_groups[0]["lr"] == pytest.approx(args.head_lr * warm)
        for group in reference.param_groups:
            group["lr"] = 0.0015 * warm
        reference.zero_grad()
        sum(((p - t) ** 2).sum() for p, t in zip(reference_params, targets, strict=True)).backward()
        reference.step()
    for p, r, w0 in zip(hidden, reference_params, initial, strict=True):
        assert not torch.equal(p.detach(), w0)
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["adamw", "kron"])
def test_updated_matrices_are_fp32_when_the_model_is_bf16(scripts, variant):
    """On CUDA main() makes the block matrices and embeddings bf16; these variants keep the matrices fp32."""
    mod = scripts[variant]
    args = mod.parse_args(SMALL)
    model = mod.GPT(args)
    for p in model.parameters():  # as main() does on CUDA
        if p is not model.lm_head.weight and p is not model.scalars:
            p.data = p.data.bfloat16()
    muon, _ = mod.build_optimizers(model, args, 0, 1)
    assert {p.dtype for p in hidden_params(muon)} == {torch.float32}
    assert model.embed.weight.dtype == torch.bfloat16  # the rest is left as the baseline has it


# --- kron -----------------------------------------------------------------------------------------------


def test_kron_updates_the_hidden_matrices_with_psgd_kron(scripts):
    from kron_torch import Kron

    mod = scripts["kron"]
    args = mod.parse_args(SMALL)
    torch.manual_seed(0)
    model = mod.GPT(args)
    muon, adam = mod.build_optimizers(model, args, 0, 1)
    assert isinstance(muon, Kron)
    hidden = hidden_params(muon)
    assert len(hidden) == 15 + 16 + 16
    assert {p for g in adam.param_groups for p in g["params"]}.isdisjoint(hidden)  # head/embeddings/scalars: Adam
    forward, targets = pull_toward_targets(model, hidden)
    distance = sum(((p - t) ** 2).sum().item() for p, t in zip(hidden, targets, strict=True))
    for step in range(3):
        mod.train_step(forward, model, _OneBatch(), (muon, adam), args, step, 1, torch.device("cpu"))
    assert muon.param_groups[0]["lr"] == pytest.approx(0.0005)  # no warm-up: the flat part of the schedule
    assert muon.param_groups[0]["weight_decay"] == 0.625
    for p in hidden:  # each matrix has Kronecker factors (one per side of its 2D view) and a momentum
        state = muon.state[p]
        assert state["step"] == 3 and len(state["Q"]) == 2, p.shape
    moved = sum(((p - t) ** 2).sum().item() for p, t in zip(hidden, targets, strict=True))
    assert moved < distance


def learnable_stream(n, vocab, rng):
    """Mostly t -> (5 t + 3) mod vocab, with 5% random jumps."""
    out, t = np.empty(n, dtype=np.int64), 1
    for i in range(n):
        t = int(rng.integers(vocab)) if rng.random() < 0.05 else (5 * t + 3) % vocab
        out[i] = t
    return out


def test_kron_short_cpu_run_lowers_the_loss(scripts, tmp_path, one_thread):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "tiny_train_000.bin", learnable_stream(20_000, 256, rng))
    write_shard(tmp_path / "tiny_val_000.bin", learnable_stream(4_000, 256, rng))
    argv = ["--preset=cpu", f"--train_files={tmp_path}/tiny_train_*.bin", f"--val_files={tmp_path}/tiny_val_*.bin",
            "--num_iterations=10", "--val_loss_every=5", "--vocab_size=256", "--model_dim=64", "--num_heads=1",
            "--train_seq_len=128", "--val_seq_len=128", "--micro_batches=2", "--val_tokens=512",
            "--max_window=128", "--checkpoint_every=10", f"--checkpoint_dir={tmp_path}", f"--log_dir={tmp_path}",
            "--run_id=kron"]
    scripts["kron"].main(argv)
    log = (tmp_path / "kron.txt").read_text()
    losses = [float(x) for x in re.findall(r"^step:\d+/10 val_loss:(\S+)", log, flags=re.M)]
    assert len(losses) == 3, log[-500:]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 0.5, losses
    # analysis.py reads checkpoints with weights_only=True: Kron's state must hold only plain types
    ckpt = torch.load(tmp_path / "kron" / "step_000010.pt", map_location="cpu", weights_only=True)
    state = ckpt["optimizer"]["muon"]["blocks.0.attn.qkvo_w"]
    assert state["step"] == 10 and len(state["Q"]) == 2


def run_without_kron_torch(args, cwd):
    """Run the kron script as `python script ARGS` in a process where `import kron_torch` fails."""
    code = ("import runpy, sys; sys.modules['kron_torch'] = None; script = sys.argv[1]; sys.argv = sys.argv[1:]; "
            "runpy.run_path(script, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, str(script_path("kron")), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_kron_without_the_package_is_one_clear_line(tmp_path):
    done = run_without_kron_torch(["--preset=cpu", f"--log_dir={tmp_path}/logs"], tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "kron-torch" in lines[0] and "pip install kron-torch==0.3.3" in lines[0], lines[0]
    assert not (tmp_path / "logs").exists()  # it stops before writing a log
    assert run_without_kron_torch(["--help"], tmp_path).returncode == 0  # --help needs no package
