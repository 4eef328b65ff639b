"""Apply patches/ to the baseline speedrun script and write a generated variant.

    tools/apply_patch polar normuon --as polar_normuon

applies patches/polar.patch then patches/normuon.patch to speedruns/train_gpt_medium.py with
`git apply` (in a temp directory; the repository and its index are never touched) and writes
speedruns/train_gpt_medium_polar_normuon.py; it refuses to overwrite an existing script that the
manifest does not list (unless --force). `--check` regenerates every variant recorded in
patches/variants.toml in memory and lists each one that drifted or no longer applies, and each patch
that is not exactly what `tools/make_patch` would write (stale line numbers or context).

After the baseline changes, `tools/make_patch --all` rewrites every patch in that form and regenerates
every variant; `--check` then passes again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from core.cli import make_parser
from kit.patching import make_patch
from kit.patching.patchset import (
    MANIFEST,
    Builder,
    PatchError,
    add_root_option,
    check,
    check_name,
    read_manifest,
    record_variant,
    render,
    repo_root,
    variant_path,
    write_variant,
)


def check_canonical(root: Path, builder: Builder | None = None) -> list[str]:
    """-> one problem line per manifest patch that applies but is not what `tools/make_patch` writes."""
    builder = builder or Builder(root)
    problems = []
    for name, fit in make_patch.canonical_patches(read_manifest(root), builder).items():
        if isinstance(fit, PatchError) or fit.blocked:
            continue  # check() reports the variants that fail; the form is known once they apply
        if fit.text != builder.patch_text(name):
            problems.append(f"patch {name!r}: patches/{name}.patch is not what make_patch writes (stale line "
                            f"numbers or context); run `tools/make_patch --all`")
    return problems


def parse_args(argv):
    p = make_parser("tools/apply_patch",
                    __doc__.strip() + "\n\nexample: tools/apply_patch polar normuon --as polar_normuon")
    p.add_argument("names", nargs="*", metavar="NAME", help="patches/NAME.patch to apply, in order")
    p.add_argument("--as", dest="variant", metavar="VARIANT",
                   help="variant name (default: the patch names joined by '_')")
    p.add_argument("--check", action="store_true",
                   help="regenerate every variant in patches/variants.toml in memory and check that every patch "
                        "is what make_patch writes; exit 1 listing each problem (after a baseline change, "
                        "`tools/make_patch --all` fixes the stale patches)")
    p.add_argument("--all", action="store_true", help="regenerate every variant in patches/variants.toml")
    p.add_argument("--no-record", action="store_true", help="do not add the variant to patches/variants.toml")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing script that patches/variants.toml does not list")
    add_root_option(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = repo_root(args.root)
    if args.variant is not None and (args.check or args.all):
        raise SystemExit("error: --as names one new variant; it does not go with --check or --all")
    if args.check:
        if args.names or args.all:
            raise SystemExit("error: --check takes no patch names; run `tools/apply_patch --check` alone")
        variants = read_manifest(root)
        builder = Builder(root)
        problems = check(root, builder)
        stale = check_canonical(root, builder)
        for line in problems + stale:
            print(line)
        if problems:
            raise SystemExit(f"error: {len(problems)} of {len(variants)} variants out of date; after editing the "
                             "baseline or a patch run `tools/make_patch --all`, after editing a variant "
                             "`tools/make_patch VARIANT`")
        if stale:
            raise SystemExit(f"error: {len(stale)} patches not in make_patch's form; run `tools/make_patch --all`")
        print(f"ok: {len(variants)} variants match their patches")
        return
    manifest = read_manifest(root)
    if args.all:
        if args.names:
            raise SystemExit("error: --all takes no patch names; run `tools/apply_patch --all` alone")
        todo = list(manifest.items())
    else:
        if not args.names:
            raise SystemExit("error: name at least one patch, e.g. `tools/apply_patch polar` (or use --all / --check)")
        for name in args.names:
            check_name(name, "patch name")
        if args.variant is not None and not args.variant:
            raise SystemExit("error: --as needs a variant name, e.g. --as polar_normuon (or leave --as out)")
        variant = check_name(args.variant or "_".join(args.names), "variant name")
        recorded = manifest.get(variant)
        if recorded is not None and recorded != args.names:
            raise SystemExit(f"error: variant {variant!r} is recorded in {MANIFEST} as {' + '.join(recorded)}; "
                             f"pass --as OTHER_NAME or edit the manifest")
        todo = [(variant, list(args.names))]
    texts = []
    builder = Builder(root)
    for variant, patches in todo:  # build everything first: a failure writes nothing
        try:
            texts.append((variant, patches, render(root, variant, patches, builder=builder)))
        except PatchError as e:
            raise SystemExit(f"error: {variant}: {e}; nothing written") from None
    if not args.all and not args.force:
        variant, patches, text = texts[0]
        path = variant_path(root, variant)
        if variant not in manifest and path.exists() and path.read_bytes() != text.encode("utf-8"):
            raise SystemExit(f"error: {path.relative_to(root)} exists and is not a variant listed in {MANIFEST}; "
                             f"nothing written; pick another --as name, or pass --force to overwrite it")
    written = [(variant, patches, write_variant(root, variant, patches, text)) for variant, patches, text in texts]
    record = not args.all and not args.no_record and todo[0][0] not in manifest
    if record:
        record_variant(root, *todo[0])
    for variant, patches, path in written:  # report only once everything is written
        print(f"{variant}: {' + '.join(patches)} -> {path.relative_to(root)}")
    if record:
        print(f"recorded {todo[0][0]} in {MANIFEST}")
