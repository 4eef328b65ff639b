"""Write a hand edit of a generated variant back into its patch, then regenerate the variant.

    tools/make_patch polar

diffs speedruns/train_gpt_medium_polar.py (minus its generated comment) against the baseline and
rewrites patches/polar.patch, keeping the patch's header. For a stacked variant, --onto-stack diffs
against the variant's stack minus its last patch and rewrites that last patch. Afterwards
`tools/apply_patch` reproduces the edited file byte for byte. The diff keeps 3 lines of context,
or fewer when that is what lets every other variant that uses the patch still apply.

After a change to the baseline (or when `tools/apply_patch --check` says a patch is not in this form):

    tools/make_patch --all

rewrites every patch of patches/variants.toml as make_patch writes it (fresh line numbers and context,
same change, same header) and regenerates every variant. Each patch is diffed against the patches
below it in the shortest stack that uses it (polar against the baseline, normuon against polar);
hand edits in the generated scripts are not read, so write those back with `tools/make_patch VARIANT`
first. It takes well under a second of CPU (a few dozen `git apply` runs).

A new patch: add `[myvariant]` with `patches = [..., "mypatch"]` to patches/variants.toml, copy the
script under it to speedruns/train_gpt_medium_myvariant.py, edit that, then `tools/make_patch myvariant`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from core.cli import make_parser
from kit.patching import patchset as ap
from kit.patching.patchset import Builder, PatchError, add_header, run_git, strip_header, write_variant

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


class Fit(NamedTuple):
    context: int  # lines of context the patch keeps
    text: str  # the patch file: header + diff
    regenerated: list[tuple[str, list[str], str]]  # (variant, stack, full script) of every variant using it
    broken: list[str]  # "variant (why)" for the variants it no longer applies to
    blocked: list[str]  # "variant (why)" for the variants that failed already with the patch as it was


def fit_patch(manifest: dict[str, list[str]], stack: list[str], body: str, header: str, builder: Builder) -> Fit:
    """The patch text that turns the build of stack[:-1] into body, as make_patch writes it.

    The widest context in CONTEXTS with which every manifest variant using the patch still applies
    (else 3 lines, with the variants it breaks listed). A variant that fails with the patch as it is now
    (a new patch with no file yet, or one a change below it broke) is built with the new text too, but
    is not a reason to narrow the context; if it still fails it is listed as blocked. PatchError when the
    diff does not reproduce body.
    """
    name = stack[-1]
    base = builder(stack[:-1])
    users = [(variant, patches) for variant, patches in manifest.items() if name in patches]
    failing_now = set()
    for variant, patches in users:
        try:
            builder(patches)
        except PatchError:
            failing_now.add(variant)
    best = None
    for context in CONTEXTS:  # narrower context lets a patch also apply on stacks that edit lines near it
        diff = unified_diff(base, body, context)
        if not diff:
            raise PatchError(f"{' + '.join(stack)} does not differ from its base; nothing to write into {name!r}")
        text = header + diff
        if builder(stack, {name: text}) != body:
            raise PatchError(f"the new {name!r} does not reproduce {' + '.join(stack)}")
        regenerated, broken, blocked = [], [], []
        for variant, patches in users:
            try:
                regenerated.append((variant, patches, add_header(builder(patches, {name: text}), variant, patches)))
            except PatchError as e:
                (blocked if variant in failing_now else broken).append(f"{variant} ({e})")
        if best is None or not broken:
            best = Fit(context, text, regenerated, broken + blocked, blocked)
        if not broken:
            break
    return best


def home_stack(manifest: dict[str, list[str]], name: str) -> list[str]:
    """The stack make_patch --all diffs patch `name` in: the shortest prefix of a manifest stack ending in
    it (the first in manifest order on ties)."""
    prefixes = [stack[: stack.index(name) + 1] for stack in manifest.values() if name in stack]
    return min(prefixes, key=len)


def canonical_patches(manifest: dict[str, list[str]], builder: Builder) -> dict[str, Fit | PatchError]:
    """{patch: its Fit as make_patch --all writes it, or the PatchError that prevents it} for every patch
    of the manifest, in manifest order."""
    out: dict[str, Fit | PatchError] = {}
    for name in dict.fromkeys(p for stack in manifest.values() for p in stack):
        stack = home_stack(manifest, name)
        try:
            header = ap.split_patch(builder.patch_text(name))[0] or HEADER_TEMPLATE.format(name=name)
            out[name] = fit_patch(manifest, stack, builder(stack), header, builder)
        except PatchError as e:
            out[name] = e
    return out


def rewrite_all(root: Path) -> None:
    """make_patch --all: every patch in make_patch's form, every variant regenerated from them."""
    manifest = ap.read_manifest(root)
    builder = Builder(root)
    fits = canonical_patches(manifest, builder)
    failed = {name: fit for name, fit in fits.items() if isinstance(fit, PatchError)}
    held = [name for name, fit in fits.items() if name not in failed and fit.blocked]  # form unknowable now
    texts = {name: builder.patch_text(name) if name in held else fit.text
             for name, fit in fits.items() if name not in failed}
    changed = [name for name, text in texts.items() if text != builder.patch_text(name)]
    for name in changed:
        ap.atomic_write(ap.patch_path(root, name), texts[name].encode("utf-8"))
        print(f"rewrote patches/{name}.patch (context {fits[name].context})")
    print(f"{len(texts) - len(changed) - len(held)} of {len(fits)} patches were already in make_patch's form")
    regenerated, skipped = 0, []
    for variant, patches in manifest.items():
        if any(p in failed for p in patches):
            skipped.append(variant)
            continue
        text = add_header(builder(patches, texts), variant, patches)
        path = ap.variant_path(root, variant)
        if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
            write_variant(root, variant, patches, text)
            regenerated += 1
            print(f"regenerated {path.relative_to(root)}")
    print(f"{regenerated} of {len(manifest)} variants regenerated")
    if failed:
        kept = f"; kept as they are until those apply: {', '.join(held)}" if held else ""
        raise SystemExit(f"error: left unchanged (variants {', '.join(skipped)}): "
                         + "; ".join(str(e) for e in failed.values()) + kept
                         + "; fix those patches by hand against the baseline, then `tools/make_patch --all`")


def parse_args(argv):
    p = make_parser("tools/make_patch", __doc__.strip() + "\n\nexample: tools/make_patch polar_normuon --onto-stack")
    p.add_argument("variant", nargs="?", help="a variant recorded in patches/variants.toml")
    p.add_argument("--onto-stack", action="store_true",
                   help="diff against the variant's stack minus its last patch and rewrite that last patch")
    p.add_argument("--all", action="store_true",
                   help="rewrite every patch in make_patch's form from the patches themselves (run it after a "
                        "baseline change), then regenerate every variant")
    ap.add_root_option(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = ap.repo_root(args.root)
    if args.all:
        if args.variant or args.onto_stack:
            raise SystemExit("error: --all takes no variant; run `tools/make_patch --all` alone")
        rewrite_all(root)
        return
    if not args.variant:
        raise SystemExit("error: name the variant you edited, e.g. `tools/make_patch polar` "
                         "(or `tools/make_patch --all` after a baseline change)")
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
    builder = Builder(root)
    try:
        builder(patches[:-1])
    except PatchError as e:
        raise SystemExit(f"error: cannot rebuild the stack under {name!r}: {e}; nothing written") from None
    old_path = ap.patch_path(root, name)
    header = ap.split_patch(old_path.read_text(encoding="utf-8"))[0] if old_path.is_file() else ""
    header = header or HEADER_TEMPLATE.format(name=name)
    try:
        fit = fit_patch(manifest, patches, body, header, builder)
    except PatchError as e:
        raise SystemExit(f"error: {e}; nothing written") from None
    ap.atomic_write(old_path, fit.text.encode("utf-8"))
    for other, stack, text in fit.regenerated:
        write_variant(root, other, stack, text)
    print(f"wrote {old_path.relative_to(root)} ({fit.text.count(chr(10) + '@@')} hunks, context {fit.context}, "
          f"against {' + '.join(['baseline'] + patches[:-1])})")
    print(f"regenerated {ap.variant_path(root, variant).relative_to(root)}")
    for other, stack, _ in fit.regenerated:
        if other != variant:
            print(f"regenerated {ap.variant_path(root, other).relative_to(root)} ({' + '.join(stack)})")
    if fit.broken:
        raise SystemExit(f"error: left unchanged, no longer apply: {'; '.join(fit.broken)}; fix those patches, "
                         "then `tools/apply_patch --all`")
