"""Log parsing (tools/kit/runs/logs.py) on the public reference logs and hand-made ones, and tools/compare."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
REFERENCE = ROOT / "tests" / "data" / "reference_logs"
BASELINE_SCRIPT = ROOT / "speedruns" / "train_gpt_medium.py"

from kit.runs import logs  # noqa: E402

SEP = "=" * 100


def last_val_lines(path):
    """Independent reading of a log: every `step:T/T val_loss:...` line as (T, loss, time in s)."""
    found = []
    for line in path.read_text().splitlines():
        m = re.match(r"step:(\d+)/(\d+) val_loss:(\S+) train_time:([\d.]+)(ms|s) ", line)
        if m and m.group(1) == m.group(2):
            seconds = float(m.group(4)) / (1000 if m.group(5) == "ms" else 1)
            found.append((int(m.group(2)), float(m.group(3)), seconds))
    return found


@pytest.mark.parametrize(
    "name, steps, loss, seconds, step_avg, n_val",
    [
        ("medium_record8_2025-04-22.txt", 5960, 2.919750, 1468.898, 246.46, 49),
        ("medium_record18_2025-12-31.txt", 4740, 2.9165, 1041.071, 219.64, 20),
    ],
)
def test_single_run_reference_logs(name, steps, loss, seconds, step_avg, n_val):
    log = logs.parse_log(REFERENCE / name)
    assert len(log.runs) == 1
    run = log.runs[0]
    assert run.finished and run.steps == steps and run.num_iterations == steps
    assert run.final_val_loss == pytest.approx(loss, abs=1e-9)
    assert run.train_time_s == pytest.approx(seconds, abs=1e-6)
    assert run.step_avg_ms == pytest.approx(step_avg)
    assert len(run.validations) == n_val
    assert run.validations[0].step == 0 and run.validations[0].val_loss > 10
    assert [v.step for v in run.validations] == sorted(v.step for v in run.validations)
    independent = last_val_lines(REFERENCE / name)
    assert [(steps, loss, seconds)] == [(t, pytest.approx(v), pytest.approx(s)) for t, v, s in independent]
    # public logs have their code cut out: no source, the environment is what precedes the '=' line
    assert log.source is None and log.source_sha256 is None
    assert log.environment[0].startswith("Running Python")


def test_multi_run_reference_log_yields_every_run():
    path = REFERENCE / "optimization_track_muon_2026-05-01.txt"
    log = logs.parse_log(path)
    expected = last_val_lines(path)
    assert len(expected) == 20
    assert len(log.runs) == 20
    for run, (steps, loss, seconds) in zip(log.runs, expected, strict=True):
        assert run.finished and run.steps == steps == 3375
        assert run.final_val_loss == pytest.approx(loss, abs=1e-9)
        assert run.train_time_s == pytest.approx(seconds, abs=1e-9)
        assert len(run.validations) == 28  # every 125 steps from 0 to 3375
    assert log.runs[0].validations[1].train_time_ms == pytest.approx(60070.0)
    assert log.runs[0].validations[0].train_time_ms == 0.0
    assert log.runs[0].final_val_loss == pytest.approx(3.27924)
    assert log.runs[-1].final_val_loss == pytest.approx(3.27784)


def made_log(source="print('hi')\n", runs=((4, True),), unit="ms", decimals=4, settings=None, run_id="x"):
    """A log in our format: source, separator, environment (with a hyperparameters line when
    settings are given), separator, then the runs."""
    lines = [source.rstrip("\n"), SEP, "Running Python 3", f"variant:baseline world_size:1 run_id:{run_id}"]
    if settings is not None:
        lines.append("hyperparameters:" + json.dumps({"run_id": run_id, **settings}))
    lines.append(SEP)
    for total, finished in runs:
        last = total if finished else total - 1
        for step in range(0, last + 1):
            t = step * 1.5 if unit == "s" else step * 1500
            loss = 10 - step
            if step in (0, total // 2, total):
                val = f"val_loss:{loss:.{decimals}f}"
                lines.append(f"step:{step}/{total} {val} train_time:{t}{unit} step_avg:1500.00ms")
            if step:
                lines.append(f"step:{step}/{total} train_time:{t}{unit} step_avg:1500.00ms")
    lines.append("peak memory allocated: 1 MiB reserved: 2 MiB")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("unit, decimals", [("ms", 4), ("s", 5), ("ms", 6)])
def test_hand_made_log_units_and_decimals(unit, decimals):
    log = logs.parse_text(made_log(unit=unit, decimals=decimals), "made.txt")
    (run,) = log.runs
    assert run.finished and run.steps == 4 and run.final_val_loss == 6.0
    assert run.train_time_ms == pytest.approx(6000.0)
    assert [(v.step, v.val_loss, v.train_time_ms) for v in run.validations] == [(0, 10, 0), (2, 8, 3000), (4, 6, 6000)]


def test_source_and_its_sha256():
    source = "import torch\n\nprint('x')\n\n\n"
    log = logs.parse_text(made_log(source=source), "made.txt")
    assert log.source == source.rstrip("\n")
    assert log.source_sha256 == hashlib.sha256(b"import torch\n\nprint('x')").hexdigest()
    assert log.environment == ["Running Python 3", "variant:baseline world_size:1 run_id:x"]
    # the same text with or without trailing newlines hashes the same
    assert logs.source_sha256(source) == logs.source_sha256(source.rstrip("\n") + "\n")


def test_interrupted_and_several_runs():
    text = made_log(runs=((6, False), (6, True), (8, True)))
    runs = logs.parse_text(text, "made.txt").runs
    assert [(r.num_iterations, r.finished, r.last_step) for r in runs] == [(6, False, 5), (6, True, 6), (8, True, 8)]
    assert runs[0].final_val_loss is None
    assert [r.final_val_loss for r in runs[1:]] == [4.0, 2.0]


def test_run_without_step_zero_validation():
    text = f"src\n{SEP}\nenv\n{SEP}\nstep:1/2 train_time:10ms step_avg:10.00ms\n"
    text += "step:2/2 train_time:20ms step_avg:10.00ms\n"
    text += "step:2/2 val_loss:7.250000 train_time:20ms step_avg:10.00ms\n"
    (run,) = logs.parse_text(text, "x.txt").runs
    assert run.finished and run.final_val_loss == 7.25 and run.train_time_ms == 20


@pytest.mark.parametrize(
    "text, words",
    [
        ("hello\nworld\n", "no step lines"),
        (f"src\n{SEP}\nenv\n{SEP}\nstep:1/2 train_time:abcms step_avg:1ms\n", "train_time:abcms"),
        (f"src\n{SEP}\nenv\n{SEP}\nstep:1/2 val_loss:x train_time:1ms step_avg:1ms\n", "val_loss:x"),
    ],
)
def test_unparseable_logs_name_the_file(tmp_path, text, words):
    path = tmp_path / "bad_log.txt"
    path.write_text(text)
    with pytest.raises(logs.LogError) as info:
        logs.parse_log(path)
    message = str(info.value)
    assert str(path) in message and words in message and "\n" not in message


def test_steps_to_target_interpolates():
    V = logs.Validation
    curve = [V(0, 10.0, 0), V(10, 5.0, 1), V(20, 3.0, 2), V(30, 2.0, 3)]
    # 4.0 lies between 5.0 (step 10) and 3.0 (step 20): halfway -> step 15
    assert logs.steps_to_target(curve, 4.0) == pytest.approx(15.0)
    assert logs.steps_to_target(curve, 2.5) == pytest.approx(25.0)
    assert logs.steps_to_target(curve, 3.0) == pytest.approx(20.0)
    assert logs.steps_to_target(curve, 1.0) is None
    assert logs.steps_to_target(curve, 11.0) == 0.0


def test_compare_tool_on_reference_logs(tmp_path):
    out = tmp_path / "cmp.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "compare"), *map(str, sorted(REFERENCE.glob("*.txt"))), f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert "20/20 finished" in table["optimization_track_muon_2026-05-01"]
    assert "2.91975" in table["medium_record8_2025-04-22"] and "1468.90" in table["medium_record8_2025-04-22"]


def test_compare_groups_runs_into_mean_and_band():
    sys.path.insert(0, str(ROOT / "tools"))
    from kit.runs.compare import group_curve

    V = logs.Validation
    a = logs.Run(4, 4, validations=[V(0, 10.0, 0), V(2, 6.0, 1000), V(4, 4.0, 2000)])
    b = logs.Run(4, 4, validations=[V(0, 10.0, 0), V(1, 9.0, 400), V(2, 8.0, 3000), V(4, 5.0, 4000)])
    c = group_curve([a, b])
    assert c.steps == [0, 2, 4]  # step 1 is not shared
    assert c.mean_loss == [10.0, 7.0, 4.5] and c.min_loss == [10.0, 6.0, 4.0] and c.max_loss == [10.0, 8.0, 5.0]
    assert c.mean_time_s == [0.0, 2.0, 3.0]


def test_compare_finds_logs_of_a_variant_and_groups_them(tmp_path):
    from kit.runs.compare import group_runs, resolve_inputs

    repo = tmp_path / "repo"
    (repo / "speedruns").mkdir(parents=True)
    (repo / "speedruns" / "train_gpt_medium.py").write_text("print('baseline')\n")
    (repo / "speedruns" / "train_gpt_medium_polar.py").write_text("print('polar')\n")
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "b1.txt").write_text(made_log(source="print('baseline')\n"))
    (log_dir / "b2.txt").write_text(made_log(source="print('baseline')\n", runs=((4, True), (4, False))))
    (log_dir / "p1.txt").write_text(made_log(source="print('polar')\n"))
    (log_dir / "x1.txt").write_text(made_log(source="print('something else')\n"))
    paths = resolve_inputs(["baseline"], log_dir, repo)
    assert [p.name for p in paths] == ["b1.txt", "b2.txt"]
    groups = group_runs(sorted(log_dir.glob("*.txt")), by_file=False, root=repo)
    assert {k: len(v) for k, v in groups.items()} == {"baseline": 3, "polar": 1, "x1": 1}
    assert list(group_runs(paths, by_file=True, root=repo)) == ["b1", "b2"]
    with pytest.raises(SystemExit, match="no log of variant polar"):
        resolve_inputs(["polar"], tmp_path / "elsewhere", repo)


# ----------------------------------------------------------------------------- identity, settings, formats


def test_run_id_variant_and_hyperparameters_from_the_environment():
    settings = {"muon_lr": 0.011, "num_iterations": 4, "compile": False}
    log = logs.parse_text(made_log(settings=settings, run_id="r7"), "made.txt")
    assert (log.run_id, log.variant) == ("r7", "baseline")
    assert log.hyperparameters == {"run_id": "r7", **settings}
    assert logs.parse_text(made_log(), "made.txt").hyperparameters is None
    public = logs.parse_log(REFERENCE / "medium_record8_2025-04-22.txt")
    assert (public.run_id, public.variant, public.hyperparameters) == (None, None, None)
    bad = made_log().replace("run_id:x\n", "run_id:x\nhyperparameters:{not json\n")
    with pytest.raises(logs.LogError, match=r"made.txt:5: the hyperparameters line is not valid JSON"):
        logs.parse_text(bad, "made.txt")


def test_validation_lines_know_their_line_numbers():
    text = made_log()
    (run,) = logs.parse_text(text, "made.txt").runs
    lines = text.splitlines()
    for v in run.validations:
        assert lines[v.line - 1].startswith(f"step:{v.step}/4 val_loss:")


def test_script_defaults_read_from_the_baseline_source_equal_its_presets(baseline):
    import dataclasses

    source = BASELINE_SCRIPT.read_text()
    for preset in baseline.PRESETS:
        expected = {**dataclasses.asdict(baseline.Hyperparameters()), **baseline.PRESETS[preset], "preset": preset}
        assert logs.script_defaults(source, preset) == expected
    assert logs.script_defaults(source, "no_such_preset") is None
    assert logs.script_defaults("x = 1\n", "cpu") is None


def test_format_settings_names_only_non_default_result_fields():
    defaults = {"muon_lr": 0.025, "seed": 0, "run_id": "", "num_iterations": 200, "preset": "cpu"}
    run = {"muon_lr": 0.011, "seed": 5, "run_id": "abc", "num_iterations": 2, "preset": "cpu"}
    assert logs.format_settings(run, defaults) == "preset cpu: muon_lr=0.011, num_iterations=2"
    assert logs.format_settings(run, defaults, leave_out=("num_iterations",)) == "preset cpu: muon_lr=0.011"
    assert logs.format_settings({**run, "muon_lr": 0.025, "num_iterations": 200}, defaults) == "preset cpu, defaults"
    assert logs.settings_differences(run, {**run, "seed": 1, "log_dir": "elsewhere"}) == []
    assert logs.settings_differences(run, {**run, "muon_lr": 0.02, "extra": 1}) == ["muon_lr", "extra"]


def log_2024(source):
    """The 2024 public layout: a '=' line, the source, '=', environment, '=', steps."""
    lines = [SEP, source.rstrip("\n"), SEP, "Running pytorch 2.5.0 compiled for CUDA 12.4", "nvidia-smi:", "", SEP]
    lines += ["step:0/2 val_loss:10.8258 train_time:0ms step_avg:nanms", "step:1/2 train_time:50ms step_avg:nanms"]
    lines += ["step:2/2 train_time:100ms step_avg:50.00ms"]
    lines += ["step:2/2 val_loss:7.5000 train_time:100ms step_avg:50.00ms"]
    return "\n".join(lines) + "\n"


def test_2024_format_log_reads_its_source_between_the_first_two_separators():
    source = "import os\nprint('2024')\n"
    log = logs.parse_text(log_2024(source), "old.txt")
    assert log.source == source.rstrip("\n") and log.source_sha256 == logs.source_sha256(source)
    assert log.source_sha256 != logs.source_sha256("")
    assert log.environment == ["Running pytorch 2.5.0 compiled for CUDA 12.4", "nvidia-smi:", ""]
    (run,) = log.runs
    assert run.finished and run.final_val_loss == 7.5


def run_compare(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "compare"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_compare_groups_by_steps_and_settings(tmp_path):
    from kit.runs.compare import common_step_notes, group_curve, group_runs

    repo = tmp_path / "repo"
    (repo / "speedruns").mkdir(parents=True)
    (repo / "speedruns" / "train_gpt_medium.py").write_text("print('baseline')\n")
    base = {"muon_lr": 0.025, "seed": 0, "num_iterations": 4}
    texts = {
        "a4": made_log("print('baseline')\n", runs=((4, True),), settings=base, run_id="a4"),
        "b4": made_log("print('baseline')\n", runs=((4, True),), settings={**base, "seed": 1}, run_id="b4"),
        "c6": made_log("print('baseline')\n", runs=((6, True),), settings={**base, "num_iterations": 6}),
        "lr": made_log("print('baseline')\n", runs=((4, True),), settings={**base, "muon_lr": 0.011}),
    }
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
    groups = group_runs([tmp_path / f"{n}.txt" for n in texts], by_file=False, root=repo)
    assert {k: len(v) for k, v in groups.items()} == {
        "baseline [4 steps, muon_lr=0.025]": 2,  # seeds 0 and 1 pool
        "baseline [6 steps, muon_lr=0.025]": 1,
        "baseline [4 steps, muon_lr=0.011]": 1,
    }
    curves = {label: group_curve(runs) for label, runs in groups.items()}
    assert curves["baseline [6 steps, muon_lr=0.025]"].steps == [0, 3, 6]
    (note,) = common_step_notes(curves)  # 4-step runs validate at 0, 2, 4; 6-step runs at 0, 3, 6
    assert "no validation step after step 0 in common" in note
    assert common_step_notes({k: v for k, v in curves.items() if "4 steps" in k}) == []
    # runs of one group that share no validation step are named and not plotted
    V = logs.Validation
    apart = group_curve([logs.Run(4, 4, validations=[V(1, 9.0, 1)]), logs.Run(4, 4, validations=[V(2, 8.0, 1)])])
    assert common_step_notes({"g": apart}) == ["note: g: its runs share no validation step; not plotted"]


def test_compare_cli_out_folder_notes_and_2024_logs(tmp_path):
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    (logs_dir / "mixed.txt").write_text(made_log(runs=((4, True), (6, True))))  # a 4-step and a 6-step run
    (logs_dir / "old.txt").write_text(log_2024("print('2024')\n"))
    out = tmp_path / "figures"
    out.mkdir()
    result = run_compare(logs_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "no validation step after step 0 in common" in result.stdout
    table = {line.split("  ")[0]: line for line in result.stdout.splitlines()[1:4]}
    assert set(table) == {"mixed [4 steps]", "mixed [6 steps]", "old"}
    assert " 4 " in table["mixed [4 steps]"] and " 6 " in table["mixed [6 steps]"] and "7.50000" in table["old"]
    # an --out that cannot be written: one line, no traceback
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_compare(logs_dir, "--out", blocker / "x.png")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and str(blocker / "x.png") in result.stderr
