"""The estimator for one matrix (ALGORITHM.md sections 2, 3 and 5): unbiasedness, the closed-form error,
the budget, the SVD routes, edge cases, the on-disk tensors and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from impart_peft import CompressedDelta, compress_delta
from impart_peft.allocation import allocate_keep_prob, target_keep_fraction
from impart_peft.delta import check_delta, pairs_needed, svd_top
from impart_peft.masks import (
    FACTOR_U,
    FACTOR_V,
    keep_mask,
    pack_columns,
    unpack_columns,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # These matrices are tiny: one thread is faster, and it keeps the timings sane on a machine where other
    # jobs compete for the cores (OpenMP barriers under oversubscription cost more than the work).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def matrix_with_spectrum(m: int, n: int, sigma, seed: int = 0, dtype=F64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    sigma = torch.as_tensor(sigma, dtype=F64)
    k = sigma.numel()
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=F64))
    return ((u * sigma) @ v.t()).to(dtype)


def random_delta(m: int, n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------ unbiasedness (section 2)


class Sampler:
    """Reconstructions of one delta under many seeds: the SVD once, then compress_delta's own steps per seed.

    ``test_sampler_matches_compress_delta`` pins that this is exactly what compress_delta stores.
    """

    def __init__(self, delta, ratio, beta, exponent=1.0, name="w", allocation="paper"):
        self.delta, self.ratio, self.beta, self.exponent, self.name = delta, ratio, beta, exponent, name
        m, n = delta.shape
        needed = pairs_needed((m, n), ratio, beta)
        self.u, self.sigma, self.v = svd_top(delta, needed, F64, "auto")
        self.first = compress_delta(
            delta, ratio, beta, exponent, seed=0, name=name, svd_dtype=F64, allocation=allocation
        )
        self.rank = self.first.rank
        self.count = self.first.keep_count
        m, n = delta.shape
        # What the masks realise (ALGORITHM.md section 5: q_k = c_k / rows).
        self.q_u = self.count[0].to(F64) / m
        self.q_v = self.count[1].to(F64) / n

    def compressed(self, seed: int) -> CompressedDelta:
        m, n = self.delta.shape
        mask_u = keep_mask(seed, self.name, FACTOR_U, self.count[0], m)
        mask_v = keep_mask(seed, self.name, FACTOR_V, self.count[1], n)
        return CompressedDelta(
            shape=(m, n),
            singular_values=self.sigma[: self.rank].float(),
            keep_count=self.count,
            u_values=pack_columns(self.u[:, : self.rank], mask_u),
            v_values=pack_columns(self.v[:, : self.rank], mask_v),
            seed=seed,
            name=self.name,
            compression_ratio=self.ratio,
        )

    def kept_part(self) -> torch.Tensor:
        r = self.rank
        return (self.u[:, :r] * self.sigma[:r]) @ self.v[:, :r].t()

    def closed_form_mse(self) -> float:
        """ALGORITHM.md section 2 with q_k = c_k / rows: sum over kept pairs of s^2 (1/(q_U q_V) - 1) (= 1/q^2 - 1
        when both factors keep the same fraction), plus s^2 of every dropped pair. Exact for sampling without
        replacement too: only each element's own keep rate enters E||Ũ_k||^2."""
        sigma = self.sigma.to(F64)
        kept = sigma[: self.rank] ** 2 * (1 / (self.q_u * self.q_v) - 1)
        return float(kept.sum() + (sigma[self.rank :] ** 2).sum())

    def elementwise_variance(self) -> torch.Tensor:
        """Var[(ΔW_c)_ij] = sum_k s_k^2 u_ik^2 v_jk^2 (1/(q_U q_V) - 1) (U and V masks independent)."""
        r = self.rank
        weight = self.sigma[:r].to(F64) ** 2 * (1 / (self.q_u * self.q_v) - 1)
        return (self.u[:, :r] ** 2 * weight) @ (self.v[:, :r] ** 2).t()

    def unrescaled(self, compressed: CompressedDelta, masks) -> torch.Tensor:
        """The ablation the paper warns about: the same masks and kept values, without the 1/q_k."""
        mask_u, mask_v = masks
        u = unpack_columns(compressed.u_values.to(F64), mask_u)
        v = unpack_columns(compressed.v_values.to(F64), mask_v)
        return (u * compressed.singular_values.to(F64)) @ v.t()


def unbiasedness_check(samples: torch.Tensor, sampler: Sampler) -> dict[str, bool]:
    """Statistical checks of section 2 on ``samples`` (N, m, n): each is True when the estimator passes it."""
    num = samples.shape[0]
    target = sampler.kept_part()  # = ΔW when nothing is dropped
    full = sampler.delta.to(F64)
    mean = samples.mean(0)
    closed = sampler.closed_form_mse()
    dropped = float((sampler.sigma[sampler.rank :].to(F64) ** 2).sum())
    # 1. The mean converges to the kept part: ||mean - target||^2 has expectation (closed - dropped) / N.
    expected_mean_error = (closed - dropped) / num
    mean_error = float(((mean - target) ** 2).sum())
    # 2. No element is off by more than 5 standard errors (its variance is known in closed form).
    z = (mean - target) / (sampler.elementwise_variance() / num).sqrt().clamp_min(1e-12)
    # 3. The empirical mean squared error against ΔW matches the closed form within 4 standard errors.
    errors = ((samples - full) ** 2).sum(dim=(1, 2))
    standard_error = float(errors.std()) / math.sqrt(num)
    return {
        "mean": mean_error < 3.0 * expected_mean_error,
        "elements": float(z.abs().max()) < 5.0,
        "mse": abs(float(errors.mean()) - closed) < 4.0 * standard_error,
    }


def passes(result: dict[str, bool]) -> bool:
    return all(result.values())


def draw(sampler: Sampler, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` reconstructions (seeds 0..num-1) and, from the very same masks, the unrescaled variant."""
    rescaled, unrescaled = [], []
    for seed in range(num):
        compressed = sampler.compressed(seed)
        rescaled.append(compressed.reconstruct(F64))
        unrescaled.append(sampler.unrescaled(compressed, compressed.masks()))
    return torch.stack(rescaled), torch.stack(unrescaled)


def test_sampler_matches_compress_delta():
    sampler = Sampler(matrix_with_spectrum(40, 30, [6.0, 5.0, 4.0, 3.0, 2.5, 2.0]), 4.0, 0.0)
    for seed in (0, 1, 17):
        ours = sampler.compressed(seed)
        real = compress_delta(sampler.delta, 4.0, 0.0, 1.0, seed=seed, name="w", svd_dtype=F64)
        for key, tensor in real.state_dict().items():
            assert torch.equal(ours.state_dict()[key], tensor), key
        assert torch.equal(ours.reconstruct(F64), real.reconstruct(F64))


def test_unbiased_when_every_pair_is_kept_and_unrescaled_variant_fails():
    # Rank 6, budget 4.3 pairs, no pre-pruning: every pair has 0 < q_k <= 1, so E[ΔW_c] = ΔW exactly.
    sampler = Sampler(matrix_with_spectrum(40, 30, [6.0, 5.0, 4.0, 3.0, 2.5, 2.0]), 4.0, 0.0)
    assert sampler.rank == 6 and (sampler.q_u > 0).all() and (sampler.q_u < 1).sum() >= 4
    assert torch.allclose(sampler.kept_part(), sampler.delta, atol=1e-12)
    samples, unrescaled = draw(sampler, 400)
    assert unbiasedness_check(samples, sampler) == {"mean": True, "elements": True, "mse": True}
    # Same masks, same kept values, no 1/q_k: every check rejects it.
    assert unbiasedness_check(unrescaled, sampler) == {
        "mean": False,
        "elements": False,
        "mse": False,
    }


def test_closed_form_error_counts_the_dropped_pairs():
    # A full-rank delta with pre-pruning: pairs past the boundary are dropped whole and add sigma_k^2. (The
    # rescaled rule keeps more pairs at lower q here, so both terms of the closed form matter.)
    delta = matrix_with_spectrum(36, 28, torch.linspace(3.0, 0.5, 28))
    sampler = Sampler(delta, 2.0, 0.6, exponent=0.5, allocation="rescaled")
    r = sampler.rank
    assert 0 < r < 28 and float(sampler.q_u.min()) > 0.4  # (a tiny q_k makes the error heavy-tailed)
    assert sampler.closed_form_mse() > 1.2 * float((sampler.sigma[r:] ** 2).sum())
    samples, unrescaled = draw(sampler, 400)
    assert unbiasedness_check(samples, sampler) == {"mean": True, "elements": True, "mse": True}
    result = unbiasedness_check(unrescaled, sampler)
    assert not passes(result) and not result["mse"], result


def test_rescale_uses_the_stored_keep_probability():
    compressed = compress_delta(random_delta(30, 20, dtype=F64), 4.0, 0.5, 1.0, seed=3, svd_dtype=F64)
    u_tilde, sigma, v_tilde = compressed.factors(F64)
    mask_u, mask_v = compressed.masks()
    q = compressed.keep_prob
    assert torch.equal(q, compressed.keep_count.to(F64) / torch.tensor([[30.0], [20.0]], dtype=F64))
    assert torch.equal(u_tilde, unpack_columns(compressed.u_values.to(F64), mask_u) * (1 / q[0]))
    assert torch.equal(v_tilde, unpack_columns(compressed.v_values.to(F64), mask_v) * (1 / q[1]))
    assert torch.equal(sigma, compressed.singular_values.to(F64))
    expected = (u_tilde.float() * compressed.singular_values) @ v_tilde.float().t()
    assert torch.allclose(compressed.reconstruct(), expected, atol=1e-5)


# ------------------------------------------------------------------------------------ budget (section 3)

SHAPES = {"square": (96, 96), "wide": (48, 160), "tall": (160, 48)}


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("ratio", [2, 3, 4, 8, 16, 32, 64, 128])
def test_budget_stored_values(kind, ratio):
    m, n = SHAPES[kind]
    for rule in ("paper", "rescaled"):
        compressed = compress_delta(
            random_delta(m, n, seed=ratio), ratio, 0.8, 1.0, seed=ratio, name=kind, allocation=rule
        )
        # Exact counts: the stored factor values are floor(m n / CR), whatever the seed, known before sampling.
        stored = compressed.num_factor_values
        assert stored == math.floor(m * n / ratio + 1e-6) == int(compressed.keep_count.sum())
        mask_u, mask_v = compressed.masks()
        assert mask_u.sum(0).tolist() == compressed.keep_count[0].tolist()
        assert mask_v.sum(0).tolist() == compressed.keep_count[1].tolist()
    assert compressed.num_stored_values == stored + compressed.rank
    assert compressed.value_compression_ratio == pytest.approx(m * n / compressed.num_stored_values)


def test_stored_count_is_the_same_for_every_seed():
    # Bernoulli masks would make the count (and the file size) a random variable; exact counts do not.
    m, n, ratio = 64, 80, 16.0
    delta = random_delta(m, n, seed=5)
    results = [compress_delta(delta, ratio, 0.8, 1.0, seed=s) for s in range(20)]
    assert {r.num_factor_values for r in results} == {m * n // 16}
    assert all(torch.equal(r.keep_count, results[0].keep_count) for r in results)
    assert len({r.u_values.sum().item() for r in results}) > 10  # ... while the kept elements differ


def test_bytes_on_disk():
    delta = random_delta(64, 48, dtype=torch.bfloat16)
    compressed = compress_delta(delta, 8.0, 0.8, 1.0)
    assert set(compressed.state_dict()) == {"singular_values", "keep_count", "u_values", "v_values"}
    assert compressed.u_values.dtype == torch.bfloat16 and compressed.v_values.dtype == torch.bfloat16
    assert compressed.singular_values.dtype == torch.float32 and compressed.keep_count.dtype == torch.int32
    r = compressed.rank
    assert compressed.keep_count.shape == (2, r)
    assert compressed.nbytes == 2 * compressed.num_factor_values + 4 * r + 8 * r
    assert compressed.dense_nbytes == 64 * 48 * 2
    assert compressed.disk_compression_ratio == pytest.approx(compressed.dense_nbytes / compressed.nbytes)
    assert compressed.compression_ratio == 8.0
    # The factors meet the nominal ratio; sigma and the two int32 counts (12 bytes a pair) are the overhead.
    assert compressed.disk_compression_ratio < 8.0


# ------------------------------------------------------------------------------------------ SVD routes


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_route_matches_the_exact_svd_on_the_kept_subspace(shape, dtype):
    m, n = shape
    sigma = torch.logspace(0, -3, min(shape), dtype=F64)  # sigma_k / sigma_1 down to 1e-3
    delta = matrix_with_spectrum(m, n, sigma, seed=1, dtype=dtype)
    k = 40  # sigma_40 / sigma_1 = 0.03
    exact_u, exact_s, exact_v = svd_top(delta.to(F64), k, F64, "svd")
    u, s, v = svd_top(delta, k, dtype, "gram")
    assert u.shape == (m, k) and v.shape == (n, k) and s.shape == (min(shape),)
    assert u.dtype == dtype and s.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    exact = (exact_u * exact_s[:k]) @ exact_v.t()
    ours = (u.to(F64) * s[:k].to(F64)) @ v.to(F64).t()
    assert float((ours - exact).norm() / exact.norm()) < tol
    assert float(((s[:k].to(F64) - exact_s[:k]) / exact_s[:k]).abs().max()) < tol
    eye = torch.eye(k, dtype=F64)
    assert float((u.to(F64).t() @ u.to(F64) - eye).abs().max()) < 10 * tol
    assert float((v.to(F64).t() @ v.to(F64) - eye).abs().max()) < 10 * tol
    # Same pairs, same signs as the exact SVD (well-separated spectrum, canonical signs).
    assert float((u.to(F64) - exact_u).abs().max()) < 1e3 * tol
    assert (s[1:] <= s[:-1]).all()


def test_gram_route_handles_rank_deficiency():
    delta = matrix_with_spectrum(50, 70, [4.0, 2.0, 1.0], dtype=torch.float32)
    u, s, v = svd_top(delta, 20, torch.float32, "gram")
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    assert float(s[3]) < 1e-5 * float(s[0])  # the null directions are counted as zero
    compressed = compress_delta(delta, 2.0, 0.5, 1.0, svd_method="gram")
    assert compressed.rank == 3 and compressed.keep_count.tolist() == [[50] * 3, [70] * 3]
    assert torch.allclose(compressed.reconstruct(), delta, atol=1e-5)


def test_methods_agree_and_auto_picks_the_right_one():
    delta = matrix_with_spectrum(90, 60, torch.logspace(0, -1, 60), seed=2, dtype=torch.float32)
    gram = compress_delta(delta, 8.0, 0.8, 1.0, seed=4, svd_method="gram")
    exact = compress_delta(delta, 8.0, 0.8, 1.0, seed=4, svd_method="svd")
    auto = compress_delta(delta, 8.0, 0.8, 1.0, seed=4)
    assert pairs_needed((90, 60), 8.0, 0.8) < 60
    for key, tensor in gram.state_dict().items():
        assert torch.equal(auto.state_dict()[key], tensor), key  # auto = gram when only the top pairs count
    assert gram.rank == exact.rank
    assert (gram.keep_count - exact.keep_count).abs().max() <= 1
    assert torch.allclose(gram.reconstruct(), exact.reconstruct(), atol=1e-4)
    lossless = compress_delta(delta, None)
    lossless_svd = compress_delta(delta, None, svd_method="svd")
    for key, tensor in lossless_svd.state_dict().items():
        assert torch.equal(lossless.state_dict()[key], tensor), key  # auto = exact SVD when every pair counts


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_deterministic(method):
    delta = random_delta(70, 50, seed=9)
    first = compress_delta(delta, 4.0, 0.6, 0.5, seed=1, name="d", svd_method=method)
    second = compress_delta(delta.clone(), 4.0, 0.6, 0.5, seed=1, name="d", svd_method=method)
    for key, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], tensor), key
    assert torch.equal(first.reconstruct(), second.reconstruct())


def test_pairs_needed():
    assert pairs_needed((4096, 4096), 16.0, 0.8) == 819
    assert pairs_needed((4096, 11008), 16.0, 0.8) == 819
    assert pairs_needed((64, 64), 2.0, 0.9) == 16  # the budget, not the pre-pruning, binds
    assert pairs_needed((64, 64), None, 0.9) == 64
    for shape, ratio, beta in [((64, 40), 3.0, 0.5), ((40, 64), 8.0, 0.8), ((64, 64), 1.5, 0.0)]:
        sigma = torch.linspace(1.0, 0.9, min(shape))  # flat: no clipping, the boundary is as far as it goes
        for rule in ("paper", "rescaled"):
            got = allocate_keep_prob(sigma, shape, ratio, beta, rule=rule)
            assert got.boundary <= pairs_needed(shape, ratio, beta)


# ------------------------------------------------------------------------------------------- edge cases


def test_zero_delta_stores_nothing():
    compressed = compress_delta(torch.zeros(20, 30), 8.0)
    assert compressed.rank == 0 and compressed.num_stored_values == 0 and compressed.nbytes == 0
    assert torch.equal(compressed.reconstruct(), torch.zeros(20, 30))
    assert compressed.disk_compression_ratio == math.inf


def test_rank_deficient_delta_is_kept_whole_when_under_budget():
    delta = matrix_with_spectrum(40, 30, [3.0, 2.0], dtype=torch.float32)
    compressed = compress_delta(delta, 2.0, 0.8, 1.0)
    assert compressed.rank == 2 and compressed.keep_count.tolist() == [[40, 40], [30, 30]]
    assert compressed.num_factor_values == 2 * 70
    assert torch.allclose(compressed.reconstruct(), delta, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 64), (64, 1)])
def test_single_pair_delta(shape):
    delta = random_delta(*shape, seed=2)
    ratio = 4.0
    compressed = compress_delta(delta, ratio, 0.8, 1.0)
    assert compressed.rank == 1 and compressed.num_factor_values == 64 // ratio
    long = 0 if shape[0] == 64 else 1
    assert compressed.keep_count[1 - long].tolist() == [1]  # the one-row factor keeps its one row
    # One pair, nothing dropped: unbiased, with the closed-form error; without the rescale it is not.
    sampler = Sampler(delta, ratio, 0.8)
    samples, unrescaled = draw(sampler, 200)
    assert unbiasedness_check(samples, sampler) == {"mean": True, "elements": True, "mse": True}
    result = unbiasedness_check(unrescaled, sampler)
    assert not passes(result) and not result["mse"] and not result["mean"], result


def test_all_sigma_equal_gets_a_uniform_allocation():
    # A scaled orthogonal matrix: every sigma is 2 up to the SVD's rounding. The paper's rule keeps whole pairs
    # (uniform q = 1), the rescaled rule spreads the budget over the 25 pre-pruned pairs (uniform q).
    q_mat, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    paper = compress_delta(2.0 * q_mat, 8.0, 0.6, 1.0)
    assert paper.keep_count.tolist() == [[64] * 4, [64] * 4]
    rescaled = compress_delta(2.0 * q_mat, 8.0, 0.6, 1.0, allocation="rescaled")
    budget = target_keep_fraction((64, 64), 8.0) * 64
    assert rescaled.rank == 25
    uniform = round(budget / 25 * 64)
    # The last pair takes the rest of the budget.
    assert rescaled.keep_count[:, :-1].tolist() == [[uniform] * 24, [uniform] * 24]
    assert rescaled.num_factor_values == 64 * 64 // 8


def test_pre_pruning_over_budget_lowers_it():
    compressed = compress_delta(random_delta(64, 64), 2.0, 0.9, 1.0)
    assert compressed.rank == 16 and compressed.keep_count.tolist() == [[64] * 16, [64] * 16]
    assert compressed.num_factor_values == 64 * 64 // 2


def test_lossless_reconstructs_the_delta():
    delta = random_delta(30, 50, dtype=F64)
    compressed = compress_delta(delta, None, svd_dtype=F64)
    assert compressed.rank == 30 and compressed.u_values.numel() == 30 * 30
    assert torch.allclose(compressed.reconstruct(F64), delta, atol=1e-5)


def test_reconstruct_dtype_and_device():
    compressed = compress_delta(random_delta(16, 24), 4.0, 0.5)
    assert compressed.reconstruct().dtype == torch.float32
    assert compressed.reconstruct(torch.bfloat16).dtype == torch.bfloat16
    assert compressed.reconstruct(device="cpu").device.type == "cpu"
    assert compressed.reconstruct().shape == (16, 24)


# ------------------------------------------------------------------------------------------ state dict


def test_state_dict_roundtrip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    compressed = compress_delta(random_delta(40, 56, dtype=torch.float16), 8.0, 0.7, 0.5, seed=12, name="l.q")
    save_file(compressed.state_dict(), tmp_path / "c.safetensors")
    loaded = CompressedDelta.from_state_dict(
        load_file(tmp_path / "c.safetensors"), (40, 56), seed=12, name="l.q"
    )
    assert torch.equal(loaded.reconstruct(), compressed.reconstruct())


def _tensors(compressed):
    return {k: v.clone() for k, v in compressed.state_dict().items()}


def test_from_state_dict_rejects_mismatches():
    compressed = compress_delta(random_delta(40, 30), 4.0, 0.6, 1.0, seed=1, name="m")
    good = _tensors(compressed)
    load = CompressedDelta.from_state_dict
    load(good, (40, 30), 1, "m")

    cases = []
    bad = _tensors(compressed)
    del bad["u_values"]
    cases.append((bad, (40, 30), "missing tensors"))
    bad = _tensors(compressed)
    bad["keep_count"] = bad["keep_count"][:, :-1]
    cases.append((bad, (40, 30), r"keep_count has shape \(2, \d+\), expected \(2, \d+\)"))
    bad = _tensors(compressed)
    bad["u_values"] = bad["u_values"].reshape(1, -1)
    cases.append((bad, (40, 30), "u_values must be 1-D"))
    bad = _tensors(compressed)
    bad["keep_count"] = bad["keep_count"].double()
    cases.append((bad, (40, 30), "keep_count must be an integer tensor"))
    bad = _tensors(compressed)
    bad["keep_count"][0, -1] = 0
    cases.append((bad, (40, 30), r"keep counts of U lie in \[0, \d+\], expected \[1, 40\]"))
    bad = _tensors(compressed)
    bad["keep_count"][1, 0] = 31
    cases.append((bad, (40, 30), r"keep counts of V lie in \[\d+, 31\], expected \[1, 30\]"))
    cases.append((good, (40, 2), "singular pairs for a 40 x 2 matrix"))
    bad = _tensors(compressed)
    bad["u_values"] = torch.zeros(compressed.rank * 40 + 1)
    cases.append((bad, (40, 30), r"u_values holds \d+ values but keep_count says \d+"))
    cases.append((good, (40,), "shape must be two positive sizes"))
    cases.append((good, (0, 30), "shape must be two positive sizes"))
    for tensors, shape, message in cases:
        with pytest.raises(ValueError, match=message):
            load(tensors, shape, 1, "m")


def test_wrong_counts_are_caught_at_load_without_making_a_mask():
    # The counts say how many values each factor holds, so a file with one value too many (or too few) is refused
    # from its header alone, before any hash is computed.
    compressed = compress_delta(random_delta(40, 30), 4.0, 0.6, 1.0, seed=1, name="m")
    for delta_count in (1, -1):
        bad = _tensors(compressed)
        bad["v_values"] = torch.zeros(compressed.v_count + delta_count)
        with pytest.raises(ValueError, match=r"v_values holds \d+ values but keep_count says \d+"):
            CompressedDelta.from_state_dict(bad, (40, 30), 1, "m")


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_delta(value):
    delta = random_delta(8, 6)
    delta[3, 2] = value
    with pytest.raises(ValueError, match=r"contains 1 NaN or inf value\(s\)"):
        compress_delta(delta, 4.0, name="layer.0")
    with pytest.raises(ValueError, match="'layer.0'"):
        compress_delta(delta, 4.0, name="layer.0")


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4), ()])
def test_not_a_matrix(shape):
    with pytest.raises(ValueError, match="must be a 2-D matrix"):
        compress_delta(torch.ones(shape), 4.0)


def test_other_bad_deltas():
    with pytest.raises(ValueError, match="floating-point"):
        compress_delta(torch.ones(4, 4, dtype=torch.int64), 4.0)
    with pytest.raises(ValueError, match="empty"):
        compress_delta(torch.ones(0, 4), 4.0)
    with pytest.raises(ValueError, match="torch.Tensor"):
        compress_delta([[1.0, 2.0]], 4.0)
    check_delta(torch.ones(2, 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compression_ratio": 1.0}, "compression_ratio must be > 1"),
        ({"compression_ratio": 0.5}, "compression_ratio must be > 1"),
        ({"compression_ratio": float("nan")}, "compression_ratio"),
        ({"pre_prune_ratio": 1.0}, r"pre_prune_ratio \(beta\) must be in \[0, 1\)"),
        ({"pre_prune_ratio": -0.2}, r"pre_prune_ratio \(beta\) must be in \[0, 1\)"),
        ({"importance_exponent": 0.0}, r"importance_exponent \(C\) must be a finite number > 0"),
        ({"importance_exponent": -1.0}, r"importance_exponent \(C\)"),
        ({"svd_dtype": torch.float16}, "svd_dtype must be torch.float32 or torch.float64"),
        ({"svd_method": "qr"}, "svd_method must be one of"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
        ({"name": None}, "name must be the module name as a str"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compress_delta(random_delta(12, 10), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_cuda_compression_loads_on_the_cpu(method):
    delta = random_delta(96, 64, seed=4)
    on_gpu = compress_delta(delta.cuda(), 8.0, 0.7, 1.0, seed=2, name="g", svd_method=method)
    assert on_gpu.u_values.device.type == "cuda"
    tensors = {k: v.cpu() for k, v in on_gpu.state_dict().items()}
    on_cpu = CompressedDelta.from_state_dict(tensors, (96, 64), 2, "g")
    mask_u, mask_v = on_gpu.masks()
    assert torch.equal(mask_u.cpu(), on_cpu.masks()[0]) and torch.equal(mask_v.cpu(), on_cpu.masks()[1])
    assert torch.allclose(on_gpu.reconstruct().cpu(), on_cpu.reconstruct(), atol=1e-5)
    assert torch.allclose(on_cpu.reconstruct(device="cuda").cpu(), on_cpu.reconstruct(), atol=1e-5)


def test_gram_route_keeps_an_optimal_subspace_when_the_boundary_is_crowded():
    # A Gaussian bulk: neighbouring sigma at the boundary differ by a fraction of a percent, so which
    # directions straddle it is ill-conditioned for any float32 solver (the Gram matrix squares the
    # conditioning). What must hold is that the kept subspace captures the energy of the best one.
    generator = torch.Generator().manual_seed(6)
    low = torch.randn(200, 8, generator=generator) @ torch.randn(8, 150, generator=generator) / 30
    delta = low + 0.05 * torch.randn(200, 150, generator=generator)
    k = pairs_needed((200, 150), 16.0, 0.8)
    exact_u, exact_s, exact_v = svd_top(delta.to(F64), k, F64, "svd")
    u, s, v = svd_top(delta, k, torch.float32, "gram")
    best = float((delta.to(F64) - (exact_u * exact_s[:k]) @ exact_v.t()).norm())
    ours = float((delta.to(F64) - (u.to(F64) * s[:k].to(F64)) @ v.to(F64).t()).norm())
    assert (ours - best) / best < 1e-6
    assert float(((s[:k].to(F64) - exact_s[:k]) / exact_s[:k]).abs().max()) < 1e-4
    assert float((s[k:].to(F64) - exact_s[k:]).abs().max()) < 1e-2 * float(
        exact_s[0]
    )  # the tail: only roughly
