"""Time the training steps of variants side by side: one step of each in turn, in one process.

    OMP_NUM_THREADS=1 tools/bench_step_cost baseline sphere stiefel --steps=30
    OMP_NUM_THREADS=1 tools/bench_step_cost baseline@d50a958 baseline:fuse_micro_batches=0 baseline \
        baseline:compile=1 --preset=bench          # old code, the loop, the batched step, compiled

Each entry is VARIANT[@REV][:key=value,...]: the variant's script (as of git revision REV, when given),
with settings on top of the preset. Each script is loaded by path (its main() is not run); its model,
optimizers and loader are built from the preset (default cpu) with the scripts' defaults and seed; a
script whose `compile` setting is on runs its model through torch.compile, and its first step (the
compilation, cold or from the inductor cache) is reported apart. Run it from the repository root (the
presets name their data relative to it; make it with tools/prepare_tiny_data).
Then, round after round, every variant takes one training step (train_step, as in the script) while a
clock runs, and its Muon step is timed on its own too. Taking the variants in turn exposes them to the
same moments of a noisy machine; the order rotates from round to round, so that no variant is always
the one that runs first. Prints, per variant, the median milliseconds of the whole step and of
the Muon step over the rounds after --warmup, and each as a ratio to the first variant named.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.cli import make_parser
from kit.patching import patchset as ap
from kit.patching import variants


def parse_args(argv):
    p = make_parser("tools/bench_step_cost", __doc__)
    p.add_argument("variants", nargs="+", metavar="VARIANT[@REV][:key=value,...]",
                   help="variants to time (baseline: the baseline), each maybe at a git revision and with settings; "
                        "the first is the reference")
    p.add_argument("--steps", type=int, default=30, help="timed rounds (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="rounds not counted at the start (default 3)")
    p.add_argument("--preset", default="cpu", help="the scripts' preset (default cpu)")
    ap.add_root_option(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    return args


class Timed:
    """Wraps an optimizer's step() and records the seconds of each call."""

    def __init__(self, step):
        self.step, self.seconds = step, []

    def __call__(self):
        t0 = time.perf_counter()
        self.step()
        self.seconds.append(time.perf_counter() - t0)


def parse_entry(entry):
    """'VARIANT[@REV][:key=value,...]' -> (variant, rev or None, ['--key=value', ...])."""
    name, _, settings = entry.partition(":")
    variant, _, rev = name.partition("@")
    pairs = [s for s in settings.split(",") if s]
    if not variant or ("@" in name and not rev) or any("=" not in s for s in pairs):
        raise SystemExit(f"error: bad entry {entry!r}; write VARIANT[@REV][:key=value,...], "
                         "e.g. baseline@HEAD~1:fuse_micro_batches=0")
    return variant, rev or None, [f"--{s}" for s in pairs]


def load_script(root, variant, rev=None):
    """Import speedruns/train_gpt_medium[_<variant>].py by path (its main() is not run), from the working
    tree or as of git revision rev."""
    path = variants.script_path(variant, root)
    if rev is not None:
        relative = path.relative_to(root).as_posix()
        shown = subprocess.run(["git", "show", f"{rev}:{relative}"], cwd=root, capture_output=True, text=True)
        if shown.returncode != 0:
            raise SystemExit(f"error: no {relative} at revision {rev!r} ({shown.stderr.strip()}); "
                             "name a commit that has it")
        path = Path(tempfile.mkdtemp(prefix="bench_step_cost_")) / path.name
        path.write_text(shown.stdout)
    elif not path.is_file():
        raise SystemExit(f"error: {path} is missing; generate it with `tools/apply_patch --all`")
    spec = importlib.util.spec_from_file_location(f"bench_step_{variant}_{rev}_{len(sys.modules)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(root, entry, preset):
    variant, rev, settings = parse_entry(entry)
    mod = load_script(root, variant, rev)
    args = mod.parse_args([f"--preset={preset}", *settings])
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    model = mod.GPT(args)
    forward = torch.compile(model, dynamic=False) if getattr(args, "compile", False) else model
    muon, adam = mod.build_optimizers(model, args, 0, 1)
    muon.step = Timed(muon.step)
    loader = mod.TrainLoader(args.train_files, args.train_seq_len, args.micro_batches, 0, 1)
    return dict(mod=mod, args=args, model=model, forward=forward, opts=(muon, adam), loader=loader, device=device,
                seconds=[])


def main(argv=None) -> None:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    root = ap.repo_root(opts.root)
    runs = {v: build(root, v, opts.preset) for v in opts.variants}
    rounds = opts.warmup + opts.steps
    order = list(runs.values())
    for step in range(rounds):
        for run in order[step % len(order):] + order[:step % len(order)]:
            t0 = time.perf_counter()
            run["mod"].train_step(run["forward"], run["model"], run["loader"], run["opts"], run["args"], step, 1,
                                  run["device"])
            run["seconds"].append(time.perf_counter() - t0)
        print(f"round {step + 1}/{rounds}", file=sys.stderr, flush=True)
    rows = []
    for variant, run in runs.items():
        whole = statistics.median(run["seconds"][opts.warmup:]) * 1000
        muon = statistics.median(run["opts"][0].step.seconds[opts.warmup:]) * 1000
        rows.append((variant, whole, muon, run["seconds"][0]))
    ref_whole, ref_muon = rows[0][1], rows[0][2]
    print(f"median of {opts.steps} rounds, preset {opts.preset}, {torch.get_num_threads()} threads")
    print("| variant | ms/step | ratio | Muon ms/step | ratio | first step s |")
    print("|---|---|---|---|---|---|")
    for variant, whole, muon, first in rows:
        print(f"| {variant} | {whole:.1f} | {whole / ref_whole:.2f} | {muon:.1f} | {muon / ref_muon:.2f} "
              f"| {first:.1f} |")


if __name__ == "__main__":
    main()
