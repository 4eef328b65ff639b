"""End-to-end CPU-preset runs of the baseline: losses, logs, distribution, checkpoints, NaN stop."""

import math

import pytest
import torch
from conftest import BASELINE, load_script, run_training

from kit.runs.logs import parse_log


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data):
    """The same 4 steps on 2 micro-batches: one process accumulating, and two processes under torchrun.
    One micro-batch at a time (the batched CPU step sums in another order: tests/test_cpu_fast_path.py)."""
    common = ["--micro_batches=2", "--num_iterations=4", "--val_loss_every=2", "--checkpoint_every=4",
              "--fuse_micro_batches=0"]
    out = {}
    for nproc in (1, 2):
        tmp = tmp_path_factory.mktemp(f"nproc{nproc}")
        _, log, ckpt = run_training(BASELINE, tmp, tiny_data, *common, nproc=nproc, run_id=f"p{nproc}")
        out[nproc] = (log, ckpt)
    return out


def test_both_logs_parse_and_agree(runs):
    parsed = {n: parse_log(log) for n, (log, _) in runs.items()}
    for log in parsed.values():
        assert log.source.rstrip("\n") == BASELINE.read_text().rstrip("\n")
        assert len(log.runs) == 1 and log.runs[0].finished and log.runs[0].steps == 4
    curves = {n: [(v.step, v.val_loss) for v in log.runs[0].validations] for n, log in parsed.items()}
    assert [s for s, _ in curves[1]] == [0, 2, 4]
    assert curves[1][0][1] == pytest.approx(math.log(50304), abs=1e-4)
    assert curves[1][-1][1] < curves[1][0][1] - 0.05
    for (s1, l1), (s2, l2) in zip(curves[1], curves[2], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=2e-4)
    assert "world_size:2" in "\n".join(parsed[2].environment)


def test_two_process_checkpoint_holds_every_muon_buffer(baseline, runs):
    single = baseline.load_checkpoint(runs[1][1] / "step_000004.pt")
    ckpt = baseline.load_checkpoint(runs[2][1] / "step_000004.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4 and ckpt["variant"] == "baseline"
    model = baseline.model_from_checkpoint(ckpt)
    hidden = [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim >= 2]
    assert len(hidden) == 15 + 16 + 16
    assert sorted(ckpt["optimizer"]["muon"]) == sorted(hidden)
    for name in hidden:  # the buffers of both ranks arrived, and equal the single-process ones
        torch.testing.assert_close(ckpt["optimizer"]["muon"][name]["momentum_buffer"],
                                   single["optimizer"]["muon"][name]["momentum_buffer"], atol=2e-5, rtol=1e-3)
    adam = ckpt["optimizer"]["adam"]
    assert {"lm_head.weight", "embed.weight", "scalars"} <= set(adam) and adam["scalars"]["step"] == 4
    import hashlib
    assert ckpt["source_sha256"] == hashlib.sha256(ckpt["source"].encode()).hexdigest()
    assert ckpt["script_path"] == "speedruns/train_gpt_medium.py"


def test_loaded_checkpoint_reproduces_the_model(baseline, runs):
    ckpt = baseline.load_checkpoint(runs[2][1] / "step_000004.pt")
    model = baseline.model_from_checkpoint(ckpt)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt["model"][name]), name
    args = baseline.Hyperparameters(**ckpt["hyperparameters"])
    loss = baseline.evaluate(model, args, ckpt["step"], 0, 1, torch.device("cpu"))
    # one process here, two (summing their halves) in the run: fp32 sums of ~86 in another order differ
    # by a few 1e-6; a model restored wrongly moves the loss by far more than 1e-4
    assert loss == pytest.approx(ckpt["val_loss"], abs=1e-4)


def test_foreign_checkpoint_gets_a_one_line_error(baseline, tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": 1}, path)
    with pytest.raises(SystemExit, match="not a speedrun checkpoint"):
        baseline.load_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        baseline.load_checkpoint(path)


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, tiny_data):
    """The loss is checked where the clock pauses (here only the last step: no per-step host sync), and the
    error still names the first step whose loss was not finite."""
    proc, log, _ = run_training(BASELINE, tmp_path, tiny_data, "--micro_batches=2", "--num_iterations=5",
                                "--val_loss_every=0", "--head_lr=inf", check=False)
    assert proc.returncode != 0
    assert "training loss became non-finite at step 2" in proc.stderr
    assert "step:5/5 train_time" in log.read_text() and "val_loss" not in log.read_text().split("=" * 100)[-1]


def test_cpu_preset_loss_falls(tmp_path, tiny_data):
    """A dozen full CPU-preset steps (8 micro-batches) bring the loss well below its uniform start."""
    _, log, _ = run_training(BASELINE, tmp_path, tiny_data, "--num_iterations=12", "--val_loss_every=6")
    vals = [v.val_loss for v in parse_log(log).runs[0].validations]
    assert len(vals) == 3 and vals[0] > 10.8 and vals[2] < vals[1] < vals[0] - 0.5


def test_script_is_importable_without_running(tmp_path):
    module = load_script(BASELINE)
    assert module.variant_name() == "baseline" and hasattr(module, "main")
