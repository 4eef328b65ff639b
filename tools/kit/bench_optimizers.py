"""Benchmark optimizer variants on the CPU preset: steps to reach a target val loss, final loss.

Example: tools/bench_optimizers --steps=100 --val-every=10 --seeds=2 --variants=baseline,adamw [--field=value ...]

Trains every chosen variant (default: baseline, polar, polar_normuon, adamw, svd) with
--preset=cpu for a fixed step budget and several seeds, one after another in this one command,
then reports for each variant the steps needed to reach the target validation loss (on the
seed-mean validation curve, linearly interpolated between validations; also the range over
seeds), the final loss (mean ± std) and the ratio of steps to the baseline's. The target defaults
to the highest seed-mean final loss among the variants, so that every variant reaches it.
Variants without a script are reported as missing. Finished runs are reused on a rerun.
Writes OUT/bench.csv (one row per variant) and OUT/bench_runs.csv (one per run).

At full scale on the public optimization track Muon reached the target in 3325 steps against
AdamW's 5625 (ratio 0.59); the last line says what this benchmark finds on the CPU preset.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from . import stats, variants
from .cliutil import format_table, make_parser, write_csv
from .compare import group_curve
from .logs import Run, Validation, steps_to_target
from .sweep import Point, launch_prefix, run_id_for, run_points, script_sha

DEFAULT_VARIANTS = ["baseline", "polar", "polar_normuon", "adamw", "svd"]
FULL_SCALE = {"muon": 3325, "adamw": 5625}


@dataclass
class VariantResult:
    """A variant's runs: the seed-mean curve, final losses and steps to the target."""

    variant: str
    status: str
    points: list[Point]
    mean_curve: list[Validation]
    finals: list[float]


def mean_curve(runs: list[Run]) -> list[Validation]:
    """Seed-mean validation curve (runs: [seeds], each with validations) at the steps all share,
    as Validations (step, mean loss, mean train time in ms); see compare.group_curve."""
    if not runs:
        return []
    c = group_curve(runs)
    return [Validation(s, loss, t * 1000.0) for s, loss, t in zip(c.steps, c.mean_loss, c.mean_time_s, strict=True)]


def auto_target(results: list[VariantResult]) -> float | None:
    """The highest seed-mean final loss among variants with results (every variant reaches it)."""
    finals = [r.mean_curve[-1].val_loss for r in results if r.mean_curve]
    return max(finals) if finals else None


def make_points(variant: str, script: Path, seeds: list[int], base_args: list[str], out: Path) -> list[Point]:
    points = []
    code_sha = script_sha(script)
    for seed in seeds:
        values = {"seed": str(seed)}
        run_id = run_id_for("bench", variant, values, base_args, code_sha)
        cmd = [
            *launch_prefix(script, 1),
            f"--run_id={run_id}",
            f"--log_dir={out / 'logs'}",
            *base_args,
            f"--seed={seed}",
        ]
        points.append(Point(run_id, cmd, out / "logs" / f"{run_id}.txt", out / "stdout" / f"{run_id}.txt", values))
    return points


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report(results: list[VariantResult], target: float | None) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(per-variant rows, per-run rows) for the table and the CSV files."""
    base = next((r for r in results if r.variant == "baseline" and r.mean_curve), None)
    base_steps = steps_to_target(base.mean_curve, target) if base and target is not None else None
    rows, run_rows = [], []
    for r in results:
        row = {"variant": r.variant, "status": r.status, "runs": str(len(r.finals))}
        row.update({"target": _fmt(target, ".4f"), "steps to target": "", "seed range": "", "ratio to baseline": ""})
        row.update({"final val loss": "", "final std": ""})
        per_seed = []
        for p in r.points:
            reached = steps_to_target(p.run.validations, target) if p.run and target is not None else None
            per_seed.append(reached)
            run_rows.append(
                {
                    "variant": r.variant,
                    "seed": p.values.get("seed", ""),
                    "run_id": p.run_id,
                    "status": p.status,
                    "final_val_loss": _fmt(p.run.final_val_loss if p.run else None, ".6f"),
                    "steps_to_target": _fmt(reached, ".1f"),
                }
            )
        if r.mean_curve and target is not None:
            steps = steps_to_target(r.mean_curve, target)
            row["steps to target"] = _fmt(steps, ".1f") or "not reached"
            got = [s for s in per_seed if s is not None]
            row["seed range"] = f"{min(got):.1f}-{max(got):.1f} ({len(got)}/{len(per_seed)})" if got else "none"
            if steps is not None and base_steps:
                row["ratio to baseline"] = f"{steps / base_steps:.3f}"
        if r.finals:
            s = stats.summarize(r.finals)
            row["final val loss"] = f"{s.mean:.4f}"
            row["final std"] = _fmt(s.std, ".4f")
        rows.append(row)
    return rows, run_rows


def answer(rows: list[dict[str, str]]) -> str:
    """One line: does Muon (the baseline) reach the target in fewer steps than AdamW here?"""
    by = {r["variant"]: r for r in rows}
    full = f"full scale: Muon {FULL_SCALE['muon']} vs AdamW {FULL_SCALE['adamw']} steps, ratio "
    full += f"{FULL_SCALE['muon'] / FULL_SCALE['adamw']:.2f}"
    try:
        muon, adamw = float(by["baseline"]["steps to target"]), float(by["adamw"]["steps to target"])
    except (KeyError, ValueError):
        return f"Muon vs AdamW: not measured (needs baseline and adamw results reaching the target); {full}"
    verdict = "fewer" if muon < adamw else "not fewer"
    return f"Muon (baseline) needs {muon:.1f} steps, AdamW {adamw:.1f}: {verdict} (ratio {muon / adamw:.2f}); {full}"


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("tools/bench_optimizers", __doc__)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated variant names")
    parser.add_argument("--steps", type=int, default=200, help="training steps of every run (200)")
    parser.add_argument("--val-every", type=int, default=20, help="validation cadence in steps (20)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per variant (2)")
    parser.add_argument("--target", type=float, default=None, help="target val loss (default: auto, see above)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (1)")
    parser.add_argument("--out", type=Path, default=variants.REPO_ROOT / "bench_out", help="output folder")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        raise SystemExit(f"tools/bench_optimizers: unexpected {bad[0]!r}; extra training fields go as --field=value")
    if args.steps < 1 or args.val_every < 1 or args.seeds < 1 or args.parallel < 1:
        raise SystemExit("tools/bench_optimizers: --steps, --val-every, --seeds and --parallel must be >= 1")
    names = [v for v in args.variants.split(",") if v]
    out = args.out.resolve()
    base_args = [
        "--preset=cpu",
        f"--num_iterations={args.steps}",
        f"--val_loss_every={args.val_every}",
        "--checkpoint_every=",
        f"--checkpoint_dir={out / 'checkpoints'}",
        *extra,
    ]
    seeds = list(range(args.seeds))
    planned: dict[str, list[Point]] = {}
    for name in names:
        script = variants.script_path(name)
        if script.exists():
            planned[name] = make_points(name, script, seeds, base_args, out)
        else:
            print(f"{name}: missing (no {script.relative_to(variants.REPO_ROOT)})", flush=True)
    every = [p for points in planned.values() for p in points]
    print(f"{len(every)} run(s): {', '.join(planned)} x {len(seeds)} seed(s) x {args.steps} steps", flush=True)
    run_points(every, variants.REPO_ROOT, args.parallel)
    results = []
    for name in names:
        if name not in planned:
            results.append(VariantResult(name, "missing", [], [], []))
            continue
        points = planned[name]
        done = [p.run for p in points if p.run is not None]
        status = "ok" if len(done) == len(points) else f"{len(points) - len(done)} run(s) failed"
        curve = mean_curve(done)
        results.append(VariantResult(name, status, points, curve, [r.final_val_loss for r in done]))
    target = args.target if args.target is not None else auto_target(results)
    rows, run_rows = report(results, target)
    print(format_table(rows, list(rows[0])))
    if run_rows:
        write_csv(out / "bench_runs.csv", run_rows)
    write_csv(out / "bench.csv", rows)
    print(f"csv: {out / 'bench.csv'} and {out / 'bench_runs.csv'}")
    print(answer(rows))
