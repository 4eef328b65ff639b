"""Fit the echo variant's default kappa on planted matrices, in the optimizer's own convention.

Example: tools/fit_echo_kappa --shapes 256x256,256x1024 --seeds 2

Each case plants a true gradient G = U diag(s) V^T with a power-law spectrum s_j = s_1 j^-alpha over
all min(m, n) directions (s_1 a multiple `snr` of the noise edge), adds iid Gaussian noise of variance
sigma^2 per entry, and takes the SVD M = U' diag(s') V'^T of the noisy matrix, as Muon sees it. The best
update in M's singular basis (least squares to msign(G)) has h_i = <u'_i, msign(G) v'_i>. The echo
patch steps along U' diag(s'^2 / (s'^2 + tau^2)) V'^T; the fit picks the tau^2 closest to the oracle h
(Frobenius: the update itself; cosine: its direction only, what --echo_keep_norm=1 keeps) and reports
kappa = tau^2 / (sigma^2 (sqrt(m) + sqrt(n))^2). The default kappa is the median over the cases.
"""

from __future__ import annotations

import math
import statistics
import sys

import torch

from core.cli import format_table, make_parser
from core.files import write_csv

LOG_KAPPA_GRID = torch.linspace(math.log(1e-3), math.log(1e2), 2301, dtype=torch.float64)


def planted_case(m, n, alpha, snr, seed, sigma2=1.0):
    """-> (s' [k] singular values of the noisy M, oracle h [k], noise edge^2), fp64, k = min(m, n)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    edge2 = sigma2 * (math.sqrt(m) + math.sqrt(n)) ** 2
    s = math.sqrt(edge2) * snr * torch.arange(1, k + 1, dtype=torch.float64) ** -alpha
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    noise = torch.randn(m, n, generator=g, dtype=torch.float64) * math.sqrt(sigma2)
    Un, sn, Vnh = torch.linalg.svd((U * s) @ V.T + noise, full_matrices=False)
    oracle = ((Un.T @ U) * (Vnh @ V)).sum(1)  # <u'_i, U V^T v'_i> = sum_j <u'_i, u_j> <v_j, v'_i>
    return sn, oracle, edge2


def fit_kappa(s, oracle, edge2, objective="frobenius"):
    """kappa minimizing ||h(s; kappa edge2) - oracle||^2 (frobenius) or maximizing the cosine between them."""
    s2 = s[None, :] ** 2
    h = s2 / (s2 + LOG_KAPPA_GRID.exp()[:, None] * edge2)  # [grid, k]
    if objective == "frobenius":
        score = -((h - oracle) ** 2).sum(1)
    elif objective == "cosine":
        score = (h @ oracle) / h.norm(dim=1)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return math.exp(float(LOG_KAPPA_GRID[int(score.argmax())]))


def parse_shapes(text):
    try:
        shapes = [tuple(int(x) for x in part.lower().split("x")) for part in text.split(",") if part]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 2 for s in shapes):
        raise SystemExit(f"error: bad --shapes {text!r}: write e.g. 256x256,256x1024")
    return shapes


def parse_floats(text, name):
    try:
        values = [float(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values:
        raise SystemExit(f"error: bad --{name} {text!r}: write a comma-separated list of numbers, e.g. 0.5,1")
    return values


def main(argv=None):
    parser = make_parser("tools/fit_echo_kappa", __doc__)
    parser.add_argument("--shapes", default="256x256,256x1024", help="matrix shapes m x n (default %(default)s)")
    parser.add_argument("--alphas", default="0.5,1.0", help="power-law exponents of the planted spectrum")
    parser.add_argument("--snrs", default="2,5,20", help="top planted singular value over the noise edge")
    parser.add_argument("--seeds", type=int, default=2, help="cases per setting (default %(default)s)")
    parser.add_argument("--csv", help="also write every case to this CSV file")
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    alphas, snrs = parse_floats(args.alphas, "alphas"), parse_floats(args.snrs, "snrs")
    if args.seeds < 1:
        raise SystemExit("error: --seeds must be at least 1")
    cases = [(m, n, a, r, seed) for m, n in shapes for a in alphas for r in snrs for seed in range(args.seeds)]
    rows = []
    for i, (m, n, alpha, snr, seed) in enumerate(cases, 1):
        s, oracle, edge2 = planted_case(m, n, alpha, snr, seed)
        fro, cos = fit_kappa(s, oracle, edge2, "frobenius"), fit_kappa(s, oracle, edge2, "cosine")
        rows.append({"shape": f"{m}x{n}", "alpha": f"{alpha:g}", "snr": f"{snr:g}", "seed": str(seed),
                     "kappa_frobenius": f"{fro:.4f}", "kappa_cosine": f"{cos:.4f}"})
        print(f"[{i}/{len(cases)}] {m}x{n} alpha={alpha:g} snr={snr:g} seed={seed}: "
              f"kappa {fro:.4f} (frobenius), {cos:.4f} (cosine)", file=sys.stderr, flush=True)
    print(format_table(rows, list(rows[0])))
    for key in ("kappa_frobenius", "kappa_cosine"):
        values = [float(r[key]) for r in rows]
        print(f"{key}: median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, "
              f"{len(values)} cases)")
    if args.csv:
        write_csv(args.csv, rows)
