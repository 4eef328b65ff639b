"""Check on one GPU what only a GPU can show, in about 4 minutes: `tools/gpu_check` (report in gpu_check_out/).

Example: tools/gpu_check                # one GPU: every part, about 4 minutes, within --timeout=285 s
         tools/gpu_check --parts=b,c    # rerun some parts
         tools/gpu_check --dry-run      # on a CPU: every part's code at tiny sizes, about a minute

Parts, each with its estimated seconds on one H100 with cold compile caches (estimated, not yet measured;
the report prints each part's seconds next to its estimate):
  a  (150 s) the baseline at full size (GPT-2 Medium) on synthetic token shards (no download), one process
     running the 8 micro-batches of a step, compiled with --coordinate_descent=0 (record #8's
     coordinate-descent tuning makes compiling take far longer), 3 warm-up and 10 timed steps: ms per step,
     and the per-GPU figure ms/step / 8 (record #8 runs one of the 8 micro-batches on each of its 8 GPUs)
     next to record #8's 246 ms per step on 8xH100. Validation reads one sequence of 262,144 tokens
     (--val_tokens=262144): record #8 reads 40 such sequences one at a time, so the peak memory of this
     validation is the full one's. Passes when the validation loss went down.
  b  (30 s) FlexAttention as training compiles it (the BlockMask built inside the graph), bf16, 8192 tokens:
     forward and backward against dense masked attention in fp32 (error), and their times against dense SDPA
  c  (10 s) the Triton symmetric kernels of the triton variant in bf16 against torch at 1024x1024 and
     1024x4096: error and time
  d  (15 s) tools/bench_msign --device cuda: the orthogonalization methods in bf16, error and time
  e  (25 s) analysis.py on the GPU on part a's checkpoint: 3 replica gradients of 2048 tokens, the noise
     sigma^2, the spectra of the weights and the mean gradient (the echo's per-replica SVDs are left out
     for time: `python analysis.py CHECKPOINT` runs them all)
  f  the peak GPU memory of each part (in its row), and the largest against the card's memory
Each part passes, fails (exit status 1) or is skipped with a one-line reason. --timeout bounds the whole
check: a part starts only when its estimate (at least 10 s) fits in the time left, else it is skipped with
the command that reruns it, and a subprocess still running when the time is up is killed. Every figure in
the report comes from this run.

--dry-run executes every part's code on the CPU at tiny sizes with CPU stand-ins, skipping only the
timing and what needs CUDA hardware: (a) the baseline with --preset=bench tiny settings and
--rehearse_cuda=1 (bf16 weights, one sequence per forward, the undone warm-up), eager; (b) FlexAttention's
forward compiled on the CPU against dense attention (it has no CPU backward); (c) the Triton kernels under
TRITON_INTERPRET=1 in fp32 (the interpreter does not emulate bf16); (d) and (e) at tiny sizes on the CPU.
Peak memory is then the subprocess's resident set (RSS), a stand-in. It writes the same report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.cli import make_parser
from core.files import atomic_write_text
from core.shards import write_shard

ROOT = Path(__file__).resolve().parents[3]
BASELINE = ROOT / "speedruns" / "train_gpt_medium.py"
TRITON_VARIANT = ROOT / "speedruns" / "train_gpt_medium_triton.py"
PARTS = "abcdef"
RECORD8_MS = 246.0  # record #8: 1468.9 s of training time over 5960 steps on 8xH100
RECORD8_GPUS = 8
BUDGET_S = 285  # the whole check, below the 5 minutes a lent GPU gives it
MIN_PART_S = 10  # a part starts only when max(this, its estimate) fits in the time left
EOT_TOKEN = 50256
ANALYSIS_PROPERTIES = "sigma2,spectral_norm_w,spectral_norm_g"
ANALYSIS_REPLICAS = 3
PEAK_LINE = "gpu_check peak memory:"
VAL_PEAK_LINE = "gpu_check validation peak memory:"
PHASE_LINE = "gpu_check phases:"
# tools/bench_msign's table rows: matrix, method, errors after k iterations, error of the shipped call, sv range, ms
# (labels are words with single spaces between them; columns are two or more spaces apart)
MSIGN_ROW = re.compile(r"^\([ab]\)(?: \S+)*\s{2,}(?P<method>\S+(?: \S+)*)\s{2,}(?:[\d.]+e[-+]\d+\s+)*"
                       r"(?P<err>[\d.]+e[-+]\d+)\s+\[[\d.]+, [\d.]+\]\s+(?P<ms>[\d.]+)$")
TRITON_ROW = re.compile(r"^\s*\d+x\d+\s+\S.*\s[\d.]+x$")  # bench_msign on CUDA: shape, op, ms, ms, speed-up


@dataclass(frozen=True)
class Sizes:
    """What each part runs at: on one GPU, or in a dry run on the CPU."""

    name: str
    estimate_s: dict  # part -> estimated seconds
    # a: the baseline
    baseline_settings: tuple  # settings that differ between the two modes
    steps: int  # timed training steps
    warmup: int  # compile warm-up steps (undone before the timed run)
    step_tokens: int  # tokens of one training step (micro-batches x sequence length)
    val_seq_len: int  # one validation sequence, read once
    vocab: int  # the synthetic shards' vocabulary
    val_shard_tokens: int  # enough for the validation and part e's replica batches
    # b: FlexAttention against dense attention
    attn_tokens: int
    attn_heads: int
    attn_head_dim: int
    attn_block: int
    attn_window_blocks: int
    attn_documents: int
    attn_dtype: str
    attn_tolerance: float  # max |difference| / max |reference|
    # c: the Triton kernels
    kernel_shapes: tuple
    kernel_tiles: dict
    kernel_dtype: str
    kernel_tolerance: float  # relative Frobenius error
    # d and e
    msign_argv: tuple
    analysis_tokens: int
    timed: bool = True
    device: str = "cuda"
    notes: dict = field(default_factory=dict)  # part -> what differs from the GPU run


GPU = Sizes(
    name="GPU",
    estimate_s={"a": 150, "b": 30, "c": 10, "d": 15, "e": 25, "f": 0},
    baseline_settings=("--device=cuda",),
    steps=10, warmup=3, step_tokens=8 * 64 * 1024, val_seq_len=4 * 64 * 1024, vocab=50257,
    val_shard_tokens=2 * 4 * 64 * 1024,
    attn_tokens=8192, attn_heads=8, attn_head_dim=128, attn_block=128, attn_window_blocks=27,  # record #8's long window
    attn_documents=8, attn_dtype="bfloat16", attn_tolerance=2e-2,
    kernel_shapes=((1024, 1024), (1024, 4096)), kernel_tiles={}, kernel_dtype="bfloat16", kernel_tolerance=2e-2,
    msign_argv=("--device", "cuda", "--size", "1024x4096", "--iters", "1,3,5,10", "--repeat", "3"),
    analysis_tokens=2048,
)

DRY = Sizes(
    name="dry run",
    estimate_s={"a": 10, "b": 25, "c": 2, "d": 6, "e": 8, "f": 0},  # one thread of a 2-core machine, cold caches
    baseline_settings=("--preset=bench", "--device=cpu", "--rehearse_cuda=1", "--compile=0", "--micro_batches=2"),
    steps=4, warmup=1, step_tokens=2 * 256, val_seq_len=256, vocab=256, val_shard_tokens=4096,
    attn_tokens=128, attn_heads=2, attn_head_dim=16, attn_block=16, attn_window_blocks=3, attn_documents=4,
    attn_dtype="float32", attn_tolerance=1e-5,
    kernel_shapes=((64, 96), (40, 72)), kernel_tiles=dict(block_m=32, block_k=16), kernel_dtype="float32",
    kernel_tolerance=1e-5,
    msign_argv=("--device", "cpu", "--size", "32x64", "--iters", "1,5", "--repeat", "1"),
    analysis_tokens=256, timed=False, device="cpu",
    notes={"a": "eager (--compile=0: compiling the model on the CPU takes minutes; tests/test_cuda_rehearsal.py "
                "rehearses it)",
           "b": "forward only: FlexAttention has no backward on the CPU",
           "c": "fp32 under TRITON_INTERPRET=1 (the interpreter does not emulate bf16)"},
)


class Skip(Exception):
    """A part that cannot run here; the message is the one-line reason."""


@dataclass
class Context:
    args: object
    out: Path
    sizes: Sizes
    deadline: float  # time.monotonic() by which everything must end
    triton_interpreted: bool = False  # dry run: TRITON_INTERPRET=1 was set before triton was imported
    a_checkpoint: Path | None = None
    a_val_files: str | None = None

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def require_device(self):
        import torch

        if self.sizes.device == "cuda" and not torch.cuda.is_available():
            raise Skip("no CUDA device here (this part needs a GPU; tools/gpu_check --dry-run runs its code on "
                       "the CPU)")
        return torch


# ------------------------------------------------------------------ arguments


def parse_parts(text: str) -> list[str]:
    parts = [p for p in text.replace(",", "") if not p.isspace()]
    bad = sorted(set(parts) - set(PARTS))
    if bad or not parts:
        raise SystemExit(f"error: --parts={text!r}: choose letters from {PARTS}, e.g. tools/gpu_check --parts=a,c")
    return [p for p in PARTS if p in parts]


def build_parser():
    parser = make_parser("tools/gpu_check", __doc__)
    parser.add_argument("--out", default="gpu_check_out", help="report folder (default gpu_check_out)")
    parser.add_argument("--parts", default=PARTS, help="which parts, e.g. a,b,f (default: all)")
    parser.add_argument("--steps", type=int, help=f"timed training steps of part a (default {GPU.steps}; "
                                                  f"dry run {DRY.steps})")
    parser.add_argument("--warmup", type=int, help=f"compile warm-up steps of part a (default {GPU.warmup}; "
                                                   f"dry run {DRY.warmup})")
    parser.add_argument("--timeout", type=int, default=BUDGET_S,
                        help=f"seconds the whole check may take (default {BUDGET_S})")
    parser.add_argument("--dry-run", "--dry_run", action="store_true",
                        help="run every part's code on the CPU at tiny sizes (no GPU needed)")

    def one_line_error(message):
        raise SystemExit(f"error: {message}; see tools/gpu_check --help")

    parser.error = one_line_error
    return parser


def check_args(args):
    for name in ("steps", "warmup", "timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise SystemExit(f"error: --{name}={value} must be positive, e.g. tools/gpu_check --{name}="
                             f"{getattr(GPU, name, BUDGET_S)}")
    args.parts = parse_parts(args.parts)
    return args


# ------------------------------------------------------------------ the report


def render_markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}", "", f"Device: {report['device']}. Command: `{report['command']}`."]
    if report.get("mode") == DRY.name:
        lines += ["", "**Dry run**: every part's code at tiny sizes on the CPU with CPU stand-ins; no figure here is "
                      "a GPU measurement, and peak memory is the subprocess's resident set (RSS)."]
    if "seconds" in report:
        lines += ["", f"Total: {report['seconds']} s of the {report['budget_s']} s budget (estimate "
                      f"{report['estimate_s']} s)."]
    lines += ["", "| part | what | status | seconds (estimate) | peak MiB | figures |", "|---|---|---|---|---|---|"]
    for part in report["parts"]:
        figures = "; ".join(f"{k} {v}" for k, v in part.get("figures", {}).items())
        if part["status"] != "passed":
            figures = (part.get("reason", "") + ("; " + figures if figures else "")).strip("; ")
        seconds = str(part.get("seconds", "")) + (f" ({part['estimate_s']})" if "estimate_s" in part else "")
        peak = part.get("peak_mib")
        peak = "" if peak is None else f"{peak}" + (f" {part['peak_kind']}" if part.get("peak_kind") else "")
        lines.append(f"| {part['part']} | {part['what']} | {part['status']} | {seconds} | {peak} | {figures} |")
    for part in report["parts"]:
        if part.get("output"):
            lines += ["", f"## Part {part['part']}: output", "", "```", part["output"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    atomic_write_text(js, json.dumps(report, indent=2) + "\n")
    atomic_write_text(md, render_markdown(report))
    return md, js


# ------------------------------------------------------------------ helpers


def load_script(path: Path):
    """Import a script by path (nothing runs), registered under its module name: torch.compile looks a traced
    module up by name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synthetic_shards(folder: Path, train_tokens: int, val_tokens: int, seed: int = 0,
                     vocab: int = 50257) -> tuple[str, str]:
    """Token shards with learnable structure: documents of Zipf-chosen 8-token phrases, with an EOT token between
    documents where the vocabulary has one (GPT-2's 50257; a smaller vocabulary stands in for it in a dry run)."""
    rng = np.random.default_rng(seed)
    phrases = rng.integers(0, min(50000, vocab - 1), size=(4096, 8))

    def stream(n):
        picks = np.minimum(rng.zipf(1.3, size=n // 8 + 1) - 1, len(phrases) - 1)
        tokens = phrases[picks].reshape(-1)[:n].astype(np.uint16)
        if vocab > EOT_TOKEN:
            tokens[rng.random(n) < 1 / 1000] = EOT_TOKEN  # documents of ~1000 tokens
        return tokens

    folder.mkdir(parents=True, exist_ok=True)
    train, val = folder / "synthetic_train_000000.bin", folder / "synthetic_val_000000.bin"
    if not train.exists():
        write_shard(train, stream(train_tokens))
    if not val.exists():
        write_shard(val, stream(val_tokens))
    return str(folder / "synthetic_train_*.bin"), str(folder / "synthetic_val_*.bin")


def cuda_ms(torch, fn, repeat=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def max_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|, in fp32."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def process_peak() -> tuple[int, str]:
    """-> (MiB, kind): this process's peak CUDA memory allocated where it used CUDA, else its resident set."""
    import resource

    import torch

    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() // 2**20, ""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "RSS"


# A child process runs a script under measure (see child_main); its output is streamed as progress.
CHILD = ("import sys; sys.path[:0] = [{root!r}, {tools!r}]; from kit.benchmarks.gpu_check import child_main; "
         "child_main(sys.argv[1:])").format(root=str(ROOT), tools=str(ROOT / "tools"))


def child_main(argv):
    """In a child process: `baseline SCRIPT ARGS...` runs the baseline's main() with its validations measured;
    `script SCRIPT ARGS...` runs any script as __main__. Both print the peak memory lines the parts read."""
    import runpy

    kind, script, *rest = argv
    started = time.perf_counter()
    if kind == "script":
        sys.argv = [script, *rest]
        try:
            runpy.run_path(script, run_name="__main__")
        finally:
            mib, what = process_peak()
            print(PEAK_LINE, mib, "MiB", what, flush=True)
        return
    import torch

    baseline = load_script(Path(script))
    evaluate, seen = baseline.evaluate, {"run": 0, "validation": 0, "validations": []}

    def measured_evaluate(*args, **kwargs):  # the validation's own peak (CUDA only: an RSS cannot be reset)
        cuda = torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            seen["run"] = max(seen["run"], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = evaluate(*args, **kwargs)
        seen["validations"].append((round(t0 - started), round(time.perf_counter() - t0)))
        if cuda:
            seen["validation"] = max(seen["validation"], torch.cuda.max_memory_allocated())
        return loss

    baseline.evaluate = measured_evaluate
    try:
        baseline.main(rest)
    finally:
        mib, what = process_peak()
        if torch.cuda.is_initialized():
            mib = max(seen["run"], seen["validation"], torch.cuda.max_memory_allocated()) // 2**20
            print(VAL_PEAK_LINE, seen["validation"] // 2**20, "MiB", flush=True)
        print(PEAK_LINE, mib, "MiB", what, flush=True)
        phases = {"validations (start s, seconds)": seen["validations"],
                  "seconds": round(time.perf_counter() - started),
                  "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
        print(PHASE_LINE, json.dumps(phases), flush=True)


def run_child(kind: str, script: Path, argv: list[str], ctx: Context) -> str:
    """Run child_main(kind, script, argv) in its own process group within the time left; its output is echoed as
    it comes and returned. A child past the time left is killed with its group (compile workers included)."""
    seconds = max(1.0, ctx.seconds_left())
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(script), *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            print("    " + line.rstrip(), flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=seconds)
    except BaseException as e:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise RuntimeError(f"{script.name} ran past the {seconds:.0f} s left of --timeout={ctx.args.timeout}; "
                               "rerun this part alone with a larger --timeout") from None
        raise
    reader.join(timeout=10)
    output = "".join(lines)
    if code != 0:
        tail = " | ".join([line for line in output.strip().splitlines() if not line.startswith("gpu_check ")][-2:])
        raise RuntimeError(f"{script.name} exited {code}: {tail}")
    return output


def read_peaks(output: str) -> dict:
    """The measure lines of a child's output -> {"peak_mib", "peak_kind", "val_peak_mib", "phases"} (those present)."""
    found = {}
    for line in output.splitlines():
        if line.startswith(PEAK_LINE):
            mib, _, *kind = line[len(PEAK_LINE):].split()
            found.update(peak_mib=int(mib), peak_kind=" ".join(kind) or None)
        elif line.startswith(VAL_PEAK_LINE):
            found["val_peak_mib"] = int(line[len(VAL_PEAK_LINE):].split()[0])
        elif line.startswith(PHASE_LINE):
            found["phases"] = json.loads(line[len(PHASE_LINE):])
    return found


# ------------------------------------------------------------------ the parts


def part_a(ctx):
    ctx.require_device()
    s, args = ctx.sizes, ctx.args
    steps, warmup = args.steps or s.steps, args.warmup or s.warmup
    work = ctx.out / "work"
    train_tokens = (steps + warmup + 1) * s.step_tokens + 1
    train, val = synthetic_shards(work / f"data_v{s.vocab}_{train_tokens}_{s.val_shard_tokens}", train_tokens,
                                  s.val_shard_tokens + 1, vocab=s.vocab)
    run_id = "gpu_check_a"
    argv = [*s.baseline_settings, f"--train_files={train}", f"--val_files={val}", f"--num_iterations={steps}",
            f"--warmup_steps={warmup}", f"--val_loss_every={steps}", f"--val_tokens={s.val_seq_len}",
            f"--val_seq_len={s.val_seq_len}", f"--checkpoint_every={steps}", "--coordinate_descent=0",
            f"--run_id={run_id}", "--overwrite=1", f"--log_dir={work / 'logs'}", f"--checkpoint_dir={work / 'ckpt'}"]
    output = run_child("baseline", BASELINE, argv, ctx)
    from kit.runs.logs import parse_log

    log = parse_log(work / "logs" / f"{run_id}.txt")
    micro_batches = (log.hyperparameters or {}).get("micro_batches", RECORD8_GPUS)
    vals = log.runs[-1].validations
    ms = vals[-1].train_time_ms / vals[-1].step
    ctx.a_checkpoint = work / "ckpt" / run_id / f"step_{steps:06d}.pt"
    ctx.a_val_files = val
    peaks = read_peaks(output)
    (s0, l0), (s1, l1) = (vals[0].step, vals[0].val_loss), (vals[-1].step, vals[-1].val_loss)
    figures = {
        f"ms/step (1 process, {micro_batches} micro-batches, {steps} steps after {warmup} warm-up)": f"{ms:.0f}",
        f"per-GPU figure ms/step / {micro_batches}": f"{ms / micro_batches:.0f} against record #8's {RECORD8_MS:.0f} "
        f"ms/step on 8xH100 (each of its GPUs runs one micro-batch per step; here no communication is counted, and "
        f"Adam's step, which each of its GPUs repeats, is divided by {micro_batches} too)",
        "compile": "--coordinate_descent=0 (record #8 tunes by coordinate descent: far longer compiling, kernels "
                   "perhaps faster)",
        "validation": f"1 sequence of {s.val_seq_len:,} tokens (--val_tokens={s.val_seq_len}); record #8 reads 40 "
                      "such, one at a time, so this peak memory is the full validation's",
        f"val loss step {s0} -> {s1}": f"{l0:.3f} -> {l1:.3f} ({'lowered' if l1 < l0 else 'NOT lowered'})",
    }
    if "val_peak_mib" in peaks:
        figures["peak MiB of the validation"] = str(peaks["val_peak_mib"])
    else:
        figures["peak MiB of the validation"] = "not measured on the CPU (an RSS peak cannot be reset)"
    if "phases" in peaks:
        first = peaks["phases"]["validations (start s, seconds)"][:1]
        if first:
            figures["start-up + compile + warm-up s"] = str(first[0][0])
            figures["first validation s (its compile included)"] = str(first[0][1])
        figures["PYTORCH_CUDA_ALLOC_CONF (set by the baseline)"] = str(peaks["phases"]["PYTORCH_CUDA_ALLOC_CONF"])
    if "a" in s.notes:
        figures["dry run"] = s.notes["a"]
    if not l1 < l0:
        raise RuntimeError(f"the validation loss did not go down ({l0:.4f} -> {l1:.4f}): the CUDA path does not "
                           "train")
    return dict(figures=figures, peak_mib=peaks.get("peak_mib"), peak_kind=peaks.get("peak_kind"),
                output="\n".join(output.strip().splitlines()[-6:]))


def part_b(ctx):
    torch = ctx.require_device()
    import torch.nn.functional as F

    s = ctx.sizes
    baseline = load_script(BASELINE)
    device, dtype, T, bs = s.device, getattr(torch, s.attn_dtype), s.attn_tokens, s.attn_block
    backward = s.device == "cuda"  # FlexAttention has no backward on the CPU
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, 50000, (T,), device=device, generator=g)
    tokens[torch.randperm(T, device=device, generator=g)[: s.attn_documents - 1]] = baseline.EOT_TOKEN
    docs = baseline.document_ids(tokens)
    window = torch.tensor(s.attn_window_blocks, device=device)
    q, k, v = (torch.randn(1, T, s.attn_heads, s.attn_head_dim, device=device, generator=g).to(dtype)
               .requires_grad_(backward) for _ in range(3))
    q32, k32, v32 = (t.detach().float().requires_grad_(backward) for t in (q, k, v))
    if backward:
        torch.cuda.reset_peak_memory_stats()

    def attention(q, k, v, docs, window):  # as training compiles it: the BlockMask built inside the graph
        return baseline.attend(q, k, v, baseline.flex_block_mask(docs, window, bs))

    flex = torch.compile(attention, dynamic=False)

    def dense(q, k, v):  # masked attention over all T keys, the reference
        mask = baseline.dense_attention_mask(docs, window, bs)
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                           scale=baseline.ATTN_SCALE)
        return y.transpose(1, 2)

    with torch.set_grad_enabled(backward):
        out, ref = flex(q, k, v, docs, window), dense(q32, k32, v32)
    shape = f"T={T}, {s.attn_heads} heads x {s.attn_head_dim}, window {s.attn_window_blocks} blocks of {bs}, " \
            f"{s.attn_documents} documents, {s.attn_dtype}"
    errors = {"output": max_rel_err(out, ref)}
    figures = {"shape": shape, "flex vs dense output, max rel err": f"{errors['output']:.1e}"}
    if backward:
        grad_out = torch.randn(ref.shape, device=device, generator=g)
        flex_grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
        dense_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out)
        errors["gradients"] = max(max_rel_err(a, b) for a, b in zip(flex_grads, dense_grads, strict=True))
        figures["flex vs dense gradients (q, k, v), max rel err"] = f"{errors['gradients']:.1e}"
    if "b" in s.notes:
        figures["dry run"] = s.notes["b"]
    if s.timed:
        grad_low = grad_out.to(dtype)
        times = {"flex": (cuda_ms(torch, lambda: flex(q, k, v, docs, window)),
                          cuda_ms(torch, lambda: flex(q, k, v, docs, window).backward(grad_low))),
                 "dense SDPA": (cuda_ms(torch, lambda: dense(q, k, v)),
                                cuda_ms(torch, lambda: dense(q, k, v).backward(grad_low)))}
        for name, (fwd, both) in times.items():
            figures[f"{name} ms forward / backward"] = f"{fwd:.2f} / {both - fwd:.2f}"
        backward_ratio = (times["dense SDPA"][1] - times["dense SDPA"][0]) / (times["flex"][1] - times["flex"][0])
        figures["flex backward speed-up over dense"] = f"{backward_ratio:.1f}x"
    worst = max(errors, key=errors.get)
    if errors[worst] > s.attn_tolerance:
        raise RuntimeError(f"FlexAttention's {worst} differs from dense attention's by {errors[worst]:.1e} "
                           f"(> {s.attn_tolerance:.0e})")
    return dict(figures=figures, peak_mib=torch.cuda.max_memory_allocated() // 2**20 if backward else None)


def part_c(ctx):
    torch = ctx.require_device()
    import importlib.util

    s = ctx.sizes
    if not TRITON_VARIANT.exists():
        raise Skip(f"{TRITON_VARIANT.relative_to(ROOT)} does not exist (tools/apply_patch --all makes it)")
    if importlib.util.find_spec("triton") is None:
        raise Skip("the triton package is not installed (pip install triton)")
    if s.device == "cpu" and not ctx.triton_interpreted:
        raise Skip("triton was imported before TRITON_INTERPRET=1 could be set: run tools/gpu_check --dry-run in "
                   "its own process")
    mod = load_script(TRITON_VARIANT)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dtype, tiles = getattr(torch, s.kernel_dtype), s.kernel_tiles
    g = torch.Generator(device=s.device).manual_seed(0)
    figures = {}
    for m, n in s.kernel_shapes:
        X = (torch.randn(m, n, device=s.device, generator=g) / n**0.5).to(dtype)
        ref = X.float() @ X.float().mT
        err = ((mod.XXT(X, **tiles).float() - ref).norm() / ref.norm()).item()
        A = (X @ X.mT).contiguous()
        ref_b = 0.7 * (A.float() @ A.float().mT) + (-1.3) * A.float()
        err_b = ((mod.ba_plus_cAA(A, 0.7, -1.3, **tiles).float() - ref_b).norm() / ref_b.norm()).item()
        figures[f"{m}x{n} XXT rel err"] = f"{err:.1e}"
        figures[f"{m}x{n} ba_plus_cAA rel err"] = f"{err_b:.1e}"
        if s.timed:
            xxt = cuda_ms(torch, lambda X=X: mod.XXT(X)) / cuda_ms(torch, lambda X=X: X @ X.mT)
            ba = (cuda_ms(torch, lambda A=A: mod.ba_plus_cAA(A, 0.7, -1.3))
                  / cuda_ms(torch, lambda A=A: 0.7 * (A @ A.mT) - 1.3 * A))
            figures[f"{m}x{n} time Triton / torch, XXT"] = f"{xxt:.2f}"
            figures[f"{m}x{n} time Triton / torch, ba_plus_cAA"] = f"{ba:.2f}"
        if max(err, err_b) > s.kernel_tolerance:
            raise RuntimeError(f"the Triton kernels are off by {max(err, err_b):.1e} at {m}x{n} in {s.kernel_dtype}")
    if "c" in s.notes:
        figures["dry run"] = s.notes["c"]
    return dict(figures=figures, peak_mib=torch.cuda.max_memory_allocated() // 2**20 if s.device == "cuda" else None)


def part_d(ctx):
    ctx.require_device()
    plot = ctx.out / "work" / "bench_msign" / "msign.png"
    output = run_child("script", ROOT / "tools" / "bench_msign", [*ctx.sizes.msign_argv, "--out", str(plot)], ctx)
    rows = [row for row in map(MSIGN_ROW.match, output.splitlines()) if row]  # a row with a NaN does not match
    figures = {"table rows (2 matrices x 5 methods)": str(len(rows))}
    for row in rows[:5]:  # the Gaussian matrix: time per call and error of the shipped call, per method
        figures[row["method"]] = f"{row['ms']} ms/call, err {row['err']}"
    speedups = [" ".join(line.split()) for line in output.splitlines() if TRITON_ROW.match(line)]
    if speedups:
        figures["Triton vs torch.matmul (shape, op, ms, ms, speed-up)"] = "; ".join(speedups)
    if len(rows) != 10:
        raise RuntimeError(f"bench_msign's table has {len(rows)} readable rows of 10 (a NaN or a missing method)")
    table_start = next((i for i, line in enumerate(output.splitlines()) if line.startswith("matrix")), 0)
    return dict(figures=figures, **{k: v for k, v in read_peaks(output).items() if k.startswith("peak")},
                output="\n".join(output.splitlines()[table_start:]))


def part_e(ctx):
    ctx.require_device()
    if ctx.a_checkpoint is None or not Path(ctx.a_checkpoint).exists():
        raise Skip("needs the checkpoint of part a (run part a too: tools/gpu_check --parts=a,e)")
    folder = ctx.out / "work" / "analysis"
    if folder.exists():  # analysis.py skips work already done: a rerun is timed in full
        import shutil

        shutil.rmtree(folder)
    t0 = time.perf_counter()
    output = run_child("script", ROOT / "analysis.py",
                       [str(ctx.a_checkpoint), "--out", str(folder), "--tokens", str(ctx.sizes.analysis_tokens),
                        "--replicas", str(ANALYSIS_REPLICAS), "--properties", ANALYSIS_PROPERTIES,
                        "--val_files", ctx.a_val_files, "--skip_plots"], ctx)
    seconds = time.perf_counter() - t0
    tables = list(folder.rglob("step_*.csv"))
    rows = sum(max(len(t.read_text().splitlines()) - 1, 0) for t in tables)
    if rows == 0:
        raise RuntimeError("analysis.py wrote no matrix rows")
    what = f"R={ANALYSIS_REPLICAS}, {ctx.sizes.analysis_tokens} tokens/replica, {ANALYSIS_PROPERTIES}"
    return dict(figures={f"analysis.py seconds ({what})": f"{seconds:.0f}", "matrix rows written": str(rows)},
                **{k: v for k, v in read_peaks(output).items() if k.startswith("peak")},
                output="\n".join(output.strip().splitlines()[-5:]))


def part_f(ctx, rows):
    """The peak memory of the parts that measured one, the largest against the card's memory."""
    peaks = [(r["part"], r["peak_mib"], r.get("peak_kind")) for r in rows if r.get("peak_mib") is not None]
    if not peaks:
        raise Skip("no part measured a peak memory (run f with other parts, e.g. tools/gpu_check --parts=a,f)")
    figures = {f"part {p}": f"{mib} MiB" + (f" {kind}" if kind else "") for p, mib, kind in peaks}
    part, mib, kind = max(peaks, key=lambda p: p[1])
    if ctx.sizes.device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory // 2**20
        figures["largest"] = f"part {part}: {mib} of the card's {total} MiB ({100 * mib / total:.0f}%)"
        if mib > total:
            raise RuntimeError(f"part {part} peaked at {mib} MiB, above the card's {total} MiB")
    else:
        figures["largest"] = f"part {part}: {mib} MiB {kind or ''} (CPU stand-in)".replace("  ", " ")
    return dict(figures=figures)


PART_FUNCS = {"a": (part_a, "baseline at full size, compiled (--coordinate_descent=0), 1 GPU x 8 micro-batches"),
              "b": (part_b, "FlexAttention backward vs dense"),
              "c": (part_c, "Triton kernels in bf16 vs torch"),
              "d": (part_d, "tools/bench_msign --device cuda"),
              "e": (part_e, "analysis.py on the GPU"),
              "f": (part_f, "peak GPU memory")}
DRY_WHAT = {"a": "baseline, --preset=bench tiny, --rehearse_cuda=1 on the CPU",
            "b": "FlexAttention forward compiled on the CPU vs dense",
            "c": "Triton kernels under TRITON_INTERPRET=1 vs torch",
            "d": "tools/bench_msign --device cpu, tiny",
            "e": "analysis.py on the CPU, tiny",
            "f": "peak memory (CPU RSS stand-in)"}


def run_parts(args, out: Path) -> dict:
    import torch

    sizes = DRY if args.dry_run else GPU
    if args.dry_run:
        device = f"CPU with {torch.get_num_threads()} torch thread(s), dry run"
    else:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    ctx = Context(args=args, out=out, sizes=sizes, deadline=time.monotonic() + args.timeout,
                  triton_interpreted=getattr(args, "triton_interpreted", False))
    rows = []
    started = time.monotonic()
    for letter in args.parts:
        func, what = PART_FUNCS[letter]
        what = DRY_WHAT.get(letter, what) if args.dry_run else what
        estimate = sizes.estimate_s[letter]
        row = {"part": letter, "what": what, "estimate_s": estimate}
        print(f"gpu_check: part {letter} (about {estimate} s): {what} ...", flush=True)
        t0 = time.monotonic()
        try:
            left = ctx.seconds_left()
            if letter != "f" and left < max(MIN_PART_S, estimate):
                rerun = "a,e" if letter == "e" else letter  # e reads part a's checkpoint
                raise Skip(f"its {estimate} s do not fit in the {max(left, 0):.0f} s left of --timeout={args.timeout}; "
                           f"rerun it: tools/gpu_check --parts={rerun}" + (" --dry-run" if args.dry_run else ""))
            row.update(func(ctx, rows) if letter == "f" else func(ctx))
            row["status"] = "passed"
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except (Exception, SystemExit) as e:  # a failed part is reported, the others still run
            row.update(status="failed", reason=(f"{type(e).__name__}: {e}".splitlines() or [""])[0],
                       output=traceback.format_exc()[-1500:])
        row["seconds"] = f"{time.monotonic() - t0:.0f}"
        print(f"gpu_check: part {letter}: {row['status']} in {row['seconds']} s {row.get('reason', '')}".rstrip(),
              flush=True)
        rows.append(row)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # what an in-process part cached stays out of the next parts' way
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device, "mode": sizes.name,
            "command": "tools/gpu_check " + " ".join(sys.argv[1:]), "budget_s": args.timeout,
            "seconds": f"{time.monotonic() - started:.0f}",
            "estimate_s": sum(sizes.estimate_s[p] for p in args.parts), "parts": rows}


def main(argv=None):
    args = check_args(build_parser().parse_args(argv))
    out = Path(args.out)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.dry_run:  # the interpreter is chosen when triton is imported, so before anything imports it
        args.triton_interpreted = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
        os.environ["TRITON_INTERPRET"] = "1"
    report = run_parts(args, out)
    md, js = write_report(out, report)
    print(f"gpu_check: report in {md} and {js}")
    return 1 if any(p["status"] == "failed" for p in report["parts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
