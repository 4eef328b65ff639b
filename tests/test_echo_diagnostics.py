"""The echo variants' diagnostic lines: parsed by tools/kit/runs/logs.py, drawn by tools/compare."""

import math
import subprocess
import sys

import pytest
from conftest import ROOT, run_training

sys.path.insert(0, str(ROOT / "tools"))

from kit.runs import compare, logs  # noqa: E402

ECHO = ROOT / "speedruns" / "train_gpt_medium_echo.py"
SEP = "=" * 100
KINDS = ("q", "k", "v", "o", "mlp_in", "mlp_out")


def echo_log(steps=(3, 6), zeta=lambda step, i: 0.1 * (i + 1) / step, extra=(), source="x = 1\n"):
    """A log in our format whose validations at `steps` are each followed by one echo line per kind
    (zeta and tau2/smax2 known from step and kind index), then the lines in `extra`."""
    lines = [source.rstrip("\n"), SEP, "variant:echo world_size:1 run_id:e", SEP]
    lines.append("step:0/6 val_loss:10.0 train_time:0ms step_avg:0.00ms")
    for step in steps:
        lines.append(f"step:{step}/6 val_loss:{10 - step} train_time:{step}000ms step_avg:1000.00ms")
        for i, kind in enumerate(KINDS):
            lines.append(f"echo step:{step} kind:{kind} zeta:{zeta(step, i):.4f} tau2/smax2:{10.0 ** -(i + step):.3e}")
    return "\n".join([*lines, *extra, "peak memory rss: 1 MiB"]) + "\n"


def test_echo_lines_parse_by_kind_in_step_order():
    found = logs.echo_diagnostics_text(echo_log(), "made.txt")
    assert list(found) == list(KINDS)
    assert found["q"] == [(3, 0.0333, pytest.approx(1e-3)), (6, 0.0167, pytest.approx(1e-6))]
    assert found["mlp_out"][1] == (6, pytest.approx(0.1), pytest.approx(1e-11))
    # the step lines still parse as before: the echo lines are not steps
    (run,) = logs.parse_text(echo_log(), "made.txt").runs
    assert [v.step for v in run.validations] == [0, 3, 6] and run.finished


def test_echo_lines_tolerate_missing_fields_and_ignore_the_source():
    source = 'print(f"echo step:{step} kind:{kind} zeta:{z}")\necho step:9 kind:q zeta:0.5\n'  # before the separator
    text = echo_log(steps=(3,), source=source, extra=["echo step:7 kind:q tau2/smax2:2e-3 note:new",
                                                      "echo step:7 kind:v zeta:0.25"])
    found = logs.echo_diagnostics_text(text, "made.txt")
    assert [s for s, _, _ in found["q"]] == [3, 7]
    step, zeta, ratio = found["q"][1]
    assert math.isnan(zeta) and ratio == 2e-3
    step, zeta, ratio = found["v"][1]
    assert zeta == 0.25 and math.isnan(ratio)


def test_a_log_without_echo_lines_gives_nothing_and_a_bad_one_names_its_line(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text(echo_log(steps=()))
    assert logs.echo_diagnostics(plain) == {}
    bad = tmp_path / "bad.txt"
    bad.write_text(echo_log(steps=(3,), extra=["echo step:6 kind:q zeta:lots"]))
    with pytest.raises(logs.LogError, match=r"bad\.txt:13: cannot read"):
        logs.echo_diagnostics(bad)
    bad.write_text(echo_log(steps=(3,), extra=["echo step:6 zeta:0.1"]))
    with pytest.raises(logs.LogError, match="without step or kind"):
        logs.echo_diagnostics(bad)


def test_echo_figure_has_one_line_per_log_per_kind():
    series = {"a": logs.echo_diagnostics_text(echo_log(), "a"),
              "b": logs.echo_diagnostics_text(echo_log(steps=(2, 4, 6), zeta=lambda s, i: 0.5), "b")}
    series["c"] = {k: v for k, v in series["a"].items() if k != "o"}  # a log lacking one kind
    for quantity, index in (("zeta", 1), ("tau2", 2)):
        fig = compare.echo_figure(series, quantity)
        try:
            axes = fig.axes
            assert [ax.get_title() for ax in axes] == ["Q", "K", "V", "O", "MLP in", "MLP out"]
            for ax, kind in zip(axes, KINDS, strict=True):
                drawn = {line.get_label(): line for line in ax.get_lines()}
                assert sorted(drawn) == (["a", "b"] if kind == "o" else ["a", "b", "c"])
                for label, line in drawn.items():
                    assert list(line.get_xdata()) == [p[0] for p in series[label][kind]]
                    assert list(line.get_ydata()) == [p[index] for p in series[label][kind]]
                assert drawn["a"].get_color() != drawn["b"].get_color()
            assert axes[0].get_yscale() == ("log" if quantity == "tau2" else "linear")
        finally:
            import matplotlib.pyplot as plt

            plt.close(fig)


def run_compare(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "compare"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_compare_draws_the_echo_figures_and_requires_them_with_echo(tmp_path):
    a, b, plain = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "plain.txt"
    a.write_text(echo_log())
    b.write_text(echo_log(zeta=lambda s, i: 0.5))
    plain.write_text(echo_log(steps=()))
    out = tmp_path / "cmp.png"
    result = run_compare(a, b, plain, "--out", out)  # automatic: the logs with echo lines are drawn
    assert result.returncode == 0, result.stderr
    for name in ("cmp.png", "cmp_echo_zeta.png", "cmp_echo_tau2.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
        assert f"plot: {tmp_path / name}" in result.stdout
    (tmp_path / "cmp_echo_zeta.png").unlink()
    result = run_compare(plain, "--out", out)
    assert result.returncode == 0 and "cmp_echo" not in result.stdout and not (tmp_path / "cmp_echo_zeta.png").exists()
    result = run_compare("--echo", a, plain, "--out", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and f"{plain} has no echo diagnostic lines" in result.stderr


def test_a_short_echo_run_logs_diagnostics_at_its_validations(tmp_path, tiny_data):
    _, log, _ = run_training(ECHO, tmp_path, tiny_data, "--num_iterations=6", "--val_loss_every=3")
    found = logs.echo_diagnostics(log)
    assert list(found) == list(KINDS)
    for points in found.values():
        assert [step for step, _, _ in points] == [3, 6]  # none at step 0: no update has been made yet
        for _, zeta, ratio in points:
            assert 0 < zeta <= 1.0001 and 0 < ratio < 1
    assert [v.step for v in logs.parse_log(log).runs[0].validations] == [0, 3, 6]


def test_echo_series_labels_logs_by_file_and_variant(tmp_path):
    repo = tmp_path / "repo"
    (repo / "speedruns").mkdir(parents=True)
    (repo / "speedruns" / "train_gpt_medium.py").write_text("x = 0\n")
    (repo / "speedruns" / "train_gpt_medium_echo.py").write_text("x = 1\n")
    for folder, source in (("one", "x = 1\n"), ("two", "x = 1\n"), ("three", "x = 2\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / ("run.txt" if folder != "three" else "other.txt")).write_text(echo_log(source=source))
    paths = [tmp_path / "one" / "run.txt", tmp_path / "two" / "run.txt", tmp_path / "three" / "other.txt"]
    series = compare.echo_series(paths, required=True, root=repo)
    assert list(series) == [f"{paths[0]} (echo)", f"{paths[1]} (echo)", "other"]  # same stems: their paths
    assert series["other"] == logs.echo_diagnostics(paths[2])
