"""Statistics (tools/kit/stats.py), the variant manifest (variants.py) and tools/submit_record."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from kit import logs, stats, submit_record, variants  # noqa: E402

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


def fake_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "speedruns").mkdir(parents=True)
    (repo / "patches").mkdir()
    (repo / "speedruns" / "train_gpt_medium.py").write_text("# the baseline\nprint('baseline')\n")
    (repo / "speedruns" / "train_gpt_medium_polar.py").write_text("# the polar variant\nprint('polar')\n")
    (repo / "patches" / "variants.toml").write_text('# manifest\n\n[polar]\npatches = ["polar", "cautious"]\n')
    (repo / "patches" / "polar.patch").write_text(
        "Polar Express orthogonalization instead of NS5\n\nWhy: fewer steps.\n\n"
        "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n"
    )
    (repo / "patches" / "cautious.patch").write_text(
        "Description: cautious weight decay\n--- a/speedruns/train_gpt_medium.py\n+++ b/y\n"
    )
    return repo


def our_log(path, source, finals, steps=4, unit="ms"):
    """A log in docs/formats.md layout with one run per final loss."""
    lines = [source.rstrip("\n"), SEP, "Running Python 3.11", "variant:x world_size:1 run_id:r", SEP]
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

    # a baseline record, then a new polar row is compared with it by Welch's t-test
    base = our_log(tmp_path / "base.txt", base_src, [2.914, 2.916, 2.915])
    submit(base, "--name", "base", *common)
    submit(a, "--name", "polar_again", *common)
    rows = table_rows(records)
    assert [r["variant"] for r in rows] == ["polar", "baseline", "polar"]
    assert rows[1]["description"] == "baseline"
    assert rows[2]["vs baseline"].startswith(f"{2.911 - 2.915:+.5f} (Welch's p = ")
    assert f"baseline record {DATE}_base, n=3" in rows[2]["vs baseline"]

    # the same name again is refused and nothing changes
    before = records.read_bytes()
    with pytest.raises(SystemExit, match="already exists"):
        submit(a, "--name", "polar_try", *common)
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
def test_submit_record_on_two_cpu_preset_runs(tmp_path, capsys, tiny_data):
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
    finals = [final_losses_by_regex(p)[0] for p in logs_]
    records = tmp_path / "records.md"
    common = ["--records", records, "--date", DATE]

    # a generous target makes these 2-step runs "significant"; the row must say what the logs say
    submit(*logs_, "--name", "cpu", "--target", "20", *common)
    (row,) = table_rows(records)
    mean = sum(finals) / 2
    std = abs(finals[0] - finals[1]) / math.sqrt(2)
    assert row["variant"] == "baseline" and row["steps"] == "2" and row["description"] == "baseline"
    assert row["mean val loss (n)"] == f"{mean:.5f} ± {std:.5f} (n=2)"
    assert row["significance"].startswith(f"yes: {(20 - mean) * math.sqrt(2):.4f} >= 0.004 at target 20")
    assert "public record #8" in row["vs baseline"]
    archive = tmp_path / "records" / f"{DATE}_cpu"
    assert [(archive / p.name).read_bytes() for p in logs_] == [p.read_bytes() for p in logs_]

    # the same runs again: now compared with the baseline record just made (Welch, identical means)
    submit(*logs_, "--name", "cpu_again", "--target", "20", "--dry-run", *common)
    assert f"+0.00000 (Welch's p = 1; vs baseline record {DATE}_cpu, n=2)" in capsys.readouterr().out

    # refusals: an insignificant result at the public target, a log whose code was edited,
    # and a log whose code is another committed variant's
    before = records.read_bytes()
    assert "not significant" in refused([*logs_, "--name", "weak", *common], logs_[0])
    source, rest = logs_[0].read_text().split("=" * 100 + "\n", 1)
    edited = tmp_path / "edited.txt"
    edited.write_text(source + "# a hand edit\n" + "=" * 100 + "\n" + rest)
    assert "matches no committed variant" in refused([logs_[0], edited, "--name", "e", *common], edited)
    others = sorted((ROOT / "speedruns").glob("train_gpt_medium_*.py"))
    if others:
        mixed = tmp_path / "mixed.txt"
        mixed.write_text(others[0].read_text() + "=" * 100 + "\n" + rest)
        assert "mixed variants" in refused([logs_[0], mixed, "--name", "m", "--target", "20", *common], mixed)
    assert records.read_bytes() == before
