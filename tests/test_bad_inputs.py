"""Bad input gets a one-line error before anything is written: no traceback, no log, no stray file."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BASELINE, ROOT, load_script

# --- training script ---


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


@pytest.fixture
def data(tmp_path):
    """Byte-valued train and val shards (vocab 256) under tmp_path/data."""
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "data" / "t_train_000.bin", rng.integers(0, 256, 20_000))
    write_shard(tmp_path / "data" / "t_val_000.bin", rng.integers(0, 256, 4_000))
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_argv(tmp_path, data, *extra, run_id="run"):
    """One CPU step of a 256-token vocabulary: a valid run, until `extra` spoils it."""
    return ["--preset=cpu", "--vocab_size=256", f"--train_files={data}/t_train_*.bin",
            f"--val_files={data}/t_val_*.bin", "--micro_batches=1", "--num_iterations=1", "--val_tokens=64",
            "--val_loss_every=0", "--checkpoint_every=", f"--log_dir={tmp_path / 'logs'}",
            f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--run_id={run_id}", *extra]


def refusal(baseline, argv):
    """main(argv) must stop with a one-line `error: ...`; -> that line."""
    with pytest.raises(SystemExit) as e:
        baseline.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def written(tmp_path):
    """Files under the run's log and checkpoint folders."""
    return sorted(p for d in ("logs", "ckpt") for p in (tmp_path / d).rglob("*") if p.is_file())


# ---------------------------------------------------------------- run ids


@pytest.mark.parametrize("existing", ["log", "checkpoint folder"])
def test_reused_run_id_is_refused(baseline, tmp_path, data, existing):
    baseline.main(tiny_argv(tmp_path, data, "--checkpoint_every=1"))
    log, ckpt = tmp_path / "logs" / "run.txt", tmp_path / "ckpt" / "run"
    before = {p: p.read_bytes() for p in written(tmp_path)}
    if existing == "checkpoint folder":
        log.unlink()
        before.pop(log)
    message = refusal(baseline, tiny_argv(tmp_path, data, "--checkpoint_every=1"))
    assert f"{existing} {log if existing == 'log' else ckpt}" in message and "--overwrite=1" in message
    assert {p: p.read_bytes() for p in written(tmp_path)} == before


def test_overwrite_replaces_the_old_run(baseline, tmp_path, data):
    baseline.main(tiny_argv(tmp_path, data, "--checkpoint_every=1"))
    stale = tmp_path / "ckpt" / "run" / "step_000009.pt"  # a file only the old run had
    stale.write_bytes(b"old")
    baseline.main(tiny_argv(tmp_path, data, "--checkpoint_every=1", "--overwrite=1"))
    log = (tmp_path / "logs" / "run.txt").read_text()
    assert log.count("variant:baseline world_size:1") == 1 and '"overwrite": true' in log
    assert sorted(p.name for p in (tmp_path / "ckpt" / "run").iterdir()) == ["step_000001.pt"]


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "{tmp}/escape", ".hidden", "..", " "])
def test_run_id_that_is_not_a_plain_name_is_refused(baseline, tmp_path, data, run_id):
    message = refusal(baseline, tiny_argv(tmp_path, data, run_id=run_id.format(tmp=tmp_path)))
    assert "--run_id" in message and "not a plain name" in message
    assert not (tmp_path / "escape.txt").exists() and not written(tmp_path)


def test_plain_run_ids_are_accepted(baseline):
    assert baseline.parse_args(["--run_id=sweep_polar_muon_lr-1e+00_3fa.2"]).run_id.startswith("sweep")


def test_reused_run_id_is_refused_by_every_process_under_torchrun(tmp_path, data):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.txt").write_text("an earlier run\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(BASELINE),
           *tiny_argv(tmp_path, data, "--micro_batches=2", "--val_tokens=128")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "error: the log" in proc.stderr  # before any process joined the group
    assert (tmp_path / "logs" / "run.txt").read_text() == "an earlier run\n" and not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------- settings and data, checked before the log


@pytest.mark.parametrize("setting, field", [
    ("--num_iterations=-3", "num_iterations"), ("--num_iterations=0", "num_iterations"),
    ("--val_tokens=0", "val_tokens"), ("--micro_batches=0", "micro_batches"), ("--train_seq_len=0", "train_seq_len"),
    ("--val_seq_len=0", "val_seq_len"), ("--model_dim=0", "model_dim"), ("--num_heads=0", "num_heads"),
    ("--mlp_ratio=0", "mlp_ratio"), ("--attn_block_size=0", "attn_block_size"), ("--max_window=0", "max_window"),
    ("--vocab_size=0", "vocab_size"), ("--val_loss_every=-1", "val_loss_every"), ("--warmup_steps=-1", "warmup_steps"),
    ("--muon_momentum_warmup_steps=-1", "muon_momentum_warmup_steps"), ("--muon_lr=-0.01", "muon_lr"),
    ("--muon_lr=nan", "muon_lr"), ("--head_lr=-1", "head_lr"), ("--embed_lr=-1", "embed_lr"),
    ("--scalar_lr=-1", "scalar_lr"), ("--muon_wd=-0.1", "muon_wd"), ("--muon_momentum=1", "muon_momentum"),
    ("--muon_momentum_start=-0.1", "muon_momentum_start"), ("--adam_beta1=1", "adam_beta1"),
    ("--adam_beta2=1.5", "adam_beta2"), ("--cooldown_frac=1.1", "cooldown_frac"), ("--adam_eps=0", "adam_eps"),
    ("--device=gpu", "device"),
])
def test_impossible_numbers_are_refused(baseline, setting, field):
    with pytest.raises(SystemExit) as e:
        baseline.parse_args(["--preset=cpu", setting])
    assert str(e.value).startswith(f"error: --{field}=") and "\n" not in str(e.value)


def test_edge_values_that_make_a_run_are_accepted(baseline):
    args = baseline.parse_args(["--preset=cpu", "--cooldown_frac=0", "--muon_lr=0", "--val_loss_every=0",
                                "--warmup_steps=0", "--muon_momentum=0", "--head_lr=inf"])
    assert args.cooldown_frac == 0 and args.head_lr == float("inf")
    assert baseline.parse_args(["--preset=cpu", "--cooldown_frac=1"]).cooldown_frac == 1


@pytest.mark.parametrize("variant", ["adamw", "sphere"])
def test_variants_with_their_own_settings_are_checked_too(variant):
    module = load_script(ROOT / "speedruns" / f"train_gpt_medium_{variant}.py")
    assert module.parse_args(["--preset=cpu"]).num_iterations == 200
    with pytest.raises(SystemExit, match="--num_iterations=0 must be 1 or more"):
        module.parse_args(["--preset=cpu", "--num_iterations=0"])


@pytest.mark.parametrize("setting", ["--num_iterations=-3", "--num_iterations=0"])
def test_bad_setting_exits_nonzero_within_seconds_leaving_nothing(tmp_path, data, setting):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(BASELINE), *tiny_argv(tmp_path, data, setting)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [f"error: {setting} must be 1 or more"]
    assert time.monotonic() - started < 60 and not written(tmp_path) and not (tmp_path / "logs").exists()


def spoil(data, what):
    if what == "train shard damaged":
        (data / "t_train_000.bin").write_bytes(b"\0" * 2048)
    elif what == "second train shard too short":
        write_shard(data / "t_train_001.bin", np.zeros(10))


@pytest.mark.parametrize("what, extra, expected", [
    ("no train files", ["--train_files=nowhere/x_*.bin"], "no files match nowhere/x_*.bin"),
    ("no val files", ["--val_files=nowhere/y_*.bin"], "no files match nowhere/y_*.bin"),
    ("train shard damaged", [], "not a token shard"),
    ("second train shard too short", [], "t_train_001.bin holds 10 tokens, fewer than one step needs"),
    ("train shard shorter than a step", ["--train_seq_len=8192", "--micro_batches=4"], "fewer than one step needs"),
    ("val shard shorter than val_tokens", ["--val_tokens=8192"], "validation tokens of"),
    ("bad checkpoint cadence", ["--checkpoint_every=x:3"], "bad --checkpoint_every"),
    ("not 16 layers", ["--num_layers=12"], "--num_layers=16"),
    ("heads do not split the width", ["--model_dim=60"], "--num_heads heads"),
])
def test_data_and_setting_errors_leave_no_log(baseline, tmp_path, data, what, extra, expected):
    spoil(data, what)
    message = refusal(baseline, tiny_argv(tmp_path, data, "--checkpoint_every=1", *extra))
    assert expected in message
    assert not written(tmp_path)


# ---------------------------------------------------------------- shards, devices, disks


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_beyond_the_vocabulary_is_refused_naming_the_shard(baseline, tmp_path, data, split):
    write_shard(data / f"t_{split}_000.bin", np.r_[np.arange(200), 300, np.arange(20_000) % 256])
    message = refusal(baseline, tiny_argv(tmp_path, data))
    assert f"t_{split}_000.bin holds token id 300, outside --vocab_size=256" in message and "preset" in message
    assert not written(tmp_path)
    assert baseline.read_shard(data / f"t_{split}_000.bin").max() == 300  # without a vocabulary: no check


def test_cuda_without_a_device_is_refused(baseline, tmp_path, data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = refusal(baseline, tiny_argv(tmp_path, data, "--device=cuda"))
    assert "no CUDA device" in message and "--preset=cpu" in message
    assert not written(tmp_path)


def test_log_folder_under_a_file_is_refused(baseline, tmp_path, data):
    (tmp_path / "file").write_text("")
    message = refusal(baseline, tiny_argv(tmp_path, data, f"--log_dir={tmp_path / 'file' / 'logs'}"))
    assert str(tmp_path / "file") in message and "--log_dir" in message
    assert (tmp_path / "file").read_text() == ""


def test_checkpoint_folder_that_cannot_be_made_is_refused_before_training(baseline, tmp_path, data):
    (tmp_path / "file").write_text("")
    message = refusal(baseline, tiny_argv(tmp_path, data, "--checkpoint_every=1",
                                          f"--checkpoint_dir={tmp_path / 'file' / 'ckpt'}"))
    assert str(tmp_path / "file") in message and "--checkpoint_dir" in message
    assert not written(tmp_path)


def test_read_only_log_folder_is_refused(baseline, tmp_path, data):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs").chmod(0o500)
    try:
        message = refusal(baseline, tiny_argv(tmp_path, data))
    finally:
        (tmp_path / "logs").chmod(0o700)
    assert str(tmp_path / "logs" / "run.txt") in message and "Permission denied" in message
    assert not written(tmp_path)


def test_full_disk_while_writing_a_checkpoint_leaves_no_tmp(baseline, tmp_path, monkeypatch):
    args = baseline.parse_args(["--preset=cpu", "--vocab_size=256"])
    model = baseline.GPT(args)
    muon, adam = baseline.build_optimizers(model, args, 0, 1)

    def full_disk(obj, f):
        f.write(b"half a checkpoint") if hasattr(f, "write") else Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    path = tmp_path / "ckpt" / "run" / "step_000001.pt"
    with pytest.raises(SystemExit) as e:
        baseline.save_checkpoint(path, model, muon, adam, args, 1, None, 0, 1)
    assert str(e.value) == (f"error: cannot write checkpoint {path} (No space left on device); free disk space or "
                            "choose another --checkpoint_dir")
    assert list(path.parent.iterdir()) == []


def test_log_line_that_cannot_be_written_is_a_one_line_error(baseline, tmp_path):
    with pytest.raises(SystemExit, match="error: cannot write the log .*missing.*No such file"):
        baseline.Logger(tmp_path / "missing" / "run.txt", True)("step:1/1")
