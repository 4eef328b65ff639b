"""tools/verdicts: Holm's correction over a whole table of verdicts gathered from many benches, on planted
tables whose adjusted p-values are known; the bad specs it refuses; and the committed table in sync with its spec."""

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from kit.benchmarks import verdicts  # noqa: E402

BENCH_COLUMNS = ["variant", "ratio", "ci_low", "ci_high", "p_value", "extrapolated", "control", "ratio_vs_control",
                 "ci_low_vs_control", "ci_high_vs_control", "p_vs_control", "extrapolated_vs_control"]


def write_bench(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BENCH_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in BENCH_COLUMNS})


def numbers(label, ratio, p, role="idea", extrapolated=False):
    ci = [ratio * 0.98, ratio * 1.02]
    return (f'[[row]]\nlabel = "{label}"\nrole = "{role}"\nratio = {ratio}\nci = [{ci[0]}, {ci[1]}]\np = {p}\n'
            f'extrapolated = {str(extrapolated).lower()}\nsource = "test"\n\n')


def run(tmp_path, spec_text):
    spec = tmp_path / "verdicts.toml"
    spec.write_text(spec_text)
    verdicts.main([f"--spec={spec}"])
    return spec.with_suffix(".md").read_text()


def table_rows(text):
    """{label: [cells]} of the Markdown table."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| variant") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_holm_runs_over_the_whole_table_not_within_each_bench(tmp_path):
    """Four ideas with raw p 0.001, 0.012, 0.02, 0.4: Holm over the four gives 0.004, 0.036, 0.04, 0.4; the
    controls (whatever their p) and an extrapolated crossing are shown but not in the family. Each would pass
    alone at 0.05; together the third still passes (0.02 x 2 = 0.04) and the fourth does not."""
    text = run(tmp_path, numbers("a", 0.95, 0.001) + numbers("b", 1.05, 0.012) + numbers("c", 0.97, 0.02)
               + numbers("d", 0.99, 0.4) + numbers("pos", 2.0, 0.0001, role="control")
               + numbers("far", 2.5, 0.00001, extrapolated=True))
    rows = table_rows(text)
    assert [rows[k][4] for k in "abcd"] == ["0.004", "0.036", "0.04", "0.4"]
    assert [rows[k][5] for k in "abcd"] == ["faster", "slower", "faster", "no difference"]
    assert rows["pos"][4] == "" and rows["pos"][5] == "(control)"
    assert rows["far"][4] == "" and rows["far"][5] == "none (extrapolated)"
    assert "over the 4 comparisons with the baseline" in text


def test_a_claim_that_passes_in_its_own_bench_can_fail_in_the_table(tmp_path):
    """p 0.03 passes alone (m = 1). Among p = 0.011, 0.012, 0.013, 0.03 Holm gives 0.044 to each (the running
    maximum carries 0.011 x 4); a fifth claim at 0.001 changes nothing (0.005; 0.011 x 4 is still the largest
    product), but with 0.014, 0.015, 0.016 beside it the product 0.014 x 4 = 0.056 fails all four."""
    rows = table_rows(run(tmp_path, numbers("w", 0.9, 0.011) + numbers("x", 0.9, 0.012) + numbers("y", 0.9, 0.013)
                          + numbers("z", 0.9, 0.03)))
    assert [rows[k][4] for k in "wxyz"] == ["0.044"] * 4 and rows["z"][5] == "faster"
    rows = table_rows(run(tmp_path, numbers("v", 0.9, 0.001) + numbers("w", 0.9, 0.011) + numbers("x", 0.9, 0.012)
                          + numbers("y", 0.9, 0.013) + numbers("z", 0.9, 0.03)))
    assert rows["v"][4] == "0.005" and [rows[k][4] for k in "wxyz"] == ["0.044"] * 4
    rows = table_rows(run(tmp_path, numbers("v", 0.9, 0.001) + numbers("w", 0.9, 0.014) + numbers("x", 0.9, 0.015)
                          + numbers("y", 0.9, 0.016) + numbers("z", 0.9, 0.03)))
    assert [rows[k][5] for k in "wxyz"] == ["no difference"] * 4  # 0.014 x 4 = 0.056


def test_rows_come_from_bench_csvs_with_their_control_comparisons(tmp_path):
    write_bench(tmp_path / "one", [
        {"variant": "baseline"},
        {"variant": "idea", "ratio": "0.97", "ci_low": "0.95", "ci_high": "0.99", "p_value": "0.004",
         "extrapolated": "false", "control": "ctl", "ratio_vs_control": "0.98", "ci_low_vs_control": "0.96",
         "ci_high_vs_control": "0.999", "p_vs_control": "0.04", "extrapolated_vs_control": "false"},
        {"variant": "ctl", "ratio": "0.99", "ci_low": "0.97", "ci_high": "1.01", "p_value": "0.3",
         "extrapolated": "false"}])
    write_bench(tmp_path / "two", [
        {"variant": "other", "ratio": "1.2", "ci_low": "1.1", "ci_high": "1.3", "p_value": "0.0001",
         "extrapolated": "false", "control": "c2", "ratio_vs_control": "1.1", "ci_low_vs_control": "1.05",
         "ci_high_vs_control": "1.15", "p_vs_control": "0.001", "extrapolated_vs_control": "false"}])
    text = run(tmp_path, '[[row]]\nlabel = "idea"\nbench = "one"\ncommit = "abc1234"\n\n'
                         '[[row]]\nlabel = "ctl"\nrole = "control"\nbench = "one"\n\n'
                         '[[row]]\nlabel = "the other"\nbench = "two"\nvariant = "other"\n')
    rows = table_rows(text)
    assert rows["idea"][1] == "one at abc1234" and rows["idea"][2] == "0.970 [0.950, 0.990]"
    assert rows["idea"][4] == "0.004" and rows["the other"][4] == "0.0002"  # Holm over the two ideas
    assert rows["idea"][6] == "0.980 [0.960, 0.999] vs ctl" and rows["idea"][8] == "0.04"  # 0.04 x 1 (rank 2)
    assert rows["the other"][8] == "0.002" and rows["idea"][9] == "faster" and rows["the other"][9] == "slower"
    assert rows["ctl"][5] == "(control)" and rows["ctl"][6] == ""


@pytest.mark.parametrize("spec, message", [
    ('[[row]]\nratio = 1\n', "no label"),
    ('[[row]]\nlabel = "a"\nbench = "nowhere"\n', "no "),
    ('[[row]]\nlabel = "a"\nratio = 1.0\nci = [0.9, 1.1]\np = 0.5\n', "source"),
    ('[[row]]\nlabel = "a"\nratio = 1.0\nci = [1.1, 1.2]\np = 0.5\nsource = "x"\n', "outside its CI"),
    ('[[row]]\nlabel = "a"\nrate = 1.0\n', "unknown key 'rate'"),
    ('[[row]]\nlabel = "a"\nrole = "maybe"\nratio = 1.0\nci = [0.9, 1.1]\np = 0.5\nsource = "x"\n', "role"),
    ('[[row]]\nlabel = "a"\nbench = "one"\nratio = 1.0\n', "both bench and numbers"),
    ('[[row]]\nlabel = "a"\nratio = 1.0\nci = [0.9, 1.1]\np = 0.5\nsource = "x"\n\n'
     '[[row]]\nlabel = "a"\nratio = 1.0\nci = [0.9, 1.1]\np = 0.5\nsource = "x"\n', "two rows"),
    ('label = "a"\n', "no [[row]]"),
    ('[[row\n', "cannot read"),
])
def test_bad_specs_are_one_line_errors(tmp_path, spec, message):
    with pytest.raises(SystemExit) as err:
        run(tmp_path, spec)
    text = str(err.value)
    assert text.startswith("tools/verdicts: ") and message in text and "\n" not in text


def test_a_missing_variant_in_a_bench_csv_is_named(tmp_path):
    write_bench(tmp_path / "one", [{"variant": "baseline"}, {"variant": "x", "ratio": "1", "ci_low": "0.9",
                                                              "ci_high": "1.1", "p_value": "0.5"}])
    with pytest.raises(SystemExit, match="has no variant 'y'"):
        run(tmp_path, '[[row]]\nlabel = "y"\nbench = "one"\n')
    with pytest.raises(SystemExit, match="no ratio and p"):
        run(tmp_path, '[[row]]\nlabel = "baseline"\nbench = "one"\n')


def test_the_committed_table_is_its_spec_rendered(tmp_path):
    """docs/results/verdicts.md is what tools/verdicts writes from docs/results/verdicts.toml and the bench.csv
    files it names (so a hand edit of the table, or a spec changed without rerunning the tool, fails here)."""
    out = tmp_path / "verdicts.md"
    verdicts.main([f"--spec={ROOT / 'docs' / 'results' / 'verdicts.toml'}", f"--out={out}"])
    assert out.read_text() == (ROOT / "docs" / "results" / "verdicts.md").read_text()
