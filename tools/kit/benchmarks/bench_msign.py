"""Benchmark the msign (U V^T) approximations that the speedrun variants ship: error, spectrum, time.

    tools/bench_msign --checkpoint checkpoints/RUN/step_000100.pt

Methods are taken from the generated scripts (loaded by path, nothing runs): tuned NS5 (baseline),
original NS5 (ns_original), Polar Express (polar), SVD (svd); classic Newton-Schulz
(X <- 1.5 X - 0.5 X X^T X) is the bench's own, as no variant ships it. Matrices: (a) Gaussian,
(b) singular values log-spaced 1e-6..1, (c) a Muon momentum buffer from a checkpoint (--checkpoint).
Prints one table (relative Frobenius error to U V^T after 1/3/5/10 iterations, the range of the output
singular values and the time per call at the shipped 5 iterations) and writes one plot.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from core.cli import make_parser
from kit.patching import patchset as ap
from kit.patching import variants

POLAR_STEADY = (1.875, -1.25, 0.375)  # Polar Express's converged tuple, used past its five designed steps
CLASSIC = (1.5, -0.5)


def load_script(root: Path, variant: str):
    """Import speedruns/train_gpt_medium[_<variant>].py by path (its main() is not run)."""
    path = variants.script_path(variant, root)
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; generate it with `tools/apply_patch --all`")
    spec = importlib.util.spec_from_file_location(f"bench_{variant}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def schedule(coefficients, steps: int, tail=None):
    """The first `steps` (a, b, c) of a shipped schedule, extended by `tail` (default: its last tuple)."""
    coefficients = tuple(coefficients)
    extra = tail or coefficients[-1]
    return coefficients[:steps] + (extra,) * max(0, steps - len(coefficients))


def classic_newton_schulz(G: torch.Tensor, steps: int) -> torch.Tensor:
    """Cubic Newton-Schulz X <- 1.5 X - 0.5 X X^T X from G / ||G||_F. [..., m, n] -> [..., m, n]."""
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b = CLASSIC
    for _ in range(steps):
        X = a * X + b * (X @ X.mT) @ X
    return X.mT if tall else X


class Method:
    """One msign approximation: call(G, steps) -> output; steps None means the shipped default."""

    def __init__(self, label, module=None, tail=None, fn=None, iterative=True):
        self.label, self.module, self.tail, self.fn, self.iterative = label, module, tail, fn, iterative

    def __call__(self, G, steps=None):
        if self.fn is not None:
            return self.fn(G, 5 if steps is None else steps)
        if steps is None or not self.iterative:
            return self.module.orthogonalize(G)
        shipped = self.module.NS_COEFFICIENTS
        try:  # the shipped orthogonalize reads the module's NS_COEFFICIENTS at call time
            self.module.NS_COEFFICIENTS = schedule(shipped, steps, self.tail)
            return self.module.orthogonalize(G)
        finally:
            self.module.NS_COEFFICIENTS = shipped


def methods(root: Path) -> list[Method]:
    return [
        Method("tuned NS5 (baseline)", load_script(root, "baseline")),
        Method("original NS5 (ns_original)", load_script(root, "ns_original")),
        Method("classic NS (bench's own)", fn=classic_newton_schulz),  # no variant ships it
        Method("Polar Express (polar)", load_script(root, "polar"), tail=POLAR_STEADY),
        Method("SVD (svd)", load_script(root, "svd"), iterative=False),
    ]


def gaussian(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """[m, n] standard normal, fp32."""
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def log_spaced(m: int, n: int, lo: float = 1e-6, hi: float = 1.0, seed: int = 1) -> torch.Tensor:
    """[m, n] = U diag(s) V^T, s log-spaced from hi down to lo, U and V random orthonormal; fp32."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(torch.log10(torch.tensor(hi)), torch.log10(torch.tensor(lo)), k, dtype=torch.float64)
    return ((U * s) @ V.T).float()


def checkpoint_matrix(path: str, name: str | None) -> tuple[str, torch.Tensor]:
    """A Muon momentum buffer from a checkpoint -> (label, [m, n] fp32); NAME or NAME:INDEX for stacks."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path} ({type(e).__name__}); pass a .pt file written by "
                         "a speedrun script (--checkpoint_every)") from None
    buffers = ckpt.get("optimizer", {}).get("muon", {}) if isinstance(ckpt, dict) else {}
    buffers = {k: v["momentum_buffer"] for k, v in buffers.items() if "momentum_buffer" in v}
    if not buffers:
        raise SystemExit(f"error: {path} holds no Muon momentum buffers; use a checkpoint of a Muon variant")
    key, _, index = (name or "").partition(":")
    if not key:
        key = next((k for k in buffers if k.endswith("mlp.fc_w")), next(iter(buffers)))
    if key not in buffers:
        raise SystemExit(f"error: no momentum buffer {key!r} in {path}; choose one of: {', '.join(sorted(buffers))}")
    M = buffers[key].float()
    if M.ndim == 3:
        M = M[int(index or 0)]
        key = f"{key}[{int(index or 0)}]"
    return key, M


def rel_error(O: torch.Tensor, ref: torch.Tensor) -> float:
    return float((O.double() - ref).norm() / ref.norm())


def msign_reference(G: torch.Tensor) -> torch.Tensor:
    """U V^T of the fp32 input, in fp64."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def time_call(fn, repeat: int, device: torch.device):
    """-> (median milliseconds of fn() over `repeat` runs after one warm-up, the warm-up's result)."""
    result = fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), result


def triton_rows(root: Path, repeat: int) -> list[str]:
    """GPU only: Triton XXT / ba_plus_cAA of the triton variant against torch.matmul, bf16."""
    mod = load_script(root, "triton")
    dev = torch.device("cuda")
    lines = ["", "Triton kernels (speedruns/train_gpt_medium_triton.py) vs torch.matmul, bf16, median ms:",
             f"{'shape':>12}  {'op':<14}{'triton':>9}{'torch':>9}{'speed-up':>10}"]
    for m, n in ((1024, 1024), (1024, 4096)):
        X = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        A = (X @ X.mT) / n
        ops = [("X X^T", lambda X=X: mod.XXT(X), lambda X=X: X @ X.mT),
               ("bA + cAA", lambda A=A: mod.ba_plus_cAA(A, alpha=2.0, beta=-3.0),
                lambda A=A: -3.0 * A + 2.0 * (A @ A))]
        for op, tri, ref in ops:
            t_tri, t_ref = time_call(tri, repeat, dev)[0], time_call(ref, repeat, dev)[0]
            lines.append(f"{f'{m}x{n}':>12}  {op:<14}{t_tri:>9.3f}{t_ref:>9.3f}{t_ref / t_tri:>9.2f}x")
    return lines


def parse_args(argv):
    p = make_parser("tools/bench_msign", __doc__.strip() + "\n\nexample: tools/bench_msign --checkpoint "
                    "checkpoints/RUN/step_000100.pt --size 1024x4096")
    p.add_argument("--checkpoint", help="CPU-preset checkpoint whose Muon momentum gives matrix (c); "
                                        "without it (c) is skipped")
    p.add_argument("--matrix", help="momentum buffer of the checkpoint, NAME or NAME:INDEX for a stack "
                                    "(default: the first MLP input matrix)")
    p.add_argument("--size", default="1024x4096", help="shape MxN of matrices (a) and (b) (default 1024x4096)")
    p.add_argument("--iters", default="1,3,5,10", help="iteration counts for the error curve (default 1,3,5,10)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per method after one warm-up (default 3)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the calls are timed (default: cuda when available)")
    p.add_argument("--out", default="bench_out/msign.png", help="plot path (default bench_out/msign.png)")
    ap.add_root_option(p)
    return p.parse_args(argv)


def parse_size(text: str) -> tuple[int, int]:
    try:
        m, n = (int(x) for x in text.lower().split("x"))
        assert m > 0 and n > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"error: bad --size {text!r}; write it as MxN, e.g. 1024x4096") from None
    return m, n


def plot(path: Path, results, iters, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True, squeeze=False)
    for ax, (matrix, rows) in zip(axes[0], results.items(), strict=True):
        for label in labels:
            errs = rows[label]["errors"]
            style = dict(ls="--", marker=None) if len(set(errs)) == 1 else dict(marker="o")
            ax.plot(iters, errs, label=label, **style)
        ax.set_title(matrix, fontsize=9)
        ax.set_xlabel("iterations")
        ax.set_yscale("log")
        ax.set_xticks(iters)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("relative error ||O - U V^T||_F / ||U V^T||_F")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("How close each msign approximation gets to U V^T")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = ap.repo_root(args.root)
    m, n = parse_size(args.size)
    try:
        iters = sorted({int(x) for x in args.iters.split(",")})
        assert iters and iters[0] > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"error: bad --iters {args.iters!r}; write positive counts like 1,3,5,10") from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda but no CUDA device is visible; use --device=cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    all_methods = methods(root)
    matrices = {f"(a) Gaussian {m}x{n}": gaussian(m, n), f"(b) s log-spaced 1e-6..1, {m}x{n}": log_spaced(m, n)}
    notes = []
    if args.checkpoint:
        name, M = checkpoint_matrix(args.checkpoint, args.matrix)
        matrices[f"(c) momentum {name} {M.shape[0]}x{M.shape[1]}"] = M
    else:
        notes.append("(c) skipped: pass --checkpoint PATH (a CPU-preset checkpoint) to add a real momentum matrix")
    results = {}
    for matrix, G in matrices.items():
        print(f"{matrix}: reference SVD ...", file=sys.stderr, flush=True)
        ref = msign_reference(G)
        Gd = G.to(device)
        rows = results[matrix] = {}
        for method in all_methods:
            print(f"  {method.label}", file=sys.stderr, flush=True)
            ms, out = time_call(lambda method=method, Gd=Gd: method(Gd), args.repeat, device)
            out = out.double().cpu()
            shipped = rel_error(out, ref)
            if method.iterative:
                errors = [rel_error(method(Gd, k).cpu(), ref) for k in iters]
            else:
                errors = [shipped] * len(iters)
            s = torch.linalg.svdvals(out)
            rows[method.label] = dict(errors=errors, shipped=shipped, smin=float(s.min()), smax=float(s.max()), ms=ms)
    width = max(len(k) for k in matrices)
    head = (f"{'matrix':<{width}}  {'method':<27}" + "".join(f"{f'err@{k}':>10}" for k in iters)
            + f"{'err@ship':>10}  {'output sv range':<17}{'ms/call':>10}")
    print(head)
    print("-" * len(head))
    for matrix, rows in results.items():
        for label, r in rows.items():
            sv_range = f"[{r['smin']:.3f}, {r['smax']:.3f}]"
            print(f"{matrix:<{width}}  {label:<27}" + "".join(f"{e:>10.2e}" for e in r["errors"])
                  + f"{r['shipped']:>10.2e}  {sv_range:<17}{r['ms']:>10.1f}")
    threads = f"CPU, {torch.get_num_threads()} threads"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    print(f"\ntimes: median of {args.repeat} calls at the shipped iterations (5; SVD: one SVD) on {dev_name}; "
          f"{'bf16' if device.type == 'cuda' else 'fp32'} as the scripts run there.")
    print("err@k: k iterations (first k tuples of a shipped schedule; past 5, tuned NS5 repeats its last tuple and "
          "Polar Express uses its steady tuple (1.875, -1.25, 0.375)); err@ship: the shipped call.")
    if device.type == "cuda":
        print("\n".join(triton_rows(root, max(args.repeat, 10))))
    else:
        notes.append("Triton kernel times need a CUDA device: rerun with --device=cuda on a GPU")
    for note in notes:
        print(note)
    out = Path(args.out)
    plot(out, results, iters, [mth.label for mth in all_methods])
    print(f"plot: {out}")
