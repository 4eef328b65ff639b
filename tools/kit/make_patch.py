"""Write a hand edit of a generated variant back into its patch, then regenerate the variant.

    tools/make_patch polar

diffs speedruns/train_gpt_medium_polar.py (minus its generated comment) against the baseline and
rewrites patches/polar.patch, keeping the patch's header. For a stacked variant, --onto-stack diffs
against the variant's stack minus its last patch and rewrites that last patch. Afterwards
`tools/apply_patch` reproduces the edited file byte for byte. The diff keeps 3 lines of context,
or fewer when that is what lets every other variant that uses the patch still apply.

A new patch: add `[myvariant]` with `patches = [..., "mypatch"]` to patches/variants.toml, copy the
script under it to speedruns/train_gpt_medium_myvariant.py, edit that, then `tools/make_patch myvariant`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from kit import apply_patch as ap
from kit.apply_patch import PatchError, build, render, run_git, strip_header, write_variant
from kit.cliutil import make_parser

CONTEXTS = (3, 2, 1)
HEADER_TEMPLATE = (
    "Description: {name}: ONE LINE saying what the patch does\n"
    " What changes and why (a short paragraph).\n"
    "Reference: paper or record this comes from\n"
    "Effect: expected or measured effect (steps, seconds, loss)\n"
    "\n"
)


def unified_diff(old: str, new: str, context: int = 3) -> str:
    """Two versions of the baseline script -> a unified diff with a/ b/ paths (git diff --no-index)."""
    with tempfile.TemporaryDirectory(prefix="make_patch.") as tmp:
        for side, text in (("a", old), ("b", new)):
            path = Path(tmp, side, ap.BASELINE)
            path.parent.mkdir(parents=True)
            path.write_bytes(text.encode("utf-8"))
        proc = run_git(["diff", "--no-index", "--no-color", "--no-ext-diff", "--no-prefix", f"-U{context}",
                        "--diff-algorithm=myers", f"a/{ap.BASELINE}", f"b/{ap.BASELINE}"], tmp)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"error: git diff failed: {proc.stderr.strip()}")
    # `index <blob>..<blob>` lines change with every edit and git apply does not need them
    return "".join(line for line in proc.stdout.splitlines(keepends=True) if not line.startswith("index "))


def parse_args(argv):
    p = make_parser("tools/make_patch", __doc__.strip() + "\n\nexample: tools/make_patch polar_normuon --onto-stack")
    p.add_argument("variant", help="a variant recorded in patches/variants.toml")
    p.add_argument("--onto-stack", action="store_true",
                   help="diff against the variant's stack minus its last patch and rewrite that last patch")
    ap.add_root_option(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = ap.repo_root(args.root)
    variant = ap.check_name(args.variant, "variant name")
    manifest = ap.read_manifest(root)
    if variant not in manifest:
        raise SystemExit(f"error: variant {variant!r} is not in {ap.MANIFEST}; add [{variant}] with "
                         f'patches = [..., "NEW_PATCH"] to it first (see tools/make_patch --help)')
    patches = manifest[variant]
    name = patches[-1]
    if len(patches) > 1 and not args.onto_stack:
        raise SystemExit(f"error: variant {variant!r} stacks {' + '.join(patches)}; pass --onto-stack to rewrite "
                         f"{name!r} against {' + '.join(patches[:-1])}")
    edited = ap.read_bytes(ap.variant_path(root, variant), "generate it with `tools/apply_patch --all`")
    body = strip_header(edited.decode("utf-8"))
    try:
        base = build(root, patches[:-1])
    except PatchError as e:
        raise SystemExit(f"error: cannot rebuild the stack under {name!r}: {e}; nothing written") from None
    old_path = ap.patch_path(root, name)
    header = ap.split_patch(old_path.read_text(encoding="utf-8"))[0] if old_path.is_file() else ""
    header = header or HEADER_TEMPLATE.format(name=name)
    users = [(v, stack) for v, stack in manifest.items() if v != variant and name in stack]
    best = None
    for context in CONTEXTS:  # narrower context lets a patch also apply on stacks that edit lines near it
        diff = unified_diff(base, body, context)
        if not diff:
            raise SystemExit(f"error: {variant} does not differ from its base; nothing to write into {name!r}")
        patch_text = header + diff
        try:
            regenerated = render(root, variant, patches, overrides={name: patch_text})
        except PatchError as e:
            raise SystemExit(f"error: the new {name!r} does not apply ({e}); nothing written") from None
        if strip_header(regenerated) != body:
            raise SystemExit(f"error: the new {name!r} does not reproduce {variant}; nothing written")
        others, broken = [], []
        for other, stack in users:
            try:
                others.append((other, stack, render(root, other, stack, overrides={name: patch_text})))
            except PatchError as e:
                broken.append(f"{other} ({e})")
        if best is None or not broken:
            best = (context, patch_text, regenerated, others, broken)
        if not broken:
            break
    context, patch_text, regenerated, others, broken = best
    ap.atomic_write(old_path, patch_text.encode("utf-8"))
    write_variant(root, variant, patches, regenerated)
    for other, stack, text in others:
        write_variant(root, other, stack, text)
    print(f"wrote {old_path.relative_to(root)} ({patch_text.count(chr(10) + '@@')} hunks, context {context}, "
          f"against {' + '.join(['baseline'] + patches[:-1])})")
    print(f"regenerated {ap.variant_path(root, variant).relative_to(root)}")
    for other, stack, _ in others:
        print(f"regenerated {ap.variant_path(root, other).relative_to(root)} ({' + '.join(stack)})")
    if broken:
        raise SystemExit(f"error: left unchanged, no longer apply: {'; '.join(broken)}; fix those patches, "
                         "then `tools/apply_patch --all`")
