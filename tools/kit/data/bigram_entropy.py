"""Held-out bigram conditional entropy of a token dataset: the loss a model that knows only the previous token gets.

Example: tools/bigram_entropy --train='data/tiny/bytes_train_*.bin' --val='data/tiny/bytes_val_*.bin'

Counts the bigrams (previous token, token) of the training shards and scores the validation shards
with them: H = -mean log p(x_t | x_{t-1}) in nats per token, with p smoothed by adding alpha to every
count over the vocabulary (vocab = the largest id seen + 1 unless given); alpha is the one of a small
grid that gives the lowest H, so the figure is the best a bigram table does on held-out text. Also
prints the held-out unigram entropy and the in-sample bigram entropy of the training shards, and
0.8 x the held-out bigram entropy (the bench preset's learning target, see tools/bench).
"""

from __future__ import annotations

import math
import sys

import numpy as np

from core.cli import make_parser
from core.shards import find_shards, read_shard

ALPHAS = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0)


def load(pattern: str) -> np.ndarray:
    """Every shard matching pattern, concatenated in name order -> int64 [N]."""
    return np.concatenate([read_shard(p).astype(np.int64) for p in find_shards(pattern)])


def bigram_counts(tokens: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens [N] -> (pair codes prev * vocab + next, sorted unique [P], their counts [P], counts of
    each previous token [vocab]). Sparse, so a 50257-token vocabulary is fine."""
    codes = tokens[:-1] * vocab + tokens[1:]
    pairs, counts = np.unique(codes, return_counts=True)
    prev = np.bincount(tokens[:-1], minlength=vocab)
    return pairs, counts, prev


def cross_entropy(train: np.ndarray, val: np.ndarray, vocab: int, alpha: float) -> float:
    """Mean -log p(v_t | v_{t-1}) over val [M] under train's bigrams with add-alpha smoothing (nats)."""
    pairs, counts, prev = bigram_counts(train, vocab)
    codes = val[:-1] * vocab + val[1:]
    where = np.searchsorted(pairs, codes).clip(max=len(pairs) - 1)
    joint = np.where(pairs[where] == codes, counts[where], 0).astype(np.float64)
    p = (joint + alpha) / (prev[val[:-1]] + alpha * vocab)
    return float(-np.log(p).mean())


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab: int, alpha: float) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64)
    p = (counts[val] + alpha) / (counts.sum() + alpha * vocab)
    return float(-np.log(p).mean())


def in_sample_bigram_entropy(tokens: np.ndarray, vocab: int) -> float:
    """Conditional entropy H(x_t | x_{t-1}) of the empirical bigram distribution of tokens (nats)."""
    pairs, counts, prev = bigram_counts(tokens, vocab)
    p_cond = counts / prev[pairs // vocab]
    return float(-(counts * np.log(p_cond)).sum() / counts.sum())


def held_out_entropy(train: np.ndarray, val: np.ndarray, vocab: int) -> tuple[float, float]:
    """(best held-out bigram cross-entropy over ALPHAS, its alpha)."""
    return min((cross_entropy(train, val, vocab, a), a) for a in ALPHAS)


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("tools/bigram_entropy", __doc__)
    parser.add_argument("--train", default="data/tiny/bytes_train_*.bin", help="training shards (glob)")
    parser.add_argument("--val", default="data/tiny/bytes_val_*.bin", help="held-out shards (glob)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: largest id + 1)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    train, val = load(args.train), load(args.val)
    vocab = args.vocab or int(max(train.max(), val.max())) + 1
    if min(len(train), len(val)) < 2:
        raise SystemExit("error: the train and val shards need at least 2 tokens each")
    if max(train.max(), val.max()) >= vocab:
        raise SystemExit(f"error: a token id is >= --vocab={vocab}; raise --vocab or leave it out")
    h, alpha = held_out_entropy(train, val, vocab)
    uni = min(unigram_cross_entropy(train, val, vocab, a) for a in ALPHAS)
    print(f"train {args.train}: {len(train):,} tokens; val {args.val}: {len(val):,} tokens; vocab {vocab}")
    print(f"held-out unigram entropy      {uni:.4f} nats/token")
    print(f"in-sample bigram entropy      {in_sample_bigram_entropy(train, vocab):.4f} nats/token (train)")
    print(f"held-out bigram entropy       {h:.4f} nats/token (add-{alpha:g} smoothing; {h / math.log(2):.4f} bits)")
    print(f"0.8 x held-out bigram entropy {0.8 * h:.4f} nats/token")
