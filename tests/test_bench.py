"""tools/bench: the fit, the crossing, the bootstrap and the LR pick on synthetic runs with known answers;
resume after a kill; controls that are built to fail do fail. No training runs: a fake trainer writes logs."""

import csv
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from kit.benchmarks import bench  # noqa: E402

SEP = "=" * 100


# ----------------------------------------------------------------------------- pure functions


def test_lr_grid_is_x2_around_the_declared_value():
    assert bench.lr_grid(0.04, 4) == pytest.approx([0.01, 0.02, 0.04, 0.08])
    assert bench.lr_grid(1.0, 5) == pytest.approx([0.25, 0.5, 1, 2, 4])


def test_pick_lr_takes_the_lowest_mean_and_flags_edges():
    assert bench.pick_lr({0.1: [3.0, 3.2], 0.2: [3.0, 3.0], 0.4: [3.5]}) == (0.2, "")
    assert bench.pick_lr({0.1: [2.0], 0.2: [3.0]}) == (0.1, "low")
    assert bench.pick_lr({0.1: [4.0], 0.2: [3.0]}) == (0.2, "high")
    assert bench.pick_lr({0.1: [4.0], 0.2: [3.0], 0.4: []}) == (0.2, "")  # 0.4 diverged: not an edge
    with pytest.raises(ValueError):
        bench.pick_lr({0.1: []})


def test_fit_and_crossing_recover_exact_curves():
    budgets = np.array([60.0, 80.0, 100.0])
    line = 5.0 - 0.5 * np.log(budgets)
    coef = bench.fit_curve(budgets, line)
    assert coef == pytest.approx([5.0, -0.5, 0.0], abs=1e-9)
    assert math.exp(bench.log_crossing(coef, 5.0 - 0.5 * math.log(123.0))) == pytest.approx(123.0)
    x = np.log(budgets)
    convex = 3.0 - 0.8 * x + 0.05 * x**2  # falls over ln(60)..ln(100): derivative -0.8 + 0.1 x < 0 there
    coef = bench.fit_curve(budgets, convex)
    assert coef == pytest.approx([3.0, -0.8, 0.05])
    assert math.exp(bench.log_crossing(coef, float(bench.curve_at(coef, 70.0)))) == pytest.approx(70.0)
    concave = 0.1 + 1.16 * x - 0.16 * x**2  # falls over the budgets too (slope 1.16 - 0.32 x < 0 there)
    coef = bench.fit_curve(budgets, concave)
    assert math.exp(bench.log_crossing(coef, float(bench.curve_at(coef, 90.0)))) == pytest.approx(90.0)
    assert bench.log_crossing(np.array([1.0, 0.1, 0.0]), 0.5) == np.inf  # a loss that rises never crosses
    # two budgets: a line; batched over leading axes: two replicates at once
    two = bench.fit_curve(budgets[[0, 2]], np.stack([line[[0, 2]], line[[0, 2]] + 1]))
    assert np.allclose(two, [[5.0, -0.5, 0.0], [6.0, -0.5, 0.0]])


def power_law(steps, speed, rng, noise):
    """Final loss after a complete run of `steps` steps at relative speed `speed`, plus seed noise [seeds, k]."""
    steps = np.asarray(steps, np.float64)
    return 1.5 + 8.0 * (speed * steps) ** -0.5 + noise * rng.standard_normal((5, steps.size))


def test_bootstrap_ratio_recovers_a_known_speedup_within_its_ci():
    budgets = [60, 80, 100]
    rng = np.random.default_rng(1)
    base = power_law(budgets, 1.0, rng, 0.002)
    for speed in (0.85, 1.0, 1.15):  # the variant needs 1/speed of the baseline's steps
        table = power_law(budgets, speed, rng, 0.002)
        s = bench.budget_ratio(budgets, table, base, reps=2000, seed=3)
        assert s.ci_low <= 1 / speed <= s.ci_high, (speed, s)
        assert s.ratio == pytest.approx(1 / speed, rel=0.01)
        assert s.ci_high - s.ci_low < 0.1
        assert s.target == pytest.approx(base[:, -1].mean())


def test_bootstrap_ci_excludes_one_for_a_clear_difference_and_widens_with_noise():
    budgets = [60, 80, 100]
    rng = np.random.default_rng(2)
    base = power_law(budgets, 1.0, rng, 0.002)
    slow = bench.budget_ratio(budgets, power_law(budgets, 0.7, rng, 0.002), base, reps=1000)
    assert slow.ci_low > 1 and not slow.extrapolated  # read on the baseline's curve, inside its budgets
    very_slow = bench.budget_ratio(budgets, power_law(budgets, 0.5, rng, 0.002), base, reps=100)
    assert very_slow.extrapolated and very_slow.ratio == pytest.approx(2.0, rel=0.02)
    # a concave baseline whose extrapolated curve turns over: many replicates never reach AdamW-like losses
    concave = np.log(budgets)
    base_c = 0.1 + 1.16 * concave - 0.16 * concave**2 + 0.003 * rng.standard_normal((5, 3))
    far = bench.budget_ratio(budgets, base_c + 0.2, base_c, reps=1000)
    assert far.ci_low > 1.5 and far.extrapolated
    quiet = bench.budget_ratio(budgets, power_law(budgets, 1.0, rng, 0.001), base, reps=1000)
    noisy = bench.budget_ratio(budgets, power_law(budgets, 1.0, rng, 0.02), base, reps=1000)
    assert noisy.ci_high - noisy.ci_low > 3 * (quiet.ci_high - quiet.ci_low)


def test_bootstrap_ci_covers_the_truth_most_of_the_time():
    """Over 200 synthetic experiments with a known ratio the 95% CI holds it in about 95% of them."""
    budgets = [60, 80, 100]
    rng = np.random.default_rng(5)
    hits = 0
    for i in range(200):
        truth = 1.1 if i % 2 else 1.0
        base = power_law(budgets, 1.0, rng, 0.004)
        table = power_law(budgets, 1 / truth, rng, 0.004)
        s = bench.budget_ratio(budgets, table, base, reps=500, seed=int(rng.integers(1e9)))
        hits += s.ci_low <= truth <= s.ci_high
    assert 178 <= hits <= 200  # 89%: a binomial(200, 0.95) falls below it with p < 0.001


# ----------------------------------------------------------------------------- the tool, with a fake trainer


def option(cmd, name):
    return next((a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")), None)


class FakeTrainer:
    """Stands in for the speedrun scripts. Final loss = a power law in speed * steps, plus a penalty
    0.05 * log2(lr / best lr)^2, plus a noise fixed by (variant, seed, steps). Records the calls; can die
    half-way through a given call, leaving a partial log (like a kill)."""

    def __init__(self, speeds, best_lr_factor, noise=0.003, die_on_call=None):
        self.speeds, self.best_lr_factor, self.noise = speeds, best_lr_factor, noise
        self.die_on_call, self.calls = die_on_call, []

    def __call__(self, cmd, cwd, stdout_path):
        self.calls.append(cmd)
        script = Path(cmd[1]).stem
        variant = script.removeprefix("train_gpt_medium").removeprefix("_") or "baseline"
        steps, every = int(option(cmd, "num_iterations")), int(option(cmd, "val_loss_every"))
        seed = int(option(cmd, "seed"))
        field = "adamw_lr" if option(cmd, "adamw_lr") else "muon_lr"
        lr = float(option(cmd, field))
        declared = bench.script_settings(Path(cmd[1]))
        best = getattr(declared, field) * self.best_lr_factor.get(variant, 1.0)
        speed = self.speeds[variant]
        if variant == "baseline" and seed >= bench.CONTROL_SEED_OFFSET:
            speed = self.speeds.get("control", speed)
        h = int(hashlib.sha256(f"{variant} {seed} {steps}".encode()).hexdigest()[:8], 16)
        noise = self.noise * np.random.default_rng(h).standard_normal()
        penalty = 0.05 * math.log2(lr / best) ** 2
        log = Path(option(cmd, "log_dir")) / f"{option(cmd, 'run_id')}.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# fake source", SEP, "fake environment", SEP]
        for s in range(0, steps + 1, every):
            loss = 1.5 + 8.0 * (speed * max(s, 1)) ** -0.5 + penalty + noise
            lines.append(f"step:{s}/{steps} val_loss:{loss:.6f} train_time:{10 * s}ms step_avg:10.00ms")
        if steps % every:
            loss = 1.5 + 8.0 * (speed * steps) ** -0.5 + penalty + noise
            lines.append(f"step:{steps}/{steps} val_loss:{loss:.6f} train_time:{10 * steps}ms step_avg:10.00ms")
        if len(self.calls) == self.die_on_call:
            log.write_text("\n".join(lines[:5]) + "\n")
            raise KeyboardInterrupt
        log.write_text("\n".join(lines) + "\n")
        return 0


SPEEDS = {"baseline": 1.0, "adamw": 0.7, "polar_normuon_cwd": 1.1}
ARGS = ["--steps=100", "--seeds=5", "--lr-points=4", "--parallel=1"]


def run_main(tmp_path, trainer, *extra):
    bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,adamw,polar_normuon_cwd,control", *extra],
               runner=trainer, root=ROOT)


def read_csv(path):
    with open(path, newline="") as f:
        return {row["variant"]: row for row in csv.DictReader(f)}


def test_full_bench_tunes_lr_recovers_ratios_and_passes_controls(tmp_path, capsys):
    # the baseline's best lr is half its declared value, adamw's 4x: the grid (/4, /2, 1, x2) holds the first,
    # and the second lies beyond its high edge, which the tool must extend to
    trainer = FakeTrainer(SPEEDS, {"baseline": 0.5, "adamw": 4.0})
    run_main(tmp_path, trainer)
    rows = read_csv(tmp_path / "bench.csv")
    lr0 = bench.script_settings(bench.variants.script_path("baseline", ROOT)).muon_lr
    assert float(rows["baseline"]["tuned_lr"]) == pytest.approx(lr0 / 2)
    assert float(rows["control"]["tuned_lr"]) == pytest.approx(lr0 / 2)  # the control uses the baseline's
    adamw0 = bench.script_settings(bench.variants.script_path("adamw", ROOT)).adamw_lr
    assert float(rows["adamw"]["tuned_lr"]) == pytest.approx(4 * adamw0)
    assert rows["adamw"]["lr_grid_edge"] == ""
    for name, speed in SPEEDS.items():  # (coverage of the CI itself: test_bootstrap_ci_covers_...)
        assert float(rows[name]["ratio"]) == pytest.approx(1 / speed, rel=0.015), (name, rows[name])
    assert float(rows["adamw"]["ci_low"]) > 1
    assert float(rows["control"]["ci_low"]) <= 1 <= float(rows["control"]["ci_high"])
    runs = list(csv.DictReader(open(tmp_path / "bench_runs.csv")))
    # grids: baseline 4, adamw 4 + 2 extensions, polar_normuon_cwd 4; main: 4 variants x 3 budgets x 5 seeds
    assert len(runs) == 14 + 60 == len(trainer.calls)
    out = capsys.readouterr().out
    assert "run 1/" in out and "ETA" in out and "FAILED" not in out
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_a_killed_bench_resumes_with_only_the_missing_runs(tmp_path):
    speeds = {"baseline": 1.0, "adamw": 0.7}
    dying = FakeTrainer(speeds, {}, die_on_call=6)
    with pytest.raises(KeyboardInterrupt):
        bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,adamw"], runner=dying, root=ROOT)
    assert len(list((tmp_path / "logs").glob("*.txt"))) == 6  # five finished, one partial

    def no_training(cmd, cwd, stdout_path):
        raise AssertionError("--report must not start a run")

    bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,adamw", "--report"], runner=no_training, root=ROOT)
    assert "planned run(s) not finished yet" in (tmp_path / "bench.txt").read_text()
    resumed = FakeTrainer(speeds, {})
    bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,adamw"], runner=resumed, root=ROOT)
    total = 8 + 2 * 3 * 5
    assert len(resumed.calls) == total - 5
    assert len(list((tmp_path / "logs").glob("*.partial"))) == 1
    fresh = FakeTrainer(speeds, {})
    bench.main([*ARGS, f"--out={tmp_path / 'fresh'}", "--variants=baseline,adamw"], runner=fresh, root=ROOT)
    assert read_csv(tmp_path / "bench.csv") == read_csv(tmp_path / "fresh" / "bench.csv")


def test_sigterm_stops_the_bench_after_the_running_trainings(tmp_path, capsys):
    """A SIGTERM during a run: no further run starts, the bench exits 128 + 15, and the same command later
    runs only what is missing."""
    import os
    import signal

    speeds = {"baseline": 1.0, "adamw": 0.7}
    trainer = FakeTrainer(speeds, {})

    def terminated_on_the_third(cmd, cwd, stdout_path):
        rc = trainer(cmd, cwd, stdout_path)
        if len(trainer.calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while this run is the one running
        return rc

    def ignored(signum, frame):  # what SIGTERM does outside the bench here (so a bench that lets it through
        pass  # does not kill pytest, it just runs on and fails the count below)

    before = signal.signal(signal.SIGTERM, ignored)
    try:
        with pytest.raises(SystemExit) as stop:
            bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,adamw"], runner=terminated_on_the_third,
                       root=ROOT)
        assert signal.getsignal(signal.SIGTERM) is ignored  # restored, not left forwarding
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stop.value.code == 128 + signal.SIGTERM
    assert len(trainer.calls) == 3 and "the same command resumes" in capsys.readouterr().out
    resumed = FakeTrainer(speeds, {})
    bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,adamw"], runner=resumed, root=ROOT)
    assert len(resumed.calls) == 8 + 2 * 3 * 5 - 3


def test_a_positive_control_built_to_fail_fails_loudly(tmp_path, capsys):
    trainer = FakeTrainer({"baseline": 1.0, "adamw": 1.0}, {})  # AdamW as fast as Muon
    with pytest.raises(SystemExit) as err:
        bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,adamw"], runner=trainer, root=ROOT)
    assert err.value.code == 1
    assert "POSITIVE CONTROL FAILED" in capsys.readouterr().out


def test_a_negative_control_built_to_fail_fails_loudly(tmp_path, capsys):
    trainer = FakeTrainer({"baseline": 1.0, "control": 0.8}, {})  # the "same" baseline on other seeds, slower
    with pytest.raises(SystemExit) as err:
        bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,control"], runner=trainer, root=ROOT)
    assert err.value.code == 1
    assert "NEGATIVE CONTROL FAILED" in capsys.readouterr().out


def test_quick_makes_no_grid_and_no_control_claims(tmp_path, capsys):
    trainer = FakeTrainer({"baseline": 1.0, "adamw": 1.0}, {})  # would fail the positive control
    bench.main(["--steps=100", "--quick", f"--out={tmp_path}", "--variants=baseline,adamw"], runner=trainer, root=ROOT)
    assert len(trainer.calls) == 2 * 2 * 2  # 2 variants x 2 budgets x 2 seeds, no grid
    out = capsys.readouterr().out
    assert "no CI claims" in out and "CONTROL FAILED" not in out


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="extra training settings"):
        bench.main(["stray", f"--out={tmp_path}"], runner=FakeTrainer({}, {}), root=ROOT)
    with pytest.raises(SystemExit, match="no script for variant"):
        bench.main([f"--out={tmp_path}", "--variants=nosuchvariant"], runner=FakeTrainer({}, {}), root=ROOT)
