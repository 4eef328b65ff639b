"""The Triton kernels shipped in speedruns/train_gpt_medium_triton.py, run by the Triton interpreter on CPU.

TRITON_INTERPRET=1 must be set before triton is first imported, so the kernels run in a child process
that loads the generated variant by path; the comparisons with torch happen here.
"""

import os
import subprocess
import sys

import pytest
import torch
from variant_scripts import ROOT, load_script, script_path

pytest.importorskip("triton")

SMALL = dict(block_m=32, block_k=16)  # small tiles: several per output, no size a multiple of them

CHILD = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("triton_variant", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
cases = torch.load(sys.argv[2])
out = {}
for name, (op, x, kwargs) in cases.items():
    try:
        out[name] = mod.XXT(x, **kwargs) if op == "xxt" else mod.ba_plus_cAA(x, **kwargs)
    except ValueError as e:
        out[name] = str(e)
torch.save(out, sys.argv[3])
"""


def make_cases():
    g = torch.Generator().manual_seed(0)
    cases = {}
    for shape in [(3, 70, 45), (2, 45, 70), (50, 33), (33, 50)]:  # batched and 2D, wide and tall
        cases[f"xxt{shape}"] = ("xxt", torch.randn(*shape, generator=g), SMALL)
    cases["xxt strided"] = ("xxt", torch.randn(2, 45, 70, generator=g).mT, SMALL)  # [2, 70, 45], not contiguous
    cases["xxt default tiles"] = ("xxt", torch.randn(130, 70, generator=g), {})  # 128-row tiles, one partial
    for shape in [(4, 70, 70), (45, 45)]:
        X = torch.randn(*shape[:-1], 90, generator=g)
        cases[f"bAcAA{shape}"] = ("ba", X @ X.mT / 90, dict(alpha=2.0315, beta=-4.7750, **SMALL))
    cases["ba rectangular"] = ("ba", torch.randn(8, 12, generator=g), dict(alpha=1.0, beta=1.0))
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton")
    cases = make_cases()
    torch.save({k: (op, x.contiguous() if k != "xxt strided" else x, kw) for k, (op, x, kw) in cases.items()},
               folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(script_path("triton")), str(folder / "cases.pt"),
                           str(folder / "out.pt")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, torch.load(folder / "out.pt")


def reference(op, x, kwargs):
    if op == "xxt":
        return x @ x.mT
    return kwargs["beta"] * x + kwargs["alpha"] * x @ x


@pytest.mark.parametrize("name", ["xxt(3, 70, 45)", "xxt(2, 45, 70)", "xxt(50, 33)", "xxt(33, 50)", "xxt strided",
                                  "xxt default tiles", "bAcAA(4, 70, 70)", "bAcAA(45, 45)"])
def test_kernel_matches_torch(results, name):
    cases, out = results
    op, x, kwargs = cases[name]
    expected = reference(op, x, kwargs)
    assert out[name].shape == expected.shape and out[name].dtype == x.dtype
    torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-4)


def test_ba_plus_caa_rejects_rectangular(results):
    assert "square" in results[1]["ba rectangular"]


def test_strided_input_really_is_strided():
    cases = make_cases()
    assert not cases["xxt strided"][1].is_contiguous()


def test_cpu_newton_schulz_falls_back_to_torch():
    variant, baseline = load_script("triton"), load_script("baseline")
    G = torch.randn(4, 24, 24, generator=torch.Generator().manual_seed(4))
    assert torch.equal(variant.orthogonalize(G), baseline.orthogonalize(G))
