"""Statistics (tools/kit/runs/stats.py), the variant manifest (variants.py) and tools/submit_record."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from kit.patching import variants  # noqa: E402
from kit.runs import logs, stats, submit_record  # noqa: E402

SEP = "=" * 100
DATE = "2026-01-02"


# ----------------------------------------------------------------------------- statistics by hand


def normal_sf(z):
    return 0.5 * math.erfc(z / math.sqrt(2))


def student_t_two_sided_p(t, df, intervals=20000):
    """P(|T| > |t|) for Student's t with df degrees of freedom: 1 - 2 * integral_0^|t| pdf, by Simpson."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def pdf(x):
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    a, b = 0.0, abs(t)
    h = (b - a) / intervals
    total = pdf(a) + pdf(b) + sum((4 if i % 2 else 2) * pdf(a + i * h) for i in range(1, intervals))
    return 1 - 2 * total * h / 3


def test_summary_by_hand():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.mean, s.n) == (2.5, 4)
    assert s.std == pytest.approx(math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3))
    assert math.isnan(stats.summarize([3.0]).std)
    with pytest.raises(ValueError):
        stats.summarize([])


def test_public_significance_rule_by_hand():
    sig = stats.public_significance([2.915, 2.916, 2.917])  # mean 2.916, n 3, target 2.92
    margin = 0.004 * math.sqrt(3)
    assert sig.significant and sig.margin == pytest.approx(margin)
    assert sig.z == pytest.approx(margin / 0.0013)
    assert sig.p_value == pytest.approx(normal_sf(margin / 0.0013), rel=1e-6)
    # n = 4: margin = 2 * (2.92 - mean); 2 * 0.0019 = 0.0038 fails, 2 * 0.0021 = 0.0042 passes
    assert not stats.public_significance([2.9181] * 4).significant
    assert stats.public_significance([2.9179] * 4).significant
    # the threshold itself is the one-sided z-test at z = 0.004 / 0.0013, p = 0.00105
    edge = stats.public_significance([2.916], target=2.92)
    assert edge.margin == pytest.approx(0.004) and edge.p_value == pytest.approx(0.0010457, abs=2e-7)
    # another target: a CPU-scale loss
    assert stats.public_significance([6.0, 6.1], target=6.2).margin == pytest.approx(0.15 * math.sqrt(2))


def test_welch_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    va, vb = 5 / 3 / 4, 4 / 3  # variance of each mean
    t = (2.5 - 4.0) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    c = stats.compare_means(a, b)
    assert c.diff == pytest.approx(-1.5) and c.test == "Welch's t-test"
    assert c.p_value == pytest.approx(student_t_two_sided_p(t, df), abs=1e-7)
    assert 0.3 < c.p_value < 0.4  # t = -1.134 on ~3.2 degrees of freedom


def test_single_run_baseline_uses_one_sample_test():
    c = stats.compare_means([2.0, 3.0, 4.0], [2.5])
    t = 0.5 / (1 / math.sqrt(3))  # mean 3, std 1, n 3, against 2.5
    assert c.diff == pytest.approx(0.5) and "one-sample" in c.test
    assert c.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t))  # closed form for 2 degrees of freedom
    assert stats.compare_means([2.0], [2.5]).p_value is None


# ----------------------------------------------------------------------------- a fake repository


FAKE_SCRIPT = """# the {name}
from dataclasses import dataclass


@dataclass
class Hyperparameters:
    num_iterations: int = 5960
    muon_lr: float = 0.025
    head_lr: float = 1 / 320
    seed: int = 0
    run_id: str = ""
    log_dir: str = "logs"
    preset: str = "official"


PRESETS = {{"official": {{}}, "cpu": dict(num_iterations=200, muon_lr=0.05)}}
print("{name}")
"""
# the effective settings of a run of FAKE_SCRIPT with --num_iterations=4 (run_id set per log)
FAKE_SETTINGS = {"num_iterations": 4, "muon_lr": 0.025, "head_lr": 0.003125, "seed": 0, "log_dir": "logs",
                 "preset": "official"}


def fake_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "speedruns").mkdir(parents=True)
    (repo / "patches").mkdir()
    (repo / "speedruns" / "train_gpt_medium.py").write_text(FAKE_SCRIPT.format(name="baseline"))
    (repo / "speedruns" / "train_gpt_medium_polar.py").write_text(FAKE_SCRIPT.format(name="polar variant"))
    (repo / "patches" / "variants.toml").write_text('# manifest\n\n[polar]\npatches = ["polar", "cautious"]\n')
    (repo / "patches" / "polar.patch").write_text(
        "Polar Express orthogonalization instead of NS5\n\nWhy: fewer steps.\n\n"
        "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"
    )
    (repo / "patches" / "cautious.patch").write_text(
        "Description: cautious weight decay\n--- a/speedruns/train_gpt_medium.py\n+++ b/y\n"
    )
    return repo


def our_log(path, source, finals, steps=4, unit="ms", run_id=None, **settings):
    """A log in docs/formats.md layout with one run per final loss; its run id is the file's stem
    unless given, its settings FAKE_SETTINGS (num_iterations = steps) updated by `settings`."""
    run_id = path.stem if run_id is None else run_id
    hyperparameters = {**FAKE_SETTINGS, "num_iterations": steps, "run_id": run_id, **settings}
    lines = [source.rstrip("\n"), SEP, "Running Python 3.11", f"variant:x world_size:1 run_id:{run_id}"]
    lines += ["hyperparameters:" + json.dumps(hyperparameters), SEP]
    for final in finals:
        lines.append(f"step:0/{steps} val_loss:10.825800 train_time:0{unit} step_avg:0.00ms")
        for step in range(1, steps + 1):
            lines.append(f"step:{step}/{steps} train_time:{step * 100}{unit} step_avg:100.00ms")
        lines.append(f"step:{steps}/{steps} val_loss:{final:.6f} train_time:{steps * 100}{unit} step_avg:100.00ms")
    lines.append("peak memory allocated: 1 MiB reserved: 1 MiB")
    path.write_text("\n".join(lines) + "\n")
    return path


def submit(*args):
    submit_record.main([str(a) for a in args])


def table_rows(records):
    return submit_record.read_rows(records)


def test_variants_api(tmp_path):
    repo = fake_repo(tmp_path)
    assert variants.load_manifest(repo) == {"polar": ["polar", "cautious"]}
    assert set(variants.variant_scripts(repo)) == {"baseline", "polar"}
    sha = logs.source_sha256((repo / "speedruns" / "train_gpt_medium_polar.py").read_text())
    assert variants.variant_for_sha(sha, repo) == "polar" and variants.variant_for_sha("0" * 64, repo) is None
    assert variants.patch_header("polar", repo) == "Polar Express orthogonalization instead of NS5\n\nWhy: fewer steps."
    assert variants.patch_description("cautious", repo) == "cautious weight decay"
    assert variants.variant_description("polar", repo) == (
        "Polar Express orthogonalization instead of NS5; cautious weight decay"
    )
    assert variants.variant_description("baseline", repo) == "baseline"
    (repo / "patches" / "variants.toml").write_text("[polar\n")
    with pytest.raises(variants.VariantError):
        variants.load_manifest(repo)


def test_submit_appends_row_and_archives(tmp_path, capsys):
    repo = fake_repo(tmp_path)
    polar_src = (repo / "speedruns" / "train_gpt_medium_polar.py").read_text()
    base_src = (repo / "speedruns" / "train_gpt_medium.py").read_text()
    records = tmp_path / "records.md"
    a = our_log(tmp_path / "a.txt", polar_src, [2.910, 2.912])
    b = our_log(tmp_path / "b.txt", polar_src, [2.911], unit="s")  # times in s: 0.4 s = 400 ms
    common = ["--records", records, "--repo", repo, "--date", DATE]

    submit(a, b, "--name", "polar_try", "--dry-run", *common)
    assert "| polar | 4 |" in capsys.readouterr().out
    assert not records.exists() and not (tmp_path / "records").exists()

    submit(a, b, "--name", "polar_try", *common)
    text = records.read_text()
    assert text.startswith(submit_record.records_header().rstrip("\n"))
    (row,) = table_rows(records)
    assert row["date"] == DATE and row["variant"] == "polar" and row["steps"] == "4"
    # mean time over runs: (400 + 400 + 400 s*1000) ms / 3
    assert row["mean train time"] == f"{(0.4 + 0.4 + 400) / 3:.3f} s"
    assert row["mean val loss (n)"] == "2.91100 ± 0.00100 (n=3)"
    margin = (2.92 - 2.911) * math.sqrt(3)
    assert row["significance"].startswith("yes") and f"{margin:.4f}" in row["significance"]
    # no baseline record yet: compared with the public record #8 value 2.919750
    assert row["vs baseline"].startswith(f"{2.911 - 2.91975:+.5f}") and "public record #8" in row["vs baseline"]
    assert row["logs"] == f"[logs](records/{DATE}_polar_try/)"
    assert row["description"] == "Polar Express orthogonalization instead of NS5; cautious weight decay"
    archive = tmp_path / "records" / f"{DATE}_polar_try"
    assert sorted(p.name for p in archive.iterdir()) == ["a.txt", "b.txt"]
    assert (archive / "a.txt").read_bytes() == a.read_bytes()

    assert row["settings"] == "preset official, defaults"
    assert "(one-sided p " in row["significance"] and "two-sided" not in row["significance"]

    # a baseline record, then a new polar row is compared with it by Welch's t-test
    base = our_log(tmp_path / "base.txt", base_src, [2.914, 2.916, 2.915])
    submit(base, "--name", "base", *common)
    a2 = our_log(tmp_path / "a2.txt", polar_src, [2.910, 2.912])
    submit(a2, "--name", "polar_again", *common)
    rows = table_rows(records)
    assert [r["variant"] for r in rows] == ["polar", "baseline", "polar"]
    assert rows[1]["description"] == "baseline"
    assert rows[2]["vs baseline"].startswith(f"{2.911 - 2.915:+.5f} (Welch's two-sided p = ")
    assert f"baseline record {DATE}_base, n=3" in rows[2]["vs baseline"]
    # a baseline record at other settings is not this row's baseline: the public run is
    base_lr = our_log(tmp_path / "base_lr.txt", base_src, [2.9, 2.901], muon_lr=0.03)
    submit(base_lr, "--name", "base_lr", *common)
    a3 = our_log(tmp_path / "a3.txt", polar_src, [2.910, 2.912])
    submit(a3, "--name", "polar_third", *common)
    assert f"baseline record {DATE}_base, n=3" in table_rows(records)[-1]["vs baseline"]

    # the same name again is refused and nothing changes
    before = records.read_bytes()
    with pytest.raises(SystemExit, match="already exists"):
        submit(our_log(tmp_path / "a4.txt", polar_src, [2.910]), "--name", "polar_try", *common)
    assert records.read_bytes() == before


def refused(args, path_in_message):
    with pytest.raises(SystemExit) as info:
        submit(*args)
    message = str(info.value.code)
    assert "\n" not in message and str(path_in_message) in message
    return message


def test_submit_refusals(tmp_path):
    repo = fake_repo(tmp_path)
    polar_src = (repo / "speedruns" / "train_gpt_medium_polar.py").read_text()
    base_src = (repo / "speedruns" / "train_gpt_medium.py").read_text()
    records = tmp_path / "records.md"
    common = ["--records", records, "--repo", repo, "--date", DATE, "--name", "x"]
    good = our_log(tmp_path / "good.txt", polar_src, [2.910, 2.911])
    other = our_log(tmp_path / "other.txt", base_src, [2.910])
    edited = our_log(tmp_path / "edited.txt", polar_src + "# edited by hand\n", [2.910])
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("not a log\n")
    public = Path(ROOT / "tests" / "data" / "reference_logs" / "medium_record8_2025-04-22.txt")
    bad_steps = our_log(tmp_path / "steps.txt", polar_src, [2.910], steps=6)
    unfinished = tmp_path / "unfinished.txt"
    unfinished.write_text(good.read_text().split("step:4/4 val_loss")[0])

    assert "mixed variants" in refused([good, other, *common], other)
    copy = tmp_path / "copy.txt"
    copy.write_bytes(good.read_bytes())
    assert "same content" in refused([good, copy, *common], copy)
    assert "matches no committed variant" in refused([good, edited, *common], edited)
    assert "no step lines" in refused([garbage, *common], garbage)
    assert "no source" in refused([public, *common], public)
    assert "steps" in refused([good, bad_steps, *common], bad_steps)
    assert "no finished run" in refused([unfinished, *common], unfinished)
    weak = our_log(tmp_path / "weak.txt", polar_src, [2.919, 2.918])
    assert "not significant" in refused([weak, *common], weak)
    assert not records.exists() and not (tmp_path / "records").exists()

    submit(weak, *common, "--allow-insignificant")
    (row,) = table_rows(records)
    assert row["significance"].startswith("**no** (recorded with --allow-insignificant)")
    margin = (2.92 - 2.9185) * math.sqrt(2)
    assert f"{margin:.4f} < 0.004" in row["significance"]


@pytest.mark.parametrize("final", [math.nan, -math.inf, math.inf])
def test_submit_refuses_a_non_finite_final_loss_naming_file_and_line(tmp_path, final):
    repo = fake_repo(tmp_path)
    polar_src = (repo / "speedruns" / "train_gpt_medium_polar.py").read_text()
    records = tmp_path / "records.md"
    good = our_log(tmp_path / "good.txt", polar_src, [2.910])
    bad = our_log(tmp_path / "bad.txt", polar_src, [final])
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if text.startswith("step:4/4 val_loss:"))
    common = ["--records", records, "--repo", repo, "--date", DATE, "--name", "x"]
    for extra in ([], ["--allow-insignificant"]):
        message = refused([good, bad, *common, *extra], f"{bad}:{line}")
        assert f"final val_loss is {final}" in message
    assert not records.exists() and not (tmp_path / "records").exists()


def test_submit_significance_exactly_on_the_margin_passes(tmp_path):
    # n = 4, mean 3.278, target 3.28: (3.28 - 3.278) * sqrt(4) = 0.004 exactly (0.0039999... in floats)
    assert (3.28 - 3.278) * 2 < 0.004
    repo = fake_repo(tmp_path)
    polar_src = (repo / "speedruns" / "train_gpt_medium_polar.py").read_text()
    records = tmp_path / "records.md"
    edge = [our_log(tmp_path / f"e{i}.txt", polar_src, [v]) for i, v in enumerate([3.277, 3.279, 3.2775, 3.2785])]
    submit(*edge, "--name", "edge", "--target", "3.28", "--records", records, "--repo", repo, "--date", DATE)
    (row,) = table_rows(records)
    assert row["significance"].startswith("yes: 0.0040 >= 0.004 at target 3.28")
    # one digit worse in the last logged place of one run: refused
    worse = [*edge[:3], our_log(tmp_path / "w.txt", polar_src, [3.278501])]
    common = ["--records", records, "--repo", repo, "--date", DATE]
    assert "not significant" in refused([*worse, "--name", "w", "--target", "3.28", *common], worse[0])
    assert stats.rule_passes([3.278] * 4, 3.28) and not stats.rule_passes([3.278000001] * 4, 3.28)
    with pytest.raises(ValueError):
        stats.public_significance([2.9, -math.inf])


def test_submit_refuses_pooling_runs_of_other_settings_and_names_non_defaults(tmp_path):
    repo = fake_repo(tmp_path)
    base_src = (repo / "speedruns" / "train_gpt_medium.py").read_text()
    records = tmp_path / "records.md"
    common = ["--records", records, "--repo", repo, "--date", DATE]
    lrs = [our_log(tmp_path / f"lr{i}.txt", base_src, [2.91], muon_lr=lr) for i, lr in enumerate([0.011, 0.012, 0.013])]
    message = refused([*lrs, "--name", "lrs", *common], lrs[1])
    assert "settings differ" in message and "muon_lr=0.012 vs 0.011" in message
    # a field only one log has is a difference too
    extra = our_log(tmp_path / "extra.txt", base_src, [2.91], muon_lr=0.011, new_knob=1)
    assert "new_knob=1 vs (absent)" in refused([lrs[0], extra, "--name", "x", *common], extra)
    # run_id, log_dir, checkpoint_dir, checkpoint_every, val_loss_every and seed may differ
    same = [our_log(tmp_path / f"s{i}.txt", base_src, [2.91 + i / 1000], muon_lr=0.011, seed=i, log_dir=f"d{i}",
                    checkpoint_dir=f"c{i}", checkpoint_every=str(i), val_loss_every=i) for i in range(3)]
    submit(*same, "--name", "lr0.011", *common)
    (row,) = table_rows(records)
    assert row["settings"] == "preset official: muon_lr=0.011"
    # defaults are the preset's values in the script: muon_lr=0.05 is the cpu preset's own
    cpu = our_log(tmp_path / "cpu.txt", base_src, [2.91], preset="cpu", muon_lr=0.05, head_lr=0.01)
    submit(cpu, "--name", "cpu", *common)
    assert table_rows(records)[-1]["settings"] == "preset cpu: head_lr=0.01"


def test_submit_refuses_a_run_given_twice_or_already_recorded(tmp_path):
    repo = fake_repo(tmp_path)
    polar_src = (repo / "speedruns" / "train_gpt_medium_polar.py").read_text()
    records = tmp_path / "records.md"
    common = ["--records", records, "--repo", repo, "--date", DATE]
    a = our_log(tmp_path / "a.txt", polar_src, [2.910, 2.911])
    b = our_log(tmp_path / "b.txt", polar_src, [2.912])
    copy = tmp_path / "copy.txt"
    copy.write_text(a.read_text() + "\n")  # the same run, one byte more
    message = refused([a, b, copy, "--name", "twice", *common], copy)
    assert "run id a " in message and str(a) in message
    submit(a, b, "--name", "first", *common)
    before = records.read_bytes()
    message = refused([a, b, "--name", "second", *common], a)
    assert "already recorded" in message and f"{DATE}_first" in message
    assert "already recorded" in refused([copy, "--name", "third", *common], copy)
    assert records.read_bytes() == before and len(list((tmp_path / "records").iterdir())) == 1


def test_concurrent_submissions_all_land(tmp_path):
    """8 submit_record processes released at the same instant on one records.md: 8 rows, 8 archives."""
    repo = fake_repo(tmp_path)
    polar_src = (repo / "speedruns" / "train_gpt_medium_polar.py").read_text()
    records = tmp_path / "records.md"
    go, ready = tmp_path / "go", tmp_path / "ready"
    ready.mkdir()
    driver = (  # import everything, say so, wait for the common start, then submit
        "import os, sys, time\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tools')!r}]\n"
        "import scipy.stats\n"
        "from kit.runs import submit_record\n"
        f"open(os.path.join({str(ready)!r}, sys.argv[3]), 'w').close()\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.002)\n"
        "submit_record.main(sys.argv[1:])\n"
    )
    procs = []
    for i in range(8):
        log = our_log(tmp_path / f"run{i}.txt", polar_src, [2.900 + i / 1000])
        args = [str(log), "--name", f"n{i}", "--records", str(records), "--repo", str(repo), "--date", DATE]
        procs.append(subprocess.Popen([sys.executable, "-c", driver, *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 120
    while len(list(ready.iterdir())) < 8 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.write_text("")
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, outputs
    rows = table_rows(records)
    assert sorted(r["logs"] for r in rows) == sorted(f"[logs](records/{DATE}_n{i}/)" for i in range(8))
    assert len(list((tmp_path / "records").iterdir())) == 8


def test_public_reference_constants_match_its_log():
    run = logs.parse_log(ROOT / "tests" / "data" / "reference_logs" / "medium_record8_2025-04-22.txt").runs[0]
    ref = submit_record.PUBLIC_REFERENCE
    assert (ref["steps"], ref["final_val_loss"], ref["train_time_ms"], ref["step_avg_ms"]) == (
        run.steps,
        run.final_val_loss,
        run.train_time_ms,
        run.step_avg_ms,
    )
    assert (ROOT / "records.md").read_text().startswith(submit_record.records_header().rstrip("\n"))


def test_submit_record_help_and_one_line_error(capsys):
    with pytest.raises(SystemExit) as info:
        submit("--help")
    help_text = capsys.readouterr().out
    assert info.value.code == 0 and help_text.startswith("Check a set of training logs")
    assert "Example: tools/submit_record" in help_text.split("\n")[2]
    tool = str(ROOT / "tools" / "submit_record")
    result = subprocess.run(
        [sys.executable, tool, "/nonexistent/log.txt", "--name", "x", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0 and "/nonexistent/log.txt" in result.stderr


# ----------------------------------------------------------------------------- the real baseline script

BASELINE = ROOT / "speedruns" / "train_gpt_medium.py"
# a few seconds a run on 2 shared cores: 2 steps, one micro-batch, one thread per process
SMALL = ["--preset=cpu", "--num_iterations=2", "--val_loss_every=0", "--micro_batches=1", "--val_tokens=512"]
SMALL.append("--checkpoint_every=")


def final_losses_by_regex(path):
    text = path.read_text()
    return [float(m) for m in re.findall(r"^step:\d+/\d+ val_loss:(\S+) ", text, flags=re.M)][-1:]


@pytest.mark.skipif(not BASELINE.exists(), reason="the baseline script is not written yet")
def with_run_id(path, new_path, run_id):
    """A copy of a log of ours under another run id (the environment line and the settings)."""
    source, rest = path.read_text().split(SEP + "\n", 1)
    rest = re.sub(r"run_id:\S+\n", f"run_id:{run_id}\n", rest, count=1)
    rest = re.sub(r'"run_id": "[^"]*"', f'"run_id": "{run_id}"', rest, count=1)
    new_path.write_text(source + SEP + "\n" + rest)
    return new_path


def test_submit_record_on_cpu_preset_runs(tmp_path, capsys, tiny_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for seed in (1, 2):
        args = [*SMALL, f"--seed={seed}", f"--run_id=cpu{seed}", f"--log_dir={tmp_path / 'logs'}"]
        args += [f"--train_files={tiny_data['train_files']}", f"--val_files={tiny_data['val_files']}"]
        args.append(f"--checkpoint_dir={tmp_path / 'ck'}")
        runs.append(subprocess.Popen([sys.executable, str(BASELINE), *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in runs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:]
    logs_ = [tmp_path / "logs" / "cpu1.txt", tmp_path / "logs" / "cpu2.txt"]
    # a run at another muon_lr, as the script logs it (a third training run would cost as much as these two)
    other_lr = with_run_id(logs_[0], tmp_path / "cpu3.txt", "cpu3")
    other_lr.write_text(other_lr.read_text().replace('"muon_lr": 0.025,', '"muon_lr": 0.011,', 1))
    finals = [final_losses_by_regex(p)[0] for p in logs_]
    records = tmp_path / "records.md"
    common = ["--records", records, "--date", DATE]

    # runs at another muon_lr are not pooled with these: the field is named
    message = refused([*logs_, other_lr, "--name", "lr", "--target", "20", *common], other_lr)
    assert "settings differ" in message and "muon_lr=0.011 vs 0.025" in message
    assert "seed" not in message  # seeds differ on purpose between repeated runs

    # a generous target makes these 2-step runs "significant"; the row must say what the logs say
    submit(*logs_, "--name", "cpu", "--target", "20", *common)
    (row,) = table_rows(records)
    mean = sum(finals) / 2
    std = abs(finals[0] - finals[1]) / math.sqrt(2)
    assert row["variant"] == "baseline" and row["steps"] == "2" and row["description"] == "baseline"
    assert row["mean val loss (n)"] == f"{mean:.5f} ± {std:.5f} (n=2)"
    assert row["significance"].startswith(f"yes: {(20 - mean) * math.sqrt(2):.4f} >= 0.004 at target 20")
    assert "public record #8" in row["vs baseline"]
    # the settings cell: the preset and what differs from its values in the script (SMALL's changes)
    settings = row["settings"]
    assert settings.startswith("preset cpu: ") and "val_tokens=512" in settings and "micro_batches=1" in settings
    assert "muon_lr" not in settings and "seed" not in settings and "val_loss_every" not in settings
    archive = tmp_path / "records" / f"{DATE}_cpu"
    assert [(archive / p.name).read_bytes() for p in logs_] == [p.read_bytes() for p in logs_]

    # the same runs again, under a new name or as a copy with an extra newline: already recorded
    before = records.read_bytes()
    assert "already recorded" in refused([*logs_, "--name", "cpu_again", "--target", "20", *common], logs_[0])
    copy = tmp_path / "copy.txt"
    copy.write_text(logs_[1].read_text() + "\n")
    assert "already recorded" in refused([copy, "--name", "cpu_copy", "--target", "20", *common], copy)

    # the same runs under new run ids: compared with the baseline record just made (identical means)
    renamed = [with_run_id(p, tmp_path / f"new_{p.name}", f"new_{p.stem}") for p in logs_]
    submit(*renamed, "--name", "cpu_again", "--target", "20", "--dry-run", *common)
    assert f"+0.00000 (Welch's two-sided p = 1; vs baseline record {DATE}_cpu, n=2)" in capsys.readouterr().out

    # refusals: an insignificant result at the public target, a log whose code was edited,
    # and a log whose code is another committed variant's
    assert "not significant" in refused([*renamed, "--name", "weak", *common], renamed[0])
    source, rest = renamed[0].read_text().split("=" * 100 + "\n", 1)
    edited = tmp_path / "edited.txt"
    edited.write_text(source + "# a hand edit\n" + "=" * 100 + "\n" + rest)
    assert "matches no committed variant" in refused([renamed[0], edited, "--name", "e", *common], edited)
    others = sorted((ROOT / "speedruns").glob("train_gpt_medium_*.py"))
    if others:
        mixed = tmp_path / "mixed.txt"
        mixed.write_text(others[0].read_text() + "=" * 100 + "\n" + rest.replace("new_cpu1", "mixed"))
        assert "mixed variants" in refused([renamed[0], mixed, "--name", "m", "--target", "20", *common], mixed)
    assert records.read_bytes() == before
