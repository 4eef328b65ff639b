"""Benchmark optimizer variants fairly on the CPU bench preset: the step budget each needs to reach the baseline's loss.

Example: OMP_NUM_THREADS=1 tools/bench --parallel=2          # the default set

Every run is a complete training run of `--preset=bench` (its own schedule and cooldown) in its own
process at one thread. The seed sets the initialization and the order in which the training sequences
are read (the preset's --shuffle_train=1): seed s of a variant and seed s of the baseline see the same
data in the same order, so runs are paired by seed. For each variant the tool
  1. tunes its learning rate at budget N on --lr-seeds grid seeds (default 3; 1000, 1001, ...: disjoint
     from the confirmation seeds): a x2 grid of --lr-points rates around the script's value (the lowest
     mean final loss wins; a pick at the grid's edge adds the next x2 point out, at most twice), then one
     refinement, the pick x sqrt(2) and / sqrt(2); the pick over all of them is the tuned rate. Which
     rate: a variant that declares `groups = [...]` in patches/variants.toml (the matrices its idea
     changes: q, k, v, o, mlp_in, mlp_out) tunes those groups' rate only: each of its runs passes the
     baseline's tuned --muon_lr and --muon_lr_mult=<group>=<rate / that lr>,... (the baseline is tuned
     first), so every other matrix keeps the baseline's rate. Any other variant tunes its `lr = "<field>"`
     (default muon_lr) for every matrix. Weight decay is applied as lr x wd: with each muon_lr the bench
     passes muon_wd = preset wd x preset lr / muon_lr, which holds the integrated decay, sum_t lr_t x wd,
     at the preset's while the rate is tuned (a group multiplier leaves the decay at the base rate);
  2. trains it at the tuned rate at 0.6, 0.8 and 1.0 x N on the confirmation seeds 0..S-1; a variant
     whose fit does not fall through the target within its measured budgets gets 1.25, 1.5, then 2.0 x N
     until it does;
  3. fits final val loss against ln(budget) (degree 2, least squares, its own budgets) and reads where
     it falls through the target, the baseline's mean final loss at N: ratio = that budget / the
     baseline's. A crossing outside the variant's measured budgets is marked `extrapolated` and gets no
     verdict (no variant is read on another's curve).
The CI holds the tuning's noise (budget_ratio). Each bootstrap replicate resamples the confirmation seeds
(variant seed s and baseline seed s drawn as a pair where both exist; the target with them) and refits both
curves; it also resamples each side's grid seeds, re-picks that side's rate from the resampled grid means,
and charges the pick what the full grid means say it costs at N, turned into ln budget by the slope of the
side's fit at N (pick_costs: >= 0 for the variant, subtracted for the baseline). CI = ln ratio +- t(df) x the
replicates' std (df = seed pairs - 1); p, two-sided, tests ratio = 1 with the same t statistic (not Welch on
the final losses, which bench.csv keeps), so p < 0.05 exactly when the CI excludes 1. Why the charge: in
tests/test_bench_pipeline.py's simulated benches (2000 comparisons a run, the bench's seed noise, an lr
optimum flat enough that one seed per x2 point picks wrong 41% of the time) tuning on disjoint seeds alone
covered the true ratio 0.92-0.94 of the time; with the charge, 0.96-0.97 (slightly conservative: the full
grid means' winner looks better than it is, so the charge runs high). Holm's step-down correction over the
variants of one bench (the controls excluded; stats.holm) turns those p into adjusted ones; the table gives
both verdicts (faster, slower, no difference). A grid run that fails counts as diverged: its rate is not picked.
Controls, in every default run: adamw (positive: slower, CI above 1) and `control` (A/A), the baseline's
script as a variant of its own, tuned and fitted on its own grid seeds (2000, ...) and confirmation seeds
(100, ...), so it meets every source of noise a variant does (unpaired): its CI must include 1. A failed
control is printed at the end and the command exits with status 1.

A variant's own control: an entry of patches/variants.toml may name one, `control = "<variant>"` (each manifold
variant names its norm_matched control: the same pinned norms without the geometry). The control is then benched
with it (added to --variants), and the table's `vs its control` column reads the variant against it as against the
baseline (the budget to reach the control's mean final loss at N, over N; seeds paired, both tunings' noise in the
CI), with Holm's correction over those comparisons as a family of their own.
Default variants: baseline, adamw, polar_normuon_cwd and every echo* variant whose script exists and whose
table declares lr, but echo_exact (~2.7x the baseline's step at the bench preset), the diagnostic echo_oracle and
the *_keep_norm entries: name those in --variants.
Settings of a variant that do not scale down by themselves get bench values when its script has them
(SCALE_SETTINGS; adamw's warm-up is a share of the run and needs none). Extra `--field=value` options go
to every run. Runs are cached by a run id that hashes the command, the script's code, the sha256 of the
data files the run reads (train and val shards), torch's version and OMP_NUM_THREADS: a rerun (after a
kill, or with more seeds) runs only what is missing, and `--report` reads only runs of the scripts as
they are now (after a code change it finds none). The logs stay in OUT; `--journal=FILE` also keeps each
finished run's result in a small CSV (commit it), from which a later bench on a fresh clone takes every run
whose id it holds, and `--reuse=FILE,...` reads such results from journals and committed bench_runs.csv /
ladder_runs.csv files (status `journal` in bench_runs.csv).
Stopping: SIGINT or SIGTERM is passed on to the running trainings; no further run starts, and the
bench exits (128 + signal) once they have; a second signal kills them. The same command resumes.
Locks: the bench holds OUT/.bench.lock (with its pid) while it runs, so a second bench on OUT refuses;
each training holds OUT/logs/ID.lock while it lives (tools/sweep's), so a bench refuses to start while a
run of a killed bench is still alive. Runs get --overwrite=1 where the script has it (not in the run id).
Outputs in OUT (default bench_out/): bench.csv, bench_runs.csv, bench.png, bench.txt (the tables), logs/.
`--quick`: no LR grid (the declared rates), budgets 0.6 and 1.0, 2 seeds, no budgets beyond N, no CI
claims and no control verdicts.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import glob
import hashlib
import importlib.metadata
import importlib.util
import math
import os
import sys
import threading
import time
import tomllib
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np

from core.cli import format_table, make_parser
from core.files import atomic_savefig, atomic_write_text, write_csv
from kit.patching import variants
from kit.runs import stats, sweep
from kit.runs.compare import group_curve
from kit.runs.logs import Run, Validation
from kit.runs.sweep import (
    CHILDREN,
    Interrupted,
    Point,
    finished_run,
    forwarding_signals,
    launch_prefix,
    run_id_for,
    script_sha,
)

PRESET = "bench"
DEFAULT_VARIANTS = ["baseline", "adamw", "polar_normuon_cwd"]
POSITIVE_CONTROL = "adamw"  # must be slower than the baseline, CI above 1
CONTROL = "control"  # A/A: the baseline's script, tuned and fitted on its own seeds: CI must include 1
CONTROLS = (POSITIVE_CONTROL, CONTROL)  # not in Holm's family
CONTROL_SEED_OFFSET, GRID_SEED_OFFSET, CONTROL_GRID_SEED_OFFSET = 100, 1000, 2000
DEFAULT_LR_FIELD = "muon_lr"
MATRIX_GROUPS = ("q", "k", "v", "o", "mlp_in", "mlp_out")  # the names of `groups = [...]`
GROUP_SETTING = "muon_lr_mult"  # the script's per-group multipliers of Muon's step: "q=2.0,k=2.0"
DECAY_FIELDS = {"muon_lr": "muon_wd"}  # lr field -> its decay (applied as lr x wd), held at the preset's integral
BUDGETS = (0.6, 0.8, 1.0)
EXTRA_BUDGETS = (1.25, 1.5, 2.0)  # x N, in turn, for a variant that does not reach the target within its budgets
QUICK_BUDGETS = (0.6, 1.0)
SEEDS, QUICK_SEEDS = 5, 2
LR_POINTS, LR_SEEDS, LR_EXTENSIONS = 4, 3, 2
SQRT2 = math.sqrt(2.0)
VALIDATIONS = 4  # validations per run besides step 0, for the curves
BOOTSTRAP_REPS = 2000
ALPHA = 0.05  # the CI is 1 - ALPHA; Holm keeps the family-wise error at ALPHA
# Settings sized for the full run that no preset can reach (the baseline script lacks the field).
SCALE_SETTINGS: dict[str, str] = {}  # none today: adamw's warm-up is a share of the run
BENCH_SETS = ("preset", "num_iterations", "val_loss_every", "seed", "run_id", "log_dir", "overwrite")  # per run
LOCK = ".bench.lock"  # in OUT, held (with the bench's pid) while a bench runs there

Runner = Callable[[list[str], Path, Path], int]  # (cmd, cwd, stdout_path) -> exit status


def _refuse(message: str) -> NoReturn:
    raise SystemExit(f"tools/bench: {message}")


def subprocess_runner(cmd: list[str], cwd: Path, stdout_path: Path, lock_fd: int | None = None) -> int:
    """tools/sweep's runner (own session, signals passed on, lock_fd inherited by the training) at one
    OpenMP thread unless OMP_NUM_THREADS is set."""
    env = {**os.environ, "OMP_NUM_THREADS": threads()}
    return sweep.subprocess_runner(cmd, cwd, stdout_path, lock_fd, env)


def threads() -> str:
    """The OpenMP thread count each training gets (part of the run's cache key)."""
    return os.environ.get("OMP_NUM_THREADS", "1")


# ----------------------------------------------------------------------------- math (pure)


def lr_grid(center: float, points: int = LR_POINTS) -> list[float]:
    """x2 grid of `points` values holding center: center * 2**k, k = -(points // 2) ... (4 -> /4, /2, 1, x2)."""
    low = -(points // 2)
    return [center * 2.0**k for k in range(low, low + points)]


def _mean_or_inf(losses: Sequence[float]) -> float:
    """Mean final loss of a rate's finished runs; inf when none finished or one diverged (a non-finite loss)."""
    if not losses or not all(math.isfinite(x) for x in losses):
        return math.inf
    return math.fsum(losses) / len(losses)


def pick_lr(results: dict[float, list[float]]) -> tuple[float, str]:
    """{lr: final losses} -> (lr of the lowest mean loss, '' | 'low' | 'high': the pick is the grid's edge).
    A rate whose runs all failed, or one of whose runs diverged, counts as an infinite loss."""
    means = {lr: _mean_or_inf(v) for lr, v in results.items()}
    if not means or min(means.values()) == math.inf:
        raise ValueError("no finished LR-grid runs to pick from")
    best = min(means, key=means.get)
    lrs = sorted(means)
    edge = "low" if best == lrs[0] and len(lrs) > 1 else "high" if best == lrs[-1] and len(lrs) > 1 else ""
    return best, edge


def on_x2_grid(rate: float, ref: float) -> bool:
    """rate = ref * 2**k for a whole k (a point of the x2 grid, not a sqrt(2) refinement)."""
    k = math.log2(rate / ref)
    return abs(k - round(k)) < 1e-6


def next_lr_points(results: dict[float, list[float]], first: Sequence[float],
                   extensions: int = LR_EXTENSIONS) -> list[float]:
    """The learning-rate search, one round at a time: the rates to measure next ([] = done), from the final
    losses at budget N measured so far ({rate: losses}, [] for a rate whose runs all failed).
    first: the x2 grid, measured first. A pick at the edge of the x2 points measured adds the next x2 point
    out (at most `extensions` of them); then one refinement, the pick x sqrt(2) and / sqrt(2); done once
    a refinement point is measured, and pick_lr of all the results is the tuned rate.
    A grid of one point (the ladder's transfer of a rate from another rung) is checked at x sqrt(2) and
    / sqrt(2), and a pick at the edge of the rates measured steps out by one more x sqrt(2) (at most
    `extensions` times), so that an optimum that moved with the regime is followed, not clipped."""
    missing = [r for r in first if r not in results]
    if missing:
        return missing
    if len(first) == 1:
        return _walk_from(results, first[0], extensions)
    x2 = {r: v for r, v in results.items() if on_x2_grid(r, first[0])}
    if len(x2) < len(results):
        return []
    best, edge = pick_lr(x2)
    outside = sum(not min(first) <= r <= max(first) for r in x2)
    if edge and outside < extensions:
        return [best / 2 if edge == "low" else best * 2]
    return [best / SQRT2, best * SQRT2]


def _walk_from(results: dict[float, list[float]], start: float, extensions: int) -> list[float]:
    """next_lr_points for a grid of one point: its two x sqrt(2) neighbours, then one step further out by
    x sqrt(2) while the pick is at the edge of the rates measured, at most `extensions` steps."""
    neighbours = [r for r in (start / SQRT2, start * SQRT2) if r not in results]
    if neighbours:
        return neighbours
    best, edge = pick_lr(results)
    if edge and len(results) - 3 < extensions:
        return [best / SQRT2 if edge == "low" else best * SQRT2]
    return []


def decay_at(lr: float, lr0: float, wd0: float) -> float:
    """The decay coefficient that keeps the integrated decay, sum_t lr_t x wd, at the preset's (lr0, wd0)
    when the rate is lr: wd0 x lr0 / lr (the decay is applied as lr x wd)."""
    return wd0 * lr0 / lr


def fit_curve(budgets: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Least squares loss = c0 + c1 x + c2 x^2, x = ln(budget), on [..., k] column means -> [..., 3].

    budgets [k] (distinct); losses [..., k]. The fit of all runs of a seeds x budgets table equals the
    fit of its column means, so leading axes can be bootstrap replicates. Degree 2 because a loss
    curve is convex in log-steps (a line through 0.6-1.0 N misreads power laws by 2-3%); with 3 budgets it
    interpolates the means; with 2 budgets it is a line (c2 = 0)."""
    x = np.log(np.asarray(budgets, dtype=np.float64))
    degree = min(2, len(x) - 1)
    design = np.stack([x**d for d in range(degree + 1)], axis=1)  # [k, degree + 1]
    coef = np.asarray(losses, dtype=np.float64) @ np.linalg.pinv(design).T
    if degree < 2:
        coef = np.concatenate([coef, np.zeros(coef.shape[:-1] + (2 - degree,))], axis=-1)
    return coef


def curve_at(coef: np.ndarray, budget: float) -> np.ndarray:
    x = math.log(budget)
    return coef[..., 0] + coef[..., 1] * x + coef[..., 2] * x * x


def curve_slope(coef: np.ndarray, budget: float) -> np.ndarray:
    """dL / d ln(budget) of the fitted curve at budget: [..., 3] -> [...]."""
    return coef[..., 1] + 2 * coef[..., 2] * math.log(budget)


def log_crossing(coef: np.ndarray, target: np.ndarray) -> np.ndarray:
    """ln(budget) where the fitted curve falls through target (the root on its falling side), -> [...];
    +inf where it never gets down to it, -inf where it is below it everywhere (a concave curve whose top
    is below). The falling-side root (slope -sqrt(disc) there) is (-c1 - sqrt(disc)) / (2 c2), for a convex
    (c2 > 0) or a concave (c2 < 0) curve; in the form that stays exact as c2 -> 0,
    x = 2 (c0 - T) / (-c1 + sqrt(c1^2 - 4 c2 (c0 - T)))."""
    c0, c1, c2 = coef[..., 0] - np.asarray(target), coef[..., 1], coef[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = c1 * c1 - 4 * c2 * c0
        denom = -c1 + np.sqrt(np.where(disc >= 0, disc, np.nan))
        ok = np.abs(denom) > 1e-12  # 0 only for a rising line (c2 = 0, c1 >= 0): no falling side
        x = np.where(ok, 2 * c0 / np.where(ok, denom, 1.0), np.nan)
    return np.where(np.isfinite(x), x, np.where((disc < 0) & (c2 < 0), -np.inf, np.inf))


def next_budget(budgets: Sequence[int], means: np.ndarray, target: float, budget_n: int,
                extra: Sequence[float] = EXTRA_BUDGETS) -> int | None:
    """A budget beyond the measured ones for a variant whose fit (of its mean final losses [k] at budgets
    [k]) does not fall through the target within them: the first of extra x N above the largest measured
    budget; None when the fit crosses inside (or before) them, or when extra is used up."""
    x = float(log_crossing(fit_curve(np.asarray(budgets, np.float64), means), target))
    if x <= math.log(max(budgets)) + 1e-9:
        return None
    return next((b for f in extra if (b := round(f * budget_n)) > max(budgets)), None)


@dataclass
class Curve:
    """One side's confirmation runs: final losses [s, k] of the seeds [s] that finished every budget [k]."""

    budgets: np.ndarray  # [k] steps, ascending
    seeds: list[int]
    losses: np.ndarray  # [s, k]


@dataclass
class Grid:
    """One side's learning-rate search at budget N: final losses [g, s] of the rates [g] on the grid seeds
    [s] (the same seeds at every rate; nan: no finished run, inf: diverged) and the index of the pick."""

    rates: np.ndarray  # [g]
    losses: np.ndarray  # [g, s]
    picked: int


def _inflate(rows: np.ndarray) -> np.ndarray:
    """Rows moved away from their mean by sqrt(n / (n - 1)), so that the bootstrap variance of their
    mean is s^2 / n (the plain bootstrap gives (n - 1) / n of that: 20% short at 5 seeds)."""
    n = len(rows)
    return rows if n < 2 else rows.mean(0) + math.sqrt(n / (n - 1)) * (rows - rows.mean(0))


def resample_means(variant: Curve, base: Curve, reps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap column means of both sides: (variant [reps, k_v], baseline [reps, k_b]). A seed that both
    sides ran is drawn as a pair (variant seed s with baseline seed s: the same data order); the seeds of
    one side only are drawn on their own. Each group of rows is inflated as in _inflate."""
    row_v, row_b = {s: i for i, s in enumerate(variant.seeds)}, {s: i for i, s in enumerate(base.seeds)}
    paired = [s for s in variant.seeds if s in row_b]
    only_v, only_b = [s for s in variant.seeds if s not in row_b], [s for s in base.seeds if s not in row_v]
    sum_v, sum_b = np.zeros((reps, variant.losses.shape[1])), np.zeros((reps, base.losses.shape[1]))

    def drawn(c: Curve, rows: dict[int, int], seeds: list[int], idx: np.ndarray) -> np.ndarray:
        return _inflate(c.losses[[rows[s] for s in seeds]])[idx].sum(1)  # [reps, k]

    if paired:
        idx = rng.integers(0, len(paired), (reps, len(paired)))
        sum_v += drawn(variant, row_v, paired, idx)
        sum_b += drawn(base, row_b, paired, idx)
    if only_v:
        sum_v += drawn(variant, row_v, only_v, rng.integers(0, len(only_v), (reps, len(only_v))))
    if only_b:
        sum_b += drawn(base, row_b, only_b, rng.integers(0, len(only_b), (reps, len(only_b))))
    return sum_v / len(variant.seeds), sum_b / len(base.seeds)


def grid_means(losses: np.ndarray) -> np.ndarray:
    """Mean over the last axis of final losses [..., s], skipping nan (no finished run) -> [...]; inf where
    no run finished or one diverged (inf)."""
    done = ~np.isnan(losses)
    count = done.sum(-1)
    with np.errstate(invalid="ignore"):
        mean = np.where(done, losses, 0.0).sum(-1) / np.maximum(count, 1)
    return np.where(count > 0, mean, np.inf)


def pick_costs(grid: Grid, slope: float, reps: int, rng: np.random.Generator) -> np.ndarray:
    """The tuning's noise, as bootstrap replicates [reps] of ln(budget): each replicate resamples the grid
    seeds (a seed's runs at every rate together), re-picks the rate of the lowest resampled mean, and
    costs that pick what the full data's grid means say it costs at budget N, G(pick*) - G(pick) >= 0,
    over -slope (dL / d ln budget of the side's fit at N, < 0) to turn loss at N into ln budget."""
    full = grid_means(grid.losses)
    idx = rng.integers(0, grid.losses.shape[1], (reps, grid.losses.shape[1]))
    again = grid_means(grid.losses[:, idx])  # [g, reps]
    with np.errstate(invalid="ignore"):
        return (full[np.argmin(again, axis=0)] - full[grid.picked]) / -slope


@dataclass
class Speed:
    """A variant against the baseline: its budget to the target (steps), the ratio to the baseline's, the
    CI and the two-sided p of ratio = 1 (tuning noise included where grids were given), the target,
    whether the crossing lies outside the measured budgets, the seed pairs and the pick's share."""

    budget: float
    ratio: float
    ci_low: float
    ci_high: float
    p_value: float
    target: float
    extrapolated: bool
    pairs: int = 0
    pick_sd: float = 0.0  # std of the pick costs' difference (ln budget): the tuning's noise in the CI


def interval(ln_r: float, boot: np.ndarray, df: int, level: float) -> tuple[float, float, float]:
    """(CI low, CI high, two-sided p of ratio = 1) from ln ratio and its bootstrap replicates [reps].
    ln_r +- t(level, df) x the replicates' standard deviation, p from the same t statistic; when more than
    10% of the replicates are not finite (never cross), the replicates' percentiles (those at +-inf) and the
    share of replicates on the far side of 0, doubled."""
    from scipy import stats as scipy_stats

    finite = boot[np.isfinite(boot)]
    if len(finite) < 0.9 * len(boot) or not math.isfinite(ln_r):
        boot = np.where(np.isnan(boot), np.inf, boot)
        tail = 100 * (1 - level) / 2
        low, high = np.exp(np.percentile(boot, [tail, 100 - tail], method="lower"))
        return float(low), float(high), min(1.0, 2 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    sd = float(finite.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df)) * sd
    p = float(2 * scipy_stats.t.sf(abs(ln_r) / sd, df)) if sd > 0 else float(ln_r == 0)
    return math.exp(ln_r - half), math.exp(ln_r + half), p


def budget_ratio(variant: Curve, base: Curve, budget_n: int, variant_grid: Grid | None = None,
                 base_grid: Grid | None = None, reps: int = BOOTSTRAP_REPS, seed: int = 0,
                 level: float = 1 - ALPHA) -> Speed:
    """Budget-to-target ratio of a variant to the baseline with a bootstrap CI that holds the tuning's noise.

    The target is the baseline's mean final loss at budget_n (one of base.budgets). Each side's curve is
    fitted on its own budgets (fit_curve) and read where it falls through the target (log_crossing):
    ln ratio = ln B_variant(T) - ln B_baseline(T). Each of `reps` bootstrap replicates resamples the seeds
    (resample_means: pairs where both sides have the seed) and recomputes the target, both fits and the ln
    ratio, then adds the variant's pick cost and subtracts the baseline's (pick_costs on each side's grid,
    with that side's slope at N; a side without a grid adds nothing). CI and p: interval, with df = pairs - 1
    (paired) or s + s' - 2. extrapolated: a crossing outside the side's measured budgets (no verdict)."""
    n_col = int(np.flatnonzero(base.budgets == budget_n)[0])
    target = float(base.losses[:, n_col].mean())
    cv, cb = fit_curve(variant.budgets, variant.losses.mean(0)), fit_curve(base.budgets, base.losses.mean(0))
    xv, xb = float(log_crossing(cv, target)), float(log_crossing(cb, target))
    ln_r = xv - xb if math.isfinite(xb) else math.nan
    rng = np.random.default_rng(seed)
    tv, tb = resample_means(variant, base, reps, rng)
    with np.errstate(invalid="ignore"):
        boot = (log_crossing(fit_curve(variant.budgets, tv), tb[:, n_col])
                - log_crossing(fit_curve(base.budgets, tb), tb[:, n_col]))
    # loss at N -> ln budget: each side's slope at N (the other's where a fit does not fall there)
    slope_v, slope_b = float(curve_slope(cv, budget_n)), float(curve_slope(cb, budget_n))
    slope_v, slope_b = (slope_v if slope_v < 0 else slope_b), (slope_b if slope_b < 0 else slope_v)
    pick = np.zeros(reps)
    if variant_grid is not None and slope_v < 0:
        pick += pick_costs(variant_grid, slope_v, reps, rng)
    if base_grid is not None and slope_b < 0:
        pick -= pick_costs(base_grid, slope_b, reps, rng)
    with np.errstate(invalid="ignore"):
        boot = boot + pick
    pick_sd = float(np.std(pick[np.isfinite(pick)], ddof=1)) if np.isfinite(pick).sum() > 1 else 0.0
    pairs = len(set(variant.seeds) & set(base.seeds))
    df = max(1, min(len(variant.seeds), len(base.seeds)) - 1 if pairs else len(variant.seeds) + len(base.seeds) - 2)
    low, high, p = interval(ln_r, boot, df, level)
    inside = [math.log(c.budgets[0]) - 1e-9 <= x <= math.log(c.budgets[-1]) + 1e-9
              for x, c in ((xv, variant), (xb, base))]
    return Speed(math.exp(xv), math.exp(ln_r) if not math.isnan(ln_r) else math.nan, low, high, p, target,
                 not all(inside), pairs, pick_sd)


# ----------------------------------------------------------------------------- plan


@dataclass
class Variant:
    """A benchmarked variant: its name, script, the rate it tunes and the script's value of it, its seeds."""

    name: str
    script: Path
    lr_field: str
    lr_declared: float
    seeds: list[int]  # confirmation seeds
    grid_seeds: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # matrices whose rate is tuned ([]: lr_field, every matrix)
    decay: tuple[str, float] | None = None  # (decay field, the preset's value): held at the preset's integral
    extra: list[str] = field(default_factory=list)  # SCALE_SETTINGS the script has
    key: str = ""  # the run id's hash of what is not in the command: code, data, torch, threads
    control: str = ""  # the manifest's control of this variant: its verdict is also given against that one

    @property
    def tuned(self) -> str:
        """What its tuning moves: 'all: <field>' or the groups."""
        return ",".join(self.groups) if self.groups else f"all: {self.lr_field}"


@dataclass
class BenchRun:
    """One training run: what it is for ('grid' or 'main'), its variant, seed, budget, tuned rate, the
    settings the bench gives it (rate, decay, group multipliers) and its Point."""

    role: str
    variant: str
    seed: int
    steps: int
    lr: float
    point: Point
    settings: dict[str, str] = field(default_factory=dict)


def manifest(root: Path) -> dict[str, dict]:
    """{variant: {"lr": field, "groups": [...], "settings": ["--k=v", ...]}} from the optional `lr = "<field>"`,
    `groups = [...]` and `settings = {k = v}` keys of patches/variants.toml (checked: a one-line SystemExit
    names what is wrong)."""
    path = root / "patches" / "variants.toml"
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SystemExit(f"tools/bench: cannot read {path}: {err}".replace("\n", " ")) from None
    out = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            continue
        entry = {}
        if "lr" in table:
            if not isinstance(table["lr"], str):
                raise SystemExit(f"tools/bench: {path}: [{name}] lr must be a setting name, e.g. lr = \"muon_lr\"")
            entry["lr"] = table["lr"]
        if "groups" in table:
            groups = table["groups"]
            if (not isinstance(groups, list) or not groups or len(set(groups)) < len(groups)
                    or not all(g in MATRIX_GROUPS for g in groups)):
                raise SystemExit(f"tools/bench: {path}: [{name}] groups must list distinct matrix groups of "
                                 f"{', '.join(MATRIX_GROUPS)}, e.g. groups = [\"q\", \"k\", \"v\"]")
            if entry.get("lr", DEFAULT_LR_FIELD) != DEFAULT_LR_FIELD:
                raise SystemExit(f"tools/bench: {path}: [{name}] groups tune Muon's rate: they need lr = "
                                 f"\"{DEFAULT_LR_FIELD}\" (or no lr key)")
            entry["groups"] = list(groups)
        if "control" in table:  # the variant that isolates this one's side effect (e.g. its norm_matched control)
            if not isinstance(table["control"], str) or table["control"] == name or table["control"] not in data:
                raise SystemExit(f"tools/bench: {path}: [{name}] control must name another entry of the manifest, "
                                 f"e.g. control = \"norm_matched_{name}\"")
            entry["control"] = table["control"]
        if "settings" in table:  # fixed settings of this variant alone, passed to each of its runs
            try:
                entry["settings"] = variants.settings_args(table["settings"], name, path)
            except variants.VariantError as err:
                raise SystemExit(f"tools/bench: {err}") from None
        if entry:
            out[name] = entry
    return out


def declared_lrs(root: Path) -> dict[str, str]:
    """{variant: lr field} of the variants that declare one."""
    return {name: e["lr"] for name, e in manifest(root).items() if "lr" in e}


_MODULES: dict[Path, object] = {}


def script_settings(script: Path, extra: Sequence[str] = ()):
    """The script's Hyperparameters with the bench preset and `extra` applied (importing a script runs
    nothing); settings the script refuses (its parse_args) are a one-line SystemExit."""
    if script not in _MODULES:
        try:
            spec = importlib.util.spec_from_file_location(f"_bench_{script.stem}", script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as err:
            raise SystemExit(f"tools/bench: cannot load {script} ({type(err).__name__}: {err})") from None
        if PRESET not in getattr(module, "PRESETS", {}):
            raise SystemExit(f"tools/bench: {script.name} has no --preset={PRESET}; regenerate the variants "
                             "with tools/apply_patch --all")
        _MODULES[script] = module
    try:
        return _MODULES[script].parse_args([f"--preset={PRESET}", *extra])
    except SystemExit as err:
        raise SystemExit(f"tools/bench: {script.name} refuses --preset={PRESET} {' '.join(extra)}".rstrip()
                         + f": {str(err.code).removeprefix('error: ')}") from None


_FILE_SHA: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: each file hashed once


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_SHA:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_SHA[key] = digest.hexdigest()
    return _FILE_SHA[key]


def data_sha256(settings, root: Path) -> str:
    """sha256 over the train and val shards a run with these settings reads (their patterns, taken from the
    repository root, where the runs start; '' for a script without such settings)."""
    lines = []
    for name in ("train_files", "val_files"):
        pattern = getattr(settings, name, "")
        for path in sorted(glob.glob(str(root / pattern))) if pattern else ():
            lines.append(f"{name} {Path(path).name} {file_sha256(Path(path))}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest() if lines else ""


def torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(script: Path, data_sha: str) -> str:
    """What a run's id hashes besides its command: the script's code, its data, torch's version, the threads."""
    parts = [script_sha(script), data_sha, torch_version(), threads()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# Ask for these by name: echo_exact is slow (~2.7x the baseline's step at the bench preset), echo_oracle is a
# diagnostic (its shrinkage reads a large held-out batch every step), the keep_norm entries are issue 22's readings.
NOT_BY_DEFAULT = {"echo_exact", "echo_oracle", "echo_keep_norm", "echo_exact_keep_norm", "echo_oracle_keep_norm"}


def default_variants(root: Path) -> list[str]:
    """baseline, adamw, polar_normuon_cwd and the echo* variants whose script exists and that declare lr
    (but NOT_BY_DEFAULT)."""
    lrs = declared_lrs(root)
    echo = sorted(v for v in lrs if v.startswith("echo") and v not in NOT_BY_DEFAULT
                  and variants.script_path(v, root).exists())
    return DEFAULT_VARIANTS + echo


def make_variant(name: str, root: Path, seeds: list[int], extra: Sequence[str] = (),
                 grid_seeds: Sequence[int] = ()) -> Variant:
    """The variant (checked: its script exists, has its lr setting, its groups' setting where it declares
    groups, and accepts the extra settings). The control is the baseline's script under its own name."""
    base_name = "baseline" if name == CONTROL else name
    script = variants.script_path(base_name, root)
    if not script.exists():
        raise SystemExit(f"tools/bench: no script for variant {name!r} ({script.relative_to(root)}); "
                         f"make it with tools/apply_patch --all")
    entry = manifest(root).get(base_name, {})
    lr_field, groups = entry.get("lr", DEFAULT_LR_FIELD), entry.get("groups", [])
    settings = script_settings(script)
    decay_field = DECAY_FIELDS.get(lr_field)
    decay = (decay_field, float(getattr(settings, decay_field))) \
        if decay_field and hasattr(settings, decay_field) else None
    ours = (*BENCH_SETS, lr_field, *([decay[0]] if decay else []),
            *([DEFAULT_LR_FIELD, GROUP_SETTING] if groups else []))
    own = [a.partition("=")[0] for a in extra if a[2:].partition("=")[0] in ours]
    if own:
        raise SystemExit(f"tools/bench: {own[0]} is set by the bench for every run of {name} (budgets: --steps, "
                         "--budgets; seeds: --seeds; the learning rate is tuned, its decay held at the preset's "
                         "integral); leave it out")
    fixed = entry.get("settings", [])
    settings = script_settings(script, [*fixed, *extra])
    if not hasattr(settings, lr_field):
        raise SystemExit(f"tools/bench: {script.name} has no setting {lr_field!r} (the lr declared for "
                         f"[{base_name}] in patches/variants.toml)")
    if groups and not hasattr(settings, GROUP_SETTING):
        raise SystemExit(f"tools/bench: {script.name} has no setting {GROUP_SETTING!r}, which the groups of "
                         f"[{base_name}] in patches/variants.toml need; regenerate it with tools/apply_patch --all")
    scale = [f"--{k}={v}" for k, v in SCALE_SETTINGS.items() if hasattr(settings, k)] + fixed
    return Variant(name, script, lr_field, float(getattr(settings, lr_field)), list(seeds), list(grid_seeds),
                   list(groups), decay, scale, cache_key(script, data_sha256(settings, root)),
                   "" if name == CONTROL else entry.get("control", ""))


def fmt_lr(lr: float) -> str:
    return f"{lr:.6g}"


def run_settings(v: Variant, rate: float, base_lr: float) -> dict[str, str]:
    """The settings the bench gives a run of v at the tuned rate: its lr field (with groups: the baseline's
    tuned muon_lr and the groups' multipliers rate / base_lr), and the decay that holds the preset's
    integrated decay at that muon_lr."""
    if v.groups:
        mult = fmt_lr(rate / base_lr)
        out, lr = {DEFAULT_LR_FIELD: fmt_lr(base_lr), GROUP_SETTING: ",".join(f"{g}={mult}" for g in v.groups)}, base_lr
    else:
        out, lr = {v.lr_field: fmt_lr(rate)}, rate
    if v.decay:
        out[v.decay[0]] = fmt_lr(decay_at(lr, v.lr_declared, v.decay[1]))
    return out


def make_run(role: str, v: Variant, seed: int, steps: int, lr: float, base_args: list[str], out: Path,
             base_lr: float | None = None) -> BenchRun:
    """A run of variant v at rate lr (with groups: the groups' rate next to the baseline's base_lr): the
    command, its deterministic run id (hashing command, code, data, torch and threads: cache_key) and paths."""
    every = max(1, steps // VALIDATIONS)
    args = [*base_args, *v.extra, f"--num_iterations={steps}", f"--val_loss_every={every}"]
    settings = run_settings(v, lr, lr if base_lr is None else base_lr)
    values = {"seed": str(seed), "steps": str(steps), ("group_lr" if v.groups else v.lr_field): fmt_lr(lr)}
    rest = [f"--{k}={x}" for k, x in settings.items() if k not in values]
    run_id = run_id_for(f"bench-{role}", v.name, values, [*args, *rest], v.key)
    cmd = [*launch_prefix(v.script, 1), f"--run_id={run_id}", f"--log_dir={out / 'logs'}",
           *sweep.overwrite_arg(v.script), *args,  # --overwrite=1: not in the run id, which stays as it was
           f"--seed={seed}", *(f"--{k}={x}" for k, x in settings.items())]
    point = Point(run_id, cmd, out / "logs" / f"{run_id}.txt", out / "stdout" / f"{run_id}.txt", values)
    return BenchRun(role, v.name, seed, steps, lr, point, settings)


# ----------------------------------------------------------------------------- execution


class Progress:
    """One line per finished run: run k of n, variant, seed, budget, result, ETA from the seconds per
    step of the runs finished so far (divided by the number of parallel processes)."""

    def __init__(self, parallel: int):
        self.parallel, self.done, self.total = parallel, 0, 0
        self.seconds, self.steps, self.pending_steps = 0.0, 0, 0
        self.lock = threading.Lock()

    def add(self, runs: list[BenchRun]) -> None:
        self.total += len(runs)
        self.pending_steps += sum(r.steps for r in runs)

    def finish(self, r: BenchRun, elapsed: float) -> None:
        with self.lock:
            self.done += 1
            self.pending_steps -= r.steps
            if r.point.status == "done":
                self.seconds += elapsed
                self.steps += r.steps
            if self.steps:
                eta_s = self.pending_steps * self.seconds / self.steps / self.parallel
                eta = f"ETA {int(eta_s // 60)} min {int(eta_s % 60):02d} s"
            else:
                eta = "ETA unknown"
            result = (f"final {r.point.run.final_val_loss:.4f} in {elapsed:.0f} s" if r.point.run is not None
                      else r.point.status)
            print(f"run {self.done}/{self.total}: {r.variant} ({r.role}) seed {r.seed} budget {r.steps} "
                  f"lr {fmt_lr(r.lr)}: {result}; {eta}", flush=True)


JOURNAL_COLUMNS = ("run_id", "variant", "role", "seed", "budget", "lr", "final_val_loss", "train_time_s")


class Journal:
    """Finished runs kept in CSV files by run id, so a later sitting (a fresh clone, OUT lost) reruns nothing.

    A file is read when it has the columns run_id and final_val_loss (a journal, bench_runs.csv,
    ladder_runs.csv); a row with an empty final_val_loss (a run that failed or did not run) is skipped. The run
    id hashes the command, the script's code, the data, torch's version and the thread count (cache_key), so a
    row found under a run's id is that run's result: the CPU path is deterministic, and the bench reads nothing
    of a run but its final val loss and time. `path` (or None): the journal this bench appends each newly
    finished run to (rewritten atomically after each run; it is also read)."""

    def __init__(self, sources: Sequence[Path] = (), path: Path | None = None):
        self.path, self.rows, self.lock = path, {}, threading.Lock()
        for src in [*sources, *([path] if path is not None else [])]:
            self.rows |= self.read(src)

    @staticmethod
    def read(src: Path) -> dict[str, dict[str, str]]:
        """{run_id: row} of the finished runs in src (nothing when src does not exist), or a one-line SystemExit."""
        if not src.exists():
            return {}
        try:
            with open(src, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            _refuse(f"cannot read the run journal {src}: {err}")
        if rows and not {"run_id", "final_val_loss"} <= set(rows[0]):
            _refuse(f"{src} is not a run journal: it has no run_id and final_val_loss columns (give a journal, "
                    "a bench_runs.csv or a ladder_runs.csv)")
        kept = {}
        for i, row in enumerate(rows, start=2):
            if not row.get("run_id") or not row.get("final_val_loss"):
                continue
            try:
                float(row["final_val_loss"]), float(row.get("train_time_s") or 0)
            except ValueError:
                _refuse(f"{src} line {i}: final_val_loss {row['final_val_loss']!r} or train_time_s "
                        f"{row.get('train_time_s')!r} is not a number; fix or delete that row")
            kept[row["run_id"]] = row
        return kept

    def run(self, r: BenchRun) -> Run | None:
        """The journal's result for r as a finished run of r.steps steps, or None."""
        row = self.rows.get(r.point.run_id)
        if row is None:
            return None
        t_ms = float(row.get("train_time_s") or 0) * 1000.0
        return Run(num_iterations=r.steps, last_step=r.steps, train_time_ms=t_ms,
                   validations=[Validation(r.steps, float(row["final_val_loss"]), t_ms)])

    def add(self, r: BenchRun) -> None:
        """Keep r's result (a finished run) and rewrite the journal file, if this bench keeps one."""
        if self.path is None or r.point.run is None:
            return
        run = r.point.run
        row = {"run_id": r.point.run_id, "variant": r.variant, "role": r.role, "seed": str(r.seed),
               "budget": str(r.steps), "lr": fmt_lr(r.lr), "final_val_loss": f"{run.final_val_loss:.6f}",
               "train_time_s": f"{run.train_time_s:.1f}"}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.parent / f".{self.path.name}.lock"  # another bench or ladder may share the journal
        with self.lock, open(lock, "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # read, add, replace: no writer's row is lost
            self.rows[r.point.run_id] = row
            mine = [{c: x.get(c, "") for c in JOURNAL_COLUMNS} for x in self.read(self.path).values()]
            write_csv(self.path, [x for x in mine if x["run_id"] != row["run_id"]] + [row])


def execute(runs: list[BenchRun], root: Path, parallel: int, runner: Runner, progress: Progress,
            report_only: bool = False, journal: Journal | None = None) -> None:
    """Run those runs whose log holds no finished run and whose id the journal does not hold, `parallel` at a
    time; cached and journalled ones are counted done. report_only: run nothing, mark the missing runs 'not run'."""
    todo, reused = [], 0
    for r in runs:
        r.point.run = finished_run(r.point.log_path)
        r.point.status = "cached" if r.point.run is not None else "pending"
        if r.point.run is None and journal is not None:
            r.point.run = journal.run(r)
            if r.point.run is not None:
                r.point.status, reused = "journal", reused + 1
        if r.point.run is None:
            todo.append(r)
    cached = len(runs) - len(todo) - reused
    if report_only:
        for r in todo:
            r.point.status = "not run"
        return
    if cached:
        print(f"{cached} run(s) already finished in {root if not runs else runs[0].point.log_path.parent}: reused",
              flush=True)
    if reused:
        print(f"{reused} run(s) found in the run journal by run id: reused", flush=True)
    progress.add(todo)
    # the real runner gets the run's lock fd (the training inherits it); a test's fake runner takes none
    launch = runner if runner is subprocess_runner else lambda cmd, cwd, out, fd: runner(cmd, cwd, out)

    def work(r: BenchRun) -> None:
        if CHILDREN.signum is not None:  # stopping: start nothing more
            return
        with sweep.point_lock(r.point) as fd:  # an interrupted run's partial log is moved aside: it is rerun
            if fd is None:
                r.point.status = "not run"
                print(f"tools/bench: {r.point.run_id} not run: another process holds {sweep.lock_path(r.point)}",
                      flush=True)
                return
            started = time.monotonic()
            rc = launch(r.point.cmd, root, r.point.stdout_path, fd)
        r.point.run = finished_run(r.point.log_path)
        r.point.status = "done" if r.point.run is not None else f"FAILED (exit {rc}; see {r.point.stdout_path})"
        if journal is not None:
            journal.add(r)
        progress.finish(r, time.monotonic() - started)

    if parallel <= 1:
        for r in todo:
            work(r)
    else:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(work, todo))
    if CHILDREN.signum is not None:
        print("tools/bench: stopped; the same command resumes (finished runs are reused); --report prints "
              "the table of the runs finished so far", flush=True)
        raise Interrupted(CHILDREN.signum)


def final_loss(r: BenchRun) -> float:
    """The run's final val loss; inf for a run that diverged (a non-finite loss) or FAILED (a grid run that
    crashed counts against its rate); nan when it has not run."""
    if r.point.run is not None:
        loss = r.point.run.final_val_loss
        return loss if math.isfinite(loss) else math.inf
    return math.inf if r.point.status.startswith("FAILED") else math.nan


@dataclass
class Context:
    """Where and how the runs of one bench are made, and all its runs so far."""

    out: Path
    root: Path
    base_args: list[str]
    budget_n: int
    parallel: int
    runner: Runner
    progress: Progress
    report_only: bool
    journal: Journal | None = None
    runs: list[BenchRun] = field(default_factory=list)

    def make(self, role: str, v: Variant, seed: int, steps: int, lr: float, base_lr: float) -> BenchRun:
        return make_run(role, v, seed, steps, lr, self.base_args, self.out, base_lr)

    def execute(self, runs: list[BenchRun]) -> None:
        execute(runs, self.root, self.parallel, self.runner, self.progress, self.report_only, self.journal)
        self.runs += runs


@dataclass
class Tuned:
    """A variant's rate: the pick, '' | 'low' | 'high' when it is the edge of the rates measured, the grid's
    final losses {rate: losses} and the same as a Grid for the bootstrap (None: not tuned, --quick)."""

    lr: float
    edge: str = ""
    results: dict[float, list[float]] = field(default_factory=dict)
    grid: Grid | None = None


def tuned_from(results: dict[float, list[float]], runs: list[BenchRun], grid_seeds: list[int]) -> Tuned:
    best, edge = pick_lr(results)
    rates = sorted(results)
    losses = np.full((len(rates), len(grid_seeds)), np.nan)
    for r in runs:
        losses[rates.index(r.lr), grid_seeds.index(r.seed)] = final_loss(r)
    return Tuned(best, edge, results, Grid(np.array(rates), losses, rates.index(best)))


def tune(vs: list[Variant], ctx: Context, lr_points: int, base_lr: float) -> dict[str, Tuned]:
    """The learning-rate searches (next_lr_points) of vs at budget N on their grid seeds, a round at a time,
    the runs of one round of every variant together. base_lr: the baseline's tuned muon_lr (for groups)."""
    first = {v.name: lr_grid(base_lr if v.groups else v.lr_declared, lr_points) for v in vs}
    results: dict[str, dict[float, list[float]]] = {v.name: {} for v in vs}
    made: dict[str, list[BenchRun]] = {v.name: [] for v in vs}
    tuned, active = {}, list(vs)
    while active:
        todo = []
        for v in list(active):
            try:
                rates = next_lr_points(results[v.name], first[v.name])
            except ValueError:  # every grid run failed (with --report: none finished yet)
                active.remove(v)
                if not ctx.report_only:
                    _refuse(f"every LR-grid run of {v.name} failed; see {ctx.out / 'stdout'}")
                continue
            if not rates:
                active.remove(v)
                tuned[v.name] = tuned_from(results[v.name], made[v.name], v.grid_seeds)
                continue
            new = [ctx.make("grid", v, s, ctx.budget_n, rate, base_lr) for rate in rates for s in v.grid_seeds]
            made[v.name] += new
            todo += new
        if todo:
            print(f"LR grid: {len(todo)} run(s) at budget {ctx.budget_n}", flush=True)
            ctx.execute(todo)
            for r in todo:
                loss = final_loss(r)
                results[r.variant].setdefault(r.lr, []).extend([] if math.isnan(loss) else [loss])
    return tuned


def curve_of(runs: list[BenchRun], v: Variant, budgets: list[int]) -> Curve | None:
    """v's confirmation runs as a Curve: the seeds whose every budget finished (None: no such seed)."""
    got = {(r.seed, r.steps): r.point.run.final_val_loss for r in runs
           if r.variant == v.name and r.role == "main" and r.point.run is not None}
    seeds = [s for s in v.seeds if all((s, b) in got for b in budgets)]
    if not seeds:
        return None
    return Curve(np.array(budgets, np.float64), seeds, np.array([[got[(s, b)] for b in budgets] for s in seeds]))


def confirm(vs: list[Variant], ctx: Context, rates: dict[str, float], base_lr: float, budgets: list[int],
            seeds: int, beyond_n: bool) -> dict[str, list[int]]:
    """The confirmation runs at the tuned rates: budgets x seeds (seed-major: a run stopped part-way leaves
    every variant with about as many complete seeds), then, with beyond_n, EXTRA_BUDGETS x N for each
    variant whose fit does not fall through the target within its budgets (next_budget), a round at a time.
    -> {variant: its budgets}."""
    plan = {v.name: list(budgets) for v in vs}
    runs = [ctx.make("main", v, v.seeds[i], b, rates[v.name], base_lr)
            for i in range(seeds) for v in vs for b in budgets]
    print(f"main: {len(runs)} run(s): {len(vs)} variant(s) x budgets {budgets} x {seeds} seeds", flush=True)
    ctx.execute(runs)
    base = next(v for v in vs if v.name == "baseline")
    while beyond_n:
        base_curve = curve_of(ctx.runs, base, plan["baseline"])
        if base_curve is None:
            break
        target = float(base_curve.losses[:, plan["baseline"].index(ctx.budget_n)].mean())
        more = []
        for v in vs:
            curve = curve_of(ctx.runs, v, plan[v.name]) if v is not base else None
            b = None if curve is None else next_budget(plan[v.name], curve.losses.mean(0), target, ctx.budget_n)
            if b is not None:
                plan[v.name].append(b)
                more += [ctx.make("main", v, s, b, rates[v.name], base_lr) for s in v.seeds]
        if not more:
            break
        print(f"beyond N: {len(more)} run(s) for variant(s) that do not reach the target "
              f"{target:.4f} within their budgets", flush=True)
        ctx.execute(more)
    return plan


# ----------------------------------------------------------------------------- report


@dataclass
class Result:
    """What the tables say about one variant."""

    variant: Variant
    tuned: Tuned
    budgets: list[int]
    curve: Curve | None  # complete seeds only
    at_n: list[float]  # final losses at N of every finished seed
    base_lr: float  # the baseline's tuned muon_lr (the base of a group variant's multipliers)
    speed: Speed | None = None
    p_holm: float | None = None
    welch_p: float | None = None
    vs_control: Speed | None = None  # against its manifest control, read at that control's loss at N
    p_holm_control: float | None = None
    status: str = "ok"

    @property
    def name(self) -> str:
        return self.variant.name


def verdict(ratio: float, significant: bool, extrapolated: bool) -> str:
    if extrapolated:
        return "none (extrapolated)"
    return ("faster" if ratio < 1 else "slower") if significant else "no difference"


def analyse(results: list[Result], budget_n: int, reps: int) -> None:
    """Each result's speed against the baseline (tuning noise included where both were tuned), Welch's p
    on the final losses at N, and Holm's adjusted p over the variants that are not controls."""
    base = next((r for r in results if r.name == "baseline"), None)
    for r in results:
        if r.curve is None:
            r.status = "no complete seed" if r.status == "ok" else r.status
        if r is base or r.curve is None or base is None or base.curve is None:
            continue
        r.speed = budget_ratio(r.curve, base.curve, budget_n, r.tuned.grid, base.tuned.grid, reps=reps,
                               seed=zlib.crc32(r.name.encode()), level=1 - ALPHA)
        if len(r.at_n) and len(base.at_n):
            r.welch_p = stats.compare_means(r.at_n, base.at_n).p_value
    family = [r for r in results if r.speed is not None and r.name not in CONTROLS]
    for r, p in zip(family, stats.holm([r.speed.p_value for r in family]), strict=True):
        r.p_holm = float(p)
    # Against its control (paired seeds, both tuned): the budget the variant needs to reach the control's mean
    # final loss at N, over N; a family of its own for Holm.
    by = {r.name: r for r in results}
    for r in results:
        c = by.get(r.variant.control)
        if r.curve is not None and c is not None and c.curve is not None and budget_n in c.budgets:
            r.vs_control = budget_ratio(r.curve, c.curve, budget_n, r.tuned.grid, c.tuned.grid, reps=reps,
                                        seed=zlib.crc32(f"{r.name} vs {c.name}".encode()), level=1 - ALPHA)
    against = [r for r in results if r.vs_control is not None]
    for r, p in zip(against, stats.holm([r.vs_control.p_value for r in against]), strict=True):
        r.p_holm_control = float(p)


def verdicts(r: Result) -> tuple[str, str]:
    """(raw, Holm-adjusted): faster, slower, no difference, or none (extrapolated). Raw: the CI excludes 1."""
    s = r.speed
    if s is None:
        return "", ""
    raw = verdict(s.ratio, not s.ci_low <= 1 <= s.ci_high, s.extrapolated)
    if r.name in CONTROLS:
        return raw, "(control: not in the family)"
    return raw, verdict(s.ratio, r.p_holm is not None and r.p_holm < ALPHA, s.extrapolated)


def check_controls(results: list[Result]) -> list[str]:
    """Messages for the failed controls ([] when both pass or were not part of the run)."""
    failed = []
    by = {r.name: r for r in results}
    if POSITIVE_CONTROL in by:
        s = by[POSITIVE_CONTROL].speed
        if s is None or not s.ci_low > 1:
            got = "no result" if s is None else f"ratio {s.ratio:.3f}, CI [{s.ci_low:.3f}, {s.ci_high:.3f}]"
            failed.append(f"POSITIVE CONTROL FAILED: {POSITIVE_CONTROL} is not slower than the baseline with a CI "
                          f"above 1 ({got})")
    if CONTROL in by:
        s = by[CONTROL].speed
        if s is None or s.extrapolated or not s.ci_low <= 1 <= s.ci_high:
            got = "no result" if s is None else f"ratio {s.ratio:.3f}, CI [{s.ci_low:.3f}, {s.ci_high:.3f}]" \
                + (", extrapolated" if s.extrapolated else "")
            failed.append(f"NEGATIVE CONTROL FAILED: the baseline's script, tuned and run on its own seeds, differs "
                          f"from the baseline ({got})")
    return failed


def _f(x: float | None, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def label(r: Result) -> str:
    v = r.variant
    if v.name == CONTROL:
        return f"control (A/A: baseline, seeds {v.seeds[0]}-{v.seeds[-1]})"
    return f"{v.name} (positive control)" if v.name == POSITIVE_CONTROL else v.name


def rate_text(r: Result) -> str:
    """The tuned rate, with the multiplier of a group variant's and a grid-edge warning."""
    text = fmt_lr(r.tuned.lr)
    if r.variant.groups:
        text += f" (x{r.tuned.lr / r.base_lr:.3g} of {fmt_lr(r.base_lr)})"
    return text + (f" (grid {r.tuned.edge} edge)" if r.tuned.edge else "")


def budgets_text(budgets: list[int], budget_n: int) -> str:
    """The budgets measured as fractions of N: '0.6-1.0 x N', '0.6-1.5 x N'."""
    def frac(b: int) -> str:
        f = b / budget_n
        return f"{f:.1f}" if abs(f - round(f, 1)) < 1e-9 else f"{f:.2f}"
    return f"{frac(budgets[0])}-{frac(budgets[-1])} x N"


def result_rows(results: list[Result], budget_n: int, quick: bool) -> list[dict[str, str]]:
    rows = []
    for r in results:
        s = r.speed
        summary = stats.summarize(r.at_n) if r.at_n else None
        raw, adjusted = verdicts(r)
        rows.append({
            "variant": label(r),
            "tuned": r.variant.tuned,
            "rate": rate_text(r),
            "budgets": budgets_text(r.budgets, budget_n),
            "budget to target": "" if s is None else f"{s.budget:.1f}" + (" (extrapolated)" if s.extrapolated else ""),
            "ratio": "1 (reference)" if r.name == "baseline" else "" if s is None else f"{s.ratio:.3f}",
            f"{1 - ALPHA:.0%} CI": "" if s is None or quick else f"[{s.ci_low:.3f}, {s.ci_high:.3f}]",
            "p": "" if s is None or quick else f"{s.p_value:.2g}",
            "p (Holm)": "" if quick else _f(r.p_holm, ".2g"),
            "verdict": "" if quick else raw,
            "verdict (Holm)": "" if quick else adjusted,
            f"final loss at {budget_n} +- std": "" if summary is None else
                f"{summary.mean:.4f} +- {_f(summary.std, '.4f')} (n={summary.n})",
            "vs its control": "" if quick else control_text(r),
            "status": r.status,
        })
    return rows


def control_text(r: Result) -> str:
    """'0.981 [0.95, 1.01] vs norm_matched_x, Holm p 0.4: no difference' (or '' without a control's result)."""
    c = r.vs_control
    if c is None:
        return f"({r.variant.control}: no result)" if r.variant.control else ""
    held = verdict(c.ratio, r.p_holm_control is not None and r.p_holm_control < ALPHA, c.extrapolated)
    return (f"{c.ratio:.3f} [{c.ci_low:.3f}, {c.ci_high:.3f}] vs {r.variant.control}, Holm p "
            f"{_f(r.p_holm_control, '.2g')}: {held}")


def csv_rows(results: list[Result], budget_n: int) -> list[dict[str, str]]:
    rows = []
    for r in results:
        s = r.speed
        summary = stats.summarize(r.at_n) if r.at_n else None
        raw, adjusted = verdicts(r)
        rows.append({
            "variant": r.name, "lr_field": r.variant.lr_field, "tuned_groups": " ".join(r.variant.groups) or "all",
            "tuned_lr": fmt_lr(r.tuned.lr), "base_lr": fmt_lr(r.base_lr), "lr_grid_edge": r.tuned.edge,
            "budgets": " ".join(map(str, r.budgets)),
            "target": _f(s and s.target, ".6f"), "budget_to_target": _f(s and s.budget, ".2f"),
            "extrapolated": "" if s is None else str(s.extrapolated).lower(),
            "ratio": _f(s and s.ratio, ".4f"), "ci_low": _f(s and s.ci_low, ".4f"),
            "ci_high": _f(s and s.ci_high, ".4f"),
            "p_value": _f(s and s.p_value, ".4g"), "p_holm": _f(r.p_holm, ".4g"), "verdict": raw,
            "verdict_holm": adjusted, "seed_pairs": "" if s is None else str(s.pairs),
            "pick_sd_ln": _f(s and s.pick_sd, ".4f"),
            "budget_n": str(budget_n), "final_at_n_mean": _f(summary and summary.mean, ".6f"),
            "final_at_n_std": _f(summary and summary.std, ".6f"), "seeds_at_n": str(summary.n if summary else 0),
            "welch_p": _f(r.welch_p, ".4g"), "control": r.variant.control,
            "ratio_vs_control": _f(r.vs_control and r.vs_control.ratio, ".4f"),
            "ci_low_vs_control": _f(r.vs_control and r.vs_control.ci_low, ".4f"),
            "ci_high_vs_control": _f(r.vs_control and r.vs_control.ci_high, ".4f"),
            "p_vs_control": _f(r.vs_control and r.vs_control.p_value, ".4g"),
            "p_holm_vs_control": _f(r.p_holm_control, ".4g"),
            "extrapolated_vs_control": "" if r.vs_control is None else str(r.vs_control.extrapolated).lower(),
            "status": r.status,
        })
    return rows


def run_rows(runs: list[BenchRun], lr_fields: dict[str, str]) -> list[dict[str, str]]:
    rows = []
    for r in runs:
        run = r.point.run
        rows.append({
            "variant": r.variant, "role": r.role, "seed": str(r.seed), "budget": str(r.steps),
            "lr_field": lr_fields[r.variant], "lr": fmt_lr(r.lr),
            "settings": " ".join(f"--{k}={x}" for k, x in r.settings.items()),
            "final_val_loss": _f(run.final_val_loss if run else None, ".6f"),
            "train_time_s": _f(run.train_time_s if run else None, ".1f"),
            "status": r.point.status, "run_id": r.point.run_id,
        })
    return rows


def grid_rows(results: list[Result]) -> list[dict[str, str]]:
    """The learning-rate grids: per variant and rate, the final loss at N over the grid seeds."""
    rows = []
    for r in results:
        for lr in sorted(r.tuned.results):
            losses = r.tuned.results[lr]
            if not losses or not all(math.isfinite(x) for x in losses):
                loss = f"diverged or failed ({sum(not math.isfinite(x) for x in losses)} of {len(losses)})" \
                    if losses else "no finished run"
            else:
                s = stats.summarize(losses)
                loss = f"{s.mean:.4f} +- {_f(s.std, '.4f')} (n={s.n})"
            rows.append({"variant": label(r), "tuned": r.variant.tuned, "rate": fmt_lr(lr),
                         "final loss at N, mean +- std": loss, "picked": "*" if lr == r.tuned.lr else ""})
    return rows


def curve_runs(main_runs: list[BenchRun], variant: str, budget: int) -> list[Run]:
    """The finished runs of a variant at a budget that carry a validation curve: a run taken from a run journal
    or a reused bench_runs.csv holds only its final loss, and mixed in it would cut the others' curves to that
    one step."""
    return [br.point.run for br in main_runs if br.variant == variant and br.steps == budget
            and br.point.run is not None and len(br.point.run.validations) > 1]


def plot(path: Path, results: list[Result], main_runs: list[BenchRun], budget_n: int) -> None:
    """Left: final loss against budget per variant (seed mean +- std, the fit, the target); right: the
    seed-mean validation curves at budget N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(results) > len(colors):  # more variants than the default cycle: no two may share a colour
        colors = [plt.get_cmap("tab20")(k) for k in range(20)]
    target = next((r.curve.losses[:, r.budgets.index(budget_n)].mean() for r in results
                   if r.name == "baseline" and r.curve is not None), None)
    drawn = False
    for i, r in enumerate(results):
        if r.curve is None:
            continue
        color = colors[i % len(colors)]
        style = "-" if i < len(colors) else "--"
        x, table = r.curve.budgets, r.curve.losses
        std = table.std(0, ddof=1) if len(table) > 1 else np.zeros(len(x))
        left.errorbar(x, table.mean(0), yerr=std, fmt="o", color=color, capsize=3, label=label(r))
        coef = fit_curve(x, table.mean(0))
        xs = np.geomspace(x.min(), x.max(), 50)
        left.plot(xs, [curve_at(coef, v) for v in xs], color=color, ls=style, lw=1, alpha=0.7)
        runs = curve_runs(main_runs, r.name, budget_n)
        if runs:
            c = group_curve(runs)
            right.plot(c.steps, c.mean_loss, color=color, ls=style, label=f"{label(r)} ({len(runs)} seeds)")
            drawn = True
    if target is not None:
        left.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.4f}")
    left.set_xscale("log")
    left.set_xlabel("step budget (a complete run each)")
    left.set_ylabel("final val loss (nats/token)")
    left.set_title("final loss against budget (seed mean +- std, fit)")
    left.legend(fontsize=8)
    right.set_xlabel("step")
    right.set_ylabel("val loss (nats/token)")
    right.set_title(f"seed-mean validation curves at budget {budget_n}")
    if drawn:
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no validation curves: every run at this budget came from a\n"
                   "run journal or a reused CSV, which keep final losses only", ha="center", va="center",
                   transform=right.transAxes, fontsize=9)
    lows = [r.curve.losses.min() for r in results if r.curve is not None]
    if lows:
        right.set_ylim(min(lows) - 0.05, min(lows) + 1.0)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def budget_steps(budget_n: int, budget_fracs: Sequence[float]) -> list[int]:
    """The step budgets: each fraction of N rounded (at least 1), sorted, distinct."""
    return sorted({max(1, round(f * budget_n)) for f in budget_fracs})


def run_bench(vs: list[Variant], out: Path, budget_n: int, budget_fracs: tuple[float, ...], seeds: int,
              lr_points: int, parallel: int, extra: list[str], quick: bool, root: Path | None = None,
              runner: Runner = subprocess_runner, reps: int = BOOTSTRAP_REPS, make_plot: bool = True,
              report_only: bool = False, journal: Journal | None = None) -> tuple[list[Result], list[str]]:
    """Run (resumably) and analyse the benchmark of the variants vs (make_variant's, baseline among them,
    with `seeds` confirmation seeds each). -> (results, failed-control messages). report_only: start no run,
    analyse the finished ones (controls are judged only when complete); nothing finished is a SystemExit,
    and nothing is written."""
    root = variants.REPO_ROOT if root is None else root
    out = out.resolve()
    ctx = Context(out, root, [f"--preset={PRESET}", "--checkpoint_every=", *extra], budget_n, parallel, runner,
                  Progress(parallel), report_only, journal)
    budgets = budget_steps(budget_n, budget_fracs)
    base = next(v for v in vs if v.name == "baseline")

    # 1. the rates: the baseline's and those of the variants without groups, then the groups' (on the baseline's)
    if quick:
        base_lr = base.lr_declared
        tuned = {v.name: Tuned(base_lr if v.groups else v.lr_declared) for v in vs}
    else:
        tuned = tune([v for v in vs if not v.groups], ctx, lr_points, base.lr_declared)
        base_lr = tuned["baseline"].lr if "baseline" in tuned else base.lr_declared
        tuned |= tune([v for v in vs if v.groups], ctx, lr_points, base_lr)
        for v in vs:  # --report before a grid has a finished run: the declared rate
            tuned.setdefault(v.name, Tuned(base_lr if v.groups else v.lr_declared))

    # 2. the confirmation runs, beyond N where a variant needs it
    plan = confirm(vs, ctx, {name: t.lr for name, t in tuned.items()}, base_lr, budgets, seeds,
                   beyond_n=not quick and len(budgets) >= 2)
    if report_only and all(r.point.run is None for r in ctx.runs):
        raise SystemExit(f"tools/bench: nothing to report: no finished run of these variants and settings in "
                         f"{out / 'logs'}{' or the run journal' if journal else ''} (under the scripts as they are "
                         "now); run the bench without --report first")

    # 3. analysis
    main_runs = [r for r in ctx.runs if r.role == "main"]
    results = []
    for v in vs:
        mine = [r for r in main_runs if r.variant == v.name]
        at_n = [r.point.run.final_val_loss for r in mine if r.steps == budget_n and r.point.run is not None]
        res = Result(v, tuned[v.name], plan[v.name], curve_of(main_runs, v, plan[v.name]), at_n, base_lr)
        failed, missing = sum(r.point.run is None for r in mine), sum(r.point.status == "not run" for r in mine)
        res.status = "ok" if not failed else f"{failed} run(s) failed"
        if missing:
            res.status = f"{len(mine) - missing} of {len(mine)} runs finished"
        results.append(res)
    if len(budgets) >= 2:
        analyse(results, budget_n, reps)
    incomplete = any(r.point.status == "not run" for r in ctx.runs)
    failed = [] if quick or incomplete else check_controls(results)

    rows = result_rows(results, budget_n, quick)
    text = [format_table(rows, list(rows[0]))]
    grid = grid_rows(results)
    if grid:
        text += ["", f"LR grid at budget N = {budget_n} on the grid seeds (* = picked; a group variant's rate is "
                     f"its groups', the other matrices at the baseline's muon_lr {fmt_lr(base_lr)}):",
                 format_table(grid, list(grid[0]))]
    text.append("")
    base_res = results[vs.index(base)]
    if base_res.curve is not None and budget_n in base_res.budgets:
        target = base_res.curve.losses[:, base_res.budgets.index(budget_n)].mean()
        text.append(f"target: {target:.4f} (the baseline's mean final loss at {budget_n} steps)")
    if base.decay:
        text.append(f"decay: {base.decay[0]} = {base.decay[1]:.6g} x {fmt_lr(base.lr_declared)} / muon_lr with each "
                    f"muon_lr (the preset's integrated decay, held while the rate is tuned)")
    if not quick:
        m = sum(r.p_holm is not None for r in results)
        text.append(f"p: two-sided test of ratio = 1 from the bootstrap (seed pairs resampled, the tuning's noise "
                    f"included); Holm over the {m} variant(s) that are not controls; verdicts: raw = the "
                    f"{1 - ALPHA:.0%} CI excludes 1, Holm = adjusted p < {ALPHA}; an extrapolated crossing gets none")
    if not quick and any(r.vs_control is not None for r in results):
        text.append("vs its control: the variant's budget to reach its control's mean final loss at N, over N (95% CI, "
                    "seeds paired, both tunings' noise included); Holm over those comparisons")
    if quick:
        text.append("--quick: 2 budgets and few seeds, declared learning rates; no CI claims, controls not checked")
    if incomplete:
        text.append(f"--report: {sum(r.point.status == 'not run' for r in ctx.runs)} planned run(s) not finished "
                    "yet: partial figures, controls not checked")
    text += failed
    print("\n".join(text), flush=True)
    atomic_write_text(out / "bench.txt", "\n".join(text) + "\n")
    write_csv(out / "bench.csv", csv_rows(results, budget_n))
    write_csv(out / "bench_runs.csv", run_rows(ctx.runs, {v.name: v.lr_field for v in vs}))
    plotted = make_plot and any(r.curve is not None for r in results)
    if plotted:
        plot(out / "bench.png", results, main_runs, budget_n)
    print(f"wrote {out / 'bench.csv'}, {out / 'bench_runs.csv'}, {out / 'bench.txt'}"
          + (f", {out / 'bench.png'}" if plotted else ""), flush=True)
    return results, failed


def parse_budgets(text: str) -> tuple[float, ...]:
    """--budgets: distinct fractions of N in (0, 1], 1 among them (the target is the baseline's loss at N),
    or a one-line SystemExit."""
    try:
        fracs = tuple(float(x) for x in text.split(","))
    except ValueError:
        fracs = ()
    if not fracs or not all(0 < f <= 1 for f in fracs) or len(set(fracs)) < len(fracs) or 1.0 not in fracs:
        _refuse(f"--budgets={text}: give distinct fractions of N in (0, 1], 1 among them, e.g. 0.6,0.8,1.0")
    return fracs


def main(argv: list[str] | None = None, runner: Runner = subprocess_runner, root: Path | None = None) -> None:
    parser = make_parser("tools/bench", __doc__)
    parser.error = lambda message: _refuse(f"{message}; see tools/bench --help")  # one line, not usage + error
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants (default: see above); add 'control' for the A/A control")
    parser.add_argument("--steps", type=int, default=None, help="budget N in steps (default: the bench preset's)")
    parser.add_argument("--budgets", default=None, help="budget fractions of N (default 0.6,0.8,1.0)")
    parser.add_argument("--seeds", type=int, default=None, help=f"confirmation seeds per variant and budget, 2 or "
                        f"more (default {SEEDS})")
    parser.add_argument("--lr-points", type=int, default=LR_POINTS, help=f"x2 LR grid points (default {LR_POINTS})")
    parser.add_argument("--lr-seeds", type=int, default=LR_SEEDS, help=f"seeds per LR grid point (default {LR_SEEDS})")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, one thread each (default 1)")
    parser.add_argument("--quick", action="store_true", help="no LR grid, 2 budgets, 2 seeds, no CI claims (~10 min)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench_out/)")
    parser.add_argument("--report", action="store_true",
                        help="start no run: the table of the runs finished so far (during a run, or after a kill)")
    parser.add_argument("--journal", type=Path, default=None,
                        help="a CSV this bench appends each finished run to and reuses runs from by run id (commit "
                             "it: a later sitting on a fresh clone reruns nothing that is in it)")
    parser.add_argument("--reuse", default="",
                        help="comma-separated CSVs to reuse finished runs from by run id, read only (journals, "
                             "bench_runs.csv, ladder_runs.csv); a run of other code, data, torch or threads has "
                             "another id and is not reused")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        _refuse(f"unexpected {bad[0]!r}; extra training settings go as --field=value")
    for option, value, low in (("--steps", args.steps, 1), ("--seeds", args.seeds, 2),
                               ("--lr-points", args.lr_points, 1), ("--lr-seeds", args.lr_seeds, 1),
                               ("--parallel", args.parallel, 1)):
        if value is not None and value < low:
            _refuse(f"{option}={value}: " + (f"a CI needs at least 2 seeds; leave --seeds out for the default {SEEDS}"
                                              if option == "--seeds" else "give a whole number >= 1"))
    root = variants.REPO_ROOT if root is None else root
    names = [n for n in args.variants.split(",") if n] if args.variants else \
        default_variants(root) + ([] if args.quick else [CONTROL])
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        _refuse(f"--variants lists {', '.join(twice)} twice; give each variant once (more seeds: --seeds; the "
                f"baseline on other seeds: {CONTROL})")
    if "baseline" not in names:
        names = ["baseline", *names]
    declared = manifest(root)
    for n in list(names):  # a variant's declared control runs with it (its verdict is also read against that one)
        control = declared.get(n, {}).get("control")
        if control and control not in names:
            names.append(control)
    budget_fracs = parse_budgets(args.budgets) if args.budgets else (QUICK_BUDGETS if args.quick else BUDGETS)
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else SEEDS)
    out = args.out or root / "bench_out"
    if out.exists() and not out.is_dir():
        _refuse(f"--out {out} is a file; --out must be a folder (a new or an existing one)")
    sources = [Path(x) for x in args.reuse.split(",") if x]
    for src in sources:
        if not src.is_file():
            _refuse(f"--reuse={src}: no such file; give CSVs written by tools/bench or tools/ladder")
    if args.journal is not None and args.journal.exists() and not args.journal.is_file():
        _refuse(f"--journal={args.journal} is not a file; give a CSV path (new or one this option wrote)")
    journal = Journal(sources, args.journal) if sources or args.journal else None
    vs = []
    for n in names:
        control = n == CONTROL
        main_offset, grid_offset = (CONTROL_SEED_OFFSET, CONTROL_GRID_SEED_OFFSET) if control else (0, GRID_SEED_OFFSET)
        vs.append(make_variant(n, root, [main_offset + s for s in range(seeds)], extra,
                               [grid_offset + s for s in range(args.lr_seeds)]))
    budget_n = args.steps if args.steps is not None else \
        script_settings(variants.script_path("baseline", root)).num_iterations
    if len(budget_steps(budget_n, budget_fracs)) < len(budget_fracs):
        _refuse(f"N = {budget_n} steps is too few for budgets {budget_fracs} x N: some round to the same step "
                "count; give a larger --steps or fewer --budgets")
    grid = "no LR grid" if args.quick else \
        f"LR grid of {args.lr_points} x {args.lr_seeds} seed(s), refined at x sqrt(2)"
    print(f"tools/bench: variants {', '.join(names)}; N = {budget_n} steps; budgets {budget_fracs} x N"
          f"{'' if args.quick else f' (up to {EXTRA_BUDGETS[-1]} x N where a variant needs it)'}; {seeds} seeds; "
          f"{grid}; {args.parallel} at a time; out {out}", flush=True)
    started = time.monotonic()
    CHILDREN.reset()
    # --report only reads: it takes no lock (it may run beside the bench that writes OUT)
    with contextlib.nullcontext() if args.report else sweep.holding_out(out, LOCK, "tools/bench"):
        if not args.report:  # the trainings of a killed bench may live on: each holds OUT/logs/ID.lock
            sweep.refuse_if_running(sorted((out / "logs").glob("*.lock")), "tools/bench")
        with forwarding_signals("tools/bench"):  # SIGINT / SIGTERM: passed on to the trainings, then a clean stop
            _, failed = run_bench(vs, out, budget_n, budget_fracs, seeds, args.lr_points, args.parallel, extra,
                                  args.quick, root, runner, report_only=args.report, journal=journal)
    print(f"wall time {time.monotonic() - started:.0f} s", flush=True)
    if failed:
        print("\n" + "!" * 80 + "\n" + "\n".join(failed) + "\n" + "!" * 80, flush=True)
        raise SystemExit(1)
