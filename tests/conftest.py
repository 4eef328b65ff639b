"""Shared fixtures: the baseline loaded by path, the tiny dataset, and a runner for CPU-preset training."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "speedruns" / "train_gpt_medium.py"
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]


def load_script(path):
    """Import a speedrun script by path (nothing runs on import)."""
    name = "speedrun_" + Path(path).stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile (and eager FlexAttention) look a traced module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def baseline():
    return load_script(BASELINE)


@pytest.fixture(scope="session")
def tiny_data():
    """Paths of the tiny train and val shards (built once, cached under data/tiny)."""
    from kit.data.prepare_tiny_data import build

    train, val = build()
    return {"train_files": str(train), "val_files": str(val)}


@pytest.fixture(scope="session")
def bench_data():
    """The bench preset's byte shards as settings (built once, cached under data/tiny)."""
    from kit.data.prepare_tiny_data import build_bytes

    train, val = build_bytes()
    return [f"--train_files={train}", f"--val_files={val}"]


# Small enough for tests: 4 steps of the CPU preset on 2 micro-batches take seconds.
QUICK = ["--preset=cpu", "--val_tokens=512", "--checkpoint_every="]


def run_training(script, tmp_path, tiny_data, *extra, nproc=1, run_id="run", check=True):
    """Run a speedrun script on the CPU preset; -> (CompletedProcess, log path, checkpoint dir)."""
    args = [*QUICK, f"--train_files={tiny_data['train_files']}", f"--val_files={tiny_data['val_files']}",
            f"--log_dir={tmp_path / 'logs'}", f"--checkpoint_dir={tmp_path / 'ckpt'}", f"--run_id={run_id}", *extra]
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, tmp_path / "logs" / f"{run_id}.txt", tmp_path / "ckpt" / run_id
