"""Walk the CPU bench toward the GPU run: the bench's method on a ladder of regimes of the same 16-block model.

Example: OMP_NUM_THREADS=1 tools/ladder --parallel=2          # the default ladder, ~8.9 h on 2 cores (estimate)
         OMP_NUM_THREADS=1 tools/ladder --parallel=2 --variants=baseline,adamw,kron,polar_normuon_cwd  # ~6.6 h

Each rung is a set of settings on top of `--preset=bench` (RUNGS, printed by --list): a width (64, 96 or 128,
heads of 32 dims), a horizon in tokens (bytes) per block-matrix parameter (the block matrices: 15 attention
layers x 4 d^2 + 16 MLPs x 2 x 4 d^2 = 188 d^2), a batch that keeps the GPU run's batch per parameter (record
8: 524,288 tokens a step for 188 x 1024^2 parameters, 1/376 of them, as the bench preset's 2,048 bytes are of
its 188 x 64^2), so steps = 376 x tokens per parameter at every width, and a corpus: the bench's Shakespeare
bytes for the rung `bench` (tools/bench's own regime with kron added; not in the default ladder: add it with
--rungs=default,bench), and for every other rung the Gutenberg Poetry Corpus (`tools/prepare_tiny_data
--corpus=large`, 115.6M training bytes), of which no rung reads more than a tenth at N (a fifth at the
bench's longest budget, 2 N); w64-h0.35 is the bench on that corpus. On every rung muon_wd holds the
integrated decay, sum over the steps of lr_t x wd, at record 8's (0.025 x 0.01 x its schedule's sum = 0.9686;
MLPs twice that) whatever muon_lr the bench tries (the bench's own rule, here anchored to record 8 instead of
the preset's value); Muon's momentum warm-up keeps the preset's share of the run (10 of 130 steps). AdamW and
Kron keep their scripts' decay coefficients, as in the bench.

Each chosen rung runs the bench (tools/bench's run_bench: LR search on grid seeds, budgets 0.6-1.0 x N and
beyond N where a variant needs it, paired seeds, the bootstrap CI with the tuning's noise, Holm over the
variants of the rung, the adamw control) with N = the rung's steps and the rung's settings as extra settings,
in its own folder OUT/<rung>/, so the bench's cache and resume work per rung. Tuning per rung (column `tuning`):
  full      the bench's LR search: a x2 grid of 4 rates around the script's value, extended at an edge, then
            refined at x sqrt(2) around the pick, each on --lr-seeds grid seeds;
  transfer  the reduction for the costly rungs: each variant starts from its tuned rate on the rung named (the rung
            below in horizon, or the narrower width at the same horizon; the rule is "the same rate": Muon's step is
            normalized to the matrix's shape) and that rate is checked at its two neighbours, x sqrt(2) and / sqrt(2),
            on the grid seeds (the bench's search with one grid point); a pick at the edge of the rates measured steps
            one x sqrt(2) further out, at most twice (the optimum falls as the horizon grows: at w64-h1 every
            variant's pick moved down, the baseline's from 0.05 to 0.0177), so 3-5 rates instead of 6-8; the pick goes
            on. Into the CI: the pick's noise among them, which the bench's bootstrap charges as at a full rung
            (re-picked on resampled grid seeds, costed in steps by the fit's slope). Not in the CI: an optimum beyond
            the checked range; a pick still at the edge after two steps out is flagged (column lr_grid_edge, and
            `edge` in the tables): rerun that rung with --full-grid. A variant with declared groups checks the
            baseline's rate and its neighbours.
A rung whose variants all have `ok` rows in ladder.csv with the same plan (a hash of the rung's settings, the
seeds, the rates it starts from, and the bench's cache key of each script: code, data, torch, threads) is
skipped, so the ladder completes over several sittings even where OUT was lost; inside a rung, finished runs
come from the bench's cache in OUT/<rung>/logs, and from CSVDIR/ladder_journal.csv (the bench's run journal,
one row per finished run, rewritten atomically as each run ends; commit it with the other CSVs) and
ladder_runs.csv by run id, so a rung cut off half-way (a rung at w64-h3 takes longer than one sitting) resumes
on a fresh clone with only the runs that neither holds.
Results: CSVDIR/ladder_runs.csv (one row per run) and CSVDIR/ladder.csv (one row per variant and rung), both
rewritten atomically after each rung, then `--report` (also run at the end): the tables, a trend per variant,
ln ratio = a + b ln(tokens per parameter), weighted by the inverse squared standard errors of the rungs'
CIs (the t quantile of each CI's degrees of freedom taken out), its covariance scaled up by chi^2 / (n - 2)
when the points scatter more than their errors, carried to the GPU run's 15.9 tokens per parameter with a 95%
normal CI; and the figure FIGURE: ratio against tokens per parameter (log x) with 95% CIs per variant, the
trends, and the public GPU ratios on this model at 15.9 (AdamW 9500 / 5960 = 1.59, PSGD Kron 9000 / 5960 =
1.51 and 7875 / 5960 = 1.32). Hollow markers: a crossing outside the measured budgets (the bench gives it no
verdict; the trend uses it).
Cost, estimated per run: 35 s for a 130-step width-64 run of 2,048-byte steps on one thread (the bench preset,
measured) x steps / 130 x batch / 2,048 x a per-byte factor of the width, 1.00, 1.74 and 2.88 at 64, 96 and
128 (measured side by side with tools/bench_step_cost at each width's batch: a step 3.92x and 11.5x the
bench's; d^2 would say 2.25 and 4). Per rung: (6 grid rates if full, 4 if transfer) x lr-seeds + 2.4 x seeds
runs of N per variant, plus 4.75 x seeds for adamw and kron (budgets 1.25, 1.5 and 2 N: both needed all three
at w64-h0.35; no grid extensions), kron's at 1.3x the baseline's run time and adamw's at 0.85x (measured at
w64-h0.35, two runs at a time: 61 s and 41 s against 50 s). Runs side by side slow each other down (memory, the
second core's other work): with --parallel of 2 or more each run takes SHARED_SLOWDOWN = 1.43x its time alone
(50 s per 130-step run at w64-h0.35 on the 2-core AMD EPYC of the ladder's second sitting, against the 35 s of a
run alone); the hours are runs x seconds x that factor / parallel.
The rungs of COMPILE_FROM_STEPS steps or more (horizon >= 1 token per parameter) run their model through
torch.compile (--compile=1 among their settings, so their run ids say so); their estimate is the eager one x 0.55
+ 11 s: a compiled step is 0.66-0.75x an eager one (tools/bench_step_cost, 60-step runs), a run 11 s more of
fixed cost from a warm inductor cache, and the eager estimate's scaling by steps overstates a long run's fixed
cost, so the factor is fitted to whole runs (w64-h1's grid, 376 steps, two at a time: 89-97 s against the eager
estimate's 145 s). The 130-step rungs stay eager (compiling would
not pay there). Within a rung every variant runs the same way.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from core.cli import format_table, make_parser
from core.files import atomic_savefig, write_csv
from core.shards import ShardError, check_shard
from kit.benchmarks import bench
from kit.patching import variants
from kit.runs.sweep import CHILDREN, forwarding_signals, holding_out, refuse_if_running

TOOL = "tools/ladder"
REFERENCE_VARIANTS = ["baseline", "adamw", "kron", "polar_normuon_cwd"]  # those with public GPU points, and cwd
# the two best ideas of the bench v2 table after polar_normuon_cwd (README): sl 0.981 [0.970, 0.992] and sphere
# 0.982 [0.966, 0.997] (sphere's gain is its pinned row norms: its control gives the same)
DEFAULT_VARIANTS = [*REFERENCE_VARIANTS, "sl", "sphere"]
SLOW = ("adamw", "kron")  # expected to need budgets beyond N (the cost estimate only)
LOCK = ".ladder.lock"
JOURNAL = "ladder_journal.csv"  # in CSVDIR: every finished run, appended as it ends

# The bench preset (speedruns/train_gpt_medium.py, checked by tests/test_ladder.py) and record 8.
BENCH_MUON_LR, BENCH_STEPS, BENCH_MICRO_BATCHES, SEQ_LEN = 0.05, 130, 8, 256
BENCH_MOMENTUM_WARMUP, COOLDOWN_FRAC = 10, 0.7
RECORD8_STEPS, RECORD8_MUON_LR, RECORD8_MUON_WD = 5960, 0.025, 0.01
BLOCK_MATRIX_D2 = 15 * 4 + 16 * 2 * 4  # block-matrix parameters / d^2: 15 attention layers, 16 MLPs
HEAD_DIM = 32
GPU_TOKENS_PER_PARAM = 15.9  # record 8: 5960 x 524,288 tokens / (188 x 1024^2) parameters = 15.85
GPU_RATIOS = {"adamw": [("AdamW 9500 / 5960", 9500 / 5960)],
              "kron": [("PSGD Kron 9000 / 5960", 9000 / 5960), ("PSGD Kron 7875 / 5960", 7875 / 5960)]}

# Cost: a bench-preset run on one thread, and the cost of a byte at each width relative to width 64.
BENCH_RUN_SECONDS = 35.0
BYTE_COST = {64: 1.0, 96: 1.74, 128: 2.88}
VARIANT_COST = {"kron": 1.3, "adamw": 0.85}  # run time / the baseline's (the ladder's w64-h0.35, two at a time)
SHARED_SLOWDOWN = 50.0 / 35.0  # a run's time two at a time on 2 cores / alone (measured, see the module doc)
# The long rungs run their model compiled (--compile=1). A 60-step run at w64-h1's settings from a warm inductor
# cache, 3 runs on 2 cores: 11 s more of fixed cost (tracing, loading the cached graphs of training and
# validation), a step 0.75x the eager one. Whole 376-step runs of the ladder (w64-h1's grid, two at a time) took
# 89-97 s where the eager estimate says 145 s, so their step is 0.55x: the figure used. At 130 steps compiling
# would not pay for its fixed cost; from 376 steps it saves about a third.
COMPILE_FROM_STEPS, COMPILED_STEP, COMPILE_SECONDS = 376, 0.55, 11.0
MAX_RUN_MINUTES = 25.0
GRID_RATES = {"full": bench.LR_POINTS + 2, "transfer": 4}  # rates measured per variant (transfer: one step out)
BEYOND_N = 1.25 + 1.5 + 2.0  # budgets beyond N assumed for the SLOW variants (x N per seed)


@dataclass(frozen=True)
class Corpus:
    """Byte shards a rung trains on: file patterns (from the repository root), training bytes, the maker."""

    train_files: str
    val_files: str
    train_bytes: int
    command: str


CORPORA = {
    "shakespeare": Corpus("data/tiny/bytes_train_*.bin", "data/tiny/bytes_val_*.bin", 4_548_436,
                          "tools/prepare_tiny_data"),
    "poetry": Corpus("data/tiny/poetry_bytes_train_*.bin", "data/tiny/poetry_bytes_val_*.bin", 115_614_471,
                     "tools/prepare_tiny_data --corpus=large"),
}


def schedule_sum(steps: int, cooldown_frac: float = COOLDOWN_FRAC) -> float:
    """sum over steps t = 0 .. steps - 1 of the scripts' lr multiplier (lr_multiplier: flat, then a linear
    cooldown to 0 over the last cooldown_frac of the run)."""
    total = 0.0
    for t in range(steps):
        x = t / steps
        total += 1.0 if x < 1 - cooldown_frac else max(0.0, (1 - x) / cooldown_frac)
    return total


RECORD8_DECAY = RECORD8_MUON_LR * RECORD8_MUON_WD * schedule_sum(RECORD8_STEPS)  # 0.9686 (attention)


def decay_coefficient(steps: int, muon_lr: float) -> float:
    """muon_wd that makes sum_t lr_t x wd equal record 8's over a run of `steps` at muon_lr."""
    return RECORD8_DECAY / (muon_lr * schedule_sum(steps))


@dataclass(frozen=True)
class Rung:
    """One regime: the bench preset with this width, horizon (steps), batch (micro-batches of 256 bytes) and
    corpus; how its rates are tuned (full, or transfer from `source`); its default seeds; in the default ladder?"""

    name: str
    width: int
    steps: int
    micro_batches: int
    corpus: str
    tune: str  # full | transfer
    source: str | None
    seeds: int
    default: bool

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM

    @property
    def batch_tokens(self) -> int:
        return self.micro_batches * SEQ_LEN

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_tokens

    @property
    def params(self) -> int:
        return BLOCK_MATRIX_D2 * self.width**2

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def epochs(self) -> float:
        """Epochs of the corpus's training bytes at budget N (the bench may run up to 2 N)."""
        return self.tokens / CORPORA[self.corpus].train_bytes

    @property
    def muon_wd(self) -> float:
        """The decay coefficient at the preset's muon_lr (the bench rescales it with each rate it tries)."""
        return decay_coefficient(self.steps, BENCH_MUON_LR)

    @property
    def integrated_decay(self) -> float:
        return BENCH_MUON_LR * self.muon_wd * schedule_sum(self.steps)

    @property
    def momentum_warmup(self) -> int:
        return max(1, round(BENCH_MOMENTUM_WARMUP * self.steps / BENCH_STEPS))

    @property
    def compiled(self) -> bool:
        """Its model runs through torch.compile: the long rungs, where the compiled step pays for its fixed cost."""
        return self.steps >= COMPILE_FROM_STEPS

    @property
    def run_seconds(self) -> float:
        """Estimated seconds of one run of N steps on one thread (see the module doc)."""
        eager = (BENCH_RUN_SECONDS * self.steps / BENCH_STEPS * self.batch_tokens / (BENCH_MICRO_BATCHES * SEQ_LEN)
                 * BYTE_COST[self.width])
        return eager * COMPILED_STEP + COMPILE_SECONDS if self.compiled else eager

    def settings(self) -> list[str]:
        """The settings on top of --preset=bench (the bench adds num_iterations, the rate and muon_wd)."""
        corpus = CORPORA[self.corpus]
        return [f"--model_dim={self.width}", f"--num_heads={self.heads}", f"--micro_batches={self.micro_batches}",
                f"--muon_momentum_warmup_steps={self.momentum_warmup}", f"--train_files={corpus.train_files}",
                f"--val_files={corpus.val_files}", *(["--compile=1"] if self.compiled else [])]


# steps = 376 x tokens per parameter at every width (the batch is 1/376 of the block-matrix parameters)
RUNGS = (
    Rung("bench", 64, 130, 8, "shakespeare", "full", None, 5, False),  # tools/bench's regime, kron added
    Rung("w64-h0.35", 64, 130, 8, "poetry", "full", None, 5, True),
    Rung("w64-h1", 64, 376, 8, "poetry", "transfer", "w64-h0.35", 3, True),
    Rung("w64-h3", 64, 1128, 8, "poetry", "transfer", "w64-h1", 3, True),
    Rung("w64-h6", 64, 2256, 8, "poetry", "transfer", "w64-h3", 3, False),
    Rung("w64-h14", 64, 5264, 8, "poetry", "transfer", "w64-h6", 3, False),
    Rung("w96-h0.35", 96, 130, 18, "poetry", "transfer", "w64-h0.35", 3, False),
    Rung("w96-h1", 96, 376, 18, "poetry", "transfer", "w96-h0.35", 3, False),
    Rung("w96-h3", 96, 1128, 18, "poetry", "transfer", "w96-h1", 3, False),
    Rung("w128-h0.35", 128, 130, 32, "poetry", "transfer", "w96-h0.35", 3, False),
    Rung("w128-h1.2", 128, 451, 32, "poetry", "transfer", "w128-h0.35", 3, False),
)


def _refuse(message: str) -> NoReturn:
    raise SystemExit(f"{TOOL}: {message}")


def _reworded(err: SystemExit, where: str = "") -> SystemExit:
    """A bench's one-line refusal as the ladder's (an Interrupted or a numeric exit stays as it is)."""
    if isinstance(err, bench.Interrupted) or not isinstance(err.code, str):
        return err
    return SystemExit(f"{TOOL}: {where}{err.code.removeprefix('tools/bench: ')}")


# ----------------------------------------------------------------------------- the table and the cost


def planned_runs(rung: Rung, names: Sequence[str], seeds: int, lr_seeds: int, tune: str) -> float:
    """Estimated runs of N baseline steps on a rung: grid + budgets 0.6-1.0 N + beyond N for the SLOW variants,
    each variant's weighted by its step cost (VARIANT_COST)."""
    main = sum(bench.BUDGETS) * seeds
    return sum((GRID_RATES[tune] * lr_seeds + main + (BEYOND_N * seeds if n in SLOW else 0.0))
               * VARIANT_COST.get(n, 1.0) for n in names)


def wall_hours(runs: float, run_seconds: float, parallel: int) -> float:
    """Hours of wall time for `runs` runs of run_seconds each (alone, one thread), `parallel` at a time."""
    return runs * run_seconds * (SHARED_SLOWDOWN if parallel > 1 else 1.0) / parallel / 3600


def tuning_of(rung: Rung, full_grid: bool = False) -> str:
    return "full" if full_grid or rung.tune == "full" else "transfer"


def rung_rows(rungs: Sequence[Rung], names: Sequence[str], seeds: int | None, lr_seeds: int, parallel: int,
              full_grid: bool = False) -> list[dict[str, str]]:
    rows = []
    for r in rungs:
        tune, n_seeds = tuning_of(r, full_grid), seeds or r.seeds
        hours = wall_hours(planned_runs(r, names, n_seeds, lr_seeds, tune), r.run_seconds, parallel)
        rows.append({
            "rung": r.name, "width (heads)": f"{r.width} ({r.heads})", "steps": str(r.steps),
            "batch bytes": f"{r.batch_tokens:,}", "tokens/param": f"{r.tokens_per_param:.3g}",
            "corpus": r.corpus, "epochs": f"{r.epochs:.3f}", "muon_wd @0.05": f"{r.muon_wd:.5f}",
            "decay": f"{r.integrated_decay:.4f}", "compiled": "yes" if r.compiled else "",
            "min/run": f"{r.run_seconds / 60:.1f}",
            "tuning": "full" if tune == "full" else f"transfer from {r.source}", "seeds": str(n_seeds),
            f"h on {parallel}": f"{hours:.2f}", "default": "yes" if r.default else "",
        })
    return rows


def table_text(rungs: Sequence[Rung], names: Sequence[str], seeds: int | None, lr_seeds: int, parallel: int,
               full_grid: bool = False) -> str:
    rows = rung_rows(rungs, names, seeds, lr_seeds, parallel, full_grid)
    total = sum(float(r[f"h on {parallel}"]) for r in rows)
    lines = [format_table(rows, list(rows[0])), "",
             f"estimated: {total:.1f} h on {parallel} core(s) for these {len(rows)} rung(s) x {len(names)} variant(s) "
             f"({', '.join(names)}); min/run: {BENCH_RUN_SECONDS:.0f} s x steps/{BENCH_STEPS} x batch/"
             f"{BENCH_MICRO_BATCHES * SEQ_LEN} x per-byte cost of the width ("
             + ", ".join(f"{c:.2f} at {w}" for w, c in BYTE_COST.items()) + f", measured), one thread alone (hours: "
             f"x {SHARED_SLOWDOWN:.2f} two or more at a time), compiled: "
             f"x {COMPILED_STEP} + {COMPILE_SECONDS:.0f} s (a warm inductor cache; the first compile of a sitting "
             "costs minutes more); decay: "
             f"sum_t lr_t x muon_wd at muon_lr {BENCH_MUON_LR} (record 8: {RECORD8_DECAY:.4f}); epochs at N (the "
             "bench may run 2 N)",
             "settings on top of --preset=bench (the bench adds --num_iterations, the rate and --muon_wd):"]
    lines += [f"  {r.name}: {' '.join(r.settings())}" for r in rungs]
    return "\n".join(lines)


def choose_rungs(text: str | None, rungs: Sequence[Rung] = RUNGS) -> list[Rung]:
    """--rungs: names, `default` (the rungs marked so; also when None) and `all`, comma-separated -> the rungs
    in table order, or a one-line SystemExit."""
    names = set()
    for n in (text or "default").split(","):
        if n == "default":
            names |= {r.name for r in rungs if r.default}
        elif n == "all":
            names |= {r.name for r in rungs}
        elif n:
            if n not in {r.name for r in rungs}:
                _refuse(f"--rungs={text}: no rung {n!r}; choose from {', '.join(r.name for r in rungs)}, default "
                        "or all (tools/ladder --list prints them)")
            names.add(n)
    if not names:
        _refuse(f"--rungs={text}: no rung named; e.g. --rungs=default,bench (tools/ladder --list prints them)")
    return [r for r in rungs if r.name in names]


# ----------------------------------------------------------------------------- results on disk


RUNG_COLUMNS = ("rung", "width", "steps", "batch_tokens", "tokens_per_param", "epochs", "corpus", "tuning",
                "seeds")


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error) as err:
        _refuse(f"cannot read {path}: {err}")


def merge_rows(old: list[dict[str, str]], new: list[dict[str, str]], rung: str, names: Sequence[str],
               order: Sequence[str]) -> list[dict[str, str]]:
    """old rows less those of (rung, one of names), plus new; sorted by rung (table order) then variant."""
    kept = [r for r in old if not (r.get("rung") == rung and r.get("variant") in names)]
    rank = {n: i for i, n in enumerate(order)}
    merged = kept + new
    merged.sort(key=lambda r: (rank.get(r.get("rung", ""), len(rank)), r.get("variant", "")))
    columns = list(dict.fromkeys(c for r in merged for c in r))  # a union: old files may lack newer columns
    return [{c: r.get(c, "") for c in columns} for r in merged]


def rung_fields(rung: Rung, tune: str, seeds: int) -> dict[str, str]:
    return {"rung": rung.name, "width": str(rung.width), "steps": str(rung.steps),
            "batch_tokens": str(rung.batch_tokens), "tokens_per_param": f"{rung.tokens_per_param:.6g}",
            "epochs": f"{rung.epochs:.4g}", "corpus": rung.corpus,
            "tuning": "full" if tune == "full" else f"transfer from {rung.source}", "seeds": str(seeds)}


def plan_key(rung: Rung, v: bench.Variant, tune: str) -> str:
    """What a variant's results on a rung depend on, hashed: the rung's settings, seeds, the rate it starts
    from, its decay, groups and fixed settings, and the bench's cache key (code, data, torch, threads)."""
    plan = [rung.settings(), rung.steps, tune, v.key, bench.fmt_lr(v.lr_declared), v.decay and list(v.decay),
            v.groups, v.extra, v.seeds, v.grid_seeds, list(bench.BUDGETS)]
    return hashlib.sha256(json.dumps(plan, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- running


@dataclass
class Plan:
    """The options of one ladder invocation."""

    names: list[str]
    seeds: int | None
    lr_seeds: int
    parallel: int
    out: Path
    csv_dir: Path
    root: Path
    full_grid: bool = False
    reps: int = bench.BOOTSTRAP_REPS


def transferred_rates(rung: Rung, names: Sequence[str], rows: list[dict[str, str]], csv_path: Path) -> dict[str, float]:
    """{variant: its tuned rate on rung.source} from ladder.csv, or a one-line SystemExit naming what to run."""
    got = {r["variant"]: r.get("tuned_lr", "") for r in rows if r.get("rung") == rung.source}
    rates = {}
    for name in names:
        try:
            rates[name] = float(got.get(name, ""))
        except ValueError:
            _refuse(f"rung {rung.name} starts {name} from its tuned rate on rung {rung.source}, which {csv_path} "
                    f"does not hold; run that rung first (--rungs={rung.source},{rung.name}) or use --full-grid")
    return rates


def check_data(rungs: Sequence[Rung], root: Path) -> None:
    """Each rung's shards exist and hold at least 2 N steps of bytes (its longest budget: one epoch at most)."""
    for r in rungs:
        corpus = CORPORA[r.corpus]
        files = {k: sorted(glob.glob(str(root / p))) for k, p in (("train", corpus.train_files),
                                                                   ("val", corpus.val_files))}
        missing = [k for k, f in files.items() if not f]
        if missing:
            _refuse(f"rung {r.name} needs {getattr(corpus, missing[0] + '_files')}; make it with {corpus.command}")
        try:
            held = sum(check_shard(f) for f in files["train"])
        except ShardError as err:
            _refuse(f"rung {r.name}: {err}")
        if held < 2 * r.tokens:
            _refuse(f"rung {r.name} reads up to {2 * r.tokens:,} bytes (2 N steps), more than the {held:,} of "
                    f"{corpus.train_files}: more than one epoch; rebuild it with {corpus.command} --force")


def make_variants(rung: Rung, plan: Plan, tune: str, seeds: int, rates: dict[str, float]) -> list[bench.Variant]:
    """The bench's variants for a rung: its settings as extra settings, seeds as the bench gives them, the
    transferred rate as the declared one (transfer), and the decay that holds record 8's integral."""
    vs = []
    for name in plan.names:
        control = name == bench.CONTROL
        main_offset = bench.CONTROL_SEED_OFFSET if control else 0
        grid_offset = bench.CONTROL_GRID_SEED_OFFSET if control else bench.GRID_SEED_OFFSET
        try:
            v = bench.make_variant(name, plan.root, [main_offset + s for s in range(seeds)], rung.settings(),
                                   [grid_offset + s for s in range(plan.lr_seeds)])
        except SystemExit as err:
            raise _reworded(err, f"rung {rung.name}: ") from None
        if tune == "transfer" and not v.groups:
            v.lr_declared = rates[name]
        if v.decay:  # held at record 8's integral at every rate the bench tries: wd x lr = const
            v.decay = (v.decay[0], decay_coefficient(rung.steps, v.lr_declared))
        vs.append(v)
    return vs


def run_rung(rung: Rung, plan: Plan, rungs_order: Sequence[str], runner: bench.Runner) -> list[str]:
    """Run (resumably) one rung with the bench and merge its rows into the CSVs -> failed-control messages."""
    tune, seeds = tuning_of(rung, plan.full_grid), plan.seeds or rung.seeds
    csv_path, runs_path = plan.csv_dir / "ladder.csv", plan.csv_dir / "ladder_runs.csv"
    rows = read_rows(csv_path)
    rates = transferred_rates(rung, plan.names, rows, csv_path) if tune == "transfer" else {}
    vs = make_variants(rung, plan, tune, seeds, rates)
    keys = {v.name: plan_key(rung, v, tune) for v in vs}
    done = {r["variant"]: r for r in rows if r.get("rung") == rung.name}
    if all(n in done and done[n].get("status") == "ok" and done[n].get("plan_key") == keys[n] for n in plan.names):
        print(f"rung {rung.name}: every variant's row in {csv_path} has this plan: nothing to run", flush=True)
        return []
    hours = wall_hours(planned_runs(rung, plan.names, seeds, plan.lr_seeds, tune), rung.run_seconds, plan.parallel)
    print(f"rung {rung.name}: width {rung.width}, {rung.steps} steps of {rung.batch_tokens:,} bytes, "
          f"{rung.tokens_per_param:.3g} tokens/param ({rung.corpus}), tuning {tune}, {seeds} seeds; "
          f"estimated {hours:.2f} h", flush=True)
    lr_points = bench.LR_POINTS if tune == "full" else 1
    journal = bench.Journal([runs_path], plan.csv_dir / JOURNAL)  # each run kept as it ends: see the module doc
    try:
        results, failed = bench.run_bench(vs, plan.out / rung.name, rung.steps, bench.BUDGETS, seeds, lr_points,
                                          plan.parallel, rung.settings(), False, plan.root, runner, reps=plan.reps,
                                          journal=journal)
    except SystemExit as err:
        raise _reworded(err, f"rung {rung.name}: ") from None
    fields = rung_fields(rung, tune, seeds)
    new = []
    for row in bench.csv_rows(results, rung.steps):
        pairs = int(row["seed_pairs"] or 0)
        df = str(pairs - 1 if pairs else 2 * seeds - 2) if row["ci_low"] else ""  # as bench.budget_ratio's
        new.append({**fields, **row, "ci_df": df,
                    "plan_key": keys[row["variant"]]})
    write_csv(csv_path, merge_rows(rows, new, rung.name, plan.names, rungs_order))
    runs = [{**fields, **r} for r in read_rows(plan.out / rung.name / "bench_runs.csv")]
    write_csv(runs_path, merge_rows(read_rows(runs_path), runs, rung.name, plan.names, rungs_order))
    print(f"rung {rung.name}: rows written to {csv_path} and {runs_path}", flush=True)
    return [f"rung {rung.name}: {m}" for m in failed]


# ----------------------------------------------------------------------------- the trend and the report


@dataclass
class Trend:
    """ln ratio = intercept + slope x ln(tokens per parameter), and its value at the GPU run's horizon."""

    intercept: float
    slope: float
    cov: np.ndarray  # [2, 2], scaled by max(1, chi^2 / (n - 2))
    points: int
    scale: float  # the factor applied to the covariance
    at_gpu: float  # ratio at GPU_TOKENS_PER_PARAM
    gpu_low: float
    gpu_high: float

    def ratio_band(self, tokens_per_param: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, ...]:
        """(ratio, low, high) along x, the 95% normal band of the fitted line."""
        x = np.log(np.asarray(tokens_per_param, np.float64))
        design = np.stack([np.ones_like(x), x], axis=-1)  # [n, 2]
        y = design @ np.array([self.intercept, self.slope])
        sd = np.sqrt(np.einsum("ni,ij,nj->n", design, self.cov, design))
        return np.exp(y), np.exp(y - z * sd), np.exp(y + z * sd)


def standard_error(ci_low: float, ci_high: float, df: int) -> float:
    """The standard error of ln ratio behind a CI ln ratio +- t(0.975, df) x se."""
    from scipy import stats as scipy_stats

    return (math.log(ci_high) - math.log(ci_low)) / (2 * float(scipy_stats.t.ppf(0.975, max(1, df))))


def fit_trend(tokens_per_param: Sequence[float], ratios: Sequence[float], se: Sequence[float],
              at: float = GPU_TOKENS_PER_PARAM) -> Trend | None:
    """Weighted least squares of ln ratio on ln(tokens per parameter), weights 1 / se^2 (se of ln ratio);
    None with fewer than two distinct horizons. The covariance (X' W X)^-1 is scaled by chi^2 / (n - 2) when
    that exceeds 1 (the points scatter more than their errors say)."""
    x, y = np.log(np.asarray(tokens_per_param, np.float64)), np.log(np.asarray(ratios, np.float64))
    s = np.asarray(se, np.float64)
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(s) & (s > 0)
    x, y, s = x[keep], y[keep], s[keep]
    if len(np.unique(np.round(x, 9))) < 2:
        return None
    design = np.stack([np.ones_like(x), x], axis=1)  # [n, 2]
    w = 1.0 / s**2
    cov = np.linalg.inv(design.T @ (design * w[:, None]))
    coef = cov @ design.T @ (w * y)
    scale = 1.0
    if len(x) > 2:
        chi2 = float(np.sum(w * (y - design @ coef) ** 2))
        scale = max(1.0, chi2 / (len(x) - 2))
    cov = cov * scale
    trend = Trend(float(coef[0]), float(coef[1]), cov, len(x), scale, 0.0, 0.0, 0.0)
    mid, low, high = trend.ratio_band(np.array([at]))
    trend.at_gpu, trend.gpu_low, trend.gpu_high = float(mid[0]), float(low[0]), float(high[0])
    return trend


@dataclass
class Point:
    """One variant on one rung, from ladder.csv."""

    rung: str
    variant: str
    tokens_per_param: float
    ratio: float
    ci_low: float
    ci_high: float
    df: int
    extrapolated: bool
    verdict: str
    edge: str
    corpus: str = ""

    @property
    def se(self) -> float:
        return standard_error(self.ci_low, self.ci_high, self.df)


def _float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def points_of(rows: list[dict[str, str]], names: Sequence[str] | None = None) -> dict[str, list[Point]]:
    """{variant: its rungs with a ratio and a CI}, the baseline (the reference) left out."""
    out: dict[str, list[Point]] = {}
    for r in rows:
        name = r.get("variant", "")
        if name == "baseline" or (names and name not in names):
            continue
        df = _float(r.get("ci_df"))
        p = Point(r.get("rung", ""), name, _float(r.get("tokens_per_param")), _float(r.get("ratio")),
                  _float(r.get("ci_low")), _float(r.get("ci_high")), int(df) if math.isfinite(df) and df >= 1 else 1,
                  r.get("extrapolated") == "true", r.get("verdict_holm") or r.get("verdict", ""),
                  r.get("lr_grid_edge", ""), r.get("corpus", ""))
        if all(math.isfinite(v) and v > 0 for v in (p.tokens_per_param, p.ratio, p.ci_low, p.ci_high)):
            out.setdefault(name, []).append(p)
    return out


def trends_of(points: dict[str, list[Point]]) -> dict[str, Trend | None]:
    return {name: fit_trend([p.tokens_per_param for p in ps], [p.ratio for p in ps], [p.se for p in ps])
            for name, ps in points.items()}


def plot_ladder(path: Path, points: dict[str, list[Point]], trends: dict[str, Trend | None]) -> None:
    """Ratio against tokens per parameter (log x), 95% CIs (triangles: rungs on the bench's Shakespeare, circles:
    on the poetry corpus; hollow: extrapolated), the trends carried to the GPU run's horizon (squares, drawn
    just left of it) and the public GPU ratios there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = sorted(set(points) | set(GPU_RATIOS))
    color = {n: colors[i % len(colors)] for i, n in enumerate(names)}
    lows = [p.tokens_per_param for ps in points.values() for p in ps] or [0.35]
    for i, name in enumerate(sorted(points)):
        ps = sorted(points[name], key=lambda p: p.tokens_per_param)
        shift = math.exp(0.04 * (i - (len(points) - 1) / 2))  # side by side at a shared horizon
        for p in ps:
            x = p.tokens_per_param * shift
            ax.errorbar([x], [p.ratio], yerr=[[p.ratio - p.ci_low], [p.ci_high - p.ratio]],
                        fmt="^" if p.corpus == "shakespeare" else "o",
                        color=color[name], mfc="white" if p.extrapolated else color[name], capsize=3, ms=6)
        trend = trends.get(name)
        label = name
        if trend is not None:
            xs = np.geomspace(min(lows) * 0.9, GPU_TOKENS_PER_PARAM, 80)
            mid, low, high = trend.ratio_band(xs)
            ax.plot(xs, mid, color=color[name], lw=1.2)
            ax.fill_between(xs, low, high, color=color[name], alpha=0.12, lw=0)
            ax.errorbar([GPU_TOKENS_PER_PARAM * 0.9 * shift], [trend.at_gpu],
                        yerr=[[trend.at_gpu - trend.gpu_low], [trend.gpu_high - trend.at_gpu]], fmt="s",
                        color=color[name], mfc="white", capsize=4, ms=6)
            label += (f" (trend at {GPU_TOKENS_PER_PARAM}: {trend.at_gpu:.2f} "
                      f"[{trend.gpu_low:.2f}, {trend.gpu_high:.2f}])")
        ax.plot([], [], "o-", color=color[name], label=label)
    for name, marks in GPU_RATIOS.items():
        for (what, ratio), marker in zip(marks, ("*", "D"), strict=False):
            ax.plot([GPU_TOKENS_PER_PARAM], [ratio], marker, color=color[name], ms=13 if marker == "*" else 8,
                    mec="black", ls="none", label=f"GPU, public: {what} = {ratio:.2f}")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.axvline(GPU_TOKENS_PER_PARAM, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ticks = sorted({round(p.tokens_per_param, 2) for ps in points.values() for p in ps} | {GPU_TOKENS_PER_PARAM})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("tokens (bytes) per block-matrix parameter (log)")
    ax.set_ylabel("steps to the baseline's loss, ratio to the baseline")
    ax.set_title("The transfer ladder: steps to the baseline's loss against the horizon\n95% CIs; triangles: the "
                 "bench (Shakespeare), circles: poetry, hollow: extrapolated; lines: weighted fits, carried to "
                 f"{GPU_TOKENS_PER_PARAM}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def report(csv_dir: Path, figure: Path | None, names: Sequence[str] | None = None) -> str:
    """The tables of ladder.csv and the trends; draws the figure (None: no figure). -> the text printed."""
    csv_path = csv_dir / "ladder.csv"
    rows = read_rows(csv_path)
    if not rows:
        _refuse(f"nothing to report: no rows in {csv_path}; run tools/ladder first")
    shown = [r for r in rows if not names or r.get("variant") in names]
    table = [{"rung": r.get("rung", ""), "tokens/param": r.get("tokens_per_param", ""), "variant": r.get("variant", ""),
              "tuning": r.get("tuning", ""), "rate": r.get("tuned_lr", "") + (f" ({r['lr_grid_edge']} edge)"
                                                                              if r.get("lr_grid_edge") else ""),
              "ratio": "1 (reference)" if r.get("variant") == "baseline" else r.get("ratio", ""),
              "95% CI": f"[{r['ci_low']}, {r['ci_high']}]" if r.get("ci_low") else "",
              "p (Holm)": r.get("p_holm", ""), "verdict (Holm)": r.get("verdict_holm", ""),
              "status": r.get("status", "")} for r in shown]
    points = points_of(rows, names)
    trends = trends_of(points)
    trend_rows = []
    for name, ps in sorted(points.items()):
        t = trends[name]
        gpu = ", ".join(f"{v:.2f}" for _, v in GPU_RATIOS.get(name, []))
        trend_rows.append({
            "variant": name, "rungs": str(len(ps)),
            "slope d ln ratio / d ln(tokens/param)": "" if t is None else
                f"{t.slope:+.3f} +- {math.sqrt(t.cov[1, 1]):.3f}",
            f"ratio at {GPU_TOKENS_PER_PARAM} [95% CI]": "" if t is None else
                f"{t.at_gpu:.3f} [{t.gpu_low:.3f}, {t.gpu_high:.3f}]",
            "scatter scale": "" if t is None else f"{t.scale:.2f}", "GPU (public)": gpu})
    text = [format_table(table, list(table[0])) if table else "(no rows for these variants)"]
    if trend_rows:
        text += ["", "trend per variant (weighted fit of ln ratio on ln tokens/param, carried to the GPU run):",
                 format_table(trend_rows, list(trend_rows[0]))]
    if figure is not None and points:
        plot_ladder(figure, points, trends)
        text.append(f"wrote {figure}")
    return "\n".join(text)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, runner: bench.Runner = bench.subprocess_runner, root: Path | None = None,
         rungs: Sequence[Rung] | None = None) -> None:
    parser = make_parser(TOOL, __doc__)
    parser.error = lambda message: _refuse(f"{message}; see {TOOL} --help")
    parser.add_argument("--rungs", default=None, help="names, default (the rungs marked so) or all, e.g. "
                        "--rungs=default,bench (tools/ladder --list --rungs=all prints them)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated (default {','.join(DEFAULT_VARIANTS)}); add 'control' for the A/A "
                             "control")
    parser.add_argument("--seeds", type=int, default=None, help="confirmation seeds on every rung, 3 or more "
                        "(default: the rung's, 5 on the cheap rungs, 3 above)")
    parser.add_argument("--lr-seeds", type=int, default=bench.LR_SEEDS,
                        help=f"grid seeds per rate (default {bench.LR_SEEDS})")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, one thread each (default 1)")
    parser.add_argument("--full-grid", action="store_true", help="tune every chosen rung with the bench's full "
                        "search (no transfer)")
    parser.add_argument("--out", type=Path, default=None, help="the runs' folder, one sub-folder per rung "
                        "(default bench_out/ladder/)")
    parser.add_argument("--csv-dir", type=Path, default=None, help="where ladder.csv and ladder_runs.csv go "
                        "(default ladder/)")
    parser.add_argument("--figure", type=Path, default=None, help="the plot (default docs/figures/ladder.png)")
    parser.add_argument("--list", action="store_true", help="print the rung table and the cost estimate; run nothing")
    parser.add_argument("--report", action="store_true", help="run nothing: the tables, trends and figure from "
                        "the CSVs")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for option, value, low in (("--seeds", args.seeds, 3), ("--lr-seeds", args.lr_seeds, 1),
                               ("--parallel", args.parallel, 1)):
        if value is not None and value < low:
            _refuse(f"{option}={value}: give a whole number >= {low}")
    root = variants.REPO_ROOT if root is None else root
    table = RUNGS if rungs is None else rungs
    chosen = choose_rungs(args.rungs, table)
    names = [n for n in args.variants.split(",") if n] if args.variants else list(DEFAULT_VARIANTS)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        _refuse(f"--variants lists {', '.join(twice)} twice; give each variant once")
    if "baseline" not in names:
        names = ["baseline", *names]
    csv_dir = args.csv_dir or root / "ladder"
    figure = args.figure or root / "docs" / "figures" / "ladder.png"
    if args.list:
        print(table_text(chosen, names, args.seeds, args.lr_seeds, args.parallel, args.full_grid))
        return
    if args.report:
        print(report(csv_dir, figure, names if args.variants else None))
        return
    out = (args.out or root / "bench_out" / "ladder").resolve()
    if out.exists() and not out.is_dir():
        _refuse(f"--out {out} is a file; --out must be a folder (a new or an existing one)")
    check_data(chosen, root)
    known = {r.name for r in chosen} | {r.get("rung") for r in read_rows(csv_dir / "ladder.csv")}
    for r in chosen:
        if tuning_of(r, args.full_grid) == "transfer" and r.source not in known:
            _refuse(f"rung {r.name} starts from the rates tuned on rung {r.source}, which is neither chosen nor in "
                    f"{csv_dir / 'ladder.csv'}: add it (--rungs={r.source},{r.name}) or use --full-grid")
    print(table_text(chosen, names, args.seeds, args.lr_seeds, args.parallel, args.full_grid), flush=True)
    plan = Plan(names, args.seeds, args.lr_seeds, args.parallel, out, csv_dir, root, args.full_grid)
    started, failed = time.monotonic(), []
    CHILDREN.reset()
    with holding_out(out, LOCK, TOOL), forwarding_signals(TOOL):
        refuse_if_running(sorted(out.glob("*/logs/*.lock")), TOOL)
        for i, rung in enumerate(chosen):
            print(f"\n==== rung {i + 1}/{len(chosen)}: {rung.name}", flush=True)
            failed += run_rung(rung, plan, [r.name for r in table], runner)
    print("\n" + report(csv_dir, figure), flush=True)
    print(f"wall time {time.monotonic() - started:.0f} s", flush=True)
    if failed:
        print("\n" + "!" * 80 + "\n" + "\n".join(failed) + "\n" + "!" * 80, flush=True)
        raise SystemExit(1)

