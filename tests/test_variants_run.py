"""Every committed variant trains a few steps of a shrunken CPU preset: finite, falling validation loss."""

import re
import sys

import numpy as np
import pytest
import torch
from variant_scripts import ROOT, distinct_variants, load_script, script_path

sys.path.insert(0, str(ROOT / "tools"))
from core.shards import write_shard  # noqa: E402

STEPS = 6


def token_stream(n: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """A learnable stream: mostly t -> (5 t + 3) mod vocab, with 5% random jumps."""
    out = np.empty(n, dtype=np.int64)
    t = 1
    for i in range(n):
        t = int(rng.integers(vocab)) if rng.random() < 0.05 else (5 * t + 3) % vocab
        out[i] = t
    return out


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_shards")
    rng = np.random.default_rng(0)
    write_shard(folder / "tiny_train_000.bin", token_stream(20_000, 256, rng))
    write_shard(folder / "tiny_val_000.bin", token_stream(4_000, 256, rng))
    return folder


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared CPU: extra threads only wait on each other
    yield
    torch.set_num_threads(threads)


# 4 micro-batches of 64 tokens: the echo variants estimate noise from 3 or more micro-batches of a step
@pytest.mark.parametrize("variant", distinct_variants())
def test_variant_trains_on_cpu(variant, synthetic_shards, tmp_path, one_thread):
    script = load_script(variant)
    data = synthetic_shards
    argv = ["--preset=cpu", f"--train_files={data}/tiny_train_*.bin", f"--val_files={data}/tiny_val_*.bin",
            f"--num_iterations={STEPS}", f"--val_loss_every={STEPS // 2}", "--vocab_size=256", "--model_dim=64",
            "--num_heads=1", "--train_seq_len=64", "--val_seq_len=128", "--micro_batches=4", "--val_tokens=512",
            "--max_window=128", "--checkpoint_every=", f"--log_dir={tmp_path}", f"--run_id={variant}"]
    script.main(argv)
    log = (tmp_path / f"{variant}.txt").read_text()
    assert log.startswith(script_path(variant).read_text().rstrip("\n"))  # the log opens with the source
    losses = [float(x) for x in re.findall(r"^step:\d+/\d+ val_loss:(\S+)", log, flags=re.M)]
    assert len(losses) == 3, log[-500:]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 0.05, losses

