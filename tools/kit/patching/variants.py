"""The variant manifest (patches/variants.toml), the variant scripts and the patch headers.

Small API (every `root` defaults to the repository root; pass another for tests):
    load_manifest(root)          -> {variant: [patch names]}   from patches/variants.toml
    fixed_settings(variant, root)-> ["--key=value", ...]: the entry's `settings = {key = value}` (its runs get them)
    script_path(variant, root)   -> speedruns/train_gpt_medium.py or .._<variant>.py (may not exist)
    variant_scripts(root)        -> {variant: path} of the scripts that exist ("baseline" included)
    variant_for_sha(sha, root)   -> variant whose script's source_sha256 equals sha, or None
    patch_header(name, root)     -> text of patches/<name>.patch before its first line starting
                                    with 'diff ' or '--- ' (the DEP-3 style header)
    patch_description(name, root)-> the header's first line (one-line description)
    variant_description(v, root) -> "baseline" for the baseline, else the descriptions of its
                                    patches in manifest order, joined by "; "
Errors are VariantError (a ValueError with a one-line message naming the file).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from core.files import source_sha256

REPO_ROOT = Path(__file__).resolve().parents[3]
BASELINE = "baseline"
SCRIPT_STEM = "train_gpt_medium"


class VariantError(ValueError):
    """Bad manifest, unknown variant or unreadable patch; the message is one line."""


def _root(root: str | Path | None) -> Path:
    return REPO_ROOT if root is None else Path(root)


def load_manifest(root: str | Path | None = None) -> dict[str, list[str]]:
    """{variant: [patch, ...]} from patches/variants.toml ({} if the file does not exist).
    Each top-level table is a variant; its `patches` key lists patch names applied in order."""
    path = _root(root) / "patches" / "variants.toml"
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise VariantError(f"{path}: cannot read manifest: {err}".replace("\n", " ")) from None
    manifest: dict[str, list[str]] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            continue
        patches = table.get("patches", [])
        if not isinstance(patches, list) or not all(isinstance(p, str) for p in patches):
            raise VariantError(f"{path}: [{name}] patches must be a list of patch names")
        manifest[name] = list(patches)
    return manifest


def fixed_settings(variant: str, root: str | Path | None = None) -> list[str]:
    """The fixed settings of a variant's entry, `settings = {key = value, ...}`, as ["--key=value", ...]
    ([] for the baseline and for an entry without them); tools/bench and tools/sweep pass them to its runs."""
    path = _root(root) / "patches" / "variants.toml"
    if variant == BASELINE or not path.exists():
        return []
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get(variant, {})
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise VariantError(f"{path}: cannot read manifest: {err}".replace("\n", " ")) from None
    return settings_args(table.get("settings", {}) if isinstance(table, dict) else {}, variant, path)


def settings_args(fixed: object, variant: str, path: Path) -> list[str]:
    """An entry's `settings` table (as read from path) -> ["--key=value", ...]; VariantError if it is not one."""
    if not isinstance(fixed, dict) or not all(isinstance(v, str | int | float) for v in fixed.values()):
        raise VariantError(f"{path}: [{variant}] settings must be a table of values, e.g. "
                           'settings = {sphere_step = "geodesic"}')
    return [f"--{k}={int(v) if isinstance(v, bool) else v}" for k, v in fixed.items()]


def script_path(variant: str, root: str | Path | None = None) -> Path:
    """Path of a variant's script (not checked for existence)."""
    name = f"{SCRIPT_STEM}.py" if variant == BASELINE else f"{SCRIPT_STEM}_{variant}.py"
    return _root(root) / "speedruns" / name


def variant_scripts(root: str | Path | None = None) -> dict[str, Path]:
    """{variant: script path} for every speedruns/train_gpt_medium*.py that exists."""
    folder = _root(root) / "speedruns"
    found: dict[str, Path] = {}
    for path in sorted(folder.glob(f"{SCRIPT_STEM}*.py")):
        if path.stem == SCRIPT_STEM:
            found[BASELINE] = path
        elif path.stem.startswith(SCRIPT_STEM + "_"):
            found[path.stem[len(SCRIPT_STEM) + 1 :]] = path
    return found


def variant_shas(root: str | Path | None = None) -> dict[str, str]:
    """{source_sha256 of the script text: variant} over the existing variant scripts."""
    return {source_sha256(p.read_text(encoding="utf-8")): v for v, p in variant_scripts(root).items()}


def variant_for_sha(sha: str | None, root: str | Path | None = None) -> str | None:
    """The variant whose script hashes to `sha` (core.files.source_sha256), or None."""
    if sha is None:
        return None
    return variant_shas(root).get(sha)


def patch_header(name: str, root: str | Path | None = None) -> str:
    """Header of patches/<name>.patch: the text before the first line starting with 'diff ' or
    '--- ' (trailing blank lines removed)."""
    path = _root(root) / "patches" / f"{name}.patch"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise VariantError(f"{path}: cannot read patch ({err.strerror})") from None
    header: list[str] = []
    for line in text.split("\n"):
        if line.startswith("diff ") or line.startswith("--- "):
            break
        header.append(line)
    return "\n".join(header).strip("\n")


def patch_description(name: str, root: str | Path | None = None) -> str:
    """First line of the patch header (the one-line description); the patch name if empty.
    A DEP-3 'Description: ' prefix is dropped."""
    header = patch_header(name, root).strip()
    first = header.split("\n", 1)[0].strip() if header else ""
    if first.lower().startswith("description:"):
        first = first[len("description:") :].strip()
    return first or name


def variant_description(variant: str, root: str | Path | None = None) -> str:
    """"baseline", or the one-line descriptions of the variant's patches joined by '; '."""
    if variant == BASELINE:
        return BASELINE
    manifest = load_manifest(root)
    if variant not in manifest:
        raise VariantError(f"{_root(root) / 'patches' / 'variants.toml'}: no [{variant}] table")
    return "; ".join(patch_description(p, root) for p in manifest[variant])
