"""The FlexAttention BlockMask built at block level lists exactly the blocks of the dense document-causal mask.

On the CPU, eager FlexAttention evaluates mask_mod at every position, so an output comparison
(tests/test_baseline.py) cannot see a wrong block list; the GPU kernel reads only the lists. These tests
compare the lists themselves with create_block_mask over the dense [T, T] mask.
"""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask


def documents(T, boundaries, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50000, (T,), generator=g)
    tokens[torch.randperm(T, generator=g)[:boundaries]] = 50256
    return tokens


def block_sets(mask):
    """BlockMask -> ({query block: set of partial key blocks}, {query block: set of full key blocks})."""
    def sets(counts, indices):
        return {q: set(indices[0, 0, q, : counts[0, 0, q]].tolist()) for q in range(counts.size(-1))}
    return sets(mask.kv_num_blocks, mask.kv_indices), sets(mask.full_kv_num_blocks, mask.full_kv_indices)


@pytest.mark.parametrize("T, block, window, boundaries", [
    (192, 16, 1, 5), (192, 16, 2, 5), (192, 16, 5, 12), (256, 32, 64, 3), (128, 8, 3, 0), (128, 8, 4, 40),
])
def test_block_level_mask_lists_the_dense_masks_blocks(baseline, T, block, window, boundaries):
    docs = baseline.document_ids(documents(T, boundaries, seed=T + window + boundaries))
    dense = baseline.dense_attention_mask(docs, window, block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = create_block_mask(lambda b, h, q, k: dense[q, k], None, None, T, T, device="cpu",
                                      BLOCK_SIZE=block)
        built = baseline.flex_block_mask(docs, window, block)
    assert block_sets(built) == block_sets(reference)
    assert torch.equal(built.to_dense(), reference.to_dense())


def test_block_level_mask_takes_the_window_as_a_tensor(baseline):
    docs = baseline.document_ids(documents(192, 6, seed=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        as_int = baseline.flex_block_mask(docs, 3, 16)
        as_tensor = baseline.flex_block_mask(docs, torch.tensor(3), 16)
    assert block_sets(as_int) == block_sets(as_tensor)


def test_token_level_mask_mod_is_the_dense_mask(baseline):
    T, block, window = 128, 8, 3
    docs = baseline.document_ids(documents(T, 9, seed=5))
    mask = baseline.flex_block_mask(docs, window, block)
    pos = torch.arange(T)
    tokens = mask.mask_mod(0, 0, pos[:, None], pos[None, :])
    assert torch.equal(tokens, baseline.dense_attention_mask(docs, window, block))


def test_sequence_not_a_multiple_of_the_block_is_refused(baseline):
    with pytest.raises(SystemExit, match="attn_block_size"):
        baseline.flex_block_mask(torch.zeros(100, dtype=torch.long), 2, 16)
