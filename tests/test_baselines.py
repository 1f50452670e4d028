"""Baselines at equal stored size (ALGORITHM.md section 6): DARE, LowRank, magnitude pruning."""

from __future__ import annotations

import math

import pytest
import torch

from impart_peft import compress_delta, dare_delta, lowrank_delta, magnitude_delta
from impart_peft.baselines import DareDelta
from impart_peft.masks import FACTOR_U, element_hash

SHAPES = {"square": (64, 64), "wide": (40, 120), "tall": (120, 40)}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: one thread is faster and immune to other jobs competing for the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_delta(m, n, seed=0, dtype=torch.float32):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("ratio", [2, 4, 8, 16, 32, 64, 128])
def test_equal_stored_size(kind, ratio):
    m, n = SHAPES[kind]
    delta = random_delta(m, n, seed=ratio)
    target = m * n / ratio
    dare = dare_delta(delta, ratio, seed=1, name=kind)
    sd = math.sqrt(m * n * (1 / ratio) * (1 - 1 / ratio))
    assert abs(dare.num_stored_values - target) <= 5 * sd + 1
    low = lowrank_delta(delta, ratio)
    pairs = max(1, round(target / (m + n)))
    assert low.rank == pairs and low.num_stored_values == pairs * (m + n + 1)
    if target >= m + n:  # the rounding to whole pairs costs at most half a pair
        assert abs(low.num_stored_values - target) <= (m + n) / 2 + pairs
    mag = magnitude_delta(delta, ratio)
    assert mag.num_stored_values == max(1, round(target))
    impart = compress_delta(delta, ratio, 0.8, 1.0, seed=1, name=kind)
    assert impart.num_factor_values == math.floor(target + 1e-6)  # exact counts: the budget, to the value
    for result in (dare, low, mag):
        assert result.compression_ratio == ratio
        assert result.value_compression_ratio == pytest.approx(m * n / result.num_stored_values)
        assert result.disk_compression_ratio == pytest.approx(result.dense_nbytes / result.nbytes)


def test_dare_is_unbiased_and_its_mask_is_the_seeded_hash():
    delta = random_delta(20, 30, dtype=torch.float64)
    ratio = 4.0
    samples = torch.stack(
        [dare_delta(delta, ratio, seed=s, name="d").reconstruct(torch.float64) for s in range(400)]
    )
    # Var of one element: delta^2 (CR - 1); the mean over N draws is within a few standard errors.
    z = (samples.mean(0) - delta) / (delta.abs() * math.sqrt((ratio - 1) / 400)).clamp_min(1e-12)
    assert float(z.abs().max()) < 5.0
    assert float((samples.mean(0) - delta).norm() ** 2) < 3 * float((delta**2).sum()) * (ratio - 1) / 400
    one = dare_delta(delta, ratio, seed=7, name="d")
    hashes = element_hash(7, "d", FACTOR_U, torch.arange(20), 30)
    assert torch.equal(one.mask(), (hashes < one.keep_threshold).t())
    assert one.keep_threshold == round(2**32 / ratio)
    kept = one.mask()
    assert torch.equal(one.values, delta[kept])  # row-major order of the kept elements
    rebuilt = one.reconstruct(torch.float64)
    assert torch.allclose(rebuilt[kept], delta[kept] * (2**32 / one.keep_threshold))
    assert (rebuilt[~kept] == 0).all()
    # Another seed or name gives another mask.
    assert not torch.equal(dare_delta(delta, ratio, seed=8, name="d").mask(), kept)
    assert not torch.equal(dare_delta(delta, ratio, seed=7, name="e").mask(), kept)


def test_dare_detects_a_wrong_value_count():
    one = dare_delta(random_delta(10, 10), 4.0, seed=1, name="x")
    broken = DareDelta(one.shape, one.values[:-1], one.keep_threshold, 1, "x", 4.0, torch.float32)
    with pytest.raises(ValueError, match="holds .* values but its mask keeps"):
        broken.reconstruct()


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_lowrank_is_the_truncated_svd(method):
    delta = random_delta(50, 36, dtype=torch.float64)
    low = lowrank_delta(delta, 6.0, svd_dtype=torch.float64, svd_method=method)
    k = round(50 * 36 / (6.0 * 86))
    assert low.rank == k
    sigma = torch.linalg.svdvals(delta)
    error = float(((low.reconstruct(torch.float64) - delta) ** 2).sum())
    assert error == pytest.approx(float((sigma[k:] ** 2).sum()), rel=1e-6)  # Eckart-Young
    assert torch.allclose(low.singular_values.double(), sigma[:k], rtol=1e-6)


def test_magnitude_keeps_the_largest_entries():
    delta = random_delta(30, 40)
    mag = magnitude_delta(delta, 10.0)
    rebuilt = mag.reconstruct()
    kept = rebuilt != 0
    assert int(kept.sum()) == 120
    assert float(delta[kept].abs().min()) >= float(delta[~kept].abs().max())
    assert torch.equal(rebuilt[kept], delta[kept])
    assert mag.indices.dtype == torch.int32
    assert mag.nbytes == 120 * 4 + 120 * 4


def test_storage_dtype_and_reconstruct_dtype():
    delta = random_delta(24, 32, dtype=torch.bfloat16)
    for result in (dare_delta(delta, 4.0), lowrank_delta(delta, 4.0), magnitude_delta(delta, 4.0)):
        assert result.reference_dtype == torch.bfloat16
        assert result.dense_nbytes == 24 * 32 * 2
        assert result.reconstruct().dtype == torch.float32
        assert result.reconstruct(torch.bfloat16).dtype == torch.bfloat16
        assert result.reconstruct().shape == (24, 32)
    assert dare_delta(delta, 4.0, storage_dtype=torch.float32).values.dtype == torch.float32


@pytest.mark.parametrize("make", [dare_delta, lowrank_delta, magnitude_delta])
def test_bad_input(make):
    delta = random_delta(8, 8)
    for ratio, message in [
        (None, "compression_ratio must be a number > 1"),
        (1.0, "must be > 1"),
        (0.3, "> 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            make(delta, ratio)
    bad = delta.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        make(bad, 4.0)
    with pytest.raises(ValueError, match="2-D"):
        make(torch.ones(8), 4.0)
