"""Plot validation loss against step and training time for several logs or variants; print a table.

Example: tools/compare baseline polar logs/my_run.txt --out analysis_out/compare.png

Each argument is a log file, a folder of *.txt logs, or a variant name (its logs are found in
--log-dir by the source embedded in them). Runs are grouped by the variant their embedded source
matches (a log without a known source is its own group; --by-file groups by file always), and
within that by step count and by settings (the logs' `hyperparameters:` line; run_id, log_dir,
checkpoint_dir, checkpoint_every, val_loss_every and seed may differ within a group): a group's label names what
sets it apart from the other groups of its variant, e.g. `baseline [muon_lr=0.011]`. Each group
is drawn as the mean curve over its runs with a min-max band, at the validation steps all its runs
share; times are train_time (validation excluded). The table gives each group's final figures
over its finished runs. --out may be a PNG path or a folder (then FOLDER/compare.png): an existing
folder, or a path ending in '/' (created).

When logs hold the echo variants' diagnostics (`echo step:N kind:K zeta:Z tau2/smax2:T` lines, written
at each validation by echo and echo_exact), two more figures go next to the plot, OUT_echo_zeta.png and
OUT_echo_tau2.png: per matrix kind (Q, K, V, O, MLP in, MLP out), the median over depths of the mean
echo zeta, and of tau^2 / s_max^2 (log scale), against step, one line per log. --echo makes them
required: a log without such lines is then an error (e.g. tools/compare --echo logs/a.txt logs/b.txt).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from core.cli import format_table, make_parser
from core.files import atomic_savefig
from kit.patching import variants
from kit.runs import stats
from kit.runs.logs import LogError, Run, comparable_settings, echo_diagnostics, expand_log_paths, parse_log


@dataclass
class Curve:
    """Mean and min/max validation loss of a group at the validation steps all its runs share.
    steps [k], mean_loss [k], min_loss [k], max_loss [k], mean_time_s [k]."""

    steps: list[int]
    mean_loss: list[float]
    min_loss: list[float]
    max_loss: list[float]
    mean_time_s: list[float]


def group_curve(runs: list[Run]) -> Curve:
    """Curve over the runs' common validation steps (runs: [r], each with validations)."""
    common = set.intersection(*({v.step for v in r.validations} for r in runs)) if runs else set()
    steps = sorted(common)
    by_step = [{v.step: v for v in r.validations} for r in runs]
    mean_loss, min_loss, max_loss, mean_time = [], [], [], []
    for s in steps:
        losses = [m[s].val_loss for m in by_step]
        mean_loss.append(math.fsum(losses) / len(losses))
        min_loss.append(min(losses))
        max_loss.append(max(losses))
        mean_time.append(math.fsum(m[s].train_time_ms for m in by_step) / len(by_step) / 1000.0)
    return Curve(steps, mean_loss, min_loss, max_loss, mean_time)


def resolve_inputs(items: list[str], log_dir: Path, root: Path | None = None) -> list[Path]:
    """Arguments -> log paths; a variant name stands for the logs in log_dir with its source."""
    known = variants.variant_scripts(root)
    paths: list[Path] = []
    for item in items:
        if Path(item).exists() or item not in known:
            paths += expand_log_paths([item])
            continue
        sha_of_variant = {v: k for k, v in variants.variant_shas(root).items()}.get(item)
        found = []
        for p in sorted(log_dir.glob("*.txt")) if log_dir.is_dir() else []:
            try:
                if parse_log(p).source_sha256 == sha_of_variant:
                    found.append(p)
            except LogError:
                continue
        if not found:
            raise SystemExit(f"tools/compare: no log of variant {item} in {log_dir}; pass --log-dir or log files")
        paths += found
    return paths


def _settings_key(hyperparameters: dict | None) -> str | None:
    """Canonical text of the settings that decide results (num_iterations is keyed separately)."""
    if hyperparameters is None:
        return None
    settings = {k: v for k, v in comparable_settings(hyperparameters).items() if k != "num_iterations"}
    return json.dumps(settings, sort_keys=True)


def _distinguishing_labels(keys: list[tuple[str, int, str | None]]) -> dict[tuple, str]:
    """{(label, steps, settings key): display label}: the label alone when it is the only group of
    that label, else the label plus what sets the group apart from the others of that label."""
    names: dict[tuple, str] = {}
    for label in dict.fromkeys(k[0] for k in keys):
        mine = [k for k in keys if k[0] == label]
        if len(mine) == 1:
            names[mine[0]] = label
            continue
        settings = {k: json.loads(k[2]) if k[2] is not None else None for k in mine}
        known = [s for s in settings.values() if s is not None]
        fields = list(dict.fromkeys(f for s in known for f in s))
        varying = [f for f in fields if len({json.dumps(s.get(f), sort_keys=True) for s in known}) > 1]
        for key in mine:
            parts = []
            if len({k[1] for k in mine}) > 1:
                parts.append(f"{key[1]} steps")
            if settings[key] is None:
                if known:  # others of this label have settings; this one's are not in its log
                    parts.append("settings unknown")
            else:
                parts += [f"{f}={json.dumps(settings[key].get(f))}".replace('"', "") for f in varying]
            names[key] = f"{label} [{', '.join(parts)}]"
    return names


def group_runs(paths: list[Path], by_file: bool, root: Path | None = None) -> dict[str, list[Run]]:
    """{group label: runs with at least one validation}, in first-seen order. A group is one
    variant (or file with --by-file) at one step count and one set of settings."""
    shas = variants.variant_shas(root)
    groups: dict[tuple[str, int, str | None], list[Run]] = {}
    for path in paths:
        try:
            log = parse_log(path)
        except LogError as err:
            raise SystemExit(f"tools/compare: {err}") from None
        label = path.stem if by_file else shas.get(log.source_sha256 or "", path.stem)
        settings = _settings_key(log.hyperparameters)
        for run in log.runs:
            if run.validations:
                groups.setdefault((label, run.num_iterations, settings), []).append(run)
    if not groups:
        raise SystemExit("tools/compare: none of the logs has a validation line")
    names = _distinguishing_labels(list(groups))
    return {names[key]: runs for key, runs in groups.items()}


def common_step_notes(curves: dict[str, Curve]) -> list[str]:
    """Notes on groups whose runs share no validation step (not plotted), and on groups that share
    no validation step with each other but step 0 (the initial loss, the same for all): their
    curves cannot be compared at any one step of training."""
    notes = [f"note: {label}: its runs share no validation step; not plotted" for label, c in curves.items()
             if not c.steps]
    drawn = {label: set(c.steps) for label, c in curves.items() if c.steps}
    if len(drawn) > 1 and not set.intersection(*drawn.values()) - {0}:
        notes.append(f"note: the groups {', '.join(drawn)} have no validation step after step 0 in common "
                     "(different lengths or validation cadences); compare their curves by shape, not step by step")
    return notes


def summary_rows(groups: dict[str, list[Run]]) -> list[dict[str, str]]:
    """Final figures per group over its finished runs."""
    rows = []
    for label, runs in groups.items():
        done = [r for r in runs if r.finished]
        row = {"group": label, "runs": f"{len(done)}/{len(runs)} finished", "steps": "", "final val loss": ""}
        row.update({"min-max": "", "train time (s)": "", "step avg (ms)": ""})
        if done:
            s = stats.summarize([r.final_val_loss for r in done])
            spread = "" if math.isnan(s.std) else f" ± {s.std:.5f}"
            row["steps"] = ",".join(sorted({str(r.num_iterations) for r in done}))
            row["final val loss"] = f"{s.mean:.5f}{spread}"
            row["min-max"] = f"{min(r.final_val_loss for r in done):.5f}-{max(r.final_val_loss for r in done):.5f}"
            row["train time (s)"] = f"{math.fsum(r.train_time_s for r in done) / len(done):.2f}"
            avgs = [r.step_avg_ms for r in done if not math.isnan(r.step_avg_ms)]
            row["step avg (ms)"] = f"{math.fsum(avgs) / len(avgs):.2f}" if avgs else ""
        rows.append(row)
    return rows


def plot_groups(path: Path, curves: dict[str, Curve]) -> None:
    """Two panels: val loss against step and against training time (s); mean line, min-max band.
    The y axis is logarithmic and zoomed from just below the best loss to the losses at ~10% of
    training so that the final differences stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    low, high = math.inf, -math.inf
    for label, c in curves.items():
        if not c.steps:
            continue
        for ax, xs in zip(axes, (c.steps, c.mean_time_s), strict=True):
            (line,) = ax.plot(xs, c.mean_loss, label=label, lw=1.4, marker="o" if len(xs) == 1 else None)
            if c.min_loss != c.max_loss:
                ax.fill_between(xs, c.min_loss, c.max_loss, color=line.get_color(), alpha=0.2, lw=0)
        low = min(low, min(c.min_loss))
        early = [loss for s, loss in zip(c.steps, c.max_loss, strict=True) if s >= 0.1 * c.steps[-1]]
        high = max(high, early[0] if early else max(c.max_loss))
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training time (s)")
    axes[0].set_ylabel("validation loss")
    if math.isfinite(low) and high > low > 0:
        axes[0].set_yscale("log")
        axes[0].set_ylim(low * 0.995, high * 1.02)
        from matplotlib.ticker import FormatStrFormatter

        axes[0].yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        axes[0].yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("validation loss (mean over runs, band = min-max)")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------- echo diagnostics

ECHO_PANELS = (("q", "Q"), ("k", "K"), ("v", "V"), ("o", "O"), ("mlp_in", "MLP in"), ("mlp_out", "MLP out"))
ECHO_QUANTITIES = {  # figure name: (index in a diagnostic (step, zeta, tau2_ratio), y label, title, log scale)
    "zeta": (1, r"mean echo $\zeta$ of a matrix", "echo: the mean echo zeta of a matrix, median over depths", False),
    "tau2": (2, r"$\tau^2 / s_\max^2$", "echo: the law's tau^2 over the top squared singular value, median over depths",
             True),
}


def echo_series(paths: list[Path], required: bool, root: Path | None = None
                ) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """{log label: {kind: [(step, zeta, tau2_ratio)]}} of the logs holding echo diagnostic lines, in
    input order; a label is the file's stem (its path when stems repeat) and the variant its source
    matches, e.g. `run3 (echo_exact)`. With required, a log without such lines ends the tool with a
    one-line error."""
    shas = variants.variant_shas(root)
    stems = [p.stem for p in paths]
    series = {}
    for path, stem in zip(paths, stems, strict=True):
        try:
            found = echo_diagnostics(path)
            variant = shas.get(parse_log(path).source_sha256 or "") if found else None
        except LogError as err:
            raise SystemExit(f"tools/compare: {err}") from None
        if found:
            label = stem if stems.count(stem) == 1 else str(path)
            series[label if variant is None else f"{label} ({variant})"] = found
        elif required:
            raise SystemExit(f"tools/compare: {path} has no echo diagnostic lines ('echo step:N kind:K ...', written "
                             "by the echo and echo_exact variants with echo_kappa > 0); leave out --echo or that log")
    return series


def echo_figure(series: dict[str, dict[str, list[tuple[int, float, float]]]], quantity: str):
    """A 2x3 figure, one panel per matrix kind, one line per log: `quantity` ('zeta' or 'tau2', see
    ECHO_QUANTITIES) against step. The caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index, ylabel, title, log_scale = ECHO_QUANTITIES[quantity]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True, sharey=True)
    positive = False
    for ax, (kind, name) in zip(axes.flat, ECHO_PANELS, strict=True):
        for color, (label, kinds) in enumerate(series.items()):
            points = kinds.get(kind, [])
            if not points:
                continue
            ys = [point[index] for point in points]
            positive = positive or any(y > 0 for y in ys)
            ax.plot([point[0] for point in points], ys, color=f"C{color % 10}", label=label, lw=1.4, marker="o", ms=3)
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
    if log_scale and positive:
        axes[0, 0].set_yscale("log")  # shared by all panels
    elif not log_scale:
        axes[0, 0].set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    axes[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{title} (at each validation; one line per log)")
    fig.tight_layout()
    return fig


def plot_echo(out: Path, series: dict[str, dict[str, list[tuple[int, float, float]]]]) -> list[Path]:
    """Write OUT_echo_zeta.png and OUT_echo_tau2.png next to `out`; -> their paths."""
    import matplotlib.pyplot as plt

    written = []
    for quantity in ECHO_QUANTITIES:
        path = out.with_name(f"{out.stem}_echo_{quantity}.png")
        fig = echo_figure(series, quantity)
        try:
            atomic_savefig(fig, path)
        finally:
            plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("tools/compare", __doc__)
    parser.add_argument("inputs", nargs="+", help="log files, folders of logs, or variant names")
    parser.add_argument("--log-dir", type=Path, default=variants.REPO_ROOT / "logs", help="where variant logs are")
    parser.add_argument("--out", default=str(variants.REPO_ROOT / "analysis_out" / "compare.png"),
                        help="PNG path, or a folder (existing, or ending in '/') for FOLDER/compare.png")
    parser.add_argument("--by-file", action="store_true", help="one group per log file instead of per variant")
    parser.add_argument("--echo", action="store_true",
                        help="require the echo diagnostics figures (drawn anyway when a log holds echo lines)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        paths = resolve_inputs(args.inputs, args.log_dir)
    except LogError as err:
        raise SystemExit(f"tools/compare: {err}") from None
    folder = args.out.endswith(("/", os.sep)) or Path(args.out).is_dir()
    out = Path(args.out) / "compare.png" if folder else Path(args.out)
    groups = group_runs(paths, args.by_file)
    series = echo_series(paths, required=args.echo)
    rows = summary_rows(groups)
    print(format_table(rows, list(rows[0])))
    curves = {label: group_curve(runs) for label, runs in groups.items()}
    for note in common_step_notes(curves):
        print(note)
    try:
        plot_groups(out, curves)
        echo_plots = plot_echo(out, series) if series else []
    except OSError as err:
        raise SystemExit(f"tools/compare: cannot write the plot {out} ({err.strerror or err}); give --out a "
                         "writable PNG path or folder") from None
    print(f"plot: {out}")
    for path in echo_plots:
        print(f"plot: {path}")
