"""One table of verdicts from many benches, with Holm's correction over the whole table.

Example: tools/verdicts                     # docs/results/verdicts.toml -> docs/results/verdicts.md

Each bench corrects for many comparisons within itself (Holm over its own variants), but the README's table
gathers the variants of many benches, one or two at a time: a family of a dozen claims, each with its own
small family, so the chance of at least one false "faster" in the table is far above 5%. This tool reads
each claim's raw p-value (the bench's two-sided bootstrap test of ratio = 1, the tuning's noise included)
and applies Holm's step-down procedure to all the claims of the table at once: a verdict survives when its
table-wide adjusted p is below 0.05. The comparisons against a variant's own control (norm_matched and the
like) are a second family, corrected the same way over the table.

The spec (TOML, default docs/results/verdicts.toml) lists one [[row]] per claim, in table order:
  label     the name shown;
  bench     a folder (relative to the spec's folder) holding a bench's bench.csv, and variant, the row of
            it (default: the label): ratio, its 95% CI, p, extrapolated, and the vs-its-control columns;
  or, for a bench whose bench.csv was not kept, the numbers themselves: ratio, ci = [low, high], p,
            extrapolated (default false), source (where they are written down; required);
  role      "idea" (default: in the family), or "control" (a positive, A/A or norm_matched control: shown,
            never in the family);
  commit    the commit the bench ran at (shown), and note (shown in the last column).
An extrapolated crossing (beyond the measured budgets) gets no verdict and is not in the family, as in the
bench. Output: the table as Markdown, printed and written atomically to --out (default: the spec's name
with .md); a bad spec or a missing CSV or row is a one-line error.
"""

from __future__ import annotations

import csv
import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from core.cli import make_parser
from core.files import atomic_write_text
from kit.patching import variants
from kit.runs import stats

TOOL = "tools/verdicts"
ALPHA = 0.05
KEYS = {"label", "bench", "variant", "ratio", "ci", "p", "extrapolated", "source", "role", "commit", "note"}


def _refuse(message: str) -> NoReturn:
    raise SystemExit(f"{TOOL}: {message}")


@dataclass
class Comparison:
    """A ratio of steps to a target, its 95% CI, the raw p of ratio = 1, and whether the crossing was
    extrapolated (no verdict)."""

    ratio: float
    low: float
    high: float
    p: float
    extrapolated: bool
    p_holm: float | None = None

    @property
    def in_family(self) -> bool:
        return not self.extrapolated and math.isfinite(self.p)

    def verdict(self) -> str:
        if self.extrapolated:
            return "none (extrapolated)"
        if self.p_holm is None:
            return ""
        if self.p_holm >= ALPHA:
            return "no difference"
        return "faster" if self.ratio < 1 else "slower"


@dataclass
class Row:
    label: str
    role: str
    where: str  # the bench folder and commit, or the source
    speed: Comparison
    control: str = ""
    vs_control: Comparison | None = None
    note: str = ""


def _number(value, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        _refuse(f"{what}: {value!r} is not a number")
    return x


def _flag(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes")


def read_bench_row(folder: Path, variant: str, label: str) -> dict[str, str]:
    path = folder / "bench.csv"
    if not path.is_file():
        _refuse(f"row {label!r}: no {path}; give the folder of a bench's outputs (bench.csv)")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        _refuse(f"row {label!r}: cannot read {path}: {err}")
    found = [r for r in rows if r.get("variant") == variant]
    if not found:
        have = ", ".join(r.get("variant", "?") for r in rows)
        _refuse(f"row {label!r}: {path} has no variant {variant!r} (it has {have})")
    row = found[0]
    if not row.get("ratio") or not row.get("p_value"):
        _refuse(f"row {label!r}: {path}'s {variant} has no ratio and p (the baseline, or a bench without a CI)")
    return row


def parse_spec(path: Path) -> list[Row]:
    """The rows of a verdicts spec, with their numbers read, or a one-line SystemExit."""
    try:
        spec = tomllib.loads(path.read_text())
    except FileNotFoundError:
        _refuse(f"no spec {path}; write one (see tools/verdicts --help) or give --spec")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        _refuse(f"cannot read {path}: {err}")
    entries = spec.get("row")
    if not isinstance(entries, list) or not entries:
        _refuse(f"{path} has no [[row]] entries")
    rows, seen = [], set()
    for i, e in enumerate(entries, start=1):
        label = e.get("label")
        if not isinstance(label, str) or not label:
            _refuse(f"{path}: row {i} has no label")
        if label in seen:
            _refuse(f"{path}: two rows are labelled {label!r}; give each a label of its own")
        seen.add(label)
        unknown = sorted(set(e) - KEYS)
        if unknown:
            _refuse(f"{path}: row {label!r} has unknown key {unknown[0]!r}; keys: {', '.join(sorted(KEYS))}")
        role = e.get("role", "idea")
        if role not in ("idea", "control"):
            _refuse(f"{path}: row {label!r}: role {role!r}; give idea or control")
        commit = f" at {e['commit']}" if e.get("commit") else ""
        if "bench" in e:
            if any(k in e for k in ("ratio", "ci", "p", "source")):
                _refuse(f"{path}: row {label!r} gives both bench and numbers; give one of them")
            folder = path.parent / str(e["bench"])
            b = read_bench_row(folder, str(e.get("variant", label)), label)
            what = f"{path.name} row {label!r}"
            speed = Comparison(_number(b["ratio"], what), _number(b["ci_low"], what), _number(b["ci_high"], what),
                               _number(b["p_value"], what), _flag(b.get("extrapolated", "")))
            vs = None
            if b.get("ratio_vs_control") and b.get("p_vs_control"):
                vs = Comparison(_number(b["ratio_vs_control"], what), _number(b["ci_low_vs_control"], what),
                                _number(b["ci_high_vs_control"], what), _number(b["p_vs_control"], what),
                                _flag(b.get("extrapolated_vs_control", "")))
            rows.append(Row(label, role, f"{e['bench']}{commit}", speed, b.get("control", "") if vs else "", vs,
                            str(e.get("note", ""))))
        else:
            missing = [k for k in ("ratio", "ci", "p", "source") if k not in e]
            if missing:
                _refuse(f"{path}: row {label!r} has neither bench nor {missing[0]}; give bench = FOLDER, or "
                        "ratio, ci = [low, high], p and source")
            ci = e["ci"]
            if not isinstance(ci, list) or len(ci) != 2:
                _refuse(f"{path}: row {label!r}: ci must be [low, high]")
            what = f"{path.name} row {label!r}"
            speed = Comparison(_number(e["ratio"], what), _number(ci[0], what), _number(ci[1], what),
                               _number(e["p"], what), bool(e.get("extrapolated", False)))
            rows.append(Row(label, role, f"{e['source']}{commit}", speed, note=str(e.get("note", ""))))
        s = rows[-1].speed
        if not (s.low <= s.ratio <= s.high) or not 0 <= s.p <= 1:
            _refuse(f"{path}: row {label!r}: the ratio {s.ratio} lies outside its CI [{s.low}, {s.high}] or p "
                    f"{s.p} outside [0, 1]")
    return rows


def correct(rows: list[Row]) -> tuple[int, int]:
    """Holm over the table: the ideas' comparisons with the baseline, and (a family of its own) their
    comparisons with their controls. -> the two family sizes."""
    family = [r.speed for r in rows if r.role == "idea" and r.speed.in_family]
    for c, p in zip(family, stats.holm([c.p for c in family]), strict=True):
        c.p_holm = float(p)
    against = [r.vs_control for r in rows if r.role == "idea" and r.vs_control is not None and r.vs_control.in_family]
    for c, p in zip(against, stats.holm([c.p for c in against]), strict=True):
        c.p_holm = float(p)
    return len(family), len(against)


def _p(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2g}" if x < 0.01 else f"{x:.3f}".rstrip("0").rstrip(".") if x < 1 else "1"


def _ratio(c: Comparison) -> str:
    return f"{c.ratio:.3f} [{c.low:.3f}, {c.high:.3f}]" + (" (extrapolated)" if c.extrapolated else "")


def markdown(rows: list[Row], sizes: tuple[int, int]) -> str:
    lines = ["| variant | bench | ratio to the baseline [95% CI] | p | Holm p (table) | verdict | "
             "vs its control [95% CI] | p | Holm p (table) | verdict | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        control = r.role == "control"
        verdict = "(control)" if control else r.speed.verdict()
        if r.vs_control is not None:
            vs = [f"{_ratio(r.vs_control)} vs {r.control}", _p(r.vs_control.p), _p(r.vs_control.p_holm),
                  "(control)" if control else r.vs_control.verdict()]
        else:
            vs = ["", "", "", ""]
        lines.append("| " + " | ".join([r.label, r.where, _ratio(r.speed), _p(r.speed.p), _p(r.speed.p_holm),
                                         verdict, *vs, r.note]) + " |")
    lines += ["", f"Holm's step-down correction over the {sizes[0]} comparisons with the baseline in this table "
              f"(controls and extrapolated crossings not in the family), and over the {sizes[1]} comparisons with "
              f"a variant's own control as a second family; a verdict needs a table-wide adjusted p below {ALPHA}. "
              "p: the bench's two-sided bootstrap test of ratio = 1 (seed pairs resampled, the tuning's noise "
              "included). Written by tools/verdicts from the spec beside this file."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(TOOL, __doc__)
    parser.error = lambda message: _refuse(f"{message}; see {TOOL} --help")
    parser.add_argument("--spec", type=Path, default=None, help="the rows (default docs/results/verdicts.toml)")
    parser.add_argument("--out", type=Path, default=None, help="the Markdown table (default: the spec with .md)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    spec = args.spec or variants.REPO_ROOT / "docs" / "results" / "verdicts.toml"
    rows = parse_spec(spec)
    sizes = correct(rows)
    text = markdown(rows, sizes)
    out = args.out or spec.with_suffix(".md")
    atomic_write_text(out, text)
    print(text + f"\nwrote {out}", flush=True)
