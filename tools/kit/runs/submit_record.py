"""Check a set of training logs and append them as one row of records.md, archiving the logs.

Example: tools/submit_record logs/run_a.txt logs/run_b.txt logs/run_c.txt --name polar_lr06

Every run in every log is parsed; all must come from one committed variant (the source embedded
in each log is hashed and matched against speedruns/train_gpt_medium*.py), have the same step
count and the same settings (the `hyperparameters:` line of each log; only run_id, log_dir,
checkpoint_dir, checkpoint_every, val_loss_every and seed may differ; its num_iterations must be the T of
the step lines), a finite final validation loss, and a run id that is neither given twice nor already
archived under records/; a run whose step lines repeat another's (a log concatenated with itself or with
another log) is refused, so each run counts once. Settings the script has but no log records are named
as absent in the row, not passed off as defaults. The final validation losses
give mean, std and n, the public significance rule (decided exactly on the logged digits) and a
comparison with the current baseline record: the baseline's runs archived in records/ (the latest
baseline row with the same steps and settings), else the public record #8 reference figures.
The row names the settings that differ from the script's preset. The default --target is the
public 2.92; CPU-preset runs need a target at their own scale (or --allow-insignificant, which
records the row marked as not significant). The whole read-check-archive-append is done under a
lock (records.md.lock beside records.md), so concurrent submissions all land.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.cli import make_parser
from core.files import atomic_write_text
from kit.patching import variants
from kit.runs import stats
from kit.runs.logs import (
    RESULT_NEUTRAL,
    SEPARATOR,
    LogError,
    LogFile,
    Run,
    comparable_settings,
    expand_log_paths,
    format_settings,
    parse_log,
    read_identity,
    script_defaults,
    settings_differences,
)

# Public GPT-2 Medium record #8 (modded-nanogpt, 2025-04-22), read from its log's last lines:
# `step:5960/5960 val_loss:2.919750 train_time:1468898ms step_avg:246.46ms`. A single run.
PUBLIC_REFERENCE = {
    "name": "Public record #8 (modded-nanogpt GPT-2 Medium, 2025-04-22)",
    "date": "2025-04-22",
    "steps": 5960,
    "final_val_loss": 2.919750,
    "train_time_ms": 1468898.0,
    "step_avg_ms": 246.46,
}

TABLE_COLUMNS = [
    "date",
    "variant",
    "steps",
    "settings",
    "mean train time",
    "mean val loss (n)",
    "significance",
    "vs baseline",
    "logs",
    "description",
]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# The public medium optimizer leaderboard, the reference our own rows read against (records.md).
LEADERBOARD = [
    '## Public reference: the NanoGPT-Medium optimizer leaderboard (not ours)',
    '',
    "modded-nanogpt's [optimizer leaderboard](https://github.com/KellerJordan/modded-nanogpt/blob/master/records/track_2_medium/OptimizationLeaderboard/README.md)",
    'keeps record #8 fixed (architecture, data, 524,288-token batch) and changes only the optimizer of the',
    "hidden matrices; the head, embeddings and scalars keep record #8's Adam. Score: the run length (the",
    'schedule stretched to it) that reaches 2.92 validation loss, on 8xH100, one run each as published.',
    '',
    '| optimizer | steps to 2.92 | settings | date | our variant | public log |',
    '| --- | --- | --- | --- | --- | --- |',
    '| Muon (record #8) | 5960 | lr 0.025, wd 0.01 (x2 on MLP matrices; ~165 steps more without), momentum 0.85 -> 0.95 over 300 steps, bf16 weights + mantissa state | 2025-04-22 | `baseline` | [075_640429f2-e726-4e83-aa27-684626239ffc.txt](https://github.com/KellerJordan/modded-nanogpt/blob/master/records/track_2_medium/2025-04-22_Record8/075_640429f2-e726-4e83-aa27-684626239ffc.txt) |',  # noqa: E501
    '| AdamW | 9500 | lr 0.0015, wd 0.125, betas (0.9, 0.95), eps 1e-10, linear warm-up of every lr over the first 500 steps, fp32 weights | 2025-06-19 | `adamw --num_iterations=9500` | none published |',  # noqa: E501
    '| AdamW, bf16 weights | 10500 | the same, bf16 weights | 2025-06-15 | | none published |',
    '| PSGD Kron | 9000 (history table; 7875 in the overall table) | lr 0.0005, wd 0.625, no warm-up, kron-torch defaults, fp32 weights | 2025-06-19 | `kron --num_iterations=9000` | none published |',  # noqa: E501
    '| PSGD Kron, bf16 weights | 9000 | the same, bf16 weights | 2025-06-19 | | none published |',
    '',
    "Muon needs 0.63x AdamW's steps (5960 / 9500) and 0.66x Kron's (5960 / 9000; 0.76x against 7875).",
]


def records_header() -> str:
    """The text records.md starts with: explanation, public reference figures, table header."""
    ref = PUBLIC_REFERENCE
    return "\n".join(
        [
            "# Records",
            "",
            "One row per submitted set of runs of one variant, appended by `tools/submit_record`",
            "(never edit rows by hand). Columns:",
            "",
            "- **date**: UTC date of submission. **variant**: the committed script the logs' embedded",
            "  source matches (`baseline` = `speedruns/train_gpt_medium.py`). **steps**: training steps.",
            "- **settings**: the preset and every setting that differs from that preset's value in the",
            "  script (from each log's `hyperparameters:` line). The runs of a row may differ only in",
            f"  {', '.join(RESULT_NEUTRAL)}:",
            "  these cannot change the final loss or are meant to differ between repeated runs.",
            "- **mean train time**: mean over runs of the final `train_time` (validation excluded).",
            "- **mean val loss (n)**: mean ± sample std of the final validation loss over n runs.",
            "- **significance**: the public speedrun rule (target - mean) * sqrt(n) >= 0.004 (sigma 0.0013),",
            "  decided exactly on the logged digits; the cell shows (target - mean) * sqrt(n), the target",
            "  and the **one-sided** p-value of the z-test of mean < target it amounts to (the rule's",
            "  threshold is p = 0.00105, \"p < 0.001\"). Rows that fail it are only recorded with",
            "  `--allow-insignificant` and say **no**.",
            "- **vs baseline**: mean loss difference to the current baseline record and its **two-sided**",
            "  p-value (Welch's t-test; a one-sample t-test when one side has a single run). The baseline",
            "  record is the latest `baseline` row with the same steps and settings, else the public",
            "  reference run below.",
            "- **logs**: the archived logs (`records/<date>_<name>/`). **description**: the one-line",
            "  descriptions of the variant's patches (`patches/*.patch` headers).",
            "",
            "## Public reference run (not ours)",
            "",
            f"**{ref['name']}**, from its log: {ref['steps']} steps, final val loss "
            f"{ref['final_val_loss']:.6f}, train time {ref['train_time_ms'] / 1000:.1f} s "
            f"({ref['train_time_ms'] / 60000:.2f} min), step avg {ref['step_avg_ms']:.2f} ms, 8xH100, one run.",
            "",
            *LEADERBOARD,
            "",
            "## Our records",
            "",
            "| " + " | ".join(TABLE_COLUMNS) + " |",
            "|" + "|".join(" --- " for _ in TABLE_COLUMNS) + "|",
            "",
        ]
    )


@dataclass
class Submission:
    """What the logs say: the variant, steps, final losses and times of every finished run, the
    run ids, and the settings (the first log's hyperparameters; all logs agree on them) with the
    settings cell of the row."""

    variant: str
    steps: int
    losses: list[float]
    times_ms: list[float]
    paths: list[Path]
    run_ids: list[str]
    hyperparameters: dict
    settings: str


def _fail(message: str) -> None:
    raise SystemExit(message)


def _is_date(text: str) -> bool:
    """Whether text is YYYY-MM-DD and a real day (2026-02-30 is not)."""
    try:
        return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", text)) and bool(_dt.date.fromisoformat(text))
    except ValueError:
        return False


def _value(settings: dict, key: str) -> str:
    return repr(settings[key]) if key in settings else "(absent)"


def _run_key(run: Run) -> tuple:
    """What a run's step lines say: two runs with equal keys are one run logged twice (train times in ms
    make independent runs differ)."""
    curve = tuple((v.step, v.val_loss, v.train_time_ms) for v in run.validations)
    return run.num_iterations, run.last_step, run.train_time_ms, curve


def collect(paths: list[Path], repo: Path) -> Submission:
    """Parse and check the logs; SystemExit with a one-line message naming the file on a problem."""
    shas = variants.variant_shas(repo)
    parsed: list[tuple[Path, LogFile, str]] = []
    seen: dict[str, Path] = {}
    run_ids: dict[str, Path] = {}
    for path in paths:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            _fail(f"refused: {path}: same content as {seen[digest]}; give each log once")
        seen[digest] = path
        headers = re.findall(rb"^hyperparameters:", data.split(SEPARATOR.encode(), 1)[-1], flags=re.M)
        if len(headers) > 1:
            _fail(f"refused: {path}: holds {len(headers)} 'hyperparameters:' lines, so logs were concatenated into "
                  "one and its runs would count under one run id; give each run's own log")
        try:
            log = parse_log(path)
        except LogError as err:
            _fail(f"refused: {err}")
        if log.source_sha256 is None:
            _fail(f"refused: {path}: the log carries no source code, so its variant cannot be checked")
        variant = shas.get(log.source_sha256)
        if variant is None:
            _fail(
                f"refused: {path}: its code (sha256 {log.source_sha256[:12]}) matches no committed variant "
                f"in {repo / 'speedruns'}; rerun with a committed script (or regenerate it with tools/apply_patch)"
            )
        if not log.run_id:
            _fail(f"refused: {path}: no 'variant:... run_id:ID' environment line, so the run cannot be identified")
        if log.run_id in run_ids:
            _fail(f"refused: {path}: run id {log.run_id} is also that of {run_ids[log.run_id]}; give each run once")
        run_ids[log.run_id] = path
        if log.hyperparameters is None:
            _fail(f"refused: {path}: no 'hyperparameters:' environment line, so its settings are unknown")
        if not log.finished_runs():
            _fail(f"refused: {path}: no finished run (no validation line at step T/T)")
        for run in log.finished_runs():
            if not math.isfinite(run.final_val_loss):
                line = run.validations[-1].line
                _fail(f"refused: {path}:{line}: final val_loss is {run.final_val_loss}; a diverged run cannot count")
        logged_steps = log.hyperparameters.get("num_iterations")
        for run in log.finished_runs():
            if logged_steps is not None and logged_steps != run.num_iterations:
                line = run.validations[-1].line
                _fail(f"refused: {path}:{line}: the step lines count to {run.num_iterations} steps but the "
                      f"hyperparameters line says num_iterations={logged_steps}; the log was edited or mixes runs")
        unfinished = len(log.runs) - len(log.finished_runs())
        if unfinished:
            print(f"note: {path}: {unfinished} unfinished run(s) left out", flush=True)
        parsed.append((path, log, variant))
    first_path, first_log, first_variant = parsed[0]
    losses: list[float] = []
    times: list[float] = []
    steps: int | None = None
    seeds: dict[object, Path] = {}
    for path, log, variant in parsed:
        if variant != first_variant:
            _fail(f"refused: {path}: mixed variants: {variant} here, {first_variant} in {first_path}; one per row")
        for run in log.finished_runs():
            if steps is None:
                steps = run.num_iterations
            elif run.num_iterations != steps:
                _fail(f"refused: {path}: a run of {run.num_iterations} steps mixed with runs of {steps} steps")
            losses.append(run.final_val_loss)
            times.append(run.train_time_ms)
        differing = settings_differences(log.hyperparameters, first_log.hyperparameters)
        if differing:
            here, there = log.hyperparameters, first_log.hyperparameters
            detail = ", ".join(f"{k}={_value(here, k)} vs {_value(there, k)}" for k in differing)
            _fail(f"refused: {path}: settings differ from {first_path}: {detail}; submit runs of one setting per row")
        seed = log.hyperparameters.get("seed")
        if seed in seeds:
            print(f"note: {path} and {seeds[seed]} both ran with seed {seed}", flush=True)
        seeds.setdefault(seed, path)
    runs_seen: dict[tuple, str] = {}  # a finished run's step lines -> where they were first seen
    for path, log, _ in parsed:  # last: a copy that differs in settings or variant is refused as such above
        for run in log.finished_runs():
            here = f"{path}:{run.validations[0].line}"
            earlier = runs_seen.setdefault(_run_key(run), here)
            if earlier != here:
                _fail(f"refused: {here}: this run repeats the run at {earlier} step line for step line "
                      "(a log concatenated with itself or with another?); each run counts once: remove the copy")
    hyperparameters = first_log.hyperparameters
    defaults = script_defaults(first_log.source, str(hyperparameters.get("preset", "")))
    settings = format_settings(hyperparameters, defaults, leave_out=("num_iterations",))
    absent = [k for k in comparable_settings(defaults or {}) if k not in hyperparameters
              and k not in ("preset", "num_iterations")]
    if absent:
        settings += f"; absent from the logs (values unknown): {', '.join(absent)}"
    return Submission(first_variant, steps, losses, times, list(paths), list(run_ids), hyperparameters, settings)


def recorded_run_ids(records: Path) -> dict[str, Path]:
    """{run id: archived log} over every log archived beside records.md (records/*/*.txt)."""
    found: dict[str, Path] = {}
    archive = records.parent / "records"
    for log_path in sorted(archive.glob("*/*.txt")) if archive.is_dir() else []:
        if log_path.parent.name.startswith("."):
            continue  # a half-made archive of an interrupted submission (never renamed into place)
        try:
            run_id = read_identity(log_path)[0]
        except LogError:
            continue
        if run_id:
            found.setdefault(run_id, log_path)
    return found


def check_not_recorded(sub: Submission, records: Path) -> None:
    """Refuse a run whose id is already archived (the same run submitted again)."""
    recorded = recorded_run_ids(records)
    for run_id, path in zip(sub.run_ids, sub.paths, strict=True):
        if run_id in recorded:
            _fail(f"refused: {path}: run id {run_id} is already recorded ({recorded[run_id]}); each run counts once")


@contextlib.contextmanager
def records_lock(records: Path):
    """Hold an exclusive fcntl.flock on records.md.lock beside records.md (created if needed)."""
    lock_path = records.with_name(records.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another submission to finish (lock {lock_path})", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- records.md table


def _split_row(line: str) -> list[str]:
    """'| a | b \\| c |' -> ['a', 'b | c']."""
    inner = line.strip()
    inner = inner[1:-1] if inner.startswith("|") and inner.endswith("|") else inner
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def read_rows(records: Path) -> list[dict[str, str]]:
    """The table rows of records.md as {column: cell}; [] if the file does not exist."""
    if not records.exists():
        return []
    rows = []
    for line in records.read_text(encoding="utf-8").split("\n"):
        if not line.startswith("|") or line.startswith("| date ") or set(line) <= set("|- "):
            continue
        cells = _split_row(line)
        if len(cells) == len(TABLE_COLUMNS):
            rows.append(dict(zip(TABLE_COLUMNS, cells, strict=True)))
    return rows


def baseline_record(records: Path, steps: int, settings: str) -> tuple[str, list[float]]:
    """(label, final losses) of the current baseline record: the runs archived for the latest
    baseline row with `steps` steps and the same settings cell, else the public reference run."""
    for row in reversed(read_rows(records)):
        if row["variant"] != variants.BASELINE or row["steps"] != str(steps) or row["settings"] != settings:
            continue
        link = re.search(r"\]\(([^)]+)\)", row["logs"])
        folder = records.parent / link.group(1) if link else None
        if folder is None or not folder.is_dir():
            continue
        losses = []
        for log_path in sorted(folder.glob("*.txt")):
            try:
                runs = parse_log(log_path).finished_runs()
                losses += [r.final_val_loss for r in runs if math.isfinite(r.final_val_loss)]
            except LogError:
                continue
        if losses:
            return f"baseline record {folder.name}", losses
    return "public record #8 (single run)", [PUBLIC_REFERENCE["final_val_loss"]]


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _p_text(p: float) -> str:
    """'= 0.0012', or '< 1e-15' where a p-value underflows double precision's useful range."""
    return "< 1e-15" if p < 1e-15 else f"= {p:.2g}"


def format_row(
    date: str,
    sub: Submission,
    sig: stats.Significance,
    comparison: stats.Comparison,
    baseline_label: str,
    link: str,
    description: str,
) -> str:
    """One markdown table row for records.md."""
    summary = stats.summarize(sub.losses)
    spread = "" if math.isnan(summary.std) else f" ± {summary.std:.5f}"
    mean_time_s = math.fsum(sub.times_ms) / len(sub.times_ms) / 1000.0
    verdict = "yes" if sig.significant else "**no** (recorded with --allow-insignificant)"
    relation = ">=" if sig.significant else "<"
    significance = f"{verdict}: {sig.margin:.4f} {relation} {sig.threshold:g} at target {sig.target:g}"
    significance += f" (one-sided p {_p_text(sig.p_value)})"
    if comparison.p_value is None:
        p_text = "no test"
    else:
        p_text = f"{comparison.test.split(' ')[0]} two-sided p {_p_text(comparison.p_value)}"
    versus = f"{comparison.diff:+.5f} ({p_text}; vs {baseline_label}, n={comparison.n_baseline})"
    cells = [
        date,
        sub.variant,
        str(sub.steps),
        sub.settings,
        f"{mean_time_s:.3f} s",
        f"{summary.mean:.5f}{spread} (n={summary.n})",
        significance,
        versus,
        f"[logs]({link})",
        description,
    ]
    return "| " + " | ".join(_escape(c) for c in cells) + " |"


def archive_logs(paths: list[Path], folder: Path) -> None:
    """Copy the logs into `folder` (which must not exist) all at once: a temp folder then rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        used: set[str] = set()
        for index, path in enumerate(paths):
            name = path.name if path.name not in used else f"{index:02d}_{path.name}"
            used.add(name)
            shutil.copy2(path, tmp / name)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_row(records: Path, row: str) -> None:
    """Append a row to records.md atomically (creating the file with its header if needed)."""
    text = records.read_text(encoding="utf-8") if records.exists() else records_header()
    last = [line for line in text.split("\n") if line.strip()][-1]
    if not last.startswith("|"):
        _fail(f"refused: {records}: does not end with the records table; restore it from git")
    atomic_write_text(records, text.rstrip("\n") + "\n" + row + "\n")


def build_parser():
    parser = make_parser("tools/submit_record", __doc__)
    parser.add_argument("logs", nargs="+", help="log files (or folders of *.txt logs) of one variant")
    parser.add_argument("--name", required=True, help="short name of this record; archive: records/<date>_<name>/")
    parser.add_argument("--target", type=float, default=stats.PUBLIC_TARGET, help="target val loss (2.92)")
    parser.add_argument("--allow-insignificant", action="store_true", help="record even if the rule fails")
    parser.add_argument("--dry-run", action="store_true", help="print the row and write nothing")
    parser.add_argument("--records", type=Path, default=variants.REPO_ROOT / "records.md", help="records file")
    parser.add_argument("--repo", type=Path, default=variants.REPO_ROOT, help="where speedruns/ and patches/ are")
    parser.add_argument("--date", default=None, help="date of the row, YYYY-MM-DD (default: today, UTC)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not _NAME_RE.match(args.name):
        _fail(f"refused: --name {args.name!r}: use letters, digits, '_', '.', '-' only")
    if not math.isfinite(args.target):
        _fail(f"refused: --target {args.target}: give a finite loss, e.g. --target 2.92")
    date = args.date or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")
    if not _is_date(date):
        _fail(f"refused: --date {date!r}: not a calendar date in the form YYYY-MM-DD; e.g. --date 2026-01-31")
    try:
        paths = expand_log_paths(args.logs)
    except LogError as err:
        _fail(f"refused: {err}")
    sub = collect(paths, args.repo)
    try:
        description = variants.variant_description(sub.variant, args.repo)
    except variants.VariantError as err:
        _fail(f"refused: {err}")
    sig = stats.public_significance(sub.losses, target=args.target)
    names = ", ".join(str(p) for p in paths)
    if not sig.significant and not args.allow_insignificant:
        _fail(
            f"refused: {names}: not significant: (target {args.target:g} - mean {sig.mean:.5f}) * sqrt({sig.n}) = "
            f"{sig.margin:.4f} < {sig.threshold:g}; add runs or pass --allow-insignificant"
        )
    records = args.records.resolve()
    folder_name = f"{date}_{args.name}"
    folder = records.parent / "records" / folder_name
    print(f"{sub.variant}: {len(sub.losses)} runs of {sub.steps} steps from {len(paths)} log(s); {sub.settings}")
    with contextlib.nullcontext() if args.dry_run else records_lock(records):
        check_not_recorded(sub, records)
        baseline_label, baseline_losses = baseline_record(records, sub.steps, sub.settings)
        comparison = stats.compare_means(sub.losses, baseline_losses)
        row = format_row(date, sub, sig, comparison, baseline_label, f"records/{folder_name}/", description)
        print(f"comparison with {baseline_label}: {comparison.test}")
        if baseline_label.startswith("public") and sub.steps != PUBLIC_REFERENCE["steps"]:
            print(f"note: {sub.steps} steps against the public run's {PUBLIC_REFERENCE['steps']}: only indicative")
        if args.dry_run:
            print(row)
            print("dry run: nothing written")
            return
        if folder.exists():
            _fail(f"refused: {folder} already exists; choose another --name")
        archive_logs(paths, folder)
        try:
            append_row(records, row)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    print(row)
    print(f"appended to {records}; logs archived in {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
