"""The adapter's on-disk format version and allocation rule: recorded, reloaded, and a foreign version refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

import impart_peft  # noqa: F401  (registers the adapter type)
from impart_peft import ImPartConfig, from_finetuned
from impart_peft.adapter_io import ADAPTER_FORMAT_VERSION
from tiny_models import make_pair, sample_ids


@pytest.fixture(scope="module")
def pair():
    return make_pair("llama", tie=False, width=64)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("rule", ["paper", "rescaled"])
def test_format_version_and_rule_are_recorded_and_reload_bit_identically(pair, rule, tmp_path):
    base, ft = pair
    ids = sample_ids()
    model = from_finetuned(copy.deepcopy(base), ft, ImPartConfig(compression_ratio=8, allocation=rule))
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["format_version"] == ADAPTER_FORMAT_VERSION == 2
    assert saved["allocation"] == rule
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as handle:
        names = list(handle.keys())
        counts = [k for k in names if k.endswith("impart_keep_count")]
        assert counts and all(handle.get_tensor(k).dtype == torch.int32 for k in counts)
        assert not [k for k in names if "threshold" in k]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].allocation == rule
    assert torch.equal(_logits(loaded, ids), expected)


def test_the_two_rules_give_different_adapters_of_the_same_size(pair, tmp_path):
    base, ft = pair
    sizes, deltas = {}, {}
    for rule in ("paper", "rescaled"):
        model = from_finetuned(copy.deepcopy(base), ft, ImPartConfig(compression_ratio=16, allocation=rule))
        model.save_pretrained(tmp_path / rule)
        meta = model.peft_config["default"].module_meta
        sizes[rule] = sum(m.get("u_count", 0) + m.get("v_count", 0) for m in meta.values())
        layer = model.base_model.model.model.layers[0].mlp.up_proj
        deltas[rule] = layer.get_delta_weight("default")
    assert sizes["paper"] == sizes["rescaled"]  # exact counts: the same budget to the value
    assert not torch.equal(deltas["paper"], deltas["rescaled"])


@pytest.mark.parametrize("version", [None, 1, 3, "2"])
def test_another_format_version_is_refused_on_both_load_paths(pair, version, tmp_path):
    base, ft = pair
    model = from_finetuned(copy.deepcopy(base), ft, ImPartConfig(compression_ratio=8))
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if version is None:
        del config["format_version"]
    else:
        config["format_version"] = version
    config_path.write_text(json.dumps(config))
    message = "no format version" if version is None else f"format version {version!r}"
    fresh = copy.deepcopy(base)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=f"{message}.*reads format version 2"):
        PeftModel.from_pretrained(fresh, tmp_path)
    with pytest.raises(ValueError, match=f"{message}.*reads format version 2"):
        fresh.load_adapter(str(tmp_path))
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_allocation_rule_is_a_clear_error():
    with pytest.raises(ValueError, match=r"allocation must be one of \('paper', 'rescaled'\)"):
        ImPartConfig(allocation="dare")
