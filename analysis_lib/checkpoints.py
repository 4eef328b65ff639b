"""Checkpoints: reading them, the matrices they hold, the script that made them, replica gradients.

A checkpoint follows docs/formats.md ("gpt-medium-ckpt/1"). Its matrices are keyed (kind, layer):
blocks.{i}.attn.qkvo_w [4, d, d] gives q, k, v, o; blocks.{i}.mlp.fc_w is "mlp_in" and
blocks.{i}.mlp.proj_w "mlp_out". Whatever the checkpoint holds is analysed (no fixed count).
"""

import glob
import hashlib
import importlib.util
import linecache
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass

import torch

FORMAT = "gpt-medium-ckpt/1"
KIND_ORDER = ("q", "k", "v", "o", "mlp_in", "mlp_out")
ATTN = re.compile(r"blocks\.(\d+)\.attn\.qkvo_w")
MLP = re.compile(r"blocks\.(\d+)\.mlp\.(fc_w|proj_w)")


class CheckpointError(Exception):
    """A checkpoint that cannot be analysed; the message is one line for the user."""


@dataclass(frozen=True)
class MatrixRef:
    param: str  # parameter name in the state dict
    index: int | None  # slice of a merged tensor (q, k, v, o = 0..3), None for a plain matrix
    kind: str
    layer: int
    rows: int
    cols: int

    @property
    def label(self):
        return f"{self.kind}/{self.layer}"


def read_checkpoint(path):
    """torch.load a checkpoint file, checked to be ours. -> dict; raises CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file; check the path (checkpoints are checkpoints/<run>/step_*.pt)")
    try:  # memory-mapped: tensors the analysis never reads (the Adam state, ~2 GB at GPT-2 Medium) stay on disk
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many kinds for a damaged or non-torch file
        kind = type(exc).__name__
        raise CheckpointError(f"{path}: unreadable ({kind}); the file is corrupt or not a torch checkpoint, "
                              "re-copy it or drop it from the command") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format {found!r}); "
                              "pass checkpoints written by speedruns/train_gpt_medium*.py")
    missing = [k for k in ("step", "model", "hyperparameters") if k not in ckpt]
    if missing or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing) or 'a model state dict'}; "
                              "it was cut short, re-copy it")
    return ckpt


def matrix_refs(state):
    """Every analysed matrix in a state dict, ordered by layer then kind. {name: tensor} -> [MatrixRef]."""
    refs = []
    for name, tensor in state.items():
        attn, mlp = ATTN.fullmatch(name), MLP.fullmatch(name)
        if attn and tensor.dim() == 3:
            for index, kind in enumerate(KIND_ORDER[:tensor.shape[0]]):
                refs.append(MatrixRef(name, index, kind, int(attn.group(1)), tensor.shape[1], tensor.shape[2]))
        elif mlp and tensor.dim() == 2:
            kind = "mlp_in" if mlp.group(2) == "fc_w" else "mlp_out"
            refs.append(MatrixRef(name, None, kind, int(mlp.group(1)), tensor.shape[0], tensor.shape[1]))
    return sorted(refs, key=lambda r: (r.layer, KIND_ORDER.index(r.kind)))


def take(tensor, ref):
    """The matrix of `ref` out of its parameter-shaped tensor, as fp32. [...] -> [rows, cols]."""
    part = tensor if ref.index is None else tensor[ref.index]
    return part.detach().to(torch.float32)


MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")  # Muon's buffer; Adam's first moment where AdamW updates it


def momentum_of(ckpt, ref):
    """The momentum of a matrix: the Muon buffer, or, for a matrix an AdamW updates (the adamw variant),
    Adam's first moment exp_avg; None when the checkpoint holds neither. A buffer kept with the stack's
    leading dims merged (PSGD Kron keeps [4, d, d] as [4d, d]) is viewed in the parameter's shape."""
    optimizer = ckpt.get("optimizer") or {}
    shape = ckpt["model"][ref.param].shape
    for group in ("muon", "adam"):
        state = (optimizer.get(group) or {}).get(ref.param) or {}
        for key in MOMENTUM_KEYS:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.numel() == shape.numel() and value.shape[-1] == shape[-1]:
                return take(value.reshape(shape), ref)
    return None


def run_id_of(ckpt, path):
    hp = ckpt.get("hyperparameters") or {}
    return hp.get("run_id") or os.path.basename(os.path.dirname(os.path.abspath(path))) or "run"


def load_script(ckpt, repo_root):
    """Import the training script recorded in the checkpoint; nothing runs on import.

    Uses script_path (relative to the repository root) when its sha256 matches source_sha256, else
    the embedded source written to a temp file. -> module; raises CheckpointError.
    """
    want = ckpt.get("source_sha256")
    rel = ckpt.get("script_path")
    path = os.path.join(repo_root, rel) if rel else None
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == want:
                return _import(path, want)
    source = ckpt.get("source")
    if not isinstance(source, str):
        raise CheckpointError(f"script {rel!r} is missing or changed and the checkpoint embeds no source; "
                              "check out the commit that wrote the checkpoint")
    if want and hashlib.sha256(source.encode()).hexdigest() != want:
        raise CheckpointError("embedded source does not match source_sha256; the checkpoint is damaged")
    key = ("embedded", want or hashlib.sha256(source.encode()).hexdigest())
    if key in _MODULES:
        return _MODULES[key]
    # The file only has to exist while the module runs (decorators such as triton.jit read their source
    # then); afterwards the source stays in linecache, so tracebacks and inspect still find its lines.
    folder = tempfile.mkdtemp(prefix="analysis_script_")
    try:
        tmp = os.path.join(folder, os.path.basename(rel or "train_gpt_medium.py"))
        with open(tmp, "w") as f:
            f.write(source)
        module = _import(tmp, key)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    linecache.cache[tmp] = (len(source), None, source.splitlines(True), tmp)  # mtime None: never re-checked
    return module


_MODULES = {}


def _import(path, key):
    key = key if isinstance(key, tuple) else (key, os.path.abspath(path))
    if key not in _MODULES:
        name = f"_analysis_script_{len(_MODULES)}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise CheckpointError(f"{path}: importing the training script failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        _MODULES[key] = module
    return _MODULES[key]


def hyper(ckpt, module):
    """The run's Hyperparameters object (fields the script no longer has are dropped)."""
    values = dict(ckpt["hyperparameters"])
    cls = module.Hyperparameters
    fields = getattr(cls, "__dataclass_fields__", {})
    return cls(**{k: v for k, v in values.items() if k in fields})


def tokens_per_replica(args, override=None):
    """One rank's microbatch in tokens: the training script's per-rank sequence length (or override)."""
    if override is not None:
        if int(override) < 1:
            raise CheckpointError(f"tokens per replica must be positive (got {override}); pass --tokens=N, N >= 1")
        return int(override)
    for name in ("train_seq_len", "seq_len", "train_batch_tokens_per_rank", "sequence_length"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise CheckpointError("cannot tell the per-rank batch size from the hyperparameters; pass --tokens=N")


def shard_paths(pattern, repo_root):
    """The files a shard glob names, sorted: relative globs are tried from the working directory,
    then from the repository root (as the training scripts are usually run). -> [path] (maybe empty)."""
    for base in ("", repo_root):
        full = pattern if os.path.isabs(pattern) or not base else os.path.join(base, pattern)
        paths = sorted(glob.glob(full))
        if paths:
            return paths
    return []


def training_overlap(val_paths, train_pattern, repo_root):
    """The files of val_paths that are also training shards of the run (same file on disk). -> [path]."""
    train = {os.path.realpath(p) for p in shard_paths(train_pattern, repo_root)} if train_pattern else set()
    return [p for p in val_paths if os.path.realpath(p) in train]


def heldout_stream(module, pattern, need, repo_root):
    """The first `need` tokens of the validation files (sorted), a stream never used for training.

    -> 1-D int64 tensor; raises CheckpointError when the files are missing or too short.
    """
    paths = shard_paths(pattern, repo_root)
    if not paths:
        raise CheckpointError(f"no validation files match {pattern!r}; pass --val_files=GLOB "
                              "(the held-out tokens that replica gradients are computed on)")
    chunks, have = [], 0
    for path in paths:
        tokens = module.read_shard(path)
        chunks.append(torch.as_tensor(tokens).to(torch.int64).reshape(-1))
        have += chunks[-1].numel()
        if have >= need:
            break
    if have < need:
        raise CheckpointError(f"validation files {pattern!r} hold {have} tokens, {need} needed; "
                              "lower --replicas or --tokens")
    return torch.cat(chunks)[:need]


def replica_batch(stream, replica, tokens):
    """Disjoint slice `replica` of the held-out stream: (inputs [T], targets [T])."""
    start = replica * (tokens + 1)
    piece = stream[start:start + tokens + 1]
    return piece[:-1], piece[1:]


def one_gradient(model, module, args, step, inputs, targets, params, device):
    """Gradient of the loss of one minibatch at the checkpoint weights. -> {param name: fp32 tensor}."""
    model.zero_grad(set_to_none=True)
    loss = model(inputs.to(device), targets.to(device), module.window_blocks(step, args))
    loss.backward()
    grads = {}
    for name, p in params.items():
        g = p.grad
        grads[name] = torch.zeros(p.shape, dtype=torch.float32, device=device) if g is None else g.detach().float()
    model.zero_grad(set_to_none=True)
    return grads
