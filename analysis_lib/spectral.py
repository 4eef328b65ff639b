"""Pure math on matrices, singular values and replica gradients.

Shapes: a matrix is [m, n], k = min(m, n); a stack of R replicas is [R, m, n]. Singular vectors are
stored as columns: U [m, k], V [n, k] (so a matrix is U diag(S) V^T). Every function works in the
dtype it is given (fp32 on CPU) and returns tensors, or Python floats for scalars.
"""

import ctypes
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
import scipy.linalg.cython_lapack
import torch
from scipy.optimize import linear_sum_assignment, minimize_scalar
from threadpoolctl import ThreadpoolController

# Tuned NS5 of the GPT-2 Medium record: one (a, b, c) per iteration.
NS5_TUNED = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
# Polar Express (Amsel et al. 2025): one (a, b, c) per iteration, with its safety factor.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02


# ----------------------------------------------------------------------------------------------
# Singular values and the scalar properties of a spectrum


_BLAS = None  # threadpoolctl's view of the BLAS libraries, made on first use


def _blas_threads(threads=None):
    """A context in which scipy's LAPACK uses `threads` threads (default: torch's count, so never more)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=threads or torch.get_num_threads(), user_api="blas")


_GESDD = {}


def _gesdd(dtype):
    """LAPACK's sgesdd / dgesdd from scipy's Cython LAPACK table, callable through ctypes.

    ctypes lets go of the GIL for the duration of the call (scipy.linalg.svd holds it), so replicas
    can be decomposed in parallel threads. Signature: jobz, m, n, a, lda, s, u, ldu, vt, ldvt, work,
    lwork, iwork, info (Fortran: every argument by reference, matrices column-major).
    """
    name = {np.dtype(np.float32): "sgesdd", np.dtype(np.float64): "dgesdd"}[np.dtype(dtype)]
    if name not in _GESDD:
        capsule = scipy.linalg.cython_lapack.__pyx_capi__[name]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        address = get_pointer(capsule, get_name(capsule))
        ptr, num = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)
        signature = ctypes.CFUNCTYPE(None, ctypes.c_char_p, num, num, ptr, num, ptr, ptr, num, ptr, num, ptr, num,
                                     ptr, num)
        _GESDD[name] = signature(address)
    return _GESDD[name]


def _lapack_svd(f, p=None):
    """Thin SVD of a column-major numpy matrix f [M, N], M >= N, in f's own memory (f is destroyed).

    p: optional column-major [M, N] array (not overlapping f) to receive the left vectors.
    -> (p [M, N], s [N], qt [N, N]) numpy, f = p diag(s) qt. Raises ValueError if LAPACK fails.
    """
    rows, cols = f.shape
    fn, dt = _gesdd(f.dtype), f.dtype
    if p is None:
        p = np.empty((rows, cols), dt, order="F")
    assert p.shape == (rows, cols) and p.dtype == dt and p.flags.f_contiguous
    s, qt = np.empty(cols, dt), np.empty((cols, cols), dt, order="F")
    iwork = np.empty(8 * cols, np.int32)
    info, lwork = ctypes.c_int(0), ctypes.c_int(-1)
    dims = [ctypes.c_int(v) for v in (rows, cols, rows, rows, cols)]  # m, n, lda, ldu, ldvt
    ref = ctypes.byref

    def call(work):  # ctypes releases the GIL for the call
        fn(b"S", ref(dims[0]), ref(dims[1]), f.ctypes.data, ref(dims[2]), s.ctypes.data, p.ctypes.data,
           ref(dims[3]), qt.ctypes.data, ref(dims[4]), work.ctypes.data, ref(lwork), iwork.ctypes.data, ref(info))

    query = np.zeros(1, dt)
    call(query)  # workspace query: the optimal size comes back in work[0]
    lwork.value = int(query[0] * 1.001) + 16  # a float32 size can be rounded down
    call(np.empty(lwork.value, dt))
    if info.value != 0:
        raise ValueError(f"LAPACK gesdd failed (info {info.value}): the matrix is not finite or did not converge")
    return p, s, qt


def each_in_threads(count, fn):
    """fn(0), ..., fn(count - 1) on as many threads as torch has (at most count), one BLAS and torch
    thread each; one after another when torch has one thread. LAPACK's SVD gains little from threads
    of its own (1.2x from 2 on this machine), while independent matrices scale with the cores; the
    work must let go of the GIL (svd and torch's kernels do). Exceptions propagate."""
    threads = torch.get_num_threads()
    workers = min(threads, count)
    if workers <= 1:
        for i in range(count):
            fn(i)
        return
    try:
        with _blas_threads(1), ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for job in [pool.submit(fn, i) for i in range(count)]:
                job.result()
    finally:
        torch.set_num_threads(threads)  # the workers changed the count that new threads start with


def torch_svd(x):
    """Thin SVD with torch.linalg.svd (any device, batched). [..., m, n] -> (U [..., m, k], S [..., k], V [..., n, k]).

    A wide input is decomposed as its (contiguous) transpose: LAPACK's SVD is about 3x faster on a
    tall 4096x1024 matrix than on the same matrix wide.
    """
    if x.shape[-2] < x.shape[-1]:
        v, s, uh = torch.linalg.svd(x.mT.contiguous(), full_matrices=False)
        return uh.mT, s, v
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u, s, vh.mT


def svd(x, overwrite=False, long_into=None):
    """Thin SVD. [..., m, n] -> (U [..., m, k], S [..., k] descending, V [..., n, k]).

    One fp32/fp64 matrix on the CPU goes to LAPACK's gesdd (scipy's build, called without the GIL),
    in its tall orientation and column-major, which is how a C-contiguous wide or square [m, n]
    already lies in memory (as its transpose): with overwrite=True LAPACK works in x's own memory and
    destroys it, so nothing is copied (a tall x is copied once to column-major). On this machine that
    is 20-30% faster than torch.linalg.svd on 1024x1024 and peaks at about 6 matrices of memory
    instead of 8 (torch copies the input and takes a larger workspace). LAPACK uses torch's thread
    count. long_into: a contiguous [k, max(m, n)] CPU tensor that receives, one vector per
    row, the singular vectors of the longer side (V if m <= n, else U: the left vectors of the tall
    orientation) straight from LAPACK, saving their allocation and a copy (ignored where it overlaps
    the memory LAPACK works in). Batches, other dtypes and GPU tensors go to torch_svd. ValueError on
    non-finite input.
    """
    if x.dim() != 2 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return torch_svd(x)
    if not math.isfinite(float(x.sum(dtype=torch.float64))):  # NaN and inf carry through a sum; no temporary
        raise ValueError("SVD of a matrix with non-finite values")
    a = x.detach().numpy()
    m, n = a.shape
    tall = a.T if m <= n else a  # a C-contiguous wide matrix is its transpose in column-major order
    work = tall if overwrite and tall.flags.f_contiguous else np.array(tall, order="F")
    into = None if long_into is None else long_into.detach().numpy().T  # [k, M] row-major = [M, k] column-major
    if into is not None and np.may_share_memory(into, work):
        into = None
    with _blas_threads():
        p, s, qt = _lapack_svd(work, into)
    del work
    p, s, q = torch.from_numpy(p), torch.from_numpy(s), torch.from_numpy(qt).mT  # tall = p diag(s) q^T
    return (q, s, p) if m <= n else (p, s, q)


def spectral_norm(s):
    """Largest singular value. [k] -> float."""
    return float(s.max()) if s.numel() else math.nan


def frobenius_norm(s):
    """sqrt(sum s^2). [k] -> float."""
    return float(torch.sqrt((s.double() ** 2).sum()))


def stable_rank(s):
    """||A||_F^2 / ||A||_2^2, in [1, k]; nan for the zero matrix. [k] -> float."""
    s = s.double()
    top = s.max() ** 2
    return float((s**2).sum() / top) if top > 0 else math.nan


def _entropy(p):
    """Shannon entropy (nats) of a probability vector, with 0 log 0 = 0. [k] -> float."""
    p = p[p > 0]
    return float(-(p * torch.log(p)).sum())


def effective_rank(s):
    """exp of the entropy of s / sum s (Roy and Vetterli), in [1, k]; nan for zero. [k] -> float."""
    s = s.double()
    total = s.sum()
    return math.exp(_entropy(s / total)) if total > 0 else math.nan


def spectral_entropy(s):
    """Entropy of s^2 / sum s^2 divided by log k, in [0, 1]; nan for zero or k = 1. [k] -> float."""
    e = s.double() ** 2
    total = e.sum()
    if total <= 0 or s.numel() < 2:
        return math.nan
    return _entropy(e / total) / math.log(s.numel())


def condition_number(s):
    """s_max / s_min; inf when s_min is 0 (rank deficient), nan for the zero matrix. [k] -> float."""
    top, low = float(s.max()), float(s.min())
    if top <= 0:
        return math.nan
    return top / low if low > 0 else math.inf


def top_k_energy(s, k):
    """Fraction of sum s^2 held by the k largest singular values, in [0, 1]. [k'] -> float."""
    e = torch.sort(s.double() ** 2, descending=True).values
    total = e.sum()
    return float(e[:k].sum() / total) if total > 0 else math.nan


def powerlaw_alpha(s, min_tail=10):
    """Power-law exponent of the eigenvalues lambda = s^2, WeightWatcher style.

    For each candidate xmin (every eigenvalue leaving at least `min_tail` in the tail) the maximum
    likelihood exponent is alpha = 1 + n / sum log(lambda / xmin) over the tail; the xmin kept is the
    one whose fitted Pareto CDF 1 - (x / xmin)^(1 - alpha) is closest to the empirical tail CDF in
    Kolmogorov-Smirnov distance. [k] -> (alpha, xmin, ks_distance), nan when too few nonzero values.
    """
    lam = torch.sort(s.double() ** 2).values
    lam = lam[lam > lam.max() * 1e-12] if lam.numel() else lam
    n = lam.numel()
    if n < max(min_tail, 2):
        return math.nan, math.nan, math.nan
    log_lam = torch.log(lam)
    starts = torch.arange(n - min_tail + 1)
    tail_n = (n - starts).double()
    tail_log_sum = torch.flip(torch.cumsum(torch.flip(log_lam, [0]), 0), [0])[starts]
    denom = tail_log_sum - tail_n * log_lam[starts]
    alpha = torch.where(denom > 0, 1 + tail_n / denom.clamp_min(1e-300), torch.full_like(denom, math.nan))
    # KS distance of every candidate: rows = candidates (in blocks, to bound memory), columns = eigenvalues.
    idx = torch.arange(n)
    ks = torch.empty(starts.numel(), dtype=torch.float64)
    for lo in range(0, starts.numel(), 128):
        st, al, tn = starts[lo:lo + 128], alpha[lo:lo + 128], tail_n[lo:lo + 128]
        rank_in_tail = (idx[None, :] - st[:, None]).double()
        ratio = (log_lam[None, :] - log_lam[st][:, None]).clamp_min(0)
        fit_cdf = 1 - torch.exp((1 - al[:, None]) * ratio)
        gap = torch.maximum((fit_cdf - rank_in_tail / tn[:, None]).abs(),
                            (fit_cdf - (rank_in_tail + 1) / tn[:, None]).abs())
        ks[lo:lo + 128] = torch.where(rank_in_tail >= 0, gap, 0.0).amax(1)
    ks = torch.where(torch.isfinite(alpha), ks, torch.full_like(ks, math.inf))
    best = int(torch.argmin(ks))
    if not math.isfinite(float(ks[best])):
        return math.nan, math.nan, math.nan
    return float(alpha[best]), float(lam[starts[best]]), float(ks[best])


# ----------------------------------------------------------------------------------------------
# Replica statistics


def replica_energies(replicas, mean):
    """Squared norms of every replica and of its deviation from the mean, in one pass.

    replicas [R, m, n], mean [m, n] -> (||G_r||_F^2 [R], ||G_r - G_mean||_F^2 [R], ||G_mean||_F^2), fp64.
    """
    sq = torch.stack([torch.linalg.vector_norm(g).double() ** 2 for g in replicas]).cpu()
    dev = torch.stack([torch.linalg.vector_norm(g - mean).double() ** 2 for g in replicas]).cpu()
    return sq, dev, float(torch.linalg.vector_norm(mean).double() ** 2)


def noise_variance(energies, shape):
    """Per-entry noise variance sigma^2 = sum_r ||G_r - G_mean||_F^2 / ((R - 1) m n).

    energies from replica_energies, shape (R, m, n) -> float (nan for R < 2).
    """
    r, m, n = shape
    return float(energies[1].sum()) / ((r - 1) * m * n) if r >= 2 else math.nan


def plateau_rho(energies):
    """Signal fraction rho = clip((R ||G_mean||^2 - mean ||G_r||^2) / ((R - 1) mean ||G_r||^2), 0, 1).

    energies from replica_energies -> float (nan for R < 2 or all-zero replicas).
    """
    sq, _, mean_sq = energies
    r, mean_r = sq.numel(), float(sq.mean())
    if r < 2 or mean_r <= 0:
        return math.nan
    return min(max((r * mean_sq - mean_r) / ((r - 1) * mean_r), 0.0), 1.0)


SURE_MATCH = 2 / 3  # an overlap above this is in some optimal assignment (see assign_directions)


def assign_directions(cost):
    """Maximum-weight assignment of rows (reference directions) to columns (replica directions).

    cost [k, k] (numpy or torch, fp32 or fp64), cost[i, j] = |<u_i, u'_j>| |<v_i, v'_j>|. Every row
    and column of such a matrix sums to at most 1 (Cauchy-Schwarz on unit vectors), so an entry
    c > 2/3 belongs to an optimal assignment: trading it away gains at most 2 (1 - c) < c. Those pairs
    are fixed first (their rows and columns zeroed around a 1, which no optimal assignment can then
    avoid), and scipy's exact solver runs on the result, given in float64 and negated, the form it
    solves in, so that it makes no copy of its own. The caller's cost matrix is overwritten.
    -> perm [k] int64, row i assigned column perm[i].
    """
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().cpu().numpy()
    k = cost.shape[0]
    best = cost.argmax(1)
    rows = np.flatnonzero(cost[np.arange(k), best] > SURE_MATCH)
    if rows.size == k:
        return best.astype(np.int64)
    cols = best[rows]
    cost[rows, :] = 0
    cost[:, cols] = 0
    cost[rows, cols] = 1
    return linear_sum_assignment(np.negative(cost, dtype=np.float64))[1].astype(np.int64)


def align_replicas(u_ref, v_ref, replicas, reuse_stack=False, batched=None):
    """SVD each replica and align its directions to the reference (mean-gradient) directions.

    u_ref [m, k], v_ref [n, k], replicas [R, m, n] -> dict of u [R, m, k], s [R, k], v [R, n, k]
    (replica directions reordered by assign_directions on |U_ref^T U_r| * |V_ref^T V_r|), perm [R, k]
    (replica r's original direction matched to reference i), cos_u, cos_v [R, k] (<u_ref_i, u_r_i>,
    <v_ref_i, v_r_i> after alignment). A pair (u_i, v_i) flips sign as a whole, so each replica keeps
    its matrix; the sign makes <u_ref,u> + <v_ref,v> nonnegative. u and v are views of [R, k, m] and
    [R, k, n] stores (one direction per row).

    Memory: with reuse_stack (the caller gives up `replicas`) each CPU replica is decomposed in its
    own memory and the longer side's vectors then go back into that memory, so only the shorter
    side's [R, k, min(m, n)] store is new; the working set of one replica is its SVD's outputs, then
    two [k, k] overlap matrices and the float64 assignment problem. On the CPU, as many replicas at
    a time as torch has threads, one thread each (the working set is per replica in flight); on a
    GPU (or with batched=True), batched groups of 8 through torch_svd.
    """
    r_count, m, n = replicas.shape
    k = min(m, n)
    dev, dt = replicas.device, replicas.dtype
    new = lambda *shape: torch.empty(*shape, dtype=dt, device=dev)
    in_place = reuse_stack and replicas.is_contiguous() and r_count > 0
    slots = None
    if in_place:  # a fresh tensor on the stack's storage, so the stack's own tensor object can be freed
        slots = torch.empty(0, dtype=dt, device=dev).set_(replicas.untyped_storage(), replicas.storage_offset(),
                                                          (r_count, k * max(m, n)), (m * n, 1))
    store_u = slots.view(r_count, k, m) if in_place and m >= n else new(r_count, k, m)
    store_v = slots.view(r_count, k, n) if in_place and m < n else new(r_count, k, n)
    out = {"u": store_u.mT, "s": new(r_count, k), "v": store_v.mT,
           "perm": torch.empty(r_count, k, dtype=torch.long), "cos_u": new(r_count, k), "cos_v": new(r_count, k)}

    def match(r):
        """Overlaps with the reference, assignment, reordering and signs of replica r, in its stores."""
        su, sv = store_u[r], store_v[r]  # [k, m], [k, n]: replica r's directions in LAPACK's order
        cost = (u_ref.mT @ su.mT).mul_(v_ref.mT @ sv.mT).abs_()  # [reference, replica]
        perm = torch.from_numpy(assign_directions(cost))
        del cost
        idx = perm.to(dev)
        su.copy_(su[idx])
        sv.copy_(sv[idx])
        cu, cv = torch.linalg.vecdot(u_ref.mT, su), torch.linalg.vecdot(v_ref.mT, sv)
        sign = torch.where(cu + cv < 0, -1.0, 1.0).to(dt)
        su.mul_(sign[:, None])
        sv.mul_(sign[:, None])
        out["s"][r] = out["s"][r][idx]
        out["perm"][r] = perm
        out["cos_u"][r], out["cos_v"][r] = cu * sign, cv * sign

    def place(r, u, s, v):
        """Replica r's SVD into its stores (the replica's own memory is free by now)."""
        for store, vectors in ((store_u[r], u.mT), (store_v[r], v.mT)):
            if vectors.data_ptr() != store.data_ptr():  # else LAPACK wrote it there already
                store.copy_(vectors)
        out["s"][r] = s

    if batched or (batched is None and dev.type != "cpu"):  # groups of 8; then match one by one
        for lo in range(0, r_count, 8):
            us, ss, vs = svd(replicas[lo:lo + 8])
            for j in range(us.shape[0]):
                place(lo + j, us[j], ss[j], vs[j])
            del us, ss, vs
            for j in range(min(8, r_count - lo)):
                match(lo + j)
        return out

    # LAPACK may write the longer side's vectors straight into their store, unless that store is the
    # replica's own memory and LAPACK is working in it (a wide replica decomposed in place).
    long_store = store_v if m <= n else store_u
    direct = not (in_place and m < n)

    def one(r):
        place(r, *svd(replicas[r], overwrite=in_place, long_into=long_store[r] if direct else None))
        match(r)

    each_in_threads(r_count, one)
    return out


def angle_degrees(cos):
    """Angle between lines (sign ignored), degrees. [...] -> [...]."""
    return torch.rad2deg(torch.arccos(cos.abs().clamp(max=1.0)))


def reverb_matrix(u, v, chunk=128):
    """Z_i[a, b] = <u_i^a, u_i^b> <v_i^a, v_i^b> with a zero diagonal, for aligned replicas.

    u [R, m, k], v [R, n, k] -> Z [k, R, R]. Few replicas stored as [R, m, k]: one pass over each
    pair (a, b), reading the stacks in memory order. Many, or vectors stored one direction per row
    (as align_replicas gives them): `chunk` directions at a time as a contiguous [chunk, R, m] copy,
    so the batched products run at matmul speed.
    """
    r, _, k = u.shape
    out = torch.zeros(k, r, r, dtype=u.dtype, device=u.device)
    if r <= 16 and u.is_contiguous() and v.is_contiguous():
        for a in range(r):
            for b in range(a + 1, r):
                z = (u[a] * u[b]).sum(0) * (v[a] * v[b]).sum(0)
                out[:, a, b] = z
                out[:, b, a] = z
        return out
    ut, vt = u.mT, v.mT  # [R, k, m], [R, k, n]
    for lo in range(0, k, chunk):
        uc = ut[:, lo:lo + chunk].transpose(0, 1).contiguous()
        vc = vt[:, lo:lo + chunk].transpose(0, 1).contiguous()
        torch.bmm(uc, uc.mT, out=out[lo:lo + chunk]).mul_(torch.bmm(vc, vc.mT))
    out.diagonal(dim1=1, dim2=2).zero_()
    return out


def echo_per_pivot(z):
    """Echo of each direction seen from each pivot replica a, with no finite-R scale (any R >= 3).

    z [k, R, R] (reverb matrices: symmetric, zero diagonal) -> [k, R] (z's dtype):
        num_a = sum_{b, c} Z_ab Z_bc Z_ca = (Z^3)_aa = row sums of (Z Z) * Z^T
        den_a = ||Z||_F^2 - 2 sum_b Z_ab^2          (the squares of the entries off row and column a)
        zeta_a = sqrt(max(num_a / den_a, 0)),       0 where den_a = 0 (e.g. Z = 0).

    Why: the reverb entries estimate products of per-replica echoes, E Z_ab ~ z_a z_b (a != b). The
    three entries of a triangle a, b, c give z_a^2 exactly as Z_ab Z_ac / Z_bc, and weighting each
    triangle by Z_bc^2 turns the mean of these ratios into one ratio of sums over the ordered pairs
    (b, c) of distinct replicas other than a:
        sum Z_ab Z_bc Z_ca / sum Z_bc^2 = z_a^2 sum z_b^2 z_c^2 / sum z_b^2 z_c^2 = z_a^2,
    for any z. The numerator is (Z^3)_aa (the zero diagonal drops b = a, c = a and b = c by itself);
    the denominator is ||Z||_F^2 minus row a and column a. The earlier estimator divided by the
    whole ||Z||_F^2 = S2^2 - S4 (S2 = sum z^2, S4 = sum z^4) while its numerator is
    z_a^2 sum_{b != a} z_b^2 (S2 - z_a^2 - z_b^2): equal echoes c then read c sqrt((R - 2) / R)
    (0.87 c at R = 8) and unequal ones something between. Multiplying that by sqrt(R / (R - 2))
    is exact only for equal echoes; on planted data the two agree when the replicas' echoes are equal
    and this one is 3x closer per pivot when they are not (RMS error 0.011 against 0.037 at R = 8,
    128x256, 12 directions, replica noise from 0.4 to 2). With noisy entries it is a ratio of sums,
    so not exactly unbiased; measured against the planted truth its mean error stays within 0.002 at
    R = 8 (tests/test_analysis_math.py). At least 3 replicas are needed (with 2 only the product
    z_1 z_2 is seen): ValueError.
    """
    r = z.shape[-1]
    if r < 3:
        raise ValueError(f"the echo needs at least 3 replicas (got {r}): two only show the product of their echoes")
    num = ((z @ z) * z.mT).sum(-1).double()
    sq = z.double() ** 2  # fp64: the difference below cancels when row a dominates
    den = sq.sum((-1, -2))[:, None] - 2 * sq.sum(-1)
    ratio = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)
    return torch.sqrt(ratio.clamp_min(0.0)).to(z.dtype)


def echo_estimate(z):
    """The echo of each direction: the median over pivots of echo_per_pivot. z [k, R, R] -> [k]."""
    return median_over(echo_per_pivot(z), 1)


def median_over(x, dim):
    """Median along dim, the mean of the two middle values for an even count. [...] -> [...]."""
    return torch.quantile(x, 0.5, dim=dim)


def echo_law(s, tau2):
    """Echo predicted under isotropic noise: 1 / (1 + tau^2 / s^2). [k] -> [k]."""
    s2 = np.asarray(s, dtype=np.float64) ** 2
    with np.errstate(divide="ignore"):
        return s2 / (s2 + tau2)


def fit_tau2(s, zeta, s_min=0.0):
    """Least-squares fit of zeta = 1 / (1 + tau^2 / s^2) over the directions with s > s_min.

    s [k] (the median replica singular value), zeta [k] -> tau^2 (float, raw units of s^2); nan
    when fewer than 2 usable directions. Below the noise edge the echo collapses to 0 instead of
    following the law, so callers pass the Marchenko-Pastur edge as s_min. Searches log tau^2 on a
    grid, then refines (Brent).
    """
    s = np.asarray(s, dtype=np.float64)
    z = np.asarray(zeta, dtype=np.float64)
    keep = np.isfinite(s) & np.isfinite(z) & (s > max(s_min, 0.0))
    s, z = s[keep], z[keep]
    if s.size < 2:
        return math.nan
    s2 = s**2
    loss = lambda log_t: float(((s2 / (s2 + math.exp(log_t)) - z) ** 2).sum())
    lo, hi = math.log(s2.min()) - 12, math.log(s2.max()) + 12
    grid = np.linspace(lo, hi, 241)
    best = int(np.argmin([loss(g) for g in grid]))
    step = grid[1] - grid[0]
    bounds = (grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)])
    if bounds[1] - bounds[0] < step:
        return math.exp(grid[best])
    res = minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 1e-10})
    return math.exp(res.x)


def noise_edge(sigma2, m, n):
    """Top singular value of pure noise (Marchenko-Pastur edge) sigma (sqrt(m) + sqrt(n)). -> float."""
    return math.sqrt(sigma2) * (math.sqrt(m) + math.sqrt(n)) if sigma2 >= 0 else math.nan


def kappa(tau2, sigma2, m, n):
    """tau^2 over its Marchenko-Pastur prediction sigma^2 (sqrt(m) + sqrt(n))^2. floats -> float."""
    pred = sigma2 * (math.sqrt(m) + math.sqrt(n)) ** 2
    return tau2 / pred if pred > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# Subspaces and orthogonalization


def subspace_alignment(a, b, k):
    """Mean cosine of the principal angles between span(a[:, :k]) and span(b[:, :k]).

    a [m, k1], b [m, k2] orthonormal columns -> float in [0, 1].
    """
    k = min(k, a.shape[1], b.shape[1])
    cos = torch.linalg.svdvals(a[:, :k].mT @ b[:, :k])
    return float(cos.clamp(max=1.0).mean())


def _odd_quintic(x, coeffs, scale):
    """Odd-quintic iterations X = a X + (b A + c A A) X, A = X X^T, on the wide orientation.

    x [m, n] -> [m, n]; x is divided by `scale` first.
    """
    tall = x.shape[0] > x.shape[1]
    x = x.mT if tall else x
    x = x / scale
    for a, b, c in coeffs:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def ns5_tuned(x):
    """Tuned NS5 of the record: X / (||X||_F + 1e-7), five steps. [m, n] -> [m, n]."""
    return _odd_quintic(x, NS5_TUNED, torch.linalg.norm(x) + 1e-7)


def polar_express(x):
    """Polar Express: X / (||X||_F * 1.02 + 1e-6), five tuned steps. [m, n] -> [m, n]."""
    return _odd_quintic(x, POLAR_EXPRESS, torch.linalg.norm(x) * POLAR_EXPRESS_SAFETY + 1e-6)


def quintic_on_values(s, coeffs, scale):
    """What an odd-quintic iteration does to each singular value: x = s / scale, x = a x + b x^3 + c x^5.

    The matrix iteration X = a X + (b A + c A A) X with A = X X^T keeps the singular vectors and maps
    every singular value through this scalar map, so its output is U diag(p(s)) V^T. [k] -> [k] (fp64).
    """
    x = s.double() / scale
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x


def method_singular_values(s, method):
    """Singular values of tuned NS5 ("ns5") or Polar Express ("pe") applied to a matrix with singular
    values s (normalization included, as in ns5_tuned / polar_express). [k] -> [k] fp64."""
    frob = float(torch.sqrt((s.double() ** 2).sum()))
    if method == "ns5":
        return quintic_on_values(s, NS5_TUNED, frob + 1e-7)
    return quintic_on_values(s, POLAR_EXPRESS, frob * POLAR_EXPRESS_SAFETY + 1e-6)


def orthogonality_error_of_values(p):
    """||O O^T - I||_F / sqrt(k) for O = U diag(p) V^T (the short side). [k] -> float."""
    return float(torch.sqrt(((p.double() ** 2 - 1) ** 2).mean()))


def polar_distance_of_values(p):
    """||O - U V^T||_F / ||U V^T||_F for O = U diag(p) V^T. [k] -> float."""
    return float(torch.sqrt(((p.double() - 1) ** 2).mean()))


def polar_from_svd(u, v):
    """Exact polar factor U V^T. u [m, k], v [n, k] -> [m, n]."""
    return u @ v.mT


def orthogonality_error(o):
    """||O O^T - I||_F / sqrt(k) on the short side: 0 for a partial isometry. [m, n] -> float."""
    o = o.mT if o.shape[0] > o.shape[1] else o
    gram = o @ o.mT
    gram.diagonal().sub_(1.0)
    return float(torch.linalg.norm(gram) / math.sqrt(o.shape[0]))


def polar_distance(o, polar):
    """Relative distance to the exact polar factor ||O - U V^T||_F / ||U V^T||_F. [m, n] -> float."""
    ref = torch.linalg.norm(polar)
    return float(torch.linalg.norm(o - polar) / ref) if ref > 0 else math.nan
