"""Result files of analysis.py, all written atomically (temp file in the same folder, then os.replace).

Per checkpoint, in OUT/<run_id>/:
  step_NNNNNN.csv          one row per matrix, one column per scalar property
  step_NNNNNN.npz          array properties under "<kind>/<layer>/<property>"
  step_NNNNNN.json         what was computed (properties, replicas, seconds per node, checkpoint)
  step_NNNNNN.partial/     one file per finished matrix while the checkpoint is in progress (resume)
"""

import csv
import hashlib
import io
import json
import math
import os
import re

import numpy as np
import torch

from core.files import atomic_output

ID_COLUMNS = ["step", "param", "kind", "layer", "rows", "cols"]


def atomic_write(path, write, binary=True):
    """Call write(fileobj) on a temp file next to `path`, then rename it over `path` (core.files's
    atomic_output: fsynced, removed on error). binary=False hands write a text file (newline="")."""
    with atomic_output(path) as raw:
        if binary:
            write(raw)
            return
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        write(text)
        text.flush()
        text.detach()  # leave the binary file to atomic_output, which closes it


def file_sha256(path):
    """sha256 hex digest of a file's bytes (read in blocks; a few seconds for a GPT-2 Medium checkpoint)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stem(step):
    return f"step_{int(step):06d}"


def run_folder(out, run_id):
    return os.path.join(out, re.sub(r"[^A-Za-z0-9_.-]", "_", str(run_id)))


def partial_path(folder, step, index, kind, layer):
    return os.path.join(folder, stem(step) + ".partial", f"{index:04d}_{kind}_{layer}.pt")


def save_partial(path, record):
    """record: {"scalars": {..}, "arrays": {name: tensor}, "seconds": {..}, "properties": [..], ...}."""
    buffer = io.BytesIO()
    torch.save(record, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_partial(path):
    """A finished matrix's record, or None when the file is missing or unreadable (recompute it)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def format_value(value):
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_csv(path, rows, scalar_names):
    """rows: dicts with ID_COLUMNS and the scalar names."""
    def write(f):
        writer = csv.writer(f)
        writer.writerow(ID_COLUMNS + list(scalar_names))
        for row in rows:
            writer.writerow([format_value(row.get(c, math.nan)) for c in ID_COLUMNS + list(scalar_names)])
    atomic_write(path, write, binary=False)


def read_csv(path):
    """-> (scalar names, rows with numbers parsed)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for raw in reader:
            row = {}
            for key, text in raw.items():
                if key in ("param", "kind"):
                    row[key] = text
                elif key in ("step", "layer", "rows", "cols"):
                    row[key] = int(text)
                else:
                    row[key] = float(text)
            rows.append(row)
        names = [c for c in reader.fieldnames if c not in ID_COLUMNS]
    return names, rows


def write_npz(path, arrays):
    """arrays: {key: tensor or ndarray}."""
    plain = {k: (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in arrays.items()}
    atomic_write(path, lambda f: np.savez(f, **plain))


def read_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def write_json(path, obj):
    text = json.dumps(obj, indent=1, sort_keys=True)
    atomic_write(path, lambda f: f.write(text + "\n"), binary=False)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def array_key(kind, layer, name):
    return f"{kind}/{layer}/{name}"


def finished_steps(folder):
    """Steps with a complete result (csv, npz and json present) in a run folder, ascending."""
    steps = []
    if not os.path.isdir(folder):
        return steps
    for name in os.listdir(folder):
        match = re.fullmatch(r"step_(\d+)\.json", name)
        if match and all(os.path.exists(os.path.join(folder, name[:-5] + ext)) for ext in (".csv", ".npz")):
            steps.append(int(match.group(1)))
    return sorted(steps)
