"""Merging fine-tunes (task arithmetic, TIES; ImPart / DARE / magnitude sparsification) in memory, streamed from
checkpoints and from the command line, and combining loaded ImPart adapters with add_weighted_adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from impart_peft import ImPartConfig, ImPartLayer, from_finetuned, merge_deltas, merge_finetunes
from impart_peft.cli import main
from impart_peft.merging import sparsify_delta
from tiny_models import finetune, make_base, sample_ids, task_batch


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def family():
    """A tied Llama base and two full fine-tunes of it on two different tasks."""
    base = make_base("llama", tie=True)
    return base, finetune(base, steps=20, seed=1), finetune(base, steps=20, seed=2)


# ------------------------------------------------------------------------------------------- merge_deltas
TAUS = [
    torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]),
    torch.tensor([-3.0, 1.0, 0.5, 2.0, -1.0]),
    torch.tensor([1.0, 1.0, -2.0, 0.0, -1.0]),
]


def test_ties_sign_election_by_hand():
    # Sum per element: [-1, 0, -1, 2, 1] -> elected signs [-, + (a tie elects +), -, +, +]. Only entries that are
    # non-zero with the elected sign count: element 0 keeps -3 alone, element 1 keeps 1 and 1, element 2 keeps -2,
    # element 3 keeps 2 (the zeros do not dilute it), element 4 keeps 3.
    assert merge_deltas(TAUS, method="ties").tolist() == [-3.0, 1.0, -2.0, 2.0, 3.0]
    assert merge_deltas(TAUS, method="ties", normalize=False).tolist() == [-3.0, 2.0, -2.0, 2.0, 3.0]
    # "frequency": the sign most task vectors have: [+, +, +, +, -].
    assert merge_deltas(TAUS, method="ties", majority_sign="frequency").tolist() == [1.0, 1.0, 0.5, 2.0, -1.0]
    # Weights [2, 1, 1]: the weighted sum [0, -2, -0.5, 2, 4] elects [+, -, -, +, +]; the disjoint mean divides by
    # the weights of the agreeing models: (2 + 1) / (2 + 1), -4 / 2, -2 / 1, 2 / 1, 6 / 2.
    assert merge_deltas(TAUS, [2, 1, 1], method="ties").tolist() == [1.0, -2.0, -2.0, 2.0, 3.0]


def test_task_arithmetic_by_hand():
    assert merge_deltas(TAUS).tolist() == [-1.0, 0.0, -1.0, 2.0, 1.0]
    assert merge_deltas(TAUS, [1, 0.5, -1]).tolist() == [-1.5, -2.5, 2.75, 1.0, 3.5]
    assert merge_deltas(TAUS, [1, 1, 2], normalize=True).tolist() == [0.0, 0.25, -0.75, 0.5, 0.0]


def test_sparsifiers_keep_the_density_asked_for():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 96, generator=g)
    magnitude = sparsify_delta(delta, "magnitude", 0.25)
    assert int((magnitude != 0).sum()) == round(0.25 * 64 * 96)
    kept = magnitude != 0
    assert float(delta[kept].abs().min()) >= float(delta[~kept].abs().max())  # the largest, unscaled
    assert torch.equal(magnitude[kept], delta[kept])
    dare = sparsify_delta(delta, "dare", 0.25, seed=1, name="m")
    assert abs(float((dare != 0).float().mean()) - 0.25) < 0.03
    torch.testing.assert_close(dare[dare != 0], delta[dare != 0] * 4)  # rescaled by 1 / density
    impart = sparsify_delta(delta, "impart", 0.25, seed=1, name="m")
    assert impart.shape == delta.shape and not torch.equal(impart, delta)
    for name in ("impart", "dare", "magnitude", None):
        assert torch.equal(sparsify_delta(delta, name, 1.0), delta)  # density 1 keeps everything
        vector = torch.randn(7, generator=g)
        assert sparsify_delta(vector, name, 0.25) is vector  # 1-D task vectors go into the merge whole


# -------------------------------------------------------------------------------------------- models
def test_task_arithmetic_without_sparsification_is_the_sum_of_deltas(family):
    base, ft1, ft2 = family
    # One fine-tune gives it back bit for bit.
    assert_same_weights(merge_finetunes(base, [ft1], sparsify=None), ft1)
    merged = merge_finetunes(base, [ft1, ft2], sparsify=None)
    b, f1, f2 = base.state_dict(), ft1.state_dict(), ft2.state_dict()
    for name, value in merged.state_dict().items():
        expected = (f1[name].double() + f2[name].double() - b[name].double()).to(value.dtype)
        assert torch.equal(value, expected), name
    # base is untouched (a copy was merged), and the tied head still shares the embedding.
    assert_same_weights(base, make_base("llama", tie=True))
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_impart_sparsification_is_the_adapter_delta(family):
    base, ft1, _ = family
    merged = merge_finetunes(base, [ft1], sparsify="impart", density=1 / 8, seed=3)
    adapter = from_finetuned(copy.deepcopy(base), ft1, ImPartConfig(compression_ratio=8, seed=3))
    assert_same_weights(merged, adapter.merge_and_unload())


def test_merged_model_does_both_tasks_better_than_the_base(family):
    base, ft1, ft2 = family

    def loss(model, task):
        ids = task_batch(torch.Generator().manual_seed(77), task, batch=16, length=16)
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)

    for method, weights in (("task_arithmetic", [0.5, 0.5]), ("ties", None)):
        merged = merge_finetunes(base, [ft1, ft2], method, "impart", weights, density=0.3)
        for task in (1, 2):
            assert loss(merged, task) < loss(base, task) - 0.2, (method, task)


@pytest.mark.parametrize("method, sparsify", [("ties", "impart"), ("task_arithmetic", "dare")])
def test_streamed_checkpoints_equal_in_memory_and_load(family, tmp_path, method, sparsify):
    base, ft1, ft2 = family
    for name, model in (("base", base), ("ft1", ft1), ("ft2", ft2)):
        model.save_pretrained(tmp_path / name, max_shard_size="20KB")
    kwargs = dict(method=method, sparsify=sparsify, weights=[1.0, 0.5], density=0.4, seed=5)
    out = merge_finetunes(
        tmp_path / "base",
        [tmp_path / "ft1", tmp_path / "ft2"],
        output_dir=tmp_path / "merged",
        max_shard_size="20KB",
        **kwargs,
    )
    assert out == tmp_path / "merged"
    assert (out / "model.safetensors.index.json").is_file()  # sharded like the base
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    in_memory = merge_finetunes(base, [ft1, ft2], **kwargs)
    assert_same_weights(loaded, in_memory)
    assert torch.isfinite(logits(loaded, sample_ids())).all()
    assert not torch.equal(logits(loaded, sample_ids()), logits(base, sample_ids()))
    with pytest.raises(FileExistsError, match="already exists"):
        merge_finetunes(tmp_path / "base", [tmp_path / "ft1"], output_dir=out)


def test_in_memory_with_output_dir_writes_a_loadable_model(family, tmp_path):
    base, ft1, ft2 = family
    merged = merge_finetunes(base, [ft1, ft2], "ties", "magnitude", output_dir=tmp_path / "out")
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), merged)


def test_bad_arguments(family, tmp_path):
    base, ft1, ft2 = family
    cases = [
        (dict(method="average"), "method must be one of"),
        (dict(sparsify="random"), "sparsify must be one of"),
        (dict(density=0.0), r"density must be in \(0, 1\]"),
        (dict(density=1.5), r"density must be in \(0, 1\]"),
        (dict(weights=[1.0]), "1 weights for 2 fine-tunes"),
        (dict(majority_sign="max"), "majority_sign must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            merge_finetunes(base, [ft1, ft2], **kwargs)
    with pytest.raises(ValueError, match="a list of fine-tuned models"):
        merge_finetunes(base, ft1)
    with pytest.raises(ValueError, match="all as models in memory or all as folders"):
        merge_finetunes(base, [tmp_path])
    with pytest.raises(ValueError, match="pass output_dir"):
        merge_finetunes(tmp_path, [tmp_path])
    other = make_base("gpt2")
    with pytest.raises(ValueError, match="not the same architecture"):
        merge_finetunes(base, [other])


def test_cli_merge(family, tmp_path, capsys):
    base, ft1, ft2 = family
    for name, model in (("base", base), ("ft1", ft1), ("ft2", ft2)):
        model.save_pretrained(tmp_path / name)
    paths = [str(tmp_path / n) for n in ("base", "ft1", "ft2")]
    args = ["merge", *paths, str(tmp_path / "out"), "--method", "ties", "--sparsify", "impart", "--quiet"]
    assert main([*args, "--weights", "1,0.5", "--density", "0.3", "--seed", "2"]) == 0
    expected = merge_finetunes(base, [ft1, ft2], "ties", "impart", [1, 0.5], density=0.3, seed=2)
    assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), expected)
    assert main(["merge", paths[0], str(tmp_path / "x"), "--quiet"]) == 1
    assert "needs BASE, at least one fine-tune and OUTPUT" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--weights", "1"]) == 1
    assert "1 weights for 2 fine-tunes" in capsys.readouterr().err
    assert main([*args[:-1], "--sparsify", "none", "--overwrite", "--quiet"]) == 0


# ------------------------------------------------------------------------------------ add_weighted_adapter
@pytest.fixture(scope="module")
def two_adapters(family, tmp_path_factory):
    base, ft1, ft2 = family
    root = tmp_path_factory.mktemp("adapters")
    from_finetuned(copy.deepcopy(base), ft1, ImPartConfig(compression_ratio=8, seed=1)).save_pretrained(
        root / "a"
    )
    qt = ImPartConfig(compression_ratio=8, seed=2, quantization={"bits": [4, 2]})
    from_finetuned(copy.deepcopy(base), ft2, qt).save_pretrained(root / "b")
    return root


def load_both(base, root):
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "a", adapter_name="a")
    model.load_adapter(root / "b", adapter_name="b")
    return model


def test_add_weighted_adapter_cat_is_the_weighted_sum(family, two_adapters, tmp_path):
    base, _, _ = family
    model = load_both(base, two_adapters)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.5], "ab", combination_type="cat")
    layers = [m for m in model.modules() if isinstance(m, ImPartLayer) and "ab" in m.impart_meta]
    assert layers
    concatenated = 0
    for layer in layers:
        got = layer.get_delta_weight("ab")
        if got is None:
            continue
        expected = 0.7 * layer.get_delta_weight("a") - 0.5 * layer.get_delta_weight("b")
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        if layer.impart_meta["ab"]["kind"] == "tied":
            continue  # the head borrows the embedding's combined factors
        # The factors side by side while they fit (rank <= min(m, n)); past that, the SVD of the exact sum.
        ranks = sum(layer.impart_meta[a]["rank"] for a in "ab")
        full = min(layer.impart_meta["ab"]["shape"])
        assert (
            layer.impart_meta["ab"]["rank"] == ranks
            if ranks <= full
            else layer.impart_meta["ab"]["rank"] <= full
        )
        concatenated += ranks <= full
    assert concatenated > 0
    ids = sample_ids()
    model.set_adapter("ab")
    combined = logits(model, ids)
    # The new adapter saves and loads like any ImPart adapter, bit for bit.
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ab")
    assert torch.equal(logits(reloaded, ids), combined)


def test_add_weighted_adapter_svd_family_and_refusals(family, two_adapters):
    base, _, _ = family
    model = load_both(base, two_adapters)
    ids = sample_ids()
    model.add_weighted_adapter(["a", "b"], [1, 1], "svd_full", combination_type="svd", svd_rank=32)
    model.add_weighted_adapter(["a", "b"], [1, 1], "cat", combination_type="cat")
    model.set_adapter("svd_full")
    full_rank = logits(model, ids)
    model.set_adapter("cat")
    torch.testing.assert_close(full_rank, logits(model, ids), atol=1e-4, rtol=1e-4)  # rank 32 = every pair
    for combination in ("ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd"):
        model.add_weighted_adapter(["a", "b"], [1, 1], combination, combination_type=combination, density=0.5)
        model.set_adapter(combination)
        assert torch.isfinite(logits(model, ids)).all()
        ranks = [
            m.impart_meta[combination].get("rank", 0) for m in model.modules() if isinstance(m, ImPartLayer)
        ]
        assert max(ranks) <= max(
            m.impart_meta[a].get("rank", 0)
            for m in model.modules()
            if isinstance(m, ImPartLayer)
            for a in "ab"
        )
    with pytest.raises(ValueError, match="use 'cat'"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="use 'ties_svd'"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties")
    with pytest.raises(ValueError, match="needs density"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="ties_svd")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "cat")
    with pytest.raises(ValueError, match="does not exist"):
        model.add_weighted_adapter(["a", "zzz"], [1, 1], "x")
    with pytest.raises(ValueError, match="2 weights for 1"):
        model.add_weighted_adapter(["a"], [1, 1], "x")
    assert "x" not in model.peft_config
