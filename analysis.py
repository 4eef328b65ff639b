"""Map a tree of matrix properties over every weight, momentum and replica gradient of checkpoints.

Example: python analysis.py checkpoints/RUN/step_*.pt --replicas 8 --out analysis_out

For each checkpoint: every block matrix (attention Q, K, V, O and MLP in, MLP out, keyed by kind and
layer) gets its properties computed: spectra of the weights, the mean gradient and the momentum,
gradient noise sigma^2, the echo of each gradient direction from R replica gradients (the reverb
estimator), its tau^2 fit and kappa, power-law alpha, orthogonalization errors, ... (see --list).
Results go to OUT/<run_id>/step_NNNNNN.{csv,npz,json} and plots to OUT/<run_id>/plots/.
Under `torchrun --nproc_per_node=N analysis.py ...` the matrices are split over the processes.
An interrupted run resumes where it stopped, and a rerun skips what is done unless a setting that
changes results (replicas, tokens, validation files, the checkpoint's content) differs; --render redraws the
plots from the saved results, and --compare RUN RUN ... draws several runs into the same figures
(one line style per run, colour by depth), e.g. python analysis.py --compare runA runB --properties
spectral_norm_w,effective_rank_w.
"""

import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO_ROOT)  # core and analysis_lib, also when run from elsewhere

from analysis_lib import checkpoints as ck  # noqa: E402
from analysis_lib import outputs, plots, tree  # noqa: E402
from core.cli import make_parser  # noqa: E402

CPU_REPLICAS = 8  # per process; 8 GPUs give 64
ECHO_NODES = {"echo", "echo_pivots"}  # the pivot estimator reads at least 3 replicas


class Context:
    """Where this process runs: rank, world size, device."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group(backend="nccl" if cuda else "gloo")

    def say(self, text, every_rank=False):
        if self.rank == 0 or every_rank:
            prefix = f"[rank {self.rank}] " if self.world > 1 else ""
            print(prefix + text, flush=True)

    def error(self, text):
        if self.rank == 0:
            print(f"error: {text}", file=sys.stderr, flush=True)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def parse_args(argv):
    parser = make_parser("analysis.py", __doc__)
    parser.add_argument("checkpoints", nargs="*", help="checkpoint files (step_*.pt)")
    parser.add_argument("--properties", default="all",
                        help="comma list of properties (default: all; see --list); dependencies come along")
    parser.add_argument("--replicas", type=int, default=None,
                        help=f"replica gradients R (default {CPU_REPLICAS} per GPU process, {CPU_REPLICAS} on CPU; "
                        "at least 3 for the echo)")
    parser.add_argument("--out", default="analysis_out", help="results folder (default analysis_out)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per replica minibatch (default: the run's train_seq_len)")
    parser.add_argument("--val_files", default=None,
                        help="held-out token shards for the replicas (default: the run's val_files); "
                        "shards the run trained on are refused")
    parser.add_argument("--allow_train_overlap", "--allow-train-overlap", action="store_true",
                        help="take replica gradients on --val_files even where they are the run's training shards")
    parser.add_argument("--render", action="store_true", help="only redraw the plots from the results in --out "
                        "(with --properties: only those)")
    parser.add_argument("--compare", nargs="+", metavar="RUN", default=None,
                        help="draw 2 to 4 analysed runs into the same figures, one line style per run "
                        "(a run folder, or a run id under --out); with --properties: only those")
    parser.add_argument("--labels", default=None, help="comma list naming the --compare runs in the legend "
                        "(default: their folder names)")
    parser.add_argument("--plot_dir", default=None, help="where --compare writes its figures "
                        "(default OUT/compare/RUN1_vs_RUN2...)")
    parser.add_argument("--list", action="store_true", help="print every property, its inputs and meaning")
    parser.add_argument("--verbose", action="store_true", help="print each property as it is computed")
    parser.add_argument("--skip_plots", action="store_true", help="compute and save results only (plot later "
                        "with --render)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Replica gradients


def master_weights(ckpt, ref):
    """A matrix's weights in fp32; bf16 weights get back the mantissa bits Muon kept in its state."""
    tensor = ckpt["model"][ref.param]
    mantissa = ((ckpt.get("optimizer") or {}).get("muon") or {}).get(ref.param, {}).get("mantissa")
    if tensor.dtype == torch.bfloat16 and isinstance(mantissa, torch.Tensor) and mantissa.shape == tensor.shape:
        bits = (tensor.view(torch.int16).int() << 16) | (mantissa.int() & 0xFFFF)
        tensor = bits.view(torch.float32)
    return ck.take(tensor, ref)


def owners_of(refs, world):
    """Balance matrices over processes by size (largest first onto the least loaded). -> {label: rank}."""
    load = [0] * world
    owner = {}
    for ref in sorted(refs, key=lambda r: (-r.rows * r.cols, r.layer, r.kind)):
        rank = min(range(world), key=lambda k: (load[k], k))
        owner[ref.label] = rank
        load[rank] += ref.rows * ref.cols
    return owner


def replica_source(ckpt, opts):
    """Where a checkpoint's replica gradients come from. -> (script module, Hyperparameters, tokens per
    replica, validation glob, its files). Validation files that are training shards of the run are
    refused unless opts.allow_train_overlap: gradients on trained-on tokens understate the noise."""
    module = ck.load_script(ckpt, REPO_ROOT)
    args = ck.hyper(ckpt, module)
    tokens = ck.tokens_per_replica(args, opts.tokens)
    pattern = opts.val_files or args.val_files
    paths = ck.shard_paths(pattern, REPO_ROOT)
    if not paths:
        raise ck.CheckpointError(f"no validation files match {pattern!r}; pass --val_files=GLOB "
                                 "(the held-out tokens that replica gradients are computed on)")
    overlap = ck.training_overlap(paths, getattr(args, "train_files", None), REPO_ROOT)
    if overlap and not opts.allow_train_overlap:
        raise ck.CheckpointError(f"validation files {pattern!r} include {len(overlap)} of the run's training shards "
                                 f"({overlap[0]}), tokens the model trained on; pass held-out shards with "
                                 "--val_files=GLOB, or add --allow-train-overlap to use them anyway")
    return module, args, tokens, pattern, paths


def _first_reason(exc):
    """The first informative line of an exception's message (torch puts a header line first). -> str."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.endswith(":")]
    first = (reasons or lines or [type(exc).__name__])[0]
    return first + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "")


def build_model(module, ckpt):
    """The fp32 model of the training script holding the checkpoint's weights; CheckpointError when the
    weights and the hyperparameters disagree or the script refuses the hyperparameters."""
    try:
        return module.model_from_checkpoint(ckpt).float()
    except SystemExit as exc:  # the script's own refusal, e.g. a layout it cannot build
        raise ck.CheckpointError(f"the training script refuses the checkpoint's hyperparameters: "
                                 f"{str(exc).removeprefix('error: ')}") from None
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ck.CheckpointError(f"its weights do not fit the model its hyperparameters describe: "
                                 f"{_first_reason(exc)}; the checkpoint's hyperparameters were edited or "
                                 "belong to another run") from None


def replica_gradients(ckpt, refs, owner, replicas, ctx, opts):
    """R minibatch gradients at the checkpoint's weights, each matrix's stack on its owning process.

    Replica r comes from the r-th disjoint slice of the held-out stream; process k computes replicas
    k, k + W, ... and every slice is gathered to the matrix's owner (no averaging). -> ({label: [R, m, n]},
    tokens per replica).
    """
    module, args, tokens, pattern, _ = replica_source(ckpt, opts)
    try:
        stream = ck.heldout_stream(module, pattern, replicas * (tokens + 1), REPO_ROOT)
    except SystemExit as exc:  # the script's own shard errors
        raise ck.CheckpointError(str(exc).removeprefix("error: ")) from None
    model = build_model(module, ckpt)
    params = dict(model.named_parameters())
    missing = sorted({r.param for r in refs} - set(params))
    if missing:
        raise ck.CheckpointError(f"the model built from the script lacks {missing[0]}; the checkpoint is foreign")
    with torch.no_grad():
        for name in {r.param for r in refs}:
            whole = [r for r in refs if r.param == name]
            for ref in whole:
                target = params[name] if ref.index is None else params[name][ref.index]
                target.copy_(master_weights(ckpt, ref))
    model = model.to(ctx.device)
    params = dict(model.named_parameters())
    wanted = {r.param for r in refs}
    for name, p in params.items():
        p.requires_grad_(name in wanted)
    mine = [r for r in refs if owner[r.label] == ctx.rank]
    stacks = {r.label: torch.empty(replicas, r.rows, r.cols, device=ctx.device) for r in mine}
    rounds = math.ceil(replicas / ctx.world)
    step = int(ckpt["step"])
    start = time.perf_counter()
    for t in range(rounds):
        replica = t * ctx.world + ctx.rank
        if replica < replicas:
            inputs, targets = ck.replica_batch(stream, replica, tokens)
            grads = ck.one_gradient(model, module, args, step, inputs, targets,
                                    {n: params[n] for n in wanted}, ctx.device)
        else:
            grads = {n: torch.zeros(params[n].shape, device=ctx.device) for n in wanted}
        for ref in refs:
            piece = ck.take(grads[ref.param], ref).contiguous()
            if ctx.world == 1:
                stacks[ref.label][replica] = piece
                continue
            is_owner = owner[ref.label] == ctx.rank
            parts = [torch.empty_like(piece) for _ in range(ctx.world)] if is_owner else None
            dist.gather(piece, parts, dst=owner[ref.label])
            if is_owner:
                for k, part in enumerate(parts):
                    if t * ctx.world + k < replicas:
                        stacks[ref.label][t * ctx.world + k] = part
        del grads
        done = min((t + 1) * ctx.world, replicas)
        ctx.say(f"  replica gradients {done}/{replicas} ({time.perf_counter() - start:.1f}s)")
    del model
    return stacks, tokens


# ----------------------------------------------------------------------------------------------
# One checkpoint


def result_settings(ckpt, path, replicas, needs_replicas, opts):
    """Everything but the property names that decides a checkpoint's results: the checkpoint itself (by
    content: the sha256 of its file, so a run retrained under the same id and path is analysed again)
    and, when replicas are read, their count, tokens and validation files. (Nothing is random: replica
    r is the r-th slice of the validation stream, so there is no seed.) -> dict, JSON-able."""
    hp = ckpt.get("hyperparameters") or {}
    settings = {"checkpoint": {"run_id": hp.get("run_id"), "step": int(ckpt["step"]),
                               "source_sha256": ckpt.get("source_sha256"), "bytes": os.path.getsize(path),
                               "sha256": outputs.file_sha256(path)}}
    if needs_replicas:
        _, _, tokens, _, paths = replica_source(ckpt, opts)
        settings.update(replicas=replicas, tokens=tokens,
                        val_files=[[os.path.abspath(p), os.path.getsize(p)] for p in paths])
    return settings


def same_settings(recorded, settings):
    """Whether results recorded under `recorded` hold for `settings` (every key given must agree)."""
    return isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in settings.items())


def matrix_done(path, wanted, settings):
    record = outputs.load_partial(path) if os.path.exists(path) else None
    return record is not None and set(wanted) <= set(record["properties"]) \
        and same_settings(record.get("settings"), settings)


def analyse_checkpoint(path, number, total, wanted, replicas, ctx, opts):
    """Compute, save and assemble one checkpoint's results (skipped when already done). -> its run folder."""
    ckpt = ck.read_checkpoint(path)
    refs = ck.matrix_refs(ckpt["model"])
    if not refs:
        raise ck.CheckpointError(f"{path}: holds no block matrices (blocks.N.attn.qkvo_w / blocks.N.mlp.*); "
                                 "is it a checkpoint of this project's GPT?")
    step = int(ckpt["step"])
    folder = outputs.run_folder(opts.out, ck.run_id_of(ckpt, path))
    base = os.path.join(folder, outputs.stem(step))
    meta = outputs.read_json(base + ".json")
    head = f"checkpoint {number}/{total} {path} (step {step}, {len(refs)} matrices)"
    order, _ = tree.plan(wanted, tree.ROOTS)
    needs_replicas = "replicas" in tree.roots_needed(order)
    settings = result_settings(ckpt, path, replicas, needs_replicas, opts)
    if meta and set(wanted) <= set(meta.get("properties", [])) and same_settings(meta.get("settings"), settings) \
            and os.path.exists(base + ".csv") and os.path.exists(base + ".npz"):
        ctx.say(f"{head}: already done, skipped")
        return folder
    ctx.say(head)
    partials = [outputs.partial_path(folder, step, i, r.kind, r.layer) for i, r in enumerate(refs)]
    todo = [i for i, p in enumerate(partials) if not matrix_done(p, wanted, settings)]
    ctx.barrier()  # every process has seen the same finished set before anyone writes
    if len(todo) < len(refs):
        ctx.say(f"  resuming: {len(refs) - len(todo)} matrices already done")
    owner = owners_of(refs, ctx.world)
    stacks, tokens, grad_seconds = {}, None, 0.0
    if todo and needs_replicas:
        start = time.perf_counter()
        stacks, tokens = replica_gradients(ckpt, [refs[i] for i in todo], owner, replicas, ctx, opts)
        grad_seconds = time.perf_counter() - start
    mine = [i for i in todo if owner[refs[i].label] == ctx.rank]
    for count, i in enumerate(mine, 1):
        ref = refs[i]
        name = f"{ref.param}" + ("" if ref.index is None else f"[{ref.index}]")
        where = f"  matrix {count}/{len(mine)} {ref.kind} layer {ref.layer} ({ref.rows}x{ref.cols})"
        on_node = (lambda prop, where=where: ctx.say(f"{where}: {prop}", True)) if opts.verbose else None
        start = time.perf_counter()
        roots = {"weight": master_weights(ckpt, ref).to(ctx.device),
                 "momentum": _on(ck.momentum_of(ckpt, ref), ctx.device),
                 "replicas": (lambda label=ref.label: stacks.pop(label)) if ref.label in stacks else None}
        try:
            results, seconds = tree.run(wanted, roots, on_node)
        except (RuntimeError, ValueError) as exc:  # e.g. an SVD of non-finite values
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ck.CheckpointError(f"{path}: {ref.kind} layer {ref.layer}: {first}; are its weights or "
                                     "gradients finite?") from None
        del roots
        scalars = {k: tree.to_float(v) for k, v in results.items() if tree.BY_NAME[k].kind == "scalar"}
        arrays = {k: v for k, v in results.items() if tree.BY_NAME[k].kind == "array"}
        record = {"param": name, "kind": ref.kind, "layer": ref.layer, "rows": ref.rows, "cols": ref.cols,
                  "scalars": scalars, "arrays": arrays, "seconds": seconds, "properties": list(wanted),
                  "replicas": replicas, "tokens": tokens, "grad_seconds": grad_seconds, "settings": settings}
        outputs.save_partial(partials[i], record)
        slowest = max(seconds.items(), key=lambda kv: kv[1], default=("-", 0.0))
        ctx.say(f"{where}: {len(results)} properties in {time.perf_counter() - start:.2f}s "
                f"(slowest {slowest[0]} {slowest[1]:.2f}s)", every_rank=True)
    ctx.barrier()
    if ctx.rank == 0:
        assemble(ckpt, path, refs, partials, wanted, replicas, settings, base)
        shutil.rmtree(os.path.join(folder, outputs.stem(step) + ".partial"), ignore_errors=True)
    ctx.barrier()
    return folder


def _on(tensor, device):
    return None if tensor is None else tensor.to(device)


def assemble(ckpt, path, refs, partials, wanted, replicas, settings, base):
    """Join the per-matrix records into the checkpoint's csv, npz and json (all atomic)."""
    scalar_names = [n for n in wanted if tree.BY_NAME[n].kind == "scalar"]
    rows, arrays, node_seconds = [], {}, {}
    grad_seconds, tokens = 0.0, None
    for ref, part in zip(refs, partials, strict=True):
        record = outputs.load_partial(part)
        if record is None:
            raise ck.CheckpointError(f"{path}: the result of {ref.label} went missing; run the command again")
        rows.append({"step": int(ckpt["step"]), "param": record["param"], "kind": ref.kind, "layer": ref.layer,
                     "rows": ref.rows, "cols": ref.cols, **record["scalars"]})
        for name, value in record["arrays"].items():
            if name in wanted:
                arrays[outputs.array_key(ref.kind, ref.layer, name)] = value
        for node, sec in record["seconds"].items():
            node_seconds[node] = node_seconds.get(node, 0.0) + sec
        grad_seconds = max(grad_seconds, record.get("grad_seconds") or 0.0)
        tokens = tokens or record.get("tokens")
    outputs.write_csv(base + ".csv", rows, scalar_names)
    outputs.write_npz(base + ".npz", arrays)
    outputs.write_json(base + ".json", {
        "checkpoint": os.path.abspath(path), "step": int(ckpt["step"]), "variant": ckpt.get("variant"),
        "run_id": (ckpt.get("hyperparameters") or {}).get("run_id"), "val_loss": ckpt.get("val_loss"),
        "source_sha256": ckpt.get("source_sha256"), "replicas": replicas, "tokens_per_replica": tokens,
        "properties": list(wanted), "matrices": len(refs), "node_seconds": node_seconds,
        "gradient_seconds": grad_seconds, "settings": settings,
    })


# ----------------------------------------------------------------------------------------------
# Entry point


def render(out, only=None, say=print, properties=None):
    """Redraw the plots of every run folder under `out` (or only those named), of every property or
    only of `properties` (a set). -> number of runs drawn."""
    if not os.path.isdir(out):
        return 0
    folders = sorted(only) if only else sorted(os.path.join(out, d) for d in os.listdir(out))
    drawn = 0
    for folder in folders:
        if outputs.finished_steps(folder):
            say(f"plots for {folder}")
            plots.render_run(folder, progress=say, properties=properties)
            drawn += 1
    return drawn


def compare(opts, properties):
    """--compare: several runs' results drawn into the same figures. -> folder written."""
    runs = opts.compare
    if opts.checkpoints:
        raise SystemExit("error: --compare draws analysed runs and takes no checkpoints; analyse them first, then "
                         "run python analysis.py --compare RUN RUN ...")
    if not 2 <= len(runs) <= len(plots.RUN_STYLES):
        raise SystemExit(f"error: --compare takes 2 to {len(plots.RUN_STYLES)} runs (one line style each), "
                         f"got {len(runs)}")
    folders = []
    for run in runs:
        folder = run if os.path.isdir(run) else outputs.run_folder(opts.out, run)
        if not outputs.finished_steps(folder):
            raise SystemExit(f"error: no finished results for {run!r} (looked in {folder}); give a run folder "
                             f"of analysis results, or analyse the run first: python analysis.py "
                             f"checkpoints/RUN/step_*.pt --out {opts.out}")
        folders.append(folder)
    labels = [os.path.basename(os.path.normpath(f)) for f in folders]
    if opts.labels is not None:
        labels = [t.strip() for t in opts.labels.split(",")]
        if len(labels) != len(runs) or not all(labels):
            raise SystemExit(f"error: --labels names {len(labels)} runs for {len(runs)} --compare runs; "
                             "give one non-empty name per run, e.g. --labels " + ",".join(f"run{i + 1}" for i in
                                                                                         range(len(runs))))
    plot_dir = opts.plot_dir or os.path.join(opts.out, "compare", "_vs_".join(
        os.path.basename(os.path.normpath(f)) for f in folders))
    print(f"comparing {', '.join(labels)} into {plot_dir}")
    try:
        plots.render_compare(folders, labels, plot_dir, properties)
    except plots.CompareError as exc:
        raise SystemExit(f"error: {exc}") from None
    return plot_dir


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.list:
        print(tree.describe())
        return 0
    requested = None if opts.properties in (None, "", "all") else set(tree.resolve_request(opts.properties))
    if opts.compare:
        compare(opts, requested)
        return 0
    if opts.render:
        if not render(opts.out, properties=requested):
            raise SystemExit(f"error: no finished results under {opts.out}; run `python analysis.py CHECKPOINTS "
                             f"--out {opts.out}` first")
        return 0
    if not opts.checkpoints:
        raise SystemExit("error: no checkpoints given; example: python analysis.py checkpoints/RUN/step_*.pt")
    for name, example in (("replicas", 8), ("tokens", 1024)):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name} must be a positive number (got {value}); e.g. --{name}={example}, "
                             "or leave it out for the default")
    wanted = tree.resolve_request(opts.properties)
    ctx = Context()
    replicas = opts.replicas if opts.replicas is not None else CPU_REPLICAS * (
        ctx.world if ctx.device.type == "cuda" else 1)
    if replicas < 2:
        raise SystemExit("error: --replicas must be at least 2 (the noise compares replicas with each other)")
    echo_based = [n for n in wanted if ECHO_NODES & {node.name for node in tree.plan([n])[0]}]
    if replicas < 3 and echo_based:
        raise SystemExit(f"error: {', '.join(echo_based)} need --replicas of at least 3 (two replicas show only the "
                         "product of their echoes); raise --replicas or leave those properties out")
    if ctx.device.type == "cpu" and ctx.world > 1:  # processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world))
    failures, folders = 0, set()
    total = len(opts.checkpoints)
    for number, path in enumerate(opts.checkpoints, 1):
        try:
            folders.add(analyse_checkpoint(path, number, total, wanted, replicas, ctx, opts))
        except ck.CheckpointError as exc:
            failures += 1
            text = str(exc)
            ctx.error(text if text.startswith(str(path)) else f"{path}: {text}")
        except SystemExit as exc:  # a training script's own refusal
            failures += 1
            ctx.error(f"{path}: {str(exc).removeprefix('error: ')}")
        except Exception as exc:  # anything else still leaves the other checkpoints to be analysed
            failures += 1
            ctx.error(f"{path}: {type(exc).__name__}: {_first_reason(exc)} (unexpected; please report it)")
    if ctx.rank == 0 and folders and not opts.skip_plots:
        render(opts.out, only=folders, say=ctx.say, properties=requested)
    ctx.close()
    if failures:
        raise SystemExit(f"error: {failures} of {total} checkpoints could not be analysed (see the lines above)")
    return 0


if __name__ == "__main__":
    main()
