"""Plots of analysis results, drawn from the saved files alone (so --render needs no checkpoint).

Every figure is a 2x3 grid, one panel per matrix kind, one line per block depth coloured by depth
(colorbar), shared axes. Scalars: one figure per property with the training step on x. Arrays: one
figure per checkpoint and an animated GIF across checkpoints, in OUT/<run>/plots/.
"""

import io
import math
import os

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib import cm, colors, ticker  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from PIL import Image  # noqa: E402

from analysis_lib import outputs, tree  # noqa: E402

KINDS = [("q", "Attention Q"), ("k", "Attention K"), ("v", "Attention V"), ("o", "Attention O"),
         ("mlp_in", "MLP in"), ("mlp_out", "MLP out")]
DPI = 90
FIGSIZE = (13, 7.5)
FITTED = {"tau2", "kappa", "alpha_w", "alpha_xmin_w", "alpha_ks_w"}  # nan means the fit had too little to go on


def missing_note(prop, layers, never, sometimes=0):
    """What a panel leaves out: e.g. "3 of 15 layers have no fit" ("no value" for unfitted properties),
    and how many more lack it at some steps. -> text, "" when nothing is missing."""
    word = "fit" if prop in FITTED else "value"
    parts = [f"{never} of {layers} layers have no {word}"] if never else []
    if sometimes:
        parts.append(f"{sometimes}{' more' if never else f' of {layers} layers'} lack it at some steps")
    return "; ".join(parts)


def _note(ax, text):
    if text:
        ax.text(0.02, 0.97, text, transform=ax.transAxes, va="top", ha="left", fontsize=8, color="firebrick",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.5}, zorder=5)


def _median_abs(a):
    return np.median(np.abs(a), axis=0)


# Array plots: property -> (x source, y source, x label, y label, title). A source is an array name,
# "index" (1-based direction index), or (name, reducer) applied to an [R, k] array.
ARRAY_PLOTS = {
    "echo": ("sv_median", "echo", "median replica singular value s", "echo zeta",
             "Which directions of a minibatch gradient can be trusted: echo vs s (dashed: 1/(1+tau^2/s^2))"),
    "sv_w": ("index", "sv_w", "direction index", "singular value", "Singular values of the weights"),
    "sv_g": ("index", "sv_g", "direction index", "singular value", "Singular values of the mean gradient"),
    "sv_m": ("index", "sv_m", "direction index", "singular value", "Singular values of the momentum"),
    "replica_cos_u": ("index", ("replica_cos_u", _median_abs), "direction index",
                      "median |cos| over replicas", "How far replica left singular vectors stray from the mean's"),
    "replica_cos_v": ("index", ("replica_cos_v", _median_abs), "direction index",
                      "median |cos| over replicas", "How far replica right singular vectors stray from the mean's"),
}


def _save(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    outputs.atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _grid(title, max_layer, labels=None, markers=True):
    """A 2x3 figure with shared axes and a depth colorbar; with `labels` (several runs), a legend of
    their line styles (and markers) under the title. -> (figure, axes [6], layer -> RGBA)."""
    fig = Figure(figsize=FIGSIZE)  # no pyplot: nothing to close, no figure manager
    axes = fig.subplots(2, 3, sharex=True, sharey=True)
    # A fixed layout: matplotlib's constrained layout costs seconds per figure.
    fig.subplots_adjust(left=0.08, right=0.9, bottom=0.08, top=0.9 if not labels else 0.875, wspace=0.08,
                        hspace=0.14)
    fig.suptitle(title)
    if labels:
        handles = [Line2D([], [], color="0.25", linestyle=RUN_STYLES[i], linewidth=1.4, markersize=4,
                          marker=RUN_MARKERS[i] if markers else None) for i in range(len(labels))]
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.49, 0.96), ncol=len(labels),
                   frameon=False, handlelength=3.5, columnspacing=2.5)
    norm = colors.Normalize(vmin=0, vmax=max(max_layer, 1))
    cmap = matplotlib.colormaps["viridis"]
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=fig.add_axes([0.92, 0.12, 0.015, 0.74]))
    bar.set_label("block depth")
    return fig, axes.ravel(), lambda layer: cmap(norm(layer))


def _finish_axes(axes, x_label, y_label, xlog=False, ylog=False, xlim=None, ylim=None):
    """Scales, limits, labels; major ticks only (minor ticks on six log axes cost most of the drawing),
    fixed label positions (and titles set with y=1) skip matplotlib's text-extent search."""
    if xlog:
        axes[0].set_xscale("log")
        axes[0].xaxis.set_major_formatter(ticker.LogFormatter())  # plain text: mathtext labels parse slowly
    if ylog:
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_formatter(ticker.LogFormatter())
    for ax in axes:
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.xaxis.set_label_coords(0.5, -0.1)
        ax.yaxis.set_label_coords(-0.2, 0.5)
        ax.autoscale_view()
    if xlim:
        axes[0].set_xlim(*xlim)
    if ylim:
        axes[0].set_ylim(*ylim)
    for ax in axes[3:]:
        ax.set_xlabel(x_label)
    for ax in axes[::3]:
        ax.set_ylabel(y_label)


def _clean(x, y, xlog, ylog):
    """Drop points a panel cannot draw (nan, inf, nonpositive on a log axis). -> [p, 2]."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & ((x > 0) | (not xlog)) & ((y > 0) | (not ylog))
    return np.column_stack([x[keep], y[keep]])


def _add_lines(ax, curves, colours, style="-", width=1.2, alpha=1.0):
    """Many polylines as one artist (one LineCollection: far cheaper to draw than a Line2D each)."""
    if curves:
        ax.add_collection(LineCollection(curves, colors=colours, linestyles=style, linewidths=width, alpha=alpha))


def _spans_decades(values):
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    return v.size > 0 and (v > 0).all() and v.max() / v.min() > 30


def _limits(values, log):
    v = np.asarray([x for x in values if np.isfinite(x) and (x > 0 or not log)], dtype=float)
    if v.size == 0:
        return None
    lo, hi = v.min(), v.max()
    if log:
        return lo / 1.3, hi * 1.3
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1e-12)
    return lo - pad, hi + pad


def scalar_figure(prop, results, path):
    """results: [(step, rows)] ascending. One line per (kind, layer) over steps; a panel whose layers
    have no value (nan: e.g. tau^2 without 2 directions above the noise edge) says how many.
    -> {kind: note written on its panel}, for the panels with one."""
    fig, notes = scalar_grid(prop, [(None, results)])
    _save(fig, path)
    return notes


def scalar_grid(prop, runs):
    """The figure of one scalar property over training for one or several runs: runs [(label, results)],
    results as scalar_figure's. Each run draws one line per layer (one LineCollection per panel), in its
    own line style when there are several, with a legend entry per run. -> (figure, {kind: note})."""
    rows_of = [r for _, results in runs for _, rows in results for r in rows]
    max_layer = max((r["layer"] for r in rows_of), default=1)
    node = tree.BY_NAME.get(prop)
    fig, axes, color = _grid(f"{prop} over training" + (f": {node.doc}" if node else ""), max_layer,
                             labels=[label for label, _ in runs] if len(runs) > 1 else None)
    log = _spans_decades([r.get(prop, math.nan) for r in rows_of])
    notes = {}
    for ax, (kind, label) in zip(axes, KINDS, strict=True):
        texts, drawn = [], False
        for number, (run_label, results) in enumerate(runs):
            style, marker = _run_style(number, len(runs))
            series = {}
            for step, rows in results:
                for r in rows:
                    if r["kind"] == kind:
                        series.setdefault(r["layer"], []).append((step, r.get(prop, math.nan)))
            layers = sorted(series)
            drawn = drawn or bool(series)
            curves = [_clean(*zip(*series[layer], strict=True), False, log) for layer in layers]
            valued = [sum(not math.isnan(v) for _, v in series[layer]) for layer in layers]
            text = missing_note(prop, len(layers), sum(c == 0 for c in valued),
                                sum(0 < c < len(series[layer]) for c, layer in zip(valued, layers, strict=True)))
            if text:
                texts.append(f"{run_label}: {text}" if run_label is not None else text)
            _add_lines(ax, curves, [color(layer) for layer in layers], style=style,
                       width=1.2 if len(runs) == 1 else 1.4)
            if len(results) < 12:  # few checkpoints: mark each one
                points = np.concatenate(curves) if curves else np.empty((0, 2))
                ax.scatter(points[:, 0], points[:, 1], s=9 if len(runs) == 1 else 14, marker=marker,
                           c=[color(layer) for layer, c in zip(layers, curves, strict=True) for _ in c] or None)
        notes[kind] = "\n".join(texts)
        _note(ax, notes[kind])
        ax.set_title(label if drawn else f"{label} (none)", y=1.0)
    _finish_axes(axes, "training step", prop, ylog=log)
    return fig, {kind: text for kind, text in notes.items() if text}


RUN_STYLES = ("-", "--", ":", "-.")  # one per compared run; the colour stays the block depth
RUN_MARKERS = ("o", "s", "^", "D")


def _run_style(number, runs):
    """Line style and marker of the number-th of `runs` runs (a single run: solid, dots)."""
    return (RUN_STYLES[number], RUN_MARKERS[number]) if runs > 1 else ("-", "o")


def _series(arrays, kind, layer, source, n):
    if source == "index":
        return np.arange(1, n + 1, dtype=float)
    if isinstance(source, tuple):
        name, reduce = source
        data = arrays.get(outputs.array_key(kind, layer, name))
        return None if data is None else reduce(data)
    data = arrays.get(outputs.array_key(kind, layer, source))
    return None if data is None else np.asarray(data, dtype=float)


def _array_lines(prop, arrays, rows):
    """-> {kind: [(layer, x, y, tau2 or None)]} for one checkpoint."""
    xs, ys = ARRAY_PLOTS[prop][:2]
    lines = {}
    for r in rows:
        y_src = ys[0] if isinstance(ys, tuple) else ys
        if outputs.array_key(r["kind"], r["layer"], y_src) not in arrays:
            continue
        y = _series(arrays, r["kind"], r["layer"], ys, 0)
        x = _series(arrays, r["kind"], r["layer"], xs, len(y))
        if x is None or y is None:
            continue
        tau2 = r.get("tau2", math.nan) if prop == "echo" else None
        lines.setdefault(r["kind"], []).append((r["layer"], x, y, tau2))
    return lines


def array_figure(prop, step, lines, max_layer, limits, path):
    """One checkpoint's array property, a line (or, for the echo, points and the fitted law) per layer.
    -> {kind: note written on its panel}: for the echo, how many layers have no tau^2 fit (no law drawn)."""
    x_label, y_label, title = ARRAY_PLOTS[prop][2:]
    fig, axes, color = _grid(f"{title} - step {step}", max_layer)
    (xlim, xlog), (ylim, ylog) = limits
    notes = {}
    for ax, (kind, label) in zip(axes, KINDS, strict=True):
        entries = sorted(lines.get(kind, []), key=lambda e: e[0])
        curves = [_clean(x, y, xlog, ylog) for _, x, y, _ in entries]
        tints = [color(layer) for layer, *_ in entries]
        if entries and entries[0][3] is None:
            _add_lines(ax, curves, tints, width=1.0, alpha=0.85)
        elif entries:  # the echo: one point per direction, and the fitted law dashed
            points = np.concatenate(curves)
            ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.7, linewidths=0,
                       c=[tint for tint, c in zip(tints, curves, strict=True) for _ in c] or None)
            laws, law_tints = [], []
            for (_, x, _, tau2), tint in zip(entries, tints, strict=True):
                if np.isfinite(tau2) and tau2 > 0:
                    grid = np.sort(x[np.isfinite(x) & (x > 0)])
                    laws.append(_clean(grid, grid**2 / (grid**2 + tau2), xlog, ylog))
                    law_tints.append(tint)
            _add_lines(ax, laws, law_tints, style="--", width=0.9)
            unfitted = len(entries) - len(laws)
            if unfitted:
                notes[kind] = missing_note("tau2", len(entries), unfitted)
                _note(ax, notes[kind])
        ax.set_title(label if entries else f"{label} (none)", y=1.0)
    _finish_axes(axes, x_label, y_label, xlog, ylog, xlim, ylim)
    _save(fig, path)
    return notes


def compare_array_grid(prop, step, runs, max_layer, limits):
    """One checkpoint step of a line-drawn array property (not the echo) for several runs: runs
    [(label, lines)], lines as _array_lines gives; one LineCollection per run and panel, one segment
    per layer, in the run's line style. -> figure."""
    x_label, y_label, title = ARRAY_PLOTS[prop][2:]
    fig, axes, color = _grid(f"{title} - step {step}", max_layer, labels=[label for label, _ in runs], markers=False)
    (xlim, xlog), (ylim, ylog) = limits
    for ax, (kind, label) in zip(axes, KINDS, strict=True):
        drawn = False
        for number, (_, lines) in enumerate(runs):
            entries = sorted(lines.get(kind, []), key=lambda e: e[0])
            drawn = drawn or bool(entries)
            _add_lines(ax, [_clean(x, y, xlog, ylog) for _, x, y, _ in entries],
                       [color(layer) for layer, *_ in entries], style=_run_style(number, len(runs))[0], width=1.2)
        ax.set_title(label if drawn else f"{label} (none)", y=1.0)
    _finish_axes(axes, x_label, y_label, xlog, ylog, xlim, ylim)
    return fig


def _gif(frames, path):
    images = [Image.open(p).convert("RGB") for p in frames]
    if not images:
        return
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=800, loop=0)
    outputs.atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_run(folder):
    """A run folder's finished results. -> (steps, [(step, rows)], [arrays per step])."""
    steps = outputs.finished_steps(folder)
    results, array_sets = [], []
    for step in steps:
        _, rows = outputs.read_csv(os.path.join(folder, outputs.stem(step) + ".csv"))
        results.append((step, rows))
        array_sets.append(outputs.read_npz(os.path.join(folder, outputs.stem(step) + ".npz")))
    return steps, results, array_sets


def _scalar_names(results):
    return {n for _, rows in results for r in rows for n in r if n not in outputs.ID_COLUMNS}


def _array_names(array_sets):
    """Array plots whose data the results hold."""
    present = {key.rsplit("/", 1)[1] for arrays in array_sets for key in arrays}
    return {prop for prop, spec in ARRAY_PLOTS.items() if (spec[1][0] if isinstance(spec[1], tuple) else spec[1])
            in present}


def _array_limits(prop, per_step):
    """Shared axis limits and log scales of an array property over every step (and run) drawn."""
    xs = [v for lines in per_step for es in lines.values() for e in es for v in e[1]]
    ys = [v for lines in per_step for es in lines.values() for e in es for v in e[2]]
    by_index = ARRAY_PLOTS[prop][0] == "index"
    xlog = max(xs, default=0) > 30 if by_index else _spans_decades([v for v in xs if v > 0])
    ylog = prop.startswith("sv_") and _spans_decades([v for v in ys if v > 0])
    return (_limits(xs, xlog), xlog), (_limits(ys, ylog), ylog)


def render_run(folder, progress=print, properties=None):
    """Redraw the plots of one run folder from its csv/npz files (only those of `properties`, a set
    of names, when given). -> list of files written."""
    steps, results, array_sets = load_run(folder)
    if not steps:
        return []
    plot_dir = os.path.join(folder, "plots")
    written = []
    max_layer = max((r["layer"] for _, rows in results for r in rows), default=1)
    for prop in sorted(_scalar_names(results)):
        if properties is not None and prop not in properties:
            continue
        path = os.path.join(plot_dir, f"{prop}_vs_step.png")
        notes = scalar_figure(prop, results, path)
        if notes:
            progress(f"  plots: {prop}: " + "; ".join(f"{dict(KINDS)[k]} {t}" for k, t in notes.items()))
        written.append(path)
    present = _array_names(array_sets)
    for prop in ARRAY_PLOTS:
        if prop not in present or (properties is not None and prop not in properties):
            continue
        per_step = [_array_lines(prop, arrays, rows) for (_, rows), arrays in zip(results, array_sets, strict=True)]
        limits = _array_limits(prop, per_step)
        frames = []
        for step, lines in zip(steps, per_step, strict=True):
            path = os.path.join(plot_dir, prop, outputs.stem(step) + ".png")
            array_figure(prop, step, lines, max_layer, limits, path)
            frames.append(path)
        gif_path = os.path.join(plot_dir, f"{prop}.gif")
        _gif(frames, gif_path)
        written += frames + [gif_path]
        progress(f"  plots: {prop} ({len(frames)} checkpoints)")
    return written


class CompareError(ValueError):
    """Runs that cannot be drawn together (no property or step in common); the message is one line."""


def compare_plan(runs, properties=None):
    """What several runs can be drawn with: runs [(label, steps, results, array_sets)]. -> (scalar
    properties every run has, array properties every run has (the echo excluded: its points would
    hide each other), steps every run has). CompareError when nothing is common, or a property in
    `properties` (a set) is missing from some run."""
    labels = [run[0] for run in runs]
    scalars = [_scalar_names(run[2]) for run in runs]
    arrays = [_array_names(run[3]) - {"echo"} for run in runs]
    if properties is not None:
        for name in sorted(properties):
            lacking = [label for label, s, a in zip(labels, scalars, arrays, strict=True) if name not in s | a]
            if lacking:
                raise CompareError(f"{name} is not in the results of {', '.join(lacking)}; analyse those runs with "
                                   f"--properties {name}, or leave it out")
    common_scalars = set.intersection(*scalars)
    common_arrays = set.intersection(*arrays)
    if properties is not None:
        common_scalars &= properties
        common_arrays &= properties
    steps = sorted(set.intersection(*[set(run[1]) for run in runs]))
    if not common_scalars and not common_arrays:
        raise CompareError(f"the runs {', '.join(labels)} have no property in common that can be plotted; "
                           "analyse them with the same --properties")
    if not common_scalars and not steps:
        raise CompareError(f"no step is analysed in every one of {', '.join(labels)} (steps: "
                           + "; ".join(f"{run[0]} {','.join(map(str, run[1]))}" for run in runs)
                           + "); analyse checkpoints of the same steps")
    return sorted(common_scalars), [p for p in ARRAY_PLOTS if p in common_arrays], steps


def render_compare(folders, labels, plot_dir, properties=None, progress=print):
    """Draw several runs into the same figures: scalars over training (every run's own steps), line
    arrays at each step every run has (and a GIF across them). -> list of files written."""
    runs = [(label, *load_run(folder)) for label, folder in zip(labels, folders, strict=True)]
    empty = [label for label, steps, *_ in runs if not steps]
    if empty:
        raise CompareError(f"no finished results in {', '.join(empty)}; analyse the run first")
    scalar_props, array_props, steps = compare_plan(runs, properties)
    max_layer = max((r["layer"] for run in runs for _, rows in run[2] for r in rows), default=1)
    written = []
    for prop in scalar_props:
        path = os.path.join(plot_dir, f"{prop}_vs_step.png")
        fig, notes = scalar_grid(prop, [(label, results) for label, _, results, _ in runs])
        _save(fig, path)
        progress(f"  compare: {prop}" + (": " + "; ".join(f"{dict(KINDS)[k]} {t}" for k, t in notes.items())
                                         if notes else "").replace("\n", "; "))
        written.append(path)
    if array_props and not steps:
        progress(f"  compare: no step is analysed in every run; {', '.join(array_props)} not drawn")
        return written
    for prop in array_props:
        per_run = []
        for label, _, results, array_sets in runs:
            at = {step: (rows, arrays) for (step, rows), arrays in zip(results, array_sets, strict=True)}
            per_run.append((label, [_array_lines(prop, at[s][1], at[s][0]) for s in steps]))
        limits = _array_limits(prop, [lines for _, per_step in per_run for lines in per_step])
        frames = []
        for i, step in enumerate(steps):
            path = os.path.join(plot_dir, prop, outputs.stem(step) + ".png")
            fig = compare_array_grid(prop, step, [(label, per_step[i]) for label, per_step in per_run], max_layer,
                                     limits)
            _save(fig, path)
            frames.append(path)
        gif_path = os.path.join(plot_dir, f"{prop}.gif")
        _gif(frames, gif_path)
        written += frames + [gif_path]
        progress(f"  compare: {prop} ({len(frames)} steps)")
    return written
