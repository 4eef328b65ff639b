"""The property tree: each property declared once as (name, inputs, function), and its runner.

Roots (given per matrix): `weight` [m, n], `momentum` [m, n] (the Muon buffer, or Adam's exp_avg where
AdamW updates the matrix; may be absent) and `replicas` [R, m, n] (R minibatch gradients at the
checkpoint's weights). A node's function takes its inputs' values in order. `kind` says what a node
is: "scalar" (a float, one CSV column), "array" (saved in the npz) or "internal" (kept only while a
consumer still needs it).
"""

import math
import time
from dataclasses import dataclass

import torch

from analysis_lib import spectral as sp

ROOTS = ("weight", "momentum", "replicas")
TOP_K = 8  # directions kept by top-k energy and the subspace alignment
TRUST_ECHO = 0.5  # an echo above this marks a direction of the minibatch gradient worth trusting


@dataclass(frozen=True)
class Node:
    name: str
    inputs: tuple
    fn: object
    kind: str  # "scalar" | "array" | "internal"
    doc: str
    default: bool = True  # part of the default request (--properties all)
    consumes: str = ""  # an input the function may overwrite (called with reuse=True) when it reads it last


def _pick(i):
    return lambda value: value[i]


def _as_array(x):
    return x.detach().float().cpu()


def _declare():
    nodes = []

    def add(name, inputs, fn, kind, doc, default=True, consumes=""):
        nodes.append(Node(name, tuple(inputs), fn, kind, doc, default, consumes))

    def spectrum(key, svd_name, what):
        """The singular values of one matrix and the scalar properties of its spectrum."""
        sv = f"sv_{key}"
        add(sv, [svd_name], lambda usv: _as_array(usv[1]), "array", f"singular values of {what}, descending")
        add(f"spectral_norm_{key}", [sv], sp.spectral_norm, "scalar", f"largest singular value of {what}")
        add(f"frobenius_norm_{key}", [sv], sp.frobenius_norm, "scalar", f"Frobenius norm of {what}")
        add(f"stable_rank_{key}", [sv], sp.stable_rank, "scalar", f"||.||_F^2 / ||.||_2^2 of {what}")
        add(f"effective_rank_{key}", [sv], sp.effective_rank, "scalar",
            f"exp of the entropy of s / sum s, {what}")
        add(f"spectral_entropy_{key}", [sv], sp.spectral_entropy, "scalar",
            f"entropy of s^2 / sum s^2 over log k (0 = rank one, 1 = flat), {what}")
        add(f"condition_number_{key}", [sv], sp.condition_number, "scalar", f"s_max / s_min of {what}")
        add(f"top{TOP_K}_energy_{key}", [sv], lambda s: sp.top_k_energy(s, TOP_K), "scalar",
            f"fraction of sum s^2 in the top {TOP_K} singular values of {what}")

    # Consumers of the replica stack come first, so the stack is freed as early as possible.
    add("grad_mean", ["replicas"], lambda g: g.mean(0), "internal", "mean of the replica gradients [m, n]")
    add("grad_shape", ["replicas"], lambda g: tuple(g.shape), "internal", "(R, m, n) of the replica stack")
    add("energies", ["replicas", "grad_mean"], sp.replica_energies, "internal",
        "||G_r||^2 and ||G_r - G_mean||^2 of every replica, ||G_mean||^2")
    add("sigma2", ["energies", "grad_shape"], sp.noise_variance, "scalar",
        "per-entry gradient noise variance sum_r ||G_r - G_mean||^2 / ((R-1) m n)")
    add("rho", ["energies"], sp.plateau_rho, "scalar",
        "plateau: signal fraction (R ||G_mean||^2 - mean ||G_r||^2) / ((R-1) mean ||G_r||^2), clipped to [0, 1]")
    add("svd_g", ["grad_mean"], lambda g, reuse=False: sp.svd(g, overwrite=reuse), "internal",
        "SVD of the mean gradient", consumes="grad_mean")
    spectrum("g", "svd_g", "the mean gradient")
    add("aligned", ["svd_g", "replicas"],
        lambda ref, g, reuse=False: sp.align_replicas(ref[0], ref[2], g, reuse_stack=reuse),
        "internal", "SVD of every replica, directions matched to the mean gradient's by linear assignment on "
        "|U^T U_r| |V^T V_r| (scipy, exact) and sign-fixed", consumes="replicas")
    add("replica_perm", ["aligned"], lambda al: al["perm"], "array",
        "[R, k] replica direction matched to each mean-gradient direction", default=False)
    add("sv_median", ["aligned"], lambda al: _as_array(sp.median_over(al["s"], 0)), "array",
        "median over replicas of the aligned replica singular values (the s the echo is plotted against)")
    add("replica_cos", ["aligned"], lambda al: (al["cos_u"], al["cos_v"]),
        "internal", "cosines of each aligned replica direction with the mean gradient's")
    add("replica_cos_u", ["replica_cos"], lambda c: _as_array(c[0]), "array",
        "[R, k] cosine between replica and mean-gradient left singular vectors")
    add("replica_cos_v", ["replica_cos"], lambda c: _as_array(c[1]), "array",
        "[R, k] cosine between replica and mean-gradient right singular vectors")
    add("replica_angle_top", ["replica_cos"],
        lambda c: float(sp.median_over(sp.angle_degrees(c[0][:, 0] * c[1][:, 0]), 0)), "scalar",
        "median over replicas of the angle (degrees) arccos|<u,u_r><v,v_r>| of the top direction")
    add("reverb", ["aligned"], lambda al: sp.reverb_matrix(al["u"], al["v"]), "internal",
        "[k, R, R] reverb matrices Z_i[a,b] = <u_i^a,u_i^b><v_i^a,v_i^b>, zero diagonal")
    add("reverb_matrix", ["reverb"], _as_array, "array", "[k, R, R] the reverb matrices (large)", default=False)
    add("echo_pivots", ["reverb"], lambda z: _as_array(sp.echo_per_pivot(z)), "array",
        "[k, R] echo of each direction seen from each pivot replica", default=False)
    add("echo", ["reverb"], lambda z: _as_array(sp.echo_estimate(z)), "array",
        "echo zeta of each mean-gradient direction: median over pivots a of sqrt((Z^3)_aa / (||Z||_F^2 - "
        "2 ||Z_a||^2)), R >= 3: Z_ab estimates z_a z_b, the product of two replicas' echoes, and z_a^2 = "
        "Z_ab Z_ac / Z_bc on every triangle a, b, c, so it is exact on noiseless entries at any R (no finite-R scale; "
        "mean error within 0.002 at R = 8 on planted data)")
    add("trusted_directions", ["echo"], lambda e: int((e > TRUST_ECHO).sum()), "scalar",
        f"number of directions with echo above {TRUST_ECHO}")
    add("tau2", ["sv_median", "echo", "sigma2", "grad_shape"],
        lambda s, e, s2, shape: sp.fit_tau2(s, e, sp.noise_edge(s2, shape[1], shape[2])), "scalar",
        "tau^2 of the least-squares fit echo = 1 / (1 + tau^2 / s^2), s the median replica singular value "
        "(raw units), over the directions above the noise edge sigma (sqrt(m) + sqrt(n))")
    add("kappa", ["tau2", "sigma2", "grad_shape"], lambda t, s2, shape: sp.kappa(t, s2, shape[1], shape[2]),
        "scalar", "tau^2 / (sigma^2 (sqrt(m) + sqrt(n))^2): the ratio to the Marchenko-Pastur prediction")

    # The weights and the momentum come after the replicas, so their SVDs never coexist with the stores.
    add("svd_w", ["weight"], sp.svd, "internal", "SVD of the weights")
    add("svd_m", ["momentum"], sp.svd, "internal", "SVD of the momentum buffer")

    spectrum("w", "svd_w", "the weights")
    spectrum("m", "svd_m", "the momentum")
    add("powerlaw_w", ["sv_w"], sp.powerlaw_alpha, "internal", "power-law fit (alpha, xmin, KS) of the weight ESD")
    add("alpha_w", ["powerlaw_w"], _pick(0), "scalar",
        "power-law exponent of the weight eigenvalues s^2 (MLE, xmin by KS distance; WeightWatcher alpha)")
    add("alpha_xmin_w", ["powerlaw_w"], _pick(1), "scalar", "xmin (an eigenvalue s^2) of the power-law fit")
    add("alpha_ks_w", ["powerlaw_w"], _pick(2), "scalar", "Kolmogorov-Smirnov distance of the power-law fit")

    add("subspace_align_wm", ["svd_w", "svd_m"],
        lambda w, m: 0.5 * (sp.subspace_alignment(w[0], m[0], TOP_K) + sp.subspace_alignment(w[2], m[2], TOP_K)),
        "scalar", f"mean cosine of principal angles, top-{TOP_K} singular subspaces of weights vs momentum "
        "(left and right averaged)")
    add("polar_m", ["svd_m"], lambda usv: sp.polar_from_svd(usv[0], usv[2]), "internal", "U V^T of the momentum")
    add("orth_err_svd", ["polar_m"], sp.orthogonality_error, "scalar",
        "||O O^T - I||_F / sqrt(k) of the SVD polar factor U V^T of the momentum (fp32 round-off)")
    # NS5 and Polar Express map each singular value through a scalar polynomial and keep the vectors, so
    # their output on the momentum is U diag(p(s)) V^T: the errors follow from the momentum's spectrum.
    for key, label in (("ns5", "tuned NS5"), ("pe", "Polar Express")):
        add(f"{key}_sv_m", ["sv_m"], lambda s, key=key: sp.method_singular_values(s, key), "internal",
            f"singular values of {label} applied to the momentum")
        add(f"orth_err_{key}", [f"{key}_sv_m"], sp.orthogonality_error_of_values, "scalar",
            f"||O O^T - I||_F / sqrt(k) of {label} on the momentum (O = U diag(p(s)) V^T)")
        add(f"polar_dist_{key}", [f"{key}_sv_m"], sp.polar_distance_of_values, "scalar",
            f"||O - U V^T||_F / ||U V^T||_F of {label} on the momentum")
    return nodes


NODES = _declare()
BY_NAME = {node.name: node for node in NODES}
PROPERTIES = [node for node in NODES if node.kind != "internal"]


def default_properties():
    """Names of the properties computed when none are named."""
    return [node.name for node in PROPERTIES if node.default]


def resolve_request(text):
    """'all' or a comma list of property names -> list of names; unknown names raise SystemExit."""
    if text in (None, "", "all"):
        return default_properties()
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in BY_NAME or BY_NAME[n].kind == "internal"]
    if unknown:
        raise SystemExit(f"error: unknown properties {', '.join(unknown)}; run `python analysis.py --list` for names")
    return names


def plan(wanted, available_roots=ROOTS):
    """Nodes to evaluate for `wanted`, in declaration (a topological) order, and the wanted names skipped.

    A wanted property is skipped when it depends on a root that is not available.
    """
    needed, skipped, reachable = set(), [], {}

    def can(name):
        if name in ROOTS:
            return name in available_roots
        if name not in reachable:
            reachable[name] = all(can(i) for i in BY_NAME[name].inputs)
        return reachable[name]

    def visit(name):
        if name in needed or name in ROOTS:
            return
        needed.add(name)
        for dep in BY_NAME[name].inputs:
            visit(dep)

    for name in wanted:
        if can(name):
            visit(name)
        else:
            skipped.append(name)
    order = [node for node in NODES if node.name in needed]
    return order, skipped


def roots_needed(order):
    """Roots that the planned nodes read."""
    return {i for node in order for i in node.inputs if i in ROOTS}


def run(wanted, roots, on_node=None):
    """Evaluate the wanted properties for one matrix.

    roots: {root name: value or zero-argument loader or None (absent)}. Loaders run on first use and
    every value (root or intermediate) is dropped as soon as no remaining node reads it. Intermediates
    and roots that came from a loader belong to the run: their last reader may overwrite them
    (Node.consumes); a root given as a value is never modified.
    -> (results {name: value} for the wanted names, with nan for skipped scalars; seconds {node: s}).
    """
    available = tuple(name for name in ROOTS if roots.get(name) is not None)
    order, skipped = plan(wanted, available)
    remaining = {}
    for node in order:
        for dep in node.inputs:
            remaining[dep] = remaining.get(dep, 0) + 1
    keep = set(wanted)
    values, seconds, owned = {}, {}, set()
    for node in order:
        if on_node is not None:
            on_node(node.name)
        args = []
        for dep in node.inputs:
            if dep not in values:
                source = roots[dep]
                values[dep] = source() if callable(source) else source
                if callable(source):
                    owned.add(dep)
            args.append(values[dep])
        kwargs = {}
        if node.consumes:
            dep = node.consumes
            mine = dep in owned or dep not in ROOTS
            kwargs["reuse"] = mine and remaining[dep] == node.inputs.count(dep) and dep not in keep
        start = time.perf_counter()
        values[node.name] = node.fn(*args, **kwargs)
        seconds[node.name] = time.perf_counter() - start
        del args
        for dep in node.inputs:
            remaining[dep] -= 1
            if remaining[dep] == 0 and dep not in keep:
                del values[dep]
    results = {name: values[name] for name in wanted if name in values}
    for name in skipped:
        if BY_NAME[name].kind == "scalar":
            results[name] = math.nan
    return results, seconds


def describe():
    """One line per property: name, kind, inputs and meaning (for --list)."""
    lines = []
    for node in NODES:
        tag = node.kind if node.default or node.kind == "internal" else node.kind + ", on request"
        lines.append(f"{node.name:22s} [{tag}] <- {', '.join(node.inputs)}: {node.doc}")
    return "\n".join(lines)


def to_float(value):
    """A scalar node's value as a Python float."""
    if isinstance(value, torch.Tensor):
        return float(value)
    return float(value)
