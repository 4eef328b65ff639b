"""Benchmark analysis.py's property tree against the bare batched SVDs it needs: time and peak memory.

Example: tools/bench_analysis --replicas 8 --shapes 1024x1024,1024x4096,4096x1024

For each shape, random weights W, momentum M and R replica gradients G (a low-rank signal plus noise)
are made once; then, side by side in one process, (a) the bare SVDs the tree needs (the batched SVD of
the R replicas and one SVD each of W, M and the mean gradient) and (b) the whole tree (every default
property, gradients given) run in alternation, --repeats times each; the best time of each is kept.
Peak memory is the resident set size sampled every 2 ms, above what was resident when each run began
(the inputs already allocated), also given in replica stacks (R m n fp32 values). Gradient
computation is not part of either. Prints one table; nothing is written.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import torch

from kit.cliutil import make_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from analysis_lib import spectral as sp  # noqa: E402
from analysis_lib import tree  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def live_memory_rss():
    """Make the resident set size follow live memory: glibc then serves every allocation of 1 MiB or
    more by its own mmap and unmaps it on free (by default it keeps freed blocks in its heap, and the
    RSS would count every temporary ever made). -> whether glibc took the setting."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Samples the resident set size in a thread; .extra is the peak above the size at entry (bytes)."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start


def inputs(m: int, n: int, replicas: int, device, seed: int = 0):
    """Weights, momentum and replicas of one matrix: rank-16 signal plus Gaussian noise. -> (W, M, [G])."""
    gen = torch.Generator().manual_seed(seed)
    k = 16
    signal = torch.randn(m, k, generator=gen) @ (torch.linspace(3, 1, k)[:, None] * torch.randn(k, n, generator=gen))
    signal /= (m * n) ** 0.25
    w = torch.randn(m, n, generator=gen) / n**0.5
    g = signal + torch.randn(replicas, m, n, generator=gen)
    mom = signal + torch.randn(m, n, generator=gen) / replicas**0.5
    return w.to(device), mom.to(device), [g.to(device)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_svds(w, mom, holder, device):
    """The SVDs the tree computes: R replicas batched, then W, M and the mean gradient."""
    g = holder[0]
    outs = [sp.svd(g), sp.svd(w), sp.svd(mom), sp.svd(g.mean(0))]
    sync(device)
    return outs


def tree_run(w, mom, holder, device):
    """Every default property; the loader pops the stack so the tree holds its only reference."""
    results, seconds = tree.run(tree.default_properties(), {"weight": w, "momentum": mom,
                                                            "replicas": lambda: holder.pop()})
    sync(device)
    return seconds


def measure(fn, *args):
    with PeakRss() as mem:
        start = time.perf_counter()
        out = fn(*args)
        seconds = time.perf_counter() - start
    del out
    return seconds, mem.extra


def main(argv=None):
    parser = make_parser("tools/bench_analysis", __doc__)
    parser.add_argument("--replicas", type=int, default=8, help="replica gradients R (default 8)")
    parser.add_argument("--shapes", default="1024x1024,1024x4096,4096x1024",
                        help="comma list of MxN (default: GPT-2 Medium's attention and MLP shapes)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, best kept (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    opts = parser.parse_args(argv)
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in opts.shapes.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        raise SystemExit(f"error: bad --shapes {opts.shapes!r}; write e.g. 1024x1024,1024x4096") from None
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible; run with --device cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    exact_rss = live_memory_rss()
    r = opts.replicas
    print(f"bench_analysis: R={r}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"best of {opts.repeats}; RSS {'follows live memory' if exact_rss else 'may keep freed memory'}",
          flush=True)
    header = f"{'shape':>10} {'bare SVDs s':>12} {'tree s':>8} {'ratio':>6} {'svd peak MiB':>13} " \
             f"{'tree peak MiB':>14} {'stacks':>7}  replica SVDs + matching; slowest other nodes"
    print(header)
    total_bare = total_tree = 0.0
    for m, n in shapes:
        stack_mib = r * m * n * 4 / 2**20
        best_bare = best_tree = float("inf")
        peak_bare = peak_tree = 0
        node_seconds = {}
        for _ in range(opts.repeats):
            w, mom, holder = inputs(m, n, r, device)
            t, extra = measure(bare_svds, w, mom, holder, device)
            best_bare, peak_bare = min(best_bare, t), max(peak_bare, extra)
            with PeakRss() as mem:  # the tree takes the only reference to the stack and frees it
                start = time.perf_counter()
                seconds = tree_run(w, mom, holder, device)
                elapsed = time.perf_counter() - start
            if elapsed < best_tree:
                best_tree, node_seconds = elapsed, seconds
            peak_tree = max(peak_tree, mem.extra)
            del w, mom, holder
        total_bare += best_bare
        total_tree += best_tree
        # "aligned" holds the replica SVDs (one at a time) with the matching; the rest is SVD-free.
        others = sorted(((k, v) for k, v in node_seconds.items() if not k.startswith("svd") and k != "aligned"),
                        key=lambda kv: -kv[1])
        slow = f"aligned {node_seconds.get('aligned', 0.0):.2f}s; " + ", ".join(f"{k} {v:.2f}s" for k, v in others[:3])
        print(f"{m:>5}x{n:<4} {best_bare:>12.2f} {best_tree:>8.2f} {best_tree / best_bare:>6.2f} "
              f"{peak_bare / 2**20:>13.0f} {peak_tree / 2**20:>14.0f} {peak_tree / 2**20 / stack_mib:>7.2f}  {slow}",
              flush=True)
    print(f"{'all':>10} {total_bare:>12.2f} {total_tree:>8.2f} {total_tree / total_bare:>6.2f}   "
          f"(target: tree within 1.25x of the bare SVDs; stacks = tree peak / one replica stack, target about 2)")
    return 0
