"""Benchmark analysis.py's property tree against the bare batched SVDs it needs: time and peak memory.

Example: tools/bench_analysis --replicas 8 --shapes 1024x1024,1024x4096,4096x1024

For each shape, random weights W, momentum M and R replica gradients G (a low-rank signal plus noise)
are made; then, side by side in one process and in alternation, --repeats times each (best kept):
  bare  the bare batched SVDs the tree needs, with torch: torch.linalg.svd of the [R, m, n] stack and
        of W, M and the mean gradient (wide matrices as their transpose, the fast orientation);
  own   the same R + 3 SVDs with the tree's own routine (analysis_lib.spectral.svd: LAPACK gesdd
        from scipy, in the matrix's own memory), replicas one per thread as the tree does them;
  tree  the whole tree: every default property, the replica stack handed over (gradients given).
Columns: wall seconds of each; tree/bare (the target: within 1.25x) and tree/own (what everything
but the SVDs costs); the CPU seconds ratio tree/bare (all threads); peak memory as the resident set
size (the kernel's high-water mark, reset before each run) above what was resident when the run
began, in MiB and in replica stacks (R m n fp32 values; the stack itself is an input, resident
before the run: add 1 for the total the tree holds). Gradient computation is not part of any.
Prints one table; nothing is written.

With --echo it measures accuracy instead of speed (tools/bench_analysis --echo): planted replicas
(12 directions at 4x down to 1x the noise edge, plus iid N(0, 1) noise; default shapes 128x256 and
256x1024) at each of --echo_replicas, one row per shape and R, averaged over --seeds: the echo's mean
error and RMSE against the truth it converges to (replica r's <u_i, u_hat_i^r> <v_i, v_hat_i^r>,
median over replicas), and kappa; beside them the same for the former estimator (divided by the
whole ||Z||_F^2: it read equal echoes c as c sqrt((R-2)/R)).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time

import torch

from analysis_lib import spectral as sp
from analysis_lib import tree
from core.cli import make_parser

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


def high_water_bytes():
    """The kernel's peak resident set size of this process since the last reset (VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_high_water():
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). -> whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return high_water_bytes() is not None
    except OSError:
        return False


class PeakRss:
    """Peak resident set size inside the block; .extra is the peak above the size at entry (bytes).

    Exact where the kernel's high-water mark can be reset (Linux). Elsewhere a thread samples the RSS
    every 2 ms, which misses peaks inside calls that hold the GIL (scipy's LAPACK wrappers do).
    """

    def __enter__(self):
        self.kernel = reset_high_water()
        self.start = self.peak = rss_bytes()
        self.running = not self.kernel
        if self.running:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.running:
            self.running = False
            self.thread.join()
        self.peak = max(self.peak, rss_bytes(), (high_water_bytes() or 0) if self.kernel else 0)
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
    """The SVDs the tree computes, with torch: R replicas batched, then W, M and the mean gradient."""
    g = holder[0]
    outs = [sp.torch_svd(g), sp.torch_svd(w), sp.torch_svd(mom), sp.torch_svd(g.mean(0))]
    sync(device)
    return outs


def own_svds(w, mom, holder, device):
    """The same SVDs with the tree's routine and threading: the replicas in their own memory (the stack
    is destroyed), one per thread; then W, M and the mean gradient."""
    g = holder[0]
    sp.each_in_threads(g.shape[0], lambda r: sp.svd(g[r], overwrite=True))
    outs = [sp.svd(w), sp.svd(mom), sp.svd(g.mean(0), overwrite=True)]
    sync(device)
    return outs


def tree_run(w, mom, holder, device, node_seconds):
    """Every default property; the loader pops the stack so the tree holds its only reference.
    Appends the seconds of each node to node_seconds."""
    results, seconds = tree.run(tree.default_properties(), {"weight": w, "momentum": mom,
                                                            "replicas": lambda: holder.pop()})
    sync(device)
    node_seconds.append(seconds)


def measure(fn, *args):
    """-> (wall seconds, CPU seconds of all threads, peak RSS above the start in bytes)."""
    with PeakRss() as mem:
        start, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    del out
    return seconds, cpu, mem.extra


ECHO_DIRECTIONS = 12


def planted_replicas(m, n, replicas, seed):
    """12 directions from 4x down to 1x the noise edge sqrt(m) + sqrt(n), plus iid N(0, 1) noise per replica.
    -> (U [m, 12], V [n, 12], G [R, m, n]) fp32."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.linspace(4.0, 1.0, ECHO_DIRECTIONS, dtype=torch.float64) * (math.sqrt(m) + math.sqrt(n))
    u = torch.linalg.qr(torch.randn(m, ECHO_DIRECTIONS, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, ECHO_DIRECTIONS, generator=gen, dtype=torch.float64))[0]
    noise = torch.randn(replicas, m, n, generator=torch.Generator().manual_seed(seed + 1000), dtype=torch.float64)
    return u.float(), v.float(), ((u * s) @ v.T + noise).float()


def former_echo(z):
    """The estimator analysis.py used before: sqrt((Z^3)_aa / ||Z||_F^2), median over pivots. [k, R, R] -> [k]."""
    ratio = ((z @ z) * z.mT).sum(-1) / (z**2).sum((-1, -2)).clamp_min(1e-30)[:, None]
    return sp.median_over(ratio.clamp_min(0).sqrt(), 1)


def echo_accuracy(m, n, replicas, seed):
    """-> {estimator: (mean error, RMSE, kappa)} for the current echo ("echo") and the former one."""
    u, v, g = planted_replicas(m, n, replicas, seed)
    um, _, vm = sp.svd(g.mean(0))
    energies = sp.replica_energies(g, g.mean(0))
    sigma2 = sp.noise_variance(energies, g.shape)
    al = sp.align_replicas(um, vm, g)
    k = ECHO_DIRECTIONS
    true = torch.einsum("mk,rmk->rk", u, al["u"][:, :, :k]) * torch.einsum("nk,rnk->rk", v, al["v"][:, :, :k])
    true = sp.median_over(true, 0)
    z = sp.reverb_matrix(al["u"], al["v"])
    s_median = sp.median_over(al["s"], 0)
    out = {}
    for name, echo in (("echo", sp.echo_estimate(z)), ("former", former_echo(z))):
        error = echo[:k] - true
        tau2 = sp.fit_tau2(s_median, echo, sp.noise_edge(sigma2, m, n))
        out[name] = (float(error.mean()), float((error**2).mean().sqrt()), sp.kappa(tau2, sigma2, m, n))
    return out


def echo_main(shapes, replica_counts, seeds):
    print(f"echo accuracy on planted replicas ({ECHO_DIRECTIONS} directions, 4x..1x the noise edge, N(0,1) noise); "
          f"mean over seeds {','.join(map(str, seeds))}; torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    print(f"{'shape':>10} {'R':>3} {'mean err':>9} {'RMSE':>7} {'kappa':>6}   former: {'mean err':>9} {'RMSE':>7} "
          f"{'kappa':>6}")
    for m, n in shapes:
        for r in replica_counts:
            runs = [echo_accuracy(m, n, r, seed) for seed in seeds]
            mean = {key: [sum(run[key][i] for run in runs) / len(runs) for i in range(3)] for key in runs[0]}
            e, f = mean["echo"], mean["former"]
            print(f"{m:>5}x{n:<4} {r:>3} {e[0]:>+9.4f} {e[1]:>7.4f} {e[2]:>6.3f}   former: {f[0]:>+9.4f} "
                  f"{f[1]:>7.4f} {f[2]:>6.3f}", flush=True)
    return 0


def int_list(text, what, example, least):
    try:
        values = [int(x) for x in text.split(",")]
        assert values and min(values) >= least
    except (ValueError, AssertionError):
        raise SystemExit(f"error: bad {what} {text!r}; write integers of at least {least} separated by commas, "
                         f"e.g. {what}={example}") from None
    return values


def main(argv=None):
    parser = make_parser("tools/bench_analysis", __doc__)
    parser.add_argument("--replicas", type=int, default=8, help="replica gradients R (default 8)")
    parser.add_argument("--shapes", default=None,
                        help="comma list of MxN (default: GPT-2 Medium's attention and MLP shapes; with --echo "
                        "128x256,256x1024)")
    parser.add_argument("--echo", action="store_true", help="measure the echo's accuracy on planted data instead")
    parser.add_argument("--echo_replicas", default="8,16,64", help="with --echo: replica counts (default 8,16,64)")
    parser.add_argument("--seeds", default="11,12", help="with --echo: planted-data seeds (default 11,12)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, best kept (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    opts = parser.parse_args(argv)
    if opts.shapes is None:
        opts.shapes = "128x256,256x1024" if opts.echo else "1024x1024,1024x4096,4096x1024"
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in opts.shapes.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        raise SystemExit(f"error: bad --shapes {opts.shapes!r}; write e.g. 1024x1024,1024x4096") from None
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.echo:
        counts = int_list(opts.echo_replicas, "--echo_replicas", "8,16,64", 3)  # the echo needs 3 replicas
        return echo_main(shapes, counts, int_list(opts.seeds, "--seeds", "11,12", 0))
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible; run with --device cpu")
    device = torch.device(opts.device)
    exact_rss = live_memory_rss()
    r = opts.replicas
    print(f"bench_analysis: R={r}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"best of {opts.repeats}; RSS {'follows live memory' if exact_rss else 'may keep freed memory'}",
          flush=True)
    header = f"{'shape':>10} {'bare s':>7} {'own s':>6} {'tree s':>7} {'tree/bare':>9} {'tree/own':>8} " \
             f"{'cpu t/b':>7} {'bare MiB':>8} {'tree MiB':>8} {'stacks':>6}  replica SVDs + matching; slowest others"
    print(header)
    totals = {"bare": 0.0, "own": 0.0, "tree": 0.0, "bare_cpu": 0.0, "tree_cpu": 0.0}
    for m, n in shapes:
        stack_mib = r * m * n * 4 / 2**20
        best = {"bare": (math.inf, 0.0), "own": (math.inf, 0.0), "tree": (math.inf, 0.0)}
        peak = {"bare": 0, "tree": 0}
        node_seconds = []
        for _ in range(opts.repeats):
            w, mom, holder = inputs(m, n, r, device)
            t, cpu, extra = measure(bare_svds, w, mom, holder, device)
            best["bare"], peak["bare"] = min(best["bare"], (t, cpu)), max(peak["bare"], extra)
            spare = [holder[0].clone()]
            t, cpu, _ = measure(own_svds, w, mom, spare, device)
            best["own"] = min(best["own"], (t, cpu))
            del spare
            # the tree takes the only reference to the stack (its loader pops it) and frees it
            t, cpu, extra = measure(tree_run, w, mom, holder, device, node_seconds)
            if (t, cpu) < best["tree"]:
                best["tree"], seconds = (t, cpu), node_seconds[-1]
            peak["tree"] = max(peak["tree"], extra)
            del w, mom, holder
        for key in ("bare", "own", "tree"):
            totals[key] += best[key][0]
        totals["bare_cpu"] += best["bare"][1]
        totals["tree_cpu"] += best["tree"][1]
        # "aligned" holds the replica SVDs with the matching; the rest is SVD-free.
        others = sorted(((k, v) for k, v in seconds.items() if not k.startswith("svd") and k != "aligned"),
                        key=lambda kv: -kv[1])
        slow = f"aligned {seconds.get('aligned', 0.0):.2f}s; " + ", ".join(f"{k} {v:.2f}s" for k, v in others[:3])
        bare, own, tr = best["bare"][0], best["own"][0], best["tree"][0]
        print(f"{m:>5}x{n:<4} {bare:>7.2f} {own:>6.2f} {tr:>7.2f} {tr / bare:>9.2f} {tr / own:>8.2f} "
              f"{best['tree'][1] / best['bare'][1]:>7.2f} {peak['bare'] / 2**20:>8.0f} {peak['tree'] / 2**20:>8.0f} "
              f"{peak['tree'] / 2**20 / stack_mib:>6.2f}  {slow}", flush=True)
    print(f"{'all':>10} {totals['bare']:>7.2f} {totals['own']:>6.2f} {totals['tree']:>7.2f} "
          f"{totals['tree'] / totals['bare']:>9.2f} {totals['tree'] / totals['own']:>8.2f} "
          f"{totals['tree_cpu'] / totals['bare_cpu']:>7.2f}")
    print("target: tree/bare within 1.25; stacks = tree peak above its inputs / one replica stack (about 2 at most)")
    return 0
