"""Run a grid of training runs of one variant over Hyperparameters fields, resumably.

Example: tools/sweep baseline --lr=0.001,0.003,0.01,0.023,0.05,0.1 --preset=cpu --num_iterations=200

usage: tools/sweep VARIANT --FIELD=v1,v2,... [--FIELD2=a,b] [--parallel N] [--nproc K] [--out DIR]
                   [--dry-run] [ARGS...] [-- ARGS...]

Each option whose value holds a comma is a grid axis over that Hyperparameters field (`--lr` is
an alias for `muon_lr` and is always an axis); other `--field=value` options (and everything after
`--`, e.g. `-- --checkpoint_every=10:100,100`) go unchanged to every run, after the fixed settings of the
variant's entry in patches/variants.toml (`settings = {...}`, e.g. ngpt_geodesic's sphere_step; a sweep
may not vary or override them: sweep the variant they build on). Each grid point runs

    python speedruns/train_gpt_medium[_VARIANT].py --run_id=ID --log_dir=OUT/logs --checkpoint_dir=OUT/checkpoints \
        ARGS --field=value

(under `torchrun --standalone --nproc_per_node=K` with --nproc K > 1), from the repository root,
with ID derived from the variant, the point, ARGS and the script's code. A point whose log holds
a finished run (a validation at step T/T) is not run again; an interrupted one is rerun (its
partial log is kept as ID.txt.partial). Results: OUT/sweep.csv, OUT/sweep.png (final val loss
against each swept value) and a printed table. When --seed is swept beside other fields, the seeds
are replicates: the plot shows their mean with the std as error bars, and OUT/sweep_seeds.csv holds
mean, std and n per combination of the other fields, and its difference from the first combination
paired by seed, with a 95% t interval. OUT defaults to sweeps/<variant>_<fields>.
Set OMP_NUM_THREADS=1 when several runs share few cores (--parallel).

Stopping: Ctrl-C (SIGINT) or SIGTERM is passed on to the running training processes, and the sweep
waits for them to exit before it stops (a second signal kills them); rerun the same command to
resume. Each running point holds a lock on OUT/logs/ID.lock (inherited by its training process, so
it stays held while that process lives even if the sweep itself was killed): a point whose lock is
held is never started again, and the sweep refuses to resume while one is. OUT/sweep.lock (holding the
sweep's pid) keeps two sweeps out of one OUT. Every run gets --overwrite=1 when its script has that
setting (a rerun reuses its run id); it is not part of the run id. A value given twice on an axis, a
value the script's parse_args refuses and --run_id/--log_dir/--overwrite (the sweep's own) are refused.
Checkpoints go to OUT/checkpoints/ID unless ARGS name another --checkpoint_dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import itertools
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.cli import format_table
from core.files import atomic_savefig, source_sha256, write_csv
from kit.patching import variants
from kit.runs.logs import LogError, Run, parse_log

ALIASES = {"lr": "muon_lr"}
OWN_OPTIONS = {"parallel", "nproc", "out", "dry-run", "help"}
OWN_FIELDS = {"run_id", "log_dir", "overwrite"}  # the sweep sets these for every run
OVERWRITE = "--overwrite=1"  # to every run: a rerun of a killed point reuses its run id (refused without it)


@dataclass
class Point:
    """One training run to make: its id, command, log and stdout paths, and the swept values."""

    run_id: str
    cmd: list[str]
    log_path: Path
    stdout_path: Path
    values: dict[str, str] = field(default_factory=dict)
    status: str = "pending"
    run: Run | None = None


Runner = Callable[[list[str], Path, Path, int | None], int]


class Interrupted(SystemExit):
    """The sweep was stopped by a signal after its training processes exited; code 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class _Children:
    """The training processes running now, so that a signal can be passed on to them."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # the signal handler may run while the main thread holds it
        self.procs: set[subprocess.Popen] = set()
        self.signum: int | None = None

    def reset(self) -> None:
        with self.lock:
            self.signum = None

    def add(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.add(proc)
            stopping = self.signum
        if stopping is not None:  # started just as the signal came: stop it too
            _signal_group(proc, stopping)

    def discard(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(proc)

    def stop(self, signum: int, tool: str = "tools/sweep") -> None:
        """Signal handler: pass the first signal on to every child, SIGKILL them on the second."""
        with self.lock:
            again = self.signum is not None
            self.signum = signum if self.signum is None else self.signum
            procs = list(self.procs)
        send = signal.SIGKILL if again else signum
        for proc in procs:
            _signal_group(proc, send)
        name = signal.Signals(signum).name
        if again:
            message = f"{tool}: {name} again: killed {len(procs)} training run(s)\n"
        else:
            message = (f"{tool}: {name}: passed on to {len(procs)} training run(s); waiting for them to "
                       "exit (signal again to kill them)\n")
        os.write(2, message.encode())  # not print: this may interrupt a print in the main thread


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Signal the child's process group (it leads its own session: torchrun's workers are in it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


CHILDREN = _Children()


@contextlib.contextmanager
def forwarding_signals(tool: str = "tools/sweep"):
    """While inside, SIGINT and SIGTERM go to CHILDREN.stop, whose message names `tool` (main thread only;
    elsewhere a no-op). A signal the tool was started with ignored (a background job's SIGINT) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}  # e.g. a background job's SIGINT
    for s in previous:
        signal.signal(s, lambda signum, frame: CHILDREN.stop(signum, tool))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def subprocess_runner(cmd: list[str], cwd: Path, stdout_path: Path, lock_fd: int | None = None,
                      env: dict[str, str] | None = None) -> int:
    """Run cmd in cwd (with env, default ours), in a session of its own, with stdout and stderr to
    stdout_path; return its exit status. lock_fd (an flock'd file) is inherited by the child and gets its pid."""
    stdout_path.parent.mkdir(parents=True, exist_ok=True)
    keep = (lock_fd,) if lock_fd is not None else ()
    with open(stdout_path, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=keep, env=env)
    CHILDREN.add(proc)
    try:
        if lock_fd is not None:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{proc.pid}\n".encode(), 0)
        return proc.wait()
    finally:
        CHILDREN.discard(proc)


def lock_path(point: Point) -> Path:
    return point.log_path.with_name(point.run_id + ".lock")


def try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on path (created if needed), or None when another process
    (a training run still alive, or another sweep) holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def holder(path: Path) -> str | None:
    """'pid N' (or 'a process') when path exists and is locked by another process, else None."""
    if not path.exists():
        return None
    fd = try_lock(path)
    if fd is not None:
        os.close(fd)
        return None
    pid = path.read_text(encoding="utf-8", errors="replace").strip()
    return f"pid {pid}" if pid.isdigit() else "a process"


def finished_run(log_path: Path) -> Run | None:
    """The last finished run of a log, or None (no log, unparseable, or interrupted)."""
    if not log_path.exists():
        return None
    try:
        runs = parse_log(log_path).finished_runs()
    except LogError:
        return None
    return runs[-1] if runs else None


def _advice(who: str) -> str:
    pid = who.removeprefix("pid ")
    return f"wait for it or stop it (kill {pid})" if pid.isdigit() else "wait for it or stop it"


def refuse_if_running(locks: Iterable[Path], tool: str = "tools/sweep") -> None:
    """SystemExit (one line) when a run's training process is still alive (its lock OUT/logs/ID.lock is held)."""
    for lock in locks:
        who = holder(lock)
        if who is not None:
            raise SystemExit(
                f"{tool}: refused to resume: run {lock.stem} is still running ({who}, lock {lock}; "
                f"log {lock.with_suffix('.txt')}); {_advice(who)}, then rerun"
            )


@contextlib.contextmanager
def holding_out(out: Path, name: str, tool: str) -> Iterator[None]:
    """While inside, an exclusive lock on OUT/name holding our pid (not inherited by the training runs), so
    that a second `tool` on OUT refuses (SystemExit, one line). Makes OUT; refuses an OUT that is a file."""
    path = out / name
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = try_lock(path)
    except OSError as err:
        why = "it is a file; --out must be a folder" if out.is_file() else f"{err.strerror} ({err.filename})"
        raise SystemExit(f"{tool}: cannot use --out {out}: {why}") from None
    if fd is None:
        who = holder(path) or "a process"
        raise SystemExit(f"{tool}: {out} is in use by another {tool} ({who}, lock {path}); {_advice(who)}, "
                         "or give another --out")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def point_lock(point: Point) -> Iterator[int | None]:
    """While inside, the fd of the point's lock (None, and nothing done, when another process holds it);
    a log of an earlier, interrupted try is first moved aside to ID.txt.partial."""
    fd = try_lock(lock_path(point))
    if fd is None:
        yield None
        return
    try:
        if point.log_path.exists():
            os.replace(point.log_path, point.log_path.with_name(point.log_path.name + ".partial"))
        yield fd
    finally:
        os.close(fd)


def run_points(
    points: list[Point], cwd: Path, parallel: int = 1, runner: Runner = subprocess_runner, dry_run: bool = False
) -> list[Point]:
    """Run every point whose log has no finished run (resume), `parallel` at a time, printing progress.
    Sets each point's status ('done', 'resumed', 'failed (...)', 'dry run', 'not run (stopped)') and run.
    Refuses (SystemExit) while a point's training process from an earlier sweep is alive. SIGINT and
    SIGTERM are passed on to the running training processes; once they have exited, Interrupted is
    raised."""
    todo = []
    for point in points:
        point.run = finished_run(point.log_path)
        if point.run is not None:
            point.status = "resumed"
            print(f"skip {point.run_id}: finished log {point.log_path}", flush=True)
        else:
            todo.append(point)
    refuse_if_running(lock_path(p) for p in todo)
    if dry_run:
        for point in todo:
            point.status = "dry run"
            print("would run: " + " ".join(point.cmd))
        return points
    total = len(todo)
    CHILDREN.reset()

    def work(item: tuple[int, Point]) -> None:
        index, point = item
        if CHILDREN.signum is not None:
            point.status = "not run (stopped)"
            return
        with point_lock(point) as fd:
            if fd is None:
                point.status = f"not run (locked: {holder(lock_path(point))})"
                print(f"[{index}/{total}] SKIP {point.run_id}: another process holds {lock_path(point)}", flush=True)
                return
            print(f"[{index}/{total}] start {point.run_id}", flush=True)
            started = time.monotonic()
            rc = runner(point.cmd, cwd, point.stdout_path, fd)
        point.run = finished_run(point.log_path)
        elapsed = time.monotonic() - started
        if point.run is None and CHILDREN.signum is not None:
            point.status = "stopped"
            print(f"[{index}/{total}] stopped {point.run_id} after {elapsed:.0f}s (exit {rc})", flush=True)
        elif point.run is None:
            point.status = f"failed (exit {rc}; see {point.stdout_path})"
            print(f"[{index}/{total}] FAILED {point.run_id} after {elapsed:.0f}s: exit {rc}, see {point.stdout_path}")
        else:
            point.status = "done"
            print(
                f"[{index}/{total}] done {point.run_id} in {elapsed:.0f}s: final val loss {point.run.final_val_loss}",
                flush=True,
            )

    with forwarding_signals():
        if parallel <= 1:
            for item in enumerate(todo, 1):
                work(item)
        else:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                list(pool.map(work, enumerate(todo, 1)))
    if CHILDREN.signum is not None:
        raise Interrupted(CHILDREN.signum)
    return points


# ----------------------------------------------------------------------------- command line


@dataclass
class SweepSpec:
    """A parsed sweep command line."""

    variant: str
    grid: dict[str, list[str]]
    passthrough: list[str]
    parallel: int = 1
    nproc: int = 1
    out: Path | None = None
    dry_run: bool = False


def _usage_error(message: str) -> None:
    raise SystemExit(f"tools/sweep: {message}; see tools/sweep --help")


def parse_sweep_args(argv: list[str]) -> SweepSpec:
    """Split the command line into the variant, grid axes, own options and passthrough ARGS."""
    variant = None
    grid: dict[str, list[str]] = {}
    passthrough: list[str] = []
    own: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            passthrough += argv[i:]
            break
        if arg in ("-h", "--help"):
            print(__doc__.strip())
            raise SystemExit(0)
        if not arg.startswith("--"):
            if variant is not None:
                _usage_error(f"unexpected argument {arg!r} (give one VARIANT and --field=value options)")
            variant = arg
            continue
        key, sep, value = arg[2:].partition("=")
        if key in OWN_OPTIONS:
            if key == "dry-run":
                own[key] = "1"
                continue
            if not sep:
                if i >= len(argv):
                    _usage_error(f"--{key} needs a value")
                value = argv[i]
                i += 1
            own[key] = value
            continue
        if not sep:
            _usage_error(f"write options as --field=value, not {arg!r}")
        key = key.replace("-", "_")
        if key in OWN_FIELDS:
            _usage_error(f"--{key} is set by the sweep for every run (OUT/logs/ID.txt); leave it out")
        if key in ALIASES or "," in value:
            name = ALIASES.get(key, key)
            values = [v for v in value.split(",") if v != ""]
            if not values:
                _usage_error(f"--{key} has no values")
            if name in grid:
                _usage_error(f"field {name} given twice")
            keys = [v if _as_float(v) is None else _as_float(v) for v in values]  # 0.01 and 1e-2 are one point
            twice = [v for i, v in enumerate(values) if keys[i] in keys[:i]]
            if twice:
                _usage_error(f"--{key} lists the value {twice[0]} twice (a point would run twice); give each once")
            grid[name] = values
        else:
            passthrough.append(f"--{key}={value}")
    if variant is None:
        _usage_error("give the VARIANT to sweep (baseline or a variant name)")
    if not grid:
        _usage_error("give at least one grid axis, e.g. --lr=0.01,0.02")
    try:
        parallel = int(own.get("parallel", "1"))
        nproc = int(own.get("nproc", "1"))
    except ValueError:
        _usage_error("--parallel and --nproc take whole numbers")
    if parallel < 1 or nproc < 1:
        _usage_error("--parallel and --nproc must be at least 1")
    out = Path(own["out"]) if "out" in own else None
    return SweepSpec(variant, grid, passthrough, parallel, nproc, out, "dry-run" in own)


@functools.lru_cache(maxsize=32)
def _load(script: Path, sha: str):
    try:
        spec = importlib.util.spec_from_file_location(f"_sweep_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:
        return None


def load_script(script: Path):
    """The script as a module (importing it runs nothing; cached per path and text), or None when it cannot load."""
    return _load(script, script_sha(script))


def hyperparameter_fields(script: Path) -> set[str] | None:
    """Field names of the script's Hyperparameters dataclass, or None when it cannot be loaded."""
    try:
        return {f.name for f in dataclasses.fields(load_script(script).Hyperparameters)}
    except Exception:
        return None


def overwrite_arg(script: Path) -> list[str]:
    """[OVERWRITE] when the script has that setting (older scripts refuse it), else []."""
    return [OVERWRITE] if "overwrite" in (hyperparameter_fields(script) or ()) else []


def check_points(script: Path, points: list[Point], skip: int, tool: str = "tools/sweep") -> None:
    """Refuse (one line, before any run starts) a point whose settings the script's own parse_args refuses,
    e.g. --lr=abc or a negative rate; cmd[skip:] are the script's arguments. Skipped if it has no parse_args."""
    parse = getattr(load_script(script), "parse_args", None)
    for point in points if parse else ():
        try:
            parse(point.cmd[skip:])
        except SystemExit as err:
            what = ", ".join(f"{k}={v}" for k, v in point.values.items())
            raise SystemExit(f"{tool}: {script.name} refuses the point {what}: "
                             f"{str(err.code).removeprefix('error: ')}") from None


def check_fields(script: Path, names: list[str]) -> None:
    """Refuse field names the script's Hyperparameters does not have (skipped if it cannot load)."""
    known = hyperparameter_fields(script)
    if known is None:
        return
    known = known | {"preset"}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"tools/sweep: {script.name} has no Hyperparameters field {', '.join(unknown)}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def script_sha(script: Path) -> str:
    """source_sha256 of the script's text ('' when it does not exist)."""
    return source_sha256(script.read_text(encoding="utf-8")) if script.exists() else ""


def run_id_for(prefix: str, variant: str, values: dict[str, str], passthrough: list[str], code_sha: str = "") -> str:
    """Deterministic run id: prefix, variant, the point's field-value pairs and a hash of variant,
    point, passthrough ARGS and the script's sha256 (so changed ARGS or code make new runs)."""
    key = "\0".join([variant, *(f"{k}={v}" for k, v in values.items()), "--", *passthrough, code_sha])
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    parts = [prefix, variant, *(f"{k}-{v}" for k, v in values.items()), digest]
    return _slug("_".join(p for p in parts if p))


def launch_prefix(script: Path, nproc: int) -> list[str]:
    """python SCRIPT, or torchrun --standalone --nproc_per_node=K SCRIPT for K > 1."""
    if nproc > 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    return [sys.executable, str(script)]


def make_points(spec: SweepSpec, script: Path, out: Path, prefix: str = "sweep") -> list[Point]:
    """The grid (itertools.product of the axes, in the order given) as Points."""
    points = []
    fields = list(spec.grid)
    code_sha = script_sha(script)
    overwrite = overwrite_arg(script)  # not in the run id: ids stay as they were before scripts had it
    for combo in itertools.product(*(spec.grid[f] for f in fields)):
        values = dict(zip(fields, combo, strict=True))
        run_id = run_id_for(prefix, spec.variant, values, spec.passthrough, code_sha)
        cmd = [
            *launch_prefix(script, spec.nproc),
            f"--run_id={run_id}",
            f"--log_dir={out / 'logs'}",
            f"--checkpoint_dir={out / 'checkpoints'}",
            *overwrite,
            *spec.passthrough,
            *(f"--{k}={v}" for k, v in values.items()),
        ]
        points.append(Point(run_id, cmd, out / "logs" / f"{run_id}.txt", out / "stdout" / f"{run_id}.txt", values))
    return points


def results_table(points: list[Point], fields: list[str]) -> list[dict[str, str]]:
    """One row per point: run_id, the swept values, status, steps, final_val_loss, train_time_s."""
    rows = []
    for p in points:
        run = p.run
        rows.append(
            {
                "run_id": p.run_id,
                **{f: p.values[f] for f in fields},
                "status": p.status,
                "steps": "" if run is None else str(run.num_iterations),
                "final_val_loss": "" if run is None else f"{run.final_val_loss:.6f}",
                "train_time_s": "" if run is None else f"{run.train_time_s:.3f}",
            }
        )
    return rows


SEED_FIELD = "seed"


def seed_summary(points: list[Point], fields: list[str]) -> list[dict[str, str]]:
    """When `seed` is swept beside other fields, the seeds are replicates: one row per combination of
    the other fields (in grid order) with the mean, the sample std (n - 1) and n of the finished runs'
    final val loss, and the seeds they came from; and each row against the first, paired by seed (the
    seed sets the initialization and, where the script shuffles, the data order): the mean of the
    per-seed differences with its 95% t interval over the seeds both finished (df = pairs - 1).
    Empty when seed is not swept or is the only axis."""
    if SEED_FIELD not in fields or len(fields) < 2:
        return []
    from scipy import stats as scipy_stats

    from kit.runs.stats import summarize

    others = [f for f in fields if f != SEED_FIELD]
    groups: dict[tuple, dict[str, float]] = {}  # the other fields' values -> {seed: final loss of a finished run}
    for p in points:
        finished = groups.setdefault(tuple(p.values[f] for f in others), {})
        if p.run is not None and p.run.final_val_loss is not None:
            finished[p.values[SEED_FIELD]] = p.run.final_val_loss
    reference = next(iter(groups.values()))
    rows = []
    for key, finished in groups.items():
        own = summarize(list(finished.values())) if finished else None
        diffs = [loss - reference[seed] for seed, loss in finished.items() if seed in reference]
        paired = summarize(diffs) if diffs else None
        low = high = ""
        if paired is not None and paired.n > 1:
            half = float(scipy_stats.t.ppf(0.975, paired.n - 1)) * paired.std / paired.n ** 0.5
            low, high = f"{paired.mean - half:.6f}", f"{paired.mean + half:.6f}"
        rows.append(
            {
                **dict(zip(others, key, strict=True)),
                "n": str(len(finished)),
                "mean_final_val_loss": "" if own is None else f"{own.mean:.6f}",
                "std": "" if own is None or own.n < 2 else f"{own.std:.6f}",
                "seeds": " ".join(finished),
                "diff_vs_first": "" if paired is None else f"{paired.mean:.6f}",
                "diff_ci_low": low,
                "diff_ci_high": high,
                "pairs": str(len(diffs)),
            }
        )
    return rows


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def plot_sweep(path: Path, points: list[Point], fields: list[str], title: str) -> bool:
    """One panel per swept field: final val loss against its value, one line per combination of
    the other fields. When `seed` is swept beside other fields, the seeds are replicates, not a panel:
    each line shows their mean with the sample std as error bars (the figures sweep_seeds.csv holds).
    A field swept at one value gets no panel of its own.
    Log x axis when the values are positive numbers spanning 10x or more.
    Returns False (and writes nothing) when no point has a result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in points if p.run is not None and p.run.final_val_loss is not None]
    if not done:
        return False
    replicas = SEED_FIELD in fields and len(fields) > 1
    panels = [f for f in fields if f != SEED_FIELD] if replicas else fields
    varied = [f for f in panels if len({p.values[f] for p in done}) > 1]  # a single-value axis makes no panel
    panels = varied or panels
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, f in zip(axes[0], panels, strict=True):
        others = [g for g in panels if g != f]
        groups: dict[tuple, dict[str, list[float]]] = {}
        for p in done:
            by_value = groups.setdefault(tuple(p.values[g] for g in others), {})
            by_value.setdefault(p.values[f], []).append(p.run.final_val_loss)
        numeric = all(_as_float(p.values[f]) is not None for p in done)
        order = sorted({p.values[f] for p in done}, key=lambda v: _as_float(v) if numeric else v)
        for key, by_value in groups.items():
            values = sorted(by_value, key=order.index)
            xs = [_as_float(v) if numeric else order.index(v) for v in values]
            label = ", ".join(f"{g}={v}" for g, v in zip(others, key, strict=True)) or None
            if replicas:
                means = [statistics.fmean(by_value[v]) for v in values]
                stds = [statistics.stdev(by_value[v]) if len(by_value[v]) > 1 else 0.0 for v in values]
                ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=3, label=label)
            else:
                ax.plot(xs, [by_value[v][0] for v in values], "o-", label=label)
        if numeric:
            values = [_as_float(v) for v in order]
            if min(values) > 0 and max(values) >= 10 * min(values):
                ax.set_xscale("log")
        else:
            ax.set_xticks(range(len(order)), order)
        ax.set_xlabel(f)
        ax.grid(alpha=0.3)
        if any(key for key in groups):
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final validation loss" + (" (mean +- std over seeds)" if replicas else ""))
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return True


def run_sweep(spec: SweepSpec, runner: Runner = subprocess_runner, root: Path | None = None) -> list[Point]:
    """Run (or resume) the sweep, write OUT/sweep.csv and OUT/sweep.png, print the table."""
    root = variants.REPO_ROOT if root is None else Path(root)
    script = variants.script_path(spec.variant, root)
    fields = list(spec.grid)
    try:
        fixed = variants.fixed_settings(spec.variant, root)
    except variants.VariantError as err:
        raise SystemExit(f"tools/sweep: {err}") from None
    given = {a[2:].partition("=")[0] for a in spec.passthrough if a.startswith("--")} | set(fields)
    clash = [f for f in fixed if f[2:].partition("=")[0] in given]
    if clash:
        raise SystemExit(f"tools/sweep: {clash[0]} is fixed for {spec.variant} by its entry in patches/variants.toml; "
                         "sweep the variant its settings build on to vary it")
    spec = dataclasses.replace(spec, passthrough=[*fixed, *spec.passthrough])  # part of every run (and its id)
    out = (spec.out or root / "sweeps" / f"{spec.variant}_{'_'.join(fields)}").resolve()
    points = make_points(spec, script, out)
    if runner is subprocess_runner:
        if not script.exists():
            known = ", ".join(variants.variant_scripts(root)) or "none"
            raise SystemExit(f"tools/sweep: no script {script}; variants with a script: {known}")
        names = list(spec.grid) + [a[2:].partition("=")[0] for a in spec.passthrough if a.startswith("--")]
        check_fields(script, names)
        check_points(script, points, len(launch_prefix(script, spec.nproc)))
    with holding_out(out, "sweep.lock", "tools/sweep") if not spec.dry_run else contextlib.nullcontext():
        print(f"sweep of {spec.variant}: {len(points)} point(s) over {', '.join(fields)}; output in {out}", flush=True)
        run_points(points, root, spec.parallel, runner, spec.dry_run)
    if spec.dry_run:
        return points
    rows = results_table(points, fields)
    write_csv(out / "sweep.csv", rows)
    print(format_table(rows, [*fields, "final_val_loss", "train_time_s", "status"]))
    print(f"table: {out / 'sweep.csv'}")
    summary = seed_summary(points, fields)
    if summary:
        write_csv(out / "sweep_seeds.csv", summary)
        print(format_table(summary, list(summary[0])))
        print(f"over seeds: {out / 'sweep_seeds.csv'}")
    if plot_sweep(out / "sweep.png", points, fields, f"{spec.variant}: final val loss"):
        print(f"plot: {out / 'sweep.png'}")
    failed = [p for p in points if p.run is None]
    if failed:
        print(f"{len(failed)} point(s) without a finished run; rerun the same command to retry them")
    return points


def main(argv: list[str] | None = None, root: Path | None = None) -> None:
    spec = parse_sweep_args(sys.argv[1:] if argv is None else argv)
    try:
        points = run_sweep(spec, root=root)
    except Interrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"tools/sweep: stopped by {name}; no training run is left running; rerun the same command to "
              "resume (finished points are kept)", file=sys.stderr)
        raise SystemExit(stop.code) from None
    except KeyboardInterrupt:
        print("tools/sweep: interrupted; rerun the same command to resume (finished points are kept)", file=sys.stderr)
        raise SystemExit(130) from None
    if any(p.run is None for p in points) and not spec.dry_run:
        raise SystemExit(1)

