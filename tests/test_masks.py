"""Deterministic masks (ALGORITHM.md section 5): golden vectors, stability, independence, packing.

ImPart's mask is :func:`keep_mask` (an exact count of rows per column, the smallest hashes); the Bernoulli
threshold mask (:func:`bernoulli_mask`, DARE's baseline) shares the hash, so the hash tests cover both.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from impart_peft import compress_delta
from impart_peft.masks import (
    FACTOR_U,
    FACTOR_V,
    THRESHOLD_ONE,
    bernoulli_mask,
    element_hash,
    hash32_reference,
    keep_mask,
    keep_prob_from_threshold,
    keep_threshold_from_prob,
    kept_rows_reference,
    pack_columns,
    stream_key,
    unpack_columns,
)

# Computed once from the hash definition in masks.py (commit dec3091) and never recomputed: a change to the
# hash, the key derivation or the row/column convention changes every mask of every adapter and must fail here.
GOLDEN_STREAM_KEYS = {
    (0, "", "U"): (2104318322, 61171773),
    (7, "model.layers.0.self_attn.q_proj", "V"): (3782393229, 4290985292),
}
GOLDEN_HASHES = {
    (0, "", "U", 0, 0): 24569024,
    (0, "", "V", 0, 0): 407968938,
    (1, "", "U", 0, 0): 567585578,
    (0, "a", "U", 0, 0): 1944906440,
    (0, "a", "U", 1, 0): 1478476180,
    (0, "a", "U", 0, 1): 4010789756,
    (42, "model.layers.0.mlp.up_proj", "U", 5, 17): 2469413697,
    (42, "model.layers.0.mlp.up_proj", "V", 5, 17): 766397917,
    (2**31 + 5, "x.y", "V", 4095, 11007): 2767552993,
    (123, "ünï", "U", 100000, 3): 2442378789,
}
# element_hash(3, "layer", "V", columns=[0, 2, 9], num_rows=5): rows x columns.
GOLDEN_BLOCK = [
    [621166617, 3441038601, 594408608],
    [3943236323, 708187608, 121382621],
    [2455168831, 4223296427, 4160703433],
    [2895015369, 1484314674, 1403071016],
    [2110773060, 3876007705, 641078899],
]
# bernoulli_mask(3, "layer", "U", thresholds of q = [1, 0.7, 0.5, 0.3, 0], 16 rows), one list per column.
GOLDEN_THRESHOLDS = [4294967296, 3006477056, 2147483648, 1288490240, 0]
GOLDEN_MASK_COLUMNS = [
    [1] * 16,
    [1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0],
    [0] * 16,
]


def test_golden_stream_keys():
    for args, expected in GOLDEN_STREAM_KEYS.items():
        assert stream_key(*args) == expected


def test_golden_reference_hashes():
    for args, expected in GOLDEN_HASHES.items():
        assert hash32_reference(*args) == expected, args


def test_tensor_hash_matches_golden_and_reference():
    for (seed, name, factor, column, row), expected in GOLDEN_HASHES.items():
        block = element_hash(seed, name, factor, torch.tensor([column]), row + 1)
        assert block.dtype == torch.int64
        assert int(block[row, 0]) == expected
    block = element_hash(3, "layer", FACTOR_V, torch.tensor([0, 2, 9]), 5)
    assert block.tolist() == GOLDEN_BLOCK


def test_tensor_hash_equals_reference_on_a_grid():
    # Every element of a block, including large column indices and a chunked layout (many rows).
    columns = torch.tensor([0, 1, 2, 31, 1000, 4095, 70000])
    rows = 300
    block = element_hash(11, "m.l", FACTOR_U, columns, rows)
    for j, column in enumerate(columns.tolist()):
        for row in range(0, rows, 7):
            assert int(block[row, j]) == hash32_reference(11, "m.l", FACTOR_U, column, row)
    assert int(block.min()) >= 0 and int(block.max()) < 2**32


def test_golden_mask_bits():
    threshold = keep_threshold_from_prob(torch.tensor([1.0, 0.7, 0.5, 0.3, 0.0]))
    assert threshold.tolist() == GOLDEN_THRESHOLDS
    mask = bernoulli_mask(3, "layer", FACTOR_U, threshold, 16)
    assert mask.dtype == torch.bool and mask.shape == (16, 5)
    assert mask.t().int().tolist() == GOLDEN_MASK_COLUMNS


def test_mask_is_hash_below_threshold():
    threshold = torch.tensor([THRESHOLD_ONE, 3_000_000_000, 1_000_000_000, 1, 0, 2**31])
    rows = 257
    mask = bernoulli_mask(5, "blk", FACTOR_V, threshold, rows)
    hashes = element_hash(5, "blk", FACTOR_V, torch.arange(threshold.numel()), rows)
    assert torch.equal(mask, hashes < threshold.unsqueeze(0))
    assert mask[:, 0].all() and not mask[:, 4].any()


def test_mask_columns_are_independent_of_the_other_columns():
    # Column k's mask depends on k and its own threshold only: not on how many columns are generated or on
    # the thresholds of the others (a loader may generate a subset).
    threshold = keep_threshold_from_prob(torch.tensor([1.0, 0.9, 0.6, 0.4, 0.2, 0.05]))
    full = bernoulli_mask(9, "x", FACTOR_U, threshold, 100)
    assert torch.equal(bernoulli_mask(9, "x", FACTOR_U, threshold[:3], 100), full[:, :3])
    shuffled = threshold.clone()
    shuffled[0] = threshold[4]
    assert torch.equal(bernoulli_mask(9, "x", FACTOR_U, shuffled, 100)[:, 1:], full[:, 1:])
    hashes = element_hash(9, "x", FACTOR_U, torch.tensor([4]), 100)
    assert torch.equal(full[:, 4], hashes[:, 0] < threshold[4])


def test_mask_same_on_every_call():
    threshold = keep_threshold_from_prob(torch.linspace(1.0, 0.05, 40))
    first = bernoulli_mask(1, "a.b", FACTOR_U, threshold, 333)
    for _ in range(3):
        assert torch.equal(bernoulli_mask(1, "a.b", FACTOR_U, threshold, 333), first)
    # Rows are a prefix: a factor with more rows extends the mask, it does not reshuffle it.
    assert torch.equal(bernoulli_mask(1, "a.b", FACTOR_U, threshold, 1000)[:333], first)


def test_mask_keep_rate_matches_threshold():
    q = torch.tensor([0.9, 0.5, 0.1, 0.01])
    mask = bernoulli_mask(0, "rate", FACTOR_V, keep_threshold_from_prob(q), 20000)
    rate = mask.double().mean(0)
    std = (q.double() * (1 - q.double()) / 20000).sqrt()
    assert ((rate - q.double()).abs() < 5 * std).all(), rate


def test_mask_different_for_other_seed_name_factor_column():
    threshold = keep_threshold_from_prob(torch.full((8,), 0.5))
    base = bernoulli_mask(0, "layer.0", FACTOR_U, threshold, 512)
    others = {
        "seed": bernoulli_mask(1, "layer.0", FACTOR_U, threshold, 512),
        "name": bernoulli_mask(0, "layer.1", FACTOR_U, threshold, 512),
        "factor": bernoulli_mask(0, "layer.0", FACTOR_V, threshold, 512),
    }
    for what, other in others.items():
        agreement = (other == base).double().mean().item()
        assert 0.4 < agreement < 0.6, (what, agreement)  # independent: half the bits agree
    columns = (base[:, :-1] == base[:, 1:]).double().mean().item()
    assert 0.4 < columns < 0.6, columns


def test_hash_rejects_bad_keys():
    with pytest.raises(ValueError, match="factor"):
        stream_key(0, "x", "W")
    with pytest.raises(ValueError, match="seed"):
        stream_key(-1, "x", FACTOR_U)
    with pytest.raises(ValueError, match="seed"):
        stream_key(1.5, "x", FACTOR_U)


_SUBPROCESS = """
import importlib.util, json, sys, torch
# The masks module alone (it needs only hashlib and torch): a fresh interpreter without the package's
# PEFT/transformers imports, so the test stays fast.
spec = importlib.util.spec_from_file_location("fresh_masks", sys.argv[1])
masks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(masks)
t = masks.keep_threshold_from_prob(torch.tensor([1.0, 0.7, 0.5, 0.3, 0.0]))
big = masks.bernoulli_mask(77, "p.q", "V", masks.keep_threshold_from_prob(torch.linspace(1, 0.1, 64)), 999)
print(json.dumps({
    "mask": masks.bernoulli_mask(3, "layer", "U", t, 16).t().int().tolist(),
    "block": masks.element_hash(3, "layer", "V", torch.tensor([0, 2, 9]), 5).tolist(),
    "big": big.sum(0).tolist(),
}))
"""


def test_mask_same_in_a_fresh_process():
    import impart_peft.masks as module

    env = dict(os.environ, PYTHONHASHSEED="12345")  # the key must not depend on Python's salted hash()
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS, module.__file__],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    got = json.loads(out.stdout)
    assert got["mask"] == GOLDEN_MASK_COLUMNS
    assert got["block"] == GOLDEN_BLOCK
    here = bernoulli_mask(77, "p.q", FACTOR_V, keep_threshold_from_prob(torch.linspace(1, 0.1, 64)), 999)
    assert got["big"] == here.sum(0).tolist()


def test_threshold_roundtrip():
    q = torch.tensor([1.0, 0.75, 0.5, 2**-20, 0.0], dtype=torch.float64)
    threshold = keep_threshold_from_prob(q)
    assert threshold.dtype == torch.int64
    assert threshold[0] == THRESHOLD_ONE and threshold[-1] == 0
    assert torch.equal(keep_prob_from_threshold(threshold), q)  # dyadic q survive exactly
    # Out-of-range probabilities are clamped, never wrapped.
    assert keep_threshold_from_prob(torch.tensor([1.5, -0.1])).tolist() == [THRESHOLD_ONE, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_pack_unpack_roundtrip(dtype):
    values = torch.randn(37, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
    mask = bernoulli_mask(
        2, "pk", FACTOR_U, keep_threshold_from_prob(torch.tensor([1, 0.8, 0.5, 0.5, 0.1, 0])), 37
    )
    packed = pack_columns(values, mask)
    assert packed.dtype == dtype and packed.dim() == 1 and packed.numel() == int(mask.sum())
    # Column by column: column 0's kept rows first, in row order.
    assert torch.equal(packed[:37], values[:, 0])
    expected = torch.cat([values[mask[:, k], k] for k in range(6)])
    assert torch.equal(packed, expected)
    unpacked = unpack_columns(packed, mask)
    assert torch.equal(unpacked, torch.where(mask, values, torch.zeros((), dtype=dtype)))


def test_unpack_rejects_wrong_count():
    mask = bernoulli_mask(2, "pk", FACTOR_U, keep_threshold_from_prob(torch.tensor([0.5, 0.5])), 50)
    packed = torch.zeros(int(mask.sum()) + 1)
    with pytest.raises(ValueError, match=r"packed factor holds \d+ values but the mask .* keeps \d+"):
        unpack_columns(packed, mask)
    with pytest.raises(ValueError, match="packed"):
        unpack_columns(packed[:-2], mask)


def test_masks_do_not_depend_on_the_stored_dtype():
    delta = torch.randn(48, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = {
        dtype: compress_delta(
            delta, 4.0, 0.5, 1.0, seed=5, name="w", svd_dtype=torch.float64, storage_dtype=dtype
        )
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    }
    reference = results[torch.float64]
    mask_u, mask_v = reference.masks()
    for dtype, compressed in results.items():
        assert torch.equal(compressed.keep_count, reference.keep_count)
        got_u, got_v = compressed.masks()
        assert torch.equal(got_u, mask_u) and torch.equal(got_v, mask_v)
        assert compressed.u_values.dtype == dtype
        assert torch.equal(compressed.u_values, reference.u_values.to(dtype))
        assert torch.equal(compressed.v_values, reference.v_values.to(dtype))


def test_threshold_rounding_error_is_below_one_part_in_two_to_the_32():
    q = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (keep_prob_from_threshold(keep_threshold_from_prob(q)) - q).abs().max() <= 2.0**-33


def test_blocked_evaluation_matches_reference_across_block_edges():
    # 600 columns x 1000 rows is more than one block of the grid: check rows on both sides of each edge.
    columns = torch.arange(600)
    block = element_hash(4, "edge", FACTOR_V, columns, 1000)
    threshold = keep_threshold_from_prob(torch.linspace(0.99, 0.01, 600))
    mask = bernoulli_mask(4, "edge", FACTOR_V, threshold, 1000)
    assert torch.equal(mask, block < threshold.unsqueeze(0))
    for row in (0, 435, 436, 437, 871, 872, 873, 999):
        for column in (0, 1, 299, 599):
            expected = hash32_reference(4, "edge", FACTOR_V, column, row)
            assert int(block[row, column]) == expected
            assert bool(mask[row, column]) == (expected < int(threshold[column]))


def test_hash_of_huge_indices_matches_reference():
    for column in (2**31 - 1, 2**32 - 1, 2**32, 2**40 + 7):
        assert int(element_hash(1, "z", FACTOR_U, torch.tensor([column]), 3)[2, 0]) == hash32_reference(
            1, "z", FACTOR_U, column, 2
        )


def test_empty_masks():
    assert bernoulli_mask(0, "e", FACTOR_U, torch.zeros(0, dtype=torch.int64), 10).shape == (10, 0)
    assert bernoulli_mask(0, "e", FACTOR_U, torch.tensor([2**31]), 0).shape == (0, 1)
    assert element_hash(0, "e", FACTOR_U, torch.zeros(0, dtype=torch.int64), 4).shape == (4, 0)


def best_of_three(fn) -> float:
    """Seconds of the fastest of three calls of ``fn``."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_masks_of_a_4096_square_matrix_are_fast():
    # Both factors' masks of a 4096 x 4096 matrix at q = 0.5 (33.5M hashed elements). Timed on one thread,
    # best of three, and against one in-place int64 multiply over a tensor of the same size on the same
    # machine, so that a busy machine slows both alike: 7.6 to 9.5 such passes here, idle or loaded; the int64
    # grid of the first implementation took 41 to 50.
    threshold = keep_threshold_from_prob(torch.full((4096,), 0.5))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_pass = best_of_three(functools.partial(torch.ones(2 * 4096 * 4096, dtype=torch.int64).mul_, 3))
        masks = best_of_three(
            lambda: (
                bernoulli_mask(0, "big", FACTOR_U, threshold, 4096),
                bernoulli_mask(0, "big", FACTOR_V, threshold, 4096),
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert masks < 20 * one_pass, f"both masks took {masks:.2f} s = {masks / one_pass:.1f} int64 passes"
    assert masks < 5.0, f"both masks took {masks:.2f} s on one thread"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_equal_cpu_masks_bit_for_bit():
    threshold = keep_threshold_from_prob(torch.tensor([1.0, 0.7, 0.5, 0.3, 0.0]))
    assert (
        bernoulli_mask(3, "layer", FACTOR_U, threshold.cuda(), 16).t().int().tolist() == GOLDEN_MASK_COLUMNS
    )
    block = element_hash(3, "layer", FACTOR_V, torch.tensor([0, 2, 9]), 5, device="cuda")
    assert block.device.type == "cuda" and block.cpu().tolist() == GOLDEN_BLOCK
    threshold = keep_threshold_from_prob(torch.rand(700, generator=torch.Generator().manual_seed(0)))
    threshold[::7] = THRESHOLD_ONE
    for factor, rows in ((FACTOR_U, 4096), (FACTOR_V, 3000)):
        cpu = bernoulli_mask(21, "model.layers.7.mlp.up_proj", factor, threshold, rows)
        gpu = bernoulli_mask(21, "model.layers.7.mlp.up_proj", factor, threshold.cuda(), rows)
        assert torch.equal(gpu.cpu(), cpu)


def test_pack_rejects_a_mask_of_another_shape():
    with pytest.raises(ValueError, match=r"values \(4, 3\) and mask \(4, 2\) must have the same shape"):
        pack_columns(torch.zeros(4, 3), torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed factor holds"):
        unpack_columns(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))


# ------------------------------------------------------------------------------ exact-count masks (ImPart)
# keep_mask(3, "layer", "U", counts [16, 11, 8, 5, 1, 0], 16 rows): the kept rows of each column. Computed once
# from the definition (the c smallest hashes, ties by row) and pinned: a change of the hash or of the selection
# rule changes every adapter's masks and must fail here.
GOLDEN_COUNT_ROWS = [
    list(range(16)),
    [0, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15],
    [2, 5, 7, 9, 10, 11, 13, 14],
    [2, 3, 5, 12, 14],
    [10],
    [],
]
# keep_mask(7, "model.layers.0.self_attn.q_proj", "V", counts [576, 300, 101, 7], 576): first 8 kept rows.
GOLDEN_COUNT_PREFIX = [
    [0, 1, 2, 3, 4, 5, 6, 7],
    [0, 2, 4, 6, 8, 9, 10, 11],
    [0, 10, 16, 25, 28, 36, 42, 43],
    [178, 297, 298, 332, 379, 420, 566],
]


def _kept_rows(mask: torch.Tensor) -> list[list[int]]:
    return [mask[:, k].nonzero().flatten().tolist() for k in range(mask.shape[1])]


def test_golden_exact_count_masks():
    assert (
        _kept_rows(keep_mask(3, "layer", FACTOR_U, torch.tensor([16, 11, 8, 5, 1, 0]), 16))
        == GOLDEN_COUNT_ROWS
    )
    mask = keep_mask(7, "model.layers.0.self_attn.q_proj", FACTOR_V, torch.tensor([576, 300, 101, 7]), 576)
    assert [rows[:8] for rows in _kept_rows(mask)] == GOLDEN_COUNT_PREFIX


@pytest.mark.parametrize("rows", [1, 2, 7, 50, 333, 1000])
def test_exact_count_mask_equals_the_reference(rows):
    generator = torch.Generator().manual_seed(rows)
    counts = torch.randint(0, rows + 1, (24,), generator=generator)
    counts[0], counts[1] = rows, 0
    mask = keep_mask(11, "m.n", FACTOR_U, counts, rows)
    assert mask.shape == (rows, 24) and mask.dtype == torch.bool
    assert mask.sum(dim=0).tolist() == counts.tolist()  # exactly c_k per column
    for column in range(24):
        expected = kept_rows_reference(11, "m.n", FACTOR_U, column, rows, int(counts[column]))
        assert mask[:, column].nonzero().flatten().tolist() == expected, column


def test_exact_count_mask_keeps_the_smallest_hashes():
    counts = torch.tensor([3, 500, 999, 1, 640])
    mask = keep_mask(5, "blk", FACTOR_V, counts, 1000)
    hashes = element_hash(5, "blk", FACTOR_V, torch.arange(5), 1000)
    for k in range(5):
        kept, dropped = hashes[mask[:, k], k], hashes[~mask[:, k], k]
        assert kept.numel() == int(counts[k]) and int(kept.max()) <= int(dropped.min())


def test_hashes_within_a_column_never_tie():
    # The definition breaks ties by row index; keep_mask relies on there being none (the hash of a column is a
    # bijection of the row index), which is what makes its selection by value alone exact.
    hashes = element_hash(0, "tie", FACTOR_U, torch.arange(3), 200_000)
    for k in range(3):
        assert torch.unique(hashes[:, k]).numel() == 200_000


def test_exact_count_columns_are_independent_of_the_other_columns():
    counts = torch.tensor([100, 90, 60, 40, 20, 5])
    full = keep_mask(9, "x", FACTOR_U, counts, 100)
    assert torch.equal(keep_mask(9, "x", FACTOR_U, counts[:3], 100), full[:, :3])
    changed = counts.clone()
    changed[0] = 7
    assert torch.equal(keep_mask(9, "x", FACTOR_U, changed, 100)[:, 1:], full[:, 1:])


def test_exact_count_masks_are_nested_in_the_count():
    # Keeping c + 1 rows keeps the same c rows and one more: the mask is a prefix of one fixed ranking.
    small = keep_mask(4, "nest", FACTOR_V, torch.tensor([10, 200, 777]), 800)
    large = keep_mask(4, "nest", FACTOR_V, torch.tensor([11, 201, 778]), 800)
    assert (large | small).equal(large) and (large.sum(0) - small.sum(0)).tolist() == [1, 1, 1]


def test_exact_count_masks_across_column_blocks():
    # Enough columns that the selection runs in several blocks; each column still equals the reference.
    rows = 700
    counts = torch.randint(1, rows, (3000,), generator=torch.Generator().manual_seed(1))
    mask = keep_mask(2, "blocks", FACTOR_U, counts, rows)
    assert mask.sum(0).tolist() == counts.tolist()
    for column in (0, 1, 1497, 1498, 2999):
        expected = kept_rows_reference(2, "blocks", FACTOR_U, column, rows, int(counts[column]))
        assert mask[:, column].nonzero().flatten().tolist() == expected


def test_exact_count_mask_rows_are_kept_uniformly():
    # Over many columns (independent streams) every row is kept at rate c / rows: no row is favoured.
    rows, columns, count = 64, 20000, 16
    mask = keep_mask(0, "uniform", FACTOR_U, torch.full((columns,), count), rows)
    rate = mask.float().mean(dim=1)
    sd = (count / rows * (1 - count / rows) / columns) ** 0.5
    assert ((rate - count / rows).abs() < 5 * sd).all(), rate


def test_exact_count_masks_of_a_4096_square_matrix_are_fast():
    # Both factors of a 4096 x 4096 matrix, every column at c = 2048 (the widest selection band), on one thread,
    # best of three, against one in-place int64 multiply over 2 x 4096 x 4096 elements on the same machine so a
    # busy machine slows both alike. The Bernoulli mask above takes 7.6 to 9.5 such passes; the exact count
    # (hash, two counting passes, a small sort of each column's band, the final compare) about 3 times that.
    counts = torch.full((4096,), 2048)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_pass = best_of_three(functools.partial(torch.ones(2 * 4096 * 4096, dtype=torch.int64).mul_, 3))
        masks = best_of_three(
            lambda: (keep_mask(0, "big", FACTOR_U, counts, 4096), keep_mask(0, "big", FACTOR_V, counts, 4096))
        )
    finally:
        torch.set_num_threads(threads)
    assert masks < 45 * one_pass, f"both masks took {masks:.2f} s = {masks / one_pass:.1f} int64 passes"


def test_exact_count_empty_and_full():
    assert keep_mask(0, "e", FACTOR_U, torch.zeros(0, dtype=torch.int64), 10).shape == (10, 0)
    assert keep_mask(0, "e", FACTOR_U, torch.tensor([5, 0]), 5).sum(0).tolist() == [5, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_exact_count_masks_equal_cpu_bit_for_bit():
    counts = torch.tensor([16, 11, 8, 5, 1, 0])
    assert _kept_rows(keep_mask(3, "layer", FACTOR_U, counts.cuda(), 16).cpu()) == GOLDEN_COUNT_ROWS
    for factor, rows in ((FACTOR_U, 4096), (FACTOR_V, 3000)):
        counts = torch.randint(1, rows, (700,), generator=torch.Generator().manual_seed(rows))
        counts[::7] = rows
        cpu = keep_mask(21, "model.layers.7.mlp.up_proj", factor, counts, rows)
        gpu = keep_mask(21, "model.layers.7.mlp.up_proj", factor, counts.cuda(), rows)
        assert torch.equal(gpu.cpu(), cpu)
