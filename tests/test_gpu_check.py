"""tools/gpu_check: what can be checked without a GPU (arguments, the report, skipping GPU-only parts, and the
dry run that executes every part's code on the CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from kit.benchmarks import gpu_check

ROOT = gpu_check.ROOT


def test_help_starts_with_what_it_does():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("Check on one GPU what only a GPU can show") and "Example: tools/gpu_check" in out
    first = out.splitlines()[0]
    assert "`tools/gpu_check`" in first and "about 4 minutes" in first


def test_the_estimates_fit_the_budget_and_the_help_states_them():
    """Well below the 5 minutes a lent GPU gives, and each part's estimate is the one --help prints."""
    total = sum(gpu_check.GPU.estimate_s.values())
    assert round(total / 60) == 4 and total <= gpu_check.BUDGET_S - 45 and gpu_check.BUDGET_S < 300
    for part, seconds in gpu_check.GPU.estimate_s.items():
        assert seconds == 0 or f"  {part}  ({seconds} s)" in gpu_check.__doc__


@pytest.mark.parametrize("argv, message", [
    (["--parts=a,x"], "--parts"), (["--parts=,"], "--parts"), (["--steps=0"], "--steps"),
    (["--timeout=-1"], "--timeout"), (["--steps=x"], "--steps"), (["--bogus"], "--bogus"),
])
def test_bad_arguments_get_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        gpu_check.check_args(gpu_check.build_parser().parse_args(argv))
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("error: ")


def test_parts_are_parsed_in_order():
    assert gpu_check.parse_parts("e,a") == ["a", "e"]
    assert gpu_check.parse_parts("abcdef") == list("abcdef")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_every_part_is_skipped_with_a_reason_and_the_report_is_written(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [p["part"] for p in report["parts"]] == list("abcdef")
    for part in report["parts"]:
        assert part["status"] == "skipped" and part["reason"] and "\n" not in part["reason"]
    assert "no CUDA device" in report["parts"][0]["reason"]
    md = (tmp_path / "report.md").read_text()
    assert md.count("| skipped |") == 6 and "no CUDA device" in md


def test_a_failed_part_is_reported_and_sets_the_exit_status(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("the kernel is off by 3.0e-01")

    monkeypatch.setitem(gpu_check.PART_FUNCS, "c", (broken, "Triton kernels"))
    assert gpu_check.main(["--out", str(tmp_path), "--parts=c"]) == 1
    part = json.loads((tmp_path / "report.json").read_text())["parts"][0]
    assert part["status"] == "failed" and part["reason"] == "RuntimeError: the kernel is off by 3.0e-01"
    assert "| c | Triton kernels | failed |" in (tmp_path / "report.md").read_text()


def test_markdown_lists_figures_and_peak_memory():
    report = {"date": "2026-11-30", "device": "H200", "command": "tools/gpu_check", "parts": [
        {"part": "a", "what": "baseline", "status": "ok", "seconds": "200", "peak_mib": 51234,
         "figures": {"ms/step": "1900", "8-GPU estimate ms/step": "238 (record #8: 246)"}}]}
    md = gpu_check.render_markdown(report)
    assert "| a | baseline | ok | 200 | 51234 | ms/step 1900; 8-GPU estimate ms/step 238 (record #8: 246) |" in md


def test_synthetic_shards_are_valid_and_learnable(tmp_path):
    from core.shards import read_shard

    train, val = gpu_check.synthetic_shards(tmp_path, train_tokens=20_000, val_tokens=5_000)
    tokens = read_shard(tmp_path / "synthetic_train_000000.bin")
    assert len(tokens) == 20_000 and tokens.max() <= 50256
    # far fewer distinct tokens than positions: a model can lower its loss on this stream
    assert len(set(tokens.tolist())) < 0.8 * len(tokens)


def test_a_part_without_time_left_is_skipped_with_the_command_that_reruns_it(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--parts=b", "--timeout=5"]) == 0
    part = json.loads((tmp_path / "report.json").read_text())["parts"][0]
    assert part["status"] == "skipped" and "tools/gpu_check --parts=b" in part["reason"]


def test_the_bench_msign_table_and_triton_rows_are_read():
    """The lines part d reads, as tools/bench_msign prints them (its CUDA-only Triton rows included)."""
    width, label = 33, "tuned NS5 (baseline)"
    row = f"{'(a) Gaussian 1024x4096':<{width}}  {label:<27}" + "".join(f"{e:>10.2e}" for e in (0.877, 0.0154, 0.0154))
    row += f"{1.54e-2:>10.2e}  {'[0.978, 1.026]':<17}{3657.0:>10.1f}"
    match = gpu_check.MSIGN_ROW.match(row)
    assert match and (match["method"], match["err"], match["ms"]) == (label, "1.54e-02", "3657.0")
    assert gpu_check.MSIGN_ROW.match(row.replace("1.54e-02", "nan", 1)) is None
    triton = f"{'1024x4096':>12}  {'X X^T':<14}{0.123:>9.3f}{0.456:>9.3f}{0.456 / 0.123:>9.2f}x"
    assert gpu_check.TRITON_ROW.match(triton) and not gpu_check.TRITON_ROW.match(row)


def test_dry_run_executes_every_part_on_the_cpu_and_reports_each_with_a_status(tmp_path):
    """--dry-run: every part's code at tiny sizes with CPU stand-ins (about a minute on one thread); the same
    report, each part passed, or skipped with a one-line reason where a package is missing (triton)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    report = json.loads((tmp_path / "report.json").read_text())
    parts = {p["part"]: p for p in report["parts"]}
    assert list(parts) == list("abcdef") and report["mode"] == "dry run"
    failed = {k: p["reason"] for k, p in parts.items() if p["status"] not in ("passed", "skipped")}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    for key, part in parts.items():
        if part["status"] == "skipped":
            assert key == "c" and "triton" in part["reason"] and "\n" not in part["reason"]
    assert "--coordinate_descent=0" in parts["a"]["figures"]["compile"]
    assert "lowered" in next(v for k, v in parts["a"]["figures"].items() if k.startswith("val loss"))
    assert parts["a"]["peak_mib"] > 0 and parts["e"]["figures"]["matrix rows written"] == "92"
    md = (tmp_path / "report.md").read_text()
    assert "**Dry run**" in md
    for key, part in parts.items():
        assert f"| {key} | {part['what']} | {part['status']} |" in md
