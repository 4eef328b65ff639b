"""Command-line conventions shared by the tools and analysis.py: help text first, plain tables."""

from __future__ import annotations

import argparse


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


def format_table(rows: list[dict[str, str]], columns: list[str]) -> str:
    """Plain aligned text table."""
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r.get(c, "").ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
