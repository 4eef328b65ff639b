"""Benchmark optimizer variants fairly on the CPU bench preset: the step budget each needs to reach the baseline's loss.

Example: OMP_NUM_THREADS=1 tools/bench --parallel=2          # the default set, about 60 min on 2 cores

Every run is a complete training run of `--preset=bench` (its own schedule and cooldown) in its own
process at one thread. For each variant the tool
  1. tunes the variant's own learning rate: a x2 grid of --lr-points values around the value the
     script declares, at budget N, --lr-seeds seeds each (seeds 1000, 1001, ...); the lowest mean final
     loss wins; a pick at the edge of the grid adds the next point out (at most twice);
  2. trains it at the tuned rate for each budget fraction (default 0.6, 0.8, 1.0 x N) and seeds 0..S-1;
  3. fits final val loss against ln(budget) (degree 2) over all its runs and reads the budget that
     reaches the target, the baseline's mean final loss at N (a slower variant, which would need its curve
     beyond N, is read on the baseline's curve at the variant's loss at N instead: see log_ratio);
     ratio = that budget / the baseline's, with a 95% bootstrap CI (the seeds of the variant and of the
     baseline resampled, the target with them), and the final loss at N with Welch's p against the baseline.
Controls, in every default run: adamw (positive: slower, CI above 1) and `control`, the baseline on
the disjoint seeds 100..100+S-1 at the baseline's tuned rate (negative: CI includes 1). A failed control
is printed at the end and the command exits with status 1.

Which setting is a variant's learning rate: `lr = "<field>"` in its table of patches/variants.toml
(default muon_lr). Default variants: baseline, adamw, polar_normuon_cwd and every echo* variant whose
script exists and whose table declares lr, but echo_exact (~2.7x the baseline's step at the bench
preset: name it in --variants). Settings of a variant that do not scale down by themselves get bench values when its
script has them (SCALE_SETTINGS; adamw's warm-up is a share of the run and needs none).
Extra `--field=value` options go to every run. Runs are cached by a run id that hashes the command
and the script's code: a rerun (after a kill, or with more seeds) runs only what is missing, and
`--report` reads only runs of the scripts as they are now (after a code change it finds none).
Stopping: SIGINT or SIGTERM is passed on to the running trainings; no further run starts, and the
bench exits (128 + signal) once they have; a second signal kills them. The same command resumes.
Locks: the bench holds OUT/.bench.lock (with its pid) while it runs, so a second bench on OUT refuses;
each training holds OUT/logs/ID.lock while it lives (tools/sweep's), so a bench refuses to start while a
run of a killed bench is still alive. Runs get --overwrite=1 where the script has it (not in the run id).
Outputs in OUT (default bench_out/): bench.csv, bench_runs.csv, bench.png, bench.txt (the table), logs/.
`--quick`: no LR grid (the declared rates), budgets 0.6 and 1.0, 2 seeds, no control verdicts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import threading
import time
import tomllib
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
CONTROL = "control"  # the baseline on disjoint seeds: CI must include 1
CONTROL_SEED_OFFSET = 100
GRID_SEED_OFFSET = 1000
DEFAULT_LR_FIELD = "muon_lr"
BUDGETS = (0.6, 0.8, 1.0)
QUICK_BUDGETS = (0.6, 1.0)
SEEDS, QUICK_SEEDS = 5, 2
LR_POINTS, LR_SEEDS, LR_EXTENSIONS = 4, 1, 2
VALIDATIONS = 4  # validations per run besides step 0, for the curves
BOOTSTRAP_REPS = 2000
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
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return sweep.subprocess_runner(cmd, cwd, stdout_path, lock_fd, env)


# ----------------------------------------------------------------------------- math (pure)


def lr_grid(center: float, points: int = LR_POINTS) -> list[float]:
    """x2 grid of `points` values holding center: center * 2**k, k = -(points // 2) ... (4 -> /4, /2, 1, x2)."""
    low = -(points // 2)
    return [center * 2.0**k for k in range(low, low + points)]


def pick_lr(results: dict[float, list[float]]) -> tuple[float, str]:
    """{lr: final losses} -> (lr of the lowest mean loss, '' | 'low' | 'high': the pick is the grid's edge).
    A rate whose runs all failed (diverged) counts as an infinite loss."""
    means = {lr: math.fsum(v) / len(v) if v else math.inf for lr, v in results.items()}
    if not means or min(means.values()) == math.inf:
        raise ValueError("no finished LR-grid runs to pick from")
    best = min(means, key=means.get)
    lrs = sorted(means)
    edge = "low" if best == lrs[0] and len(lrs) > 1 else "high" if best == lrs[-1] and len(lrs) > 1 else ""
    return best, edge


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


def log_crossing(coef: np.ndarray, target: np.ndarray) -> np.ndarray:
    """ln(budget) where the fitted curve falls through target (the root on its falling side), -> [...];
    +inf where it never does. The falling-side root (slope -sqrt(disc) there) is (-c1 - sqrt(disc)) / (2 c2),
    for a convex (c2 > 0) or a concave (c2 < 0) curve; in the form that stays exact as c2 -> 0,
    x = 2 (c0 - T) / (-c1 + sqrt(c1^2 - 4 c2 (c0 - T)))."""
    c0, c1, c2 = coef[..., 0] - np.asarray(target), coef[..., 1], coef[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = c1 * c1 - 4 * c2 * c0
        denom = -c1 + np.sqrt(np.where(disc >= 0, disc, np.nan))
        ok = np.abs(denom) > 1e-12  # 0 only for a rising line (c2 = 0, c1 >= 0): no falling side
        x = np.where(ok, 2 * c0 / np.where(ok, denom, 1.0), np.nan)
    return np.where(np.isfinite(x), x, np.inf)


@dataclass
class Speed:
    """A variant against the baseline: budget to target (steps), ratio to the baseline's, its CI."""

    budget: float
    ratio: float
    ci_low: float
    ci_high: float
    target: float
    extrapolated: bool


def log_ratio(budgets: np.ndarray, variant: np.ndarray, base: np.ndarray,
              target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ln(budget ratio) of a variant to the baseline from their column means [..., k] -> (ln ratio [...],
    ln of the budget at which the interpolation was read [...], to tell extrapolations).

    A variant at least as fast (its fit at N = budgets[-1] is at or below the target) is read off its own
    fit: ln B_variant(target) - ln B_baseline(target). A slower one would need its fit beyond N, so it is
    read off the baseline's fit instead: ln B_baseline(target) - ln B_baseline(variant's fitted loss at N).
    The two agree when the curves are one curve stretched in steps, L_v(B) = L_b(B / r), and meet at r = 1."""
    cv, cb = fit_curve(budgets, variant), fit_curve(budgets, base)
    at_n = curve_at(cv, budgets[-1])
    base_at_target = log_crossing(cb, target)
    # Each is read where the curve is at or above its loss at N; a fit that never gets there (a quadratic
    # turning over far outside the budgets) is taken as reaching it before any budget: -inf.
    fast_at = np.where(np.isinf(f := log_crossing(cv, target)), -np.inf, f)
    slow_at = np.where(np.isinf(f := log_crossing(cb, at_n)), -np.inf, f)
    fast = at_n <= target
    with np.errstate(invalid="ignore"):
        ratio = np.where(fast, fast_at - base_at_target, base_at_target - slow_at)
    return ratio, np.where(fast, fast_at, slow_at)


def _inflate(rows: np.ndarray) -> np.ndarray:
    """Rows moved away from their mean by sqrt(n / (n - 1)), so that the bootstrap variance of their
    mean is s^2 / n (the plain bootstrap gives (n - 1) / n of that: 20% short at 5 seeds)."""
    n = len(rows)
    return rows if n < 2 else rows.mean(0) + math.sqrt(n / (n - 1)) * (rows - rows.mean(0))


def budget_ratio(budgets: list[int], table: np.ndarray, base: np.ndarray, reps: int = BOOTSTRAP_REPS,
                 seed: int = 0, level: float = 0.95) -> Speed:
    """Budget-to-target ratio of a variant to the baseline with a bootstrap CI over seeds.

    budgets [k] steps; table [s, k] the variant's final losses (seed x budget); base [s', k] the
    baseline's, whose largest-budget column (N) gives the target = its mean. The ratio is log_ratio's.
    Each bootstrap replicate resamples the seeds (rows) of both tables with replacement and recomputes
    the target, both fits and the ln ratio; the CI is ln ratio +- t(level, s + s' - 2) x the replicates'
    standard deviation (with rows inflated as in _inflate). Percentiles of 5 seeds would cover ~85%, the
    t quantile on the bootstrap's standard error covers ~95% (tests/test_bench.py measures it). When more
    than 10% of the replicates never cross (a variant far slower or faster than the budgets measure), the
    CI is the replicates' percentiles instead, with those at +-inf (e.g. [2.2, inf]).
    The budget to target is the ratio times the baseline's."""
    from scipy import stats as scipy_stats

    table, base = np.asarray(table, np.float64), np.asarray(base, np.float64)
    order = np.argsort(budgets)
    budgets = np.asarray(budgets, np.float64)[order]
    table, base = table[:, order], base[:, order]
    target = base[:, -1].mean()
    ln_r, read_at = log_ratio(budgets, table.mean(0), base.mean(0), target)
    rng = np.random.default_rng(seed)
    tv = _inflate(table)[rng.integers(0, len(table), (reps, len(table)))].mean(1)  # [reps, k]
    tb = _inflate(base)[rng.integers(0, len(base), (reps, len(base)))].mean(1)
    boot = log_ratio(budgets, tv, tb, tb[:, -1])[0]
    finite = boot[np.isfinite(boot)]
    if len(finite) < 0.9 * reps or not np.isfinite(ln_r):
        # far outside the budgets the fits often never reach the other's loss: such a replicate is slower
        # than anything measured (+inf, or -inf for faster); percentiles of all replicates then
        boot = np.where(np.isnan(boot), np.inf, boot)
        tail = 100 * (1 - level) / 2
        low, high = np.exp(np.percentile(boot, [tail, 100 - tail], method="lower"))
    else:
        df = max(1, len(table) + len(base) - 2)
        half = float(scipy_stats.t.ppf(0.5 + level / 2, df)) * float(finite.std(ddof=1))
        low, high = math.exp(float(ln_r) - half), math.exp(float(ln_r) + half)
    base_budget = float(np.exp(log_crossing(fit_curve(budgets, base.mean(0)), target)))
    ratio = float(np.exp(ln_r))
    extrapolated = not (math.log(budgets[0]) - 1e-9 <= float(read_at) <= math.log(budgets[-1]) + 1e-9)
    return Speed(base_budget * ratio, ratio, low, high, float(target), extrapolated)


# ----------------------------------------------------------------------------- plan


@dataclass
class Variant:
    """A benchmarked variant: its name, script, learning-rate field and the script's value of it."""

    name: str
    script: Path
    lr_field: str
    lr_declared: float
    seeds: list[int]
    lr_source: str = ""  # for the control: the variant whose tuned rate it uses
    extra: list[str] = field(default_factory=list)  # SCALE_SETTINGS the script has


@dataclass
class BenchRun:
    """One training run: what it is for ('grid' or 'main'), its variant, seed, budget, rate, and its Point."""

    role: str
    variant: str
    seed: int
    steps: int
    lr: float
    point: Point


def declared_lrs(root: Path) -> dict[str, str]:
    """{variant: lr field} from the optional `lr = "<field>"` keys of patches/variants.toml."""
    path = root / "patches" / "variants.toml"
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SystemExit(f"tools/bench: cannot read {path}: {err}".replace("\n", " ")) from None
    out = {}
    for name, table in data.items():
        if isinstance(table, dict) and "lr" in table:
            if not isinstance(table["lr"], str):
                raise SystemExit(f"tools/bench: {path}: [{name}] lr must be a setting name, e.g. lr = \"muon_lr\"")
            out[name] = table["lr"]
    return out


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


# Too slow for the default run's hour (echo_exact: ~2.7x the baseline's step at the bench preset): ask by name.
NOT_BY_DEFAULT = {"echo_exact"}


def default_variants(root: Path) -> list[str]:
    """baseline, adamw, polar_normuon_cwd and the echo* variants whose script exists and that declare lr
    (but NOT_BY_DEFAULT)."""
    lrs = declared_lrs(root)
    echo = sorted(v for v in lrs if v.startswith("echo") and v not in NOT_BY_DEFAULT
                  and variants.script_path(v, root).exists())
    return DEFAULT_VARIANTS + echo


def make_variant(name: str, root: Path, seeds: list[int], extra: Sequence[str] = ()) -> Variant:
    """The variant (checked: its script exists, has its lr setting and accepts the extra settings)."""
    base_name = "baseline" if name == CONTROL else name
    script = variants.script_path(base_name, root)
    if not script.exists():
        raise SystemExit(f"tools/bench: no script for variant {name!r} ({script.relative_to(root)}); "
                         f"make it with tools/apply_patch --all")
    lr_field = declared_lrs(root).get(base_name, DEFAULT_LR_FIELD)
    own = [a.partition("=")[0] for a in extra if a[2:].partition("=")[0] in (*BENCH_SETS, lr_field)]
    if own:
        raise SystemExit(f"tools/bench: {own[0]} is set by the bench for every run of {name} (budgets: --steps, "
                         "--budgets; seeds: --seeds; the learning rate is tuned); leave it out")
    settings = script_settings(script, extra)
    if not hasattr(settings, lr_field):
        raise SystemExit(f"tools/bench: {script.name} has no setting {lr_field!r} (the lr declared for "
                         f"[{base_name}] in patches/variants.toml)")
    extra = [f"--{k}={v}" for k, v in SCALE_SETTINGS.items() if hasattr(settings, k)]
    return Variant(name, script, lr_field, float(getattr(settings, lr_field)), seeds,
                   "baseline" if name == CONTROL else "", extra)


def fmt_lr(lr: float) -> str:
    return f"{lr:.6g}"


def make_run(role: str, v: Variant, seed: int, steps: int, lr: float, base_args: list[str], out: Path) -> BenchRun:
    """A run of variant v: the command, its deterministic run id (hashing command and code) and paths."""
    every = max(1, steps // VALIDATIONS)
    args = [*base_args, *v.extra, f"--num_iterations={steps}", f"--val_loss_every={every}"]
    values = {"seed": str(seed), "steps": str(steps), v.lr_field: fmt_lr(lr)}
    run_id = run_id_for(f"bench-{role}", v.name, values, args, script_sha(v.script))
    cmd = [*launch_prefix(v.script, 1), f"--run_id={run_id}", f"--log_dir={out / 'logs'}",
           *sweep.overwrite_arg(v.script), *args,  # --overwrite=1: not in the run id, which stays as it was
           *(f"--{k}={val}" for k, val in values.items() if k != "steps")]
    point = Point(run_id, cmd, out / "logs" / f"{run_id}.txt", out / "stdout" / f"{run_id}.txt", values)
    return BenchRun(role, v.name, seed, steps, lr, point)


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


def execute(runs: list[BenchRun], root: Path, parallel: int, runner: Runner, progress: Progress,
            report_only: bool = False) -> None:
    """Run those runs whose log holds no finished run, `parallel` at a time; cached ones are counted done.
    report_only: run nothing, mark the missing runs 'not run'."""
    todo = []
    for r in runs:
        r.point.run = finished_run(r.point.log_path)
        r.point.status = "cached" if r.point.run is not None else "pending"
        if r.point.run is None:
            todo.append(r)
    cached = len(runs) - len(todo)
    if report_only:
        for r in todo:
            r.point.status = "not run"
        return
    if cached:
        print(f"{cached} run(s) already finished in {root if not runs else runs[0].point.log_path.parent}: reused",
              flush=True)
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


def finals(runs: list[BenchRun]) -> dict[tuple[int, int], float]:
    """{(seed, steps): final val loss} of the finished runs."""
    return {(r.seed, r.steps): r.point.run.final_val_loss for r in runs if r.point.run is not None}


# ----------------------------------------------------------------------------- report


@dataclass
class Result:
    """What the table says about one variant."""

    variant: str
    lr_field: str
    lr: float
    lr_edge: str
    grid: dict[float, list[float]]
    table: np.ndarray | None  # [seeds, budgets] final losses, complete seeds only
    at_n: list[float]
    speed: Speed | None = None
    welch_p: float | None = None
    status: str = "ok"


def loss_table(runs: list[BenchRun], seeds: list[int], budgets: list[int]) -> np.ndarray | None:
    """[seeds with every budget finished, budgets] final losses, or None when no seed is complete."""
    got = finals(runs)
    rows = [[got[(s, b)] for b in budgets] for s in seeds if all((s, b) in got for b in budgets)]
    return np.array(rows) if rows else None


def analyse(results: list[Result], budgets: list[int], reps: int) -> None:
    """Fill in each result's speed against the baseline and Welch's p at N."""
    base = next((r for r in results if r.variant == "baseline"), None)
    for r in results:
        if r.table is None or len(r.table) == 0:
            r.status = "no complete seed"
            continue
        if base is None or base.table is None:
            continue
        r.speed = budget_ratio(budgets, r.table, base.table, reps=reps)
        if r.variant != "baseline" and len(r.at_n) and len(base.at_n):
            r.welch_p = stats.compare_means(r.at_n, base.at_n).p_value


def check_controls(results: list[Result]) -> list[str]:
    """Messages for the failed controls ([] when both pass or were not part of the run)."""
    failed = []
    by = {r.variant: r for r in results}
    if POSITIVE_CONTROL in by:
        s = by[POSITIVE_CONTROL].speed
        if s is None or not s.ci_low > 1:
            got = "no result" if s is None else f"ratio {s.ratio:.3f}, CI [{s.ci_low:.3f}, {s.ci_high:.3f}]"
            failed.append(f"POSITIVE CONTROL FAILED: {POSITIVE_CONTROL} is not slower than the baseline with a CI "
                          f"above 1 ({got})")
    if CONTROL in by:
        s = by[CONTROL].speed
        if s is None or not s.ci_low <= 1 <= s.ci_high:
            got = "no result" if s is None else f"ratio {s.ratio:.3f}, CI [{s.ci_low:.3f}, {s.ci_high:.3f}]"
            failed.append(f"NEGATIVE CONTROL FAILED: the baseline on disjoint seeds differs from itself ({got})")
    return failed


def _f(x: float | None, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def result_rows(results: list[Result], budget_n: int, quick: bool) -> list[dict[str, str]]:
    rows = []
    for r in results:
        s = r.speed
        summary = stats.summarize(r.at_n) if r.at_n else None
        label = "baseline (control)" if r.variant == CONTROL else r.variant
        budget = "" if s is None else (f"{s.budget:.1f}" + (" (extrap.)" if s.extrapolated else ""))
        ci = "" if s is None or quick else f"[{s.ci_low:.3f}, {s.ci_high:.3f}]"
        rows.append({
            "variant": label,
            "lr setting": r.lr_field,
            "tuned lr": fmt_lr(r.lr) + (f" (grid {r.lr_edge} edge)" if r.lr_edge else ""),
            "budget to target": budget,
            "ratio": "" if s is None else f"{s.ratio:.3f}",
            "95% CI": ci,
            f"final loss at {budget_n} +- std": "" if summary is None else
                f"{summary.mean:.4f} +- {_f(summary.std, '.4f')} (n={summary.n})",
            "Welch p": _f(r.welch_p, ".3g"),
            "status": r.status,
        })
    return rows


def csv_rows(results: list[Result], budget_n: int) -> list[dict[str, str]]:
    rows = []
    for r in results:
        s = r.speed
        summary = stats.summarize(r.at_n) if r.at_n else None
        rows.append({
            "variant": r.variant, "lr_field": r.lr_field, "tuned_lr": fmt_lr(r.lr), "lr_grid_edge": r.lr_edge,
            "target": _f(s and s.target, ".6f"), "budget_to_target": _f(s and s.budget, ".2f"),
            "extrapolated": "" if s is None else str(s.extrapolated).lower(),
            "ratio": _f(s and s.ratio, ".4f"), "ci_low": _f(s and s.ci_low, ".4f"),
            "ci_high": _f(s and s.ci_high, ".4f"),
            "budget_n": str(budget_n), "final_at_n_mean": _f(summary and summary.mean, ".6f"),
            "final_at_n_std": _f(summary and summary.std, ".6f"), "seeds_at_n": str(summary.n if summary else 0),
            "welch_p": _f(r.welch_p, ".4g"), "status": r.status,
        })
    return rows


def run_rows(runs: list[BenchRun], lr_fields: dict[str, str]) -> list[dict[str, str]]:
    rows = []
    for r in runs:
        run = r.point.run
        rows.append({
            "variant": r.variant, "role": r.role, "seed": str(r.seed), "budget": str(r.steps),
            "lr_field": lr_fields[r.variant], "lr": fmt_lr(r.lr),
            "final_val_loss": _f(run.final_val_loss if run else None, ".6f"),
            "train_time_s": _f(run.train_time_s if run else None, ".1f"),
            "status": r.point.status, "run_id": r.point.run_id,
        })
    return rows


def grid_lines(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        if not r.grid:
            continue
        parts = []
        for lr in sorted(r.grid):
            v = r.grid[lr]
            mean = f"{math.fsum(v) / len(v):.4f}" if v else "failed"
            parts.append(f"{fmt_lr(lr)}: {mean}" + (" *" if lr == r.lr else ""))
        lines.append(f"  {r.variant} {r.lr_field}  " + "   ".join(parts))
    return lines


def plot(path: Path, results: list[Result], main_runs: list[BenchRun], budgets: list[int]) -> None:
    """Left: final loss against budget per variant (seed mean +- std, the fit, the target); right: the
    seed-mean validation curves at budget N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(results) > len(colors):  # more variants than the default cycle: no two may share a colour
        colors = [plt.get_cmap("tab20")(k) for k in range(20)]
    target = next((r.speed.target for r in results if r.variant == "baseline" and r.speed), None)
    x = np.array(budgets, np.float64)
    for i, r in enumerate(results):
        if r.table is None:
            continue
        color = colors[i % len(colors)]
        style = "-" if i < len(colors) else "--"
        label = "baseline (control)" if r.variant == CONTROL else r.variant
        std = r.table.std(0, ddof=1) if len(r.table) > 1 else np.zeros(len(budgets))
        left.errorbar(x, r.table.mean(0), yerr=std, fmt="o", color=color, capsize=3, label=label)
        coef = fit_curve(x, r.table.mean(0))
        xs = np.geomspace(x.min(), x.max(), 50)
        left.plot(xs, [curve_at(coef, v) for v in xs], color=color, ls=style, lw=1, alpha=0.7)
        runs = [br.point.run for br in main_runs
                if br.variant == r.variant and br.steps == budgets[-1] and br.point.run is not None]
        if runs:
            c = group_curve(runs)
            right.plot(c.steps, c.mean_loss, color=color, ls=style, label=f"{label} ({len(runs)} seeds)")
    if target is not None:
        left.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.4f}")
    left.set_xscale("log")
    left.set_xlabel("step budget (a complete run each)")
    left.set_ylabel("final val loss (nats/token)")
    left.set_title("final loss against budget (seed mean +- std, fit)")
    left.legend(fontsize=8)
    right.set_xlabel("step")
    right.set_ylabel("val loss (nats/token)")
    right.set_title(f"seed-mean validation curves at budget {budgets[-1]}")
    right.legend(fontsize=8)
    lows = [r.table.min() for r in results if r.table is not None]
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
              lr_points: int, lr_seeds: int, parallel: int, extra: list[str], quick: bool,
              root: Path | None = None, runner: Runner = subprocess_runner, reps: int = BOOTSTRAP_REPS,
              make_plot: bool = True, report_only: bool = False) -> tuple[list[Result], list[str]]:
    """Run (resumably) and analyse the benchmark of the variants vs (make_variant's, with `seeds` seeds each).
    -> (results, failed-control messages). report_only: start no run, analyse the finished ones (controls are
    judged only when complete); nothing finished is a SystemExit, and nothing is written."""
    root = variants.REPO_ROOT if root is None else root
    out = out.resolve()
    base_args = [f"--preset={PRESET}", "--checkpoint_every=", *extra]
    budgets = budget_steps(budget_n, budget_fracs)
    progress = Progress(parallel)
    all_runs: list[BenchRun] = []
    grid_seeds = [GRID_SEED_OFFSET + i for i in range(lr_seeds)]
    tuned: dict[str, tuple[float, str, dict[float, list[float]]]] = {}

    # 1. the learning-rate grids at budget N (the control uses the baseline's)
    tuning = [v for v in vs if v.lr_source == ""]
    grids = {v.name: lr_grid(v.lr_declared, lr_points) for v in tuning} if not quick else {}
    extensions = 0
    while grids:
        runs = [make_run("grid", v, s, budget_n, lr, base_args, out)
                for v in tuning if v.name in grids for lr in grids[v.name] for s in grid_seeds]
        runs = [r for r in runs if r.point.run_id not in {x.point.run_id for x in all_runs}]
        print(f"LR grid: {len(runs)} run(s) at budget {budget_n}", flush=True)
        execute(runs, root, parallel, runner, progress, report_only)
        all_runs += runs
        grids_next = {}
        for v in tuning:
            if v.name not in grids:
                continue
            mine = [r for r in all_runs if r.role == "grid" and r.variant == v.name]
            got: dict[float, list[float]] = {}
            for r in mine:
                got.setdefault(r.lr, [])
                if r.point.run is not None:
                    got[r.lr].append(r.point.run.final_val_loss)
            try:
                best, edge = pick_lr(got)
            except ValueError:
                if report_only:
                    continue
                raise SystemExit(f"tools/bench: every LR-grid run of {v.name} failed; see {out / 'stdout'}") from None
            tuned[v.name] = (best, edge, got)
            if edge and extensions < LR_EXTENSIONS:
                grids_next[v.name] = [best / 2 if edge == "low" else best * 2]
        grids = grids_next
        extensions += 1
    for v in vs:
        if v.name not in tuned:
            source = tuned.get(v.lr_source or v.name)
            tuned[v.name] = (source[0], source[1], {}) if source else (v.lr_declared, "", {})

    # 2. the budgets x seeds at the tuned rates
    # seed-major order: a run stopped part-way leaves every variant with about as many complete seeds
    main_runs = [make_run("main", v, v.seeds[i], b, tuned[v.name][0], base_args, out)
                 for i in range(seeds) for v in vs for b in budgets]
    print(f"main: {len(main_runs)} run(s): {len(vs)} variant(s) x budgets {budgets} x {seeds} seeds", flush=True)
    execute(main_runs, root, parallel, runner, progress, report_only)
    all_runs += main_runs
    if report_only and all(r.point.run is None for r in all_runs):
        raise SystemExit(f"tools/bench: nothing to report: no finished run of these variants and settings in "
                         f"{out / 'logs'} (under the scripts as they are now); run the bench without --report first")

    # 3. analysis
    results = []
    for v in vs:
        mine = [r for r in main_runs if r.variant == v.name]
        lr, edge, grid = tuned[v.name]
        at_n = [r.point.run.final_val_loss for r in mine if r.steps == budget_n and r.point.run is not None]
        failed = sum(r.point.run is None for r in mine)
        res = Result(v.name, v.lr_field, lr, edge, grid, loss_table(mine, v.seeds, budgets), at_n)
        missing = sum(r.point.status == "not run" for r in mine)
        res.status = "ok" if not failed else f"{failed} run(s) failed"
        if missing:
            res.status = f"{len(mine) - missing} of {len(mine)} runs finished"
        results.append(res)
    if len(budgets) >= 2:
        analyse(results, budgets, reps)
    incomplete = any(r.point.status == "not run" for r in all_runs)
    failed = [] if quick or incomplete else \
        check_controls([r for r in results if r.variant in (POSITIVE_CONTROL, CONTROL)])

    rows = result_rows(results, budget_n, quick)
    text = [format_table(rows, list(rows[0])), "", "LR grid (mean final loss at budget "
            f"{budget_n}; * = picked):", *grid_lines(results)]
    base = next((r for r in results if r.variant == "baseline" and r.speed), None)
    if base:
        text.append(f"target: {base.speed.target:.4f} (baseline's mean final loss at {budget_n} steps)")
    if quick:
        text.append("--quick: 2 budgets and few seeds, declared learning rates; no CI claims, controls not checked")
    if incomplete:
        text.append(f"--report: {sum(r.point.status == 'not run' for r in all_runs)} planned run(s) not finished "
                    "yet: partial figures, controls not checked")
    text += failed
    print("\n".join(text), flush=True)
    atomic_write_text(out / "bench.txt", "\n".join(text) + "\n")
    write_csv(out / "bench.csv", csv_rows(results, budget_n))
    write_csv(out / "bench_runs.csv", run_rows(all_runs, {v.name: v.lr_field for v in vs}))
    plotted = make_plot and any(r.table is not None for r in results)
    if plotted:
        plot(out / "bench.png", results, main_runs, budgets)
    print(f"wrote {out / 'bench.csv'}, {out / 'bench_runs.csv'}, {out / 'bench.txt'}"
          + (f", {out / 'bench.png'}" if plotted else ""), flush=True)
    return results, failed


def parse_budgets(text: str) -> tuple[float, ...]:
    """--budgets: distinct fractions of N in (0, 1], or a one-line SystemExit."""
    try:
        fracs = tuple(float(x) for x in text.split(","))
    except ValueError:
        fracs = ()
    if not fracs or not all(0 < f <= 1 for f in fracs) or len(set(fracs)) < len(fracs):
        _refuse(f"--budgets={text}: give distinct fractions of N in (0, 1], e.g. 0.6,0.8,1.0")
    return fracs


def main(argv: list[str] | None = None, runner: Runner = subprocess_runner, root: Path | None = None) -> None:
    parser = make_parser("tools/bench", __doc__)
    parser.error = lambda message: _refuse(f"{message}; see tools/bench --help")  # one line, not usage + error
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants (default: see above); add 'control' for the negative control")
    parser.add_argument("--steps", type=int, default=None, help="budget N in steps (default: the bench preset's)")
    parser.add_argument("--budgets", default=None, help="budget fractions of N (default 0.6,0.8,1.0)")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per variant and budget, 2 or more "
                        f"(default {SEEDS})")
    parser.add_argument("--lr-points", type=int, default=LR_POINTS, help=f"LR grid points (default {LR_POINTS})")
    parser.add_argument("--lr-seeds", type=int, default=LR_SEEDS, help=f"seeds per LR grid point (default {LR_SEEDS})")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, one thread each (default 1)")
    parser.add_argument("--quick", action="store_true", help="no LR grid, 2 budgets, 2 seeds, no CI claims (~10 min)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench_out/)")
    parser.add_argument("--report", action="store_true",
                        help="start no run: the table of the runs finished so far (during a run, or after a kill)")
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
    budget_fracs = parse_budgets(args.budgets) if args.budgets else (QUICK_BUDGETS if args.quick else BUDGETS)
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else SEEDS)
    out = args.out or root / "bench_out"
    if out.exists() and not out.is_dir():
        _refuse(f"--out {out} is a file; --out must be a folder (a new or an existing one)")
    main_seeds = list(range(seeds))
    vs = [make_variant(n, root, [CONTROL_SEED_OFFSET + s for s in main_seeds] if n == CONTROL else main_seeds, extra)
          for n in names]
    budget_n = args.steps if args.steps is not None else \
        script_settings(variants.script_path("baseline", root)).num_iterations
    if len(budget_steps(budget_n, budget_fracs)) < len(budget_fracs):
        _refuse(f"N = {budget_n} steps is too few for budgets {budget_fracs} x N: some round to the same step "
                "count; give a larger --steps or fewer --budgets")
    print(f"tools/bench: variants {', '.join(names)}; N = {budget_n} steps; budgets {budget_fracs} x N; "
          f"{seeds} seeds; {'no LR grid' if args.quick else f'LR grid of {args.lr_points} x {args.lr_seeds} seed(s)'}; "
          f"{args.parallel} at a time; out {out}", flush=True)
    started = time.monotonic()
    CHILDREN.reset()
    # --report only reads: it takes no lock (it may run beside the bench that writes OUT)
    with contextlib.nullcontext() if args.report else sweep.holding_out(out, LOCK, "tools/bench"):
        if not args.report:  # the trainings of a killed bench may live on: each holds OUT/logs/ID.lock
            sweep.refuse_if_running(sorted((out / "logs").glob("*.lock")), "tools/bench")
        with forwarding_signals("tools/bench"):  # SIGINT / SIGTERM: passed on to the trainings, then a clean stop
            _, failed = run_bench(vs, out, budget_n, budget_fracs, seeds, args.lr_points, args.lr_seeds,
                                  args.parallel, extra, args.quick, root, runner, report_only=args.report)
    print(f"wall time {time.monotonic() - started:.0f} s", flush=True)
    if failed:
        print("\n" + "!" * 80 + "\n" + "\n".join(failed) + "\n" + "!" * 80, flush=True)
        raise SystemExit(1)
