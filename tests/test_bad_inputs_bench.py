"""tools/bench and tools/sweep against bad input and concurrent runs (issue 19): every refusal is one line
naming what was wrong, given before any run starts, with nothing written; one bench or sweep per --out and
one process per run; a killed point reruns under its run id with --overwrite=1. The trainings here are
FAKE, a stand-in script in a scratch repository (like tests/test_sweep.py's): no torch, seconds per test."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from kit.benchmarks import bench  # noqa: E402
from kit.runs import sweep  # noqa: E402

FAKE = '''"""A stand-in speedrun script: Hyperparameters, PRESETS and parse_args like the real ones. Like them (with
--overwrite) it refuses a run id whose log or checkpoint folder exists unless --overwrite=1, which replaces them.
FAKE_DIE=1: exits after step 2, leaving a partial log and the checkpoint folder (a killed run);
FAKE_STEP_SECONDS paces the steps. Prints its pid first."""
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path


@dataclasses.dataclass
class Hyperparameters:
    preset: str = "official"
    num_iterations: int = 10
    val_loss_every: int = 0
    seed: int = 0
    muon_lr: float = 0.02
    run_id: str = "run"
    log_dir: str = "logs"
    checkpoint_dir: str = "checkpoints"
    checkpoint_every: str = ""
    overwrite: bool = False


PRESETS = {"official": {}, "bench": {}, "cpu": {}}


def parse_args(argv):
    kinds = {f.name: f.type for f in dataclasses.fields(Hyperparameters)}
    values = {}
    for arg in argv:
        key, _, text = arg[2:].partition("=")
        if key not in kinds:
            raise SystemExit(f"error: unknown setting --{key}")
        try:
            values[key] = text in ("1", "true") if kinds[key] is bool else kinds[key](text)
        except ValueError:
            raise SystemExit(f"error: --{key}={text} is not a valid {kinds[key].__name__}") from None
    args = Hyperparameters(**values)
    if args.muon_lr < 0:
        raise SystemExit(f"error: --muon_lr={args.muon_lr} must be 0 or more")
    return args


def main():
    args = parse_args(sys.argv[1:])
    log, ckpt = Path(args.log_dir) / f"{args.run_id}.txt", Path(args.checkpoint_dir) / args.run_id
    for path in (log, ckpt):
        if path.exists() and not args.overwrite:
            raise SystemExit(f"error: {path} of this run id exists; choose a new --run_id, or pass --overwrite=1")
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"pid:{os.getpid()}", flush=True)
    total, every = args.num_iterations, args.val_loss_every or args.num_iterations
    loss = lambda s: 3 + 10 / max(s, 1) + 0.01 * args.seed + (args.muon_lr - 0.02) ** 2
    with open(log, "w") as f:
        f.write(f"src\\n{'=' * 100}\\nenv\\n{'=' * 100}\\nstep:0/{total} val_loss:{loss(0):.6f} train_time:0ms "
                "step_avg:0.00ms\\n")
    for step in range(1, total + 1):
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0")))
        if step == 3 and os.environ.get("FAKE_DIE"):
            sys.exit(1)
        val = f" val_loss:{loss(step):.6f}" if step % every == 0 or step == total else ""
        with open(log, "a") as f:
            f.write(f"step:{step}/{total}{val} train_time:{step}ms step_avg:1.00ms\\n")


if __name__ == "__main__":
    main()
'''


@pytest.fixture
def repo(tmp_path):
    """A scratch repository whose baseline is FAKE."""
    (tmp_path / "repo" / "speedruns").mkdir(parents=True)
    (tmp_path / "repo" / "speedruns" / "train_gpt_medium.py").write_text(FAKE)
    return tmp_path / "repo"


def never(cmd, cwd, stdout_path, lock_fd=None):
    raise AssertionError("a refused command must start no run")


QUICK = ["--quick", "--steps=10", "--variants=baseline"]  # FAKE's baseline: 2 budgets x 2 seeds, no grid


def refused(call, *patterns):
    """The one-line SystemExit message of call(); each pattern must be in it."""
    with pytest.raises(SystemExit) as info:
        call()
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, message
    return message


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- bad values, refused up front


@pytest.mark.parametrize("args, patterns", [
    (["--variants=baseline,baseline"], ["--variants lists baseline twice"]),
    (["--variants=control,baseline,control"], ["--variants lists control twice"]),
    (["--seeds=1"], ["--seeds=1", "at least 2 seeds", "default 5"]),
    (["--seeds=0"], ["--seeds=0", "at least 2 seeds"]),
    (["--steps=0"], ["--steps=0", ">= 1"]),
    (["--steps", "-5"], ["--steps=-5", ">= 1"]),
    (["--steps=1"], ["N = 1 steps is too few"]),  # 0.6, 0.8 and 1.0 x 1 are all 1 step
    (["--budgets=abc"], ["--budgets=abc", "(0, 1]"]),
    (["--budgets=0.6,0.6,1"], ["--budgets=0.6,0.6,1", "distinct"]),
    (["--budgets=0,1"], ["--budgets=0,1", "(0, 1]"]),
    (["--parallel=0"], ["--parallel=0", ">= 1"]),
    (["--parallel=abc"], ["--parallel", "'abc'"]),
    (["--lr-points=0"], ["--lr-points=0"]),
    (["--lr-seeds=-1"], ["--lr-seeds=-1"]),
    (["--num_iterations=5"], ["--num_iterations is set by the bench"]),
    (["--muon_lr=0.1"], ["--muon_lr is set by the bench", "tuned"]),
    (["--no_such_setting=1"], ["refuses", "unknown setting --no_such_setting"]),
])
def test_bench_refuses_bad_values_in_one_line_before_any_run(repo, tmp_path, args, patterns):
    out = tmp_path / "out"
    refused(lambda: bench.main(["--steps=100", "--variants=baseline,control", *args, f"--out={out}"], runner=never,
                               root=repo), "tools/bench: ", *patterns)
    assert not out.exists()  # nothing half-written


def test_bench_refuses_an_out_that_is_a_file(repo, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("mine\n")
    refused(lambda: bench.main([*QUICK, f"--out={out}"], runner=never, root=repo), "--out must be a folder")
    assert out.read_text() == "mine\n"


@pytest.mark.parametrize("args, patterns", [
    (["--lr=0.01,0.01"], ["--lr lists the value 0.01 twice"]),
    (["--lr=0.01,0.02,1e-2"], ["--lr lists the value 1e-2 twice"]),
    (["--lr=0.01", "--seed=1,2,1"], ["--seed lists the value 1 twice"]),
    (["--lr=0.01", "--run_id=mine"], ["--run_id is set by the sweep"]),
    (["--lr=0.01", "--overwrite=0"], ["--overwrite is set by the sweep"]),
])
def test_sweep_refuses_duplicate_points_and_its_own_settings(repo, tmp_path, args, patterns):
    out = tmp_path / "out"
    refused(lambda: sweep.run_sweep(sweep.parse_sweep_args(["baseline", *args, f"--out={out}"]), runner=never,
                                    root=repo), "tools/sweep: ", *patterns)
    assert not out.exists()


@pytest.mark.parametrize("lr, patterns", [("abc", ["muon_lr=abc is not a valid float"]),
                                          ("-0.01", ["muon_lr=-0.01 must be 0 or more"])])
def test_sweep_refuses_a_value_the_script_refuses_before_any_run(repo, tmp_path, lr, patterns, capsys):
    out = tmp_path / "out"
    refused(lambda: sweep.main(["baseline", f"--lr=0.02,{lr}", f"--out={out}", "--dry-run"], root=repo),
            "tools/sweep: train_gpt_medium.py refuses the point muon_lr=", *patterns)
    assert "would run" not in capsys.readouterr().out and not out.exists()


def test_sweep_refuses_an_out_that_is_a_file(repo, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("mine\n")
    refused(lambda: sweep.run_sweep(sweep.parse_sweep_args(["baseline", "--lr=0.01", f"--out={out}"]),
                                    runner=never, root=repo), "--out must be a folder")
    assert out.read_text() == "mine\n"


# ----------------------------------------------------------------------------- locks


def test_a_second_sweep_on_one_out_is_refused_naming_the_pid(repo, tmp_path):
    out = tmp_path / "out"
    fd = sweep.try_lock(out / "sweep.lock")  # as a running sweep holds it
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        refused(lambda: sweep.run_sweep(sweep.parse_sweep_args(["baseline", "--lr=0.01", f"--out={out}"]),
                                        runner=never, root=repo),
                "in use by another tools/sweep", f"pid {os.getpid()}", "another --out")
    finally:
        os.close(fd)


def test_each_bench_run_trains_under_its_own_lock(repo, tmp_path):
    """While a training runs, OUT/logs/ID.lock is held (the real runner hands the fd to the training)."""
    held = []

    def trainer(cmd, cwd, stdout_path):
        run_id = next(a.split("=", 1)[1] for a in cmd if a.startswith("--run_id="))
        held.append(sweep.holder(tmp_path / "out" / "logs" / f"{run_id}.lock") is not None)
        return subprocess.run(cmd, cwd=cwd, capture_output=True).returncode

    bench.main([*QUICK, f"--out={tmp_path / 'out'}"], runner=trainer, root=repo)
    assert held == [True] * 4


class RealBench:
    """tools/bench (kit.benchmarks.bench.main) in a subprocess on the scratch repository, with slow FAKE runs."""

    def __init__(self, repo, out):
        self.repo, self.out, self.pids = repo, out, []

    def argv(self):
        return [*QUICK, f"--out={self.out}"]

    def start(self):
        code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tools')!r}]; from pathlib import Path; "
                f"from kit.benchmarks import bench; bench.main({self.argv()!r}, root=Path({str(self.repo)!r}))")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "FAKE_STEP_SECONDS": "5"})
        self.pids.append(proc.pid)
        return proc

    def child_pid(self):
        """The pid of the running training, once it has printed it."""
        found = []

        def started():
            for path in (self.out / "stdout").glob("*.txt") if (self.out / "stdout").is_dir() else ():
                if path.read_text().startswith("pid:"):
                    found.append(int(path.read_text().split()[0][4:]))
                    return True
            return False

        wait_until(started)
        self.pids.append(found[0])
        return found[0]

    def cleanup(self):
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def real_bench(repo, tmp_path):
    b = RealBench(repo, tmp_path / "out")
    yield b
    b.cleanup()


def test_one_bench_per_out_and_no_resume_while_a_killed_benchs_training_lives(real_bench, monkeypatch):
    proc = real_bench.start()
    child = real_bench.child_pid()
    wait_until(lambda: (real_bench.out / ".bench.lock").read_text().strip() == str(proc.pid))
    rerun = lambda: bench.main(real_bench.argv(), runner=never, root=real_bench.repo)
    refused(rerun, "tools/bench: ", "in use by another tools/bench", f"pid {proc.pid}", f"kill {proc.pid}")

    proc.kill()  # SIGKILL: the bench's lock goes with it; its training lives on, holding its run's lock
    proc.wait(timeout=30)
    assert alive(child)
    log_before = {p.name: p.read_text() for p in (real_bench.out / "logs").glob("*.txt")}
    refused(rerun, "tools/bench: refused to resume", "still running", f"pid {child}")
    assert not list((real_bench.out / "logs").glob("*.partial"))  # the live run's log was left alone
    assert {p.name: p.read_text()[:len(log_before[p.name])] for p in (real_bench.out / "logs").glob("*.txt")} \
        == log_before

    os.kill(child, signal.SIGKILL)
    wait_until(lambda: not alive(child))
    # the killed run left its checkpoint folder: the rerun under its run id needs --overwrite=1
    bench.main(real_bench.argv(), root=real_bench.repo)
    rows = list(csv.DictReader(open(real_bench.out / "bench_runs.csv")))
    assert [r["status"] for r in rows] == ["done"] * 4
    assert len(list((real_bench.out / "logs").glob("*.partial"))) == 1


# ----------------------------------------------------------------------------- reruns under the same run id


def test_sweep_reruns_a_killed_point_under_its_run_id_with_overwrite(repo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["baseline", "--lr=0.02", "--num_iterations=5", f"--out={out}"]
    monkeypatch.setenv("FAKE_DIE", "1")
    with pytest.raises(SystemExit) as first:
        sweep.main(argv, root=repo)
    assert first.value.code == 1  # the point died half-way, leaving its log and checkpoint folder
    monkeypatch.delenv("FAKE_DIE")
    sweep.main(argv, root=repo)
    script = repo / "speedruns" / "train_gpt_medium.py"
    run_id = sweep.run_id_for("sweep", "baseline", {"muon_lr": "0.02"}, ["--num_iterations=5"],
                              sweep.script_sha(script))
    assert (out / "logs" / f"{run_id}.txt.partial").exists() and (out / "checkpoints" / run_id).is_dir()
    assert sweep.finished_run(out / "logs" / f"{run_id}.txt").final_val_loss == pytest.approx(5.0)
    (point,) = sweep.make_points(sweep.parse_sweep_args(argv), script, out)
    assert "--overwrite=1" in point.cmd and point.run_id == run_id  # given, but not part of the run id


def test_bench_reruns_killed_runs_under_their_run_ids_with_overwrite(repo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_DIE", "1")
    bench.main([*QUICK, f"--out={out}"], root=repo)  # every run dies half-way
    ids = [r["run_id"] for r in csv.DictReader(open(out / "bench_runs.csv"))]
    assert len(ids) == 4 and all((repo / "checkpoints" / i).is_dir() for i in ids)
    monkeypatch.delenv("FAKE_DIE")
    bench.main([*QUICK, f"--out={out}"], root=repo)
    rows = list(csv.DictReader(open(out / "bench_runs.csv")))
    assert [r["run_id"] for r in rows] == ids and [r["status"] for r in rows] == ["done"] * 4
    variant = bench.make_variant("baseline", repo, [0])
    run = bench.make_run("main", variant, 0, 10, 0.02, ["--preset=bench"], out)
    assert "--overwrite=1" in run.point.cmd
    args = ["--preset=bench", "--num_iterations=10", "--val_loss_every=2"]
    assert run.point.run_id == sweep.run_id_for("bench-main", "baseline", {"seed": "0", "steps": "10",
                                                "muon_lr": "0.02"}, args, variant.key)  # code, data, torch, threads


# ----------------------------------------------------------------------------- messages that misled


def test_the_benchs_stop_message_names_the_bench(repo, tmp_path, capfd):
    calls = []

    def terminated(cmd, cwd, stdout_path):
        calls.append(cmd)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while this run is the one running
        return subprocess.run(cmd, cwd=cwd, capture_output=True).returncode

    before = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a bench that lets it through runs on
    try:
        with pytest.raises(SystemExit) as stop:
            bench.main([*QUICK, f"--out={tmp_path / 'out'}"], runner=terminated, root=repo)
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capfd.readouterr().err
    assert stop.value.code == 128 + signal.SIGTERM and len(calls) == 1
    assert "tools/bench: SIGTERM: passed on" in err and "tools/sweep" not in err


def test_report_on_an_empty_folder_says_so_and_writes_nothing(repo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "missing"):
        refused(lambda out=out: bench.main([*QUICK, f"--out={out}", "--report"], runner=never, root=repo),
                "tools/bench: nothing to report")
    assert list(empty.iterdir()) == [] and not (tmp_path / "missing").exists()
