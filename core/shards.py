"""Token shards in the official FineWeb format, read and written for the tools.

A shard is a header of 256 little-endian int32 (header[0] = 20240520 magic, header[1] = 1 version,
header[2] = number of tokens, the rest zero), then exactly that many little-endian uint16 tokens.

Every problem with a shard raises `ShardError`, a subclass of `SystemExit` whose message is one line
naming the file, what is wrong and the command that makes data: a tool that lets it propagate stops
with that line and exit status 1, no traceback; a test catches it with `pytest.raises(ShardError)`.
(`except Exception` does not catch it, on purpose: a bad shard ends the run.)
"""

import glob
import os

import numpy as np

from core.files import atomic_output

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2
MAX_TOKEN = 65535
MAX_TOKENS = 2**31 - 1  # the count is stored in an int32

TINY_COMMAND = "tools/prepare_tiny_data"
FINEWEB_COMMAND = "tools/fetch_fineweb"


class ShardError(SystemExit):
    """A missing or malformed shard. `str(err)` is the one-line message (it is also the exit message);
    `err.path` and `err.problem` hold the file and what is wrong with it, for callers that reword it."""

    def __init__(self, message, path=None, problem=None):
        super().__init__(message)
        self.path, self.problem = path, problem


def make_data_hint(path):
    """The command that makes the data `path` (a file or a glob pattern) refers to, as advice."""
    if "fineweb" in os.path.basename(str(path)).lower():
        return f"run {FINEWEB_COMMAND} to download FineWeb shards"
    return f"run {TINY_COMMAND} to build the tiny shards (or {FINEWEB_COMMAND} for FineWeb)"


def _fail(path, problem):
    raise ShardError(f"bad shard {path}: {problem}; {make_data_hint(path)}", path, problem)


def check_shard(path):
    """Validate the header and the exact length of a shard without reading its tokens.

    Returns the number of tokens. Raises ShardError for a missing file, a wrong magic or
    version, a negative count, or a file length other than 1024 + 2 * count bytes.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"missing shard {path}: no such file; {make_data_hint(path)}", path, "no such file") from None
    except OSError as err:
        problem = f"cannot read it ({err.strerror})"
        raise ShardError(f"bad shard {path}: {problem}; {make_data_hint(path)}", path, problem) from None
    if len(raw) < HEADER_BYTES:
        _fail(path, f"only {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        _fail(path, f"wrong magic {int(header[0])} (expected {MAGIC}), not a token shard")
    if header[1] != VERSION:
        _fail(path, f"unsupported version {int(header[1])} (expected {VERSION})")
    count = int(header[2])
    if count < 0:
        _fail(path, f"negative token count {count} in the header")
    expected = HEADER_BYTES + TOKEN_BYTES * count
    if size != expected:
        kind = "truncated" if size < expected else "extra bytes after the tokens"
        _fail(path, f"{kind}: header says {count} tokens ({expected} bytes) but the file has {size} bytes")
    return count


def read_shard(path):
    """Read a whole shard: a validated file -> uint16 array [num_tokens]."""
    count = check_shard(path)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        tokens = np.fromfile(f, dtype="<u2", count=count)
    if tokens.size != count:  # the file changed under us
        _fail(path, f"truncated while reading: {tokens.size} of {count} tokens")
    return tokens.astype(np.uint16, copy=False)


def find_shards(pattern):
    """Sorted paths matching a glob pattern; ShardError when nothing matches."""
    paths = sorted(glob.glob(os.fspath(pattern)))
    if not paths:
        raise ShardError(f"no shard files match {pattern}; {make_data_hint(pattern)}")
    return paths


def shard_header(count):
    """The 1024-byte header of a shard of `count` tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, count
    return header.tobytes()


def write_shard(path, tokens):
    """Write tokens (1-D integers in 0..65535) as a shard, atomically. Returns the token count."""
    path = os.fspath(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ShardError(f"cannot write shard {path}: tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and arr.dtype.kind not in "iub":
        raise ShardError(f"cannot write shard {path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        bad = np.flatnonzero((arr < 0) | (arr > MAX_TOKEN))
        if bad.size:
            i = int(bad[0])
            raise ShardError(f"cannot write shard {path}: token {int(arr[i])} at index {i} is outside "
                             f"0..{MAX_TOKEN} (uint16); {bad.size} such tokens")
    if arr.size > MAX_TOKENS:
        raise ShardError(f"cannot write shard {path}: {arr.size} tokens is more than one shard holds ({MAX_TOKENS})")
    with atomic_output(path) as f:
        f.write(shard_header(arr.size))
        f.write(arr.astype("<u2").tobytes())
    return int(arr.size)
