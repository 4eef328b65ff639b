"""Files written whole or not at all, and the content hash that names a script's source.

Shared by the tools and analysis_lib: results, records, shards and figures go through a temporary file
in the same folder and os.replace, so a crash or a full disk never leaves a half-written file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path):
    """Open a temporary file next to `path` for binary writing; on success it replaces `path`.

    If the block raises, the temporary file is removed and `path` is left as it was. The
    temporary file's path is `f.name`, so the block can validate what it wrote before the rename.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.close(fd)
        with open(tmp, "wb") as f:  # opened by name, so that f.name is the temporary path
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path through a temp file in the same folder and os.replace (never half-written)."""
    with atomic_output(path) as f:
        f.write(text.encode("utf-8"))


def atomic_savefig(fig, path: str | Path) -> None:
    """Save a matplotlib figure as PNG atomically."""
    with atomic_output(path) as f:
        fig.savefig(f, dpi=120, format="png")


def write_csv(path: str | Path, rows: list[dict[str, str]]) -> None:
    """Write rows (dicts with the same keys) as a CSV file, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())



def source_sha256(text: str) -> str:
    """sha256 hex digest of a source text with its trailing newlines stripped (UTF-8 bytes).
    The same definition is used for a log's embedded source and for a script file's text."""
    return hashlib.sha256(text.rstrip("\n").encode("utf-8")).hexdigest()
