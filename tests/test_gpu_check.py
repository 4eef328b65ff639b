"""tools/gpu_check: what can be checked without a GPU (arguments, the report, skipping GPU-only parts)."""

import json
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


@pytest.mark.parametrize("argv, message", [
    (["--parts=a,x"], "--parts"), (["--parts=,"], "--parts"), (["--steps=0"], "--steps"),
    (["--timeout=-1"], "--timeout"),
])
def test_bad_arguments_get_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as e:
        gpu_check.check_args(gpu_check.build_parser().parse_args(argv))
    assert message in str(e.value) and "\n" not in str(e.value)


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
