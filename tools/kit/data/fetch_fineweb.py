"""Download the official pre-tokenized GPT-2 FineWeb 10B shards used by the speedrun.

The files come from the Hugging Face dataset kjj0/fineweb10B-gpt2: fineweb_val_000000.bin and
fineweb_train_000001.bin ... fineweb_train_000103.bin, 100M tokens each (about 200 MB). Each file
is streamed to a temporary file next to its destination, its header and length are checked, and
only then is it renamed into place: an interrupted download leaves nothing behind, and files
already present and valid are skipped, so re-running the tool resumes where it stopped. Where
`huggingface_hub` is installed (optional; not a requirement) its hf_hub_download fetches each shard
into the same place instead (resumed downloads, checksums, HF_ENDPOINT mirrors, HF_TOKEN), and the
shard is checked the same way; otherwise a plain HTTPS download (urllib) does it.

Default: 32 train shards. The record trains 5960 steps of 8 x 65536 = 524,288 tokens, that is
3,124,756,480 tokens; its loader takes whole batches from one shard at a time, so a 100M-token
shard feeds 190 steps (190 x 524,288 = 99.6M) and 5960 steps need ceil(5960 / 190) = 32 shards.
"""

import argparse
import http.client
import math
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from core.files import atomic_output
from core.shards import HEADER_BYTES, TOKEN_BYTES, ShardError, check_shard

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_OUT = REPO_ROOT / "data" / "fineweb10B"
DATASET = "kjj0/fineweb10B-gpt2"
DEFAULT_ENDPOINT = "https://huggingface.co"  # HF_ENDPOINT overrides it, as for huggingface_hub
NUM_TRAIN_AVAILABLE = 103
TOKENS_PER_SHARD = 100_000_000
SHARD_BYTES = HEADER_BYTES + TOKEN_BYTES * TOKENS_PER_SHARD
VAL_NAME = "fineweb_val_000000.bin"

RECORD_STEPS = 5960
RECORD_BATCH_TOKENS = 8 * 65536
STEPS_PER_SHARD = (TOKENS_PER_SHARD - 1) // RECORD_BATCH_TOKENS  # each batch reads batch + 1 tokens
DEFAULT_TRAIN_SHARDS = math.ceil(RECORD_STEPS / STEPS_PER_SHARD)  # 32


class FetchError(SystemExit):
    """A download that failed (one-line message; a SystemExit like ShardError)."""


def shard_names(num_train):
    """The files to fetch: the val shard, then train shards 1..num_train (train numbering starts at 1)."""
    if not 0 <= num_train <= NUM_TRAIN_AVAILABLE:
        raise FetchError(f"fetch_fineweb: the dataset has train shards 1..{NUM_TRAIN_AVAILABLE}, "
                         f"cannot fetch {num_train}; ask for 0 to {NUM_TRAIN_AVAILABLE}")
    return [VAL_NAME] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def shard_url(name, endpoint=None):
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    return f"{endpoint}/datasets/{DATASET}/resolve/main/{name}"


def urllib_download(url, out, progress):
    """Stream `url` into the binary file `out`, calling progress(bytes done, bytes total or 0)."""
    headers = {"User-Agent": "muon-research-kit fetch_fineweb"}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while chunk := response.read(1 << 20):
            out.write(chunk)
            done += len(chunk)
            progress(done, total)
    if total and done != total:
        raise OSError(f"connection closed after {done} of {total} bytes")


def present(path):
    """(True, token count) for a valid shard at path; (False, why not) otherwise."""
    try:
        return True, check_shard(path)
    except ShardError as err:
        return False, err.problem


def fetch_one(name, dest, download, log):
    """Download one shard into dest through a checked temporary file."""
    url = shard_url(name)
    marks = set()

    def progress(done, total):
        if total:
            tenth = done * 10 // total
            if tenth not in marks and tenth > 0:
                marks.add(tenth)
                log(f"  {name}: {done / 1e6:.0f} of {total / 1e6:.0f} MB")

    start = time.perf_counter()
    try:
        with atomic_output(dest) as f:
            download(url, f, progress)
            f.flush()
            ok, info = present(f.name)
            if not ok:
                raise FetchError(f"downloaded {url} is not a valid shard ({info}); nothing was kept, "
                                 f"check the URL or HF_ENDPOINT and re-run tools/fetch_fineweb")
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise FetchError(f"could not download {url}: {reason}; check the connection to the Hugging Face hub "
                         f"and re-run tools/fetch_fineweb (finished shards are kept)") from None
    log(f"  {name}: {info:,} tokens in {time.perf_counter() - start:.0f} s")


def hub_downloader():
    """huggingface_hub's hf_hub_download when the package is installed, else None."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    return hf_hub_download


def hub_fetch_one(hf_hub_download, name, dest, log):
    """Download one shard with huggingface_hub straight into dest's folder, then check it (an invalid
    file is removed)."""
    start = time.perf_counter()
    dest.unlink(missing_ok=True)  # present but invalid (fetch said so): never mistaken for a finished download
    try:
        hf_hub_download(repo_id=DATASET, filename=name, repo_type="dataset", local_dir=str(dest.parent))
    except Exception as err:  # huggingface_hub raises its own HTTP, network and OS errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FetchError(f"could not download {name} from {DATASET} with huggingface_hub: {reason}; check the "
                         "connection (or HF_ENDPOINT, HF_TOKEN) and re-run tools/fetch_fineweb "
                         "(finished shards are kept)") from None
    ok, info = present(dest)
    if not ok:
        dest.unlink(missing_ok=True)
        raise FetchError(f"huggingface_hub's {name} is not a valid shard ({info}); nothing was kept, "
                         "re-run tools/fetch_fineweb")
    log(f"  {name}: {info:,} tokens in {time.perf_counter() - start:.0f} s (huggingface_hub)")


def fetch(out_dir=DEFAULT_OUT, num_train=DEFAULT_TRAIN_SHARDS, download=None, log=print):
    """Fetch the val shard and num_train train shards into out_dir, skipping valid ones -> list of paths.

    download(url, binary file, progress) writes the file's bytes; by default huggingface_hub's
    hf_hub_download does it where installed, else urllib_download. A present but invalid file is
    downloaded again; an error stops at the failing file, keeping the finished ones.
    """
    out_dir = Path(out_dir)
    names = shard_names(num_train)
    hub = None
    if download is None:
        hub, download = hub_downloader(), urllib_download
        log("downloads by huggingface_hub" if hub else "huggingface_hub is not installed: plain HTTPS downloads")
    paths = []
    for i, name in enumerate(names, 1):
        dest = out_dir / name
        paths.append(dest)
        if dest.exists():
            ok, info = present(dest)
            if ok:
                log(f"[{i}/{len(names)}] {name}: already present ({info:,} tokens), skipped")
                continue
            log(f"[{i}/{len(names)}] {name}: present but invalid ({info}), downloading it again")
        else:
            log(f"[{i}/{len(names)}] {name}: downloading")
        if hub is not None:
            hub_fetch_one(hub, name, dest, log)
        else:
            fetch_one(name, dest, download, log)
    return paths


def check_disk_space(out_dir, names):
    """Stop with a one-line error when out_dir's disk cannot hold the shards still missing."""
    missing = [n for n in names if not present(Path(out_dir) / n)[0]]
    needed = len(missing) * SHARD_BYTES
    probe = Path(out_dir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise FetchError(f"fetch_fineweb: {len(missing)} shards need {needed / 1e9:.1f} GB but {probe} has "
                         f"{free / 1e9:.1f} GB free; free some space or ask for fewer shards")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="tools/fetch_fineweb",
        description="Download the official GPT-2-tokenized FineWeb 10B shards (kjj0/fineweb10B-gpt2) "
                    "for the real speedrun: N train shards plus the val shard.",
        epilog=f"example:\n  tools/fetch_fineweb 32     # the {DEFAULT_TRAIN_SHARDS} shards the 5960-step record "
               f"reads, ~{(DEFAULT_TRAIN_SHARDS + 1) * SHARD_BYTES / 1e9:.1f} GB",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train", nargs="?", type=int, default=DEFAULT_TRAIN_SHARDS, metavar="N",
                        help=f"train shards to fetch, 0..{NUM_TRAIN_AVAILABLE} (default {DEFAULT_TRAIN_SHARDS}: "
                             f"what the record's {RECORD_STEPS} steps read)")
    parser.add_argument("--out", default=None, help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--dry-run", action="store_true", help="list the files and URLs, download nothing")
    parser.error = lambda msg: sys.exit(f"fetch_fineweb: {msg} (see tools/fetch_fineweb --help)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out is not None else DEFAULT_OUT
    names = shard_names(args.num_train)
    if args.dry_run:
        for name in names:
            state = "present" if present(out / name)[0] else "missing"
            print(f"{state:8s} {out / name}  <- {shard_url(name)}")
        return
    check_disk_space(out, names)
    start = time.perf_counter()
    fetch(out, args.num_train)
    print(f"done: {len(names)} shards in {out} ({time.perf_counter() - start:.0f} s)")
