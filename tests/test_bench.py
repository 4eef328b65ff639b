"""tools/bench: the LR search, the decay it holds, the fit, the crossing, the budgets beyond N, the paired
bootstrap with the pick's noise, on synthetic runs with known answers; then the whole tool on a scratch
repository of stand-in scripts (per-group rates, the A/A control, resume after a kill, controls built to fail).
No training runs: a fake trainer writes logs. The whole pipeline's coverage: tests/test_bench_pipeline.py."""

import csv
import hashlib
import math
import os
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
    assert bench.pick_lr({0.1: [4.0], 0.2: [3.0], 0.4: []}) == (0.2, "")  # 0.4 never finished: not an edge
    assert bench.pick_lr({0.1: [4.0], 0.2: [2.0, math.inf], 0.4: [3.0]}) == (0.4, "high")  # 0.2 diverged once
    with pytest.raises(ValueError):
        bench.pick_lr({0.1: []})


def search(loss_at, first, extensions=bench.LR_EXTENSIONS):
    """Run next_lr_points to the end with one loss per rate; -> (the rates in the order measured, the pick)."""
    results, order = {}, []
    while rates := bench.next_lr_points(results, first, extensions):
        order += rates
        results.update({r: [loss_at(r)] for r in rates})
    return order, bench.pick_lr(results)


def test_the_lr_search_extends_at_an_edge_then_refines_by_sqrt2():
    first = bench.lr_grid(1.0, 4)  # 0.25 .. 2
    s2 = math.sqrt(2)
    order, (best, edge) = search(lambda r: (math.log2(r) - math.log2(0.7)) ** 2, first)  # optimum 0.7
    assert order == pytest.approx([0.25, 0.5, 1, 2, 0.5 / s2, 0.5 * s2])  # pick 0.5 (not an edge): refine
    assert best == pytest.approx(0.5 * s2) and edge == ""
    order, (best, edge) = search(lambda r: (math.log2(r) - 3) ** 2, first)  # optimum 8: beyond the grid
    assert order == pytest.approx([0.25, 0.5, 1, 2, 4, 8, 8 / s2, 8 * s2])
    assert best == pytest.approx(8) and edge == ""
    order, (best, edge) = search(lambda r: -r, first)  # ever higher: two extensions, then the edge
    assert order == pytest.approx([0.25, 0.5, 1, 2, 4, 8, 8 / s2, 8 * s2]) and edge == "high"
    order, _ = search(lambda r: r, first, extensions=0)
    assert order == pytest.approx([0.25, 0.5, 1, 2, 0.25 / s2, 0.25 * s2])


def test_a_one_point_grid_checks_its_neighbours_and_follows_an_optimum_that_moved():
    s2 = math.sqrt(2)
    order, (best, edge) = search(lambda r: (math.log2(r) - math.log2(1.1)) ** 2, [1.0])  # optimum inside
    assert order == pytest.approx([1, 1 / s2, s2]) and best == pytest.approx(1) and edge == ""
    order, (best, edge) = search(lambda r: (math.log2(r) + 1) ** 2, [1.0])  # optimum 0.5: two steps down
    assert order == pytest.approx([1, 1 / s2, s2, 0.5, 0.5 / s2]) and best == pytest.approx(0.5) and edge == ""
    order, (best, edge) = search(lambda r: (math.log2(r) - 0.5) ** 2, [1.0])  # optimum sqrt(2): the edge,
    assert order == pytest.approx([1, 1 / s2, s2, 2]) and best == pytest.approx(s2) and edge == ""  # one step
    order, (best, edge) = search(lambda r: r, [1.0])  # ever lower: two steps out, then flagged
    assert order == pytest.approx([1, 1 / s2, s2, 0.5, 0.5 / s2]) and edge == "low"
    order, (best, edge) = search(lambda r: r, [1.0], extensions=0)
    assert order == pytest.approx([1, 1 / s2, s2]) and edge == "low"


def test_decay_holds_the_integrated_decay_while_the_rate_moves():
    """sum over steps of lr_t x wd, lr_t = lr x schedule_t: the same at every rate of the grid."""
    schedule = np.concatenate([np.ones(39), np.linspace(1, 0, 91)])  # constant, then a linear cooldown
    lr0, wd0 = 0.05, 0.23
    integral = (lr0 * schedule * wd0).sum()
    for lr in bench.lr_grid(lr0, 4) + [lr0 * math.sqrt(2)]:
        assert (lr * schedule * bench.decay_at(lr, lr0, wd0)).sum() == pytest.approx(integral)
    assert bench.decay_at(0.025, 0.05, 0.23) == pytest.approx(0.46)


def test_fit_and_crossing_recover_exact_curves():
    budgets = np.array([60.0, 80.0, 100.0])
    line = 5.0 - 0.5 * np.log(budgets)
    coef = bench.fit_curve(budgets, line)
    assert coef == pytest.approx([5.0, -0.5, 0.0], abs=1e-9)
    assert math.exp(bench.log_crossing(coef, 5.0 - 0.5 * math.log(123.0))) == pytest.approx(123.0)
    assert bench.curve_slope(coef, 100.0) == pytest.approx(-0.5)
    x = np.log(budgets)
    convex = 3.0 - 0.8 * x + 0.05 * x**2  # falls over ln(60)..ln(100): derivative -0.8 + 0.1 x < 0 there
    coef = bench.fit_curve(budgets, convex)
    assert coef == pytest.approx([3.0, -0.8, 0.05])
    assert math.exp(bench.log_crossing(coef, float(bench.curve_at(coef, 70.0)))) == pytest.approx(70.0)
    concave = 0.1 + 1.16 * x - 0.16 * x**2  # falls over the budgets too (slope 1.16 - 0.32 x < 0 there)
    coef = bench.fit_curve(budgets, concave)
    assert math.exp(bench.log_crossing(coef, float(bench.curve_at(coef, 90.0)))) == pytest.approx(90.0)
    assert bench.log_crossing(coef, 10.0) == -np.inf  # a concave curve whose top is below: reached before any
    assert bench.log_crossing(np.array([1.0, 0.1, 0.0]), 0.5) == np.inf  # a loss that rises never crosses
    # two budgets: a line; batched over leading axes: two replicates at once
    two = bench.fit_curve(budgets[[0, 2]], np.stack([line[[0, 2]], line[[0, 2]] + 1]))
    assert np.allclose(two, [[5.0, -0.5, 0.0], [6.0, -0.5, 0.0]])


def power_law(steps, speed, rng=None, noise=0.0, seeds=5):
    """Final loss after a complete run of `steps` steps at relative speed `speed`, plus seed noise [seeds, k]."""
    steps = np.asarray(steps, np.float64)
    clean = 1.5 + 8.0 * (speed * steps) ** -0.5
    return clean + (0 if rng is None else noise * rng.standard_normal((seeds, steps.size)))


def curve(budgets, losses, seeds=None):
    return bench.Curve(np.asarray(budgets, np.float64), list(range(len(losses))) if seeds is None else seeds,
                       np.asarray(losses, np.float64))


def test_a_slow_variant_gets_budgets_beyond_n_until_its_fit_crosses_inside_them():
    budgets, n, target = [60, 80, 100], 100, float(power_law([100], 1.0)[0])
    assert bench.next_budget(budgets, power_law(budgets, 1.1), target, n) is None  # faster: crosses inside
    grown = list(budgets)
    while (b := bench.next_budget(grown, power_law(grown, 1 / 1.4), target, n)) is not None:
        grown.append(b)
    assert grown == [60, 80, 100, 125, 150]  # needs 1.4 N: 1.25 N is not enough, 1.5 N is
    grown = list(budgets)
    while (b := bench.next_budget(grown, power_law(grown, 1 / 3), target, n)) is not None:
        grown.append(b)
    assert grown == [60, 80, 100, 125, 150, 200]  # needs 3 N: up to 2 N, and no further


def test_the_bootstrap_draws_a_seed_of_both_sides_as_a_pair():
    rng = np.random.default_rng(0)
    budgets = [60, 80, 100]
    base = power_law(budgets, 1.0, rng, 0.01)
    paired = curve(budgets, base + 0.02)  # the variant's seed s is the baseline's seed s, 0.02 worse
    tv, tb = bench.resample_means(paired, curve(budgets, base), 500, rng)
    assert np.allclose(tv - tb, 0.02)  # pairs drawn together: the difference does not vary
    unpaired = curve(budgets, base + 0.02, seeds=list(range(100, 105)))
    tv, tb = bench.resample_means(unpaired, curve(budgets, base), 500, rng)
    assert (tv - tb).std() > 0.003
    # the plain bootstrap's variance of a mean is (n - 1) / n of s^2 / n; the inflated rows restore s^2 / n
    tv, _ = bench.resample_means(unpaired, curve(budgets, base), 20000, rng)
    assert tv[:, 0].var() == pytest.approx(unpaired.losses[:, 0].var(ddof=1) / 5, rel=0.05)


def test_pick_costs_are_zero_for_a_clear_optimum_and_spread_for_a_flat_one():
    rng = np.random.default_rng(1)
    rates = np.array([0.25, 0.5, 1.0, 2.0])
    means = np.array([[2.1], [2.0], [2.05], [2.2]])
    sharp = bench.Grid(rates, means + 0.001 * rng.standard_normal((4, 3)), 1)
    assert np.all(bench.pick_costs(sharp, -0.4, 1000, rng) == 0)
    flat = bench.Grid(rates, 2.0 + 0.005 * rng.standard_normal((4, 3)), 0)
    flat.picked = int(np.argmin(flat.losses.mean(1)))
    costs = bench.pick_costs(flat, -0.4, 1000, rng)
    assert np.all(costs >= 0) and 0.1 < np.mean(costs > 0) < 0.9
    diverged = bench.Grid(rates, np.array([[2.1, 2.1, np.inf], [2.0, 2.0, 2.0], [2.05, np.nan, 2.05], [3.0] * 3]), 1)
    assert np.all(bench.grid_means(diverged.losses)[[0, 2]] == [np.inf, 2.05])


def test_bootstrap_ratio_recovers_a_known_speedup_within_its_ci():
    budgets = [60, 80, 100]
    rng = np.random.default_rng(1)
    base = curve(budgets, power_law(budgets, 1.0, rng, 0.002))
    for speed in (0.85, 1.0, 1.15):  # the variant needs 1/speed of the baseline's steps
        s = bench.budget_ratio(curve(budgets, power_law(budgets, speed, rng, 0.002)), base, 100, reps=2000, seed=3)
        assert s.ci_low <= 1 / speed <= s.ci_high, (speed, s)
        assert s.ratio == pytest.approx(1 / speed, rel=0.01)
        assert s.ci_high - s.ci_low < 0.1 and s.pairs == 5
        assert s.target == pytest.approx(base.losses[:, -1].mean())
        assert (s.p_value < 0.05) == (not s.ci_low <= 1 <= s.ci_high)  # the same t statistic


def test_a_crossing_outside_the_measured_budgets_is_extrapolated_and_never_read_on_the_baselines_curve():
    budgets = [60, 80, 100]
    rng = np.random.default_rng(2)
    base = curve(budgets, power_law(budgets, 1.0, rng, 0.002))
    slow = bench.budget_ratio(curve(budgets, power_law(budgets, 0.7, rng, 0.002)), base, 100, reps=1000)
    assert slow.extrapolated and slow.ratio == pytest.approx(1 / 0.7, rel=0.03)  # read on its own curve
    wide = [60, 80, 100, 125, 150]
    inside = bench.budget_ratio(curve(wide, power_law(wide, 0.7, rng, 0.002)), base, 100, reps=1000)
    assert not inside.extrapolated and inside.ci_low > 1 and inside.p_value < 0.001
    assert inside.ratio == pytest.approx(1 / 0.7, rel=0.02)
    # a concave baseline whose extrapolated curve turns over: many replicates never reach AdamW-like losses
    x = np.log(budgets)
    base_c = 0.1 + 1.16 * x - 0.16 * x**2 + 0.003 * rng.standard_normal((5, 3))
    far = bench.budget_ratio(curve(budgets, base_c + 0.2), curve(budgets, base_c), 100, reps=1000)
    assert far.ci_low > 1.5 and far.extrapolated


def test_the_picks_noise_widens_the_ci():
    budgets = [60, 80, 100]
    rng = np.random.default_rng(4)
    base = curve(budgets, power_law(budgets, 1.0, rng, 0.004))
    variant = curve(budgets, power_law(budgets, 1.0, rng, 0.004))
    rates = np.array([0.25, 0.5, 1.0, 2.0])
    flat = bench.Grid(rates, 2.0 + 0.01 * rng.standard_normal((4, 3)), 0)  # an optimum as flat as the noise
    flat.picked = int(np.argmin(flat.losses.mean(1)))
    sharp = bench.Grid(rates, np.array([[2.3] * 3, [2.0] * 3, [2.2] * 3, [2.4] * 3]), 1)
    alone = bench.budget_ratio(variant, base, 100, reps=2000)
    tuned = bench.budget_ratio(variant, base, 100, flat, flat, reps=2000)
    assert tuned.ratio == alone.ratio and tuned.pick_sd > 0.002
    assert tuned.ci_high - tuned.ci_low > 1.1 * (alone.ci_high - alone.ci_low)
    clear = bench.budget_ratio(variant, base, 100, sharp, sharp, reps=2000)
    assert clear.pick_sd == 0 and clear.ci_low == pytest.approx(alone.ci_low)


def test_verdicts():
    assert bench.verdict(0.9, True, False) == "faster" and bench.verdict(1.1, True, False) == "slower"
    assert bench.verdict(0.9, False, False) == "no difference"
    assert bench.verdict(0.9, True, True) == "none (extrapolated)"


# ----------------------------------------------------------------------------- the manifest's groups


PATCH_GROUPS = {  # what each patch's header says its geometry changes
    "sphere": ["q", "k", "v", "mlp_in"],  # the zero rows (o, MLP out) stay free by default
    "sphere_enter": ["q", "k", "v", "o", "mlp_in", "mlp_out"],  # ... or enter spheres
    "oblique": ["q", "k", "v", "mlp_in"],
    "sl": ["q", "k", "v"],  # square matrices only; o starts at zero
    "block_stiefel": ["q", "k", "v"],  # o takes the baseline's step
}  # stiefel, l1_stiefel (q, k, v, mlp_in), symplectic (q, k, v): not until their steps honour --muon_lr_mult
# (they step from the momentum itself): tests/test_bench_regime.py checks who honours it
# Each norm_matched control tunes the groups of the variant it controls.
PATCH_GROUPS |= {f"norm_matched_{name}": groups for name, groups in PATCH_GROUPS.items()}  # sl: norm_matched_sl (|det|)
# Issue 22's readings: sphere and oblique with q, k, v free (and their controls)
PATCH_GROUPS |= {"sphere_qkv_free": ["mlp_in"], "oblique_qkv_free": ["mlp_in"]}
PATCH_GROUPS |= {"baseline_qkv_lr": ["q", "k", "v"]}  # sl's control: the baseline, q, k, v's rate tuned alone
PATCH_GROUPS |= {f"norm_matched_{name}": PATCH_GROUPS[name] for name in ("sphere_qkv_free", "oblique_qkv_free")}


def test_the_manifest_declares_the_matrices_each_geometry_changes():
    entries = bench.manifest(ROOT)
    assert {name: e["groups"] for name, e in entries.items() if "groups" in e} == PATCH_GROUPS
    for name in ("echo", "echo_exact", "polar_normuon_cwd", "adamw"):
        assert "groups" not in entries[name]


def test_bad_groups_are_one_line_errors(tmp_path):
    (tmp_path / "patches").mkdir()
    for text, pattern in (('[x]\ngroups = ["q", "attn"]\n', "groups must list distinct"),
                          ('[x]\ngroups = ["q", "q"]\n', "groups must list distinct"),
                          ('[x]\ngroups = []\n', "groups must list distinct"),
                          ('[x]\nlr = "adamw_lr"\ngroups = ["q"]\n', "need lr = \"muon_lr\"")):
        (tmp_path / "patches" / "variants.toml").write_text(text)
        with pytest.raises(SystemExit, match=pattern):
            bench.manifest(tmp_path)


# ----------------------------------------------------------------------------- the tool, with a fake trainer

STAND_IN = '''"""A stand-in speedrun script for tools/bench's tests: Hyperparameters, PRESETS and parse_args."""
import dataclasses


@dataclasses.dataclass
class Hyperparameters:
    preset: str = "official"
    train_files: str = "data/fineweb_train_*.bin"
    val_files: str = "data/fineweb_val_*.bin"
    num_iterations: int = 5960
    val_loss_every: int = 125
    checkpoint_every: str = ""
    seed: int = 0
    muon_lr: float = 0.025
    muon_wd: float = 0.01
{fields}
    run_id: str = ""
    log_dir: str = "logs"
    overwrite: bool = False


PRESETS = {{"official": {{}}, "bench": dict(train_files="data/bytes_train_*.bin", val_files="data/bytes_val_*.bin",
                                         num_iterations=100, muon_lr=0.05, muon_wd=0.2{preset})}}


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
MULT = '    muon_lr_mult: str = ""'
SCRIPTS = {"baseline": (MULT, ""), "polar_normuon_cwd": (MULT, ""), "oblique": (MULT, ""), "echo": (MULT, ""),
           "adamw": (MULT + "\n    adamw_lr: float = 0.0015", ", adamw_lr=0.002"), "nomult": ("", "")}
MANIFEST = """[polar_normuon_cwd]\nlr = "muon_lr"\n[echo]\nlr = "muon_lr"\n[adamw]\nlr = "adamw_lr"
[oblique]\nlr = "muon_lr"\ngroups = ["q", "k", "v", "mlp_in"]\n[nomult]\ngroups = ["q"]\n"""


@pytest.fixture
def repo(tmp_path):
    """A scratch repository: stand-in scripts of the baseline and some variants, their manifest, byte shards."""
    root = tmp_path / "repo"
    (root / "speedruns").mkdir(parents=True)
    for name, (fields, preset) in SCRIPTS.items():
        stem = "train_gpt_medium" if name == "baseline" else f"train_gpt_medium_{name}"
        (root / "speedruns" / f"{stem}.py").write_text(STAND_IN.format(fields=fields, preset=preset))
    (root / "patches").mkdir()
    (root / "patches" / "variants.toml").write_text(MANIFEST)
    (root / "data").mkdir()
    for name in ("bytes_train_000000.bin", "bytes_val_000000.bin"):
        (root / "data" / name).write_bytes(name.encode())
    return root


def option(cmd, name):
    return next((a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")), None)


def is_control(seed):
    return bench.CONTROL_SEED_OFFSET <= seed < bench.GRID_SEED_OFFSET or seed >= bench.CONTROL_GRID_SEED_OFFSET


class FakeTrainer:
    """Stands in for the speedrun scripts. Final loss = a power law in speed * steps, plus 0.05 x log2(rate /
    best)^2 for each rate (a group variant: the base rate of the other matrices against the baseline's best, and
    its groups' rate against its own), plus seed noise (a part shared by every variant on a seed and budget: the
    same data order). Best rates: the declared lr x best_lr_factor (a group variant: the baseline's best x its
    factor). Records the calls; can die half-way through a given call, leaving a partial log (like a kill)."""

    def __init__(self, speeds, best_lr_factor, noise=0.003, die_on_call=None, salt="a"):
        self.speeds, self.best_lr_factor, self.noise, self.salt = speeds, best_lr_factor, noise, salt
        self.die_on_call, self.calls = die_on_call, []

    @staticmethod
    def variant(cmd):
        name = Path(cmd[1]).stem.removeprefix("train_gpt_medium").removeprefix("_") or "baseline"
        return "control" if name == "baseline" and is_control(int(option(cmd, "seed"))) else name

    def __call__(self, cmd, cwd, stdout_path):
        self.calls.append(cmd)
        variant = self.variant(cmd)
        steps, every = int(option(cmd, "num_iterations")), int(option(cmd, "val_loss_every"))
        seed = int(option(cmd, "seed"))
        declared = bench.script_settings(Path(cmd[1]))
        base_best = declared.muon_lr * self.best_lr_factor.get("baseline", 1.0)
        if option(cmd, "muon_lr_mult"):
            base = float(option(cmd, "muon_lr"))
            group = base * float(option(cmd, "muon_lr_mult").split(",")[0].split("=")[1])
            penalty = 0.05 * (math.log2(base / base_best) ** 2
                              + math.log2(group / (base_best * self.best_lr_factor.get(variant, 1.0))) ** 2)
        else:
            field = "adamw_lr" if option(cmd, "adamw_lr") else "muon_lr"
            best = getattr(declared, field) * self.best_lr_factor.get(variant, 1.0)
            penalty = 0.05 * math.log2(float(option(cmd, field)) / best) ** 2
        speed = self.speeds[variant] if variant in self.speeds else self.speeds["baseline"]

        def gauss(key):
            digest = hashlib.sha256(f"{self.salt} {key}".encode()).hexdigest()
            return np.random.default_rng(int(digest[:8], 16)).standard_normal()

        noise = self.noise * (0.6 * gauss(f"{seed} {steps}") + 0.8 * gauss(f"{variant} {seed} {steps}"))
        log = Path(option(cmd, "log_dir")) / f"{option(cmd, 'run_id')}.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# fake source", SEP, "fake environment", SEP]
        for s in [*range(0, steps + 1, every), *([steps] if steps % every else [])]:
            loss = 1.5 + 8.0 * (speed * max(s, 1)) ** -0.5 + penalty + noise
            lines.append(f"step:{s}/{steps} val_loss:{loss:.6f} train_time:{10 * s}ms step_avg:10.00ms")
        if len(self.calls) == self.die_on_call:
            log.write_text("\n".join(lines[:5]) + "\n")
            raise KeyboardInterrupt
        log.write_text("\n".join(lines) + "\n")
        return 0


SPEEDS = {"baseline": 1.0, "adamw": 0.7, "polar_normuon_cwd": 1.1, "oblique": 1.05}
ARGS = ["--steps=100", "--seeds=5", "--lr-points=4", "--parallel=1"]


def read_csv(path):
    with open(path, newline="") as f:
        return {row["variant"]: row for row in csv.DictReader(f)}


def runs_csv(out):
    with open(out / "bench_runs.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_full_bench_tunes_rates_and_groups_recovers_ratios_and_passes_controls(repo, tmp_path, capsys):
    # the baseline's best lr is half its declared value (the grid's /4, /2, 1, x2 holds it); adamw's is 4x, beyond
    # the grid's high edge, which the search must extend to; oblique's groups want 2x the baseline's best rate
    trainer = FakeTrainer(SPEEDS, {"baseline": 0.5, "control": 0.5, "adamw": 4.0, "oblique": 2.0})
    out = tmp_path / "out"
    bench.main([*ARGS, f"--out={out}", "--variants=baseline,adamw,polar_normuon_cwd,oblique,control"],
               runner=trainer, root=repo)
    rows, runs = read_csv(out / "bench.csv"), runs_csv(out)
    lr0, wd0 = 0.05, 0.2  # the stand-in's bench preset
    assert float(rows["baseline"]["tuned_lr"]) == pytest.approx(lr0 / 2)
    assert float(rows["control"]["tuned_lr"]) == pytest.approx(lr0 / 2)  # tuned on its own grid seeds
    assert {int(r["seed"]) for r in runs if r["variant"] == "control" and r["role"] == "grid"} == {2000, 2001, 2002}
    assert {int(r["seed"]) for r in runs if r["variant"] == "control" and r["role"] == "main"} == set(range(100, 105))
    assert float(rows["adamw"]["tuned_lr"]) == pytest.approx(4 * 0.002) and rows["adamw"]["lr_grid_edge"] == ""
    # oblique: its groups' rate at 2x the baseline's, the other matrices at the baseline's rate
    assert rows["oblique"]["tuned_groups"] == "q k v mlp_in" and rows["baseline"]["tuned_groups"] == "all"
    assert float(rows["oblique"]["tuned_lr"]) == pytest.approx(lr0) and float(rows["oblique"]["base_lr"]) == lr0 / 2
    for cmd in trainer.calls:
        if option(cmd, "adamw_lr"):  # adamw tunes adamw_lr: the bench sets neither muon_lr nor muon_wd
            assert option(cmd, "muon_lr") is option(cmd, "muon_wd") is None
            continue
        lr, wd = float(option(cmd, "muon_lr")), float(option(cmd, "muon_wd"))
        assert lr * wd == pytest.approx(lr0 * wd0, rel=1e-5)  # the integrated decay held at every rate
        if FakeTrainer.variant(cmd) == "oblique":
            assert lr == pytest.approx(lr0 / 2)
            assert [g.split("=")[0] for g in option(cmd, "muon_lr_mult").split(",")] == ["q", "k", "v", "mlp_in"]
        else:
            assert option(cmd, "muon_lr_mult") is None
    assert rows["baseline"]["ratio"] == ""  # the reference
    for name, speed in SPEEDS.items():  # (coverage of the CI itself: tests/test_bench_pipeline.py)
        if name != "baseline":
            assert float(rows[name]["ratio"]) == pytest.approx(1 / speed, rel=0.015), (name, rows[name])
            assert rows[name]["extrapolated"] == "false"
    # adamw needs 1.43 N: budgets 1.25 N and 1.5 N were added, and it crossed inside them
    assert rows["adamw"]["budgets"] == "60 80 100 125 150" and rows["polar_normuon_cwd"]["budgets"] == "60 80 100"
    assert float(rows["adamw"]["ci_low"]) > 1 and rows["adamw"]["verdict"] == "slower"
    assert float(rows["control"]["ci_low"]) <= 1 <= float(rows["control"]["ci_high"])
    assert rows["polar_normuon_cwd"]["seed_pairs"] == "5" and rows["control"]["seed_pairs"] == "0"
    # Holm over the variants that are not controls: two of them here
    assert rows["adamw"]["p_holm"] == rows["control"]["p_holm"] == ""
    ps = sorted(float(rows[n]["p_value"]) for n in ("polar_normuon_cwd", "oblique"))
    assert sorted(float(rows[n]["p_holm"]) for n in ("polar_normuon_cwd", "oblique")) == \
        pytest.approx([min(1, 2 * ps[0]), min(1, max(2 * ps[0], ps[1]))], rel=1e-3)
    assert rows["polar_normuon_cwd"]["verdict"] == rows["polar_normuon_cwd"]["verdict_holm"] == "faster"
    # grids: baseline and control 4 + 2 refinements, adamw 4 + 2 extensions + 2, polar 4 + 2, oblique 4 + 1 + 2;
    # 3 seeds each; main: 5 variants x 3 budgets x 5 seeds, and adamw's 2 budgets beyond N x 5 seeds
    assert len(runs) == 3 * (6 + 6 + 8 + 6 + 7) + 75 + 10 == len(trainer.calls)
    text = (out / "bench.txt").read_text()
    assert "q,k,v,mlp_in" in text and "all: adamw_lr" in text and "(x2 of 0.025)" in text
    assert "p (Holm)" in text and "verdict (Holm)" in text and "LR grid at budget N = 100" in text
    grid = text.split("LR grid")[1].splitlines()
    assert any(line.split()[:1] == ["baseline"] and " 0.025 " in line and "+-" in line and line.rstrip().endswith("*")
               for line in grid)
    out_text = capsys.readouterr().out
    assert "run 1/" in out_text and "ETA" in out_text and "FAILED" not in out_text and "beyond N: 5 run(s)" in out_text
    assert (out / "bench.png").stat().st_size > 0


def test_a_variant_slower_than_2n_is_extrapolated_and_gets_no_verdict(repo, tmp_path):
    trainer = FakeTrainer({"baseline": 1.0, "echo": 0.35}, {})
    out = tmp_path / "out"
    bench.main([*ARGS, "--lr-points=1", "--lr-seeds=1", f"--out={out}", "--variants=baseline,echo"],
               runner=trainer, root=repo)
    row = read_csv(out / "bench.csv")["echo"]
    assert row["budgets"] == "60 80 100 125 150 200" and row["extrapolated"] == "true"
    assert row["verdict"] == row["verdict_holm"] == "none (extrapolated)"
    assert "(extrapolated)" in (out / "bench.txt").read_text()


def test_the_cache_key_holds_code_data_torch_and_threads(repo, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # whatever the suite runs with
    key = bench.make_variant("baseline", repo, [0]).key
    assert bench.make_variant("baseline", repo, [0]).key == key
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert bench.make_variant("baseline", repo, [0]).key != key
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert bench.make_variant("baseline", repo, [0]).key == key
    original = bench.torch_version
    monkeypatch.setattr(bench, "torch_version", lambda: "0.0.1")
    assert bench.make_variant("baseline", repo, [0]).key != key
    monkeypatch.setattr(bench, "torch_version", original)
    shard = repo / "data" / "bytes_val_000000.bin"
    shard.write_bytes(b"other bytes")
    os.utime(shard, ns=(1, 1))
    assert bench.make_variant("baseline", repo, [0]).key != key
    script = repo / "speedruns" / "train_gpt_medium.py"
    shard.write_bytes(b"bytes_val_000000.bin")
    os.utime(shard, ns=(2, 2))
    assert bench.make_variant("baseline", repo, [0]).key == key
    script.write_text(script.read_text() + "\n# changed\n")
    assert bench.make_variant("baseline", repo, [0]).key != key


def test_settings_the_bench_sets_are_refused_and_groups_need_the_scripts_multipliers(repo, tmp_path):
    for extra, pattern in ((["--muon_wd=0.1"], "--muon_wd is set by the bench"),
                           (["--muon_lr_mult=q=2"], "--muon_lr_mult is set by the bench")):
        with pytest.raises(SystemExit, match=pattern):
            bench.main(["--steps=100", f"--out={tmp_path / 'out'}", "--variants=baseline,oblique", *extra],
                       runner=FakeTrainer({}, {}), root=repo)
    with pytest.raises(SystemExit, match="has no setting 'muon_lr_mult'"):
        bench.main(["--steps=100", f"--out={tmp_path / 'out'}", "--variants=nomult"], runner=FakeTrainer({}, {}),
                   root=repo)
    assert not (tmp_path / "out").exists()


def test_a_killed_bench_resumes_with_only_the_missing_runs(repo, tmp_path):
    speeds = {"baseline": 1.0, "adamw": 0.7}
    argv = [*ARGS, "--variants=baseline,adamw"]
    dying = FakeTrainer(speeds, {}, die_on_call=6)
    with pytest.raises(KeyboardInterrupt):
        bench.main([*argv, f"--out={tmp_path}"], runner=dying, root=repo)
    assert len(list((tmp_path / "logs").glob("*.txt"))) == 6  # five finished, one partial

    def no_training(cmd, cwd, stdout_path):
        raise AssertionError("--report must not start a run")

    bench.main([*argv, f"--out={tmp_path}", "--report"], runner=no_training, root=repo)
    assert "planned run(s) not finished yet" in (tmp_path / "bench.txt").read_text()
    resumed = FakeTrainer(speeds, {})
    bench.main([*argv, f"--out={tmp_path}"], runner=resumed, root=repo)
    fresh = FakeTrainer(speeds, {})
    bench.main([*argv, f"--out={tmp_path / 'fresh'}"], runner=fresh, root=repo)
    assert len(resumed.calls) == len(fresh.calls) - 5
    assert len(list((tmp_path / "logs").glob("*.partial"))) == 1
    assert read_csv(tmp_path / "bench.csv") == read_csv(tmp_path / "fresh" / "bench.csv")


def test_a_journal_lets_a_fresh_out_folder_rerun_nothing_and_killed_runs_are_kept_one_by_one(repo, tmp_path):
    """--journal keeps each finished run as it ends: a bench killed half-way, then resumed into a new OUT (the
    old one lost, as on a fresh clone), runs only what the journal lacks, and writes the same table as a bench
    that never stopped; --reuse reads a committed bench_runs.csv the same way, and a run of changed code is not
    taken from it (its run id differs)."""
    speeds = {"baseline": 1.0, "adamw": 0.7}
    argv, journal = [*ARGS, "--variants=baseline,adamw"], tmp_path / "journal.csv"
    dying = FakeTrainer(speeds, {}, die_on_call=6)
    with pytest.raises(KeyboardInterrupt):
        bench.main([*argv, f"--out={tmp_path / 'a'}", f"--journal={journal}"], runner=dying, root=repo)
    kept = list(csv.DictReader(journal.open()))
    assert len(kept) == 5 and {r["final_val_loss"] for r in kept} != {""}  # five finished; the killed one not
    resumed = FakeTrainer(speeds, {})
    bench.main([*argv, f"--out={tmp_path / 'b'}", f"--journal={journal}"], runner=resumed, root=repo)
    fresh = FakeTrainer(speeds, {})
    bench.main([*argv, f"--out={tmp_path / 'fresh'}"], runner=fresh, root=repo)
    assert len(resumed.calls) == len(fresh.calls) - 5
    assert read_csv(tmp_path / "b" / "bench.csv") == read_csv(tmp_path / "fresh" / "bench.csv")
    assert sum(r["status"] == "journal" for r in runs_csv(tmp_path / "b")) == 5
    assert len(list(csv.DictReader(journal.open()))) == len(fresh.calls)

    def no_training(cmd, cwd, stdout_path):
        raise AssertionError("every run is in the committed bench_runs.csv")

    committed = tmp_path / "fresh" / "bench_runs.csv"
    bench.main([*argv, f"--out={tmp_path / 'c'}", f"--reuse={committed}"], runner=no_training, root=repo)
    assert read_csv(tmp_path / "c" / "bench.csv") == read_csv(tmp_path / "fresh" / "bench.csv")
    script = repo / "speedruns" / "train_gpt_medium_adamw.py"
    script.write_text(script.read_text() + "\n# changed\n")
    changed = FakeTrainer(speeds, {})
    bench.main([*argv, f"--out={tmp_path / 'd'}", f"--reuse={committed}"], runner=changed, root=repo)
    assert changed.calls and all("adamw" in " ".join(map(str, c)) for c in changed.calls)


def _journal_many(path, start, count):
    from types import SimpleNamespace

    from kit.runs.logs import Run, Validation

    journal = bench.Journal([], Path(path))
    for i in range(start, start + count):
        run = Run(num_iterations=10, last_step=10, train_time_ms=1000.0, validations=[Validation(10, 2.0 + i, 1000.0)])
        journal.add(SimpleNamespace(point=SimpleNamespace(run_id=f"run-{i}", run=run), variant="baseline",
                                    role="main", seed=i, steps=10, lr=0.05))


def test_two_processes_writing_one_journal_lose_no_row(tmp_path):
    """Two benches (or a bench and a ladder) may share a journal: each add is read, add, replace under a file
    lock, so rows written at the same time by two processes all survive."""
    import multiprocessing

    path = tmp_path / "journal.csv"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_journal_many, args=(str(path), k * 100, 60)) for k in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    rows = list(csv.DictReader(path.open()))
    expected = [f"run-{i}" for k in range(2) for i in range(k * 100, k * 100 + 60)]
    assert sorted(r["run_id"] for r in rows) == sorted(expected)
    assert {float(r["final_val_loss"]) for r in rows if r["run_id"] == "run-105"} == {107.0}


def test_journal_and_reuse_refuse_bad_files_in_one_line(repo, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("variant,loss\nbaseline,1.0\n")
    with pytest.raises(SystemExit, match="not a run journal"):
        bench.main([*ARGS, f"--out={tmp_path / 'o'}", f"--reuse={bad}"], runner=None, root=repo)
    with pytest.raises(SystemExit, match="no such file"):
        bench.main([*ARGS, f"--out={tmp_path / 'o'}", f"--reuse={tmp_path / 'missing.csv'}"], runner=None, root=repo)
    bad.write_text("run_id,final_val_loss\nx,1.0\ny,oops\n")
    with pytest.raises(SystemExit, match="line 3"):
        bench.main([*ARGS, f"--out={tmp_path / 'o'}", f"--journal={bad}"], runner=None, root=repo)


def test_sigterm_stops_the_bench_after_the_running_trainings(repo, tmp_path, capsys):
    """A SIGTERM during a run: no further run starts, the bench exits 128 + 15, and the same command later
    runs only what is missing."""
    import signal

    speeds = {"baseline": 1.0, "adamw": 0.7}
    trainer = FakeTrainer(speeds, {})
    argv = [*ARGS, f"--out={tmp_path}", "--variants=baseline,adamw"]

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
            bench.main(argv, runner=terminated_on_the_third, root=repo)
        assert signal.getsignal(signal.SIGTERM) is ignored  # restored, not left forwarding
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stop.value.code == 128 + signal.SIGTERM
    assert len(trainer.calls) == 3 and "the same command resumes" in capsys.readouterr().out
    resumed = FakeTrainer(speeds, {})
    bench.main(argv, runner=resumed, root=repo)
    assert len(resumed.calls) == len(runs_csv(tmp_path)) - 3


def test_a_positive_control_built_to_fail_fails_loudly(repo, tmp_path, capsys):
    trainer = FakeTrainer({"baseline": 1.0, "adamw": 1.0}, {})  # AdamW as fast as Muon
    with pytest.raises(SystemExit) as err:
        bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,adamw"], runner=trainer, root=repo)
    assert err.value.code == 1
    assert "POSITIVE CONTROL FAILED" in capsys.readouterr().out


def test_a_negative_control_built_to_fail_fails_loudly(repo, tmp_path, capsys):
    trainer = FakeTrainer({"baseline": 1.0, "control": 0.8}, {})  # the "same" baseline on other seeds, slower
    with pytest.raises(SystemExit) as err:
        bench.main([*ARGS, f"--out={tmp_path}", "--variants=baseline,control"], runner=trainer, root=repo)
    assert err.value.code == 1
    assert "NEGATIVE CONTROL FAILED" in capsys.readouterr().out


def test_quick_makes_no_grid_and_no_control_claims(repo, tmp_path, capsys):
    trainer = FakeTrainer({"baseline": 1.0, "adamw": 1.0, "oblique": 1.0}, {})  # would fail the positive control
    bench.main(["--steps=100", "--quick", f"--out={tmp_path}", "--variants=baseline,adamw,oblique"], runner=trainer,
               root=repo)
    assert len(trainer.calls) == 3 * 2 * 2  # 3 variants x 2 budgets x 2 seeds, no grid, nothing beyond N
    assert all(option(c, "muon_lr") == "0.05" for c in trainer.calls if not option(c, "adamw_lr"))  # as declared
    assert all(option(c, "muon_lr_mult") == "q=1,k=1,v=1,mlp_in=1" for c in trainer.calls if "oblique" in c[1])
    out = capsys.readouterr().out
    assert "no CI claims" in out and "CONTROL FAILED" not in out


def test_bad_arguments_are_one_line_errors(repo, tmp_path):
    with pytest.raises(SystemExit, match="extra training settings"):
        bench.main(["stray", f"--out={tmp_path}"], runner=FakeTrainer({}, {}), root=repo)
    with pytest.raises(SystemExit, match="no script for variant"):
        bench.main([f"--out={tmp_path}", "--variants=nosuchvariant"], runner=FakeTrainer({}, {}), root=repo)
    with pytest.raises(SystemExit, match="1 among them"):
        bench.main([f"--out={tmp_path}", "--budgets=0.6,0.8"], runner=FakeTrainer({}, {}), root=repo)


# ----------------------------------------------------------------------------- the real scripts


def test_every_variant_that_declares_a_rate_loads_for_the_bench():
    """make_variant on the committed scripts: each has its lr setting and the preset's decay; a variant with
    groups needs the script's muon_lr_mult (skipped, naming them, while the scripts lack it)."""
    lacking = []
    for name, entry in bench.manifest(ROOT).items():
        if "lr" not in entry or not bench.variants.script_path(name, ROOT).exists():
            continue
        try:
            v = bench.make_variant(name, ROOT, [0])
        except SystemExit as err:
            assert entry.get("groups") and "muon_lr_mult" in str(err.code), (name, err.code)
            lacking.append(name)
            continue
        assert v.lr_declared > 0 and v.groups == entry.get("groups", [])
        assert (v.decay is not None) == (v.lr_field == "muon_lr")
    if lacking:
        pytest.skip(f"the scripts of {', '.join(lacking)} have no muon_lr_mult yet")


def test_stand_in_matches_the_real_scripts_interface():
    """The stand-in's bench preset has the settings the tool reads from the real baseline."""
    real = bench.script_settings(bench.variants.script_path("baseline", ROOT))
    for name in ("num_iterations", "muon_lr", "muon_wd", "train_files", "val_files", "seed", "checkpoint_every"):
        assert hasattr(real, name), name


def test_a_variants_fixed_settings_go_to_each_of_its_runs(tmp_path):
    variant = bench.make_variant("ngpt_geodesic", ROOT, [0])
    assert "--sphere_step=geodesic" in variant.extra and "--sphere_angle=lr" in variant.extra
    assert not any(a.startswith("--sphere_step") for a in bench.make_variant("ngpt", ROOT, [0]).extra)
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "variants.toml").write_text('[x]\nsettings = ["a"]\n')
    with pytest.raises(SystemExit, match="settings must be a table"):
        bench.manifest(tmp_path)


def test_a_variants_declared_control_runs_with_it_and_reads_it_against_that_control(repo, tmp_path):
    """oblique names a control (as each manifold variant names its norm_matched one): asking for oblique benches
    the control too, and oblique's ratio against it is the ratio of their speeds, with a CI and Holm's p."""
    (repo / "speedruns" / "train_gpt_medium_norm_matched_oblique.py").write_text(STAND_IN.format(fields=MULT,
                                                                                                preset=""))
    groups = 'groups = ["q", "k", "v", "mlp_in"]\n'
    manifest = (repo / "patches" / "variants.toml").read_text().replace(
        groups, groups + 'control = "norm_matched_oblique"\n', 1)
    (repo / "patches" / "variants.toml").write_text(
        manifest + '[norm_matched_oblique]\nlr = "muon_lr"\ngroups = ["q", "k", "v", "mlp_in"]\n')
    trainer = FakeTrainer({"baseline": 1.0, "oblique": 1.1, "norm_matched_oblique": 1.05}, {})
    out = tmp_path / "out"
    bench.main([*ARGS, "--lr-points=1", "--lr-seeds=1", f"--out={out}", "--variants=baseline,oblique"],
               runner=trainer, root=repo)
    rows = read_csv(out / "bench.csv")
    assert "norm_matched_oblique" in rows and rows["oblique"]["control"] == "norm_matched_oblique"
    assert float(rows["oblique"]["ratio_vs_control"]) == pytest.approx(1.05 / 1.1, rel=0.015)
    low, high = float(rows["oblique"]["ci_low_vs_control"]), float(rows["oblique"]["ci_high_vs_control"])
    assert low < float(rows["oblique"]["ratio_vs_control"]) < high
    assert rows["oblique"]["p_holm_vs_control"] == rows["oblique"]["p_vs_control"]  # a family of one
    assert rows["baseline"]["ratio_vs_control"] == rows["norm_matched_oblique"]["ratio_vs_control"] == ""
    assert "vs norm_matched_oblique" in (out / "bench.txt").read_text()
    (repo / "patches" / "variants.toml").write_text(manifest.replace("norm_matched_oblique", "nowhere"))
    with pytest.raises(SystemExit, match="control must name another entry"):
        bench.manifest(repo)


def test_plot_curves_leave_out_runs_that_hold_only_a_final_loss():
    """A run from a journal or a reused CSV has one validation (its final loss): the curves panel draws the runs
    that have a whole curve, and a variant whose runs all came from a journal draws none (it used to cut every
    curve of the group to the final step, an empty-looking panel)."""
    from types import SimpleNamespace

    from kit.runs.logs import Run, Validation

    def bench_run(variant, steps, validation_steps):
        vals = [Validation(s, 3.0 - s / 100, 10.0 * s) for s in validation_steps]
        run = Run(num_iterations=steps, last_step=steps, train_time_ms=10.0 * steps, validations=vals)
        return SimpleNamespace(variant=variant, steps=steps, point=SimpleNamespace(run=run))

    logged = bench_run("baseline", 130, [0, 26, 52, 78, 104, 130])
    journal_only = bench_run("baseline", 130, [130])
    other_budget = bench_run("baseline", 78, [0, 26, 52, 78])
    unfinished = SimpleNamespace(variant="baseline", steps=130, point=SimpleNamespace(run=None))
    runs = [logged, journal_only, other_budget, unfinished, bench_run("echo", 130, [130])]
    assert bench.curve_runs(runs, "baseline", 130) == [logged.point.run]
    assert bench.curve_runs(runs, "echo", 130) == []
    curve = bench.group_curve(bench.curve_runs(runs, "baseline", 130))
    assert curve.steps == [0, 26, 52, 78, 104, 130]


def test_the_default_set_leaves_out_the_diagnostic_and_keep_norm_echo_entries():
    """The bench's default set is the shared set plus the echo variants that are not issue 22's readings: every
    manifest entry named echo*_keep_norm or echo_oracle* must be asked for by name (each costs hours on 2 cores)."""
    chosen = bench.default_variants(ROOT)
    assert chosen[:3] == bench.DEFAULT_VARIANTS
    manifest = bench.declared_lrs(ROOT)
    readings = sorted(v for v in manifest if v.startswith("echo") and ("keep_norm" in v or "oracle" in v))
    assert "echo_oracle_keep_norm" in readings and "echo_exact_keep_norm" in readings
    assert not set(readings) & set(chosen), "an issue-22 reading slipped into the bench's default set"
    assert "echo" in chosen
