"""Small command-line helpers shared by the tools of issue 4 (submit_record, compare, sweep, bench)."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from .shards import atomic_output


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


def format_table(rows: list[dict[str, str]], columns: list[str]) -> str:
    """Plain aligned text table."""
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
