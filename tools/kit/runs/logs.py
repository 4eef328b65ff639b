"""Parse speedrun training logs (ours and the public modded-nanogpt ones).

A log (docs/formats.md) is: the script's source, a line of exactly 100 '=', environment lines,
another such line, then step lines

    step:N/T train_time:Xms step_avg:Yms
    step:N/T val_loss:L train_time:Xms step_avg:Yms      (validations and the last step)

Our environment lines include `variant:NAME world_size:N run_id:ID` and
`hyperparameters:{...}` (the JSON of the run's effective `Hyperparameters`).

Public logs may have the source cut out (then only the environment part and one '=' line precede
the steps), may write times in seconds (`train_time:457.265s`, `step_avg:nanms`) and may hold
several runs in one file. The 2024 public format begins with a '=' line: '=', source, '=',
environment, '=', steps. A new run starts at each `step:0/` line, or when the step number goes
back or the total T changes.

API: `parse_log(path) -> LogFile`, `parse_text(text, name) -> LogFile`, `read_identity(path)`
(run id, variant, hyperparameters from the header alone), `source_sha256(text)`, `LogError` (a
ValueError whose message is one line naming the file); `echo_diagnostics(path)` (the echo variants'
`echo step:N kind:K ...` lines, which the step parsing skips); for settings: `RESULT_NEUTRAL`,
`comparable_settings`, `settings_differences`, `script_defaults` (a script's preset values, read
with `ast` from its source), `format_settings`.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.files import source_sha256

SEPARATOR = "=" * 100
_STEP_RE = re.compile(r"^step:(\d+)/(\d+)(?:\s|$)")
_NUMBER_UNIT_RE = re.compile(r"^([-+0-9.eE]+|nan|inf)(ms|s)$")
_RUN_ID_RE = re.compile(r"(?:^|\s)run_id:(\S+)")
_VARIANT_RE = re.compile(r"^variant:(\S+)(?:\s|$)")
HYPERPARAMETERS_PREFIX = "hyperparameters:"


class LogError(ValueError):
    """A log that cannot be parsed; the message is one line and names the file."""


@dataclass
class Validation:
    """One validation line: the step, its loss, the training time (ms) at that point and the
    line's number in the file (1-based; 0 when not read from a file)."""

    step: int
    val_loss: float
    train_time_ms: float
    line: int = 0


@dataclass
class Run:
    """One training run of a log.

    num_iterations: T of `step:N/T`; last_step: the highest step logged;
    finished: a validation line at step T/T exists (the run completed);
    final_val_loss: the loss of that final validation (None if not finished);
    train_time_ms, step_avg_ms: from the run's last step line;
    validations: the whole validation curve in order.
    """

    num_iterations: int
    last_step: int = 0
    train_time_ms: float = 0.0
    step_avg_ms: float = math.nan
    validations: list[Validation] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.validations) and self.validations[-1].step == self.num_iterations

    @property
    def final_val_loss(self) -> float | None:
        return self.validations[-1].val_loss if self.finished else None

    @property
    def steps(self) -> int:
        return self.last_step

    @property
    def train_time_s(self) -> float:
        return self.train_time_ms / 1000.0


@dataclass
class LogFile:
    """A parsed log: its path, the embedded source (None when the log carries none), the sha256
    of that source (see `source_sha256`), the environment lines, and every run in file order.
    run_id and variant come from the `variant:NAME world_size:N run_id:ID` line, hyperparameters
    from the `hyperparameters:{json}` line (the effective settings); each is None when the log
    has no such line (public logs)."""

    path: str
    source: str | None
    source_sha256: str | None
    environment: list[str]
    runs: list[Run]
    run_id: str | None = None
    variant: str | None = None
    hyperparameters: dict | None = None

    def finished_runs(self) -> list[Run]:
        return [r for r in self.runs if r.finished]


def _time_ms(token: str, key: str, where: str) -> float:
    """'123ms' -> 123.0, '1.5s' -> 1500.0, 'nanms' -> nan."""
    m = _NUMBER_UNIT_RE.match(token)
    if not m:
        raise LogError(f"{where}: cannot read {key}:{token} (expected e.g. 123ms or 1.5s)")
    value = float(m.group(1))
    return value * 1000.0 if m.group(2) == "s" else value


def _parse_step_line(line: str, where: str) -> tuple[int, int, dict[str, float]]:
    """'step:N/T key:value ...' -> (N, T, {val_loss, train_time_ms, step_avg_ms} present)."""
    m = _STEP_RE.match(line)
    if not m:
        raise LogError(f"{where}: malformed step line {line[:60]!r}")
    fields: dict[str, float] = {}
    for token in line.split()[1:]:
        key, sep, value = token.partition(":")
        if not sep:
            continue
        try:
            if key == "val_loss":
                fields["val_loss"] = float(value)
            elif key == "train_time":
                fields["train_time_ms"] = _time_ms(value, key, where)
            elif key == "step_avg":
                fields["step_avg_ms"] = _time_ms(value, key, where)
        except ValueError as err:
            if isinstance(err, LogError):
                raise
            raise LogError(f"{where}: cannot read {token!r} as a number") from None
    if "train_time_ms" not in fields:
        raise LogError(f"{where}: step line without train_time: {line[:60]!r}")
    return int(m.group(1)), int(m.group(2)), fields


def _split_header(lines: list[str]) -> tuple[str | None, list[str], int]:
    """Find the source, the environment lines and the index of the first body line.

    With two separator lines before the first step line, the text before the first one is the
    source. With one, the log has no source (a public log with its code cut out) and what precedes
    the separator is environment. With none, the whole file is body. A log whose first line is a
    separator is in the 2024 public format: the source lies between the first two separators and
    the environment between the second and the third (none when there is no third).
    """
    first_step = next((i for i, line in enumerate(lines) if _STEP_RE.match(line)), len(lines))
    seps = [i for i in range(first_step) if lines[i] == SEPARATOR]
    if seps and seps[0] == 0:
        if len(seps) == 1:
            return None, [], 1
        if len(seps) == 2:
            return "\n".join(lines[1 : seps[1]]), [], seps[1] + 1
        return "\n".join(lines[1 : seps[1]]), lines[seps[1] + 1 : seps[2]], seps[2] + 1
    if len(seps) >= 2:
        return "\n".join(lines[: seps[0]]), lines[seps[0] + 1 : seps[1]], seps[1] + 1
    if len(seps) == 1:
        return None, lines[: seps[0]], seps[0] + 1
    return None, [], 0


def _identity(environment: list[str], env_start: int, name: str) -> tuple[str | None, str | None, dict | None]:
    """(run_id, variant, hyperparameters) from the environment lines (each None when absent).
    env_start is the 0-based index in the file of the first environment line, for messages."""
    run_id = variant = hyperparameters = None
    for offset, line in enumerate(environment):
        if line.startswith("variant:"):
            m_variant, m_run = _VARIANT_RE.match(line), _RUN_ID_RE.search(line)
            variant = m_variant.group(1) if m_variant else None
            run_id = m_run.group(1) if m_run else None
        elif line.startswith(HYPERPARAMETERS_PREFIX):
            where = f"{name}:{env_start + offset + 1}"
            try:
                value = json.loads(line[len(HYPERPARAMETERS_PREFIX) :])
            except json.JSONDecodeError as err:
                raise LogError(f"{where}: the hyperparameters line is not valid JSON ({err.msg})") from None
            if not isinstance(value, dict):
                raise LogError(f"{where}: the hyperparameters line is not a JSON object")
            hyperparameters = value
    return run_id, variant, hyperparameters


def read_identity(path: str | Path) -> tuple[str | None, str | None, dict | None]:
    """(run_id, variant, hyperparameters) of a log from its header alone (no step is parsed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LogError(f"{path}: cannot read log ({type(err).__name__}: {err})") from None
    lines = text.replace("\r\n", "\n").split("\n")
    _, environment, body_start = _split_header(lines)
    return _identity(environment, body_start - 1 - len(environment), str(path))


def parse_text(text: str, name: str = "<log>") -> LogFile:
    """Parse a log's text. Raises LogError (one line, naming `name`) if no run can be read."""
    lines = text.replace("\r\n", "\n").split("\n")
    source, environment, body_start = _split_header(lines)
    env_start = body_start - 1 - len(environment)
    runs: list[Run] = []
    current: Run | None = None
    for index in range(body_start, len(lines)):
        line = lines[index]
        if not line.startswith("step:"):
            continue
        step, total, fields = _parse_step_line(line, f"{name}:{index + 1}")
        new_run = (
            current is None
            or step == 0
            or total != current.num_iterations
            or step < current.last_step
        )
        if new_run:
            current = Run(num_iterations=total)
            runs.append(current)
        current.last_step = step
        current.train_time_ms = fields["train_time_ms"]
        current.step_avg_ms = fields.get("step_avg_ms", math.nan)
        if "val_loss" in fields:
            current.validations.append(Validation(step, fields["val_loss"], fields["train_time_ms"], index + 1))
    if not runs:
        raise LogError(f"{name}: no step lines found; is this a training log (docs/formats.md)?")
    sha = source_sha256(source) if source is not None else None
    run_id, variant, hyperparameters = _identity(environment, env_start, name)
    return LogFile(name, source, sha, environment, runs, run_id, variant, hyperparameters)


def parse_log(path: str | Path) -> LogFile:
    """Read and parse one log file. Raises LogError naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LogError(f"{path}: cannot read log ({type(err).__name__}: {err})") from None
    return parse_text(text, str(path))


ECHO_PREFIX = "echo step:"


def echo_diagnostics_text(text: str, name: str = "<log>") -> dict[str, list[tuple[int, float, float]]]:
    """The echo variants' diagnostic lines of a log's body, `echo step:N kind:K zeta:Z tau2/smax2:T`
    (per matrix kind, the medians over depths of the mean echo zeta and of tau^2 / s_max^2), as
    {kind: [(step, zeta, tau2_ratio)]} in file order. A missing zeta or tau2/smax2 field reads as nan
    and unknown fields are ignored; a line without step or kind, or with a value that is not a number,
    raises LogError naming file:line. {} when the log has no such line (other variants, echo_kappa=0)."""
    lines = text.replace("\r\n", "\n").split("\n")
    _, _, body_start = _split_header(lines)
    found: dict[str, list[tuple[int, float, float]]] = {}
    for index in range(body_start, len(lines)):
        line = lines[index]
        if not line.startswith(ECHO_PREFIX):
            continue
        fields = dict(token.partition(":")[::2] for token in line.split()[1:])
        where = f"{name}:{index + 1}"
        if not fields.get("step") or not fields.get("kind"):
            raise LogError(f"{where}: echo line without step or kind: {line[:60]!r}")
        try:
            step = int(fields["step"])
            zeta, ratio = (float(fields.get(key, "nan")) for key in ("zeta", "tau2/smax2"))
        except ValueError:
            raise LogError(f"{where}: cannot read the numbers of echo line {line[:60]!r}") from None
        found.setdefault(fields["kind"], []).append((step, zeta, ratio))
    return found


def echo_diagnostics(path: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """`echo_diagnostics_text` of one log file. Raises LogError naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LogError(f"{path}: cannot read log ({type(err).__name__}: {err})") from None
    return echo_diagnostics_text(text, str(path))


def expand_log_paths(items: list[str]) -> list[Path]:
    """Log files from paths; a directory stands for the *.txt files directly inside it (sorted)."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.txt") if q.is_file())
            if not found:
                raise LogError(f"{p}: directory holds no *.txt logs")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise LogError(f"{p}: no such log file or directory")
    return paths


def steps_to_target(validations: list[Validation], target: float) -> float | None:
    """Step at which the validation curve first reaches `target`, linearly interpolated between
    the two validations that bracket it; None if it never does. The first validation at or below
    the target gives (s1, l1), the one before it (s0, l0 > target):
        s = s0 + (l0 - target) * (s1 - s0) / (l0 - l1)."""
    previous: Validation | None = None
    for v in validations:
        if v.val_loss <= target:
            if previous is None:
                return float(v.step)
            s0, l0, s1, l1 = previous.step, previous.val_loss, v.step, v.val_loss
            return s0 + (l0 - target) * (s1 - s0) / (l0 - l1)
        previous = v
    return None


# ----------------------------------------------------------------------------- settings

# Hyperparameters fields that cannot change a run's final loss, or are meant to differ between the
# runs of one record: where files go, when checkpoints are saved and validations made (both read the
# model, never change it or the training data order) and the seed (repeated runs of one set of
# settings differ by seed). Runs that differ only in these are pooled; every other field must match.
RESULT_NEUTRAL = ("run_id", "log_dir", "checkpoint_dir", "checkpoint_every", "val_loss_every", "seed", "overwrite")


def comparable_settings(hyperparameters: dict) -> dict:
    """The settings that decide a run's results: every field but RESULT_NEUTRAL."""
    return {k: v for k, v in hyperparameters.items() if k not in RESULT_NEUTRAL}


def settings_differences(a: dict, b: dict) -> list[str]:
    """Fields (outside RESULT_NEUTRAL) whose values differ between two hyperparameter dicts, or
    that only one of them has, in a's order then b's."""
    ca, cb = comparable_settings(a), comparable_settings(b)
    names = list(ca) + [k for k in cb if k not in ca]
    return [k for k in names if k not in ca or k not in cb or ca[k] != cb[k]]


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _constant(node: ast.AST):
    """Value of a constant expression: literals, arithmetic on them, lists/tuples/dicts and
    `dict(key=...)`. Raises ValueError for anything else (names, other calls)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _constant(node.operand)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_constant(node.left), _constant(node.right))
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_constant(e) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_constant(k): _constant(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _constant(kw.value) for kw in node.keywords if kw.arg is not None}
    raise ValueError(f"not a constant: {ast.unparse(node)}")


def script_defaults(source: str, preset: str) -> dict | None:
    """A speedrun script's default settings under `preset`: the `Hyperparameters` dataclass
    defaults updated by `PRESETS[preset]`, read from the source with `ast` (nothing is run).
    None when the source has no such class, the preset is unknown, or a value is not a constant."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    fields: dict | None = None
    presets: dict | None = None
    try:
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == "Hyperparameters":
                fields = {}
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        if stmt.value is None:
                            return None
                        fields[stmt.target.id] = _constant(stmt.value)
            elif isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["PRESETS"]:
                presets = _constant(node.value)
    except (ValueError, TypeError, ZeroDivisionError):
        return None
    if fields is None:
        return None
    if presets is None:  # a script without presets: its class defaults are the only ones
        return dict(fields) if fields.get("preset", preset) == preset else None
    if not isinstance(presets, dict) or not isinstance(presets.get(preset), dict):
        return None
    return {**fields, **presets[preset], "preset": preset}


def _value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def format_settings(hyperparameters: dict, defaults: dict | None, leave_out: tuple[str, ...] = ()) -> str:
    """One line naming a run's settings: 'preset P' then every comparable field (not RESULT_NEUTRAL,
    not leave_out) whose value differs from `defaults`, as field=value; with defaults None (unknown),
    every comparable field."""
    preset = hyperparameters.get("preset")
    parts = []
    for key, value in comparable_settings(hyperparameters).items():
        if key in leave_out or key == "preset":
            continue
        if defaults is None or key not in defaults or defaults[key] != value:
            parts.append(f"{key}={_value_text(value)}")
    head = f"preset {preset}" if preset is not None else "no preset"
    if defaults is None:
        head += " (defaults unknown)"
    return head + (": " + ", ".join(parts) if parts else ", defaults")
