"""analysis.py end to end on CPU-preset checkpoints of the baseline (shrunk): table, plots, render, resume, errors."""

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import analysis  # noqa: E402
from analysis_lib import checkpoints as ck  # noqa: E402
from analysis_lib import outputs, plots, tree  # noqa: E402
from core.shards import write_shard  # noqa: E402

SHRINK = ["--vocab_size=256", "--model_dim=32", "--num_heads=1", "--train_seq_len=64", "--val_seq_len=64",
          "--micro_batches=2", "--val_tokens=128", "--max_window=64", "--val_loss_every=0"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared CPU: a second thread only spins
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, baseline):
    """Two checkpoints (steps 2 and 4) of the CPU preset with 16 blocks, shrunk to a 32-wide model."""
    folder = tmp_path_factory.mktemp("analysis_run")
    rng = np.random.default_rng(0)
    write_shard(folder / "tiny_train_000.bin", rng.integers(0, 256, 20_000))
    write_shard(folder / "tiny_val_000.bin", rng.integers(0, 256, 4_000))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    baseline.main(["--preset=cpu", f"--train_files={folder}/tiny_train_*.bin", f"--val_files={folder}/tiny_val_*.bin",
                   "--num_iterations=4", "--checkpoint_every=2", f"--log_dir={folder}/logs",
                   f"--checkpoint_dir={folder}/ckpt", "--run_id=tiny", *SHRINK])
    torch.set_num_threads(threads)
    return [folder / "ckpt" / "tiny" / "step_000002.pt", folder / "ckpt" / "tiny" / "step_000004.pt"]


def run_cli(*argv):
    return analysis.main([str(a) for a in argv])


def expected_plots(folder, steps, scalar_names, array_names):
    names = {f"plots/{p}_vs_step.png" for p in scalar_names}
    for prop in plots.ARRAY_PLOTS:
        if prop in array_names:
            names.add(f"plots/{prop}.gif")
            names |= {f"plots/{prop}/{outputs.stem(s)}.png" for s in steps}
    return names


def plot_files(folder):
    return {str(p.relative_to(folder)) for p in (folder / "plots").rglob("*") if p.is_file()}


def test_end_to_end_table_plots_and_render(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "someone-else/2", "model": {}}, foreign)
    truncated = tmp_path / "truncated.pt"  # a real checkpoint cut short (checkpoints are memory-mapped)
    whole = Path(checkpoints[0]).read_bytes()
    truncated.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(SystemExit, match="4 of 6 checkpoints could not be analysed"):
        run_cli(checkpoints[0], tmp_path / "missing.pt", corrupt, foreign, truncated, checkpoints[1], "--replicas=3",
                "--out", out, "--skip_plots")  # every plot kind is drawn by a test of its own, on tiny data
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 4 and all(line.startswith("error: ") for line in err_lines)
    assert "missing.pt: no such file" in err_lines[0]
    assert "corrupt.pt: unreadable" in err_lines[1]
    assert "not a gpt-medium-ckpt/1 checkpoint" in err_lines[2]
    assert "truncated.pt: unreadable" in err_lines[3]

    run = out / "tiny"
    scalar_names = [n for n in tree.default_properties() if tree.BY_NAME[n].kind == "scalar"]
    array_names = [n for n in tree.default_properties() if tree.BY_NAME[n].kind == "array"]
    for step in (2, 4):
        with open(run / f"{outputs.stem(step)}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 92  # 15 attention blocks x 4 + 16 x 2 MLP
        assert sum(r["kind"] == "q" for r in rows) == 15 and sum(r["kind"] == "mlp_in" for r in rows) == 16
        assert not any(r["layer"] == "7" and r["kind"] in "qkvo" for r in rows)
        assert set(scalar_names) <= set(rows[0])
        for name in ("sigma2", "rho", "stable_rank_w", "effective_rank_g", "orth_err_ns5", "alpha_w"):
            assert all(math.isfinite(float(r[name])) for r in rows), name
        arrays = outputs.read_npz(run / f"{outputs.stem(step)}.npz")
        assert arrays["mlp_in/3/echo"].shape == (32,) and arrays["q/0/replica_cos_u"].shape == (3, 32)
        meta = outputs.read_json(run / f"{outputs.stem(step)}.json")
        assert meta["replicas"] == 3 and meta["tokens_per_replica"] == 64 and meta["matrices"] == 92
        assert not (run / f"{outputs.stem(step)}.partial").exists()
    # Weights in the table are the checkpoint's own.
    ckpt = torch.load(checkpoints[1], weights_only=True)
    s = torch.linalg.svdvals(ckpt["model"]["blocks.3.mlp.fc_w"].float())
    assert float(rows[[r["param"] for r in rows].index("blocks.3.mlp.fc_w")]["spectral_norm_w"]) == pytest.approx(
        float(s[0]), rel=1e-5)

    assert not (run / "plots").exists()

    # A rerun asking for a few properties finds them done and draws their plots alone.
    kept_scalars, kept_arrays = ["tau2"], ["echo", "sv_median", "sv_w"]  # the echo figure reads tau2
    capsys.readouterr()
    run_cli(*checkpoints, "--replicas=3", "--properties", ",".join(kept_scalars + kept_arrays), "--out", out)
    assert capsys.readouterr().out.count("already done, skipped") == 2
    want = expected_plots(run, (2, 4), kept_scalars, kept_arrays)
    assert plot_files(run) == want and any("echo" in name for name in want)
    assert want < expected_plots(run, (2, 4), scalar_names, array_names)

    # --render from the saved results alone (no checkpoints) redraws the same plots, pixel for pixel. A
    # figure reads only its own property (and the echo's, tau2), so a copy of the results reduced to
    # those properties redraws exactly those figures.
    copy = tmp_path / "copy"
    (copy / "tiny").mkdir(parents=True)
    for step in (2, 4):
        stem = outputs.stem(step)
        shutil.copy(run / f"{stem}.json", copy / "tiny" / f"{stem}.json")
        _, rows = outputs.read_csv(run / f"{stem}.csv")
        outputs.write_csv(copy / "tiny" / f"{stem}.csv", rows, kept_scalars)
        arrays = outputs.read_npz(run / f"{stem}.npz")
        outputs.write_npz(copy / "tiny" / f"{stem}.npz",
                          {k: v for k, v in arrays.items() if k.rsplit("/", 1)[1] in kept_arrays})
    run_cli("--render", "--out", copy)
    assert plot_files(copy / "tiny") == want
    for name in want:
        assert (copy / "tiny" / name).read_bytes() == (run / name).read_bytes(), name


def test_rerun_skips_and_interrupted_run_resumes(checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    props = "sigma2,stable_rank_w,sv_g"
    real_run = tree.run
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tree, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(checkpoints[0], "--replicas=2", "--properties", props, "--out", out, "--skip_plots")
    monkeypatch.setattr(tree, "run", real_run)
    partial = out / "tiny" / "step_000002.partial"
    assert len(list(partial.iterdir())) == 29 and not (out / "tiny" / "step_000002.csv").exists()
    capsys.readouterr()
    run_cli(checkpoints[0], "--replicas=2", "--properties", props, "--out", out, "--skip_plots")
    assert "resuming: 29 matrices already done" in capsys.readouterr().out
    resumed = (out / "tiny" / "step_000002.csv").read_text()
    fresh_out = tmp_path / "fresh"
    run_cli(checkpoints[0], "--replicas=2", "--properties", props, "--out", fresh_out, "--skip_plots")
    assert (fresh_out / "tiny" / "step_000002.csv").read_text() == resumed
    run_cli(checkpoints[0], "--replicas=2", "--properties", props, "--out", out, "--skip_plots")
    assert "already done, skipped" in capsys.readouterr().out


def test_non_finite_weights_give_a_one_line_error_and_the_others_run(checkpoints, tmp_path, capsys):
    ckpt = torch.load(checkpoints[0], weights_only=True)
    ckpt["model"]["blocks.5.mlp.fc_w"][0, 0] = float("nan")
    broken = tmp_path / "step_nan.pt"
    torch.save(ckpt, broken)
    with pytest.raises(SystemExit, match="1 of 2 checkpoints"):
        run_cli(broken, checkpoints[1], "--properties", "stable_rank_w", "--out", tmp_path / "out", "--skip_plots")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mlp_in layer 5" in err[0] and "finite" in err[0]
    assert (tmp_path / "out" / "tiny" / "step_000004.csv").exists()


def test_replica_gradients_come_from_disjoint_heldout_slices(checkpoints):
    ckpt = ck.read_checkpoint(checkpoints[1])
    module = ck.load_script(ckpt, str(ROOT))
    refs = [r for r in ck.matrix_refs(ckpt["model"]) if r.layer == 2]
    opts = analysis.parse_args(["x"])
    owner = analysis.owners_of(refs, 1)
    stacks, tokens = analysis.replica_gradients(ckpt, refs, owner, 3, ContextStub(), opts)
    args = ck.hyper(ckpt, module)
    stream = ck.heldout_stream(module, args.val_files, 3 * (tokens + 1), str(ROOT))
    val_tokens = module.read_shard(sorted(Path(args.val_files).parent.glob("tiny_val_*.bin"))[0])
    assert torch.equal(stream, val_tokens[:3 * (tokens + 1)].long())
    model = module.model_from_checkpoint(ckpt)
    inputs, targets = ck.replica_batch(stream, 2, tokens)
    assert torch.equal(inputs[1:], targets[:-1]) and inputs[0] == stream[2 * (tokens + 1)]
    model(inputs, targets, module.window_blocks(ckpt["step"], args)).backward()
    for ref in refs:
        want = ck.take(dict(model.named_parameters())[ref.param].grad, ref)
        assert torch.allclose(stacks[ref.label][2], want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), ref.label
        assert not torch.allclose(stacks[ref.label][0], stacks[ref.label][1])


class ContextStub:
    rank, world, device = 0, 1, torch.device("cpu")

    def say(self, text, every_rank=False):
        pass


def test_script_falls_back_to_embedded_source(checkpoints):
    ckpt = ck.read_checkpoint(checkpoints[0])
    moved = dict(ckpt, script_path="speedruns/not_here.py")
    module = ck.load_script(moved, str(ROOT))
    assert os.path.basename(module.__file__) == "not_here.py" and hasattr(module, "model_from_checkpoint")
    with pytest.raises(ck.CheckpointError, match="does not match source_sha256"):
        ck.load_script(dict(moved, source=ckpt["source"] + "\n# edited\n"), str(ROOT))


def test_master_weights_restore_bf16_mantissa():
    full = torch.randn(3, 4)
    bits = full.view(torch.int32)
    ckpt = {"model": {"blocks.0.mlp.fc_w": (bits >> 16).short().view(torch.bfloat16)},
            "optimizer": {"muon": {"blocks.0.mlp.fc_w": {"mantissa": (bits & 0xFFFF).short()}}}}
    ref = ck.matrix_refs(ckpt["model"])[0]
    assert torch.equal(analysis.master_weights(ckpt, ref), full)


def test_list_help_and_render_without_results(tmp_path, capsys):
    run_cli("--list")
    listing = capsys.readouterr().out
    assert "echo" in listing and "kappa" in listing and len(listing.splitlines()) == len(tree.NODES)
    with pytest.raises(SystemExit, match="no finished results"):
        run_cli("--render", "--out", tmp_path)
    with pytest.raises(SystemExit) as done:
        run_cli("--help")
    lines = capsys.readouterr().out.splitlines()
    assert done.value.code == 0 and lines[0].startswith("Map a tree of matrix properties")
    assert lines[2].startswith("Example: python analysis.py")


def test_torchrun_shards_matrices_and_matches_one_process(checkpoints, tmp_path):
    props = "sigma2,rho,echo,tau2,stable_rank_w"
    run_cli(checkpoints[1], "--replicas=4", "--properties", props, "--out", tmp_path / "one", "--skip_plots")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "analysis.py"), str(checkpoints[1]), "--replicas=4", "--properties", props,
           "--out", str(tmp_path / "two"), "--skip_plots"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[rank 1]   matrix" in proc.stdout  # both processes analysed matrices
    # The reference ran at pytest's thread count, the shards at one thread each: BLAS may round the last
    # digits differently, so values are compared with a tolerance far above fp32 rounding.
    one, two = (list(csv.DictReader((tmp_path / d / "tiny" / "step_000004.csv").open())) for d in ("one", "two"))
    assert len(one) == len(two) > 0 and one[0].keys() == two[0].keys()
    for r1, r2 in zip(one, two, strict=True):
        for key in r1:
            try:
                x, y = float(r1[key]), float(r2[key])
            except ValueError:
                assert r1[key] == r2[key], key
                continue
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6), (key, x, y)
    assert not (tmp_path / "two" / "tiny" / "plots").exists()
    a = outputs.read_npz(tmp_path / "one" / "tiny" / "step_000004.npz")
    b = outputs.read_npz(tmp_path / "two" / "tiny" / "step_000004.npz")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and np.allclose(a[k], b[k], rtol=1e-4, atol=1e-6, equal_nan=True), k


def shard_files(checkpoints):
    """The fixture run's train and val shard globs."""
    folder = Path(checkpoints[0]).parents[2]
    return str(folder / "tiny_train_*.bin"), str(folder / "tiny_val_*.bin")


def test_bad_checkpoints_each_give_one_line_and_the_others_run(checkpoints, tmp_path, capsys):
    ckpt = torch.load(checkpoints[0], weights_only=True)
    wider = tmp_path / "wider.pt"  # 32-wide weights, 64-wide settings
    torch.save(dict(ckpt, hyperparameters={**ckpt["hyperparameters"], "model_dim": 64}), wider)
    fewer = tmp_path / "fewer.pt"  # 16 blocks of weights, 12 in the settings (the script refuses the layout)
    torch.save(dict(ckpt, hyperparameters={**ckpt["hyperparameters"], "num_layers": 12}), fewer)
    with pytest.raises(SystemExit, match="2 of 3 checkpoints could not be analysed"):
        run_cli(wider, fewer, checkpoints[1], "--replicas=2", "--properties", "sigma2", "--out", tmp_path / "out",
                "--skip_plots")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"error: {wider}: ") and "size mismatch" in err[0] and "do not fit" in err[0]
    assert err[1].startswith(f"error: {fewer}: ") and "num_layers" in err[1]
    assert (tmp_path / "out" / "tiny" / "step_000004.csv").exists()


@pytest.mark.parametrize("argv", [["--replicas=0"], ["--replicas", "-3"], ["--tokens=0"], ["--tokens=-64"]])
def test_non_positive_counts_are_refused(checkpoints, tmp_path, argv, capsys):
    with pytest.raises(SystemExit, match=r"^error: --(replicas|tokens) must be a positive number \(got -?\d+\)"):
        run_cli(checkpoints[0], *argv, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ck.CheckpointError, match="must be positive"):
        ck.tokens_per_replica(None, 0)


def test_echo_needs_three_replicas(checkpoints, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: echo, kappa need --replicas of at least 3"):
        run_cli(checkpoints[0], "--replicas=2", "--properties", "echo,sigma2,kappa", "--out", tmp_path)


def test_rerun_with_other_settings_recomputes(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    csv_path = out / "tiny" / "step_000002.csv"

    def sigma2(*argv):
        run_cli(checkpoints[0], "--properties", "sigma2", "--out", out, "--skip_plots", *argv)
        skipped = "already done, skipped" in capsys.readouterr().out
        return skipped, [r["sigma2"] for r in csv.DictReader(open(csv_path))]

    other_val = tmp_path / "other_val_000.bin"
    write_shard(other_val, np.random.default_rng(9).integers(0, 256, 4_000))
    skipped, first = sigma2("--replicas=2", "--tokens=32")
    assert not skipped
    assert sigma2("--replicas=2", "--tokens=32") == (True, first)
    for argv in (["--replicas=2", "--tokens=48"], ["--replicas=3", "--tokens=48"],
                 ["--replicas=3", "--tokens=48", f"--val_files={other_val}"]):
        skipped, values = sigma2(*argv)
        assert not skipped and values != first, argv
        first = values
        assert sigma2(*argv) == (True, values), argv
    meta = outputs.read_json(out / "tiny" / "step_000002.json")
    assert meta["settings"]["tokens"] == 48 and meta["settings"]["val_files"][0][0] == str(other_val)
    # Properties of the weights alone do not depend on the replicas: a change there recomputes nothing.
    run_cli(checkpoints[0], "--properties", "stable_rank_w", "--out", out, "--skip_plots", "--tokens=16")
    capsys.readouterr()
    run_cli(checkpoints[0], "--properties", "stable_rank_w", "--out", out, "--skip_plots", "--tokens=24")
    assert "already done, skipped" in capsys.readouterr().out


def test_validation_files_that_are_training_shards_are_refused(checkpoints, tmp_path, capsys):
    train, _ = shard_files(checkpoints)
    argv = [checkpoints[1], "--replicas=2", "--properties", "sigma2", "--out", tmp_path / "out", "--skip_plots",
            f"--val_files={train}"]
    with pytest.raises(SystemExit, match="1 of 1 checkpoints"):
        run_cli(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training shards" in err[0] and "--allow-train-overlap" in err[0]
    assert not (tmp_path / "out" / "tiny").exists()
    run_cli(*argv, "--allow-train-overlap")
    assert (tmp_path / "out" / "tiny" / "step_000004.csv").exists()


def test_embedded_source_leaves_no_temp_folder(checkpoints, tmp_path, monkeypatch):
    import inspect
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(ck, "_MODULES", {})  # import afresh, not from an earlier test's module
    ckpt = ck.read_checkpoint(checkpoints[0])
    module = ck.load_script(dict(ckpt, script_path="speedruns/not_here.py"), str(ROOT))
    assert list(temp.iterdir()) == []
    assert module.model_from_checkpoint(ckpt) is not None
    assert "def model_from_checkpoint" in inspect.getsource(module.model_from_checkpoint)  # lines still found


def test_plots_say_how_many_layers_have_no_fit(tmp_path):
    def row(kind, layer, value):
        return {"kind": kind, "layer": layer, "tau2": value}

    nan = math.nan
    results = [(2, [row("q", 0, 5.0), row("q", 1, nan), row("q", 2, nan), row("q", 3, 4.0), row("k", 0, 3.0)]),
               (4, [row("q", 0, 6.0), row("q", 1, nan), row("q", 2, nan), row("q", 3, nan), row("k", 0, 3.5)])]
    notes = plots.scalar_figure("tau2", results, tmp_path / "tau2.png")
    assert notes == {"q": "2 of 4 layers have no fit; 1 more lack it at some steps"}
    assert (tmp_path / "tau2.png").exists()
    assert plots.scalar_figure("sigma2", [(2, [{"kind": "v", "layer": 0, "sigma2": nan}])], tmp_path / "s.png") == {
        "v": "1 of 1 layers have no value"}
    s = np.array([30.0, 20.0, 10.0])
    echo = s**2 / (s**2 + 100.0)
    lines = {"mlp_in": [(0, s, echo, 100.0), (1, s, echo, nan), (2, s, echo, nan)], "o": [(0, s, echo, 80.0)]}
    limits = ((plots._limits(s, False), False), (plots._limits(echo, False), False))
    notes = plots.array_figure("echo", 4, lines, 2, limits, tmp_path / "echo.png")
    assert notes == {"mlp_in": "2 of 3 layers have no fit"}


# ----------------------------------------------------------------------------------------------
# Plots on small synthetic results: every plot kind, and several runs in one figure

SYNTH_SCALARS = ["spectral_norm_w", "effective_rank_w", "tau2"]


def synthetic_run(folder, steps, layers=3, scale=1.0, scalars=SYNTH_SCALARS, arrays=tuple(plots.ARRAY_PLOTS)):
    """Results of a run on 6-wide matrices written as analysis.py writes them: every kind, `layers` layers
    (no attention in layer 1, as the real model lacks one), the named scalars and array plots' data."""
    os.makedirs(folder, exist_ok=True)
    k, R = 6, 3
    for step in steps:
        rows, data = [], {}
        for kind, _ in plots.KINDS:
            for layer in range(layers):
                if layer == 1 and kind in ("q", "k", "v", "o"):
                    continue
                s = scale * (1 + step / 10) * np.linspace(2.0, 0.5, k) * (1 + layer)
                rows.append({"step": step, "param": f"blocks.{layer}.{kind}", "kind": kind, "layer": layer,
                             "rows": k, "cols": k, **{n: float(s[0] + i) for i, n in enumerate(scalars)}})
                wanted = {"sv_w": s, "sv_g": s / 3, "sv_m": s / 2, "sv_median": s,
                          "echo": s**2 / (s**2 + 1.0), "replica_cos_u": np.full((R, k), 0.8),
                          "replica_cos_v": np.full((R, k), -0.7)}
                for name in arrays:
                    data[outputs.array_key(kind, layer, name)] = wanted[name]
                    if name == "echo":
                        data[outputs.array_key(kind, layer, "sv_median")] = wanted["sv_median"]
        base = os.path.join(folder, outputs.stem(step))
        outputs.write_csv(base + ".csv", rows, scalars)
        outputs.write_npz(base + ".npz", data)
        outputs.write_json(base + ".json", {"step": step, "properties": list(scalars) + list(arrays)})
    return folder


def test_every_plot_kind_renders_on_tiny_data(tmp_path):
    run = synthetic_run(tmp_path / "run", (10,), scalars=["tau2"])
    written = plots.render_run(str(run), progress=lambda text: None)
    want = expected_plots(run, (10,), ["tau2"], list(plots.ARRAY_PLOTS))
    assert plot_files(run) == want and {str(Path(p).relative_to(run)) for p in written} == want
    only = plots.render_run(str(run), progress=lambda text: None, properties={"sv_g"})
    assert {str(Path(p).relative_to(run)) for p in only} == {"plots/sv_g.gif", "plots/sv_g/step_000010.png"}


def line_sets(ax):
    """The LineCollections of a panel: (line style, number of lines) each."""
    from matplotlib.collections import LineCollection
    return [(str(c.get_linestyle()), len(c.get_segments())) for c in ax.collections if isinstance(c, LineCollection)]


def test_compare_draws_a_line_per_run_and_layer_with_a_legend_per_run(tmp_path):
    labels = ["muon", "adamw", "stiefel"]
    runs = [(label, *plots.load_run(str(synthetic_run(tmp_path / label, (10, 20), scale=i + 1))))
            for i, label in enumerate(labels)]
    fig, notes = plots.scalar_grid("spectral_norm_w", [(label, results) for label, _, results, _ in runs])
    assert notes == {}
    assert [t.get_text() for t in fig.legends[0].texts] == labels
    panels = fig.axes[:6]
    for ax, (kind, _) in zip(panels, plots.KINDS, strict=True):
        sets = line_sets(ax)
        assert [n for _, n in sets] == [2 if kind in "qkvo" else 3] * 3, kind  # layer 1 has no attention
        assert len({style for style, _ in sets}) == 3, kind  # each run its own line style
    # The array plots at a common step: the same, one line per run and layer.
    lines = [(label, plots._array_lines("sv_w", arrays[1], results[1][1])) for label, _, results, arrays in runs]
    fig = plots.compare_array_grid("sv_w", 20, lines, 2, ((None, False), (None, False)))
    assert [t.get_text() for t in fig.legends[0].texts] == labels
    assert [n for _, n in line_sets(fig.axes[4])] == [3, 3, 3]
    # A single run draws as before: no legend, one solid set of lines.
    fig, _ = plots.scalar_grid("spectral_norm_w", [(None, runs[0][2])])
    assert fig.legends == [] and [n for _, n in line_sets(fig.axes[0])] == [2]


def test_compare_cli_writes_figures_and_refuses_what_cannot_be_drawn(tmp_path, capsys):
    out = tmp_path / "out"
    synthetic_run(out / "a", (10, 20))
    synthetic_run(out / "b", (10, 30), scale=2.0, scalars=["spectral_norm_w"], arrays=("sv_w",))
    plot_dir = tmp_path / "fig"
    run_cli("--compare", "a", out / "b", "--out", out, "--labels", "baseline,adamw", "--plot_dir", plot_dir,
            "--properties", "spectral_norm_w,sv_w")
    files = {str(p.relative_to(plot_dir)) for p in plot_dir.rglob("*") if p.is_file()}
    assert files == {"spectral_norm_w_vs_step.png", "sv_w.gif", "sv_w/step_000010.png"}  # step 10 is in both
    run_cli("--compare", "a", "b", "--out", out)  # default: every common property, into OUT/compare/a_vs_b
    drawn = {p.name for p in (out / "compare" / "a_vs_b").iterdir()}
    assert drawn == {"spectral_norm_w_vs_step.png", "sv_w.gif", "sv_w"}

    synthetic_run(out / "c", (40,), scalars=["sigma2"], arrays=("echo",))  # the echo is never compared
    synthetic_run(out / "d", (50,), scalars=["sigma2"], arrays=("sv_w",))
    synthetic_run(out / "e", (60,), scalars=[], arrays=("sv_w",))
    for argv, message in [
        (["a", "c"], r"^error: the runs a, c have no property in common that can be plotted"),
        (["d", "e"], r"^error: no step is analysed in every one of d, e \(steps: d 50; e 60\)"),
        (["a", "b", "--properties", "sv_g"], r"^error: sv_g is not in the results of b; analyse"),
        (["a"], r"^error: --compare takes 2 to 4 runs"),
        (["a", "nowhere"], r"^error: no finished results for 'nowhere'"),
        (["a", "b", "--labels", "x"], r"^error: --labels names 1 runs for 2 --compare runs"),
    ]:
        with pytest.raises(SystemExit, match=message):
            run_cli("--compare", *argv, "--out", out)
    with pytest.raises(SystemExit, match=r"^error: --compare draws analysed runs and takes no checkpoints"):
        run_cli(tmp_path / "step_000010.pt", "--compare", "a", "b", "--out", out)
