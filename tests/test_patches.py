"""tools/apply_patch, tools/make_patch and tools/diff_variant, on the real patches and on a scratch copy."""

import re
import shutil
import subprocess
import sys

import pytest
from variant_scripts import ROOT, committed_variants

sys.path.insert(0, str(ROOT / "tools"))
from kit.patching import patchset as ap  # noqa: E402
from kit.patching.diff_variant import changed_defaults, hyperparameter_defaults  # noqa: E402


def run_tool(tool, *args, root=None):
    cmd = [sys.executable, str(ROOT / "tools" / tool), *args] + ([f"--root={root}"] if root else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


@pytest.fixture
def repo(tmp_path):
    """A scratch repository: the baseline, the patches, the manifest and the generated variants."""
    (tmp_path / "speedruns").mkdir()
    for path in (ROOT / "speedruns").glob("train_gpt_medium*.py"):
        shutil.copy2(path, tmp_path / "speedruns" / path.name)
    shutil.copytree(ROOT / "patches", tmp_path / "patches")
    return tmp_path


def variant_bytes(root):
    return {p.name: p.read_bytes() for p in (root / "speedruns").glob("train_gpt_medium_*.py")}


def test_committed_variants_match_their_patches():
    result = run_tool("apply_patch", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(committed_variants())} variants match" in result.stdout


def test_every_variant_opens_with_the_generated_comment():
    for variant, patches in ap.read_manifest(ROOT).items():
        text = ap.variant_path(ROOT, variant).read_text()
        assert text.startswith(ap.generated_header(variant, patches))
        assert "edit patches/*.patch" in text.splitlines()[1]


def test_every_patch_has_a_header():
    for path in (ROOT / "patches").glob("*.patch"):
        header, diff = ap.split_patch(path.read_text())
        lines = header.strip().splitlines()
        assert lines[0].startswith("Description: ") and len(lines[0]) > 30, path.name
        assert any(line.startswith("Reference: ") for line in lines), path.name
        assert any(line.startswith("Effect: ") for line in lines), path.name
        assert diff.startswith("diff --git a/speedruns/train_gpt_medium.py"), path.name


def test_broken_patch_names_patch_and_hunk_and_writes_nothing(repo):
    patch = repo / "patches" / "polar.patch"
    text = patch.read_text()
    # corrupt a context line of the second hunk: it no longer matches the baseline
    hunk2 = text.index("\n@@", text.index("\n@@") + 1)
    line = text.index("\n ", hunk2) + 1
    patch.write_text(text[:line] + " # not in the baseline" + text[line:])
    before = variant_bytes(repo)
    result = run_tool("apply_patch", "polar", root=repo)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "patch 'polar'" in result.stderr and "hunk 2" in result.stderr and "nothing written" in result.stderr
    result = run_tool("apply_patch", "--all", root=repo)
    assert result.returncode == 1 and "nothing written" in result.stderr
    assert variant_bytes(repo) == before
    assert not list((repo / "speedruns").glob(".*tmp"))
    check = run_tool("apply_patch", "--check", root=repo)
    assert check.returncode == 1
    drifted = {line.split(":")[0] for line in check.stdout.splitlines()}
    assert drifted == {v for v, ps in ap.read_manifest(repo).items() if "polar" in ps}


def test_check_reports_a_hand_edited_variant(repo):
    path = repo / "speedruns" / "train_gpt_medium_svd.py"
    path.write_text(path.read_text() + "\n# a stray hand edit\n")
    result = run_tool("apply_patch", "--check", root=repo)
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == ["svd: speedruns/train_gpt_medium_svd.py differs from its patches svd"]


def test_unknown_patch_is_one_line_error(repo):
    result = run_tool("apply_patch", "no_such_patch", root=repo)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "no_such_patch" in result.stderr and "Traceback" not in result.stderr
    assert not (repo / "speedruns" / "train_gpt_medium_no_such_patch.py").exists()


def test_variant_named_baseline_is_refused(repo):
    baseline = (repo / "speedruns" / "train_gpt_medium.py").read_bytes()
    result = run_tool("apply_patch", "polar", "--as", "baseline", root=repo)
    assert result.returncode == 1 and "'baseline' names the hand-written script" in result.stderr
    assert (repo / "speedruns" / "train_gpt_medium.py").read_bytes() == baseline


def test_apply_patch_writes_and_records_a_new_stack(repo):
    result = run_tool("apply_patch", "ns_original", "cwd", "--as", "orig_cwd", root=repo)
    assert result.returncode == 1 and "patch 'cwd' does not apply" in result.stderr  # cwd needs normuon below it
    result = run_tool("apply_patch", "polar", "normuon", "--as", "pn", root=repo)
    assert result.returncode == 0, result.stderr
    assert ap.read_manifest(repo)["pn"] == ["polar", "normuon"]
    made = (repo / "speedruns" / "train_gpt_medium_pn.py").read_text()
    assert ap.strip_header(made) == ap.strip_header((ROOT / "speedruns/train_gpt_medium_polar_normuon.py").read_text())


def test_make_patch_round_trip_is_byte_for_byte(repo):
    path = repo / "speedruns" / "train_gpt_medium_polar.py"
    edited = path.read_text().replace("* 1.02 + 1e-6)", "* 1.05 + 1e-6)")
    edited = edited.replace("# Polar Express: five", "# Polar Express (Amsel et al. 2025): five")
    path.write_text(edited)
    header_before = ap.split_patch((repo / "patches" / "polar.patch").read_text())[0]
    result = run_tool("make_patch", "polar", root=repo)
    assert result.returncode == 0, result.stderr
    patch = (repo / "patches" / "polar.patch").read_text()
    assert ap.split_patch(patch)[0] == header_before
    assert "+    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.05 + 1e-6)" in patch
    assert path.read_text() == edited
    path.unlink()
    assert run_tool("apply_patch", "polar", root=repo).returncode == 0
    assert path.read_bytes() == edited.encode()
    # the stacks on polar were regenerated with it and everything is consistent
    assert "* 1.05 + 1e-6)" in (repo / "speedruns" / "train_gpt_medium_polar_normuon_cwd.py").read_text()
    assert run_tool("apply_patch", "--check", root=repo).returncode == 0


def test_make_patch_writes_a_new_variant_as_its_help_says(repo):
    """The help's recipe for a new patch: a manifest table, a copy of the script under it, an edit,
    `make_patch`; the variant comes back with its generated comment and --check passes."""
    with open(repo / "patches" / "variants.toml", "a") as f:
        f.write('\n[mynew]\npatches = ["mynew"]\n')
    script = repo / "speedruns" / "train_gpt_medium_mynew.py"
    baseline = (repo / "speedruns" / "train_gpt_medium.py").read_text()
    edited = baseline.replace("muon_wd: float = 0.01", "muon_wd: float = 0.02", 1)
    assert edited != baseline
    script.write_text(edited)
    result = run_tool("make_patch", "mynew", root=repo)
    assert result.returncode == 0, result.stderr
    assert (repo / "patches" / "mynew.patch").is_file()
    assert script.read_text().startswith("# Generated by tools/apply_patch")
    assert "muon_wd: float = 0.02" in script.read_text()
    assert run_tool("apply_patch", "--check", root=repo).returncode == 0


def test_make_patch_keeps_stacks_it_would_break_unchanged(repo):
    path = repo / "speedruns" / "train_gpt_medium_polar.py"
    edited = path.read_text().replace("def fp32_master(p, state):", "# new line\ndef fp32_master(p, state):")
    path.write_text(edited)
    stacked = repo / "speedruns" / "train_gpt_medium_polar_normuon.py"
    stacked_before = stacked.read_bytes()
    result = run_tool("make_patch", "polar", root=repo)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "polar_normuon (patch 'normuon' does not apply: hunk 1" in result.stderr
    assert "+# new line" in (repo / "patches" / "polar.patch").read_text()  # the edit itself is kept
    assert path.read_text() == edited and stacked.read_bytes() == stacked_before
    assert "polar_normuon:" in run_tool("apply_patch", "--check", root=repo).stdout


def test_make_patch_onto_stack_repairs_a_patch_a_change_below_it_broke(repo):
    """After an edit to polar breaks normuon, writing the hand-fixed polar_normuon back repairs normuon and
    regenerates every stack on it, with no error."""
    polar = repo / "speedruns" / "train_gpt_medium_polar.py"
    polar.write_text(polar.read_text().replace("def fp32_master(p, state):", "# new line\ndef fp32_master(p, state):"))
    assert run_tool("make_patch", "polar", root=repo).returncode == 1  # normuon no longer applies
    stacked = repo / "speedruns" / "train_gpt_medium_polar_normuon.py"
    fixed = stacked.read_text().replace("def fp32_master(p, state):", "# new line\ndef fp32_master(p, state):")
    assert fixed != stacked.read_text()
    stacked.write_text(fixed)
    result = run_tool("make_patch", "polar_normuon", "--onto-stack", root=repo)
    assert result.returncode == 0, result.stderr
    assert "# new line" in (repo / "speedruns" / "train_gpt_medium_polar_normuon_cwd.py").read_text()
    assert run_tool("make_patch", "--all", root=repo).returncode == 0  # cwd's line numbers moved with the edit
    assert run_tool("apply_patch", "--check", root=repo).returncode == 0


def test_make_patch_onto_stack_rewrites_the_last_patch(repo):
    path = repo / "speedruns" / "train_gpt_medium_polar_normuon.py"
    edited = path.read_text().replace("NORMUON_BETA2 = 0.95", "NORMUON_BETA2 = 0.9")
    path.write_text(edited)
    polar_before = (repo / "patches" / "polar.patch").read_bytes()
    refused = run_tool("make_patch", "polar_normuon", root=repo)
    assert refused.returncode == 1 and "--onto-stack" in refused.stderr
    result = run_tool("make_patch", "polar_normuon", "--onto-stack", root=repo)
    assert result.returncode == 0, result.stderr
    assert (repo / "patches" / "polar.patch").read_bytes() == polar_before
    assert "+NORMUON_BETA2 = 0.9\n" in (repo / "patches" / "normuon.patch").read_text()
    path.unlink()
    assert run_tool("apply_patch", "--all", root=repo).returncode == 0
    assert path.read_bytes() == edited.encode()


def test_make_patch_narrows_context_so_stacks_still_apply(repo):
    # triton edits lines next to polar's normalization: it must still apply on top of polar
    path = repo / "speedruns" / "train_gpt_medium_triton.py"
    path.write_text(path.read_text().replace("BLOCK_K: tl.constexpr):", "BLOCK_K: tl.constexpr):  # tiles"))
    result = run_tool("make_patch", "triton", root=repo)
    assert result.returncode == 0, result.stderr
    assert "context 1" in result.stdout and "polar_triton" in result.stdout
    assert run_tool("apply_patch", "--check", root=repo).returncode == 0


def test_diff_variant_lists_changed_hyperparameters():
    result = run_tool("diff_variant", "adamw", "--color=never")
    assert result.returncode == 0, result.stderr
    assert "+class HiddenAdamW(torch.optim.AdamW):" in result.stdout
    table = result.stdout[result.stdout.index("Hyperparameters defaults that differ"):]
    assert "adamw_lr" in table and "0.0015" in table and "(absent)" in table
    same = run_tool("diff_variant", "polar_triton", "--against", "polar", "--color=always")
    assert "\033[32m+" in same.stdout and "same defaults" in same.stdout


def test_hyperparameter_table_uses_ast_not_import():
    old = "raise SystemExit('never imported')\nclass Hyperparameters:\n    lr: float = 0.025\n    steps: int = 10\n"
    new = "raise SystemExit('never imported')\nclass Hyperparameters:\n    lr: float = 2.5e-2\n    steps: int = 12\n" \
          "    beta: float = 0.9\n"
    rows = changed_defaults(hyperparameter_defaults(old), hyperparameter_defaults(new))
    assert rows == [("steps", "10", "12"), ("beta", "(absent)", "0.9")]


# ---------------------------------------------------------------- issue 9: overwrites, --as "", canonical patches


def test_as_refuses_to_overwrite_a_script_the_manifest_does_not_list(repo):
    mine = repo / "speedruns" / "train_gpt_medium_mine.py"
    mine.write_text("# a hand-written experiment\n")
    manifest = (repo / "patches" / "variants.toml").read_bytes()
    result = run_tool("apply_patch", "polar", "--as", "mine", root=repo)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "train_gpt_medium_mine.py exists" in result.stderr and "--force" in result.stderr
    assert mine.read_text() == "# a hand-written experiment\n"
    assert (repo / "patches" / "variants.toml").read_bytes() == manifest
    assert not list((repo / "speedruns").glob(".*tmp"))
    forced = run_tool("apply_patch", "polar", "--as", "mine", "--force", root=repo)
    assert forced.returncode == 0, forced.stderr
    assert ap.strip_header(mine.read_text()) == ap.strip_header(ap.variant_path(repo, "polar").read_text())
    assert ap.read_manifest(repo)["mine"] == ["polar"]
    # a listed variant, or an unlisted script that already holds exactly this output, is regenerated freely
    assert run_tool("apply_patch", "polar", "--as", "mine", root=repo).returncode == 0
    assert run_tool("apply_patch", "svd", "--as", "loose", "--no-record", root=repo).returncode == 0
    assert run_tool("apply_patch", "svd", "--as", "loose", "--no-record", root=repo).returncode == 0


def test_empty_as_is_refused(repo):
    before, manifest = variant_bytes(repo), (repo / "patches" / "variants.toml").read_bytes()
    result = run_tool("apply_patch", "polar", "--as", "", root=repo)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--as needs a variant name" in result.stderr
    assert variant_bytes(repo) == before and (repo / "patches" / "variants.toml").read_bytes() == manifest


def test_recording_a_variant_keeps_the_rest_of_the_manifest(repo):
    path = repo / "patches" / "variants.toml"
    table = '[svd]\npatches = ["svd"]\n'
    path.write_text(path.read_text().replace(table, table + 'lr = "muon_lr"\n'))
    before = path.read_text()
    assert run_tool("apply_patch", "polar", "normuon", "--as", "pn", root=repo).returncode == 0
    assert path.read_text() == before + '\n[pn]\npatches = ["polar", "normuon"]\n'


def test_manifest_tables_may_carry_the_benchs_keys(repo):
    """lr, groups and settings (a table of strings and numbers) are the bench's: the patching tools read
    `patches` only and keep the rest as written."""
    path = repo / "patches" / "variants.toml"
    table = '[polar]\npatches = ["polar"]\n'
    extra = ('lr = "muon_lr"\ngroups = ["q", "k"]\n'
             'settings = {sphere_step = "geodesic", sphere_every = 3, muon_wd = 0.5}\n')
    path.write_text(path.read_text().replace(table, table + extra))
    assert ap.read_manifest(repo)["polar"] == ["polar"]
    check = run_tool("apply_patch", "--check", root=repo)
    assert check.returncode == 0, check.stdout + check.stderr
    assert run_tool("make_patch", "polar", root=repo).returncode == 0
    assert run_tool("apply_patch", "polar", "normuon", "--as", "pn", root=repo).returncode == 0
    assert table + extra in path.read_text()


def diff_lines(patch_text):
    """The changed lines of a patch, without line numbers or context: what the patch does."""
    return [line for line in ap.split_patch(patch_text)[1].splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def patch_texts(root):
    return {p.name: p.read_text() for p in (root / "patches").glob("*.patch")}


def test_committed_patches_are_what_make_patch_writes(repo):
    before = patch_texts(repo)
    result = run_tool("make_patch", "--all", root=repo)
    assert result.returncode == 0, result.stderr
    assert f"{len(before)} of {len(before)} patches were already in make_patch's form" in result.stdout
    assert patch_texts(repo) == before
    assert variant_bytes(repo) == variant_bytes(ROOT)


def test_check_fails_on_a_patch_with_stale_line_numbers(repo):
    path = repo / "patches" / "polar.patch"
    canonical = path.read_text()
    stale = re.sub(r"^@@ -(\d+)", lambda m: f"@@ -{int(m.group(1)) + 3}", canonical, flags=re.M)
    assert stale != canonical
    path.write_text(stale)
    assert run_tool("apply_patch", "--all", root=repo).returncode == 0  # git apply still takes it (offset)
    result = run_tool("apply_patch", "--check", root=repo)
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [
        "patch 'polar': patches/polar.patch is not what make_patch writes (stale line numbers or context); "
        "run `tools/make_patch --all`"]
    assert "tools/make_patch --all" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    fixed = run_tool("make_patch", "--all", root=repo)
    assert fixed.returncode == 0, fixed.stderr
    assert "rewrote patches/polar.patch" in fixed.stdout
    assert f"0 of {len(ap.read_manifest(repo))} variants regenerated" in fixed.stdout
    assert path.read_text() == canonical
    assert run_tool("apply_patch", "--check", root=repo).returncode == 0


def test_make_patch_all_follows_a_baseline_change(repo):
    baseline = repo / "speedruns" / "train_gpt_medium.py"
    text = baseline.read_text()
    anchor = text.index("\n", text.index("import ")) + 1  # new lines near the top shift every hunk
    baseline.write_text(text[:anchor] + "# a new comment\n# over two lines\n" + text[anchor:])
    before = patch_texts(repo)
    assert run_tool("apply_patch", "--check", root=repo).returncode == 1
    result = run_tool("make_patch", "--all", root=repo)
    assert result.returncode == 0, result.stderr
    after = patch_texts(repo)
    assert set(after) == set(before)
    for name in before:  # same header, same change, new line numbers
        assert after[name] != before[name], name
        assert ap.split_patch(after[name])[0] == ap.split_patch(before[name])[0]
        assert diff_lines(after[name]) == diff_lines(before[name]), name
    for variant in ap.read_manifest(repo):
        assert "# over two lines\n" in ap.variant_path(repo, variant).read_text()
    check = run_tool("apply_patch", "--check", root=repo)
    assert check.returncode == 0, check.stdout + check.stderr
    again = run_tool("make_patch", "--all", root=repo)  # a fixed point: nothing left to rewrite
    assert f"{len(after)} of {len(after)} patches were already" in again.stdout and patch_texts(repo) == after


def test_make_patch_all_names_a_patch_the_baseline_change_broke(repo):
    baseline = repo / "speedruns" / "train_gpt_medium.py"
    line = "# Record #8's Newton-Schulz: five quintic steps, each with its own tuned (a, b, c).\n"  # polar replaces it
    assert line in baseline.read_text()
    baseline.write_text(baseline.read_text().replace(line, "# Newton-Schulz, five steps.\n"))
    before = variant_bytes(repo)
    result = run_tool("make_patch", "--all", root=repo)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "patch 'polar' does not apply" in result.stderr and "fix those patches by hand" in result.stderr
    failed = set(re.findall(r"patch '(\w+)' does not apply", result.stderr))
    after = variant_bytes(repo)
    names = {v: ap.variant_path(repo, v).name for v in ap.read_manifest(repo)}
    unchanged = {v for v, name in names.items() if after[name] == before[name]}
    assert unchanged == {v for v, ps in ap.read_manifest(repo).items() if failed & set(ps)}
    assert "svd" not in unchanged  # the variants the change did not break follow the new baseline


def test_make_patch_help_documents_all():
    result = run_tool("make_patch", "--help")
    assert result.returncode == 0 and "tools/make_patch --all" in result.stdout and "--all" in result.stdout
    assert "tools/make_patch --all" in run_tool("apply_patch", "--help").stdout
