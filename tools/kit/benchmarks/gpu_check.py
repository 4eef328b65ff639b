"""Check on one GPU what only a GPU can show, and write a short report (markdown + JSON).

Example: tools/gpu_check --out gpu_check_out          # about 8 minutes on one H100 or H200

Parts (each is skipped with a one-line reason where it cannot run, e.g. on a machine without CUDA):
  a  the baseline at full size (GPT-2 Medium), one process with 8-way accumulation, compiled, --steps
     timed steps after --warmup compile steps: ms per step, and the 8-GPU estimate (ms / 8, no
     communication) next to record #8's 246 ms; synthetic token shards, so no data download is needed
  b  FlexAttention's backward: eager gradients of flex_attention against the dense-mask attention,
     and part a's validation loss lowered over its training steps
  c  the Triton symmetric kernels (triton variant) in bf16 against torch: error and speed ratio at
     1024x1024 and 1024x4096
  d  tools/bench_msign --device cuda
  e  analysis.py on the GPU on the checkpoint of part a, with its time
  f  the peak GPU memory of each part (in its row)
Every figure in the report comes from this run. Exit status: 1 if a part failed, else 0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from core.cli import make_parser
from core.files import atomic_write_text
from core.shards import write_shard

ROOT = Path(__file__).resolve().parents[3]
PARTS = "abcdef"
RECORD8_MS = 246.0  # record #8: 1468.9 s of training time over 5960 steps on 8xH100
PEAK_LINE = "gpu_check peak memory allocated:"
# Runs a python script as __main__ and prints the process's peak CUDA memory at exit (part f).
PEAK_WRAPPER = (
    "import atexit, runpy, sys, torch\n"
    "atexit.register(lambda: print('" + PEAK_LINE + "', torch.cuda.max_memory_allocated() // 2**20, 'MiB', "
    "flush=True) if torch.cuda.is_available() else None)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


class Skip(Exception):
    """A part that cannot run here; the message is the one-line reason."""


def parse_parts(text: str) -> list[str]:
    parts = [p for p in text.replace(",", "") if not p.isspace()]
    bad = sorted(set(parts) - set(PARTS))
    if bad or not parts:
        raise SystemExit(f"error: --parts={text!r}: choose letters from {PARTS} (e.g. --parts=a,c)")
    return [p for p in PARTS if p in parts]


def build_parser():
    parser = make_parser("tools/gpu_check", __doc__)
    parser.add_argument("--out", default="gpu_check_out", help="report folder (default gpu_check_out)")
    parser.add_argument("--parts", default=PARTS, help="which parts, e.g. a,b,f (default: all)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps of part a (default 30)")
    parser.add_argument("--warmup", type=int, default=10, help="compile warm-up steps of part a (default 10)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds each subprocess may run (default 300)")
    return parser


def check_args(args):
    for name in ("steps", "warmup", "timeout"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name}={getattr(args, name)} must be positive")
    args.parts = parse_parts(args.parts)
    return args


# ------------------------------------------------------------------ the report


def render_markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}", "", f"Device: {report['device']}. Command: `{report['command']}`.", "",
             "| part | what | status | seconds | peak MiB | figures |", "|---|---|---|---|---|---|"]
    for part in report["parts"]:
        figures = "; ".join(f"{k} {v}" for k, v in part.get("figures", {}).items())
        if part["status"] != "ok":
            figures = (part.get("reason", "") + ("; " + figures if figures else "")).strip("; ")
        peak = part.get("peak_mib")
        lines.append(f"| {part['part']} | {part['what']} | {part['status']} | {part.get('seconds', '')} | "
                     f"{'' if peak is None else peak} | {figures} |")
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


def require_cuda():
    import torch

    if not torch.cuda.is_available():
        raise Skip("no CUDA device here (this part needs a GPU)")
    return torch


def run_python(script: str, argv: list[str], timeout: int) -> tuple[str, int | None]:
    """Run a python script under the peak-memory wrapper -> (output, peak MiB or None)."""
    cmd = [sys.executable, "-c", PEAK_WRAPPER, script, *argv]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{Path(script).name} ran past --timeout={timeout} s") from e
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = " | ".join(output.strip().splitlines()[-3:])
        raise RuntimeError(f"{Path(script).name} exited {proc.returncode}: {tail}")
    peak = re.search(re.escape(PEAK_LINE) + r" (\d+)", output)
    return output, int(peak.group(1)) if peak else None


def synthetic_shards(folder: Path, train_tokens: int, val_tokens: int, seed: int = 0) -> tuple[str, str]:
    """Token shards with learnable structure: documents of Zipf-chosen 8-token phrases, EOT between them."""
    rng = np.random.default_rng(seed)
    phrases = rng.integers(0, 50000, size=(4096, 8))

    def stream(n):
        picks = np.minimum(rng.zipf(1.3, size=n // 8 + 1) - 1, len(phrases) - 1)
        tokens = phrases[picks].reshape(-1)[:n].astype(np.uint16)
        tokens[rng.random(n) < 1 / 1000] = 50256  # documents of ~1000 tokens
        return tokens

    folder.mkdir(parents=True, exist_ok=True)
    train, val = folder / "synthetic_train_000000.bin", folder / "synthetic_val_000000.bin"
    if not train.exists():
        write_shard(train, stream(train_tokens))
    if not val.exists():
        write_shard(val, stream(val_tokens))
    return str(folder / "synthetic_train_*.bin"), str(folder / "synthetic_val_*.bin")


def load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# ------------------------------------------------------------------ the parts


def part_a(ctx):
    require_cuda()
    steps, warmup = ctx["args"].steps, ctx["args"].warmup
    work = ctx["out"] / "work"
    train, val = synthetic_shards(work / "data", train_tokens=(steps + warmup + 2) * 8 * 65536 + 1,
                                  val_tokens=4 * 65536 + 1)
    run_id = "gpu_check_a"
    argv = [f"--train_files={train}", f"--val_files={val}", f"--num_iterations={steps}",
            f"--warmup_steps={warmup}", f"--val_loss_every={steps}", "--val_tokens=262144",
            "--val_seq_len=262144", f"--checkpoint_every={steps}", f"--run_id={run_id}",
            f"--log_dir={work / 'logs'}", f"--checkpoint_dir={work / 'ckpt'}"]
    output, peak = run_python(str(ROOT / "speedruns" / "train_gpt_medium.py"), argv, ctx["args"].timeout)
    from kit.runs.logs import parse_log

    run = parse_log(work / "logs" / f"{run_id}.txt").runs[-1]
    vals = run.validations
    ms = vals[-1].train_time_ms / vals[-1].step
    ctx["a_log"] = work / "logs" / f"{run_id}.txt"
    ctx["a_checkpoint"] = work / "ckpt" / run_id / f"step_{steps:06d}.pt"
    ctx["a_validations"] = [(v.step, v.val_loss) for v in vals]
    ctx["a_val_files"] = val
    return dict(figures={"ms/step (1 GPU, 8 micro-batches)": f"{ms:.0f}",
                         "8-GPU estimate ms/step": f"{ms / 8:.0f} (record #8: {RECORD8_MS:.0f})",
                         "val loss": " -> ".join(f"{v:.3f}" for _, v in ctx["a_validations"])},
                peak_mib=peak, output="\n".join(output.strip().splitlines()[-4:]))


def part_b(ctx):
    torch = require_cuda()
    import torch.nn.functional as F

    baseline = load_script(ROOT / "speedruns" / "train_gpt_medium.py")
    T, H, D, block, window = 1024, 4, 64, 128, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, 50000, (T,), device="cuda", generator=g)
    tokens[torch.randperm(T, device="cuda", generator=g)[:6]] = baseline.EOT_TOKEN
    docs = baseline.document_ids(tokens)
    q, k, v = (torch.randn(1, T, H, D, device="cuda", generator=g, requires_grad=True) for _ in range(3))
    torch.cuda.reset_peak_memory_stats()

    def dense(q, k, v):  # masked attention over all T keys, the reference
        mask = baseline.dense_attention_mask(docs, window, block)
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                           scale=baseline.ATTN_SCALE)
        return y.transpose(1, 2)

    grads = []
    for attention in (dense, lambda q, k, v: baseline.attend(q, k, v, baseline.flex_block_mask(docs, window, block))):
        out = attention(q, k, v)
        grads.append(torch.autograd.grad(F.mse_loss(out, torch.ones_like(out)), (q, k, v)))
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*grads, strict=True))
    figures = {"flex vs dense grad, max rel err": f"{err:.1e}"}
    if "a_validations" in ctx:
        (s0, l0), (s1, l1) = ctx["a_validations"][0], ctx["a_validations"][-1]
        verdict = "lowered" if l1 < l0 else "NOT lowered"
        figures[f"part a val loss step {s0} -> {s1}"] = f"{l0:.3f} -> {l1:.3f} ({verdict})"
        if not l1 < l0:
            raise RuntimeError(f"part a's validation loss did not go down ({l0:.4f} -> {l1:.4f})")
    if err > 2e-2:
        raise RuntimeError(f"flex_attention's gradients differ from the dense attention's by {err:.1e}")
    return dict(figures=figures, peak_mib=torch.cuda.max_memory_allocated() // 2**20)


def part_c(ctx):
    torch = require_cuda()
    triton_script = ROOT / "speedruns" / "train_gpt_medium_triton.py"
    if not triton_script.exists():
        raise Skip(f"{triton_script.relative_to(ROOT)} does not exist (tools/apply_patch --all makes it)")
    mod = load_script(triton_script)
    torch.cuda.reset_peak_memory_stats()
    figures = {}
    for m, n in ((1024, 1024), (1024, 4096)):
        X = torch.randn(m, n, device="cuda").bfloat16() / n**0.5
        ref = X.float() @ X.float().mT
        err = ((mod.XXT(X).float() - ref).norm() / ref.norm()).item()
        A = (X @ X.mT).contiguous()
        ref_b = 0.7 * (A.float() @ A.float().mT) + (-1.3) * A.float()
        err_b = ((mod.ba_plus_cAA(A, 0.7, -1.3).float() - ref_b).norm() / ref_b.norm()).item()
        t_kernel = cuda_ms(torch, lambda X=X: mod.XXT(X))
        t_torch = cuda_ms(torch, lambda X=X: X @ X.mT)
        figures[f"{m}x{n} XXT rel err"] = f"{err:.1e}"
        figures[f"{m}x{n} ba_plus_cAA rel err"] = f"{err_b:.1e}"
        figures[f"{m}x{n} XXT torch/triton time"] = f"{t_torch / t_kernel:.2f}"
        if max(err, err_b) > 2e-2:
            raise RuntimeError(f"the Triton kernels are off by {max(err, err_b):.1e} at {m}x{n} in bf16")
    return dict(figures=figures, peak_mib=torch.cuda.max_memory_allocated() // 2**20)


def part_d(ctx):
    require_cuda()
    output, peak = run_python(str(ROOT / "tools" / "bench_msign"),
                              ["--device", "cuda", "--out", str(ctx["out"] / "work" / "bench_msign")],
                              ctx["args"].timeout)
    table = [line for line in output.splitlines() if line.startswith("|")]
    return dict(figures={"methods timed": str(max(len(table) - 2, 0))}, peak_mib=peak,
                output="\n".join(table) or output[-2000:])


def part_e(ctx):
    require_cuda()
    if "a_checkpoint" not in ctx or not Path(ctx["a_checkpoint"]).exists():
        raise Skip("needs the checkpoint of part a (run part a too)")
    t0 = time.perf_counter()
    output, peak = run_python(str(ROOT / "analysis.py"),
                              [str(ctx["a_checkpoint"]), "--out", str(ctx["out"] / "work" / "analysis"),
                               "--tokens", "8192", "--val_files", ctx["a_val_files"], "--skip_plots"],
                              ctx["args"].timeout)
    seconds = time.perf_counter() - t0
    tables = list((ctx["out"] / "work" / "analysis").rglob("step_*.csv"))
    rows = sum(max(len(t.read_text().splitlines()) - 1, 0) for t in tables)
    return dict(figures={"analysis.py seconds (GPU, R=8, 8192 tokens/replica)": f"{seconds:.0f}",
                         "matrix rows written": str(rows)}, peak_mib=peak,
                output="\n".join(output.strip().splitlines()[-5:]))


PART_FUNCS = {"a": (part_a, "baseline at full size, compiled, 1 GPU x 8-way accumulation"),
              "b": (part_b, "FlexAttention backward"),
              "c": (part_c, "Triton kernels in bf16 vs torch"),
              "d": (part_d, "tools/bench_msign --device cuda"),
              "e": (part_e, "analysis.py on the GPU")}


def run_parts(args, out: Path) -> dict:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    ctx = {"args": args, "out": out}
    rows = []
    for letter in (p for p in args.parts if p != "f"):  # f (peak memory) is a column of every row
        func, what = PART_FUNCS[letter]
        row = {"part": letter, "what": what}
        print(f"gpu_check: part {letter}: {what} ...", flush=True)
        t0 = time.perf_counter()
        try:
            row.update(func(ctx))
            row["status"] = "ok"
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # a failed part is reported, the others still run
            row.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0],
                       output=traceback.format_exc()[-1500:])
        row["seconds"] = f"{time.perf_counter() - t0:.0f}"
        print(f"gpu_check: part {letter}: {row['status']} {row.get('reason', '')}".rstrip(), flush=True)
        rows.append(row)
    if "f" in args.parts and not any(r.get("peak_mib") is not None for r in rows):
        rows.append({"part": "f", "what": "peak GPU memory", "status": "skipped",
                     "reason": "no part ran on a GPU, so no peak memory was measured"})
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device,
            "command": "tools/gpu_check " + " ".join(sys.argv[1:]), "parts": rows}


def main(argv=None):
    args = check_args(build_parser().parse_args(argv))
    out = Path(args.out)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    report = run_parts(args, out)
    md, js = write_report(out, report)
    print(f"gpu_check: report in {md} and {js}")
    return 1 if any(p["status"] == "failed" for p in report["parts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
