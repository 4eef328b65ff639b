"""tools/bench_step_cost: variants timed side by side in one process (figures are printed, not asserted)."""

import os

import pytest
from conftest import ROOT

from kit.benchmarks import bench_step_cost


def test_times_each_variant_and_prints_ratios_to_the_first(tiny_data, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the presets name their data relative to the repository root
    assert os.path.exists(tiny_data["train_files"])
    bench_step_cost.main(["baseline", "polar", "--steps=1", "--warmup=0", "--preset=cpu"])
    out = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1:-1] for line in out if line.startswith("| ") and "variant" not in line]
    assert [r[0].strip() for r in rows] == ["baseline", "polar"]
    assert rows[0][2].strip() == "1.00" and rows[0][4].strip() == "1.00"  # the reference's own ratios
    assert all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["no_such_variant"], "no_such_variant"),
    (["baseline", "--steps=0"], "--steps"),
])
def test_bad_input_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_step_cost.main(argv)
    text = str(e.value) if not isinstance(e.value.code, int) else capsys.readouterr().err
    assert message in text
