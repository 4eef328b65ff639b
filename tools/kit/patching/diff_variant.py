"""Show how a variant differs from the baseline (or another variant): code diff + Hyperparameters table.

    tools/diff_variant polar_normuon --against polar

The Hyperparameters defaults are read with `ast` from the dataclass source; nothing is imported or run.
"""

from __future__ import annotations

import ast
import sys

from core.cli import make_parser
from kit.patching import patchset as ap
from kit.patching.make_patch import unified_diff
from kit.patching.patchset import strip_header

COLORS = {"+": "\033[32m", "-": "\033[31m", "@": "\033[36m"}
RESET, BOLD = "\033[0m", "\033[1m"


def hyperparameter_defaults(source: str, class_name: str = "Hyperparameters") -> dict[str, str]:
    """Python source -> {field: default expression as source text} of the dataclass class_name."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise SystemExit(f"error: the script does not parse (line {e.lineno}: {e.msg}); fix it first") from None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {stmt.target.id: ast.unparse(stmt.value) if stmt.value is not None else "(required)"
                    for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    return {}


def _same(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    try:
        return ast.literal_eval(a) == ast.literal_eval(b)
    except (ValueError, SyntaxError, TypeError):
        return a == b


def changed_defaults(old: dict[str, str], new: dict[str, str]) -> list[tuple[str, str, str]]:
    """Two {field: default} maps -> [(field, old, new)] for fields whose defaults differ, in new's order."""
    names = list(new) + [k for k in old if k not in new]
    return [(k, old.get(k, "(absent)"), new.get(k, "(absent)")) for k in names
            if not _same(old.get(k), new.get(k))]


def format_table(rows: list[tuple[str, str, str]], left: str, right: str) -> str:
    head = ("field", left, right)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)])


def colorize(diff: str) -> str:
    out = []
    for line in diff.splitlines():
        if line.startswith(("+++", "---", "diff ")):
            out.append(BOLD + line + RESET)
        elif line[:1] in COLORS:
            out.append(COLORS[line[:1]] + line + RESET)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def parse_args(argv):
    p = make_parser("tools/diff_variant",
                    __doc__.strip() + "\n\nexample: tools/diff_variant polar_normuon --against polar")
    p.add_argument("variant", help="variant name, 'baseline', or a script path")
    p.add_argument("--against", default="baseline", help="what to compare with (default: baseline)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="color the diff (default: when stdout is a terminal)")
    ap.add_root_option(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = ap.repo_root(args.root)
    new_path = ap.resolve_script(root, args.variant)
    old_path = ap.resolve_script(root, args.against)
    new = strip_header(ap.read_bytes(new_path, "").decode("utf-8"))
    old = strip_header(ap.read_bytes(old_path, "").decode("utf-8"))
    diff = unified_diff(old, new)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    sys.stdout.write((colorize(diff) if color else diff) if diff else f"no code difference between "
                     f"{args.against} and {args.variant}\n")
    rows = changed_defaults(hyperparameter_defaults(old), hyperparameter_defaults(new))
    print()
    if rows:
        print(f"Hyperparameters defaults that differ ({len(rows)}):")
        print(format_table(rows, args.against, args.variant))
    else:
        print(f"Hyperparameters: same defaults in {args.against} and {args.variant}")
