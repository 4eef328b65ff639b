"""Bad inputs to the tools (issue 19): submit_record, make_patch, compare, analysis.py reruns, fetch_fineweb.

Each test fails on the code before its fix: a double-counted run, a contradicting hyperparameters line,
missing fields shown as defaults, an impossible date, a patch listed twice, `--out DIR/` written as a file,
a retrained checkpoint taken as already analysed, fetch_fineweb ignoring huggingface_hub.
"""

import csv
import io
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_analysis_cli import checkpoints  # noqa: F401  (the fixture: two tiny CPU-preset checkpoints)
from test_records import DATE, SEP, fake_repo, our_log, refused, submit

import analysis
from core.shards import read_shard, shard_header
from kit.data import fetch_fineweb
from kit.runs import compare

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- tools/submit_record


@pytest.fixture
def polar(tmp_path):
    """(the polar variant's source, the common options) of a fake repository."""
    repo = fake_repo(tmp_path)
    source = (repo / "speedruns" / "train_gpt_medium_polar.py").read_text()
    return source, ["--records", tmp_path / "records.md", "--repo", repo, "--name", "x", "--dry-run"]


def test_submit_record_refuses_a_log_concatenated_with_itself(tmp_path, polar):
    source, common = polar
    one = our_log(tmp_path / "one.txt", source, [2.910])
    twice = tmp_path / "twice.txt"
    twice.write_text(one.read_text() * 2)
    message = refused([twice, "--date", DATE, *common], twice)
    assert "concatenated" in message and "run id" in message


def test_submit_record_refuses_the_same_run_s_step_lines_twice(tmp_path, polar):
    source, common = polar
    one = our_log(tmp_path / "one.txt", source, [2.910])
    steps = one.read_text().split(SEP + "\n")[2]
    pasted = tmp_path / "pasted.txt"  # the step lines pasted twice under one header
    pasted.write_text(one.read_text() + steps)
    message = refused([pasted, "--date", DATE, *common], pasted)
    assert "repeats the run at" in message and "counts once" in message
    renamed = tmp_path / "renamed.txt"  # another log whose run id was changed by hand: the same run
    renamed.write_text(one.read_text().replace("run_id:one", "run_id:renamed").replace('"one"', '"renamed"'))
    assert f"repeats the run at {one}:" in refused([one, renamed, "--date", DATE, *common], renamed)


def test_submit_record_refuses_hyperparameters_that_contradict_the_step_lines(tmp_path, polar):
    source, common = polar
    log = our_log(tmp_path / "log.txt", source, [2.910, 2.911], num_iterations=200)  # step lines say 4
    message = refused([log, "--date", DATE, *common], log)
    assert "num_iterations=200" in message and "count to 4 steps" in message


def test_submit_record_names_settings_no_log_records_as_absent(tmp_path, polar, capsys):
    source, common = polar
    logs = [our_log(tmp_path / f"l{i}.txt", source, [2.910 + i / 1000]) for i in range(2)]
    for log in logs:
        log.write_text(log.read_text().replace('"head_lr": 0.003125, ', ""))
    submit(*logs, "--date", DATE, *common)
    out = capsys.readouterr().out
    assert "absent from the logs (values unknown): head_lr" in out
    assert "preset official, defaults |" not in out


@pytest.mark.parametrize("date", ["2026-13-45", "2026-02-30"])
def test_submit_record_refuses_impossible_dates(tmp_path, polar, date):
    source, common = polar
    log = our_log(tmp_path / "log.txt", source, [2.910])
    message = refused([log, "--date", date, *common], date)
    assert "YYYY-MM-DD" in message


# ----------------------------------------------------------------------------- tools/make_patch


def test_a_patch_listed_twice_in_a_stack_is_one_line_error(tmp_path):
    (tmp_path / "speedruns").mkdir()
    (tmp_path / "patches").mkdir()
    (tmp_path / "speedruns" / "train_gpt_medium.py").write_text("a\n")
    target = "speedruns/train_gpt_medium.py"
    (tmp_path / "patches" / "polar.patch").write_text(
        f"Description: x\ndiff --git a/{target} b/{target}\n--- a/{target}\n+++ b/{target}\n@@ -1 +1 @@\n-a\n+b\n")
    (tmp_path / "patches" / "variants.toml").write_text('[twice]\npatches = ["polar", "polar"]\n')
    for tool, *args in (("make_patch", "--all"), ("apply_patch", "--check"), ("apply_patch", "--all")):
        result = subprocess.run([sys.executable, str(ROOT / "tools" / tool), *args, f"--root={tmp_path}"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, (tool, result.stderr)
        assert "[twice] lists patch 'polar' twice" in result.stderr
    assert sorted(p.name for p in (tmp_path / "speedruns").iterdir()) == ["train_gpt_medium.py"]


# ----------------------------------------------------------------------------- tools/compare


def test_compare_out_ending_in_slash_is_a_folder(tmp_path, capsys):
    log = our_log(tmp_path / "run.txt", "print('x')\n", [2.910])
    compare.main([str(log), "--out", f"{tmp_path / 'new' / 'dir'}/"])
    assert (tmp_path / "new" / "dir").is_dir() and (tmp_path / "new" / "dir" / "compare.png").is_file()
    assert f"plot: {tmp_path / 'new' / 'dir' / 'compare.png'}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- analysis.py


def test_a_retrained_checkpoint_at_the_same_path_is_analysed_again(checkpoints, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "ckpt" / "tiny" / "step_000002.pt"
    path.parent.mkdir(parents=True)
    ckpt = torch.load(checkpoints[0], weights_only=True)
    torch.save(ckpt, path)
    out = tmp_path / "out"

    def spectral_norms():
        analysis.main([str(path), "--properties", "spectral_norm_w", "--out", str(out), "--skip_plots"])
        skipped = "already done, skipped" in capsys.readouterr().out
        return skipped, [r["spectral_norm_w"] for r in csv.DictReader(open(out / "tiny" / "step_000002.csv"))]

    skipped, first = spectral_norms()
    assert not skipped and spectral_norms() == (True, first)
    ckpt["model"]["blocks.0.mlp.fc_w"].mul_(2)  # "retrained": other weights, same run id, step and size
    size = path.stat().st_size
    torch.save(ckpt, path)
    assert path.stat().st_size == size
    skipped, again = spectral_norms()
    assert not skipped and again != first


# ----------------------------------------------------------------------------- tools/fetch_fineweb


def shard(tokens):
    return shard_header(len(tokens)) + np.asarray(tokens, dtype="<u2").tobytes()


def no_network(*args, **kwargs):
    raise OSError("the test has no network")


def test_fetch_fineweb_uses_huggingface_hub_when_installed(tmp_path, monkeypatch):
    calls = []

    def hf_hub_download(repo_id, filename, *, repo_type=None, local_dir=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        target = Path(local_dir) / filename
        target.write_bytes(shard([1, 2, 50256]))
        return str(target)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    monkeypatch.setattr(fetch_fineweb.urllib.request, "urlopen", no_network)
    paths = fetch_fineweb.fetch(tmp_path, 2, log=lambda _: None)
    names = fetch_fineweb.shard_names(2)
    assert calls == [(fetch_fineweb.DATASET, name, "dataset") for name in names]
    assert [p.name for p in paths] == names and sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert all(read_shard(p).tolist() == [1, 2, 50256] for p in paths)


def test_fetch_fineweb_falls_back_to_https_without_huggingface_hub(tmp_path, monkeypatch):
    urls = []

    class Response(io.BytesIO):
        headers = {}

    def urlopen(request, timeout):
        urls.append(request.full_url)
        return Response(shard([3, 4, 50256]))

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: not installed
    monkeypatch.setattr(fetch_fineweb.urllib.request, "urlopen", urlopen)
    lines = []
    paths = fetch_fineweb.fetch(tmp_path, 1, log=lines.append)
    assert urls == [fetch_fineweb.shard_url(name) for name in fetch_fineweb.shard_names(1)]
    assert all(read_shard(p).tolist() == [3, 4, 50256] for p in paths)
    assert "huggingface_hub is not installed" in lines[0]
