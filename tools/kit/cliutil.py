"""Small command-line helpers shared by the tools of issue 4 (submit_record, compare, sweep, bench)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


class HelpFirstParser(argparse.ArgumentParser):
    """ArgumentParser whose --help starts with the description (what the tool does, an example)
    and shows the usage after it."""

    def format_help(self) -> str:
        text = super().format_help()
        if self.description and self.description in text:
            text = text.replace(self.description, "").replace("\n\n\n", "\n\n")
            return self.description.rstrip() + "\n\n" + text
        return text


def make_parser(prog: str, doc: str) -> HelpFirstParser:
    """Parser for a tool whose module docstring is: one-line summary, blank line, 'Example: ...'
    paragraph, blank line, more detail. The whole docstring becomes the help's opening text."""
    return HelpFirstParser(prog=prog, description=doc.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path through a temp file in the same folder and os.replace (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_savefig(fig, path: str | Path) -> None:
    """Save a matplotlib figure as PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def format_table(rows: list[dict[str, str]], columns: list[str]) -> str:
    """Plain aligned text table."""
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
