"""ImPart-QT: packed codes, the quantiser, the bit schedule and budget, and quantised adapters end to end on tiny
real models (save/load both ways, checkpoint streaming, CLI, quality at equal size)."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open

from impart_peft import ImPartConfig, ImPartLayer, from_finetuned
from impart_peft.allocation import allocate_keep_prob, target_keep_fraction
from impart_peft.checkpoints import apply_adapter, compress_checkpoints, inspect_adapter
from impart_peft.cli import main
from impart_peft.delta import compress_delta
from impart_peft.quantization import (
    QuantizationScheme,
    QuantizedDelta,
    allocate_bit_budget,
    compress_delta_quantized,
    dequantize_values,
    expected_payload_bits,
    pack_codes,
    quantize_values,
    runs_to_bits,
    unpack_codes,
)
from tiny_models import finetune, make_base, make_pair, sample_ids, task_batch


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def deltas(model, adapter="default"):
    """Rebuilt dense deltas of every ImPart layer with a matrix."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ImPartLayer) and adapter in module.impart_meta:
            delta = module.get_delta_weight(adapter)
            if delta is not None:
                out[name.removeprefix("base_model.model.")] = delta
    return out


def low_rank_delta(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A fine-tune-like delta: a decaying spectrum (a few strong directions over a noise floor)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))[0]
    sigma = 0.05 / (1 + torch.arange(min(m, n), dtype=torch.float32)) ** 0.8
    return (u * sigma) @ v.t()


# ---------------------------------------------------------------------------------------------- packed codes
def test_pack_codes_golden_bytes():
    # code 1 (1 bit) at bit 0, 2 (2 bits) at bits 1-2, 3 (3 bits) at bits 3-5, 255 (8 bits) at bits 6-13,
    # least significant bit first: byte 0 = 1 + 4 + 8 + 16 + 64 + 128 = 221, byte 1 = the six low bits = 63.
    packed = pack_codes(torch.tensor([1, 2, 3, 255]), torch.tensor([1, 2, 3, 8]))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [221, 63]
    assert unpack_codes(packed, torch.tensor([1, 2, 3, 8])).tolist() == [1, 2, 3, 255]


def test_pack_codes_round_trip_random_widths():
    g = torch.Generator().manual_seed(0)
    widths = torch.randint(1, 9, (5000,), generator=g)
    codes = torch.randint(0, 256, (5000,), generator=g) % (1 << widths)
    packed = pack_codes(codes, widths)
    assert packed.numel() == math.ceil(int(widths.sum()) / 8)
    assert torch.equal(unpack_codes(packed, widths), codes)


def test_pack_codes_rejects_bad_input():
    with pytest.raises(ValueError, match="does not fit its bit width"):
        pack_codes(torch.tensor([4]), torch.tensor([2]))
    with pytest.raises(ValueError, match="expected 1 uint8 bytes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), torch.tensor([3, 3]))


# ---------------------------------------------------------------------------------------------- the quantiser
def test_quantiser_error_falls_with_bits_and_is_near_optimal():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128 * 64, generator=g)
    counts = torch.tensor([x.numel()])
    errors = {}
    for bits in range(1, 9):
        codes, scales = quantize_values(x, counts, torch.tensor([bits]), 128)
        assert int(codes.min()) >= 0 and int(codes.max()) < 2**bits
        assert scales.dtype == torch.float16 and scales.numel() == 64
        y = dequantize_values(codes, scales, counts, torch.tensor([bits]), 128)
        errors[bits] = float(((x - y) ** 2).mean())
    assert all(errors[b + 1] < errors[b] / 2.5 for b in range(1, 8)), errors
    # A uniform quantiser of Gaussian values at its best clipping: about 0.363 (1 bit), 0.119 (2), 0.037 (3)
    # times the variance; the absolute maximum as the scale would give ~0.25 at 2 bits.
    assert errors[1] < 0.40 and errors[2] < 0.13 and errors[3] < 0.045 and errors[8] < 1e-4


def test_values_on_the_grid_are_exact():
    # Values already of the form (c - 1.5) * 0.25 with both extremes in every group: the absolute maximum gives
    # the exact scale and every value comes back bit for bit.
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 4, (3, 10), generator=g)
    codes[:, 0], codes[:, 1] = 0, 3
    x = ((codes.float() - 1.5) * 0.25).reshape(-1)
    counts = torch.tensor([10, 10, 10])
    got, scales = quantize_values(x, counts, torch.tensor([2, 2, 2]), 10)
    assert torch.equal(got, codes.reshape(-1))
    assert torch.equal(scales, torch.full((3,), 0.25, dtype=torch.float16))
    assert torch.equal(dequantize_values(got, scales, counts, torch.tensor([2, 2, 2]), 10), x)


def test_groups_stay_inside_columns():
    # Two columns of 5 values with group size 4: groups (4, 1) and (4, 1), never a group across columns; a
    # column of huge values does not spoil the scale of the next.
    x = torch.tensor([100.0, -100.0, 50.0, 25.0, 75.0, 0.01, -0.01, 0.02, 0.005, -0.02])
    counts = torch.tensor([5, 5])
    codes, scales = quantize_values(x, counts, torch.tensor([8, 8]), 4)
    assert scales.numel() == 4
    y = dequantize_values(codes, scales, counts, torch.tensor([8, 8]), 4)
    assert torch.allclose(y[5:], x[5:], rtol=0.02)
    with pytest.raises(ValueError, match="3 quantisation scales for 4 groups"):
        dequantize_values(codes, scales[:3], counts, torch.tensor([8, 8]), 4)


# ---------------------------------------------------------------------------------------------- the schedule
def test_scheme_tiers():
    scheme = QuantizationScheme()
    assert scheme.bits == (8, 4, 3, 2)
    assert scheme.fractions == pytest.approx((1 / 15, 2 / 15, 4 / 15, 8 / 15))
    assert scheme.pair_bits(6).tolist() == [8, 4, 3, 2, 2, 2]  # ceil(6/15)=1, ceil(18/15)=2, ceil(42/15)=3
    assert scheme.pair_bits(15).tolist() == [8] + [4] * 2 + [3] * 4 + [2] * 8
    assert scheme.pair_bits(1).tolist() == [8]
    assert scheme.pair_bits(0).tolist() == []
    custom = QuantizationScheme.parse({"bits": [8, 3, 2], "fractions": [0.1, 0.2, 0.7], "group_size": 64})
    assert custom.pair_bits(10).tolist() == [
        8,
        3,
        3,
        2,
        2,
        2,
        2,
        2,
        2,
        2,
    ]  # decimal boundaries: 1 and 3, not 2.99..
    assert QuantizationScheme.parse([4]).pair_bits(3).tolist() == [4, 4, 4]
    assert QuantizationScheme.parse(custom.to_dict()) == custom


@pytest.mark.parametrize(
    "value, message",
    [
        ({"bits": [2, 4]}, "non-increasing"),
        ({"bits": [9]}, "integers from 1 to 8"),
        ({"bits": [0]}, "integers from 1 to 8"),
        ({"bits": []}, "non-empty list"),
        ({"bits": [8, 2], "fractions": [0.5]}, "one entry per bit width"),
        ({"bits": [8, 2], "fractions": [0.5, 0.6]}, "must sum to 1"),
        ({"bits": [8, 2], "fractions": [-0.5, 1.5]}, "finite numbers >= 0"),
        ({"bits": [4], "group_size": 0}, "positive integer"),
        ({"bit": [4]}, "unknown quantization setting"),
        ("8,4", "must be None, a dict"),
    ],
)
def test_scheme_rejects_bad_settings(value, message):
    with pytest.raises(ValueError, match=message):
        QuantizationScheme.parse(value)
    with pytest.raises(ValueError, match=message):
        ImPartConfig(quantization=value)


def test_config_stores_the_canonical_scheme():
    config = ImPartConfig(quantization={"bits": [4, 2]})
    assert config.quantization == {"bits": [4, 2], "fractions": [1 / 3, 2 / 3], "group_size": 128}
    assert ImPartConfig(**config.to_dict()).quantization == config.quantization
    assert ImPartConfig().quantization is None


# ---------------------------------------------------------------------------------------------- the budget
def test_bit_budget_is_spent_and_keeps_more_values():
    delta = low_rank_delta(256, 512)
    sigma = torch.linalg.svdvals(delta)
    for ratio in (8, 16, 32):
        for bits in ([8, 4, 3, 2], [2], [4]):
            scheme = QuantizationScheme.parse(bits)
            planned = allocate_bit_budget(sigma, (256, 512), ratio, scheme, 16, pre_prune_ratio=0.8)
            budget = 256 * 512 * 16 / ratio
            assert planned.budget_bits == budget
            assert planned.expected_bits <= budget
            # The bisection stops within a sliver of the budget (it is spent, not left on the table).
            assert planned.expected_bits > 0.98 * budget, (ratio, bits, planned.expected_bits / budget)
            assert planned.expected_bits == expected_payload_bits(
                planned.allocation.keep_count, planned.pair_bits, 128
            )
            # 16-bit values at the same ratio would keep budget / 16 values; b-bit codes keep about 16 / b times
            # as many (less the scales' 16 bits per group of 128).
            kept = int(planned.allocation.keep_count.sum())
            assert kept > {2: 6.5, 4: 3.4}.get(bits[0], 2) * budget / 16, (ratio, bits, kept)


def test_allocation_by_keep_fraction_is_allocate_keep_prob():
    # The bit budget drives ImPart's own allocation routine: for every ratio, the same result bit for bit when the
    # budget is given as the mean keep probability (one routine serves ImPart and ImPart-QT).
    for shape, seed in (((256, 512), 0), ((96, 64), 1), ((40, 40), 2)):
        sigma = torch.linalg.svdvals(low_rank_delta(*shape, seed=seed))
        for ratio in (1.05, 2, 4, 16, 100):
            for beta in (0.0, 0.5, 0.9):
                for exponent in (0.5, 1.0, 2.0):
                    expected = allocate_keep_prob(sigma, shape, ratio, beta, exponent)
                    got = allocate_keep_prob(
                        sigma, shape, None, beta, exponent, mean_keep=target_keep_fraction(shape, ratio)
                    )
                    assert torch.equal(got.keep_prob, expected.keep_prob), (shape, ratio, beta, exponent)
                    assert torch.equal(got.keep_count, expected.keep_count), (shape, ratio, beta, exponent)
                    assert (got.boundary, got.gamma, got.pre_prune_lowered) == (
                        expected.boundary,
                        expected.gamma,
                        expected.pre_prune_lowered,
                    )
    # ... and beyond them: more than m * n values (a value ratio below 1), which b-bit codes can pay for.
    sigma = torch.linalg.svdvals(low_rank_delta(64, 64))
    wide = allocate_keep_prob(sigma, (64, 64), None, 0.8, 1.0, mean_keep=0.9)
    assert int(wide.keep_count.sum()) == math.floor(0.9 * 64 * 128)
    assert bool((wide.keep_prob[1:] <= wide.keep_prob[:-1]).all())
    with pytest.raises(ValueError, match="mean_keep must be in"):
        allocate_keep_prob(sigma, (64, 64), None, mean_keep=1.5)


def test_low_bits_keep_more_values_than_the_dense_matrix_has():
    # 2-bit codes at CR 8 against float32 pay for ~123k values of a 256 x 256 delta's 131k factor elements: more
    # than the m * n = 65,536 a ratio-based allocation could ever ask for.
    sigma = torch.linalg.svdvals(low_rank_delta(256, 256))
    planned = allocate_bit_budget(
        sigma, (256, 256), 8, QuantizationScheme.parse([2]), 32, pre_prune_ratio=0.9
    )
    kept = int(planned.allocation.keep_count.sum())
    assert kept > 1.8 * 256 * 256
    assert 0.98 * planned.budget_bits < planned.expected_bits <= planned.budget_bits


def test_bit_budget_not_binding_keeps_every_pair_whole():
    delta = low_rank_delta(64, 64)[:, :]
    sigma = torch.linalg.svdvals(delta)
    planned = allocate_bit_budget(sigma, (64, 64), 1.5, QuantizationScheme.parse([2]), 32)
    assert planned.mean_keep is None and planned.allocation.boundary == 64
    assert bool((planned.allocation.keep_prob == 1).all())
    lossless = allocate_bit_budget(sigma, (64, 64), None, QuantizationScheme(), 16)
    assert lossless.budget_bits is None and lossless.allocation.boundary == 64


# ---------------------------------------------------------------------------------------------- one matrix
def test_compress_quantized_matrix():
    delta = low_rank_delta(256, 512)
    first = compress_delta_quantized(delta, 16, None, seed=3, name="m", reference_dtype=torch.bfloat16)
    again = compress_delta_quantized(delta, 16, None, seed=3, name="m", reference_dtype=torch.bfloat16)
    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key  # deterministic
    assert first.u_codes.dtype == torch.uint8 and first.u_scales.dtype == torch.float16
    # The codes hold exactly sum_k count_k * b_k bits, rounded up to whole bytes.
    mask_u, mask_v = first.masks()
    for mask, codes in ((mask_u, first.u_codes), (mask_v, first.v_codes)):
        bits = int((mask.sum(0) * first.pair_bits).sum())
        assert codes.numel() == math.ceil(bits / 8)
    assert first.pair_bits[0] == 8 and first.pair_bits[-1] == 2
    # The ratio asked for, counted in bits (the realised mask varies around its expectation by a few values).
    assert first.nominal_compression_ratio == pytest.approx(16, rel=0.02)
    assert first.disk_compression_ratio == pytest.approx(16, rel=0.1)
    assert first.disk_compression_ratio < first.nominal_compression_ratio
    # Far closer to the delta than unquantised ImPart storing bf16 values at the same ratio.
    plain = compress_delta(delta, 16, seed=3, name="m", storage_dtype=torch.bfloat16)
    error_q = float((first.reconstruct() - delta).norm() / delta.norm())
    error_p = float((plain.reconstruct() - delta).norm() / delta.norm())
    assert error_q < error_p / 2, (error_q, error_p)
    # The dequantised CompressedDelta is the same delta, and the state dict round-trips.
    assert torch.equal(first.dequantized().reconstruct(), first.reconstruct())
    loaded = QuantizedDelta.from_state_dict(first.state_dict(), (256, 512), first.meta(), seed=3, name="m")
    assert torch.equal(loaded.reconstruct(), first.reconstruct())
    assert torch.equal(runs_to_bits(first.meta()["bits"]), first.pair_bits)


def test_corrupt_or_mismatched_quantized_delta_is_refused():
    delta = low_rank_delta(64, 96)
    compressed = compress_delta_quantized(delta, 24, [4, 2], seed=1, name="m")
    assert bool((compressed.keep_count[0] < 64).any())  # a sparse column: its mask depends on the seed
    tensors = compressed.state_dict()
    bad = dict(tensors, keep_count=tensors["keep_count"][:, :-1])
    with pytest.raises(ValueError, match=r"keep_count has shape \(2, \d+\)"):
        QuantizedDelta.from_state_dict(bad, (64, 96), compressed.meta(), seed=1, name="m")
    bad = dict(tensors, u_codes=tensors["u_codes"][:-1])
    with pytest.raises(ValueError, match="factor U: packed codes hold"):
        QuantizedDelta.from_state_dict(bad, (64, 96), compressed.meta(), seed=1, name="m").reconstruct()
    bad = dict(tensors, u_codes=tensors["u_codes"].to(torch.int16))
    with pytest.raises(ValueError, match="u_codes must be 1-D uint8"):
        QuantizedDelta.from_state_dict(bad, (64, 96), compressed.meta(), seed=1, name="m")
    meta = dict(compressed.meta(), bits=[[4, 1]])
    with pytest.raises(ValueError, match="bit widths"):
        QuantizedDelta.from_state_dict(tensors, (64, 96), meta, seed=1, name="m")


# ---------------------------------------------------------------------------------------------- adapters
QT = {"bits": [8, 4, 3, 2], "group_size": 32}


@pytest.mark.parametrize("arch, tie", [("llama", True), ("gpt2", False)])
def test_quantized_adapter_round_trips_bit_identically(arch, tie, tmp_path):
    base, ft = make_pair(arch, tie=tie)
    ids = sample_ids()
    model = from_finetuned(
        copy.deepcopy(base), ft, ImPartConfig(compression_ratio=8, seed=3, quantization=QT)
    )
    expected_logits = logits(model, ids)
    expected_deltas = deltas(model)
    assert expected_deltas
    assert not torch.equal(expected_logits, logits(base, ids))
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["quantization"] == ImPartConfig(quantization=QT).quantization
    # The model card's "how it was made" names the bit schedule.
    assert "quantization={'bits': [8, 4, 3, 2]" in (tmp_path / "README.md").read_text()
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
        assert not [k for k in keys if k.endswith(("impart_u_values", "impart_v_values"))]
        codes = [k for k in keys if k.endswith("impart_u_codes")]
        assert codes and all(handle.get_tensor(k).dtype == torch.uint8 for k in codes)
        assert all(handle.get_tensor(k.replace("codes", "scales")).dtype == torch.float16 for k in codes)

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, ids), expected_logits)
    for name, delta in deltas(loaded).items():
        assert torch.equal(delta, expected_deltas[name]), name

    plain = copy.deepcopy(base)
    plain.load_adapter(str(tmp_path), adapter_name="qt")
    assert torch.equal(logits(plain, ids), expected_logits)
    for name, delta in deltas(plain, "qt").items():
        assert torch.equal(delta, expected_deltas[name]), name

    # merge / unmerge work on the decoded factors as on any ImPart adapter.
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), expected_logits, atol=1e-4, rtol=1e-4)


def test_truncated_quantized_adapter_is_refused(tmp_path):
    base, ft = make_pair("llama")
    model = from_finetuned(copy.deepcopy(base), ft, ImPartConfig(compression_ratio=8, quantization=QT))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    name = next(n for n, m in config["module_meta"].items() if "quantized" in m)
    config["module_meta"][name]["quantized"]["u_bytes"] += 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"impart_u_codes: found U8 \[\d+\], expected U8 \[\d+\] \(as module_meta announces\)",
    ):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


@pytest.fixture(scope="module")
def wide_pair():
    """A 256-wide Llama and a fine-tune on the task of ``task_batch`` (a setting where ImPart at CR 8 clearly
    beats the base), and held-out task text."""
    base = make_base("llama", width=256)
    ft = finetune(base, steps=30, seed=1, lr=3e-4)
    ids = task_batch(torch.Generator().manual_seed(99), 1, batch=16, length=32)
    return base, ft, ids


def next_token_kl(reference, model, ids) -> float:
    ref = F.log_softmax(logits(reference, ids).double(), -1)
    out = F.log_softmax(logits(model, ids).double(), -1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def test_quantized_beats_unquantized_at_equal_size(wide_pair, tmp_path):
    base, ft, ids = wide_pair
    results = {}
    for label, config in (
        ("plain", ImPartConfig(compression_ratio=16, pre_prune_ratio=0.9)),
        ("qt", ImPartConfig(compression_ratio=18, pre_prune_ratio=0.9, quantization={"bits": [8, 4, 3, 2]})),
    ):
        model = from_finetuned(copy.deepcopy(base), ft, config)
        model.save_pretrained(tmp_path / label)
        size = os.path.getsize(tmp_path / label / "adapter_model.safetensors")
        results[label] = (size, next_token_kl(ft, model, ids))
    kl_base = next_token_kl(ft, base, ids)
    (size_plain, kl_plain), (size_qt, kl_qt) = results["plain"], results["qt"]
    assert size_qt <= size_plain  # no larger on disk ...
    assert kl_plain < kl_base  # (ImPart does carry the fine-tune here) ...
    assert kl_qt < kl_plain / 5, results  # ... and far closer to the fine-tune (it keeps ~8x more values)


def test_on_disk_ratio_matches_the_bits_asked_for(wide_pair, tmp_path):
    base, ft, _ = wide_pair
    config = ImPartConfig(compression_ratio=24, pre_prune_ratio=0.9, quantization={"bits": [8, 4, 3, 2]})
    model = from_finetuned(copy.deepcopy(base), ft, config)
    model.save_pretrained(tmp_path)
    summary = inspect_adapter(tmp_path)
    matrices = [m for m in summary.modules if m.factor_bits]
    assert len(matrices) == 2 * 7 + 2  # 7 projections per layer, the embeddings and the head
    header = json.loads(
        (tmp_path / "adapter_model.safetensors").read_bytes()[8:][
            : int.from_bytes((tmp_path / "adapter_model.safetensors").read_bytes()[:8], "little")
        ]
    )
    for m in matrices:
        # bits(codes) + bits(scales) is the budget: the nominal ratio is the one asked for, counted in bits ...
        assert m.nominal_ratio == pytest.approx(24, rel=0.03), m.name
        # ... and the file holds exactly those bytes plus sigma (float32) and the two keep counts (int32) per pair.
        meta = summary.config.module_meta[m.name]["quantized"]
        prefix = f"base_model.model.{m.name}."
        entry = header[prefix + "impart_u_codes"]
        assert entry["dtype"] == "U8" and entry["shape"] == [meta["u_bytes"]]
        assert m.stored_bytes == m.factor_bits // 8 + 12 * m.rank
        assert m.disk_ratio == pytest.approx(24, rel=0.1)
    assert summary.nominal_ratio == pytest.approx(24, rel=0.02)


def test_streamed_checkpoints_same_bytes_and_apply(tmp_path):
    base, ft = make_pair("llama", tie=True)
    base, ft = base.to(torch.bfloat16), ft.to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    ft.save_pretrained(tmp_path / "ft", max_shard_size="20KB")
    config = ImPartConfig(compression_ratio=6, seed=5, quantization={"bits": [8, 3, 2], "group_size": 16})
    from transformers import AutoModelForCausalLM

    def load(folder):
        return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()

    reference = from_finetuned(load(tmp_path / "base"), load(tmp_path / "ft"), config)
    reference.save_pretrained(tmp_path / "reference")
    compress_checkpoints(tmp_path / "base", tmp_path / "ft", tmp_path / "streamed", config, progress=False)
    streamed = (tmp_path / "streamed" / "adapter_model.safetensors").read_bytes()
    assert streamed == (tmp_path / "reference" / "adapter_model.safetensors").read_bytes()
    saved = json.loads((tmp_path / "streamed" / "adapter_config.json").read_text())
    assert (
        saved["module_meta"]
        == json.loads((tmp_path / "reference" / "adapter_config.json").read_text())["module_meta"]
    )
    assert any("quantized" in m for m in saved["module_meta"].values())
    # bf16 fine-tune: the ratio is counted against 16-bit values.
    assert inspect_adapter(tmp_path / "streamed").nominal_ratio == pytest.approx(6, rel=0.15)

    apply_adapter(tmp_path / "base", tmp_path / "streamed", tmp_path / "merged", progress=False)
    merged = load(tmp_path / "merged")
    expected = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "streamed").merge_and_unload()
    for (name, tensor), (_, other) in zip(
        merged.state_dict().items(), expected.state_dict().items(), strict=True
    ):
        assert torch.equal(tensor, other), name


def test_cli_compress_with_bits(tmp_path, capsys):
    base, ft = make_pair("gpt2")
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    out = tmp_path / "adapter"
    args = ["compress", str(tmp_path / "base"), str(tmp_path / "ft"), str(out), "--ratio", "8", "--quiet"]
    assert main([*args, "--bits", "8,3,2", "--bit-fractions", "0.1,0.3,0.6", "--group-size", "64"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["quantization"] == {"bits": [8, 3, 2], "fractions": [0.1, 0.3, 0.6], "group_size": 64}
    assert main(["inspect", str(out)]) == 0
    assert "bits 8/3/2 (group 64)" in capsys.readouterr().out
    # Bad schedules are one-line errors.
    assert main([*args, "--overwrite", "--bits", "2,8"]) == 1
    assert "non-increasing" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--group-size", "64"]) == 1
    assert "need --bits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--overwrite", "--bits", "8,x"])
    assert exit_info.value.code == 2
    assert "not a comma-separated list of integers" in capsys.readouterr().err
