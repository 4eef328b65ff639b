"""Shard IO of the tools (core/shards.py): round trip, and every kind of bad shard rejected."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

from core.shards import (  # noqa: E402
    HEADER_BYTES,
    MAGIC,
    ShardError,
    check_shard,
    find_shards,
    read_shard,
    shard_header,
    write_shard,
)


def raw_shard(path, tokens, magic=MAGIC, version=1, count=None, extra=b""):
    """Write a shard byte by byte, with any header fields, so that bad shards can be made."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + extra)
    return path


def assert_one_line_naming(err, path, command="tools/prepare_tiny_data"):
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    assert command in message
    return message


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.concatenate([[0, 65535, 50256], rng.integers(0, 65536, size=1000)])
    path = tmp_path / "sub" / "x_train_000000.bin"
    assert write_shard(path, tokens) == tokens.size
    got = read_shard(path)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, tokens)
    assert os.path.getsize(path) == HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [MAGIC, 1, tokens.size] and not header[3:].any()
    assert check_shard(path) == tokens.size


def test_round_trip_from_list_and_empty(tmp_path):
    write_shard(tmp_path / "a.bin", [5, 6, 7])
    np.testing.assert_array_equal(read_shard(tmp_path / "a.bin"), [5, 6, 7])
    write_shard(tmp_path / "empty.bin", [])
    assert read_shard(tmp_path / "empty.bin").size == 0


def test_writer_matches_hand_made_format(tmp_path):
    tokens = [1, 2, 300, 65535]
    write_shard(tmp_path / "w.bin", tokens)
    raw_shard(tmp_path / "r.bin", tokens)
    assert (tmp_path / "w.bin").read_bytes() == (tmp_path / "r.bin").read_bytes()
    assert shard_header(4) == (tmp_path / "r.bin").read_bytes()[:HEADER_BYTES]


@pytest.mark.parametrize("bad", [-1, 65536, 70000])
def test_writer_refuses_tokens_outside_uint16(tmp_path, bad):
    path = tmp_path / "t.bin"
    with pytest.raises(ShardError) as err:
        write_shard(path, [1, 2, bad, 3])
    message = str(err.value)
    assert str(path) in message and str(bad) in message and "index 2" in message and "0..65535" in message
    assert not path.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tokens, what", [(np.array([1.5, 2.0]), "integers"), (np.zeros((2, 3), int), "1-D")])
def test_writer_refuses_non_integer_or_not_1d(tmp_path, tokens, what):
    with pytest.raises(ShardError, match=what):
        write_shard(tmp_path / "t.bin", tokens)


def test_failed_write_keeps_old_shard_and_leaves_no_temp(tmp_path):
    path = tmp_path / "keep.bin"
    write_shard(path, [7, 8, 9])
    before = path.read_bytes()
    with pytest.raises(ShardError):
        write_shard(path, [1, -5])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


BAD_SHARDS = {
    "wrong magic": (dict(magic=20240521), "wrong magic 20240521"),
    "wrong version": (dict(version=2), "unsupported version 2"),
    "truncated": (dict(count=11), "truncated"),
    "extra bytes": (dict(extra=b"\x00\x01\x02"), "extra bytes"),
    "negative count": (dict(count=-3), "negative token count"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SHARDS))
def test_bad_shard_rejected_with_its_message(tmp_path, kind):
    fields, expected = BAD_SHARDS[kind]
    path = raw_shard(tmp_path / "tiny_train_000000.bin", list(range(10)), **fields)
    for reader in (read_shard, check_shard):
        with pytest.raises(ShardError) as err:
            reader(path)
        message = assert_one_line_naming(err, path)
        assert expected in message, message
        assert err.value.path == str(path) and expected in err.value.problem


def test_shorter_than_header_and_missing_file(tmp_path):
    short = tmp_path / "tiny_val_000000.bin"
    short.write_bytes(b"\x00" * 100)
    with pytest.raises(ShardError) as err:
        read_shard(short)
    assert "shorter than the 1024-byte header" in assert_one_line_naming(err, short)
    missing = tmp_path / "nothing.bin"
    with pytest.raises(ShardError) as err:
        read_shard(missing)
    assert "no such file" in assert_one_line_naming(err, missing)


def test_fineweb_files_point_to_fetch_fineweb(tmp_path):
    path = raw_shard(tmp_path / "fineweb_train_000001.bin", [1, 2], magic=1)
    with pytest.raises(ShardError) as err:
        read_shard(path)
    assert_one_line_naming(err, path, command="tools/fetch_fineweb")


def test_find_shards_sorted_and_no_match(tmp_path):
    for i in (2, 0, 1):
        write_shard(tmp_path / f"tiny_train_{i:06d}.bin", [i])
    assert [Path(p).name for p in find_shards(tmp_path / "tiny_train_*.bin")] == [
        f"tiny_train_{i:06d}.bin" for i in range(3)]
    pattern = tmp_path / "tiny_val_*.bin"
    with pytest.raises(ShardError) as err:
        find_shards(pattern)
    assert "no shard files match" in assert_one_line_naming(err, pattern)
    with pytest.raises(ShardError) as err:
        find_shards(str(tmp_path / "fineweb_val_*.bin"))
    assert_one_line_naming(err, tmp_path / "fineweb_val_*.bin", command="tools/fetch_fineweb")


def test_shard_error_exits_with_one_line_and_no_traceback(tmp_path):
    path = raw_shard(tmp_path / "tiny_train_000000.bin", [1, 2, 3], version=7)
    code = (f"import sys; sys.path.insert(0, {str(TOOLS.parent)!r}); "
            f"from core.shards import read_shard; read_shard({str(path)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert str(path) in done.stderr and "unsupported version 7" in done.stderr
