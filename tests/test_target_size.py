"""A size budget for the whole adapter (``target_size``) and "auto" beta and C, end to end on small real models."""

from __future__ import annotations

import copy
import json
import math
import os
import re

import pytest
import torch
from peft import PeftModel

from impart_peft import ImPartConfig, from_finetuned
from impart_peft.allocation import allocate_keep_prob
from impart_peft.budget import BudgetTooSmallError
from impart_peft.checkpoints import compress_checkpoints
from impart_peft.filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from impart_peft.validation import InvalidAdapterError
from tiny_models import make_pair, sample_ids

MODELS = {
    "llama": dict(arch="llama", width=64),
    "llama-tied": dict(arch="llama", tie=True, width=48),
    "gpt2": dict(arch="gpt2", width=64),  # Conv1D weights, (in, out)
}


@pytest.fixture(scope="module")
def pairs():
    return {name: make_pair(steps=3, **kwargs) for name, kwargs in MODELS.items()}


def _dense_matrix_bytes(model) -> int:
    meta = model.peft_config["default"].module_meta
    return sum(math.prod(m["shape"]) * 4 for m in meta.values() if m.get("rank"))


def _save(model, folder):
    model.save_pretrained(folder)
    return os.path.getsize(folder / ADAPTER_WEIGHTS)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.4])
@pytest.mark.parametrize("auto", [False, True], ids=["fixed", "auto"])
@pytest.mark.parametrize("rule", ["uniform", "spectral"])
def test_file_never_exceeds_the_size_asked(pairs, name, fraction, auto, rule, tmp_path):
    base, finetuned = pairs[name]
    dense = sum(p.numel() * 4 for p in base.parameters() if p.dim() == 2)
    cap = int(dense * fraction)
    settings = {"pre_prune_ratio": "auto", "importance_exponent": "auto"} if auto else {}
    config = ImPartConfig(target_size=cap, seed=3, size_rule=rule, **settings)
    model = from_finetuned(copy.deepcopy(base), finetuned, config)
    size = _save(model, tmp_path)
    assert size <= cap
    assert size >= 0.8 * cap  # the budget is spent, not left on the table
    config = model.peft_config["default"]
    ratios = [m["compression_ratio"] for m in config.module_meta.values() if m.get("rank")]
    assert len(ratios) >= 8 and all(r > 1 for r in ratios)
    # compression_ratio now records the model-wide value ratio achieved
    stored = sum(m["u_count"] + m["v_count"] for m in config.module_meta.values() if m.get("rank"))
    dense_values = sum(math.prod(m["shape"]) for m in config.module_meta.values() if m.get("rank"))
    assert config.compression_ratio == pytest.approx(dense_values / stored)


@pytest.mark.parametrize("target", ["30kB", "0.03MB", "29.2KiB", "6x"])
def test_size_strings_and_global_ratio(pairs, target, tmp_path):
    base, finetuned = pairs["llama"]
    model = from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(target_size=target))
    size = _save(model, tmp_path)
    if target.endswith("x"):
        cap = _dense_matrix_bytes(model) // 6
    else:
        cap = {"30kB": 30_000, "0.03MB": 30_000, "29.2KiB": math.floor(29.2 * 1024)}[target]
    assert 0.8 * cap <= size <= cap
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["target_size"] == target


def test_uniform_rule_is_one_ratio_and_the_smallest_that_fits(pairs, tmp_path):
    base, finetuned = pairs["llama"]
    reference = from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(compression_ratio=7.0, seed=1))
    size = _save(reference, tmp_path / "reference")
    model = from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(target_size=size, seed=1))
    assert _save(model, tmp_path / "sized") <= size
    ratios = {
        m["compression_ratio"] for m in model.peft_config["default"].module_meta.values() if m.get("rank")
    }
    assert len(ratios) == 1
    (ratio,) = ratios
    # the uniform ratio 7 gives this very file size, so the smallest ratio that fits is 7 up to the bisection
    assert 7.0 * (1 - 1e-3) <= ratio <= 7.0 * (1 + 1e-3)
    # one byte less and the ratio must grow
    smaller = from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(target_size=size - 200, seed=1))
    (smaller_ratio,) = {
        m["compression_ratio"] for m in smaller.peft_config["default"].module_meta.values() if m.get("rank")
    }
    assert smaller_ratio > ratio


def test_matrices_get_different_ratios_by_their_spectra(pairs):
    base, finetuned = pairs["llama"]
    model = from_finetuned(
        copy.deepcopy(base), finetuned, ImPartConfig(target_size="8x", size_rule="spectral")
    )
    ratios = {
        n: m["compression_ratio"]
        for n, m in model.peft_config["default"].module_meta.items()
        if m.get("rank")
    }
    assert max(ratios.values()) / min(ratios.values()) > 1.2
    # the recorded ratio gives the stored budget back: floor(m n / ratio) factor values
    for meta in model.peft_config["default"].module_meta.values():
        if meta.get("rank"):
            m, n = meta["shape"]
            assert meta["u_count"] + meta["v_count"] == math.floor(m * n / meta["compression_ratio"] + 1e-6)


@pytest.mark.parametrize("auto", [False, True], ids=["fixed", "auto"])
def test_recorded_settings_reload_bit_identically(pairs, auto, tmp_path):
    base, finetuned = pairs["gpt2"]
    settings = (
        {"pre_prune_ratio": "auto", "importance_exponent": "auto"} if auto else {"pre_prune_ratio": 0.5}
    )
    model = from_finetuned(
        copy.deepcopy(base), finetuned, ImPartConfig(target_size="5x", seed=11, **settings)
    )
    model.save_pretrained(tmp_path)
    ids = sample_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    before = model.peft_config["default"].module_meta
    after = reloaded.peft_config["default"].module_meta
    keys = ("compression_ratio", "pre_prune_ratio", "importance_exponent")
    for name, meta in before.items():
        for key in keys:
            assert (key in meta) == (key in after[name])
            if key in meta:
                assert after[name][key] == meta[key]  # exact: the JSON round trip of a float is exact
                assert type(after[name][key]) is type(meta[key])
    if not auto:
        assert {m["pre_prune_ratio"] for m in before.values() if "pre_prune_ratio" in m} == {0.5}
    assert reloaded.peft_config["default"].pre_prune_ratio == settings["pre_prune_ratio"]


def test_auto_settings_reproduce_the_stored_counts(pairs):
    """The recorded beta and C are the ones the counts were made with (not a label): re-allocating from the delta's
    spectrum with them gives the stored keep counts back, at the config's one ratio."""
    base, finetuned = pairs["llama"]
    config = ImPartConfig(compression_ratio=6.0, pre_prune_ratio="auto", importance_exponent="auto")
    model = from_finetuned(copy.deepcopy(base), finetuned, config)
    meta = model.peft_config["default"].module_meta
    chosen = set()
    base_modules = dict(base.named_modules())
    ft_modules = dict(finetuned.named_modules())
    checked = 0
    for name, entry in meta.items():
        if not entry.get("rank") or entry["kind"] != "linear":
            continue
        assert entry["compression_ratio"] == 6.0
        delta = ft_modules[name].weight.detach().float() - base_modules[name].weight.detach().float()
        sigma = torch.linalg.svdvals(delta).double()
        again = allocate_keep_prob(
            sigma, tuple(delta.shape), 6.0, entry["pre_prune_ratio"], entry["importance_exponent"]
        )
        layer = model.base_model.model.get_submodule(name)
        assert torch.equal(again.keep_count.to(torch.int32), layer.impart_keep_count["default"].cpu())
        chosen.add((entry["pre_prune_ratio"], entry["importance_exponent"]))
        checked += 1
    assert checked >= 10


def test_streaming_and_in_memory_write_the_same_adapter(pairs, tmp_path):
    base, finetuned = pairs["llama-tied"]
    base.save_pretrained(tmp_path / "base")
    finetuned.save_pretrained(tmp_path / "ft")
    config = ImPartConfig(
        target_size="25kB", pre_prune_ratio="auto", importance_exponent="auto", seed=2, size_rule="spectral"
    )
    from_finetuned(copy.deepcopy(base), finetuned, config).save_pretrained(tmp_path / "memory")
    compress_checkpoints(tmp_path / "base", tmp_path / "ft", tmp_path / "stream", config, progress=False)
    memory = (tmp_path / "memory" / ADAPTER_WEIGHTS).read_bytes()
    assert memory == (tmp_path / "stream" / ADAPTER_WEIGHTS).read_bytes()
    assert len(memory) <= 25_000
    meta_memory = json.loads((tmp_path / "memory" / ADAPTER_CONFIG).read_text())["module_meta"]
    meta_stream = json.loads((tmp_path / "stream" / ADAPTER_CONFIG).read_text())["module_meta"]
    assert meta_memory == meta_stream


@pytest.mark.parametrize("rule", ["uniform", "spectral"])
def test_too_small_a_size_names_the_smallest_that_works(pairs, rule, tmp_path):
    base, finetuned = pairs["llama"]
    with pytest.raises(ValueError, match="too small") as info:
        from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(target_size=500, size_rule=rule))
    smallest = int(re.search(r"target_size=(\d+) or more", str(info.value)).group(1))
    assert isinstance(info.value, BudgetTooSmallError) and info.value.smallest == smallest
    assert "singular pair" in str(info.value)
    model = from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(target_size=smallest, size_rule=rule))
    assert _save(model, tmp_path) <= smallest
    with pytest.raises(ValueError, match=f"target_size={smallest} or more"):
        from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(target_size=smallest - 1, size_rule=rule))
    # nothing was written by the failed streaming compression either
    base.save_pretrained(tmp_path / "b")
    finetuned.save_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="too small"):
        compress_checkpoints(
            tmp_path / "b", tmp_path / "f", tmp_path / "out", ImPartConfig(target_size=500), progress=False
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"target_size": "12parsecs"}, "not a size"),
        ({"target_size": 0}, "positive"),
        ({"target_size": "1x"}, "> 1"),
        ({"pre_prune_ratio": "automatic"}, "pre_prune_ratio"),
        ({"target_size": "1MB", "size_rule": "layerwise"}, "size_rule"),
        ({"importance_exponent": "Auto"}, "importance_exponent"),
        ({"target_size": "1MB", "quantization": {"bits": [8, 4]}}, "not supported with quantization"),
        ({"pre_prune_ratio": "auto", "quantization": {"bits": [8, 4]}}, "not supported with quantization"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_error(settings, words):
    with pytest.raises(ValueError, match=words):
        ImPartConfig(**settings)


def test_tampered_recorded_ratio_is_refused(pairs, tmp_path):
    base, finetuned = pairs["llama"]
    from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(target_size="6x")).save_pretrained(tmp_path)
    data = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    name = next(n for n, m in data["module_meta"].items() if "compression_ratio" in m)
    data["module_meta"][name]["compression_ratio"] = -3
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(data))
    with pytest.raises(InvalidAdapterError, match="compression_ratio"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
