"""Parse speedrun training logs (ours and the public modded-nanogpt ones).

A log (docs/formats.md) is: the script's source, a line of exactly 100 '=', environment lines,
another such line, then step lines

    step:N/T train_time:Xms step_avg:Yms
    step:N/T val_loss:L train_time:Xms step_avg:Yms      (validations and the last step)

Public logs may have the source cut out (then only the environment part and one '=' line precede
the steps), may write times in seconds (`train_time:457.265s`, `step_avg:nanms`) and may hold
several runs in one file. A new run starts at each `step:0/` line, or when the step number goes
back or the total T changes.

API: `parse_log(path) -> LogFile`, `parse_text(text, name) -> LogFile`, `source_sha256(text)`,
`LogError` (a ValueError whose message is one line naming the file).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

SEPARATOR = "=" * 100
_STEP_RE = re.compile(r"^step:(\d+)/(\d+)(?:\s|$)")
_NUMBER_UNIT_RE = re.compile(r"^([-+0-9.eE]+|nan|inf)(ms|s)$")


class LogError(ValueError):
    """A log that cannot be parsed; the message is one line and names the file."""


@dataclass
class Validation:
    """One validation line: the step, its loss and the training time (ms) at that point."""

    step: int
    val_loss: float
    train_time_ms: float


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
    of that source (see `source_sha256`), the environment lines, and every run in file order."""

    path: str
    source: str | None
    source_sha256: str | None
    environment: list[str]
    runs: list[Run]

    def finished_runs(self) -> list[Run]:
        return [r for r in self.runs if r.finished]


def source_sha256(text: str) -> str:
    """sha256 hex digest of a source text with its trailing newlines stripped (UTF-8 bytes).
    The same definition is used for a log's embedded source and for a script file's text."""
    return hashlib.sha256(text.rstrip("\n").encode("utf-8")).hexdigest()


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
    the separator is environment. With none, the whole file is body.
    """
    first_step = next((i for i, line in enumerate(lines) if _STEP_RE.match(line)), len(lines))
    seps = [i for i in range(first_step) if lines[i] == SEPARATOR]
    if len(seps) >= 2:
        return "\n".join(lines[: seps[0]]), lines[seps[0] + 1 : seps[1]], seps[1] + 1
    if len(seps) == 1:
        return None, lines[: seps[0]], seps[0] + 1
    return None, [], 0


def parse_text(text: str, name: str = "<log>") -> LogFile:
    """Parse a log's text. Raises LogError (one line, naming `name`) if no run can be read."""
    lines = text.replace("\r\n", "\n").split("\n")
    source, environment, body_start = _split_header(lines)
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
            current.validations.append(Validation(step, fields["val_loss"], fields["train_time_ms"]))
    if not runs:
        raise LogError(f"{name}: no step lines found; is this a training log (docs/formats.md)?")
    sha = source_sha256(source) if source is not None else None
    return LogFile(path=name, source=source, source_sha256=sha, environment=environment, runs=runs)


def parse_log(path: str | Path) -> LogFile:
    """Read and parse one log file. Raises LogError naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LogError(f"{path}: cannot read log ({type(err).__name__}: {err})") from None
    return parse_text(text, str(path))


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
