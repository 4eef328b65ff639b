"""tools/sweep (grid, run ids, resume, signals, locks)."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from kit.runs import logs, sweep  # noqa: E402

SEP = "=" * 100


def option(cmd, name):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}="))


class FakeTrainer:
    """Stands in for the training script: writes a log whose final loss is 3 + |log10(lr) + 2|,
    records every call, and can be told to die half-way through a given call (like Ctrl-C)."""

    def __init__(self, interrupt_on_call=None):
        self.calls = []
        self.interrupt_on_call = interrupt_on_call

    def __call__(self, cmd, cwd, stdout_path, lock_fd=None):
        self.calls.append(cmd)
        log = Path(option(cmd, "log_dir")) / f"{option(cmd, 'run_id')}.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        steps = int(option(cmd, "num_iterations"))
        final = 3 + abs(math.log10(float(option(cmd, "muon_lr"))) + 2)
        lines = ["source", SEP, "env", SEP, f"step:0/{steps} val_loss:10.0000 train_time:0ms step_avg:0.00ms"]
        lines += [f"step:{s}/{steps} train_time:{s * 10}ms step_avg:10.00ms" for s in range(1, steps + 1)]
        if len(self.calls) == self.interrupt_on_call:
            log.write_text("\n".join(lines[:-2]) + "\n")  # killed before the final validation
            raise KeyboardInterrupt
        lines.append(f"step:{steps}/{steps} val_loss:{final:.6f} train_time:{steps * 10}ms step_avg:10.00ms")
        log.write_text("\n".join(lines) + "\n")
        return 0


def test_parse_sweep_args():
    spec = sweep.parse_sweep_args(
        ["polar", "--lr=0.01,0.02", "--seed=1,2", "--preset=cpu", "--parallel", "2", "--out=o", "--", "--ck=1:2,3"]
    )
    assert spec.variant == "polar" and spec.grid == {"muon_lr": ["0.01", "0.02"], "seed": ["1", "2"]}
    assert spec.passthrough == ["--preset=cpu", "--ck=1:2,3"] and spec.parallel == 2 and spec.out == Path("o")
    assert sweep.parse_sweep_args(["baseline", "--lr=0.05"]).grid == {"muon_lr": ["0.05"]}  # lr is always an axis
    for bad in (["--lr=1,2"], ["v", "--seed=1"], ["v", "--lr=1,2", "--parallel=0"], ["v", "w", "--lr=1,2"]):
        with pytest.raises(SystemExit) as info:
            sweep.parse_sweep_args(bad)
        assert "tools/sweep:" in str(info.value.code) and "\n" not in str(info.value.code)


def test_run_ids_are_deterministic():
    a = sweep.run_id_for("sweep", "polar", {"muon_lr": "0.01"}, ["--preset=cpu"])
    assert a == sweep.run_id_for("sweep", "polar", {"muon_lr": "0.01"}, ["--preset=cpu"])
    assert a.startswith("sweep_polar_muon_lr-0.01_")
    assert a != sweep.run_id_for("sweep", "polar", {"muon_lr": "0.01"}, ["--preset=cpu", "--num_iterations=9"])
    assert a != sweep.run_id_for("sweep", "polar", {"muon_lr": "0.02"}, ["--preset=cpu"])


def test_sweep_interrupted_after_one_run_resumes_without_rerunning_it(tmp_path, capsys):
    argv = ["baseline", "--lr=0.001,0.01,0.1", "--num_iterations=3", f"--out={tmp_path}"]
    first = FakeTrainer(interrupt_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(sweep.parse_sweep_args(argv), runner=first)
    assert len(first.calls) == 2
    done_id = option(first.calls[0], "run_id")
    cut_id = option(first.calls[1], "run_id")

    second = FakeTrainer()
    points = sweep.run_sweep(sweep.parse_sweep_args(argv), runner=second)
    rerun = [option(c, "run_id") for c in second.calls]
    assert done_id not in rerun and rerun[0] == cut_id and len(rerun) == 2
    assert [p.status for p in points] == ["resumed", "done", "done"]
    assert (tmp_path / "logs" / f"{cut_id}.txt.partial").exists()  # the interrupted log is kept aside

    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["muon_lr"] for r in rows] == ["0.001", "0.01", "0.1"]
    assert [float(r["final_val_loss"]) for r in rows] == pytest.approx([4.0, 3.0, 4.0])
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "0.001" in capsys.readouterr().out

    third = FakeTrainer()
    sweep.run_sweep(sweep.parse_sweep_args(argv), runner=third)
    assert third.calls == []  # everything finished: nothing runs again


class SeededTrainer(FakeTrainer):
    """FakeTrainer whose final loss also grows by 0.01 per seed: the seeds' mean and std are known."""

    def __call__(self, cmd, cwd, stdout_path, lock_fd=None):
        seed = int(option(cmd, "seed"))
        lr = float(option(cmd, "muon_lr"))
        code = FakeTrainer.__call__(self, cmd, cwd, stdout_path, lock_fd)
        log = Path(option(cmd, "log_dir")) / f"{option(cmd, 'run_id')}.txt"
        final = 3 + abs(math.log10(lr) + 2)
        log.write_text(log.read_text().replace(f"val_loss:{final:.6f}", f"val_loss:{final + 0.01 * seed:.6f}"))
        return code


def test_seeds_swept_beside_a_field_are_summarised_as_replicates(tmp_path, capsys):
    argv = ["baseline", "--lr=0.001,0.01", "--seed=0,1,2", "--num_iterations=3", f"--out={tmp_path}"]
    sweep.run_sweep(sweep.parse_sweep_args(argv), runner=SeededTrainer())
    with open(tmp_path / "sweep_seeds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["muon_lr"] for r in rows] == ["0.001", "0.01"]
    assert [float(r["mean_final_val_loss"]) for r in rows] == pytest.approx([4.01, 3.01])
    assert [float(r["std"]) for r in rows] == pytest.approx([0.01, 0.01], abs=1e-6)
    assert [r["n"] for r in rows] == ["3", "3"] and rows[0]["seeds"] == "0 1 2"
    # paired by seed: every seed's difference is exactly -1, so the interval has no width
    assert [float(r["diff_vs_first"]) for r in rows] == pytest.approx([0.0, -1.0])
    assert float(rows[1]["diff_ci_low"]) == pytest.approx(-1.0, abs=1e-5) and rows[1]["pairs"] == "3"
    assert float(rows[1]["diff_ci_high"]) == pytest.approx(-1.0, abs=1e-5)
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "over seeds" in capsys.readouterr().out
    # seed not swept: no replicates, no summary
    spec = sweep.parse_sweep_args(["baseline", "--lr=0.01", f"--out={tmp_path}"])
    points = sweep.make_points(spec, Path("x.py"), tmp_path)
    assert sweep.seed_summary(points, ["muon_lr"]) == []


def test_sweep_in_parallel_keeps_grid_order(tmp_path):
    argv = ["baseline", "--lr=0.1,0.01", "--seed=1,2", "--num_iterations=2", "--parallel=2", f"--out={tmp_path}"]
    trainer = FakeTrainer()
    points = sweep.run_sweep(sweep.parse_sweep_args(argv), runner=trainer)
    assert len(trainer.calls) == 4 and all(p.status == "done" for p in points)
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["muon_lr"], r["seed"]) for r in rows] == [("0.1", "1"), ("0.1", "2"), ("0.01", "1"), ("0.01", "2")]
    assert [float(r["final_val_loss"]) for r in rows] == pytest.approx([4.0, 4.0, 3.0, 3.0])


def test_sweep_commands(tmp_path):
    spec = sweep.parse_sweep_args(["polar", "--lr=0.01,0.02", "--nproc=8", "--preset=cpu", f"--out={tmp_path}"])
    points = sweep.make_points(spec, Path("/r/speedruns/train_gpt_medium_polar.py"), tmp_path)
    cmd = points[1].cmd
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc_per_node=8", "/r/speedruns/train_gpt_medium_polar.py"]
    log_dir = tmp_path / "logs"
    assert cmd[4:] == [f"--run_id={points[1].run_id}", f"--log_dir={log_dir}",
                       f"--checkpoint_dir={tmp_path / 'checkpoints'}", "--preset=cpu", "--muon_lr=0.02"]


# ----------------------------------------------------------------------------- a real training process

FAKE_TRAINER = """\"\"\"Stands in for a training script: writes a log step by step (FAKE_STEP_SECONDS apart), prints
its pid; on SIGTERM or SIGINT it takes 0.5 s to clean up, writes 'stopped by signal N' and exits.\"\"\"
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

SEP = "=" * 100


@dataclasses.dataclass
class Hyperparameters:
    num_iterations: int = 200
    muon_lr: float = 0.02
    run_id: str = ""
    log_dir: str = "logs"


def main():
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    log = Path(args["log_dir"]) / (args["run_id"] + ".txt")
    log.parent.mkdir(parents=True, exist_ok=True)

    def stop(signum, frame):
        time.sleep(0.5)
        with open(log, "a") as f:
            f.write(f"stopped by signal {signum}\\n")
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    total = int(args["num_iterations"])
    with open(log, "w") as f:
        f.write(f"src\\n{SEP}\\nenv\\n{SEP}\\nstep:0/{total} val_loss:10.0 train_time:0ms step_avg:0.00ms\\n")
    print(f"pid:{os.getpid()}", flush=True)
    for step in range(1, total + 1):
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.1")))
        with open(log, "a") as f:
            f.write(f"step:{step}/{total} train_time:{step}ms step_avg:1.00ms\\n")
    with open(log, "a") as f:
        f.write(f"step:{total}/{total} val_loss:3.0 train_time:{total}ms step_avg:1.00ms\\n")


if __name__ == "__main__":
    main()
"""


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class RealSweep:
    """tools/sweep (kit.runs.sweep.main) in a subprocess, on a repository whose baseline is FAKE_TRAINER."""

    def __init__(self, tmp_path):
        self.repo = tmp_path / "repo"
        (self.repo / "speedruns").mkdir(parents=True, exist_ok=True)
        (self.repo / "speedruns" / "train_gpt_medium.py").write_text(FAKE_TRAINER)
        self.out = tmp_path / "out"
        self.pids = []

    def command(self):
        argv = ["baseline", "--lr=0.02", "--num_iterations=200", f"--out={self.out}"]
        code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tools')!r}]; from kit.runs import sweep; "
                f"from pathlib import Path; sweep.main({argv!r}, root=Path({str(self.repo)!r}))")
        return [sys.executable, "-c", code]

    def start(self, **env):
        # as from a terminal: SIGINT at its default even where pytest itself runs as a background job (which
        # starts with SIGINT ignored, and the sweep keeps an ignored SIGINT ignored)
        proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **env},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.pids.append(proc.pid)
        return proc

    def run(self, **env):
        return subprocess.run(self.command(), capture_output=True, text=True, timeout=60, env={**os.environ, **env})

    def child_pid(self, timeout=60):
        """The training process's pid, once it has started and written a few steps."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in (self.out / "stdout").glob("*.txt") if (self.out / "stdout").is_dir() else []:
                text = path.read_text()
                log = self.out / "logs" / path.name
                if text.startswith("pid:") and log.exists() and "step:2/" in log.read_text():
                    pid = int(text.split()[0][4:])
                    self.pids.append(pid)
                    return pid
            time.sleep(0.05)
        raise AssertionError("the training process did not start")

    def log_text(self):
        (log,) = (self.out / "logs").glob("*.txt")
        return log.read_text()

    def cleanup(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def real_sweep(tmp_path):
    sweep_ = RealSweep(tmp_path)
    yield sweep_
    sweep_.cleanup()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_sweep_stops_its_training_run_and_waits_for_it(real_sweep, signum):
    proc = real_sweep.start()
    child = real_sweep.child_pid()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert not alive(child)  # the sweep exits only after its training run has
    assert f"stopped by signal {int(signum)}" in real_sweep.log_text()  # it got the signal and cleaned up
    assert proc.returncode == 128 + signum
    assert "Traceback" not in err and "rerun the same command to resume" in err.splitlines()[-1]


def test_no_resume_while_a_training_run_of_a_killed_sweep_is_alive(real_sweep):
    proc = real_sweep.start()
    child = real_sweep.child_pid()
    proc.kill()  # SIGKILL: nothing is passed on; the training run lives on
    proc.wait(timeout=30)
    assert alive(child)
    before = real_sweep.log_text()
    refused = real_sweep.run(FAKE_STEP_SECONDS="0.001")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    message = refused.stderr.strip()
    assert "\n" not in message and "still running" in message and f"pid {child}" in message
    assert not list((real_sweep.out / "logs").glob("*.partial"))  # the live run's log was left alone
    assert real_sweep.log_text().startswith(before)  # one writer: the log only grew
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    resumed = real_sweep.run(FAKE_STEP_SECONDS="0.001")
    assert resumed.returncode == 0, resumed.stderr
    assert "val_loss:3.0" in real_sweep.log_text() and len(list((real_sweep.out / "logs").glob("*.partial"))) == 1

BASELINE = ROOT / "speedruns" / "train_gpt_medium.py"


@pytest.mark.skipif(not BASELINE.exists(), reason="the baseline script is not written yet")
def test_sweep_with_the_real_script(tmp_path, tiny_data):
    import os
    import subprocess

    cmd = [sys.executable, str(ROOT / "tools" / "sweep"), "baseline", "--lr=0.02", f"--out={tmp_path}", "--preset=cpu"]
    cmd += ["--num_iterations=2", "--val_loss_every=0", "--micro_batches=1", "--val_tokens=512", "--checkpoint_every="]
    cmd += [f"--checkpoint_dir={tmp_path / 'ck'}", f"--train_files={tiny_data['train_files']}"]
    cmd += [f"--val_files={tiny_data['val_files']}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (log,) = (tmp_path / "logs").glob("*.txt")
    run = logs.parse_log(log).runs[-1]
    assert run.finished and run.num_iterations == 2
    assert log.name.startswith("sweep_baseline_muon_lr-0.02_")
    with open(tmp_path / "sweep.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["muon_lr"] == "0.02" and float(row["final_val_loss"]) == pytest.approx(run.final_val_loss, abs=1e-6)
    # rerun in-process: the finished point is not run again
    never = FakeTrainer(interrupt_on_call=1)
    points = sweep.run_sweep(sweep.parse_sweep_args(cmd[2:]), runner=never)
    assert never.calls == [] and points[0].status == "resumed"
    # an unknown field is refused with one line
    with pytest.raises(SystemExit, match="no Hyperparameters field no_such_field"):
        sweep.check_fields(BASELINE, ["muon_lr", "no_such_field"])


def test_a_variant_entrys_fixed_settings_go_to_every_run_and_cannot_be_swept(tmp_path):
    """An entry's `settings = {...}` in patches/variants.toml (as ngpt_geodesic's) is part of each run's command and
    of its run id; a sweep that tries to set one of them itself is refused in one line."""
    root = tmp_path / "repo"
    (root / "patches").mkdir(parents=True)
    (root / "patches" / "variants.toml").write_text(
        '[ngpt]\npatches = ["ngpt"]\n\n[ngpt_geodesic]\npatches = ["ngpt"]\nsettings = {sphere_step = "geodesic", '
        'sphere_every = 3}\n')
    argv = ["ngpt_geodesic", "--lr=0.01,0.02", "--num_iterations=2", f"--out={tmp_path / 'out'}"]
    trainer = FakeTrainer()
    sweep.run_sweep(sweep.parse_sweep_args(argv), runner=trainer, root=root)
    assert len(trainer.calls) == 2
    for cmd in trainer.calls:
        assert option(cmd, "sphere_step") == "geodesic" and option(cmd, "sphere_every") == "3"
    plain = FakeTrainer()
    sweep.run_sweep(sweep.parse_sweep_args(["ngpt", *argv[1:3], f"--out={tmp_path / 'plain'}"]), runner=plain,
                    root=root)
    assert not any(a.startswith("--sphere_step=") for a in plain.calls[0])
    assert option(plain.calls[0], "run_id").split("_")[-1] != option(trainer.calls[0], "run_id").split("_")[-1]
    for clash in (["--sphere_step=project"], ["--sphere_every=1,5"]):
        with pytest.raises(SystemExit) as info:
            sweep.run_sweep(sweep.parse_sweep_args([*argv, *clash]), runner=FakeTrainer(), root=root)
        assert "fixed for ngpt_geodesic" in str(info.value.code) and "\n" not in str(info.value.code)
