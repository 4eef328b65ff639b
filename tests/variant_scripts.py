"""Helpers for the tests of the patch overlay: load speedrun scripts by path, make planted matrices."""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from kit.patching import variants  # noqa: E402


def script_path(variant: str) -> Path:
    return variants.script_path(variant, ROOT)


def load_script(variant: str):
    """Import speedruns/train_gpt_medium[_<variant>].py as a fresh module (nothing runs on import)."""
    path = script_path(variant)
    spec = importlib.util.spec_from_file_location(f"speedrun_{variant}_{len(sys.modules)}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile (and eager FlexAttention) look a traced module up by name
    spec.loader.exec_module(module)
    return module


def committed_variants() -> list[str]:
    return list(variants.load_manifest(ROOT))


def distinct_variants() -> list[str]:
    """One variant per distinct stack of patches (entries that differ only in the settings the bench passes
    them, such as the nGPT experiments, run the same code)."""
    first = {}
    for variant, patches in variants.load_manifest(ROOT).items():
        first.setdefault(tuple(patches), variant)
    return list(first.values())


def planted(singular_values: torch.Tensor, m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix U diag(s) V^T with random orthonormal U [m, k], V [n, k] (k = len(s)) -> (G, U V^T), fp64."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * singular_values.double()) @ V.T, U @ V.T


def msign(G: torch.Tensor) -> torch.Tensor:
    """Reference U V^T in fp64. [..., m, n] -> [..., m, n]."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh
